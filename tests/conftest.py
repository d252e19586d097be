"""Tiny Omniglot datasets in the real file layout, built by the tests themselves (no network)."""

from __future__ import annotations

import io
import os
import random
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

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


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    """48 characters (32 background, 16 evaluation) x 20 drawers, as zip archives."""
    return make_omniglot(tmp_path_factory.mktemp("omniglot"))


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
