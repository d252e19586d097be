"""The whole Omniglot inside the package, as packed bits (lossless: the images are 1-bit).

Format: an uncompressed `np.savez` archive (no pickles), compressed as a whole with xz (lzma). Keys:
`bits` uint8 [N, ceil(105*105/8)] (np.packbits of each flattened stroke mask), `archive`,
`alphabet`, `character`, `drawer` (per image), `alphabet_names`, `character_names` (unicode arrays).
Measured on the real data: xz makes 3.0 MB and loads (decompress + unpack) in the same ~0.85 s as
np.savez_compressed's 5.3 MB zlib file, so xz wins.
"""

from __future__ import annotations

import hashlib
import io
import lzma
from pathlib import Path

import numpy as np

from metarun.data.sources import IMAGE_SIDE, Strokes
from metarun.errors import MetarunError

EMBEDDED_PATH = Path(__file__).with_name("omniglot.npz.xz")
# Written by scripts/pack_omniglot.py; the loader refuses a file with another hash.
EMBEDDED_SHA256 = "068394940d57a6f367a569de13774053e79245184702b21ae05d83cea9ef6cf9"


def pack(strokes: Strokes, path: Path) -> str:
    flat = strokes.masks.reshape(len(strokes.masks), -1)
    buffer = io.BytesIO()
    np.savez(
        buffer,
        bits=np.packbits(flat, axis=1),
        archive=strokes.archive,
        alphabet=strokes.alphabet,
        character=strokes.character,
        drawer=strokes.drawer,
        alphabet_names=np.array(strokes.alphabet_names),
        character_names=np.array(strokes.character_names),
    )
    Path(path).write_bytes(lzma.compress(buffer.getvalue(), preset=9 | lzma.PRESET_EXTREME))
    return file_sha256(path)


def unpack(path: Path) -> Strokes:
    try:
        with np.load(io.BytesIO(lzma.decompress(Path(path).read_bytes())), allow_pickle=False) as f:
            bits = f["bits"]
            masks = np.unpackbits(bits, axis=1, count=IMAGE_SIDE * IMAGE_SIDE).astype(bool)
            return Strokes(
                masks.reshape(-1, IMAGE_SIDE, IMAGE_SIDE),
                f["archive"],
                f["alphabet"],
                f["character"],
                f["drawer"],
                [str(s) for s in f["alphabet_names"]],
                [str(s) for s in f["character_names"]],
            )
    except (OSError, ValueError, KeyError, lzma.LZMAError, EOFError) as exc:
        raise MetarunError(
            f"the embedded Omniglot {path} is unreadable ({exc}): reinstall metarun, or use "
            "dataset.source=archives with the public archives in dataset.root."
        ) from None


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def load_embedded() -> Strokes:
    if not EMBEDDED_PATH.is_file():
        raise MetarunError(
            f"the embedded Omniglot {EMBEDDED_PATH} is missing from this install: reinstall "
            "metarun, or use dataset.source=archives with the archives in dataset.root."
        )
    digest = file_sha256(EMBEDDED_PATH)
    if digest != EMBEDDED_SHA256:
        raise MetarunError(
            f"the embedded Omniglot {EMBEDDED_PATH} has sha256 {digest}, not the recorded "
            f"{EMBEDDED_SHA256}: the install is damaged; reinstall metarun."
        )
    return unpack(EMBEDDED_PATH)
