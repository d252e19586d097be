"""A run's state: what a run carries from one iteration to the next and across a resume.

`TrainState.to_dict()` is the checkpoint format, written by `torch.save` and read back with
`torch.load(weights_only=True)`: plain tensors, dicts, lists, strings and numbers only, so that
loading a checkpoint never runs code. `TrainState.from_dict()` reads every version metarun has
written:

- version 1 (`"format": "metarun-checkpoint-v1"`, metarun before the run-state redesign): the
  fields below without `metarun_version`.
- version 2 (`"format": "metarun-checkpoint-v2"`): adds `metarun_version`, the metarun that wrote
  the file. A checkpoint is written in the newest version; resume and eval read either.

A checkpoint need not be complete to be evaluated: `iteration`, `params` and `config` suffice
(`metarun eval`); a resume needs the training fields too (`TRAINING_KEYS`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

from metarun.tasks import CLASSIFICATION, TaskFamily

FORMAT_PREFIX = "metarun-checkpoint-v"
VERSION = 2
FORMAT = f"{FORMAT_PREFIX}{VERSION}"
VERSIONS = (1, 2)  # the versions from_dict reads
REQUIRED_KEYS = ("iteration", "params", "config")  # what `metarun eval` needs
TRAINING_KEYS = ("optimizer", "best_val", "best_iteration", "train_seconds")


def format_version(blob) -> int | None:
    """The checkpoint version of a loaded file's `format` marker, or None when it has none that
    metarun wrote (not a dict, no marker, or a version this metarun does not know)."""
    marker = blob.get("format") if isinstance(blob, dict) else None
    if not isinstance(marker, str) or not marker.startswith(FORMAT_PREFIX):
        return None
    number = marker[len(FORMAT_PREFIX) :]
    return int(number) if number.isdigit() and int(number) in VERSIONS else None


@dataclass
class TrainState:
    """The state of a run after `iteration` meta-iterations; its dict form is the checkpoint.

    Attributes:
        iteration: meta-iterations done (int, >= 0). Resuming continues with iteration + 1.
        params: the meta-parameters, {name: float tensor on the CPU}: the learner's weights under
            the model's names plus the algorithm's own (e.g. `lslr.*`, `alpha.*`, `pretrain.*`).
        config: the run's settings as composed and resolved (dict, the YAML config tree). A
            resume starts from it; only the resumable settings may change (runner/resume.py).
        optimizer: the outer optimizer's `state_dict()` (Adam's moments and step counts; SGD's
            for Reptile); {} in a checkpoint that cannot be resumed.
        sampler: the training sampler's `state()`, {"seed": int, "draws": int}: the draws so far,
            so a resumed run draws what it would have drawn. None in checkpoints of an older
            metarun (a device-specific `sampler_rng`): a resume then redraws deterministically.
        best_val: the best validation accuracy so far (float in [0, 1]; -1.0 before the first).
        best_iteration: the iteration of best_val (int; 0 before the first validation).
        top: the kept best validations, best first: [[accuracy (float), iteration (int)], ...],
            at most keep_best long; their checkpoints are checkpoints/top/iteration-<N>.pt.
        train_seconds: seconds spent in training steps over all segments (no validation, no
            checkpoints), for the speed in results.json.
        wall_seconds: wall-clock seconds of all segments of the run up to this state.
        history: one dict per segment (a run and each resume): start_iteration, resumed_from,
            changes ({setting: [old, new]}), overrides (the command line's settings), command
            (the command that started the segment), started (time), device, impl, threads,
            processes (torchrun only).
        resolved: the settings with what `auto`, 0 and interpolations became (device, impl,
            threads, data root) and data_source; the same as the run dir's resolved.yaml.
        algorithm: the algorithm's state_dict(): {"name", "impl", "workers"}, the resolved
            execution a resume keeps (float32 results depend on the order of operations).
        metarun_version: the metarun version that wrote the checkpoint (str; None in version 1).
    """

    iteration: int
    params: dict
    config: dict
    optimizer: dict = field(default_factory=dict)
    sampler: dict | None = None
    best_val: float = -1.0
    best_iteration: int = 0
    top: list = field(default_factory=list)
    train_seconds: float = 0.0
    wall_seconds: float = 0.0
    history: list = field(default_factory=list)
    resolved: dict = field(default_factory=dict)
    algorithm: dict = field(default_factory=dict)
    metarun_version: str | None = None

    @classmethod
    def fresh(
        cls, params: dict, config: dict, resolved: dict, family: TaskFamily = CLASSIFICATION
    ) -> TrainState:
        """The state of a run before its first iteration (best_val: the task family's worst)."""
        state = cls(iteration=0, params=params, config=config, resolved=resolved)
        state.best_val = family.worst
        return state

    def to_dict(self) -> dict:
        """The checkpoint (newest version): every attribute, tensors detached and on the CPU."""
        from metarun import __version__

        blob = {"format": FORMAT}
        for f in fields(self):
            blob[f.name] = getattr(self, f.name)
        blob["params"] = {k: v.detach().cpu() for k, v in self.params.items()}
        blob["top"] = [list(e) for e in self.top]
        blob["metarun_version"] = self.metarun_version or __version__
        return blob

    @classmethod
    def from_dict(cls, blob: dict) -> TrainState:
        """The state of a loaded checkpoint of any version in VERSIONS (format_version). Keys of
        REQUIRED_KEYS must be there (load_checkpoint checks); absent others get their defaults."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in blob.items() if k in known}
        state = cls(**values)
        state.iteration = int(state.iteration)
        state.best_val, state.best_iteration = float(state.best_val), int(state.best_iteration)
        state.train_seconds = float(state.train_seconds)
        state.wall_seconds = float(state.wall_seconds)
        state.top = [[float(a), int(i)] for a, i in state.top]
        state.history = list(state.history)
        return state

    def rank_top(
        self, val: float, iteration: int, keep: int, family: TaskFamily = CLASSIFICATION
    ) -> list:
        """Adds a validation to `top` (the best first by the task family's metric: higher
        accuracy, lower MSE; the earlier on ties), keeps the `keep` best, and returns the entries
        that fell out. A non-finite validation (a diverged inner loop) never ranks."""
        if not math.isfinite(val):
            return []
        ranked = sorted(self.top + [[val, iteration]], key=lambda e: (family.rank_key(e[0]), e[1]))
        self.top, dropped = ranked[:keep], ranked[keep:]
        return dropped


def missing_training_key(blob: dict) -> str | None:
    """The first of TRAINING_KEYS a loaded checkpoint lacks (it can be evaluated, not resumed)."""
    return next((k for k in TRAINING_KEYS if k not in blob), None)
