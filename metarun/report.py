"""`metarun report DIR... [--out DIR] [--paper]`: one table of the results of a sweep or of runs.

Reads every `results.json` (`metarun train`) and `eval.json` (`metarun eval`) in the given run dirs
or below the given sweep dirs, and lays them out like Table 1 of Finn et al. (2017): one row per
combination of the settings that differ between the runs (always way and shot first), one column per
algorithm (algorithm.name, first_order, and any algorithm.* setting that differs within one
algorithm).

Every setting that changes how a score was measured separates rows: `file` (results.json or
eval.json), and of an eval its split, update_step_test (each of `steps=0,1,3` is a row of its own),
rotate_eval (the eval's own, not the training run's), ensemble and checkpoint (best.pt, last.pt,
top/...); benchmark=lake evals are left out (error rates, not task accuracies). A cell is "mean ±
95% CI" (%) of one run's test accuracy; several seeds of one cell are "mean ± std (N seeds)" over
the seeds (sample std). Several evals of one checkpoint in one cell (another eval_seed or task
count: another sample of the same run) are pooled into that run's figure, never counted as runs or
seeds ("(N evals of one run)").

A run dir without results.json (a run stopped by a signal, or still running) or with one that has no
test accuracy is an incomplete run: counted in its cell ("(2 seeds, 1 incomplete)", or "incomplete")
and listed under the table with how far it got. A cell whose runs all failed ("status": "failed")
reads "failed" and its reason is listed under the table. `--paper` adds the published Omniglot or
miniImageNet figures (PAPER) as extra columns, each with its source, in the rows on the papers'
protocol (PAPER_PROTOCOL); a figure measured under one protocol of an algorithm (Reptile's with and
without transduction) shows only beside runs of that protocol. The table is printed and written as
report.md and report.csv (one line per cell, numbers in %).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import shlex
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path

from metarun import settings
from metarun.errors import MetarunError
from metarun.runner.files import RunFiles
from metarun.tasks import CLASSIFICATION, TaskFamily, family_of, family_of_metric

# Settings that never make two runs different experiments: the seed (aggregated over), where and how
# fast it ran (metarun/settings.py: the settings not shown in reports).
IGNORED = settings.ignored()
ALGORITHM_NAMES = {
    "maml": "MAML",
    "metasgd": "Meta-SGD",
    "mamlpp": "MAML++",
    "anil": "ANIL",
    "reptile": "Reptile",
    "protonet": "ProtoNet",
    "protomaml": "Proto-MAML",
}

# Published Omniglot test accuracies (%), as printed in each paper, by (way, shot). A figure that
# could not be confirmed from a second source is left out rather than guessed. An optional fourth
# item is the protocol the figure was measured with: settings a run must have for the figure to
# stand beside it.
REPTILE = "Nichol, Achiam & Schulman 2018 (arXiv:1803.02999v3)"
NON_TRANSDUCTIVE = {"algorithm.name": "reptile", "algorithm.transductive": False}
TRANSDUCTIVE = {"algorithm.name": "reptile", "algorithm.transductive": True}
PAPER_OMNIGLOT = [
    (
        "MAML (paper)",
        "Finn, Abbeel & Levine 2017, ICML, Table 1 (arXiv:1703.03400)",
        {(5, 1): "98.7 ± 0.4", (5, 5): "99.9 ± 0.1", (20, 1): "95.8 ± 0.3", (20, 5): "98.9 ± 0.2"},
    ),
    (
        "first-order MAML (paper)",
        "Finn, Abbeel & Levine 2017, ICML, Table 1 (arXiv:1703.03400)",
        {(5, 1): "98.3 ± 0.5", (5, 5): "99.2 ± 0.2", (20, 1): "89.4 ± 0.5", (20, 5): "97.9 ± 0.1"},
    ),
    (
        "Meta-SGD (paper)",
        "Li, Zhou, Chen & Li 2017 (arXiv:1707.09835), rounded to 0.1 points",
        {(5, 1): "99.5", (5, 5): "99.9", (20, 1): "95.9", (20, 5): "99.0"},
    ),
    (
        "MAML++ (paper)",
        "Antoniou, Edwards & Storkey 2019, ICLR (arXiv:1810.09502); 5-way 5-shot left out: "
        "sources disagree",
        {(5, 1): "99.47", (20, 1): "97.65", (20, 5): "99.33"},
    ),
    (
        "Reptile (paper)",
        f"{REPTILE}, Table 2, Reptile: each query image classified alone (beside Reptile runs with "
        "algorithm.transductive=false only)",
        {
            (5, 1): "95.39 ± 0.09",
            (5, 5): "98.90 ± 0.10",
            (20, 1): "88.14 ± 0.15",
            (20, 5): "96.65 ± 0.33",
        },
        NON_TRANSDUCTIVE,
    ),
    (
        "Reptile + transduction (paper)",
        f"{REPTILE}, Table 2, Reptile + Transduction: the query set in one batch, as MAML's "
        "(beside Reptile runs with algorithm.transductive=true only)",
        {
            (5, 1): "97.68 ± 0.04",
            (5, 5): "99.48 ± 0.06",
            (20, 1): "89.43 ± 0.14",
            (20, 5): "97.12 ± 0.32",
        },
        TRANSDUCTIVE,
    ),
    (
        "ANIL (paper)",
        "Raghu, Raghu, Bengio & Vinyals 2020, ICLR (arXiv:1909.09157)",
        {(20, 1): "96.2 ± 0.5", (20, 5): "98.0 ± 0.3"},
    ),
    # Snell et al.'s headline rows train on more classes than they test on (experiment=protonet_*)
    (
        "ProtoNet (paper, 60-way training)",
        "Snell, Swersky & Zemel 2017, NeurIPS, Table 1 (arXiv:1703.05175): training episodes of 60 "
        "classes, 5 queries per class, train shot = test shot; 1,000 test episodes, no CI given",
        {(5, 1): "98.8", (5, 5): "99.7", (20, 1): "96.0", (20, 5): "98.9"},
    ),
    (
        "ProtoNet (paper, train way = test way)",
        "Snell, Swersky & Zemel 2017, Appendix A, Table 4 (arXiv:1703.05175): training episodes of "
        "the test way and shot, 15 queries per class; 1,000 test episodes, no CI given",
        {(5, 1): "97.4", (5, 5): "99.3", (20, 1): "95.4", (20, 5): "98.7"},
    ),
]
# Published miniImageNet 5-way test accuracies (%).
PAPER_MINIIMAGENET = [
    (
        "MAML (paper)",
        "Finn, Abbeel & Levine 2017, ICML, Table 1 (arXiv:1703.03400)",
        {(5, 1): "48.70 ± 1.84", (5, 5): "63.11 ± 0.92"},
    ),
    (
        "first-order MAML (paper)",
        "Finn, Abbeel & Levine 2017, ICML, Table 1 (arXiv:1703.03400)",
        {(5, 1): "48.07 ± 1.75", (5, 5): "63.15 ± 0.91"},
    ),
    (
        "Reptile (paper)",
        f"{REPTILE}, Table 1, Reptile (beside algorithm.transductive=false runs)",
        {(5, 1): "47.07 ± 0.26", (5, 5): "62.74 ± 0.37"},
        NON_TRANSDUCTIVE,
    ),
    (
        "Reptile + transduction (paper)",
        f"{REPTILE}, Table 1, Reptile + Transduction (beside algorithm.transductive=true runs)",
        {(5, 1): "49.97 ± 0.32", (5, 5): "65.99 ± 0.58"},
        TRANSDUCTIVE,
    ),
    (
        "ProtoNet (paper, 30-/20-way training)",
        "Snell, Swersky & Zemel 2017, NeurIPS, Table 2 (arXiv:1703.05175): training episodes of 30 "
        "classes (1-shot) or 20 (5-shot), 15 queries per class; 600 test episodes",
        {(5, 1): "49.42 ± 0.78", (5, 5): "68.20 ± 0.66"},
    ),
    (
        "ProtoNet (paper, train way = test way)",
        "Snell, Swersky & Zemel 2017, Appendix B, Tables 5-6 (arXiv:1703.05175): 5-way training "
        "episodes, 15 queries per class; 1-shot left out: the two tables disagree (46.61, 46.14)",
        {(5, 5): "65.77 ± 0.70"},
    ),
]
PAPER = {"omniglot": PAPER_OMNIGLOT, "miniimagenet": PAPER_MINIIMAGENET}


# The pseudo-setting of a result's metric (accuracy, mse: metarun/tasks.py), a row key when a table
# holds anything but accuracies.
METRIC = "metric"


def _row_text(key: str, value) -> str:
    """A row's value as the table shows it; the metric says which way is better."""
    if key == METRIC:
        family = family_of_metric(value)
        return f"{family.label} ({'higher' if family.higher_is_better else 'lower'} is better)"
    return "" if value is None else str(value)


# Which test tasks were drawn: another sample of the same run, never another experiment.
SAMPLE_KEYS = {"eval_seed"}
# What every published figure of a dataset (PAPER) shares: a row that differs in any of these gets
# no paper figure beside it. A setting an older run's config lacks counts as the papers'.
PAPER_PROTOCOL = {
    "omniglot": {
        "dataset.name": "omniglot",
        "dataset.split": "maml",
        "dataset.image_size": 28,
        "split": "test",
    },
    "miniimagenet": {"dataset.name": "miniimagenet", "dataset.image_size": 84, "split": "test"},
}


@dataclass
class Result:
    """One score (or failure, or an unfinished run), with its settings flattened to dotted keys.

    `sample` is what was scored: (the training run, its checkpoint, the iteration), the run being a
    results.json's dir or an eval.json's checkpoint's run. Results of one sample in one cell are
    evaluations of one model: pooled into one figure, never counted as independent runs."""

    where: Path
    settings: dict
    accuracy: float | None = None  # fraction correct
    ci95: float | None = None  # half-width, fraction
    failed: str | None = None  # the reason, when the run failed
    incomplete: str | None = None  # why it has no score yet (stopped or still running)
    tasks: int | None = None  # test tasks scored
    eval_seed: int | None = None  # seed of those tasks
    sample: tuple = ()


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)
    csv_rows: list[list[str]] = field(default_factory=list)


@dataclass
class Cell:
    """One table cell: the text shown and its CSV fields (numbers in %)."""

    text: str
    mean: str = ""
    ci: str = ""
    std: str = ""
    runs: int = 0
    pooled: bool = False  # some run's figure pools several of its evals


def _flatten(config: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, f"{name}."))
        else:
            out[name] = str(value) if isinstance(value, list) else value
    return out


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise MetarunError(
            f"{path} is not readable JSON ({exc}): delete it or leave its run dir out of the "
            "report."
        ) from None
    if not isinstance(data, dict):
        raise MetarunError(
            f"{path} is not a metarun results file: leave its run dir out of the report."
        )
    return data


def _run_config(run_dir: Path) -> dict | None:
    """A run's resolved settings: results.json's config, else Hydra's .hydra/config.yaml."""
    results = RunFiles(run_dir).results
    if results.is_file():
        config = _read_json(results).get("config")
        if isinstance(config, dict):
            return config
    hydra = RunFiles(run_dir).hydra / "config.yaml"
    if hydra.is_file():
        from omegaconf import OmegaConf

        loaded = OmegaConf.load(hydra)
        try:  # interpolations such as model.in_channels: ${dataset.channels} to their values
            return OmegaConf.to_container(loaded, resolve=True)
        except (
            Exception
        ):  # one that cannot resolve here (an unset environment variable): as written
            return OmegaConf.to_container(loaded, resolve=False)
    return None


def _is_eval_config(config: dict) -> bool:
    """Whether a run dir's config is `metarun eval`'s (it names a checkpoint), not train's."""
    return "checkpoint" in config and "iterations" not in config


def _checkpoint_file(value) -> Path:
    """The checkpoint an eval scored: a .pt path, or a run dir's best.pt (else last.pt), as eval
    resolves it."""
    path = Path(str(value or "")).expanduser()
    if path.is_dir():
        best = path / RunFiles.CHECKPOINTS / RunFiles.BEST
        return (
            best
            if best.is_file() or not (path / RunFiles.CHECKPOINTS / RunFiles.LAST).is_file()
            else best.with_name(RunFiles.LAST)
        )
    return path


def _checkpoint_run(ckpt: Path) -> Path:
    """The run dir of a checkpoint (<run>/checkpoints/X.pt, <run>/checkpoints/top/X.pt), else the
    file itself."""
    if ckpt.parent.name == "top" and ckpt.parent.parent.name == RunFiles.CHECKPOINTS:
        return ckpt.parent.parent.parent
    return ckpt.parent.parent if ckpt.parent.name == RunFiles.CHECKPOINTS else ckpt


def _checkpoint_name(ckpt: Path) -> str:
    """best.pt, last.pt, top/iteration-N.pt: which of its run's checkpoints was scored."""
    return f"top/{ckpt.name}" if ckpt.parent.name == "top" else ckpt.name


def _train_settings(config: dict) -> dict:
    """A training run's settings as the table keys them: its test is of best.pt on `test` tasks."""
    settings = _flatten(config)
    settings.update(
        {
            "split": "test",
            "file": RunFiles.RESULTS,
            "checkpoint": RunFiles.BEST,
            "ensemble": 1,
            "dataset.rotate_eval": bool(settings.get("dataset.rotate_eval") or False),
        }
    )
    settings[METRIC] = _family(settings).metric
    return settings


def _eval_settings(record: dict) -> tuple[dict, Path]:
    """An eval's settings (from eval.json or from an eval's own config) and the run it measured: its
    checkpoint's run config, overridden by every eval setting that changes the protocol."""
    ckpt = _checkpoint_file(record.get("checkpoint"))
    run = _checkpoint_run(ckpt)
    config = _run_config(run) if run.is_dir() else None
    if config:
        settings = _flatten(config)
    else:  # the run dir is gone: what eval.json itself says
        settings = {k: record[k] for k in ("way", "shot", "query") if k in record}
    ensemble = record.get("ensemble")
    rotate = record.get("rotate_eval")
    steps = record.get("update_step_test")
    settings.update(
        {
            "split": record.get("split") or "test",
            "file": RunFiles.EVAL,
            "checkpoint": _checkpoint_name(ckpt),
            "ensemble": len(ensemble) if isinstance(ensemble, list) else int(ensemble or 1),
            "dataset.rotate_eval": bool(
                settings.get("dataset.rotate_eval") if rotate is None else rotate
            ),
            "update_step_test": settings.get("update_step_test") if steps is None else steps,
        }
    )
    if record.get("eval_seed") is not None:
        settings["eval_seed"] = record["eval_seed"]
    settings[METRIC] = record.get("metric") or _family(settings).metric
    return settings, run


def _family(settings: dict) -> TaskFamily:
    """The task family of a result (its `metric`, else its dataset's: metarun/tasks.py)."""
    if settings.get(METRIC):
        return family_of_metric(settings[METRIC])
    return family_of({"dataset": {"name": settings.get("dataset.name")}})


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def train_result(path: Path, data: dict) -> Result:
    """A Result from a results.json: a score, a failure, or (no test accuracy) an incomplete run."""
    run_dir = path.parent
    config = data.get("config") if isinstance(data.get("config"), dict) else _run_config(run_dir)
    if config is None:
        raise MetarunError(
            f"{path} has no config and {run_dir}/.hydra/config.yaml is missing: the report cannot "
            "tell its settings; leave this run dir out."
        )
    if _is_eval_config(config):  # a failed cell of an eval sweep
        settings, run = _eval_settings(config)
    else:
        settings, run = _train_settings(config), run_dir
    if data.get("status") == "failed":
        return Result(run_dir, settings, failed=str(data.get("reason") or "no reason recorded"))
    test_key = _family(settings).key("test")
    accuracy = _number(data.get(test_key))
    if accuracy is None:
        status = f'"status": "{data["status"]}"' if data.get("status") else "no status"
        return Result(
            run_dir, settings, incomplete=f"its results.json has no {test_key} ({status})"
        )
    return Result(
        run_dir,
        settings,
        accuracy,
        _number(data.get("test_ci95")) or 0.0,
        tasks=data.get("test_tasks") or config.get("test_tasks"),
        eval_seed=config.get("eval_seed"),
        sample=(run, RunFiles.BEST, data.get("best_iteration")),
    )


def eval_results(path: Path, data: dict) -> list[Result]:
    """Results from an eval.json: its headline score and, for `steps=...`, one per number of inner
    steps (each its own protocol, so a row of its own); none for benchmark=lake (error rates)."""
    if data.get("benchmark"):
        return []
    metric = family_of_metric(data.get("metric")).metric  # older eval.json: accuracy
    headline = _number(data.get(metric))
    if headline is None:
        raise MetarunError(
            f"{path} has no {metric}: it is not an eval.json of metarun eval; leave its dir out."
        )
    settings, run = _eval_settings(data)
    scores = {settings["update_step_test"]: (headline, _number(data.get("ci95")) or 0.0)}
    for point in data.get("curve") or []:
        scores[point.get("steps")] = (float(point[metric]), _number(point.get("ci95")) or 0.0)
    sample = (run, settings["checkpoint"], data.get("iteration"))
    return [
        Result(
            path.parent,
            {**settings, "update_step_test": steps},
            accuracy,
            ci,
            tasks=data.get("tasks"),
            eval_seed=data.get("eval_seed"),
            sample=sample,
        )
        for steps, (accuracy, ci) in scores.items()
    ]


def load_results(path: Path) -> list[Result]:
    """The Results of one results.json (`metarun train`) or eval.json (`metarun eval`)."""
    data = _read_json(path)
    return [train_result(path, data)] if path.name == RunFiles.RESULTS else eval_results(path, data)


def _running(run_dir: Path) -> bool:
    """Whether the process that claimed the run dir (its marker's pid, on this host) still runs."""
    from metarun.runner.rundir import MARKER

    try:
        owner = json.loads((run_dir / MARKER).read_text())
        if owner.get("host") != socket.gethostname():
            return False
        os.kill(int(owner["pid"]), 0)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
    return True


def _progress(run_dir: Path, config: dict) -> str:
    """How far an unfinished training run got, from its last.pt, and how to continue it."""
    state = "still running" if _running(run_dir) else "stopped"
    last = run_dir / RunFiles.CHECKPOINTS / RunFiles.LAST
    if not last.is_file():
        return f"no results.json and no checkpoint ({state} before its first checkpoint)"
    try:
        import torch

        # mmap: only the header and the iteration are read, not the weights
        iteration = torch.load(last, map_location="cpu", weights_only=True, mmap=True)["iteration"]
        at = f"iteration {int(iteration)} of {config.get('iterations')}"
    except Exception:  # an unreadable last.pt: the run dir still counts as an incomplete run
        at = "an unreadable checkpoints/last.pt"
    return (
        f"no results.json ({state} at {at}); metarun train resume={shlex.quote(str(run_dir))} "
        "continues it"
    )


def _launch_dir(run_dir: Path) -> Path:
    """The folder a run was started from (Hydra's runtime.cwd), against which its relative paths
    resolve; the current folder when .hydra/hydra.yaml does not say."""
    try:
        from omegaconf import OmegaConf

        hydra = OmegaConf.load(run_dir / RunFiles.HYDRA / "hydra.yaml")
        return Path(str(hydra.hydra.runtime.cwd))
    except Exception:  # no or another hydra.yaml: the report's own folder is the best guess
        return Path.cwd()


def incomplete_result(run_dir: Path) -> Result | None:
    """A run dir without results.json or eval.json: an interrupted (or running) train or eval, as an
    incomplete Result with the settings of its .hydra/config.yaml (settings {} when it has none);
    None for an eval of benchmark=lake."""
    config = _run_config(run_dir)
    if config is None:
        return Result(run_dir, {}, incomplete="no results.json and no .hydra/config.yaml")
    if _is_eval_config(config):
        if config.get("benchmark"):
            return None
        config = {**config, "checkpoint": _launch_dir(run_dir) / str(config["checkpoint"])}
        state = "is still running" if _running(run_dir) else "stopped before writing it"
        return Result(
            run_dir, _eval_settings(config)[0], incomplete=f"no eval.json (the eval {state})"
        )
    return Result(run_dir, _train_settings(config), incomplete=_progress(run_dir, config))


def _outside_hidden(base: Path, path: Path) -> bool:
    return not any(part.startswith(".") for part in path.relative_to(base).parts)


def run_dirs_without_results(base: Path) -> list[Path]:
    """Run dirs under `base` (Hydra's .hydra/config.yaml, or metarun's claim marker) holding neither
    results.json nor eval.json; a sweep dir (multirun.yaml) is not a run."""
    from metarun.runner.rundir import MARKER

    found = {p.parent for p in base.rglob(MARKER)}
    found |= {p.parent.parent for p in base.rglob("config.yaml") if p.parent.name == RunFiles.HYDRA}
    return sorted(
        d
        for d in found
        if _outside_hidden(base, d)
        and not (d / "multirun.yaml").is_file()
        and not (d / RunFiles.RESULTS).is_file()
        and not (d / RunFiles.EVAL).is_file()
    )


def collect(dirs: list[Path]) -> tuple[list[Result], list[Path]]:
    """Every result in the given run or sweep dirs (searched recursively), an incomplete Result for
    each run dir without one, and the files left out (benchmark=lake evals)."""
    results, skipped = [], []
    for d in dirs:
        if not d.is_dir():
            raise MetarunError(
                f"{d} is not a folder: give run dirs or sweep dirs (outputs/sweep/<time>)."
            )
        files = sorted(
            p
            for name in (RunFiles.RESULTS, RunFiles.EVAL)
            for p in d.rglob(name)
            if _outside_hidden(d, p)
        )
        unfinished = run_dirs_without_results(d)
        if not files and not unfinished:
            raise MetarunError(
                f"no results.json or eval.json under {d}: give the dir of a finished run or sweep."
            )
        for f in files:
            found = load_results(f)
            results += found
            skipped += [] if found else [f]
        for run_dir in unfinished:
            result = incomplete_result(run_dir)
            if result is None:
                skipped.append(run_dir / RunFiles.HYDRA / "config.yaml")
            else:
                results.append(result)
    return results, skipped


def _sort_key(value) -> tuple:
    if value is None:
        return (-1, 0, "")
    return (
        (0, value, "")
        if isinstance(value, (int, float)) and not isinstance(value, bool)
        else (1, 0, str(value))
    )


def _algorithm_label(settings: dict, extra_keys: list[str]) -> str:
    name = settings.get("algorithm.name") or "maml"
    label = ALGORITHM_NAMES.get(name, name)
    if settings.get("first_order") is True:
        label = f"first-order {label}"
    extras = [
        f"{k.split('.', 1)[1]}={settings[k]}" for k in extra_keys if settings.get(k) is not None
    ]
    return f"{label} ({', '.join(extras)})" if extras else label


def _layout(results: list[Result]) -> tuple[list[str], list[str]]:
    """(row keys, algorithm.* keys that split an algorithm's column): the settings that differ."""
    keys = sorted({k for r in results for k in r.settings})
    differ = [
        k
        for k in keys
        if k not in IGNORED
        and k != METRIC
        and k not in SAMPLE_KEYS
        and not k.startswith("hydra")
        and len({json.dumps(r.settings.get(k), sort_keys=True, default=str) for r in results}) > 1
    ]
    column_keys = [k for k in differ if k.startswith("algorithm.") or k == "first_order"]
    # An algorithm.* setting names a column only where it differs between runs of one algorithm.
    extra_keys = [
        k
        for k in column_keys
        if k not in ("algorithm.name", "first_order")
        and any(
            len(
                {
                    str(r.settings.get(k))
                    for r in results
                    if r.settings.get("algorithm.name") == name and r.settings.get(k) is not None
                }
            )
            > 1
            for name in {r.settings.get("algorithm.name") for r in results}
        )
    ]
    # `way` means nothing to regression tasks (one output): only classification rows show it
    row_keys = [
        k
        for k in ("way", "shot")
        if any(k in r.settings and (k != "way" or _family(r.settings).percent) for r in results)
    ]
    # Any score that is not an accuracy: every row says its metric and which way is better.
    if any(_family(r.settings) is not CLASSIFICATION for r in results):
        row_keys.append(METRIC)
    row_keys += [k for k in differ if k not in column_keys and k not in row_keys]
    return row_keys, extra_keys


def pool(evals: list[Result]) -> tuple[float, float, int]:
    """Several evals of one checkpoint under one protocol as one figure: (accuracy, 95% CI, tasks)
    over all their distinct tasks. Evals with the same eval_seed score the same tasks (the first N
    of a seed's list are the N tasks), so only the largest of them counts; different seeds are
    pooled exactly: the mean weighted by tasks, the CI from the per-task variance of the union
    (each eval's CI is 1.96 * std / sqrt(n), population std: runner/evaluate.accuracy_with_ci)."""
    largest: dict = {}
    for r in evals:
        if r.eval_seed not in largest or (r.tasks or 0) > (largest[r.eval_seed].tasks or 0):
            largest[r.eval_seed] = r
    parts = list(largest.values())
    if len(parts) == 1:
        return parts[0].accuracy, parts[0].ci95, parts[0].tasks or 0
    n = [max(int(r.tasks or 1), 1) for r in parts]
    total = sum(n)
    mean = sum(k * r.accuracy for k, r in zip(n, parts, strict=True)) / total
    # each eval's per-task variance is (ci / 1.96)^2 * n; the union's adds the spread of the means
    var = sum(
        k * ((r.ci95 / 1.96) ** 2 * k + (r.accuracy - mean) ** 2)
        for k, r in zip(n, parts, strict=True)
    )
    return mean, 1.96 * math.sqrt(var / total) / math.sqrt(total), total


def _count_label(samples: list[list[Result]]) -> str:
    """'3 seeds', '2 runs' (runs sharing a seed) or '2 checkpoints of 1 run': a cell's samples."""
    runs = {group[0].sample[0] for group in samples}
    seeds = {group[0].settings.get("seed") for group in samples}
    if len(runs) < len(samples):
        return f"{len(samples)} checkpoints of {len(runs)} run{'s' if len(runs) > 1 else ''}"
    return f"{len(samples)} seeds" if len(seeds) == len(samples) else f"{len(samples)} runs"


def summarize(group: list[Result]) -> Cell:
    """A cell's text and figures: one sample's accuracy ± 95% CI, or mean ± std over independent
    runs (seeds); evals of one checkpoint are pooled first; failed and incomplete runs are
    counted."""
    done = [r for r in group if r.accuracy is not None]
    failed = sum(r.failed is not None for r in group)
    incomplete = sum(r.incomplete is not None for r in group)
    tail = [f"{failed} failed"] * bool(failed) + [f"{incomplete} incomplete"] * bool(incomplete)
    if not done:
        text = "failed" if not incomplete else "incomplete" if not failed else ", ".join(tail)
        return Cell(text)
    samples: dict = {}
    for r in done:
        samples.setdefault(r.sample or (r.where,), []).append(r)
    figures = [pool(evals) for evals in samples.values()]
    evals = sum(len(v) for v in samples.values())
    family = _family(done[0].settings)
    show, raw = family.fmt, (lambda x: f"{100 * x:.4f}" if family.percent else f"{x:.6f}")
    if len(figures) == 1:
        mean, ci, _ = figures[0]
        counts = [f"{evals} evals of one run"] if evals > 1 else []
        cell = Cell(f"{show(mean)} ± {show(ci)}", raw(mean), raw(ci), runs=1)
    else:
        mean = sum(f[0] for f in figures) / len(figures)
        sd = math.sqrt(sum((f[0] - mean) ** 2 for f in figures) / (len(figures) - 1))
        counts = [_count_label(list(samples.values()))]
        counts += [f"{evals} evals"] if evals > len(figures) else []
        cell = Cell(f"{show(mean)} ± {show(sd)}", raw(mean), "", raw(sd))
        cell.runs = len(figures)
    cell.pooled = evals > len(figures)
    counts += tail
    cell.text += f" ({', '.join(counts)})" if counts else ""
    return cell


def off_protocol(settings: dict, protocol: dict) -> list[str]:
    """The settings in which a result differs from the published figures' protocol."""
    return [
        f"{k}={settings[k]}"
        for k, paper in protocol.items()
        if settings.get(k) is not None and settings[k] != paper
    ]


def _measured_as(row_cells: dict, protocol: dict | None) -> bool:
    """Whether a row holds a run of the protocol a published figure was measured with (None: any
    row), e.g. Reptile's figures with and without transduction."""
    if not protocol:
        return True
    runs = [r for group in row_cells.values() for r in group]
    return any(all(r.settings.get(k) == v for k, v in protocol.items()) for r in runs)


def _paper_entries(cells: dict, rows: list[tuple]) -> tuple[list, dict]:
    """(PAPER entries of the table's dataset as (name, source, figures, run protocol), the papers'
    shared protocol); none when the table holds several datasets."""
    names = {
        r.settings.get("dataset.name", "omniglot")
        for row in rows
        for group in cells[row].values()
        for r in group
    }
    if len(names) != 1:
        return [], {}
    name = names.pop()
    entries = [(*p[:3], p[3] if len(p) > 3 else None) for p in PAPER.get(name, [])]
    return entries, PAPER_PROTOCOL.get(name, {})


def _papers(cells: dict, rows: list[tuple], row_keys: list[str]) -> tuple[list, dict, list[str]]:
    """The paper columns (PAPER entries with a figure for a row on the papers' protocol, measured
    as that row's runs were), each row's protocol differences (a row that has any gets no paper
    figure), notes saying so."""
    entries, shared = _paper_entries(cells, rows) if row_keys[:2] == ["way", "shot"] else ([], {})
    if not entries:
        return [], {}, []
    differs = {
        row: sorted(
            {
                d
                for group in cells[row].values()
                for r in group
                for d in off_protocol(r.settings, shared)
            }
        )
        for row in rows
    }
    on = [row for row in rows if not differs[row]]
    papers = [
        p
        for p in entries
        if any((row[0], row[1]) in p[2] and _measured_as(cells[row], p[3]) for row in on)
    ]
    off = sorted({d for row in rows for d in differs[row]})
    protocol = ", ".join(f"{k}={v}" for k, v in shared.items())
    if not off:
        notes = []
    elif papers:
        notes = [
            f"(paper) columns are blank in rows that differ from the papers' protocol "
            f"({protocol}): {', '.join(off)}."
        ]
    else:
        notes = [
            f"--paper: no published figure is shown: the runs differ from the papers' protocol "
            f"({protocol}) in {', '.join(off)}."
        ]
    return papers, differs, notes


def _group(results: list[Result], row_keys: list[str], extra_keys: list[str]):
    """{row: {column: [results]}}, the rows in order and the columns in order."""
    cells: dict[tuple, dict[str, list[Result]]] = {}
    for r in results:
        row = tuple(r.settings.get(k) for k in row_keys)
        cells.setdefault(row, {}).setdefault(_algorithm_label(r.settings, extra_keys), []).append(r)
    rows = sorted(cells, key=lambda row: [_sort_key(v) for v in row])
    columns = sorted(
        {c for row in cells.values() for c in row}, key=lambda c: (c.startswith("first-order"), c)
    )
    return cells, rows, columns


def _legend(any_pooled: bool, metrics: set[str] = frozenset({"accuracy"})) -> list[str]:
    """The lines under the table that say what a cell is; `metrics`: the metrics in the table
    (anything but accuracy says which way is better)."""
    what = " or ".join(
        ("test accuracy (%)" if metrics == {"accuracy"} else "test accuracy (%, higher is better)")
        if m == "accuracy"
        else f"test {family_of_metric(m).label} (lower is better)"
        for m in sorted(metrics)
    )
    notes = [
        f"Cells: {what}, mean ± 95% CI over one run's test tasks; (N seeds): mean ± "
        "standard deviation over the seeds' runs; (N runs): the same over runs that share a seed."
    ]
    if any_pooled:
        notes.append(
            "(N evals): evaluations of one checkpoint under one protocol (another eval_seed or "
            "number of tasks: another sample of the same run's tasks) are pooled into that run's "
            "figure over all their distinct tasks, never counted as runs or seeds."
        )
    return notes


def _cell_csv(row_values: list, column: str, cell: Cell, group: list[Result], out_dir) -> list:
    """report.csv's line of one cell: figures, counts, dirs and the reasons of unscored runs."""
    return row_values + [
        column,
        cell.mean,
        cell.ci,
        cell.std,
        str(cell.runs),
        str(sum(r.failed is not None for r in group)),
        str(sum(r.incomplete is not None for r in group)),
        ";".join(dict.fromkeys(os.path.relpath(r.where, out_dir) for r in group)),
        "; ".join(r.failed or r.incomplete for r in group if r.accuracy is None),
    ]


def _notes(results: list[Result], failed: list[Result], out_dir: Path) -> list[str]:
    """The lines under the table about failed and incomplete runs."""
    notes = [f"failed: {os.path.relpath(r.where, out_dir)}: {r.failed}" for r in failed]
    return notes + [
        f"incomplete: {os.path.relpath(r.where, out_dir)}: {r.incomplete}"
        + ("" if r.settings else " (its settings are unknown: not in the table)")
        for r in results
        if r.incomplete is not None
    ]


def build_table(results: list[Result], out_dir: Path, paper: bool = False) -> Table:
    placed = [r for r in results if r.settings]  # an unfinished run with no config has no row
    row_keys, extra_keys = _layout(placed)
    cells, rows, columns = _group(placed, row_keys, extra_keys)
    papers, differs, paper_notes = _papers(cells, rows, row_keys) if paper else ([], {}, [])

    table = Table(row_keys + columns + [p[0] for p in papers], [])
    table.csv_rows.append(
        row_keys
        + ["method", "score" if METRIC in row_keys else "accuracy", "ci95", "std", "runs"]
        + ["failed", "incomplete", "dirs", "note"]
    )
    any_pooled, failed = False, []
    for row in rows:
        line = [_row_text(k, v) for k, v in zip(row_keys, row, strict=True)]
        for column in columns:
            group = cells[row].get(column, [])
            cell = summarize(group) if group else Cell("")
            any_pooled |= cell.pooled
            failed += [r for r in group if r.failed is not None]
            line.append(cell.text)
            if group:
                table.csv_rows.append(
                    _cell_csv(line[: len(row_keys)], column, cell, group, out_dir)
                )
        for name, source, figures, protocol in papers:
            on = not differs[row] and _measured_as(cells[row], protocol)
            figure = figures.get((row[0], row[1]), "") if on else ""
            line.append(figure)
            if figure:
                mean, _, ci = figure.partition(" ± ")
                table.csv_rows.append(
                    line[: len(row_keys)] + [name, mean, ci, "", "", "", "", "", source]
                )
        table.rows.append(line)

    metrics = {_family(r.settings).metric for r in placed}
    table.notes += _legend(any_pooled, metrics or {"accuracy"}) + _notes(results, failed, out_dir)
    table.notes += paper_notes + [f"{name}: {source}." for name, source, _, _ in papers]
    return table


def markdown(table: Table) -> str:
    lines = ["| " + " | ".join(table.header) + " |", "|" + " --- |" * len(table.header)]
    lines += ["| " + " | ".join(row) + " |" for row in table.rows]
    return "\n".join(lines) + "\n\n" + "\n".join(table.notes) + "\n"


def csv_text(table: Table) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(table.csv_rows)
    return buf.getvalue()


def report(
    dirs: list[Path], out: Path | None = None, paper: bool = False, plot: bool = False
) -> tuple[str, Path]:
    """Builds the table of `dirs`, writes report.md and report.csv into `out` (default: the one dir
    given, or the dirs' common parent) and returns (the Markdown text, out). plot=True also writes
    validation.png and inner_steps.png (metarun/plots.py; needs matplotlib)."""
    if plot:
        from metarun.plots import pyplot

        pyplot()  # no matplotlib: the one-line error before any work
    results, skipped = collect(dirs)
    if out is None:
        out = dirs[0] if len(dirs) == 1 else Path(os.path.commonpath([d.resolve() for d in dirs]))
    table = build_table(results, out.resolve(), paper)
    text = markdown(table)
    if skipped:
        text += "".join(
            f"left out (not a task accuracy): {os.path.relpath(p, out.resolve())}\n"
            for p in skipped
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.md").write_text(text)
        (out / "report.csv").write_text(csv_text(table))
    except OSError as exc:
        raise MetarunError(
            f"cannot write the report into {out} ({exc.strerror}): give a writable --out DIR."
        ) from None
    if plot:
        text += "".join(f"picture: {p}\n" for p in report_plots(results, out.resolve()))
    return text, out


def report_plots(results: list[Result], out: Path) -> list[Path]:
    """validation.png (each run's validation metric from its TensorBoard events) and, for evals
    with `steps=`, inner_steps.png (the metric against the inner steps): the files written."""
    from metarun.plots import plot_inner_steps, plot_validation

    runs, curves = {}, {}
    for r in results:
        label = os.path.relpath(r.where, out)
        if (r.where / RunFiles.TENSORBOARD).is_dir():
            runs[label] = r.where
        record = r.where / RunFiles.EVAL
        if r.settings.get("file") == RunFiles.EVAL and record.is_file():
            data = _read_json(record)
            if data.get("curve"):
                metric = family_of_metric(data.get("metric")).metric
                curves[label] = (metric, data["curve"])
    written = [plot_validation(runs, out), plot_inner_steps(curves, out)]
    return [p for p in written if p is not None]


def _matrix(args) -> int:
    """`metarun report DIR --matrix`: the reproduction matrix of DIR, printed and written."""
    from metarun.matrix import MATRIX, write_matrix

    if len(args.dirs) != 1 or args.paper or args.plot or args.out:
        raise MetarunError(
            "--matrix takes one folder (docs/results) and none of --paper, --plot, --out: "
            "metarun report docs/results --matrix"
        )
    print(write_matrix(args.dirs[0]), end="")
    print(f"metarun: wrote {args.dirs[0] / MATRIX}", file=sys.stderr)
    return 0


class _Parser(argparse.ArgumentParser):
    def error(
        self, message
    ):  # one line, like every metarun error (the CLI prints it, exit status 2)
        raise MetarunError(
            f"{message} (usage: metarun report DIR... [--paper] [--out DIR], metarun report DIR "
            "--matrix; metarun report --help)"
        )


def main(argv: list[str]) -> int:
    parser = _Parser(
        prog="metarun report",
        description="Table of a sweep's or several runs' "
        "results (results.json / eval.json), printed and written as report.md and "
        "report.csv.",
    )
    parser.add_argument(
        "dirs", nargs="+", type=Path, help="sweep dirs (outputs/sweep/<time>) or run dirs"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="where report.md and report.csv go (default: the dir given, or the dirs' common "
        "parent)",
    )
    parser.add_argument(
        "--paper",
        action="store_true",
        help="add the published Omniglot or miniImageNet figures (MAML, first-order MAML, "
        "Meta-SGD, MAML++, Reptile with and without transduction, ANIL) as extra columns, with "
        "their sources",
    )
    parser.add_argument(
        "--matrix",
        action="store_true",
        help="the reproduction matrix instead of a table: DIR is its folder (docs/results, one "
        "<cell>/seed<N>/ of results.json and eval.json per run: metarun/matrix.py); writes "
        "DIR/matrix.md",
    )
    parser.add_argument(
        "--plot",
        action="store_true",
        help="also draw validation.png (the runs' validation curves, from TensorBoard) and "
        "inner_steps.png (evals with steps=): needs pip install 'metarun[plot]'",
    )
    args = parser.parse_args(argv)
    if args.matrix:
        return _matrix(args)
    text, out = report(args.dirs, args.out, args.paper, args.plot)
    print(text, end="")
    print(f"metarun: wrote {out / 'report.md'} and {out / 'report.csv'}", file=sys.stderr)
    return 0
