"""Prototypical Networks and Proto-MAML (metarun/algorithms/protonet.py, protomaml.py): the
prototypes and the prototype head against hand computations, ProtoNet's logits against the distances
written out, both meta-gradients against per-task float64 references (Proto-MAML in both orders),
the learning-rate schedule, and one-line refusals."""

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    Flat,
    metarun_gradient,
    plain_forward,
    random_episodes,
    relative_error,
    synthetic_tasks,
)

from metarun.algorithms.base import meta_train_step
from metarun.algorithms.protomaml import ProtoMAML
from metarun.algorithms.protonet import ProtoNet, prototype_head, prototypes
from metarun.errors import MetarunError
from metarun.models.conv4 import Conv4
from metarun.models.learner import ModuleLearner

WAY = 3
F64 = torch.float64


def plain_embed(p, x, downsample):
    """One task's conv4 embedding written out: plain_forward (test_maml) with an identity head."""
    features = p["conv3.weight"].shape[0]
    if downsample == "maxpool":
        features *= (x.shape[-1] // 16) ** 2
    head = {
        "fc.weight": torch.eye(features, dtype=F64),
        "fc.bias": torch.zeros(features, dtype=F64),
    }
    return plain_forward({**p, **head}, x, downsample)


def class_means(features, y, way):
    """Prototypes one class at a time: the mean of the features of the class's support images."""
    return torch.stack([features[y == k].mean(0) for k in range(way)])


def conv4(downsample="stride", **kw):
    return Conv4(WAY, filters=6, image_size=16, downsample=downsample, **kw)


# -- the prototypes and the head they initialise ---------------------------------------------------
def test_prototype_head_equals_hand_computed():
    features = torch.tensor([[[1.0, 2.0], [3.0, -1.0], [5.0, 6.0], [0.0, 4.0]]], dtype=F64)
    y = torch.tensor([[0, 1, 0, 1]])
    c = prototypes(features, y, 2)
    assert torch.equal(c, torch.tensor([[[3.0, 4.0], [1.5, 1.5]]], dtype=F64))
    w, b = prototype_head(c)
    # W_k = 2 c_k, b_k = -||c_k||^2 (Triantafillou et al. 2020, Sec. 3.2)
    assert torch.equal(w, torch.tensor([[[6.0, 8.0], [3.0, 3.0]]], dtype=F64))
    assert torch.equal(b, torch.tensor([[-25.0, -4.5]], dtype=F64))


@pytest.mark.parametrize("downsample", ["stride", "maxpool"])
def test_protomaml_task_init_is_the_prototype_head_of_the_embedding(downsample):
    algo = ProtoMAML(conv4(downsample), 0.4, 1, 1, impl="batched")
    params = algo.init_meta_params(torch.Generator().manual_seed(1), dtype=F64)
    assert "fc.weight" not in params and "fc.bias" not in params  # set per task, not meta-learned
    ep = random_episodes(tasks=2, way=WAY, shot=3, query=1)
    head = algo.task_init(params, ep.x_support, ep.y_support)
    for t in range(2):
        c = class_means(plain_embed(params, ep.x_support[t], downsample), ep.y_support[t], WAY)
        assert torch.allclose(head["fc.weight"][t], 2 * c, rtol=0, atol=1e-12)
        assert torch.allclose(head["fc.bias"][t], -(c * c).sum(1), rtol=0, atol=1e-12)


# -- ProtoNet --------------------------------------------------------------------------------------
@pytest.mark.parametrize("downsample", ["stride", "maxpool"])
def test_protonet_logits_are_negative_squared_distances_to_the_class_means(downsample):
    algo = ProtoNet(conv4(downsample), shot=2, impl="batched", task_chunk=2)
    params = algo.init_meta_params(torch.Generator().manual_seed(2), dtype=F64)
    ep = random_episodes(tasks=3, way=WAY, shot=2, query=3)
    logits = algo.query_logits(params, ep)
    for t in range(3):
        c = class_means(plain_embed(params, ep.x_support[t], downsample), ep.y_support[t], WAY)
        q = plain_embed(params, ep.x_query[t], downsample)
        direct = -((q[:, None, :] - c[None, :, :]) ** 2).sum(-1)
        assert torch.allclose(logits[t], direct, rtol=1e-10, atol=1e-10)


def test_protonet_embeds_any_learner_without_its_head():
    """A torch.nn.Module learner (Flat: identity body, head fc): its features are the flattened
    inputs."""
    algo = ProtoNet(ModuleLearner(Flat, 4, 1, 2), shot=1, impl="batched")
    params = algo.init_meta_params(torch.Generator().manual_seed(0), dtype=F64)
    assert params == {}  # Flat's only weights are its head
    x = torch.rand(2, 5, 1, 2, 2, dtype=F64)
    assert torch.equal(algo.embed(params, x, algo.last_layer), x.flatten(2))


def protonet_reference_gradient(params, ep, way, downsample):
    """The mean over tasks of the query cross-entropy of -||f(x) - c_k||^2, one task at a time."""
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    losses = []
    for t in range(ep.x_support.shape[0]):
        c = class_means(plain_embed(leaves, ep.x_support[t], downsample), ep.y_support[t], way)
        q = plain_embed(leaves, ep.x_query[t], downsample)
        losses.append(F.cross_entropy(-((q[:, None] - c[None]) ** 2).sum(-1), ep.y_query[t]))
    loss = torch.stack(losses).mean()
    return dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values())), strict=True))


@pytest.mark.parametrize("impl,task_chunk", [("batched", 0), ("loop", 0), ("parallel", 1)])
def test_protonet_meta_gradient_equals_reference(impl, task_chunk):
    # training episodes of more classes than the test way (their higher-way training)
    algo = ProtoNet(
        conv4("maxpool"), shot=2, train_way=4, impl=impl, task_chunk=task_chunk, workers=2
    )
    params = algo.init_meta_params(torch.Generator().manual_seed(3), dtype=F64)
    ep = random_episodes(tasks=3, way=4, shot=2, query=2)
    expected = protonet_reference_gradient(params, ep, 4, "maxpool")
    assert relative_error(metarun_gradient(algo, params, ep), expected) < 1e-10


def test_protonet_learning_rate_is_halved_every_2000_iterations():
    algo = ProtoNet(conv4(), meta_lr=1e-3)
    params = list(algo.init_meta_params(torch.Generator()).values())
    optimizer = algo.make_optimizer(params, 1e-3)
    for iteration, lr in ((0, 1e-3), (1999, 1e-3), (2000, 5e-4), (4000, 2.5e-4), (6001, 1.25e-4)):
        algo.begin_iteration(iteration, optimizer)
        assert optimizer.param_groups[0]["lr"] == pytest.approx(lr, rel=1e-12)
    constant = ProtoNet(conv4(), meta_lr=1e-3, lr_decay_every=0)
    assert constant.lr_at(10**6) == 1e-3


# -- Proto-MAML ------------------------------------------------------------------------------------
def protomaml_reference_gradient(params, ep, way, lr, steps, first_order, downsample):
    """Per task: the head from the prototypes of the meta-learned embedding (in the graph), then
    `steps` SGD steps on every weight, head included, on the support loss (sum over the support set
    / shot), then the query loss; the meta-gradient of the mean over tasks, second order unless
    first_order."""
    names = list(params)
    leaves = [params[k].detach().clone().requires_grad_(True) for k in names]
    meta = dict(zip(names, leaves, strict=True))
    losses = []
    for t in range(ep.x_support.shape[0]):
        c = class_means(plain_embed(meta, ep.x_support[t], downsample), ep.y_support[t], way)
        # the inner loop's own copies: its gradient treats the head as a weight of its own
        fast = [w + 0 for w in leaves] + [2 * c, -(c * c).sum(1)]
        keys = names + ["fc.weight", "fc.bias"]
        for _ in range(steps):
            logits = plain_forward(dict(zip(keys, fast, strict=True)), ep.x_support[t], downsample)
            loss = F.cross_entropy(logits, ep.y_support[t], reduction="sum") / (
                len(ep.y_support[t]) // way
            )
            grads = torch.autograd.grad(loss, fast, create_graph=not first_order)
            fast = [w - lr * g for w, g in zip(fast, grads, strict=True)]
        query = plain_forward(dict(zip(keys, fast, strict=True)), ep.x_query[t], downsample)
        losses.append(F.cross_entropy(query, ep.y_query[t]))
    return dict(zip(names, torch.autograd.grad(torch.stack(losses).mean(), leaves), strict=True))


@pytest.mark.parametrize("first_order", [True, False])
@pytest.mark.parametrize("update_step", [1, 2])
@pytest.mark.parametrize(
    "impl,task_chunk,downsample",
    [("batched", 0, "maxpool"), ("loop", 0, "stride"), ("parallel", 1, "stride")],
)
def test_protomaml_meta_gradient_equals_reference(
    first_order, update_step, impl, task_chunk, downsample
):
    model = conv4(downsample)
    algo = ProtoMAML(
        model,
        0.4,
        update_step,
        update_step,
        first_order,
        impl=impl,
        task_chunk=task_chunk,
        workers=2,
    )
    params = algo.init_meta_params(torch.Generator().manual_seed(4), dtype=F64)
    ep = random_episodes(tasks=3, way=WAY, shot=2, query=2)
    expected = protomaml_reference_gradient(
        params, ep, WAY, 0.4, update_step, first_order, downsample
    )
    assert relative_error(metarun_gradient(algo, params, ep), expected) < 1e-10


@pytest.mark.parametrize("first_order", [True, False])
def test_benchmark_reference_loop_computes_protomamls_meta_gradient(first_order):
    """scripts/bench.py --compare times algorithms/reference.py; its head comes from task_init."""
    from metarun.algorithms.reference import reference_meta_loss

    algo = ProtoMAML(conv4(), 0.4, 2, 2, first_order, impl="batched")
    params = algo.init_meta_params(torch.Generator().manual_seed(7), dtype=F64)
    ep = random_episodes(tasks=2, way=WAY, shot=2, query=2)
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    loss = reference_meta_loss(algo, leaves, ep)
    expected = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values())), strict=True))
    assert relative_error(metarun_gradient(algo, params, ep), expected) < 1e-10


def test_protomaml_gradient_reaches_the_embedding_through_the_prototypes():
    """First order drops only the inner gradients' derivatives: with the head's initialisation cut
    out of the graph the meta-gradient changes, and the orders differ."""
    model = conv4()
    ep = random_episodes(tasks=2, way=WAY, shot=1, query=2)
    first = ProtoMAML(model, 0.4, 1, 1, True, impl="batched")
    params = first.init_meta_params(torch.Generator().manual_seed(5), dtype=F64)
    cut = ProtoMAML(model, 0.4, 1, 1, True, impl="batched")
    cut.task_init = lambda p, x, y: {
        k: v.detach().requires_grad_(True) for k, v in first.task_init(p, x, y).items()
    }
    second = ProtoMAML(model, 0.4, 1, 1, False, impl="batched")
    with_head = metarun_gradient(first, params, ep)
    assert relative_error(metarun_gradient(cut, params, ep), with_head) > 1e-3
    assert relative_error(metarun_gradient(second, params, ep), with_head) > 1e-3


def test_protomaml_before_adaptation_ranks_classes_as_protonet():
    """Step 0 of Proto-MAML's curve: ProtoNet's -||q - c_k||^2 plus ||q||^2, the same for every
    class."""
    model = conv4()
    pm = ProtoMAML(model, 0.4, 1, 1, impl="batched")
    pn = ProtoNet(model, shot=2, impl="batched")
    params = pm.init_meta_params(torch.Generator().manual_seed(6), dtype=F64)
    ep = random_episodes(tasks=2, way=WAY, shot=2, query=2)
    curve = pm.query_logits_curve(params, ep, [0, 1])
    q = pn.embed(params, ep.x_query, pn.last_layer)
    expected = pn.query_logits(params, ep) + (q * q).sum(-1, keepdim=True)
    assert torch.allclose(curve[0], expected, rtol=1e-10, atol=1e-9)
    assert not torch.allclose(curve[1], curve[0])  # the inner step changes them


@pytest.mark.parametrize("name", ["protonet", "protomaml"])
def test_training_lowers_the_query_loss(name):
    g = torch.Generator().manual_seed(0)
    pool = (torch.rand(40, 1, 14, 14, generator=g) > 0.6).float()
    model = Conv4(way=3, filters=16, image_size=14)
    if name == "protonet":
        algo = ProtoNet(model, shot=1, train_way=5, impl="batched", meta_lr=1e-2)
    else:
        algo = ProtoMAML(model, 0.1, 1, 1, True, impl="batched")
    params = {
        k: v.requires_grad_(True)
        for k, v in algo.init_meta_params(torch.Generator().manual_seed(0)).items()
    }

    def query_loss(ep):
        logits = algo.query_logits(params, ep)
        return F.cross_entropy(logits.flatten(0, 1), ep.y_query.flatten()).item()

    held_out = synthetic_tasks(pool, 32, 3, 1, 5, torch.Generator().manual_seed(99))
    before = query_loss(held_out)
    optimizer = algo.make_optimizer(list(params.values()), 1e-2)
    for it in range(20):
        algo.begin_iteration(it, optimizer)
        way = 5 if name == "protonet" else 3  # ProtoNet trains on more classes than it is tested on
        meta_train_step(algo, params, optimizer, synthetic_tasks(pool, 8, way, 1, 5, g))
    after = query_loss(held_out)
    assert after < 0.7 * before, (before, after)


# -- refusals --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kw,fragment",
    [
        (dict(train_way=0), "algorithm.train_way=0"),
        (dict(train_query=-1), "algorithm.train_query=-1"),
        (dict(lr_decay=0.0), "algorithm.lr_decay=0.0"),
        (dict(lr_decay_every=-5), "lr_decay_every=-5"),
        (dict(head_layer="conv0"), "algorithm.head_layer='conv0'"),
    ],
)
def test_impossible_protonet_settings_are_refused(kw, fragment):
    with pytest.raises(MetarunError, match=fragment.replace(".", r"\.")):
        ProtoNet(conv4(), **kw)


def test_protonet_refuses_a_curve_and_training_episodes_the_data_cannot_hold():
    from metarun.data.classes import ClassImages

    algo = ProtoNet(conv4(), shot=1, train_way=60, train_query=5)
    with pytest.raises(MetarunError, match="protonet has no inner loop.*drop steps="):
        algo.query_logits_curve({}, random_episodes(1, WAY, 1, 1), [0, 1])
    train = ClassImages(torch.zeros(40, 20, 16, 16, dtype=torch.uint8), [str(k) for k in range(40)])
    with pytest.raises(MetarunError, match=r"train_way=60 is larger than the 40 classes"):
        algo.bind_data({"train": train})
    deep = ProtoNet(conv4(), shot=5, train_way=5, train_query=16)
    with pytest.raises(MetarunError, match=r"train_query=5\+16.*use algorithm.train_query<=15"):
        deep.bind_data({"train": train})
