"""`metarun eval`: score a checkpoint on fixed held-out tasks, with only the checkpoint as input."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from omegaconf import OmegaConf

from metarun.errors import MetarunError
from metarun.runner.checkpoint import checkpoint_params, load_checkpoint, resolve_checkpoint_path
from metarun.runner.evaluate import describe, evaluate_curve, evaluate_tasks
from metarun.runner.setup import build_algorithm, configure_execution, load_splits, resolve_device

log = logging.getLogger("metarun")


def ensemble_paths(path: Path, blob: dict, k: int) -> list[Path]:
    """The checkpoint itself (k=1), or the k best validation checkpoints its run kept (checkpoints/top/,
    listed best first in the run's latest checkpoint)."""
    if k == 1:
        return [path]
    if k < 1:
        raise MetarunError(f"ensemble={k} must be a positive number of checkpoints.")
    ckpt_dir = path.parent.parent if path.parent.name == "top" else path.parent
    last = ckpt_dir / "last.pt"
    top = (load_checkpoint(last, "checkpoint") if last.is_file() else blob).get("top", [])
    if k > len(top):
        raise MetarunError(
            f"ensemble={k} is more than the {len(top)} best checkpoints the run in {ckpt_dir.parent} "
            f"kept (train keep_best={blob['config'].get('keep_best', 1)}): use ensemble<={max(len(top), 1)}."
        )
    from metarun.runner.train import top_path

    paths = [top_path(ckpt_dir, int(e[1])) for e in top[:k]]
    for p in paths:
        if not p.is_file():
            raise MetarunError(
                f"ensemble={k}: {p} is missing: use a smaller ensemble or restore the file."
            )
    return paths


def curve_steps(value) -> list[int] | None:
    """The `steps` setting as a sorted list of distinct inner-step counts >= 0 (None when not given).
    Accepts an int, a list, or text like "0,1,3"; raises MetarunError otherwise."""
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


def check_eval_settings(cfg) -> tuple[Path, dict, list[Path], list[int] | None]:
    """The settings of `metarun eval` that need no data, and the checkpoint: (its path, its content, the
    checkpoints to score (ensemble), the inner-step counts of the curve or None)."""
    if isinstance(cfg.tasks, bool) or not isinstance(cfg.tasks, int) or cfg.tasks <= 0:
        raise MetarunError(f"tasks={cfg.tasks} must be a positive number of evaluation tasks.")
    if cfg.split not in ("train", "val", "test"):
        raise MetarunError(f"split={cfg.split!r} is not a split: use test, val or train.")
    if (
        isinstance(cfg.eval_chunk, bool)
        or not isinstance(cfg.eval_chunk, int)
        or cfg.eval_chunk <= 0
    ):
        raise MetarunError(
            f"eval_chunk={cfg.eval_chunk} must be a positive number of tasks per pass."
        )
    if cfg.get("benchmark") not in (None, "lake"):
        raise MetarunError(
            f"benchmark={cfg.benchmark!r} is not a benchmark: use benchmark=lake (Lake et al.'s 20 "
            "one-shot runs) or leave it out (fixed tasks of `split`)."
        )
    if isinstance(cfg.ensemble, bool) or not isinstance(cfg.ensemble, int):
        raise MetarunError(
            f"ensemble={cfg.ensemble} must be a whole number of checkpoints (1: the checkpoint alone)."
        )
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
    blob = load_checkpoint(path, "checkpoint")
    paths = ensemble_paths(
        path, blob, int(cfg.ensemble)
    )  # an impossible ensemble=K, before any work
    return path, blob, paths, curve


def evaluate_checkpoint(cfg, run_dir: Path) -> dict:
    """Scores cfg.checkpoint on cfg.tasks fixed tasks of cfg.split; writes and returns eval.json's record."""
    path, blob, paths, curve = check_eval_settings(cfg)
    device = resolve_device(cfg.device)
    if Path(cfg.checkpoint).expanduser().is_dir() and path.name != "best.pt":
        log.warning(
            f"metarun: warning: {cfg.checkpoint} has no checkpoints/best.pt (the run stopped before its "
            f"first validation): scoring {path.name} (iteration {int(blob['iteration'])}) instead."
        )
    train_cfg = OmegaConf.create(blob["config"])
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
    steps = (
        int(cfg.update_step_test)
        if cfg.update_step_test is not None
        else int(train_cfg.update_step_test)
    )
    if steps <= 0:
        raise MetarunError(f"update_step_test={steps} must be a positive number of inner steps.")
    train_cfg.update_step_test = steps  # checked by the algorithm like the training settings
    saved = blob.get("algorithm") if device.type == "cpu" else None  # the run's CPU execution, kept
    model, algorithm = build_algorithm(
        train_cfg, device, configure_execution(train_cfg, device, saved)
    )
    if curve is not None:
        algorithm.check_curve(curve)  # before any data is loaded (ProtoNet: no inner loop)
    if (
        cfg.get("benchmark") == "lake"
    ):  # its archive and checkpoint checks come before any data is decoded
        from metarun.data import sources
        from metarun.data.lake import find_all_runs
        from metarun.runner.lake_benchmark import check_lake_checkpoint

        check_lake_checkpoint(cfg, train_cfg, path)
        find_all_runs(sources.source_root(train_cfg.dataset.root))
    splits = load_splits(train_cfg, device)["splits"]
    algorithm.bind_data(splits)
    expected = algorithm.init_meta_params(torch.Generator())
    params = []
    for member in paths:
        member_blob = blob if member == path else load_checkpoint(member, "checkpoint")
        params.append(
            {
                k: v.to(device)
                for k, v in checkpoint_params(member_blob, expected, member, "checkpoint").items()
            }
        )
    if cfg.get("benchmark") == "lake":
        from metarun.runner.lake_benchmark import lake_benchmark

        return lake_benchmark(
            cfg, train_cfg, blob, path, algorithm, params[0], device, steps, run_dir
        )
    members = params if len(params) > 1 else params[0]
    if curve is None:
        mean, ci = evaluate_tasks(
            algorithm,
            members,
            splits[cfg.split],
            cfg.split,
            train_cfg,
            device,
            int(cfg.tasks),
            steps,
        )
    else:  # the headline (update_step_test) comes from the same inner loop
        computed = sorted(set(curve) | {steps})
        scores = evaluate_curve(
            algorithm,
            members,
            splits[cfg.split],
            cfg.split,
            train_cfg,
            device,
            int(cfg.tasks),
            computed,
        )
        mean, ci = scores[computed.index(steps)]
        scores = [scores[computed.index(s)] for s in curve]
    line = describe(mean, ci, int(cfg.tasks), train_cfg.way, train_cfg.shot, cfg.split)
    if len(paths) > 1:  # members are checkpoints/top/iteration-N.pt (train.top_path)
        line += (
            f", ensemble of the {len(paths)} best checkpoints (iterations "
            f"{', '.join(p.stem.rpartition('-')[2] for p in paths)})"
        )
    result = {
        "checkpoint": str(path.absolute()),
        "iteration": int(blob["iteration"]),
        "split": cfg.split,
        "tasks": int(cfg.tasks),
        "update_step_test": steps,
        "accuracy": mean,
        "ci95": ci,
        "way": int(train_cfg.way),
        "shot": int(train_cfg.shot),
        "query": int(train_cfg.query),
        "eval_seed": int(train_cfg.eval_seed),
        "rotate_eval": bool(train_cfg.dataset.get("rotate_eval", False)),
        "device": str(device),
        "impl": algorithm.impl,
        "summary": line,
        "ensemble": [str(p.absolute()) for p in paths],
    }
    if curve is not None:
        result["curve"] = [
            {"steps": s, "accuracy": m, "ci95": c} for s, (m, c) in zip(curve, scores)
        ]
        table = [f"{'inner steps':>11}  {'accuracy':>8}  95% CI"]
        table += [
            f"{s:>11}  {100 * m:7.2f}%  ± {100 * c:.2f}%{'  (update_step_test)' if s == steps else ''}"
            for s, (m, c) in zip(curve, scores)
        ]
        log.info(
            f"{cfg.split} accuracy after each number of inner steps ({int(cfg.tasks)} tasks):\n"
            + "\n".join(table)
        )
    (run_dir / "eval.json").write_text(json.dumps(result, indent=2))
    where = (
        f"{paths[0].parent.absolute()}"
        if len(paths) > 1
        else f"{path.absolute()} (iteration {int(blob['iteration'])})"
    )
    log.info(f"{line}: {where} on {device}; wrote {run_dir / 'eval.json'}")
    return result
