"""Fixtures shared by the test modules: a tiny Omniglot built by the tests themselves (no network)
and one trained-then-resumed run. Plain helpers are in helpers.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import make_omniglot, run_metarun, tiny_args


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    """48 characters (32 background, 16 evaluation) x 20 drawers, as zip archives."""
    return make_omniglot(tmp_path_factory.mktemp("omniglot"))


@pytest.fixture(scope="session")
def run(tiny_root, tmp_path_factory):
    """One 3-way run with a non-default update_lr, 3 iterations, then resumed (by the bare command)
    to 6 with another validation cadence. Returns (run dir, the first segment's files, the resume's
    output)."""
    base = tmp_path_factory.mktemp("field")
    run = base / "run"
    first = run_metarun(
        *tiny_args(
            tiny_root,
            run,
            "iterations=3",
            "update_lr=0.2",
            "query=2",
            f"dataset.cache_dir={base / 'cache'}",
        ),
        cwd=base,
        check=True,
    )
    before = {
        "config": (run / ".hydra" / "config.yaml").read_bytes(),
        "overrides": (run / ".hydra" / "overrides.yaml").read_bytes(),
        "results": json.loads((run / "results.json").read_text()),
        "stdout": first.stdout,
    }
    resumed = run_metarun(
        "train", f"resume={run}", "iterations=6", "eval_every=1", cwd=base, check=True
    )
    return run, before, resumed
