"""Benchmark metarun's meta-training step; prints one JSON object per setting.

    python scripts/bench.py [overrides...] [--compare] [--threads N] [--iters N] [--warmup N]
    python scripts/bench.py algorithm=mamlpp --compare      # any algorithm
    python scripts/bench.py --suite [--first-order] [--compare] [algorithm=NAME]
                                                            # settings A, B, C (docs: Performance)
    python scripts/bench.py --sampler                       # the episode sampler on the real cache
    python scripts/bench.py --gpu-check [device=cuda:N]     # GPU readiness, one JSON summary
    python scripts/bench.py --matrix [CELL...] --threads 1  # docs/results/estimates.json

Overrides are those of `metarun train` (way=20 shot=1 query=5 update_step=5 meta_batch=16
first_order=true algorithm.impl=loop model.downsample=maxpool device=cuda ...). The timed step is
`meta_train_step`, exactly what `metarun train` runs (forward, inner loop, meta-backward, Adam
step), on random episodes of the configured shapes (for algorithms that train on their own batches,
e.g. reptile and pretrain, the algorithm's bench_batch of them; pretrain needs
algorithm.num_classes=N). Any learner: model=resnet12 dataset.image_size=84 dataset.channels=3. Each
measurement runs in a fresh process, so that its peak memory is its own. `--compare` also times, in
the same run and shapes, the plain per-task loop (algorithms/reference.py) of the same algorithm.
Each side runs in its own process with the same `threads` setting (`--threads N`, default all
cores), applied by the runner's own setup (metarun/runner/setup.py): metarun's `parallel` gets N
workers of 1 intra-op thread, the loop N intra-op threads; each side reports the threads it really
ran on, read inside its process after setup.

`--gpu-check` (for a machine with a GPU; device=cpu runs it on the CPU, for its test) runs in one
call: the exactness checks on the device (every impl of every algorithm against the per-task
reference of algorithms/reference.py, float64 within 1e-8 and float32 within 1e-4 of the float64
reference), the suite with --compare on the device (both orders), a timed LONG_ITERATIONS-iteration
20-way 1-shot run extrapolated to the paper's 60,000 iterations and, on CUDA, setting C with
tf32=true and with autocast=bf16 and their gradient errors; then prints one JSON summary (exit 1 if
an exactness check fails). Extra overrides apply to every timed part (e.g. model.filters=4
meta_batch=2 for a tiny check).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# after the sys.path change above (E402); the step metarun train runs
from metarun.algorithms.base import meta_train_step as train_step  # noqa: E402
from metarun.algorithms.reference import reference_train_step  # noqa: E402
from metarun.data.episodes import Episodes  # noqa: E402
from metarun.tasks import family_of  # noqa: E402

SUITE = {
    "A": ["way=5", "shot=1", "query=15", "update_step=1", "meta_batch=32"],
    "B": ["way=5", "shot=1", "query=15", "update_step=5", "meta_batch=32"],
    "C": ["way=20", "shot=1", "query=5", "update_step=5", "meta_batch=16"],
}


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from metarun.cli import CONF

    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return hydra_compose(config_name="train", overrides=overrides)


def random_episodes(cfg, device, seed=0) -> Episodes:
    g = torch.Generator().manual_seed(seed)
    if family_of(cfg).name == "regression":  # sinusoid-shaped tasks: x, y float [B, K, 1]
        B, shot, query = int(cfg.meta_batch), int(cfg.shot), int(cfg.query)
        x, y = torch.rand(2, B, shot + query, 1, generator=g).to(device)
        return Episodes(x[:, :shot], y[:, :shot], x[:, shot:], y[:, shot:])
    B, side, c = int(cfg.meta_batch), int(cfg.dataset.image_size), int(cfg.model.in_channels)
    # the algorithm's own training episodes where it has them (ProtoNet: 60-way, 5 queries)
    way = int(cfg.algorithm.get("train_way") or cfg.way)
    query = int(cfg.algorithm.get("train_query") or cfg.query)

    def labels(n):
        return torch.stack(
            [torch.randperm(way, generator=g).repeat_interleave(n) for _ in range(B)]
        ).to(device)

    return Episodes(
        torch.rand(B, way * cfg.shot, c, side, side, generator=g).to(device),
        labels(cfg.shot),
        torch.rand(B, way * query, c, side, side, generator=g).to(device),
        labels(query),
    )


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_gflops(device, n=2048, repeat=5) -> float:
    a, b = torch.rand(n, n, device=device), torch.rand(n, n, device=device)
    a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(repeat):
        a @ b
    sync(device)
    return 2 * n**3 * repeat / (time.perf_counter() - start) / 1e9


def measure(overrides: list[str], which: str, iters: int, warmup: int) -> dict:
    """One implementation in this process: timings, FLOPs, peak memory."""
    from torch.utils.flop_counter import FlopCounterMode

    from metarun.algorithms.engine import Engine
    from metarun.runner.setup import (
        apply_cpu_allocator,
        apply_threads,
        build_algorithm,
        configure_execution,
        cpu_threads,
        resolve_device,
    )

    cfg = compose(overrides)
    device = resolve_device(cfg.device)
    if which == "metarun":
        # exactly what `metarun train` does: resolve the impl and apply the `threads` setting once
        execution = configure_execution(cfg, device)
    else:
        # the plain loop: one op stream with `threads` intra-op threads (the same setting as
        # metarun's side)
        threads = cpu_threads(cfg.threads)
        apply_threads(threads, "loop")
        apply_cpu_allocator(
            str(cfg.get("cpu_allocator", "tuned"))
        )  # the same process settings on both sides
        execution = {"impl": "loop", "workers": 1, "threads": threads}
    model, algorithm = build_algorithm(cfg, device, execution)
    # What this process really computes on, read after setup: intra-op threads x engine workers.
    intra_op = torch.get_num_threads()
    workers = algorithm.workers if which == "metarun" and algorithm.impl == "parallel" else 1
    params = {
        k: v.requires_grad_(True)
        for k, v in algorithm.init_meta_params(
            torch.Generator().manual_seed(0), device=device
        ).items()
    }
    optimizer = algorithm.make_optimizer(list(params.values()), float(cfg.meta_lr))
    algorithm.begin_iteration(0, optimizer)
    # the algorithm's own kind of training batch (episodes; Reptile's image sets; the baseline's
    # images)
    ep = algorithm.bench_batch(random_episodes(cfg, device), torch.Generator().manual_seed(1))
    if which == "metarun":
        step = lambda: train_step(algorithm, params, optimizer, ep)  # noqa: E731
    else:
        from metarun.models.conv4 import Conv4

        # ProtoNet adapts nothing: the reference's inner loop has nothing to time against
        inner_loop = bool(algorithm.adapted_names(params))
        if not isinstance(ep, Episodes) or not isinstance(algorithm.model, Conv4) or not inner_loop:
            raise SystemExit(
                f"--compare: algorithms/reference.py has no per-task loop of {algorithm.name}'s "
                "training step on this learner (it is written for conv4, episodes and an inner "
                "loop): drop --compare."
            )
        step = lambda: reference_train_step(algorithm, params, optimizer, ep)  # noqa: E731
    for _ in range(warmup):
        step()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - start)
    if which == "metarun":
        # Every impl does the same arithmetic; count it in its ungrouped per-task form, because
        # FlopCounterMode sees only this thread (parallel) and overcounts grouped-conv backward
        # ~2.5x.
        counting = copy.copy(algorithm)
        counting.engine = Engine("loop", 1, 0, device)
        step = lambda: train_step(counting, params, optimizer, ep)  # noqa: E731
    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    peak = (
        torch.cuda.max_memory_allocated(device)
        if device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    median = statistics.median(times)
    return {
        "impl": algorithm.impl if which == "metarun" else "reference-loop",
        "algorithm": algorithm.name,
        "threads": intra_op * workers,
        "intra_op_threads": intra_op,
        "workers": workers,
        "cpu_allocator": str(cfg.get("cpu_allocator", "tuned")),
        "tasks_per_s": int(cfg.meta_batch) / median,
        "s_per_iter": {"min": min(times), "median": median, "max": max(times)},
        "peak_memory_mb": peak / 2**20,
        "peak_memory_kind": "cuda_max_allocated" if device.type == "cuda" else "rss",
        "flops_per_iter": flops,
        "gflops_per_s": flops / median / 1e9,
        "total_s": sum(times),
        "auto_choice": algorithm.engine.choice if which == "metarun" else None,
    }


def run_worker(overrides, which, iters, warmup) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        which,
        "--iters",
        str(iters),
        "--warmup",
        str(warmup),
        *overrides,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"benchmark worker failed: {' '.join(cmd)}\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def median_run(runs: list[dict]) -> dict:
    return sorted(runs, key=lambda r: r["tasks_per_s"])[len(runs) // 2]


def bench_setting(
    name: str, overrides: list[str], compare: bool, iters: int, warmup: int, repeat: int = 1
) -> dict:
    cfg = compose(overrides)
    from metarun.runner.setup import resolve_device

    device = resolve_device(cfg.device)
    peak = matmul_gflops(device)
    result = {
        "setting": name,
        "overrides": overrides,
        "shape": {
            k: cfg[k] for k in ("way", "shot", "query", "update_step", "meta_batch", "first_order")
        },
        "downsample": cfg.model.get("downsample"),
        "model": cfg.model.get("_target_", "conv4"),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "algorithm": str(cfg.algorithm.name),
        "matmul_gflops_per_s": peak,
    }
    # metarun and the reference alternate, `repeat` times each, and the median run of each is kept:
    # these machines drift, and alternating keeps the drift out of the ratio.
    runs = {"metarun": [], "reference": []}
    for _ in range(repeat):
        for which in ("metarun", "reference") if compare else ("metarun",):
            runs[which].append(run_worker(overrides, which, iters, warmup))
    result["repeat"] = repeat
    result["metarun"] = median_run(runs["metarun"])
    result["threads"] = result["metarun"]["threads"]  # read inside the worker, after setup
    result["metarun"]["fraction_of_matmul_peak"] = result["metarun"]["gflops_per_s"] / peak
    if compare:
        ref = median_run(runs["reference"])
        ref["fraction_of_matmul_peak"] = ref["gflops_per_s"] / peak
        result["reference"] = ref
        result["speedup_vs_reference"] = result["metarun"]["tasks_per_s"] / ref["tasks_per_s"]
        result["memory_ratio_vs_reference"] = (
            result["metarun"]["peak_memory_mb"] / ref["peak_memory_mb"]
        )
    return result


def cpu_name() -> str:
    """The CPU's model name and core count, for the estimates' record (`--machine` overrides)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        name = next(x.split(":", 1)[1].strip() for x in lines if x.startswith("model name"))
    except (OSError, StopIteration):
        name = "a CPU"
    return f"{name}, {os.cpu_count()} cores"


def bench_matrix(
    names: list[str], overrides, iters: int, warmup: int, machine: str | None, out: Path | None
):
    """Seconds per training iteration of each reproduction cell's preset (metarun/matrix.py), each
    in its own process; merged into `out` (default docs/results/estimates.json), the matrix's
    estimate of the cells not run yet (iterations x seconds per iteration: training steps only)."""
    from metarun import matrix

    out = out or Path(__file__).resolve().parent.parent / "docs" / "results" / matrix.ESTIMATES
    record = json.loads(out.read_text()) if out.is_file() else {"cells": {}}
    threads = next((o.split("=", 1)[1] for o in overrides if o.startswith("threads=")), None)
    record.update(
        {
            # the options, not the cells: the file merges runs over different cells
            "command": " ".join(
                ["python scripts/bench.py --matrix"]
                + [a for a in sys.argv[1:] if a != "--matrix" and a not in names]
            ),
            "date": time.strftime("%Y-%m-%d"),
            "machine": machine or cpu_name(),
            "threads": int(threads) if threads else None,
            "torch": torch.__version__,
        }
    )
    for cell in matrix.select(names or ["all"]):
        timed = run_worker([*cell.train, *cell.bench, *overrides], "metarun", iters, warmup)
        record["cells"][cell.name] = {"s_per_iter": float(f"{timed['s_per_iter']['median']:.4g}")}
        print(json.dumps({"cell": cell.name, **record["cells"][cell.name]}), flush=True)
        out.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    return record


def bench_sampler(overrides: list[str], batches: int = 200) -> dict:
    from metarun.runner.setup import load_splits, resolve_device, train_sampler

    cfg = compose(["way=20", "shot=1", "query=15", "meta_batch=16", *overrides])
    device = resolve_device(cfg.device)
    start = time.perf_counter()
    data = load_splits(cfg, device)
    load_s = time.perf_counter() - start
    sampler = train_sampler(cfg, data["splits"]["train"], device)
    for _ in range(5):
        sampler.sample(int(cfg.meta_batch))
    sync(device)
    start = time.perf_counter()
    for _ in range(batches):
        sampler.sample(int(cfg.meta_batch))
    sync(device)
    elapsed = time.perf_counter() - start
    return {
        "setting": "sampler",
        "way": cfg.way,
        "shot": cfg.shot,
        "query": cfg.query,
        "meta_batch": cfg.meta_batch,
        "data_source": data["source"],
        "data_load_s": load_s,
        "tasks_per_s": batches * int(cfg.meta_batch) / elapsed,
        "device": str(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


LONG = ["way=20", "shot=1", "query=1", "update_step=5", "meta_batch=16", "update_lr=0.1"]
LONG_ITERATIONS = 1000
PAPER_ITERATIONS = 60000
FLOAT64_TOLERANCE, FLOAT32_TOLERANCE = 1e-8, 1e-4


def exactness_cases(device) -> list[dict]:
    """Every (algorithm, order, steps, downsample, impl, task_chunk) checked on `device`: MAML in
    full, and Meta-SGD and MAML++ (every feature on) on the batched path, plus `auto` picked by
    timing."""
    impls = [("batched", 0), ("batched", 2), ("loop", 0)]
    if device.type == "cpu":
        impls.append(("parallel", 1))
    cases = [
        {
            "algorithm": "maml",
            "first_order": fo,
            "update_step": steps,
            "downsample": ds,
            "impl": impl,
            "task_chunk": chunk,
        }
        for fo in (False, True)
        for steps in (1, 3)
        for ds in ("stride", "maxpool")
        for impl, chunk in impls
    ]
    cases += [
        {
            "algorithm": name,
            "first_order": False,
            "update_step": 2,
            "downsample": "stride",
            "impl": "batched",
            "task_chunk": 0,
        }
        for name in ("metasgd", "mamlpp")
    ]
    cases.append(
        {
            "algorithm": "maml",
            "first_order": False,
            "update_step": 3,
            "downsample": "stride",
            "impl": "auto",
            "task_chunk": 0,
        }
    )
    return cases


def check_exactness(device, cases: list[dict] | None = None, autocast: str = "none") -> dict:
    """Meta-gradients of metarun's engine vs the plain per-task loop (algorithms/reference.py), on
    `device` (cases: default exactness_cases; autocast: the engine's, for measuring bf16's
    error)."""
    from metarun.algorithms import algorithm_class
    from metarun.algorithms.engine import Engine
    from metarun.algorithms.reference import reference_meta_loss
    from metarun.models.conv4 import Conv4

    way, tasks, side = 3, 3, 16
    g = torch.Generator().manual_seed(0)

    def labels(n):
        return torch.stack(
            [torch.randperm(way, generator=g).repeat_interleave(n) for _ in range(tasks)]
        )

    data = (
        torch.rand(tasks, way * 2, 1, side, side, generator=g, dtype=torch.float64),
        labels(2),
        torch.rand(tasks, way * 2, 1, side, side, generator=g, dtype=torch.float64),
        labels(2),
    )

    def episodes(dtype):
        return Episodes(
            *(
                t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device)
                for t in data
            )
        )

    def gradients(algorithm, init, ep, reference):
        leaves = {k: v.detach().clone().requires_grad_(True) for k, v in init.items()}
        if reference:
            grads = torch.autograd.grad(
                reference_meta_loss(algorithm, leaves, ep), list(leaves.values()), allow_unused=True
            )
            return {
                k: torch.zeros_like(v) if gr is None else gr
                for (k, v), gr in zip(leaves.items(), grads, strict=True)
            }
        algorithm.accumulate_meta_gradient(leaves, ep)
        return {k: v.grad for k, v in leaves.items()}

    def error(a, b):
        diff = torch.cat([(a[k].double() - b[k]).flatten() for k in b])
        return (diff.norm() / torch.cat([v.flatten() for v in b.values()]).norm()).item()

    results, failed, choice = {"float64": 0.0, "float32": 0.0}, [], None
    cases = exactness_cases(device) if cases is None else cases
    for case in cases:
        model = Conv4(way, filters=6, image_size=side, downsample=case["downsample"])
        cfg = compose(
            [
                f"algorithm={case['algorithm']}",
                "update_lr=0.4",
                f"update_step={case['update_step']}",
                f"first_order={str(case['first_order']).lower()}",
                "update_step_test=1",
            ]
        )
        engine = Engine(
            case["impl"], 2, case["task_chunk"], device, autocast, timed_auto=case["impl"] == "auto"
        )
        algorithm = algorithm_class(case["algorithm"]).from_config(cfg, model, engine)
        init = algorithm.init_meta_params(
            torch.Generator().manual_seed(1), dtype=torch.float64, device=device
        )
        expected = gradients(algorithm, init, episodes(torch.float64), reference=True)
        for dtype, tolerance in (
            (torch.float64, FLOAT64_TOLERANCE),
            (torch.float32, FLOAT32_TOLERANCE),
        ):
            init_d = {k: v.to(dtype) for k, v in init.items()}
            err = error(gradients(algorithm, init_d, episodes(dtype), reference=False), expected)
            key = "float64" if dtype == torch.float64 else "float32"
            results[key] = max(results[key], err)
            if not err < tolerance:
                failed.append({**case, "dtype": key, "relative_error": err})
        choice = engine.choice or choice
    return {
        "cases": len(cases),
        "float64_max_rel_error": results["float64"],
        "float64_tolerance": FLOAT64_TOLERANCE,
        "float32_max_rel_error": results["float32"],
        "float32_tolerance": FLOAT32_TOLERANCE,
        "auto_pick": choice,
        "failed": failed,
        "passed": not failed,
    }


def gpu_check(
    overrides: list[str], iters: int, warmup: int, long_iterations: int, settings: list[str]
) -> dict:
    from metarun.runner.setup import resolve_device

    start = time.perf_counter()
    device = resolve_device(compose(overrides).device)
    if (
        device.type == "cuda"
    ):  # the defaults (tf32=false) for the exactness checks; cuDNN allows TF32 otherwise
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    summary = {
        "gpu_check": True,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "overrides": overrides,
    }
    summary["exactness"] = check_exactness(device)
    summary["suite"] = [
        bench_setting(name, SUITE[name] + extra + overrides, True, iters, warmup)
        for extra in ([], ["first_order=true"])
        for name in settings
    ]
    run = run_worker(LONG + overrides, "metarun", long_iterations, warmup)
    per_iter = run["total_s"] / long_iterations
    summary["long_run"] = {
        "overrides": LONG + overrides,
        "iterations": long_iterations,
        "seconds": run["total_s"],
        "s_per_iter": per_iter,
        "impl": run["impl"],
        "auto_choice": run["auto_choice"],
        "extrapolated_iterations": PAPER_ITERATIONS,
        "extrapolated_hours": per_iter * PAPER_ITERATIONS / 3600,
        "note": "training step on random episodes; no evaluation, checkpoints or sampling",
    }
    precision = {"tf32": None, "bf16": None}
    if device.type == "cuda":
        base = SUITE["C"] + overrides
        plain = run_worker(base, "metarun", iters, warmup)["tasks_per_s"]
        case = [
            {
                "algorithm": "maml",
                "first_order": False,
                "update_step": 3,
                "downsample": "stride",
                "impl": "batched",
                "task_chunk": 0,
            }
        ]
        for key, setting in (("tf32", "tf32=true"), ("bf16", "autocast=bf16")):
            fast = run_worker(base + [setting], "metarun", iters, warmup)["tasks_per_s"]
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = key == "tf32"
            err = check_exactness(device, case, "bf16" if key == "bf16" else "none")[
                "float32_max_rel_error"
            ]
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
            precision[key] = {
                "setting": setting,
                "tasks_per_s": fast,
                "default_tasks_per_s": plain,
                "speedup": fast / plain,
                "float32_meta_gradient_rel_error": err,
            }
    summary["precision"] = precision
    summary["wall_s"] = time.perf_counter() - start
    summary["passed"] = summary["exactness"]["passed"]
    return summary


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "overrides", nargs="*", help="metarun train overrides, e.g. way=20 update_step=5"
    )
    parser.add_argument(
        "--compare", action="store_true", help="also time the per-task reference loop"
    )
    parser.add_argument("--suite", action="store_true", help="settings A, B, C and the sampler")
    parser.add_argument("--first-order", action="store_true", help="with --suite: first-order MAML")
    parser.add_argument(
        "--sampler", action="store_true", help="time the episode sampler on the real cache"
    )
    parser.add_argument(
        "--iters", type=int, default=None, help="timed iterations (default 5; --gpu-check: 3)"
    )
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="alternate metarun/reference runs this many times and keep the median of each",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads of both sides (metarun's `threads` "
        "setting; default: the config's, 0 = all cores)",
    )
    parser.add_argument(
        "--gpu-check",
        action="store_true",
        help="exactness on the device, the suite with "
        "--compare, a long 20-way run; one JSON summary",
    )
    parser.add_argument(
        "--long-iterations", type=int, default=LONG_ITERATIONS, help="with --gpu-check"
    )
    parser.add_argument(
        "--settings", default="A,B,C", help="with --gpu-check: suite settings to run"
    )
    parser.add_argument(
        "--matrix",
        nargs="*",
        metavar="CELL",
        default=None,
        help="time the reproduction cells' presets (metarun/matrix.py; none named: all) and "
        "merge the estimates into docs/results/estimates.json",
    )
    parser.add_argument("--machine", default=None, help="with --matrix: the machine in words")
    parser.add_argument(
        "--out", type=Path, default=None, help="with --matrix: the estimates file to update"
    )
    parser.add_argument("--worker", choices=["metarun", "reference"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.iters is None:
        args.iters = 3 if args.gpu_check else 5
    if args.threads is not None:
        args.overrides = [*args.overrides, f"threads={args.threads}"]
    if args.worker:
        print(json.dumps(measure(args.overrides, args.worker, args.iters, args.warmup)), flush=True)
        return
    if args.gpu_check:
        summary = gpu_check(
            args.overrides, args.iters, args.warmup, args.long_iterations, args.settings.split(",")
        )
        print(json.dumps(summary), flush=True)
        raise SystemExit(0 if summary["passed"] else 1)
    if args.matrix is not None:
        bench_matrix(args.matrix, args.overrides, args.iters, args.warmup, args.machine, args.out)
        return
    if args.sampler:
        print(json.dumps(bench_sampler(args.overrides)), flush=True)
        return
    if args.suite:
        extra = ["first_order=true"] if args.first_order else []
        for name, overrides in SUITE.items():
            print(
                json.dumps(
                    bench_setting(
                        name,
                        overrides + extra + args.overrides,
                        args.compare,
                        args.iters,
                        args.warmup,
                        args.repeat,
                    )
                ),
                flush=True,
            )
        print(json.dumps(bench_sampler(args.overrides)), flush=True)
        return
    print(
        json.dumps(
            bench_setting(
                "custom", args.overrides, args.compare, args.iters, args.warmup, args.repeat
            )
        ),
        flush=True,
    )


if __name__ == "__main__":
    from metarun.errors import MetarunError

    try:
        main()
    except MetarunError as exc:  # a bad setting: one line, as `metarun train` says it
        raise SystemExit(f"bench: error: {exc}") from None
