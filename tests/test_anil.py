"""ANIL (metarun/algorithms/anil.py) against a head-only per-task reference (float64)."""

import pytest
import torch
from helpers import WAY, metarun_gradient, random_episodes, reference, relative_error

from metarun.algorithms.anil import ANIL
from metarun.errors import MetarunError
from metarun.models.conv4 import Conv4

HEAD = ["fc.weight", "fc.bias"]


@pytest.mark.parametrize("impl", ["batched", "parallel"])
@pytest.mark.parametrize("first_order", [False, True])
def test_anil_meta_gradient_equals_head_only_reference(impl, first_order):
    model = Conv4(WAY, filters=6, image_size=16)
    ep = random_episodes(tasks=3, way=WAY, shot=2, query=2, seed=1)
    algo = ANIL(model, 0.4, 2, 2, first_order, impl=impl, workers=2)
    meta = algo.init_meta_params(torch.Generator().manual_seed(1), dtype=torch.float64)
    assert set(meta) == set(model.init_params())
    # the definition: only the head's weights take inner steps; the body stays at the meta-weights
    expected = reference(
        meta,
        ep,
        2,
        lambda p, k, s: 0.4,
        lambda p, f, s: {**p, **f},
        HEAD,
        second_order=not first_order,
    )
    got = metarun_gradient(algo, meta, ep)
    assert relative_error(got, expected) < 1e-8
    body = [k for k in meta if k not in HEAD and "weight" in k]
    assert all(
        got[k].abs().max() > 0 for k in body
    )  # the body is meta-learned through the head's adaptation


def test_anil_differs_from_maml_and_refuses_a_missing_head():
    from metarun.algorithms.maml import MAML

    model = Conv4(WAY, filters=6, image_size=16)
    ep = random_episodes(tasks=2, way=WAY, shot=2, query=2, seed=1)
    meta = model.init_params(torch.Generator().manual_seed(1), dtype=torch.float64)
    a = metarun_gradient(ANIL(model, 0.4, 1, 1, impl="batched"), meta, ep)
    b = metarun_gradient(MAML(model, 0.4, 1, 1, impl="batched"), meta, ep)
    assert relative_error(a, b) > 1e-3
    with pytest.raises(MetarunError, match="head_layer='head'"):
        ANIL(model, 0.4, 1, 1, head_layer="head")
