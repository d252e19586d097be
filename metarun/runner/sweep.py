"""A sweep's cells (`metarun -m`): each in a dir of its own, and a summary of those that failed.

Hydra runs each cell as a job in `<hydra.sweep.dir>/<hydra.sweep.subdir>`. The cells of Hydra's
basic sweeper are checked before the first one runs (metarun/cli.py); a sweeper that chooses its
cells as it goes (Optuna) has cells known only here, in the job. So each cell claims its dir before
it writes anything. Hydra would write the `.hydra/` record into any dir before a hook of ours runs,
so sweeps run with `hydra.output_subdir=null` (the subdir to use is in the job's environment,
METARUN_OUTPUT_SUBDIR) and `write_record` writes it once the dir is the cell's. A failed cell's
reason goes into its results.json (what `metarun report` reads) unless that file holds a finished
run's record, and always into the sweep's own `.metarun-cells/<job number>.json`, which the
failed-cell summary reads: this command's cells only.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from omegaconf import OmegaConf

from metarun.runner import rundir
from metarun.runner.files import RunFiles

# In the sweep dir: one record per cell of the last command that failed or was refused.
CELLS = ".metarun-cells"
# In a cell's environment (hydra.job.env_set): the subdir a freshly claimed cell writes .hydra/ in.
OUTPUT_SUBDIR = "METARUN_OUTPUT_SUBDIR"


def settings_of(overrides) -> list[str]:
    """The overrides that set the command's own settings: not Hydra's (hydra.*, hydra/<group>=)."""
    return [o for o in map(str, overrides) if not o.lstrip("+~").startswith(("hydra.", "hydra/"))]


def check_continuation(cfg, run_dir: Path, overrides) -> None:
    """`resume=auto` in a dir that holds a run: raises the MetarunError that resuming it with these
    overrides would raise (e.g. a setting that cannot change on resume), before anything is
    written."""
    from metarun.runner.checkpoint import load_checkpoint
    from metarun.runner.resume import auto_resume, resumed_config

    resume = auto_resume(run_dir)
    if resume is not None:  # else the run had written no checkpoint: it starts again in its dir
        resumed_config(load_checkpoint(resume, "resume"), cfg, settings_of(overrides), resume)


def claim(cfg, run_dir: Path, overrides) -> bool:
    """Makes `run_dir` the cell's: True when freshly claimed, False when the cell continues the run
    in it (resume=auto: a requeued cell, or the same sweep again). Raises MetarunError, leaving the
    dir as it was, when it is another run's or that run may not be continued this way."""
    if cfg.get("resume") == "auto" and (run_dir / rundir.MARKER).exists():
        check_continuation(cfg, run_dir, overrides)
        rundir.lock_existing(run_dir)
        return False
    rundir.claim(run_dir, auto=False)
    return True


def write_record(cfg, hydra_cfg, run_dir: Path) -> None:
    """What Hydra writes into a job's output subdir (config.yaml, hydra.yaml, overrides.yaml), for a
    cell that has just claimed its dir; nothing when the command asked for no record
    (hydra.output_subdir=null)."""
    subdir = os.environ.get(OUTPUT_SUBDIR)
    if not subdir:
        return
    hydra_node = OmegaConf.create({"hydra": OmegaConf.to_container(hydra_cfg)})
    hydra_node.hydra.output_subdir = subdir  # as Hydra would have recorded it
    hydra_node.hydra.job.env_set.pop(OUTPUT_SUBDIR, None)
    out = run_dir / subdir
    out.mkdir(parents=True, exist_ok=True)
    for name, node in (
        ("config.yaml", cfg),
        ("hydra.yaml", hydra_node),
        ("overrides.yaml", hydra_cfg.overrides.task),
    ):
        (out / name).write_text(OmegaConf.to_yaml(node))


def _finished(results: Path) -> bool:
    try:
        return json.loads(results.read_text()).get("status") == "completed"
    except (OSError, ValueError, AttributeError):
        return False


def _config(cfg):
    """The cell's resolved config (`metarun report` reads its settings from it), or None."""
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except Exception:
        return None  # e.g. an environment variable the config needs is unset: the overrides say it


def record_failure(hydra_cfg, run_dir: Path, reason: str, overrides, cfg=None) -> None:
    """A failed cell (cfg given: it had claimed `run_dir`) or a refused one (cfg None: the dir is
    not its own): the reason on stderr, in the sweep's record and, for a failed cell whose dir holds
    no finished run's record, in its results.json (status failed, the overrides and resolved config,
    which `metarun report` reads)."""
    failed = cfg is not None
    print(
        f"metarun: sweep cell {run_dir} {'failed' if failed else 'refused'}: {reason}",
        file=sys.stderr,
        flush=True,
    )
    record = {
        "status": "failed" if failed else "refused",
        "reason": reason,
        "overrides": [str(o) for o in overrides],
        "config": _config(cfg) if failed else None,
    }
    results = run_dir / RunFiles.RESULTS
    if failed and not _finished(results):
        results.write_text(json.dumps(record, indent=2))
    cells = Path(hydra_cfg.sweep.dir) / CELLS
    cells.mkdir(exist_ok=True)
    record["run_dir"] = str(run_dir)
    (cells / f"{hydra_cfg.job.num}.json").write_text(json.dumps(record, indent=2))


def forget(sweep_dir: Path) -> None:
    """Drops the records of an earlier command in this sweep dir (the summary is of this command's
    cells)."""
    for path in (Path(sweep_dir) / CELLS).glob("*.json"):
        path.unlink(missing_ok=True)


def failed_cells(sweep_dir: Path, swept) -> list[str]:
    """'<cell> [<its swept settings>]: <reason>' of each cell of this command that failed or was
    refused."""
    failed = []
    for path in sorted(
        (Path(sweep_dir) / CELLS).glob("*.json"), key=lambda p: (len(p.stem), p.stem)
    ):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        cell = [o for o in record.get("overrides", []) if o.split("=", 1)[0].lstrip("+~") in swept]
        where = Path(record.get("run_dir", path.stem))
        if where.is_relative_to(sweep_dir):
            where = where.relative_to(sweep_dir)
        failed.append(f"{where} [{' '.join(cell)}]: {str(record.get('reason')).rstrip('.')}")
    return failed
