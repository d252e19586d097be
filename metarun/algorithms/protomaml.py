"""Proto-MAML (Triantafillou et al. 2020, ICLR, "Meta-Dataset: A Dataset of Datasets for Learning to
Learn from Few Examples", Sec. 3.2; their code github.com/google-research/meta-dataset, MAMLLearner
with proto_maml_fc_layer_init).

MAML whose output layer is not meta-learned but set, per task, from the class prototypes c_k of the
support set (Prototypical Networks, algorithms/protonet.py): W_k = 2 c_k, b_k = -||c_k||^2, the
linear layer whose logits are ProtoNet's negative squared distances up to a per-image constant. The
inner loop then adapts the whole learner, head included, on the support set (MAML's,
algorithms/base.py; batch norm too unless model.adapt_bn=false). The head's initialisation is
computed inside the autodiff graph, so the meta-gradient reaches the embedding through the
prototypes as well as through the inner loop, in both orders: first order (Meta-Dataset's,
`first_order=true` in the presets) drops only the inner gradients' own derivatives.

Differences from their code: the query pass normalises with its own batch statistics, as every
metarun algorithm (theirs: the support set's); episodes have a fixed way (theirs: variable way and
shot).
"""

from __future__ import annotations

from metarun.algorithms.base import GradientMetaLearner, head_of
from metarun.algorithms.protonet import prototype_head, prototypes


class ProtoMAML(GradientMetaLearner):
    """Proto-MAML (see the module docstring).

    Args (beyond GradientMetaLearner's): head_layer: the learner's last linear layer (conv4,
    resnet12: fc), initialised from the prototypes of each task instead of being meta-learned.
    Raises MetarunError if it is not the learner's last linear layer.

    Example: ProtoMAML(Conv4(way=5), 0.4, update_step=1, update_step_test=3, first_order=True)
    """

    name = "protomaml"

    def __init__(
        self,
        model,
        update_lr,
        update_step,
        update_step_test,
        first_order=True,
        *,
        head_layer="fc",
        **kw,
    ):
        super().__init__(model, update_lr, update_step, update_step_test, first_order, **kw)
        self.head_layer = str(head_layer)
        self.last_layer = head_of(model, self.head_layer)

    @classmethod
    def from_config(cls, cfg, model, engine):
        return super().from_config(cfg, model, engine, head_layer=cfg.algorithm.head_layer)

    def describe(self) -> str:
        return f"{super().describe()}, {self.head_layer} initialised from the prototypes"

    def replaced_names(self) -> set:
        return set(self.last_layer[0])  # set per task by task_init, not meta-learned

    def task_init(self, params: dict, x, y) -> dict:
        """The head of each of the T tasks of x [T, N, C, H, W], y [T, N] from its prototypes under
        the meta-learned embedding: {weight name: 2 c [T, way, F], bias name: -||c||^2 [T, way]}."""
        c = prototypes(self.embed(params, x, self.last_layer), y, self.model.way)
        weight, bias = prototype_head(c)
        names = self.last_layer[0]
        return {names[0]: weight, names[1]: bias}
