"""Meta-SGD and MAML++ against independent per-task references (float64), their identities with
MAML, the MAML++ schedules, the registry and configs, and the rule that constructing an algorithm
changes no process-wide state."""

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    REPO,
    WAY,
    build,
    metarun_gradient,
    random_episodes,
    reference,
    relative_error,
    synthetic_tasks,
)

from metarun.algorithms import algorithm_class, registry
from metarun.algorithms.anil import ANIL
from metarun.algorithms.base import meta_train_step
from metarun.algorithms.engine import Engine
from metarun.algorithms.maml import MAML
from metarun.algorithms.mamlpp import MAMLPlusPlus, msl_weights
from metarun.algorithms.metasgd import MetaSGD
from metarun.algorithms.pretrain import ImageBatch, Pretrain
from metarun.algorithms.reptile import Reptile
from metarun.data.episodes import Episodes
from metarun.errors import MetarunError
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


def setup(seed=1, tasks=3):
    model = Conv4(WAY, filters=6, image_size=16)
    return model, random_episodes(tasks=tasks, way=WAY, shot=2, query=2, seed=seed)


def learner(meta, model):
    return [k for k in model.init_params() if k in meta]


# -- Meta-SGD --------------------------------------------------------------------------------------
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


# -- MAML++ ----------------------------------------------------------------------------------------
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


# -- every algorithm -------------------------------------------------------------------------------


def post_adaptation_loss(algo, params, ep):
    logits = algo.query_logits(params, ep)
    return F.cross_entropy(logits.flatten(0, 1), ep.y_query.flatten()).item()


@pytest.mark.parametrize("name", ["metasgd", "mamlpp"])
def test_each_algorithm_lowers_post_adaptation_query_loss(name):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    pool = (torch.rand(40, 1, 14, 14, generator=g) > 0.6).float()
    model = Conv4(way=3, filters=16, image_size=14)
    algo = build(name, model)
    params = {
        k: v.requires_grad_(True)
        for k, v in algo.init_meta_params(torch.Generator().manual_seed(0)).items()
    }
    rates = {k: v.detach().clone() for k, v in params.items() if k.startswith(("alpha.", "lslr."))}
    held_out = synthetic_tasks(pool, 64, 3, 1, 5, torch.Generator().manual_seed(99))
    before = post_adaptation_loss(algo, params, held_out)
    optimizer = torch.optim.Adam(params.values(), lr=1e-2)
    for it in range(40):
        algo.begin_iteration(it, optimizer)
        meta_train_step(algo, params, optimizer, synthetic_tasks(pool, 8, 3, 1, 5, g))
        if it == 0:
            assert all(
                params[k].grad.abs().max() > 0 for k in rates if "conv" not in k or "weight" in k
            )
    after = post_adaptation_loss(algo, params, held_out)
    # measured: metasgd 0.83 -> 0.41, mamlpp 0.96 -> 0.43
    assert after < 0.7 * before, (before, after)
    # (a conv bias feeds batch norm, which cancels it: its gradient, and its rate's, is zero up to
    # rounding)
    unchanged = [
        k
        for k, v in rates.items()
        if torch.equal(params[k].detach(), v)
        and not (k.endswith(".bias") and ".conv" in "." + k.split(".", 1)[1])
    ]
    assert rates and not unchanged, unchanged  # and they learn


@pytest.mark.parametrize("name", ["maml", "metasgd", "mamlpp"])
def test_constructing_an_algorithm_changes_no_process_state(name):
    model = Conv4(WAY, filters=6, image_size=16)
    threads, rng = torch.get_num_threads(), torch.get_rng_state()
    for impl in ("auto", "parallel", "batched"):
        algo = build(name, model, engine=Engine(impl, 2 if impl == "parallel" else 0))
        algo.init_meta_params(torch.Generator().manual_seed(0))
        assert torch.get_num_threads() == threads
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.get_default_dtype() == torch.float32


def test_registry_matches_the_algorithm_configs():
    import yaml

    confs = {
        p.stem: yaml.safe_load(p.read_text()) for p in (REPO / "conf" / "algorithm").glob("*.yaml")
    }
    names = {"maml", "metasgd", "mamlpp", "anil", "reptile", "pretrain", "protonet", "protomaml"}
    assert set(confs) == set(registry()) == names
    assert all(c["name"] == stem for stem, c in confs.items())
    with pytest.raises(
        MetarunError, match="maml, metasgd, mamlpp, anil, reptile, pretrain, protonet, protomaml"
    ):
        algorithm_class("nosuch")


@pytest.mark.parametrize(
    "experiment",
    sorted(
        str(p.relative_to(REPO / "conf" / "experiment").with_suffix(""))
        for p in (REPO / "conf" / "experiment").rglob("*.yaml")
    ),
)
def test_every_experiment_config_builds_its_algorithm(experiment):
    from hydra import compose, initialize_config_dir

    from metarun.runner.setup import build_algorithm, check_train_settings

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        extra = (
            ["algorithm.num_classes=12"] if experiment.startswith("pretrain") else []
        )  # the data's, else
        cfg = compose(
            config_name="train", overrides=[f"experiment={experiment}", "model.filters=4", *extra]
        )
    check_train_settings(cfg)
    threads = torch.get_num_threads()
    _, algo = build_algorithm(cfg, torch.device("cpu"))
    assert torch.get_num_threads() == threads
    assert (
        algo.name
        == cfg.algorithm.name
        == (
            experiment.split("_")[0]
            if "_" in experiment and experiment.split("_")[0] in registry()
            else "maml"
        )
    )
    params = algo.init_meta_params(torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    shape = (int(cfg.model.in_channels), int(cfg.dataset.image_size), int(cfg.dataset.image_size))
    labels = lambda n: torch.stack(
        [torch.randperm(int(cfg.way), generator=g).repeat_interleave(n) for _ in range(2)]
    )
    ep = Episodes(
        torch.rand(2, int(cfg.way) * int(cfg.shot), *shape, generator=g),
        labels(int(cfg.shot)),
        torch.rand(2, int(cfg.way), *shape, generator=g),
        labels(1),
    )
    algo.begin_iteration(0, None)
    batch = algo.bench_batch(ep, g)  # reptile, pretrain: their own kind of training batch
    assert algo.accumulate_meta_gradient(
        {k: v.requires_grad_(True) for k, v in params.items()}, batch
    ).meta_loss.isfinite()


@pytest.mark.parametrize(
    "kw,fragment",
    [
        (dict(name="metasgd", alpha_init_low=0.0), "alpha_init_low=0.0"),
        (dict(name="metasgd", alpha_init_low=0.2, alpha_init_high=0.1), "alpha_init_low=0.2"),
        (dict(name="mamlpp", msl_epochs=5), "msl_epochs=5"),
        (dict(name="mamlpp", first_order_epochs=9), "first_order_epochs=9"),
        (dict(name="mamlpp", bnrs=True), "bnrs=true"),
        (dict(name="mamlpp", min_meta_lr=0.0), "min_meta_lr=0.0"),
    ],
)
def test_impossible_settings_are_refused_at_construction(kw, fragment):
    model = Conv4(WAY, filters=6, image_size=16)
    name = kw.pop("name")
    with pytest.raises(MetarunError, match=fragment.replace(".", r"\.")):
        if name == "metasgd":
            MetaSGD(model, 0.4, 1, 1, **kw)
        else:
            MAMLPlusPlus(
                model,
                0.4,
                2,
                2,
                **{**dict(iterations=100, iterations_per_epoch=25, msl_epochs=2), **kw},
            )


@pytest.mark.parametrize("name", ["maml", "metasgd", "mamlpp"])
def test_benchmark_reference_loop_computes_the_same_meta_gradient(name):
    """scripts/bench.py --compare times algorithms/reference.py against the engine: same objective."""
    from metarun.algorithms.reference import reference_meta_loss

    model, ep = setup()
    algo = build(name, model)
    algo.begin_iteration(10, None)  # mamlpp: epoch 0 of MSL
    meta = algo.init_meta_params(torch.Generator().manual_seed(1), dtype=torch.float64)
    leaves = {k: v.clone().requires_grad_(True) for k, v in meta.items()}
    expected = dict(
        zip(
            leaves,
            torch.autograd.grad(
                reference_meta_loss(algo, leaves, ep), list(leaves.values()), allow_unused=True
            ),
        )
    )
    expected = {k: torch.zeros_like(meta[k]) if g is None else g for k, g in expected.items()}
    assert relative_error(metarun_gradient(algo, meta, ep), expected) < 1e-8


def post_loss(algo, params, ep):
    logits = algo.query_logits(params, ep)
    return F.cross_entropy(logits.flatten(0, 1), ep.y_query.flatten()).item()


@pytest.mark.parametrize("name", ["anil", "reptile", "pretrain"])
def test_each_new_algorithm_lowers_post_adaptation_query_loss(name):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    pool = (torch.rand(40, 1, 14, 14, generator=g) > 0.6).float()
    model = Conv4(way=3, filters=16, image_size=14)
    if name == "anil":
        algo, lr = ANIL(model, 0.4, 1, 3, impl="batched"), 1e-2
    elif name == "reptile":
        algo, lr = (
            Reptile(
                model,
                1e-2,
                4,
                8,
                train_shots=4,
                inner_batch=6,
                meta_step=1.0,
                meta_step_final=0.0,
                iterations=40,
                eval_inner_batch=0,
                transductive=True,
                impl="batched",
            ),
            None,
        )
    else:
        algo, lr = Pretrain(model, num_classes=40, finetune_epochs=30, impl="batched"), 1e-2
    params = {
        k: v.requires_grad_(True)
        for k, v in algo.init_meta_params(torch.Generator().manual_seed(0)).items()
    }
    held_out = synthetic_tasks(pool, 64, 3, 1, 5, torch.Generator().manual_seed(99))
    before = post_loss(algo, params, held_out)
    optimizer = algo.make_optimizer(list(params.values()), lr or 1e-3)
    for it in range(40):
        algo.begin_iteration(it, optimizer)
        if name == "pretrain":
            idx = torch.randint(0, 40, (32,), generator=g)
            batch = ImageBatch(pool[idx] + 0.35 * torch.randn(32, 1, 14, 14, generator=g), idx)
        else:
            ep = synthetic_tasks(
                pool, 8, 3, 2 if name == "reptile" else 1, 2 if name == "reptile" else 5, g
            )
            batch = algo.bench_batch(ep, g)
        meta_train_step(algo, params, optimizer, batch)
    after = post_loss(algo, params, held_out)
    # measured: anil 0.88 -> 0.16, reptile 0.32 -> 0.18, pretrain 1.07 -> 0.70
    assert after < 0.7 * before, (before, after)


@pytest.mark.parametrize("name", ["anil", "reptile", "pretrain"])
def test_constructing_a_new_algorithm_changes_no_process_state(name):
    threads, rng = torch.get_num_threads(), torch.get_rng_state()
    learner = Conv4(WAY, filters=4, image_size=16)
    for impl in ("auto", "parallel"):
        kw = dict(impl=impl, workers=2 if impl == "parallel" else 0)
        algo = {
            "anil": lambda: ANIL(learner, 0.4, 1, 1, **kw),
            "reptile": lambda: Reptile(learner, 0.4, 1, 1, **kw),
            "pretrain": lambda: Pretrain(learner, num_classes=4, **kw),
        }[name]()
        algo.init_meta_params(torch.Generator().manual_seed(0))
        assert torch.get_num_threads() == threads
    assert torch.equal(torch.get_rng_state(), rng) and torch.get_default_dtype() == torch.float32
