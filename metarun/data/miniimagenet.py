"""miniImageNet (Vinyals et al. 2016) with Ravi & Larochelle's (2017) 64/16/20 class split.

The layout most copies use: root/images/<filename> (84x84 JPEGs) and root/{train,val,test}.csv with
`filename,label` rows (a header line first), the split files of
github.com/twitter/meta-learning-lstm. metarun never downloads ImageNet (its licence needs a
sign-up): the error says where to put the files. Decoded once into a uint8 [N, 3, 84, 84] cache
(about 1.2 GiB for the 60,000 images).
"""

from __future__ import annotations

import csv
from pathlib import Path

from metarun.data.classes import ClassImages
from metarun.data.imagecache import (
    SPLITS,
    cached_class_images,
    check_image_settings,
    default_cache_dir,
)
from metarun.errors import MetarunError


def missing_message(root: Path, what: str) -> str:
    return (
        f"miniImageNet not found in dataset.root={root} ({what}): put Ravi & Larochelle's "
        "train.csv, val.csv, "
        "test.csv (filename,label rows) and the images/ folder of 84x84 images there, or set "
        "dataset.root to the folder that holds them. metarun does not download ImageNet."
    )


def read_csv(path: Path, images: Path, split: str) -> dict[str, list[Path]]:
    """{label: [image files]} in file order; the header row (filename,label) is skipped. Read as
    UTF-8 with or without a byte-order mark (what spreadsheet programs write: utf-8-sig)."""
    classes: dict[str, list[Path]] = {}
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            for n, row in enumerate(csv.reader(fh)):
                if not row or (n == 0 and row[0].strip().lower() == "filename"):
                    continue
                if len(row) != 2:
                    raise MetarunError(
                        f"line {n + 1} of {path} is {row!r}, not filename,label: use Ravi & "
                        "Larochelle's split files."
                    )
                filename, label = row[0].strip(), row[1].strip()
                classes.setdefault(label, []).append(images / filename)
    except OSError as exc:
        raise MetarunError(
            f"cannot read {path} ({exc.strerror}): " + missing_message(path.parent, split)
        ) from None
    except UnicodeDecodeError as exc:  # e.g. a spreadsheet's "Unicode text" (UTF-16) export
        raise MetarunError(
            f"{path} is not UTF-8 text (byte {exc.start}: {exc.reason}): save it as a UTF-8 CSV of "
            "filename,label rows (Ravi & Larochelle's split files)."
        ) from None
    return classes


def load_miniimagenet(cfg) -> tuple[dict[str, ClassImages], str]:
    size, channels = check_image_settings(cfg.image_size, cfg.channels)
    root = Path(str(cfg.root)).expanduser().resolve()
    images = root / "images"
    missing = [f"{s}.csv" for s in SPLITS if not (root / f"{s}.csv").is_file()]
    if not images.is_dir():
        missing.append("images/")
    if missing:
        raise MetarunError(missing_message(root, "no " + ", ".join(missing)))
    splits = {s: read_csv(root / f"{s}.csv", images, s) for s in SPLITS}
    for s in SPLITS:
        for label, files in splits[s].items():
            for f in files:
                if not f.is_file():
                    raise MetarunError(
                        f"{f} (class {label}, {s}.csv) is missing: "
                        + missing_message(root, "incomplete")
                    )
    cache = (
        default_cache_dir(root, cfg.get("cache_dir")) / f"metarun_miniimagenet_{size}x{channels}.pt"
    )
    return (
        cached_class_images(
            splits, size, channels, cache, "miniImageNet", f"dataset.root={root} (the CSVs)"
        ),
        f"miniImageNet in {root}",
    )
