"""CIFAR-FS (Bertinetto et al. 2019, "Meta-learning with differentiable closed-form solvers", Sec.
4): CIFAR-100's 100 classes split at random into 64 train, 16 validation and 20 test classes, 600
images each.

The class lists are the published split files (data/cifar100/splits/bertinetto/{train,val,test}.txt
of github.com/bertinetto/r2d2's data), as transcribed in torchmeta
(github.com/tristandeleu/pytorch-meta, torchmeta/datasets/assets/cifar100/cifar-fs/*.json, commit
d55d89e).
"""

from __future__ import annotations

from metarun.data.cifar100 import load_cifar_split
from metarun.data.classes import ClassImages

CLASSES = {
    "train": (
        "dolphin",
        "seal",
        "aquarium_fish",
        "ray",
        "trout",
        "orchid",
        "sunflower",
        "tulip",
        "bottle",
        "bowl",
        "can",
        "cup",
        "plate",
        "apple",
        "mushroom",
        "orange",
        "pear",
        "clock",
        "keyboard",
        "chair",
        "couch",
        "bee",
        "caterpillar",
        "cockroach",
        "bear",
        "lion",
        "tiger",
        "wolf",
        "bridge",
        "castle",
        "house",
        "road",
        "skyscraper",
        "cloud",
        "forest",
        "mountain",
        "elephant",
        "kangaroo",
        "porcupine",
        "possum",
        "raccoon",
        "skunk",
        "lobster",
        "spider",
        "boy",
        "girl",
        "dinosaur",
        "lizard",
        "snake",
        "turtle",
        "hamster",
        "mouse",
        "rabbit",
        "shrew",
        "squirrel",
        "oak_tree",
        "palm_tree",
        "pine_tree",
        "willow_tree",
        "bus",
        "train",
        "lawn_mower",
        "streetcar",
        "tank",
    ),
    "val": (
        "beaver",
        "otter",
        "flatfish",
        "shark",
        "lamp",
        "television",
        "beetle",
        "butterfly",
        "sea",
        "camel",
        "cattle",
        "crab",
        "crocodile",
        "maple_tree",
        "motorcycle",
        "tractor",
    ),
    "test": (
        "whale",
        "poppy",
        "rose",
        "sweet_pepper",
        "telephone",
        "bed",
        "table",
        "wardrobe",
        "leopard",
        "plain",
        "chimpanzee",
        "fox",
        "snail",
        "worm",
        "baby",
        "man",
        "woman",
        "bicycle",
        "pickup_truck",
        "rocket",
    ),
}


def load_cifar_fs(cfg) -> tuple[dict[str, ClassImages], str]:
    """{split: ClassImages} uint8 [600 per class, 3, S, S] of CIFAR-FS (S = dataset.image_size, 32
    native)."""
    return load_cifar_split(cfg, CLASSES, "CIFAR-FS")
