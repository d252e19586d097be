"""`metarun report DIR... [--out DIR] [--paper]`: one table of the results of a sweep or of several runs.

Reads every `results.json` (`metarun train`) and `eval.json` (`metarun eval`) in the given run dirs or below
the given sweep dirs, and lays them out like Table 1 of Finn et al. (2017): one row per combination of the
settings that differ between the runs (always way and shot first), one column per algorithm (algorithm.name,
first_order, and any algorithm.* setting that differs within one algorithm); `file` (results.json or
eval.json) is a row setting when both kinds are given, so a run and a later eval of it stay apart. A cell is "mean ± 95% CI" (%) of
one run's test accuracy; several seeds of one cell are "mean ± std (N seeds)" over the seeds (sample std); a
cell whose runs all failed ("status": "failed" in results.json) reads "failed" and its reason is listed under
the table. `--paper` adds the published Omniglot or miniImageNet figures (PAPER) as extra columns,
each with its source. The table is printed and written as report.md and report.csv (one line per
cell, numbers in %).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from metarun.errors import MetarunError

# Settings that never make two runs different experiments: the seed (aggregated over), where and how fast it ran.
IGNORED = {
    "seed",
    "resume",
    "device",
    "log_every",
    "eval_chunk",
    "test_tasks",
    "val_tasks",
    "dataset.root",
    "dataset.cache_dir",
    "dataset.source",
    "dataset.download",
    "algorithm.impl",
    "algorithm.task_chunk",
}
ALGORITHM_NAMES = {
    "maml": "MAML",
    "metasgd": "Meta-SGD",
    "mamlpp": "MAML++",
    "anil": "ANIL",
    "reptile": "Reptile",
    "protonet": "ProtoNet",
    "protomaml": "Proto-MAML",
}

# Published Omniglot test accuracies (%), as printed in each paper, by (way, shot). A figure that could not be
# confirmed from a second source is left out rather than guessed.
PAPER_OMNIGLOT = [
    (
        "MAML (paper)",
        "Finn, Abbeel & Levine 2017, ICML, Table 1 (arXiv:1703.03400)",
        {(5, 1): "98.7 ± 0.4", (5, 5): "99.9 ± 0.1", (20, 1): "95.8 ± 0.3", (20, 5): "98.9 ± 0.2"},
    ),
    (
        "first-order MAML (paper)",
        "Finn, Abbeel & Levine 2017, ICML, Table 1 (arXiv:1703.03400)",
        {(5, 1): "98.3 ± 0.5", (5, 5): "99.2 ± 0.2", (20, 1): "89.4 ± 0.5", (20, 5): "97.9 ± 0.1"},
    ),
    (
        "Meta-SGD (paper)",
        "Li, Zhou, Chen & Li 2017 (arXiv:1707.09835), rounded to 0.1 points",
        {(5, 1): "99.5", (5, 5): "99.9", (20, 1): "95.9", (20, 5): "99.0"},
    ),
    (
        "MAML++ (paper)",
        "Antoniou, Edwards & Storkey 2019, ICLR (arXiv:1810.09502); 5-way 5-shot left out: "
        "sources disagree",
        {(5, 1): "99.47", (20, 1): "97.65", (20, 5): "99.33"},
    ),
    (
        "Reptile (paper)",
        "Nichol, Achiam & Schulman 2018 (arXiv:1803.02999), with transduction as MAML's",
        {
            (5, 1): "97.68 ± 0.04",
            (5, 5): "99.48 ± 0.06",
            (20, 1): "89.43 ± 0.14",
            (20, 5): "97.12 ± 0.32",
        },
    ),
    (
        "ANIL (paper)",
        "Raghu, Raghu, Bengio & Vinyals 2020, ICLR (arXiv:1909.09157)",
        {(20, 1): "96.2 ± 0.5", (20, 5): "98.0 ± 0.3"},
    ),
    # Snell et al.'s headline rows train on more classes than they test on (experiment=protonet_*)
    (
        "ProtoNet (paper, 60-way training)",
        "Snell, Swersky & Zemel 2017, NeurIPS, Table 1 (arXiv:1703.05175): training episodes of 60 "
        "classes, 5 queries per class, train shot = test shot; 1,000 test episodes, no CI given",
        {(5, 1): "98.8", (5, 5): "99.7", (20, 1): "96.0", (20, 5): "98.9"},
    ),
    (
        "ProtoNet (paper, train way = test way)",
        "Snell, Swersky & Zemel 2017, Appendix A, Table 4 (arXiv:1703.05175): training episodes of "
        "the test way and shot, 15 queries per class; 1,000 test episodes, no CI given",
        {(5, 1): "97.4", (5, 5): "99.3", (20, 1): "95.4", (20, 5): "98.7"},
    ),
]

# Published miniImageNet (Ravi & Larochelle's split) 5-way test accuracies (%), as PAPER_OMNIGLOT.
PAPER_MINIIMAGENET = [
    (
        "ProtoNet (paper, 30-/20-way training)",
        "Snell, Swersky & Zemel 2017, NeurIPS, Table 2 (arXiv:1703.05175): training episodes of 30 "
        "classes (1-shot) or 20 (5-shot), 15 queries per class; 600 test episodes",
        {(5, 1): "49.42 ± 0.78", (5, 5): "68.20 ± 0.66"},
    ),
    (
        "ProtoNet (paper, train way = test way)",
        "Snell, Swersky & Zemel 2017, Appendix B, Tables 5-6 (arXiv:1703.05175): 5-way training "
        "episodes, 15 queries per class; 1-shot left out: the two tables disagree (46.61, 46.14)",
        {(5, 5): "65.77 ± 0.70"},
    ),
]
PAPER = {"omniglot": PAPER_OMNIGLOT, "miniimagenet": PAPER_MINIIMAGENET}


@dataclass
class Result:
    """One run's score (or failure), with its settings flattened to dotted keys."""

    where: Path
    settings: dict
    accuracy: float | None = None  # fraction correct
    ci95: float | None = None  # half-width, fraction
    failed: str | None = None  # the reason, when the run failed


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)
    csv_rows: list[list[str]] = field(default_factory=list)


def _flatten(config: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, f"{name}."))
        else:
            out[name] = str(value) if isinstance(value, list) else value
    return out


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise MetarunError(
            f"{path} is not readable JSON ({exc}): delete it or leave its run dir out of the report."
        )
    if not isinstance(data, dict):
        raise MetarunError(
            f"{path} is not a metarun results file: leave its run dir out of the report."
        )
    return data


def _run_config(run_dir: Path) -> dict | None:
    """A run's resolved settings: results.json's config, else Hydra's .hydra/config.yaml."""
    results = run_dir / "results.json"
    if results.is_file():
        config = _read_json(results).get("config")
        if isinstance(config, dict):
            return config
    hydra = run_dir / ".hydra" / "config.yaml"
    if hydra.is_file():
        from omegaconf import OmegaConf

        loaded = OmegaConf.load(hydra)
        try:  # interpolations such as model.in_channels: ${dataset.channels} to their values
            return OmegaConf.to_container(loaded, resolve=True)
        except (
            Exception
        ):  # one that cannot resolve here (an unset environment variable): as written
            return OmegaConf.to_container(loaded, resolve=False)
    return None


def load_result(path: Path) -> Result | None:
    """A Result from a results.json or an eval.json; None for files the table does not show (benchmark=lake)."""
    data, run_dir = _read_json(path), path.parent
    if path.name == "results.json":
        config = (
            data.get("config") if isinstance(data.get("config"), dict) else _run_config(run_dir)
        )
        if config is None:
            raise MetarunError(
                f"{path} has no config and {run_dir}/.hydra/config.yaml is missing: the report cannot "
                "tell its settings; leave this run dir out."
            )
        settings = {**_flatten(config), "split": "test", "file": path.name}
        if data.get("status") == "failed":
            return Result(run_dir, settings, failed=str(data.get("reason") or "no reason recorded"))
        if not isinstance(data.get("test_accuracy"), (int, float)):
            raise MetarunError(
                f'{path} has no test_accuracy and no "status": "failed": it is not a finished '
                "metarun run; leave its run dir out of the report."
            )
        return Result(
            run_dir, settings, float(data["test_accuracy"]), float(data.get("test_ci95") or 0.0)
        )
    if data.get("benchmark"):
        return None
    ckpt = Path(str(data.get("checkpoint", "")))
    config = _run_config(ckpt.parent.parent) if ckpt.parent.name == "checkpoints" else None
    settings = (
        _flatten(config) if config else {k: data[k] for k in ("way", "shot", "query") if k in data}
    )
    settings.update(
        {
            "split": data.get("split", "test"),
            "update_step_test": data.get("update_step_test"),
            "file": path.name,
        }
    )
    if not isinstance(data.get("accuracy"), (int, float)):
        raise MetarunError(
            f"{path} has no accuracy: it is not an eval.json of metarun eval; leave its dir out."
        )
    return Result(run_dir, settings, float(data["accuracy"]), float(data.get("ci95") or 0.0))


def collect(dirs: list[Path]) -> tuple[list[Result], list[Path]]:
    """Every result in the given run or sweep dirs (searched recursively), and the files left out."""
    results, skipped = [], []
    for d in dirs:
        if not d.is_dir():
            raise MetarunError(
                f"{d} is not a folder: give run dirs or sweep dirs (outputs/sweep/<time>)."
            )
        files = sorted(
            p
            for name in ("results.json", "eval.json")
            for p in d.rglob(name)
            if not any(part.startswith(".") for part in p.relative_to(d).parts)
        )
        if not files:
            raise MetarunError(
                f"no results.json or eval.json under {d}: give the dir of a finished run or sweep."
            )
        for f in files:
            result = load_result(f)
            if result is None:
                skipped.append(f)
            else:
                results.append(result)
    return results, skipped


def _sort_key(value) -> tuple:
    if value is None:
        return (-1, 0, "")
    return (
        (0, value, "")
        if isinstance(value, (int, float)) and not isinstance(value, bool)
        else (1, 0, str(value))
    )


def _algorithm_label(settings: dict, extra_keys: list[str]) -> str:
    name = settings.get("algorithm.name") or "maml"
    label = ALGORITHM_NAMES.get(name, name)
    if settings.get("first_order") is True:
        label = f"first-order {label}"
    extras = [
        f"{k.split('.', 1)[1]}={settings[k]}" for k in extra_keys if settings.get(k) is not None
    ]
    return f"{label} ({', '.join(extras)})" if extras else label


def _pct(x: float) -> str:
    return f"{100 * x:.2f}"


def build_table(results: list[Result], out_dir: Path, paper: bool = False) -> Table:
    keys = sorted({k for r in results for k in r.settings})
    differ = [
        k
        for k in keys
        if k not in IGNORED
        and not k.startswith("hydra")
        and len({json.dumps(r.settings.get(k), sort_keys=True, default=str) for r in results}) > 1
    ]
    column_keys = [k for k in differ if k.startswith("algorithm.") or k == "first_order"]
    # An algorithm.* setting names a column only where it differs between runs of the same algorithm.
    extra_keys = [
        k
        for k in column_keys
        if k not in ("algorithm.name", "first_order")
        and any(
            len(
                {
                    str(r.settings.get(k))
                    for r in results
                    if r.settings.get("algorithm.name") == name and r.settings.get(k) is not None
                }
            )
            > 1
            for name in {r.settings.get("algorithm.name") for r in results}
        )
    ]
    row_keys = [k for k in ("way", "shot") if any(k in r.settings for r in results)]
    row_keys += [k for k in differ if k not in column_keys and k not in row_keys]

    cells: dict[tuple, dict[str, list[Result]]] = {}
    for r in results:
        row = tuple(r.settings.get(k) for k in row_keys)
        cells.setdefault(row, {}).setdefault(_algorithm_label(r.settings, extra_keys), []).append(r)
    rows = sorted(cells, key=lambda row: [_sort_key(v) for v in row])
    columns = sorted(
        {c for row in cells.values() for c in row}, key=lambda c: (c.startswith("first-order"), c)
    )
    papers = []
    if paper:
        names = {r.settings.get("dataset.name", "omniglot") for r in results}
        published = PAPER.get(names.pop()) if len(names) == 1 else None
        if published and row_keys[:2] == ["way", "shot"]:
            papers = [p for p in published if any((row[0], row[1]) in p[2] for row in rows)]

    table = Table(row_keys + columns + [p[0] for p in papers], [])
    table.csv_rows.append(
        row_keys + ["method", "accuracy", "ci95", "std", "runs", "failed", "dirs", "note"]
    )
    failures = []
    for row in rows:
        line = ["" if v is None else str(v) for v in row]
        for column in columns:
            group = cells[row].get(column, [])
            done = [r for r in group if r.failed is None]
            failed = [r for r in group if r.failed is not None]
            failures += failed
            dirs = ";".join(os.path.relpath(r.where, out_dir) for r in group)
            reasons = "; ".join(r.failed for r in failed)
            if not group:
                line.append("")
                continue
            if not done:
                line.append("failed")
                table.csv_rows.append(
                    line[: len(row_keys)]
                    + [column, "", "", "", "0", str(len(failed)), dirs, reasons]
                )
                continue
            mean = sum(r.accuracy for r in done) / len(done)
            if len(done) == 1:
                text, ci, std = (
                    f"{_pct(mean)} ± {_pct(done[0].ci95)}",
                    f"{100 * done[0].ci95:.4f}",
                    "",
                )
                counts = []
            else:
                sd = math.sqrt(sum((r.accuracy - mean) ** 2 for r in done) / (len(done) - 1))
                text, ci, std = f"{_pct(mean)} ± {_pct(sd)}", "", f"{100 * sd:.4f}"
                seeds = {r.settings.get("seed") for r in done}
                counts = [f"{len(done)} seeds" if len(seeds) == len(done) else f"{len(done)} runs"]
            counts += [f"{len(failed)} failed"] if failed else []
            line.append(text + (f" ({', '.join(counts)})" if counts else ""))
            table.csv_rows.append(
                line[: len(row_keys)]
                + [
                    column,
                    f"{100 * mean:.4f}",
                    ci,
                    std,
                    str(len(done)),
                    str(len(failed)),
                    dirs,
                    reasons,
                ]
            )
        for name, source, figures in papers:
            figure = figures.get((row[0], row[1]), "")
            line.append(figure)
            if figure:
                mean, _, ci = figure.partition(" ± ")
                table.csv_rows.append(
                    line[: len(row_keys)] + [name, mean, ci, "", "", "", "", source]
                )
        table.rows.append(line)

    table.notes.append(
        "Cells: test accuracy (%), mean ± 95% CI over one run's test tasks; (N seeds): mean ± "
        "standard deviation over the seeds' runs; (N runs): the same over runs that share a seed."
    )
    table.notes += [f"failed: {os.path.relpath(r.where, out_dir)}: {r.failed}" for r in failures]
    table.notes += [f"{name}: {source}." for name, source, _ in papers]
    return table


def markdown(table: Table) -> str:
    lines = ["| " + " | ".join(table.header) + " |", "|" + " --- |" * len(table.header)]
    lines += ["| " + " | ".join(row) + " |" for row in table.rows]
    return "\n".join(lines) + "\n\n" + "\n".join(table.notes) + "\n"


def csv_text(table: Table) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(table.csv_rows)
    return buf.getvalue()


def report(dirs: list[Path], out: Path | None = None, paper: bool = False) -> tuple[str, Path]:
    """Builds the table of `dirs`, writes report.md and report.csv into `out` (default: the one dir given, or
    the dirs' common parent) and returns (the Markdown text, out)."""
    results, skipped = collect(dirs)
    if out is None:
        out = dirs[0] if len(dirs) == 1 else Path(os.path.commonpath([d.resolve() for d in dirs]))
    table = build_table(results, out.resolve(), paper)
    text = markdown(table)
    if skipped:
        text += "".join(
            f"left out (not a task accuracy): {os.path.relpath(p, out.resolve())}\n"
            for p in skipped
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.md").write_text(text)
        (out / "report.csv").write_text(csv_text(table))
    except OSError as exc:
        raise MetarunError(
            f"cannot write the report into {out} ({exc.strerror}): give a writable --out DIR."
        )
    return text, out


class _Parser(argparse.ArgumentParser):
    def error(
        self, message
    ):  # one line, like every metarun error (the CLI prints it, exit status 2)
        raise MetarunError(
            f"{message} (usage: metarun report DIR... [--paper] [--out DIR]; metarun report --help)"
        )


def main(argv: list[str]) -> int:
    parser = _Parser(
        prog="metarun report",
        description="Table of a sweep's or several runs' "
        "results (results.json / eval.json), printed and written as report.md and "
        "report.csv.",
    )
    parser.add_argument(
        "dirs", nargs="+", type=Path, help="sweep dirs (outputs/sweep/<time>) or run dirs"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="where report.md and report.csv go (default: the dir given, or the dirs' common parent)",
    )
    parser.add_argument(
        "--paper",
        action="store_true",
        help="add the published Omniglot figures (MAML, first-order MAML, Meta-SGD, MAML++, "
        "Reptile, ANIL, ProtoNet) or miniImageNet figures (ProtoNet) as extra columns, with their "
        "sources",
    )
    args = parser.parse_args(argv)
    text, out = report(args.dirs, args.out, args.paper)
    print(text, end="")
    print(f"metarun: wrote {out / 'report.md'} and {out / 'report.csv'}", file=sys.stderr)
    return 0
