"""metarun/settings.py: each setting declared once, the lists derived from it, checks and help."""

import re

import pytest
import torch
from helpers import REPO, assert_clean_error, run_metarun, tiny_args
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from metarun import cli, report, settings
from metarun.errors import MetarunError
from metarun.runner import resume, train
from metarun.runner.setup import check_train_settings


def compose_command(command, *overrides):
    with initialize_config_dir(config_dir=cli.CONF, version_base="1.3"):
        return compose(config_name=command, overrides=list(overrides))


def declared(command, option_group=None, option=None):
    """Names of the command's settings (of one option of a group, when given)."""
    names = set()
    for s in settings.for_command(command):
        if option_group is None and s.group is None and not s.name.startswith("hydra."):
            names.add(s.name)
        if option_group is not None and s.group == option_group:
            if not s.options or option in s.options:
                names.add(s.name)
    return names


# The table and the YAML files agree ---------------------------------------------------------------


@pytest.mark.parametrize("command", ["train", "eval"])
def test_every_key_of_train_and_eval_yaml_is_declared_and_no_more(command):
    keys = {k for k in settings.command_values(command) if not k.startswith("hydra.")}
    assert keys == declared(command)


@pytest.mark.parametrize(
    "group,option",
    [(g, o) for g in settings.GROUPS for o in settings.options(g)],
)
def test_every_key_of_each_group_option_is_declared_and_no_more(group, option):
    """A YAML key without a declaration fails, and so does a declaration its option lacks."""
    keys = set(settings.option_values(group)[option])
    assert keys == declared("train", group, option), (group, option)


PRESETS = [f"experiment={name}" for name in settings.options("experiment")]
OPTIONS = [f"{g}={o}" for g in settings.GROUPS for o in settings.options(g)]


@pytest.mark.parametrize("override", PRESETS + OPTIONS)
def test_every_preset_and_option_composes_and_fits_the_schema(override):
    """Each experiment preset and group option composes, holds only declared settings (a misspelt
    key in a preset would be a new, unused setting) and passes the checks of `metarun train`."""
    extra = ["algorithm.num_classes=12"] if "pretrain" in override else []
    # the regression dataset and its learner go together (runner/setup.check_train_settings)
    extra += {"dataset=sinusoid": ["model=mlp"], "model=mlp": ["dataset=sinusoid"]}.get(
        override, []
    )
    cfg = compose_command("train", override, *extra)
    settings.validate(cfg, "train")
    check_train_settings(cfg)
    names = {s.name for s in settings.for_command("train")}
    own_model = "_target_" in cfg.model
    for key, _ in _leaves(OmegaConf.to_container(cfg)):
        assert key in names or (own_model and key.startswith("model.")), (override, key)


def _leaves(tree, prefix=""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


# The lists the rest of metarun reads --------------------------------------------------------------


def test_the_old_lists_are_derived_from_the_table():
    assert resume.RESUMABLE == settings.resumable()
    assert report.IGNORED == settings.ignored()
    assert train.HPARAM_KEYS == settings.hparams()
    assert cli.PATH_SETTINGS == settings.paths()
    # what each property means, on settings whose role does not change
    assert {"iterations", "eval_every", "device", "dataset.root"} <= set(resume.RESUMABLE)
    assert not {"way", "update_lr", "seed", "resume", "algorithm.name"} & set(resume.RESUMABLE)
    assert {"seed", "device", "threads", "test_tasks", "algorithm.impl"} <= report.IGNORED
    assert not {"way", "shot", "update_lr", "first_order", "algorithm.name"} & report.IGNORED
    assert {"way", "shot", "update_lr", "meta_lr", "iterations", "seed"} <= set(train.HPARAM_KEYS)
    assert {"resume", "checkpoint", "data_root", "hydra.run.dir", "dataset.root"} <= set(
        cli.PATH_SETTINGS
    )
    assert all(settings.find(k).resumable for k in resume.RESUMABLE)


# Checks -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides,fragment",
    [
        (["way=1"], "way=1 must be a positive integer of at least 2: a task needs 2 classes"),
        (["way=five"], "way=five must be a positive integer"),
        (["first_order=yes"], "first_order=yes must be true or false."),
        (["update_lr=inf"], "update_lr=inf must be a positive number"),
        (["time_limit=0"], "time_limit=0 must be a positive number of minutes"),
        (["threads=-1"], "threads=-1 must be an integer >= 0 (0: all cores)."),
        (["autocast=fp16"], "autocast=fp16 is not a setting: use none or bf16"),
        (["algorithm=mamlpp", "algorithm.msl=yes"], "algorithm.msl=yes must be true or false."),
        (["dataset.split_sizes=5"], "dataset.split_sizes=5 must be a list"),
        (["model.filters=wide"], "model.filters=wide must be an integer."),
        (["dataset.root=${oc.env:METARUN_NO_SUCH_VARIABLE}"], "dataset.root cannot be resolved"),
    ],
)
def test_a_value_that_does_not_fit_is_one_line_naming_the_setting(overrides, fragment):
    cfg = compose_command("train", *overrides)
    with pytest.raises(MetarunError) as info:
        settings.validate(cfg, "train")
    message = str(info.value)
    assert fragment in message and "\n" not in message and "full_key" not in message


@pytest.mark.parametrize(
    "overrides,fragment",
    [
        (["split=validation"], "split='validation' is not a split: use test, val or train."),
        (["tasks=0"], "tasks=0 must be a positive number of evaluation tasks."),
        (["ensemble=0"], "ensemble=0 must be a whole number of checkpoints >= 1"),
        (["rotate_eval=maybe"], "rotate_eval=maybe must be true, false or null"),
        (["benchmark=omniglot"], "benchmark='omniglot' is not a benchmark: use benchmark=lake"),
        (["update_step_test=0"], "update_step_test=0 must be a positive integer or null."),
    ],
)
def test_eval_settings_are_checked_from_the_table(overrides, fragment):
    cfg = compose_command("eval", "checkpoint=x.pt", *overrides)
    with pytest.raises(MetarunError, match=re.escape(fragment)):
        settings.validate(cfg, "eval")
    settings.validate(compose_command("eval", "checkpoint=x.pt", "steps=[0,1]"), "eval")


def test_way_1_is_refused_by_the_cli_and_leaves_nothing(tmp_path):
    proc = run_metarun("train", "way=1", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert_clean_error(proc, "way=1 must be", "a task needs 2 classes or more")
    assert not (tmp_path / "run").exists() and not (tmp_path / "outputs").exists()


def test_a_model_target_learner_keeps_taking_its_own_arguments():
    # ResNet12's own arguments (and any other) are its class's business, not the schema's
    cfg = compose_command("train", "model=resnet12", "model.channels=abc", "+model.depth=deep")
    settings.validate(cfg, "train")
    with pytest.raises(MetarunError, match="model.filters=abc must be an integer"):
        settings.validate(compose_command("train", "model.filters=abc"), "train")


def test_a_checkpoint_config_without_newer_keys_validates_on_resume():
    """A config saved by an older metarun: newer settings absent (filled with the defaults on
    resume), a setting since dropped present (left alone)."""
    saved = OmegaConf.to_container(compose_command("train", "way=3", "update_lr=0.2"), resolve=True)
    for key in ("cpu_allocator", "tf32", "autocast", "time_limit", "keep_best", "log_every"):
        del saved[key]
    for key in ("resize", "source", "rotate_eval"):
        del saved["dataset"][key]
    del saved["model"]["bn_eps"]
    saved["old_setting"] = "kept"
    settings.validate(saved, "train")  # as saved: absent keys are not errors
    config, changes = resume.resume_config(
        saved, compose_command("train", "resume=x", "iterations=9"), ["iterations=9"], "x"
    )
    check_train_settings(config)
    assert changes == {"iterations": [60000, 9]} and config.way == 3
    assert config.keep_best == 5 and config.dataset.resize == "lanczos" and config.tf32 is False


# Help and docs ------------------------------------------------------------------------------------


def test_train_help_lists_every_setting_with_its_default_and_description():
    text = settings.help_text("train")
    for s in settings.for_command("train"):
        assert s.help in text, s.name
    assert "  way=5 " in text and "update_lr=0.4 " in text and "[int >= 2]" in text
    assert (
        "algorithm.inner_loss=sum_over_shot (mamlpp, metasgd, pretrain, protonet, reptile: mean)"
        in text
    )
    assert "algorithm.msl=true (mamlpp)" in text
    assert "iterations=60000" in text and "may change on resume" in text


def test_eval_help_from_the_cli_lists_only_evals_settings(tmp_path):
    out = run_metarun("eval", "--help", cwd=tmp_path, check=True).stdout
    for s in settings.for_command("eval"):
        assert f"  {s.name}=" in out and s.help in out, s.name
    assert "checkpoint=(required)" in out
    for train_only in ("algorithm:", "experiment:", "  way=", "  meta_batch=", "  dataset."):
        assert train_only not in out, train_only
    assert not (tmp_path / "outputs").exists()


@pytest.mark.parametrize("command", ["train", "eval"])
def test_settings_markdown_is_one_row_per_setting(command):
    text = settings.settings_markdown(command)
    lines = text.strip().split("\n")
    assert lines[0] == "| Setting | Type | Default | Description | May change on resume |"
    assert lines[1] == "|---|---|---|---|---|"
    rows = lines[2:]
    assert len(rows) == len(settings.for_command(command))
    for row, s in zip(rows, settings.for_command(command), strict=True):
        cells = row.replace("\\|", "").strip("|").split("|")  # escaped pipes stay inside a cell
        assert len(cells) == 5 and cells[0].strip() == f"`{s.name}`", row
        assert cells[4].strip() == ("yes" if s.resumable else "no")
    if command == "train":
        assert "| `way` | int >= 2 | `5` | N: classes per task | no |" in rows
        assert "| `cpu_allocator` | tuned \\| system | `tuned` |" in text
        assert any(r.startswith("| `iterations` |") and r.endswith("| yes |") for r in rows)


# The tuned presets (a 20-way run with the 5-way step sizes) ---------------------------------------


def test_a_cell_with_the_5_way_settings_names_its_tuned_preset():
    given = ["way=20", "shot=1"]
    hint = settings.preset_hint(compose_command("train", *given), given)
    assert hint is not None and "\n" not in hint
    assert "experiment=omniglot_20way_1shot" in hint
    assert "update_lr=0.4" in hint and "update_lr=0.1" in hint and "meta_batch=16" in hint
    # another algorithm: its own preset (Reptile's inner Adam rate, not MAML's 0.4)
    given = ["algorithm=reptile"]
    hint = settings.preset_hint(compose_command("train", *given), given)
    assert "experiment=reptile_omniglot_5way_1shot" in hint and "update_lr=0.001" in hint


@pytest.mark.parametrize(
    "given",
    [
        [],  # the defaults are the tuned 5-way 1-shot cell
        ["experiment=omniglot_20way_1shot"],
        ["way=20", "experiment=omniglot_5way_1shot"],  # a preset chosen: the user's business
        ["way=20", "shot=1", "update_lr=0.1"],  # tuned by hand
        ["way=3"],  # no preset for this cell
    ],
)
def test_no_preset_hint_when_there_is_nothing_to_say(given):
    assert settings.preset_hint(compose_command("train", *given), given) is None


def test_conf_is_the_repositorys():
    assert settings.conf_dir() == REPO / "conf"


@pytest.mark.parametrize(
    "override,fragments",
    [
        ("wya=5", ["unknown setting 'wya'", "--help"]),
        ("way=40", ["way=40 is larger than the 33 classes of the train split"]),
        ("shot=15", ["shot+query=15+6=21 is more than the 20 images per class"]),
        ("update_lr=0", ["update_lr=0 must be a positive number"]),
        ("way=five", ["way=five must be a positive integer"]),
        ("eval_chunk=0", ["eval_chunk=0 must be a positive integer"]),
        ("meta_lr=-0.001", ["meta_lr=-0.001 must be a positive number"]),
        ("update_step=0", ["update_step=0 must be a positive integer"]),
        ("meta_batch=0", ["meta_batch=0 must be a positive integer"]),
        ("iterations=-5", ["iterations=-5 must be a positive integer"]),
        ("dataset.split=alphabetical", ["dataset.split='alphabetical'", "maml", "lake"]),
        ("device=tpu", ["device=tpu"]),
        ("cpu_allocator=jemalloc", ["cpu_allocator=jemalloc is not a setting", "tuned", "system"]),
        (
            "hydra.run.dir=/proc/metarun-cannot-write",
            ["/proc/metarun-cannot-write", "hydra.run.dir"],
        ),
        ("resume=/nonexistent/last.pt", ["resume=/nonexistent/last.pt does not exist"]),
    ],
)
def test_bad_setting_fails_early_with_one_line(tiny_root, tmp_path, override, fragments):
    args = tiny_args(tiny_root, tmp_path / "run", "query=6")
    if override.startswith("hydra.run.dir"):
        args = [a for a in args if not a.startswith("hydra.run.dir")]
    proc = run_metarun(*args, override, cwd=tmp_path)
    assert_clean_error(proc, *fragments)
    # a rejected command leaves nothing behind: no run dir, no outputs/ (#11)
    assert not (tmp_path / "run").exists() and not (tmp_path / "outputs").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_without_cuda(tiny_root, tmp_path):
    assert_clean_error(
        run_metarun(*tiny_args(tiny_root, tmp_path / "run"), "device=cuda", cwd=tmp_path),
        "device=cuda",
        "no usable CUDA",
        "device=cpu",
    )
