"""Prototypical Networks (Snell, Swersky & Zemel 2017, NeurIPS, "Prototypical Networks for Few-shot
Learning", Sec. 2 and Algorithm 1; their code github.com/jakesnell/prototypical-networks).

Each class k of a task is represented by its prototype c_k, the mean of its embedded support images
(Eq. 1), and a query image x is classified by a softmax over the negative squared Euclidean
distances -||f(x) - c_k||^2 (Eq. 2). Training minimises the query cross-entropy of training
episodes; there is no inner loop. The embedding f is the learner without its head: conv4's four
blocks (64 features on 28x28 Omniglot with max-pooling, 1,600 on 84x84 miniImageNet), or any learner
whose last linear layer is `algorithm.head_layer`.

Their training protocol (Sec. 3.1-3.2; the conf/experiment/protonet_* presets): episodes of
`algorithm.train_way` classes (Omniglot 60; miniImageNet 30 for 1-shot, 20 for 5-shot), the test
shot, and `algorithm.train_query` query images per class (Omniglot 5, miniImageNet 15); Adam at
meta_lr 1e-3, halved every 2,000 episodes (`algorithm.lr_decay`, `algorithm.lr_decay_every`).
Validation and test use metarun's fixed tasks of `way`/`shot`/`query`, any way.

Difference from their code: batch norm normalises with the statistics of the batch it sees, support
and query embedded in separate passes as in every metarun algorithm (theirs: one pass over support
and query together in training, running averages at test time).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from metarun.algorithms.base import GradientMetaLearner, StepResult, head_of
from metarun.data.episodes import Episodes, EpisodeSampler
from metarun.errors import MetarunError


def prototypes(features: torch.Tensor, y: torch.Tensor, way: int) -> torch.Tensor:
    """Class means (Snell et al. 2017, Eq. 1): support features [T, S, F] with labels y [T, S] in
    0..way-1 -> prototypes [T, way, F]. Every class needs a support image (metarun's episodes have
    them)."""
    onehot = F.one_hot(y, way).to(features.dtype)  # [T, S, way]
    return onehot.transpose(1, 2) @ features / onehot.sum(1).unsqueeze(-1)


def prototype_head(c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The linear layer whose logits are the negative squared distances up to a per-query constant
    (Triantafillou et al. 2020, Sec. 3.2): -||x - c_k||^2 = 2 c_k.x - ||c_k||^2 - ||x||^2, so
    W_k = 2 c_k, b_k = -||c_k||^2. c [..., way, F] -> (W [..., way, F], b [..., way])."""
    return 2 * c, -(c * c).sum(-1)


def distance_logits(query: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """-||q - c_k||^2 for query features [T, Q, F] and prototypes [T, way, F] -> [T, Q, way],
    through the prototype head (one matrix product, no [T, Q, way, F] difference tensor)."""
    w, b = prototype_head(c)
    return query @ w.transpose(-1, -2) + b.unsqueeze(-2) - (query * query).sum(-1, keepdim=True)


class ProtoNet(GradientMetaLearner):
    """Prototypical Networks (see the module docstring).

    Args (beyond the learner and the engine): shot (support images per class of a training
    episode: the test shot, as theirs), train_way (classes of a training episode; None: the
    learner's way), train_query (query images per class of a training episode), head_layer (the
    learner's last linear layer, left out of the embedding), meta_lr (Adam's initial learning
    rate), lr_decay / lr_decay_every (the rate is multiplied by lr_decay every lr_decay_every
    iterations; 0: constant). update_lr / update_step(_test) are not used (no inner loop). Raises
    MetarunError for an impossible setting.

    Example: ProtoNet(Conv4(way=5, downsample="maxpool"), train_way=60, train_query=5)
    """

    name = "protonet"

    def __init__(
        self,
        model,
        update_lr=0.4,
        update_step=1,
        update_step_test=1,
        *,
        shot=1,
        train_way=None,
        train_query=5,
        head_layer="fc",
        meta_lr=1e-3,
        lr_decay=0.5,
        lr_decay_every=2000,
        **kw,
    ):
        super().__init__(model, update_lr, update_step, update_step_test, True, **kw)
        self.head_layer = str(head_layer)
        self.last_layer = head_of(model, self.head_layer)
        self.shot = int(shot)
        self.train_way = int(model.way if train_way is None else train_way)
        self.train_query = int(train_query)
        for name, value in (("train_way", self.train_way), ("train_query", self.train_query)):
            if isinstance(value, bool) or value <= 0:
                raise MetarunError(
                    f"algorithm.{name}={value} must be a positive integer (Snell et al.: Omniglot "
                    "train_way=60 train_query=5; miniImageNet 30 or 20 and 15)."
                )
        if not 0 < float(lr_decay) <= 1 or int(lr_decay_every) < 0:
            raise MetarunError(
                f"algorithm.lr_decay={lr_decay} must be in (0, 1] and algorithm.lr_decay_every="
                f"{lr_decay_every} >= 0 (theirs: 0.5 every 2000 episodes; 0: a constant rate)."
            )
        self.meta_lr, self.lr_decay = float(meta_lr), float(lr_decay)
        self.lr_decay_every = int(lr_decay_every)
        self.current_lr = self.meta_lr

    @classmethod
    def from_config(cls, cfg, model, engine):
        a = cfg.algorithm
        return cls(
            model,
            cfg.update_lr,
            cfg.update_step,
            cfg.update_step_test,
            shot=cfg.shot,
            train_way=a.train_way,
            train_query=cfg.query if a.train_query is None else a.train_query,
            head_layer=a.head_layer,
            meta_lr=cfg.meta_lr,
            lr_decay=a.lr_decay,
            lr_decay_every=a.lr_decay_every,
            engine=engine,
            meta_grad_clip=cfg.get("meta_grad_clip"),
        )

    def describe(self) -> str:
        schedule = (
            f"meta_lr x{self.lr_decay:g} every {self.lr_decay_every} iterations"
            if self.lr_decay_every and self.lr_decay != 1
            else "constant meta_lr"
        )
        return (
            f"{self.impl} protonet, squared Euclidean distance to the class means, training "
            f"episodes {self.train_way}-way {self.shot}-shot {self.train_query}-query, {schedule}"
        )

    # -- the runner's hooks ------------------------------------------------------------------------
    def replaced_names(self) -> set:
        return set(self.last_layer[0])  # the head is not part of the embedding

    def adapted_names(self, params: dict) -> list:
        return []

    def check_curve(self, steps: list[int]) -> None:
        raise MetarunError(
            f"steps={','.join(map(str, steps))}: algorithm=protonet has no inner loop, so there is "
            "no accuracy per inner step: drop steps=."
        )

    def bind_data(self, splits: dict) -> None:
        train = splits["train"]
        if self.train_way > train.num_classes:
            raise MetarunError(
                f"algorithm.train_way={self.train_way} is larger than the {train.num_classes} "
                f"classes of the train split: use algorithm.train_way<={train.num_classes}."
            )
        if self.shot + self.train_query > train.per_class:
            raise MetarunError(
                f"shot+algorithm.train_query={self.shot}+{self.train_query} is more than the "
                f"{train.per_class} images per class of the train split: use algorithm.train_query"
                f"<={train.per_class - self.shot}."
            )

    def train_sampler(self, cfg, classes, device):
        return EpisodeSampler(
            classes,
            "train",
            self.train_way,
            self.shot,
            self.train_query,
            device,
            seed=int(cfg.seed),
            rotate=bool(cfg.dataset.rotate),
        )

    def lr_at(self, iteration: int) -> float:
        """Their schedule: meta_lr * lr_decay ** (iteration // lr_decay_every) (a StepLR)."""
        if not self.lr_decay_every:
            return self.meta_lr
        return self.meta_lr * self.lr_decay ** (int(iteration) // self.lr_decay_every)

    def begin_iteration(self, iteration: int, optimizer) -> None:
        # set from the iteration alone, so a resumed run has the rate it would have had
        self.current_lr = self.lr_at(iteration)
        if optimizer is not None:
            for group in optimizer.param_groups:
                group["lr"] = self.current_lr

    def scalars(self, params: dict) -> dict:
        return {}  # no inner learning rate; the runner logs lr/meta_lr

    # -- the classifier ----------------------------------------------------------------------------
    def logits(self, params: dict, x_support, y_support, x_query, way: int) -> torch.Tensor:
        """-||f(query) - c_k||^2 [T, way*query, way] of T tasks (support x [T, S, C, H, W], labels
        [T, S] in 0..way-1; query x [T, Q, C, H, W]), support and query embedded in separate
        passes."""
        c = prototypes(self.embed(params, x_support, self.last_layer), y_support, way)
        return distance_logits(self.embed(params, x_query, self.last_layer), c)

    # -- meta-training -----------------------------------------------------------------------------
    def accumulate_meta_gradient(self, params: dict, ep: Episodes) -> StepResult:
        """Adds the gradient of the mean over tasks of the query cross-entropy to each parameter's
        .grad; returns that loss and the query accuracies. A task's way is its support size / shot
        (training episodes: train_way)."""
        way = ep.y_support.shape[1] // self.shot

        def chunk_objective(part):
            logits = self.logits(
                params, ep.x_support[part], ep.y_support[part], ep.x_query[part], way
            )
            loss, accuracy = self.query_loss(logits, ep.y_query[part])
            return loss, loss, accuracy

        return self.accumulate_objective(params, ep, chunk_objective)

    # -- evaluation --------------------------------------------------------------------------------
    def query_logits(self, params: dict, ep: Episodes, steps: int | None = None) -> torch.Tensor:
        """Query logits [T, way*query, way] (negative squared distances) of `way`-way tasks; `steps`
        is not used (no inner loop); keeps no graph."""
        frozen = {k: v.detach() for k, v in params.items()}

        def chunk_logits(part):
            with torch.no_grad():
                return self.logits(
                    frozen, ep.x_support[part], ep.y_support[part], ep.x_query[part], self.model.way
                )

        images = ep.x_support.shape[1] + ep.x_query.shape[1]
        return torch.cat(self.engine.map_chunks(chunk_logits, ep.x_support.shape[0], images))
