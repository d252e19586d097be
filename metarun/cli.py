"""`metarun <command> [hydra overrides]`: pops the subcommand and runs that command's Hydra app."""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import OmegaConf, open_dict

from metarun.errors import MetarunError
from metarun.runner import distributed, rundir
from metarun.runner.files import RunFiles

# Absolute, so that it works from any folder once installed: the source tree's conf/ (editable install),
# else the copy the wheel carries inside the package (see pyproject.toml).
_HERE = Path(__file__).resolve().parent
CONF = str(
    _HERE.parent / "conf" if (_HERE.parent / "conf" / "train.yaml").is_file() else _HERE / "conf"
)

USAGE = """usage: metarun <command> [overrides...]

commands:
  train   meta-train a learner (e.g. metarun train way=20 shot=1; sweep: metarun train -m way=5,20 shot=1,5)
  eval    score a checkpoint on held-out tasks (metarun eval checkpoint=outputs/train/<run>/checkpoints/best.pt;
          Lake et al.'s one-shot runs: add benchmark=lake)
  report  table of a sweep's or several runs' results (metarun report outputs/sweep/<time> [--paper] [--out DIR])

`metarun <command> --help` lists that command's settings and config groups (Hydra).
Set METARUN_DEBUG=1 to see Python tracebacks with errors."""


# Set by main() once it has claimed the run dir (single runs): cleaned up again if the run is rejected.
_CLAIM: dict = {}


def _log_to_file(level: int, message: str) -> None:
    """A record for the run's log file only (the console already got the message from print)."""
    record = logging.LogRecord("metarun", level, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def _record_failure(run_dir: Path, reason: str, overrides: list[str], cfg) -> None:
    """A failed sweep cell's results.json: status, reason, the cell's overrides and its resolved config (when
    it resolves: `metarun report` reads the cell's settings from it), in its own dir."""
    try:
        config = OmegaConf.to_container(cfg, resolve=True)
    except (
        Exception
    ):  # e.g. an environment variable the config needs is unset: the overrides still say it
        config = None
    RunFiles(run_dir).results.write_text(
        json.dumps(
            {"status": "failed", "reason": reason, "overrides": overrides, "config": config},
            indent=2,
        )
    )


def _parallel_cells(hydra_cfg) -> int:
    """How many sweep cells share this machine's cores at once: the joblib launcher's n_jobs (-1: one per
    core, joblib's convention), else 1. (torchrun's processes are counted by runner/setup.cpu_threads.)"""
    launcher = str(hydra_cfg.launcher.get("_target_", "")) if hydra_cfg.get("launcher") else ""
    if "joblib" not in launcher.lower():
        return 1
    n_jobs = int(hydra_cfg.launcher.get("n_jobs") or 1)
    return n_jobs if n_jobs > 0 else max(1, (os.cpu_count() or 1) + 1 + n_jobs)


def _share_threads(cfg, hydra_cfg) -> None:
    """threads=0 (all cores) with several processes on this machine: each gets its share of the cores, so
    that parallel cells or torchrun processes do not oversubscribe them (recorded as the run's threads)."""
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
    """Runs a command and returns what it returns (train: the best validation accuracy, what Hydra's
    optimizing sweepers maximise). A user error becomes one line on stderr and exit status 2; in a sweep
    (-m) a failed cell is recorded in its dir (results.json, status failed), returns None (an optimizing
    sweeper marks the trial failed) and the other cells still run."""
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    overrides = list(hydra_cfg.overrides.task)
    if not distributed.is_main():
        _quiet_rank()
    try:
        if multirun:
            if cfg.get("resume") == "auto" and (run_dir / rundir.MARKER).exists():
                rundir.lock_existing(
                    run_dir
                )  # a requeued cell (Slurm preemption): its own dir again
            else:
                rundir.claim(run_dir, auto=False)
        _share_threads(cfg, hydra_cfg)
        return job(cfg, run_dir, overrides)
    except MetarunError as exc:
        if os.environ.get("METARUN_DEBUG"):
            raise
        _log_to_file(logging.ERROR, f"metarun: error: {exc}")
        if multirun:
            _record_failure(run_dir, str(exc), overrides, cfg)
            print(f"metarun: sweep cell {run_dir} failed: {exc}", file=sys.stderr, flush=True)
            return None
        if distributed.is_main():
            print(f"metarun: error: {exc}", file=sys.stderr, flush=True)
        if _CLAIM.get("fresh"):
            rundir.remove_unused(run_dir, _CLAIM["created"])
        sys.exit(2)
    except KeyboardInterrupt:
        print("metarun: interrupted", file=sys.stderr, flush=True)
        sys.exit(130)
    except Exception as exc:  # a bug in one cell must not take the other cells down
        if not multirun or os.environ.get("METARUN_DEBUG"):
            raise
        logging.getLogger("metarun").exception("metarun: sweep cell %s failed", run_dir)
        _record_failure(run_dir, f"{type(exc).__name__}: {exc}", overrides, cfg)
        return None


@hydra.main(config_path=CONF, config_name="train", version_base="1.3")
def train_app(cfg) -> float | None:
    """The train task; returns the run's best validation accuracy (hydra/sweeper=optuna maximises it)."""
    from metarun.runner.train import train

    results = _run(train, cfg)
    return None if results is None else results.get("best_val_accuracy")


@hydra.main(config_path=CONF, config_name="eval", version_base="1.3")
def eval_app(cfg) -> None:
    from metarun.runner.evaluate_checkpoint import evaluate_checkpoint

    _run(lambda c, d, o: evaluate_checkpoint(c, d), cfg)


COMMANDS = {"train": train_app, "eval": eval_app}


def _quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


# Every setting that is a path: `~` in it means the home folder (Hydra's grammar would refuse it).
PATH_SETTINGS = (
    "hydra.run.dir",
    "hydra.sweep.dir",
    "dataset.root",
    "dataset.cache_dir",
    "dataset.split_files.train",
    "dataset.split_files.val",
    "dataset.split_files.test",
    "resume",
    "checkpoint",
    "data_root",
)


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
                f"cannot read the setting {text!r}: write key=value, and quote a value with spaces or "
                f"special characters, e.g. key='a value' (`metarun {command} --help` lists the "
                "settings)."
            )
    return parsed


def _compose(command: str, overrides: list[str]):
    """The config Hydra will build for these overrides, with its hydra node; errors as one MetarunError."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(config_dir=CONF, version_base="1.3"):
            cfg = compose(config_name=command, overrides=overrides, return_hydra_config=True)
    except (HydraException, OmegaConfBaseException) as exc:
        text = " ".join(str(exc).split())
        unknown = re.match(r"Could not override '([^']+)'", text)
        if unknown:
            raise MetarunError(
                f"unknown setting '{unknown[1]}': check its spelling; `metarun {command} --help` "
                "lists the settings"
            )
        option = re.search(
            r"Could not find '([\w/]+)/([^'/]+)' Available options in '[^']+': (.*?) Config search",
            text,
        )
        missing_plugin = re.search(
            r"Could not (?:find|load) '(hydra/(?:sweeper|launcher)/[\w]+)'", text
        )
        if missing_plugin or (option and option[1] in ("hydra/sweeper", "hydra/launcher")):
            group, _, name = (
                missing_plugin[1] if missing_plugin else f"{option[1]}/{option[2]}"
            ).rpartition("/")
            extra = "sweep" if group.endswith("sweeper") else "launchers"
            have = f" (installed: {', '.join(option[3].split())})" if option else ""
            raise MetarunError(
                f"{group}={name} is not available{have}: check its spelling; the Optuna sweeper and "
                f"the submitit and joblib launchers come with pip install 'metarun[{extra}]' "
                "(README, Sweeps and scale-out)."
            )
        if option:  # e.g. algorithm=nosuch: name the known choices of that group
            raise MetarunError(
                f"unknown {option[1]}={option[2]}: use one of {', '.join(option[3].split())}."
            )
        raise MetarunError(f"{text} (see `metarun {command} --help` for the settings)")
    with open_dict(cfg):
        hydra_node = cfg.pop("hydra")
    missing = [k for k in cfg.keys() if OmegaConf.is_missing(cfg, k)]
    if missing:
        raise MetarunError(
            f"{missing[0]} is required: metarun {command} {missing[0]}=PATH (a .pt file or a run dir)"
        )
    return cfg, hydra_node


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


def _prepare(command: str, overrides: list[str], multirun: bool) -> list[str]:
    """Checks the command completely, then claims its run dir (or sweep dir) atomically. Returns the
    overrides that tell Hydra the claimed dir. Raises MetarunError (nothing created) when something is wrong."""
    parsed = _parse(command, overrides)
    given = {o.key_or_group: o for o in parsed}
    if multirun:
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
        from hydra.core.override_parser.types import IntervalSweep

        # an optimizing sweeper's ranges (interval(a,b)) are checked at their lower end
        listed = [o for o in parsed if not isinstance(o.value(), IntervalSweep)]
        ends = [
            f"{o.get_key_element()}={o.value().start}"
            for o in parsed
            if isinstance(o.value(), IntervalSweep)
        ]
        cells = BasicSweeper.split_arguments(listed, None)[0]
        for cell in cells:  # an unknown setting in any cell stops the sweep before the first one
            cfg, hydra_node = _compose(command, cell + ends)
        params = dict(
            hydra_node.sweeper.get("params") or {}
        )  # hparams_search: the searched settings
        absent = object()
        for key in params:
            if OmegaConf.select(cfg, str(key), default=absent) is absent:
                raise MetarunError(
                    f"unknown setting '{key}' in hydra.sweeper.params: check its spelling; "
                    f"`metarun {command} --help` lists the settings"
                )
        sweep_dir = Path(hydra_node.sweep.dir).expanduser().absolute()
        if (
            "resume" in given
            and str(given["resume"].value()) == "auto"
            and (sweep_dir / rundir.MARKER).exists()
        ):
            rundir.lock_existing(sweep_dir)  # the same sweep again: each cell continues its own run
        else:
            sweep_dir, _ = rundir.claim(
                sweep_dir, auto="hydra.sweep.dir" not in given, setting="hydra.sweep.dir"
            )
        _CLAIM.update(
            sweep=sweep_dir,
            swept={o.key_or_group for o in parsed if o.is_sweep_override()} | set(params),
        )
        return [f"hydra.sweep.dir={_quote(str(sweep_dir))}"]
    cfg, hydra_node = _compose(command, overrides)
    settings = [o for o in overrides if not o.startswith("hydra.")]
    wanted = Path(hydra_node.run.dir).expanduser().absolute()
    resume = cfg.get("resume") if command == "train" else None
    auto = resume == "auto"
    if (
        auto
    ):  # continue the run in hydra.run.dir when it wrote a checkpoint, else start a fresh one there
        from metarun.runner.resume import auto_resume

        resume = auto_resume(wanted) if "hydra.run.dir" in given else None
        with open_dict(cfg):
            cfg.resume = resume
    _check(command, cfg, settings)
    if auto and "hydra.run.dir" in given and (wanted / rundir.MARKER).exists():
        # a requeued job: the dir is its own (resumed, or started again if it had written no checkpoint)
        _CLAIM.update(fresh=False, created=None)
        return (["hydra.output_subdir=null"] if resume else []) + [
            f"hydra.run.dir={_quote(str(rundir.lock_existing(wanted)))}"
        ]
    if resume:
        own = _resume_run_dir(resume)
        extra = [
            "hydra.output_subdir=null"
        ]  # the run's .hydra/ records how it was started: never rewritten
        if own is not None and ("hydra.run.dir" not in given or wanted == own):
            _CLAIM.update(fresh=False, created=None)
            return extra + [f"hydra.run.dir={_quote(str(rundir.lock_existing(own)))}"]
    else:
        extra = []
    path, created = rundir.claim(wanted, auto="hydra.run.dir" not in given)
    _CLAIM.update(fresh=True, created=created)
    return extra + [f"hydra.run.dir={_quote(str(path))}"]


def _failed_cells(sweep_dir: Path, swept: set) -> list[str]:
    """'<cell> [<its swept settings>]: <reason>' of each cell whose results.json says it failed."""
    failed = []
    for results in sorted(sweep_dir.rglob(RunFiles.RESULTS)):
        try:
            record = json.loads(results.read_text())
        except (OSError, ValueError):
            continue
        if record.get("status") == "failed":
            cell = [
                o for o in record.get("overrides", []) if o.split("=", 1)[0].lstrip("+~") in swept
            ]
            failed.append(
                f"{results.parent.relative_to(sweep_dir)} [{' '.join(cell)}]: "
                f"{str(record.get('reason')).rstrip('.')}"
            )
    return failed


def _prepare_distributed(command: str, overrides: list[str], multirun: bool) -> list[str]:
    """torchrun: rank 0 checks the command and claims the run dir (a ${now:...} dir name may differ by a
    second between the ranks), then every rank gets its overrides; the other ranks write no .hydra/."""
    distributed.init()
    outcome = None
    if distributed.is_main():
        try:
            if multirun or command != "train":
                raise MetarunError(
                    f"torchrun runs one `metarun train` (data parallel over the meta-batch), not "
                    f"{'a sweep (-m)' if multirun else f'metarun {command}'}: drop torchrun, or -m."
                )
            outcome = ("ok", _prepare(command, overrides, multirun))
        except MetarunError as exc:
            outcome = ("error", str(exc))
    outcome = distributed.broadcast_object(outcome)
    if outcome[0] == "error":
        raise MetarunError(outcome[1])
    extra = outcome[1]
    if not distributed.is_main():
        _CLAIM.update(fresh=False, created=None)
        extra = [o for o in extra if not o.startswith("hydra.output_subdir=")] + [
            "hydra.output_subdir=null"
        ]
    return extra


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
            f"unknown command {command!r}; use one of: {', '.join([*COMMANDS, 'report'])} (metarun --help)."
        )
    try:
        rest = [_normalize(a) for a in rest]
        multirun = any(a in ("-m", "--multirun") for a in rest)
        flags = [a for a in rest if a.startswith("-") and a not in ("-m", "--multirun")]
        overrides = [a for a in rest if not a.startswith("-")]
        if command == "eval" and not multirun:  # steps=0,1,3 is one list here, not a sweep
            overrides = [re.sub(r"^steps=(\d+(?:,\d+)+)$", r"steps=[\1]", o) for o in overrides]
        # --help, --cfg, --info ...: Hydra's own business, nothing is run or created
        if distributed.world_size() > 1 and not flags:
            extra = _prepare_distributed(command, overrides, multirun)
        else:
            extra = [] if flags else _prepare(command, overrides, multirun)
    except MetarunError as exc:
        return _fail(str(exc)) if distributed.is_main() else 2
    if flags:  # Hydra's own options keep their order (--cfg job, --info defaults ...)
        overrides = [a for a in rest if a not in ("-m", "--multirun")]
    elif extra:  # the claimed dir replaces the one asked for
        overrides = [
            o for o in overrides if not o.startswith(("hydra.run.dir=", "hydra.sweep.dir="))
        ]
    # Hydra's parser wants -m before the overrides; accept it anywhere.
    sys.argv = [f"metarun {command}"] + (["-m"] if multirun else []) + overrides + extra
    COMMANDS[command]()
    if multirun and "sweep" in _CLAIM:
        failed = _failed_cells(_CLAIM["sweep"], _CLAIM["swept"])
        if failed:
            return _fail(
                f"{len(failed)} sweep cell(s) failed (each has its reason in its results.json): "
                + "; ".join(failed)
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
