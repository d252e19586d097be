"""The restore phase of `metarun train`: which saved run a command continues, what of its execution
is kept, and its state put back into the freshly built parts (a branch into a new run dir takes
its best checkpoints along).

The resumed config itself (which settings may change) is runner/resume.py's.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from metarun import settings
from metarun.errors import MetarunError
from metarun.runner import distributed
from metarun.runner.checkpoint import (
    checkpoint_params,
    load_checkpoint,
    resolve_checkpoint_path,
)
from metarun.runner.files import RunFiles
from metarun.runner.resume import auto_resume, resumed_config
from metarun.runner.setup import check_train_settings
from metarun.runner.state import TrainState, missing_training_key
from metarun.tasks import CLASSIFICATION, TaskFamily

log = logging.getLogger("metarun")


@dataclass
class Request:
    """What a `metarun train` command asks for: its config (for a resume: the saved run's, with
    the allowed changes), and the saved run it continues (None: a fresh run)."""

    cfg: object
    overrides: list
    resume: str | None = None
    saved: TrainState | None = None
    changes: dict = field(default_factory=dict)

    @property
    def resume_file(self) -> Path | None:
        """The checkpoint file the run continues from."""
        return None if self.resume is None else resolve_checkpoint_path(self.resume, "resume")


def open_request(cfg, run_dir: Path, overrides) -> Request:
    """Reads the command: `resume=auto` resolved in `run_dir`, the saved run loaded and its config
    taken (runner/resume.py), the settings checked. Raises MetarunError for a user error."""
    resume = cfg.resume
    if resume == "auto":  # a requeued job: continue this dir's run if it saved one, else start
        resume = auto_resume(run_dir)
    request = Request(cfg, list(overrides), resume)
    if resume:
        blob = load_checkpoint(resume, "resume")
        missing = missing_training_key(blob)
        if missing is not None:
            raise MetarunError(
                f"resume={resume} holds no '{missing}': it can be scored with metarun eval, not "
                "continued; resume a checkpoint written by metarun train."
            )
        request.cfg, request.changes = resumed_config(blob, cfg, overrides, resume)
        request.saved = TrainState.from_dict(blob)
    check_train_settings(request.cfg)
    if distributed.is_main() and not resume and (hint := settings.preset_hint(cfg, overrides)):
        log.warning(hint)  # e.g. way=20 with the 5-way step sizes: name the tuned preset, once
    return request


def kept_execution(request: Request, device: torch.device) -> dict | None:
    """The saved run's execution ({"impl", "workers"}), which a resume keeps (float32 results
    depend on the order of operations), unless this resume changes it: another impl or thread
    count asked for, another device type than the run's last one, or (torchrun) another number of
    processes, so that their threads share the cores again. None for a fresh run."""
    saved = request.saved
    if saved is None or not saved.algorithm:
        return None
    last_device = str(saved.resolved.get("device", device))
    last_processes = int((saved.history or [{}])[-1].get("processes", 1))
    if (
        request.changes.keys() & {"algorithm.impl", "threads"}
        or torch.device(last_device).type != device.type
        or last_processes != distributed.world_size()
    ):
        return None
    return saved.algorithm


def restore(run, request: Request) -> TrainState:
    """The run's state at the start of this segment: a fresh one, or the saved run's put into the
    built parts (weights, optimizer, sampler)."""
    if request.saved is None:
        state = TrainState.fresh(run.params, run.config, run.resolved, run.algorithm.family)
    else:
        state = _resumed(run, request)
    state.params, state.config, state.resolved = run.params, run.config, run.resolved
    distributed.broadcast_params(run.params)  # every rank starts from rank 0's weights
    return state


def _resumed(run, request: Request) -> TrainState:
    """The saved state in the built parts; a damaged best.pt refused now (the end scores it)."""
    saved, resume_file = request.saved, request.resume_file
    weights = checkpoint_params({"params": saved.params}, run.params, resume_file, "resume")
    with torch.no_grad():
        for k, v in run.params.items():
            v.copy_(weights[k])
    run.optimizer.load_state_dict(saved.optimizer)
    _restore_sampler(run, saved, request.resume)
    source = RunFiles.of_checkpoint(resume_file)
    if source.best.is_file() and source.best.resolve() != resume_file.resolve():
        load_checkpoint(source.best, "resume")
    if run.main and source.checkpoints.resolve() != run.files.checkpoints.resolve():
        copy_branch(source, run.files, saved, run.algorithm.family)
    changes = request.changes
    log.info(
        f"metarun: resumed from {request.resume} at iteration {saved.iteration}"
        + (
            f", changed: {', '.join(f'{k} {a} -> {b}' for k, (a, b) in changes.items())}"
            if changes
            else ""
        )
    )
    return saved


def _restore_sampler(run, saved: TrainState, resume) -> None:
    if isinstance(saved.sampler, dict):
        run.sampler.load_state(saved.sampler)
        return
    # an older checkpoint's generator state only fits the generator type that wrote it
    seed = int(run.cfg.seed)
    run.sampler.load_state({"seed": seed, "draws": saved.iteration})
    log.warning(
        f"metarun: warning: {resume} carries a device-specific sampler state (an older metarun); "
        f"training tasks continue from a fresh deterministic draw (seed {seed}, draw "
        f"{saved.iteration})."
    )


def copy_branch(
    source: RunFiles, target: RunFiles, state: TrainState, family: TaskFamily = CLASSIFICATION
) -> None:
    """A resume into a new run dir (a branch of the run): its best checkpoint and the kept best
    ones (eval ensemble=K) go with it; without a best checkpoint the branch's next validation
    writes one. Updates `state`'s best and top to what the branch holds."""
    if source.best.is_file():
        shutil.copyfile(source.best, target.best)
    else:
        state.best_val, state.best_iteration = family.worst, 0
    for _, iteration in state.top:
        if source.top(iteration).is_file():
            target.top_dir.mkdir(exist_ok=True)
            shutil.copyfile(source.top(iteration), target.top(iteration))
    state.top = [e for e in state.top if target.top(e[1]).is_file()]
