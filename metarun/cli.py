"""`metarun <command> [hydra overrides]`: pops the subcommand and runs that command's Hydra app."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig

from metarun.errors import MetarunError

# Absolute, so that it works from any folder once installed: the source tree's conf/ (editable install),
# else the copy the wheel carries inside the package (see pyproject.toml).
_HERE = Path(__file__).resolve().parent
CONF = str(_HERE.parent / "conf" if (_HERE.parent / "conf" / "train.yaml").is_file() else _HERE / "conf")

USAGE = """usage: metarun <command> [overrides...]

commands:
  train   meta-train a learner (e.g. metarun train way=20 shot=1; sweep: metarun train -m way=5,20 shot=1,5)
  eval    score a checkpoint on held-out tasks (metarun eval checkpoint=outputs/train/<run>/checkpoints/best.pt)

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


def _resume_run_dir(args: list[str]) -> list[str]:
    """`resume=PATH` continues that run in its own run dir (unless hydra.run.dir is given)."""
    resume = [a.split("=", 1)[1] for a in args if a.startswith("resume=")]
    if not resume or not resume[-1] or any(a.startswith("hydra.run.dir=") for a in args):
        return args
    path = Path(resume[-1].strip("'\"")).expanduser()
    if path.is_dir():
        run_dir = path
    elif path.parent.name == "checkpoints":
        run_dir = path.parent.parent
    else:
        return args  # not a metarun layout (or missing): train() reports it
    return args + [f"hydra.run.dir={_quote(str(run_dir.resolve()))}"]


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        print(f"metarun: error: unknown command {command!r}; use one of: {', '.join(COMMANDS)}.\n\n{USAGE}",
              file=sys.stderr)
        return 2
    if command == "train":
        rest = _resume_run_dir(rest)
    sys.argv = [f"metarun {command}"] + rest
    COMMANDS[command]()
    return 0


if __name__ == "__main__":
    sys.exit(main())
