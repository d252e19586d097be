"""Scoring a learner on a fixed set of tasks: mean accuracy and its 95% confidence interval."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from metarun.data.episodes import fixed_tasks


def accuracy_with_ci(accuracies: torch.Tensor) -> tuple[float, float]:
    """Mean and 95% CI half-width (1.96 standard errors, as cbfinn/maml reports) of per-task accuracies."""
    acc = accuracies.double().cpu()
    n = acc.numel()
    std = acc.std(unbiased=False).item() if n > 1 else 0.0
    return acc.mean().item(), 1.96 * std / math.sqrt(n)


def _fixed_tasks(classes, split: str, cfg, device, tasks: int, seed: int | None):
    """The fixed tasks of a split; dataset.rotate_eval (absent in older configs: no rotation) rotates them."""
    return fixed_tasks(
        classes,
        split,
        int(cfg.way),
        int(cfg.shot),
        int(cfg.query),
        device,
        tasks,
        seed=int(cfg.eval_seed if seed is None else seed),
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
    """Accuracy on `tasks` fixed tasks of a split (the same tasks for the same seed, on every device).
    params: one meta-parameter dict, or a list of them: an ensemble scored by the mean of its members'
    post-adaptation query logits (MAML++'s top-K ensemble). check: called before each chunk of
    eval_chunk tasks; it may raise to stop (a signal: runner/signals.py)."""
    members = params if isinstance(params, list) else [params]
    accuracies = []
    for ep in _fixed_tasks(classes, split, cfg, device, tasks, seed):
        if check is not None:
            check()
        if len(members) == 1:
            accuracies.append(algorithm.evaluate(members[0], ep, steps))
            continue
        logits = sum(algorithm.query_logits(p, ep, steps) for p in members) / len(members)
        accuracies.append((logits.argmax(-1) == ep.y_query).to(logits.dtype).mean(1))
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
    """(accuracy, 95% CI) after each number of inner steps in `steps` (0: no adaptation), from one inner loop
    per task, on the fixed tasks of evaluate_tasks (cbfinn/maml's test: accuracy after 0..10 steps).
    params: one dict or an ensemble, and check, as evaluate_tasks."""
    members = params if isinstance(params, list) else [params]
    per_step = [[] for _ in steps]
    for ep in _fixed_tasks(classes, split, cfg, device, tasks, seed):
        if check is not None:
            check()
        logits = sum(algorithm.query_logits_curve(p, ep, steps) for p in members) / len(
            members
        )  # [S, T, N, way]
        accuracy = (logits.argmax(-1) == ep.y_query).to(logits.dtype).mean(2)
        for i in range(len(steps)):
            per_step[i].append(accuracy[i])
    return [accuracy_with_ci(torch.cat(a)) for a in per_step]


def describe(mean: float, ci: float, tasks: int, way: int, shot: int, name: str = "test") -> str:
    return f"{name} accuracy {100 * mean:.2f}% ± {100 * ci:.2f}% (95% CI, {tasks} tasks, {way}-way {shot}-shot)"
