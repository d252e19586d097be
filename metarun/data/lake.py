"""Lake et al.'s original 20-way one-shot classification benchmark (`all_runs.zip`), read as
tensors.

Source: B. M. Lake, R. Salakhutdinov, J. B. Tenenbaum, "Human-level concept learning through
probabilistic program induction", Science 350 (2015), "One-shot classification" and Fig. 6A; files
and layout from github.com/brendenlake/omniglot (python/one-shot-classification/all_runs.zip). 20
runs; each has 20 training images (one per class, `runNN/training/classNN.png`), 20 test images
(`runNN/test/itemNN.png`) and `runNN/class_labels.txt`, whose lines pair a test image with its
class: `runNN/test/item01.png runNN/training/class08.png` (the `runNN/` prefix may be absent). The
images are 105x105 1-bit PNGs, black strokes on white, from the evaluation alphabets
(images_evaluation).

Images go through exactly the preprocessing of the training data (`sources.decode_png`: ink = True;
`omniglot.resize`: ink = 255 uint8, resized to `image_size` with the training data's
dataset.resize), then /255 as the episode sampler does.
"""

from __future__ import annotations

import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from metarun.data import sources
from metarun.data.omniglot import resize
from metarun.errors import MetarunError

ARCHIVE = "all_runs"
DOWNLOAD_URL = (
    "https://github.com/brendenlake/omniglot/raw/master/python/one-shot-classification/all_runs.zip"
)
# Error rates published in Lake et al. (2015), Fig. 6A and its text (20-way one-shot classification,
# these 20 runs).
PUBLISHED_ERROR = {"people": 0.045, "Bayesian Program Learning": 0.033, "Siamese ConvNet": 0.080}
_MEMBER = re.compile(
    r"(?:^|/)(?P<run>run\d+)/(?P<kind>training|test)/(?P<name>(?:class|item)\d+\.png)$"
)
_LABELS = re.compile(r"(?:^|/)(?P<run>run\d+)/class_labels\.txt$")
_TEST, _TRAINING = (
    re.compile(r"(?:^|/)test/(item\d+\.png)$"),
    re.compile(r"(?:^|/)training/(class\d+\.png)$"),
)


@dataclass
class LakeRun:
    """One run: classify each test image as one of the 20 training images' classes."""

    name: str  # "run01"
    support: torch.Tensor  # float [classes, 1, S, S], ink = 1; row c is training class c
    query: torch.Tensor  # float [items, 1, S, S], ink = 1, test items in name order
    labels: torch.Tensor  # long [items]: index (into support) of each test item's class
    class_files: list[str]  # "training/class01.png", ... (row order of support)
    item_files: list[str]  # "test/item01.png", ...


def find_all_runs(root: Path) -> Path:
    """`root/all_runs.zip` or an extracted `root/all_runs/` folder; else a MetarunError with the
    fix."""
    if (root / ARCHIVE).is_dir():
        return root / ARCHIVE
    if (root / f"{ARCHIVE}.zip").is_file():
        return root / f"{ARCHIVE}.zip"
    raise MetarunError(
        f"benchmark=lake needs all_runs.zip (or its extracted all_runs/ folder) in the data root "
        f"{root}: download it from {DOWNLOAD_URL} into that folder, or point data_root= (or "
        "METARUN_DATA) at the folder that holds it."
    )


def _read_members(path: Path) -> dict[str, bytes]:
    """{member path: bytes} of every file in the zip or folder."""
    if path.is_dir():
        return {
            f.relative_to(path).as_posix(): f.read_bytes()
            for f in sorted(path.rglob("*"))
            if f.is_file()
        }
    try:
        with zipfile.ZipFile(path) as zf:
            return {name: zf.read(name) for name in zf.namelist() if not name.endswith("/")}
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise MetarunError(
            f"{path} is not a readable zip archive ({exc}): replace it with the public "
            f"all_runs.zip ({DOWNLOAD_URL})."
        ) from None


def read_all_runs(path: Path, image_size: int, method: str = "lanczos") -> list[LakeRun]:
    """Every run of the archive (zip or folder) at `path`, in run-name order, images at image_size,
    resized with `method` (the training data's dataset.resize)."""
    members = _read_members(path)
    runs: dict[str, dict] = {}
    for key, data in members.items():
        m = _MEMBER.search(key)
        if m:
            runs.setdefault(m["run"], {"training": {}, "test": {}, "labels": None})[m["kind"]][
                m["name"]
            ] = (key, data)
            continue
        m = _LABELS.search(key)
        if m:
            runs.setdefault(m["run"], {"training": {}, "test": {}, "labels": None})["labels"] = (
                key,
                data,
            )
    if not runs:
        raise MetarunError(
            f"no runs found in {path}: expected runNN/training/classNN.png, runNN/test/itemNN.png "
            f"and runNN/class_labels.txt inside (the public all_runs.zip: {DOWNLOAD_URL})."
        )
    return [_build_run(name, runs[name], path, image_size, method) for name in sorted(runs)]


def _build_run(
    name: str, run: dict, path: Path, image_size: int, method: str = "lanczos"
) -> LakeRun:
    where = f"{path} ({name})"
    if run["labels"] is None:
        raise MetarunError(
            f"{where} has no class_labels.txt: the archive is incomplete; replace it with the "
            f"public all_runs.zip ({DOWNLOAD_URL})."
        )
    classes, items = sorted(run["training"]), sorted(run["test"])
    if not classes or not items:
        raise MetarunError(
            f"{where} has {len(classes)} training and {len(items)} test images: the archive is "
            f"incomplete; replace it with the public all_runs.zip ({DOWNLOAD_URL})."
        )
    pairs = {}
    for line in run["labels"][1].decode("utf-8", errors="replace").splitlines():
        fields = line.split()
        if not fields:
            continue
        # "run01/test/item01.png run01/training/class08.png" or "test/item01.png
        # training/class08.png"
        m = [_TEST.search(fields[0]), _TRAINING.search(fields[1])] if len(fields) == 2 else [None]
        if not all(m):
            raise MetarunError(
                f"{where}: class_labels.txt line {line!r} is not 'test/itemNN.png "
                "training/classNN.png': replace the archive with the public all_runs.zip."
            )
        pairs[m[0][1]] = m[1][1]
    missing = [i for i in items if i not in pairs]
    unknown = sorted(
        {c for c in pairs.values() if c not in run["training"]}
        | {i for i in pairs if i not in run["test"]}
    )
    if missing or unknown:
        raise MetarunError(
            f"{where}: class_labels.txt does not match the images (unlabelled: {missing[:3]}, "
            f"absent: {unknown[:3]}): replace the archive with the public all_runs.zip."
        )

    def images(names: list[str], kind: str) -> torch.Tensor:
        masks = np.stack([sources.decode_png(run[kind][n][1], run[kind][n][0]) for n in names])
        return torch.from_numpy(resize(masks, image_size, method)).float().div_(255.0).unsqueeze(1)

    index = {c: i for i, c in enumerate(classes)}
    return LakeRun(
        name,
        images(classes, "training"),
        images(items, "test"),
        torch.tensor([index[pairs[i]] for i in items], dtype=torch.long),
        [f"training/{c}" for c in classes],
        [f"test/{i}" for i in items],
    )
