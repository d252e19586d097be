"""`metarun eval benchmark=lake`: Lake et al.'s one-shot runs, on a tiny archive in the real
all_runs layout.

The constructed case: every test image IS one of its run's training images (test item i shows
training class shown[i]) while class_labels.txt names labelled[i]. A learner adapted until it fits
the 20 training images classifies each test image as the class whose training image it is, so the
number of errors of a run is exactly the number of items with shown[i] != labelled[i]. (The 20 test
images of a run are a permutation of its 20 training images, so the query batch has the support
batch's batch-norm statistics and each test image gets exactly the logits of its training image.)
"""

from __future__ import annotations

import json
import random
import zipfile
from pathlib import Path

import pytest
import torch
from helpers import character_image, png_bytes, run_metarun
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import metarun
from metarun.cli import CONF
from metarun.data.lake import read_all_runs
from metarun.errors import MetarunError
from metarun.runner.checkpoint import save_checkpoint
from metarun.runner.evaluate_checkpoint import evaluate_checkpoint
from metarun.runner.setup import build_algorithm

# Inner steps that make a random 8-filter conv4 fit 20 training images (30 already do; margin).
STEPS = 40


def _runs_spec() -> list[tuple[list[int], list[int]]]:
    """(labelled, shown) per run: run01 all right, run02 a 3-cycle among 3 items, run03 every item
    wrong."""
    spec = []
    for r, wrong in ((1, "none"), (2, "three"), (3, "all")):
        labelled = list(range(20))
        random.Random(r).shuffle(labelled)
        shown = list(labelled)
        if wrong == "three":
            shown[2], shown[7], shown[11] = labelled[7], labelled[11], labelled[2]
        elif wrong == "all":
            shown = [(c + 1) % 20 for c in labelled]
        spec.append((labelled, shown))
    return spec


EXPECTED_ERRORS = [0, 3, 20]


def make_all_runs(root: Path, as_zip: bool = True) -> Path:
    """The constructed case in the all_runs layout: all_runs.zip (members runNN/..., labels with the
    runNN/ prefix, as the public file) or an extracted all_runs/ folder (labels without the
    prefix)."""
    members = {}
    for r, (labelled, shown) in enumerate(_runs_spec(), start=1):
        run, lines = f"run{r:02d}", []
        for c in range(20):
            members[f"{run}/training/class{c + 1:02d}.png"] = png_bytes(
                character_image(100 * r + c, 1)
            )
        for i in range(20):
            members[f"{run}/test/item{i + 1:02d}.png"] = png_bytes(
                character_image(100 * r + shown[i], 1)
            )
            prefix = f"{run}/" if as_zip else ""
            lines.append(
                f"{prefix}test/item{i + 1:02d}.png {prefix}training/class{labelled[i] + 1:02d}.png"
            )
        members[f"{run}/class_labels.txt"] = ("\n".join(lines) + "\n").encode()
    root.mkdir(parents=True, exist_ok=True)
    if as_zip:
        with zipfile.ZipFile(root / "all_runs.zip", "w") as zf:
            for name, data in members.items():
                zf.writestr(name, data)
    else:
        for name, data in members.items():
            (root / "all_runs" / name).parent.mkdir(parents=True, exist_ok=True)
            (root / "all_runs" / name).write_bytes(data)
    return root


def make_checkpoint(path: Path, *overrides: str) -> Path:
    """A 20-way checkpoint at its random initialisation, with the config `metarun train` would
    store."""
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(
            config_name="train",
            overrides=[
                "way=20",
                "model.filters=8",
                "dataset.split=lake",
                f"update_step_test={STEPS}",
                "update_lr=0.1",
                "device=cpu",
                *overrides,
            ],
        )
    model, _ = build_algorithm(cfg, "cpu")
    save_checkpoint(
        path,
        {
            "iteration": 7,
            "params": model.init_params(torch.Generator().manual_seed(0)),
            "config": OmegaConf.to_container(cfg, resolve=True),
        },
    )
    return path


def eval_cfg(checkpoint: Path, root: Path, *overrides: str):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(
            config_name="eval",
            overrides=[
                f"checkpoint={checkpoint}",
                "benchmark=lake",
                "device=cpu",
                f"data_root={root}",
                *overrides,
            ],
        )


def test_cli_counts_exactly_the_constructed_errors(tmp_path):
    root = make_all_runs(tmp_path / "data")
    ckpt = make_checkpoint(tmp_path / "ckpt.pt")
    out = run_metarun(
        "eval",
        f"checkpoint={ckpt}",
        "benchmark=lake",
        f"data_root={root}",
        f"hydra.run.dir={tmp_path / 'eval'}",
        cwd=tmp_path,
        check=True,
    ).stdout
    assert (
        "  run01: 0/20 errors (0.0%)\n  run02: 3/20 errors (15.0%)\n  run03: 20/20 errors "
        "(100.0%)\n" in out
    )
    assert "Lake one-shot error 38.33% (23/60 test images, 3 runs)" in out
    assert (
        "published (Lake et al. 2015): people 4.5%, Bayesian Program Learning 3.3%, Siamese "
        "ConvNet 8.0%" in out
    )
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert [r["errors"] for r in result["runs"]] == EXPECTED_ERRORS
    assert result["command"].startswith("metarun eval ") and "benchmark=lake" in result["command"]
    assert result["metarun_version"] == metarun.__version__
    assert (result["errors"], result["items"], result["update_step_test"]) == (23, 60, STEPS)
    assert result["error_rate"] == pytest.approx(23 / 60)
    assert result["published_error_rate"] == {
        "people": 0.045,
        "Bayesian Program Learning": 0.033,
        "Siamese ConvNet": 0.080,
    }
    assert (
        result["warning"] is None and result["trained_split"] == "lake" and result["iteration"] == 7
    )


def test_extracted_folder_and_unprefixed_labels_give_the_same_errors(tmp_path):
    root = make_all_runs(tmp_path / "data", as_zip=False)
    ckpt = make_checkpoint(tmp_path / "ckpt.pt")
    (tmp_path / "eval").mkdir()
    result = evaluate_checkpoint(eval_cfg(ckpt, root), tmp_path / "eval")
    assert [r["errors"] for r in result["runs"]] == EXPECTED_ERRORS


def test_images_are_preprocessed_exactly_as_the_training_data(tiny_root, tmp_path):
    """A PNG of the tiny Omniglot (character 1, drawer 1: conftest's character_image(1, 1)) put into
    a run comes out as the training pipeline's tensor of that image (decoded cache, /255)."""
    from metarun.data.omniglot import load_omniglot

    data = load_omniglot(
        OmegaConf.create(
            {
                "root": str(tiny_root),
                "source": "archives",
                "download": False,
                "cache_dir": str(tmp_path / "cache"),
                "image_size": 28,
            }
        )
    )
    run = tmp_path / "all_runs" / "run01"
    (run / "training").mkdir(parents=True)
    (run / "test").mkdir()
    (run / "training" / "class01.png").write_bytes(png_bytes(character_image(1, 1)))
    (run / "test" / "item01.png").write_bytes(png_bytes(character_image(1, 2)))
    (run / "class_labels.txt").write_text("run01/test/item01.png run01/training/class01.png\n")
    [lake_run] = read_all_runs(tmp_path / "all_runs", 28)
    assert torch.equal(lake_run.support[0, 0], data.images[0].float() / 255)
    assert torch.equal(lake_run.query[0, 0], data.images[1].float() / 255)
    assert lake_run.labels.tolist() == [0]


def test_maml_split_checkpoint_is_refused_or_loudly_marked(tmp_path, caplog):
    caplog.set_level(
        "INFO", logger="metarun"
    )  # messages go through logging (#11): console and the run's log
    root = make_all_runs(tmp_path / "data")
    ckpt = make_checkpoint(tmp_path / "ckpt.pt", "dataset.split=maml")
    (tmp_path / "eval").mkdir()
    with pytest.raises(
        MetarunError, match=r"dataset\.split=maml.*dataset\.split=lake.*allow_seen_alphabets=true"
    ):
        evaluate_checkpoint(eval_cfg(ckpt, root), tmp_path / "eval")
    assert not (tmp_path / "eval" / "eval.json").exists()
    result = evaluate_checkpoint(
        eval_cfg(ckpt, root, "allow_seen_alphabets=true"), tmp_path / "eval"
    )
    assert "NOT comparable" in result["warning"] and result["trained_split"] == "maml"
    assert json.loads((tmp_path / "eval" / "eval.json").read_text())["warning"] == result["warning"]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(
        "metarun: WARNING: checkpoint trained with dataset.split=maml" in w for w in warnings
    )
    assert "WARNING:" in caplog.records[-1].getMessage().splitlines()[-1]


def test_wrong_way_missing_archive_and_unknown_benchmark_are_one_line_errors(tmp_path):
    root = make_all_runs(tmp_path / "data")
    five = make_checkpoint(tmp_path / "five.pt", "way=5")
    with pytest.raises(
        MetarunError,
        match=r"20-way 1-shot, but checkpoint .* way=5: use a checkpoint trained with way=20",
    ):
        evaluate_checkpoint(eval_cfg(five, root), tmp_path)
    ckpt = make_checkpoint(tmp_path / "ckpt.pt")
    with pytest.raises(
        MetarunError, match=r"needs all_runs\.zip .*github\.com/brendenlake/omniglot.*data_root="
    ):
        evaluate_checkpoint(eval_cfg(ckpt, tmp_path / "empty"), tmp_path)
    with pytest.raises(
        MetarunError, match=r"benchmark='omniglot' is not a benchmark: use benchmark=lake"
    ):
        evaluate_checkpoint(eval_cfg(ckpt, root, "benchmark=omniglot"), tmp_path)
    (root / "bad").mkdir()
    (root / "bad" / "all_runs").mkdir()
    (root / "bad" / "all_runs" / "run01").mkdir()
    (root / "bad" / "all_runs" / "run01" / "class_labels.txt").write_text("nonsense\n")
    with pytest.raises(MetarunError, match=r"run01.*0 training and 0 test images"):
        evaluate_checkpoint(eval_cfg(ckpt, root / "bad"), tmp_path)
