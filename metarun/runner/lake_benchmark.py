"""`metarun eval checkpoint=PATH benchmark=lake`: Lake et al.'s 20 original one-shot runs, scored
with the checkpoint's own adaptation (the algorithm's `evaluate`, the same code path as every other
evaluation).

Per run (Lake, Salakhutdinov & Tenenbaum 2015, "One-shot classification"): adapt the learner on the
20 training images (one per class: 20-way 1-shot) with `update_step_test` inner steps, then classify
the 20 test images; the score is the error rate per run and over all runs. As in MAML's evaluation,
the 20 test images of a run are classified together, so batch norm sees their batch statistics
(transductive, Finn et al. 2017).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from metarun.data import sources
from metarun.data.episodes import Episodes
from metarun.data.lake import PUBLISHED_ERROR, find_all_runs, read_all_runs
from metarun.errors import MetarunError
from metarun.io import atomic_write_text
from metarun.runner.files import RunFiles

log = logging.getLogger("metarun")

WAY = 20


def check_lake_checkpoint(cfg, train_cfg, path) -> str | None:
    """Refuses a checkpoint that cannot take the benchmark; returns the warning to record for one
    trained on alphabets of the benchmark (dataset.split=maml) when allow_seen_alphabets=true, else
    None."""
    dataset = train_cfg.dataset.get("name", "omniglot")
    if dataset != "omniglot":
        raise MetarunError(
            f"benchmark=lake is Omniglot's one-shot benchmark, but checkpoint {path} was trained "
            f"on dataset={dataset}: use a checkpoint trained on Omniglot."
        )
    if int(train_cfg.way) != WAY:
        raise MetarunError(
            f"benchmark=lake is 20-way 1-shot, but checkpoint {path} was trained with "
            f"way={train_cfg.way}: use a checkpoint trained with way=20 (e.g. metarun train "
            "+experiment=omniglot_20way_1shot dataset.split=lake)."
        )
    split = train_cfg.dataset.get("split", "maml")
    if split == "lake":
        return None
    if not cfg.get("allow_seen_alphabets", False):
        raise MetarunError(
            f"checkpoint {path} was trained with dataset.split={split}, whose training characters "
            "come from all 50 alphabets, including the evaluation alphabets the benchmark's runs "
            "are "
            "drawn from: train with dataset.split=lake, or add allow_seen_alphabets=true to score "
            "it anyway (the result is then marked as not comparable)."
        )
    return (
        f"checkpoint trained with dataset.split={split}: it has seen characters of the evaluation "
        "alphabets that "
        "the benchmark's runs are drawn from, so this error rate is NOT comparable to the "
        "published ones"
    )


def lake_benchmark(
    cfg, train_cfg, state, path, maml, params: dict, device, steps: int, run_dir: Path,
    made_by: dict | None = None,
) -> dict:  # fmt: skip
    """Scores `params` on every run of all_runs.zip in the data root; prints and writes eval.json.
    `state`: the checkpoint's TrainState (runner/state.py); `made_by`: the command and metarun
    version, recorded in eval.json.

    Returns the eval.json record: per-run errors ("runs"), total "errors" of "items", "error_rate"
    (a fraction), and the "published" error rates. Raises MetarunError for a checkpoint that is not
    20-way (or not Omniglot), one trained with dataset.split=maml (unless
    allow_seen_alphabets=true), or a missing or damaged archive.
    """
    warning = check_lake_checkpoint(cfg, train_cfg, path)
    archive, runs = _read_runs(train_cfg)
    if warning:
        log.warning(f"metarun: WARNING: {warning}.")
    tasks = len(runs)
    episodes = Episodes(
        torch.stack([r.support for r in runs]).to(device),
        torch.arange(WAY).expand(tasks, WAY).contiguous().to(device),
        torch.stack([r.query for r in runs]).to(device),
        torch.stack([r.labels for r in runs]).to(device),
    )
    accuracy = maml.evaluate(params, episodes, steps).double().cpu()  # [runs]: fraction correct
    items = runs[0].query.shape[0]
    errors = [round((1.0 - float(a)) * items) for a in accuracy]
    rate = sum(errors) / (items * tasks)
    summary = (
        f"Lake one-shot error {100 * rate:.2f}% ({sum(errors)}/{items * tasks} test images, "
        f"{tasks} runs)"
    )
    result = {
        "benchmark": "lake",
        "checkpoint": str(path),
        "iteration": int(state.iteration),
        "archive": str(archive),
        "update_step_test": steps,
        "way": WAY,
        "shot": 1,
        "trained_shot": int(train_cfg.shot),
        "trained_split": train_cfg.dataset.get("split", "maml"),
        "runs": [
            {"run": r.name, "errors": e, "items": items, "error_rate": e / items}
            for r, e in zip(runs, errors, strict=True)
        ],
        "errors": sum(errors),
        "items": items * tasks,
        "error_rate": rate,
        "accuracy": 1.0 - rate,
        "published_error_rate": dict(PUBLISHED_ERROR),
        "warning": warning,
        "device": str(device),
        "summary": summary,
        **(made_by or {}),
    }
    files = RunFiles(run_dir)
    atomic_write_text(files.eval_record, json.dumps(result, indent=2))
    log.info(_report(result, runs, path, files.eval_record))
    return result


def _read_runs(train_cfg) -> tuple[Path, list]:
    """(all_runs.zip, its runs), each checked to hold 20 training and 20 test images."""
    archive = find_all_runs(sources.source_root(train_cfg.dataset.root))
    size, resize = (
        int(train_cfg.dataset.image_size),
        str(train_cfg.dataset.get("resize", "lanczos")),
    )
    runs = read_all_runs(archive, size, resize)
    for run in runs:
        if run.support.shape[0] != WAY or run.query.shape[0] != runs[0].query.shape[0]:
            raise MetarunError(
                f"{archive} ({run.name}) has {run.support.shape[0]} training and "
                f"{run.query.shape[0]} test images; every run of the benchmark has 20 of each: "
                "replace the archive with the public all_runs.zip."
            )
    return archive, runs


def _report(result: dict, runs: list, path, written: Path) -> str:
    """The printed report: one line per run, the total, the published rates."""
    items, tasks = result["runs"][0]["items"], len(runs)
    lines = [
        f"Lake et al. (2015) one-shot benchmark: {tasks} runs of 20-way 1-shot from "
        f"{result['archive']}, {result['update_step_test']} inner steps, checkpoint {path} "
        f"(iteration {result['iteration']})"
    ]
    lines += [
        f"  {r['run']}: {r['errors']}/{items} errors ({100 * r['error_rate']:.1f}%)"
        for r in result["runs"]
    ]
    published = ", ".join(f"{k} {100 * v:.1f}%" for k, v in PUBLISHED_ERROR.items())
    lines += [result["summary"], f"published (Lake et al. 2015): {published}", f"wrote {written}"]
    if result["warning"]:
        lines.append(f"WARNING: {result['warning']}")
    return "\n".join(lines)
