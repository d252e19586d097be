"""`metarun train`: one run's meta-training, in four phases.

    build    the command read (a resume: the saved run's config, runner/restore.py), then the
             run's parts: device, execution, algorithm, data, meta-parameters, optimizer, sampler
    restore  the run's TrainState (runner/state.py): fresh, or the saved one put into the parts
    loop     per iteration: step, log, validate, checkpoint, stop (signal, time_limit, the end)
    finish   the best checkpoint's test, results.json, the TensorBoard HParams record
             (runner/finish.py)

`train()` runs them in this order; every way out of it (its results, a user error, a signal)
passes one `finally`, which closes the progress bar, TensorBoard and the torchrun process group.
"""

from __future__ import annotations

import logging
import math
import shlex
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from metarun import settings
from metarun.algorithms.base import meta_train_step
from metarun.errors import MetarunError, require_writable_dir
from metarun.io import atomic_write_text
from metarun.runner import distributed
from metarun.runner.checkpoint import CheckpointWriteError, nonfinite_tensor, save_checkpoint
from metarun.runner.evaluate import describe, evaluate_tasks
from metarun.runner.files import RunFiles
from metarun.runner.finish import command_line, finish
from metarun.runner.logs import console_through_tqdm
from metarun.runner.restore import Request, kept_execution, open_request, restore
from metarun.runner.resume import history_entry
from metarun.runner.setup import (
    build_algorithm,
    configure_execution,
    describe_splits,
    load_splits,
    resolve_device,
)
from metarun.runner.signals import Stopped, StopRequest
from metarun.runner.state import TrainState

log = logging.getLogger("metarun")

HPARAM_KEYS = settings.hparams()  # metarun/settings.py: the settings marked hparam


def train(cfg, run_dir: Path, overrides=()) -> dict:
    """Meta-trains (or, with cfg.resume, continues) a run in `run_dir`; returns its results.json
    record. `overrides` are the command line's settings: on resume the saved run's config is the
    base and only these may change it (runner/resume.py). Raises MetarunError for a user error;
    exits with 128 + the signal's number when a signal stops the run (runner/signals.py)."""
    started = time.perf_counter()
    # From the start: a SIGINT/SIGTERM during setup stops the run after its first iteration.
    with StopRequest() as stop:
        run = None
        try:
            request = open_request(cfg, Path(run_dir), overrides)
            run = build(request, Path(run_dir), stop, started)
            state = restore(run, request)
            run.begin_segment(state, request)
            ended = Loop(run, state).execute()
            return finish(run, state, ended, HPARAM_KEYS)
        except Stopped as stopped:
            _stopped(run, stopped)
        finally:
            if run is not None:
                run.close()


@dataclass
class Run:
    """The parts `build` makes for one segment of a run (not saved: a resume builds them again
    from the config) and the segment's bookkeeping."""

    cfg: object
    files: RunFiles
    stop: StopRequest
    device: torch.device
    execution: dict
    algorithm: object
    splits: dict
    source: str
    config: dict
    resolved: dict
    params: dict
    optimizer: torch.optim.Optimizer
    sampler: object
    started: float  # time.perf_counter() when this segment started
    main: bool = True  # torchrun: rank 0 alone logs, validates, checkpoints and writes results
    writer: object = None
    bar: object = None
    wall_before: float = 0.0  # wall-clock seconds of the run's earlier segments
    saved_iteration: int | None = None  # the iteration of the last.pt on disk (None: none yet)

    def begin_segment(self, state: TrainState, request: Request) -> None:
        """Records this segment in the run's history and opens its TensorBoard writer."""
        self.wall_before = state.wall_seconds
        # a branch into a new run dir has no checkpoint of its own yet
        self.saved_iteration = state.iteration if self.files.last.is_file() else None
        state.history.append(
            {
                **history_entry(
                    state.iteration, request.resume, request.changes, request.overrides
                ),
                "command": command_line(request.overrides),
                "device": str(self.device),
                "impl": self.execution["impl"],
                "threads": self.execution["threads"],
                **({"processes": distributed.world_size()} if distributed.world_size() > 1 else {}),
            }
        )
        if not self.main:
            self.writer = distributed.NullWriter()
            return
        from torch.utils.tensorboard import SummaryWriter

        # Events after the checkpoint's iteration were lost with the interruption and are redrawn;
        # those of the checkpoint's own iteration were written before it was saved and stay.
        purge = state.iteration + 1 if request.saved is not None else None
        self.writer = SummaryWriter(str(self.files.tensorboard), purge_step=purge)

    def capture(self, state: TrainState) -> TrainState:
        """`state` with the live weights, optimizer, sampler and algorithm: what a checkpoint holds.
        Raises MetarunError for non-finite weights (they never reach a checkpoint)."""
        bad = nonfinite_tensor({k: v.detach() for k, v in self.params.items()})
        if bad:
            raise diverged(f"the weights became non-finite ({bad})", state.iteration, True, self)
        state.optimizer = self.optimizer.state_dict()
        state.sampler = self.sampler.state()
        state.algorithm = self.algorithm.state_dict()
        state.wall_seconds = self.wall_before + time.perf_counter() - self.started
        return state

    def save(self, path: Path, state: TrainState) -> None:
        """Writes the captured state to `path`; a failed write (e.g. a full disk) stops the run
        with one line that names the file and the checkpoint kept."""
        try:
            save_checkpoint(path, self.capture(state))
        except CheckpointWriteError as exc:
            fix = "Free some space" if "no space" in exc.reason else "Make it writable"
            raise MetarunError(
                f"could not write the checkpoint {exc.path}: {exc.reason}; training stopped at "
                f"iteration {state.iteration} and {self.kept()}. {fix}, then {self.resume_hint()}"
            ) from None
        if path == self.files.last:
            self.saved_iteration = state.iteration

    def kept(self) -> str:
        """What of the run is on disk, for a message: its last good checkpoint, or none."""
        if self.saved_iteration is None or not self.files.last.is_file():
            return "no checkpoint had been written yet"
        last, iteration = self.files.last, self.saved_iteration
        return f"the last good checkpoint {last} (iteration {iteration}) is kept"

    def resume_hint(self) -> str:
        """How to continue the run: 'resume with: metarun train resume=<run dir>' (or run the
        command again when the run dir has no checkpoint)."""
        if self.saved_iteration is None or not self.files.last.is_file():
            return "run the same command again."
        world = distributed.world_size()
        prefix = f"torchrun --nproc-per-node={world} -m metarun.cli" if world > 1 else "metarun"
        return f"resume with: {prefix} train resume={shlex.quote(str(self.files.run_dir))}"

    def close(self) -> None:
        """The one way out of a run: the bar, TensorBoard and the process group closed (again)."""
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        distributed.finish()


def resolved_settings(cfg, device, execution: dict, source: str) -> dict:
    """The run's settings with what `auto`, 0 and interpolations became: device, impl, threads,
    data root, and where the data came from (`data_source`)."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    resolved["device"] = str(device)
    resolved["algorithm"]["impl"] = execution["impl"]
    resolved["threads"] = execution["threads"]
    if resolved["dataset"].get("root"):
        resolved["dataset"]["root"] = str(Path(resolved["dataset"]["root"]).expanduser().absolute())
    resolved["data_source"] = source
    return resolved


def build(request: Request, run_dir: Path, stop: StopRequest, started: float) -> Run:
    """The run's parts for the command's config; the algorithm checks its settings before any
    data loads. Writes resolved.yaml (rank 0). Raises MetarunError for a user error."""
    from metarun.algorithms import algorithm_class

    cfg, files, main = request.cfg, RunFiles(run_dir), distributed.is_main()
    device = distributed.device_for_rank(resolve_device(cfg.device))
    if distributed.world_size() > 1:
        distributed.share(int(cfg.meta_batch))  # every process needs a task
        distributed.check_splittable(algorithm_class(str(cfg.algorithm.name)))
    if request.saved is None and files.last.exists():
        raise MetarunError(
            f"{run_dir} already holds another run's checkpoints: continue it with "
            f"resume={run_dir}, "
            "or choose a new hydra.run.dir."
        )
    if main:
        require_writable_dir(files.checkpoints)
    execution = configure_execution(cfg, device, kept_execution(request, device))
    _, algorithm = build_algorithm(cfg, device, execution)
    data = load_splits(cfg, device)
    algorithm.bind_data(data["splits"])  # what only the data can check (train_shots, classes)
    resolved = resolved_settings(cfg, device, execution, data["source"])
    if main:
        atomic_write_text(files.resolved, OmegaConf.to_yaml(OmegaConf.create(resolved)))
    _log_start(cfg, device, algorithm, execution, data, run_dir)
    init = algorithm.init_meta_params(torch.Generator().manual_seed(int(cfg.seed)), device=device)
    params = {k: v.requires_grad_(True) for k, v in init.items()}
    return Run(
        cfg=cfg,
        files=files,
        stop=stop,
        device=device,
        execution=execution,
        algorithm=algorithm,
        splits=data["splits"],
        source=data["source"],
        config=OmegaConf.to_container(cfg, resolve=True),
        resolved=resolved,
        params=params,
        optimizer=algorithm.make_optimizer(list(params.values()), float(cfg.meta_lr)),
        sampler=algorithm.train_sampler(cfg, data["splits"]["train"], device),
        started=started,
        main=main,
    )


def _log_start(cfg, device, algorithm, execution: dict, data: dict, run_dir: Path) -> None:
    threads = execution["threads"]
    world = distributed.world_size()
    parallel = f", {world} torchrun processes" if world > 1 else ""
    log.info(
        f"metarun: {algorithm.family.shape(cfg)} {cfg.query}-query on {device} "
        f"({algorithm.describe()}, {threads} thread{'s' if threads != 1 else ''}{parallel}), "
        f"{data['source']}{describe_splits(data['splits'])}; run dir {run_dir}"
    )


def diverged(what: str, done: int, exact: bool, run: Run) -> MetarunError:
    """The error of a run whose loss or weights stopped being finite at iteration `done`."""
    cfg = run.cfg
    return MetarunError(
        f"{what} at iteration {done}{'' if exact else ' (or shortly before)'}; training stopped "
        f"and {run.kept()}. Lower update_lr (now {cfg.update_lr}) or meta_lr (now {cfg.meta_lr})."
    )


def nonfinite_validation(cfg, label: str) -> str:
    """The warning for a non-finite validation: what diverges and which settings fix it."""
    return (
        f"metarun: warning: the validation {label} is not finite: the weights adapted with "
        f"update_step_test={cfg.update_step_test} inner steps diverge (training adapts with "
        f"update_step={cfg.update_step}). Such a validation never becomes the best checkpoint; "
        "lower update_step_test (the paper's test steps) or the inner learning rates."
    )


class Loop:
    """The meta-iterations of one segment, from the state's iteration to cfg.iterations."""

    def __init__(self, run: Run, state: TrainState):
        cfg = run.cfg
        self.run, self.state = run, state
        self.iterations, self.log_every = int(cfg.iterations), int(cfg.log_every)
        self.eval_every = int(cfg.eval_every)
        # meta_batch tasks (the baseline: images) per iteration, for the logged speed
        self.per_iteration, self.unit = run.algorithm.train_unit(cfg)
        # time_limit: minutes of this segment's wall clock after which training ends as if
        # `iterations` were reached (a last validation, the test, results.json); resume continues.
        limit = cfg.get("time_limit")
        self.deadline = run.started + 60 * float(limit) if limit else None
        self.check_every_step = run.device.type == "cpu"  # on CUDA a per-step .item() stalls
        self.window_start, self.window_items = time.perf_counter(), 0
        self.warned_nonfinite = False  # once a segment: a validation that diverged

    def execute(self) -> str:
        """Runs the iterations; returns why training ended: 'iterations' or 'time_limit'."""
        run = self.run
        run.bar = tqdm(
            total=self.iterations,
            initial=self.state.iteration,
            desc="meta-train",
            unit="it",
            dynamic_ncols=True,
            file=sys.stdout,
            mininterval=1.0,
            disable=not run.main,
        )
        with console_through_tqdm():
            for it in range(self.state.iteration, self.iterations):
                if self.iteration(it):
                    run.bar.close()
                    return "time_limit"
        run.bar.close()
        return "iterations"

    def iteration(self, it: int) -> bool:
        """Meta-iteration `it` (0-based) and what follows it; True when time_limit ran out."""
        run, state = self.run, self.state
        run.algorithm.begin_iteration(it, run.optimizer)  # its schedules (epochs, meta lr)
        batch = run.sampler.sample(int(run.cfg.meta_batch))
        done = it + 1
        self.window_items += self.per_iteration
        result, stopping, out_of_time = self.step(batch, done)
        state.iteration = done
        last = done == self.iterations or out_of_time
        logging_step = done % self.log_every == 0 or last
        validating = done % self.eval_every == 0 or last
        # Every step on the CPU; on CUDA at least before anything is logged, validated or saved.
        loss = None
        if self.check_every_step or logging_step or validating or stopping:
            loss = result.meta_loss.item()
            if not math.isfinite(loss):
                raise diverged(f"the meta-loss became {loss}", done, self.check_every_step, run)
        run.bar.update(1)
        if logging_step:
            self.log(result, loss, done)
        if validating and run.main:
            self.validate(done, logging_step)
        if stopping:
            self.stop(done)
        if out_of_time:
            log.info(
                f"metarun: time_limit={run.cfg.time_limit} min reached at iteration {done} of "
                f"{self.iterations}; testing the best checkpoint. Continue with: metarun train "
                f"resume={shlex.quote(str(run.files.run_dir))}"
            )
        return out_of_time

    def step(self, batch, done: int):
        """The meta-update: (StepResult, a stop was asked, time ran out). Under torchrun every
        rank stops at the same iteration: the all-reduced flags (a signal on any rank, rank 0's
        clock for time_limit), read at the same iterations on every rank."""
        run = self.run
        out_of_time = (
            self.deadline is not None
            and time.perf_counter() >= self.deadline
            and done < self.iterations
        )
        if distributed.world_size() == 1:
            result = meta_train_step(run.algorithm, run.params, run.optimizer, batch)
            return result, run.stop.requested, out_of_time
        try:
            result, flags = distributed.train_step(
                run.algorithm, run.params, run.optimizer, batch, run.stop.requested,
                out_of_time and run.main,
            )  # fmt: skip
        except distributed.ProcessLost as exc:
            if run.stop.requested and not run.main:  # rank 0 stopped on the same signal
                raise Stopped(run.stop.signum, f"training, at iteration {done - 1}") from None
            raise self.lost(exc, done) from None
        read = (
            self.check_every_step
            or self.deadline is not None
            or done % self.log_every == 0
            or done % self.eval_every == 0
            or done == self.iterations
        )
        stops, timed = flags.tolist() if read else (0.0, 0.0)
        return result, stops > 0, timed > 0 and done < self.iterations

    def lost(self, exc: distributed.ProcessLost, done: int) -> MetarunError:
        """The one line for a torchrun process that died (killed, out of memory, a lost node)."""
        run = self.run
        return MetarunError(
            f"a torchrun process of this run died or lost its connection during iteration "
            f"{done} of {self.iterations} ({exc.cause}); the run stopped and {run.kept()}. "
            f"Find why it died (its own output, above), then {run.resume_hint()}"
        )

    def log(self, result, loss: float, done: int) -> None:
        """Training scalars every log_every iterations: loss, accuracy, speed, learning rates."""
        run = self.run
        # The .item() of the loss check synchronised the device: the window's time is compute time.
        elapsed = time.perf_counter() - self.window_start
        self.state.train_seconds += elapsed
        speed = self.window_items / elapsed if elapsed > 0 else float("nan")
        accuracy = result.accuracy.mean().item()
        writer = run.writer
        writer.add_scalar("train/meta_loss", loss, done)
        writer.add_scalar(f"train/{run.algorithm.family.metric}", accuracy, done)
        writer.add_scalar(f"speed/{self.unit}_per_s", speed, done)
        writer.add_scalar("lr/meta_lr", run.optimizer.param_groups[0]["lr"], done)
        for tag, value in run.algorithm.scalars(run.params).items():
            writer.add_scalar(tag, value, done)
        run.bar.set_postfix(
            loss=f"{loss:.3f}",
            **{
                run.algorithm.family.metric[:3]: f"{accuracy:.3f}",
                f"{self.unit}_s": f"{speed:.1f}",
            },
        )
        self.window_start, self.window_items = time.perf_counter(), 0

    def validate(self, done: int, logged: bool) -> None:
        """Scores the weights on the fixed validation tasks, then writes the checkpoints. A signal
        during it stops the run at once (Stopped), writing nothing new."""
        run, cfg = self.run, self.run.cfg
        bad = nonfinite_tensor({k: v.detach() for k, v in run.params.items()})
        if bad:  # the loss can still be finite when a weight the query pass barely uses is not
            raise diverged(
                f"the weights became non-finite ({bad})", done, self.check_every_step, run
            )
        if not logged:  # close the speed window (the loss check synced): validation is not speed
            self.state.train_seconds += time.perf_counter() - self.window_start
        val, ci = evaluate_tasks(
            run.algorithm, run.params, run.splits["val"], "val", cfg, run.device,
            int(cfg.val_tasks), check=lambda: run.stop.check(f"the validation at iteration {done}"),
        )  # fmt: skip
        run.writer.add_scalar(f"val/{run.algorithm.family.metric}", val, done)
        run.writer.add_scalar("val/ci95", ci, done)
        for tag, values in run.algorithm.histograms(run.params).items():
            run.writer.add_histogram(tag, values, done)
        family = run.algorithm.family
        text = describe(val, ci, int(cfg.val_tasks), cfg.way, cfg.shot, "validation", family)
        log.info(f"iteration {done}: {text}")
        if not math.isfinite(val) and not self.warned_nonfinite:
            self.warned_nonfinite = True
            log.warning(nonfinite_validation(cfg, family.label))
        self.checkpoint(val, done)
        self.window_start, self.window_items = time.perf_counter(), 0  # validation is not speed

    def checkpoint(self, val: float, done: int) -> None:
        """The validation's checkpoints: top/ (when among the keep_best best), best.pt (when the
        best), last.pt; the top entries that fell out are deleted once last.pt no longer lists
        them."""
        run, state = self.run, self.state
        dropped = state.rank_top(val, done, int(run.cfg.keep_best), run.algorithm.family)
        if any(e[1] == done for e in state.top):
            run.save(run.files.top(done), state)
        if run.algorithm.family.better(val, state.best_val):
            state.best_val, state.best_iteration = val, done
            run.save(run.files.best, state)
        run.save(run.files.last, state)
        for _, iteration in dropped:
            run.files.top(iteration).unlink(missing_ok=True)

    def stop(self, done: int) -> None:
        """A signal between iterations: last.pt at this iteration, then Stopped."""
        run = self.run
        signum = run.stop.signum or int(signal.SIGTERM)  # torchrun: another rank may have got it
        if run.main:
            run.save(run.files.last, self.state)
        raise Stopped(signum, f"training, at iteration {done} of {self.iterations}")


def _stopped(run: Run | None, stopped: Stopped) -> None:
    """The end of a run stopped by a signal: what is kept and how to continue, said once; the
    requeue handler a scheduler installed for SIGUSR2 (submitit) is called; exits 128 + signum."""
    if run is not None:
        run.close()
        if run.main:
            log.info(f"metarun: {stopped.name} received; {_what_is_kept(run, stopped)}")
        requeue = run.stop.previous_handler(stopped.signum)
        if requeue is not None and stopped.signum != signal.SIGINT:
            requeue(stopped.signum, None)  # submitit (Slurm): requeue; it resumes with resume=auto
    sys.exit(stopped.exit_status)


def _what_is_kept(run: Run, stopped: Stopped) -> str:
    hint = run.resume_hint()
    hint = hint[0].upper() + hint[1:]
    if stopped.during.startswith("training"):
        where = stopped.during.partition(", ")[2]
        return f"stopped {where} and wrote {run.files.last}. {hint}"
    return f"stopped during {stopped.during}; {run.kept()}. {hint}"
