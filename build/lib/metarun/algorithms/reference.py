"""A plain per-task MAML, written independently of metarun's fast paths, to check and time them against.

Each task runs an ordinary (ungrouped) conv4 forward on its own weights; the inner loop uses
`torch.autograd.grad(create_graph=True)`; the meta-loss is the mean of the tasks' query losses and its
gradient is taken once. This is the textbook loop of the common PyTorch ports. The gradient tests compare
every implementation to it, and `scripts/bench.py --compare` times it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from metarun.models.conv4 import BN_EPS


def conv4_forward(params: dict, x: torch.Tensor, downsample: str, blocks: int = 4) -> torch.Tensor:
    """One task: x [N, C, H, W] -> logits [N, way]."""
    h = x
    for i in range(blocks):
        h = F.conv2d(h, params[f"conv{i}.weight"], params[f"conv{i}.bias"],
                     stride=2 if downsample == "stride" else 1, padding=1)
        h = F.batch_norm(h, None, None, params[f"bn{i}.weight"], params[f"bn{i}.bias"], training=True, eps=BN_EPS)
        h = F.relu(h)
        if downsample == "maxpool":
            h = F.max_pool2d(h, 2)
    h = h.mean(dim=(2, 3)) if downsample == "stride" else h.flatten(1)
    return F.linear(h, params["fc.weight"], params["fc.bias"])


def task_support_loss(logits, y, way: int, inner_loss: str) -> torch.Tensor:
    ce = F.cross_entropy(logits, y, reduction="sum" if inner_loss == "sum_over_shot" else "mean")
    return ce / (len(y) // way) if inner_loss == "sum_over_shot" else ce


def reference_meta_loss(params: dict, x_support, y_support, x_query, y_query, *, way: int, update_lr: float,
                        update_step: int, first_order: bool, downsample: str,
                        inner_loss: str = "sum_over_shot") -> torch.Tensor:
    """Mean over tasks of the post-adaptation query loss, differentiable w.r.t. params."""
    names = list(params)
    losses = []
    for t in range(x_support.shape[0]):
        fast = [params[k] for k in names]
        for _ in range(update_step):
            logits = conv4_forward(dict(zip(names, fast)), x_support[t], downsample)
            loss = task_support_loss(logits, y_support[t], way, inner_loss)
            grads = torch.autograd.grad(loss, fast, create_graph=not first_order)
            fast = [w - update_lr * g for w, g in zip(fast, grads)]
        losses.append(F.cross_entropy(conv4_forward(dict(zip(names, fast)), x_query[t], downsample), y_query[t]))
    return torch.stack(losses).mean()


def reference_train_step(params: dict, optimizer, ep, **kw) -> torch.Tensor:
    """The per-task loop's meta-iteration (for timing): meta-loss, one backward, one optimizer step."""
    optimizer.zero_grad(set_to_none=True)
    loss = reference_meta_loss(params, ep.x_support, ep.y_support, ep.x_query, ep.y_query, **kw)
    loss.backward()
    optimizer.step()
    return loss.detach()
