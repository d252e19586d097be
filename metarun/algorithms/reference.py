"""A plain per-task loop, written independently of metarun's fast paths, to time them against.

Each task runs an ordinary (ungrouped) conv4 forward on its own weights; the inner loop uses
`torch.autograd.grad(create_graph=True)`; the meta-loss is the mean of the tasks' objectives and its
gradient is taken once. For MAML this is the textbook loop of the common PyTorch ports; other
algorithms plug in their rules through the hooks of algorithms/base.py. `scripts/bench.py --compare`
times it (the tests keep their own independent references).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from metarun.models.conv4 import BN_EPS


def conv4_forward(
    params: dict,
    x: torch.Tensor,
    downsample: str,
    blocks: int = 4,
    activation: str = "relu",
    eps: float = BN_EPS,
) -> torch.Tensor:
    """One task: x [N, C, H, W] -> logits [N, way]."""
    h = x
    for i in range(blocks):
        h = F.conv2d(
            h,
            params[f"conv{i}.weight"],
            params[f"conv{i}.bias"],
            stride=2 if downsample == "stride" else 1,
            padding=1,
        )
        scale = params.get(
            f"bn{i}.weight"
        )  # absent with model.bn_scale=false: a constant unit scale
        scale = h.new_ones(h.shape[1]) if scale is None else scale
        h = F.batch_norm(h, None, None, scale, params[f"bn{i}.bias"], training=True, eps=eps)
        h = F.relu(h) if activation == "relu" else F.leaky_relu(h)
        if downsample == "maxpool":
            h = F.max_pool2d(h, 2)
    h = h.mean(dim=(2, 3)) if downsample == "stride" else h.flatten(1)
    return F.linear(h, params["fc.weight"], params["fc.bias"])


def task_support_loss(logits, y, way: int, inner_loss: str) -> torch.Tensor:
    ce = F.cross_entropy(logits, y, reduction="sum" if inner_loss == "sum_over_shot" else "mean")
    return ce / (len(y) // way) if inner_loss == "sum_over_shot" else ce


def reference_meta_loss(algorithm, params: dict, ep) -> torch.Tensor:
    """Mean over tasks of the algorithm's outer objective, one task at a time with the plain conv4
    above, differentiable w.r.t. params. The algorithm supplies only its rules (which weights adapt,
    the learning rates and per-step weights of a step, the per-step loss weights, the derivative
    order) through its hooks; the execution (grouped passes, chunks, threads) of metarun's engine is
    not used."""
    way, downsample = algorithm.model.way, algorithm.model.downsample
    act, eps = (
        getattr(algorithm.model, "activation", "relu"),
        getattr(algorithm.model, "bn_eps", BN_EPS),
    )
    steps, create_graph = algorithm.update_step, algorithm.second_order()
    loss_weights = algorithm.step_loss_weights(steps)
    losses = []
    for t in range(ep.x_support.shape[0]):
        # views, as the engine's: the inner gradient w.r.t. them leaves out the path through
        # task_init's weights (Proto-MAML's head), computed from params and adapted on their own
        fast = {k: params[k].view_as(params[k]) for k in algorithm.adapted_names(params)}
        start = algorithm.task_init(params, ep.x_support[t : t + 1], ep.y_support[t : t + 1])
        fast.update({k: v[0] for k, v in start.items()})
        query_losses = []
        for step in range(steps):
            logits = conv4_forward(
                algorithm.learner_weights(params, fast, step, None),
                ep.x_support[t],
                downsample,
                activation=act,
                eps=eps,
            )
            loss = task_support_loss(logits, ep.y_support[t], way, algorithm.inner_loss)
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=create_graph)
            lrs = algorithm.inner_lrs(params, step)
            fast = {
                k: w - (lrs[k] if isinstance(lrs, dict) else lrs) * g
                for (k, w), g in zip(fast.items(), grads, strict=True)
            }
            if loss_weights is not None or step == steps - 1:
                query = conv4_forward(
                    algorithm.learner_weights(params, fast, step, None),
                    ep.x_query[t],
                    downsample,
                    activation=act,
                    eps=eps,
                )
                query_losses.append(F.cross_entropy(query, ep.y_query[t]))
        if loss_weights is None:
            losses.append(query_losses[-1])
        else:
            losses.append(sum(w * q for w, q in zip(loss_weights, query_losses, strict=True)))
    return torch.stack(losses).mean()


def reference_train_step(algorithm, params: dict, optimizer, ep) -> torch.Tensor:
    """The per-task loop's meta-iteration (for timing): meta-loss,
    one backward, one optimizer step."""
    optimizer.zero_grad(set_to_none=True)
    loss = reference_meta_loss(algorithm, params, ep)
    loss.backward()
    optimizer.step()
    return loss.detach()
