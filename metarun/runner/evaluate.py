"""Scoring a learner on a fixed set of tasks: the mean of the task family's metric (accuracy, MSE:
metarun/tasks.py) and its 95% confidence interval."""

from __future__ import annotations

import math
from collections.abc import Callable
from types import SimpleNamespace

import torch

from metarun.data.episodes import fixed_tasks
from metarun.errors import MetarunError
from metarun.tasks import CLASSIFICATION


def accuracy_with_ci(accuracies: torch.Tensor) -> tuple[float, float]:
    """Mean and 95% CI half-width (1.96 standard errors, as cbfinn/maml reports) of per-task scores
    (accuracies or MSEs)."""
    acc = accuracies.double().cpu()
    n = acc.numel()
    std = acc.std(unbiased=False).item() if n > 1 else 0.0
    return acc.mean().item(), 1.96 * std / math.sqrt(n)


def eval_query(cfg) -> int:
    """Query images per class of the fixed evaluation tasks (validation, test, `metarun eval`):
    `query_test`, or `query` when it is null or absent (a config from before the setting).
    cbfinn/maml draws 15 per class in training but K at test on miniImageNet (main.py L245-249),
    which also changes the batch that batch norm normalises the query images over.
    Raises MetarunError unless it is a positive integer or null."""
    value = cfg.get("query_test")
    if value is None:
        return int(cfg.query)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise MetarunError(
            f"query_test={value} must be a positive number of query images per class of the "
            "validation and test tasks, or null (the training query)."
        )
    return value


def _fixed_tasks(classes, split: str, cfg, device, tasks: int, seed: int | None):
    """The fixed tasks of a split, with eval_query(cfg) query images per class; dataset.rotate_eval
    (absent in older configs: no rotation) rotates them. A generated task family's split
    (data/sinusoid.py) draws its own."""
    seed = int(cfg.eval_seed if seed is None else seed)
    if hasattr(classes, "fixed_tasks"):
        return classes.fixed_tasks(cfg, device, tasks, seed, int(cfg.eval_chunk))
    return fixed_tasks(
        classes,
        split,
        int(cfg.way),
        int(cfg.shot),
        eval_query(cfg),
        device,
        tasks,
        seed=seed,
        chunk=int(cfg.eval_chunk),
        rotate=bool(cfg.dataset.get("rotate_eval", False)),
    )


def evaluate_tasks(
    algorithm,
    params,
    classes,
    split: str,
    cfg,
    device,
    tasks: int,
    steps: int | None = None,
    seed: int | None = None,
    check: Callable[[], None] | None = None,
) -> tuple[float, float]:
    """Accuracy on `tasks` fixed tasks of a split (the same tasks for the same seed, on every
    device). params: one meta-parameter dict, or a list of them: an ensemble scored by the mean of
    its members' post-adaptation query logits (MAML++'s top-K ensemble). check: called before each
    chunk of eval_chunk tasks; it may raise to stop (a signal: runner/signals.py)."""
    members = params if isinstance(params, list) else [params]
    accuracies = []
    for ep in _fixed_tasks(classes, split, cfg, device, tasks, seed):
        if check is not None:
            check()
        if len(members) == 1:
            accuracies.append(algorithm.evaluate(members[0], ep, steps))
            continue
        logits = sum(algorithm.query_logits(p, ep, steps) for p in members) / len(members)
        accuracies.append(algorithm.family.score(logits, ep.y_query))
    return accuracy_with_ci(torch.cat(accuracies))


def evaluate_curve(
    algorithm,
    params,
    classes,
    split: str,
    cfg,
    device,
    tasks: int,
    steps: list[int],
    seed: int | None = None,
    check: Callable[[], None] | None = None,
) -> list[tuple[float, float]]:
    """(accuracy, 95% CI) after each number of inner steps in `steps` (0: no adaptation), from one
    inner loop per task, on the fixed tasks of evaluate_tasks (cbfinn/maml's test: accuracy after
    0..10 steps). params: one dict or an ensemble, and check, as evaluate_tasks."""
    members = params if isinstance(params, list) else [params]
    per_step = [[] for _ in steps]
    for ep in _fixed_tasks(classes, split, cfg, device, tasks, seed):
        if check is not None:
            check()
        logits = sum(algorithm.query_logits_curve(p, ep, steps) for p in members) / len(
            members
        )  # [S, T, N, way]
        accuracy = algorithm.family.score(logits, ep.y_query)  # [S, T]
        for i in range(len(steps)):
            per_step[i].append(accuracy[i])
    return [accuracy_with_ci(torch.cat(a)) for a in per_step]


def describe(
    mean: float, ci: float, tasks: int, way: int, shot: int, name: str = "test", family=None
) -> str:
    """One line of a score: `test accuracy 98.70% ± 0.40% (95% CI, 600 tasks, 5-way 1-shot)`, or
    `test MSE 0.5123 ± 0.0400 (95% CI, 600 tasks, 10-shot regression)` (family: metarun/tasks.py;
    None: classification)."""
    family = family or CLASSIFICATION
    return family.describe(mean, ci, tasks, SimpleNamespace(way=way, shot=shot), name)
