"""The benchmark runs, prints JSON with every field, and times the step `metarun train` runs."""

import importlib.util
import json
import subprocess
import sys

import pytest
import torch
from helpers import REPO

from metarun import matrix


def load_bench():
    spec = importlib.util.spec_from_file_location("bench", REPO / "scripts" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_prints_valid_json_with_every_field():
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "bench.py"),
            "way=2",
            "shot=1",
            "query=1",
            "meta_batch=2",
            "model.filters=4",
            "device=cpu",
            "--compare",
            "--iters",
            "2",
            "--warmup",
            "1",
            "--threads",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in (
        "shape",
        "device",
        "torch",
        "threads",
        "matmul_gflops_per_s",
        "metarun",
        "reference",
        "speedup_vs_reference",
        "memory_ratio_vs_reference",
    ):
        assert key in result, key
    assert result["shape"] == {
        "way": 2,
        "shot": 1,
        "query": 1,
        "update_step": 1,
        "meta_batch": 2,
        "first_order": False,
    }
    for side in ("metarun", "reference"):
        m = result[side]
        assert m["tasks_per_s"] > 0 and m["peak_memory_mb"] > 0 and m["flops_per_iter"] > 0
        assert m["s_per_iter"]["min"] <= m["s_per_iter"]["median"] <= m["s_per_iter"]["max"]
        assert 0 < m["fraction_of_matmul_peak"] and m["gflops_per_s"] > 0
    # each side in its own process, on the threads it reports (read inside the worker after setup):
    # metarun's default impl here is `parallel`: 2 workers of 1 thread; the plain loop: 2 intra-op
    # threads
    assert result["metarun"]["threads"] == result["reference"]["threads"] == result["threads"] == 2
    assert result["metarun"]["impl"] == "parallel" and result["metarun"]["workers"] == 2
    assert (
        result["metarun"]["intra_op_threads"] == 1 and result["reference"]["intra_op_threads"] == 2
    )


def test_benchmark_times_the_training_step():
    import metarun.runner.train as train

    assert load_bench().train_step is train.meta_train_step


def test_runner_applies_the_threads_setting_once(monkeypatch):
    """`threads` resolves the execution: parallel = N workers of one thread, else N intra-op
    threads; a resumed run keeps its saved impl and workers."""
    from omegaconf import OmegaConf

    from metarun.runner.setup import configure_execution

    threads = torch.get_num_threads()
    try:
        for impl, expected in (("parallel", (1, 2)), ("batched", (2, 1)), ("auto", (1, 2))):
            cfg = OmegaConf.create({"threads": 2, "algorithm": {"impl": impl}})
            execution = configure_execution(cfg, torch.device("cpu"))
            assert (torch.get_num_threads(), execution["workers"]) == expected and execution[
                "threads"
            ] == 2
        cfg = OmegaConf.create({"threads": 0, "algorithm": {"impl": "batched"}})
        execution = configure_execution(
            cfg, torch.device("cpu"), saved={"impl": "parallel", "workers": 3}
        )
        assert (
            execution == {"impl": "parallel", "workers": 3, "threads": 3}
            and torch.get_num_threads() == 1
        )
    finally:
        torch.set_num_threads(threads)


def test_gpu_check_on_the_cpu_prints_every_field():
    """`--gpu-check` (written for a GPU) runs end to end with device=cpu on a tiny setting:
    exactness of every impl against the per-task reference, the suite with --compare, the long run
    extrapolated."""
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "bench.py"),
            "--gpu-check",
            "device=cpu",
            "model.filters=4",
            "meta_batch=2",
            "--iters",
            "1",
            "--warmup",
            "1",
            "--long-iterations",
            "2",
            "--settings",
            "A",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in (
        "device",
        "device_name",
        "torch",
        "cuda",
        "exactness",
        "suite",
        "long_run",
        "precision",
        "wall_s",
        "passed",
    ):
        assert key in summary, key
    exact = summary["exactness"]
    assert exact["passed"] and not exact["failed"] and exact["cases"] >= 35
    assert exact["float64_max_rel_error"] < 1e-8 and exact["float32_max_rel_error"] < 1e-4
    assert (
        exact["auto_pick"]["impl"] in ("batched", "loop")
        and len(exact["auto_pick"]["ms_per_meta_batch"]) == 2
    )
    assert [(r["setting"], r["shape"]["first_order"]) for r in summary["suite"]] == [
        ("A", False),
        ("A", True),
    ]
    for r in summary["suite"]:
        assert (
            r["device"] == "cpu" and r["shape"]["meta_batch"] == 2 and r["speedup_vs_reference"] > 0
        )
    long_run = summary["long_run"]
    assert long_run["iterations"] == 2 and long_run["extrapolated_iterations"] == 60000
    assert long_run["extrapolated_hours"] == pytest.approx(long_run["s_per_iter"] * 60000 / 3600)
    assert "way=20" in long_run["overrides"] and summary["precision"] == {
        "tf32": None,
        "bf16": None,
    }


def test_benchmark_runs_algorithms_with_their_own_batches():
    """Reptile and the baseline train on their own batches (bench_batch); the per-task reference is
    refused."""
    common = [
        "way=2",
        "shot=1",
        "query=2",
        "meta_batch=2",
        "model.filters=4",
        "device=cpu",
        "--iters",
        "1",
        "--warmup",
        "0",
        "--threads",
        "1",
    ]
    for extra in (
        ["algorithm=reptile", "algorithm.inner_batch=3"],
        ["algorithm=pretrain", "algorithm.num_classes=7"],
        ["algorithm=protonet", "algorithm.train_way=3"],
    ):
        proc = subprocess.run(
            [sys.executable, str(REPO / "scripts" / "bench.py"), *extra, *common],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=REPO,
        )
        assert proc.returncode == 0, proc.stderr
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        assert (
            result["algorithm"] == extra[0].split("=")[1] and result["metarun"]["tasks_per_s"] > 0
        )
    for name in ("reptile", "protonet"):  # no per-task reference loop of theirs
        proc = subprocess.run(
            [
                sys.executable,
                str(REPO / "scripts" / "bench.py"),
                f"algorithm={name}",
                *common,
                "--compare",
            ],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=REPO,
        )
        assert proc.returncode != 0 and "drop --compare" in proc.stderr


def test_matrix_estimates_are_merged_into_the_file_the_matrix_reads(tmp_path):
    """`--matrix CELL`: the cell's preset timed in its own process, merged into --out; the matrix
    turns it into hours of the paper's iterations."""
    out = tmp_path / matrix.ESTIMATES
    out.write_text(json.dumps({"cells": {"maml_omniglot_5way_1shot": {"s_per_iter": 0.3}}}))
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench.py"), "--matrix", "joint_sinusoid_10shot"]
        + ["--iters", "1", "--warmup", "0", "--threads", "1", "--machine", "a test CPU"]
        + ["--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    record = json.loads(out.read_text())
    assert record["machine"] == "a test CPU" and record["threads"] == 1
    # the options, not the cells (the file merges measurements of different cells)
    assert record["command"].startswith("python scripts/bench.py --matrix --iters 1 --warmup 0")
    assert set(record["cells"]) == {"maml_omniglot_5way_1shot", "joint_sinusoid_10shot"}
    seconds = record["cells"]["joint_sinusoid_10shot"]["s_per_iter"]
    assert 0 < seconds < 10
    rows = matrix.matrix_markdown(tmp_path)
    total = seconds * matrix.paper_iterations()["joint_sinusoid_10shot"]
    assert f"| not run; estimated {matrix.duration(total)} |" in rows
    assert "| not run; estimated 5.0 h |" in rows  # 0.3 s x 60,000
    assert "on a test CPU, 1 thread" in rows
