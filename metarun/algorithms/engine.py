"""The engine: how a meta-batch is executed, independently of what an algorithm computes on it.

An algorithm hands the engine a per-chunk function (a slice of tasks -> that chunk's gradients and any
detached extras); the engine splits the meta-batch into chunks, runs them, and sums the gradients in a fixed
order, so the same inputs give the same bits every time. Three implementations, chosen by `impl`:
- `batched`: every task of a chunk in one pass of the learner (grouped convolutions, see models/conv4.py);
  `task_chunk=0` makes the whole meta-batch one chunk.
- `loop`: one task per chunk, each task's graph freed as soon as its gradient is taken (least memory).
- `parallel` (CPU): the meta-batch split across `workers` threads, each running `batched` on its share;
  `task_chunk=0` means about PARALLEL_IMAGES_PER_PASS images per pass. The per-thread gradients are summed
  in a fixed order (deterministic).
The engine never changes process-wide state: the runner (metarun/runner/setup.py) sets torch's thread
count once from the `threads` setting (1 intra-op thread per worker for `parallel`).
"""
from __future__ import annotations

import torch

from metarun.errors import MetarunError

IMPLS = ("auto", "batched", "loop", "parallel")

# Images (support + query) per grouped pass in each `parallel` thread when task_chunk=0. Measured on 2 cores
# (torch 2.14.1, second order): 4 tasks per pass was fastest on A and B (80 images a task, +20% over the
# whole share, -40% memory), 1-2 on C (120 images a task), the whole share on the default 5-way 1-shot
# 1-query shape (10 images a task).
PARALLEL_IMAGES_PER_PASS = 320


def resolve_impl(impl: str, device: torch.device | str, threads: int) -> str:
    """`auto`: the batched pass on CUDA (one launch per layer for the whole meta-batch); on a CPU with more
    than one thread `parallel`, which scripts/bench.py measured fastest on every setting here (README,
    Performance); else `batched`. `threads`: the run's CPU thread count (the `threads` setting, resolved)."""
    if impl not in IMPLS:
        raise MetarunError(f"unknown algorithm.impl={impl!r}: use auto, batched, loop or parallel.")
    if impl != "auto":
        return impl
    if torch.device(device).type == "cuda":
        return "batched"
    return "parallel" if int(threads) > 1 else "batched"


class Engine:
    """Runs per-chunk functions over a meta-batch.

    Args:
        impl: batched | loop | parallel | auto (resolved with `workers` as the thread count).
        workers: threads of `parallel` (0: torch's current thread count, read, never set); 1 otherwise.
        task_chunk: tasks per chunk (0: the implementation's default).
        device: where the tensors live (only used to resolve `auto`).
    Raises MetarunError for an unknown impl or a negative task_chunk.
    """

    def __init__(self, impl: str = "auto", workers: int = 0, task_chunk: int = 0, device="cpu"):
        if int(task_chunk) < 0:
            raise MetarunError(f"algorithm.task_chunk={task_chunk} must be >= 0 (0 = the implementation's default).")
        threads = int(workers) or torch.get_num_threads()
        self.impl = resolve_impl(impl, device, threads)
        self.workers = threads if self.impl == "parallel" else 1
        self.task_chunk = int(task_chunk)
        self._pool = None

    def chunks(self, tasks: int, images_per_task: int) -> list[list[slice]]:
        """The meta-batch as one list of chunks per worker thread (contiguous tasks, fixed order)."""
        parallel_chunk = max(1, PARALLEL_IMAGES_PER_PASS // images_per_task)
        size = {"loop": 1, "batched": self.task_chunk or tasks, "parallel": self.task_chunk or parallel_chunk}[self.impl]
        workers = min(self.workers, tasks) if self.impl == "parallel" else 1
        bounds = [round(i * tasks / workers) for i in range(workers + 1)]
        return [[slice(i, min(i + size, hi)) for i in range(lo, hi, size)] for lo, hi in zip(bounds, bounds[1:])]

    def _map(self, fn, groups):
        """Runs fn on each worker's chunks; on the CPU several threads (each op single-threaded) keep all
        cores busy on small convolutions that one multi-threaded op cannot."""
        if len(groups) == 1:
            return [fn(groups[0])]
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="metarun-engine")
        return list(self._pool.map(fn, groups))

    def map_chunks(self, fn, tasks: int, images_per_task: int) -> list:
        """fn(slice) -> anything, for every chunk; the results in task order."""
        groups = self.chunks(tasks, images_per_task)
        return [r for rs in self._map(lambda chunks: [fn(part) for part in chunks], groups) for r in rs]

    def accumulate(self, fn, leaves: list[torch.Tensor], tasks: int, images_per_task: int) -> list:
        """fn(slice) -> (gradients: list matching `leaves`, extra). Adds the sum of all chunks' gradients to
        each leaf's .grad (in a fixed order) and returns the extras in task order."""

        def worker(chunks):
            total, extras = None, []
            for part in chunks:
                grads, extra = fn(part)
                total = list(grads) if total is None else [a + b for a, b in zip(total, grads)]
                extras.append(extra)
            return total, extras

        results = self._map(worker, self.chunks(tasks, images_per_task))
        for i, p in enumerate(leaves):
            g = results[0][0][i]
            for r in results[1:]:  # a fixed order, so the sum is the same bits every time
                g = g + r[0][i]
            p.grad = g if p.grad is None else p.grad + g
        return [e for r in results for e in r[1]]
