"""What a resumed run is: the saved run's own config, plus only the settings that may change
mid-run.

`metarun train resume=RUN` continues RUN exactly as it was configured: the config saved in its
checkpoint is the base, not the defaults. The command line may change only RESUMABLE settings (how
long, how often to validate and log, how many evaluation tasks, where it runs, where the data lies);
they are applied for real and each change is recorded in the run's history (checkpoint and
results.json). Giving any other setting a value other than the run's own is a MetarunError naming
it; repeating the run's own value is accepted.
"""

from __future__ import annotations

import time

from omegaconf import DictConfig, OmegaConf

from metarun import settings
from metarun.errors import MetarunError

# Settings that may change when a run is continued (metarun/settings.py marks them resumable):
# nothing in the saved weights, Adam state or sampler state depends on them.
RESUMABLE = settings.resumable()
# Keys of the command line that are not settings of the run.
NOT_SETTINGS = ("resume",)


def override_keys(overrides) -> list[tuple[str, str]]:
    """(key, text) of each command-line override that is not hydra.*; a config group choice has its
    group name as key (e.g. 'experiment')."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    keys = {}
    for override in OverridesParser.create().parse_overrides(list(overrides)):
        key = override.key_or_group
        if key.startswith("hydra.") or key == "hydra" or key in NOT_SETTINGS:
            continue
        keys.pop(key, None)
        keys[key] = override.input_line  # the last one given is the one Hydra applied
    return list(keys.items())


# The config groups whose option a run chooses (conf/<group>/*.yaml).
GROUPS = ("algorithm", "dataset", "model")


def _option(config, group: str):
    """Which option of a config group a config holds: its `name`, else (a learner built from a
    class) its `_target_`."""
    return OmegaConf.select(config, f"{group}.name", default=None) or OmegaConf.select(
        config, f"{group}._target_", default=None
    )


def resume_config(
    saved: dict, requested: DictConfig, overrides, resume: str
) -> tuple[DictConfig, dict]:
    """The resumed run's config: `saved` with the overridden RESUMABLE settings taken from
    `requested` (the command line's composition), and {key: [saved value, new value]} of the
    settings that changed.

    Raises MetarunError for an override of any other setting whose value differs from the saved one,
    and for a config group choice other than the run's own (it would swap a whole group of the run's
    settings)."""
    # The saved config wins; a setting newer than the run (absent from its config) takes the
    # requested value.
    base = OmegaConf.merge(OmegaConf.to_container(requested, resolve=True), saved)
    for group in GROUPS:  # a group option the run chose stays whole: no keys of another option
        own = saved.get(group)
        if isinstance(own, dict) and _option(requested, group) != (
            own.get("name") or own.get("_target_")
        ):
            base[group] = own
    changes = {}
    for key, text in override_keys(overrides):
        if "." not in key and (key not in requested or isinstance(requested[key], DictConfig)):
            # a config group: choosing the run's own option again changes nothing (its settings stay
            # the run's)
            if (
                key in requested
                and _option(requested, key) is not None
                and _option(requested, key) == _option(base, key)
            ):
                continue
            raise MetarunError(
                f"{text} chooses a config group; resume={resume} continues the run with its own "
                f"settings: drop {text}, or start a new run without resume."
            )
        new = OmegaConf.select(requested, key, default=None)
        old = OmegaConf.select(base, key, default=None)
        if new == old and isinstance(new, bool) == isinstance(old, bool):
            continue
        if key not in RESUMABLE:
            raise MetarunError(
                f"{text} cannot change on resume: resume={resume} continues the run as it was "
                f"configured ({key}={old}); on resume only {', '.join(RESUMABLE)} may change. Drop "
                f"{text}, or start a new run without resume."
            )
        OmegaConf.update(base, key, new, force_add=True)
        changes[key] = [old, new]
    base.resume = saved.get("resume")
    return base, changes


def resumed_config(blob: dict, requested: DictConfig, overrides, resume) -> tuple[DictConfig, dict]:
    """resume_config of a loaded checkpoint, refusing an `iterations` below the iteration it
    reached."""
    config, changes = resume_config(blob["config"], requested, overrides, str(resume))
    if isinstance(config.iterations, int) and config.iterations < int(blob["iteration"]):
        raise MetarunError(
            f"iterations={config.iterations} is below the iteration {int(blob['iteration'])} that "
            f"resume={resume} reached: give iterations>={int(blob['iteration'])}."
        )
    pin_schedule(config, changes)
    return config, changes


def pin_schedule(config: DictConfig, changes: dict) -> None:
    """A resume that changes `iterations` keeps the run's schedules on the length it started with: a
    null schedule_iterations becomes the saved run's iterations, recorded as a change (checkpoint,
    results.json; the algorithms with schedules say what holds). The schedules then continue where
    they were and hold their end values past that length (MAML++'s cosine meta learning rate at
    min_meta_lr, MSL over, second order; Reptile's outer step at meta_step_final) rather than
    restart, or jump to where a run of the new length would be. An explicit schedule_iterations is
    kept as it is."""
    if "iterations" not in changes or config.get("schedule_iterations") is not None:
        return
    started = int(changes["iterations"][0])
    OmegaConf.update(config, "schedule_iterations", started, force_add=True)
    changes["schedule_iterations"] = [None, started]


def history_entry(start_iteration: int, resume, changes: dict, overrides) -> dict:
    """One segment of a run's history: where it started, from what, with which changed settings."""
    return {
        "start_iteration": int(start_iteration),
        "resumed_from": None if resume is None else str(resume),
        "changes": {k: list(v) for k, v in changes.items()},
        "overrides": [str(o) for o in overrides],
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def auto_resume(run_dir) -> str | None:
    """`resume=auto`: the run dir itself when it holds checkpoints/last.pt (continue it), else None
    (start fresh). This is what a requeued job needs: Slurm (through submitit) reruns a preempted
    cell with the same overrides in the same run dir."""
    from metarun.runner.files import RunFiles

    return str(run_dir) if RunFiles(run_dir).last.is_file() else None
