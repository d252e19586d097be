"""The MAML paper's sinusoid regression (Finn et al. 2017, Sec. 5.1; cbfinn/maml data_generator.py
generate_sinusoid_batch, lines 162-174): a task is y = A sin(x - phase), with A ~ U[amp_range]
(0.1, 5.0), phase ~ U[phase_range] (0, pi) and its points x ~ U[input_range] (-5, 5); K support and
K query points per task (data_generator draws update_batch_size * 2 points, main.py lines 101-104
split them in half).

Tasks are generated on the fly, never stored. Training tasks come from a SeededDraws generator (the
same seed gives the same tasks, and a resumed run continues the stream); the validation and test
tasks are fixed: task i of a split is drawn alone from the generator seeded by (eval_seed, the
split, i), so two checkpoints are scored on the same tasks and the first 100 of 600 tasks are the
100 tasks, as data/episodes.fixed_tasks for images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from metarun.data.episodes import Episodes, SeededDraws, draw_seed
from metarun.errors import MetarunError

SPLITS = ("train", "val", "test")
DIM = 1  # one input, one output


@dataclass
class SineEpisodes(Episodes):
    """Episodes of sinusoid tasks: x float [B, K, 1], y float [B, K, 1]; amp, phase [B] (the
    functions, for pictures of the ground truth)."""

    amp: torch.Tensor = None
    phase: torch.Tensor = None


@dataclass(frozen=True)
class SineTasks:
    """The task distribution of one split (all splits share it; the fixed tasks differ by split)."""

    split: str
    amp_range: tuple[float, float]
    phase_range: tuple[float, float]
    input_range: tuple[float, float]

    def draw(self, tasks: int, shot: int, query: int, g: torch.Generator) -> SineEpisodes:
        """`tasks` functions and shot + query points of each, from generator g (on the CPU)."""
        amp = _uniform(self.amp_range, (tasks,), g)
        phase = _uniform(self.phase_range, (tasks,), g)
        x = _uniform(self.input_range, (tasks, shot + query, DIM), g)
        y = amp[:, None, None] * torch.sin(x - phase[:, None, None])
        return SineEpisodes(x[:, :shot], y[:, :shot], x[:, shot:], y[:, shot:], amp, phase)

    def training_sampler(self, cfg, device) -> SineSampler:
        """A run's training tasks: cfg.shot support and cfg.query query points per task, seeded
        by cfg.seed."""
        return SineSampler(self, int(cfg.shot), int(cfg.query), device, int(cfg.seed))

    def fixed_tasks(self, cfg, device, tasks: int, seed: int, chunk: int):
        """The split's fixed tasks, yielded in chunks of `chunk`; task i depends only on (seed,
        the split, i) and the shape (shot, query)."""
        salt = draw_seed(seed, 1_000_003 + SPLITS.index(self.split))
        g, done = torch.Generator(), 0
        while done < tasks:
            n = min(chunk, tasks - done)
            parts = []
            for i in range(done, done + n):
                g.manual_seed(draw_seed(salt, i))
                parts.append(self.draw(1, int(cfg.shot), int(cfg.query), g))
            yield _to(_cat(parts), device)
            done += n


class SineSampler(SeededDraws):
    """Meta-batches of training tasks (drawn on the CPU: a few hundred numbers, then moved)."""

    def __init__(self, tasks: SineTasks, shot: int, query: int, device, seed: int):
        super().__init__(seed, "cpu")
        self.tasks, self.shot, self.query, self.device = tasks, shot, query, torch.device(device)

    def sample(self, meta_batch: int) -> SineEpisodes:
        g = self.next_generator()
        return _to(self.tasks.draw(int(meta_batch), self.shot, self.query, g), self.device)


def _uniform(bounds, shape, g: torch.Generator) -> torch.Tensor:
    low, high = float(bounds[0]), float(bounds[1])
    return low + (high - low) * torch.rand(shape, generator=g)


def _cat(parts: list[SineEpisodes]) -> SineEpisodes:
    fields = ("x_support", "y_support", "x_query", "y_query", "amp", "phase")
    return SineEpisodes(*(torch.cat([getattr(p, f) for p in parts]) for f in fields))


def _to(ep: SineEpisodes, device) -> SineEpisodes:
    fields = ("x_support", "y_support", "x_query", "y_query", "amp", "phase")
    return SineEpisodes(*(getattr(ep, f).to(device) for f in fields))


def _range(cfg, key: str) -> tuple[float, float]:
    value = cfg.get(key)
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        raise MetarunError(f"dataset.{key}={value} must be two numbers [low, high].") from None
    if not (math.isfinite(low) and math.isfinite(high) and low <= high):
        raise MetarunError(f"dataset.{key}={value} must be [low, high] with low <= high.")
    return low, high


def load_sinusoid(cfg) -> tuple[dict[str, SineTasks], str]:
    """({split: SineTasks}, a description) of the dataset config."""
    amp, phase, inputs = (_range(cfg, k) for k in ("amp_range", "phase_range", "input_range"))
    splits = {s: SineTasks(s, amp, phase, inputs) for s in SPLITS}
    where = (
        f"sinusoid tasks generated on the fly (amplitude U{list(amp)}, phase "
        f"U[{phase[0]:g}, {phase[1]:g}], x U{list(inputs)})"
    )
    return splits, where
