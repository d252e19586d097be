"""The files of a run dir, named in one place.

    <run dir>/
      .metarun-run             the marker: which process claimed the dir (runner/rundir.py)
      .hydra/                  Hydra's record of how the run was started (config, overrides)
      metarun-train.log        the run's log (Hydra's job name: metarun-<command>.log)
      resolved.yaml            the settings with what `auto`, 0 and interpolations became
      results.json             the finished run's record (metarun train), or a failed cell's reason
      eval.json                the record of `metarun eval` (its own run dir)
      tensorboard/             TensorBoard events; tensorboard/hparams/ the run's HParams record
      checkpoints/last.pt      the latest state: what `resume` continues
      checkpoints/best.pt      the best validation's state: what the final test and `eval` score
      checkpoints/top/iteration-<N>.pt   the keep_best best validations' states (eval ensemble=K)

Every other module asks a `RunFiles` for these paths; none spells a name of this list.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

TOP_NAME = re.compile(r"iteration-(\d+)\.pt")


@dataclass(frozen=True)
class RunFiles:
    """The paths of the run in `run_dir` (nothing is created or read by making one)."""

    run_dir: Path

    MARKER = ".metarun-run"
    HYDRA = ".hydra"
    RESOLVED = "resolved.yaml"
    RESULTS = "results.json"
    EVAL = "eval.json"
    TENSORBOARD = "tensorboard"
    HPARAMS = "hparams"
    CHECKPOINTS = "checkpoints"
    LAST = "last.pt"
    BEST = "best.pt"
    TOP = "top"
    LOG_GLOB = "metarun-*.log"

    def __post_init__(self):
        object.__setattr__(self, "run_dir", Path(self.run_dir))

    @classmethod
    def of_checkpoint(cls, checkpoint: Path) -> RunFiles:
        """The files of the run that wrote `checkpoint` (in checkpoints/ or checkpoints/top/)."""
        ckpt_dir = Path(checkpoint).parent
        if ckpt_dir.name == cls.TOP:
            ckpt_dir = ckpt_dir.parent
        return cls(ckpt_dir.parent)

    @property
    def marker(self) -> Path:
        return self.run_dir / self.MARKER

    @property
    def hydra(self) -> Path:
        return self.run_dir / self.HYDRA

    @property
    def resolved(self) -> Path:
        return self.run_dir / self.RESOLVED

    @property
    def results(self) -> Path:
        return self.run_dir / self.RESULTS

    @property
    def eval_record(self) -> Path:
        return self.run_dir / self.EVAL

    @property
    def tensorboard(self) -> Path:
        return self.run_dir / self.TENSORBOARD

    @property
    def hparams(self) -> Path:
        """The folder of the run's one TensorBoard HParams record (rewritten at each finish)."""
        return self.tensorboard / self.HPARAMS

    @property
    def checkpoints(self) -> Path:
        return self.run_dir / self.CHECKPOINTS

    @property
    def last(self) -> Path:
        return self.checkpoints / self.LAST

    @property
    def best(self) -> Path:
        return self.checkpoints / self.BEST

    @property
    def top_dir(self) -> Path:
        return self.checkpoints / self.TOP

    def top(self, iteration: int) -> Path:
        """The checkpoint of the validation at `iteration` among the kept best ones."""
        return self.top_dir / f"iteration-{int(iteration)}.pt"

    def logs(self) -> list[Path]:
        """The run's log files (one per command that ran in the dir: metarun-train.log, ...)."""
        return sorted(self.run_dir.glob(self.LOG_GLOB))

    def has_checkpoints(self) -> bool:
        """Whether any checkpoint was written (finished work: never deleted)."""
        return any(self.checkpoints.glob("*.pt"))

    def checkpoint_files(self) -> list[Path]:
        """Every checkpoint of the run that exists: last.pt, best.pt, then top/ newest first."""
        tops = [p for p in self.top_dir.glob("*.pt") if TOP_NAME.fullmatch(p.name)]
        tops.sort(key=lambda p: -int(TOP_NAME.fullmatch(p.name)[1]))
        return [p for p in (self.last, self.best) if p.is_file()] + tops
