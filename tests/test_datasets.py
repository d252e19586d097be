"""Datasets beyond Omniglot (folder, miniImageNet, CIFAR-FS, FC100), each built tiny in its real
layout."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import colour, make_miniimagenet, run_metarun, write_image
from omegaconf import OmegaConf
from PIL import Image

from metarun.data import cifar_fs, fc100, imagecache
from metarun.data.cifar100 import SUPERCLASSES
from metarun.data.classes import ClassImages
from metarun.data.episodes import EpisodeSampler, draw_seed, fixed_tasks
from metarun.data.folder import load_folder
from metarun.data.registry import load_dataset
from metarun.errors import MetarunError


def make_folder(
    root: Path, layout: str, sizes: dict[str, list[int]], size=8
) -> dict[str, list[str]]:
    """Classes of `sizes[split]` images each, as sub-folders or as root/<class>/ + split files."""
    names, k = {}, 0
    for split, counts in sizes.items():
        names[split] = []
        for n in counts:
            name = f"class{k:02d}"
            folder = root / split / name if layout == "subfolders" else root / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                # PNG bytes in the .jpg files too: exact pixels, and the suffix alone decides what
                # is listed
                write_image(
                    folder / f"img{i:03d}.{'png' if i % 2 else 'jpg'}", colour(k, i), size, "PNG"
                )
            names[split].append(name)
            k += 1
        if layout == "splitfiles":
            (root / f"{split}.txt").write_text("\n".join(names[split]) + "\n")
    return names


def folder_cfg(root, **kw):
    base = dict(
        name="folder",
        root=str(root),
        split_files={"train": None, "val": None, "test": None},
        image_size=8,
        channels=3,
        cache_dir=str(root / "cache"),
        rotate=False,
    )
    base.update(kw)
    return OmegaConf.create(base)


def traced(classes: ClassImages) -> list[list[tuple[int, int]]]:
    """(class, image) ids of every image, per class, read from the pixels."""
    out = []
    for c in range(classes.num_classes):
        s, n = int(classes.starts[c]), int(classes.counts[c])
        px = classes.images[s : s + n, :2, 0, 0].long() - 1
        out.append([tuple(p) for p in px.tolist()])
    return out


@pytest.mark.parametrize("layout", ["subfolders", "splitfiles"])
def test_folder_layouts_give_unequal_classes(tmp_path, layout):
    sizes = {"train": [5, 7, 6], "val": [4, 5], "test": [6, 4]}
    names = make_folder(tmp_path / "data", layout, sizes)
    splits, where = load_folder(folder_cfg(tmp_path / "data"))
    assert str(tmp_path / "data") in where
    k = 0
    for split, counts in sizes.items():
        ci = splits[split]
        assert ci.class_names == names[split] and ci.counts.tolist() == counts
        assert ci.images.dtype == torch.uint8 and ci.images.shape == (sum(counts), 3, 8, 8)
        for c, ids in enumerate(traced(ci)):
            assert ids == [(k, i) for i in range(counts[c])]
            k += 1
    # grayscale and another size: one channel, resized
    gray, _ = load_folder(folder_cfg(tmp_path / "data", channels=1, image_size=4))
    assert gray["train"].images.shape == (18, 1, 4, 4)


def test_folder_split_files_from_settings(tmp_path):
    root = tmp_path / "data"
    make_folder(root, "splitfiles", {"train": [3, 3], "val": [3], "test": [3]})
    lists = tmp_path / "lists"
    lists.mkdir()
    for s in ("train", "val", "test"):
        (lists / f"my_{s}.txt").write_text((root / f"{s}.txt").read_text())
        (root / f"{s}.txt").unlink()
    with pytest.raises(
        MetarunError, match=r"neither train/ val/ test/ sub-folders nor the split files"
    ):
        load_folder(folder_cfg(root))
    cfg = folder_cfg(
        root, split_files={s: str(lists / f"my_{s}.txt") for s in ("train", "val", "test")}
    )
    assert load_folder(cfg)[0]["train"].class_names == ["class00", "class01"]


def test_folder_cache_is_reused_and_rebuilt_on_change(tmp_path, monkeypatch, caplog):
    caplog.set_level("INFO", logger="metarun")  # the cache messages go through logging (#11)
    root = tmp_path / "data"
    make_folder(root, "subfolders", {"train": [3, 3], "val": [3], "test": [3]})
    first, _ = load_folder(folder_cfg(root))
    err = caplog.text
    caplog.clear()
    caches = list((root / "cache").glob("*.pt"))
    assert len(caches) == 1 and f"into the cache {caches[0]}" in err and "MiB" in err

    def no_decode(*a, **k):
        raise AssertionError("decoded although the cache is valid")

    monkeypatch.setattr(imagecache, "decode_image", no_decode)
    again, _ = load_folder(folder_cfg(root))
    assert torch.equal(again["train"].images, first["train"].images)
    assert f"from the cache {caches[0]}" in caplog.text
    monkeypatch.undo()
    # a new image (another fingerprint) rebuilds it; so does a corrupt cache file
    write_image(root / "train" / "class00" / "extra.png", colour(0, 99))
    grown, _ = load_folder(folder_cfg(root))
    assert grown["train"].counts.tolist() == [4, 3] and (0, 99) in traced(grown["train"])[0]
    caches[0].write_bytes(b"garbage")
    assert torch.equal(load_folder(folder_cfg(root))[0]["train"].images, grown["train"].images)
    assert (
        "does not match the data (changed files or settings) or is corrupt; rebuilding"
        in caplog.text
    )


def test_folder_errors_are_one_line(tmp_path):
    def expect(root, pattern, **kw):
        with pytest.raises(MetarunError, match=pattern) as info:
            load_folder(folder_cfg(root, **kw))
        assert "\n" not in str(info.value)

    empty = tmp_path / "empty"
    make_folder(empty, "subfolders", {"train": [3, 0], "val": [3], "test": [3]})
    expect(
        empty,
        r"class 'class01' of the train split .* has no images .*add images or remove that class",
    )

    bad = tmp_path / "bad"
    make_folder(bad, "subfolders", {"train": [3, 3], "val": [3], "test": [3]})
    broken = bad / "val" / "class02" / "img001.png"
    broken.write_bytes(b"not an image")
    expect(bad, rf"cannot read the image {broken} .*replace or delete that file")

    twice = tmp_path / "twice"
    make_folder(twice, "splitfiles", {"train": [3, 3], "val": [3], "test": [3]})
    (twice / "test.txt").write_text("class03\nclass01\n")
    expect(twice, r"class 'class01' is in both the train and the test split .*remove it from one")

    dup = tmp_path / "dup"
    make_folder(dup, "subfolders", {"train": [3], "val": [3], "test": [3]})
    write_image(dup / "val" / "class00" / "a.png", colour(0, 0))
    expect(dup, r"class 'class00' is in both the train and the val split")

    expect(tmp_path / "nowhere", r"dataset.root=.*nowhere is not a folder")
    expect(dup, r"dataset.channels=2 must be 1 .* or 3", channels=2)


def test_episode_shape_errors_name_split_and_class(tmp_path):
    root = tmp_path / "data"
    make_folder(root, "subfolders", {"train": [6, 4, 6], "val": [5, 5], "test": [5, 5]})
    splits, _ = load_folder(folder_cfg(root))
    with pytest.raises(MetarunError, match=r"way=3 is larger than the 2 classes of the val split"):
        EpisodeSampler(splits["val"], "val", 3, 1, 1, "cpu", seed=0)
    with pytest.raises(
        MetarunError,
        match=r"shot\+query=2\+3=5 is more than the 4 images per class of class "
        r"'class01' in the train split",
    ):
        EpisodeSampler(splits["train"], "train", 2, 2, 3, "cpu", seed=0)


def test_sampler_on_unequal_rgb_classes(tmp_path):
    root = tmp_path / "data"
    counts = [3, 9, 4, 12, 5]
    make_folder(root, "subfolders", {"train": counts, "val": [3], "test": [3]})
    classes = load_folder(folder_cfg(root))[0]["train"]
    way, shot, query, B = 3, 1, 2, 64
    ep = EpisodeSampler(classes, "train", way, shot, query, "cpu", seed=0).sample(B)
    assert ep.x_support.shape == (B, way * shot, 3, 8, 8) and ep.x_query.shape == (
        B,
        way * query,
        3,
        8,
        8,
    )
    assert torch.equal(
        ep.x_support[..., 2, :, :], torch.full_like(ep.x_support[..., 2, :, :], 200 / 255)
    )
    seen = set()
    for t in range(B):
        s = (ep.x_support[t, :, :2, 0, 0] * 255).round().long() - 1
        q = (ep.x_query[t, :, :2, 0, 0] * 255).round().long() - 1
        pairs = [tuple(p) for p in torch.cat([s, q]).tolist()]
        labels = ep.y_support[t].tolist() + ep.y_query[t].tolist()
        assert len(set(pairs)) == way * (shot + query)  # distinct images, support/query disjoint
        label_of = {}
        for (c, i), y in zip(pairs, labels, strict=True):
            assert 0 <= i < counts[c]  # never past the class's own images
            assert label_of.setdefault(c, y) == y
        assert len(label_of) == way
        seen.update(pairs)
    assert (3, 11) in seen and (1, 8) in seen  # large classes reach all their images
    # fixed evaluation tasks work on them too
    assert next(fixed_tasks(classes, "val", way, shot, query, "cpu", 4, 0, 4)).x_query.shape == (
        4,
        6,
        3,
        8,
        8,
    )


# ---- miniImageNet --------------------------------------------------------------------------------


def test_miniimagenet_layout(tmp_path):
    root = make_miniimagenet(tmp_path / "mini", per_class=4, classes=(3, 2, 2))
    cfg = OmegaConf.create(
        dict(
            name="miniimagenet",
            root=str(root),
            image_size=84,
            channels=3,
            cache_dir=None,
            rotate=False,
        )
    )
    splits, where = load_dataset(cfg)
    assert "miniImageNet" in where and (root / "metarun_miniimagenet_84x3.pt").is_file()
    assert [splits[s].num_classes for s in ("train", "val", "test")] == [3, 2, 2]
    assert (
        splits["train"].images.shape == (12, 3, 84, 84)
        and splits["train"].class_names[0] == "n00001000"
    )
    assert splits["test"].counts.tolist() == [4, 4]
    centre = splits["val"].images[:, :, 40, 40].float()
    expect = torch.tensor(
        [[3 + 1, i + 1, 200] for i in range(4)] + [[4 + 1, i + 1, 200] for i in range(4)]
    ).float()
    assert (centre - expect).abs().max() <= 3  # JPEG: close to the written colours
    (root / "val.csv").unlink()
    with pytest.raises(
        MetarunError,
        match=r"miniImageNet not found in dataset.root=.*no val.csv.*put Ravi & "
        r"Larochelle's train.csv, val.csv, test.csv .* images/ folder",
    ):
        load_dataset(cfg)


# ---- CIFAR-FS and FC100 --------------------------------------------------------------------------

FINE = sorted(
    c for members in SUPERCLASSES.values() for c in members
)  # CIFAR-100's fine label order
COARSE = sorted(SUPERCLASSES)


def make_cifar100(root: Path, train_per_class=2, test_per_class=1) -> Path:
    """A tiny `cifar-100-python` folder in torchvision's format: pickles with data [N, 3072] and
    labels."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    coarse_of = {c: COARSE.index(s) for s, members in SUPERCLASSES.items() for c in members}
    for part, n in (("train", train_per_class), ("test", test_per_class)):
        data, fine, coarse = [], [], []
        for i in range(n):
            for f, name in enumerate(FINE):
                img = np.zeros((3, 32, 32), dtype=np.uint8)
                img[0], img[1], img[2] = f, i + (100 if part == "test" else 0), 7
                data.append(img.reshape(-1))
                fine.append(f)
                coarse.append(coarse_of[name])
        blob = {
            "filenames": [f"{k}.png" for k in range(len(data))],
            "batch_label": part,
            "fine_labels": fine,
            "coarse_labels": coarse,
            "data": np.stack(data),
        }
        (folder / part).write_bytes(pickle.dumps(blob))
    (folder / "meta").write_bytes(
        pickle.dumps({"fine_label_names": FINE, "coarse_label_names": COARSE})
    )
    return root


def test_published_class_lists():
    assert (
        len(FINE) == 100 and len(COARSE) == 20 and all(len(m) == 5 for m in SUPERCLASSES.values())
    )
    for lists, counts in ((cifar_fs.CLASSES, (64, 16, 20)), (fc100.CLASSES, (60, 20, 20))):
        assert tuple(len(lists[s]) for s in ("train", "val", "test")) == counts
        assert (
            sorted(lists["train"] + lists["val"] + lists["test"]) == FINE
        )  # disjoint, all 100 classes
    sup = fc100.SPLIT_SUPERCLASSES
    assert tuple(len(sup[s]) for s in ("train", "val", "test")) == (12, 4, 4)
    # the TADAM indices (alphabetical superclass numbering of CIFAR-100)
    assert {s: {COARSE.index(c) for c in sup[s]} for s in sup} == {
        "train": {1, 2, 3, 4, 5, 6, 9, 10, 15, 17, 18, 19},
        "val": {8, 11, 13, 16},
        "test": {0, 7, 12, 14},
    }
    # CIFAR-FS: a few spot checks against Bertinetto et al.'s split files
    assert {"whale", "rose", "bicycle", "pickup_truck"} <= set(cifar_fs.CLASSES["test"])
    assert {"beaver", "otter", "tractor", "motorcycle"} <= set(cifar_fs.CLASSES["val"])


@pytest.mark.parametrize(
    "name,module,counts", [("cifar_fs", cifar_fs, (64, 16, 20)), ("fc100", fc100, (60, 20, 20))]
)
def test_cifar_datasets_from_torchvision_folder(tmp_path, name, module, counts):
    root = make_cifar100(tmp_path / "cifar")
    cfg = OmegaConf.create(
        dict(
            name=name,
            root=str(root),
            download=False,
            image_size=32,
            channels=3,
            cache_dir=str(tmp_path / "cache"),
            rotate=False,
        )
    )
    splits, where = load_dataset(cfg)
    assert "cifar-100-python" in where and len(list((tmp_path / "cache").glob("*.pt"))) == 1
    for s, n in zip(("train", "val", "test"), counts, strict=True):
        ci = splits[s]
        assert ci.class_names == list(module.CLASSES[s]) and ci.num_classes == n
        assert ci.images.shape == (3 * n, 3, 32, 32) and ci.counts.tolist() == [3] * n
        for c, cname in enumerate(ci.class_names):
            block = ci.images[3 * c : 3 * c + 3, :, 5, 5]
            assert block[:, 0].tolist() == [FINE.index(cname)] * 3 and block[:, 1].tolist() == [
                0,
                1,
                100,
            ]
    # resized once into its own cache; a missing copy without download is a one-line error
    assert load_dataset(OmegaConf.merge(cfg, {"image_size": 16}))[0]["val"].images.shape[-1] == 16
    with pytest.raises(
        MetarunError, match=r"CIFAR-100 not found: dataset.root=.* has no cifar-100-python/"
    ):
        load_dataset(OmegaConf.merge(cfg, {"root": str(tmp_path / "none")}))


# ---- RGB end to end ------------------------------------------------------------------------------


def test_rgb_84_episode_through_training_and_evaluation(tmp_path):
    """miniImageNet's 5-way 1-shot experiment config, shrunk, via the real CLI: train, then eval the
    checkpoint."""
    root = make_miniimagenet(tmp_path / "mini", per_class=16)
    from hydra import compose, initialize_config_dir

    from metarun.runner.setup import build_algorithm, load_splits, train_sampler

    with initialize_config_dir(
        config_dir=str(Path(__file__).resolve().parents[1] / "conf"), version_base="1.3"
    ):
        cfg = compose(
            "train",
            overrides=[
                "experiment=miniimagenet_5way_1shot",
                f"dataset.root={root}",
                "model.filters=4",
                "device=cpu",
            ],
        )
    splits = load_splits(cfg, torch.device("cpu"))["splits"]
    ep = train_sampler(cfg, splits["train"], "cpu").sample(int(cfg.meta_batch))
    assert ep.x_support.shape == (4, 5, 3, 84, 84) and ep.x_query.shape == (4, 75, 3, 84, 84)
    model, _ = build_algorithm(cfg, torch.device("cpu"))
    assert model.in_channels == 3 and model.downsample == "maxpool" and model.features == 4 * 5 * 5
    logits = model.forward(
        {k: v.unsqueeze(0).expand(4, *v.shape) for k, v in model.init_params().items()}, ep.x_query
    )
    assert logits.shape == (4, 75, 5)

    run = tmp_path / "run"
    run_metarun(
        "train",
        "experiment=miniimagenet_5way_1shot",
        f"dataset.root={root}",
        "model.filters=4",
        "device=cpu",
        "iterations=2",
        "eval_every=2",
        "val_tasks=2",
        "test_tasks=2",
        "eval_chunk=2",
        "log_every=1",
        "update_step_test=2",
        "algorithm.impl=batched",
        f"hydra.run.dir={run}",
        cwd=tmp_path,
        check=True,
    )
    results = json.loads((run / "results.json").read_text())
    assert "miniImageNet" in results["data_source"] and 0.0 <= results["test_accuracy"] <= 1.0
    assert results["config"]["model"]["in_channels"] == 3
    out = run_metarun(
        "eval",
        f"checkpoint={run}",
        "tasks=3",
        "update_step_test=1",
        "device=cpu",
        "eval_chunk=3",
        f"hydra.run.dir={tmp_path / 'eval'}",
        cwd=tmp_path,
        check=True,
    )
    assert (
        "test accuracy" in out.stdout
        and json.loads((tmp_path / "eval" / "eval.json").read_text())["tasks"] == 3
    )


@pytest.mark.parametrize("shot,meta_batch", [(1, 4), (5, 2)])
def test_miniimagenet_experiment_configs_have_the_papers_settings(shot, meta_batch):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(
        config_dir=str(Path(__file__).resolve().parents[1] / "conf"), version_base="1.3"
    ):
        cfg = compose("train", overrides=[f"experiment=miniimagenet_5way_{shot}shot"])
    assert (cfg.dataset.name, cfg.dataset.image_size, cfg.dataset.channels) == (
        "miniimagenet",
        84,
        3,
    )
    assert (cfg.way, cfg.shot, cfg.query, cfg.meta_batch) == (5, shot, 15, meta_batch)
    assert (cfg.update_step, cfg.update_step_test, cfg.update_lr, cfg.meta_lr) == (
        5,
        10,
        0.01,
        0.001,
    )
    assert (cfg.model.filters, cfg.model.downsample, cfg.model.in_channels) == (32, "maxpool", 3)


def test_equal_classes_draw_exactly_the_dense_tasks():
    """Omniglot (equal classes, one channel) gets bit for bit the tasks of the dense [classes,
    per_class] draw."""
    K, P, side, B, way, shot, query = 12, 20, 6, 5, 4, 2, 3
    dense = torch.randint(
        0, 256, (K, P, side, side), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    ep = EpisodeSampler(
        ClassImages(dense, [str(c) for c in range(K)]),
        "train",
        way,
        shot,
        query,
        "cpu",
        seed=3,
        rotate=True,
    ).sample(B)
    g = torch.Generator().manual_seed(
        draw_seed(3, 0)
    )  # each draw is seeded from (seed, draw number)
    classes = torch.rand(B, K, generator=g).argsort(dim=1)[:, :way]
    picks = torch.rand(B, way, P, generator=g).argsort(dim=2)[:, :, : shot + query]
    labels = torch.rand(B, way, generator=g).argsort(dim=1)
    turns = torch.randint(0, 4, (B, way), generator=g)
    x = dense[classes.unsqueeze(-1), picks]
    for b in range(B):
        for w in range(way):
            x[b, w] = torch.rot90(x[b, w], int(turns[b, w]), dims=(1, 2))
    x = x.unsqueeze(3).float() / 255
    assert torch.equal(ep.x_support, x[:, :, :shot].reshape(B, way * shot, 1, side, side))
    assert torch.equal(ep.x_query, x[:, :, shot:].reshape(B, way * query, 1, side, side))
    assert torch.equal(ep.y_query, labels.unsqueeze(-1).expand(B, way, query).reshape(B, -1))


# ---- what users' files really look like ---------------------------------------------------------


def test_folder_cache_on_a_full_disk_falls_back_like_a_read_only_dir(tmp_path, monkeypatch, caplog):
    root = tmp_path / "data"
    make_folder(root, "subfolders", {"train": [3, 3], "val": [3], "test": [3]})

    def full_disk(*a, **k):
        raise RuntimeError(
            "[enforce fail at inline_container.cc:672] . unexpected pos 4480 vs 4374"
        )

    monkeypatch.setattr(torch, "save", full_disk)
    splits, _ = load_folder(folder_cfg(root))
    assert splits["train"].counts.tolist() == [3, 3]
    assert "could not write the cache" in caplog.text and "no space left" in caplog.text
    assert not any((root / "cache").iterdir())


def write_grey16(path: Path, values: np.ndarray, fmt: str = "PNG") -> None:
    """A 16-bit greyscale image file (PIL mode I;16) of uint16 `values`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(values.astype(np.uint16)).save(path, format=fmt)


def sixteen_bit_folder(root: Path, fmt: str = "PNG", suffix: str = "png") -> np.ndarray:
    """train/val/test classes of 16-bit images, each a ramp over the whole 0..65535 range."""
    ramp = np.linspace(0, 65535, 64).round().astype(np.uint16).reshape(8, 8)
    for split, classes in (("train", 2), ("val", 1), ("test", 1)):
        for c in range(classes):
            for i in range(2):
                write_grey16(root / split / f"{split}{c}" / f"{i}.{suffix}", ramp, fmt)
    return ramp


@pytest.mark.parametrize("channels", [1, 3])
def test_sixteen_bit_pngs_are_scaled_not_clipped(tmp_path, channels):
    """16-bit PNGs (mode I;16) used to be clipped at 255 by PIL's convert: 98% of a ramp read as
    white. Scaled, the ramp keeps its 64 grey levels, 0 -> 0 and 65535 -> 255."""
    ramp = sixteen_bit_folder(tmp_path / "data")
    assert Image.open(tmp_path / "data" / "train" / "train0" / "0.png").mode == "I;16"
    splits, _ = load_folder(folder_cfg(tmp_path / "data", channels=channels))
    images = splits["train"].images
    expected = torch.from_numpy((ramp.astype(np.int64) * 255 + 32767) // 65535).to(torch.uint8)
    assert images.shape == (4, channels, 8, 8)
    assert all(torch.equal(img[c], expected) for img in images for c in range(channels))
    assert (images == 255).float().mean() < 0.05


def test_sixteen_bit_pgm_and_tiff_are_scaled_too(tmp_path):
    """Other 16-bit files: PGM (mode I) and TIFF (mode I;16)."""
    for fmt, suffix in (("PPM", "png"), ("TIFF", "jpg")):  # the suffix only lists the file
        root = tmp_path / fmt
        ramp = sixteen_bit_folder(root, fmt, suffix)
        first = next((root / "train" / "train0").iterdir())
        assert Image.open(first).mode in ("I", "I;16")
        images = load_folder(folder_cfg(root, channels=1))[0]["train"].images
        assert int(images.max()) == 255 and int(images.min()) == 0
        assert torch.equal(images[0, 0, 0], torch.tensor([0, 4, 8, 12, 16, 20, 24, 28]).byte())
        assert ramp.max() == 65535


@pytest.mark.parametrize(
    "array, mode",
    [(np.full((8, 8), 70000, dtype=np.int32), "I"), (np.full((8, 8), 0.5, np.float32), "F")],
)
def test_pixels_with_no_white_level_are_refused_naming_file_and_mode(tmp_path, array, mode):
    root = tmp_path / "data"
    make_folder(root, "subfolders", {"train": [3, 3], "val": [3], "test": [3]})
    odd = root / "val" / "class02" / "img001.png"
    Image.fromarray(array).save(odd, format="TIFF")
    with pytest.raises(MetarunError) as info:
        load_folder(folder_cfg(root))
    message = str(info.value)
    assert f"the image {odd} has" in message and f"(PIL mode {mode})" in message
    assert "save it as an 8-bit or 16-bit PNG" in message and "\n" not in message


def test_caches_of_an_older_decode_are_rebuilt(tmp_path, monkeypatch, caplog):
    """A cache written when 16-bit images were clipped is not reused by the decoder scaling them."""
    root = tmp_path / "data"
    sixteen_bit_folder(root)
    monkeypatch.setattr(imagecache, "DECODE_VERSION", 1)
    load_folder(folder_cfg(root))
    monkeypatch.undo()
    caplog.clear()
    load_folder(folder_cfg(root))
    assert "does not match the data (changed files or settings) or is corrupt; rebuilding" in (
        caplog.text
    )


def rewrite(path: Path, encoding: str, newline: str = "\r\n") -> None:
    """The same text file as a spreadsheet or Notepad saves it (another encoding, CRLF lines)."""
    text = path.read_text()
    path.write_bytes(text.replace("\r\n", "\n").replace("\n", newline).encode(encoding))


def test_miniimagenet_csvs_with_a_byte_order_mark(tmp_path):
    """CSVs saved by a spreadsheet program (UTF-8 with a byte-order mark, CRLF lines) read as the
    plain ones; the mark used to make the header a class and the dataset an incomplete one."""
    root = make_miniimagenet(tmp_path / "mini", per_class=2, classes=(3, 2, 2), size=8)
    cfg = OmegaConf.create(
        dict(name="miniimagenet", root=str(root), image_size=8, channels=3, cache_dir=None)
    )
    plain, _ = load_dataset(cfg)
    for split in ("train", "val", "test"):
        rewrite(root / f"{split}.csv", "utf-8-sig")
    assert (root / "train.csv").read_bytes().startswith(b"\xef\xbb\xbffilename,label\r\n")
    marked, _ = load_dataset(cfg)
    for split in ("train", "val", "test"):
        assert marked[split].class_names == plain[split].class_names
        assert torch.equal(marked[split].images, plain[split].images)
    rewrite(root / "val.csv", "utf-16")  # a spreadsheet's "Unicode text"
    with pytest.raises(MetarunError, match=r"val.csv is not UTF-8 text .*save it as a UTF-8 CSV"):
        load_dataset(cfg)


def test_folder_split_files_with_a_byte_order_mark(tmp_path):
    root = tmp_path / "data"
    names = make_folder(root, "splitfiles", {"train": [3, 3], "val": [3], "test": [3]})
    for split in ("train", "val", "test"):
        rewrite(root / f"{split}.txt", "utf-8-sig")
    splits, _ = load_folder(folder_cfg(root))
    assert [splits[s].class_names for s in ("train", "val", "test")] == list(names.values())
    rewrite(root / "test.txt", "utf-16")
    with pytest.raises(MetarunError, match=r"the test split file .*test.txt is not UTF-8 text"):
        load_folder(folder_cfg(root))
