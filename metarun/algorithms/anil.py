"""ANIL, "Almost No Inner Loop" (Raghu, Raghu, Bengio & Vinyals 2020, "Rapid Learning or Feature
Reuse?", Sec. 4): MAML whose inner loop adapts only the head (the learner's last linear layer), at
training and at test; the outer loop meta-learns every weight (the body through the head's
adaptation, second order by default, as their MAML-based code; `first_order` drops those terms as in
MAML).

The head is the learner's weights under `head_layer` (conv4 and resnet12: `fc`). The body's forward
pass is repeated at every inner step (the generic inner loop of algorithms/base.py); the features
could be computed once, which is a speed-up, not a different result.
"""

from __future__ import annotations

from metarun.algorithms.base import GradientMetaLearner
from metarun.errors import MetarunError


class ANIL(GradientMetaLearner):
    """ANIL: only the head adapts in the inner loop.

    Args (beyond GradientMetaLearner's): head_layer: the name prefix of the head's weights (`fc`:
    fc.weight, fc.bias). Raises MetarunError if it names no weight of the learner, or all of them.
    """

    name = "anil"
    families = ("classification", "regression")  # metarun/tasks.py

    def __init__(
        self,
        model,
        update_lr,
        update_step,
        update_step_test,
        first_order=False,
        *,
        head_layer="fc",
        **kw,
    ):
        super().__init__(model, update_lr, update_step, update_step_test, first_order, **kw)
        self.head_layer = str(head_layer)
        names = self.learner_names()
        self.head = [k for k in names if k.startswith(self.head_layer + ".")]
        if not self.head or len(self.head) == len(names):
            raise MetarunError(
                f"algorithm.head_layer={self.head_layer!r} must name the learner's last layer, not "
                f"{'nothing' if not self.head else 'every weight'} (its weights: "
                f"{', '.join(names[:3])}, ..., {names[-1]}): use e.g. fc."
            )

    @classmethod
    def from_config(cls, cfg, model, engine):
        return super().from_config(cfg, model, engine, head_layer=cfg.algorithm.head_layer)

    def describe(self) -> str:
        return f"{super().describe()}, inner loop on {self.head_layer} only"

    def adapted_names(self, params: dict) -> list:
        head = set(self.head)
        return [k for k in params if k in head]
