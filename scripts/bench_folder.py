"""Cold/warm load time, peak memory and sampler speed of `dataset=folder` on a generated
miniImageNet-sized set.

    python scripts/bench_folder.py DIR [--classes 100] [--per-class 600] [--size 84]
    [--tasks-batches 50]

Writes DIR/{train,val,test}/<class>/*.jpg once (64/16/20 of the classes, random smooth colour
images), then runs, each in a fresh process: a cold load (decode + write the cache), a warm load
(the cache), and the train sampler (5-way 1-shot 15-query, meta_batch 4, as the MAML paper's
miniImagenet cell). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def generate(root: Path, classes: int, per_class: int, size: int) -> None:
    from PIL import Image

    if (root / "done").is_file():
        return
    rng = np.random.default_rng(0)
    n_train, n_val = round(classes * 0.64), round(classes * 0.16)
    for c in range(classes):
        split = "train" if c < n_train else "val" if c < n_train + n_val else "test"
        folder = root / split / f"n{c:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            small = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
            Image.fromarray(small).resize((size, size), Image.Resampling.BILINEAR).save(
                folder / f"{i:04d}.jpg", quality=90
            )
    (root / "done").write_text("ok")


def worker(root: str, size: int, sample_batches: int) -> dict:
    import torch
    from omegaconf import OmegaConf

    from metarun.data.episodes import EpisodeSampler
    from metarun.data.folder import load_folder

    cfg = OmegaConf.create(
        dict(
            name="folder",
            root=root,
            split_files=None,
            image_size=size,
            channels=3,
            cache_dir=str(Path(root) / "cache"),
            rotate=False,
        )
    )
    rss_before = (
        int(next(s for s in open("/proc/self/status") if s.startswith("VmRSS")).split()[1]) / 1024
    )
    t = time.perf_counter()
    splits, _ = load_folder(cfg)
    load_s = time.perf_counter() - t
    out = {
        "load_s": load_s,
        "images": sum(len(s.images) for s in splits.values()),
        "cache_bytes": sum(s.images.numel() for s in splits.values()),
    }
    if sample_batches:
        sampler = EpisodeSampler(splits["train"], "train", 5, 1, 15, "cpu", seed=0)
        sampler.sample(4)
        t = time.perf_counter()
        for _ in range(sample_batches):
            sampler.sample(4)
        out["sampler_tasks_per_s"] = sample_batches * 4 / (time.perf_counter() - t)
    out["rss_before_load_mib"] = rss_before
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["threads"] = torch.get_num_threads()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("root")
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--per-class", type=int, default=600)
    ap.add_argument("--size", type=int, default=84)
    ap.add_argument("--tasks-batches", type=int, default=50)
    ap.add_argument("--worker", action="store_true")
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.root, args.size, args.tasks_batches)))
        return
    root = Path(args.root)
    t = time.perf_counter()
    generate(root, args.classes, args.per_class, args.size)
    gen_s = time.perf_counter() - t
    shutil.rmtree(root / "cache", ignore_errors=True)
    cmd = [sys.executable, __file__, str(root), "--size", str(args.size), "--worker"]

    def run(extra):
        return json.loads(
            subprocess.run(cmd + extra, capture_output=True, text=True, check=True).stdout
        )

    cold = run(["--tasks-batches", "0"])
    warm = run(["--tasks-batches", str(args.tasks_batches)])
    print(
        json.dumps(
            {
                "classes": args.classes,
                "per_class": args.per_class,
                "size": args.size,
                "generate_s": gen_s,
                "cold": cold,
                "warm": warm,
            }
        )
    )


if __name__ == "__main__":
    main()
