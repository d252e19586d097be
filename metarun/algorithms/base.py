"""What every gradient-based meta-learner of the MAML family shares: the inner loop, the losses, the
outer objective over a meta-batch (run by the engine), evaluation, and the hooks an algorithm
overrides.

An algorithm's meta-parameters are ONE flat dict {name: tensor}: the learner's weights under the
model's names, plus the algorithm's own (learned learning rates, per-step batch-norm weights, ...)
under prefixed names. The optimizer updates that dict and checkpoints store it as `params`.

Hooks (defaults = MAML, Finn et al. 2017):
- `extra_params`: the algorithm's own meta-parameters (default none);
- `adapted_names`: which learner weights the inner loop adapts (default all but the model's
  frozen_names, e.g. batch norm with model.adapt_bn=false as cbfinn/maml);
- `learner_weights`: the learner's weights at an inner step (adapted ones + the others, e.g.
  per-step BN);
- `inner_lrs`: the inner learning rates of a step: one float, or {name: tensor broadcastable to the
  weight};
- `step_loss_weights`: weights of the query loss after each inner step in the outer objective (None:
  the last step only);
- `second_order`: whether the inner gradients are differentiated (False = first order);
- `task_init`: per-task starting values of weights that are not meta-parameters, computed from
  the support set inside the autodiff graph, which the inner loop adapts too (default none;
  Proto-MAML: the head from the class prototypes);
- `check_curve`: refuses `metarun eval steps=` where accuracy after each inner step means nothing
  (default: accepted; ProtoNet has no inner loop);
- `begin_iteration`: a per-iteration hook for schedules (epochs, meta learning rate);
- `scalars` / `histograms`: what the runner logs to TensorBoard.

Hooks of the runner's generic capabilities (defaults = episodes and Adam, as MAML):
- `bind_data`: sees the loaded splits before the meta-parameters are made (the pre-training baseline
  sizes its classifier by the training classes; Reptile checks train_shots);
- `train_sampler`: what training draws each iteration (default: N-way K-shot episodes of the train
  split; the baseline: mini-batches of labelled images), a TrainingBatch; its state() is
  checkpointed;
- `data_parallel`: None when a batch's shares can be computed apart (torchrun), else why not;
- `train_unit`: what one training iteration processes, for the logged speed (default meta_batch
  tasks);
- `make_optimizer`: the outer update (default Adam at meta_lr; Reptile: SGD on phi - mean adapted
  weights), whose every step first clips the gradient elementwise with `meta_grad_clip` (`clipped`);
- `bench_batch`: a training batch of the algorithm's kind made from random episodes
  (scripts/bench.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch

from metarun.algorithms.engine import Engine
from metarun.data.episodes import Episodes, EpisodeSampler
from metarun.errors import MetarunError
from metarun.tasks import CLASSIFICATION, TaskFamily

INNER_LOSSES = ("sum_over_shot", "mean")


class TrainingBatch(Protocol):
    """What a training sampler's `sample()` returns and `accumulate_meta_gradient` takes: Episodes
    (data/episodes.py), Reptile's ReptileBatch, the baseline's ImageBatch, and any future one.

    A batch is a sequence of items (tasks; the baseline's images) whose meta-gradient is the mean
    of the items' own: `shard(part)` is the batch of items `part` alone, so each torchrun process
    computes the gradient of its share (runner/distributed.py uses only this interface)."""

    def __len__(self) -> int:
        """The number of items the batch splits into."""

    def shard(self, part: slice) -> TrainingBatch:
        """The batch of the items in `part` (a contiguous slice of range(len(self)))."""


@dataclass
class StepResult:
    meta_loss: (
        torch.Tensor
    )  # scalar, detached: mean query loss (mean cross-entropy) after the last step
    accuracy: torch.Tensor  # [B] post-adaptation query metric per task (accuracy | MSE), detached


def inner_update(weights: dict, grads: dict, lrs) -> dict:
    """One SGD step of the inner loop: w - lr * g for every weight in `grads` (learn2learn's update
    rule). lrs: one float for all, or {name: tensor} broadcastable to the weight (Meta-SGD: the
    weight's shape; MAML++ LSLR: a scalar per weight and step). Pure: returns new tensors, never
    modifies its inputs."""
    if isinstance(lrs, dict):
        return {k: weights[k] - lrs[k] * g for k, g in grads.items()}
    return {k: weights[k] - lrs * g for k, g in grads.items()}


def head_of(model, head_layer: str) -> tuple[tuple[str, str], int]:
    """The learner's last linear layer under the name prefix `head_layer`: ((weight name, bias
    name), its input features). Raises MetarunError unless the learner has exactly
    `<head_layer>.weight` [way, F] and `<head_layer>.bias` under that prefix."""
    init = model.init_params(torch.Generator())
    w, b = f"{head_layer}.weight", f"{head_layer}.bias"
    if (
        w not in init
        or b not in init
        or init[w].dim() != 2
        or set(k for k in init if k.startswith(head_layer + ".")) != {w, b}
    ):
        raise MetarunError(
            f"algorithm.head_layer={head_layer!r} must name the learner's last linear layer "
            f"(with {w} [way, features] and {b}): use e.g. fc."
        )
    return (w, b), int(init[w].shape[1])


class GradientMetaLearner:
    """MAML-family meta-learner on a functional learner (models/conv4.py, or any nn.Module through
    models/learner.py), executed by an Engine.

    Args:
        model: the learner (forward(params [T, ...], x [T, N, C, H, W]) -> logits [T, N, way]).
        update_lr: inner step size (positive).
        update_step: inner steps in training.
        update_step_test: inner steps in evaluation.
        first_order: drop the second-order terms.
        inner_loss: the support loss, sum_over_shot (cbfinn/maml) | mean.
        engine: how meta-batches are executed (default: Engine(impl, workers, task_chunk,
            device)).

    Raises:
        MetarunError: an impossible setting.
    """

    name = "base"
    family = CLASSIFICATION  # bind_family sets the run's (metarun/tasks.py)
    families = ("classification",)  # task families the algorithm can run
    family_refusal = ""  # why it cannot run the others (one clause)
    # Why a training batch cannot be split over torchrun processes without changing the gradient
    # (None: each item's gradient is its own, so shares are computed apart and summed).
    data_parallel: str | None = None

    def __init__(
        self,
        model,
        update_lr: float,
        update_step: int,
        update_step_test: int,
        first_order: bool = False,
        impl: str = "auto",
        task_chunk: int = 0,
        inner_loss: str = "sum_over_shot",
        device="cpu",
        workers: int = 0,
        engine: Engine | None = None,
        meta_grad_clip: float | None = None,
    ):
        if inner_loss not in INNER_LOSSES:
            raise MetarunError(
                f"unknown algorithm.inner_loss={inner_loss!r}: use sum_over_shot or mean."
            )
        if not float(update_lr) > 0:
            raise MetarunError(
                f"update_lr={update_lr} must be positive (the paper uses 0.4 for 5-way, 0.1 for "
                "20-way)."
            )
        for name, value in (("update_step", update_step), ("update_step_test", update_step_test)):
            if int(value) <= 0:
                raise MetarunError(f"{name}={value} must be a positive number of inner SGD steps.")
        self.model = model
        self.update_lr, self.update_step, self.update_step_test = (
            float(update_lr),
            int(update_step),
            int(update_step_test),
        )
        self.first_order, self.inner_loss = bool(first_order), inner_loss
        self.meta_grad_clip = check_meta_grad_clip(meta_grad_clip)
        self.engine = engine if engine is not None else Engine(impl, workers, task_chunk, device)

    @property
    def impl(self) -> str:
        return self.engine.impl

    @property
    def workers(self) -> int:
        return self.engine.workers

    def describe(self) -> str:
        clip = f", meta-gradient clipped to ±{self.meta_grad_clip:g}" if self.meta_grad_clip else ""
        return f"{self.impl} {self.name}, {'first' if self.first_order else 'second'} order{clip}"

    @classmethod
    def from_config(cls, cfg, model, engine, **own):
        """The algorithm of a run's config with the settings every algorithm shares (MAML's); an
        algorithm with settings of its own overrides it and passes them here as `own` keywords."""
        return cls(
            model,
            cfg.update_lr,
            cfg.update_step,
            cfg.update_step_test,
            cfg.first_order,
            inner_loss=cfg.algorithm.inner_loss,
            engine=engine,
            meta_grad_clip=cfg.get("meta_grad_clip"),
            **own,
        )

    # -- meta-parameters ---------------------------------------------------------------------------
    def init_meta_params(
        self, generator: torch.Generator | None = None, dtype=torch.float32, device="cpu"
    ) -> dict:
        """The learner's initial weights (model.init_params) followed by the algorithm's own
        meta-parameters."""
        params = self.model.init_params(generator, dtype=dtype, device=device)
        params = {k: v for k, v in params.items() if k not in self.replaced_names()}
        params.update(self.extra_params(dtype, device))
        return params

    def extra_params(self, dtype, device) -> dict:
        return {}

    def replaced_names(self) -> set:
        """Learner weights the algorithm replaces by its own meta-parameters (MAML++ BNWB)."""
        return set()

    # -- hooks -------------------------------------------------------------------------------------
    def learner_names(self) -> list:
        """The learner's weight names (a local generator: no global RNG is touched)."""
        if not hasattr(self, "_learner_names"):
            self._learner_names = list(self.model.init_params(torch.Generator()))
        return self._learner_names

    def frozen_names(self) -> set:
        """Learner weights the model marks as meta-learned but not adapted
        (model.adapt_bn=false)."""
        frozen = getattr(self.model, "frozen_names", None)
        return set(frozen()) if frozen is not None else set()

    def adapted_names(self, params: dict) -> list:
        names = set(self.learner_names()) - self.frozen_names()
        return [k for k in params if k in names]

    def learner_weights(self, params: dict, fast: dict, step: int, tasks: int | None) -> dict:
        """The learner's weights for inner step `step` (the support pass of that step, and the query
        pass after it): the adapted ones, and every other learner weight from `params` (expanded to
        `tasks` copies; tasks=None: one task, no task dimension)."""
        if len(fast) == len(self.learner_names()):
            return fast
        return self.frozen_learner_weights(params, fast, tasks)

    def inner_lrs(self, params: dict, step: int):
        return self.update_lr

    def step_loss_weights(self, steps: int) -> list[float] | None:
        return None

    def second_order(self) -> bool:
        return not self.first_order

    def task_init(self, params: dict, x: torch.Tensor, y: torch.Tensor) -> dict:
        """Per-task starting values {name: [T, ...]} of learner weights that are not
        meta-parameters, computed from the support set x [T, N, C, H, W], y [T, N] inside the
        autodiff graph (gradients reach `params` through them); the inner loop adapts them with
        adapted_names. Default: none."""
        return {}

    def check_curve(self, steps: list[int]) -> None:
        """Raises MetarunError where accuracy after each number of inner steps (`metarun eval
        steps=`) cannot be scored; default: it can."""

    def begin_iteration(self, iteration: int, optimizer) -> None:
        """Called by the runner before meta-iteration `iteration` (0-based); schedules go here."""

    def scalars(self, params: dict) -> dict:
        """{tag: float} logged to TensorBoard every log_every iterations."""
        return {"lr/update_lr": self.update_lr}

    def histograms(self, params: dict) -> dict:
        """{tag: tensor} logged to TensorBoard as histograms at every validation."""
        return {}

    def bind_data(self, splits: dict) -> None:
        """Called by the runner with {split: ClassImages} after the data loads, before
        init_meta_params; raises MetarunError for a setting the data cannot satisfy."""

    def train_sampler(self, cfg, classes, device):
        """The training batches: an object with sample(meta_batch), state() and load_state(state);
        a generated task family's split (data/sinusoid.py) makes its own."""
        if hasattr(classes, "training_sampler"):
            return classes.training_sampler(cfg, device)
        return EpisodeSampler.training(cfg, classes, device)

    def train_unit(self, cfg) -> tuple[int, str]:
        """(items per training iteration, their name) for the speed the runner logs: `meta_batch`
        tasks by default (the baseline: its mini-batch of images)."""
        return int(cfg.meta_batch), "tasks"

    def make_optimizer(self, params, meta_lr: float) -> torch.optim.Optimizer:
        """The outer-loop optimizer over the meta-parameters (MAML: Adam, Finn et al. 2017)."""
        return self.clipped(torch.optim.Adam(params, lr=float(meta_lr)))

    def clipped(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """`optimizer`, whose every step first clips each gradient element to [-meta_grad_clip,
        meta_grad_clip], as cbfinn/maml's `tf.clip_by_value(grad, -10, 10)` for miniImageNet
        (maml.py L147-148). A step pre-hook, so the clipped gradient is the one every caller steps
        on: the single-process step and torchrun's all-reduced mean alike. Unchanged without
        meta_grad_clip."""
        if self.meta_grad_clip is None:
            return optimizer
        bound = self.meta_grad_clip

        def clip(opt, args, kwargs):
            for group in opt.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.grad.clamp_(-bound, bound)

        optimizer.register_step_pre_hook(clip)
        return optimizer

    def bench_batch(self, ep: Episodes, generator: torch.Generator):
        """A training batch of this algorithm's kind made from random episodes
        (scripts/bench.py)."""
        return ep

    def embed(self, params: dict, x: torch.Tensor, head: tuple) -> torch.Tensor:
        """x [T, N, C, H, W] -> features [T, N, F] of the learner without its head, from the
        meta-parameters `params` (every learner weight but the head; no task dimension). `head`:
        head_of's ((weight name, bias name), F). conv4 has its own embed; any other learner runs
        with the head set to the identity (features @ I + 0: the same numbers)."""
        (w, b), features = head
        tasks = x.shape[0]
        weights = {
            k: params[k].unsqueeze(0).expand(tasks, *params[k].shape)
            for k in self.learner_names()
            if k not in (w, b)
        }
        own = getattr(self.model, "embed", None)
        if own is not None:
            return own(weights, x)
        eye = torch.eye(features, dtype=x.dtype, device=x.device)
        weights[w] = eye.unsqueeze(0).expand(tasks, features, features)
        weights[b] = eye.new_zeros(tasks, features)
        return self.model.forward(weights, x)

    def frozen_learner_weights(self, params: dict, fast: dict, tasks: int | None) -> dict:
        """The adapted weights `fast`, and every other learner weight from `params` (expanded to
        `tasks` copies; tasks=None: one task)."""
        weights = {}
        for k in self.learner_names():
            if k in fast:
                weights[k] = fast[k]
            else:
                w = params[k]
                weights[k] = w if tasks is None else w.unsqueeze(0).expand(tasks, *w.shape)
        return weights

    # -- task family ------------------------------------------------------------------------------
    @classmethod
    def check_family(cls, family: TaskFamily) -> None:
        """Raises MetarunError (one line) unless the algorithm can run tasks of `family`
        (`families`; `family_refusal` says why not)."""
        if family.name not in cls.families:
            why = cls.family_refusal or "it is written for classification"
            raise MetarunError(
                f"algorithm={cls.name} cannot run {family.name} tasks (dataset=sinusoid): {why}; "
                "use algorithm=maml, metasgd, anil or joint (first_order=true: first-order MAML)."
            )

    def bind_family(self, family: TaskFamily) -> None:
        """Runs the algorithm on tasks of `family` (metarun/tasks.py: its losses and metric); raises
        MetarunError when the algorithm cannot (check_family)."""
        self.check_family(family)
        self.family = family

    # -- losses ------------------------------------------------------------------------------------
    def support_loss(self, logits: torch.Tensor, y: torch.Tensor, shot: int) -> torch.Tensor:
        """Sum over tasks of each task's inner loss (the task family's: metarun/tasks.py).
        Classification's `sum_over_shot` is cbfinn/maml's xent/update_batch_size summed over the
        support set (= way x mean cross-entropy), which its update_lr values assume; regression's
        is the mean squared error over the support points (cbfinn/maml's mse)."""
        return self.family.support_loss(logits, y, shot, self.inner_loss).sum()

    def query_loss(
        self, logits: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-task query loss (mean cross-entropy | MSE) and metric (accuracy | MSE), [T] each."""
        return self.family.query_loss(logits, y)

    # -- inner loop --------------------------------------------------------------------------------
    def initial_fast(self, params: dict, x: torch.Tensor, y: torch.Tensor) -> dict:
        """The inner loop's starting weights for the T tasks of x [T, N, C, H, W], y [T, N]: the
        adapted meta-parameters (one view per task) and the task_init ones."""
        tasks = x.shape[0]
        fast = {
            k: params[k].unsqueeze(0).expand(tasks, *params[k].shape)
            for k in self.adapted_names(params)
        }
        fast.update(self.task_init(params, x, y))
        return fast

    def adapt(
        self,
        params: dict,
        x: torch.Tensor,
        y: torch.Tensor,
        steps: int,
        create_graph: bool,
        trajectory: bool = False,
    ):
        """`steps` SGD steps on the support set of each of the T tasks in x [T, N, C, H, W], from
        copies of the adapted weights. Returns the adapted weights {name: [T, ...]}
        (trajectory=True: a list with those after each step)."""
        tasks, shot = x.shape[0], y.shape[1] // getattr(self.model, "way", 1)
        fast = self.initial_fast(params, x, y)
        after = []
        for step in range(steps):
            loss = self.support_loss(
                self.model.forward(self.learner_weights(params, fast, step, tasks), x), y, shot
            )
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=create_graph)
            fast = inner_update(
                fast, dict(zip(fast, grads, strict=True)), self.inner_lrs(params, step)
            )
            after.append(fast)
        return after if trajectory else fast

    # -- meta-training -----------------------------------------------------------------------------
    def accumulate_meta_gradient(self, params: dict, ep: Episodes) -> StepResult:
        """Adds d(meta-loss)/d(params) to each param's .grad; returns the detached meta-loss and
        accuracies. Meta-loss: mean over tasks of sum_s w_s * (query loss after step s), w from
        step_loss_weights (the last step only by default)."""
        steps = self.update_step
        weights = self.step_loss_weights(steps)
        create_graph = self.second_order()

        def chunk_objective(part):
            after = self.adapt(
                params, ep.x_support[part], ep.y_support[part], steps, create_graph, trajectory=True
            )
            tasks = ep.x_support[part].shape[0]
            loss, accuracy = self.query_loss(
                self.model.forward(
                    self.learner_weights(params, after[-1], steps - 1, tasks), ep.x_query[part]
                ),
                ep.y_query[part],
            )
            if weights is None:
                objective = loss
            else:
                objective = weights[-1] * loss
                for s in range(steps - 2, -1, -1):
                    earlier = self.query_loss(
                        self.model.forward(
                            self.learner_weights(params, after[s], s, tasks), ep.x_query[part]
                        ),
                        ep.y_query[part],
                    )[0]
                    objective = objective + weights[s] * earlier
            return objective, loss, accuracy

        return self.accumulate_objective(params, ep, chunk_objective)

    def accumulate_objective(self, params: dict, ep, objective) -> StepResult:
        """Adds d(mean over the meta-batch of a per-task objective)/d(params) to each param's
        .grad, chunk by chunk through the engine (one chunk's graph at a time), and returns the
        detached mean loss and the per-task metric. `objective(part)` gives the tasks `part` of `ep`
        as (objective [t], loss [t], metric [t]); a parameter it does not use gets a zero gradient.
        """
        meta_batch, leaves = ep.x_support.shape[0], list(params.values())

        def chunk_gradients(part):
            target, loss, metric = objective(part)
            # dividing each chunk by the whole batch makes the engine's sum the mean
            grads = torch.autograd.grad(target.sum() / meta_batch, leaves, allow_unused=True)
            grads = [
                torch.zeros_like(p) if g is None else g for p, g in zip(leaves, grads, strict=True)
            ]
            return grads, (loss.detach(), metric)

        images = ep.x_support.shape[1] + ep.x_query.shape[1]
        extras = self.engine.accumulate(chunk_gradients, leaves, meta_batch, images)
        return StepResult(
            torch.cat([e[0] for e in extras]).mean(), torch.cat([e[1] for e in extras])
        )

    # -- evaluation --------------------------------------------------------------------------------
    def query_logits(self, params: dict, ep: Episodes, steps: int | None = None) -> torch.Tensor:
        """Post-adaptation query logits [T, way*query, way] after `steps` (default update_step_test)
        inner steps on each task's support set; keeps no graph."""
        steps = self.update_step_test if steps is None else int(steps)
        # Fresh leaves: the inner loop's graph ends here, never reaching the caller's parameters.
        start = {k: v.detach().requires_grad_(True) for k, v in params.items()}

        def chunk_logits(part):
            with torch.enable_grad():
                fast = self.adapt(
                    start, ep.x_support[part], ep.y_support[part], steps, create_graph=False
                )
            with torch.no_grad():
                tasks = ep.x_support[part].shape[0]
                return self.model.forward(
                    self.learner_weights(start, fast, steps - 1, tasks), ep.x_query[part]
                )

        images = ep.x_support.shape[1] + ep.x_query.shape[1]
        return torch.cat(self.engine.map_chunks(chunk_logits, ep.x_support.shape[0], images))

    def query_logits_curve(self, params: dict, ep: Episodes, steps: list[int]) -> torch.Tensor:
        """Query logits [len(steps), T, way*query, way] after each number of inner steps in `steps`
        (0: the meta-learned weights, unadapted), from one inner loop of max(steps) steps per task
        (cbfinn/maml's test reports accuracy after 0..10 steps this way); keeps no graph. Raises
        MetarunError for a negative count, or where check_curve refuses."""
        steps = [int(s) for s in steps]
        if not steps or min(steps) < 0:
            raise MetarunError(
                f"steps={steps} must be numbers of inner steps >= 0 (0: no adaptation)."
            )
        self.check_curve(steps)
        last = max(steps)
        start = {k: v.detach().requires_grad_(True) for k, v in params.items()}

        def chunk_logits(part):
            tasks = ep.x_support[part].shape[0]
            after = []
            if last > 0:
                with torch.enable_grad():
                    after = self.adapt(
                        start,
                        ep.x_support[part],
                        ep.y_support[part],
                        last,
                        create_graph=False,
                        trajectory=True,
                    )
            out = []
            with torch.no_grad():
                for s in steps:
                    fast = (
                        after[s - 1]
                        if s > 0
                        else self.initial_fast(start, ep.x_support[part], ep.y_support[part])
                    )
                    # step 0 uses the first step's weights (MAML++'s per-step batch norm: row 0)
                    out.append(
                        self.model.forward(
                            self.learner_weights(start, fast, max(s - 1, 0), tasks),
                            ep.x_query[part],
                        )
                    )
            return torch.stack(out)

        images = ep.x_support.shape[1] + ep.x_query.shape[1]
        return torch.cat(self.engine.map_chunks(chunk_logits, ep.x_support.shape[0], images), dim=1)

    def evaluate(self, params: dict, ep: Episodes, steps: int | None = None) -> torch.Tensor:
        """Post-adaptation query metric [T] (the family's: accuracy | MSE) after `steps` (default
        update_step_test) steps; keeps no graph."""
        return self.query_loss(self.query_logits(params, ep, steps), ep.y_query)[1]

    # -- checkpoints -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The algorithm's resolved execution (a resumed run keeps it); everything learned is in
        params."""
        return {"name": self.name, "impl": self.impl, "workers": self.workers}


def check_meta_grad_clip(value) -> float | None:
    """The `meta_grad_clip` setting as a float, or None; MetarunError unless positive and finite."""
    if value is None:
        return None
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (number and math.isfinite(value) and value > 0):
        raise MetarunError(
            f"meta_grad_clip={value} must be a positive number (cbfinn/maml's miniImageNet: 10) "
            "or null (no clipping)."
        )
    return float(value)


def meta_train_step(
    algorithm: GradientMetaLearner, params: dict, optimizer: torch.optim.Optimizer, ep: Episodes
) -> StepResult:
    """One meta-iteration: meta-gradient of a meta-batch, then one optimizer step. `metarun train`
    and scripts/bench.py both call exactly this."""
    optimizer.zero_grad(set_to_none=True)
    result = algorithm.accumulate_meta_gradient(params, ep)
    optimizer.step()
    return result
