"""`metarun eval checkpoint=PATH benchmark=lake`: Lake et al.'s 20 original one-shot runs, scored with the
checkpoint's own adaptation (the algorithm's `evaluate`, the same code path as every other evaluation).

Per run (Lake, Salakhutdinov & Tenenbaum 2015, "One-shot classification"): adapt the learner on the 20
training images (one per class: 20-way 1-shot) with `update_step_test` inner steps, then classify the 20 test
images; the score is the error rate per run and over all runs. As in MAML's evaluation, the 20 test images of
a run are classified together, so batch norm sees their batch statistics (transductive, Finn et al. 2017).
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

log = logging.getLogger("metarun")

WAY = 20


def check_lake_checkpoint(cfg, train_cfg, path) -> str | None:
    """Refuses a checkpoint that cannot take the benchmark; returns the warning to record for one trained on
    alphabets of the benchmark (dataset.split=maml) when allow_seen_alphabets=true, else None."""
    dataset = train_cfg.dataset.get("name", "omniglot")
    if dataset != "omniglot":
        raise MetarunError(
            f"benchmark=lake is Omniglot's one-shot benchmark, but checkpoint {path} was trained on "
            f"dataset={dataset}: use a checkpoint trained on Omniglot."
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
            "come from all 50 alphabets, including the evaluation alphabets the benchmark's runs are "
            "drawn from: train with dataset.split=lake, or add allow_seen_alphabets=true to score it "
            "anyway (the result is then marked as not comparable)."
        )
    return (
        f"checkpoint trained with dataset.split={split}: it has seen characters of the evaluation alphabets that "
        "the benchmark's runs are drawn from, so this error rate is NOT comparable to the published ones"
    )


def lake_benchmark(
    cfg, train_cfg, blob: dict, path, maml, params: dict, device, steps: int, run_dir: Path
) -> dict:
    """Scores `params` on every run of all_runs.zip in the data root; prints and writes eval.json.

    Returns the eval.json record: per-run errors ("runs"), total "errors" of "items", "error_rate" (a fraction),
    and the "published" error rates. Raises MetarunError for a checkpoint that is not 20-way (or not Omniglot),
    one trained with dataset.split=maml (unless allow_seen_alphabets=true), or a missing or damaged archive.
    """
    warning = check_lake_checkpoint(cfg, train_cfg, path)
    archive = find_all_runs(sources.source_root(train_cfg.dataset.root))
    runs = read_all_runs(
        archive, int(train_cfg.dataset.image_size), str(train_cfg.dataset.get("resize", "lanczos"))
    )
    for run in runs:
        if run.support.shape[0] != WAY or run.query.shape[0] != runs[0].query.shape[0]:
            raise MetarunError(
                f"{archive} ({run.name}) has {run.support.shape[0]} training and {run.query.shape[0]} "
                "test images; every run of the benchmark has 20 of each: replace the archive with "
                "the public all_runs.zip."
            )
    if warning:
        log.warning(f"metarun: WARNING: {warning}.")
    tasks = len(runs)
    episodes = Episodes(
        torch.stack([r.support for r in runs]).to(device),
        torch.arange(WAY).expand(tasks, WAY).contiguous().to(device),
        torch.stack([r.query for r in runs]).to(device),
        torch.stack([r.labels for r in runs]).to(device),
    )
    accuracy = (
        maml.evaluate(params, episodes, steps).double().cpu()
    )  # [runs], fraction correct per run
    items = runs[0].query.shape[0]
    errors = [round((1.0 - float(a)) * items) for a in accuracy]
    total = sum(errors)
    rate = total / (items * tasks)
    lines = [
        f"Lake et al. (2015) one-shot benchmark: {tasks} runs of 20-way 1-shot from {archive}, "
        f"{steps} inner steps, checkpoint {path} (iteration {int(blob['iteration'])})"
    ]
    lines += [
        f"  {r.name}: {e}/{items} errors ({100 * e / items:.1f}%)" for r, e in zip(runs, errors)
    ]
    summary = (
        f"Lake one-shot error {100 * rate:.2f}% ({total}/{items * tasks} test images, {tasks} runs)"
    )
    published = ", ".join(f"{k} {100 * v:.1f}%" for k, v in PUBLISHED_ERROR.items())
    lines += [
        summary,
        f"published (Lake et al. 2015): {published}",
        f"wrote {run_dir / 'eval.json'}",
    ]
    if warning:
        lines.append(f"WARNING: {warning}")
    result = {
        "benchmark": "lake",
        "checkpoint": str(path),
        "iteration": int(blob["iteration"]),
        "archive": str(archive),
        "update_step_test": steps,
        "way": WAY,
        "shot": 1,
        "trained_shot": int(train_cfg.shot),
        "trained_split": train_cfg.dataset.get("split", "maml"),
        "runs": [
            {"run": r.name, "errors": e, "items": items, "error_rate": e / items}
            for r, e in zip(runs, errors)
        ],
        "errors": total,
        "items": items * tasks,
        "error_rate": rate,
        "accuracy": 1.0 - rate,
        "published_error_rate": dict(PUBLISHED_ERROR),
        "warning": warning,
        "device": str(device),
        "summary": summary,
    }
    (run_dir / "eval.json").write_text(json.dumps(result, indent=2))
    log.info("\n".join(lines))
    return result
