"""Any torch.nn.Module as a metarun learner: a model config with a Hydra `_target_`
(conf/model/resnet12.yaml).

`ModuleLearner` gives a module the learner interface of models/conv4.py (init_params, forward over a
leading task dimension) by running it once per task with torch.func.functional_call on that task's
weights. conv4 (no `_target_`) keeps its grouped whole-meta-batch pass.

Batch norm: the inner loop adapts on the support set with batch statistics (the MAML paper's code),
so every normalisation layer must be in training mode and keep no running statistics
(track_running_stats=False): running statistics would be changed by every forward pass of every task
(and by several engine threads at once) and used at evaluation. Such a module is refused.
"""

from __future__ import annotations

import copy
import threading

import torch
import torch.nn as nn
from torch.func import functional_call

from metarun.errors import MetarunError


def _first_line(exc: Exception) -> str:
    """The root cause of an exception in one line (Hydra wraps import and argument errors: its own
    message ends with `full_key: model`, the cause is in __cause__)."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    text = [
        line
        for line in str(exc).strip().splitlines()
        if line.strip() and not line.startswith("full_key:")
    ]
    return f"{type(exc).__name__}: {text[0] if text else ''}"


class ModuleLearner:
    """A module built by `factory()` (called with the global RNG forked and seeded, so building it
    changes no process-wide state), run per task with functional_call.

    Args: factory (-> nn.Module whose forward maps [N, C, H, W] to logits [N, way]), way,
    in_channels, image_size (for the output check), target (its name in messages).
    Raises MetarunError if the factory fails, returns no Module, has batch norm that keeps running
    statistics or is not in training mode, or does not return [N, way] logits.
    """

    def __init__(
        self, factory, way: int, in_channels: int, image_size: int, target: str = "model._target_"
    ):
        self.factory, self.way, self.target = factory, int(way), target
        self.in_channels, self.image_size = int(in_channels), int(image_size)
        self.module = self._build(0)
        self._local = threading.local()
        names = [n for n, _ in self.module.named_parameters()]
        if not names:
            raise MetarunError(
                f"model._target_={target} has no parameters to learn: use a module with weights."
            )
        probe = torch.rand(
            2 * self.way,
            self.in_channels,
            self.image_size,
            self.image_size,
            generator=torch.Generator().manual_seed(0),
        )
        try:
            with torch.no_grad():
                out = self.module(probe)
        except Exception as exc:
            raise MetarunError(
                f"model._target_={target} fails on a batch of {tuple(probe.shape)} images "
                f"({_first_line(exc)}): make it accept [N, dataset.channels, dataset.image_size, "
                "dataset.image_size] inputs."
            ) from exc
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2 * self.way, self.way):
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise MetarunError(
                f"model._target_={target} returns {shape} for {2 * self.way} images, not "
                f"[{2 * self.way}, way={self.way}] logits: give its last layer way outputs "
                "(e.g. way: ${way} in the model config)."
            )

    def _build(self, seed: int) -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            try:
                module = self.factory()
            except MetarunError:
                raise
            except Exception as exc:
                raise MetarunError(
                    f"model._target_={self.target} could not be built ({_first_line(exc)}): check "
                    "the import path (package.module.Class) and the model's settings."
                ) from exc
        if not isinstance(module, nn.Module):
            raise MetarunError(
                f"model._target_={self.target} built a {type(module).__name__}, not a "
                "torch.nn.Module: point it at a Module class or a function returning one."
            )
        module.train()
        for name, m in module.named_modules():
            if isinstance(m, nn.modules.batchnorm._NormBase):
                if not m.training:
                    raise MetarunError(
                        f"model._target_={self.target}: {name} ({type(m).__name__}) stays in eval "
                        "mode "
                        "after .train(), so it would not use batch statistics: let it follow "
                        ".train()."
                    )
                if m.track_running_stats:
                    raise MetarunError(
                        f"model._target_={self.target}: {name} ({type(m).__name__}) keeps running "
                        "statistics, which every task's forward pass would change: build it with "
                        "track_running_stats=False (metarun adapts with batch statistics)."
                    )
        return module

    def init_params(
        self, generator: torch.Generator | None = None, dtype=torch.float32, device="cpu"
    ) -> dict:
        """The module's own initialisation, seeded from `generator` (a local generator; None: seed
        0)."""
        seed = 0 if generator is None else int(torch.randint(0, 2**62, (1,), generator=generator))
        module = self._build(seed)
        return {
            k: v.detach().clone().to(dtype=dtype, device=device)
            for k, v in module.named_parameters()
        }

    def _thread_module(self, device) -> nn.Module:
        # functional_call swaps the module's attributes while it runs: one copy per engine thread.
        module = getattr(self._local, "module", None)
        if module is None:
            module = self._local.module = copy.deepcopy(self.module)
        return module.to(device)

    def forward(self, params: dict, x: torch.Tensor) -> torch.Tensor:
        """params: {name: [T, *shape]}; x: [T, N, C, H, W] -> logits [T, N, way], one
        functional_call per task."""
        module = self._thread_module(x.device)
        return torch.stack(
            [
                functional_call(module, {k: v[t] for k, v in params.items()}, (x[t],))
                for t in range(x.shape[0])
            ]
        )


def build_learner(cfg):
    """conv4 (models/conv4.py) or mlp (models/mlp.py, model=mlp) unless cfg.model has a `_target_`,
    which builds any nn.Module."""
    if "_target_" not in cfg.model and cfg.model.get("name") == "mlp":
        from metarun.models.mlp import build_model as build_mlp

        return build_mlp(cfg)
    if "_target_" not in cfg.model:
        from metarun.models.conv4 import build_model

        return build_model(cfg)
    from hydra.utils import instantiate

    target = str(cfg.model._target_)
    model_cfg = cfg.model
    return ModuleLearner(
        lambda: instantiate(model_cfg, _convert_="all"),
        int(cfg.way),
        int(cfg.model.get("in_channels", cfg.dataset.channels)),
        int(cfg.dataset.image_size),
        target,
    )
