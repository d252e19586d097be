"""CIFAR-100 (Krizhevsky 2009) as class images, the source of CIFAR-FS and FC100.

Reads the `cifar-100-python` folder (pickles `train`, `test`, `meta`) that torchvision's `CIFAR100`
downloads and extracts; when it is missing and dataset.download=true, torchvision fetches it
(checking its md5). Both the 50,000 train and 10,000 test images are used (600 per class), as the
few-shot splits do.
"""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import numpy as np
import torch

from metarun.data.classes import ClassImages
from metarun.data.imagecache import (
    SPLITS,
    cached_class_images,
    check_image_settings,
    default_cache_dir,
)
from metarun.errors import MetarunError

FOLDER = "cifar-100-python"
FILES = ("train", "test", "meta")
# CIFAR-100's 20 superclasses and their 5 classes each (Krizhevsky 2009,
# www.cs.toronto.edu/~kriz/cifar.html); the pickles' `coarse_labels` must agree with it.
SUPERCLASSES = {
    "aquatic_mammals": ("beaver", "dolphin", "otter", "seal", "whale"),
    "fish": ("aquarium_fish", "flatfish", "ray", "shark", "trout"),
    "flowers": ("orchid", "poppy", "rose", "sunflower", "tulip"),
    "food_containers": ("bottle", "bowl", "can", "cup", "plate"),
    "fruit_and_vegetables": ("apple", "mushroom", "orange", "pear", "sweet_pepper"),
    "household_electrical_devices": ("clock", "keyboard", "lamp", "telephone", "television"),
    "household_furniture": ("bed", "chair", "couch", "table", "wardrobe"),
    "insects": ("bee", "beetle", "butterfly", "caterpillar", "cockroach"),
    "large_carnivores": ("bear", "leopard", "lion", "tiger", "wolf"),
    "large_man-made_outdoor_things": ("bridge", "castle", "house", "road", "skyscraper"),
    "large_natural_outdoor_scenes": ("cloud", "forest", "mountain", "plain", "sea"),
    "large_omnivores_and_herbivores": ("camel", "cattle", "chimpanzee", "elephant", "kangaroo"),
    "medium_mammals": ("fox", "porcupine", "possum", "raccoon", "skunk"),
    "non-insect_invertebrates": ("crab", "lobster", "snail", "spider", "worm"),
    "people": ("baby", "boy", "girl", "man", "woman"),
    "reptiles": ("crocodile", "dinosaur", "lizard", "snake", "turtle"),
    "small_mammals": ("hamster", "mouse", "rabbit", "shrew", "squirrel"),
    "trees": ("maple_tree", "oak_tree", "palm_tree", "pine_tree", "willow_tree"),
    "vehicles_1": ("bicycle", "bus", "motorcycle", "pickup_truck", "train"),
    "vehicles_2": ("lawn_mower", "rocket", "streetcar", "tank", "tractor"),
}


def find_or_download(root: Path, download: bool) -> Path:
    folder = root / FOLDER
    if all((folder / f).is_file() for f in FILES):
        return folder
    if not download:
        raise MetarunError(
            f"CIFAR-100 not found: dataset.root={root} has no {FOLDER}/ with train, test and meta. "
            "Set dataset.download=true (torchvision fetches it), or point dataset.root at the "
            f"folder holding {FOLDER}/."
        )
    from torchvision.datasets import CIFAR100

    try:
        CIFAR100(str(root), train=True, download=True)
    except Exception as exc:
        raise MetarunError(
            f"could not download CIFAR-100 into {root} ({exc}). Offline? Put torchvision's "
            f"{FOLDER}/ folder (from cifar-100-python.tar.gz) in dataset.root."
        ) from None
    return folder


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as fh:
            # torchvision's reading of the Python-2 pickles
            return pickle.load(fh, encoding="latin1")
    except Exception as exc:
        raise MetarunError(
            f"cannot read {path} ({exc}): the CIFAR-100 copy is corrupt; delete {path.parent} "
            "and let torchvision download it again (dataset.download=true)."
        ) from None


def read_cifar100(folder: Path) -> tuple[np.ndarray, np.ndarray, list[str], dict[str, str]]:
    """(images uint8 [N, 3, 32, 32], fine labels [N], fine names, {fine name: superclass name})."""
    meta = _unpickle(folder / "meta")
    fine_names, coarse_names = list(meta["fine_label_names"]), list(meta["coarse_label_names"])
    images, labels, superclass = [], [], {}
    for part in ("train", "test"):
        blob = _unpickle(folder / part)
        data = np.asarray(blob["data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise MetarunError(
                f"{folder / part} holds {data.shape} data, not CIFAR's [N, 3072]: replace the copy."
            )
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(np.asarray(blob["fine_labels"], dtype=np.int64))
        for fine, coarse in zip(blob["fine_labels"], blob["coarse_labels"], strict=True):
            superclass[fine_names[fine]] = coarse_names[coarse]
    return np.concatenate(images), np.concatenate(labels), fine_names, superclass


def load_cifar_split(
    cfg, classes: dict[str, tuple[str, ...]], name: str
) -> tuple[dict[str, ClassImages], str]:
    """{split: ClassImages} of the CIFAR-100 classes listed per split
    in `classes` (named `name`)."""
    size, _ = check_image_settings(cfg.image_size, 3)
    root = Path(str(cfg.root)).expanduser().resolve()
    folder = find_or_download(root, bool(cfg.download))
    h = hashlib.sha256(f"{name}:{size}:{sorted(classes.items())}".encode())
    for f in FILES:
        st = (folder / f).stat()
        h.update(f"|{f}:{st.st_size}:{st.st_mtime_ns}".encode())
    splits = {s: {c: [] for c in classes[s]} for s in SPLITS}

    def build() -> dict:
        images, labels, fine_names, superclass = read_cifar100(folder)
        index = {n: i for i, n in enumerate(fine_names)}
        chosen, counts = [], {}
        for s in SPLITS:
            counts[s] = []
            for c in classes[s]:
                if c not in index:
                    raise MetarunError(
                        f"class {c!r} of {name} is not among CIFAR-100's classes in {folder}/meta: "
                        "replace the copy with torchvision's."
                    )
                if c not in SUPERCLASSES.get(superclass.get(c, ""), ()):
                    raise MetarunError(
                        f"class {c!r} has superclass {superclass.get(c)!r} in {folder}, not "
                        "CIFAR-100's: the copy is not CIFAR-100; replace it with torchvision's."
                    )
                members = np.flatnonzero(labels == index[c])
                if len(members) == 0:
                    raise MetarunError(
                        f"class {c!r} of {name} has no images in {folder}: replace the copy."
                    )
                chosen.append(members)
                counts[s].append(len(members))
        x = torch.from_numpy(images[np.concatenate(chosen)])
        if size != 32:  # antialiased bilinear, like the folder datasets' PIL resize
            x = (
                torch.nn.functional.interpolate(
                    x.float(),
                    size=(size, size),
                    mode="bilinear",
                    antialias=True,
                    align_corners=False,
                )
                .round_()
                .clamp_(0, 255)
                .to(torch.uint8)
            )
        return {
            "images": x.contiguous(),
            "splits": {s: list(classes[s]) for s in SPLITS},
            "counts": counts,
        }

    cache = (
        default_cache_dir(root, cfg.get("cache_dir"))
        / f"metarun_{name.lower().replace('-', '')}_{size}.pt"
    )
    return (
        cached_class_images(
            splits,
            size,
            3,
            cache,
            name,
            f"the {name} class lists",
            build=build,
            fingerprint=h.hexdigest(),
        ),
        f"{name} from CIFAR-100 in {folder}",
    )
