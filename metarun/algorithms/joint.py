"""The MAML paper's "pretrained" baseline (Finn et al. 2017, Sec. 5.1 and Figure 2): one network
trained to regress on all tasks at once, fine-tuned on each test task's K points by the same inner
loop as MAML (update_lr, update_step_test steps).

Training, as cbfinn/maml's `--pretrain_iterations` (maml.py line 142: pretrain_op minimises
total_loss1, the support loss of the unadapted weights, averaged over the meta-batch; main.py lines
6-8 for the commands): each iteration is one Adam step at meta_lr on the mean over the meta-batch's
tasks of the support-set loss of the shared weights. No inner loop runs in training (update_step
is not used); evaluation is the shared fine-tuning of algorithms/base.py, so `metarun eval
steps=0,...,10` gives the baseline's curve of Figure 3. The paper tunes the fine-tuning step size
automatically; here it is update_lr (change it in a copy of the preset and train again; eval
takes the checkpoint's).
"""

from __future__ import annotations

from metarun.algorithms.base import GradientMetaLearner, StepResult
from metarun.data.episodes import Episodes


class Joint(GradientMetaLearner):
    """Joint training on every task (the "pretrained" baseline); classification or regression."""

    name = "joint"
    families = ("classification", "regression")

    def describe(self) -> str:
        return f"{self.impl} {self.name} (one network on all tasks, fine-tuned at test)"

    def accumulate_meta_gradient(self, params: dict, ep: Episodes) -> StepResult:
        """Adds d(mean support loss of the shared weights)/d(params) to each .grad; returns that
        loss and the per-task metric on the support points (no adaptation happens in training)."""

        def chunk_objective(part):
            tasks = ep.x_support[part].shape[0]
            weights = {k: v.unsqueeze(0).expand(tasks, *v.shape) for k, v in params.items()}
            out = self.model.forward(weights, ep.x_support[part])
            loss, metric = self.query_loss(out, ep.y_support[part])
            return loss, loss, metric

        return self.accumulate_objective(params, ep, chunk_objective)
