"""Meta-SGD (Li, Zhou, Chen & Li 2017, "Meta-SGD: Learning to Learn Quickly for Few-Shot Learning",
Sec. 3).

The inner update is theta' = theta - alpha * grad (elementwise): alpha has the shape of each weight
and is meta-learned together with the initialisation theta (the same meta-gradient, the same Adam).
The paper initialises alpha uniformly at random in [0.005, 0.1] (Sec. 4.1) and adapts in one step;
learn2learn's MetaSGD initialises it to a constant lr (set alpha_init_low = alpha_init_high for
that). The alphas are meta-parameters named `alpha.<weight name>`.

The paper's task loss is the average over the task's training examples (Sec. 3.1), which is
`inner_loss=mean` (conf/algorithm/metasgd.yaml and its presets). `inner_loss=sum_over_shot`
(cbfinn/maml's MAML loss) is way times that mean, so the same alpha takes way-times-larger steps:
its [0.005, 0.1] acts as [0.005 * way, 0.1 * way] on the paper's scale.
"""

from __future__ import annotations

import torch

from metarun.algorithms.base import GradientMetaLearner
from metarun.errors import MetarunError


class MetaSGD(GradientMetaLearner):
    """Meta-SGD: MAML plus a learned inner learning rate per weight element.

    Args (beyond GradientMetaLearner's): alpha_init_low, alpha_init_high: alpha ~ U[low, high]
    elementwise (positive, low <= high); alpha_seed: the seed of that draw (a local generator).
    Raises MetarunError for a non-positive or empty range.
    """

    name = "metasgd"
    families = ("classification", "regression")  # metarun/tasks.py
    PREFIX = "alpha."

    def __init__(
        self,
        model,
        update_lr,
        update_step,
        update_step_test,
        first_order=False,
        *,
        alpha_init_low: float = 0.005,
        alpha_init_high: float = 0.1,
        alpha_seed: int = 0,
        **kw,
    ):
        super().__init__(model, update_lr, update_step, update_step_test, first_order, **kw)
        low, high = float(alpha_init_low), float(alpha_init_high)
        if not (low > 0 and high > 0):
            raise MetarunError(
                f"algorithm.alpha_init_low={alpha_init_low}, alpha_init_high={alpha_init_high}: "
                "Meta-SGD's initial learning rates must be positive (the paper: 0.005 and 0.1)."
            )
        if low > high:
            raise MetarunError(
                f"algorithm.alpha_init_low={low} is above alpha_init_high={high}: swap them."
            )
        self.alpha_low, self.alpha_high, self.alpha_seed = low, high, int(alpha_seed)

    @classmethod
    def from_config(cls, cfg, model, engine):
        a = cfg.algorithm
        return super().from_config(
            cfg,
            model,
            engine,
            alpha_init_low=a.alpha_init_low,
            alpha_init_high=a.alpha_init_high,
            alpha_seed=int(cfg.seed),
        )

    def extra_params(self, dtype, device) -> dict:
        g = torch.Generator().manual_seed(self.alpha_seed + 1)
        shapes = self.model.init_params(torch.Generator())
        return {
            self.PREFIX + k: (
                self.alpha_low
                + (self.alpha_high - self.alpha_low)
                * torch.rand(v.shape, generator=g, dtype=torch.float64)
            ).to(dtype=dtype, device=device)
            for k, v in shapes.items()
        }

    def inner_lrs(self, params: dict, step: int) -> dict:
        return {k: params[self.PREFIX + k] for k in self.learner_names()}

    def scalars(self, params: dict) -> dict:
        return {
            f"alpha_mean/{k}": params[self.PREFIX + k].detach().mean().item()
            for k in self.learner_names()
        }

    def histograms(self, params: dict) -> dict:
        return {f"alpha/{k}": params[self.PREFIX + k].detach() for k in self.learner_names()}
