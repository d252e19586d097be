"""The engine: how a meta-batch is executed, independently of what an algorithm computes on it.

An algorithm hands the engine a per-chunk function (a slice of tasks -> that chunk's gradients and
any detached extras); the engine splits the meta-batch into chunks, runs them, and sums the
gradients in a fixed order, so the same inputs give the same bits every time. Three implementations,
chosen by `impl`:
- `batched`: every task of a chunk in one pass of the learner (grouped convolutions, see
  models/conv4.py); `task_chunk=0` makes the whole meta-batch one chunk.
- `loop`: one task per chunk, each task's graph freed as soon as its gradient is taken (least
  memory).
- `parallel` (CPU): the meta-batch split across `workers` threads, each running `batched` on its
  share; `task_chunk=0` means about PARALLEL_IMAGES_PER_PASS images per pass. The per-thread
  gradients are summed in a fixed order (deterministic).
`auto` on CUDA is picked by timing: the first meta-batch is run with each of TIMED_CANDIDATES for a
few iterations (results discarded), the fastest is kept and the choice and its timings are logged.
The engine never changes process-wide state: the runner (metarun/runner/setup.py) sets torch's
thread count once from the `threads` setting (1 intra-op thread per worker for `parallel`), and
TF32.
"""

from __future__ import annotations

import contextlib
import logging
import time

import torch

from metarun.errors import MetarunError

IMPLS = ("auto", "batched", "loop", "parallel")

# Images (support + query) per grouped pass in each `parallel` thread when task_chunk=0. Measured on
# 2 loaded cores (torch 2.14.1, one thread, tasks/s alternating in one process; README,
# Performance): one or two tasks per pass were as fast as the per-task loop, 4 tasks 0.7x at A (80
# images a task); 160 gives 2 tasks at A and B, 1 at C (120 images a task), 16 on the default 5-way
# 1-shot 1-query shape (10 images a task).
PARALLEL_IMAGES_PER_PASS = 160

# (impl, task_chunk) pairs `auto` times on CUDA (task_chunk None: the configured one);
# TIMED_ITERATIONS timed meta-batches each after one warm-up.
TIMED_CANDIDATES = (("batched", None), ("loop", 0))
TIMED_ITERATIONS = 3
AUTOCASTS = ("none", "bf16")

log = logging.getLogger("metarun")


def resolve_impl(impl: str, device: torch.device | str, threads: int) -> str:
    """`auto` on a CPU: `parallel` with more than one thread, which scripts/bench.py measured
    fastest on every setting here (README, Performance), else `batched`. On CUDA `auto` stays
    `auto`: the engine picks by timing at start-up (no rule measured on another machine). `threads`:
    the run's CPU thread count (the `threads` setting, resolved)."""
    if impl not in IMPLS:
        raise MetarunError(f"unknown algorithm.impl={impl!r}: use auto, batched, loop or parallel.")
    if impl != "auto":
        return impl
    if torch.device(device).type == "cuda":
        return "auto"
    return "parallel" if int(threads) > 1 else "batched"


class Engine:
    """Runs per-chunk functions over a meta-batch.

    Args:
        impl: batched | loop | parallel | auto (resolved with `workers` as the thread count; on
            CUDA, or with timed_auto=True, picked by timing TIMED_CANDIDATES on the first
            meta-batch).
        workers: threads of `parallel` (0: torch's current thread count, read, never set); 1
            otherwise.
        task_chunk: tasks per chunk (0: the implementation's default: the whole meta-batch for
            `batched`, about 160 images a pass for `parallel`, one task for `loop`).
        device: where the tensors live (resolves `auto`, and the autocast device).
        autocast: none | bf16: the per-chunk functions run under bfloat16 autocast (CUDA only).
        timed_auto: pick `auto` by timing on any device (None: on CUDA only; False: never,
            `batched` on CUDA).

    `choice` holds the timed pick: {"impl", "task_chunk", "ms_per_meta_batch": {candidate: ms}}.

    Raises:
        MetarunError: an unknown impl or autocast, a negative task_chunk, or bf16 off CUDA.
    """

    def __init__(
        self,
        impl: str = "auto",
        workers: int = 0,
        task_chunk: int = 0,
        device="cpu",
        autocast: str = "none",
        timed_auto: bool | None = None,
    ):
        if int(task_chunk) < 0:
            raise MetarunError(
                f"algorithm.task_chunk={task_chunk} must be >= 0 (0 = the implementation's "
                "default)."
            )
        if str(autocast) not in AUTOCASTS:
            raise MetarunError(f"unknown autocast={autocast!r}: use none or bf16 (CUDA).")
        self.device = torch.device(device)
        if autocast != "none" and self.device.type != "cuda":
            raise MetarunError(
                f"autocast={autocast} needs device=cuda: use autocast=none on the CPU."
            )
        threads = int(workers) or torch.get_num_threads()
        self.impl = resolve_impl(impl, device, threads)
        if impl == "auto" and timed_auto:
            self.impl = "auto"
        elif self.impl == "auto" and timed_auto is False:
            self.impl = "batched"  # CUDA without timing: one pass for the whole meta-batch
        self.workers = threads if self.impl == "parallel" else 1
        self.task_chunk = int(task_chunk)
        self.autocast = str(autocast)
        self.choice = None
        self._pool = None

    def _context(self):
        if self.autocast == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _pick(self, run) -> None:
        """Times run() (one meta-batch, results discarded) under each candidate and keeps the
        fastest."""
        timings, configured = {}, self.task_chunk
        for impl, chunk in TIMED_CANDIDATES:
            self.impl, self.task_chunk = impl, configured if chunk is None else chunk
            try:
                run()
                self._sync()
                start = time.perf_counter()
                for _ in range(TIMED_ITERATIONS):
                    run()
                self._sync()
            except torch.OutOfMemoryError:  # a candidate that does not fit is not a candidate
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            timings[f"{impl}/task_chunk={self.task_chunk}"] = (
                (time.perf_counter() - start) / TIMED_ITERATIONS * 1e3
            )
        if not timings:
            raise MetarunError(
                "algorithm.impl=auto: no implementation fits in device memory: lower meta_batch "
                "or set algorithm.task_chunk."
            )
        best = min(timings, key=timings.get)
        impl, chunk = best.split("/task_chunk=")
        self.impl, self.task_chunk = impl, int(chunk)
        self.choice = {"impl": impl, "task_chunk": int(chunk), "ms_per_meta_batch": timings}
        log.info(
            "algorithm.impl=auto picked %s (task_chunk=%s): the fastest of %s ms per meta-batch, "
            "timed over %d meta-batches each at start-up",
            impl,
            chunk,
            ", ".join(f"{k} {v:.1f}" for k, v in timings.items()),
            TIMED_ITERATIONS,
        )

    def chunks(self, tasks: int, images_per_task: int) -> list[list[slice]]:
        """The meta-batch as one list of chunks per worker thread
        (contiguous tasks, fixed order)."""
        parallel_chunk = max(1, PARALLEL_IMAGES_PER_PASS // images_per_task)
        impl = "batched" if self.impl == "auto" else self.impl  # evaluation before the timed pick
        size = {
            "loop": 1,
            "batched": self.task_chunk or tasks,
            "parallel": self.task_chunk or parallel_chunk,
        }[impl]
        workers = min(self.workers, tasks) if self.impl == "parallel" else 1
        bounds = [round(i * tasks / workers) for i in range(workers + 1)]
        return [
            [slice(i, min(i + size, hi)) for i in range(lo, hi, size)]
            # consecutive pairs: bounds[1:] is one shorter by design
            for lo, hi in zip(bounds, bounds[1:], strict=False)
        ]

    def _map(self, fn, groups):
        """Runs fn on each worker's chunks; on the CPU several threads (each op single-threaded)
        keep all cores busy on small convolutions that one multi-threaded op cannot."""
        if len(groups) == 1:
            return [fn(groups[0])]
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="metarun-engine")
        return list(self._pool.map(fn, groups))

    def map_chunks(self, fn, tasks: int, images_per_task: int) -> list:
        """fn(slice) -> anything, for every chunk; the results in task order."""
        groups = self.chunks(tasks, images_per_task)

        def worker(chunks):
            with self._context():
                return [fn(part) for part in chunks]

        return [r for rs in self._map(worker, groups) for r in rs]

    def accumulate(self, fn, leaves: list[torch.Tensor], tasks: int, images_per_task: int) -> list:
        """fn(slice) -> (gradients: list matching `leaves`, extra). Adds the sum of all chunks'
        gradients to each leaf's .grad (in a fixed order) and returns the extras in task order."""

        def worker(chunks):
            total, extras = None, []
            for part in chunks:
                with self._context():
                    grads, extra = fn(part)
                total = (
                    list(grads)
                    if total is None
                    else [a + b for a, b in zip(total, grads, strict=True)]
                )
                extras.append(extra)
            return total, extras

        if self.impl == "auto":
            self._pick(lambda: self._map(worker, self.chunks(tasks, images_per_task)))
        results = self._map(worker, self.chunks(tasks, images_per_task))
        for i, p in enumerate(leaves):
            g = results[0][0][i]
            for r in results[1:]:  # a fixed order, so the sum is the same bits every time
                g = g + r[0][i]
            p.grad = g if p.grad is None else p.grad + g
        return [e for r in results for e in r[1]]
