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
from metarun.runner import rundir

# Absolute, so that it works from any folder once installed: the source tree's conf/ (editable install),
# else the copy the wheel carries inside the package (see pyproject.toml).
_HERE = Path(__file__).resolve().parent
CONF = str(_HERE.parent / "conf" if (_HERE.parent / "conf" / "train.yaml").is_file() else _HERE / "conf")

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
    except Exception:  # e.g. an environment variable the config needs is unset: the overrides still say it
        config = None
    (run_dir / "results.json").write_text(json.dumps(
        {"status": "failed", "reason": reason, "overrides": overrides, "config": config}, indent=2))


def _run(job, cfg) -> None:
    """Runs a command. A user error becomes one line on stderr and exit status 2; in a sweep (-m) a failed
    cell is recorded in its dir (results.json, status failed) and the other cells still run."""
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    overrides = list(hydra_cfg.overrides.task)
    try:
        if multirun:
            rundir.claim(run_dir, auto=False)
        job(cfg, run_dir, overrides)
    except MetarunError as exc:
        if os.environ.get("METARUN_DEBUG"):
            raise
        _log_to_file(logging.ERROR, f"metarun: error: {exc}")
        if multirun:
            _record_failure(run_dir, str(exc), overrides, cfg)
            print(f"metarun: sweep cell {run_dir} failed: {exc}", file=sys.stderr, flush=True)
            return
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


@hydra.main(config_path=CONF, config_name="train", version_base="1.3")
def train_app(cfg) -> None:
    from metarun.runner.train import train
    _run(train, cfg)


@hydra.main(config_path=CONF, config_name="eval", version_base="1.3")
def eval_app(cfg) -> None:
    from metarun.runner.evaluate_checkpoint import evaluate_checkpoint
    _run(lambda c, d, o: evaluate_checkpoint(c, d), cfg)


COMMANDS = {"train": train_app, "eval": eval_app}


def _quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


# Every setting that is a path: `~` in it means the home folder (Hydra's grammar would refuse it).
PATH_SETTINGS = ("hydra.run.dir", "hydra.sweep.dir", "dataset.root", "dataset.cache_dir", "dataset.split_files.train",
                 "dataset.split_files.val", "dataset.split_files.test", "resume", "checkpoint", "data_root")


def _normalize(arg: str) -> str:
    """`~` expanded in path settings (quoted or not), `+experiment=` accepted as `experiment=`."""
    if arg.startswith("-"):
        return arg
    if arg.startswith("+experiment="):  # experiment has a null default, so `+` would be refused
        arg = arg[1:]
    key, sep, value = arg.partition("=")
    if not sep or key.lstrip("+") not in PATH_SETTINGS:
        return arg
    bare = value[1:-1] if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"" else value
    if not bare.startswith("~"):
        return arg
    expanded = os.path.expanduser(bare)
    if expanded.startswith("~"):
        raise MetarunError(f"{key}={bare}: {bare.split('/')[0]} is not a user's home folder here: write the path "
                           "in full, or ~/... for your own home folder.")
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
            raise MetarunError(f"cannot read the setting {text!r}: write key=value, and quote a value with spaces or "
                               f"special characters, e.g. key='a value' (`metarun {command} --help` lists the "
                               "settings).")
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
            raise MetarunError(f"unknown setting '{unknown[1]}': check its spelling; `metarun {command} --help` "
                               "lists the settings")
        option = re.search(r"Could not find '([\w/]+)/([^'/]+)' Available options in '[^']+': (.*?) Config search", text)
        if option:  # e.g. algorithm=nosuch: name the known choices of that group
            raise MetarunError(f"unknown {option[1]}={option[2]}: use one of {', '.join(option[3].split())}.")
        raise MetarunError(f"{text} (see `metarun {command} --help` for the settings)")
    with open_dict(cfg):
        hydra_node = cfg.pop("hydra")
    missing = [k for k in cfg.keys() if OmegaConf.is_missing(cfg, k)]
    if missing:
        raise MetarunError(f"{missing[0]} is required: metarun {command} {missing[0]}=PATH (a .pt file or a run dir)")
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


def _resume_run_dir(resume: str) -> Path | None:
    """The run dir of `resume=PATH` (a run dir, or a checkpoint in its checkpoints/), or None."""
    path = Path(resume).expanduser()
    if path.is_dir():
        return path.absolute()
    if path.parent.name == "checkpoints":
        return path.parent.parent.absolute()
    return None


def _prepare(command: str, overrides: list[str], multirun: bool) -> list[str]:
    """Checks the command completely, then claims its run dir (or sweep dir) atomically. Returns the
    overrides that tell Hydra the claimed dir. Raises MetarunError (nothing created) when something is wrong."""
    parsed = _parse(command, overrides)
    given = {o.key_or_group: o for o in parsed}
    if multirun:
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
        cells = BasicSweeper.split_arguments(parsed, None)[0]
        for cell in cells:  # an unknown setting in any cell stops the sweep before the first one
            _, hydra_node = _compose(command, cell)
        sweep_dir, _ = rundir.claim(Path(hydra_node.sweep.dir), auto="hydra.sweep.dir" not in given,
                                    setting="hydra.sweep.dir")
        _CLAIM.update(sweep=sweep_dir, swept={o.key_or_group for o in parsed if o.is_sweep_override()})
        return [f"hydra.sweep.dir={_quote(str(sweep_dir))}"]
    cfg, hydra_node = _compose(command, overrides)
    settings = [o for o in overrides if not o.startswith("hydra.")]
    _check(command, cfg, settings)
    wanted = Path(hydra_node.run.dir).expanduser().absolute()
    resume = cfg.get("resume") if command == "train" else None
    if resume:
        own = _resume_run_dir(resume)
        extra = ["hydra.output_subdir=null"]  # the run's .hydra/ records how it was started: never rewritten
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
    for results in sorted(sweep_dir.rglob("results.json")):
        try:
            record = json.loads(results.read_text())
        except (OSError, ValueError):
            continue
        if record.get("status") == "failed":
            cell = [o for o in record.get("overrides", []) if o.split("=", 1)[0].lstrip("+~") in swept]
            failed.append(f"{results.parent.relative_to(sweep_dir)} [{' '.join(cell)}]: "
                          f"{record.get('reason')}")
    return failed


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
        return _fail(f"unknown command {command!r}; use one of: {', '.join([*COMMANDS, 'report'])} (metarun --help).")
    try:
        rest = [_normalize(a) for a in rest]
        multirun = any(a in ("-m", "--multirun") for a in rest)
        flags = [a for a in rest if a.startswith("-") and a not in ("-m", "--multirun")]
        overrides = [a for a in rest if not a.startswith("-")]
        if command == "eval" and not multirun:  # steps=0,1,3 is one list here, not a sweep
            overrides = [re.sub(r"^steps=(\d+(?:,\d+)+)$", r"steps=[\1]", o) for o in overrides]
        # --help, --cfg, --info ...: Hydra's own business, nothing is run or created
        extra = [] if flags else _prepare(command, overrides, multirun)
    except MetarunError as exc:
        return _fail(str(exc))
    if flags:  # Hydra's own options keep their order (--cfg job, --info defaults ...)
        overrides = [a for a in rest if a not in ("-m", "--multirun")]
    elif extra:  # the claimed dir replaces the one asked for
        overrides = [o for o in overrides if not o.startswith(("hydra.run.dir=", "hydra.sweep.dir="))]
    # Hydra's parser wants -m before the overrides; accept it anywhere.
    sys.argv = [f"metarun {command}"] + (["-m"] if multirun else []) + overrides + extra
    COMMANDS[command]()
    if multirun and "sweep" in _CLAIM:
        failed = _failed_cells(_CLAIM["sweep"], _CLAIM["swept"])
        if failed:
            return _fail(f"{len(failed)} sweep cell(s) failed (each has its reason in its results.json): "
                         + "; ".join(failed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
