"""The Omniglot copy inside the package: lossless packing, the shipped file, and source
selection."""

import os
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from metarun.data import embedded
from metarun.data.omniglot import load_omniglot, resolve_source, split_characters
from metarun.data.sources import find_archives, read_archives


def test_pack_unpack_is_lossless(tiny_root, tmp_path):
    strokes = read_archives(find_archives(tiny_root))
    digest = embedded.pack(strokes, tmp_path / "tiny.npz.xz")
    back = embedded.unpack(tmp_path / "tiny.npz.xz")
    assert digest == embedded.file_sha256(tmp_path / "tiny.npz.xz")
    assert back.masks.dtype == bool and np.array_equal(back.masks, strokes.masks)
    for key in ("archive", "alphabet", "character", "drawer"):
        assert np.array_equal(getattr(back, key), getattr(strokes, key))
    assert (
        back.alphabet_names == strokes.alphabet_names
        and back.character_names == strokes.character_names
    )


def test_shipped_file_is_the_whole_omniglot():
    assert embedded.file_sha256(embedded.EMBEDDED_PATH) == embedded.EMBEDDED_SHA256
    data = embedded.load_embedded()
    assert data.masks.shape == (32460, 105, 105)
    assert len(data.character_names) == 1623 and len(data.alphabet_names) == 50
    background = data.archive == 0
    assert (
        len(set(data.character[background].tolist())) == 964
        and len(set(data.alphabet[background].tolist())) == 30
    )
    assert (
        len(set(data.character[~background].tolist())) == 659
        and len(set(data.alphabet[~background].tolist())) == 20
    )
    assert np.bincount(data.character).tolist() == [20] * 1623
    assert sorted(set(data.drawer.tolist())) == list(range(1, 21))


def cfg(root, tmp_path, source="auto"):
    return OmegaConf.create(
        dict(
            name="omniglot",
            root=str(root),
            source=source,
            download=False,
            cache_dir=str(tmp_path / "cache"),
            image_size=28,
            split="maml",
            split_seed=1,
            lake_val_alphabets=5,
            rotate=True,
        )
    )


def test_auto_prefers_archives_and_falls_back_to_embedded(tiny_root, tmp_path):
    assert resolve_source(cfg(tiny_root, tmp_path))[0].startswith("archives:")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert resolve_source(cfg(empty, tmp_path))[0] == f"embedded:{embedded.EMBEDDED_SHA256}"
    assert resolve_source(cfg(tmp_path / "does-not-exist", tmp_path))[0].startswith("embedded:")
    assert resolve_source(cfg(tiny_root, tmp_path, "embedded"))[0].startswith("embedded:")
    assert resolve_source(cfg(tiny_root, tmp_path, "archives"))[0].startswith("archives:")


def test_embedded_source_trains_on_the_real_splits(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    data = load_omniglot(cfg(empty, tmp_path))
    assert data.source == "embedded" and tuple(data.images.shape) == (32460, 28, 28)
    maml = split_characters(data, "maml", 1, 5)
    assert [len(maml[k]) for k in ("train", "val", "test")] == [1100, 100, 423]
    lake = split_characters(data, "lake", 1, 5)
    assert len(lake["train"]) + len(lake["val"]) == 964 and len(lake["test"]) == 659
    for split in (maml, lake):
        assert len(set(split["train"]) | set(split["val"]) | set(split["test"])) == 1623
    # the README's example error is what the shipped data really gives (train has 1,100 classes, val
    # 100)
    from metarun.data.episodes import check_episode_shape
    from metarun.errors import MetarunError

    check_episode_shape(data.class_images(maml["train"]), "train", 200, 1, 1)
    with pytest.raises(MetarunError) as error:
        check_episode_shape(data.class_images(maml["val"]), "val", 200, 1, 1)
    assert (
        f"`metarun: error: {error.value}`"
        in (Path(__file__).parent.parent / "README.md").read_text()
    )


@pytest.mark.skipif(
    not (os.environ.get("METARUN_DATA") and find_archives(Path(os.environ["METARUN_DATA"]))),
    reason="METARUN_DATA does not hold the Omniglot archives",
)
def test_embedded_equals_the_archives_image_for_image():
    archives = read_archives(find_archives(Path(os.environ["METARUN_DATA"])))
    shipped = embedded.load_embedded()
    assert np.array_equal(shipped.masks, archives.masks)
    for key in ("archive", "alphabet", "character", "drawer"):
        assert np.array_equal(getattr(shipped, key), getattr(archives, key))
    assert shipped.character_names == archives.character_names
