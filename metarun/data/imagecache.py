"""Decoding image files once into a uint8 cache, shared by the file-based datasets (folder,
miniImageNet).

Same style as Omniglot's cache: one `torch.save` file of plain tensors, lists and strings (loads
with `weights_only=True`), written atomically, keyed by a fingerprint of the source files and the
settings, and rebuilt when that fingerprint changes or the file is unreadable.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from metarun.data.classes import ClassImages, check_splits
from metarun.data.omniglot import save_cache
from metarun.errors import MetarunError

log = logging.getLogger("metarun")

CACHE_FORMAT = "metarun-class-images-cache-v1"
SPLITS = ("train", "val", "test")
MODES = {1: "L", 3: "RGB"}
# 16-bit grey as PIL opens it (I;16 little-endian, I;16B big-endian, I;16N native).
SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
# Part of every file fingerprint: a new version rebuilds the caches whose pixels it decodes
# differently (v2: 16-bit grey scaled to 8 bits, where v1 clipped it at 255).
DECODE_VERSION = 2


def default_cache_dir(root: Path, cache_dir) -> Path:
    """dataset.cache_dir if set, else the data root if writable, else ~/.cache/metarun (as
    Omniglot)."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    if root.is_dir() and os.access(root, os.W_OK):
        return root
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "metarun"


def check_image_settings(image_size, channels) -> tuple[int, int]:
    size, channels = int(image_size), int(channels)
    if size <= 0:
        raise MetarunError(
            f"dataset.image_size={size} must be a positive number of pixels (e.g. 84)."
        )
    if channels not in MODES:
        raise MetarunError(f"dataset.channels={channels} must be 1 (grayscale) or 3 (RGB).")
    return size, channels


def files_fingerprint(
    splits: dict[str, dict[str, list[Path]]], size: int, channels: int, extra: str = ""
) -> str:
    """sha256 of every file's (path, size, mtime), the split membership and the decode settings."""
    h = hashlib.sha256(f"{CACHE_FORMAT}:{DECODE_VERSION}:{size}:{channels}:{extra}".encode())
    for split in SPLITS:
        for name, files in splits[split].items():
            h.update(f"\n{split}/{name}".encode())
            for f in files:
                st = f.stat()
                h.update(f"|{f}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def eight_bit(img: Image.Image, path: Path) -> Image.Image:
    """`img` in a mode whose convert("L"/"RGB") keeps its grey levels. PIL's convert clips integer
    pixels at 255 instead of scaling them, so 16-bit grey (modes I;16*, and mode I as PNG and
    PGM/PPM files open in it: 0..65535) is scaled to 8 bits here, v * 255 / 65535 rounded. 32-bit
    integer (mode I of other formats, e.g. TIFF) and floating-point (mode F) pixels have no defined
    white level: a MetarunError names the file and its mode."""
    if img.mode in SIXTEEN_BIT or (img.mode == "I" and img.format in ("PNG", "PPM")):
        values = np.clip(np.asarray(img).astype(np.int64), 0, 65535)
        return Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8))  # mode L
    if img.mode in ("I", "F"):
        kind = "32-bit integer" if img.mode == "I" else "floating-point"
        raise MetarunError(
            f"the image {path} has {kind} pixels (PIL mode {img.mode}), which have no defined "
            "white level to scale to 8 bits: save it as an 8-bit or 16-bit PNG, or a JPEG."
        )
    return img


def decode_image(path: Path, size: int, channels: int) -> np.ndarray:
    """One file -> uint8 [channels, size, size]; 16-bit grey scaled to 8 bits (eight_bit), resized
    with PIL's (antialiased) bilinear filter if needed. Raises MetarunError naming a file it cannot
    use."""
    try:
        with Image.open(path) as img:
            img = eight_bit(img, path).convert(MODES[channels])
            if img.size != (size, size):
                img = img.resize((size, size), Image.Resampling.BILINEAR)
            pixels = np.asarray(img, dtype=np.uint8)
    except MetarunError:
        raise
    except Exception as exc:  # PIL raises many types for bad bytes
        raise MetarunError(
            f"cannot read the image {path} ({exc}): replace or delete that file."
        ) from None
    return pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)


def decode_splits(
    splits: dict[str, dict[str, list[Path]]], size: int, channels: int, desc: str
) -> dict:
    """Decodes every file into one uint8 array; returns the cache blob (without
    format/fingerprint)."""
    from tqdm import tqdm

    files = [f for split in SPLITS for fs in splits[split].values() for f in fs]
    images = np.empty((len(files), channels, size, size), dtype=np.uint8)
    for i, f in enumerate(
        tqdm(
            files,
            desc=f"decoding {desc}",
            unit="img",
            mininterval=1.0,
            leave=False,
            disable=len(files) < 2000,
        )
    ):
        images[i] = decode_image(f, size, channels)
    return {
        "images": torch.from_numpy(images),
        "splits": {s: list(splits[s].keys()) for s in SPLITS},
        "counts": {s: [len(fs) for fs in splits[s].values()] for s in SPLITS},
    }


def read_cache(path: Path, fingerprint: str) -> dict | None:
    if not path.is_file():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        ok = (
            isinstance(blob, dict)
            and blob.get("format") == CACHE_FORMAT
            and blob.get("fingerprint") == fingerprint
            and blob["images"].dtype == torch.uint8
            and blob["images"].dim() == 4
            and sum(sum(c) for c in blob["counts"].values()) == len(blob["images"])
        )
    except Exception:  # unreadable, truncated or foreign: rebuilt, never trusted
        ok = False
    if not ok:
        log.warning(
            f"metarun: cache {path} does not match the data (changed files or settings) or is "
            "corrupt; rebuilding it"
        )
        return None
    return blob


def mib(n_bytes: int) -> str:
    return f"{n_bytes / 2**20:.1f} MiB"


def cached_class_images(
    splits: dict[str, dict[str, list[Path]]],
    size: int,
    channels: int,
    cache: Path,
    desc: str,
    where: str,
    build=None,
    fingerprint: str | None = None,
) -> dict[str, ClassImages]:
    """{split: ClassImages} from the cache at `cache` when its fingerprint matches, else decoded and
    cached.

    splits: {split: {class name: [image files]}} (checked: no empty split, no class in two splits,
    no empty class); `build()` may replace file decoding (it returns the blob of `decode_splits`).
    """
    check_splits({s: list(splits[s]) for s in SPLITS}, where)
    for split in SPLITS:
        for name, files in splits[split].items():
            if not files and build is None:
                raise MetarunError(
                    f"class {name!r} of the {split} split of {where} has no images (.png/.jpg): "
                    "add images or remove that class."
                )
    fingerprint = fingerprint or files_fingerprint(splits, size, channels)
    blob = read_cache(cache, fingerprint)
    if blob is None:
        n = sum(len(fs) for s in SPLITS for fs in splits[s].values())
        if (
            build is None
        ):  # a `build` (CIFAR's pickles) decodes from elsewhere: its size is known once built
            log.info(
                f"metarun: decoding {n} images of {desc} once into the cache {cache} "
                f"({mib(n * channels * size * size)} uint8)"
            )
        blob = build() if build is not None else decode_splits(splits, size, channels, desc)
        if build is not None:
            log.info(
                f"metarun: decoded {len(blob['images'])} images of {desc} once into the cache "
                f"{cache} ({mib(blob['images'].numel())} uint8)"
            )
        blob.update(format=CACHE_FORMAT, fingerprint=fingerprint)
        save_cache(blob, cache)  # a read-only or full place only costs the next run a decode
    else:
        log.info(f"metarun: {desc} from the cache {cache} ({mib(blob['images'].numel())} uint8)")
    return split_blob(blob)


def split_blob(blob: dict) -> dict[str, ClassImages]:
    """The cache blob (images of train, val, test classes,
    in that order) -> {split: ClassImages}."""
    out, start = {}, 0
    for split in SPLITS:
        counts = torch.tensor(blob["counts"][split], dtype=torch.long)
        n = int(counts.sum())
        starts = torch.cumsum(counts, 0) - counts
        out[split] = ClassImages(
            blob["images"][start : start + n], list(blob["splits"][split]), starts, counts
        )
        start += n
    return out
