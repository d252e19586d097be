"""Data parallelism over the meta-batch with `torchrun` and torch.distributed.

Every rank draws the same meta-batch from the same seed (the sampler's state is a counter, the same
on every rank) and computes the meta-gradient of its contiguous share of it (`batch.shard(part)`:
tasks, or whatever items the algorithm's batch splits into; algorithms.base.TrainingBatch); one
all-reduce per iteration sums the per-rank gradient sums, so every rank applies the meta-gradient
over the whole meta-batch (the single-process one, up to the order of a float sum) and the weights
stay identical. An algorithm whose batch cannot be split so (its `data_parallel` says why) is
refused.
Parameters are broadcast from rank 0 at the start (and after a resume). Only rank 0 logs, validates,
checkpoints and writes results; all ranks work in the one run dir that rank 0 claimed
(metarun/cli.py).

Backends: gloo on the CPU, nccl on CUDA (each rank on cuda:LOCAL_RANK); the process group also gets
a gloo side for the CPU objects exchanged before training (the run dir, a user error).
"""

from __future__ import annotations

import os
import re

import torch

from metarun.algorithms.base import StepResult, TrainingBatch
from metarun.errors import MetarunError


class ProcessLost(Exception):
    """A collective failed: another torchrun process died or lost its connection (`cause`: the
    backend's text, e.g. gloo's "Connection closed by peer")."""

    def __init__(self, cause: str):
        super().__init__(cause)
        self.cause = cause


def world_size() -> int:
    """Processes started by torchrun for this run (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_world_size() -> int:
    """Processes of this run on this machine: they share its cores."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))


def is_main() -> bool:
    return rank() == 0


def init() -> None:
    """Joins the process group torchrun describes (env://), once; nothing without torchrun."""
    import torch.distributed as dist

    if world_size() > 1 and not dist.is_initialized():
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)


def broadcast_object(obj):
    """Rank 0's `obj` on every rank (any picklable object; None
    without torchrun is returned as is)."""
    import torch.distributed as dist

    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def device_for_rank(device: torch.device) -> torch.device:
    """CUDA: each rank on its own GPU (cuda:LOCAL_RANK); the CPU is shared."""
    if world_size() > 1 and device.type == "cuda":
        index = int(os.environ.get("LOCAL_RANK", "0"))
        if index >= torch.cuda.device_count():
            raise MetarunError(
                f"torchrun started {local_world_size()} processes on this machine but it has "
                f"{torch.cuda.device_count()} CUDA device(s): use --nproc-per-node<="
                f"{torch.cuda.device_count()}."
            )
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return device


def share(meta_batch: int) -> slice:
    """This rank's contiguous share of the meta-batch's tasks (sizes differ by at most one)."""
    world, me = world_size(), rank()
    if meta_batch < world:
        raise MetarunError(
            f"meta_batch={meta_batch} is smaller than the {world} torchrun processes: every "
            f"process needs a task; use meta_batch>={world} or fewer processes (--nproc-per-node)."
        )
    return slice(me * meta_batch // world, (me + 1) * meta_batch // world)


def check_splittable(algorithm_cls) -> None:
    """Under torchrun: refuses an algorithm whose training batch cannot be split over processes
    without changing its gradient (its class's `data_parallel` reason); nothing without torchrun."""
    reason = getattr(algorithm_cls, "data_parallel", None)
    if world_size() > 1 and reason:
        raise MetarunError(
            f"algorithm={algorithm_cls.name} cannot run under torchrun: {reason}. Run it in one "
            "process (without torchrun)."
        )


def all_reduce(flat: torch.Tensor) -> None:
    """Sums `flat` over the ranks in place; ProcessLost when another process is gone."""
    import torch.distributed as dist

    try:
        dist.all_reduce(flat)
    except (RuntimeError, ConnectionError) as exc:  # gloo/nccl: DistBackendError is a RuntimeError
        raise ProcessLost(_backend_text(exc)) from exc


def _backend_text(exc: Exception) -> str:
    """The gist of a backend's error: gloo's "[.../pair.cc:545] Read error [127.0.0.1]:38612:
    Connection reset by peer. This is typically caused by ..." -> "Read error ...: Connection reset
    by peer"."""
    lines = str(exc).strip().splitlines()
    text = re.sub(r"^\[[^\]]*\]\s*", "", lines[-1] if lines else "")
    return text.split(". ")[0].rstrip(".") or type(exc).__name__


def broadcast_params(params: dict) -> None:
    """Rank 0's meta-parameters on every rank (in place)."""
    import torch.distributed as dist

    if world_size() == 1:
        return
    with torch.no_grad():
        for name in sorted(params):
            dist.broadcast(params[name].data, src=0)


def train_step(
    algorithm,
    params: dict,
    optimizer,
    batch: TrainingBatch,
    stop: bool,
    out_of_time: bool = False,
) -> tuple[StepResult, torch.Tensor]:
    """One data-parallel meta-iteration (metarun.algorithms.base.meta_train_step over the ranks).

    batch: the whole meta-batch (the same on every rank); this rank computes the gradient of its
    share (mean over its items), turns it into its sum over the global meta-batch's size, and one
    all-reduce (sum) of a flat buffer gives every rank the gradient of the mean over all items, the
    mean meta-loss and accuracy, whether any rank was asked to stop (SIGTERM/SIGUSR2 may reach one
    rank first; all must stop at the same iteration) and whether any rank's time_limit ran out (each
    rank's clock differs; the runner passes rank 0's). Returns (StepResult with the global meta-loss
    and a one-element accuracy [1] = the mean over all items, flags [2]: [0] > 0 when any rank was
    asked to stop, [1] > 0 when time ran out: read them at the same iterations on every rank).
    Raises ProcessLost when another process is gone."""
    total = len(batch)
    part = share(total)
    local = part.stop - part.start
    optimizer.zero_grad(set_to_none=True)
    result = algorithm.accumulate_meta_gradient(params, batch.shard(part))
    leaves = list(params.values())
    grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in leaves]
    # this rank's sum over its tasks divided by the whole meta-batch: the sum over ranks is the mean
    scale = local / total
    flags = torch.tensor(
        [float(stop), float(out_of_time)],
        dtype=result.meta_loss.dtype,
        device=result.meta_loss.device,
    )
    # accuracy: per task, or one value for the share (the baseline's images): its mean, weighted
    stats = torch.cat(
        [torch.stack([result.meta_loss * scale, result.accuracy.mean() * scale]), flags]
    )
    flat = torch.cat([g.reshape(-1) * scale for g in grads] + [stats.to(grads[0].dtype)])
    all_reduce(flat)
    offset = 0
    for p, g in zip(leaves, grads, strict=True):
        p.grad = flat[offset : offset + g.numel()].view_as(g).clone()
        offset += g.numel()
    optimizer.step()
    loss, accuracy = flat[offset], flat[offset + 1]
    return StepResult(loss.detach(), accuracy.detach().reshape(1)), flat[offset + 2 : offset + 4]


def finish() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class NullWriter:
    """TensorBoard's SummaryWriter on ranks other than 0: every call does nothing."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None
