"""`metarun eval`: score a checkpoint on fixed held-out tasks, with only the checkpoint as input."""
from __future__ import annotations

import json
import os
from pathlib import Path

from omegaconf import OmegaConf

from metarun.errors import MetarunError
from metarun.runner.checkpoint import checkpoint_params, load_checkpoint, resolve_checkpoint_path
from metarun.runner.evaluate import describe, evaluate_tasks
from metarun.runner.setup import build_algorithm, load_splits, resolve_device


def evaluate_checkpoint(cfg, run_dir: Path) -> dict:
    if int(cfg.tasks) <= 0:
        raise MetarunError(f"tasks={cfg.tasks} must be a positive number of evaluation tasks.")
    if cfg.split not in ("train", "val", "test"):
        raise MetarunError(f"split={cfg.split!r} is not a split: use test, val or train.")
    if cfg.get("benchmark") not in (None, "lake"):
        raise MetarunError(f"benchmark={cfg.benchmark!r} is not a benchmark: use benchmark=lake (Lake et al.'s 20 "
                           "one-shot runs) or leave it out (fixed tasks of `split`).")
    device = resolve_device(cfg.device)
    path = resolve_checkpoint_path(cfg.checkpoint, "checkpoint")
    blob = load_checkpoint(path, "checkpoint")
    train_cfg = OmegaConf.create(blob["config"])
    if cfg.data_root or (os.environ.get("METARUN_DATA") and train_cfg.dataset.name == "omniglot"):
        train_cfg.dataset.root = cfg.data_root or os.environ["METARUN_DATA"]
    if cfg.eval_seed is not None:
        train_cfg.eval_seed = int(cfg.eval_seed)
    train_cfg.eval_chunk = int(cfg.eval_chunk)
    steps = int(cfg.update_step_test) if cfg.update_step_test is not None else int(train_cfg.update_step_test)
    if steps <= 0:
        raise MetarunError(f"update_step_test={steps} must be a positive number of inner steps.")
    model, maml = build_algorithm(train_cfg, device)
    saved = checkpoint_params(blob, model.init_params(), path, "checkpoint")
    params = {k: v.to(device) for k, v in saved.items()}
    if cfg.get("benchmark") == "lake":
        from metarun.runner.lake_benchmark import lake_benchmark
        return lake_benchmark(cfg, train_cfg, blob, path, maml, params, device, steps, run_dir)
    splits = load_splits(train_cfg, device)["splits"]
    mean, ci = evaluate_tasks(maml, params, splits[cfg.split], cfg.split, train_cfg, device, int(cfg.tasks), steps)
    line = describe(mean, ci, int(cfg.tasks), train_cfg.way, train_cfg.shot, cfg.split)
    print(line, flush=True)
    result = {"checkpoint": str(path), "iteration": int(blob["iteration"]), "split": cfg.split, "tasks": int(cfg.tasks),
              "update_step_test": steps, "accuracy": mean, "ci95": ci, "way": int(train_cfg.way),
              "shot": int(train_cfg.shot), "query": int(train_cfg.query), "eval_seed": int(train_cfg.eval_seed),
              "device": str(device), "summary": line}
    (run_dir / "eval.json").write_text(json.dumps(result, indent=2))
    return result
