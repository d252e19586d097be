"""`metarun <command> [hydra overrides]`: pops the subcommand and runs that command's Hydra app.

How a command meets Hydra (hydra-core 1.3, its public interfaces only: `hydra.main`, the Compose
API, `HydraConfig`, the override parser of `hydra.core` and Hydra's exception types):

1. Pre-flight (`_prepare`). main() composes the command's config with the Compose API (every cell of
   a basic sweep too), checks it and claims the run dir or sweep dir; only then does the Hydra app
   run, told the claimed dir. No hook of Hydra's comes early enough for this: a composition error is
   printed by Hydra's own handler (several lines, exit 1) before any Callback runs, and Hydra
   creates the run dir, opens the log file in it and writes `.hydra/` before `on_job_start`
   (`on_run_start`/`on_multirun_start` come after composing, and an exception there is again Hydra's
   traceback). The pre-flight is what makes every rejection one line (exit 2) that leaves nothing
   behind.
2. The app (`_launch`). hydra.main reads its command line from sys.argv and nowhere else: it is set
   for the call and restored. What a job decides travels back as an exception (`_Rejected`) or as
   files, never as module state.
3. Sweep cells (metarun/runner/sweep.py). A cell claims its own dir in its job, before writing
   anything, so sweeps run with hydra.output_subdir=null and the cell writes `.hydra/` itself.
   Callbacks do not fit here either: on_job_start comes after Hydra wrote into the dir and an
   exception in it ends the whole sweep; on_job_end cannot tell a failed cell from a finished one,
   as a failed cell returns None (which is how an optimizing sweeper learns that the trial failed).
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import shlex
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import OmegaConf, open_dict

from metarun import settings
from metarun.errors import MetarunError
from metarun.runner import distributed, rundir, sweep
from metarun.runner.files import RunFiles
from metarun.tasks import family_of_metric

# Absolute, so that it works from any folder once installed: the source tree's conf/ (editable
# install), else the copy the wheel carries inside the package (see pyproject.toml).
_HERE = Path(__file__).resolve().parent
CONF = str(
    _HERE.parent / "conf" if (_HERE.parent / "conf" / "train.yaml").is_file() else _HERE / "conf"
)

USAGE = (
    "usage: metarun <command> [overrides...]\n"
    "\n"
    "commands:\n"
    "  train   meta-train a learner (e.g. metarun train way=20 shot=1; sweep: metarun train -m "
    "way=5,20 shot=1,5)\n"
    "  eval    score a checkpoint on held-out tasks (metarun eval "
    "checkpoint=outputs/train/<run>/checkpoints/best.pt;\n"
    "          Lake et al.'s one-shot runs: add benchmark=lake)\n"
    "  report  table of a sweep's or several runs' results (metarun report outputs/sweep/<time> "
    "[--paper] [--out DIR])\n"
    "\n"
    "`metarun <command> --help` lists that command's settings, their defaults and what they mean.\n"
    "Set METARUN_DEBUG=1 to see Python tracebacks with errors."
)


class _Rejected(BaseException):
    """A single run refused by its job after the pre-flight (e.g. a setting only the data can
    check): the one-line reason, carried out of Hydra to main(), which prints it and undoes the
    claim. A BaseException, because Hydra reports an Exception out of a job as its own traceback."""


@dataclass
class _Plan:
    """What the pre-flight decided: the overrides that tell Hydra the claimed dir; the claim to undo
    if a fresh run is rejected; for a sweep, its dir and swept settings (the failed-cell
    summary)."""

    overrides: list
    claim: rundir.Claim | None = None
    sweep_dir: Path | None = None
    swept: frozenset = frozenset()


def _log_to_file(level: int, message: str) -> None:
    """A record for the run's log file only (the console already got the message from print)."""
    record = logging.LogRecord("metarun", level, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def _parallel_cells(hydra_cfg) -> int:
    """How many sweep cells share this machine's cores at once: the joblib launcher's n_jobs (-1:
    one per core, joblib's convention), else 1. (torchrun's processes are counted by
    runner/setup.cpu_threads.)"""
    launcher = str(hydra_cfg.launcher.get("_target_", "")) if hydra_cfg.get("launcher") else ""
    if "joblib" not in launcher.lower():
        return 1
    n_jobs = int(hydra_cfg.launcher.get("n_jobs") or 1)
    return n_jobs if n_jobs > 0 else max(1, (os.cpu_count() or 1) + 1 + n_jobs)


def _share_threads(cfg, hydra_cfg) -> None:
    """threads=0 (all cores) with several processes on this machine: each gets its share of the
    cores, so that parallel cells or torchrun processes do not oversubscribe them (recorded as the
    run's threads)."""
    from metarun.runner.setup import cpu_threads

    processes = _parallel_cells(hydra_cfg)
    if processes > 1 and cfg.get("threads") == 0:
        with open_dict(cfg):
            cfg.threads = max(1, cpu_threads(0) // processes)


def _quiet_rank() -> None:
    """torchrun: ranks other than 0 write no log file and print warnings and errors only."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.WARNING)
    root.addHandler(handler)


def _run(job, cfg):
    """Runs a command in Hydra's job and returns what it returns (train: the best validation
    accuracy, what Hydra's optimizing sweepers maximise). A user error of a single run leaves as
    _Rejected (main() prints one line, exit status 2); a sweep cell is _run_cell's."""
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    overrides = list(hydra_cfg.overrides.task)
    if not distributed.is_main():
        _quiet_rank()
    if hydra_cfg.mode == RunMode.MULTIRUN:
        return _run_cell(job, cfg, hydra_cfg, run_dir, overrides)
    try:
        _share_threads(cfg, hydra_cfg)
        return job(cfg, run_dir, overrides)
    except MetarunError as exc:
        if os.environ.get("METARUN_DEBUG"):
            raise
        _log_to_file(logging.ERROR, f"metarun: error: {exc}")
        raise _Rejected(str(exc)) from None
    except KeyboardInterrupt:
        print("metarun: interrupted", file=sys.stderr, flush=True)
        sys.exit(130)


def _run_cell(job, cfg, hydra_cfg, run_dir: Path, overrides: list):
    """A sweep cell: claims its dir (or continues the run in it), writes its .hydra/ record, runs. A
    cell that fails or is refused is recorded (metarun/runner/sweep.py) and returns None (an
    optimizing sweeper marks the trial failed); the other cells still run. A refused cell writes
    nothing into the dir."""
    debug = os.environ.get("METARUN_DEBUG")
    try:
        fresh = sweep.claim(cfg, run_dir, overrides)
    except MetarunError as exc:
        if debug:
            raise
        sweep.record_failure(hydra_cfg, run_dir, str(exc), overrides)
        return None
    if fresh:
        sweep.write_record(cfg, hydra_cfg, run_dir)
    try:
        _share_threads(cfg, hydra_cfg)
        return job(cfg, run_dir, overrides)
    except MetarunError as exc:
        if debug:
            raise
        _log_to_file(logging.ERROR, f"metarun: error: {exc}")
        sweep.record_failure(hydra_cfg, run_dir, str(exc), overrides, cfg)
    except KeyboardInterrupt:
        print("metarun: interrupted", file=sys.stderr, flush=True)
        sys.exit(130)
    except Exception as exc:  # a bug in one cell must not take the other cells down
        if debug:
            raise
        logging.getLogger("metarun").exception("metarun: sweep cell %s failed", run_dir)
        sweep.record_failure(hydra_cfg, run_dir, f"{type(exc).__name__}: {exc}", overrides, cfg)
    return None


@hydra.main(config_path=CONF, config_name="train", version_base="1.3")
def train_app(cfg) -> float | None:
    """The train task; returns the run's best validation score for hydra/sweeper=optuna to maximise:
    the accuracy, or minus the MSE of a regression run (metarun/tasks.py, TaskFamily.objective)."""
    from metarun.runner.train import train

    results = _run(train, cfg)
    if results is None:
        return None
    # Optuna's direction stays `maximize`: lower-is-better metrics (MSE) are returned negated.
    family = family_of_metric(results.get("metric"))
    return family.objective(results.get(family.key("best_val")))


@hydra.main(config_path=CONF, config_name="eval", version_base="1.3")
def eval_app(cfg) -> None:
    from metarun.runner.evaluate_checkpoint import evaluate_checkpoint

    _run(evaluate_checkpoint, cfg)


COMMANDS = {"train": train_app, "eval": eval_app}


def _quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


# Every setting that is a path (metarun/settings.py): `~` in it means the home folder (Hydra's
# grammar would refuse it).
PATH_SETTINGS = settings.paths()


def _normalize(arg: str) -> str:
    """`~` expanded in path settings (quoted or not), `+experiment=` accepted as `experiment=`."""
    if arg.startswith("-"):
        return arg
    if arg.startswith(("+experiment=", "+hparams_search=")):  # null defaults: `+` would be refused
        arg = arg[1:]
    key, sep, value = arg.partition("=")
    if not sep or key.lstrip("+") not in PATH_SETTINGS:
        return arg
    bare = value[1:-1] if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"" else value
    if not bare.startswith("~"):
        return arg
    expanded = os.path.expanduser(bare)
    if expanded.startswith("~"):
        raise MetarunError(
            f"{key}={bare}: {bare.split('/')[0]} is not a user's home folder here: write the path "
            "in full, or ~/... for your own home folder."
        )
    return f"{key}={_quote(expanded)}"


def _fail(message: str) -> int:
    print(f"metarun: error: {message}", file=sys.stderr, flush=True)
    return 2


def _parse(command: str, overrides: list[str]) -> list:
    """Hydra's parse of each override; a grammar error as one MetarunError naming the override."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    parsed = []
    for text in overrides:
        try:
            parsed += parser.parse_overrides([text])
        except HydraException:
            raise MetarunError(
                f"cannot read the setting {text!r}: write key=value, and quote a value with spaces "
                f"or special characters, e.g. key='a value' (`metarun {command} --help` lists the "
                "settings)."
            ) from None
    return parsed


def _unknown(command: str, key: str) -> MetarunError:
    return MetarunError(
        f"unknown setting '{key}': check its spelling; `metarun {command} --help` lists the "
        "settings"
    )


def _composition_error(command: str, exc: Exception) -> MetarunError:
    """One line for a composition error, read from the exception's fields (not its text): an unknown
    key, an unknown option of a config group, a sweeper or launcher that is not installed."""
    from hydra.errors import MissingConfigException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    missing = exc.missing_cfg_file if isinstance(exc, MissingConfigException) else None
    if missing and "/" in missing:
        group, _, name = missing.rpartition("/")
        options = ", ".join(exc.options or [])
        if group in ("hydra/sweeper", "hydra/launcher"):
            extra = "sweep" if group.endswith("sweeper") else "launchers"
            have = f" (installed: {options})" if options else ""
            return MetarunError(
                f"{group}={name} is not available{have}: check its spelling; the Optuna sweeper "
                f"and the submitit and joblib launchers come with pip install 'metarun[{extra}]' "
                "(README, Sweeps and scale-out)."
            )
        if options:  # e.g. algorithm=nosuch: name the known choices of that group
            return MetarunError(f"unknown {group}={name}: use one of {options}.")
    cause = exc.__cause__
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and cause.full_key:
        return _unknown(command, cause.full_key)
    text = " ".join(str(exc).split())
    return MetarunError(f"{text} (see `metarun {command} --help` for the settings)")


def _compose_full(command: str, overrides: list[str]):
    """The config Hydra will build for these overrides, its hydra node included (Hydra's Compose
    API); a composition error as one MetarunError."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(config_dir=CONF, version_base="1.3"):
            return compose(config_name=command, overrides=overrides, return_hydra_config=True)
    except (HydraException, OmegaConfBaseException) as exc:
        raise _composition_error(command, exc) from None


def _split(command: str, cfg):
    """(the command's config, its hydra node) of a composed config; a required setting left out
    (`???`) as one MetarunError."""
    with open_dict(cfg):
        hydra_node = cfg.pop("hydra")
    missing = [k for k in cfg.keys() if OmegaConf.is_missing(cfg, k)]
    if missing:
        raise MetarunError(
            f"{missing[0]} is required: metarun {command} {missing[0]}=PATH (a .pt file or a run "
            "dir)"
        )
    return cfg, hydra_node


def _compose(command: str, overrides: list[str]):
    """The config Hydra will build for these overrides, and its hydra node; errors as one
    MetarunError."""
    return _split(command, _compose_full(command, overrides))


def _values_without_m(command: str, parsed: list) -> None:
    """`key=a,b` without -m: Hydra's "Ambiguous value" would hide a mistyped key. An unknown key is
    named as such; a known one gets how to sweep it (-m) or give it a list."""
    listed = [o for o in parsed if o.is_sweep_override()]
    if not listed:
        return
    full = _compose_full(command, [o.input_line for o in parsed if not o.is_sweep_override()])
    absent = object()
    for override in listed:
        key = override.key_or_group
        if key not in full.hydra.runtime.choices and absent is OmegaConf.select(
            full, key, default=absent, throw_on_resolution_failure=False
        ):
            raise _unknown(command, key)
    first = listed[0]
    values = first.input_line.partition("=")[2]
    if first.is_discrete_sweep():
        values = ",".join(first.sweep_string_iterator())
    raise MetarunError(
        f"{first.input_line} gives several values: add -m for one run per value (a sweep), or "
        f"write a list as {first.get_key_element()}=[{values}]."
    )


def _check(command: str, cfg, overrides: list[str]) -> None:
    """Every check that needs no data, so that a rejected command creates nothing."""
    from metarun.runner.setup import check_train_settings, resolve_device

    if command == "eval":
        from metarun.runner.evaluate_checkpoint import check_eval_settings

        check_eval_settings(cfg)
        return
    if cfg.resume:
        from metarun.runner.checkpoint import load_checkpoint
        from metarun.runner.resume import resumed_config

        cfg, _ = resumed_config(load_checkpoint(cfg.resume, "resume"), cfg, overrides, cfg.resume)
    check_train_settings(cfg)
    resolve_device(cfg.device)
    from metarun.algorithms import algorithm_class

    distributed.check_splittable(algorithm_class(str(cfg.algorithm.name)))  # torchrun only


def _resume_run_dir(resume: str) -> Path | None:
    """The run dir of `resume=PATH` (a run dir, or a checkpoint in its checkpoints/ or
    checkpoints/top/), or None."""
    path = Path(resume).expanduser()
    if path.is_dir():
        return path.absolute()
    folder = path.parent.parent if path.parent.name == RunFiles.TOP else path.parent
    if folder.name == RunFiles.CHECKPOINTS:
        return RunFiles.of_checkpoint(path).run_dir.absolute()
    return None


def _dir_override(key: str, path: Path) -> str:
    return f"{key}={_quote(str(path))}"


def _prepare_run(command: str, overrides: list[str], parsed: list) -> _Plan:
    """A single run: checks it completely, then claims its run dir (or locks the run it
    continues)."""
    given = {o.key_or_group for o in parsed}
    cfg, hydra_node = _compose(command, overrides)
    settings = sweep.settings_of(overrides)
    wanted = Path(hydra_node.run.dir).expanduser().absolute()
    resume = cfg.get("resume") if command == "train" else None
    auto = resume == "auto"
    if auto:
        # continue the run in hydra.run.dir when it wrote a checkpoint, else start a fresh one there
        from metarun.runner.resume import auto_resume

        resume = auto_resume(wanted) if "hydra.run.dir" in given else None
        with open_dict(cfg):
            cfg.resume = resume
    _check(command, cfg, settings)
    # a resumed run's .hydra/ records how it was started: never rewritten
    keep = ["hydra.output_subdir=null"] if resume else []
    if auto and "hydra.run.dir" in given and (wanted / rundir.MARKER).exists():
        # a requeued job: the dir is its own (resumed, or started again without a checkpoint)
        return _Plan(keep + [_dir_override("hydra.run.dir", rundir.lock_existing(wanted))])
    own = _resume_run_dir(resume) if resume else None
    if own is not None and ("hydra.run.dir" not in given or wanted == own):
        return _Plan(keep + [_dir_override("hydra.run.dir", rundir.lock_existing(own))])
    claim = rundir.claim(wanted, auto="hydra.run.dir" not in given)
    return _Plan(keep + [_dir_override("hydra.run.dir", claim.path)], claim=claim)


def _cells(parsed: list) -> list[list[str]]:
    """The basic sweeper's cells in its order (its job numbers): the product of each key's values, a
    key given twice counted once at its first place with its last value. Hydra's
    BasicSweeper.split_arguments, written on the public Override API (hydra._internal is
    private)."""
    values = {}
    for override in parsed:
        key = override.get_key_element()
        if override.is_discrete_sweep():
            values[key] = [f"{key}={v}" for v in override.sweep_string_iterator()]
        else:
            values[key] = [f"{key}={override.get_value_element_as_str()}"]
    return [list(cell) for cell in itertools.product(*values.values())]


def _compose_cells(command: str, cells: list, ends: list) -> list[tuple]:
    """(config, hydra node, hydra.sweep.subdir or None) of each cell, composed as Hydra will compose
    it (with the job number the basic launcher gives it, so that the subdir resolves). An unknown
    setting in any cell is a MetarunError here, before the first cell runs."""
    from omegaconf.errors import OmegaConfBaseException

    composed = []
    for num, cell in enumerate(cells):
        full = _compose_full(command, [*cell, *ends, f"hydra.job.num={num}", f"hydra.job.id={num}"])
        try:
            subdir = str(OmegaConf.select(full, "hydra.sweep.subdir"))
        except OmegaConfBaseException:
            subdir = None  # e.g. ${hydra:...}: known only in the job, whose claim checks it
        composed.append((*_split(command, full), subdir))
    return composed


def _check_params(command: str, cfg, params: dict) -> None:
    """Each setting a sweeper's params search (hparams_search) exists."""
    absent = object()
    for key in params:
        if OmegaConf.select(cfg, str(key), default=absent) is absent:
            raise MetarunError(
                f"unknown setting '{key}' in hydra.sweeper.params: check its spelling; "
                f"`metarun {command} --help` lists the settings"
            )


def _check_cells(cells: list, composed: list, sweep_dir: Path, swept, again: bool) -> None:
    """The basic sweeper's cells, before the first one runs: each in a dir of its own that is not
    another run's, and (the same sweep again with resume=auto) each run a cell would continue
    allowed to continue with these settings. Raises MetarunError (nothing written)."""

    def shown(cell):
        return " ".join(o for o in cell if o.split("=", 1)[0].lstrip("+~") in swept)

    seen = {}
    for cell, (cfg, _, subdir) in zip(cells, composed, strict=True):
        if subdir is None:
            continue
        cell_dir = sweep_dir / subdir
        if cell_dir in seen:
            raise MetarunError(
                f"the sweep cells [{shown(seen[cell_dir])}] and [{shown(cell)}] would both run in "
                f"{cell_dir}: make hydra.sweep.subdir name each cell, e.g. with ${{hydra.job.num}} "
                "or the swept settings."
            )
        seen[cell_dir] = cell
        taken = (cell_dir / rundir.MARKER).exists() or (cell_dir / RunFiles.CHECKPOINTS).exists()
        if taken and not (again and cfg.get("resume") == "auto"):
            raise MetarunError(
                f"the sweep cell dir {cell_dir} already belongs to another run: choose a new "
                "hydra.sweep.dir (or resume=auto to continue this sweep's own cells)."
            )
        if taken:
            try:
                sweep.check_continuation(cfg, cell_dir, cell)
            except MetarunError as exc:
                raise MetarunError(f"sweep cell {cell_dir}: {exc}") from None


def _record_overrides(hydra_node) -> list[str]:
    """A sweep's cells write their .hydra/ themselves once their dir is claimed (Hydra would write
    it before): Hydra is told no subdir, the job where the command's subdir is."""
    if hydra_node.output_subdir is None:
        return []
    subdir = _quote(str(hydra_node.output_subdir))
    return ["hydra.output_subdir=null", f"+hydra.job.env_set.{sweep.OUTPUT_SUBDIR}={subdir}"]


def _claim_sweep(sweep_dir: Path, auto: bool, again: bool) -> rundir.Claim | None:
    """Claims a new sweep dir (returns its Claim), or locks the sweep it continues (again: None)."""
    if not again:
        return rundir.claim(sweep_dir, auto=auto, setting="hydra.sweep.dir")
    rundir.lock_existing(sweep_dir)  # the same sweep again: each cell continues its own run
    return None


def _prepare_sweep(command: str, parsed: list) -> _Plan:
    """A sweep (-m): composes every cell (an unknown setting in any stops the sweep), claims the
    sweep dir (or, resume=auto, locks the sweep it continues), then checks the basic sweeper's
    cells' dirs (a refusal undoes the claim)."""
    from hydra.core.override_parser.types import IntervalSweep

    given = {o.key_or_group: o for o in parsed}
    # an optimizing sweeper's ranges (interval(a,b)) are checked at their lower end
    ranged = [o for o in parsed if isinstance(o.value(), IntervalSweep)]
    listed = [o for o in parsed if not isinstance(o.value(), IntervalSweep)]
    ends = [f"{o.get_key_element()}={o.value().start}" for o in ranged]
    cells = _cells(listed)
    composed = _compose_cells(command, cells, ends)
    cfg, hydra_node, _ = composed[-1]
    params = dict(hydra_node.sweeper.get("params") or {})  # hparams_search: the searched settings
    _check_params(command, cfg, params)
    basic = str(hydra_node.sweeper.get("_target_", "")).endswith(".BasicSweeper")
    if basic and params:  # the basic sweeper's own params come before the command line's
        cells = _cells(_parse(command, [f"{k}={v}" for k, v in params.items()]) + listed)
        composed = _compose_cells(command, cells, ends)
    swept = frozenset(
        {o.key_or_group for o in parsed if o.is_sweep_override()} | set(map(str, params))
    )
    sweep_dir = Path(hydra_node.sweep.dir).expanduser().absolute()
    resume = given.get("resume")
    again = (
        resume is not None
        and str(resume.value()) == "auto"
        and (sweep_dir / rundir.MARKER).exists()
    )
    claim = _claim_sweep(sweep_dir, "hydra.sweep.dir" not in given, again)
    sweep_dir = sweep_dir if claim is None else claim.path
    if basic:
        try:
            _check_cells(cells, composed, sweep_dir, swept, again)
        except MetarunError:
            if claim is not None:
                rundir.remove_unused(claim)
            raise
    if claim is None:
        sweep.forget(sweep_dir)  # the failed-cell summary is of this command's cells
    dir_override = _dir_override("hydra.sweep.dir", sweep_dir)
    return _Plan([dir_override, *_record_overrides(hydra_node)], sweep_dir=sweep_dir, swept=swept)


def _prepare(command: str, overrides: list[str], multirun: bool) -> _Plan:
    """Checks the command completely, then claims its run dir (or sweep dir) atomically. Returns the
    plan (overrides that tell Hydra the claimed dir). Raises MetarunError (nothing created) when
    something is wrong."""
    parsed = _parse(command, overrides)
    if multirun:
        return _prepare_sweep(command, parsed)
    _values_without_m(command, parsed)
    return _prepare_run(command, overrides, parsed)


def _prepare_distributed(command: str, overrides: list[str], multirun: bool) -> _Plan:
    """torchrun: rank 0 checks the command and claims the run dir (a ${now:...} dir name may differ
    by a second between the ranks), then every rank gets its overrides; the other ranks write no
    .hydra/."""
    distributed.init()
    plan, outcome = None, None
    if distributed.is_main():
        try:
            if multirun or command != "train":
                raise MetarunError(
                    f"torchrun runs one `metarun train` (data parallel over the meta-batch), not "
                    f"{'a sweep (-m)' if multirun else f'metarun {command}'}: drop torchrun, or -m."
                )
            plan = _prepare(command, overrides, multirun)
            outcome = ("ok", plan.overrides)
        except MetarunError as exc:
            outcome = ("error", str(exc))
    outcome = distributed.broadcast_object(outcome)
    if outcome[0] == "error":
        raise MetarunError(outcome[1])
    if plan is not None:
        return plan
    extra = [o for o in outcome[1] if not o.startswith("hydra.output_subdir=")]
    return _Plan(extra + ["hydra.output_subdir=null"])


@contextmanager
def _hydra_command_line(argv: list[str], multirun: bool):
    """hydra.main reads its command line from sys.argv and nowhere else: set for the call, then
    restored. A sweep also sets HYDRA_FULL_ERROR=1, Hydra's documented switch that lets an exception
    of the sweeper reach main() rather than Hydra's handler printing its traceback (e.g. Optuna's
    "No trials are completed yet." when every trial failed: main() reports the failed cells
    instead)."""
    saved_argv, saved_env = sys.argv, os.environ.get("HYDRA_FULL_ERROR")
    sys.argv = argv
    if multirun:
        os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        yield
    finally:
        sys.argv = saved_argv
        if multirun and saved_env is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        elif multirun:
            os.environ["HYDRA_FULL_ERROR"] = saved_env


def _finish_command(command: str, rest: list[str], sweep_dir: Path) -> str:
    """The command that finishes a stopped sweep: its own, in its sweep dir, with resume=auto
    (finished cells are kept, the stopped one continues, the others start)."""
    keep = [
        a
        for a in rest
        if a not in ("-m", "--multirun") and not a.startswith(("resume=", "hydra.sweep.dir="))
    ]
    where = str(sweep_dir) if re.fullmatch(r"[\w./-]+", str(sweep_dir)) else _quote(str(sweep_dir))
    return shlex.join(["metarun", command, "-m", *keep, f"hydra.sweep.dir={where}", "resume=auto"])


def _summary(plan: _Plan, failed: list[str]) -> str:
    return (
        f"{len(failed)} sweep cell(s) failed (reasons in each failed cell's results.json and in "
        f"{plan.sweep_dir / sweep.CELLS}): " + "; ".join(failed)
    )


def _launch(command: str, argv: list[str], plan: _Plan, multirun: bool, rest: list[str]) -> int:
    """Runs the Hydra app; what its jobs leave (a rejection, a signal, failed cells) becomes the
    command's last line and exit status."""
    try:
        with _hydra_command_line(argv, multirun):
            COMMANDS[command]()
    except _Rejected as exc:
        if plan.claim is not None:
            rundir.remove_unused(plan.claim)
        return _fail(str(exc)) if distributed.is_main() else 2
    except (
        SystemExit
    ) as exc:  # a signal stopped a cell (train exits 128 + its number): the sweep too
        if plan.sweep_dir is not None and isinstance(exc.code, int) and exc.code > 128:
            print(
                f"metarun: the sweep in {plan.sweep_dir} stopped before all its cells finished; "
                f"finish it with: {_finish_command(command, rest, plan.sweep_dir)}",
                flush=True,
            )
        raise
    except (
        Exception
    ) as exc:  # a sweeper that stops once cells failed (Optuna, when every trial failed)
        failed = sweep.failed_cells(plan.sweep_dir, plan.swept) if plan.sweep_dir else []
        if not failed or os.environ.get("METARUN_DEBUG"):
            raise
        return _fail(f"{_summary(plan, failed)}; then the sweeper stopped: {exc}")
    failed = sweep.failed_cells(plan.sweep_dir, plan.swept) if plan.sweep_dir else []
    return _fail(_summary(plan, failed)) if failed else 0


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    command, rest = args[0], args[1:]
    if command == "report":  # not a Hydra app: it reads finished runs
        from metarun.report import main as report_main

        try:
            return report_main(rest)
        except MetarunError as exc:
            if os.environ.get("METARUN_DEBUG"):
                raise
            return _fail(str(exc))
    if command not in COMMANDS:
        return _fail(
            f"unknown command {command!r}; use one of: {', '.join([*COMMANDS, 'report'])} (metarun "
            "--help)."
        )
    try:
        rest = [_normalize(a) for a in rest]
        multirun = any(a in ("-m", "--multirun") for a in rest)
        flags = [a for a in rest if a.startswith("-") and a not in ("-m", "--multirun")]
        if {"-h", "--help"} & set(flags):  # each setting with its default and description
            print(settings.help_text(command))
            return 0
        overrides = [a for a in rest if not a.startswith("-")]
        if command == "eval" and not multirun:  # steps=0,1,3 is one list here, not a sweep
            overrides = [re.sub(r"^steps=(\d+(?:,\d+)+)$", r"steps=[\1]", o) for o in overrides]
        # --help, --cfg, --info ...: Hydra's own business, nothing is run or created
        if flags:
            plan = _Plan([])
        elif distributed.world_size() > 1:
            plan = _prepare_distributed(command, overrides, multirun)
        else:
            plan = _prepare(command, overrides, multirun)
    except MetarunError as exc:
        return _fail(str(exc)) if distributed.is_main() else 2
    if flags:  # Hydra's own options keep their order (--cfg job, --info defaults ...)
        overrides = [a for a in rest if a not in ("-m", "--multirun")]
    elif plan.overrides:  # the claimed dir replaces the one asked for
        overrides = [
            o for o in overrides if not o.startswith(("hydra.run.dir=", "hydra.sweep.dir="))
        ]
    # Hydra's parser wants -m before the overrides; accept it anywhere.
    hydra_argv = [f"metarun {command}"] + (["-m"] if multirun else []) + overrides + plan.overrides
    return _launch(command, hydra_argv, plan, multirun, rest)


if __name__ == "__main__":
    sys.exit(main())
