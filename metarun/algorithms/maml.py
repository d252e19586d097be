"""MAML (Finn et al., 2017, Algorithm 2; cbfinn/maml) over a whole meta-batch.

Meta-gradient = d/d(phi) of the mean over tasks of the query loss after `update_step` SGD steps of
size `update_lr` on each task's support set; second order by default, `first_order` drops the
second-order terms (the inner gradients are not differentiated, so no second-order graph is kept).
Every learner weight adapts. The execution (batched / loop / parallel, chunks, threads) is the
engine's (algorithms/engine.py); the inner loop and the outer objective are the shared ones of
algorithms/base.py, whose defaults are MAML.
"""

from __future__ import annotations

from metarun.algorithms.base import (
    INNER_LOSSES,
    GradientMetaLearner,
    StepResult,
    inner_update,
    meta_train_step,
)
from metarun.algorithms.engine import IMPLS, PARALLEL_IMAGES_PER_PASS, resolve_impl

# Re-exported: maml is where users (and the tests) look for MAML's pieces.
__all__ = [
    "INNER_LOSSES",
    "IMPLS",
    "PARALLEL_IMAGES_PER_PASS",
    "GradientMetaLearner",
    "MAML",
    "StepResult",
    "inner_update",
    "meta_train_step",
    "resolve_impl",
]


class MAML(GradientMetaLearner):
    """MAML: learns the learner's initialisation; a fixed inner learning rate `update_lr` for every
    weight.

    Example: MAML(Conv4(way=5), update_lr=0.4, update_step=1,
    update_step_test=3).accumulate_meta_gradient(params, ep)
    """

    name = "maml"
    families = ("classification", "regression")  # metarun/tasks.py
