"""Reptile (Nichol, Achiam & Schulman 2018, "On First-Order Meta-Learning Algorithms", Algorithm 2;
their code github.com/openai/supervised-reptile, supervised_reptile/reptile.py).

Per task: `update_step` (their inner_iters) steps of SGD or Adam (their default: Adam with beta1=0)
from the meta-weights phi on mini-batches of `inner_batch` images drawn from `train_shots` images
per class (their _mini_batches: consecutive reshuffles of the task's images, without replacement);
no query loss. Outer step: phi <- phi + eps * (mean over the meta-batch of the adapted weights W -
phi), with eps annealed linearly from `meta_step` to `meta_step_final` over the run (frac_done =
iteration / iterations). metarun runs the outer step as plain SGD at learning rate eps on the
"gradient" phi - mean W (make_optimizer, begin_iteration), so checkpoints and resume are the generic
ones.

Evaluation (their evaluate / _test_predictions): `update_step_test` steps of the same inner
optimizer on mini-batches of `eval_inner_batch` support images (0: the whole support set), then the
query images are classified all at once (`transductive=true`: batch norm uses the query batch's
statistics) or one at a time with the support set in the same batch (`transductive=false`, the
paper's non-transductive setting).

The inner Adam's state (`inner_state`): theirs is built once (models.py L30:
`optimizer(...).minimize` in the model's constructor), so its TensorFlow slots (moments) and beta
powers carry over from task to task and iteration to iteration; only the model's variables are
exported and restored around each task (reptile.py L62-74), while evaluation saves and restores the
full state, Adam's included, around each task (reptile.py L114-122). `inner_state=shared` does the
same: one inner Adam for the whole run, a meta-batch's tasks one after another in order; its moments
and step count are meta-parameters (`inner_adam.m.<weight>`, `inner_adam.v.<weight>`,
`inner_adam.step`) that no gradient moves, so every checkpoint holds them (resume is bit for bit;
`metarun eval` starts each task from the checkpoint's state and discards what the task changed).
`per_task` (metarun's earlier behaviour, and that of a run whose checkpoint predates the setting)
starts a fresh Adam for every task, so tasks can run in parallel.

Another difference from their code (README): conv4 averages its last feature map (theirs flattens).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from metarun.algorithms.base import GradientMetaLearner, StepResult
from metarun.algorithms.engine import Engine
from metarun.data.episodes import Episodes, EpisodeSampler
from metarun.errors import MetarunError

log = logging.getLogger("metarun")

INNER_OPTIMIZERS = ("adam", "sgd")
INNER_STATES = ("per_task", "shared")
ADAM = "inner_adam."  # the prefix of the shared inner Adam's state among the meta-parameters


@dataclass
class InnerAdam:
    """The inner Adam's state: first and second moments {weight name: [T, ...]}, the steps taken."""

    m: dict
    v: dict
    step: int

    @classmethod
    def fresh(cls, weights: dict) -> InnerAdam:
        """A new Adam for each task: zero moments shaped as `weights`, no step taken."""
        zeros = {k: torch.zeros_like(w) for k, w in weights.items()}
        return cls(zeros, {k: torch.zeros_like(w) for k, w in weights.items()}, 0)


@dataclass
class ReptileBatch:
    x: torch.Tensor  # float [B, way*train_shots, C, H, W]: each task's training images
    y: torch.Tensor  # long [B, way*train_shots]
    order: (
        torch.Tensor
    )  # long [B, update_step, inner_batch]: the images (indices into x) of each inner step

    def __len__(self) -> int:
        """B: the number of tasks."""
        return self.x.shape[0]

    def shard(self, part: slice) -> ReptileBatch:
        """The tasks in `part` (metarun.algorithms.base.TrainingBatch): each task's outer
        "gradient" phi - W is its own."""
        return ReptileBatch(self.x[part], self.y[part], self.order[part])


def mini_batch_order(
    tasks: int, images: int, steps: int, batch: int, generator, device
) -> torch.Tensor:
    """Their _mini_batches without replacement, per task: the images of consecutive random
    permutations, cut into `steps` batches of `batch` (a batch may span two permutations, as
    theirs). [tasks, steps, batch]."""
    need = steps * batch
    reps = math.ceil(need / images)
    perms = torch.rand(tasks, reps, images, generator=generator, device=generator.device).argsort(
        -1
    )
    return perms.reshape(tasks, reps * images)[:, :need].reshape(tasks, steps, batch).to(device)


class ReptileSampler:
    """Reptile's training batches: `train_shots` distinct images of each of `way` classes per task
    (drawn by the episode sampler as support + query, so no image repeats) and each task's inner
    mini-batch order, all from the episode sampler's generator (checkpointed: a resumed run draws
    what it would have drawn)."""

    def __init__(self, classes, way, train_shots, steps, batch, device, seed, rotate):
        shot, self.keep_query = (train_shots - 1, True) if train_shots > 1 else (1, False)
        self.episodes = EpisodeSampler(
            classes, "train", way, shot, 1, device, seed=seed, rotate=rotate
        )
        self.steps, self.batch, self.device = steps, batch, torch.device(device)

    def sample(self, meta_batch: int) -> ReptileBatch:
        ep = self.episodes.sample(meta_batch)
        return to_batch(
            ep, self.keep_query, self.steps, self.batch, self.episodes.generator, self.device
        )

    def state(self) -> dict:
        return self.episodes.state()

    def load_state(self, state: dict) -> None:
        self.episodes.load_state(state)


def to_batch(
    ep: Episodes, keep_query: bool, steps: int, batch: int, generator, device
) -> ReptileBatch:
    x = torch.cat([ep.x_support, ep.x_query], 1) if keep_query else ep.x_support
    y = torch.cat([ep.y_support, ep.y_query], 1) if keep_query else ep.y_support
    return ReptileBatch(
        x, y, mini_batch_order(x.shape[0], x.shape[1], steps, batch, generator, device)
    )


class Reptile(GradientMetaLearner):
    """Reptile (see the module docstring).

    Args (beyond GradientMetaLearner's; update_lr is the inner optimizer's learning rate,
    update_step its steps in training): train_shots (images per class of a training task; None:
    shot), inner_batch (images per inner step), inner_optimizer (adam | sgd), adam_beta1 /
    adam_beta2 / adam_eps (their Adam: 0, 0.999, 1e-8), meta_step / meta_step_final (the outer step
    size, annealed linearly), iterations (the run's length, or algorithm.meta_step_iterations: the
    annealing's length, after which eps stays at meta_step_final), eval_inner_batch (0: the whole
    support set), transductive, shot, inner_state (per_task | shared: one inner Adam for the run,
    tasks in order, as their code). Raises MetarunError for an impossible setting
    (inner_state=shared with SGD or under torchrun).
    """

    name = "reptile"
    family_refusal = (
        "its inner loop draws mini-batches of labelled images per class and minimises cross-entropy"
    )

    def __init__(
        self,
        model,
        update_lr,
        update_step,
        update_step_test,
        *,
        train_shots=None,
        shot=1,
        inner_batch=10,
        inner_optimizer="adam",
        adam_beta1=0.0,
        adam_beta2=0.999,
        adam_eps=1e-8,
        meta_step=1.0,
        meta_step_final=0.0,
        iterations=100000,
        eval_inner_batch=0,
        transductive=False,
        eval_seed=0,
        inner_state="per_task",
        run_iterations=None,
        **kw,
    ):
        super().__init__(
            model, update_lr, update_step, update_step_test, True, inner_loss="mean", **kw
        )
        if (
            self.frozen_names()
        ):  # Reptile's outer step moves phi only along what its inner loop trained
            raise MetarunError(
                "algorithm=reptile trains every weight in its inner loop: model.adapt_bn=false "
                "would freeze batch norm for the whole run; use model.adapt_bn=true."
            )
        if inner_optimizer not in INNER_OPTIMIZERS:
            raise MetarunError(
                f"unknown algorithm.inner_optimizer={inner_optimizer!r}: use adam (their Omniglot "
                "runs, beta1=0) or sgd."
            )
        self.train_shots = int(shot if train_shots is None else train_shots)
        for name, value in (("train_shots", self.train_shots), ("inner_batch", inner_batch)):
            if int(value) <= 0:
                raise MetarunError(
                    f"algorithm.{name}={value} must be a positive integer (their Omniglot runs: "
                    "train_shots=10, inner_batch=10 for 5-way, 20 for 20-way)."
                )
        if int(eval_inner_batch) < 0:
            raise MetarunError(
                f"algorithm.eval_inner_batch={eval_inner_batch} must be >= 0 (0: the whole support "
                "set)."
            )
        if not (0 <= float(adam_beta1) < 1 and 0 <= float(adam_beta2) < 1 and float(adam_eps) > 0):
            raise MetarunError(
                f"algorithm.adam_beta1={adam_beta1}, adam_beta2={adam_beta2}, adam_eps={adam_eps}: "
                "betas must be in [0, 1) and eps positive (theirs: 0, 0.999, 1e-8)."
            )
        for name, value in (("meta_step", meta_step), ("meta_step_final", meta_step_final)):
            if not 0 <= float(value) <= 1:
                raise MetarunError(
                    f"algorithm.{name}={value} must be in [0, 1] (the fraction of the way from phi "
                    "to the adapted weights; theirs: 1 annealed to 0)."
                )
        self.inner_batch, self.inner_optimizer = int(inner_batch), inner_optimizer
        self.betas, self.adam_eps = (float(adam_beta1), float(adam_beta2)), float(adam_eps)
        self.meta_step, self.meta_step_final = float(meta_step), float(meta_step_final)
        self.iterations, self.eval_inner_batch = max(int(iterations), 1), int(eval_inner_batch)
        self.transductive, self.eval_seed = bool(transductive), int(eval_seed)
        self.current_meta_step = self.meta_step
        self.inner_state = check_inner_state(inner_state, inner_optimizer)
        self._in_order = None
        self.past_note = self.past_schedule_note(run_iterations)

    @classmethod
    def from_config(cls, cfg, model, engine):
        a = cfg.algorithm
        return cls(
            model,
            cfg.update_lr,
            cfg.update_step,
            cfg.update_step_test,
            train_shots=a.train_shots,
            shot=cfg.shot,
            inner_batch=a.inner_batch,
            inner_optimizer=a.inner_optimizer,
            adam_beta1=a.adam_beta1,
            adam_beta2=a.adam_beta2,
            adam_eps=a.adam_eps,
            meta_step=a.meta_step,
            meta_step_final=a.meta_step_final,
            iterations=a.meta_step_iterations
            if a.get("meta_step_iterations") is not None
            else cfg.get("schedule_iterations") or cfg.iterations,
            eval_inner_batch=a.eval_inner_batch,
            transductive=a.transductive,
            # a checkpoint saved before the setting existed: a fresh Adam per task, as it trained
            inner_state=a.get("inner_state", "per_task"),
            run_iterations=cfg.iterations,
            engine=engine,
            meta_grad_clip=cfg.get("meta_grad_clip"),
        )

    def describe(self) -> str:
        how = (
            "tasks in order through one shared inner adam"
            if self.inner_state == "shared"
            else f"a fresh inner {self.inner_optimizer} per task"
        )
        return (
            f"{self.impl} reptile, {how}, {self.update_step} steps of {self.inner_batch} images "
            f"from {self.train_shots} per class, "
            f"{'' if self.transductive else 'non-'}transductive evaluation"
        )

    # -- the shared inner Adam's state, kept among the meta-parameters ---------------------------
    def extra_params(self, dtype, device) -> dict:
        """inner_state=shared: the inner Adam's moments (zeros, each weight's shape) and its step
        count (a float64 scalar: exact to 2**53 steps); no gradient reaches them, so the outer step
        leaves them as the inner loop wrote them."""
        if self.inner_state != "shared":
            return {}
        shapes = self.model.init_params(torch.Generator(), dtype=dtype, device=device)
        extra = {
            f"{ADAM}{part}.{k}": torch.zeros_like(w) for part in "mv" for k, w in shapes.items()
        }
        extra[ADAM + "step"] = torch.zeros((), dtype=torch.float64, device=device)
        return extra

    def shared_adam(self, params: dict, tasks: int) -> InnerAdam:
        """The shared state in `params` as `tasks` identical copies [tasks, ...] (read-only
        views)."""
        names = self.learner_names()

        def copies(part):
            return {
                k: params[f"{ADAM}{part}.{k}"].detach().unsqueeze(0).expand(tasks, *params[k].shape)
                for k in names
            }

        return InnerAdam(copies("m"), copies("v"), int(params[ADAM + "step"].item()))

    def store_shared_adam(self, params: dict, state: InnerAdam) -> None:
        """Writes one task's state after its inner loop ([1, ...] moments) back into `params`."""
        with torch.no_grad():
            for part, moments in (("m", state.m), ("v", state.v)):
                for k, value in moments.items():
                    params[f"{ADAM}{part}.{k}"].copy_(value[0])
            params[ADAM + "step"].fill_(state.step)

    # -- the runner's hooks ------------------------------------------------------------------------
    def bind_data(self, splits: dict) -> None:
        per_class = splits["train"].per_class
        if self.train_shots > per_class or per_class < 2:
            raise MetarunError(
                f"algorithm.train_shots={self.train_shots} is more than the {per_class} images per "
                f"class of the train split: use algorithm.train_shots<={per_class}."
            )

    def train_sampler(self, cfg, classes, device):
        return ReptileSampler(
            classes,
            int(cfg.way),
            self.train_shots,
            self.update_step,
            self.inner_batch,
            device,
            int(cfg.seed),
            bool(cfg.dataset.rotate),
        )

    def make_optimizer(self, params, meta_lr: float) -> torch.optim.Optimizer:
        # phi <- phi - eps * (phi - mean W): SGD at learning rate eps on that difference (meta_lr is
        # unused); the shared inner Adam's state gets no gradient, which SGD skips
        return self.clipped(torch.optim.SGD(params, lr=self.meta_step))

    def bench_batch(self, ep: Episodes, generator: torch.Generator) -> ReptileBatch:
        return to_batch(
            ep, True, self.update_step, self.inner_batch, generator, ep.x_support.device
        )

    def meta_step_at(self, iteration: int) -> float:
        """Their linear annealing (train.py L54-55): frac_done * meta_step_final + (1 - frac_done) *
        meta_step, frac_done = iteration / the annealing's length, held at 1 after it (a run
        extended past its schedule continues at meta_step_final instead of extrapolating)."""
        frac = min(int(iteration) / self.iterations, 1.0)
        return frac * self.meta_step_final + (1 - frac) * self.meta_step

    def past_schedule_note(self, run_iterations) -> str | None:
        """The warning for a run longer than the outer step's annealing, or None."""
        if run_iterations is None or int(run_iterations) <= self.iterations:
            return None
        idle = (
            ": those iterations leave the weights as they are" if self.meta_step_final == 0 else ""
        )
        return (
            f"metarun: warning: iterations={run_iterations} runs past the {self.iterations} "
            "iterations the outer step anneals over (algorithm.meta_step_iterations, else "
            f"schedule_iterations): after them it stays at meta_step_final={self.meta_step_final}"
            f"{idle}."
        )

    def begin_iteration(self, iteration: int, optimizer) -> None:
        if self.past_note and optimizer is not None:  # once, when training starts
            log.warning(self.past_note)
            self.past_note = None
        self.current_meta_step = self.meta_step_at(iteration)
        if optimizer is not None:
            for group in optimizer.param_groups:
                group["lr"] = self.current_meta_step

    def scalars(self, params: dict) -> dict:
        return {"lr/update_lr": self.update_lr, "reptile/meta_step": self.current_meta_step}

    # -- the inner loop ----------------------------------------------------------------------------
    def train_tasks(
        self,
        params: dict,
        x: torch.Tensor,
        y: torch.Tensor,
        order: torch.Tensor,
        adam: InnerAdam | None = None,
    ):
        """The inner optimizer from phi on each of T tasks, step s on images order[:, s] of x
        [T, n, C, H, W]; Adam starts from `adam` (moments [T, ...]; None: a fresh one per task).
        Returns (adapted weights {name: [T, ...]}, last step's loss [T], last step's accuracy [T],
        the Adam state after)."""
        tasks, steps = x.shape[0], order.shape[1]
        fast = {
            k: params[k].detach().unsqueeze(0).expand(tasks, *params[k].shape).clone()
            for k in self.learner_names()
        }
        adam = InnerAdam.fresh(fast) if adam is None else adam
        m, v2, t = dict(adam.m), dict(adam.v), adam.step
        rows = torch.arange(tasks, device=x.device).unsqueeze(1)
        b1, b2 = self.betas
        for s in range(steps):
            idx = order[:, s]
            xb, yb = x[rows, idx], y[rows, idx]
            leaves = {k: w.requires_grad_(True) for k, w in fast.items()}
            with torch.enable_grad():
                logits = self.model.forward(leaves, xb)
                ce = (
                    F.cross_entropy(logits.flatten(0, 1), yb.flatten(), reduction="none")
                    .view(yb.shape)
                    .mean(1)
                )
                # tasks are independent: the gradient of the sum is each task's own
                grads = torch.autograd.grad(ce.sum(), list(leaves.values()))
            loss, accuracy = ce.detach(), (logits.detach().argmax(-1) == yb).to(x.dtype).mean(1)
            with torch.no_grad():
                if self.inner_optimizer == "sgd":
                    fast = {
                        k: w.detach() - self.update_lr * g
                        for (k, w), g in zip(leaves.items(), grads, strict=True)
                    }
                    continue
                # TensorFlow's AdamOptimizer (their DEFAULT_OPTIMIZER): epsilon after the bias
                # correction, t counts every step this Adam took
                t += 1
                lr_t = self.update_lr * math.sqrt(1 - b2**t) / (1 - b1**t)
                new = {}
                for (k, w), g in zip(leaves.items(), grads, strict=True):
                    m[k] = b1 * m[k] + (1 - b1) * g
                    v2[k] = b2 * v2[k] + (1 - b2) * g * g
                    new[k] = w.detach() - lr_t * m[k] / (v2[k].sqrt() + self.adam_eps)
                fast = new
        return {k: w.detach() for k, w in fast.items()}, loss, accuracy, InnerAdam(m, v2, t)

    # -- meta-training -----------------------------------------------------------------------------
    def accumulate_meta_gradient(self, params: dict, batch: ReptileBatch) -> StepResult:
        """Adds (phi - mean over tasks of W) to each meta-parameter's .grad (the optimizer's SGD
        step at eps then is Reptile's outer update); returns the last inner step's mean loss and
        accuracies. inner_state=shared: the tasks one after another, in order, each starting from
        the Adam state the previous one left (their train_step); the engine's parallel execution
        would reorder them."""
        meta_batch = batch.x.shape[0]
        names = self.learner_names()
        leaves = [params[k] for k in names]
        shared = self.inner_state == "shared"

        def chunk(part):
            adam = self.shared_adam(params, 1) if shared else None
            adapted, loss, accuracy, after = self.train_tasks(
                params, batch.x[part], batch.y[part], batch.order[part], adam
            )
            if shared:
                self.store_shared_adam(params, after)
            grads = [(params[k].detach() - adapted[k]).sum(0) / meta_batch for k in names]
            return grads, (loss, accuracy)

        engine = self.in_order_engine() if shared else self.engine
        extras = engine.accumulate(chunk, leaves, meta_batch, batch.x.shape[1])
        return StepResult(
            torch.cat([e[0] for e in extras]).mean(), torch.cat([e[1] for e in extras])
        )

    def in_order_engine(self) -> Engine:
        """One task per chunk, one thread, in task order, on the run's device and autocast."""
        if self._in_order is None:
            self._in_order = Engine(
                "loop", 1, 0, self.engine.device, autocast=self.engine.autocast, timed_auto=False
            )
        return self._in_order

    # -- evaluation --------------------------------------------------------------------------------
    def query_logits(self, params: dict, ep: Episodes, steps: int | None = None) -> torch.Tensor:
        """Fine-tunes on each task's support set (update_step_test steps of the inner optimizer on
        batches of eval_inner_batch; inner_state=shared: Adam starts from the run's shared state),
        then classifies the query set: [T, way*query, way]. Deterministic (a fixed seed for the
        mini-batch order)."""
        steps = self.update_step_test if steps is None else int(steps)
        shots, queries = ep.x_support.shape[1], ep.x_query.shape[1]
        batch = (
            shots
            if self.eval_inner_batch == 0 or self.eval_inner_batch >= shots
            else self.eval_inner_batch
        )

        def chunk_logits(part):
            x, y = ep.x_support[part], ep.y_support[part]
            tasks = x.shape[0]
            if batch == shots:
                order = torch.arange(shots, device=x.device).expand(tasks, steps, shots)
            else:
                g = torch.Generator().manual_seed(self.eval_seed + part.start)
                order = mini_batch_order(tasks, shots, steps, batch, g, x.device)
            # inner_state=shared: each task from the run's Adam state, which it leaves unchanged
            # (their evaluate restores the full state after every task)
            adam = self.shared_adam(params, tasks) if self.inner_state == "shared" else None
            fast, _, _, _ = self.train_tasks(params, x, y, order, adam)
            with torch.no_grad():
                if self.transductive:
                    return self.model.forward(fast, ep.x_query[part])
                # each query image alone with the support set, so batch norm sees no other query
                # image
                both = torch.cat(
                    [
                        x.unsqueeze(1).expand(tasks, queries, *x.shape[1:]),
                        ep.x_query[part].unsqueeze(2),
                    ],
                    2,
                )
                weights = {k: w.repeat_interleave(queries, 0) for k, w in fast.items()}
                logits = self.model.forward(weights, both.flatten(0, 1))[:, -1]
                return logits.view(tasks, queries, -1)

        images = shots + queries if self.transductive else queries * (shots + 1)
        return torch.cat(self.engine.map_chunks(chunk_logits, ep.x_support.shape[0], images))


def check_inner_state(inner_state: str, inner_optimizer: str) -> str:
    """The `algorithm.inner_state` setting, checked: shared needs Adam (SGD keeps no state) and one
    process (the tasks run in order through one Adam, which torchrun's processes cannot share)."""
    if inner_state not in INNER_STATES:
        raise MetarunError(
            f"unknown algorithm.inner_state={inner_state!r}: use per_task (a fresh inner Adam per "
            "task) or shared (one inner Adam for the whole run, as openai/supervised-reptile)."
        )
    if inner_state == "shared" and inner_optimizer != "adam":
        raise MetarunError(
            f"algorithm.inner_state=shared carries the inner Adam's moments across tasks, but "
            f"inner_optimizer={inner_optimizer} keeps none: use algorithm.inner_state=per_task."
        )
    world = int(os.environ.get("WORLD_SIZE", "1"))  # torchrun's processes
    if inner_state == "shared" and world > 1:
        raise MetarunError(
            f"algorithm.inner_state=shared runs the tasks in order through one inner Adam, which "
            f"torchrun's {world} processes cannot share: run it in one process, or use "
            "algorithm.inner_state=per_task."
        )
    return inner_state
