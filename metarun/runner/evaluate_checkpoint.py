"""`metarun eval`: score a checkpoint on fixed held-out tasks, with only the checkpoint as input."""

from __future__ import annotations

import json
import logging
import os
import shlex
from pathlib import Path

import torch
from omegaconf import OmegaConf

from metarun import __version__, settings
from metarun.errors import MetarunError
from metarun.io import atomic_write_text
from metarun.runner.checkpoint import (
    checkpoint_params,
    load_checkpoint,
    load_state,
    resolve_checkpoint_path,
)
from metarun.runner.evaluate import describe, eval_query, evaluate_curve, evaluate_tasks
from metarun.runner.files import RunFiles
from metarun.runner.setup import build_algorithm, configure_execution, load_splits, resolve_device
from metarun.runner.state import TrainState
from metarun.tasks import family_of

log = logging.getLogger("metarun")


def ensemble_paths(path: Path, state: TrainState, k: int) -> list[Path]:
    """The checkpoint itself (k=1), or the k best validation checkpoints its run kept
    (checkpoints/top/, listed best first in the run's latest checkpoint)."""
    if k == 1:
        return [path]
    if k < 1:
        raise MetarunError(f"ensemble={k} must be a positive number of checkpoints.")
    files = RunFiles.of_checkpoint(path)
    top = load_state(files.last).top if files.last.is_file() else state.top
    if k > len(top):
        raise MetarunError(
            f"ensemble={k} is more than the {len(top)} best checkpoints the run in "
            f"{files.run_dir} kept (train keep_best={state.config.get('keep_best', 1)}): use "
            f"ensemble<={max(len(top), 1)}."
        )
    paths = [files.top(iteration) for _, iteration in top[:k]]
    for p in paths:
        if not p.is_file():
            raise MetarunError(
                f"ensemble={k}: {p} is missing: use a smaller ensemble or restore the file."
            )
    return paths


def curve_steps(value) -> list[int] | None:
    """The `steps` setting as a sorted list of distinct inner-step counts >= 0 (None when not
    given). Accepts an int, a list, or text like "0,1,3"; raises MetarunError otherwise."""
    if value is None:
        return None
    if isinstance(value, str):
        items = value.split(",")
    elif isinstance(value, (int, float)):  # a single number (bool included: refused below)
        items = [value]
    else:
        items = list(value)
    steps = []
    for item in items:
        text = str(item).strip()
        if isinstance(item, bool) or not text.isdigit():
            raise MetarunError(
                f"steps={value} must be numbers of inner steps >= 0, e.g. steps=0,1,3,5,10 "
                "(0: no adaptation)."
            )
        steps.append(int(text))
    if not steps:
        raise MetarunError("steps= is empty: give numbers of inner steps, e.g. steps=0,1,3,5,10.")
    return sorted(set(steps))


def check_curve_reach(curve: list[int] | None, config: dict) -> None:
    """steps= may not go past the inner steps a checkpoint has weights for: MAML++'s per-step
    weights (algorithm.bnwb, algorithm.lslr) exist for its update_step training steps only, as its
    update_step_test check says (algorithms/mamlpp.py). Raises a one-line MetarunError otherwise."""
    algorithm, trained = config.get("algorithm") or {}, int(config.get("update_step", 0) or 0)
    per_step = algorithm.get("name") == "mamlpp" and (
        algorithm.get("bnwb") or algorithm.get("lslr")
    )
    if curve and per_step and max(curve) > trained:
        within = ",".join(str(s) for s in curve if s <= trained) or ",".join(
            str(s) for s in range(trained + 1)
        )
        raise MetarunError(
            f"steps={','.join(str(s) for s in curve)} goes to {max(curve)} inner steps, but this "
            "MAML++ checkpoint has per-step weights (algorithm.bnwb / lslr) for its "
            f"update_step={trained} training steps only: use steps of at most {trained}, e.g. "
            f"steps={within}."
        )


def curve_table(family, cfg, curve: list[int], scores: list, steps: int) -> str:
    """The printed table of `steps=`: the metric (accuracy in %, MSE plain) and its 95% CI after
    each number of inner steps."""
    unit = "%" if family.percent else ""
    table = [f"{'inner steps':>11}  {family.label:>8}  95% CI"]
    table += [
        f"{s:>11}  {family.fmt(m):>7}{unit}  ± {family.fmt(c)}{unit}"
        + ("  (update_step_test)" if s == steps else "")
        for s, (m, c) in zip(curve, scores, strict=True)
    ]
    return (
        f"{cfg.split} {family.label} after each number of inner steps ({int(cfg.tasks)} tasks):\n"
        + "\n".join(table)
    )


def check_eval_settings(cfg) -> tuple[Path, TrainState, list[Path], list[int] | None]:
    """The settings of `metarun eval` that need no data, and the checkpoint: (its path, its state,
    the checkpoints to score (ensemble), the inner-step counts of the curve or None). Each setting's
    type and range as metarun/settings.py declares them, then the combinations that cannot work."""
    settings.validate(cfg, "eval")  # each setting's type and range (metarun/settings.py)
    if cfg.get("benchmark") == "lake" and int(cfg.ensemble) != 1:
        raise MetarunError(f"benchmark=lake scores one checkpoint: drop ensemble={cfg.ensemble}.")
    if cfg.get("benchmark") == "lake" and cfg.get("steps") is not None:
        raise MetarunError(
            f"benchmark=lake scores one number of inner steps: drop steps={cfg.steps} "
            "(update_step_test sets it)."
        )
    curve = curve_steps(cfg.get("steps"))
    resolve_device(cfg.device)
    path = resolve_checkpoint_path(cfg.checkpoint, "checkpoint")
    state = load_state(path, "checkpoint")
    if cfg.get("plot"):
        from metarun.plots import check_plot

        check_plot(family_of(state.config), cfg)
    check_curve_reach(curve, state.config)
    paths = ensemble_paths(path, state, int(cfg.ensemble))  # an impossible ensemble=K, before work
    return path, state, paths, curve


def evaluate_checkpoint(cfg, run_dir: Path, overrides: list[str] | tuple = ()) -> dict:
    """Scores cfg.checkpoint on cfg.tasks fixed tasks of cfg.split; writes and returns eval.json's
    record (benchmark=lake: runner/lake_benchmark.py's), with the command (`overrides`: the
    command line's settings) and the metarun version that made it."""
    made_by = {"command": shlex.join(["metarun", "eval", *map(str, overrides)])}
    made_by["metarun_version"] = __version__
    path, state, paths, curve = check_eval_settings(cfg)
    device = resolve_device(cfg.device)
    if Path(cfg.checkpoint).expanduser().is_dir() and path.name != RunFiles.BEST:
        log.warning(
            f"metarun: warning: {cfg.checkpoint} has no {RunFiles.CHECKPOINTS}/{RunFiles.BEST} "
            f"(the run stopped before its first validation): scoring {path.name} (iteration "
            f"{state.iteration}) instead."
        )
    train_cfg, steps = eval_config(cfg, state)
    saved = state.algorithm if device.type == "cpu" else None  # the run's CPU execution, kept
    _, algorithm = build_algorithm(train_cfg, device, configure_execution(train_cfg, device, saved))
    if curve is not None:
        algorithm.check_curve(curve)  # before any data is loaded (ProtoNet: no inner loop)
    lake = cfg.get("benchmark") == "lake"
    if lake:  # its archive and checkpoint checks come before any data is decoded
        from metarun.data import sources
        from metarun.data.lake import find_all_runs
        from metarun.runner.lake_benchmark import check_lake_checkpoint

        check_lake_checkpoint(cfg, train_cfg, path)
        find_all_runs(sources.source_root(train_cfg.dataset.root))
    splits = load_splits(train_cfg, device)["splits"]
    algorithm.bind_data(splits)
    members = load_members(paths, path, state, algorithm, device)
    if lake:
        from metarun.runner.lake_benchmark import lake_benchmark

        return lake_benchmark(
            cfg, train_cfg, state, path, algorithm, members[0], device, steps, run_dir, made_by
        )
    scores = score(cfg, train_cfg, algorithm, members, splits[cfg.split], device, steps, curve)
    result = eval_record(cfg, train_cfg, path, state, paths, algorithm, device, steps, scores)
    result.update(made_by)
    if curve is not None:
        log.info(curve_table(algorithm.family, cfg, curve, scores[1], steps))
    if cfg.get("plot"):
        from metarun.plots import plot_eval_tasks

        plot = plot_eval_tasks(algorithm, members[0], splits[cfg.split], train_cfg, device, run_dir)
        result["plot"] = str(plot)
    files = RunFiles(run_dir)
    atomic_write_text(files.eval_record, json.dumps(result, indent=2))
    where = (
        f"{paths[0].parent.absolute()}"
        if len(paths) > 1
        else f"{path.absolute()} (iteration {state.iteration})"
    )
    log.info(f"{result['summary']}: {where} on {device}; wrote {files.eval_record}")
    return result


def eval_config(cfg, state: TrainState) -> tuple:
    """(the training config with eval's settings applied: data root, eval_seed, rotate_eval,
    eval_chunk, update_step_test; the number of inner steps scored)."""
    train_cfg = OmegaConf.create(state.config)
    if cfg.data_root or (os.environ.get("METARUN_DATA") and train_cfg.dataset.name == "omniglot"):
        train_cfg.dataset.root = cfg.data_root or os.environ["METARUN_DATA"]
    if cfg.eval_seed is not None:
        train_cfg.eval_seed = int(cfg.eval_seed)
    if cfg.get("rotate_eval") is not None:
        if not isinstance(cfg.rotate_eval, bool):
            raise MetarunError(
                f"rotate_eval={cfg.rotate_eval} must be true, false or null (the checkpoint's)."
            )
        train_cfg.dataset.rotate_eval = cfg.rotate_eval
    train_cfg.eval_chunk = int(cfg.eval_chunk)
    given = cfg.update_step_test
    steps = int(given) if given is not None else int(train_cfg.update_step_test)
    if steps <= 0:
        raise MetarunError(f"update_step_test={steps} must be a positive number of inner steps.")
    train_cfg.update_step_test = steps  # checked by the algorithm like the training settings
    return train_cfg, steps


def load_members(paths: list[Path], path: Path, state: TrainState, algorithm, device) -> list:
    """The meta-parameters of each checkpoint scored (one, or the ensemble's), on `device`."""
    expected = algorithm.init_meta_params(torch.Generator())
    members = []
    for member in paths:
        blob = {"params": state.params} if member == path else load_checkpoint(member)
        saved = checkpoint_params(blob, expected, member, "checkpoint")
        members.append({k: v.to(device) for k, v in saved.items()})
    return members


def score(cfg, train_cfg, algorithm, members, classes, device, steps, curve) -> tuple:
    """((accuracy, 95% CI) after `steps` inner steps, [(accuracy, CI) per count of `curve`] or
    None); the headline comes from the curve's inner loop when a curve is asked for."""
    params = members if len(members) > 1 else members[0]
    args = (algorithm, params, classes, cfg.split, train_cfg, device, int(cfg.tasks))
    if curve is None:
        return evaluate_tasks(*args, steps), None
    computed = sorted(set(curve) | {steps})
    scores = evaluate_curve(*args, computed)
    return scores[computed.index(steps)], [scores[computed.index(s)] for s in curve]


def eval_record(cfg, train_cfg, path, state, paths, algorithm, device, steps, scores) -> dict:
    """eval.json's record: what was scored, how, and the result (with `curve` when asked)."""
    (mean, ci), curve_scores = scores
    family = algorithm.family  # accuracy | MSE (metarun/tasks.py)
    line = describe(mean, ci, int(cfg.tasks), train_cfg.way, train_cfg.shot, cfg.split, family)
    if len(paths) > 1:  # members are checkpoints/top/iteration-N.pt (RunFiles.top)
        iterations = ", ".join(p.stem.rpartition("-")[2] for p in paths)
        line += f", ensemble of the {len(paths)} best checkpoints (iterations {iterations})"
    result = {
        "checkpoint": str(path.absolute()),
        "iteration": state.iteration,
        "split": cfg.split,
        "tasks": int(cfg.tasks),
        "update_step_test": steps,
        "metric": family.metric,
        family.metric: mean,
        "ci95": ci,
        "way": int(train_cfg.way),
        "shot": int(train_cfg.shot),
        "query": eval_query(train_cfg),
        "eval_seed": int(train_cfg.eval_seed),
        "rotate_eval": bool(train_cfg.dataset.get("rotate_eval", False)),
        "device": str(device),
        "impl": algorithm.impl,
        "summary": line,
        "ensemble": [str(p.absolute()) for p in paths],
    }
    if curve_scores is not None:
        curve = curve_steps(cfg.get("steps"))
        result["curve"] = [
            {"steps": s, family.metric: m, "ci95": c}
            for s, (m, c) in zip(curve, curve_scores, strict=True)
        ]
    return result
