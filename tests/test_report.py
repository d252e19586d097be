"""`metarun report`: the table of hand-written result files (exact Markdown and CSV)."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from helpers import run_metarun, tiny_args

from metarun.cli import main
from metarun.report import Result, pool
from metarun.runner.evaluate import accuracy_with_ci


def config(
    way: int,
    shot: int,
    seed: int,
    first_order: bool = False,
    algorithm: dict | None = None,
    n: int = 0,
) -> dict:
    return {
        "way": way,
        "shot": shot,
        "query": 1,
        "seed": seed,
        "first_order": first_order,
        "update_lr": 0.4,
        "update_step_test": 3,
        "iterations": 100,
        "device": "cpu",
        "dataset": {"name": "omniglot", "root": f"/data/{n}", "split": "maml", "image_size": 28},
        "algorithm": {"impl": "parallel", **(algorithm or {})},
    }


def write_run(
    run_dir: Path,
    cfg: dict,
    accuracy: float | None = None,
    ci95: float | None = None,
    reason: str | None = None,
    config_in_results: bool = True,
) -> None:
    run_dir.mkdir(parents=True)
    (run_dir / ".hydra").mkdir()
    (run_dir / ".hydra" / "config.yaml").write_text(yaml.safe_dump(cfg))
    if reason is not None:
        results = {"status": "failed", "reason": reason}
        if config_in_results:
            results["config"] = cfg
    else:
        results = {
            "config": cfg,
            "best_val_accuracy": accuracy,
            "test_accuracy": accuracy,
            "test_ci95": ci95,
            "test_tasks": 600,
        }
    (run_dir / "results.json").write_text(json.dumps(results))


def make_sweep(root: Path) -> Path:
    """A 2x2 sweep (way 5/20 x first_order) in Hydra's layout: 5-way 1-shot MAML with three seeds, a
    failed 20-way first-order cell whose results.json has no config (read from .hydra/config.yaml),
    and a 20-way MAML cell with one seed done and one failed."""
    sweep = root / "sweep" / "2026-11-29_10-00-00"
    write_run(sweep / "0", config(5, 1, 0, n=0), 0.95, 0.011)
    write_run(sweep / "1", config(5, 1, 1, n=1), 0.93, 0.013)
    write_run(sweep / "2", config(5, 1, 2, n=2), 0.97, 0.009)
    write_run(sweep / "3", config(5, 1, 0, True, n=3), 0.9012, 0.0123)
    write_run(sweep / "4", config(20, 1, 0, n=4), 0.8512, 0.0101)
    write_run(
        sweep / "5",
        config(20, 1, 0, True, n=5),
        reason="the meta-loss became nan at iteration 3",
        config_in_results=False,
    )
    write_run(sweep / "6", config(20, 1, 1, n=6), reason="CUDA out of memory")
    return sweep


EXPECTED_MD = """\
| way | shot | MAML | first-order MAML | MAML (paper) | first-order MAML (paper) | Meta-SGD\
 (paper) | MAML++ (paper) | ANIL (paper) | ProtoNet (paper, 60-way training) | ProtoNet (paper,\
 train way = test way) |
| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |
| 5 | 1 | 95.00 ± 2.00 (3 seeds) | 90.12 ± 1.23 | 98.7 ± 0.4 | 98.3 ± 0.5 | 99.5 | 99.47 |  |\
 98.8 | 97.4 |
| 20 | 1 | 85.12 ± 1.01 (1 failed) | failed | 95.8 ± 0.3 | 89.4 ± 0.5 | 95.9 | 97.65 | 96.2 ± 0.5\
 | 96.0 | 95.4 |

Cells: test accuracy (%), mean ± 95% CI over one run's test tasks; (N seeds): mean ± standard\
 deviation over the seeds' runs; (N runs): the same over runs that share a seed.
failed: 6: CUDA out of memory
failed: 5: the meta-loss became nan at iteration 3
MAML (paper): Finn, Abbeel & Levine 2017, ICML, Table 1 (arXiv:1703.03400).
first-order MAML (paper): Finn, Abbeel & Levine 2017, ICML, Table 1 (arXiv:1703.03400).
Meta-SGD (paper): Li, Zhou, Chen & Li 2017 (arXiv:1707.09835), rounded to 0.1 points.
MAML++ (paper): Antoniou, Edwards & Storkey 2019, ICLR (arXiv:1810.09502); 5-way 5-shot left out:\
 sources disagree.
ANIL (paper): Raghu, Raghu, Bengio & Vinyals 2020, ICLR (arXiv:1909.09157).
ProtoNet (paper, 60-way training): Snell, Swersky & Zemel 2017, NeurIPS, Table 1\
 (arXiv:1703.05175): training episodes of 60 classes, 5 queries per class, train shot = test\
 shot; 1,000 test episodes, no CI given.
ProtoNet (paper, train way = test way): Snell, Swersky & Zemel 2017, Appendix A, Table 4\
 (arXiv:1703.05175): training episodes of the test way and shot, 15 queries per class; 1,000 test\
 episodes, no CI given.
"""

EXPECTED_CSV = """\
way,shot,method,accuracy,ci95,std,runs,failed,incomplete,dirs,note
5,1,MAML,95.0000,,2.0000,3,0,0,0;1;2,
5,1,first-order MAML,90.1200,1.2300,,1,0,0,3,
5,1,MAML (paper),98.7,0.4,,,,,,"Finn, Abbeel & Levine 2017, ICML, Table 1 (arXiv:1703.03400)"
5,1,first-order MAML (paper),98.3,0.5,,,,,,"Finn, Abbeel & Levine 2017, ICML, Table 1\
 (arXiv:1703.03400)"
5,1,Meta-SGD (paper),99.5,,,,,,,"Li, Zhou, Chen & Li 2017 (arXiv:1707.09835), rounded to 0.1 points"
5,1,MAML++ (paper),99.47,,,,,,,"Antoniou, Edwards & Storkey 2019, ICLR (arXiv:1810.09502); 5-way\
 5-shot left out: sources disagree"
5,1,"ProtoNet (paper, 60-way training)",98.8,,,,,,,"Snell, Swersky & Zemel 2017, NeurIPS, Table 1\
 (arXiv:1703.05175): training episodes of 60 classes, 5 queries per class, train shot = test\
 shot; 1,000 test episodes, no CI given"
5,1,"ProtoNet (paper, train way = test way)",97.4,,,,,,,"Snell, Swersky & Zemel 2017, Appendix A,\
 Table 4 (arXiv:1703.05175): training episodes of the test way and shot, 15 queries per class;\
 1,000 test episodes, no CI given"
20,1,MAML,85.1200,1.0100,,1,1,0,4;6,CUDA out of memory
20,1,first-order MAML,,,,0,1,0,5,the meta-loss became nan at iteration 3
20,1,MAML (paper),95.8,0.3,,,,,,"Finn, Abbeel & Levine 2017, ICML, Table 1 (arXiv:1703.03400)"
20,1,first-order MAML (paper),89.4,0.5,,,,,,"Finn, Abbeel & Levine 2017, ICML, Table 1\
 (arXiv:1703.03400)"
20,1,Meta-SGD (paper),95.9,,,,,,,"Li, Zhou, Chen & Li 2017 (arXiv:1707.09835), rounded to 0.1\
 points"
20,1,MAML++ (paper),97.65,,,,,,,"Antoniou, Edwards & Storkey 2019, ICLR (arXiv:1810.09502); 5-way\
 5-shot left out: sources disagree"
20,1,ANIL (paper),96.2,0.5,,,,,,"Raghu, Raghu, Bengio & Vinyals 2020, ICLR (arXiv:1909.09157)"
20,1,"ProtoNet (paper, 60-way training)",96.0,,,,,,,"Snell, Swersky & Zemel 2017, NeurIPS, Table 1\
 (arXiv:1703.05175): training episodes of 60 classes, 5 queries per class, train shot = test\
 shot; 1,000 test episodes, no CI given"
20,1,"ProtoNet (paper, train way = test way)",95.4,,,,,,,"Snell, Swersky & Zemel 2017, Appendix A,\
 Table 4 (arXiv:1703.05175): training episodes of the test way and shot, 15 queries per class;\
 1,000 test episodes, no CI given"
"""


def test_sweep_report_with_seeds_a_failed_cell_and_paper_figures(tmp_path, capsys):
    sweep = make_sweep(tmp_path)
    assert main(["report", str(sweep), "--paper"]) == 0
    out = capsys.readouterr()
    assert out.out == EXPECTED_MD
    assert (sweep / "report.md").read_text() == EXPECTED_MD
    assert (sweep / "report.csv").read_text() == EXPECTED_CSV
    assert f"wrote {sweep / 'report.md'} and {sweep / 'report.csv'}" in out.err


def test_paper_figures_follow_the_dataset_and_name_the_training_protocol(tmp_path, capsys):
    """miniImageNet runs get Snell et al.'s miniImageNet figures (not Omniglot's), each column
    saying how its episodes were trained; ProtoNet and Proto-MAML runs are labelled as such."""
    runs = tmp_path / "mini"
    for n, (shot, name) in enumerate(((1, "protonet"), (5, "protonet"), (1, "protomaml"))):
        cfg = config(5, shot, 0, algorithm={"name": name}, n=n)
        cfg["dataset"] = {"name": "miniimagenet", "root": f"/data/{n}", "image_size": 84}
        write_run(runs / str(n), cfg, 0.5, 0.01)
    assert main(["report", str(runs), "--paper"]) == 0
    header, _, one, five = capsys.readouterr().out.splitlines()[:4]
    assert header == (
        "| way | shot | Proto-MAML | ProtoNet | MAML (paper) | first-order MAML (paper) "
        "| ProtoNet (paper, 30-/20-way training) | ProtoNet (paper, train way = test way) |"
    )
    # miniImageNet's figures (MAML 48.70, not Omniglot's 98.7)
    assert one == (
        "| 5 | 1 | 50.00 ± 1.00 | 50.00 ± 1.00 | 48.70 ± 1.84 | 48.07 ± 1.75 | 49.42 ± 0.78 |  |"
    )
    assert five == (
        "| 5 | 5 |  | 50.00 ± 1.00 | 63.11 ± 0.92 | 63.15 ± 0.91 | 68.20 ± 0.66 | 65.77 ± 0.70 |"
    )
    assert "98.7" not in (runs / "report.md").read_text()  # no Omniglot figure


def test_several_run_dirs_one_column_per_algorithm_and_out_dir(tmp_path, capsys):
    """Run dirs given one by one; algorithm.name differs (and Meta-SGD's own setting is constant, so
    it does not split its column); update_lr differs too, so it becomes a row setting; an eval.json
    of benchmark=lake is left out of the table, and a plain eval.json takes its settings from its
    checkpoint's run dir."""
    runs = tmp_path / "train"
    write_run(runs / "a", config(5, 1, 0, algorithm={"name": "maml"}, n=0), 0.9, 0.01)
    write_run(
        runs / "b", config(5, 1, 0, algorithm={"name": "metasgd", "lr_init": 0.4}, n=1), 0.92, 0.02
    )
    fast = config(5, 1, 0, algorithm={"name": "maml"}, n=2)
    fast["update_lr"] = 0.1
    write_run(runs / "c", fast, 0.5, 0.05)
    lake = tmp_path / "eval" / "lake"
    lake.mkdir(parents=True)
    (lake / "eval.json").write_text(json.dumps({"benchmark": "lake", "error_rate": 0.2}))
    again = tmp_path / "eval" / "again"
    again.mkdir()
    (again / "eval.json").write_text(
        json.dumps(
            {
                "checkpoint": str(runs / "c" / "checkpoints" / "best.pt"),
                "split": "test",
                "update_step_test": 3,
                "accuracy": 0.52,
                "ci95": 0.04,
                "way": 5,
                "shot": 1,
            }
        )
    )
    out = tmp_path / "tables"
    assert (
        main(
            [
                "report",
                str(runs / "a"),
                str(runs / "b"),
                str(runs / "c"),
                str(lake),
                str(again),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    expected = """\
| way | shot | file | update_lr | MAML | Meta-SGD |
| --- | --- | --- | --- | --- | --- |
| 5 | 1 | eval.json | 0.1 | 52.00 ± 4.00 |  |
| 5 | 1 | results.json | 0.1 | 50.00 ± 5.00 |  |
| 5 | 1 | results.json | 0.4 | 90.00 ± 1.00 | 92.00 ± 2.00 |

Cells: test accuracy (%), mean ± 95% CI over one run's test tasks; (N seeds): mean ± standard\
 deviation over the seeds' runs; (N runs): the same over runs that share a seed.
left out (not a task accuracy): ../eval/lake/eval.json
"""
    assert text == expected and (out / "report.md").read_text() == expected


def test_report_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("metarun: error: no results.json or eval.json under ")
        and err.count("\n") == 1
    )
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert main(["report"]) == 2
    assert capsys.readouterr().err == (
        "metarun: error: the following arguments are required: dirs (usage: metarun "
        "report DIR... [--paper] [--out DIR], metarun report DIR --matrix; metarun report "
        "--help)\n"
    )
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "results.json").write_text(json.dumps({"accuracy": 0.5}))
    assert main(["report", str(tmp_path / "foreign")]) == 2
    assert "has no config and " in capsys.readouterr().err


def test_runs_that_share_a_seed_are_not_called_seeds(tmp_path, capsys):
    """Two runs of one cell with the same seed (a repeat, not a seed study) are labelled runs; two
    seeds, seeds."""
    runs = tmp_path / "train"
    write_run(runs / "a", config(5, 1, 0, n=0), 0.90, 0.01)
    write_run(runs / "b", config(5, 1, 0, n=1), 0.92, 0.01)
    assert main(["report", str(runs)]) == 0
    assert "| 91.00 ± 1.41 (2 runs) |" in capsys.readouterr().out
    write_run(runs / "c", config(5, 1, 1, n=2), 0.94, 0.01)
    shutil.rmtree(runs / "a")
    assert main(["report", str(runs)]) == 0
    assert "| 93.00 ± 1.41 (2 seeds) |" in capsys.readouterr().out


# ---- runs that have no score yet ---------------------------------------------------------------


def write_eval(eval_dir: Path, checkpoint: Path, accuracy: float, ci95: float, **fields) -> None:
    """An eval.json as `metarun eval` writes it (runner/evaluate_checkpoint.py)."""
    eval_dir.mkdir(parents=True)
    record = {
        "checkpoint": str(checkpoint),
        "iteration": 100,
        "split": "test",
        "tasks": 600,
        "update_step_test": 3,
        "accuracy": accuracy,
        "ci95": ci95,
        "way": 5,
        "shot": 1,
        "query": 1,
        "eval_seed": 1234,
        "rotate_eval": False,
        "ensemble": [str(checkpoint)],
        **fields,
    }
    (eval_dir / "eval.json").write_text(json.dumps(record))


def interrupted(run_dir: Path, cfg: dict, iteration: int | None = None) -> None:
    """What a run stopped by a signal leaves: Hydra's .hydra/, the claim marker, maybe last.pt."""
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "config.yaml").write_text(yaml.safe_dump(cfg))
    (run_dir / ".metarun-run").write_text(json.dumps({"pid": 2**22 + 1, "host": "elsewhere"}))
    if iteration is not None:
        (run_dir / "checkpoints").mkdir()
        torch.save({"iteration": iteration}, run_dir / "checkpoints" / "last.pt")


def test_sigterm_cell_of_a_sweep_is_shown_and_counted(tiny_root, tmp_path, capsys):
    """A 3-seed sweep whose third cell was stopped by SIGTERM: the report counts it and says that it
    stopped (it used to read "(2 seeds)" and never mention the cell)."""
    sweep = tmp_path / "sweep"
    args = tiny_args(tiny_root, tmp_path, "iterations=2", "eval_every=2", "threads=1")
    args = [a for a in args if not a.startswith("hydra.run.dir")]
    run_metarun(*args, "-m", "seed=0,1", f"hydra.sweep.dir={sweep}", cwd=tmp_path, check=True)
    cell = sweep / "2"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "metarun.cli",
            *args,
            "seed=2",
            f"hydra.run.dir={cell}",
        ],
        cwd=tmp_path,
        env={k: v for k, v in os.environ.items() if k != "METARUN_DATA"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    # the job's log starts after Hydra's .hydra/config.yaml is whole (a SIGTERM as soon as that
    # file appeared could cut Hydra's write short: a config the report reads half)
    while not (cell / "metarun-train.log").is_file() and time.time() < deadline:
        time.sleep(0.05)
    # during its setup: it stops after its first iteration at the latest
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) in (128 + signal.SIGTERM, -signal.SIGTERM)
    assert not (cell / "results.json").exists()

    assert main(["report", str(sweep)]) == 0
    text = capsys.readouterr().out
    assert "| 3 | 1 | 93.06 ± 1.96 (2 seeds, 1 incomplete) |" in text
    note = [line for line in text.splitlines() if line.startswith("incomplete: 2: ")]
    assert len(note) == 1 and "no results.json" in note[0] and "stopped" in note[0], text
    rows = list(csv.DictReader(io.StringIO((sweep / "report.csv").read_text())))
    assert [(r["runs"], r["failed"], r["incomplete"]) for r in rows] == [("2", "0", "1")]
    assert rows[0]["dirs"] == "0;1;2" and "no results.json" in rows[0]["note"]


def test_incomplete_runs_of_every_kind(tmp_path, capsys):
    """Stopped at a checkpoint, stopped before one, a results.json without a test accuracy, a run
    dir with no settings, an eval that stopped: each counted; a cell with no score says so."""
    runs = tmp_path / "runs"
    write_run(runs / "done", config(5, 1, 0, n=0), 0.90, 0.01)
    interrupted(runs / "stopped", config(5, 1, 1, n=1), iteration=7)
    interrupted(runs / "early", config(5, 1, 2, n=2))
    write_run(runs / "failed", config(20, 1, 0, n=3), reason="CUDA out of memory")
    write_run(runs / "pending", config(20, 1, 1, n=4), 0.5, 0.1)
    record = json.loads((runs / "pending" / "results.json").read_text())
    del record["test_accuracy"]
    record["status"] = "running"
    (runs / "pending" / "results.json").write_text(json.dumps(record))
    (runs / "bare").mkdir()
    (runs / "bare" / ".metarun-run").write_text("{}")
    # an eval's checkpoint path is relative to where it was started (Hydra's runtime.cwd)
    interrupted(runs / "eval", {"checkpoint": "done/checkpoints/best.pt"})
    hydra = {"hydra": {"runtime": {"cwd": str(runs)}}}
    (runs / "eval" / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(hydra))
    # a sweep dir (multirun.yaml beside its own marker) is not a run
    (runs / "multirun.yaml").write_text("{}")
    (runs / ".metarun-run").write_text("{}")
    assert main(["report", str(runs)]) == 0
    text = capsys.readouterr().out
    assert "| 5 | 1 | results.json | 90.00 ± 1.00 (2 incomplete) |" in text
    assert "| 20 | 1 | results.json | 1 failed, 1 incomplete |" in text
    assert "| 5 | 1 | eval.json | incomplete |" in text
    assert (
        "incomplete: stopped: no results.json (stopped at iteration 7 of 100); metarun train "
        f"resume={runs / 'stopped'} continues it" in text
    )
    assert "incomplete: early: no results.json and no checkpoint (stopped before its first" in text
    assert (
        'incomplete: pending: its results.json has no test_accuracy ("status": "running")' in text
    )
    assert "incomplete: eval: no eval.json (the eval stopped before writing it)" in text
    assert (
        "incomplete: bare: no results.json and no .hydra/config.yaml (its settings are unknown: "
        "not in the table)" in text
    )
    assert "incomplete: .:" not in text  # the sweep dir itself
    # a run whose process still holds its claim is running, not stopped
    owner = {"pid": os.getpid(), "host": socket.gethostname()}
    (runs / "stopped" / ".metarun-run").write_text(json.dumps(owner))
    assert main(["report", str(runs)]) == 0
    assert "no results.json (still running at iteration 7 of 100)" in capsys.readouterr().out


def test_only_incomplete_runs_still_make_a_report(tmp_path, capsys):
    interrupted(tmp_path / "sweep" / "0", config(5, 1, 0), iteration=3)
    assert main(["report", str(tmp_path / "sweep")]) == 0
    out = capsys.readouterr().out
    assert "| 5 | 1 | incomplete |" in out and "iteration 3 of 100" in out


# ---- evals: one row per protocol, one run per checkpoint ---------------------------------------


def table_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("|")]


def test_evals_of_one_checkpoint_under_four_protocols(tiny_root, tmp_path, capsys):
    """plain, ensemble=3, rotate_eval=true and eval_seed=7 evals of one checkpoint: three protocols
    in three rows (labelled with the eval's rotate_eval: the run trained without rotated tasks), and
    the two plain samples pooled as one run (it used to be one cell "(4 runs)")."""
    run = tmp_path / "run"
    extra = ("iterations=6", "eval_every=2", "keep_best=3", "threads=1")
    run_metarun(*tiny_args(tiny_root, run, *extra), cwd=tmp_path, check=True)
    protocols = {
        "plain": [],
        "ens": ["ensemble=3"],
        "rot": ["rotate_eval=true"],
        "s7": ["eval_seed=7"],
    }
    for name, settings in protocols.items():
        out = tmp_path / "evals" / name
        args = ("eval", f"checkpoint={run}", "tasks=6", *settings, f"hydra.run.dir={out}")
        run_metarun(*args, cwd=tmp_path, check=True)
    evals = {n: json.loads((tmp_path / "evals" / n / "eval.json").read_text()) for n in protocols}
    assert main(["report", str(tmp_path / "evals")]) == 0
    lines = table_lines(capsys.readouterr().out)
    assert lines[0] == "| way | shot | dataset.rotate_eval | ensemble | MAML |"
    mean, ci, tasks = pool(
        [
            Result(Path(), {}, e["accuracy"], e["ci95"], tasks=6, eval_seed=e["eval_seed"])
            for e in (evals["plain"], evals["s7"])
        ]
    )
    assert tasks == 12
    assert lines[2:] == [
        f"| 3 | 1 | False | 1 | {100 * mean:.2f} ± {100 * ci:.2f} (2 evals of one run) |",
        f"| 3 | 1 | False | 3 | {100 * evals['ens']['accuracy']:.2f} ± "
        f"{100 * evals['ens']['ci95']:.2f} |",
        f"| 3 | 1 | True | 1 | {100 * evals['rot']['accuracy']:.2f} ± "
        f"{100 * evals['rot']['ci95']:.2f} |",
    ]


def test_pooled_evals_equal_one_eval_over_all_their_tasks():
    """Pooling two evals (different eval_seeds) gives exactly the mean and CI of their tasks
    together; a smaller eval with the same eval_seed is a prefix of the larger: it adds nothing."""
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 6, (600,), generator=g).double() / 5
    b = torch.randint(0, 6, (250,), generator=g).double() / 5
    evals = [
        Result(Path(), {}, *accuracy_with_ci(a), tasks=600, eval_seed=1234),
        Result(Path(), {}, *accuracy_with_ci(b), tasks=250, eval_seed=7),
        Result(Path(), {}, *accuracy_with_ci(a[:100]), tasks=100, eval_seed=1234),
    ]
    mean, ci, tasks = pool(evals)
    expected = accuracy_with_ci(torch.cat([a, b]))
    assert tasks == 850 and math.isclose(mean, expected[0]) and math.isclose(ci, expected[1])
    assert pool(evals[:1] + evals[2:]) == (evals[0].accuracy, evals[0].ci95, 600)


def test_every_eval_protocol_setting_separates_rows(tmp_path, capsys):
    """split, update_step_test (each point of a `steps` curve) and the checkpoint each make a row;
    evals of two seeds' runs under one protocol are two seeds, however many evals each has."""
    runs = tmp_path / "train"
    write_run(runs / "s0", config(5, 1, 0, n=0), 0.90, 0.01)
    write_run(runs / "s1", config(5, 1, 1, n=1), 0.94, 0.01)
    best0, best1 = (runs / s / "checkpoints" / "best.pt" for s in ("s0", "s1"))
    evals = tmp_path / "evals"
    curve = [{"steps": s, "accuracy": 0.2 + 0.2 * s, "ci95": 0.01} for s in (0, 1, 3)]
    write_eval(evals / "curve", best0, 0.80, 0.01, curve=curve)
    write_eval(evals / "val", best0, 0.70, 0.02, split="val")
    write_eval(evals / "last", best0.with_name("last.pt"), 0.60, 0.02)
    for seed in (1234, 7):
        write_eval(evals / f"s1_{seed}", best1, 0.84, 0.01, eval_seed=seed)
    assert main(["report", str(evals)]) == 0
    lines = table_lines(capsys.readouterr().out)
    assert lines[0] == "| way | shot | checkpoint | split | update_step_test | MAML |"
    assert lines[2:] == [
        "| 5 | 1 | best.pt | test | 0 | 20.00 ± 1.00 |",
        "| 5 | 1 | best.pt | test | 1 | 40.00 ± 1.00 |",
        "| 5 | 1 | best.pt | test | 3 | 82.00 ± 2.83 (2 seeds, 3 evals) |",
        "| 5 | 1 | best.pt | val | 3 | 70.00 ± 2.00 |",
        "| 5 | 1 | last.pt | test | 3 | 60.00 ± 2.00 |",
    ]


def test_rotated_row_is_labelled_with_the_evals_own_setting(tmp_path, capsys):
    """A run trained with rotate_eval=true, evaluated with rotate_eval=false: its row says False."""
    cfg = config(5, 1, 0)
    cfg["dataset"]["rotate_eval"] = True
    write_run(tmp_path / "train" / "r", cfg, 0.90, 0.01)
    best = tmp_path / "train" / "r" / "checkpoints" / "best.pt"
    write_eval(tmp_path / "evals" / "e", best, 0.80, 0.01, rotate_eval=False)
    assert main(["report", str(tmp_path)]) == 0
    lines = table_lines(capsys.readouterr().out)
    assert lines[0] == "| way | shot | dataset.rotate_eval | file | MAML |"
    assert lines[2:] == [
        "| 5 | 1 | False | eval.json | 80.00 ± 1.00 |",
        "| 5 | 1 | True | results.json | 90.00 ± 1.00 |",
    ]


# ---- --paper only beside runs on the papers' protocol ------------------------------------------


def lake(cfg: dict) -> dict:
    cfg["dataset"]["split"] = "lake"
    return cfg


def test_paper_figures_never_sit_beside_another_protocol(tmp_path, capsys):
    """split=lake runs get no split=maml figures beside them, and the report says why."""
    runs = tmp_path / "lake"
    write_run(runs / "a", lake(config(5, 1, 0, n=0)), 0.95, 0.01)
    write_run(runs / "b", lake(config(20, 1, 0, n=1)), 0.85, 0.01)
    assert main(["report", str(runs), "--paper"]) == 0
    text = capsys.readouterr().out
    assert table_lines(text)[0] == "| way | shot | MAML |" and "(paper)" not in text
    assert (
        "--paper: no published figure is shown: the runs differ from the papers' protocol "
        "(dataset.name=omniglot, dataset.split=maml, dataset.image_size=28, split=test) in "
        "dataset.split=lake." in text
    )
    assert "paper" not in (runs / "report.csv").read_text().split("\n", 1)[1]


def test_paper_columns_blank_in_rows_of_another_protocol(tmp_path, capsys):
    """Beside a split=maml run, a split=lake run and a validation-split eval: the split is shown;
    only the split=maml test row has the papers' figures."""
    write_run(tmp_path / "maml", config(5, 1, 0, n=0), 0.95, 0.01)
    write_run(tmp_path / "lake", lake(config(5, 1, 0, n=1)), 0.93, 0.01)
    assert main(["report", str(tmp_path), "--paper"]) == 0
    lines = table_lines(capsys.readouterr().out)
    assert lines[0].startswith("| way | shot | dataset.split | MAML | MAML (paper) |")
    assert lines[2].startswith("| 5 | 1 | lake | 93.00 ± 1.00 |  |  |")
    assert lines[3].startswith("| 5 | 1 | maml | 95.00 ± 1.00 | 98.7 ± 0.4 | 98.3 ± 0.5 |")
    text = (tmp_path / "report.md").read_text()
    assert "(paper) columns are blank in rows that differ from the papers' protocol" in text
    assert text.rstrip().count("dataset.split=lake") == 1

    evals = tmp_path / "evals"
    best = tmp_path / "maml" / "checkpoints" / "best.pt"
    write_eval(evals / "val", best, 0.97, 0.01, split="val")
    write_eval(evals / "test", best, 0.96, 0.01)
    assert main(["report", str(evals), "--paper"]) == 0
    lines = table_lines(capsys.readouterr().out)
    assert lines[2].startswith("| 5 | 1 | test | 96.00 ± 1.00 | 98.7 ± 0.4 |")
    assert lines[3].startswith("| 5 | 1 | val | 97.00 ± 1.00 |  |")


def table_rows(text: str) -> list[dict]:
    """The Markdown table of a report as {column: cell} per row."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [
        dict(zip(header, (c.strip() for c in line.strip("|").split("|")), strict=True))
        for line in lines[2:]
    ]


def reptile(way: int, transductive: bool, n: int, dataset: str = "omniglot") -> dict:
    cfg = config(way, 1, 0, algorithm={"name": "reptile", "transductive": transductive}, n=n)
    if dataset == "miniimagenet":  # the papers' miniImageNet protocol: 84x84 images, no split
        cfg["dataset"] = {"name": dataset, "root": f"/data/{n}", "image_size": 84}
    return cfg


def test_reptile_paper_figure_matches_each_rows_transduction(tmp_path, capsys):
    """Nichol et al. report Reptile with and without transduction: a row shows the figure of its own
    runs' protocol (algorithm.transductive), never the other one."""
    runs = tmp_path / "runs"
    write_run(runs / "a", reptile(5, False, 0), 0.9, 0.01)
    write_run(runs / "b", reptile(20, True, 1), 0.8, 0.01)
    assert main(["report", str(runs), "--paper"]) == 0
    out = capsys.readouterr().out
    rows = {r["way"]: r for r in table_rows(out)}
    assert rows["5"]["Reptile (paper)"] == "95.39 ± 0.09"
    assert rows["5"]["Reptile + transduction (paper)"] == ""
    assert rows["20"]["Reptile (paper)"] == ""
    assert rows["20"]["Reptile + transduction (paper)"] == "89.43 ± 0.14"
    assert "Table 2, Reptile + Transduction" in out and "arXiv:1803.02999v3" in out
    # only non-transductive runs: no transductive column at all
    only = tmp_path / "only"
    write_run(only / "a", reptile(5, False, 0), 0.9, 0.01)
    main(["report", str(only), "--paper"])
    header = table_rows(capsys.readouterr().out)[0]
    assert "Reptile (paper)" in header and "Reptile + transduction (paper)" not in header


def test_miniimagenet_paper_figures(tmp_path, capsys):
    runs = tmp_path / "runs"
    write_run(runs / "a", reptile(5, False, 0, "miniimagenet"), 0.45, 0.01)
    maml = config(5, 1, 0, n=1)
    maml["dataset"] = {"name": "miniimagenet", "root": "/data/1", "image_size": 84}
    write_run(runs / "b", maml, 0.4, 0.02)
    assert main(["report", str(runs), "--paper"]) == 0
    (row,) = table_rows(capsys.readouterr().out)
    assert row["MAML (paper)"] == "48.70 ± 1.84" and row["Reptile (paper)"] == "47.07 ± 0.26"
    assert "Reptile + transduction (paper)" not in row
