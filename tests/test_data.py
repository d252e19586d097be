import errno
import shutil
import zipfile

import numpy as np
import pytest
import torch
from helpers import (
    DRAWERS,
    assert_clean_error,
    ids,
    labelled_classes,
    make_omniglot,
    run_metarun,
    tiny_args,
)
from omegaconf import OmegaConf

from metarun.data import omniglot as omniglot_module
from metarun.data.episodes import EpisodeSampler, fixed_tasks
from metarun.data.omniglot import load_omniglot, split_characters
from metarun.data.sources import find_archives, read_archives
from metarun.errors import MetarunError


def dataset_cfg(root, **kw):
    base = dict(
        name="omniglot",
        root=str(root),
        source="archives",
        download=False,
        cache_dir=str(root / "cache"),
        image_size=28,
        split="maml",
        split_seed=1,
        lake_val_alphabets=1,
        rotate=True,
    )
    base.update(kw)
    return OmegaConf.create(base)


def test_zip_and_folders_decode_identically(tiny_root, tmp_path):
    folders = make_omniglot(tmp_path / "folders", as_zip=False)
    a = read_archives(find_archives(tiny_root))
    b = read_archives(find_archives(folders))
    assert a.masks.shape == (48 * DRAWERS, 105, 105)
    assert np.array_equal(a.masks, b.masks) and np.array_equal(a.character, b.character)
    assert a.character_names == b.character_names and len(a.character_names) == 48
    assert set(a.archive.tolist()) == {0, 1} and (a.archive == 0).sum() == 32 * DRAWERS
    assert a.masks.any(axis=(1, 2)).all()  # every image has ink


def test_cache_is_reused_and_rebuilt(tiny_root, tmp_path, monkeypatch):
    cfg = dataset_cfg(tiny_root, cache_dir=str(tmp_path / "cache"))
    first = load_omniglot(cfg)
    cache = tmp_path / "cache" / "omniglot_28.pt"
    assert (
        cache.is_file()
        and first.images.shape == (48 * DRAWERS, 28, 28)
        and first.images.dtype == torch.uint8
    )

    def no_decode(*a, **k):
        raise AssertionError("decoded although the cache is valid")

    monkeypatch.setattr(omniglot_module.sources, "read_archives", no_decode)
    again = load_omniglot(cfg)
    assert torch.equal(again.images, first.images)
    monkeypatch.undo()

    # another size is another cache file; a corrupt cache is rebuilt, not trusted
    assert load_omniglot(
        dataset_cfg(tiny_root, cache_dir=str(tmp_path / "cache"), image_size=20)
    ).images.shape[1:] == (20, 20)
    cache.write_bytes(b"garbage")
    assert torch.equal(load_omniglot(cfg).images, first.images)
    # different archives (another fingerprint) rebuild it too
    other = make_omniglot(
        tmp_path / "other", layout={"images_background": 1, "images_evaluation": 1}, characters=3
    )
    shutil.copy(cache, other / "omniglot_28.pt")
    assert load_omniglot(dataset_cfg(other, cache_dir=str(other))).images.shape[0] == 6 * DRAWERS


def test_maml_and_lake_splits_are_disjoint(tiny_root):
    data = load_omniglot(dataset_cfg(tiny_root))
    maml = split_characters(data, "maml", 1, 1)
    assert [len(maml[k]) for k in ("train", "val", "test")] == [33, 3, 12]
    lake = split_characters(data, "lake", 1, 1)
    assert len(lake["test"]) == 16 and len(lake["val"]) == 8 and len(lake["train"]) == 24
    for split in (maml, lake):
        ids = split["train"] + split["val"] + split["test"]
        assert len(ids) == len(set(ids)) == 48
    archive_of = {int(c): int(a) for c, a in zip(data.character, data.archive, strict=True)}
    assert all(archive_of[c] == 1 for c in lake["test"]) and all(
        archive_of[c] == 0 for c in lake["train"] + lake["val"]
    )
    assert maml == split_characters(data, "maml", 1, 1) and maml != split_characters(
        data, "maml", 2, 1
    )
    with pytest.raises(MetarunError, match="dataset.split"):
        split_characters(data, "bogus", 1, 1)


def test_sampler_invariants():
    way, shot, query, batch = 4, 2, 3, 8
    sampler = EpisodeSampler(
        labelled_classes(), "train", way, shot, query, "cpu", seed=0, rotate=True
    )
    ep = sampler.sample(batch)
    assert ep.x_support.shape == (batch, way * shot, 1, 6, 6) and ep.x_query.shape == (
        batch,
        way * query,
        1,
        6,
        6,
    )
    assert ep.y_support.shape == (batch, way * shot) and ep.y_query.shape == (batch, way * query)
    orders = set()
    for t in range(batch):
        assert torch.equal(torch.bincount(ep.y_support[t], minlength=way), torch.full((way,), shot))
        assert torch.equal(torch.bincount(ep.y_query[t], minlength=way), torch.full((way,), query))
        s, q = ids(ep.x_support[t]), ids(ep.x_query[t])
        assert len(s) == way * shot and len(q) == way * query
        assert not {(c, i) for c, i, _ in s} & {(c, i) for c, i, _ in q}  # support/query disjoint
        assert len({(c, i) for c, i, _ in s + q}) == way * (shot + query)  # no repeated image
        label_of, turn_of = {}, {}
        for (c, _, k), y in zip(
            s + q, ep.y_support[t].tolist() + ep.y_query[t].tolist(), strict=True
        ):
            assert label_of.setdefault(c, y) == y  # one label per class
            assert turn_of.setdefault(c, k) == k  # one rotation per class
        assert len(label_of) == way
        orders.add(tuple(label_of[c] for c in sorted(label_of)))
    assert len(orders) > 1  # labels shuffled per task
    # rotation is off for evaluation tasks
    for _c, _i, k in ids(
        next(fixed_tasks(labelled_classes(), "val", way, shot, query, "cpu", 4, 0, 4)).x_query
    ):
        assert k == 0


def test_sampler_is_deterministic_and_resumable():
    a = EpisodeSampler(labelled_classes(), "train", 3, 1, 2, "cpu", seed=5, rotate=True)
    b = EpisodeSampler(labelled_classes(), "train", 3, 1, 2, "cpu", seed=5, rotate=True)
    a.sample(4)
    state = a.state()
    next_a = a.sample(4)
    b.load_state(state)
    assert torch.equal(b.sample(4).x_query, next_a.x_query)
    c = EpisodeSampler(labelled_classes(), "train", 3, 1, 2, "cpu", seed=6, rotate=True)
    c.sample(4)
    assert not torch.equal(c.sample(4).x_query, next_a.x_query)
    t1 = [e.x_support for e in fixed_tasks(labelled_classes(), "val", 3, 1, 2, "cpu", 10, 7, 4)]
    t2 = [e.x_support for e in fixed_tasks(labelled_classes(), "val", 3, 1, 2, "cpu", 10, 7, 4)]
    assert len(t1) == 3 and all(torch.equal(x, y) for x, y in zip(t1, t2, strict=True))


@pytest.mark.parametrize(
    "way,shot,query,message",
    [
        (11, 1, 1, r"way=11 is larger than the 10 classes of the train split"),
        (5, 15, 6, r"shot\+query=15\+6=21 is more than the 20 images per class"),
        (0, 1, 1, r"way=0 must be a positive integer"),
        (5, 1, -1, r"query=-1 must be a positive integer"),
    ],
)
def test_bad_episode_settings(way, shot, query, message):
    with pytest.raises(MetarunError, match=message):
        EpisodeSampler(labelled_classes(), "train", way, shot, query, "cpu", seed=0)


def test_missing_and_corrupt_data(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(
        MetarunError, match=r"images_background.zip and images_evaluation.zip.*dataset.root"
    ):
        load_omniglot(dataset_cfg(empty))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "images_background.zip").write_bytes(b"not a zip at all")
    (bad / "images_evaluation.zip").write_bytes(b"not a zip at all")
    with pytest.raises(MetarunError, match="not a readable zip archive"):
        load_omniglot(dataset_cfg(bad))
    # a truncated archive: the central directory is gone
    trunc = make_omniglot(
        tmp_path / "trunc", layout={"images_background": 1, "images_evaluation": 1}, characters=2
    )
    data = (trunc / "images_background.zip").read_bytes()
    (trunc / "images_background.zip").write_bytes(data[: len(data) // 2])
    with pytest.raises(MetarunError, match="images_background.zip"):
        load_omniglot(dataset_cfg(trunc))
    with pytest.raises(MetarunError, match="dataset.image_size"):
        load_omniglot(dataset_cfg(trunc, image_size=0))
    assert zipfile.is_zipfile(trunc / "images_evaluation.zip")


# torch.save on a full disk raises a RuntimeError from its zip writer, not an OSError
TORCH_DISK_FULL = RuntimeError(
    "[enforce fail at inline_container.cc:672] . unexpected pos 4480 vs 4374"
)


@pytest.mark.parametrize(
    "error, reason",
    [
        (TORCH_DISK_FULL, "no space left on device ([enforce fail"),
        (OSError(errno.ENOSPC, "No space left on device"), "(no space left on device)"),
        (PermissionError(errno.EACCES, "Permission denied"), "(permission denied)"),
    ],
)
def test_cache_that_cannot_be_written_only_warns(
    tiny_root, tmp_path, monkeypatch, caplog, error, reason
):
    """A full disk (torch's RuntimeError or ENOSPC) or a read-only place: the decoded data is used,
    one warning says the cache was not written and why, and no partial file is left behind."""
    cache_dir = tmp_path / "cache"

    def full_disk(obj, fh, *a, **k):
        fh.write(b"PK\x03\x04 half a file")
        raise error

    monkeypatch.setattr(torch, "save", full_disk)
    data = load_omniglot(dataset_cfg(tiny_root, cache_dir=str(cache_dir)))
    assert data.images.shape == (48 * DRAWERS, 28, 28)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert (
        len(warnings) == 1
        and f"could not write the cache {cache_dir / 'omniglot_28.pt'}" in (warnings[0])
    )
    assert reason in warnings[0] and "set dataset.cache_dir to a writable folder" in warnings[0]
    assert list(cache_dir.iterdir()) == []  # the temporary file went with the failure


def test_missing_and_damaged_data(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = run_metarun(
        *tiny_args(empty, tmp_path / "r1", "dataset.source=archives", "dataset.download=false"),
        cwd=tmp_path,
    )
    assert_clean_error(proc, str(empty), "images_background.zip", "dataset.root")
    bad = make_omniglot(
        tmp_path / "bad", layout={"images_background": 1, "images_evaluation": 1}, characters=2
    )
    (bad / "images_evaluation.zip").write_bytes(b"PK\x03\x04 this is no zip")
    assert_clean_error(
        run_metarun(*tiny_args(bad, tmp_path / "r2"), cwd=tmp_path),
        "images_evaluation.zip",
        "not a readable zip",
    )
    data = (bad / "images_background.zip").read_bytes()
    (bad / "images_background.zip").write_bytes(data[: len(data) * 2 // 3])
    assert_clean_error(
        run_metarun(*tiny_args(bad, tmp_path / "r3"), cwd=tmp_path), "images_background.zip"
    )


def test_corrupt_cache_is_rebuilt(tiny_root, tmp_path):
    root = make_omniglot(tmp_path / "data")
    run_metarun(*tiny_args(root, tmp_path / "r1", "iterations=1"), cwd=tmp_path, check=True)
    cache = root / "cache" / "omniglot_28.pt"
    cache.write_bytes(cache.read_bytes()[:1000])
    proc = run_metarun(*tiny_args(root, tmp_path / "r2", "iterations=1"), cwd=tmp_path, check=True)
    assert "stale or corrupt; rebuilding" in proc.stderr
    torch.load(cache, weights_only=True)
