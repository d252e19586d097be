"""Omniglot as tensors: find a source, keep a decoded cache, cut the splits.

`load_omniglot(cfg.dataset)` returns an `Omniglot`; `split_characters` cuts it into splits and
`Omniglot.class_images` gives a split's `ClassImages`: a uint8 tensor [classes, images_per_class, H,
W] (255 = ink) that the episode sampler indexes on the device.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from metarun.data import embedded, sources
from metarun.data.classes import ClassImages
from metarun.errors import MetarunError

# noqa: F401  (re-exported: scripts and tests import it here)
from metarun.io import atomic_torch_save, describe_write_failure

log = logging.getLogger("metarun")
CACHE_FORMAT = "metarun-omniglot-cache-v1"
# The MAML paper's protocol (cbfinn/maml data_generator.py): 1,200 characters for meta-training, of
# which the last 100 are held out for validation; the other 423 are for testing.
MAML_TRAIN, MAML_VAL, MAML_TOTAL = 1100, 100, 1623
RESIZES = ("lanczos", "nearest")


@dataclass
class Omniglot:
    images: torch.Tensor  # uint8 [N, S, S], 255 = ink
    archive: torch.Tensor  # per image: 0 background, 1 evaluation
    alphabet: torch.Tensor
    character: torch.Tensor
    drawer: torch.Tensor
    alphabet_names: list[str]
    character_names: list[str]
    source: str  # where the pixels came from, for the log

    def class_images(self, characters: list[int]) -> ClassImages:
        """Images of the given characters, [len(characters), per_class, S, S], ordered by drawer."""
        order = torch.argsort(self.character.long() * 100 + self.drawer.long())
        sorted_char = self.character[order].long()
        counts = torch.bincount(sorted_char, minlength=len(self.character_names))
        chosen = counts[characters]
        per_class = int(chosen.min()) if len(characters) else 0
        if len(characters) and int(chosen.max()) != per_class:
            raise MetarunError(
                f"characters have between {per_class} and {int(chosen.max())} images; "
                "metarun needs the same number per character (Omniglot has 20). The dataset in "
                "dataset.root is incomplete: replace it with the public archives."
            )
        starts = torch.cumsum(counts, 0) - counts
        index = starts[characters].unsqueeze(1) + torch.arange(per_class)
        return ClassImages(self.images[order[index]], [self.character_names[c] for c in characters])


def split_characters(
    data: Omniglot, protocol: str, seed: int, lake_val_alphabets: int, sizes=(MAML_TRAIN, MAML_VAL)
) -> dict[str, list[int]]:
    """Character indices of each split. No character is in two splits. sizes: split=maml's (train,
    val) characters of the full 1,623 (the MAML paper's 1,100/100; MAML++'s code 1,150/50), the rest
    test. Raises MetarunError for sizes that leave no test characters."""
    total = len(data.character_names)
    g = torch.Generator().manual_seed(seed)
    if protocol == "maml":
        # Characters in a fixed order (sorted names), shuffled with a fixed seed, like the paper's
        # code.
        perm = torch.randperm(total, generator=g).tolist()
        n_train, n_val = (int(n) for n in sizes)
        if n_train <= 0 or n_val <= 0 or n_train + n_val >= MAML_TOTAL:
            raise MetarunError(
                f"dataset.split_sizes={list(sizes)} must be two positive character counts (train, "
                f"validation) summing to less than {MAML_TOTAL}, e.g. [1100, 100] (the MAML paper)."
            )
        if total != MAML_TOTAL:  # a smaller (test) dataset keeps the protocol's proportions
            n_train = max(1, round(total * n_train / MAML_TOTAL))
            n_val = max(1, round(total * n_val / MAML_TOTAL))
        return {
            "train": perm[:n_train],
            "val": perm[n_train : n_train + n_val],
            "test": perm[n_train + n_val :],
        }
    if protocol == "lake":
        # Background alphabets train (some held out whole for validation), evaluation alphabets
        # test.
        char_alphabet = torch.zeros(total, dtype=torch.long)
        char_archive = torch.zeros(total, dtype=torch.long)
        char_alphabet[data.character.long()] = data.alphabet.long()
        char_archive[data.character.long()] = data.archive.long()
        background = sorted(set(char_alphabet[char_archive == 0].tolist()))
        shuffled = [background[i] for i in torch.randperm(len(background), generator=g).tolist()]
        n_val = min(lake_val_alphabets, max(len(background) - 1, 0))
        val_alphabets = set(shuffled[:n_val])
        chars = range(total)
        return {
            "train": [
                c
                for c in chars
                if char_archive[c] == 0 and int(char_alphabet[c]) not in val_alphabets
            ],
            "val": [
                c for c in chars if char_archive[c] == 0 and int(char_alphabet[c]) in val_alphabets
            ],
            "test": [c for c in chars if char_archive[c] == 1],
        }
    raise MetarunError(
        f"unknown dataset.split={protocol!r}: use dataset.split=maml (the MAML paper's "
        "1,100/100/423 characters) or dataset.split=lake (background vs evaluation alphabets)."
    )


def resize(masks: np.ndarray, size: int, method: str = "lanczos") -> np.ndarray:
    """Stroke masks [N, S, S] -> uint8 [N, size, size] intensities (255 = ink). lanczos:
    Lanczos-resampled grey levels; nearest: nearest neighbour, only 0 and 255 (cbfinn/maml's
    resize_images.py asks PIL for Lanczos, but PIL resizes its 1-bit PNGs with nearest neighbour, so
    the paper's network saw binary images)."""
    from tqdm import tqdm

    if method not in RESIZES:
        raise MetarunError(
            f"unknown dataset.resize={method!r}: use lanczos (grey levels) or nearest (binary, as "
            "the MAML paper's data)."
        )
    resample = Image.Resampling.LANCZOS if method == "lanczos" else Image.Resampling.NEAREST
    ink = masks.astype(np.uint8) * 255
    if size == masks.shape[-1]:
        return ink
    out = np.empty((len(masks), size, size), dtype=np.uint8)
    for i in tqdm(
        range(len(masks)),
        desc=f"resizing to {size}x{size}",
        unit="img",
        mininterval=1.0,
        leave=False,
        disable=len(masks) < 2000,
    ):
        out[i] = np.asarray(Image.fromarray(ink[i]).resize((size, size), resample))
    return out


def resolve_source(cfg) -> tuple[str, object]:
    """(description, loader) of the pixels to use, following dataset.source."""
    root = sources.source_root(cfg.root)
    found = sources.find_archives(root) if root.is_dir() else None
    if cfg.source not in ("auto", "archives", "embedded"):
        raise MetarunError(
            f"unknown dataset.source={cfg.source!r}: use auto, archives or embedded."
        )
    if cfg.source == "embedded" or (cfg.source == "auto" and found is None):
        return f"embedded:{embedded.EMBEDDED_SHA256}", embedded.load_embedded
    if found is None:
        if not cfg.download:
            raise MetarunError(sources.missing_data_message(root))
        found = sources.download_archives(root)
    return f"archives:{sources.archives_fingerprint(found)}", lambda: sources.read_archives(found)


def cache_dir(cfg) -> Path:
    if cfg.get("cache_dir"):
        return Path(cfg.cache_dir).expanduser()
    root = sources.source_root(cfg.root)
    if root.is_dir() and os.access(root, os.W_OK):
        return root
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "metarun"


def _read_cache(path: Path, fingerprint: str, size: int, method: str = "lanczos") -> dict | None:
    if not path.is_file():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        ok = (
            isinstance(blob, dict)
            and blob.get("format") == CACHE_FORMAT
            and blob.get("source") == fingerprint
            and blob.get("image_size") == size
            and blob["images"].shape[1:] == (size, size)
            and blob.get("resize", "lanczos") == method  # caches before dataset.resize were Lanczos
            and blob["images"].dtype == torch.uint8
            and all(
                len(blob[k]) == len(blob["images"])
                for k in ("archive", "alphabet", "character", "drawer")
            )
        )
    except Exception:  # unreadable, truncated or foreign: rebuilt, never trusted
        ok = False
    if not ok:
        log.warning(f"metarun: cache {path} is stale or corrupt; rebuilding it")
        return None
    return blob


def save_cache(blob: dict, path: Path) -> bool:
    """Writes a decoded-data cache (atomically); where it cannot be written (a read-only folder, a
    full disk) logs one warning and returns False: the data is used, the next run decodes it again.
    metarun.io turns torch's RuntimeError on a full disk ("[enforce fail at inline_container.cc:...]
    unexpected pos ...") into the OSError behind it; any other error is a bug and is raised."""
    try:
        atomic_torch_save(blob, path)
        return True
    except OSError as exc:
        reason = describe_write_failure(exc)
    log.warning(
        f"metarun: could not write the cache {path} ({reason}); set dataset.cache_dir to a "
        "writable folder with free space to start faster next time"
    )
    return False


def load_omniglot(cfg) -> Omniglot:
    """Omniglot at cfg.image_size, from the decoded cache when it is valid, else decoded once and
    cached."""
    size = int(cfg.image_size)
    if size <= 0:
        raise MetarunError(
            f"dataset.image_size={size} must be positive (28 as in the MAML paper, or 105)."
        )
    method = str(cfg.get("resize", "lanczos"))
    if method not in RESIZES:
        raise MetarunError(
            f"unknown dataset.resize={method!r}: use lanczos (grey levels) or nearest (binary, as "
            "the MAML paper's data)."
        )
    fingerprint, read = resolve_source(cfg)
    # one cache per resize method (Lanczos keeps the name it had before dataset.resize existed)
    path = cache_dir(cfg) / f"omniglot_{size}{'' if method == 'lanczos' else '_' + method}.pt"
    blob = _read_cache(path, fingerprint, size, method)
    if blob is None:
        strokes = read()
        blob = {
            "format": CACHE_FORMAT,
            "source": fingerprint,
            "image_size": size,
            "resize": method,
            "images": torch.from_numpy(resize(strokes.masks, size, method)),
            "archive": torch.from_numpy(strokes.archive.astype(np.int64)),
            "alphabet": torch.from_numpy(strokes.alphabet.astype(np.int64)),
            "character": torch.from_numpy(strokes.character.astype(np.int64)),
            "drawer": torch.from_numpy(strokes.drawer.astype(np.int64)),
            "alphabet_names": list(strokes.alphabet_names),
            "character_names": list(strokes.character_names),
        }
        if save_cache(
            blob, path
        ):  # else a read-only or full place only costs the next run a decode
            log.info(
                f"metarun: decoded Omniglot at {size}x{size} ({method}) into the cache {path} "
                f"({path.stat().st_size / 2**20:.1f} MiB; dataset.cache_dir sets where it goes)"
            )
    return Omniglot(
        blob["images"],
        blob["archive"],
        blob["alphabet"],
        blob["character"],
        blob["drawer"],
        list(blob["alphabet_names"]),
        list(blob["character_names"]),
        fingerprint.split(":")[0],
    )
