"""`metarun <command> [hydra overrides]`: pops the subcommand and runs that command's Hydra app."""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from metarun.errors import MetarunError, require_writable_dir

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


def _run(job, cfg) -> None:
    """Runs a command; a user error becomes one line on stderr and exit status 2."""
    try:
        job(cfg, Path(HydraConfig.get().runtime.output_dir))
    except MetarunError as exc:
        if os.environ.get("METARUN_DEBUG"):
            raise
        print(f"metarun: error: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt:
        print("metarun: interrupted", file=sys.stderr, flush=True)
        sys.exit(130)


@hydra.main(config_path=CONF, config_name="train", version_base="1.3")
def train_app(cfg) -> None:
    from metarun.runner.train import train
    _run(train, cfg)


@hydra.main(config_path=CONF, config_name="eval", version_base="1.3")
def eval_app(cfg) -> None:
    from metarun.runner.evaluate_checkpoint import evaluate_checkpoint
    _run(evaluate_checkpoint, cfg)


COMMANDS = {"train": train_app, "eval": eval_app}


def _quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _last_value(args: list[str], key: str) -> str | None:
    """The value of the last `key=value` override, unquoted, or None."""
    values = [a.split("=", 1)[1].strip("'\"") for a in args if a.startswith(f"{key}=")]
    return values[-1] if values else None


def _resume_run_dir(args: list[str]) -> list[str]:
    """`resume=PATH` continues that run in its own run dir (unless hydra.run.dir is given)."""
    resume = _last_value(args, "resume")
    if not resume or _last_value(args, "hydra.run.dir") is not None:
        return args
    path = Path(resume).expanduser()
    if path.is_dir():
        run_dir = path
    elif path.parent.name == "checkpoints":
        run_dir = path.parent.parent
    else:
        return args  # not a metarun layout (or missing): train() reports it
    return args + [f"hydra.run.dir={_quote(str(run_dir.resolve()))}"]


def _fail(message: str) -> int:
    print(f"metarun: error: {message}", file=sys.stderr, flush=True)
    return 2


def _preflight(command: str, args: list[str]) -> str | None:
    """Errors Hydra would only report with several lines or a traceback, as one line: unknown settings and
    an output dir that cannot be created. Returns the message, or None when all is well."""
    if any(a.startswith("-") for a in args):  # --help, --cfg, -m ...: Hydra's own business
        return None
    overrides = [a for a in args if not a.startswith("hydra.")]
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(config_dir=CONF, version_base="1.3"):
            cfg = compose(config_name=command, overrides=overrides)
    except (HydraException, OmegaConfBaseException) as exc:
        text = " ".join(str(exc).split())
        unknown = re.match(r"Could not override '([^']+)'", text)
        if unknown:
            return (f"unknown setting '{unknown[1]}': check its spelling; `metarun {command} --help` lists the "
                    "settings")
        return f"{text} (see `metarun {command} --help` for the settings)"
    missing = [k for k in cfg.keys() if OmegaConf.is_missing(cfg, k)]
    if missing:
        return f"{missing[0]} is required: metarun {command} {missing[0]}=PATH (a .pt file or a run dir)"
    run_dir = _last_value(args, "hydra.run.dir")
    target = Path(run_dir) if run_dir and "${" not in run_dir else Path("outputs")
    try:
        require_writable_dir(target)
    except MetarunError as exc:
        return str(exc)
    return None


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
    if command == "train":
        rest = _resume_run_dir(rest)
    # Hydra's parser wants -m before the overrides; accept it anywhere.
    rest = [a for a in rest if a in ("-m", "--multirun")] + [a for a in rest if a not in ("-m", "--multirun")]
    problem = _preflight(command, rest)
    if problem:
        return _fail(problem)
    sys.argv = [f"metarun {command}"] + rest
    COMMANDS[command]()
    return 0


if __name__ == "__main__":
    sys.exit(main())
