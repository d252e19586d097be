"""The MAML paper's regression learner: a fully connected ReLU network (1-40-40-1 for the
sinusoid, Finn et al. 2017 Sec. 5.1), as a pure function of a parameter dict, for a whole
meta-batch at once.

As cbfinn/maml maml.py construct_fc_weights / forward_fc (lines 168-183): weights drawn from a
normal truncated at two standard deviations with std `init_std` (0.01:
tf.truncated_normal(stddev=0.01)), zero biases, ReLU after every hidden layer, no normalisation
(their command's --norm=None), a linear output. Names: hidden0.weight [40, 1], hidden0.bias,
hidden1.*, fc.weight [1, 40], fc.bias: `fc` is the last linear layer (ANIL's head_layer).

`forward(params, x)` takes per-task parameters [T, ...] and inputs [T, N, in] and runs all T tasks
in one batched matrix product per layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from metarun.errors import MetarunError


class MLP:
    """in_features -> hidden... -> out_features, ReLU between. `way` is the number of outputs (one
    number per point: base.adapt counts a task's points as y.shape[1] // way)."""

    def __init__(self, hidden=(40, 40), in_features: int = 1, out_features: int = 1, init_std=0.01):
        hidden = [int(h) for h in hidden]
        if not hidden or min(hidden) <= 0:
            raise MetarunError(
                f"model.hidden={hidden} must be a list of positive layer widths, e.g. [40, 40]."
            )
        if isinstance(init_std, bool) or not float(init_std) > 0:
            raise MetarunError(f"model.init_std={init_std} must be positive (cbfinn/maml: 0.01).")
        self.hidden, self.init_std = hidden, float(init_std)
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.way = 1  # one target per point (not classes)

    def _layers(self) -> list[tuple[str, int, int]]:
        sizes = [self.in_features, *self.hidden]
        names = [f"hidden{i}" for i in range(len(self.hidden))]
        layers = [(n, a, b) for n, a, b in zip(names, sizes, sizes[1:], strict=False)]
        return layers + [("fc", sizes[-1], self.out_features)]

    def init_params(
        self, generator: torch.Generator | None = None, dtype=torch.float32, device="cpu"
    ) -> dict:
        """Truncated-normal weights (std init_std, cut at 2 std, redrawn outside), zero biases."""
        params = {}
        for name, fan_in, fan_out in self._layers():
            w = torch.empty(fan_out, fan_in)
            torch.nn.init.trunc_normal_(
                w, std=self.init_std, a=-2 * self.init_std, b=2 * self.init_std, generator=generator
            )
            params[f"{name}.weight"], params[f"{name}.bias"] = w, torch.zeros(fan_out)
        return {k: v.to(dtype=dtype, device=device) for k, v in params.items()}

    def forward(self, params: dict, x: torch.Tensor) -> torch.Tensor:
        """params: {name: [T, *shape]}; x: [T, N, in] -> [T, N, out]."""
        h = x
        layers = self._layers()
        for i, (name, _, _) in enumerate(layers):
            w, b = params[f"{name}.weight"], params[f"{name}.bias"]
            h = torch.baddbmm(b.unsqueeze(1), h, w.transpose(1, 2))
            if i < len(layers) - 1:
                h = F.relu(h)
        return h


def build_model(cfg) -> MLP:
    """The learner of cfg.model (model=mlp)."""
    m = cfg.model
    return MLP(hidden=list(m.hidden), init_std=m.init_std)
