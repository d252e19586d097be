"""The pre-training baseline of Chen, Liu, Kira, Wang & Huang 2019, "A Closer Look at Few-shot
Classification" (Sec. 3.1; their code github.com/wyharveychen/CloserLookFewShot:
methods/baselinetrain.py, baselinefinetune.py, backbone.distLinear).

Training: ordinary mini-batch classification of single images over every meta-training class (with
dataset.rotate=true each rotation by k*90 degrees is a class of its own, as Omniglot's
augmentation): the learner's body and a classifier over all those classes, cross-entropy, Adam
(their lr 1e-3, batch 16). Evaluation, per test task: the body is frozen, its features of the
support set train a new head of `way` outputs for `finetune_epochs` epochs of mini-batches of
`finetune_batch` support images with SGD (lr 0.01, momentum 0.9, dampening 0.9, weight decay 0.001;
their set_forward_adaptation), and the head classifies the query features. `head=linear`: the
Baseline; `head=cosine`: Baseline++ (their distLinear: cosine similarity of L2-normalised features
and weight-normalised class weights, times 2 for <= 200 classes, else 10), used both in pre-training
and for the new heads.

The body is the learner without its last linear layer `head_layer` (conv4/resnet12: fc), run with
that layer set to the identity (so the learner's own forward, conv4's grouped pass included, gives
features). Meta-parameters: the body's weights and `pretrain.weight` [classes, features], plus
`pretrain.bias` (linear) or `pretrain.gain` (cosine, the weight norm's g).

Differences from their code (README): batch norm uses batch statistics (metarun's learners keep no
running statistics), so support and query features are normalised over the support and query sets;
training images are drawn independently with replacement (theirs: shuffled epochs); update_step_test
is not used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from metarun.algorithms.base import GradientMetaLearner, StepResult, head_of
from metarun.data.episodes import Episodes, SeededDraws
from metarun.errors import MetarunError

HEADS = ("linear", "cosine")


@dataclass
class ImageBatch:
    x: torch.Tensor  # float [B, C, H, W], pixel / 255
    y: torch.Tensor  # long [B]: class index (+ k * classes for a rotation by k * 90 degrees)

    def __len__(self) -> int:
        """B: the number of images."""
        return self.x.shape[0]

    def shard(self, part: slice) -> ImageBatch:
        """The images in `part` (metarun.algorithms.base.TrainingBatch). Their gradient is not
        their share of the batch's: batch norm normalises with the statistics of the whole batch
        (Pretrain.data_parallel)."""
        return ImageBatch(self.x[part], self.y[part])


class ImageSampler(SeededDraws):
    """Mini-batches of `batch_size` labelled images drawn uniformly from all images of a split, each
    rotated by a random multiple of 90 degrees when rotate=true (a new class per rotation). Its
    state is the device-independent draw counter of SeededDraws (checkpointed)."""

    def __init__(self, classes, batch_size: int, device, seed: int, rotate: bool):
        self.device = torch.device(device)
        self.images = classes.images.to(self.device)
        self.labels = torch.repeat_interleave(
            torch.arange(classes.num_classes), classes.counts.cpu()
        ).to(self.device)
        self.num_classes, self.batch_size, self.rotate = (
            classes.num_classes,
            int(batch_size),
            bool(rotate),
        )
        if self.rotate and self.images.shape[-1] != self.images.shape[-2]:
            raise MetarunError("dataset.rotate=true needs square images: set dataset.rotate=false.")
        side = self.images.shape[-1]
        grid = torch.arange(side * side).view(side, side)
        self.rotations = torch.stack(
            [torch.rot90(grid, k, dims=(0, 1)).reshape(-1) for k in range(4)]
        ).to(self.device)
        super().__init__(seed, self.device)

    def sample(self, meta_batch: int | None = None) -> ImageBatch:
        g, B = self.next_generator(), self.batch_size
        idx = torch.randint(0, self.images.shape[0], (B,), generator=g, device=self.device)
        x, y = self.images[idx], self.labels[idx]
        if self.rotate:
            turns = torch.randint(0, 4, (B,), generator=g, device=self.device)
            C, H, W = x.shape[1:]
            x = (
                x.reshape(B, C, H * W)
                .gather(2, self.rotations[turns][:, None, :].expand(B, C, -1))
                .view(B, C, H, W)
            )
            y = y + turns * self.num_classes
        return ImageBatch(x.float().div_(255.0), y)


def cosine_scores(features: torch.Tensor, weight: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
    """Their distLinear: features [..., N, F], weight [..., K, F], gain [..., K] -> scale * cos
    [..., N, K]; the class weights are weight-normalised (gain * v / ||v||), the features divided by
    (||x|| + 1e-5)."""
    scale = 2.0 if weight.shape[-2] <= 200 else 10.0
    x = features / (features.norm(dim=-1, keepdim=True) + 1e-5)
    w = gain.unsqueeze(-1) * weight / weight.norm(dim=-1, keepdim=True)
    return scale * x @ w.transpose(-1, -2)


class Pretrain(GradientMetaLearner):
    """Baseline / Baseline++ (see the module docstring).

    Args: model, head (linear | cosine), head_layer (the learner's last linear layer, e.g. fc),
    batch_size (images per training iteration), num_classes (None: set by bind_data from the train
    split), rotate, finetune_epochs / finetune_batch / finetune_lr / finetune_momentum /
    finetune_dampening / finetune_weight_decay (their test-time recipe), eval_seed (the new heads'
    initialisation and batch order), seed (the classifier's initialisation), and
    GradientMetaLearner's update_lr / steps (not used). Raises MetarunError for bad settings.
    """

    name = "pretrain"
    family_refusal = (
        "it trains a classifier over the training classes; the regression baseline is "
        "algorithm=joint"
    )
    data_parallel = (
        "its training batch of algorithm.batch_size images is one batch-norm batch (the learner "
        "normalises with the statistics of all of its images), so a share of it per process "
        "would change the gradient"
    )

    def __init__(
        self,
        model,
        update_lr=0.01,
        update_step=1,
        update_step_test=1,
        *,
        head="linear",
        head_layer="fc",
        batch_size=16,
        num_classes=None,
        rotate=False,
        finetune_epochs=100,
        finetune_batch=4,
        finetune_lr=0.01,
        finetune_momentum=0.9,
        finetune_dampening=0.9,
        finetune_weight_decay=0.001,
        eval_seed=0,
        seed=0,
        **kw,
    ):
        super().__init__(model, update_lr, update_step, update_step_test, True, **kw)
        if head not in HEADS:
            raise MetarunError(
                f"unknown algorithm.head={head!r}: use linear (Baseline) or cosine (Baseline++)."
            )
        for name, value in (
            ("batch_size", batch_size),
            ("finetune_epochs", finetune_epochs),
            ("finetune_batch", finetune_batch),
        ):
            if int(value) <= 0:
                raise MetarunError(
                    f"algorithm.{name}={value} must be a positive integer (theirs: batch_size=16, "
                    "finetune_epochs=100, finetune_batch=4)."
                )
        if not float(finetune_lr) > 0:
            raise MetarunError(
                f"algorithm.finetune_lr={finetune_lr} must be positive (theirs: 0.01)."
            )
        self.head, self.head_layer, self.batch_size, self.rotate = (
            head,
            str(head_layer),
            int(batch_size),
            bool(rotate),
        )
        self.num_classes = None if num_classes is None else int(num_classes)
        self.finetune = dict(
            epochs=int(finetune_epochs),
            batch=int(finetune_batch),
            lr=float(finetune_lr),
            momentum=float(finetune_momentum),
            dampening=float(finetune_dampening),
            weight_decay=float(finetune_weight_decay),
        )
        self.eval_seed, self.seed = int(eval_seed), int(seed)
        self.last_layer = head_of(self.model, self.head_layer)
        self.head_names, self.features = self.last_layer

    @classmethod
    def from_config(cls, cfg, model, engine):
        a = cfg.algorithm
        return cls(
            model,
            cfg.update_lr,
            cfg.update_step,
            cfg.update_step_test,
            head=a.head,
            head_layer=a.head_layer,
            batch_size=a.batch_size,
            num_classes=a.num_classes,
            rotate=cfg.dataset.rotate,
            finetune_epochs=a.finetune_epochs,
            finetune_batch=a.finetune_batch,
            finetune_lr=a.finetune_lr,
            finetune_momentum=a.finetune_momentum,
            finetune_dampening=a.finetune_dampening,
            finetune_weight_decay=a.finetune_weight_decay,
            eval_seed=cfg.eval_seed,
            seed=cfg.seed,
            engine=engine,
            meta_grad_clip=cfg.get("meta_grad_clip"),
        )

    def describe(self) -> str:
        return (
            f"pretrain ({'Baseline++, cosine' if self.head == 'cosine' else 'Baseline, linear'} "
            "head, "
            f"{self.num_classes} classes), new head per task: {self.finetune['epochs']} epochs of "
            "SGD"
        )

    # -- the runner's hooks ------------------------------------------------------------------------
    def bind_data(self, splits: dict) -> None:
        classes = splits["train"].num_classes * (4 if self.rotate else 1)
        if self.num_classes is not None and self.num_classes != classes:
            raise MetarunError(
                f"algorithm.num_classes={self.num_classes} but the train split has {classes} "
                f"classes{' (with rotations)' if self.rotate else ''}: set "
                "algorithm.num_classes=null."
            )
        self.num_classes = classes

    def train_unit(self, cfg) -> tuple[int, str]:
        return self.batch_size, "images"  # meta_batch is not used: speed is images per second

    def train_sampler(self, cfg, classes, device):
        return ImageSampler(classes, self.batch_size, device, int(cfg.seed), self.rotate)

    def bench_batch(self, ep: Episodes, generator: torch.Generator) -> ImageBatch:
        x = torch.cat([ep.x_support, ep.x_query], 1).flatten(0, 1)[: self.batch_size]
        y = torch.randint(0, self.num_classes, (x.shape[0],), generator=generator).to(x.device)
        return ImageBatch(x, y)

    def replaced_names(self) -> set:
        return set(self.head_names)

    def extra_params(self, dtype, device) -> dict:
        if self.num_classes is None:
            raise MetarunError(
                "the pre-training baseline's classifier size is unknown before the data loads: set "
                "algorithm.num_classes (the train split's classes, x4 with dataset.rotate=true)."
            )
        # torch's nn.Linear initialisation, from a local generator
        g = torch.Generator().manual_seed(self.seed + 1)
        bound = 1.0 / math.sqrt(self.features)
        weight = (
            torch.rand(self.num_classes, self.features, generator=g, dtype=torch.float64) * 2 - 1
        ) * bound
        extra = {"pretrain.weight": weight}
        if self.head == "linear":
            extra["pretrain.bias"] = (
                torch.rand(self.num_classes, generator=g, dtype=torch.float64) * 2 - 1
            ) * bound
        else:
            extra["pretrain.gain"] = weight.norm(dim=1)  # weight norm starts at the weight itself
        return {k: v.to(dtype=dtype, device=device) for k, v in extra.items()}

    def adapted_names(self, params: dict) -> list:
        return []

    # -- features and heads ------------------------------------------------------------------------
    def body_features(self, params: dict, x: torch.Tensor) -> torch.Tensor:
        """x [T, N, C, H, W] -> features [T, N, F]: the learner without its head (base embed)."""
        return self.embed(params, x, self.last_layer)

    def scores(self, features, weight, second) -> torch.Tensor:
        """features [..., N, F] and a head (weight [..., K, F], bias or gain [..., K]) -> logits
        [..., N, K]."""
        if self.head == "cosine":
            return cosine_scores(features, weight, second)
        return features @ weight.transpose(-1, -2) + second.unsqueeze(-2)

    # -- training ----------------------------------------------------------------------------------
    def accumulate_meta_gradient(self, params: dict, batch: ImageBatch) -> StepResult:
        """Adds the gradient of the mean cross-entropy of the batch over all training classes to
        each parameter's .grad; returns that loss and the batch's accuracy (as a one-element
        tensor)."""
        features = self.body_features(params, batch.x.unsqueeze(0))[0]
        second = params["pretrain.gain" if self.head == "cosine" else "pretrain.bias"]
        logits = self.scores(features, params["pretrain.weight"], second)
        loss = F.cross_entropy(logits, batch.y)
        leaves = list(params.values())
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        for p, g in zip(leaves, grads, strict=True):
            g = torch.zeros_like(p) if g is None else g
            p.grad = g if p.grad is None else p.grad + g
        accuracy = (logits.detach().argmax(-1) == batch.y).to(logits.dtype).mean()
        return StepResult(loss.detach(), accuracy.view(1))

    # -- evaluation --------------------------------------------------------------------------------
    def fit_heads(
        self, support: torch.Tensor, y: torch.Tensor, way: int, generator: torch.Generator
    ):
        """Their set_forward_adaptation for T tasks at once: support features [T, S, F], labels [T,
        S] -> each task's new head (weight [T, way, F], bias or gain [T, way]). Each task's loss is
        its own mean cross-entropy; summing them keeps the tasks' gradients, and SGD's update is
        elementwise, so this is T independent fine-tunings."""
        tasks, shots, feats = support.shape
        dtype, device = support.dtype, support.device
        bound = 1.0 / math.sqrt(feats)
        weight = (
            torch.rand(tasks, way, feats, generator=generator, dtype=torch.float64) * 2 - 1
        ) * bound
        if self.head == "linear":
            second = (
                torch.rand(tasks, way, generator=generator, dtype=torch.float64) * 2 - 1
            ) * bound
        else:
            second = weight.norm(dim=-1)
        weight = weight.to(dtype=dtype, device=device).requires_grad_(True)
        second = second.to(dtype=dtype, device=device).requires_grad_(True)
        ft = self.finetune
        opt = torch.optim.SGD(
            [weight, second],
            lr=ft["lr"],
            momentum=ft["momentum"],
            dampening=ft["dampening"],
            weight_decay=ft["weight_decay"],
        )
        rows = torch.arange(tasks, device=device).unsqueeze(1)
        with torch.enable_grad():
            for _ in range(ft["epochs"]):
                perm = torch.rand(tasks, shots, generator=generator).argsort(-1).to(device)
                for i in range(0, shots, ft["batch"]):
                    idx = perm[:, i : i + ft["batch"]]
                    xb, yb = support[rows, idx], y[rows, idx]
                    logits = self.scores(xb, weight, second)
                    ce = F.cross_entropy(logits.flatten(0, 1), yb.flatten(), reduction="none").view(
                        yb.shape
                    )
                    opt.zero_grad(set_to_none=True)
                    ce.mean(1).sum().backward()
                    opt.step()
        return weight.detach(), second.detach()

    def query_logits(self, params: dict, ep: Episodes, steps: int | None = None) -> torch.Tensor:
        """A new head per task on the frozen features of its support set, then the query logits
        [T, way*query, way]. Deterministic: the heads' initialisation and batch order come from
        eval_seed."""
        way = self.model.way
        frozen = {k: v.detach() for k, v in params.items()}

        def chunk_logits(part):
            with torch.no_grad():
                support = self.body_features(frozen, ep.x_support[part])
                query = self.body_features(frozen, ep.x_query[part])
            g = torch.Generator().manual_seed(self.eval_seed + part.start)
            weight, second = self.fit_heads(support, ep.y_support[part], way, g)
            with torch.no_grad():
                return self.scores(query, weight, second)

        images = ep.x_support.shape[1] + ep.x_query.shape[1]
        return torch.cat(self.engine.map_chunks(chunk_logits, ep.x_support.shape[0], images))
