"""Turning a config into the run's parts: device, data splits, samplers, learner, algorithm."""

from __future__ import annotations

import os
import sys

import torch

from metarun import settings
from metarun.algorithms import algorithm_class
from metarun.algorithms.engine import AUTOCASTS, Engine, resolve_impl
from metarun.data.episodes import EpisodeSampler, check_episode_shape
from metarun.data.registry import load_dataset
from metarun.errors import MetarunError
from metarun.models.learner import build_learner
from metarun.runner.evaluate import eval_query
from metarun.tasks import family_of


def resolve_device(name: str) -> torch.device:
    name = str(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise MetarunError(
            f"device={name} is not a device: use auto, cpu, cuda or cuda:N."
        ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise MetarunError(
                f"device={name} but this machine has no usable CUDA: use device=cpu or device=auto."
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise MetarunError(
                f"device={name} but only {torch.cuda.device_count()} CUDA device(s) exist: "
                f"use cuda:0..cuda:{torch.cuda.device_count() - 1}."
            )
    elif device.type != "cpu":
        raise MetarunError(f"device={name} is not supported: use auto, cpu, cuda or cuda:N.")
    return device


def check_train_settings(cfg) -> None:
    """The settings that need no data, checked before anything is loaded: each one's type and range
    as metarun/settings.py declares them (way >= 2, positive step sizes ...), and the algorithm's
    name, and that a generated task family has a learner for it. Raises MetarunError (one line
    naming the setting)."""
    family, model = family_of(cfg), cfg.get("model") or {}
    if family.name == "regression" and "_target_" not in model and model.get("name") != "mlp":
        raise MetarunError(
            f"dataset={cfg.dataset.name} is regression and needs a learner with one output per "
            f"point: add model=mlp (model={model.get('name')} classifies images), or use "
            "experiment=sinusoid_10shot."
        )
    settings.validate(cfg, "train")
    algorithm_class(str(cfg.algorithm.name))


def load_splits(cfg, device) -> dict:
    """{split name: ClassImages} of the configured dataset, with the episode shape checked on each
    split."""
    splits, where = load_dataset(cfg.dataset)
    if hasattr(splits["train"], "fixed_tasks"):  # generated tasks (data/sinusoid.py): no images
        return {"splits": splits, "source": where}
    # Omniglot's split protocols hold different class counts; other datasets have fixed splits
    more = (
        "another dataset.split"
        if "split" in cfg.dataset
        else "a dataset with more classes per split"
    )
    for name, classes in splits.items():
        # validation and test tasks draw query_test images per class (null: query)
        query = int(cfg.query) if name == "train" else eval_query(cfg)
        check_episode_shape(classes, name, int(cfg.way), int(cfg.shot), query, more)
    have = splits["train"].channels
    channels = int(cfg.model.get("in_channels", have))
    if channels != have:
        raise MetarunError(
            f"model.in_channels={channels} but the {cfg.dataset.name} images have {have} "
            f"channel(s): leave model.in_channels=${{dataset.channels}} or set it to {have}."
        )
    return {"splits": splits, "source": where}


def describe_splits(splits: dict) -> str:
    """` (train 1100 classes, val 100 classes, test 423 classes)`; empty for generated tasks."""
    if not all(hasattr(v, "num_classes") for v in splits.values()):
        return ""
    return f" ({', '.join(f'{k} {v.num_classes} classes' for k, v in splits.items())})"


def train_sampler(cfg, classes, device) -> EpisodeSampler:
    return EpisodeSampler.training(cfg, classes, device)


def cpu_threads(setting: int) -> int:
    """The `threads` setting resolved: 0 means every core this process may use, shared equally by
    the processes torchrun started on this machine (LOCAL_WORLD_SIZE), so that they do not
    oversubscribe it."""
    if int(setting) > 0:
        return int(setting)
    cores = (
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    )
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def apply_threads(threads: int, impl: str) -> int:
    """Sets torch's intra-op thread count once for the process: 1 per worker for `parallel` (its
    workers are the threads), else `threads`. Returns the number of threads the run computes on."""
    torch.set_num_threads(1 if impl == "parallel" else int(threads))
    return int(threads) if impl == "parallel" else torch.get_num_threads()


def apply_precision(cfg, device) -> None:
    """`tf32` (CUDA matmuls and cuDNN convolutions in TensorFloat-32), set once for the process; on
    CUDA it is set either way, because cuDNN allows TF32 by default. `autocast` is checked here,
    applied by the engine. Both default off until measured on a GPU (README, Performance)."""
    tf32, autocast = cfg.get("tf32", False), str(cfg.get("autocast", "none"))
    if not isinstance(tf32, bool):
        raise MetarunError(f"tf32={tf32} must be true or false.")
    if autocast not in AUTOCASTS:
        raise MetarunError(f"autocast={autocast} is not a setting: use none or bf16 (CUDA).")
    if device.type != "cuda":
        if tf32 or autocast != "none":
            raise MetarunError(
                f"tf32={str(tf32).lower()} autocast={autocast} need device=cuda: leave "
                "tf32=false autocast=none on the CPU."
            )
        return
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32


CPU_ALLOCATORS = settings.find("cpu_allocator").choices  # tuned, system
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
# Blocks below the mmap threshold come from the heap. Some glibc builds cap it at HEAP_MAX_SIZE / 2
# (32 MiB on 64-bit): the second value is the fallback.
MMAP_THRESHOLDS = (2**30, 32 * 2**20)
TRIM_THRESHOLD = 2**30


def check_cpu_allocator(setting: str) -> None:
    """Raises MetarunError unless `setting` is one of CPU_ALLOCATORS."""
    settings.check_value("cpu_allocator", setting)


def apply_cpu_allocator(setting: str) -> bool:
    """`cpu_allocator=tuned` (default): glibc's malloc keeps freed memory for reuse (mallopt: blocks
    up to 1 GiB from the heap, the heap trimmed only above 1 GiB free) instead of its defaults,
    which unmap large blocks and trim the heap's top as soon as they are freed. Graphs freed every
    task (`algorithm.impl=loop`, evaluation chunks) then page-faulted their memory back in on every
    task: README, Performance. Peak memory is unchanged (the same blocks are reused). `system`:
    glibc's defaults. Returns whether it was applied (False off Linux/glibc, e.g. another allocator
    preloaded). Raises MetarunError for another value."""
    check_cpu_allocator(setting)
    if setting == "system" or not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own C library
    except (OSError, AttributeError):
        return False
    mmap = any(mallopt(M_MMAP_THRESHOLD, value) for value in MMAP_THRESHOLDS)
    return mmap and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def configure_execution(cfg, device, saved: dict | None = None) -> dict:
    """The run's execution, resolved and applied once (`metarun train`, `metarun eval` and
    scripts/bench.py all call this): {"impl", "workers", "threads"}. `saved`: a resumed checkpoint's
    {"impl", "workers"}, which the run keeps (float32 results depend on the operation order)."""
    threads = cpu_threads(cfg.get("threads", 0))
    apply_precision(cfg, device)
    apply_cpu_allocator(str(cfg.get("cpu_allocator", "tuned")))
    if saved is not None and saved.get("impl") and saved.get("workers"):
        impl, workers = str(saved["impl"]), int(saved["workers"])
        threads = workers if impl == "parallel" else threads
    else:
        impl = resolve_impl(str(cfg.algorithm.impl), device, threads)
        workers = threads if impl == "parallel" else 1
    apply_threads(threads, impl)
    return {"impl": impl, "workers": workers, "threads": threads}


def build_algorithm(cfg, device, execution: dict | None = None) -> tuple:
    """(learner, algorithm) of cfg.algorithm.name; `execution` from configure_execution (None: the
    config's impl resolved with torch's current thread count, nothing applied)."""
    cls = algorithm_class(str(cfg.algorithm.name))
    cls.check_family(family_of(cfg))  # before the algorithm's own checks: the first reason
    model = build_learner(cfg)
    if execution is None:
        engine = Engine(
            str(cfg.algorithm.impl),
            0,
            int(cfg.algorithm.task_chunk),
            device,
            autocast=str(cfg.get("autocast", "none")),
        )
    else:
        engine = Engine(
            execution["impl"],
            execution["workers"],
            int(cfg.algorithm.task_chunk),
            device,
            autocast=str(cfg.get("autocast", "none")),
        )
    algorithm = cls.from_config(cfg, model, engine)
    algorithm.bind_family(family_of(cfg))  # its losses and metric (metarun/tasks.py)
    return model, algorithm
