"""`dataset=NAME` -> the dataset's splits: one loader per module under metarun/data/."""

from __future__ import annotations

from metarun.data.classes import ClassImages
from metarun.errors import MetarunError


def load_omniglot_splits(cfg) -> tuple[dict[str, ClassImages], str]:
    from metarun.data import sources
    from metarun.data.omniglot import MAML_TRAIN, MAML_VAL, load_omniglot, split_characters

    data = load_omniglot(cfg)
    sizes = cfg.get("split_sizes") or (MAML_TRAIN, MAML_VAL)
    chars = split_characters(
        data, cfg.split, int(cfg.split_seed), int(cfg.lake_val_alphabets), tuple(sizes)
    )
    splits = {name: data.class_images(ids) for name, ids in chars.items()}
    where = (
        "Omniglot from the copy inside metarun"
        if data.source == "embedded"
        else f"Omniglot from the archives in {sources.source_root(cfg.root)}"
    )
    return splits, where


def _folder(cfg):
    from metarun.data.folder import load_folder

    return load_folder(cfg)


def _miniimagenet(cfg):
    from metarun.data.miniimagenet import load_miniimagenet

    return load_miniimagenet(cfg)


def _cifar_fs(cfg):
    from metarun.data.cifar_fs import load_cifar_fs

    return load_cifar_fs(cfg)


def _fc100(cfg):
    from metarun.data.fc100 import load_fc100

    return load_fc100(cfg)


def _sinusoid(cfg):
    from metarun.data.sinusoid import load_sinusoid

    return load_sinusoid(cfg)


LOADERS = {
    "omniglot": load_omniglot_splits,
    "folder": _folder,
    "miniimagenet": _miniimagenet,
    "cifar_fs": _cifar_fs,
    "fc100": _fc100,
    "sinusoid": _sinusoid,
}

# The task family of each dataset that is not classification (metarun/tasks.py).
FAMILIES = {"sinusoid": "regression"}


def load_dataset(cfg) -> tuple[dict[str, ClassImages], str]:
    """({split: ClassImages} for train, val, test; where the data came from) of the config's dataset
    group. A generated task family's splits (data/sinusoid.py) are task distributions with their own
    training_sampler and fixed_tasks instead of images."""
    if cfg.name not in LOADERS:
        raise MetarunError(f"unknown dataset={cfg.name!r}: use one of {', '.join(LOADERS)}.")
    return LOADERS[cfg.name](cfg)
