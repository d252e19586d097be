"""The reproduction matrix (metarun/matrix.py, `metarun report DIR --matrix`, scripts/reproduce.sh):
its cells against the presets and the published tables, its rows from kept result files, and the
committed docs/results/matrix.md against what its files generate."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, compose

from metarun import matrix
from metarun.cli import main
from metarun.errors import MetarunError
from metarun.report import PAPER


def test_every_cell_composes_and_names_a_published_figure_or_says_why_not():
    names = [c.name for c in matrix.CELLS]
    assert len(names) == len(set(names))
    totals = matrix.paper_iterations()
    for cell in matrix.CELLS:
        cfg = matrix.presets()[cell.name]
        assert totals[cell.name] == cfg.iterations > 0
        figure, source = matrix.published(cell)
        if "MSE after" in cell.task:  # the label's test steps are the preset's
            assert f"after {cfg.update_step_test} step" in cell.task, cell.name
        if cell.paper is None:
            assert source, cell.name  # why there is none, or the figure's source
            continue
        dataset, label, (way, shot) = cell.paper
        assert (cfg.way, cfg.shot, cfg.dataset.name) == (way, shot, dataset), cell.name
        assert any(e[0] == label for e in PAPER[dataset]), cell.name
        assert figure and source, cell.name


def test_published_figures_and_protocol_switches_of_some_cells():
    cell = matrix.BY_NAME
    assert matrix.published(cell["maml_omniglot_5way_1shot"])[0] == "98.7 ± 0.4"
    assert matrix.published(cell["fomaml_omniglot_20way_1shot"])[0] == "89.4 ± 0.5"
    assert matrix.published(cell["reptile_omniglot_5way_1shot"])[0] == "95.39 ± 0.09"
    assert matrix.published(cell["reptile_transductive_omniglot_5way_1shot"])[0] == "97.68 ± 0.04"
    assert matrix.published(cell["maml_miniimagenet_5way_5shot"])[0] == "63.11 ± 0.92"
    assert matrix.published(cell["mamlpp_omniglot_5way_5shot"])[0] == "left out"
    figure, source = matrix.published(cell["maml_lake_20way_1shot"])
    assert "people 4.5" in figure and "Lake" in source
    assert compose(*cell["fomaml_omniglot_5way_1shot"].train).first_order is True
    transductive = compose(*cell["reptile_transductive_omniglot_5way_1shot"].train)
    assert transductive.algorithm.transductive is True
    assert cell["mamlpp_omniglot_20way_1shot"].evaluate == ("ensemble=5",)


def test_select_and_plan_keep_the_matrix_order_and_refuse_unknown_names(capsys):
    picked = matrix.select(["maml_omniglot_20way_1shot", "maml_paper"])
    assert [c.name for c in picked] == matrix.GROUPS["maml_paper"]
    assert len(matrix.select(["all"])) == len(matrix.CELLS)
    with pytest.raises(MetarunError, match="no reproduction cell named 'mam'"):
        matrix.select(["mam"])
    # scripts/reproduce.sh splits the plan's settings at spaces
    assert not [s for c in matrix.CELLS for s in (*c.train, *c.evaluate) if " " in s]
    assert matrix.main(["plan", "mamlpp_omniglot_5way_1shot", "fomaml_omniglot_5way_1shot"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "fomaml_omniglot_5way_1shot\t60000\texperiment=maml_paper/omniglot_5way_1shot "
        "first_order=true\t",
        "mamlpp_omniglot_5way_1shot\t50000\texperiment=mamlpp_paper/omniglot_5way_1shot\t"
        "ensemble=5",
    ]
    assert matrix.main(["plan", "mam"]) == 2
    assert capsys.readouterr().err.startswith("metarun: error: no reproduction cell named 'mam'")


def results(cell, seed, done, test, ci=0.01, metric=None, segments=1, **changes):
    """A results.json of `cell` as metarun train writes it: the preset's resolved config (with
    `changes` to it), `done` iterations, the test figure."""
    from omegaconf import OmegaConf

    config = OmegaConf.to_container(matrix.preset(cell), resolve=True)
    config |= {"seed": seed, **changes}
    record = {
        "status": "completed",
        "iterations_done": done,
        "config": config,
        "test_accuracy": test,
        "test_ci95": ci,
        "device": "cpu",
        "threads": 1,
        "wall_seconds": 7200.0,
        "command": f"metarun train {' '.join(matrix.BY_NAME[cell].train)} seed={seed}",
        "metarun_version": "0.2.0",
        "history": [{}] * segments,
    }
    if metric:
        record.update({"metric": metric, f"test_{metric}": record.pop("test_accuracy")})
    return record


def keep(root: Path, cell: str, seed: int, record: dict, name: str = "results.json") -> None:
    folder = root / cell / f"seed{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(json.dumps(record))


def rows_by_cell(text: str) -> dict[str, str]:
    """The matrix's rows, keyed by '<algorithm> | <cell>'."""
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    return {" | ".join(r.split(" | ")[:2]).removeprefix("| "): r for r in rows[1:]}


def test_rows_from_kept_results_seeds_early_stops_estimates_and_evals(tmp_path):
    def run(cell, seed, *args, **kwargs):
        keep(tmp_path, cell, seed, results(cell, seed, *args, **kwargs))

    run("maml_omniglot_5way_1shot", 0, 60000, 0.985, ci=0.004)
    for seed, acc in enumerate([0.95, 0.96, 0.97]):
        run("anil_omniglot_20way_1shot", seed, 60000, acc, segments=3)
    run("metasgd_omniglot_5way_1shot", 0, 15000, 0.9)
    run("mamlpp_omniglot_5way_1shot", 0, 50000, 0.99)
    scored = {"accuracy": 0.995, "ci95": 0.002, "ensemble": ["a.pt"] * 5}
    scored["command"] = "metarun eval checkpoint=r ensemble=5"
    keep(tmp_path, "mamlpp_omniglot_5way_1shot", 0, scored, "eval.json")
    run("maml_sinusoid_10shot", 0, 70000, 0.1437, 0.0258, metric="mse")
    estimates = {"command": "python scripts/bench.py --matrix --threads 1", "date": "2026-12-05"}
    estimates |= {"machine": "a test CPU", "threads": 1, "cells": {}}
    estimates["cells"]["maml_omniglot_5way_5shot"] = {"s_per_iter": 0.6}
    (tmp_path / matrix.ESTIMATES).write_text(json.dumps(estimates))

    text = matrix.write_matrix(tmp_path)
    rows = rows_by_cell(text)
    assert text.count("\n| ") == len(matrix.CELLS) + 2  # the header and its rule
    one = rows["MAML | Omniglot 5-way 1-shot"]
    assert "| 98.7 ± 0.4 [1] | 98.50 ± 0.40 (seed 0) | 60,000 of 60,000 |" in one
    assert "| cpu, 1 thread, 2.0 h |" in one and "| 0.2.0 |" in one
    assert "`metarun train experiment=maml_paper/omniglot_5way_1shot seed=0`" in one
    three = rows["ANIL | Omniglot 20-way 1-shot"]  # t(0.975, 2) = 4.303: 4.303 x 1.00 / sqrt(3)
    assert "| 96.00 ± 2.48 (mean of 3 seeds; each seed's own test CI ± 1.00 on average) |" in three
    assert "(then 2 resumes)" in three
    early = rows["Meta-SGD | Omniglot 5-way 1-shot"]
    assert "15,000 of 60,000 (25%): **stopped early, not a reproduction**" in early
    ensemble = rows["MAML++ (top-5 ensemble) | Omniglot 5-way 1-shot"]
    assert "| 99.50 ± 0.20 (seed 0) |" in ensemble
    assert "seed=0`, scored by `metarun eval checkpoint=r ensemble=5` |" in ensemble
    sine = rows["MAML | sinusoid 10-shot (MSE after 10 steps, lower is better)"]
    assert "| 0.1437 ± 0.0258 (seed 0) | 70,000 of 70,000 |" in sine
    estimated = rows["MAML | Omniglot 5-way 5-shot"]
    assert "| not run | 0 of 60,000 | not run; estimated 10.0 h |" in estimated
    assert "`scripts/reproduce.sh maml_omniglot_5way_5shot`" in estimated
    not_run = rows["MAML | Omniglot 20-way 1-shot"]
    assert "| not run | 0 of 60,000 | not run (no estimate) |" in not_run
    assert "on a test CPU, 1 thread (2026-12-05)" in text
    assert "\n1. Finn, Abbeel & Levine 2017, ICML, Table 1 (arXiv:1703.03400)\n" in text
    assert (
        f"4 of {len(matrix.CELLS)} cells run to the paper's length and protocol, 1 stopped" in text
    )


def test_a_run_off_its_cells_protocol_is_never_shown_as_a_reproduction(tmp_path):
    """A transductive Reptile run in the non-transductive cell, a 20-way run in a 5-way cell, a
    hand-made record without a config, an ensemble cell scored without its ensemble."""
    cell = "reptile_omniglot_5way_1shot"
    transductive = results(cell, 0, 100000, 0.96)
    transductive["config"]["algorithm"]["transductive"] = True
    keep(tmp_path, cell, 0, transductive)
    keep(tmp_path, "maml_omniglot_5way_1shot", 0, results("maml_omniglot_5way_1shot", 0, 1, 0.5))
    changed = results("maml_omniglot_5way_1shot", 1, 60000, 0.9, way=20, test_tasks=20)
    keep(tmp_path, "maml_omniglot_5way_1shot", 1, changed)
    keep(tmp_path, "fomaml_omniglot_5way_1shot", 0, {"test_accuracy": 0.9, "iterations_done": 9})
    longer = results("maml_omniglot_5way_5shot", 0, 120000, 0.99, iterations=120000)
    keep(tmp_path, "maml_omniglot_5way_5shot", 0, longer)
    keep(
        tmp_path,
        "mamlpp_omniglot_20way_1shot",
        0,
        results("mamlpp_omniglot_20way_1shot", 0, 1, 0.9),
    )
    keep(tmp_path, "mamlpp_omniglot_20way_1shot", 0, {"accuracy": 0.9, "ci95": 0.0}, "eval.json")
    rows = rows_by_cell(matrix.matrix_markdown(tmp_path))
    off = "**not this cell's protocol**"
    assert f"{off} (algorithm.transductive=true)" in rows["Reptile | Omniglot 5-way 1-shot"]
    assert f"{off} (test_tasks=20, way=20)" in rows["MAML | Omniglot 5-way 1-shot"]
    more = f"{off} (iterations=120000 (the paper's: 60000))"
    assert more in rows["MAML | Omniglot 5-way 5-shot"]
    assert (
        f"{off} (its results.json has no config)"
        in rows["first-order MAML | Omniglot 5-way 1-shot"]
    )
    assert f"{off} (eval ensemble=None)" in rows["MAML++ (top-5 ensemble) | Omniglot 20-way 1-shot"]
    # the real runs kept in docs/results are of their cells' protocols
    for cell in matrix.CELLS:
        for seed in matrix.read_cell(cell, REPO / "docs" / "results"):
            assert seed.off == (), (cell.name, seed.off)


def test_a_cell_scored_by_eval_without_its_eval_json_is_an_error(tmp_path):
    cell = "mamlpp_omniglot_5way_1shot"
    keep(tmp_path, cell, 0, results(cell, 0, 50000, 0.99))
    with pytest.raises(MetarunError, match="has no eval.json.*ensemble=5.*reproduce.sh"):
        matrix.write_matrix(tmp_path)


def test_the_committed_matrix_is_what_its_result_files_generate():
    root = REPO / "docs" / "results"
    assert (root / matrix.MATRIX).read_text() == matrix.matrix_markdown(root), (
        "docs/results/matrix.md is out of date or edited by hand: run "
        "metarun report docs/results --matrix"
    )


def test_report_matrix_cli_and_its_one_line_errors(tmp_path, capsys):
    assert main(["report", str(tmp_path), "--matrix"]) == 0
    assert (
        (tmp_path / matrix.MATRIX).is_file()
        and f"0 of {len(matrix.CELLS)} cells run to the paper's length and protocol, 0 stopped"
        in capsys.readouterr().out
    )
    assert main(["report", str(tmp_path), str(tmp_path), "--matrix"]) == 2
    assert "--matrix takes one folder" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "none"), "--matrix"]) == 2
    assert "is not a folder of results" in capsys.readouterr().err


def test_reproduce_sh_trains_in_segments_keeps_the_results_and_rebuilds_the_matrix(tmp_path):
    """A cell stopped by time_limit is continued by the next call (resume), its results.json is
    copied, and the matrix shows the iterations reached of the paper's total."""
    python = Path(sys.executable)
    env = {**os.environ, "PATH": f"{python.parent}:{os.environ['PATH']}"}
    env |= {"OUT": str(tmp_path / "runs"), "RESULTS": str(tmp_path / "results")}
    env["METARUN"] = f"{python} -m metarun.cli"
    script = [str(REPO / "scripts" / "reproduce.sh"), "joint_sinusoid_10shot", "--"]
    tiny = ["iterations=60", "eval_every=20", "val_tasks=4", "test_tasks=10", "threads=1"]

    def call(*settings):
        proc = subprocess.run(
            [*script, *settings], cwd=tmp_path, env=env, capture_output=True, text=True
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    nameless = subprocess.run([script[0], "--", *tiny], cwd=tmp_path, env=env, capture_output=True)
    assert nameless.returncode == 2 and b"name the cells before" in nameless.stderr
    dead = tmp_path / "runs" / "joint_sinusoid_10shot" / "seed0"  # killed before a checkpoint
    (dead / ".hydra").mkdir(parents=True)
    assert "holds no checkpoint" in call(*tiny, "time_limit=0.00001").stderr  # stops at once
    assert len(list(dead.parent.glob("seed0.killed-*/.hydra"))) == 1  # moved aside, not deleted
    kept = tmp_path / "results" / "joint_sinusoid_10shot" / "seed0" / "results.json"
    first = json.loads(kept.read_text())
    assert first["stopped_by"] == "time_limit" and first["iterations_done"] < 60
    call("threads=1", "time_limit=null")  # continues the same run dir (a limit is per segment)
    data = json.loads(kept.read_text())
    assert data["iterations_done"] == 60 and len(data["history"]) == 2
    # the resume kept the run's own dataset and learner (not the default Omniglot's keys as well)
    assert data["config"]["dataset"] == first["config"]["dataset"]
    assert data["config"]["model"] == first["config"]["model"]
    text = (tmp_path / "results" / matrix.MATRIX).read_text()
    row = rows_by_cell(text)[
        'joint training ("pretrained") | sinusoid 10-shot (MSE after 10 steps, lower is better)'
    ]
    assert "60 of 70,000 (0%): **stopped early, not a reproduction**" in row
    assert "not this cell's protocol" in row  # eval_every, test_tasks and val_tasks of the check
    assert "model." not in row and "image_size" not in row
    assert f"{data['test_mse']:.4f}" in row and "(then 1 resume)" in row
    again = call("threads=1", "time_limit=null").stderr  # a short check stays one
    assert "is a short check (iterations=60, the paper's: 70000): kept" in again
    assert json.loads(kept.read_text()) == data
    assert not list(tmp_path.glob("results/*/*/*.pt"))  # never a checkpoint
