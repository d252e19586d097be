"""`dataset=folder`: the user's own images, one folder per class.

Two layouts (the first found wins):
- sub-folders: root/train/<class>/*.png|jpg, root/val/<class>/..., root/test/<class>/...
- split files: root/<class>/*.png|jpg and one text file per split listing its classes, one folder
  name a line (dataset.split_files.{train,val,test}; relative paths are under root; default
  root/train.txt etc.).
Images are converted to `dataset.channels` (1: grayscale, 3: RGB), resized to dataset.image_size
squared and decoded once into a uint8 cache (`imagecache`).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from metarun.data.classes import ClassImages
from metarun.data.imagecache import (
    SPLITS,
    cached_class_images,
    check_image_settings,
    default_cache_dir,
)
from metarun.errors import MetarunError

EXTENSIONS = {".png", ".jpg", ".jpeg"}


def class_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in EXTENSIONS and p.is_file())


def class_folders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def read_split_file(path: Path, split: str) -> list[str]:
    """The class folders a split file lists, one a line (blank lines and # comments skipped); UTF-8
    with or without a byte-order mark (utf-8-sig: what Notepad and spreadsheet programs write)."""
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except OSError as exc:
        raise MetarunError(
            f"cannot read the {split} split file {path} ({exc.strerror}): set "
            f"dataset.split_files.{split} to a text file listing one class folder a line."
        ) from None
    except UnicodeDecodeError as exc:
        raise MetarunError(
            f"the {split} split file {path} is not UTF-8 text (byte {exc.start}: {exc.reason}): "
            "save it as UTF-8, one class folder a line."
        ) from None
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def find_classes(root: Path, split_files) -> tuple[dict[str, dict[str, list[Path]]], str]:
    """({split: {class name: [files]}}, layout description) of a folder dataset."""
    if not root.is_dir():
        raise MetarunError(
            f"dataset.root={root} is not a folder: point it at a folder holding train/ val/ test/ "
            "class sub-folders, or class folders plus train.txt val.txt test.txt split files."
        )
    split_files = dict(split_files or {})
    if not any(split_files.values()) and all((root / s).is_dir() for s in SPLITS):
        return {
            s: {c.name: class_files(c) for c in class_folders(root / s)} for s in SPLITS
        }, "train/ val/ test/ sub-folders"
    paths = {s: Path(split_files[s]) if split_files.get(s) else Path(f"{s}.txt") for s in SPLITS}
    paths = {s: p if p.is_absolute() else root / p for s, p in paths.items()}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise MetarunError(
            f"dataset.root={root} has neither train/ val/ test/ sub-folders nor the split files "
            f"{', '.join(missing)}: add one of the two layouts, or set dataset.split_files.<split>."
        )
    out = {}
    for s in SPLITS:
        out[s] = {}
        for name in read_split_file(paths[s], s):
            folder = root / name
            if not folder.is_dir():
                raise MetarunError(
                    f"class {name!r} of the {s} split file {paths[s]} has no folder {folder}: "
                    "fix the name in the split file or add the folder."
                )
            if name in out[s]:
                raise MetarunError(
                    f"class {name!r} is listed twice in the {s} split file {paths[s]}: list it "
                    "once."
                )
            out[s][name] = class_files(folder)
    return out, "split files " + ", ".join(str(p) for p in paths.values())


def load_folder(cfg) -> tuple[dict[str, ClassImages], str]:
    """{split: ClassImages} of dataset.root and a description of where they came from."""
    if not cfg.get("root"):
        raise MetarunError(
            "dataset=folder needs dataset.root=/path/to/your/images (one folder per class)."
        )
    size, channels = check_image_settings(cfg.image_size, cfg.channels)
    root = Path(str(cfg.root)).expanduser().resolve()
    splits, layout = find_classes(root, cfg.get("split_files"))
    tag = hashlib.sha256(str(root).encode()).hexdigest()[
        :8
    ]  # two folder datasets never share a cache file
    cache = (
        default_cache_dir(root, cfg.get("cache_dir")) / f"metarun_folder_{tag}_{size}x{channels}.pt"
    )
    classes = cached_class_images(
        splits, size, channels, cache, f"the folder {root}", f"dataset.root={root} ({layout})"
    )
    return classes, f"the folder {root}"
