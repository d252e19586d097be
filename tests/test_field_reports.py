"""Issue #11's field reports, each as the user meets it (a real CLI run) plus the general form of
its kind: resume keeps its run, device-independent sampler state, fixed evaluation tasks, non-finite
weights, run dirs never shared, sweeps that survive a bad cell, `~` paths, the run's log file, and
what a run records."""

import json
import multiprocessing
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import REPO, run_metarun, tiny_args
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_robustness import assert_clean_error

from metarun import cli
from metarun.data.episodes import EpisodeSampler, fixed_tasks
from metarun.data.omniglot import atomic_torch_save
from metarun.errors import MetarunError
from metarun.runner import rundir
from metarun.runner.checkpoint import load_checkpoint
from metarun.runner.resume import RESUMABLE, resume_config


def ckpt(run, name="last.pt"):
    return torch.load(run / "checkpoints" / name, map_location="cpu", weights_only=True)


def strip(args, *prefixes):
    return [a for a in args if not a.startswith(prefixes)]


@pytest.fixture(scope="module")
def run(tiny_root, tmp_path_factory):
    """One 3-way run with a non-default update_lr, 3 iterations, then resumed (by the bare command)
    to 6 with another validation cadence. Returns (run dir, the first segment's files, the resume's
    output)."""
    base = tmp_path_factory.mktemp("field")
    run = base / "run"
    first = run_metarun(
        *tiny_args(
            tiny_root,
            run,
            "iterations=3",
            "update_lr=0.2",
            "query=2",
            f"dataset.cache_dir={base / 'cache'}",
        ),
        cwd=base,
        check=True,
    )
    before = {
        "config": (run / ".hydra" / "config.yaml").read_bytes(),
        "overrides": (run / ".hydra" / "overrides.yaml").read_bytes(),
        "results": json.loads((run / "results.json").read_text()),
        "stdout": first.stdout,
    }
    resumed = run_metarun(
        "train", f"resume={run}", "iterations=6", "eval_every=1", cwd=base, check=True
    )
    return run, before, resumed


# 1. Resume continues the run it names -------------------------------------------------------------


def test_bare_resume_continues_the_run_as_configured(run):
    run, before, resumed = run
    assert "resumed from" in resumed.stdout and "at iteration 3" in resumed.stdout
    blob = ckpt(run)
    assert blob["iteration"] == 6
    assert (
        blob["config"]["update_lr"] == 0.2 and blob["config"]["way"] == 3
    )  # the run's own, not the defaults'
    assert blob["config"]["iterations"] == 6 and blob["config"]["eval_every"] == 1
    # the changes are applied for real: validation every iteration after the resume
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("val/accuracy")] == [3, 4, 5, 6]
    # and recorded: a history in the checkpoint and in results.json
    history = blob["history"]
    assert [h["start_iteration"] for h in history] == [0, 3]
    # a longer run keeps its schedules on the length it started with (pinned, recorded)
    assert history[1]["changes"] == {
        "iterations": [3, 6],
        "eval_every": [3, 1],
        "schedule_iterations": [None, 3],
    }
    results = json.loads((run / "results.json").read_text())
    assert results["history"] == history and results["config"]["iterations"] == 6
    # 9. a resume never rewrites the run's own record of how it was started
    assert (run / ".hydra" / "config.yaml").read_bytes() == before["config"]
    assert (run / ".hydra" / "overrides.yaml").read_bytes() == before["overrides"]
    # 9. wall time is cumulative like train_seconds
    assert results["wall_seconds"] > before["results"]["wall_seconds"]
    assert results["wall_seconds"] >= results["segment_wall_seconds"] > 0
    assert results["train_seconds"] > before["results"]["train_seconds"]


@pytest.mark.parametrize(
    "override,fragment",
    [
        ("update_lr=0.4", "update_lr=0.4 cannot change on resume"),
        ("meta_lr=0.01", "meta_lr=0.01 cannot change on resume"),
        ("experiment=omniglot_5way_1shot", "experiment=omniglot_5way_1shot chooses a config group"),
        ("iterations=2", "iterations=2 is below the iteration 6"),
    ],
)
def test_resume_refuses_changes_of_the_run(run, tmp_path, override, fragment):
    run, _, _ = run
    files = {p: p.read_bytes() for p in (run / ".hydra").iterdir()}
    last = (run / "checkpoints" / "last.pt").read_bytes()
    assert_clean_error(run_metarun("train", f"resume={run}", override, cwd=tmp_path), fragment)
    assert {p: p.read_bytes() for p in (run / ".hydra").iterdir()} == files
    assert (run / "checkpoints" / "last.pt").read_bytes() == last


def compose_train(*overrides):
    with initialize_config_dir(config_dir=cli.CONF, version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def leaves(cfg, prefix=""):
    for key, value in cfg.items():
        if isinstance(value, dict):
            yield from leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def other_value(value):
    if isinstance(value, list):  # e.g. dataset.split_sizes
        return [other_value(v) for v in value]
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    return f"{value}-other"


def test_every_setting_is_either_resumable_and_applied_or_refused():
    """The general form: every setting of train.yaml, overridden on resume with another value."""
    saved = OmegaConf.to_container(compose_train("way=3", "update_lr=0.2"), resolve=True)
    for key, value in leaves(saved):
        if key == "resume":
            continue
        new = other_value(value)
        text = f"{key}={new}"
        requested = compose_train("resume=x", text)
        if key in RESUMABLE:
            config, changes = resume_config(saved, requested, [text], "x")
            assert OmegaConf.select(config, key) == new and changes == {key: [value, new]}, key
            assert config.way == 3 and config.update_lr == 0.2
        else:
            with pytest.raises(MetarunError, match=f"{key}=.* cannot change on resume"):
                resume_config(saved, requested, [text], "x")
        # the run's own value, repeated, is no change
        same = f"{key}={'null' if value is None else str(value).lower() if isinstance(value, bool) else value}"
        assert resume_config(saved, compose_train(same), [same], "x")[1] == {}, same
    # the run's own config group option again is no change; another one is refused
    assert resume_config(saved, compose_train("algorithm=maml"), ["algorithm=maml"], "x")[1] == {}
    with pytest.raises(MetarunError, match="algorithm=metasgd chooses a config group"):
        resume_config(saved, compose_train("algorithm=metasgd"), ["algorithm=metasgd"], "x")
    # a setting newer than the run takes the requested value
    older = {k: v for k, v in saved.items() if k != "eval_chunk"}
    assert resume_config(older, compose_train("eval_chunk=7"), [], "x")[0].eval_chunk == 7


# 2. Sampler state fits any device -----------------------------------------------------------------


def test_sampler_state_is_device_independent(labelled_classes):
    a = EpisodeSampler(labelled_classes, "train", 3, 1, 2, "cpu", seed=5, rotate=True)
    a.sample(4)
    state = a.state()
    assert state == {"seed": 5, "draws": 1}  # plain ints: no generator state of any device type
    b = EpisodeSampler(labelled_classes, "train", 3, 1, 2, "cpu", seed=0, rotate=True)
    b.load_state(torch.load(_roundtrip(state), weights_only=True))
    assert torch.equal(a.sample(4).x_query, b.sample(4).x_query)
    with pytest.raises(MetarunError, match="not a metarun sampler state"):
        b.load_state(torch.zeros(16, dtype=torch.uint8))  # a raw (CUDA-sized) generator state


def _roundtrip(obj):
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


@pytest.fixture
def labelled_classes():
    from test_data import labelled_classes as make

    return make()


def test_resume_of_a_checkpoint_with_another_devices_generator_state(run, tmp_path):
    """A checkpoint written on CUDA by an older metarun carries a 16-byte Philox state; the CPU
    continues."""
    run, _, _ = run
    copy = tmp_path / "copy"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns(rundir.MARKER))
    blob = ckpt(copy)
    del blob["sampler"]
    blob["sampler_rng"] = torch.zeros(16, dtype=torch.uint8)
    atomic_torch_save(blob, copy / "checkpoints" / "last.pt")
    proc = run_metarun("train", f"resume={copy}", "iterations=7", cwd=tmp_path, check=True)
    assert "device-specific sampler state" in proc.stderr and "RuntimeError" not in proc.stderr
    assert ckpt(copy)["iteration"] == 7 and ckpt(copy)["sampler"] == {"seed": 0, "draws": 7}
    # 8. the warning is in the log file too
    assert "device-specific sampler state" in (copy / "metarun-train.log").read_text()


# 3. Fixed evaluation tasks do not depend on eval_chunk --------------------------------------------


def test_fixed_tasks_depend_only_on_seed_split_and_shape(labelled_classes):
    def tasks(n, chunk):
        eps = list(fixed_tasks(labelled_classes, "val", 3, 1, 2, "cpu", n, 7, chunk))
        assert [len(e.x_support) for e in eps] == [min(chunk, n - i) for i in range(0, n, chunk)]
        return torch.cat([e.x_support for e in eps]), torch.cat([e.y_query for e in eps])

    whole = tasks(10, 10)
    for chunk in (1, 3, 7):
        assert all(torch.equal(a, b) for a, b in zip(tasks(10, chunk), whole))
    assert torch.equal(tasks(4, 3)[0], whole[0][:4])  # the first 4 of 10 tasks are the 4 tasks
    assert not torch.equal(
        torch.cat(
            [e.x_support for e in fixed_tasks(labelled_classes, "val", 3, 1, 2, "cpu", 10, 8, 10)]
        ),
        whole[0],
    )


def test_scores_equal_for_any_chunk_size_and_impl(run, tiny_root):
    from metarun.runner.evaluate import evaluate_tasks
    from metarun.runner.setup import build_algorithm, load_splits

    run, _, _ = run
    blob = load_checkpoint(run / "checkpoints" / "last.pt")
    cfg = OmegaConf.create(blob["config"])
    splits = load_splits(cfg, torch.device("cpu"))["splits"]
    scores = set()
    for impl in ("loop", "batched", "parallel"):
        cfg.algorithm.impl = impl
        _, maml = build_algorithm(cfg, torch.device("cpu"))
        for chunk in (1, 4, 7, 12):
            cfg.eval_chunk = chunk
            scores.add(evaluate_tasks(maml, blob["params"], splits["test"], "test", cfg, "cpu", 12))
    assert len(scores) == 1, scores


def test_eval_scores_equal_for_any_eval_chunk(run, tiny_root, tmp_path):
    run, _, _ = run
    accuracies = []
    for chunk in (1, 7):
        out = tmp_path / f"eval{chunk}"
        run_metarun(
            "eval",
            f"checkpoint={run}",
            "tasks=10",
            f"eval_chunk={chunk}",
            f"hydra.run.dir={out}",
            cwd=tmp_path,
            check=True,
        )
        accuracies.append(json.loads((out / "eval.json").read_text())["accuracy"])
    assert accuracies[0] == accuracies[1]


# 4. Non-finite weights are refused wherever weights are loaded ------------------------------------


def test_nonfinite_checkpoint_is_refused_by_eval_and_resume(run, tmp_path):
    run, _, _ = run
    blob = ckpt(run, "best.pt")
    blob["params"]["conv0.weight"][0, 0, 0, 0] = float("nan")
    bad = tmp_path / "bad.pt"
    torch.save(blob, bad)
    proc = run_metarun("eval", f"checkpoint={bad}", cwd=tmp_path)
    assert_clean_error(proc, "bad.pt", "tensor 'params.conv0.weight' (1 of", "NaN or inf")
    assert "accuracy" not in proc.stdout
    proc = run_metarun("train", f"resume={bad}", "iterations=8", cwd=tmp_path)
    assert_clean_error(proc, "tensor 'params.conv0.weight'")
    assert not (tmp_path / "outputs").exists()


def test_resume_refuses_a_damaged_best_checkpoint_before_training(run, tmp_path):
    """best.pt is scored at the end of training: a resume finds a damaged one before any iteration
    runs."""
    import shutil

    run, _, _ = run
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    (copy / ".metarun-run").unlink()
    blob = ckpt(copy, "best.pt")
    blob["params"]["fc.bias"][0] = float("inf")
    torch.save(blob, copy / "checkpoints" / "best.pt")
    before = (copy / "checkpoints" / "last.pt").read_bytes()
    proc = run_metarun("train", f"resume={copy}", "iterations=9", cwd=tmp_path)
    assert_clean_error(
        proc, "best.pt", "tensor 'params.fc.bias'", "checkpoints/top/*.pt or last.pt"
    )
    assert (copy / "checkpoints" / "last.pt").read_bytes() == before


@pytest.mark.parametrize("setting", ["checkpoint", "resume"])
def test_every_loaded_tensor_is_checked(run, tmp_path, setting):
    """The general form: any tensor of params (whatever its name) or of the Adam state, NaN or inf,
    and the check is in load_checkpoint, which eval, resume and the end-of-training test all use."""
    run, _, _ = run
    for tree, name, value in (
        ("params", "fc.bias", float("inf")),
        ("params", "meta.lr.conv0", float("nan")),
        ("optimizer", "exp_avg_sq", float("-inf")),
    ):
        blob = ckpt(run)
        if tree == "params":
            blob["params"][name] = torch.full((3,), value)
            where = f"params.{name}"
        else:
            blob["optimizer"]["state"][2][name].view(-1)[0] = value
            where = f"optimizer.state.2.{name}"
        torch.save(blob, tmp_path / "x.pt")
        pattern = rf"{setting}=.*x\.pt: tensor '{where}' \(\d+ of \d+ values\) holds NaN or inf"
        with pytest.raises(MetarunError, match=pattern):
            load_checkpoint(tmp_path / "x.pt", setting)


def test_nonfinite_weights_never_reach_a_checkpoint(tiny_root, tmp_path, monkeypatch):
    """Weights that turn NaN while the loss is still finite (between checks) stop the run before any
    checkpoint is written, on every device (the check runs right before each save)."""
    from metarun.runner import train as train_module

    real = train_module.meta_train_step

    def poisoned(maml, params, optimizer, episodes):
        result = real(maml, params, optimizer, episodes)
        if optimizer.state[next(iter(params.values()))]["step"] >= 2:
            with torch.no_grad():
                params["fc.bias"][0] = float("nan")
        return result

    monkeypatch.setattr(train_module, "meta_train_step", poisoned)
    cfg = compose_train(
        *strip(tiny_args(tiny_root, tmp_path / "x"), "train", "hydra."),
        "iterations=4",
        "eval_every=2",
    )
    with pytest.raises(
        MetarunError, match=r"weights became non-finite \(tensor 'params.fc.bias'.*at iteration 2"
    ):
        train_module.train(cfg, tmp_path)
    assert (
        not (tmp_path / "checkpoints" / "last.pt").exists()
        and not (tmp_path / "checkpoints" / "best.pt").exists()
    )


# 5. A run dir is claimed by one run ---------------------------------------------------------------


def _claim(path, queue):
    queue.put(str(rundir.claim(path, auto=True)[0]))


def test_simultaneous_claims_of_one_dir_get_distinct_dirs(tmp_path):
    target = tmp_path / "outputs" / "train" / "2026-01-01_00-00-00"
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_claim, args=(target, queue)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    dirs = sorted(queue.get() for _ in procs)
    assert len(set(dirs)) == 4 and str(target) in dirs
    with pytest.raises(MetarunError, match="already belongs to another run"):
        rundir.claim(target, auto=False)
    # a dir in use is locked against a concurrent resume
    locked = rundir.claim(tmp_path / "busy", auto=False).path
    with pytest.raises(MetarunError, match="being run by another metarun process"):
        rundir.lock_existing(tmp_path / "busy")
    os.close(rundir._locks.pop(locked))


def test_runs_started_together_get_their_own_dirs(tiny_root, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("METARUN_DATA", "METARUN_DEBUG")}
    args = strip(tiny_args(tiny_root, tmp_path, "iterations=2", "eval_every=2"), "hydra.run.dir")
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "metarun.cli", *args, f"seed={seed}"],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for seed in (1, 2, 3)
    ]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    runs = sorted((tmp_path / "outputs" / "train").iterdir())
    assert len(runs) == 3
    assert sorted(json.loads((r / "results.json").read_text())["config"]["seed"] for r in runs) == [
        1,
        2,
        3,
    ]
    for r in runs:  # TensorBoard events of one process per dir (file names end in <host>.<pid>.<n>)
        assert len({p.name.split(".")[-2] for p in (r / "tensorboard").rglob("events.*")}) == 1


def test_resume_into_another_runs_dir_is_refused(run, tmp_path):
    run, _, _ = run
    # into a new dir a resume is a branch of the run; the original is untouched
    last = (run / "checkpoints" / "last.pt").read_bytes()
    branch = tmp_path / "branch"
    run_metarun(
        "train",
        f"resume={run}",
        "iterations=7",
        f"hydra.run.dir={branch}",
        "algorithm.impl=loop",
        cwd=tmp_path,
        check=True,
    )
    assert ckpt(branch)["iteration"] == 7 and (run / "checkpoints" / "last.pt").read_bytes() == last
    assert ckpt(branch)["history"][-1]["resumed_from"] == str(run)
    # 1. an execution setting given on resume is applied for real, not overridden by the saved
    #    execution
    assert ckpt(run)["algorithm"]["impl"] != "loop" and ckpt(branch)["algorithm"]["impl"] == "loop"
    assert ckpt(branch)["history"][-1]["changes"]["algorithm.impl"] == ["auto", "loop"]
    assert (branch / "checkpoints" / "best.pt").is_file()  # the run's best checkpoint goes with it
    # into a dir that belongs to another run (here: the branch) it is refused, and that run is
    # untouched
    files = {p: p.read_bytes() for p in branch.rglob("*") if p.is_file()}
    proc = run_metarun(
        "train", f"resume={run}", "iterations=8", f"hydra.run.dir={branch}", cwd=tmp_path
    )
    assert_clean_error(proc, f"hydra.run.dir={branch} already belongs to another run")
    # eval's output dir is claimed the same way
    assert_clean_error(
        run_metarun("eval", f"checkpoint={run}", f"hydra.run.dir={branch}", cwd=tmp_path),
        "already belongs to another run",
    )
    assert {p: p.read_bytes() for p in branch.rglob("*") if p.is_file()} == files


def test_rejected_run_in_the_default_dir_leaves_nothing(tiny_root, tmp_path):
    """way=40 is only found impossible once the data is loaded, after the dir was claimed: it is
    removed again, with the outputs/train/ folders its claim created, but not a folder another run
    made."""
    args = strip(tiny_args(tiny_root, tmp_path, "way=40"), "hydra.run.dir")
    assert_clean_error(run_metarun(*args, cwd=tmp_path), "way=40 is larger than the 33 classes")
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    (tmp_path / "outputs" / "train" / "other").mkdir(parents=True)
    assert_clean_error(run_metarun(*args, cwd=tmp_path), "way=40")
    assert [p.name for p in (tmp_path / "outputs" / "train").iterdir()] == ["other"]


# 6. A sweep survives a bad cell -------------------------------------------------------------------


def test_sweep_records_failed_cells_and_runs_the_others(tiny_root, tmp_path):
    args = strip(
        tiny_args(tiny_root, tmp_path, "iterations=2", "eval_every=2"), "hydra.run.dir", "way="
    )
    sweep = tmp_path / "sweep"
    proc = run_metarun(*args, "-m", "way=5000,five,3", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    line = [l for l in proc.stderr.splitlines() if l.startswith("metarun: error:")]
    assert (
        len(line) == 1
        and "2 sweep cell(s) failed" in line[0]
        and "way=5000" in line[0]
        and "way=five" in line[0]
    )
    cells = {c: json.loads((sweep / c / "results.json").read_text()) for c in ("0", "1", "2")}
    assert cells["0"]["status"] == "failed" and "larger than the 33 classes" in cells["0"]["reason"]
    assert (
        cells["1"]["status"] == "failed"
        and "way=five must be a positive integer" in cells["1"]["reason"]
    )
    assert cells["2"]["status"] == "completed" and cells["2"]["config"]["way"] == 3
    assert "larger than the 33 classes" in (sweep / "0" / "metarun-train.log").read_text()
    # the report of that sweep: the finished cell filled, the failed ones marked with their reasons
    # (#16)
    report = run_metarun("report", str(sweep), cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    table = report.stdout
    assert "| 3 |" in table and table.count("failed") >= 2 and "larger than the 33 classes" in table
    assert (sweep / "report.md").read_text() == table and (sweep / "report.csv").is_file()


def test_sweep_with_a_mistyped_setting_fails_before_any_cell(tiny_root, tmp_path):
    args = strip(tiny_args(tiny_root, tmp_path, "iterations=2"), "hydra.run.dir")
    proc = run_metarun(
        *args, "-m", "way=2,3", "wya=4", f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path
    )
    assert_clean_error(proc, "unknown setting 'wya'")
    assert not (tmp_path / "sweep").exists()


# 7. `~` in every path setting ---------------------------------------------------------------------


@pytest.mark.parametrize("key", cli.PATH_SETTINGS)
@pytest.mark.parametrize("quote", ["", "'", '"'])
def test_tilde_means_home_in_every_path_setting(key, quote, monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    out = cli._normalize(f"{key}={quote}~/runs/a b{quote}")
    assert out == f"{key}={cli._quote(str(tmp_path / 'runs' / 'a b'))}"
    cli._parse("train", [out])  # Hydra's grammar reads it
    assert cli._normalize(f"{key}=runs/x") == f"{key}=runs/x"
    with pytest.raises(MetarunError, match="not a user's home folder"):
        cli._normalize(f"{key}=~no-such-user-xyz/runs")


def test_tilde_paths_from_the_cli(tiny_root, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "data").symlink_to(tiny_root)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    env = {"HOME": str(home)}
    args = strip(
        tiny_args(tiny_root, tmp_path, "iterations=2", "eval_every=2"), "hydra.run.dir", "dataset."
    )
    run_metarun(
        *args,
        "hydra.run.dir=~/runs/x",
        "dataset.root=~/data",
        "dataset.cache_dir='~/cache'",
        cwd=cwd,
        env_extra=env,
        check=True,
    )
    assert (
        ckpt(home / "runs" / "x")["iteration"] == 2
        and (home / "cache" / "omniglot_28.pt").is_file()
    )
    run_metarun("train", "resume=~/runs/x", "iterations=3", cwd=cwd, env_extra=env, check=True)
    run_metarun(
        "eval",
        "checkpoint=~/runs/x",
        "data_root=~/data",
        "tasks=3",
        "hydra.run.dir=~/ev",
        cwd=cwd,
        env_extra=env,
        check=True,
    )
    assert (home / "ev" / "eval.json").is_file()
    run_metarun(
        *args,
        "-m",
        "seed=1",
        "hydra.sweep.dir=~/sw",
        "dataset.root=~/data",
        cwd=cwd,
        env_extra=env,
        check=True,
    )
    assert json.loads((home / "sw" / "0" / "results.json").read_text())["status"] == "completed"
    assert sorted(p.name for p in cwd.iterdir()) == []  # no folder named `~`, nothing else either


# 8. The run's log file ----------------------------------------------------------------------------


def test_log_file_holds_the_runs_messages(run):
    run, before, _ = run
    text = (run / "metarun-train.log").read_text()
    assert "\r" not in text and "meta-train" not in text  # tqdm stays on the console
    for fragment in (
        "3-way 1-shot 2-query on cpu",
        "iteration 3: validation accuracy",
        "iteration 6: validation accuracy",
        "test accuracy",
        "resumed from",
        "run dir",
    ):
        assert fragment in text, fragment
    assert (
        "into the cache" in before["stdout"] and "MiB" in before["stdout"]
    )  # 9. where a cache goes, its size


# 9. What a run tells its user, and keeps ----------------------------------------------------------


def test_resolved_settings_are_recorded(run):
    run, _, _ = run
    resolved = OmegaConf.load(run / "resolved.yaml")
    assert resolved.device == "cpu" and resolved.algorithm.impl in ("batched", "loop", "parallel")
    assert "from the archives in" in resolved.data_source and os.path.isabs(resolved.dataset.root)
    assert "${" not in (run / "resolved.yaml").read_text()
    assert ckpt(run)["resolved"]["algorithm"]["impl"] == resolved.algorithm.impl


@pytest.mark.parametrize(
    "name",
    sorted(
        str(p.relative_to(REPO / "conf" / "experiment").with_suffix(""))
        for p in (REPO / "conf" / "experiment").rglob("*.yaml")
    ),
)
def test_experiment_group_without_plus(name):
    plain = compose_train(cli._normalize(f"experiment={name}"))
    plus = compose_train(cli._normalize(f"+experiment={name}"))
    expected = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "experiment" / f"{name}.yaml"))
    expected.pop("defaults", None)
    assert plain == plus and all(OmegaConf.select(plain, k) == v for k, v in leaves(expected))


def test_experiment_group_without_plus_from_the_cli(tmp_path):
    out = run_metarun(
        "train", "experiment=omniglot_20way_1shot", "--cfg", "job", cwd=tmp_path, check=True
    ).stdout
    assert "way: 20" in out and "meta_batch: 16" in out


def test_eval_says_what_it_scored(run, tmp_path):
    run, _, _ = run
    out = run_metarun(
        "eval",
        f"checkpoint={run}",
        "tasks=3",
        f"hydra.run.dir={tmp_path / 'e'}",
        cwd=tmp_path,
        check=True,
    ).stdout
    best = ckpt(run, "best.pt")["iteration"]
    assert (
        f"{run / 'checkpoints' / 'best.pt'} (iteration {best})" in out
        and f"{tmp_path / 'e' / 'eval.json'}" in out
    )
    # a run stopped before its first validation has no best.pt: eval says it scores last.pt
    early = tmp_path / "early"
    (early / "checkpoints").mkdir(parents=True)
    shutil.copy(run / "checkpoints" / "last.pt", early / "checkpoints" / "last.pt")
    proc = run_metarun(
        "eval",
        f"checkpoint={early}",
        "tasks=3",
        f"hydra.run.dir={tmp_path / 'e2'}",
        cwd=tmp_path,
        check=True,
    )
    assert (
        "has no checkpoints/best.pt" in proc.stderr
        and "scoring last.pt (iteration 6)" in proc.stderr
    )


def test_time_limit_ends_training_with_a_test_and_results(tiny_root, tmp_path):
    """time_limit (minutes) ends a run early as if its iterations were reached: last validation,
    test of the best checkpoint, results.json saying how far it got; the run continues with
    resume."""
    run = tmp_path / "run"
    proc = run_metarun(
        *tiny_args(tiny_root, run, "iterations=100000", "eval_every=100000", "time_limit=0.02"),
        cwd=tmp_path,
        check=True,
    )
    results = json.loads((run / "results.json").read_text())
    done = results["iterations_done"]
    assert (
        results["stopped_by"] == "time_limit"
        and 0 < done < 100000
        and "time_limit=0.02 min reached" in proc.stdout
    )
    assert (
        results["best_iteration"] == done
        and ckpt(run)["iteration"] == done
        and "test_accuracy" in results
    )
    more = run_metarun(
        "train",
        f"resume={run}",
        f"iterations={done + 2}",
        "time_limit=null",
        cwd=tmp_path,
        check=True,
    )
    assert f"at iteration {done}" in more.stdout
    final = json.loads((run / "results.json").read_text())
    assert final["iterations_done"] == done + 2 and final["stopped_by"] == "iterations"
    assert_clean_error(
        run_metarun(*tiny_args(tiny_root, tmp_path / "bad", "time_limit=-1"), cwd=tmp_path),
        "time_limit=-1 must be a positive number of minutes",
    )
