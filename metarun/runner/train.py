"""The meta-training loop: episodes -> meta-step -> logs, validation, checkpoints; test at the end."""

from __future__ import annotations

import json
import logging
import math
import shlex
import shutil
import signal
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from metarun import settings
from metarun.algorithms.base import meta_train_step
from metarun.errors import MetarunError, require_writable_dir
from metarun.runner import distributed
from metarun.runner.checkpoint import (
    checkpoint_params,
    load_checkpoint,
    nonfinite_tensor,
    resolve_checkpoint_path,
    save_checkpoint,
)
from metarun.runner.evaluate import describe, evaluate_tasks
from metarun.runner.logs import console_through_tqdm
from metarun.runner.resume import auto_resume, history_entry, resumed_config
from metarun.runner.setup import (
    build_algorithm,
    check_train_settings,
    configure_execution,
    describe_splits,
    load_splits,
    resolve_device,
)
from metarun.tasks import CLASSIFICATION, TaskFamily

log = logging.getLogger("metarun")

HPARAM_KEYS = settings.hparams()  # metarun/settings.py: the settings marked hparam


# SIGUSR2: Slurm's preemption warning as submitit asks for it (`#SBATCH --signal=USR2@<seconds>`).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM) + (
    (signal.SIGUSR2,) if hasattr(signal, "SIGUSR2") else ()
)


class StopRequest:
    """SIGINT/SIGTERM/SIGUSR2 set a flag; the loop finishes its iteration, writes a checkpoint and exits."""

    def __init__(self):
        self.signum = None
        self._old = {}

    def __enter__(self):
        for sig in STOP_SIGNALS:
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def previous_handler(self, signum):
        """The handler this one replaced, when it is a Python function (submitit's requeue on SIGUSR2)."""
        old = self._old.get(signum)
        return old if callable(old) else None

    def _handle(self, signum, frame):
        if self.signum is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def top_path(ckpt_dir: Path, iteration: int) -> Path:
    return ckpt_dir / "top" / f"iteration-{iteration}.pt"


def rank_top(
    top: list, val: float, iteration: int, keep: int, family: TaskFamily = CLASSIFICATION
) -> tuple[list, list]:
    """The K best validations (the best first by the task family's metric: higher accuracy, lower
    MSE; the earlier on ties) after adding this one, and the entries that fell out."""
    ranked = sorted(top + [[val, iteration]], key=lambda e: (family.rank_key(e[0]), e[1]))
    return ranked[:keep], ranked[keep:]


def _diverged(what: str, done: int, exact: bool, ckpt_dir: Path, cfg) -> MetarunError:
    kept = ckpt_dir / "last.pt"
    return MetarunError(
        f"{what} at iteration {done}{'' if exact else ' (or shortly before)'}; training stopped and "
        f"{f'the last good checkpoint {kept} is kept' if kept.exists() else 'no checkpoint had been written yet'}. "
        f"Lower update_lr (now {cfg.update_lr}) or meta_lr (now {cfg.meta_lr})."
    )


def resolved_settings(cfg, device, execution: dict, source: str) -> dict:
    """The run's settings with what `auto`, 0 and interpolations became: device, impl, threads, data root,
    and where the data came from (`data_source`)."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    resolved["device"] = str(device)
    resolved["algorithm"]["impl"] = execution["impl"]
    resolved["threads"] = execution["threads"]
    if resolved["dataset"].get("root"):
        resolved["dataset"]["root"] = str(Path(resolved["dataset"]["root"]).expanduser().absolute())
    resolved["data_source"] = source
    return resolved


def train(cfg, run_dir: Path, overrides=()) -> dict:
    """Meta-trains (or, with cfg.resume, continues) a run in `run_dir`; returns its results.json record.

    `overrides` are the command line's settings: on resume the saved run's config is the base and only
    these may change it (see metarun/runner/resume.py). Raises MetarunError for a user error."""
    # From the start: a SIGINT/SIGTERM during setup stops the run after its first iteration, cleanly.
    with StopRequest() as stop:
        return _train(cfg, run_dir, overrides, stop)


def _train(cfg, run_dir: Path, overrides, stop: StopRequest) -> dict:
    wall_start = time.perf_counter()
    main = (
        distributed.is_main()
    )  # torchrun: rank 0 alone logs, validates, checkpoints and writes results
    resume = cfg.resume
    if (
        resume == "auto"
    ):  # a requeued job: continue this dir's run if it wrote a checkpoint, else start
        resume = auto_resume(run_dir)
    resumed, changes = None, {}
    if resume:
        resumed = load_checkpoint(resume, "resume")
        cfg, changes = resumed_config(resumed, cfg, overrides, resume)
    check_train_settings(cfg)
    if main and resumed is None and (hint := settings.preset_hint(cfg, overrides)):
        log.warning(hint)  # e.g. way=20 with the 5-way step sizes: name the tuned preset, once
    device = distributed.device_for_rank(resolve_device(cfg.device))
    if distributed.world_size() > 1:
        distributed.share(int(cfg.meta_batch))  # every process needs a task
    config = OmegaConf.to_container(cfg, resolve=True)
    ckpt_dir = run_dir / "checkpoints"
    if resumed is None and (ckpt_dir / "last.pt").exists():
        raise MetarunError(
            f"{run_dir} already holds another run's checkpoints: continue it with resume={run_dir}, "
            "or choose a new hydra.run.dir."
        )
    if main:
        require_writable_dir(ckpt_dir)

    # A resumed run keeps its execution (float32 results depend on the operation order) unless this resume
    # changes it: another impl or thread count asked for, or another device type than the run's last one.
    kept = resumed.get("algorithm") if resumed is not None else None
    last_device = str((resumed or {}).get("resolved", {}).get("device", device))
    # (torchrun: also when the number of processes changes, so that their threads share the cores again)
    last_processes = int(((resumed or {}).get("history") or [{}])[-1].get("processes", 1))
    if kept and (
        changes.keys() & {"algorithm.impl", "threads"}
        or torch.device(last_device).type != device.type
        or last_processes != distributed.world_size()
    ):
        kept = None
    # the algorithm checks its own settings here, before any data is loaded
    execution = configure_execution(cfg, device, kept)
    model, algorithm = build_algorithm(cfg, device, execution)
    data = load_splits(cfg, device)
    splits = data["splits"]
    algorithm.bind_data(
        splits
    )  # settings only the data can check (train_shots, the classifier's classes)
    resolved = resolved_settings(cfg, device, execution, data["source"])
    if main:
        (run_dir / "resolved.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(resolved)))
    parallel = (
        f", {distributed.world_size()} torchrun processes" if distributed.world_size() > 1 else ""
    )
    log.info(
        f"metarun: {algorithm.family.shape(cfg)} {cfg.query}-query on {device} "
        f"({algorithm.describe()}, "
        f"{execution['threads']} thread{'s' if execution['threads'] != 1 else ''}{parallel}), "
        f"{data['source']}"
        f"{describe_splits(splits)}; run dir {run_dir}"
    )

    init = algorithm.init_meta_params(torch.Generator().manual_seed(int(cfg.seed)), device=device)
    params = {k: v.requires_grad_(True) for k, v in init.items()}
    optimizer = algorithm.make_optimizer(list(params.values()), float(cfg.meta_lr))
    sampler = algorithm.train_sampler(
        cfg, splits["train"], device
    )  # episodes, or the algorithm's own batches
    family = algorithm.family  # its metric: which validation is best (metarun/tasks.py)
    start, best_val, best_iteration = 0, family.worst, 0
    train_seconds, wall_before, history = 0.0, 0.0, []
    top = []  # [[val accuracy, iteration], ...] of the kept best checkpoints, best first
    if resumed is not None:
        saved = checkpoint_params(resumed, params, resume, "resume")
        with torch.no_grad():
            for k, v in params.items():
                v.copy_(saved[k])
        optimizer.load_state_dict(resumed["optimizer"])
        start, best_val = int(resumed["iteration"]), float(resumed["best_val"])
        best_iteration, train_seconds = (
            int(resumed["best_iteration"]),
            float(resumed["train_seconds"]),
        )
        top = [list(e) for e in resumed.get("top", [])]
        wall_before, history = (
            float(resumed.get("wall_seconds", 0.0)),
            list(resumed.get("history", [])),
        )
        resume_file = resolve_checkpoint_path(resume, "resume")
        best_file = resume_file.parent / "best.pt"
        if best_file.is_file() and best_file.resolve() != resume_file.resolve():
            load_checkpoint(
                best_file, "resume"
            )  # the end of training scores it: refuse a damaged one now
        if (
            main and resume_file.parent.resolve() != ckpt_dir.resolve()
        ):  # a branch of the run in a new dir
            if best_file.is_file():
                shutil.copyfile(best_file, ckpt_dir / "best.pt")
            else:  # its best checkpoint is unknown: the branch's next validation writes one
                best_val, best_iteration = family.worst, 0
            for entry in top:  # the kept best checkpoints go with it (eval ensemble=K)
                source = top_path(resume_file.parent, int(entry[1]))
                if source.is_file():
                    top_path(ckpt_dir, int(entry[1])).parent.mkdir(exist_ok=True)
                    shutil.copyfile(source, top_path(ckpt_dir, int(entry[1])))
            top = [e for e in top if top_path(ckpt_dir, int(e[1])).is_file()]
        if isinstance(resumed.get("sampler"), dict):
            sampler.load_state(resumed["sampler"])
        else:  # an older checkpoint's generator state only fits the generator type that wrote it
            sampler.load_state({"seed": int(cfg.seed), "draws": start})
            log.warning(
                f"metarun: warning: {resume} carries a device-specific sampler state (an older metarun); "
                f"training tasks continue from a fresh deterministic draw (seed {cfg.seed}, draw {start})."
            )
        log.info(
            f"metarun: resumed from {resume} at iteration {start}"
            + (
                f", changed: {', '.join(f'{k} {a} -> {b}' for k, (a, b) in changes.items())}"
                if changes
                else ""
            )
        )
    distributed.broadcast_params(params)  # every rank starts from rank 0's weights
    history.append(
        {
            **history_entry(start, resume, changes, overrides),
            "device": str(device),
            "impl": execution["impl"],
            "threads": execution["threads"],
            **({"processes": distributed.world_size()} if distributed.world_size() > 1 else {}),
        }
    )

    from torch.utils.tensorboard import SummaryWriter

    # Events after the checkpoint's iteration were lost with the interruption and are redrawn; those of the
    # checkpoint's own iteration were written before it was saved and stay.
    writer = (
        SummaryWriter(
            str(run_dir / "tensorboard"), purge_step=start + 1 if resumed is not None else None
        )
        if main
        else distributed.NullWriter()
    )

    def state(iteration: int) -> dict:
        bad = nonfinite_tensor({k: v.detach() for k, v in params.items()})
        if bad:  # never let non-finite weights reach a checkpoint
            raise _diverged(
                f"the weights became non-finite ({bad})", iteration, True, ckpt_dir, cfg
            )
        return {
            "iteration": iteration,
            "params": {k: v.detach().cpu() for k, v in params.items()},
            "optimizer": optimizer.state_dict(),
            "sampler": sampler.state(),
            "best_val": best_val,
            "best_iteration": best_iteration,
            "train_seconds": train_seconds,
            "wall_seconds": wall_before + time.perf_counter() - wall_start,
            "config": config,
            "resolved": resolved,
            "history": history,
            "algorithm": algorithm.state_dict(),
            "top": [list(e) for e in top],
        }

    iterations, log_every = int(cfg.iterations), int(cfg.log_every)
    per_iteration, unit = algorithm.train_unit(
        cfg
    )  # meta_batch tasks (the baseline: images) per iteration
    # time_limit: minutes of this segment's wall clock after which training ends as if `iterations` were
    # reached (a last validation, the test, results.json); the run can be continued later with resume.
    deadline = wall_start + 60 * float(cfg.time_limit) if cfg.get("time_limit") else None
    done, out_of_time = start, False
    check_every_step = device.type == "cpu"  # on CUDA a per-step .item() would stall the pipeline
    window_start, window_items = time.perf_counter(), 0
    bar = tqdm(
        total=iterations,
        initial=start,
        desc="meta-train",
        unit="it",
        dynamic_ncols=True,
        file=sys.stdout,
        mininterval=1.0,
        disable=not main,
    )
    with console_through_tqdm():
        for it in range(start, iterations):
            algorithm.begin_iteration(
                it, optimizer
            )  # the algorithm's schedules (epochs, meta learning rate)
            episodes = sampler.sample(int(cfg.meta_batch))
            done = it + 1
            window_items += per_iteration
            out_of_time = (
                deadline is not None and time.perf_counter() >= deadline and done < iterations
            )
            if distributed.world_size() > 1:
                # Every rank stops at the same iteration: the all-reduced flags (a signal on any rank, rank 0's
                # clock for time_limit), read at the same iterations on every rank.
                result, flags = distributed.train_step(
                    algorithm,
                    params,
                    optimizer,
                    episodes,
                    stop.signum is not None,
                    out_of_time and main,
                )
                read = (
                    check_every_step
                    or deadline is not None
                    or done % log_every == 0
                    or done % int(cfg.eval_every) == 0
                    or done == iterations
                )
                stops, timed = flags.tolist() if read else (0.0, 0.0)
                stopping, out_of_time = stops > 0, timed > 0 and done < iterations
            else:
                result = meta_train_step(algorithm, params, optimizer, episodes)
                stopping = stop.signum is not None
            last = done == iterations or out_of_time
            logging_step = done % log_every == 0 or last
            validating = done % int(cfg.eval_every) == 0 or last
            # Every step on the CPU; on CUDA at least before anything is logged, validated or saved.
            if check_every_step or logging_step or validating or stopping:
                loss = result.meta_loss.item()
                if not math.isfinite(loss):
                    bar.close()
                    raise _diverged(
                        f"the meta-loss became {loss}", done, check_every_step, ckpt_dir, cfg
                    )
            bar.update(1)
            if logging_step:
                # The .item() above synchronised the device, so the window's wall time is its compute time.
                elapsed = time.perf_counter() - window_start
                train_seconds += elapsed
                speed = window_items / elapsed if elapsed > 0 else float("nan")
                accuracy = result.accuracy.mean().item()
                writer.add_scalar("train/meta_loss", loss, done)
                writer.add_scalar(f"train/{family.metric}", accuracy, done)
                writer.add_scalar(f"speed/{unit}_per_s", speed, done)
                writer.add_scalar("lr/meta_lr", optimizer.param_groups[0]["lr"], done)
                for tag, value in algorithm.scalars(params).items():
                    writer.add_scalar(tag, value, done)
                bar.set_postfix(
                    loss=f"{loss:.3f}",
                    **{family.metric[:3]: f"{accuracy:.3f}", f"{unit}_s": f"{speed:.1f}"},
                )
                window_start, window_items = time.perf_counter(), 0
            if validating and main:
                bad = nonfinite_tensor({k: v.detach() for k, v in params.items()})
                if (
                    bad
                ):  # the loss can still be finite when a weight the query pass barely uses is not
                    bar.close()
                    raise _diverged(
                        f"the weights became non-finite ({bad})",
                        done,
                        check_every_step,
                        ckpt_dir,
                        cfg,
                    )
                if (
                    not logging_step
                ):  # close the speed window (the loss check synced) so validation is not counted
                    train_seconds += time.perf_counter() - window_start
                val, ci = evaluate_tasks(
                    algorithm, params, splits["val"], "val", cfg, device, int(cfg.val_tasks)
                )
                writer.add_scalar(f"val/{family.metric}", val, done)
                writer.add_scalar("val/ci95", ci, done)
                for tag, values in algorithm.histograms(params).items():
                    writer.add_histogram(tag, values, done)
                log.info(
                    f"iteration {done}: "
                    + describe(val, ci, int(cfg.val_tasks), cfg.way, cfg.shot, "validation", family)
                )
                top, dropped = rank_top(top, val, done, int(cfg.keep_best), family)
                if any(e[1] == done for e in top):
                    save_checkpoint(top_path(ckpt_dir, done), state(done))
                if family.better(val, best_val):
                    best_val, best_iteration = val, done
                    save_checkpoint(ckpt_dir / "best.pt", state(done))
                save_checkpoint(ckpt_dir / "last.pt", state(done))
                for entry in dropped:  # only once last.pt no longer lists them
                    top_path(ckpt_dir, entry[1]).unlink(missing_ok=True)
                window_start, window_items = (
                    time.perf_counter(),
                    0,
                )  # validation time is not training speed
            if stopping:
                signum = stop.signum or int(
                    signal.SIGTERM
                )  # torchrun: another rank may have got it
                if main:
                    save_checkpoint(ckpt_dir / "last.pt", state(done))
                bar.close()
                writer.close()
                name = signal.Signals(signum).name
                log.info(
                    f"metarun: {name} received; stopped at iteration {done} of {iterations} and wrote "
                    f"{ckpt_dir / 'last.pt'}. Resume with: metarun train resume={shlex.quote(str(run_dir))}"
                )
                requeue = stop.previous_handler(signum)
                if requeue is not None and signum != signal.SIGINT:
                    requeue(
                        signum, None
                    )  # submitit (Slurm): requeue the job, which resumes with resume=auto
                distributed.finish()
                sys.exit(128 + signum)
            if out_of_time:
                log.info(
                    f"metarun: time_limit={cfg.time_limit} min reached at iteration {done} of {iterations}; "
                    f"testing the best checkpoint. Continue with: metarun train resume={shlex.quote(str(run_dir))}"
                )
                break
    bar.close()
    if not main:  # rank 0 tests the best checkpoint and writes the results
        writer.close()
        distributed.finish()
        return {"status": "completed", family.key("best_val"): None}
    distributed.finish()

    best = load_checkpoint(ckpt_dir / "best.pt", "checkpoint")
    best_saved = checkpoint_params(best, params, ckpt_dir / "best.pt", "checkpoint")
    best_params = {k: v.to(device) for k, v in best_saved.items()}
    test, test_ci = evaluate_tasks(
        algorithm, best_params, splits["test"], "test", cfg, device, int(cfg.test_tasks)
    )
    log.info(
        describe(test, test_ci, int(cfg.test_tasks), cfg.way, cfg.shot, "test", family)
        + f" with the best checkpoint "
        f"(iteration {best_iteration})"
    )
    speed = (
        done * per_iteration / train_seconds if train_seconds > 0 else float("nan")
    )  # whole run, resumes too
    segment_wall = time.perf_counter() - wall_start
    results = {
        "status": "completed",
        "iterations_done": done,
        "stopped_by": "time_limit" if out_of_time else "iterations",
        "config": config,
        "resolved": resolved,
        "metric": family.metric,
        family.key("best_val"): best_val,
        "best_iteration": best_iteration,
        family.key("test"): test,
        "test_ci95": test_ci,
        "test_tasks": int(cfg.test_tasks),
        "train_seconds": train_seconds,
        "wall_seconds": wall_before + segment_wall,
        "segment_wall_seconds": segment_wall,
        f"{unit}_per_s": speed,
        "device": str(device),
        "impl": algorithm.impl,
        "algorithm": algorithm.name,
        "workers": algorithm.workers,
        "threads": execution["threads"],
        "data_source": data["source"],
        "history": history,
    }
    writer.add_hparams(
        {"algorithm": algorithm.name, **{k: cfg[k] for k in HPARAM_KEYS}},
        {
            f"hparam/{family.key('best_val')}": best_val,
            f"hparam/{family.key('test')}": test,
            f"hparam/{unit}_per_s": speed,
        },
        run_name=".",
    )
    writer.close()
    (run_dir / "results.json").write_text(json.dumps(results, indent=2))
    log.info(f"metarun: run dir {run_dir} (results.json, checkpoints/, tensorboard/)")
    return results
