"""Any nn.Module as the learner (models/learner.py): the functional_call path equals conv4's grouped
path, ResNet-12 equals an independent functional write-up, and bad modules are refused with one
clear error."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import metarun_gradient, random_episodes, relative_error
from omegaconf import OmegaConf

from metarun.algorithms.anil import ANIL
from metarun.algorithms.maml import MAML
from metarun.errors import MetarunError
from metarun.models.conv4 import Conv4
from metarun.models.learner import ModuleLearner, build_learner
from metarun.models.resnet12 import ResNet12

WAY = 3


class Conv4Module(nn.Module):
    """The MAML paper's Omniglot conv4 as an ordinary module, with Conv4's weight names."""

    def __init__(self, way=WAY, filters=6):
        super().__init__()
        c = 1
        for i in range(4):
            setattr(self, f"conv{i}", nn.Conv2d(c, filters, 3, stride=2, padding=1))
            setattr(self, f"bn{i}", nn.BatchNorm2d(filters, eps=1e-3, track_running_stats=False))
            c = filters
        self.fc = nn.Linear(filters, way)

    def forward(self, x):
        for i in range(4):
            x = F.relu(getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(x)))
        return self.fc(x.mean(dim=(2, 3)))


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("cls", [MAML, ANIL])
def test_functional_call_path_equals_conv4_batched_path(first_order, cls):
    conv4 = Conv4(WAY, filters=6, image_size=16)
    generic = ModuleLearner(Conv4Module, WAY, 1, 16)
    assert set(generic.init_params()) == set(conv4.init_params())
    params = conv4.init_params(torch.Generator().manual_seed(1), dtype=torch.float64)
    ep = random_episodes(tasks=3, way=WAY, shot=2, query=2, seed=4)
    a = metarun_gradient(cls(conv4, 0.4, 2, 2, first_order, impl="batched"), params, ep)
    for impl in ("batched", "parallel"):
        b = metarun_gradient(cls(generic, 0.4, 2, 2, first_order, impl=impl, workers=2), params, ep)
        assert relative_error(b, a) < 1e-8, impl
    # evaluation too
    algo = cls(generic, 0.4, 2, 2, first_order, impl="parallel", workers=2)
    expected = cls(conv4, 0.4, 2, 2, first_order, impl="batched").query_logits(params, ep)
    assert torch.allclose(algo.query_logits(params, ep), expected, rtol=0, atol=1e-10)


def test_module_learner_init_is_seeded_and_changes_no_global_rng():
    rng = torch.get_rng_state()
    learner = ModuleLearner(Conv4Module, WAY, 1, 16)
    a = learner.init_params(torch.Generator().manual_seed(5))
    b = learner.init_params(torch.Generator().manual_seed(5))
    c = learner.init_params(torch.Generator().manual_seed(6))
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(a[k], b[k]) for k in a) and not torch.equal(
        a["conv0.weight"], c["conv0.weight"]
    )


def plain_resnet12(p, x, leak=0.1):
    """ResNet-12 written out with functional ops (rfs's BasicBlock, batch statistics)."""

    def bn(h, name):
        mean = h.mean(dim=(0, 2, 3), keepdim=True)
        var = h.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
        return (h - mean) / torch.sqrt(var + 1e-5) * p[name + ".weight"].view(1, -1, 1, 1) + p[
            name + ".bias"
        ].view(1, -1, 1, 1)

    for i in range(4):
        b = f"blocks.{i}."
        out = F.leaky_relu(bn(F.conv2d(x, p[b + "conv1.weight"], padding=1), b + "bn1"), leak)
        out = F.leaky_relu(bn(F.conv2d(out, p[b + "conv2.weight"], padding=1), b + "bn2"), leak)
        out = bn(F.conv2d(out, p[b + "conv3.weight"], padding=1), b + "bn3")
        short = bn(F.conv2d(x, p[b + "shortcut.0.weight"]), b + "shortcut.1")
        x = F.max_pool2d(F.leaky_relu(out + short, leak), 2)
    return x.mean(dim=(2, 3)) @ p["fc.weight"].T + p["fc.bias"]


def test_resnet12_equals_functional_reference_on_tiny_inputs():
    learner = ModuleLearner(lambda: ResNet12(WAY, 3, (4, 5, 6, 7)), WAY, 3, 16)
    params = learner.init_params(torch.Generator().manual_seed(0), dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    params = {
        k: v + 0.1 * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in params.items()
    }  # untie BN
    assert params["blocks.3.conv3.weight"].shape == (7, 7, 3, 3) and params["fc.weight"].shape == (
        WAY,
        7,
    )
    x = torch.rand(2, 6, 3, 16, 16, generator=g, dtype=torch.float64)
    got = learner.forward({k: v.unsqueeze(0).expand(2, *v.shape) for k, v in params.items()}, x)
    for t in range(2):
        assert torch.allclose(got[t], plain_resnet12(params, x[t]), rtol=0, atol=1e-12)
    # rfs's shapes: 84x84 -> 5x5 before pooling, 640 features, initialisation kaiming-normal fan_out
    net = ResNet12(5, 3)
    assert net.fc.in_features == 640 and [b.conv1.out_channels for b in net.blocks] == [
        64,
        160,
        320,
        640,
    ]
    assert ResNet12(5, 3, (2, 2, 2, 2)).blocks(torch.zeros(2, 3, 84, 84)).shape == (2, 2, 5, 5)
    std = net.blocks[0].conv1.weight.std().item()
    assert abs(std - (2 / 1.0001) ** 0.5 / (64 * 9) ** 0.5) < 0.01


class NotAModule:
    def __init__(self, way):
        pass


class RunningStats(nn.Module):
    def __init__(self, way):
        super().__init__()
        self.bn = nn.BatchNorm2d(1)
        self.fc = nn.Linear(4, way)

    def forward(self, x):
        return self.fc(self.bn(x).flatten(1))


class FrozenBN(RunningStats):
    def __init__(self, way):
        super().__init__(way)
        self.bn = nn.BatchNorm2d(1, track_running_stats=False)

    def train(self, mode=True):
        super().train(mode)
        self.bn.eval()
        return self


@pytest.mark.parametrize(
    "target,fragment",
    [
        ("nosuch.module.Net", "could not be built"),
        ("test_learners.NotAModule", "not a torch.nn.Module"),
        ("test_learners.RunningStats", "track_running_stats=False"),
        ("test_learners.FrozenBN", "eval mode"),
    ],
)
def test_bad_module_is_refused(target, fragment):
    cfg = OmegaConf.create(
        {
            "way": WAY,
            "dataset": {"channels": 1, "image_size": 2},
            "model": {"_target_": target, "way": "${way}"},
        }
    )
    with pytest.raises(MetarunError, match=fragment):
        build_learner(cfg)


def test_wrong_number_of_logits_is_refused():
    cfg = OmegaConf.create(
        {
            "way": 5,
            "dataset": {"channels": 3, "image_size": 16},
            "model": {
                "_target_": "metarun.models.resnet12.ResNet12",
                "way": 4,
                "in_channels": 3,
                "channels": [2, 2, 2, 2],
            },
        }
    )
    with pytest.raises(MetarunError, match=r"not \[10, way=5\] logits"):
        build_learner(cfg)
    cfg.model.way = 5
    assert build_learner(cfg).way == 5
