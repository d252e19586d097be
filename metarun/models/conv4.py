"""The MAML paper's conv4 learner, as a pure function of a parameter dict, for a whole meta-batch at
once.

Four blocks of [3x3 conv with `filters` channels, batch norm on the current batch's statistics,
ReLU] with downsampling, then a linear layer to `way` logits. As in cbfinn/maml: Omniglot
downsamples with stride-2 convolutions and averages the last feature map (`downsample=stride`, the
default); MiniImagenet uses 2x2 max-pooling after each block and flattens (`downsample=maxpool`).
Batch norm always uses the statistics of the batch it sees (the paper's code never uses running
averages), with epsilon 1e-3 as tf.contrib's.

`forward(params, x)` takes per-task parameters with a leading task dimension [T, ...] and inputs
[T, N, C, H, W] and runs all T tasks in one pass: tasks are folded into the channel dimension and
each convolution is a grouped convolution (groups=T), so batch norm's per-channel statistics are per
task and per channel. T=1 is an ordinary network.

Faithfulness switches (cbfinn/maml maml.py + utils.py; README "Faithfulness"): `bn_scale=False`
gives batch norm an offset only (tf.contrib's batch_norm default, scale=False: no `bn<i>.weight`);
`head_init=normal` draws the last layer from a standard normal (cbfinn's Omniglot `w5 =
tf.random_normal`, std 1) instead of Xavier-uniform; `activation=leaky_relu` (slope 0.01) and
`bn_eps=1e-5` are the MAML++ code's; `adapt_bn=False` marks the batch-norm weights as not adapted in
the inner loop (cbfinn: they are not in the `weights` dict the inner loop updates), which the
algorithms read through their `adapted_names` hook.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from metarun.errors import MetarunError

BN_EPS = 1e-3
DOWNSAMPLES = ("stride", "maxpool")
HEAD_INITS = ("xavier", "normal")
ACTIVATIONS = ("relu", "leaky_relu")


class Conv4:
    blocks = 4

    def __init__(
        self,
        way: int,
        in_channels: int = 1,
        filters: int = 64,
        image_size: int = 28,
        downsample: str = "stride",
        bn_scale: bool = True,
        adapt_bn: bool = True,
        head_init: str = "xavier",
        activation: str = "relu",
        bn_eps: float = BN_EPS,
    ):
        if head_init not in HEAD_INITS:
            raise MetarunError(
                f"unknown model.head_init={head_init!r}: use xavier (metarun's default) or normal "
                "(cbfinn/maml's Omniglot head, std 1)."
            )
        if activation not in ACTIVATIONS:
            raise MetarunError(
                f"unknown model.activation={activation!r}: use relu (MAML) or leaky_relu (MAML++)."
            )
        for name, value in (("model.bn_scale", bn_scale), ("model.adapt_bn", adapt_bn)):
            if not isinstance(value, bool):
                raise MetarunError(f"{name}={value} must be true or false.")
        if isinstance(bn_eps, bool) or not float(bn_eps) > 0:
            raise MetarunError(
                f"model.bn_eps={bn_eps} must be positive (1e-3 as tf.contrib, 1e-5 as the MAML++ "
                "code)."
            )
        self.bn_scale, self.adapt_bn, self.head_init, self.activation = (
            bn_scale,
            adapt_bn,
            head_init,
            activation,
        )
        self.bn_eps = float(bn_eps)
        if downsample not in DOWNSAMPLES:
            raise MetarunError(
                f"unknown model.downsample={downsample!r}: use stride (Omniglot, the paper's "
                "default) or maxpool (MiniImagenet)."
            )
        for name, value in (
            ("way", way),
            ("model.filters", filters),
            ("model.in_channels", in_channels),
            ("dataset.image_size", image_size),
        ):
            if int(value) <= 0:
                raise MetarunError(f"{name}={value} must be a positive integer.")
        self.way, self.in_channels, self.filters = way, in_channels, filters
        self.image_size, self.downsample = image_size, downsample
        side = image_size
        for _ in range(self.blocks):
            side = (side - 1) // 2 + 1 if downsample == "stride" else side // 2
        if side < 1:
            raise MetarunError(
                f"dataset.image_size={image_size} is too small for 4 max-pool blocks: use >= 16."
            )
        # stride: mean over the last map; maxpool: flatten it (cbfinn/maml's MiniImagenet head)
        self.features = filters if downsample == "stride" else filters * side * side

    def init_params(
        self, generator: torch.Generator | None = None, dtype=torch.float32, device="cpu"
    ) -> dict:
        """Xavier-uniform conv weights (cbfinn/maml's xavier_initializer_conv2d), zero biases, unit
        batch-norm scales (none with bn_scale=False), and a head drawn Xavier-uniform or,
        head_init=normal, from N(0, 1) as cbfinn/maml's Omniglot `w5`."""
        params = {}
        c_in = self.in_channels
        for i in range(self.blocks):
            fan_in, fan_out = c_in * 9, self.filters * 9
            bound = math.sqrt(6.0 / (fan_in + fan_out))
            params[f"conv{i}.weight"] = (
                torch.rand(self.filters, c_in, 3, 3, generator=generator) * 2 - 1
            ) * bound
            params[f"conv{i}.bias"] = torch.zeros(self.filters)
            if self.bn_scale:
                params[f"bn{i}.weight"] = torch.ones(self.filters)
            params[f"bn{i}.bias"] = torch.zeros(self.filters)
            c_in = self.filters
        bound = math.sqrt(6.0 / (self.features + self.way))
        if self.head_init == "normal":
            params["fc.weight"] = torch.randn(self.way, self.features, generator=generator)
        else:
            params["fc.weight"] = (
                torch.rand(self.way, self.features, generator=generator) * 2 - 1
            ) * bound
        params["fc.bias"] = torch.zeros(self.way)
        return {k: v.to(dtype=dtype, device=device) for k, v in params.items()}

    def bn_names(self) -> list:
        """Names of the batch-norm weights (scales if bn_scale, offsets)."""
        parts = ("weight", "bias") if self.bn_scale else ("bias",)
        return [f"bn{i}.{part}" for i in range(self.blocks) for part in parts]

    def frozen_names(self) -> set:
        """Learner weights the inner loop must not adapt (meta-learned only): the batch-norm ones if
        not adapt_bn."""
        return set() if self.adapt_bn else set(self.bn_names())

    def forward(self, params: dict, x: torch.Tensor) -> torch.Tensor:
        """params: {name: [T, *shape]}; x: [T, N, C, H, W] -> logits [T, N, way]."""
        # the embedding's [N, T, F] layout, as the head has always read it (the same bits)
        feats = self.embed(params, x).transpose(0, 1)
        logits = torch.einsum("ntf,twf->tnw", feats, params["fc.weight"])
        return logits + params["fc.bias"].unsqueeze(1)

    def embed(self, params: dict, x: torch.Tensor) -> torch.Tensor:
        """The embedding (the learner without its head `fc`): params {name: [T, *shape]} (fc.* not
        read); x [T, N, C, H, W] -> features [T, N, self.features] (stride: the mean of the last
        map; maxpool: the last map flattened)."""
        tasks, n = x.shape[0], x.shape[1]
        h = x.transpose(0, 1).reshape(n, tasks * x.shape[2], x.shape[3], x.shape[4])
        stride = 2 if self.downsample == "stride" else 1
        for i in range(self.blocks):
            w = params[f"conv{i}.weight"]
            h = F.conv2d(
                h,
                w.reshape(-1, *w.shape[2:]),
                params[f"conv{i}.bias"].reshape(-1),
                stride=stride,
                padding=1,
                groups=tasks,
            )
            # offset only: a constant unit scale (torch's batch-norm double backward fails with
            # weight=None)
            scale = params[f"bn{i}.weight"].reshape(-1) if self.bn_scale else h.new_ones(h.shape[1])
            h = F.batch_norm(
                h,
                None,
                None,
                scale,
                params[f"bn{i}.bias"].reshape(-1),
                training=True,
                eps=self.bn_eps,
            )
            h = F.relu(h) if self.activation == "relu" else F.leaky_relu(h)
            if self.downsample == "maxpool":
                h = F.max_pool2d(h, 2)
        if self.downsample == "stride":
            feats = h.mean(dim=(2, 3)).view(n, tasks, self.filters)
        else:
            feats = h.reshape(n, tasks, self.features)
        return feats.transpose(0, 1)


def build_model(cfg) -> Conv4:
    """The learner of cfg.model; settings newer than a checkpoint's config take their defaults (the
    behaviour before they existed)."""
    m = cfg.model
    return Conv4(
        way=int(cfg.way),
        in_channels=int(m.in_channels),
        filters=int(m.filters),
        image_size=int(cfg.dataset.image_size),
        downsample=str(m.downsample),
        bn_scale=m.get("bn_scale", True),
        adapt_bn=m.get("adapt_bn", True),
        head_init=str(m.get("head_init", "xavier")),
        activation=str(m.get("activation", "relu")),
        bn_eps=m.get("bn_eps", BN_EPS),
    )
