"""Scoring a learner on a fixed set of tasks: mean accuracy and its 95% confidence interval."""
from __future__ import annotations

import math

import torch

from metarun.data.episodes import fixed_tasks


def accuracy_with_ci(accuracies: torch.Tensor) -> tuple[float, float]:
    """Mean and 95% CI half-width (1.96 standard errors, as cbfinn/maml reports) of per-task accuracies."""
    acc = accuracies.double().cpu()
    n = acc.numel()
    std = acc.std(unbiased=False).item() if n > 1 else 0.0
    return acc.mean().item(), 1.96 * std / math.sqrt(n)


def evaluate_tasks(algorithm, params, classes, split: str, cfg, device, tasks: int, steps: int | None = None,
                   seed: int | None = None) -> tuple[float, float]:
    """Accuracy on `tasks` fixed tasks of a split (the same tasks for the same seed, on every device).
    params: one meta-parameter dict, or a list of them: an ensemble scored by the mean of its members'
    post-adaptation query logits (MAML++'s top-K ensemble)."""
    members = params if isinstance(params, list) else [params]
    accuracies = []
    for ep in fixed_tasks(classes, split, int(cfg.way), int(cfg.shot), int(cfg.query), device, tasks,
                          seed=int(cfg.eval_seed if seed is None else seed), chunk=int(cfg.eval_chunk)):
        if len(members) == 1:
            accuracies.append(algorithm.evaluate(members[0], ep, steps))
            continue
        logits = sum(algorithm.query_logits(p, ep, steps) for p in members) / len(members)
        accuracies.append((logits.argmax(-1) == ep.y_query).to(logits.dtype).mean(1))
    return accuracy_with_ci(torch.cat(accuracies))


def describe(mean: float, ci: float, tasks: int, way: int, shot: int, name: str = "test") -> str:
    return f"{name} accuracy {100 * mean:.2f}% ± {100 * ci:.2f}% (95% CI, {tasks} tasks, {way}-way {shot}-shot)"
