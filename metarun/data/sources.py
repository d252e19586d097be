"""Where Omniglot's pixels come from: the public archives, their extracted folders, or the embedded
copy.

Every source is read into the same thing: a `Strokes` record of 105x105 boolean stroke masks (True =
ink) in one fixed order (archive, alphabet, character, drawer) with per-image labels. The decoded
cache (`cache.py`) is built from it the same way whichever source it came from.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from metarun.errors import MetarunError

ARCHIVES = ("images_background", "images_evaluation")
# Published md5 of the public archives (github.com/brendenlake/omniglot); only checked on files we
# download.
DOWNLOAD_URL = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python/"
DOWNLOAD_MD5 = {
    "images_background": "68d2efa1b9178cc56df9314c21c6e718",
    "images_evaluation": "6b91aef0f799c5bb55b94e3f2daec811",
}
IMAGE_SIDE = 105
_NAME = re.compile(
    r"^(?P<top>images_background|images_evaluation)/(?P<alphabet>[^/]+)/(?P<character>[^/]+)/"
    r"(?P<id>\d+)_(?P<drawer>\d+)\.png$"
)


@dataclass
class Strokes:
    """All images of a source as stroke masks, in a fixed order, with their labels."""

    masks: np.ndarray  # bool [N, 105, 105], True where there is ink
    archive: np.ndarray  # int8 [N]: 0 background, 1 evaluation
    alphabet: np.ndarray  # int16 [N]: index into alphabet_names
    character: np.ndarray  # int16 [N]: global character index into character_names
    drawer: np.ndarray  # int8 [N]: 1..20
    alphabet_names: list[str]  # "Alphabet" names, sorted within each archive, background first
    character_names: list[str]  # "Alphabet/characterNN"


def decode_png(data: bytes, where: str) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as img:
            gray = np.asarray(img.convert("L"))
    except Exception as exc:  # PIL raises many types for bad bytes
        raise MetarunError(
            f"cannot decode image {where}: {exc}. The dataset is corrupt: delete it and let "
            "metarun download it again (dataset.download=true) or use dataset.source=embedded."
        ) from None
    if gray.shape != (IMAGE_SIDE, IMAGE_SIDE):
        raise MetarunError(
            f"image {where} is {gray.shape[1]}x{gray.shape[0]}, expected 105x105 Omniglot "
            "images. Point dataset.root at the public Omniglot archives."
        )
    return gray < 128  # black strokes on white


def _assemble(entries: list[tuple[int, str, str, int, str]], read) -> Strokes:
    """entries: (archive, alphabet, character, drawer, key); read(key) -> png bytes."""
    from tqdm import tqdm

    entries.sort(key=lambda e: (e[0], e[1], e[2], e[3]))
    alphabet_names, character_names = [], []
    alphabet_index, character_index = {}, {}
    masks = np.empty((len(entries), IMAGE_SIDE, IMAGE_SIDE), dtype=bool)
    labels = np.empty((len(entries), 4), dtype=np.int32)
    for i, (archive, alphabet, character, drawer, key) in enumerate(
        tqdm(entries, desc="decoding Omniglot", unit="img", mininterval=1.0, leave=False)
    ):
        if alphabet not in alphabet_index:
            alphabet_index[alphabet] = len(alphabet_names)
            alphabet_names.append(alphabet)
        name = f"{alphabet}/{character}"
        if name not in character_index:
            character_index[name] = len(character_names)
            character_names.append(name)
        masks[i] = decode_png(read(key), key)
        labels[i] = (archive, alphabet_index[alphabet], character_index[name], drawer)
    return Strokes(
        masks,
        labels[:, 0].astype(np.int8),
        labels[:, 1].astype(np.int16),
        labels[:, 2].astype(np.int16),
        labels[:, 3].astype(np.int8),
        alphabet_names,
        character_names,
    )


def find_archives(root: Path) -> dict[str, Path] | None:
    """Each of the two archives as a zip or an extracted folder under root, or None if one is
    missing."""
    found = {}
    for name in ARCHIVES:
        if (root / name).is_dir():
            found[name] = root / name
        elif (root / f"{name}.zip").is_file():
            found[name] = root / f"{name}.zip"
        else:
            return None
    return found


def read_archives(found: dict[str, Path]) -> Strokes:
    entries, readers = [], {}
    for archive, name in enumerate(ARCHIVES):
        path = found[name]
        if path.is_dir():
            for png in sorted(path.glob("*/*/*.png")):
                rel = f"{name}/{png.relative_to(path).as_posix()}"
                m = _NAME.match(rel)
                if m:
                    entries.append(
                        (archive, m["alphabet"], m["character"], int(m["drawer"]), str(png))
                    )
                    readers[str(png)] = None
        else:
            try:
                zf = zipfile.ZipFile(path)
                names = zf.namelist()
            except (zipfile.BadZipFile, OSError) as exc:
                raise MetarunError(
                    f"{path} is not a readable zip archive ({exc}). Delete it and set "
                    "dataset.download=true, or replace it with the public Omniglot archive."
                ) from None
            for member in names:
                m = _NAME.match(member)
                if m and m["top"] == name:
                    entries.append(
                        (archive, m["alphabet"], m["character"], int(m["drawer"]), member)
                    )
                    readers[member] = zf
    if not entries:
        raise MetarunError(
            f"no Omniglot images found in {', '.join(map(str, found.values()))}: expected "
            "images_background/<Alphabet>/characterNN/<ID>_<drawer>.png inside."
        )

    def read(key):
        zf = readers[key]
        if zf is None:
            return Path(key).read_bytes()
        try:
            return zf.read(key)
        except (zipfile.BadZipFile, OSError, EOFError, zipfile.LargeZipFile) as exc:
            raise MetarunError(
                f"archive member {key} cannot be read ({exc}): the archive is truncated or "
                "corrupt. Delete it and download it again (dataset.download=true)."
            ) from None
        except Exception as exc:  # zlib.error and friends from a damaged stream
            raise MetarunError(
                f"archive member {key} cannot be read ({exc}): the archive is corrupt. "
                "Delete it and download it again (dataset.download=true)."
            ) from None

    return _assemble(entries, read)


def archives_fingerprint(found: dict[str, Path]) -> str:
    """Identifies the archives' content: sha256 of zip files, of (name, size, mtime) for folders."""
    h = hashlib.sha256()
    for name in ARCHIVES:
        path = found[name]
        h.update(name.encode())
        if path.is_dir():
            for f in sorted(path.glob("*/*/*.png")):
                st = f.stat()
                h.update(f"{f.relative_to(path)}:{st.st_size}:{st.st_mtime_ns}".encode())
        else:
            with open(path, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()


def download_archives(root: Path) -> dict[str, Path]:
    """Fetch the public archives into root, checking their published md5 (never used by tests or
    CI)."""
    from torchvision.datasets.utils import download_url

    root.mkdir(parents=True, exist_ok=True)
    for name in ARCHIVES:
        try:
            download_url(
                DOWNLOAD_URL + f"{name}.zip", str(root), f"{name}.zip", md5=DOWNLOAD_MD5[name]
            )
        except Exception as exc:
            raise MetarunError(
                f"could not download {name}.zip into {root} ({exc}). Offline? Use "
                "dataset.source=embedded (the copy inside metarun), or put the archives in "
                "dataset.root (or METARUN_DATA)."
            ) from None
    return find_archives(root)


def missing_data_message(root: Path) -> str:
    return (
        f"Omniglot not found in {root} (dataset.root, from METARUN_DATA or ./data): it wants "
        "images_background.zip and images_evaluation.zip (or their extracted folders) there. Set "
        "dataset.root=/path/to/omniglot, or dataset.download=true to fetch them, or "
        "dataset.source=embedded to use the copy inside metarun."
    )


def source_root(root: str | None) -> Path:
    return Path(root if root else os.environ.get("METARUN_DATA") or "./data").expanduser()
