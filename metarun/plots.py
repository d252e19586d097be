"""Pictures (matplotlib, the optional extra `pip install 'metarun[plot]'`).

- `metarun eval ... plot=true` on a regression run: eval.png beside eval.json, the MAML paper's
  Figure 2 (Finn et al. 2017) for the first PLOT_TASKS fixed tasks of the split: the ground truth,
  the K support points, and the learner's prediction before adaptation and after 1 and 10 inner
  steps.
- `metarun report DIR --plot`: validation.png, the validation metric of each run against the
  iteration (from its TensorBoard events), and, where evals with `steps=` exist, inner_steps.png,
  the metric against the number of inner steps.
Files are written with the Agg backend (no display); nothing process-wide changes.
"""

from __future__ import annotations

from pathlib import Path

import torch

from metarun.errors import MetarunError
from metarun.runner.files import RunFiles

PLOT_TASKS = 4
PLOT_STEPS = (0, 1, 10)  # the paper's Figure 2: pre-update, 1 and 10 gradient steps
GRID = 200  # points of the drawn curves


def pyplot():
    """matplotlib's pyplot on the Agg backend; a one-line MetarunError without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        raise MetarunError(
            "pictures need matplotlib: pip install 'metarun[plot]' (or pip install matplotlib)."
        ) from None
    from matplotlib.figure import Figure

    del matplotlib  # only its presence is checked; figures are made without pyplot's global state
    return Figure


def check_plot(family, cfg) -> None:
    """`plot=true` can draw this checkpoint's tasks: a regression run, and matplotlib present."""
    if family.name != "regression":
        raise MetarunError(
            "plot=true draws regression tasks (a dataset=sinusoid run): drop plot=true for this "
            f"{family.name} checkpoint."
        )
    pyplot()


def plot_eval_tasks(algorithm, params: dict, split, cfg, device, out_dir: Path) -> Path:
    """eval.png: PLOT_TASKS fixed tasks of `split` (a data/sinusoid.SineTasks) with the ground
    truth, the support points and the predictions after PLOT_STEPS inner steps. Returns its path."""
    Figure = pyplot()
    ep = next(iter(split.fixed_tasks(cfg, device, PLOT_TASKS, int(cfg.eval_seed), PLOT_TASKS)))
    low, high = split.input_range
    grid = torch.linspace(low, high, GRID, device=device).view(1, GRID, 1).expand(PLOT_TASKS, -1, 1)
    truth = ep.amp.view(-1, 1, 1) * torch.sin(grid - ep.phase.view(-1, 1, 1))
    on_grid = type(ep)(ep.x_support, ep.y_support, grid, truth, ep.amp, ep.phase)
    curves = algorithm.query_logits_curve(params, on_grid, list(PLOT_STEPS)).cpu()  # [S, T, G, 1]
    fig = Figure(figsize=(4 * PLOT_TASKS, 3.4), layout="constrained")
    axes = fig.subplots(1, PLOT_TASKS, sharey=True)
    x = grid[0, :, 0].cpu()
    styles = {0: ":", 1: "--", 10: "-"}
    for t, ax in enumerate(axes):
        ax.plot(x, truth[t, :, 0].cpu(), color="red", label="ground truth")
        ax.scatter(
            ep.x_support[t, :, 0].cpu(),
            ep.y_support[t, :, 0].cpu(),
            marker="^",
            color="purple",
            zorder=3,
            label=f"{ep.x_support.shape[1]} support points",
        )
        for i, s in enumerate(PLOT_STEPS):
            name = "pre-update" if s == 0 else f"{s} grad step{'s' if s > 1 else ''}"
            ax.plot(
                x,
                curves[i, t, :, 0],
                styles.get(s, "-"),
                color="green",
                alpha=0.4 + 0.6 * i / max(len(PLOT_STEPS) - 1, 1),
                label=name,
            )
        ax.set_title(f"A={ep.amp[t].item():.2f}, phase={ep.phase[t].item():.2f}")
        ax.set_xlabel("x")
    axes[0].set_ylabel("y")
    axes[0].legend(fontsize="small", loc="lower left")
    fig.suptitle(f"{algorithm.name}, {algorithm.family.shape(cfg)}: fixed {split.split} tasks")
    path = Path(out_dir) / "eval.png"
    fig.savefig(path, dpi=100)
    return path


def validation_series(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(iteration, value)]} of the `val/` scalars (not the CI) in a run's TensorBoard
    events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folder = Path(run_dir) / RunFiles.TENSORBOARD
    if not folder.is_dir():
        return {}
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    tags = [t for t in events.Tags().get("scalars", []) if t.startswith("val/") and "ci95" not in t]
    return {t: [(e.step, e.value) for e in events.Scalars(t)] for t in tags}


def plot_validation(runs: dict[str, Path], out: Path) -> Path | None:
    """validation.png: each run's validation metric against the iteration (one panel per metric);
    None when no run has validation events. runs: {label: run dir}."""
    series = {label: validation_series(d) for label, d in runs.items()}
    tags = sorted({t for s in series.values() for t in s})
    if not tags:
        return None
    Figure = pyplot()
    fig = Figure(figsize=(6 * len(tags), 4), layout="constrained")
    axes = fig.subplots(1, len(tags), squeeze=False)[0]
    for ax, tag in zip(axes, tags, strict=False):
        for label, s in series.items():
            if tag in s:
                steps, values = zip(*s[tag], strict=False)
                ax.plot(steps, values, marker=".", label=label)
        lower = tag.endswith("mse")
        ax.set_title(f"{tag} ({'lower' if lower else 'higher'} is better)")
        ax.set_xlabel("iteration")
        if lower:
            ax.set_yscale("log")
        ax.legend(fontsize="small")
    path = out / "validation.png"
    fig.savefig(path, dpi=100)
    return path


def plot_inner_steps(curves: dict[str, tuple[str, list]], out: Path) -> Path | None:
    """inner_steps.png: the metric (± 95% CI) against the number of inner steps of each eval with
    `steps=` (the MAML paper's Figure 3); None without any. curves: {label: (metric, eval.json's
    curve list)}."""
    if not curves:
        return None
    Figure = pyplot()
    metrics = sorted({m for m, _ in curves.values()})
    fig = Figure(figsize=(6 * len(metrics), 4), layout="constrained")
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    for ax, metric in zip(axes, metrics, strict=False):
        for label, (m, points) in curves.items():
            if m != metric:
                continue
            steps = [p["steps"] for p in points]
            values = [p[metric] for p in points]
            ci = [p.get("ci95") or 0.0 for p in points]
            ax.errorbar(steps, values, yerr=ci, marker="o", capsize=3, label=label)
        lower = metric == "mse"
        ax.set_title(
            f"{metric} after each number of inner steps "
            f"({'lower' if lower else 'higher'} is better)"
        )
        ax.set_xlabel("inner gradient steps")
        ax.set_ylabel(metric)
        ax.legend(fontsize="small")
    path = out / "inner_steps.png"
    fig.savefig(path, dpi=100)
    return path
