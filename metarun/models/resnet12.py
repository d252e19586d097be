"""ResNet-12 as used by MetaOptNet (Lee et al. 2019) and Tian et al. 2020 (github.com/WangYueFt/rfs,
models/resnet.py, resnet12(avg_pool=True)), for larger images (84x84 MiniImagenet: 5x5 final maps).

Four residual blocks of [3x3 conv (no bias) -> BN -> LeakyReLU(0.1)] x 2, 3x3 conv -> BN, plus a
1x1 conv (no bias) -> BN shortcut, LeakyReLU(0.1), then 2x2 max-pooling; channels 64-160-320-640;
global average pooling; a linear head `fc` to `way` logits. Kaiming-normal (fan_out, leaky_relu)
convolutions, unit BN scales, zero BN offsets, torch's default nn.Linear head (rfs's
initialisation).

Differences from rfs (README): batch norm keeps no running statistics (track_running_stats=False),
so it always normalises with the statistics of the batch it sees (what metarun's inner loops need,
and what the MAML paper's conv4 does); no DropBlock / dropout (rfs: drop_rate=0.1 in pre-training, a
stochastic regulariser outside the inner loop's functional setting).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from metarun.errors import MetarunError

LEAK = 0.1


class Block(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out, track_running_stats=False)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out, track_running_stats=False)
        self.conv3 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out, track_running_stats=False)
        self.shortcut = nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out, track_running_stats=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.leaky_relu(self.bn1(self.conv1(x)), LEAK)
        out = F.leaky_relu(self.bn2(self.conv2(out)), LEAK)
        out = self.bn3(self.conv3(out))
        return F.max_pool2d(F.leaky_relu(out + self.shortcut(x), LEAK), 2)


class ResNet12(nn.Module):
    """x [N, in_channels, H, W] (H, W >= 16) -> logits [N, way].

    Args: way (logits), in_channels (1 or 3), channels (the four blocks' widths; rfs: 64, 160, 320,
    640). Raises MetarunError for a non-positive size."""

    def __init__(self, way: int, in_channels: int = 3, channels=(64, 160, 320, 640)):
        super().__init__()
        channels = [int(c) for c in channels]
        if len(channels) != 4 or min(channels) <= 0 or int(way) <= 0 or int(in_channels) <= 0:
            raise MetarunError(
                f"model.channels={channels} (way={way}, in_channels={in_channels}): ResNet-12 "
                "needs four positive block widths, e.g. [64, 160, 320, 640]."
            )
        widths = [int(in_channels)] + channels
        # consecutive pairs: widths[1:] is one shorter by design
        self.blocks = nn.Sequential(
            *[Block(a, b) for a, b in zip(widths, widths[1:], strict=False)]
        )
        self.fc = nn.Linear(channels[-1], int(way))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="leaky_relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.blocks(x).mean(dim=(2, 3)))
