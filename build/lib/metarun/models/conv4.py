"""The MAML paper's conv4 learner, as a pure function of a parameter dict, for a whole meta-batch at once.

Four blocks of [3x3 conv with `filters` channels, batch norm on the current batch's statistics, ReLU] with
downsampling, then a linear layer to `way` logits. As in cbfinn/maml: Omniglot downsamples with stride-2
convolutions and averages the last feature map (`downsample=stride`, the default); MiniImagenet uses 2x2
max-pooling after each block and flattens (`downsample=maxpool`). Batch norm always uses the statistics of
the batch it sees (the paper's code never uses running averages), with epsilon 1e-3 as tf.contrib's.

`forward(params, x)` takes per-task parameters with a leading task dimension [T, ...] and inputs
[T, N, C, H, W] and runs all T tasks in one pass: tasks are folded into the channel dimension and each
convolution is a grouped convolution (groups=T), so batch norm's per-channel statistics are per task and
per channel. T=1 is an ordinary network.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from metarun.errors import MetarunError

BN_EPS = 1e-3
DOWNSAMPLES = ("stride", "maxpool")


class Conv4:
    blocks = 4

    def __init__(self, way: int, in_channels: int = 1, filters: int = 64, image_size: int = 28,
                 downsample: str = "stride"):
        if downsample not in DOWNSAMPLES:
            raise MetarunError(f"unknown model.downsample={downsample!r}: use stride (Omniglot, the paper's "
                               "default) or maxpool (MiniImagenet).")
        for name, value in (("way", way), ("model.filters", filters), ("model.in_channels", in_channels),
                            ("dataset.image_size", image_size)):
            if int(value) <= 0:
                raise MetarunError(f"{name}={value} must be a positive integer.")
        self.way, self.in_channels, self.filters = way, in_channels, filters
        self.image_size, self.downsample = image_size, downsample
        side = image_size
        for _ in range(self.blocks):
            side = (side - 1) // 2 + 1 if downsample == "stride" else side // 2
        if side < 1:
            raise MetarunError(f"dataset.image_size={image_size} is too small for 4 max-pool blocks: use >= 16.")
        # stride: mean over the last map; maxpool: flatten it (cbfinn/maml's MiniImagenet head)
        self.features = filters if downsample == "stride" else filters * side * side

    def init_params(self, generator: torch.Generator | None = None, dtype=torch.float32, device="cpu") -> dict:
        """Xavier-uniform weights, zero biases, unit batch-norm scales (cbfinn/maml's initialisation)."""
        params = {}
        c_in = self.in_channels
        for i in range(self.blocks):
            fan_in, fan_out = c_in * 9, self.filters * 9
            bound = math.sqrt(6.0 / (fan_in + fan_out))
            params[f"conv{i}.weight"] = (torch.rand(self.filters, c_in, 3, 3, generator=generator) * 2 - 1) * bound
            params[f"conv{i}.bias"] = torch.zeros(self.filters)
            params[f"bn{i}.weight"] = torch.ones(self.filters)
            params[f"bn{i}.bias"] = torch.zeros(self.filters)
            c_in = self.filters
        bound = math.sqrt(6.0 / (self.features + self.way))
        params["fc.weight"] = (torch.rand(self.way, self.features, generator=generator) * 2 - 1) * bound
        params["fc.bias"] = torch.zeros(self.way)
        return {k: v.to(dtype=dtype, device=device) for k, v in params.items()}

    def forward(self, params: dict, x: torch.Tensor) -> torch.Tensor:
        """params: {name: [T, *shape]}; x: [T, N, C, H, W] -> logits [T, N, way]."""
        tasks, n = x.shape[0], x.shape[1]
        h = x.transpose(0, 1).reshape(n, tasks * x.shape[2], x.shape[3], x.shape[4])
        stride = 2 if self.downsample == "stride" else 1
        for i in range(self.blocks):
            w = params[f"conv{i}.weight"]
            h = F.conv2d(h, w.reshape(-1, *w.shape[2:]), params[f"conv{i}.bias"].reshape(-1),
                         stride=stride, padding=1, groups=tasks)
            h = F.batch_norm(h, None, None, params[f"bn{i}.weight"].reshape(-1), params[f"bn{i}.bias"].reshape(-1),
                             training=True, eps=BN_EPS)
            h = F.relu(h)
            if self.downsample == "maxpool":
                h = F.max_pool2d(h, 2)
        if self.downsample == "stride":
            feats = h.mean(dim=(2, 3)).view(n, tasks, self.filters)
        else:
            feats = h.reshape(n, tasks, self.features)
        logits = torch.einsum("ntf,twf->tnw", feats, params["fc.weight"])
        return logits + params["fc.bias"].unsqueeze(1)


def build_model(cfg) -> Conv4:
    return Conv4(way=int(cfg.way), in_channels=int(cfg.model.in_channels), filters=int(cfg.model.filters),
                 image_size=int(cfg.dataset.image_size), downsample=str(cfg.model.downsample))
