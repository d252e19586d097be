"""The reproduction matrix: every published cell metarun has a preset for, beside metarun's figure.

A cell is a preset (its `metarun train` settings), the published figure it is compared with
(looked up in metarun/report.py's PAPER tables, the one copy of them) and, where the paper scored
differently from the training run's own test, the `metarun eval` settings of its protocol (MAML++'s
top-5 ensemble, Lake's benchmark).

Results live in the repository, small and without checkpoints:

    docs/results/<cell>/seed<N>/results.json   # metarun train's record (command, version, config)
    docs/results/<cell>/seed<N>/eval.json      # metarun eval's, for cells with an eval protocol
    docs/results/estimates.json                # seconds per iteration on a CPU (scripts/bench.py)

`metarun report docs/results --matrix` writes docs/results/matrix.md from them (never typed by
hand); `scripts/reproduce.sh CELL... | all` trains, evaluates, copies the two files and rebuilds it.
`python -m metarun.matrix names | plan CELL...` answers the script's questions.
"""

from __future__ import annotations

import functools
import json
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from metarun import settings
from metarun.data.lake import PUBLISHED_ERROR
from metarun.errors import MetarunError
from metarun.report import PAPER
from metarun.runner.files import RunFiles
from metarun.tasks import family_of_metric

ESTIMATES = "estimates.json"
MATRIX = "matrix.md"


@dataclass(frozen=True)
class MatrixCell:
    """One published cell and how metarun runs it.

    name: its folder under docs/results and its name for scripts/reproduce.sh. algorithm, task:
    the row's words. train: `metarun train` settings (a preset and, for a variant, its switch).
    paper: (dataset, label of a report.PAPER entry, (way, shot)), or None where no figure of
    PAPER applies: `note` then says why, or is the published figure when `note_is_figure` names
    its source. evaluate: `metarun eval` settings of the paper's protocol; empty: the training
    run's own test is the figure. bench: extra settings scripts/bench.py needs to time the preset
    on random batches (the estimate of a cell not run yet)."""

    name: str
    algorithm: str
    task: str
    train: tuple[str, ...]
    paper: tuple[str, str, tuple[int, int]] | None = None
    evaluate: tuple[str, ...] = ()
    note: str = ""
    note_is_figure: str = ""  # the note is a published figure from this source
    bench: tuple[str, ...] = ()


def _omniglot(prefix, algorithm, preset, label, shapes, extra=(), evaluate=(), dataset="omniglot"):
    return [
        MatrixCell(
            f"{prefix}_{dataset}_{way}way_{shot}shot",
            algorithm,
            f"{'Omniglot' if dataset == 'omniglot' else 'miniImageNet'} {way}-way {shot}-shot",
            (f"experiment={preset.format(way=way, shot=shot)}", *extra),
            (dataset, label, (way, shot)),
            evaluate,
        )
        for way, shot in shapes
    ]


FOUR = [(5, 1), (5, 5), (20, 1), (20, 5)]
ONE_SHOT = [(5, 1), (20, 1)]
MINI = [(5, 1), (5, 5)]
NO_FIGURE = "no published figure for this protocol"
PRETRAIN_CLASSES = ("algorithm.num_classes=4400",)  # 1,100 train classes x 4 rotations
CELLS: tuple[MatrixCell, ...] = (
    *_omniglot("maml", "MAML", "maml_paper/omniglot_{way}way_{shot}shot", "MAML (paper)", FOUR),
    *_omniglot(
        "fomaml",
        "first-order MAML",
        "maml_paper/omniglot_{way}way_{shot}shot",
        "first-order MAML (paper)",
        FOUR,
        ("first_order=true",),
    ),
    *_omniglot(
        "metasgd", "Meta-SGD", "metasgd_omniglot_{way}way_1shot", "Meta-SGD (paper)", ONE_SHOT
    ),
    *_omniglot(
        "mamlpp",
        "MAML++ (top-5 ensemble)",
        "mamlpp_paper/omniglot_{way}way_{shot}shot",
        "MAML++ (paper)",
        FOUR,
        evaluate=("ensemble=5",),
    ),
    MatrixCell(
        "anil_omniglot_5way_1shot",
        "ANIL",
        "Omniglot 5-way 1-shot",
        ("experiment=anil_omniglot_5way_1shot",),
        note=f"{NO_FIGURE}: Raghu et al. 2020 give Omniglot 20-way only",
    ),
    *_omniglot("anil", "ANIL", "anil_omniglot_20way_1shot", "ANIL (paper)", [(20, 1)]),
    *_omniglot(
        "reptile", "Reptile", "reptile_omniglot_{way}way_1shot", "Reptile (paper)", ONE_SHOT
    ),
    *_omniglot(
        "reptile_transductive",
        "Reptile + transduction",
        "reptile_omniglot_{way}way_1shot",
        "Reptile + transduction (paper)",
        ONE_SHOT,
        ("algorithm.transductive=true",),
    ),
    *_omniglot(
        "protonet",
        "ProtoNet (60-way training)",
        "protonet_omniglot_{way}way_{shot}shot",
        "ProtoNet (paper, 60-way training)",
        FOUR,
    ),
    *_omniglot(
        "maml",
        "MAML",
        "miniimagenet_5way_{shot}shot",
        "MAML (paper)",
        MINI,
        dataset="miniimagenet",
    ),
    *_omniglot(
        "fomaml",
        "first-order MAML",
        "miniimagenet_5way_{shot}shot",
        "first-order MAML (paper)",
        MINI,
        ("first_order=true",),
        dataset="miniimagenet",
    ),
    *_omniglot(
        "protonet",
        "ProtoNet (30-/20-way training)",
        "protonet_miniimagenet_5way_{shot}shot",
        "ProtoNet (paper, 30-/20-way training)",
        MINI,
        dataset="miniimagenet",
    ),
    MatrixCell(
        "maml_lake_20way_1shot",
        "MAML (error rate, lower is better)",
        "Lake's benchmark: 20 runs of 20-way 1-shot",
        ("experiment=omniglot_20way_1shot", "dataset.split=lake"),
        evaluate=("benchmark=lake",),
        note=", ".join(f"{who} {100 * rate:.1f}" for who, rate in PUBLISHED_ERROR.items()),
        note_is_figure="Lake, Salakhutdinov & Tenenbaum 2015, Science, Fig. 6A",
    ),
    *[
        MatrixCell(
            f"{prefix}_omniglot_{way}way_1shot",
            label,
            f"Omniglot {way}-way 1-shot",
            (f"experiment={preset}_omniglot_{way}way_1shot",),
            note=f"{NO_FIGURE}: Chen et al. 2019 report no Omniglot within-domain table",
            bench=PRETRAIN_CLASSES,
        )
        for prefix, label, preset in (
            ("baseline", "Baseline (pre-training)", "pretrain"),
            ("baselinepp", "Baseline++ (cosine head)", "pretrain_cosine"),
        )
        for way in (5, 20)
    ],
    *[
        MatrixCell(
            f"protomaml_omniglot_{way}way_1shot",
            "Proto-MAML (first order)",
            f"Omniglot {way}-way 1-shot",
            (f"experiment=protomaml_omniglot_{way}way_1shot",),
            note=f"{NO_FIGURE}: Triantafillou et al. 2020 report Meta-Dataset's episodes only",
        )
        for way in (5, 20)
    ],
    *[
        MatrixCell(
            name,
            label,
            f"sinusoid {shot}-shot (MSE after {steps} step{'s' * (steps > 1)}, lower is better)",
            (f"experiment={preset}",),
            note=f"{NO_FIGURE}: Finn et al. 2017 give the sinusoid as figures (Fig. 2, 3)",
        )
        for name, label, preset, shot, steps in (  # steps: the preset's update_step_test
            ("maml_sinusoid_5shot", "MAML", "sinusoid_5shot", 5, 10),
            ("maml_sinusoid_10shot", "MAML", "sinusoid_10shot", 10, 10),
            ("maml_sinusoid_20shot", "MAML", "sinusoid_20shot", 20, 10),
            (
                "joint_sinusoid_10shot",
                'joint training ("pretrained")',
                "sinusoid/joint_10shot",
                10,
                10,
            ),
            ("metasgd_sinusoid_10shot", "Meta-SGD", "sinusoid/metasgd_10shot", 10, 1),
        )
    ],
)
BY_NAME = {cell.name: cell for cell in CELLS}
GROUPS = {
    "all": [c.name for c in CELLS],
    # scripts/reproduce.sh's earlier arguments: a protocol preset's four Omniglot cells
    "maml_paper": [f"maml_omniglot_{w}way_{s}shot" for w, s in FOUR],
    "mamlpp_paper": [f"mamlpp_omniglot_{w}way_{s}shot" for w, s in FOUR],
}


def select(names: list[str]) -> list[MatrixCell]:
    """The cells named (a cell's name or a group of GROUPS), in the matrix's order, each once.
    Raises MetarunError naming the unknown name and where the names are listed."""
    wanted: set[str] = set()
    for name in names:
        if name not in BY_NAME and name not in GROUPS:
            raise MetarunError(
                f"no reproduction cell named {name!r}: use a name of `python -m metarun.matrix "
                f"names` or one of {', '.join(GROUPS)}"
            )
        wanted.update(GROUPS.get(name, [name]))
    return [cell for cell in CELLS if cell.name in wanted]


@functools.cache
def preset(name: str):
    """A cell's composed `metarun train` config (Hydra, as train composes it)."""
    from hydra import compose, initialize_config_dir

    from metarun.cli import CONF

    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name="train", overrides=list(BY_NAME[name].train))


def presets() -> dict:
    """Every cell's composed config, by name."""
    return {c.name: preset(c.name) for c in CELLS}


def paper_iterations() -> dict[str, int]:
    """Each cell's full length: its preset's `iterations`."""
    return {name: int(cfg.iterations) for name, cfg in presets().items()}


def published(cell: MatrixCell) -> tuple[str, str]:
    """(the published figure, its source) of a cell; ("", note) where none is comparable."""
    if cell.paper is None:
        return (cell.note, cell.note_is_figure) if cell.note_is_figure else ("", cell.note)
    dataset, label, shape = cell.paper
    entry = next(e for e in PAPER[dataset] if e[0] == label)
    return entry[2].get(shape, "left out"), entry[1]


# -- reading the runs ------------------------------------------------------------------------------
@dataclass
class SeedRun:
    """One seed's run of a cell, as its results.json (and eval.json) recorded it."""

    seed: int | None
    figure: float | None  # the metric (fraction for accuracy and error rates)
    ci95: float | None
    percent: bool
    iterations: int
    device: str
    threads: int | None
    wall_seconds: float
    command: str
    segments: int
    version: str | None
    eval_command: str | None = None  # the `metarun eval` that made the figure, for eval cells
    off: tuple[str, ...] = ()  # the settings in which the run differs from the cell's protocol


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise MetarunError(
            f"cannot read {path} ({exc}): restore it from git or re-run the cell"
        ) from None


def _headline(cell: MatrixCell, results: dict, record: dict | None) -> tuple:
    """(figure, 95% CI, percent) of the paper's protocol: the eval's, else the run's test."""
    if record is not None and "error_rate" in record:  # Lake's benchmark: errors of 400 images
        return record["error_rate"], None, True
    source = record if record is not None else results
    family = family_of_metric(source.get("metric"))
    key = family.metric if record is not None else family.key("test")
    ci = source.get("ci95") if record is not None else source.get("test_ci95")
    return source.get(key), ci, family.percent


# Settings a run may change without leaving its cell's protocol: where and how fast it ran, its
# seed (the matrix aggregates over seeds), how it was cut into segments, which fixed test tasks
# (a sample, not a protocol). Its iterations are shown on their own.
FREE = (settings.ignored() - {"test_tasks", "val_tasks"}) | {
    "iterations",
    "time_limit",
    "schedule_iterations",
    "eval_seed",
}


def _flat(tree, prefix: str = "") -> dict:
    out = {}
    for key, value in (tree or {}).items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def off_protocol(cell: MatrixCell, config: dict | None, record: dict | None) -> tuple[str, ...]:
    """The settings (`key=value` as the run had them) in which a run's config, or its eval, differs
    from the cell's preset and eval settings; empty for a run of the cell's protocol."""
    from omegaconf import OmegaConf

    if not config:
        return ("its results.json has no config",)
    run = _flat(config)
    paper = _flat(OmegaConf.to_container(preset(cell.name), resolve=True))
    off = [
        f"{key}={json.dumps(run.get(key, 'unset'))}"
        for key in sorted(set(run) | set(paper))
        if key not in FREE and run.get(key) != paper.get(key)
    ]
    if int(run.get("iterations") or 0) > int(paper["iterations"]):  # fewer: "stopped early"
        off.append(f"iterations={run['iterations']} (the paper's: {paper['iterations']})")
    for setting in cell.evaluate:  # ensemble=5 | benchmark=lake
        key, want = setting.split("=", 1)
        have = (record or {}).get(key)
        have = len(have) if isinstance(have, list) else have
        if str(have) != want:
            off.append(f"eval {key}={have}")
    return tuple(off)


def read_seed(cell: MatrixCell, folder: Path) -> SeedRun:
    """A seed folder's run. Raises MetarunError when its results.json is missing or unreadable, or
    a cell with an eval protocol lacks its eval.json."""
    results = _read(folder / RunFiles.RESULTS)
    record = None
    if cell.evaluate:
        if not (folder / RunFiles.EVAL).is_file():
            raise MetarunError(
                f"{folder} has no {RunFiles.EVAL}: the cell is scored by `metarun eval "
                f"{shlex.join(cell.evaluate)}`; run scripts/reproduce.sh {cell.name} again"
            )
        record = _read(folder / RunFiles.EVAL)
    figure, ci, percent = _headline(cell, results, record)
    config = results.get("config") or {}
    history = results.get("history") or [{}]
    first = history[0]
    command = results.get("command") or shlex.join(
        ["metarun", "train", *map(str, first.get("overrides", []))]
    )
    return SeedRun(
        config.get("seed"),
        figure,
        ci,
        percent,
        int(results.get("iterations_done") or 0),
        str(results.get("device") or first.get("device") or "?"),
        results.get("threads"),
        float(results.get("wall_seconds") or 0.0),
        command,
        len(history),
        results.get("metarun_version"),
        (record or {}).get("command"),
        off_protocol(cell, results.get("config"), record),
    )


def read_cell(cell: MatrixCell, root: Path) -> list[SeedRun]:
    """The seed runs kept for a cell under root/<cell>/seed*/ (none: the cell is not run)."""
    folder = root / cell.name
    seeds = sorted(p for p in folder.glob("seed*") if p.is_dir()) if folder.is_dir() else []
    return [read_seed(cell, p) for p in seeds]


# -- writing the matrix ----------------------------------------------------------------------------
HEADER = [
    "algorithm",
    "cell",
    "published",
    "metarun (95% CI; seeds)",
    "iterations",
    "device, wall time",
    "command",
    "version",
]


def _value(x: float, percent: bool) -> str:
    return f"{100 * x:.2f}" if percent else f"{x:.4f}"


# Student's t quantile (0.975) by degrees of freedom: the 95% CI of a mean over a few seeds.
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def figure_text(runs: list[SeedRun]) -> str:
    """One seed: its figure ± its 95% CI over the test tasks; several: the mean over the seeds ±
    the 95% CI of that mean (Student's t, from the seeds' spread). A run off the cell's protocol
    says in which settings."""
    done = [r for r in runs if r.figure is not None]
    if not done:
        return "no figure (the runs have no test)"
    percent = done[0].percent
    if len(done) == 1:
        r = done[0]
        ci = f" ± {_value(r.ci95, percent)}" if r.ci95 is not None else ""
        text = f"{_value(r.figure, percent)}{ci} (seed {r.seed})"
    else:
        n = len(done)
        mean = sum(r.figure for r in done) / n
        sd = (sum((r.figure - mean) ** 2 for r in done) / (n - 1)) ** 0.5
        half = T975.get(n - 1, 1.96) * sd / n**0.5
        text = f"{_value(mean, percent)} ± {_value(half, percent)} (mean of {n} seeds"
        cis = [r.ci95 for r in done if r.ci95 is not None]
        if cis:  # the seeds share their test tasks: the spread of the seeds leaves that out
            text += f"; each seed's own test CI ± {_value(sum(cis) / len(cis), percent)} on average"
        text += ")"
    off = sorted({s for r in runs for s in r.off})
    if off:
        text += f": **not this cell's protocol** ({', '.join(off)})"
    return text


def iterations_text(runs: list[SeedRun], total: int) -> str:
    """Iterations reached (the least of the seeds) of the paper's total; a cell stopped early
    says so."""
    reached = min(r.iterations for r in runs)
    text = f"{reached:,} of {total:,}"
    if reached < total:
        text += f" ({100 * reached / total:.0f}%): **stopped early, not a reproduction**"
    return text


def duration(seconds: float) -> str:
    """Seconds in words: 40 s, 12 min, 5.0 h."""
    if seconds < 60:
        return f"{seconds:.0f} s"
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"


def device_text(runs: list[SeedRun]) -> str:
    """The devices (and threads) the seeds ran on, and their mean wall time."""
    where = []
    for r in runs:
        text = r.device + (f", {r.threads} thread{'s' * (r.threads != 1)}" if r.threads else "")
        where += [text] if text not in where else []
    wall = sum(x.wall_seconds for x in runs) / len(runs)
    return f"{'; '.join(where)}, {duration(wall)}{' a seed' if len(runs) > 1 else ''}"


def command_text(runs: list[SeedRun]) -> str:
    """The command the (first) run recorded, and how many times it was resumed."""
    r = runs[0]
    resumed = f" (then {r.segments - 1} resume{'s' * (r.segments > 2)})" if r.segments > 1 else ""
    scored = f", scored by `{r.eval_command}`" if r.eval_command else ""
    return f"`{r.command}`{resumed}{scored}"


def estimate_text(cell: MatrixCell, estimates: dict) -> str:
    """A cell not run: the estimated time of its training steps (scripts/bench.py --matrix)."""
    estimate = estimates.get("cells", {}).get(cell.name)
    if not estimate:
        return "not run (no estimate)"
    return f"not run; estimated {duration(estimate['s_per_iter'] * paper_iterations()[cell.name])}"


class Sources:
    """The published figures' sources, numbered in order of first use: notes under the table."""

    def __init__(self):
        self.texts: list[str] = []

    def mark(self, text: str) -> str:
        if text not in self.texts:
            self.texts.append(text)
        return f"[{self.texts.index(text) + 1}]"


def row(cell: MatrixCell, root: Path, estimates: dict, sources: Sources) -> list[str]:
    figure, source = published(cell)
    total = paper_iterations()[cell.name]
    runs = read_cell(cell, root)
    if runs:
        versions = sorted({r.version or "not recorded" for r in runs})
        measured = [
            figure_text(runs),
            iterations_text(runs, total),
            device_text(runs),
            command_text(runs),
            ", ".join(versions),
        ]
    else:
        command = f"`scripts/reproduce.sh {cell.name}`"
        measured = ["not run", f"0 of {total:,}", estimate_text(cell, estimates), command, ""]
    return [cell.algorithm, cell.task, f"{figure or 'none'} {sources.mark(source)}", *measured]


def _cell_text(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _estimates_note(estimates: dict) -> str:
    if not estimates:
        return "Estimates: none measured."
    threads = estimates.get("threads")
    threads = f", {threads} thread{'s' * (threads != 1)}" if threads else ""
    return (
        f"Estimates: `{estimates['command']}` on {estimates.get('machine', 'a CPU')}{threads} "
        f"({estimates.get('date', 'undated')}), torch {estimates.get('torch', '?')}: the paper's "
        "iterations times the median seconds of a training step, validation and test not counted."
    )


def matrix_markdown(root: Path) -> str:
    """The matrix as Markdown: one row per cell of CELLS, from the files under root, then the
    sources of the published figures and how the estimates were measured."""
    estimates = _read(root / ESTIMATES) if (root / ESTIMATES).is_file() else {}
    sources = Sources()
    rows = [row(cell, root, estimates, sources) for cell in CELLS]
    run = sum(r[3] != "not run" for r in rows)
    early = sum("stopped early" in r[4] or "not this cell's protocol" in r[3] for r in rows)
    lines = [
        "| " + " | ".join(HEADER) + " |",
        "| " + " | ".join("---" for _ in HEADER) + " |",
        *("| " + " | ".join(_cell_text(c) for c in r) + " |" for r in rows),
        "",
        f"{run - early} of {len(rows)} cells run to the paper's length and protocol, {early} "
        "stopped early or off protocol. "
        "Accuracy and error rates in %, MSE as it is. " + _estimates_note(estimates),
        "",
        *(f"{i}. {text}" for i, text in enumerate(sources.texts, 1)),
    ]
    banner = (
        "<!-- generated by `metarun report DIR --matrix` from the result files in this folder: "
        "edit those, never this file -->"
    )
    return "\n".join([banner, *lines]) + "\n"


def write_matrix(root: Path) -> str:
    """Writes root/matrix.md and returns its text. Raises MetarunError for an unreadable record
    or an unwritable root."""
    from metarun.io import atomic_write_text

    if not root.is_dir():
        raise MetarunError(
            f"{root} is not a folder of results: give the matrix's folder (docs/results)"
        )
    text = matrix_markdown(root)
    atomic_write_text(root / MATRIX, text)
    return text


def plan(names: list[str]) -> list[str]:
    """scripts/reproduce.sh's plan: a line per cell named, `<cell>\t<the paper's iterations>\t
    <train settings>\t<eval settings>` (settings space-separated: none of them holds a space)."""
    return [
        "\t".join([c.name, str(preset(c.name).iterations), " ".join(c.train), " ".join(c.evaluate)])
        for c in select(names)
    ]


def main(argv: list[str]) -> int:
    """`python -m metarun.matrix names | plan NAME...`: the cells' and groups' names, or the plan
    of the cells named (one line each); exit status 2 and one line for an unknown name."""
    usage = "usage: python -m metarun.matrix names | plan NAME..."
    if not argv or argv[0] not in {"names", "plan"}:
        print(usage, file=sys.stderr)
        return 2
    try:
        lines = [*GROUPS, *BY_NAME] if argv[0] == "names" else plan(argv[1:])
    except MetarunError as exc:
        print(f"metarun: error: {exc}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
