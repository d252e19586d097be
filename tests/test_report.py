"""`metarun report`: the table of hand-written result files (exact Markdown and CSV)."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from metarun.cli import main


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
    """A 2x2 sweep (way 5/20 x first_order) in Hydra's layout: 5-way 1-shot MAML with three seeds, a failed
    20-way first-order cell whose results.json has no config (read from .hydra/config.yaml), and a 20-way MAML
    cell with one seed done and one failed."""
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
 (paper) | MAML++ (paper) | Reptile (paper) | ANIL (paper) | ProtoNet (paper, 60-way training) |\
 ProtoNet (paper, train way = test way) |
| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |
| 5 | 1 | 95.00 ± 2.00 (3 seeds) | 90.12 ± 1.23 | 98.7 ± 0.4 | 98.3 ± 0.5 | 99.5 | 99.47 | 97.68\
 ± 0.04 |  | 98.8 | 97.4 |
| 20 | 1 | 85.12 ± 1.01 (1 failed) | failed | 95.8 ± 0.3 | 89.4 ± 0.5 | 95.9 | 97.65 | 89.43 ±\
 0.14 | 96.2 ± 0.5 | 96.0 | 95.4 |

Cells: test accuracy (%), mean ± 95% CI over one run's test tasks; (N seeds): mean ± standard deviation over the seeds' runs; (N runs): the same over runs that share a seed.
failed: 6: CUDA out of memory
failed: 5: the meta-loss became nan at iteration 3
MAML (paper): Finn, Abbeel & Levine 2017, ICML, Table 1 (arXiv:1703.03400).
first-order MAML (paper): Finn, Abbeel & Levine 2017, ICML, Table 1 (arXiv:1703.03400).
Meta-SGD (paper): Li, Zhou, Chen & Li 2017 (arXiv:1707.09835), rounded to 0.1 points.
MAML++ (paper): Antoniou, Edwards & Storkey 2019, ICLR (arXiv:1810.09502); 5-way 5-shot left out: sources disagree.
Reptile (paper): Nichol, Achiam & Schulman 2018 (arXiv:1803.02999), with transduction as MAML's.
ANIL (paper): Raghu, Raghu, Bengio & Vinyals 2020, ICLR (arXiv:1909.09157).
ProtoNet (paper, 60-way training): Snell, Swersky & Zemel 2017, NeurIPS, Table 1\
 (arXiv:1703.05175): training episodes of 60 classes, 5 queries per class, train shot = test\
 shot; 1,000 test episodes, no CI given.
ProtoNet (paper, train way = test way): Snell, Swersky & Zemel 2017, Appendix A, Table 4\
 (arXiv:1703.05175): training episodes of the test way and shot, 15 queries per class; 1,000 test\
 episodes, no CI given.
"""

EXPECTED_CSV = """\
way,shot,method,accuracy,ci95,std,runs,failed,dirs,note
5,1,MAML,95.0000,,2.0000,3,0,0;1;2,
5,1,first-order MAML,90.1200,1.2300,,1,0,3,
5,1,MAML (paper),98.7,0.4,,,,,"Finn, Abbeel & Levine 2017, ICML, Table 1 (arXiv:1703.03400)"
5,1,first-order MAML (paper),98.3,0.5,,,,,"Finn, Abbeel & Levine 2017, ICML, Table 1 (arXiv:1703.03400)"
5,1,Meta-SGD (paper),99.5,,,,,,"Li, Zhou, Chen & Li 2017 (arXiv:1707.09835), rounded to 0.1 points"
5,1,MAML++ (paper),99.47,,,,,,"Antoniou, Edwards & Storkey 2019, ICLR (arXiv:1810.09502); 5-way 5-shot left out: sources disagree"
5,1,Reptile (paper),97.68,0.04,,,,,"Nichol, Achiam & Schulman 2018 (arXiv:1803.02999), with transduction as MAML's"
5,1,"ProtoNet (paper, 60-way training)",98.8,,,,,,"Snell, Swersky & Zemel 2017, NeurIPS, Table 1\
 (arXiv:1703.05175): training episodes of 60 classes, 5 queries per class, train shot = test\
 shot; 1,000 test episodes, no CI given"
5,1,"ProtoNet (paper, train way = test way)",97.4,,,,,,"Snell, Swersky & Zemel 2017, Appendix A,\
 Table 4 (arXiv:1703.05175): training episodes of the test way and shot, 15 queries per class;\
 1,000 test episodes, no CI given"
20,1,MAML,85.1200,1.0100,,1,1,4;6,CUDA out of memory
20,1,first-order MAML,,,,0,1,5,the meta-loss became nan at iteration 3
20,1,MAML (paper),95.8,0.3,,,,,"Finn, Abbeel & Levine 2017, ICML, Table 1 (arXiv:1703.03400)"
20,1,first-order MAML (paper),89.4,0.5,,,,,"Finn, Abbeel & Levine 2017, ICML, Table 1 (arXiv:1703.03400)"
20,1,Meta-SGD (paper),95.9,,,,,,"Li, Zhou, Chen & Li 2017 (arXiv:1707.09835), rounded to 0.1 points"
20,1,MAML++ (paper),97.65,,,,,,"Antoniou, Edwards & Storkey 2019, ICLR (arXiv:1810.09502); 5-way 5-shot left out: sources disagree"
20,1,Reptile (paper),89.43,0.14,,,,,"Nichol, Achiam & Schulman 2018 (arXiv:1803.02999), with transduction as MAML's"
20,1,ANIL (paper),96.2,0.5,,,,,"Raghu, Raghu, Bengio & Vinyals 2020, ICLR (arXiv:1909.09157)"
20,1,"ProtoNet (paper, 60-way training)",96.0,,,,,,"Snell, Swersky & Zemel 2017, NeurIPS, Table 1\
 (arXiv:1703.05175): training episodes of 60 classes, 5 queries per class, train shot = test\
 shot; 1,000 test episodes, no CI given"
20,1,"ProtoNet (paper, train way = test way)",95.4,,,,,,"Snell, Swersky & Zemel 2017, Appendix A,\
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
        "| way | shot | Proto-MAML | ProtoNet | ProtoNet (paper, 30-/20-way training) "
        "| ProtoNet (paper, train way = test way) |"
    )
    assert one == "| 5 | 1 | 50.00 ± 1.00 | 50.00 ± 1.00 | 49.42 ± 0.78 |  |"
    assert five == "| 5 | 5 |  | 50.00 ± 1.00 | 68.20 ± 0.66 | 65.77 ± 0.70 |"
    assert "MAML (paper)" not in (runs / "report.md").read_text()  # no Omniglot figure


def test_several_run_dirs_one_column_per_algorithm_and_out_dir(tmp_path, capsys):
    """Run dirs given one by one; algorithm.name differs (and Meta-SGD's own setting is constant, so it does not
    split its column); update_lr differs too, so it becomes a row setting; an eval.json of benchmark=lake is
    left out of the table, and a plain eval.json takes its settings from its checkpoint's run dir."""
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

Cells: test accuracy (%), mean ± 95% CI over one run's test tasks; (N seeds): mean ± standard deviation over the seeds' runs; (N runs): the same over runs that share a seed.
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
        "report DIR... [--paper] [--out DIR]; metarun report --help)\n"
    )
    (tmp_path / "running").mkdir()
    (tmp_path / "running" / "results.json").write_text(json.dumps({"config": config(5, 1, 0)}))
    assert main(["report", str(tmp_path / "running")]) == 2
    assert 'has no test_accuracy and no "status": "failed"' in capsys.readouterr().err


def test_runs_that_share_a_seed_are_not_called_seeds(tmp_path, capsys):
    """Two runs of one cell with the same seed (a repeat, not a seed study) are labelled runs; two seeds, seeds."""
    runs = tmp_path / "train"
    write_run(runs / "a", config(5, 1, 0, n=0), 0.90, 0.01)
    write_run(runs / "b", config(5, 1, 0, n=1), 0.92, 0.01)
    assert main(["report", str(runs)]) == 0
    assert "| 91.00 ± 1.41 (2 runs) |" in capsys.readouterr().out
    write_run(runs / "c", config(5, 1, 1, n=2), 0.94, 0.01)
    (runs / "a" / "results.json").unlink()
    assert main(["report", str(runs)]) == 0
    assert "| 93.00 ± 1.41 (2 seeds) |" in capsys.readouterr().out
