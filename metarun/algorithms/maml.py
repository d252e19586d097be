"""MAML (Finn et al., 2017) over a whole meta-batch.

Meta-gradient = d/d(phi) of the mean over tasks of the query loss after `update_step` SGD steps of size
`update_lr` on each task's support set; second order by default, `first_order` drops the second-order terms
(the inner gradients are not differentiated, so no second-order graph is kept).

Two exact implementations, chosen by `impl` (`auto` picks by device from the benchmark, see README):
- `batched`: every task of a chunk in one pass of the learner (grouped convolutions, see models/conv4.py);
  the inner gradient of the sum of task losses w.r.t. per-task copies of phi is each task's own gradient.
- `loop`: one task at a time, back-propagating each task's query loss as soon as it is computed, so only
  one task's graph is alive (least memory).
`task_chunk` splits the meta-batch into chunks whose gradients are accumulated (same gradient, less memory).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from metarun.data.episodes import Episodes
from metarun.errors import MetarunError

IMPLS = ("auto", "batched", "loop")
INNER_LOSSES = ("sum_over_shot", "mean")


@dataclass
class StepResult:
    meta_loss: torch.Tensor      # scalar, detached: mean query loss (mean cross-entropy) over tasks
    accuracy: torch.Tensor       # [B] post-adaptation query accuracy per task, detached


class MAML:
    def __init__(self, model, update_lr: float, update_step: int, update_step_test: int, first_order: bool = False,
                 impl: str = "auto", task_chunk: int = 0, inner_loss: str = "sum_over_shot", device="cpu"):
        if impl not in IMPLS:
            raise MetarunError(f"unknown algorithm.impl={impl!r}: use auto, batched or loop.")
        if inner_loss not in INNER_LOSSES:
            raise MetarunError(f"unknown algorithm.inner_loss={inner_loss!r}: use sum_over_shot or mean.")
        for name, value in (("update_lr", update_lr),):
            if not float(value) > 0:
                raise MetarunError(f"{name}={value} must be positive (the paper uses 0.4 for 5-way, 0.1 for 20-way).")
        for name, value in (("update_step", update_step), ("update_step_test", update_step_test)):
            if int(value) <= 0:
                raise MetarunError(f"{name}={value} must be a positive number of inner SGD steps.")
        if int(task_chunk) < 0:
            raise MetarunError(f"algorithm.task_chunk={task_chunk} must be >= 0 (0 = the whole meta-batch).")
        self.model = model
        self.update_lr, self.update_step, self.update_step_test = float(update_lr), int(update_step), int(update_step_test)
        self.first_order, self.task_chunk, self.inner_loss = bool(first_order), int(task_chunk), inner_loss
        # Measured with scripts/bench.py --suite (README, Performance): see resolve_impl.
        self.impl = resolve_impl(impl, torch.device(device))

    # -- losses ---------------------------------------------------------------------------------------
    def support_loss(self, logits: torch.Tensor, y: torch.Tensor, shot: int) -> torch.Tensor:
        """Sum over tasks of each task's inner loss. `sum_over_shot` is cbfinn/maml's xent/update_batch_size
        summed over the support set (= way x mean cross-entropy), which its update_lr values assume."""
        ce = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(y.shape)
        per_task = ce.sum(1) / shot if self.inner_loss == "sum_over_shot" else ce.mean(1)
        return per_task.sum()

    @staticmethod
    def query_loss(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-task mean cross-entropy and accuracy, [T] each."""
        ce = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(y.shape)
        accuracy = (logits.argmax(-1) == y).to(logits.dtype).mean(1)
        return ce.mean(1), accuracy.detach()

    # -- inner loop -----------------------------------------------------------------------------------
    def adapt(self, params: dict, x: torch.Tensor, y: torch.Tensor, steps: int, create_graph: bool) -> dict:
        """`steps` SGD steps on the support set of each of the T tasks in x, from copies of params."""
        tasks, shot = x.shape[0], y.shape[1] // self.model.way
        fast = {k: v.unsqueeze(0).expand(tasks, *v.shape) for k, v in params.items()}
        for _ in range(steps):
            loss = self.support_loss(self.model.forward(fast, x), y, shot)
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=create_graph)
            fast = {k: w - self.update_lr * g for (k, w), g in zip(fast.items(), grads)}
        return fast

    def _chunks(self, meta_batch: int) -> list[slice]:
        size = 1 if self.impl == "loop" else (self.task_chunk or meta_batch)
        return [slice(i, min(i + size, meta_batch)) for i in range(0, meta_batch, size)]

    # -- meta-training --------------------------------------------------------------------------------
    def accumulate_meta_gradient(self, params: dict, ep: Episodes) -> StepResult:
        """Adds d(meta-loss)/d(params) to each param's .grad; returns the detached meta-loss and accuracies."""
        meta_batch = ep.x_support.shape[0]
        losses, accuracies = [], []
        for part in self._chunks(meta_batch):
            fast = self.adapt(params, ep.x_support[part], ep.y_support[part], self.update_step,
                              create_graph=not self.first_order)
            loss, accuracy = self.query_loss(self.model.forward(fast, ep.x_query[part]), ep.y_query[part])
            # Backward per chunk frees its graph at once; dividing by the whole batch gives the mean.
            (loss.sum() / meta_batch).backward()
            losses.append(loss.detach())
            accuracies.append(accuracy)
        return StepResult(torch.cat(losses).mean(), torch.cat(accuracies))

    # -- evaluation -----------------------------------------------------------------------------------
    def evaluate(self, params: dict, ep: Episodes, steps: int | None = None) -> torch.Tensor:
        """Post-adaptation query accuracy [T] after `steps` (default update_step_test) steps; keeps no graph."""
        steps = self.update_step_test if steps is None else int(steps)
        tasks, shot = ep.x_support.shape[0], ep.y_support.shape[1] // self.model.way
        accuracies = []
        for part in self._chunks(tasks):
            x, y = ep.x_support[part], ep.y_support[part]
            fast = {k: v.detach().unsqueeze(0).expand(x.shape[0], *v.shape).clone() for k, v in params.items()}
            for _ in range(steps):
                with torch.enable_grad():
                    leaves = {k: v.requires_grad_(True) for k, v in fast.items()}
                    loss = self.support_loss(self.model.forward(leaves, x), y, shot)
                    grads = torch.autograd.grad(loss, list(leaves.values()))
                fast = {k: (w - self.update_lr * g).detach() for (k, w), g in zip(leaves.items(), grads)}
            with torch.no_grad():
                accuracies.append(self.query_loss(self.model.forward(fast, ep.x_query[part]), ep.y_query[part])[1])
        return torch.cat(accuracies)


def resolve_impl(impl: str, device: torch.device) -> str:
    """`auto`: the batched pass on CUDA (one launch per layer for the whole meta-batch); on the CPU the one
    that scripts/bench.py --suite measured fastest here (README, Performance)."""
    if impl != "auto":
        return impl
    return "batched" if device.type == "cuda" else CPU_DEFAULT_IMPL


CPU_DEFAULT_IMPL = "batched"


def meta_train_step(maml: MAML, params: dict, optimizer: torch.optim.Optimizer, ep: Episodes) -> StepResult:
    """One meta-iteration: meta-gradient of a meta-batch, then one optimizer step. `metarun train` and
    scripts/bench.py both call exactly this."""
    optimizer.zero_grad(set_to_none=True)
    result = maml.accumulate_meta_gradient(params, ep)
    optimizer.step()
    return result
