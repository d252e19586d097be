"""The finish phase of `metarun train`: the best checkpoint's test, the run's results.json and its
TensorBoard HParams record (rank 0 only; the other torchrun processes end with the loop)."""

from __future__ import annotations

import json
import logging
import shlex
import shutil
import time

from metarun import __version__
from metarun.errors import MetarunError
from metarun.io import atomic_write_text, describe_write_failure
from metarun.runner import distributed
from metarun.runner.checkpoint import checkpoint_params, load_checkpoint
from metarun.runner.evaluate import describe, evaluate_tasks
from metarun.runner.files import RunFiles
from metarun.runner.state import TrainState

log = logging.getLogger("metarun")


def finish(run, state: TrainState, ended: str, hparam_keys) -> dict:
    """Tests the best checkpoint, writes results.json and the HParams record (the settings
    `hparam_keys`); returns the record. `ended`: why training ended ('iterations' or
    'time_limit'). A signal during the test stops the run (Stopped), writing nothing new."""
    distributed.finish()  # rank 0 tests alone: the other processes may end
    if not run.main:
        return {"status": "completed", run.algorithm.family.key("best_val"): None}
    test, ci = final_test(run, state)
    results = results_record(run, state, ended, test, ci)
    write_hparams(run, results, hparam_keys)
    try:
        atomic_write_text(run.files.results, json.dumps(results, indent=2))
    except OSError as exc:
        reason = describe_write_failure(exc)
        fix = "Free some space" if "no space" in reason else "Make it writable"
        raise MetarunError(
            f"could not write {run.files.results}: {reason}; the run's checkpoints are kept. "
            f"{fix}, then {run.resume_hint()} (it tests again)."
        ) from None
    log.info(
        f"metarun: run dir {run.files.run_dir} ({RunFiles.RESULTS}, {RunFiles.CHECKPOINTS}/, "
        f"{RunFiles.TENSORBOARD}/)"
    )
    return results


def final_test(run, state: TrainState) -> tuple[float, float]:
    """(accuracy, 95% CI) of the best checkpoint on cfg.test_tasks fixed test tasks."""
    cfg, path = run.cfg, run.files.best
    tasks = int(cfg.test_tasks)
    if not path.is_file() and state.best_iteration == 0:  # no validation ever ranked
        raise MetarunError(
            f"no validation of this run gave a finite {run.algorithm.family.label} (see the "
            "warning above), so there is no best checkpoint to test; the last checkpoint "
            f"{run.files.last} (iteration {state.iteration}) is kept. Score it with fewer inner "
            f"steps: metarun eval checkpoint={run.files.last} steps=0,1,2,3,4,5"
        )
    log.info(
        f"metarun: testing the best checkpoint (iteration {state.best_iteration}) on {tasks} "
        "test tasks"
    )
    best = load_checkpoint(path, "checkpoint")
    saved = checkpoint_params(best, run.params, path, "checkpoint")
    params = {k: v.to(run.device) for k, v in saved.items()}
    test, ci = evaluate_tasks(
        run.algorithm, params, run.splits["test"], "test", cfg, run.device, tasks,
        check=lambda: run.stop.check("the final test"),
    )  # fmt: skip
    line = describe(test, ci, tasks, cfg.way, cfg.shot, "test", run.algorithm.family)
    log.info(f"{line} with the best checkpoint (iteration {state.best_iteration})")
    return test, ci


def results_record(run, state: TrainState, ended: str, test: float, ci: float) -> dict:
    """results.json: the run's outcome, settings, timings, history, and how to make it again
    (`command`: the command that started the run; `metarun_version`: the metarun that finished)."""
    per_iteration, unit = run.algorithm.train_unit(run.cfg)
    family = run.algorithm.family  # its metric's keys: *_accuracy | *_mse (metarun/tasks.py)
    seconds = state.train_seconds
    segment_wall = time.perf_counter() - run.started
    first = state.history[0] if state.history else {}
    return {
        "status": "completed",
        "iterations_done": state.iteration,
        "stopped_by": ended,
        "config": state.config,
        "resolved": state.resolved,
        "metric": family.metric,
        family.key("best_val"): state.best_val,
        "best_iteration": state.best_iteration,
        family.key("test"): test,
        "test_ci95": ci,
        "test_tasks": int(run.cfg.test_tasks),
        "train_seconds": seconds,
        "wall_seconds": run.wall_before + segment_wall,
        "segment_wall_seconds": segment_wall,
        # the whole run's speed, resumes included
        f"{unit}_per_s": state.iteration * per_iteration / seconds if seconds > 0 else float("nan"),
        "device": str(run.device),
        "impl": run.algorithm.impl,
        "algorithm": run.algorithm.name,
        "workers": run.algorithm.workers,
        "threads": run.execution["threads"],
        "data_source": run.source,
        "command": first.get("command") or command_line(first.get("overrides", [])),
        "metarun_version": __version__,
        "history": state.history,
    }


def command_line(overrides) -> str:
    """The command that runs these settings: `metarun train <overrides>` (no run dir: a new one)."""
    return shlex.join(["metarun", "train", *[str(o) for o in overrides]])


def write_hparams(run, results: dict, keys) -> None:
    """The run's one TensorBoard HParams record, in tensorboard/hparams/: its final settings
    (`keys` of its config) with its final numbers. A resumed run replaces its earlier segment's
    record (one record per run)."""
    speed, family = f"{run.algorithm.train_unit(run.cfg)[1]}_per_s", run.algorithm.family
    shutil.rmtree(run.files.hparams, ignore_errors=True)
    run.writer.add_hparams(
        {"algorithm": run.algorithm.name, **{k: run.cfg[k] for k in keys}},
        {
            **{
                f"hparam/{key}": results[key]
                for key in (family.key("best_val"), family.key("test"))
            },
            f"hparam/{speed}": results[speed],
        },
        run_name=RunFiles.HPARAMS,  # a folder of the writer's tensorboard/: files.hparams
    )
