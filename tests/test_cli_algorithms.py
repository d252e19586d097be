"""Real `metarun` runs of every algorithm in a subprocess: resume == uninterrupted (bit for bit),
`metarun eval` reproducing a run's test score, the top-K checkpoints and `metarun eval ensemble=K`,
and one-line errors for impossible algorithm settings and bad learners."""

import json

import pytest
import torch
from helpers import assert_clean_error, run_metarun, tiny_args

# Every MAML++ schedule changes inside the 6 iterations: epochs of 2 iterations, MSL over 2 epochs,
# first order in epoch 0, cosine annealing over 3 epochs (given, so that the 3-iteration first part
# is the same run cut short).
ALGORITHMS = {
    "metasgd": ["algorithm=metasgd"],
    "mamlpp": [
        "algorithm=mamlpp",
        "update_step=2",
        "update_step_test=2",
        "algorithm.iterations_per_epoch=2",
        "algorithm.msl_epochs=2",
        "algorithm.first_order_epochs=1",
        "algorithm.cosine_epochs=3",
    ],
    # ANIL on the generic learner path: a tiny ResNet-12 through functional_call
    "anil": ["algorithm=anil", "model=resnet12", "model.channels=[4,4,4,4]"],
    # Reptile: meta_step annealed inside the run, random inner and evaluation mini-batches
    "reptile": [
        "algorithm=reptile",
        "algorithm.train_shots=3",
        "algorithm.inner_batch=4",
        "update_step=2",
        "algorithm.eval_inner_batch=2",
        "update_lr=0.01",
        "algorithm.meta_step_iterations=6",
    ],
    "pretrain": [
        "algorithm=pretrain",
        "algorithm.head=cosine",
        "algorithm.finetune_epochs=3",
        "algorithm.batch_size=8",
    ],
    # ProtoNet: training episodes of another way and query than the test tasks, the rate halved
    # inside the run
    "protonet": [
        "algorithm=protonet",
        "algorithm.train_way=5",
        "algorithm.train_query=3",
        "algorithm.lr_decay_every=2",
        "model.downsample=maxpool",
    ],
    "protomaml": ["algorithm=protomaml", "first_order=true", "update_step=2"],
}
# a parameter name only that algorithm's checkpoints hold (protonet, protomaml: none, and no head)
OWN_PARAM = {
    "metasgd": "alpha.",
    "mamlpp": "lslr.",
    "anil": "blocks.",
    "reptile": "conv0.",
    "pretrain": "pretrain.",
}


def args(root, run_dir, *extra):
    """tiny_args, without conv4's model.filters when another model is chosen."""
    out = tiny_args(root, run_dir, *extra)
    return [a for a in out if a != "model.filters=8"] if "model=resnet12" in extra else out


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_resume_equals_uninterrupted(tiny_root, tmp_path, name):
    extra = ALGORITHMS[name]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    run_metarun(*args(tiny_root, whole, *extra), cwd=tmp_path, check=True)
    run_metarun(*args(tiny_root, parts, *extra, "iterations=3"), cwd=tmp_path, check=True)
    # the resumed run keeps its saved execution (a resume that gives algorithm.impl or threads
    # changes it, recorded in its history: #11); repeating the run's own settings, algorithm=
    # included, is no change
    proc = run_metarun(
        *[a for a in args(tiny_root, parts, *extra) if not a.startswith("hydra.run.dir")],
        f"resume={parts}",
        cwd=tmp_path,
        check=True,
    )
    assert "at iteration 3" in proc.stdout
    a, b = load(whole / "checkpoints" / "last.pt"), load(parts / "checkpoints" / "last.pt")
    assert (
        a["algorithm"] == b["algorithm"]
        and a["algorithm"]["name"] == name
        and a["algorithm"]["impl"] != "loop"
    )
    assert set(a["params"]) == set(b["params"])
    if name in OWN_PARAM:
        assert any(k.startswith(OWN_PARAM[name]) for k in a["params"])
    else:  # the head is set per task (Proto-MAML) or not used (ProtoNet)
        assert "conv0.weight" in a["params"] and not any(k.startswith("fc.") for k in a["params"])
    assert all(torch.equal(a["params"][k], b["params"][k]) for k in a["params"])
    assert a["optimizer"]["param_groups"][0]["lr"] == b["optimizer"]["param_groups"][0]["lr"]
    if name in ("anil", "reptile", "pretrain", "protonet", "protomaml"):
        # `metarun eval` scores the best checkpoint on the same fixed tasks as the run's own test
        results = json.loads((whole / "results.json").read_text())
        # the logged speed counts what an iteration trains on: the baseline's images, not unused
        # meta_batch tasks
        speed, other = (
            ("images_per_s", "tasks_per_s")
            if name == "pretrain"
            else ("tasks_per_s", "images_per_s")
        )
        assert results[speed] > 0 and other not in results
        run_metarun(
            "eval",
            f"checkpoint={whole}",
            "tasks=6",
            "eval_chunk=4",
            f"data_root={tiny_root}",
            "device=cpu",
            f"hydra.run.dir={tmp_path / 'eval'}",
            cwd=tmp_path,
            check=True,
        )
        assert (
            json.loads((tmp_path / "eval" / "eval.json").read_text())["accuracy"]
            == results["test_accuracy"]
        )


def test_top_checkpoints_and_ensemble_eval(tiny_root, tmp_path):
    run = tmp_path / "run"
    run_metarun(
        *tiny_args(tiny_root, run, "algorithm=metasgd", "iterations=9", "keep_best=2"),
        cwd=tmp_path,
        check=True,
    )
    last = load(run / "checkpoints" / "last.pt")
    assert len(last["top"]) == 2 and last["top"][0][0] >= last["top"][1][0]
    kept = sorted(p.name for p in (run / "checkpoints" / "top").glob("*.pt"))
    assert kept == sorted(f"iteration-{e[1]}.pt" for e in last["top"])
    assert last["top"][0][1] == last["best_iteration"]
    common = ["tasks=6", f"data_root={tiny_root}", "device=cpu"]
    run_metarun(
        "eval",
        f"checkpoint={run}",
        "ensemble=2",
        *common,
        f"hydra.run.dir={tmp_path / 'e2'}",
        cwd=tmp_path,
        check=True,
    )
    result = json.loads((tmp_path / "e2" / "eval.json").read_text())
    assert len(result["ensemble"]) == 2 and "ensemble of the 2 best" in result["summary"]
    members = ", ".join(str(e[1]) for e in last["top"])  # best first, as the members are read
    assert f"best checkpoints (iterations {members})" in result["summary"]
    # an ensemble of one is the best checkpoint's own score
    run_metarun(
        "eval",
        f"checkpoint={run}",
        *common,
        f"hydra.run.dir={tmp_path / 'e1'}",
        cwd=tmp_path,
        check=True,
    )
    single = json.loads((tmp_path / "e1" / "eval.json").read_text())
    assert single["ensemble"] == [str(run / "checkpoints" / "best.pt")]
    assert_clean_error(
        run_metarun(
            "eval",
            f"checkpoint={run}",
            "ensemble=3",
            *common,
            f"hydra.run.dir={tmp_path / 'e3'}",
            cwd=tmp_path,
        ),
        "ensemble=3",
        "ensemble<=2",
    )


@pytest.mark.parametrize(
    "overrides,fragments",
    [
        (["algorithm=nosuch"], ["unknown algorithm=nosuch", "maml", "metasgd", "mamlpp"]),
        (
            ["algorithm.name=nosuch"],
            ["unknown algorithm 'nosuch'", "maml, metasgd, mamlpp, anil, reptile, pretrain"],
        ),
        (
            ["algorithm=reptile", "algorithm.train_shots=25"],
            ["train_shots=25", "20 images per class"],
        ),
        (["+model._target_=nosuch.Net"], ["model._target_=nosuch.Net", "could not be built"]),
        (["model=resnet12", "model.way=4", "model.channels=[2,2,2,2]"], ["ResNet12", "way=3"]),
        (["algorithm=metasgd", "algorithm.alpha_init_low=0"], ["alpha_init_low=0", "positive"]),
        (["algorithm=mamlpp", "algorithm.update_lr_init=-1"], ["unknown setting"]),
        (["algorithm=mamlpp", "update_lr=-0.1"], ["update_lr=-0.1"]),
        (["algorithm=mamlpp", "algorithm.msl_epochs=10"], ["msl_epochs=10", "iterations"]),
        (["threads=-1"], ["threads=-1"]),
    ],
)
def test_impossible_algorithm_setting_is_one_line(tiny_root, tmp_path, overrides, fragments):
    proc = run_metarun(*args(tiny_root, tmp_path / "run", *overrides), cwd=tmp_path)
    assert_clean_error(proc, *fragments)
    assert not (tmp_path / "run" / "checkpoints" / "last.pt").exists()


def test_protonet_ensemble_and_refused_curve_protomaml_curve(tiny_root, tmp_path):
    """ProtoNet scores an ensemble by its members' mean distances and refuses steps= (no inner loop)
    in one line before any data is read; Proto-MAML's steps= curve starts from the prototype head
    (step 0)."""
    common = ["tasks=4", "eval_chunk=4", "device=cpu"]
    for name in ("protonet", "protomaml"):
        run = tmp_path / name
        run_metarun(
            *args(tiny_root, run, *ALGORITHMS[name], "keep_best=2"), cwd=tmp_path, check=True
        )
        # ProtoNet: refused before the data is looked for (data_root points nowhere)
        where = tmp_path / "nowhere" if name == "protonet" else tiny_root
        steps = run_metarun(
            "eval",
            f"checkpoint={run}",
            "ensemble=2",
            "steps=0,1",
            *common,
            f"data_root={where}",
            f"hydra.run.dir={tmp_path / (name + '_curve')}",
            cwd=tmp_path,
        )
        if name == "protonet":
            assert_clean_error(steps, "steps=0,1", "protonet has no inner loop", "drop steps=")
            run_metarun(
                "eval",
                f"checkpoint={run}",
                "ensemble=2",
                *common,
                f"data_root={tiny_root}",
                f"hydra.run.dir={tmp_path / 'ensemble'}",
                cwd=tmp_path,
                check=True,
            )
            result = json.loads((tmp_path / "ensemble" / "eval.json").read_text())
            assert len(result["ensemble"]) == 2 and 0.0 <= result["accuracy"] <= 1.0
        else:
            assert steps.returncode == 0, steps.stderr[-2000:]
            result = json.loads((tmp_path / (name + "_curve") / "eval.json").read_text())
            assert [c["steps"] for c in result["curve"]] == [0, 1] and len(result["ensemble"]) == 2


def tiny_miniimagenet(root):
    """10 training, 5 validation and 5 test classes of 20 images at 84x84 (test_datasets'
    layout)."""
    from helpers import make_miniimagenet

    if not (root / "test.csv").is_file():
        make_miniimagenet(root, per_class=20, classes=(10, 5, 5))
    return root


PRESETS = [
    "protonet_omniglot_5way_1shot",
    "protonet_omniglot_5way_5shot",
    "protonet_omniglot_20way_1shot",
    "protonet_omniglot_20way_5shot",
    "protonet_miniimagenet_5way_1shot",
    "protonet_miniimagenet_5way_5shot",
    "protomaml_omniglot_5way_1shot",
    "protomaml_omniglot_20way_1shot",
]


@pytest.mark.parametrize("preset", PRESETS)
def test_protonet_and_protomaml_presets_run(tiny_root, tmp_path_factory, preset):
    """Each preset for two iterations on tiny data: sizes the tiny data cannot hold are shrunk (the
    validation split's 3 Omniglot classes, the 10 miniImageNet training classes), the rest is the
    preset's."""
    tmp = tmp_path_factory.mktemp(preset)
    if "miniimagenet" in preset:
        root = tiny_miniimagenet(tmp_path_factory.getbasetemp() / "tiny_miniimagenet")
        data = [f"dataset.root={root}", "algorithm.train_way=10"]
    else:
        data = [f"dataset.root={tiny_root}", f"dataset.cache_dir={tiny_root / 'cache'}", "way=3"]
        data += ["algorithm.train_way=10"] if preset.startswith("protonet") else ["meta_batch=2"]
    run = tmp / "run"
    run_metarun(
        "train",
        f"experiment={preset}",
        *data,
        "iterations=2",
        "eval_every=2",
        "val_tasks=2",
        "test_tasks=2",
        "eval_chunk=2",
        "log_every=1",
        "model.filters=4",
        "device=cpu",
        "threads=1",
        f"hydra.run.dir={run}",
        cwd=tmp,
        check=True,
    )
    results = json.loads((run / "results.json").read_text())
    config = results["config"]
    assert results["iterations_done"] == 2 and 0.0 <= results["test_accuracy"] <= 1.0
    assert results["algorithm"] == config["algorithm"]["name"] == preset.split("_")[0]
    if preset.startswith("protonet"):  # Snell et al.'s protocol
        assert config["meta_batch"] == 1 and config["meta_lr"] == 0.001
        assert (
            config["algorithm"]["lr_decay_every"] == 2000 and config["algorithm"]["lr_decay"] == 0.5
        )
        assert config["model"]["downsample"] == "maxpool"
        assert config["algorithm"]["train_query"] == (15 if "miniimagenet" in preset else 5)
    else:  # Meta-Dataset's first order
        assert config["first_order"] is True and config["model"]["downsample"] == "stride"
