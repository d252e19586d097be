"""Every algorithm (metarun/algorithms): the post-adaptation query loss falls on the synthetic task
family, constructing one changes no process-wide state, the registry matches the configs, every
experiment config builds its algorithm, impossible settings are refused, and the benchmark's
reference loop computes the engine's meta-gradient."""

import pytest
import torch
import torch.nn.functional as F
from helpers import REPO, WAY, build, metarun_gradient, relative_error, setup, synthetic_tasks

from metarun.algorithms import algorithm_class, registry
from metarun.algorithms.anil import ANIL
from metarun.algorithms.base import meta_train_step
from metarun.algorithms.engine import Engine
from metarun.algorithms.mamlpp import MAMLPlusPlus
from metarun.algorithms.metasgd import MetaSGD
from metarun.algorithms.pretrain import ImageBatch, Pretrain
from metarun.algorithms.reptile import Reptile
from metarun.data.episodes import Episodes
from metarun.errors import MetarunError
from metarun.models.conv4 import Conv4


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
    names = {"maml", "metasgd", "mamlpp", "anil", "reptile", "pretrain", "joint", "protonet"}
    names |= {"protomaml"}
    assert set(confs) == set(registry()) == names
    assert all(c["name"] == stem for stem, c in confs.items())
    with pytest.raises(
        MetarunError,
        match="maml, metasgd, mamlpp, anil, reptile, pretrain, joint, protonet, protomaml",
    ):
        algorithm_class("nosuch")


@pytest.mark.parametrize(
    "experiment",
    sorted(
        str(p.relative_to(REPO / "conf" / "experiment").with_suffix(""))
        for p in (REPO / "conf" / "experiment").rglob("*.yaml")
        # the image presets (the sinusoid's build on their own task family: test_sinusoid.py)
        if not p.relative_to(REPO / "conf" / "experiment").as_posix().startswith("sinusoid")
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

    def labels(n):
        return torch.stack(
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
    """scripts/bench.py --compare times algorithms/reference.py against the engine: same
    objective."""
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
            strict=True,
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
            "anil": lambda kw: ANIL(learner, 0.4, 1, 1, **kw),
            "reptile": lambda kw: Reptile(learner, 0.4, 1, 1, **kw),
            "pretrain": lambda kw: Pretrain(learner, num_classes=4, **kw),
        }[name](kw)
        algo.init_meta_params(torch.Generator().manual_seed(0))
        assert torch.get_num_threads() == threads
    assert torch.equal(torch.get_rng_state(), rng) and torch.get_default_dtype() == torch.float32


@pytest.mark.parametrize("name", sorted(registry()))
def test_meta_grad_clip_reaches_every_algorithm(name):
    """meta_grad_clip is a top-level setting of every run: each algorithm built from a config
    carries it (joint, protonet and protomaml once dropped it silently)."""
    from helpers import compose_train

    from metarun.runner.setup import build_algorithm

    extra = {"pretrain": ["algorithm.num_classes=12"], "mamlpp": ["update_step_test=1"]}
    cfg = compose_train(
        f"algorithm={name}", "meta_grad_clip=2.5", "model.filters=4", *extra.get(name, [])
    )
    _, algo = build_algorithm(cfg, torch.device("cpu"))
    assert algo.meta_grad_clip == 2.5
