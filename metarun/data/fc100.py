"""FC100 (Oreshkin et al. 2018, "TADAM: Task dependent adaptive metric for improved few-shot
learning", Sec. 4 / Appendix): CIFAR-100 split by superclass, 12 train, 4 validation and 4 test
superclasses (60/20/20 classes, 600 images each), so test classes are far from the training ones.

The superclass split is the authors' (github.com/ElementAI/TADAM,
datasets/create_dataset_cifar100.py: train {1, 2, 3, 4, 5, 6, 9, 10, 15, 17, 18, 19}, val {8, 11,
13, 16}, test {0, 7, 12, 14} of CIFAR-100's alphabetically numbered superclasses), written here by
name.
"""

from __future__ import annotations

from metarun.data.cifar100 import SUPERCLASSES, load_cifar_split
from metarun.data.classes import ClassImages

SPLIT_SUPERCLASSES = {
    "train": (
        "fish",
        "flowers",
        "food_containers",
        "fruit_and_vegetables",
        "household_electrical_devices",
        "household_furniture",
        "large_man-made_outdoor_things",
        "large_natural_outdoor_scenes",
        "reptiles",
        "trees",
        "vehicles_1",
        "vehicles_2",
    ),
    "val": (
        "large_carnivores",
        "large_omnivores_and_herbivores",
        "non-insect_invertebrates",
        "small_mammals",
    ),
    "test": ("aquatic_mammals", "insects", "medium_mammals", "people"),
}
CLASSES = {
    s: tuple(c for sup in sups for c in SUPERCLASSES[sup]) for s, sups in SPLIT_SUPERCLASSES.items()
}


def load_fc100(cfg) -> tuple[dict[str, ClassImages], str]:
    """{split: ClassImages} uint8 [600 per class, 3, S, S] of FC100 (S = dataset.image_size, 32
    native)."""
    return load_cifar_split(cfg, CLASSES, "FC100")
