"""Task families: what a task asks of the learner, and how the answer is scored.

A task family declares its losses (the inner loop's support loss and the outer loop's query loss),
its metric (classification: accuracy; regression: mean squared error), whether a higher metric is
better, how the metric is written (accuracy x100 as %, MSE plain) and the names of its keys in
results.json, eval.json and TensorBoard. Everything in metarun that scores, ranks or prints a run
follows the family of the run's dataset: the algorithms' losses (algorithms/base.py), evaluation
(runner/evaluate.py), the best checkpoint and the top-K ranking (runner/train.py), the value
returned to Optuna (cli.py), and the tables of `metarun report`.

`family_of(cfg)` is the family of a config's dataset (data/registry.py's FAMILIES; every other
dataset is classification).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

SUPPORT_LOSSES = ("sum_over_shot", "mean")


@dataclass(frozen=True)
class TaskFamily:
    """One task family.

    name: classification | regression. metric: the score's key (`accuracy`, `mse`), used in
    `best_val_<metric>`, `test_<metric>`, eval.json's `<metric>` and TensorBoard's `val/<metric>`.
    label: the metric as a table heading. higher_is_better: whether a larger metric is the better
    run. percent: written x100 with a % sign (accuracy) or as it is (MSE)."""

    name: str
    metric: str
    label: str
    higher_is_better: bool
    percent: bool

    # -- losses (autograd flows through them) -----------------------------------------------------
    def support_loss(self, out: torch.Tensor, y: torch.Tensor, shot: int, inner: str):
        """Per-task inner-loop loss [T]. out: [T, N, way] logits (y long [T, N]) or [T, N, D]
        predictions (y float [T, N, D]). Classification: cross-entropy summed over the support set
        and divided by shot (`sum_over_shot`, cbfinn/maml's xent / update_batch_size) or its mean;
        regression: the mean squared error over the support points and outputs (cbfinn/maml
        utils.mse: tf.reduce_mean(tf.square(pred - label))), whatever `inner` says."""
        if self.name == "regression":
            return (out - y).pow(2).flatten(1).mean(1)
        ce = F.cross_entropy(out.flatten(0, 1), y.flatten(), reduction="none").view(y.shape)
        return ce.sum(1) / shot if inner == "sum_over_shot" else ce.mean(1)

    def query_loss(self, out: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-task query loss [T] (mean cross-entropy | MSE), per-task metric [T], detached)."""
        if self.name == "regression":
            loss = (out - y).pow(2).flatten(1).mean(1)
            return loss, loss.detach()
        ce = F.cross_entropy(out.flatten(0, 1), y.flatten(), reduction="none").view(y.shape)
        return ce.mean(1), self.score(out, y).detach()

    def score(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-task metric of outputs with any leading dimensions: out [..., T, N, way | D], y
        [T, N (, D)] -> [..., T] (accuracy: fraction correct; MSE over points and outputs)."""
        if self.name == "regression":
            return (out - y).pow(2).mean((-2, -1))
        return (out.argmax(-1) == y).to(out.dtype).mean(-1)

    # -- comparing runs ---------------------------------------------------------------------------
    @property
    def worst(self) -> float:
        """A value every real score beats (the best validation before the first one)."""
        return -1.0 if self.higher_is_better else math.inf

    def better(self, new: float, old: float) -> bool:
        """Whether score `new` beats `old` (strictly: a tie keeps the earlier checkpoint)."""
        return new > old if self.higher_is_better else new < old

    def rank_key(self, score: float) -> float:
        """Sort key putting the best score first (ascending sort)."""
        return -score if self.higher_is_better else score

    def objective(self, score: float | None) -> float | None:
        """The value a maximising search (Optuna's `direction: maximize`) gets: the score, or
        minus the score when lower is better."""
        if score is None:
            return None
        return float(score) if self.higher_is_better else -float(score)

    # -- writing scores ---------------------------------------------------------------------------
    def fmt(self, value: float) -> str:
        """A score as tables show it: accuracy 98.70 (percent), MSE 0.5123."""
        return f"{100 * value:.2f}" if self.percent else f"{value:.4f}"

    def describe(self, mean: float, ci: float, tasks: int, cfg, name: str = "test") -> str:
        """One line: `test accuracy 98.70% ± 0.40% (95% CI, 600 tasks, 5-way 1-shot)`."""
        unit = "%" if self.percent else ""
        return (
            f"{name} {self.label} {self.fmt(mean)}{unit} ± {self.fmt(ci)}{unit} "
            f"(95% CI, {tasks} tasks, {self.shape(cfg)})"
        )

    def shape(self, cfg) -> str:
        """The task shape in words: `5-way 1-shot` | `10-shot regression`."""
        if self.name == "regression":
            return f"{cfg.shot}-shot regression"
        return f"{cfg.way}-way {cfg.shot}-shot"

    def key(self, prefix: str) -> str:
        """`best_val` -> best_val_accuracy | best_val_mse."""
        return f"{prefix}_{self.metric}"


CLASSIFICATION = TaskFamily("classification", "accuracy", "accuracy", True, True)
REGRESSION = TaskFamily("regression", "mse", "MSE", False, False)
FAMILIES = {f.name: f for f in (CLASSIFICATION, REGRESSION)}


def family_named(name: str) -> TaskFamily:
    return FAMILIES[name]


def family_of(cfg) -> TaskFamily:
    """The task family of a config's dataset (a DictConfig or a plain dict of a saved config);
    classification for every dataset data/registry.py's FAMILIES does not list."""
    from metarun.data.registry import FAMILIES as BY_DATASET

    dataset = cfg.get("dataset") or {}
    name = dataset.get("name") if hasattr(dataset, "get") else None
    return FAMILIES[BY_DATASET.get(str(name), "classification")]


def family_of_metric(metric: str | None) -> TaskFamily:
    """The family whose metric is `metric` (a results.json without one: classification)."""
    return next((f for f in FAMILIES.values() if f.metric == metric), CLASSIFICATION)
