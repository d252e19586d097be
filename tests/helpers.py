"""Helpers shared by the test modules (plain functions and constants; the fixtures are in
conftest.py): tiny Omniglot archives, `metarun` in a subprocess, random episodes and reference
meta-gradients, checkpoint and config helpers."""

from __future__ import annotations

import csv
import io
import os
import random
import subprocess
import sys
import zipfile
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from PIL import Image, ImageDraw

from metarun import cli
from metarun.algorithms.maml import MAML
from metarun.algorithms.mamlpp import MAMLPlusPlus
from metarun.algorithms.metasgd import MetaSGD
from metarun.data.classes import ClassImages
from metarun.data.episodes import Episodes
from metarun.models.conv4 import Conv4
from metarun.runner import train as train_module

REPO = Path(__file__).resolve().parent.parent


def character_image(character_seed: int, drawer: int) -> Image.Image:
    """A 105x105 1-bit image: the character's strokes (fixed per character) drawn with a per-drawer
    jitter."""
    rng = random.Random(character_seed)
    strokes = [[(rng.randint(10, 95), rng.randint(10, 95)) for _ in range(3)] for _ in range(3)]
    jitter = random.Random(character_seed * 1000 + drawer)
    img = Image.new("1", (105, 105), 1)
    draw = ImageDraw.Draw(img)
    for stroke in strokes:
        pts = [(x + jitter.randint(-3, 3), y + jitter.randint(-3, 3)) for x, y in stroke]
        draw.line(pts, fill=0, width=4)
    return img


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


LAYOUT = {"images_background": 4, "images_evaluation": 2}  # alphabets per archive


CHARACTERS_PER_ALPHABET = 8


DRAWERS = 20


def make_omniglot(
    root: Path,
    as_zip: bool = True,
    layout=None,
    characters=CHARACTERS_PER_ALPHABET,
    drawers=DRAWERS,
) -> Path:
    """Writes images_background and images_evaluation (zips or folders) under root; returns root."""
    root.mkdir(parents=True, exist_ok=True)
    seed = 0
    for archive, alphabets in (layout or LAYOUT).items():
        members = {}
        for a in range(alphabets):
            alphabet = f"{'Bg' if archive.endswith('background') else 'Ev'}_Alphabet_{a}"
            for c in range(1, characters + 1):
                seed += 1
                for d in range(1, drawers + 1):
                    members[f"{archive}/{alphabet}/character{c:02d}/{seed:04d}_{d:02d}.png"] = (
                        png_bytes(character_image(seed, d))
                    )
        if as_zip:
            with zipfile.ZipFile(root / f"{archive}.zip", "w") as zf:
                for name, data in members.items():
                    zf.writestr(name, data)
        else:
            for name, data in members.items():
                path = root / name
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
    return root


def run_metarun(
    *args, cwd: Path, env_extra: dict | None = None, timeout: int = 300, check: bool = False
):
    env = {k: v for k, v in os.environ.items() if k not in ("METARUN_DATA", "METARUN_DEBUG")}
    env.update(env_extra or {})
    proc = subprocess.run(
        [sys.executable, "-m", "metarun.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"metarun {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


# Small enough to run in seconds on 2 CPU cores, large enough to exercise every part of a run.
TINY_TRAIN = [
    "way=3",
    "shot=1",
    "query=2",
    "meta_batch=2",
    "update_step=1",
    "update_step_test=2",
    "iterations=6",
    "eval_every=3",
    "val_tasks=4",
    "test_tasks=6",
    "log_every=2",
    "eval_chunk=4",
    "model.filters=8",
    "device=cpu",
]


def tiny_args(root: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        "train",
        *TINY_TRAIN,
        f"dataset.root={root}",
        f"dataset.cache_dir={root / 'cache'}",
        f"hydra.run.dir={run_dir}",
        *extra,
    ]


def random_episodes(tasks, way, shot, query, side=16, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)

    def labels(n):
        return torch.stack(
            [torch.randperm(way, generator=g).repeat_interleave(n) for _ in range(tasks)]
        )

    return Episodes(
        torch.rand(tasks, way * shot, 1, side, side, generator=g, dtype=dtype),
        labels(shot),
        torch.rand(tasks, way * query, 1, side, side, generator=g, dtype=dtype),
        labels(query),
    )


def plain_forward(p, x, downsample):
    """The learner written out for one task, independently of metarun's batched model."""
    h = x
    for i in range(4):
        h = F.conv2d(
            h,
            p[f"conv{i}.weight"],
            p[f"conv{i}.bias"],
            stride=2 if downsample == "stride" else 1,
            padding=1,
        )
        mean = h.mean(dim=(0, 2, 3), keepdim=True)
        var = h.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
        h = (h - mean) / torch.sqrt(var + 1e-3) * p[f"bn{i}.weight"].view(1, -1, 1, 1) + p[
            f"bn{i}.bias"
        ].view(1, -1, 1, 1)
        h = F.relu(h)
        if downsample == "maxpool":
            h = F.max_pool2d(h, 2)
    h = h.mean(dim=(2, 3)) if downsample == "stride" else h.flatten(1)
    return h @ p["fc.weight"].t() + p["fc.bias"]


def reference_gradient(params, ep, way, update_lr, update_step, first_order, downsample):
    """Per-task Python loop with torch.autograd.grad(create_graph=True): the definition of MAML."""
    names = list(params)
    leaves = [params[k].detach().clone().requires_grad_(True) for k in names]
    losses = []
    for t in range(ep.x_support.shape[0]):
        fast = leaves
        for _ in range(update_step):
            logits = plain_forward(dict(zip(names, fast, strict=True)), ep.x_support[t], downsample)
            loss = F.cross_entropy(logits, ep.y_support[t], reduction="sum") / (
                len(ep.y_support[t]) // way
            )
            grads = torch.autograd.grad(loss, fast, create_graph=not first_order)
            fast = [w - update_lr * g for w, g in zip(fast, grads, strict=True)]
        losses.append(
            F.cross_entropy(
                plain_forward(dict(zip(names, fast, strict=True)), ep.x_query[t], downsample),
                ep.y_query[t],
            )
        )
    return dict(zip(names, torch.autograd.grad(torch.stack(losses).mean(), leaves), strict=True))


def metarun_gradient(maml, params, ep):
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    maml.accumulate_meta_gradient(leaves, ep)
    return {k: v.grad for k, v in leaves.items()}


def relative_error(a: dict, b: dict) -> float:
    diff = torch.cat([(a[k] - b[k]).flatten() for k in b])
    return (diff.norm() / torch.cat([v.flatten() for v in b.values()]).norm()).item()


def synthetic_tasks(pool, tasks, way, shot, query, g, noise=0.35):
    """Classes are fixed random patterns seen through noise; labels are shuffled per task."""
    chosen = torch.stack([torch.randperm(len(pool), generator=g)[:way] for _ in range(tasks)])
    labels = torch.stack([torch.randperm(way, generator=g) for _ in range(tasks)])

    def draw(n):
        x = pool[chosen].unsqueeze(2).expand(-1, -1, n, -1, -1, -1)
        x = x + noise * torch.randn(x.shape, generator=g)
        return x.reshape(tasks, way * n, *pool.shape[1:]), labels.unsqueeze(-1).expand(
            -1, -1, n
        ).reshape(tasks, -1)

    xs, ys = draw(shot)
    xq, yq = draw(query)
    return Episodes(xs, ys, xq, yq)


def assert_clean_error(proc, *fragments):
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr
    line = [ln for ln in proc.stderr.splitlines() if ln.startswith("metarun: error:")]
    assert len(line) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in line[0], (fragment, line[0])


def ckpt(run, name="last.pt"):
    return torch.load(run / "checkpoints" / name, map_location="cpu", weights_only=True)


def strip(args, *prefixes):
    return [a for a in args if not a.startswith(prefixes)]


def compose_train(*overrides):
    with initialize_config_dir(config_dir=cli.CONF, version_base="1.3"):
        return hydra_compose(config_name="train", overrides=list(overrides))


def leaves(cfg, prefix=""):
    for key, value in cfg.items():
        if isinstance(value, dict):
            yield from leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


WAY = 3


def reference(
    meta,
    ep,
    steps,
    lr_of,
    weights_at,
    adapted,
    loss_weights=None,
    second_order=True,
    inner="sum_over_shot",
):
    """The definition, one task at a time with the plain learner: `steps` SGD steps w <- w -
    lr_of(k, s) * g on the `adapted` weights, forward passes with weights_at(leaves, fast, s); the
    outer objective is sum_s loss_weights[s] * query loss after step s (None: the last step's).
    Returns {name: d mean / d meta}."""
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in meta.items()}
    totals = []
    for t in range(ep.x_support.shape[0]):
        fast = {k: leaves[k] for k in adapted}
        query = []
        for s in range(steps):
            logits = plain_forward(weights_at(leaves, fast, s), ep.x_support[t], "stride")
            if inner == "mean":
                loss = F.cross_entropy(logits, ep.y_support[t])
            else:
                loss = F.cross_entropy(logits, ep.y_support[t], reduction="sum") / (
                    len(ep.y_support[t]) // WAY
                )
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=second_order)
            fast = {
                k: w - lr_of(leaves, k, s) * g
                for (k, w), g in zip(fast.items(), grads, strict=True)
            }
            query.append(
                F.cross_entropy(
                    plain_forward(weights_at(leaves, fast, s), ep.x_query[t], "stride"),
                    ep.y_query[t],
                )
            )
        totals.append(
            query[-1]
            if loss_weights is None
            else sum(w * q for w, q in zip(loss_weights, query, strict=True))
        )
    grads = torch.autograd.grad(
        torch.stack(totals).mean(), list(leaves.values()), allow_unused=True
    )
    return {
        k: torch.zeros_like(leaves[k]) if g is None else g
        for k, g in zip(leaves, grads, strict=True)
    }


def build(name, model, **kw):
    if name == "maml":
        return MAML(model, 0.4, 1, 1, impl="batched", **kw)
    if name == "metasgd":
        return MetaSGD(model, 0.4, 1, 1, impl="batched", **kw)
    return MAMLPlusPlus(
        model,
        0.4,
        2,
        2,
        impl="batched",
        inner_loss="sum_over_shot",
        msl_epochs=2,
        iterations=100,
        iterations_per_epoch=25,
        meta_lr=1e-2,
        **kw,
    )


class Flat(nn.Module):
    """Identity body and a linear head `fc`: the baseline's features are the inputs themselves."""

    def __init__(self, way=4):
        super().__init__()
        self.fc = nn.Linear(4, way)

    def forward(self, x):
        return self.fc(x.flatten(1))


def labelled_classes(num_classes=10, per_class=20, side=6):
    """Each image carries its (class, image) id in its pixels, so tasks can be inspected exactly."""
    images = torch.zeros(num_classes, per_class, side, side, dtype=torch.uint8)
    for c in range(num_classes):
        for i in range(per_class):
            images[c, i, 0, 0] = c + 1  # top-left marks class, rotation moves it
            images[c, i, 0, 1] = i + 1
    return ClassImages(images, [f"c{c}" for c in range(num_classes)])


def ids(x):
    """(class, image, turns) of every image of an episode tensor [..., 1, H, W] (pixel values were
    id+1)."""
    x = (x.squeeze(-3) * 255).round().long()
    out = []
    for img in x.reshape(-1, *x.shape[-2:]):
        for k in range(4):
            r = torch.rot90(img, -k, dims=(0, 1))
            if r[0, 0] > 0 and r[0, 1] > 0:
                out.append((int(r[0, 0]) - 1, int(r[0, 1]) - 1, k))
                break
    return out


def compose(*overrides):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=list(overrides))


def settings(tiny_root, run_dir, *extra) -> list[str]:
    """tiny_args without the command and the hydra.* settings: what train() gets as overrides."""
    return [a for a in tiny_args(tiny_root, run_dir, *extra)[1:] if not a.startswith("hydra.")]


def train_in_process(tiny_root, run_dir: Path, *extra) -> dict:
    """metarun.runner.train.train of the tiny settings plus `extra`, in this process."""
    overrides = settings(tiny_root, run_dir, *extra)
    with initialize_config_dir(config_dir=cli.CONF, version_base="1.3"):
        cfg = hydra_compose(config_name="train", overrides=overrides)
    return train_module.train(cfg, run_dir, overrides)


def setup(seed=1, tasks=3):
    model = Conv4(WAY, filters=6, image_size=16)
    return model, random_episodes(tasks=tasks, way=WAY, shot=2, query=2, seed=seed)


def learner(meta, model):
    return [k for k in model.init_params() if k in meta]


def colour(class_id: int, image_id: int) -> tuple[int, int, int]:
    """Each image's pixels carry (class, image) so loaded tensors can be traced back to files."""
    return (class_id + 1, image_id + 1, 200)


def write_image(path: Path, rgb, size=8, fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), rgb).save(path, format=fmt)


def make_miniimagenet(root: Path, per_class: int, classes=(5, 5, 5), size=84) -> Path:
    """Ravi & Larochelle's layout: images/<n0...>.jpg and train/val/test.csv with filename,label
    rows."""
    k = 0
    for split, n_classes in zip(("train", "val", "test"), classes, strict=True):
        rows = [("filename", "label")]
        for _ in range(n_classes):
            label = f"n{1000 + k:08d}"
            for i in range(per_class):
                name = f"{label}{i + 1:08d}.jpg"
                write_image(root / "images" / name, colour(k, i), size, "JPEG")
                rows.append((name, label))
            k += 1
        with open(root / f"{split}.csv", "w", newline="") as fh:
            csv.writer(fh).writerows(rows)
    return root
