"""MAML on Omniglot from your own code: metarun's data, sampler, learner, MAML."""

import tempfile

import torch
from omegaconf import OmegaConf

from metarun.algorithms.base import meta_train_step
from metarun.algorithms.maml import MAML
from metarun.data.episodes import EpisodeSampler, fixed_tasks
from metarun.data.registry import load_dataset
from metarun.models.conv4 import Conv4

# The Omniglot copy inside metarun (no download); its decoded cache (24 MiB) goes
# to a temporary folder.
cache = tempfile.mkdtemp()
dataset = OmegaConf.create(
    {
        "name": "omniglot", "root": cache, "source": "embedded",
        "download": False, "cache_dir": cache, "image_size": 28,
        "resize": "lanczos", "channels": 1, "split": "maml",
        "split_sizes": [1100, 100], "split_seed": 1, "lake_val_alphabets": 5,
    }
)  # fmt: skip
splits, where = load_dataset(dataset)  # {"train" | "val" | "test": ClassImages}
print(where, {name: classes.num_classes for name, classes in splits.items()})

# The MAML paper's 5-way 1-shot learner and inner loop (meta-batch 8, for speed).
model = Conv4(way=5, in_channels=1, filters=64, image_size=28)
maml = MAML(model, update_lr=0.4, update_step=1, update_step_test=3, impl="batched")
init = maml.init_meta_params(torch.Generator().manual_seed(0))
params = {name: weight.requires_grad_(True) for name, weight in init.items()}
optimizer = maml.make_optimizer(list(params.values()), meta_lr=0.001)  # Adam

# Training tasks as `metarun train` draws them: 5 classes, 1 support and 1 query
# image of each, each class rotated by a multiple of 90 degrees.
sampler = EpisodeSampler(
    splits["train"], "train", way=5, shot=1, query=1, device="cpu", seed=0,
    rotate=True,
)  # fmt: skip
for iteration in range(1, 301):
    episodes = sampler.sample(meta_batch=8)  # x_support [8, 5, 1, 28, 28], ...
    result = meta_train_step(maml, params, optimizer, episodes)
    if iteration % 100 == 0:
        loss, accuracy = result.meta_loss.item(), result.accuracy.mean().item()
        print(f"iteration {iteration}: meta-loss {loss:.3f}, acc. {accuracy:.1%}")

# 200 fixed validation tasks (the same for every run with eval_seed 1234), each
# scored after 3 inner steps.
tasks = fixed_tasks(splits["val"], "val", 5, 1, 1, "cpu", 200, seed=1234, chunk=50)
accuracy = torch.cat([maml.evaluate(params, episodes) for episodes in tasks])
print(f"validation accuracy {accuracy.mean():.1%} on {len(accuracy)} tasks")
