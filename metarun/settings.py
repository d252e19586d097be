"""Every setting of `metarun train` and `metarun eval`, declared once, with what it is.

Each `Setting` of SETTINGS says what a setting is: its type (with a range or choices), a one-line
description, and whether it may change when a run is resumed, is a path (`~` means the home
folder), is shown in `metarun report` tables (not: settings that only say where or how fast a run
ran, how many tasks estimated its score, and the seed, which the report aggregates over), and is
a TensorBoard hparam. What the rest of metarun needs is derived from the table: `resumable()`
(runner/resume.py's RESUMABLE), `ignored()` (report.py's IGNORED), `hparams()` (runner/train.py's
HPARAM_KEYS), `paths()` (cli.py's PATH_SETTINGS), `validate(cfg, command)` (the checks of
runner/setup.py and runner/evaluate_checkpoint.py), `help_text(command)` (`metarun <command>
--help`) and `settings_markdown(command)` (the docs' configuration page).

Defaults live in ONE place: the YAML files in conf/ (train.yaml, eval.yaml, one file per option
of the algorithm/, dataset/ and model/ groups), which stay Hydra's presets; this module reads
them for the help and the docs. tests/test_settings.py checks that every key of every YAML file
is declared here and that every setting declared here is in the YAML file of each option that
holds it.

Why a table that checks the composed config, and not Hydra structured configs (dataclasses in
Hydra's ConfigStore, validated by OmegaConf while Hydra composes):
- The options of a group have different keys (MAML++'s 11 switches, Reptile's 11 settings, the
  baseline's 10) and different defaults for the same key (algorithm.inner_loss: sum_over_shot for
  MAML, mean for MAML++): one dataclass per option, named in each YAML file's defaults list, with
  every default written twice (dataclass and YAML) or moved out of the YAML files users read and
  copy.
- A `model._target_` learner takes its own arguments (conf/model/resnet12.yaml): its node must
  stay an untyped dict, so the model group would get no checking from a schema anyway.
- OmegaConf's errors come from inside Hydra's composition: `way=five` would reach cli.py as
  Hydra's "Error merging override" around OmegaConf's multi-line ValidationError, to be rewritten
  into one line with regular expressions on its text (what issue 21 asks cli.py to do less of);
  and OmegaConf turns `first_order=yes` into true, where metarun refuses it.
- The properties (resumable, path, report, hparam) and ranges (way >= 2) are no OmegaConf
  feature: they would be dataclass field metadata, read by code like this module's.
- Configs saved in checkpoints are plain dicts that may lack newer keys or hold keys a later
  version dropped; merged into a structured config, a dropped key is an error.

Settings of the algorithm/, dataset/ and model/ groups are checked for their type only: their
ranges and choices are checked, with their own messages, by the code that uses them (they need the
run's other settings or its data). A model with a `_target_` (any torch.nn.Module) is its class's
business.
"""

from __future__ import annotations

import functools
import math
import textwrap
from dataclasses import dataclass
from pathlib import Path

from metarun.errors import MetarunError

GROUPS = ("algorithm", "dataset", "model")  # config groups whose options hold group settings
KINDS = ("int", "float", "bool", "str", "path", "list", "any")


@dataclass(frozen=True)
class Setting:
    """One setting.

    name: dotted key (`way`, `algorithm.impl`). spec: its type as the help shows it, one of KINDS
    (`path`: text in which `~` is expanded), `int >= N`, `float > 0`, or choices `a | b`; each
    may end in ` or null`. help: one line. commands: the commands that have it. options: the
    options of its group that hold it (empty: every option, or not a group setting). resumable:
    may change on resume. report: shown in `metarun report` tables. hparam: a TensorBoard hparam.
    refusal: the error text, a str.format template with `key` and `value` (default: built from
    the spec)."""

    name: str
    spec: str
    help: str
    commands: tuple[str, ...] = ("train",)
    options: tuple[str, ...] = ()
    resumable: bool = False
    report: bool = True
    hparam: bool = False
    refusal: str = ""

    @property
    def nullable(self) -> bool:
        return self.spec.endswith(" or null")

    @property
    def _base(self) -> str:
        return self.spec.removesuffix(" or null")

    @property
    def kind(self) -> str:
        """One of KINDS (choices are `str`)."""
        head = self._base.split(" ", 1)[0]
        return head if head in KINDS else "str"

    @property
    def minimum(self) -> int | None:
        """int >= N: N."""
        return int(self._base.split(">=")[1]) if self._base.startswith("int >=") else None

    @property
    def positive(self) -> bool:
        return self._base == "float > 0"

    @property
    def choices(self) -> tuple[str, ...]:
        base = self._base
        return () if base.split(" ", 1)[0] in KINDS else tuple(base.split(" | "))

    @property
    def path(self) -> bool:
        return self.kind == "path"

    @property
    def group(self) -> str | None:
        """The config group it belongs to (algorithm, dataset, model), or None."""
        head = self.name.split(".", 1)[0]
        return head if "." in self.name and head in GROUPS else None


S = Setting


def _eval(name: str, spec: str, help: str, **properties) -> Setting:
    return Setting(name, spec, help, commands=("eval",), **properties)


_LR = " (the paper: update_lr=0.4 for 5-way, 0.1 for 20-way; meta_lr=0.001)."
_MAMLPP, _PRETRAIN, _REPTILE = ("mamlpp",), ("pretrain",), ("reptile",)
_OMNIGLOT, _CONV4, _RESNET12 = ("omniglot",), ("conv4",), ("resnet12",)
_MLP, _SINUSOID, _PROTONET = ("mlp",), ("sinusoid",), ("protonet",)
# The image datasets and learners (the sinusoid and the MLP have no images, channels, roots).
_IMAGES = ("cifar_fs", "fc100", "folder", "miniimagenet", "omniglot")
_IMAGE_MODELS = ("conv4", "resnet12")

# The table, in the order of the YAML files (the order of --help and of the docs' page). Kept out of
# the formatter: one setting a line or two reads as a table; one argument a line would not.
# fmt: off
SETTINGS: tuple[Setting, ...] = (
    # conf/train.yaml
    S("way", "int >= 2", "N: classes per task", hparam=True,
      refusal="{key}={value} must be a positive integer of at least 2: a task needs 2 classes or "
      "more to tell apart."),
    S("shot", "int >= 1", "K: support images per class", hparam=True),
    S("query", "int >= 1", "query images per class (cbfinn/maml: 1; more: tighter estimates)",
      hparam=True),
    S("query_test", "int >= 1 or null",
      "query images per class of validation/test tasks (null: query; cbfinn/maml miniImageNet: K)"),
    S("meta_batch", "int >= 1", "tasks per meta-update", hparam=True),
    S("update_step", "int >= 1", "inner SGD steps while meta-training", hparam=True),
    S("update_step_test", "int >= 1", "inner SGD steps at validation/test (the paper: 3 for 5-way)",
      hparam=True),
    S("update_lr", "float > 0", "inner step size alpha", hparam=True,
      refusal="{key}={value} must be a positive number" + _LR),
    S("meta_lr", "float > 0", "outer (Adam) step size beta", hparam=True,
      refusal="{key}={value} must be a positive number" + _LR),
    S("meta_grad_clip", "float > 0 or null",
      "clip each meta-gradient element to [-c, c] (cbfinn/maml miniImageNet: 10; null: none)"),
    S("iterations", "int >= 1", "meta-iterations: the run's length", resumable=True, hparam=True),
    S("schedule_iterations", "int >= 1 or null",
      "the length schedules anneal over (null: iterations; a resume that changes iterations pins "
      "it to the run's first length)"),
    S("time_limit", "float > 0 or null",
      "minutes: end training earlier (last validation, test, results.json); resume continues it",
      resumable=True,
      refusal="{key}={value} must be a positive number of minutes (or null: no limit)."),
    S("first_order", "bool", "first-order MAML: no second-order terms, no second-order graph",
      hparam=True),
    S("device", "str", "auto | cpu | cuda | cuda:N", resumable=True, report=False),
    S("threads", "int >= 0",
      "CPU threads of the run (0: all cores); algorithm.impl=parallel: this many 1-thread workers",
      resumable=True, report=False,
      refusal="{key}={value} must be an integer >= 0 (0: all cores)."),
    S("cpu_allocator", "tuned | system",
      "tuned: glibc malloc keeps freed memory for reuse (faster per-task graphs) | system: glibc's",
      resumable=True, report=False,
      refusal="{key}={value} is not a setting: use tuned (keep freed memory for reuse) or system "
      "(the C library's defaults)."),
    S("tf32", "bool", "CUDA: TensorFloat-32 matmuls and convolutions (faster, ~1e-3 relative)",
      resumable=True),
    S("autocast", "none | bf16", "CUDA: bfloat16 autocast of the learner's passes", resumable=True,
      refusal="{key}={value} is not a setting: use none or bf16 (CUDA)."),
    S("seed", "int", "initial weights and training tasks (reports average over seeds)",
      report=False, hparam=True),
    S("eval_every", "int >= 1", "validate (and checkpoint) every this many iterations",
      resumable=True),
    S("val_tasks", "int >= 1", "fixed validation tasks", resumable=True, report=False),
    S("test_tasks", "int >= 1", "fixed test tasks scored with the best checkpoint at the end",
      resumable=True, report=False),
    S("keep_best", "int >= 1", "keep the checkpoints of the K best validations (eval ensemble=K)",
      resumable=True, report=False),
    S("eval_seed", "int", "seed of the fixed validation/test tasks, the same for every run"),
    S("eval_chunk", "int >= 1", "tasks per evaluation pass (memory only)", resumable=True,
      report=False),
    S("log_every", "int >= 1", "host sync + tqdm/TensorBoard scalars every this many iterations",
      resumable=True, report=False),
    S("resume", "path or null",
      "checkpoint (or run dir) to continue; auto: hydra.run.dir's run if it has a last.pt",
      report=False),
    # conf/algorithm/*.yaml
    S("algorithm.name", "str", "the algorithm (algorithm=NAME chooses the option)"),
    S("algorithm.impl", "str",
      "auto | batched | loop | parallel (auto: timed on CUDA, parallel on a multi-core CPU)",
      resumable=True, report=False),
    S("algorithm.task_chunk", "int",
      "n tasks per pass: the same gradient, less memory (0: the whole meta-batch for batched, "
      "~160 images a pass for parallel; loop: always 1)",
      resumable=True, report=False),
    S("algorithm.inner_loss", "str", "the support loss: sum_over_shot (cbfinn/maml's) | mean"),
    S("algorithm.head_layer", "str", "the learner's last layer (weights <name>.weight, .bias)",
      options=("anil", "pretrain", "protonet", "protomaml")),
    S("algorithm.train_way", "int >= 2 or null",
      "classes of a training episode (Snell et al. Omniglot: 60; null: way)", options=_PROTONET),
    S("algorithm.train_query", "int >= 1 or null",
      "query images per class of a training episode (Omniglot: 5; null: query)",
      options=_PROTONET),
    S("algorithm.lr_decay", "float > 0", "meta_lr is multiplied by this ...", options=_PROTONET),
    S("algorithm.lr_decay_every", "int >= 0",
      "... every this many iterations (theirs: 2,000 episodes; 0: constant)", options=_PROTONET),
    S("algorithm.iterations_per_epoch", "int", "an epoch (their total_iter_per_epoch)",
      options=_MAMLPP),
    S("algorithm.msl", "bool", "multi-step loss, per-step weights annealed over msl_epochs",
      options=_MAMLPP),
    S("algorithm.fit_schedule", "bool",
      "a run too short for msl_epochs / first_order_epochs: shorter epochs, one warning",
      options=_MAMLPP),
    S("algorithm.msl_epochs", "int", "epochs of the multi-step loss's annealing", options=_MAMLPP),
    S("algorithm.first_order_epochs", "int", "first order while epoch < this (derivative order)",
      options=_MAMLPP),
    S("algorithm.bnwb", "bool", "per-step batch-norm weights and biases", options=_MAMLPP),
    S("algorithm.bnrs", "bool", "per-step running statistics (their outputs never use them): false",
      options=_MAMLPP),
    S("algorithm.lslr", "bool", "learned per-layer per-step inner rates, from update_lr",
      options=_MAMLPP),
    S("algorithm.cosine_annealing", "bool", "meta learning rate: cosine down to min_meta_lr",
      options=_MAMLPP),
    S("algorithm.min_meta_lr", "float", "the cosine's end (their min_learning_rate)",
      options=_MAMLPP),
    S("algorithm.cosine_epochs", "int or null", "the cosine's epochs (null: the run's)",
      options=_MAMLPP),
    S("algorithm.inner_bn", "bool", "adapt batch-norm weights in the inner loop (MAML: true)",
      options=_MAMLPP),
    S("algorithm.alpha_init_low", "float", "learned inner rates start uniform in [low, high]",
      options=("metasgd",)),
    S("algorithm.alpha_init_high", "float", "... (low = high: a constant)", options=("metasgd",)),
    S("algorithm.head", "str", "linear: Baseline | cosine: Baseline++", options=_PRETRAIN),
    S("algorithm.batch_size", "int", "images per training iteration", options=_PRETRAIN),
    S("algorithm.num_classes", "int or null",
      "classifier size (null: the train split's classes, x4 with dataset.rotate)",
      options=_PRETRAIN),
    S("algorithm.finetune_epochs", "int", "test-time head: epochs over the support set",
      options=_PRETRAIN),
    S("algorithm.finetune_batch", "int", "test-time head: mini-batch size", options=_PRETRAIN),
    S("algorithm.finetune_lr", "float", "test-time head: SGD learning rate", options=_PRETRAIN),
    S("algorithm.finetune_momentum", "float", "test-time head: SGD momentum", options=_PRETRAIN),
    S("algorithm.finetune_dampening", "float", "test-time head: SGD dampening", options=_PRETRAIN),
    S("algorithm.finetune_weight_decay", "float", "test-time head: SGD weight decay",
      options=_PRETRAIN),
    S("algorithm.train_shots", "int or null", "images per class of a training task (null: shot)",
      options=_REPTILE),
    S("algorithm.inner_batch", "int", "images per inner step", options=_REPTILE),
    S("algorithm.inner_optimizer", "str", "adam (theirs, beta1=0) | sgd", options=_REPTILE),
    S("algorithm.inner_state", "str",
      "per_task: a fresh inner Adam per task | shared: one for the run, tasks in order (theirs)",
      options=_REPTILE),
    S("algorithm.adam_beta1", "float", "the inner Adam's beta1", options=_REPTILE),
    S("algorithm.adam_beta2", "float", "the inner Adam's beta2", options=_REPTILE),
    S("algorithm.adam_eps", "float", "the inner Adam's eps", options=_REPTILE),
    S("algorithm.meta_step", "float", "outer step size eps at iteration 0 ...", options=_REPTILE),
    S("algorithm.meta_step_final", "float", "... annealed linearly to this at the end",
      options=_REPTILE),
    S("algorithm.meta_step_iterations", "int or null", "the annealing's length (null: the run's)",
      options=_REPTILE),
    S("algorithm.eval_inner_batch", "int",
      "support images per fine-tuning step at evaluation (0: the whole support set)",
      options=_REPTILE),
    S("algorithm.transductive", "bool", "classify the whole query set in one batch",
      options=_REPTILE),
    # conf/dataset/*.yaml
    S("dataset.name", "str", "the dataset (dataset=NAME chooses the option)"),
    S("dataset.root", "path or null",
      "the dataset's folder (omniglot: $METARUN_DATA, else ./data; folder: required)",
      options=_IMAGES, resumable=True, report=False),
    S("dataset.source", "str",
      "auto: archives in root if there, else the copy inside metarun | archives | embedded",
      options=_OMNIGLOT, report=False),
    S("dataset.download", "bool", "fetch the public files when root has none",
      options=("cifar_fs", "fc100", "omniglot"), resumable=True, report=False),
    S("dataset.cache_dir", "path or null", "decoded images (null: root if writable, else ~/.cache)",
      options=_IMAGES, resumable=True, report=False),
    S("dataset.image_size", "int", "images are resized to image_size x image_size",
      options=_IMAGES),
    S("dataset.resize", "str", "lanczos: grey levels | nearest: binary (cbfinn's resize)",
      options=_OMNIGLOT),
    S("dataset.channels", "int", "3: RGB, 1: grayscale (model.in_channels follows it)",
      options=_IMAGES),
    S("dataset.split", "str", "maml: shuffled characters | lake: background/evaluation alphabets",
      options=_OMNIGLOT),
    S("dataset.split_sizes", "list", "split=maml: train and validation characters (the rest: test)",
      options=_OMNIGLOT),
    S("dataset.split_seed", "int", "the character shuffle (maml), the validation alphabets (lake)",
      options=_OMNIGLOT),
    S("dataset.lake_val_alphabets", "int", "split=lake: background alphabets held out to validate",
      options=_OMNIGLOT),
    S("dataset.rotate", "bool", "rotate each class of a training task by a multiple of 90 degrees",
      options=_IMAGES),
    S("dataset.rotate_eval", "bool", "rotate the classes of validation/test tasks too",
      options=_OMNIGLOT),
    *(S(f"dataset.split_files.{split}", "path or null",
        f"the {split} split's class folders, one a line (null: root/{split}.txt)",
        options=("folder",)) for split in ("train", "val", "test")),
    S("dataset.amp_range", "list", "sinusoid: amplitude A ~ U[low, high] (the paper: [0.1, 5.0])",
      options=_SINUSOID),
    S("dataset.phase_range", "list", "sinusoid: phase ~ U[low, high] (the paper: [0, pi])",
      options=_SINUSOID),
    S("dataset.input_range", "list", "sinusoid: x ~ U[low, high] (the paper: [-5, 5])",
      options=_SINUSOID),
    # conf/model/*.yaml
    S("model.name", "str", "the built-in learner (model=NAME chooses the option)",
      options=_CONV4 + _MLP),
    S("model.filters", "int", "filters per conv layer (the paper: 64 Omniglot, 32 MiniImagenet)",
      options=_CONV4),
    S("model.in_channels", "int", "input channels (follows dataset.channels)",
      options=_IMAGE_MODELS),
    S("model.hidden", "list", "mlp: hidden layer widths (the paper: [40, 40])", options=_MLP),
    S("model.init_std", "float", "mlp: std of the truncated-normal weights (cbfinn/maml: 0.01)",
      options=_MLP),
    S("model.downsample", "str", "stride: stride-2 convs + mean | maxpool: 2x2 max-pool + flatten",
      options=_CONV4),
    S("model.bn_scale", "bool", "batch norm with a learned scale (false: offset only, cbfinn/maml)",
      options=_CONV4),
    S("model.adapt_bn", "bool", "adapt the batch-norm weights in the inner loop", options=_CONV4),
    S("model.head_init", "str", "last layer: xavier (uniform) | normal (std 1, cbfinn/maml)",
      options=_CONV4),
    S("model.activation", "str", "relu (MAML) | leaky_relu (slope 0.01, the MAML++ code)",
      options=_CONV4),
    S("model.bn_eps", "float", "batch-norm epsilon (1e-3 as tf.contrib; 1e-5 PyTorch)",
      options=_CONV4),
    S("model._target_", "str",
      "any torch.nn.Module class to learn; the other model.* settings are its arguments",
      options=_RESNET12),
    S("model.way", "int", "ResNet12's argument: its outputs (follows way)", options=_RESNET12),
    S("model.channels", "list", "ResNet12's argument: the four stages' channels",
      options=_RESNET12),
    # conf/eval.yaml
    _eval("checkpoint", "path", "the .pt checkpoint to score (a run dir: its checkpoints/best.pt)",
          report=False),
    _eval("tasks", "int >= 1", "fixed evaluation tasks", report=False,
          refusal="{key}={value} must be a positive number of evaluation tasks."),
    _eval("split", "test | val | train", "the split to score",
          refusal="{key}={value!r} is not a split: use test, val or train."),
    _eval("update_step_test", "int >= 1 or null", "inner steps (null: the checkpoint's)"),
    _eval("steps", "any", "e.g. steps=0,1,3,5,10: the metric after each number of inner steps"),
    _eval("plot", "bool",
          "regression: draw a few test tasks before/after 1 and 10 steps (needs metarun[plot])"),
    _eval("device", "str", "auto | cpu | cuda | cuda:N", report=False),
    _eval("rotate_eval", "bool or null", "rotated tasks (null: the checkpoint's rotate_eval)",
          refusal="{key}={value} must be true, false or null (the checkpoint's)."),
    _eval("eval_seed", "int or null", "null: the checkpoint's, so scores compare across runs",
          report=False),
    _eval("ensemble", "int >= 1", "K > 1: mean of the logits of the run's K best kept checkpoints",
          refusal="{key}={value} must be a whole number of checkpoints >= 1 (1: the checkpoint "
          "alone)."),
    _eval("eval_chunk", "int >= 1", "tasks per evaluation pass (memory only)", report=False,
          refusal="{key}={value} must be a positive number of tasks per pass."),
    _eval("data_root", "path or null", "null: the checkpoint's dataset.root ($METARUN_DATA)",
          report=False),
    _eval("benchmark", "lake or null", "null: fixed tasks of `split` | lake: Lake et al.'s 20 runs",
          refusal="{key}={value!r} is not a benchmark: use benchmark=lake (Lake et al.'s 20 "
          "one-shot runs) or leave it out (fixed tasks of `split`)."),
    _eval("allow_seen_alphabets", "bool",
          "benchmark=lake: score a dataset.split=maml checkpoint anyway (marked not comparable)"),
    # Hydra's, set like the others (defaults: the hydra: node of train.yaml, eval.yaml)
    S("hydra.run.dir", "path", "the run's dir, its own", commands=("train", "eval"), report=False),
    S("hydra.sweep.dir", "path", "a sweep's dir (-m): a sub-dir per cell",
      commands=("train", "eval"), report=False),
)
# fmt: on


# --- the lists the rest of metarun reads ----------------------------------------------------------


def for_command(command: str) -> tuple[Setting, ...]:
    """The settings of `metarun <command>` (train or eval), in table order."""
    return tuple(s for s in SETTINGS if command in s.commands)


def find(name: str, command: str = "train") -> Setting | None:
    """The setting `name` of `command`, or None."""
    return next((s for s in for_command(command) if s.name == name), None)


def resumable() -> tuple[str, ...]:
    """Settings that may change when a run is continued: nothing in the saved weights, optimizer
    or sampler state depends on them (the loop's length and cadence, the evaluation's size and
    batching, the kept checkpoints, the device, threads, implementation and precision of the same
    gradient, where the same data lies)."""
    return tuple(s.name for s in for_command("train") if s.resumable)


def ignored(command: str = "train") -> frozenset[str]:
    """Settings that never make two runs different experiments in a report: where and how fast a run
    ran, how many tasks estimated its score, and the seed (the report aggregates over it)."""
    return frozenset(s.name for s in for_command(command) if not s.report)


def hparams() -> tuple[str, ...]:
    """The train settings recorded as TensorBoard hparams (with the algorithm's name)."""
    return tuple(s.name for s in for_command("train") if s.hparam)


def paths() -> tuple[str, ...]:
    """Every setting (of any command) that is a path: `~` in it means the home folder."""
    return tuple(dict.fromkeys(s.name for s in SETTINGS if s.path))


# --- validation -----------------------------------------------------------------------------------


class _Shown:
    """A value in an error message: {value} writes it as YAML does (true, null), {value!r} as
    Python does."""

    def __init__(self, value):
        self.value = value

    def __str__(self) -> str:
        return _text(self.value)

    def __repr__(self) -> str:
        return repr(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self), spec)


def _fits(setting: Setting, value) -> bool:
    """Whether `value` (a composed config's leaf) is of the setting's type, range and choices."""
    from omegaconf import DictConfig, ListConfig

    if value is None:
        return setting.nullable or setting.kind == "any"
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    kind, low = setting.kind, setting.minimum
    if kind == "int":
        fits = number and isinstance(value, int) and (low is None or value >= low)
    elif kind == "float":
        fits = number and math.isfinite(value) and (not setting.positive or value > 0)
    elif kind == "bool":
        fits = isinstance(value, bool)
    elif kind in ("str", "path"):
        fits = not isinstance(value, (dict, list, DictConfig, ListConfig))
    elif kind == "list":
        fits = isinstance(value, (list, ListConfig))
    else:
        fits = True
    return fits and (not setting.choices or str(value) in setting.choices)


def _refusal(setting: Setting, value) -> str:
    """The one-line error for a value that does not fit `setting`."""
    if setting.refusal:
        return setting.refusal.format(key=setting.name, value=_Shown(value))
    kind, low = setting.kind, setting.minimum
    if setting.choices:
        want = f"one of {', '.join(setting.choices)}"
    elif kind == "int":
        want = {None: "an integer", 1: "a positive integer"}.get(low, f"an integer >= {low}")
    elif kind == "float":
        want = "a positive number" if setting.positive else "a number"
    else:
        want = {"bool": "true or false", "list": "a list, e.g. [1, 2]"}.get(kind, "text")
    return f"{setting.name}={_Shown(value)} must be {want}{' or null' if setting.nullable else ''}."


def check_value(name: str, value, command: str = "train") -> None:
    """Raises MetarunError (one line naming the setting) unless `value` fits the setting `name`."""
    setting = find(name, command)
    if setting is not None and not _fits(setting, value):
        raise MetarunError(_refusal(setting, value))


_ABSENT = object()


def _value(cfg, name: str):
    """The resolved value of `name` in cfg; _ABSENT when the config has no such key (a config
    saved by an older metarun) or leaves it to be given (`???`)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        return OmegaConf.select(cfg, name, default=_ABSENT, throw_on_missing=False)
    except OmegaConfBaseException as exc:  # e.g. ${oc.env:NAME} of an unset variable
        cause = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MetarunError(
            f"{name} cannot be resolved ({cause}): give it a value, e.g. {name}=..."
        ) from None


def validate(cfg, command: str) -> None:
    """Checks every declared setting that the composed config `cfg` holds (a DictConfig or dict,
    after Hydra's composition, or a resumed run's saved config): its type, and for the settings
    of train.yaml and eval.yaml their range or choices. Keys this table does not declare are left
    alone (a model's own arguments, keys of older configs); a model with a `_target_` is its
    class's business.

    Raises MetarunError: one line naming the first setting that does not fit."""
    from omegaconf import DictConfig, OmegaConf

    if not isinstance(cfg, DictConfig):
        cfg = OmegaConf.create(cfg)
    own_model = OmegaConf.select(cfg, "model._target_", default=None) is not None
    for setting in for_command(command):
        if own_model and setting.group == "model" and setting.name != "model._target_":
            continue
        value = _value(cfg, setting.name)
        if value is not _ABSENT and not _fits(setting, value):
            raise MetarunError(_refusal(setting, value))


# --- the defaults, read from the YAML files -------------------------------------------------------


def conf_dir() -> Path:
    """The conf/ folder Hydra composes from: cli.CONF (the source tree's, else the installed)."""
    from metarun.cli import CONF

    return Path(CONF)


@functools.cache
def _load(path: Path) -> dict:
    """A YAML file as written: interpolations such as ${dataset.channels} stay unresolved (read once
    per process: callers copy before they change it)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(path), resolve=False)


def _flat(tree: dict, prefix: str = "") -> dict:
    """{dotted key: leaf} of a nested dict; lists are leaves."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _text(value) -> str:
    """A value as YAML and the command line write it: null, true, [1100, 100]."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return f"[{', '.join(_text(v) for v in value)}]"
    return str(value)


def options(group: str) -> list[str]:
    """The options of a config group: its YAML files' names (experiment: paths below
    conf/experiment/, e.g. maml_paper/omniglot_5way_1shot), sorted."""
    root = conf_dir() / group
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml"))


def option_values(group: str) -> dict[str, dict]:
    """{option: {dotted key (group.key): value as written}} of a group's YAML files."""
    return {o: _flat(_load(conf_dir() / group / f"{o}.yaml"), f"{group}.") for o in options(group)}


def command_values(command: str) -> dict:
    """{dotted key: value as written} of train.yaml / eval.yaml: its own settings, and Hydra's
    run and sweep dirs."""
    tree = _load(conf_dir() / f"{command}.yaml")
    values = _flat({k: v for k, v in tree.items() if k not in ("hydra", "defaults")})
    hydra = _flat(tree.get("hydra", {}))
    values.update({f"hydra.{key}": hydra.get(key) for key in ("run.dir", "sweep.dir")})
    return values


def default_options() -> dict[str, str | None]:
    """{group: its default option} from train.yaml's defaults list (experiment: None)."""
    chosen = {}
    for entry in _load(conf_dir() / "train.yaml").get("defaults", []):
        if isinstance(entry, dict):
            chosen.update(entry)
    return chosen


def default_text(setting: Setting, command: str = "train") -> str:
    """The setting's default as the help shows it. A group setting: the default option's value,
    and the other options' where they differ, e.g. "sum_over_shot (mamlpp, pretrain, reptile:
    mean)"; for a setting that the default option lacks, the options that have it: "true (mamlpp)".
    """
    if setting.group is None:
        value = command_values(command).get(setting.name)
        return "(required)" if value == "???" else _text(value)
    held = {
        o: v[setting.name] for o, v in option_values(setting.group).items() if setting.name in v
    }
    default = default_options().get(setting.group)
    if all(_text(v) == o for o, v in held.items()):  # algorithm.name: the option's own name
        return _text(held.get(default, "the option's name"))
    by_value: dict[str, list[str]] = {}
    for option in sorted(held, key=lambda o: o != default):  # the default option's value first
        by_value.setdefault(_text(held[option]), []).append(option)
    parts = [
        f"{v}" if i == 0 and default in opts else f"{', '.join(opts)}: {v}"
        for i, (v, opts) in enumerate(by_value.items())
    ]
    if default not in held:  # e.g. algorithm.msl: "true (mamlpp)"
        first, _, rest = parts[0].partition(": ")
        parts[0] = f"{rest} ({first})"
        return parts[0] if len(parts) == 1 else f"{parts[0]}; {'; '.join(parts[1:])}"
    return parts[0] if len(parts) == 1 else f"{parts[0]} ({'; '.join(parts[1:])})"


# --- help and docs --------------------------------------------------------------------------------


def _help_line(setting: Setting, command: str) -> str:
    left = f"  {setting.name}={default_text(setting, command)}"
    notes = setting.spec + ("; may change on resume" if setting.resumable else "")
    text = f"{setting.help}  [{notes}]"
    return f"{left:<34}{text}" if len(left) < 34 else f"{left}\n{'':<34}{text}"


def help_text(command: str) -> str:
    """`metarun <command> --help`: every setting of the command with its default, description and
    type, and (train) the config groups with their options."""
    usage = {
        "train": "metarun train [SETTING=VALUE ...]  (a sweep: metarun train -m way=5,20 shot=1,5)",
        "eval": "metarun eval checkpoint=PATH [SETTING=VALUE ...]",
    }[command]
    lines = [f"usage: {usage}", ""]
    if command == "train":
        lines += ["Config groups (GROUP=OPTION; the default in brackets):"]
        chosen = default_options()
        for group in (*GROUPS, "experiment", "hparams_search"):
            default = f"  [{chosen[group]}]" if chosen.get(group) else ""
            text = f"  {group}: {', '.join(options(group))}{default}"
            lines += textwrap.wrap(text, 100, subsequent_indent="      ", break_on_hyphens=False)
        lines += ["", "Settings (SETTING=default  description  [type]):"]
    else:
        lines += [
            "Settings (SETTING=default  description  [type]); the rest comes from the checkpoint:"
        ]
    lines += [_help_line(s, command) for s in for_command(command)]
    lines += [
        "",
        f"`metarun {command} --cfg job` prints the composed config; Hydra's options: --hydra-help.",
    ]
    return "\n".join(lines)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def settings_markdown(command: str) -> str:
    """A Markdown table of the command's settings (setting, type, default, description, may
    change on resume), one row per setting in table order: the docs' configuration page is
    generated from it."""
    rows = [
        "| Setting | Type | Default | Description | May change on resume |",
        "|---|---|---|---|---|",
    ]
    for s in for_command(command):
        cells = (
            f"`{s.name}`",
            _cell(s.spec),
            f"`{_cell(default_text(s, command))}`",
            _cell(s.help),
            "yes" if s.resumable else "no",
        )
        rows.append(f"| {' | '.join(cells)} |")
    return "\n".join(rows) + "\n"


# --- the tuned presets ----------------------------------------------------------------------------

# What a preset tunes per cell, and train.yaml keeps at MAML's 5-way 1-shot values (query: the
# paper's 5-shot and MiniImagenet cells draw more query images).
TUNED = ("meta_batch", "update_lr", "update_step", "update_step_test", "meta_lr", "query")


def preset_for(algorithm: str, dataset: str, way: int, shot: int) -> tuple[str, dict] | None:
    """(name, its top-level settings) of the experiment preset for this algorithm, dataset and
    cell: the presets directly in conf/experiment/ first, then those in its sub-folders (the
    papers' protocols point by point); None when there is none. A preset that chooses no
    algorithm or dataset is for train.yaml's default one."""
    chosen = default_options()
    for name in sorted(options("experiment"), key=lambda n: ("/" in n, n)):
        tree = _load(conf_dir() / "experiment" / f"{name}.yaml")
        picks = dict(chosen)
        for entry in tree.get("defaults", []):
            if isinstance(entry, dict):
                picks.update({k.replace("override /", ""): v for k, v in entry.items()})
        cell = (picks.get("algorithm"), picks.get("dataset"), tree.get("way"), tree.get("shot"))
        if cell == (algorithm, dataset, way, shot):
            return name, tree
    return None


def preset_hint(cfg, overrides) -> str | None:
    """The warning for a run that keeps train.yaml's step sizes, steps and meta-batch (tuned for
    MAML's 5-way 1-shot Omniglot) where an experiment preset holds other ones for its cell (e.g.
    `metarun train way=20 shot=1`: experiment=omniglot_20way_1shot); None when an experiment= or
    any of TUNED was given, or no preset differs. `overrides`: the command line's key=value
    settings."""
    given = {str(o).split("=", 1)[0].lstrip("+~") for o in overrides}
    defaults = command_values("train")
    if "experiment" in given or given & set(TUNED):
        return None
    if any(cfg.get(k) != defaults[k] for k in TUNED):  # a preset or a search chose them
        return None
    algorithm, dataset = str(cfg.algorithm.name), str(cfg.dataset.name)
    found = preset_for(algorithm, dataset, int(cfg.way), int(cfg.shot))
    if found is None:
        return None
    name, preset = found
    differ = [k for k in TUNED if k in preset and preset[k] != cfg.get(k)]
    if not differ:
        return None
    now = ", ".join(f"{k}={_text(cfg.get(k))}" for k in differ)
    tuned = ", ".join(f"{k}={_text(preset[k])}" for k in differ)
    return (
        f"metarun: warning: {algorithm} {cfg.way}-way {cfg.shot}-shot on {dataset} keeps "
        f"train.yaml's {now}, tuned for MAML's {defaults['way']}-way {defaults['shot']}-shot; "
        f"experiment={name} holds the paper's settings for this cell ({tuned}): add "
        f"experiment={name}."
    )
