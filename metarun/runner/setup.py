"""Turning a config into the run's parts: device, data splits, samplers, learner, algorithm."""
from __future__ import annotations

import math

import torch

from metarun.algorithms.maml import MAML
from metarun.data.episodes import EpisodeSampler, check_episode_shape
from metarun.data.registry import load_dataset
from metarun.errors import MetarunError
from metarun.models.conv4 import build_model


def resolve_device(name: str) -> torch.device:
    name = str(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise MetarunError(f"device={name} is not a device: use auto, cpu, cuda or cuda:N.")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise MetarunError(f"device={name} but this machine has no usable CUDA: use device=cpu or device=auto.")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise MetarunError(f"device={name} but only {torch.cuda.device_count()} CUDA device(s) exist: "
                               f"use cuda:0..cuda:{torch.cuda.device_count() - 1}.")
    elif device.type != "cpu":
        raise MetarunError(f"device={name} is not supported: use auto, cpu, cuda or cuda:N.")
    return device


def check_train_settings(cfg) -> None:
    """Settings that need no data, checked before anything is loaded."""
    for key in ("way", "shot", "query", "meta_batch", "update_step", "update_step_test", "iterations",
                "eval_every", "val_tasks", "test_tasks", "log_every", "eval_chunk"):
        value = cfg[key]
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise MetarunError(f"{key}={value} must be a positive integer.")
    for key in ("update_lr", "meta_lr"):
        value = cfg[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise MetarunError(f"{key}={value} must be a positive number (the paper: update_lr=0.4 for 5-way, "
                               "0.1 for 20-way; meta_lr=0.001).")
    if not isinstance(cfg.first_order, bool):
        raise MetarunError(f"first_order={cfg.first_order} must be true or false.")


def load_splits(cfg, device) -> dict:
    """{split name: ClassImages} of the configured dataset, with the episode shape checked on each split."""
    splits, where = load_dataset(cfg.dataset)
    for name, classes in splits.items():
        check_episode_shape(classes, name, int(cfg.way), int(cfg.shot), int(cfg.query))
    have = splits["train"].channels
    channels = int(cfg.model.get("in_channels", have))
    if channels != have:
        raise MetarunError(f"model.in_channels={channels} but the {cfg.dataset.name} images have {have} channel(s): "
                           f"leave model.in_channels=${{dataset.channels}} or set it to {have}.")
    return {"splits": splits, "source": where}


def train_sampler(cfg, classes, device) -> EpisodeSampler:
    return EpisodeSampler(classes, "train", int(cfg.way), int(cfg.shot), int(cfg.query), device,
                          seed=int(cfg.seed), rotate=bool(cfg.dataset.rotate))


def build_algorithm(cfg, device) -> tuple:
    model = build_model(cfg)
    maml = MAML(model, cfg.update_lr, cfg.update_step, cfg.update_step_test, cfg.first_order,
                impl=cfg.algorithm.impl, task_chunk=cfg.algorithm.task_chunk, inner_loss=cfg.algorithm.inner_loss,
                device=device)
    return model, maml
