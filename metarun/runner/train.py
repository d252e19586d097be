"""The meta-training loop: episodes -> meta-step -> logs, validation, checkpoints; test at the end."""
from __future__ import annotations

import json
import math
import signal
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from metarun.algorithms.base import meta_train_step
from metarun.errors import MetarunError, require_writable_dir
from metarun.runner.checkpoint import check_compatible, checkpoint_params, load_checkpoint, save_checkpoint
from metarun.runner.evaluate import describe, evaluate_tasks
from metarun.runner.setup import (build_algorithm, check_train_settings, configure_execution, load_splits,
                                  resolve_device)

HPARAM_KEYS = ("way", "shot", "query", "meta_batch", "update_step", "update_step_test", "update_lr", "meta_lr",
               "first_order", "iterations", "seed")


class StopRequest:
    """SIGINT/SIGTERM set a flag; the loop finishes its iteration, writes a checkpoint and exits."""

    def __init__(self):
        self.signum = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def top_path(ckpt_dir: Path, iteration: int) -> Path:
    return ckpt_dir / "top" / f"iteration-{iteration}.pt"


def rank_top(top: list, val: float, iteration: int, keep: int) -> tuple[list, list]:
    """The K best validations (higher accuracy first, the earlier on ties) after adding this one, and the
    entries that fell out."""
    ranked = sorted(top + [[val, iteration]], key=lambda e: (-e[0], e[1]))
    return ranked[:keep], ranked[keep:]


def train(cfg, run_dir: Path) -> dict:
    wall_start = time.perf_counter()
    check_train_settings(cfg)
    device = resolve_device(cfg.device)
    config = OmegaConf.to_container(cfg, resolve=True)
    ckpt_dir = run_dir / "checkpoints"
    resumed = None
    if cfg.resume:
        resumed = load_checkpoint(cfg.resume, "resume")
        check_compatible(resumed, config, cfg.resume)
    elif (ckpt_dir / "last.pt").exists():
        raise MetarunError(f"{run_dir} already holds another run's checkpoints: continue it with resume={run_dir}, "
                           "or choose a new hydra.run.dir.")
    require_writable_dir(ckpt_dir)

    # the algorithm checks its own settings here, before any data is loaded
    execution = configure_execution(cfg, device, resumed.get("algorithm") if resumed is not None else None)
    model, algorithm = build_algorithm(cfg, device, execution)
    data = load_splits(cfg, device)
    splits = data["splits"]
    algorithm.bind_data(splits)  # settings only the data can check (train_shots, the classifier's classes)
    print(f"metarun: {cfg.way}-way {cfg.shot}-shot {cfg.query}-query on {device} ({algorithm.describe()}, "
          f"{execution['threads']} threads), {data['source']} "
          f"({', '.join(f'{k} {v.num_classes} classes' for k, v in splits.items())}); run dir {run_dir}", flush=True)

    init = algorithm.init_meta_params(torch.Generator().manual_seed(int(cfg.seed)), device=device)
    params = {k: v.requires_grad_(True) for k, v in init.items()}
    optimizer = algorithm.make_optimizer(list(params.values()), float(cfg.meta_lr))
    sampler = algorithm.train_sampler(cfg, splits["train"], device)  # episodes, or the algorithm's own batches
    start, best_val, best_iteration, train_seconds = 0, -1.0, 0, 0.0
    top = []  # [[val accuracy, iteration], ...] of the kept best checkpoints, best first
    if resumed is not None:
        saved = checkpoint_params(resumed, params, cfg.resume, "resume")
        with torch.no_grad():
            for k, v in params.items():
                v.copy_(saved[k])
        optimizer.load_state_dict(resumed["optimizer"])
        sampler.load_state(resumed["sampler_rng"])
        start, best_val = int(resumed["iteration"]), float(resumed["best_val"])
        best_iteration, train_seconds = int(resumed["best_iteration"]), float(resumed["train_seconds"])
        top = [list(e) for e in resumed.get("top", [])]
        print(f"metarun: resumed from {cfg.resume} at iteration {start}", flush=True)

    from torch.utils.tensorboard import SummaryWriter
    writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start if resumed is not None else None)

    def state(iteration: int) -> dict:
        return {"iteration": iteration, "params": {k: v.detach().cpu() for k, v in params.items()},
                "optimizer": optimizer.state_dict(), "sampler_rng": sampler.state().cpu(),
                "best_val": best_val, "best_iteration": best_iteration, "train_seconds": train_seconds,
                "config": config, "algorithm": algorithm.state_dict(), "top": [list(e) for e in top]}

    iterations, log_every = int(cfg.iterations), int(cfg.log_every)
    check_every_step = device.type == "cpu"  # on CUDA a per-step .item() would stall the pipeline
    window_start, window_tasks = time.perf_counter(), 0
    bar = tqdm(total=iterations, initial=start, desc="meta-train", unit="it", dynamic_ncols=True,
               file=sys.stdout, mininterval=1.0)
    with StopRequest() as stop:
        for it in range(start, iterations):
            algorithm.begin_iteration(it, optimizer)  # the algorithm's schedules (epochs, meta learning rate)
            result = meta_train_step(algorithm, params, optimizer, sampler.sample(int(cfg.meta_batch)))
            done = it + 1
            window_tasks += int(cfg.meta_batch)
            logging = done % log_every == 0 or done == iterations
            if check_every_step or logging:
                loss = result.meta_loss.item()
                if not math.isfinite(loss):
                    bar.close()
                    kept = ckpt_dir / "last.pt"
                    raise MetarunError(
                        f"the meta-loss became {loss} at iteration {done}{'' if check_every_step else ' (or shortly before)'}; "
                        f"training stopped and {'the last good checkpoint ' + str(kept) + ' is kept' if kept.exists() else 'no checkpoint had been written yet'}. "
                        f"Lower update_lr (now {cfg.update_lr}) or meta_lr (now {cfg.meta_lr}).")
            bar.update(1)
            if logging:
                # The .item() above synchronised the device, so the window's wall time is its compute time.
                elapsed = time.perf_counter() - window_start
                train_seconds += elapsed
                tasks_per_s = window_tasks / elapsed if elapsed > 0 else float("nan")
                accuracy = result.accuracy.mean().item()
                writer.add_scalar("train/meta_loss", loss, done)
                writer.add_scalar("train/accuracy", accuracy, done)
                writer.add_scalar("speed/tasks_per_s", tasks_per_s, done)
                writer.add_scalar("lr/meta_lr", optimizer.param_groups[0]["lr"], done)
                for tag, value in algorithm.scalars(params).items():
                    writer.add_scalar(tag, value, done)
                bar.set_postfix(loss=f"{loss:.3f}", acc=f"{accuracy:.3f}", tasks_s=f"{tasks_per_s:.1f}")
                window_start, window_tasks = time.perf_counter(), 0
            if done % int(cfg.eval_every) == 0 or done == iterations:
                if not logging:  # close the speed window (after a sync) so validation is not counted
                    result.meta_loss.item()
                    train_seconds += time.perf_counter() - window_start
                val, ci = evaluate_tasks(algorithm, params, splits["val"], "val", cfg, device, int(cfg.val_tasks))
                writer.add_scalar("val/accuracy", val, done)
                writer.add_scalar("val/ci95", ci, done)
                for tag, values in algorithm.histograms(params).items():
                    writer.add_histogram(tag, values, done)
                bar.write(f"iteration {done}: " + describe(val, ci, int(cfg.val_tasks), cfg.way, cfg.shot, "validation"))
                top, dropped = rank_top(top, val, done, int(cfg.keep_best))
                if any(e[1] == done for e in top):
                    save_checkpoint(top_path(ckpt_dir, done), state(done))
                if val > best_val:
                    best_val, best_iteration = val, done
                    save_checkpoint(ckpt_dir / "best.pt", state(done))
                save_checkpoint(ckpt_dir / "last.pt", state(done))
                for entry in dropped:  # only once last.pt no longer lists them
                    top_path(ckpt_dir, entry[1]).unlink(missing_ok=True)
                window_start, window_tasks = time.perf_counter(), 0  # validation time is not training speed
            if stop.signum is not None:
                save_checkpoint(ckpt_dir / "last.pt", state(done))
                bar.close()
                writer.close()
                name = signal.Signals(stop.signum).name
                print(f"metarun: {name} received; stopped at iteration {done} of {iterations} and wrote "
                      f"{ckpt_dir / 'last.pt'}. Resume with: metarun train resume={run_dir}", flush=True)
                sys.exit(128 + stop.signum)
    bar.close()

    best = load_checkpoint(ckpt_dir / "best.pt", "checkpoint")
    best_params = {k: v.to(device) for k, v in best["params"].items()}
    test, test_ci = evaluate_tasks(algorithm, best_params, splits["test"], "test", cfg, device, int(cfg.test_tasks))
    print(describe(test, test_ci, int(cfg.test_tasks), cfg.way, cfg.shot) + f" with the best checkpoint "
          f"(iteration {best_iteration})", flush=True)
    tasks_per_s = iterations * int(cfg.meta_batch) / train_seconds if train_seconds > 0 else float("nan")
    results = {"config": config, "best_val_accuracy": best_val, "best_iteration": best_iteration,
               "test_accuracy": test, "test_ci95": test_ci, "test_tasks": int(cfg.test_tasks),
               "train_seconds": train_seconds, "wall_seconds": time.perf_counter() - wall_start,
               "tasks_per_s": tasks_per_s, "device": str(device),
               "impl": algorithm.impl, "algorithm": algorithm.name, "workers": algorithm.workers,
               "threads": execution["threads"], "data_source": data["source"]}
    writer.add_hparams({"algorithm": algorithm.name, **{k: cfg[k] for k in HPARAM_KEYS}},
                       {"hparam/best_val_accuracy": best_val, "hparam/test_accuracy": test,
                        "hparam/tasks_per_s": tasks_per_s}, run_name=".")
    writer.close()
    (run_dir / "results.json").write_text(json.dumps(results, indent=2))
    print(f"metarun: run dir {run_dir} (results.json, checkpoints/, tensorboard/)", flush=True)
    return results
