"""Meta-SGD (metarun/algorithms/metasgd.py) against an independent per-task reference (float64),
its identity with MAML, and its alpha initialisation."""

import pytest
import torch
from helpers import WAY, learner, metarun_gradient, reference, relative_error, setup

from metarun.algorithms.metasgd import MetaSGD
from metarun.models.conv4 import Conv4


@pytest.mark.parametrize("impl", ["batched", "parallel"])
@pytest.mark.parametrize("first_order", [False, True])
def test_metasgd_meta_gradient_equals_reference(impl, first_order):
    model, ep = setup()
    algo = MetaSGD(model, 0.4, 2, 2, first_order, impl=impl, workers=2)
    meta = algo.init_meta_params(torch.Generator().manual_seed(1), dtype=torch.float64)
    names = learner(meta, model)
    assert {k for k in meta if k.startswith("alpha.")} == {"alpha." + k for k in names}
    assert all(meta["alpha." + k].shape == meta[k].shape for k in names)
    expected = reference(
        meta,
        ep,
        2,
        lambda p, k, s: p["alpha." + k],
        lambda p, f, s: f,
        names,
        second_order=not first_order,
    )
    got = metarun_gradient(algo, meta, ep)
    assert relative_error(got, expected) < 1e-8
    alpha_grad = torch.cat([got["alpha." + k].flatten() for k in names])
    assert alpha_grad.abs().max() > 0


def test_metasgd_with_alpha_at_update_lr_gives_maml_weight_gradient():
    model, ep = setup()
    algo = MetaSGD(model, 0.4, 2, 2, impl="batched", alpha_init_low=0.4, alpha_init_high=0.4)
    meta = algo.init_meta_params(torch.Generator().manual_seed(1), dtype=torch.float64)
    names = learner(meta, model)
    assert all(torch.all(meta["alpha." + k] == 0.4) for k in names)
    # MAML by its definition (scalar rate), independently of Meta-SGD's code path
    weights = {k: meta[k] for k in names}
    expected = reference(weights, ep, 2, lambda p, k, s: 0.4, lambda p, f, s: f, names)
    got = metarun_gradient(algo, meta, ep)
    assert relative_error({k: got[k] for k in names}, expected) < 1e-12


def test_metasgd_alpha_init_is_the_papers_range_and_seeded():
    model = Conv4(WAY, filters=6, image_size=16)
    a = MetaSGD(model, 0.4, 1, 1, alpha_seed=3).init_meta_params(torch.Generator().manual_seed(0))
    b = MetaSGD(model, 0.4, 1, 1, alpha_seed=3).init_meta_params(torch.Generator().manual_seed(0))
    alphas = torch.cat([v.flatten() for k, v in a.items() if k.startswith("alpha.")])
    assert alphas.min() >= 0.005 and alphas.max() <= 0.1 and alphas.std() > 0.01
    assert all(torch.equal(a[k], b[k]) for k in a)
