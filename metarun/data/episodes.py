"""N-way K-shot episodes drawn by tensor indexing on the device (no per-image Python work)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from metarun.data.classes import ClassImages
from metarun.errors import MetarunError


@dataclass
class Episodes:
    x_support: torch.Tensor  # float [B, way*shot, C, H, W], pixel / 255 (Omniglot: C = 1, ink = 1)
    y_support: torch.Tensor  # long  [B, way*shot], labels 0..way-1 in a random order per task
    x_query: torch.Tensor  # float [B, way*query, C, H, W]
    y_query: torch.Tensor  # long  [B, way*query]

    def __len__(self) -> int:
        """B: the number of tasks."""
        return self.x_support.shape[0]

    def shard(self, part: slice) -> Episodes:
        """The tasks in `part` (metarun.algorithms.base.TrainingBatch)."""
        return Episodes(
            self.x_support[part], self.y_support[part], self.x_query[part], self.y_query[part]
        )


def check_episode_shape(
    classes: ClassImages,
    split: str,
    way: int,
    shot: int,
    query: int,
    more_classes: str = "another dataset.split",
) -> None:
    """way, shot and query fit the split: errors name the setting and the fix (`more_classes`: where
    a user gets more classes for this dataset, e.g. Omniglot's dataset.split)."""
    for name, value in (("way", way), ("shot", shot), ("query", query)):
        if int(value) <= 0:
            raise MetarunError(f"{name}={value} must be a positive integer.")
    if way > classes.num_classes:
        raise MetarunError(
            f"way={way} is larger than the {classes.num_classes} classes of the {split} split: "
            f"use way<={classes.num_classes} or {more_classes}."
        )
    if shot + query > classes.per_class:
        unequal = int(classes.counts.max()) != classes.per_class
        smallest = f" of class {classes.smallest_class!r}" if unequal else ""
        raise MetarunError(
            f"shot+query={shot}+{query}={shot + query} is more than the {classes.per_class} images "
            f"per class{smallest} in the {split} split: lower shot or query so that "
            f"shot+query<={classes.per_class}"
            + (", or give that class more images." if unequal else ".")
        )


class SeededDraws:
    """A generator on `device` re-seeded before every draw from (seed, number of draws so far): the
    whole state is that counter, a plain dict that fits any device (a raw generator state is
    device-specific), so a resumed run draws what it would have drawn, also on another device type
    (there with that device's generator: deterministic, not the same numbers)."""

    def __init__(self, seed: int, device):
        self.generator = torch.Generator(device=device)
        self.seed, self.draws = int(seed), 0

    def next_generator(self) -> torch.Generator:
        """The generator, seeded for the next draw."""
        self.generator.manual_seed(draw_seed(self.seed, self.draws))
        self.draws += 1
        return self.generator

    def state(self) -> dict:
        """{"seed", "draws"}: plain ints, the same on every device (generator states are
        device-specific)."""
        return {"seed": self.seed, "draws": self.draws}

    def load_state(self, state: dict) -> None:
        """Continues from `state()`; raises MetarunError for anything else (e.g. a raw generator
        state)."""
        if not (
            isinstance(state, dict)
            and isinstance(state.get("seed"), int)
            and isinstance(state.get("draws"), int)
            and state["draws"] >= 0
        ):
            raise MetarunError(
                f"the sampler state {type(state).__name__} is not a metarun sampler state "
                "({'seed', 'draws'}): the checkpoint is damaged or from another version."
            )
        self.seed, self.draws = state["seed"], state["draws"]


class EpisodeSampler(SeededDraws):
    """Draws meta-batches of tasks from one split.

    Per task: `way` classes without replacement, `shot`+`query` distinct images of each (so no image
    is in both support and query; classes may differ in size), optionally one rotation by k*90
    degrees per class (the MAML paper's augmentation: a rotated character is a new class), and a
    random assignment of labels 0..way-1. Images: uint8 [N, C, H, W] on `device`; episodes: float
    [B, way*(shot|query), C, H, W]. Random numbers come from the sampler's own generator (on
    `index_device`), re-seeded before every draw from (seed, number of draws so far): the same seed
    gives the same tasks, and the sampler's whole state is that counter (`state()`), a plain dict
    that fits any device, so a resumed run draws what it would have drawn, and a run continued on
    another device type continues too (there the draws after the resume come from that device's
    generator, deterministic but not the same numbers as the old device's).
    """

    def __init__(
        self,
        classes: ClassImages,
        split: str,
        way: int,
        shot: int,
        query: int,
        device,
        seed: int,
        rotate: bool = False,
        index_device=None,
    ):
        check_episode_shape(classes, split, way, shot, query)
        self.way, self.shot, self.query, self.rotate = way, shot, query, rotate
        self.device = torch.device(device)
        if rotate and classes.images.shape[-1] != classes.images.shape[-2]:
            raise MetarunError(
                f"dataset.rotate=true needs square images, not {tuple(classes.images.shape[-2:])}: "
                "set dataset.rotate=false."
            )
        self.images = classes.images.to(
            self.device
        )  # uint8 [N, C, H, W]: 4x less memory, cast per episode
        self.starts, self.counts = classes.starts.to(self.device), classes.counts.to(self.device)
        self.max_count = int(classes.counts.max())
        # Classes of unequal size: positions past a class's count get a key above every rand() draw,
        # so argsort picks only real images; with equal classes nothing changes (and neither do the
        # random streams).
        self.ragged = int(classes.counts.min()) != self.max_count
        self.index_device = torch.device(index_device) if index_device is not None else self.device
        super().__init__(seed, self.index_device)
        side = self.images.shape[-1]
        grid = torch.arange(side * side).view(side, side)
        # Flat pixel index of each rotation, so one gather rotates every class by its own k.
        self.rotations = torch.stack(
            [torch.rot90(grid, k, dims=(0, 1)).reshape(-1) for k in range(4)]
        ).to(self.device)

    @classmethod
    def training(cls, cfg, classes: ClassImages, device) -> EpisodeSampler:
        """A run's training episodes: the train split at cfg.way/shot/query, seeded by cfg.seed,
        rotated by cfg.dataset.rotate."""
        return cls(
            classes,
            "train",
            int(cfg.way),
            int(cfg.shot),
            int(cfg.query),
            device,
            seed=int(cfg.seed),
            rotate=bool(cfg.dataset.rotate),
        )

    def sample(self, meta_batch: int) -> Episodes:
        B, way, shot, per_task = meta_batch, self.way, self.shot, self.shot + self.query
        num_classes, per_class = len(self.counts), self.max_count
        C, H, W = self.images.shape[1:]
        g, dev = self.next_generator(), self.index_device
        classes = torch.rand(B, num_classes, generator=g, device=dev).argsort(dim=1)[:, :way]
        keys = torch.rand(B, way, per_class, generator=g, device=dev)
        if self.ragged:
            counts = self.counts.to(dev)[classes]  # [B, way]
            keys = keys.masked_fill(
                torch.arange(per_class, device=dev) >= counts.unsqueeze(-1), 2.0
            )
        picks = keys.argsort(dim=2)[:, :, :per_task]
        labels = torch.rand(B, way, generator=g, device=dev).argsort(dim=1)
        turns = torch.randint(0, 4, (B, way), generator=g, device=dev) if self.rotate else None
        classes, picks, labels = (
            classes.to(self.device),
            picks.to(self.device),
            labels.to(self.device),
        )
        x = self.images[self.starts[classes].unsqueeze(-1) + picks]  # [B, way, S+Q, C, H, W] uint8
        if turns is not None:
            flat = x.reshape(B, way, per_task, C, H * W)
            index = self.rotations[turns.to(self.device)][:, :, None, None, :].expand(
                -1, -1, per_task, C, -1
            )
            x = flat.gather(4, index).view(B, way, per_task, C, H, W)
        x = x.float().div_(255.0)  # cast per episode
        y = labels.unsqueeze(-1)
        return Episodes(
            x[:, :, :shot].reshape(B, way * shot, C, H, W),
            y.expand(B, way, shot).reshape(B, way * shot),
            x[:, :, shot:].reshape(B, way * self.query, C, H, W),
            y.expand(B, way, self.query).reshape(B, way * self.query),
        )


def draw_seed(seed: int, draw: int) -> int:
    """The generator seed of draw number `draw` of a sampler seeded with `seed`: splitmix64 of the
    pair, so nearby (seed, draw) pairs give unrelated streams (Steele, Lea & Flood 2014,
    SplitMix)."""
    z = (int(seed) * 0x9E3779B97F4A7C15 + (int(draw) + 1) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) & 0x7FFFFFFFFFFFFFFF  # manual_seed takes a signed 64-bit value


def fixed_tasks(
    classes: ClassImages,
    split: str,
    way: int,
    shot: int,
    query: int,
    device,
    tasks: int,
    seed: int,
    chunk: int,
    rotate: bool = False,
):
    """A fixed, seeded list of evaluation tasks, yielded in chunks of `chunk` tasks.

    Task i is drawn alone, from the generator seeded by (seed, i), on the CPU: the list depends only
    on the seed, the split's classes and the episode shape, never on the device, `chunk` or `tasks`
    (the first 100 of 600 tasks are the 100 tasks), so two checkpoints are compared on the same
    tasks. rotate=True rotates each task's classes by a random multiple of 90 degrees as in training
    (cbfinn/maml's validation and test tasks; dataset.rotate_eval): other tasks than rotate=False's.
    """
    sampler = EpisodeSampler(
        classes, split, way, shot, query, device, seed, rotate=rotate, index_device="cpu"
    )
    done = 0
    while done < tasks:
        n = min(chunk, tasks - done)
        parts = [sampler.sample(1) for _ in range(n)]
        yield Episodes(
            *(
                torch.cat([getattr(p, f) for p in parts])
                for f in ("x_support", "y_support", "x_query", "y_query")
            )
        )
        done += n
