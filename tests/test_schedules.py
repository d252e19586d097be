"""Schedules over a run's length: a resume that raises `iterations` keeps them on the length the run
started with (schedule_iterations, recorded in the checkpoint) and holds their end values after it,
with no jump at the resume point; a MAML++ run too short for its epoch counts is fitted (shorter
epochs, one warning) unless algorithm.fit_schedule=false, as in the mamlpp_paper presets."""

import pytest
import torch
from helpers import assert_clean_error, compose, run_metarun, tiny_args
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from metarun.algorithms.mamlpp import MAMLPlusPlus
from metarun.algorithms.reptile import Reptile
from metarun.errors import MetarunError
from metarun.models.conv4 import Conv4
from metarun.runner.resume import pin_schedule
from metarun.runner.setup import build_algorithm

OFF = dict(msl=False, bnwb=False, lslr=False, cosine_annealing=False, inner_bn=True)


def scalars(run, tag):
    """{step: value} of a TensorBoard scalar of a run (the latest value of each step)."""
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    return {e.step: e.value for e in events.Scalars(tag)}


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


# -- a longer run: the schedules keep their length and hold their end values -----------------------
def test_cosine_meta_lr_holds_min_after_its_epochs_instead_of_rising():
    model = Conv4(3, filters=4, image_size=16)
    algo = MAMLPlusPlus(
        model, 0.4, 1, 1, **{**OFF, "cosine_annealing": True}, iterations=4, iterations_per_epoch=1
    )
    rates = [algo.meta_lr_at(e) for e in range(10)]
    assert rates[0] == 1e-3 and rates[4] == pytest.approx(1e-5)
    assert all(a >= b for a, b in zip(rates, rates[1:], strict=False))
    assert rates[4:] == [rates[4]] * 6  # torch's closed form would rise again after T_max


def test_reptile_outer_step_holds_meta_step_final_after_its_length():
    algo = Reptile(
        Conv4(3, filters=4, image_size=16), 0.01, 1, 1, meta_step_final=0.1, iterations=4
    )
    assert [algo.meta_step_at(i) for i in (0, 2, 4, 6)] == pytest.approx([1.0, 0.55, 0.1, 0.1])


def test_pin_schedule_records_the_length_the_run_started_with():
    config = OmegaConf.create({"iterations": 80, "schedule_iterations": None})
    changes = {"iterations": [40, 80]}
    pin_schedule(config, changes)
    assert config.schedule_iterations == 40 and changes["schedule_iterations"] == [None, 40]
    pin_schedule(config, {"iterations": [80, 120]})  # pinned once: a second extension keeps it
    assert config.schedule_iterations == 40
    untouched = OmegaConf.create({"iterations": 40, "schedule_iterations": None})
    pin_schedule(untouched, {"time_limit": [None, 5]})
    assert untouched.schedule_iterations is None


# Every MAML++ schedule moves inside 4 iterations: 1-iteration epochs (fitted from 500 for MSL's 4
# epochs), first order in epoch 0, the cosine meta learning rate over the run's 4 epochs.
MAMLPP = [
    "algorithm=mamlpp",
    "update_step=2",
    "update_step_test=2",
    "algorithm.msl_epochs=4",
    "algorithm.first_order_epochs=1",
    "log_every=1",
]


@pytest.mark.parametrize(
    "epochs",
    [
        [],  # fitted: 4 iterations are fewer than msl_epochs=4 epochs of 500
        ["algorithm.iterations_per_epoch=1", "algorithm.msl_epochs=2"],  # as configured
    ],
)
def test_extending_a_mamlpp_run_continues_its_schedules_without_a_jump(tiny_root, tmp_path, epochs):
    run = tmp_path / "run"
    first = run_metarun(*tiny_args(tiny_root, run, *MAMLPP, *epochs, "iterations=4"), cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert ("shortened to 1 iterations" in first.stderr) == (not epochs)
    proc = run_metarun(
        "train", "iterations=8", f"resume={run}", f"dataset.root={tiny_root}", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("runs past the 4 iterations its schedules were set for") == 1
    last = load(run / "checkpoints" / "last.pt")
    assert last["config"]["schedule_iterations"] == 4
    assert last["history"][-1]["changes"]["schedule_iterations"] == [None, 4]
    lr, epoch = scalars(run, "lr/meta_lr"), scalars(run, "mamlpp/epoch")
    rates = [lr[i] for i in range(1, 9)]
    # the meta learning rate falls over the first 4 iterations, then stays at min_meta_lr: no jump
    assert rates[0] == pytest.approx(1e-3) and rates[3] < rates[2] < rates[0]
    assert all(a >= b for a, b in zip(rates, rates[1:], strict=False))
    assert rates[4:] == pytest.approx([1e-5] * 4)
    # the fitted epoch keeps its length: epochs count on, never restart
    assert [epoch[i] for i in range(1, 9)] == [0, 1, 2, 3, 4, 5, 6, 7]


def test_extending_a_reptile_run_holds_its_outer_step(tiny_root, tmp_path):
    run = tmp_path / "run"
    reptile = ["algorithm=reptile", "algorithm.train_shots=3", "algorithm.inner_batch=4"]
    reptile += ["algorithm.meta_step_final=0.2", "log_every=1"]
    run_metarun(*tiny_args(tiny_root, run, *reptile, "iterations=4"), cwd=tmp_path, check=True)
    proc = run_metarun(
        "train",
        "iterations=8",
        f"resume={run}",
        f"dataset.root={tiny_root}",
        cwd=tmp_path,
        check=True,
    )
    assert proc.stderr.count("after them it stays at meta_step_final=0.2") == 1
    steps = scalars(run, "reptile/meta_step")
    assert [steps[i] for i in range(1, 9)] == pytest.approx([1.0, 0.8, 0.6, 0.4] + [0.2] * 4)


# -- a short MAML++ run: the epoch-based schedules fitted to it ------------------------------------
def test_mamlpp_fits_a_run_too_short_for_its_epochs():
    model = Conv4(3, filters=4, image_size=16)
    kw = dict(msl_epochs=10, iterations_per_epoch=500, iterations=1000)
    fitted = MAMLPlusPlus(model, 0.1, 2, 2, fit_schedule=True, **kw)
    assert fitted.iterations_per_epoch == 100 and fitted.total_epochs == 10
    assert fitted.cosine_epochs == 10 and "shortened to 100 iterations" in fitted.fit_note
    with pytest.raises(MetarunError, match="algorithm.fit_schedule=true"):
        MAMLPlusPlus(model, 0.1, 2, 2, **kw)
    # a run long enough keeps the configured epoch, and says nothing
    whole = MAMLPlusPlus(model, 0.1, 2, 2, fit_schedule=True, **{**kw, "iterations": 50000})
    assert whole.iterations_per_epoch == 500 and whole.fit_note is None


def test_the_short_run_people_try_first_is_fitted_and_the_paper_preset_is_not():
    """`metarun train experiment=mamlpp_omniglot_5way_1shot iterations=1000`, built as the runner
    builds it: 10 epochs of 100 iterations (MSL over all of them, the cosine over the run)."""
    cfg = compose("experiment=mamlpp_omniglot_5way_1shot", "iterations=1000", "device=cpu")
    _, algo = build_algorithm(cfg, torch.device("cpu"))
    assert (algo.iterations_per_epoch, algo.msl_epochs, algo.cosine_epochs) == (100, 10, 10)
    paper = compose("experiment=mamlpp_paper/omniglot_5way_1shot", "iterations=1000", "device=cpu")
    with pytest.raises(MetarunError, match="msl_epochs=10"):
        build_algorithm(paper, torch.device("cpu"))
    full = compose("experiment=mamlpp_paper/omniglot_5way_1shot", "device=cpu")
    assert build_algorithm(full, torch.device("cpu"))[1].iterations_per_epoch == 500


def test_short_mamlpp_preset_runs_with_one_warning(tiny_root, tmp_path):
    short = ["update_step=2", "update_step_test=2", "meta_batch=2", "iterations=6"]
    proc = run_metarun(
        *tiny_args(tiny_root, tmp_path / "run", "experiment=mamlpp_omniglot_5way_1shot", *short),
        "way=3",
        "query=1",
        "val_tasks=4",
        "keep_best=1",
        cwd=tmp_path,
    )
    # 6 iterations cannot hold 10 epochs even at one iteration each: refused, naming the settings
    assert_clean_error(proc, "msl_epochs=10")
    proc = run_metarun(
        *tiny_args(tiny_root, tmp_path / "run2", "experiment=mamlpp_omniglot_5way_1shot", *short),
        "way=3",
        "query=1",
        "val_tasks=4",
        "keep_best=1",
        "iterations=20",
        "eval_every=10",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("shortened to 2 iterations") == 1
