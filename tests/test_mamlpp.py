"""MAML++ (metarun/algorithms/mamlpp.py): its identity with MAML with every fix off, MSL + BNWB +
LSLR against an independent per-task reference (float64), and its schedules (multi-step loss
weights, derivative-order annealing, cosine annealing of the meta learning rate)."""

import pytest
import torch
from helpers import WAY, learner, metarun_gradient, reference, relative_error, setup

from metarun.algorithms.maml import MAML
from metarun.algorithms.mamlpp import MAMLPlusPlus, msl_weights
from metarun.models.conv4 import Conv4

OFF = dict(
    msl=False,
    bnwb=False,
    lslr=False,
    cosine_annealing=False,
    first_order_epochs=0,
    inner_bn=True,
    iterations=100,
    iterations_per_epoch=10,
)


@pytest.mark.parametrize("impl", ["batched", "parallel", "loop"])
def test_mamlpp_with_every_switch_off_is_maml_bit_for_bit(impl):
    model, ep = setup()
    params = model.init_params(torch.Generator().manual_seed(1), dtype=torch.float64)
    for first_order in (False, True):
        plus = MAMLPlusPlus(model, 0.4, 2, 2, first_order, impl=impl, workers=2, **OFF)
        assert set(plus.init_meta_params()) == set(params)
        plus.begin_iteration(55, None)
        a = metarun_gradient(plus, params, ep)
        b = metarun_gradient(MAML(model, 0.4, 2, 2, first_order, impl=impl, workers=2), params, ep)
        assert all(torch.equal(a[k], b[k]) for k in b)


def test_lslr_with_equal_frozen_rates_is_maml():
    model, ep = setup()
    algo = MAMLPlusPlus(model, 0.4, 3, 3, impl="batched", **{**OFF, "lslr": True})
    meta = algo.init_meta_params(torch.Generator().manual_seed(1), dtype=torch.float64)
    names = learner(meta, model)
    assert all(
        torch.equal(meta["lslr." + k], torch.full((3,), 0.4, dtype=torch.float64)) for k in names
    )
    got = metarun_gradient(algo, meta, ep)
    maml = metarun_gradient(MAML(model, 0.4, 3, 3, impl="batched"), {k: meta[k] for k in names}, ep)
    assert relative_error({k: got[k] for k in names}, maml) < 1e-12
    # the rates themselves get a meta-gradient, that of the definition
    expected = reference(meta, ep, 3, lambda p, k, s: p["lslr." + k][s], lambda p, f, s: f, names)
    assert relative_error(got, expected) < 1e-8
    assert all(got["lslr." + k].abs().min() > 0 for k in names)


@pytest.mark.parametrize("impl", ["batched", "parallel"])
def test_mamlpp_all_fixes_equal_reference(impl):
    """MSL + BNWB + LSLR, batch-norm weights not adapted (the authors' Omniglot config), second
    order."""
    model, ep = setup()
    algo = MAMLPlusPlus(
        model,
        0.3,
        3,
        3,
        impl=impl,
        workers=2,
        inner_loss="mean",
        **{**OFF, "msl": True, "msl_epochs": 4, "bnwb": True, "lslr": True, "inner_bn": False},
    )
    meta = algo.init_meta_params(torch.Generator().manual_seed(1), dtype=torch.float64)
    g = torch.Generator().manual_seed(5)
    meta = {
        k: v + 0.05 * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in meta.items()
    }  # untie steps
    assert meta["step_bn.bn0.weight"].shape == (3, 6) and "bn0.weight" not in meta
    adapted = [k for k in learner(meta, model) if not k.startswith("bn")]
    assert {k for k in meta if k.startswith("lslr.")} == {"lslr." + k for k in adapted}
    algo.begin_iteration(25, None)  # epoch 2 of msl_epochs 4
    weights = msl_weights(3, 2, 4)

    def weights_at(p, fast, s):
        out = dict(fast)
        for i in range(4):
            out[f"bn{i}.weight"], out[f"bn{i}.bias"] = (
                p[f"step_bn.bn{i}.weight"][s],
                p[f"step_bn.bn{i}.bias"][s],
            )
        return out

    expected = reference(
        meta,
        ep,
        3,
        lambda p, k, s: p["lslr." + k][s],
        weights_at,
        adapted,
        loss_weights=weights,
        inner="mean",
    )
    got = metarun_gradient(algo, meta, ep)
    assert relative_error(got, expected) < 1e-8
    assert all(got[k].abs().max() > 0 for k in got if k.startswith(("step_bn.", "lslr.")))
    # after msl_epochs only the last step's loss counts
    algo.begin_iteration(40, None)
    assert algo.step_loss_weights(3) is None
    last_only = reference(
        meta, ep, 3, lambda p, k, s: p["lslr." + k][s], weights_at, adapted, inner="mean"
    )
    assert relative_error(metarun_gradient(algo, meta, ep), last_only) < 1e-8


# The authors' get_per_step_loss_importance_vector for 5 steps over 10 epochs, worked out by hand:
# decay 1/5/10 = 0.02 per epoch, floor 0.03/5 = 0.006, final cap 1 - 4 * 0.006 = 0.976.
MSL_TABLE = [
    (0, [0.2, 0.2, 0.2, 0.2, 0.2]),
    (1, [0.18, 0.18, 0.18, 0.18, 0.28]),
    (5, [0.1, 0.1, 0.1, 0.1, 0.6]),
    (9, [0.02, 0.02, 0.02, 0.02, 0.92]),
    (10, [0.006, 0.006, 0.006, 0.006, 0.976]),
    (30, [0.006, 0.006, 0.006, 0.006, 0.976]),
]


@pytest.mark.parametrize("epoch,expected", MSL_TABLE)
def test_msl_weights_follow_the_authors_schedule(epoch, expected):
    assert msl_weights(5, epoch, 10) == pytest.approx(expected, abs=1e-12)


def test_msl_schedule_is_applied_per_epoch_of_iterations():
    model = Conv4(WAY, filters=6, image_size=16)
    algo = MAMLPlusPlus(
        model,
        0.1,
        5,
        5,
        **{**OFF, "msl": True, "msl_epochs": 10, "iterations_per_epoch": 500, "iterations": 50000},
    )
    for iteration, epoch in ((0, 0), (499, 0), (500, 1), (2999, 5), (4999, 9)):
        algo.begin_iteration(iteration, None)
        assert algo.step_loss_weights(5) == pytest.approx(
            dict(MSL_TABLE)[epoch] if epoch in dict(MSL_TABLE) else msl_weights(5, epoch, 10)
        )
    algo.begin_iteration(5000, None)
    assert algo.step_loss_weights(5) is None


def test_derivative_order_annealing_switches_at_the_given_epoch():
    model, ep = setup(tasks=2)
    params = model.init_params(torch.Generator().manual_seed(1), dtype=torch.float64)
    algo = MAMLPlusPlus(
        model,
        0.4,
        2,
        2,
        impl="batched",
        **{**OFF, "first_order_epochs": 2, "iterations_per_epoch": 3, "iterations": 12},
    )
    first = metarun_gradient(MAML(model, 0.4, 2, 2, True, impl="batched"), params, ep)
    second = metarun_gradient(MAML(model, 0.4, 2, 2, False, impl="batched"), params, ep)
    for iteration, order in ((0, first), (5, first), (6, second), (11, second)):
        algo.begin_iteration(iteration, None)
        got = metarun_gradient(algo, params, ep)
        assert all(torch.equal(got[k], order[k]) for k in order), iteration
    assert relative_error(first, second) > 1e-3


def test_cosine_annealing_of_the_meta_learning_rate():
    model = Conv4(WAY, filters=6, image_size=16)
    algo = MAMLPlusPlus(
        model,
        0.1,
        1,
        1,
        **{**OFF, "cosine_annealing": True, "iterations": 1000, "iterations_per_epoch": 100},
        meta_lr=1e-3,
        min_meta_lr=1e-5,
    )
    p = torch.zeros(2, requires_grad=True)
    opt = torch.optim.Adam([p], lr=1e-3)
    torch_opt = torch.optim.Adam([torch.zeros(2, requires_grad=True)], lr=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(torch_opt, T_max=10, eta_min=1e-5)
    for epoch in range(10):
        algo.begin_iteration(epoch * 100 + 50, opt)
        assert opt.param_groups[0]["lr"] == pytest.approx(sched.get_last_lr()[0], rel=1e-12)
        torch_opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] < 1e-4
