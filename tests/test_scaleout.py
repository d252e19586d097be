"""Issue #16, scale-out and sweepers: data parallelism with torchrun (gloo on the CPU), preemption
(SIGUSR2) and `resume=auto`, Hydra's Optuna sweeper and its `hparams_search` config, Hydra's
launchers."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from helpers import REPO, assert_clean_error, run_metarun, tiny_args
from omegaconf import OmegaConf

from metarun import cli


def ckpt(run, name="last.pt"):
    return torch.load(run / "checkpoints" / name, map_location="cpu", weights_only=True)


def strip(args, *prefixes):
    return [a for a in args if not a.startswith(prefixes)]


def env_without_data():
    return {k: v for k, v in os.environ.items() if k not in ("METARUN_DATA", "METARUN_DEBUG")}


def torchrun(*args, cwd, timeout=300):
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node=2",
            *args,
        ],
        cwd=cwd,
        env=env_without_data(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# 1. Data parallelism over the meta-batch ----------------------------------------------------------

GRADIENT_WORKER = """
import sys, torch
sys.path.insert(0, sys.argv[2])
from test_scaleout import algorithm_and_batch
from metarun.runner import distributed

distributed.init()
out = {}
for name in sys.argv[3].split(","):
    algo, batch = algorithm_and_batch(name)
    # rank 1 starts from other weights: the broadcast must replace them with rank 0's
    seed = distributed.rank()
    params = algo.init_meta_params(torch.Generator().manual_seed(seed), dtype=torch.float64)
    params = {k: v.requires_grad_(True) for k, v in params.items()}
    distributed.broadcast_params(params)
    # lr 0: the step leaves the weights, .grad keeps the gradient
    optimizer = torch.optim.SGD(params.values(), lr=0.0)
    algo.begin_iteration(0, None)
    # rank 1 is asked to stop, rank 0's time runs out: every rank must learn both from the same
    # all-reduce
    result, stop = distributed.train_step(
        algo, params, optimizer, batch, distributed.rank() == 1, distributed.rank() == 0
    )
    out[name] = {"grads": {k: v.grad for k, v in params.items()}, "loss": result.meta_loss,
                 "accuracy": result.accuracy, "stop": stop}
torch.save(out, f"{sys.argv[1]}/rank{distributed.rank()}.pt")
distributed.finish()
"""

# Every algorithm whose meta-batch torchrun splits; pretrain's is refused (see below).
SPLIT = ("maml", "anil", "metasgd", "mamlpp", "reptile")


def algorithm_and_batch(name: str):
    """A float64 algorithm on a small conv4 and its training batch of 5 tasks (shares: 2, 3)."""
    from helpers import random_episodes

    from metarun.algorithms.anil import ANIL
    from metarun.algorithms.maml import MAML
    from metarun.algorithms.mamlpp import MAMLPlusPlus
    from metarun.algorithms.metasgd import MetaSGD
    from metarun.algorithms.reptile import Reptile
    from metarun.models.conv4 import Conv4

    model = Conv4(3, filters=6, image_size=16)
    make = {
        "maml": lambda: MAML(model, 0.4, 2, 2, False, impl="batched"),
        "anil": lambda: ANIL(model, 0.4, 2, 2, False, impl="batched"),
        "metasgd": lambda: MetaSGD(model, 0.4, 2, 2, False, impl="batched"),
        # multi-step loss, per-step batch norm, learned per-step rates: all on
        "mamlpp": lambda: MAMLPlusPlus(
            model, 0.4, 2, 2, impl="batched", msl_epochs=1, iterations_per_epoch=10, iterations=10
        ),
        # inner SGD: Adam's g / sqrt(v) turns the float noise of a weight with no true gradient
        # (a bias before batch norm) into 1e-10 differences, whatever computes the tasks
        "reptile": lambda: Reptile(
            model, 0.1, 2, 2, train_shots=3, inner_batch=2, inner_optimizer="sgd", impl="batched"
        ),
    }
    algo = make[name]()
    ep = random_episodes(5, 3, 2, 1)
    return algo, algo.bench_batch(ep, torch.Generator().manual_seed(1))


def test_every_batch_type_gives_a_share_of_its_items():
    from helpers import random_episodes

    from metarun.algorithms.pretrain import ImageBatch
    from metarun.algorithms.reptile import to_batch

    ep = random_episodes(5, 3, 1, 2)
    reptile = to_batch(ep, True, 2, 2, torch.Generator().manual_seed(0), "cpu")
    images = ImageBatch(torch.rand(7, 1, 4, 4), torch.arange(7))
    for batch in (ep, reptile, images):
        share = batch.shard(slice(1, 3))
        assert type(share) is type(batch) and len(batch) in (5, 7) and len(share) == 2
        for field in vars(batch):
            assert torch.equal(getattr(share, field), getattr(batch, field)[1:3]), field


def test_two_process_meta_gradient_equals_the_single_process_one(tmp_path):
    """For every algorithm torchrun runs: the 2-process gradient (gloo, float64) is the
    1-process one; for MAML also the independent per-task reference's."""
    from helpers import random_episodes, reference_gradient

    script = tmp_path / "worker.py"
    script.write_text(GRADIENT_WORKER)
    proc = torchrun(str(script), str(tmp_path), str(REPO / "tests"), ",".join(SPLIT), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for name in SPLIT:
        algo, batch = algorithm_and_batch(name)
        params = algo.init_meta_params(torch.Generator().manual_seed(0), dtype=torch.float64)
        leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
        algo.begin_iteration(0, None)
        single = algo.accumulate_meta_gradient(leaves, batch)
        for rank, out in enumerate(ranks):
            got = out[name]
            for k in params:
                assert torch.allclose(got["grads"][k], leaves[k].grad, rtol=0, atol=1e-10), (
                    name,
                    rank,
                    k,
                )
            assert abs(got["loss"].item() - single.meta_loss.item()) < 1e-10, name
            assert abs(got["accuracy"].item() - single.accuracy.mean().item()) < 1e-10, name
            assert got["stop"].tolist() == [1.0, 1.0]  # (a stop was asked, time ran out), each rank
    maml, _ = algorithm_and_batch("maml")
    params = maml.init_meta_params(torch.Generator().manual_seed(0), dtype=torch.float64)
    reference = reference_gradient(params, random_episodes(5, 3, 2, 1), 3, 0.4, 2, False, "stride")
    for k in params:
        assert torch.allclose(ranks[0]["maml"]["grads"][k], reference[k], rtol=0, atol=1e-10), k


def test_torchrun_trains_reptile_and_refuses_pretrain_in_one_line(tiny_root, tmp_path):
    reptile = [
        "algorithm=reptile",
        "algorithm.train_shots=3",
        "algorithm.inner_batch=4",
        "update_lr=0.01",
    ]
    run = tmp_path / "reptile"
    proc = torchrun(
        "-m", "metarun.cli", *tiny_args(tiny_root, run, "meta_batch=3", *reptile), cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((run / "results.json").read_text())
    assert results["status"] == "completed" and results["history"][-1]["processes"] == 2
    run = tmp_path / "pretrain"
    proc = torchrun(
        "-m", "metarun.cli", *tiny_args(tiny_root, run, "algorithm=pretrain"), cwd=tmp_path
    )
    errors = [line for line in proc.stderr.splitlines() if line.startswith("metarun: error:")]
    assert proc.returncode != 0 and len(errors) == 1, proc.stderr[-3000:]
    assert "algorithm=pretrain cannot run under torchrun" in errors[0]
    assert "batch-norm batch" in errors[0] and "without torchrun" in errors[0]
    assert not run.exists()


PROTO_WORKER = """
import sys, torch
sys.path.insert(0, sys.argv[2])
from metarun.algorithms.protomaml import ProtoMAML
from metarun.algorithms.protonet import ProtoNet
from metarun.models.conv4 import Conv4
from metarun.runner import distributed
from helpers import random_episodes

distributed.init()
model = Conv4(3, filters=6, image_size=16)
out = {}
for algo in (ProtoNet(model, shot=1, train_way=4, impl="batched"),
             ProtoMAML(model, 0.4, 1, 1, True, impl="batched")):
    params = algo.init_meta_params(torch.Generator().manual_seed(0), dtype=torch.float64)
    params = {k: v.requires_grad_(True) for k, v in params.items()}
    optimizer = torch.optim.SGD(params.values(), lr=0.0)
    way = 4 if algo.name == "protonet" else 3
    distributed.train_step(algo, params, optimizer, random_episodes(5, way, 1, 2), False)
    out[algo.name] = {k: v.grad for k, v in params.items()}
torch.save(out, f"{sys.argv[1]}/rank{distributed.rank()}.pt")
distributed.finish()
"""


def test_two_process_protonet_and_protomaml_gradients_equal_the_single_process_ones(tmp_path):
    """ProtoNet (no inner loop, its own meta-gradient) and Proto-MAML (per-task heads) over 2 ranks:
    each rank's share of the meta-batch, all-reduced, is the whole batch's gradient."""
    from helpers import random_episodes

    from metarun.algorithms.protomaml import ProtoMAML
    from metarun.algorithms.protonet import ProtoNet
    from metarun.models.conv4 import Conv4

    script = tmp_path / "worker.py"
    script.write_text(PROTO_WORKER)
    proc = torchrun(str(script), str(tmp_path), str(REPO / "tests"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    model = Conv4(3, filters=6, image_size=16)
    for algo, way in (
        (ProtoNet(model, shot=1, train_way=4, impl="batched"), 4),
        (ProtoMAML(model, 0.4, 1, 1, True, impl="batched"), 3),
    ):
        params = algo.init_meta_params(torch.Generator().manual_seed(0), dtype=torch.float64)
        leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
        algo.accumulate_meta_gradient(leaves, random_episodes(5, way, 1, 2))
        for rank in (0, 1):
            grads = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)[algo.name]
            for k in params:
                assert torch.allclose(grads[k], leaves[k].grad, rtol=0, atol=1e-10), (rank, k)


def test_torchrun_run_leaves_one_run_dir_with_one_set_of_logs(tiny_root, tmp_path):
    # the default run dir (${now:...}): rank 0 claims it, rank 1 must work in it and create no other
    args = strip(tiny_args(tiny_root, tmp_path, "meta_batch=3"), "hydra.run.dir")
    proc = torchrun("-m", "metarun.cli", *args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = list((tmp_path / "outputs" / "train").iterdir())
    assert len(runs) == 1, runs
    run = runs[0]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.pt", "last.pt", "top"]
    # TensorBoard events of one process (rank 0): the file names end in <pid>.<n>
    # (and tensorboard/hparams/, the run's HParams record)
    events = (run / "tensorboard").rglob("events.out.tfevents.*")
    assert len({f.name.split(".")[-2] for f in events}) == 1
    log = (run / "metarun-train.log").read_text()
    assert log.count("iteration 3: validation accuracy") == 1 and log.count("test accuracy") == 1
    assert proc.stdout.count("test accuracy") == 1
    results = json.loads((run / "results.json").read_text())
    assert results["status"] == "completed" and results["history"][-1]["processes"] == 2
    assert ckpt(run)["iteration"] == 6


def test_time_limit_under_torchrun_stops_every_rank_at_the_same_iteration(tiny_root, tmp_path):
    # each rank's clock differs: rank 0's decides, through the all-reduce, so both ranks leave the
    # loop together
    run = tmp_path / "run"
    proc = torchrun(
        "-m",
        "metarun.cli",
        *tiny_args(
            tiny_root,
            run,
            "meta_batch=3",
            "iterations=100000",
            "eval_every=100000",
            "time_limit=0.03",
        ),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((run / "results.json").read_text())
    done = results["iterations_done"]
    assert (
        results["status"] == "completed"
        and results["stopped_by"] == "time_limit"
        and 0 < done < 100000
    )
    assert ckpt(run)["iteration"] == done
    log = (run / "metarun-train.log").read_text()
    assert (
        log.count(f"reached at iteration {done} of 100000") == 1 and log.count("test accuracy") == 1
    )


def rank_pid(tag: str, rank: int) -> int | None:
    """The pid of the torchrun worker of this rank among the processes started with env tag."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            env = (Path("/proc") / pid / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"METARUN_TEST_TAG={tag}".encode() in env and f"RANK={rank}".encode() in env:
            return int(pid)
    return None


def test_a_dead_torchrun_process_is_one_line_from_rank_0(tiny_root, tmp_path):
    """kill -9 of rank 1: rank 0 says that a process died, where the run stopped and how to resume
    it, in one line (and in the log), instead of gloo's "Connection reset by peer" traceback."""
    run = tmp_path / "run"
    args = tiny_args(tiny_root, run, "iterations=100000", "val_tasks=2", "log_every=100000")
    env = {**env_without_data(), "METARUN_TEST_TAG": str(run)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
        + ["-m", "metarun.cli", *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while not (run / "checkpoints" / "last.pt").exists() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(1)
    os.kill(rank_pid(str(run), 1), signal.SIGKILL)
    out, err = proc.communicate(timeout=120)
    errors = [line for line in err.splitlines() if line.startswith("metarun: error:")]
    assert proc.returncode != 0 and len(errors) == 1, err[-3000:]
    line = errors[0]
    assert "a torchrun process of this run died" in line, line
    # gloo's own words for the lost peer vary from run to run ("Connection reset by peer",
    # "Connection closed by peer [127.0.0.1]:28569"): the line carries them, whatever they are.
    assert re.search(r"of 100000 \((.+)\); the run stopped", line), line
    stopped = int(re.search(r"during iteration (\d+) of 100000", line)[1])
    kept = int(re.search(r"last good checkpoint .*last.pt \(iteration (\d+)\) is kept", line)[1])
    assert 0 < kept <= stopped and ckpt(run)["iteration"] == kept
    assert line.endswith(
        f"resume with: torchrun --nproc-per-node=2 -m metarun.cli train resume={run}"
    )
    assert not re.search(r'File ".*metarun/', err)  # no traceback through metarun's code
    assert line.removeprefix("metarun: ") in (run / "metarun-train.log").read_text()


# 2. Preemption: SIGUSR2 and resume=auto -----------------------------------------------------------


def test_sigusr2_then_resume_auto_equals_uninterrupted(tiny_root, tmp_path):
    run = tmp_path / "run"
    # an empty dir: resume=auto starts a fresh run in it (checked below: history, no "resumed")
    run.mkdir()
    args = tiny_args(tiny_root, run, "iterations=100000", "eval_every=100000", "resume=auto")
    proc = subprocess.Popen(
        [sys.executable, "-m", "metarun.cli", *args],
        cwd=tmp_path,
        env=env_without_data(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while not list((run / "tensorboard").glob("events.*")) and time.time() < deadline:
        time.sleep(
            0.2
        )  # the writer is opened just before the loop (the handler is installed with it)
    time.sleep(3)
    proc.send_signal(signal.SIGUSR2)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGUSR2, err
    assert "SIGUSR2 received" in out and "resumed" not in out
    stopped = ckpt(run)["iteration"]
    assert 0 < stopped < 100000 and ckpt(run)["history"][0]["resumed_from"] is None
    total = stopped + 3
    # the requeued job: the same command (same dir, resume=auto), here with a reachable end
    again = run_metarun(*args, f"iterations={total}", cwd=tmp_path, check=True)
    assert f"resumed from {run} at iteration {stopped}" in again.stdout
    whole = tmp_path / "whole"
    run_metarun(
        *tiny_args(tiny_root, whole, f"iterations={total}", "eval_every=100000"),
        cwd=tmp_path,
        check=True,
    )
    a, b = ckpt(whole), ckpt(run)
    assert a["iteration"] == b["iteration"] == total
    assert all(torch.equal(a["params"][k], b["params"][k]) for k in a["params"])


# 3. Optuna: the task returns the best validation accuracy -----------------------------------------


def test_optuna_search_picks_the_best_returned_accuracy_and_survives_a_failed_trial(
    tiny_root, tmp_path
):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    sweep = tmp_path / "sweep"
    args = strip(
        tiny_args(tiny_root, tmp_path, "iterations=4", "eval_every=2"), "hydra.run.dir", "way="
    )
    # the shipped search (update_lr, meta_lr) plus way, so that a trial can fail (way=5000); TPE's
    # seed is 0
    proc = run_metarun(
        *args,
        "-m",
        "hparams_search=maml_omniglot_5way_1shot",
        "way=choice(3,5000)",
        "hydra.sweeper.n_trials=3",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    trials = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/results.json"))]
    assert len(trials) == 3
    done = [t for t in trials if t["status"] == "completed"]
    failed = [t for t in trials if t["status"] == "failed"]
    assert len(done) >= 1 and len(failed) >= 1, (
        "seed 0 no longer samples both ways: choose another seed"
    )
    assert all(t["config"]["way"] == 5000 and "larger than the" in t["reason"] for t in failed)
    assert "sweep cell(s) failed" in proc.stderr and "way=5000" in proc.stderr
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    top = max(done, key=lambda t: t["best_val_accuracy"])
    assert best["best_value"] == pytest.approx(max(t["best_val_accuracy"] for t in done), abs=0)
    assert best["best_params"]["update_lr"] == top["config"]["update_lr"]
    assert best["best_params"]["meta_lr"] == top["config"]["meta_lr"]
    assert all(t["config"]["iterations"] == 4 and t["config"]["shot"] == 1 for t in done)


def test_hparams_search_composes_without_plus():
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    for arg in (
        "hparams_search=maml_omniglot_5way_1shot",
        "+hparams_search=maml_omniglot_5way_1shot",
    ):
        cfg, hydra_node = cli._compose("train", [cli._normalize(arg)])
        assert hydra_node.sweeper.direction == "maximize" and set(hydra_node.sweeper.params) == {
            "update_lr",
            "meta_lr",
        }
        assert (cfg.way, cfg.shot) == (5, 1)


def test_unknown_launcher_is_one_line(tiny_root, tmp_path):
    args = strip(tiny_args(tiny_root, tmp_path), "hydra.run.dir")
    proc = run_metarun(*args, "-m", "hydra/launcher=nosuch", "way=2,3", cwd=tmp_path)
    assert_clean_error(proc, "hydra/launcher=nosuch")
    assert "metarun[launchers]" in proc.stderr


# 4. Launchers -------------------------------------------------------------------------------------


def test_submitit_local_sweep_and_its_requeue_resume(tiny_root, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    sweep = tmp_path / "sweep"
    args = strip(
        tiny_args(tiny_root, tmp_path, "iterations=3", "eval_every=3"), "hydra.run.dir", "way="
    )
    cells = [
        *args,
        "-m",
        "hydra/launcher=submitit_local",
        "resume=auto",
        "way=2,3",
        f"hydra.sweep.dir={sweep}",
    ]
    run_metarun(*cells, cwd=tmp_path, check=True)
    first = {c: json.loads((sweep / c / "results.json").read_text()) for c in ("0", "1")}
    assert [first[c]["config"]["way"] for c in ("0", "1")] == [2, 3]
    assert all(
        r["status"] == "completed" and ckpt(sweep / c)["iteration"] == 3 for c, r in first.items()
    )
    # what a requeue does: the cell's overrides again, into its dir; it continues its run (here, to
    # 5 iterations)
    requeued = [a if a != "way=2,3" else "way=2" for a in cells]
    run_metarun(*requeued, "iterations=5", cwd=tmp_path, check=True)
    history = json.loads((sweep / "0" / "results.json").read_text())["history"]
    assert [h["start_iteration"] for h in history] == [0, 3] and ckpt(sweep / "0")["iteration"] == 5
    assert ckpt(sweep / "1")["iteration"] == 3  # the other cell's run is untouched


def test_parallel_cells_share_the_cores():
    from metarun.runner.setup import cpu_threads

    joblib = OmegaConf.create(
        {
            "launcher": {
                "_target_": "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher",
                "n_jobs": 2,
            }
        }
    )
    cfg = OmegaConf.create({"threads": 0, "resume": "auto"})
    cli._share_threads(cfg, joblib)
    assert cfg.threads == max(1, cpu_threads(0) // 2)
    given = OmegaConf.create({"threads": 3, "resume": None})
    cli._share_threads(given, joblib)  # a thread count the user gave is kept
    assert given.threads == 3
    basic = OmegaConf.create(
        {"launcher": {"_target_": "hydra._internal.core_plugins.basic_launcher.BasicLauncher"}}
    )
    alone = OmegaConf.create({"threads": 0, "resume": None})
    cli._share_threads(alone, basic)
    assert alone.threads == 0


def test_torchrun_processes_share_the_cores(monkeypatch):
    from metarun.runner.setup import cpu_threads

    cores = cpu_threads(0)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert cpu_threads(0) == max(1, cores // 2) and cpu_threads(3) == 3
