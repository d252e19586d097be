"""MAML (Finn et al., 2017) over a whole meta-batch.

Meta-gradient = d/d(phi) of the mean over tasks of the query loss after `update_step` SGD steps of size
`update_lr` on each task's support set; second order by default, `first_order` drops the second-order terms
(the inner gradients are not differentiated, so no second-order graph is kept).

Three exact implementations, chosen by `impl` (`auto` picks by device from the benchmark, see README):
- `batched`: every task of a chunk in one pass of the learner (grouped convolutions, see models/conv4.py);
  the inner gradient of the sum of task losses w.r.t. per-task copies of phi is each task's own gradient.
- `loop`: one task at a time, each task's graph freed as soon as its gradient is taken (least memory).
- `parallel` (CPU): the meta-batch split across one thread per core, each running `batched` on its share
  with single-threaded ops; the per-thread gradients are summed in a fixed order (deterministic).
`task_chunk` splits the meta-batch into chunks whose gradients are accumulated (same gradient, less memory);
0 means the whole meta-batch for `batched` and about PARALLEL_IMAGES_PER_PASS images per pass for `parallel`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from metarun.data.episodes import Episodes
from metarun.errors import MetarunError

CPU_THREADS = torch.get_num_threads()
IMPLS = ("auto", "batched", "loop", "parallel")
INNER_LOSSES = ("sum_over_shot", "mean")


@dataclass
class StepResult:
    meta_loss: torch.Tensor      # scalar, detached: mean query loss (mean cross-entropy) over tasks
    accuracy: torch.Tensor       # [B] post-adaptation query accuracy per task, detached


class MAML:
    def __init__(self, model, update_lr: float, update_step: int, update_step_test: int, first_order: bool = False,
                 impl: str = "auto", task_chunk: int = 0, inner_loss: str = "sum_over_shot", device="cpu",
                 workers: int = 0):
        if impl not in IMPLS:
            raise MetarunError(f"unknown algorithm.impl={impl!r}: use auto, batched, loop or parallel.")
        if inner_loss not in INNER_LOSSES:
            raise MetarunError(f"unknown algorithm.inner_loss={inner_loss!r}: use sum_over_shot or mean.")
        if not float(update_lr) > 0:
            raise MetarunError(f"update_lr={update_lr} must be positive (the paper uses 0.4 for 5-way, 0.1 for 20-way).")
        for name, value in (("update_step", update_step), ("update_step_test", update_step_test)):
            if int(value) <= 0:
                raise MetarunError(f"{name}={value} must be a positive number of inner SGD steps.")
        if int(task_chunk) < 0:
            raise MetarunError(f"algorithm.task_chunk={task_chunk} must be >= 0 (0 = the implementation's default).")
        self.model = model
        self.update_lr, self.update_step, self.update_step_test = float(update_lr), int(update_step), int(update_step_test)
        self.first_order, self.task_chunk, self.inner_loss = bool(first_order), int(task_chunk), inner_loss
        # Measured with scripts/bench.py --suite (README, Performance): see resolve_impl.
        self.impl = resolve_impl(impl, torch.device(device))
        self.workers, self._pool = 1, None
        if self.impl == "parallel":
            # One single-threaded op stream per core (torch's thread count when metarun was imported):
            # set once, for the whole process.
            self.workers = int(workers) or CPU_THREADS
            torch.set_num_threads(1)

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

    def _chunks(self, tasks: int, images_per_task: int) -> list[list[slice]]:
        """The meta-batch as one list of chunks per worker thread (contiguous tasks, fixed order)."""
        parallel_chunk = max(1, PARALLEL_IMAGES_PER_PASS // images_per_task)
        size = {"loop": 1, "batched": self.task_chunk or tasks, "parallel": self.task_chunk or parallel_chunk}[self.impl]
        workers = min(self.workers, tasks) if self.impl == "parallel" else 1
        bounds = [round(i * tasks / workers) for i in range(workers + 1)]
        return [[slice(i, min(i + size, hi)) for i in range(lo, hi, size)] for lo, hi in zip(bounds, bounds[1:])]

    def _map(self, fn, groups):
        """Runs fn on each worker's chunks; on the CPU several threads (each op single-threaded) keep both
        cores busy on small convolutions that one multi-threaded op cannot."""
        if len(groups) == 1:
            return [fn(groups[0])]
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="metarun-maml")
        return list(self._pool.map(fn, groups))

    # -- meta-training --------------------------------------------------------------------------------
    def accumulate_meta_gradient(self, params: dict, ep: Episodes) -> StepResult:
        """Adds d(meta-loss)/d(params) to each param's .grad; returns the detached meta-loss and accuracies."""
        meta_batch = ep.x_support.shape[0]
        leaves = list(params.values())

        def chunk_gradients(chunks):
            total, losses, accuracies = None, [], []
            for part in chunks:
                fast = self.adapt(params, ep.x_support[part], ep.y_support[part], self.update_step,
                                  create_graph=not self.first_order)
                loss, accuracy = self.query_loss(self.model.forward(fast, ep.x_query[part]), ep.y_query[part])
                # One chunk's graph at a time; dividing by the whole batch makes the sum the mean.
                grads = torch.autograd.grad(loss.sum() / meta_batch, leaves)
                total = list(grads) if total is None else [a + b for a, b in zip(total, grads)]
                losses.append(loss.detach())
                accuracies.append(accuracy)
            return total, losses, accuracies

        results = self._map(chunk_gradients, self._chunks(meta_batch, ep.x_support.shape[1] + ep.x_query.shape[1]))
        for i, p in enumerate(leaves):
            g = results[0][0][i]
            for r in results[1:]:  # a fixed order, so the sum is the same bits every time
                g = g + r[0][i]
            p.grad = g if p.grad is None else p.grad + g
        losses = [l for r in results for l in r[1]]
        accuracies = [a for r in results for a in r[2]]
        return StepResult(torch.cat(losses).mean(), torch.cat(accuracies))

    # -- evaluation -----------------------------------------------------------------------------------
    def evaluate(self, params: dict, ep: Episodes, steps: int | None = None) -> torch.Tensor:
        """Post-adaptation query accuracy [T] after `steps` (default update_step_test) steps; keeps no graph."""
        steps = self.update_step_test if steps is None else int(steps)
        # Fresh leaves: the inner loop's graph ends here, never reaching the caller's parameters.
        start = {k: v.detach().requires_grad_(True) for k, v in params.items()}

        def chunk_accuracies(chunks):
            accuracies = []
            for part in chunks:
                with torch.enable_grad():
                    fast = self.adapt(start, ep.x_support[part], ep.y_support[part], steps, create_graph=False)
                with torch.no_grad():
                    accuracies.append(self.query_loss(self.model.forward(fast, ep.x_query[part]), ep.y_query[part])[1])
            return accuracies

        chunks = self._chunks(ep.x_support.shape[0], ep.x_support.shape[1] + ep.x_query.shape[1])
        return torch.cat([a for r in self._map(chunk_accuracies, chunks) for a in r])


def resolve_impl(impl: str, device: torch.device) -> str:
    """`auto`: the batched pass on CUDA (one launch per layer for the whole meta-batch); on a multi-core CPU
    `parallel`, which scripts/bench.py measured fastest on every setting here (README, Performance)."""
    if impl != "auto":
        return impl
    if device.type == "cuda":
        return "batched"
    return "parallel" if CPU_THREADS > 1 else "batched"


# Images (support + query) per grouped pass in each `parallel` thread when task_chunk=0. Measured on 2 cores
# (torch 2.14.1, second order): 4 tasks per pass was fastest on A and B (80 images a task, +20% over the
# whole share, -40% memory), 1-2 on C (120 images a task), the whole share on the default 5-way 1-shot
# 1-query shape (10 images a task).
PARALLEL_IMAGES_PER_PASS = 320


def meta_train_step(maml: MAML, params: dict, optimizer: torch.optim.Optimizer, ep: Episodes) -> StepResult:
    """One meta-iteration: meta-gradient of a meta-batch, then one optimizer step. `metarun train` and
    scripts/bench.py both call exactly this."""
    optimizer.zero_grad(set_to_none=True)
    result = maml.accumulate_meta_gradient(params, ep)
    optimizer.step()
    return result
