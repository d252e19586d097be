"""MAML++ (Antoniou, Edwards & Storkey 2019, "How to train your MAML", Sec. 4; their code
AntreasAntoniou/HowToTrainYourMAMLPytorch, few_shot_learning_system.py), every fix a switch:

- `msl` (multi-step loss): the outer objective is sum_s v_s * (query loss after inner step s) while
  epoch < msl_epochs, then the last step's loss only; v is annealed per epoch exactly as their
  get_per_step_loss_importance_vector (msl_weights below).
- `first_order_epochs` (derivative-order annealing): first order while epoch < first_order_epochs,
  second order after (their `first_order_to_second_order_epoch` E is first_order_epochs = E + 1;
  their Omniglot configs use E = -1, i.e. 0 here).
- `bnwb`: per-step batch-norm weights and biases: `step_bn.bn<i>.weight|bias` [update_step, filters]
  replace the learner's `bn<i>.*`; step s's forward passes (support, and query after it) use row s.
  As in their code (enable_inner_loop_optimizable_bn_params=false) they are meta-learned, not
  adapted.
- `bnrs` (per-step running statistics): their code keeps per-step running statistics but always
  calls F.batch_norm(training=True), so the statistics never reach an output (batch statistics are
  used in training and evaluation alike). metarun normalises with batch statistics as theirs and
  keeps no running statistics; `bnrs=true` is refused with that explanation.
- `lslr`: learned per-layer (per weight tensor, as their LSLRGradientDescentLearningRule) per-step
  inner learning rates `lslr.<weight name>` [update_step], initialised to update_lr.
- `cosine_annealing`: the meta learning rate follows cosine annealing over `cosine_epochs` (default:
  the run's epochs) to `min_meta_lr` (their CosineAnnealingLR(T_max=total_epochs) stepped with the
  epoch each iteration), and stays at min_meta_lr after it (torch's closed form would rise again).
- `inner_bn`: whether batch-norm weights adapt in the inner loop (MAML: yes; their code: no).
An epoch is `iterations_per_epoch` iterations (their total_iter_per_epoch, 500).
With every switch off (and inner_bn=true) this is MAML, bit for bit.

The run's length for the schedules is `iterations` here: the runner passes schedule_iterations,
which a resume that raises the run's iterations pins to the length the run started with, so an
extended run continues every schedule where it was and holds its end values (cosine at min_meta_lr,
MSL over, second order) instead of restarting it. `fit_schedule=True` fits a run too short for
msl_epochs / first_order_epochs by shortening the epoch (iterations_per_epoch) until the run holds
them, every epoch-based schedule keeping its epoch count; `fit_note` says what changed (logged once
by begin_iteration).
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch

from metarun.algorithms.base import GradientMetaLearner
from metarun.errors import MetarunError

log = logging.getLogger("metarun")


def msl_weights(steps: int, epoch: int, msl_epochs: int) -> list[float]:
    """The authors' per-step loss weights at `epoch` (get_per_step_loss_importance_vector): all 1/S
    at epoch 0; each non-final weight falls by epoch/(S*msl_epochs) to at least 0.03/S; the final
    one rises by epoch*(S-1)/(S*msl_epochs) to at most 1 - (S-1)*0.03/S. Float64, as their numpy
    code."""
    weights = np.ones(steps) * (1.0 / steps)
    decay = 1.0 / steps / msl_epochs
    floor = 0.03 / steps
    for i in range(steps - 1):
        weights[i] = np.maximum(weights[i] - epoch * decay, floor)
    weights[-1] = np.minimum(weights[-1] + epoch * (steps - 1) * decay, 1.0 - (steps - 1) * floor)
    return [float(w) for w in weights]


class MAMLPlusPlus(GradientMetaLearner):
    """MAML++ with switchable fixes (see the module docstring).

    Args (beyond GradientMetaLearner's): msl, msl_epochs, first_order_epochs, bnwb, bnrs, lslr,
    cosine_annealing, min_meta_lr, meta_lr (the optimizer's base rate, for CA), inner_bn,
    iterations_per_epoch, iterations (the schedules' length in iterations, to check epochs against
    and for CA's T_max), fit_schedule (shorten the epoch when the run is too short for them).
    Raises MetarunError for settings that cannot work (msl_epochs longer than an unfitted run, ...).
    """

    name = "mamlpp"
    family_refusal = (
        "its per-step batch-norm weights (bnwb) need a batch-norm learner such as conv4"
    )

    def __init__(
        self,
        model,
        update_lr,
        update_step,
        update_step_test,
        first_order=False,
        *,
        msl=True,
        msl_epochs=10,
        first_order_epochs=0,
        bnwb=True,
        bnrs=False,
        lslr=True,
        cosine_annealing=True,
        min_meta_lr=1e-5,
        meta_lr=1e-3,
        cosine_epochs=None,
        inner_bn=False,
        iterations_per_epoch=500,
        iterations=50000,
        fit_schedule=False,
        run_iterations=None,
        **kw,
    ):
        super().__init__(model, update_lr, update_step, update_step_test, first_order, **kw)
        self.msl, self.bnwb, self.lslr, self.cosine_annealing = (
            bool(msl),
            bool(bnwb),
            bool(lslr),
            bool(cosine_annealing),
        )
        self.inner_bn = bool(inner_bn)
        self.iterations_per_epoch, self.iterations = int(iterations_per_epoch), int(iterations)
        self.msl_epochs, self.first_order_epochs = int(msl_epochs), int(first_order_epochs)
        self.min_meta_lr, self.meta_lr = float(min_meta_lr), float(meta_lr)
        if self.iterations_per_epoch <= 0:
            raise MetarunError(
                f"algorithm.iterations_per_epoch={iterations_per_epoch} must be a positive integer "
                "(their code: 500)."
            )
        self.fit_note = self.fit_epoch() if fit_schedule else None
        self.past_note = self.past_schedule_note(run_iterations)
        self.total_epochs = math.ceil(self.iterations / self.iterations_per_epoch)
        self.cosine_epochs = self.total_epochs if cosine_epochs is None else int(cosine_epochs)
        if self.cosine_annealing and self.cosine_epochs <= 0:
            raise MetarunError(
                f"algorithm.cosine_epochs={cosine_epochs} must be a positive number of epochs "
                "(null: the run's)."
            )
        if bnrs:
            raise MetarunError(
                "algorithm.bnrs=true: the authors' code keeps per-step running statistics but "
                "always "
                "normalises with batch statistics, so they never change an output; metarun uses "
                "batch statistics and keeps none: set algorithm.bnrs=false."
            )
        # fitted already: even one iteration per epoch is too long for the epoch counts
        fix = (
            "raise iterations"
            if fit_schedule
            else "raise iterations, or algorithm.fit_schedule=true"
        )
        if self.msl and not 0 < self.msl_epochs <= self.total_epochs:
            raise MetarunError(
                f"algorithm.msl_epochs={msl_epochs} must be between 1 and the run's "
                f"{self.total_epochs} epochs (iterations={self.iterations} / "
                f"algorithm.iterations_per_epoch={self.iterations_per_epoch}): lower it, {fix}."
            )
        if not 0 <= self.first_order_epochs <= self.total_epochs:
            raise MetarunError(
                f"algorithm.first_order_epochs={first_order_epochs} must be between 0 and the "
                f"run's {self.total_epochs} epochs (iterations / algorithm.iterations_per_epoch): "
                f"lower it, {fix}."
            )
        if self.cosine_annealing and not 0 < self.min_meta_lr <= self.meta_lr:
            raise MetarunError(
                f"algorithm.min_meta_lr={min_meta_lr} must be positive and at most "
                f"meta_lr={meta_lr} "
                "(their code: 0.00001)."
            )
        if (self.bnwb or self.lslr) and self.update_step_test > self.update_step:
            raise MetarunError(
                f"update_step_test={update_step_test} > update_step={update_step}: per-step "
                "weights "
                "(algorithm.bnwb / lslr) exist for the training steps only; use "
                "update_step_test<=update_step."
            )
        if self.bnwb and self.inner_bn:
            raise MetarunError(
                "algorithm.bnwb=true with inner_bn=true: per-step batch-norm weights are "
                "meta-learned, not adapted (as the authors' code); set algorithm.inner_bn=false."
            )
        self.epoch = 0

    @classmethod
    def from_config(cls, cfg, model, engine):
        a = cfg.algorithm
        return super().from_config(
            cfg,
            model,
            engine,
            msl=a.msl,
            msl_epochs=a.msl_epochs,
            first_order_epochs=a.first_order_epochs,
            bnwb=a.bnwb,
            bnrs=a.bnrs,
            lslr=a.lslr,
            cosine_annealing=a.cosine_annealing,
            min_meta_lr=a.min_meta_lr,
            meta_lr=cfg.meta_lr,
            cosine_epochs=a.get("cosine_epochs"),
            inner_bn=a.inner_bn,
            iterations_per_epoch=a.iterations_per_epoch,
            iterations=cfg.get("schedule_iterations") or cfg.iterations,
            # absent from a config that predates it: such a run's schedule fitted unchanged
            fit_schedule=a.get("fit_schedule", False),
            run_iterations=cfg.iterations,
        )

    def describe(self) -> str:
        fixes = [
            n
            for n, on in (
                ("MSL", self.msl),
                ("DA", self.first_order_epochs > 0),
                ("BNWB", self.bnwb),
                ("LSLR", self.lslr),
                ("CA", self.cosine_annealing),
            )
            if on
        ]
        return f"{super().describe()}; {'+'.join(fixes) or 'no fixes'}"

    # -- meta-parameters ---------------------------------------------------------------------------
    def _bn_names(self) -> list:
        return [k for k in self.learner_names() if k.startswith("bn")]

    def replaced_names(self) -> set:
        return set(self._bn_names()) if self.bnwb else set()

    def extra_params(self, dtype, device) -> dict:
        extra = {}
        init = self.model.init_params(torch.Generator(), dtype=dtype, device=device)
        if self.bnwb:
            for k in self._bn_names():
                extra["step_bn." + k] = (
                    init[k].unsqueeze(0).repeat(self.update_step, *[1] * init[k].dim())
                )
        if self.lslr:
            for k in self._lslr_names():
                extra["lslr." + k] = torch.full(
                    (self.update_step,), self.update_lr, dtype=dtype, device=device
                )
        return extra

    def _lslr_names(self) -> list:
        bn, frozen = set(self._bn_names()), self.frozen_names()
        return [
            k for k in self.learner_names() if (self.inner_bn or k not in bn) and k not in frozen
        ]

    # -- hooks -------------------------------------------------------------------------------------
    def adapted_names(self, params: dict) -> list:
        names = set(self._lslr_names())
        return [k for k in params if k in names]

    def learner_weights(self, params: dict, fast: dict, step: int, tasks: int | None) -> dict:
        if len(fast) == len(self.learner_names()):
            return fast  # everything adapts: MAML's path
        weights = {}
        for k in self.learner_names():
            if k in fast:
                weights[k] = fast[k]
                continue
            w = params["step_bn." + k][step] if self.bnwb else params[k]
            weights[k] = w if tasks is None else w.unsqueeze(0).expand(tasks, *w.shape)
        return weights

    def inner_lrs(self, params: dict, step: int):
        if not self.lslr:
            return self.update_lr
        return {k: params["lslr." + k][step] for k in self._lslr_names()}

    def step_loss_weights(self, steps: int):
        if self.msl and self.epoch < self.msl_epochs:
            return msl_weights(steps, self.epoch, self.msl_epochs)
        return None

    def second_order(self) -> bool:
        return not self.first_order and self.epoch >= self.first_order_epochs

    def meta_lr_at(self, epoch: int) -> float:
        """Cosine annealing (torch's CosineAnnealingLR closed form with T_max = cosine_epochs, by
        default the run's epochs as their total_epochs), held at min_meta_lr from epoch T_max on."""
        epoch = min(int(epoch), self.cosine_epochs)
        return (
            self.min_meta_lr
            + (self.meta_lr - self.min_meta_lr)
            * (1 + math.cos(math.pi * epoch / self.cosine_epochs))
            / 2
        )

    def fit_epoch(self) -> str | None:
        """Shortens the epoch (iterations_per_epoch) so that the schedules' `iterations` hold the
        epochs msl_epochs and first_order_epochs need; returns the warning saying so, or None when
        they fit already (or cannot: one iteration per epoch is too long; the checks refuse it)."""
        need = max(self.msl_epochs if self.msl else 0, self.first_order_epochs)
        total = math.ceil(self.iterations / self.iterations_per_epoch)
        epoch = self.iterations // need if need > 0 else 0
        if need <= total or epoch < 1:
            return None
        old, self.iterations_per_epoch = self.iterations_per_epoch, epoch
        return (
            f"metarun: warning: {self.iterations} iterations hold {total} epoch(s) of "
            f"algorithm.iterations_per_epoch={old}, fewer than the {need} that "
            f"algorithm.msl_epochs={self.msl_epochs} / first_order_epochs="
            f"{self.first_order_epochs} need: the epoch is shortened to {epoch} iterations, so "
            "MSL, derivative-order annealing and the cosine meta learning rate keep their epoch "
            "counts over the run (algorithm.fit_schedule=false refuses instead)."
        )

    def past_schedule_note(self, run_iterations) -> str | None:
        """The warning for a run longer than its schedules (a resume that raised iterations keeps
        them on the length it started with), or None."""
        if run_iterations is None or int(run_iterations) <= self.iterations:
            return None
        held = [
            f"the meta learning rate stays at min_meta_lr={self.min_meta_lr}"
            if self.cosine_annealing
            else "",
            "MSL and derivative-order annealing stay finished" if self.msl else "",
        ]
        return (
            f"metarun: warning: iterations={run_iterations} runs past the {self.iterations} "
            "iterations its schedules were set for (schedule_iterations): after them "
            f"{' and '.join(h for h in held if h) or 'nothing changes'}."
        )

    def begin_iteration(self, iteration: int, optimizer) -> None:
        if optimizer is not None:  # once, when training starts
            for note in (self.fit_note, self.past_note):
                if note:
                    log.warning(note)
            self.fit_note = self.past_note = None
        self.epoch = int(iteration) // self.iterations_per_epoch
        if self.cosine_annealing and optimizer is not None:
            for group in optimizer.param_groups:
                group["lr"] = self.meta_lr_at(self.epoch)

    def scalars(self, params: dict) -> dict:
        out = {
            "lr/update_lr": self.update_lr,
            "mamlpp/epoch": float(self.epoch),
            "mamlpp/second_order": float(self.second_order()),
        }
        for s, w in enumerate(self.step_loss_weights(self.update_step) or []):
            out[f"msl/step{s}"] = w
        if self.lslr:
            for k in self._lslr_names():
                for s, v in enumerate(params["lslr." + k].detach().tolist()):
                    out[f"lslr/{k}/step{s}"] = v
        return out

    def histograms(self, params: dict) -> dict:
        return (
            {f"step_bn/{k}": params["step_bn." + k].detach() for k in self._bn_names()}
            if self.bnwb
            else {}
        )
