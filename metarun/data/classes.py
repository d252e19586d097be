"""The one thing every dataset gives the episode sampler: a split's images grouped by class.

`ClassImages` holds all images of one split in a flat uint8 tensor [N, C, H, W] with a ragged class
index (`starts`, `counts`: class c owns images[starts[c] : starts[c] + counts[c]]), so classes may
have different numbers of images. A dense [classes, per_class, (C,) H, W] tensor (Omniglot) is
accepted and flattened.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from metarun.errors import MetarunError


@dataclass
class ClassImages:
    """The images of one split, grouped by class.

    images: uint8 [N, C, H, W] (or dense [classes, per_class, H, W] / [classes, per_class, C, H, W],
    flattened on construction); starts, counts: long [classes]; class_names: one per class.
    """

    images: torch.Tensor
    class_names: list[str]
    starts: torch.Tensor | None = None
    counts: torch.Tensor | None = None

    def __post_init__(self):
        if self.starts is None:  # dense: [classes, per_class, (C,) H, W]
            k, p = self.images.shape[0], self.images.shape[1]
            self.images = self.images.reshape(
                k * p,
                *(self.images.shape[2:] if self.images.dim() == 5 else (1, *self.images.shape[2:])),
            )
            self.starts = torch.arange(k, dtype=torch.long) * p
            self.counts = torch.full((k,), p, dtype=torch.long)
        if (
            self.images.dim() != 4
            or len(self.starts) != len(self.counts)
            or len(self.counts) != len(self.class_names)
        ):
            raise ValueError(
                "ClassImages wants images [N, C, H, W] and one start, count and name per class"
            )

    @property
    def num_classes(self) -> int:
        return len(self.counts)

    @property
    def per_class(self) -> int:
        """Images in the smallest class (what bounds shot + query)."""
        return int(self.counts.min()) if len(self.counts) else 0

    @property
    def smallest_class(self) -> str:
        return self.class_names[int(self.counts.argmin())] if len(self.counts) else ""

    @property
    def channels(self) -> int:
        return self.images.shape[1]


def check_splits(splits: dict[str, list[str]], where: str) -> None:
    """Each split names at least one class and no class is in two splits; else a MetarunError naming
    `where`."""
    seen: dict[str, str] = {}
    for split, names in splits.items():
        if not names:
            raise MetarunError(
                f"the {split} split of {where} has no classes: give it at least `way` classes."
            )
        for name in names:
            if name in seen and seen[name] != split:
                raise MetarunError(
                    f"class {name!r} is in both the {seen[name]} and the {split} split of {where}: "
                    "a class must belong to one split only; remove it from one of them."
                )
            seen[name] = split
