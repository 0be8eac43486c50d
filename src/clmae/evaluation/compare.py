"""Comparing evaluation reports: one table (markdown and terminal) and one bar chart for several runs.

Reads the JSON reports :mod:`clmae.evaluation.runner` writes (files, or run folders holding ``eval-*.json``);
``clmae compare`` is the command. Numbers are put side by side only when they were measured the same
way: reports that differ in dataset, split sizes, subset seeds, pooling, image size or a protocol's
hyper-parameters are refused (``allow_mismatch`` tabulates them anyway, as separate rows, with the
differences listed under the table). Each run keeps its own random-init row unless two reports
provably used the same random encoder (same architecture and seed).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError, DataError
from ..io.atomic import write_text
from .results import REPORT_FORMAT

PRIMARY_ORDER = ("knn_majority_top1", "knn_weighted_top1", "linear_top1")
# What must be equal for two reports' numbers to share a table, in the order messages name them.
SETUP_FIELDS = ("dataset", "train size", "test size", "train subset seed", "test subset seed", "held-out split",
                "pooling", "image size")


def _read_reports(path: str | Path) -> list[tuple[Path, dict[str, Any]]]:
    """``(file, report)`` pairs of a report file, a benchmark summary or a run folder's ``eval-*.json``."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("eval-*.json")) or sorted(path.glob("*.json"))
        reports = [r for f in files for r in _read_reports(f)]
        if not reports:
            raise DataError(f"{path}: no evaluation reports (eval-*.json) in this folder; run `clmae eval` first")
        return reports
    if not path.is_file():
        raise DataError(f"{path}: not found (give evaluation JSON files or run folders)")
    try:
        obj = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not a JSON file ({exc})") from None
    if isinstance(obj, dict) and obj.get("format") == REPORT_FORMAT:
        return [(path, obj)]
    if isinstance(obj, dict) and isinstance(obj.get("reports"), list):  # a benchmark summary
        return [(path, r) for r in obj["reports"] if isinstance(r, dict) and r.get("format") == REPORT_FORMAT]
    if path.parent.is_dir() and path.name.startswith("eval-"):
        raise DataError(f"{path}: not a clmae evaluation report")
    return []


def _subset_seed(report: dict[str, Any], split: str) -> int | None:
    """The seed of a random subset of ``split``, ``None`` for the whole split (older reports: from the options)."""
    d, o = report.get("data", {}), report.get("options", {})
    if f"{split}_subset_seed" in d:
        return d[f"{split}_subset_seed"]
    cap = o.get(f"max_{split}")
    return o.get("seed") if cap is not None and d.get(f"{split}_size") == cap else None


def evaluation_setup(report: dict[str, Any]) -> dict[str, Any]:
    """What decides whether two reports' numbers are comparable (:data:`SETUP_FIELDS`)."""
    d = report.get("data", {})
    return {"dataset": d.get("name"), "train size": d.get("train_size"), "test size": d.get("test_size"),
            "train subset seed": _subset_seed(report, "train"), "test subset seed": _subset_seed(report, "test"),
            "held-out split": d.get("holdout"),
            "pooling": report.get("features", {}).get("pool"),
            "image size": report.get("features", {}).get("img_size", d.get("img_size"))}


def setup_differences(items: list[tuple[Path, dict[str, Any]]]) -> list[str]:
    """One line per setting in which the reports differ, naming values and files (empty: comparable)."""
    lines = []
    setups = [(path, evaluation_setup(rep)) for path, rep in items]
    for name in SETUP_FIELDS:
        seen: dict[str, list[str]] = {}
        for path, setup in setups:
            seen.setdefault(repr(setup[name]), []).append(str(path))
        if len(seen) > 1:
            lines.append(f"{name}: " + "; ".join(f"{value} in {', '.join(files[:2])}{' …' if len(files) > 2 else ''}"
                                                for value, files in seen.items()))
    protocols: dict[str, dict[str, list[str]]] = {}
    for path, rep in items:
        hp = json.dumps(rep.get("hyperparameters"), sort_keys=True)
        protocols.setdefault(rep.get("protocol", "?"), {}).setdefault(hp, []).append(str(path))
    for protocol, variants in protocols.items():
        if len(variants) > 1:
            dicts = [json.loads(v) or {} for v in variants]
            keys = sorted({k for d in dicts for k in d if len({json.dumps(x.get(k)) for x in dicts}) > 1})
            parts = [", ".join(f"{k}={d.get(k)}" for k in keys) + f" in {files[0]}" for d, files in
                     zip(dicts, variants.values())]
            lines.append(f"{protocol} hyper-parameters: " + "; ".join(parts))
    return lines


def _run_label(report: dict[str, Any]) -> str:
    if report.get("label"):
        return str(report["label"])
    ckpt = Path(report.get("checkpoint", "?"))
    run = ckpt.name if ckpt.suffix == "" else ckpt.parent.name
    return f"{run} ({report.get('method') or '?'})"


def _metric_order(name: str) -> tuple:
    if name in PRIMARY_ORDER:
        return (PRIMARY_ORDER.index(name), 0)
    if name.startswith("fewshot_"):
        return (len(PRIMARY_ORDER), int(name.split("_")[1].rstrip("shot") or 0))
    return (len(PRIMARY_ORDER) + 1, name)


@dataclass
class ComparisonTable:
    rows: list[str]
    columns: list[str]
    values: dict[tuple[str, str], tuple[float, float | None]]  # (row, column) → (value, std)
    data: dict[str, str]  # row → dataset
    sizes: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # row → (train size, test size)
    differences: list[str] = field(default_factory=list)  # what differs between the reports (allow_mismatch)

    def cell(self, row: str, col: str) -> str:
        if (row, col) not in self.values:
            return "—"
        v, s = self.values[(row, col)]
        return f"{v:.2f}" + (f" ± {s:.2f}" if s is not None else "")

    def body(self) -> list[list[str]]:
        return [[row, self.data[row], *map(str, self.sizes.get(row, ("?", "?"))),
                 *(self.cell(row, c) for c in self.columns)] for row in self.rows]

    def header(self) -> list[str]:
        return ["run", "data", "train", "test", *self.columns]


def comparison_table(paths: list[str | Path], allow_mismatch: bool = False) -> ComparisonTable:
    """Top-1 metrics of several runs: one row per run and evaluation setup, plus the random-init references.

    Refuses (:class:`ConfigError`) reports that were not evaluated the same way, or that give two
    different values for one cell, unless ``allow_mismatch``.
    """
    items = [item for p in paths for item in _read_reports(p)]
    if not items:
        raise DataError("no evaluation reports found in " + ", ".join(str(p) for p in paths))
    differences = setup_differences(items)
    varying = [name for name in SETUP_FIELDS if any(line.startswith(name + ":") for line in differences)]
    rows: list[str] = []
    values: dict[tuple[str, str], tuple[float, float | None]] = {}
    sources: dict[tuple[str, str], Path] = {}
    data: dict[str, str] = {}
    sizes: dict[str, tuple[Any, Any]] = {}
    keys: dict[tuple, str] = {}
    columns: set[str] = set()
    conflicts: list[str] = []
    for path, rep in items:
        setup = evaluation_setup(rep)
        fingerprint = json.dumps(setup, sort_keys=True, default=str)
        suffix = ", ".join(f"{name} {setup[name]}" for name in varying)
        suffix = f" [{suffix}]" if suffix else ""
        for role, metrics in rep.get("results", {}).items():
            if role == "pretrained":
                key = ("pre", rep.get("checkpoint_sha256"), rep.get("label"), fingerprint)
                label = _run_label(rep) + suffix
            else:
                ref = rep.get("random_init") or {}
                if ref.get("architecture") and ref.get("seed") is not None:  # provably one encoder
                    key = ("rand", ref["architecture"], ref["seed"], fingerprint)
                    label = f"random init ({rep.get('model')}, seed {ref['seed']})" + suffix
                else:  # an older report: nothing proves two runs' references equal
                    key = ("rand-of", rep.get("checkpoint_sha256"), rep.get("label"), fingerprint)
                    label = f"random init of {_run_label(rep)}" + suffix
            if key not in keys:
                base, i = label, 2
                while label in rows:  # two runs with the same folder name
                    label, i = f"{base} #{i}", i + 1
                keys[key] = label
                rows.append(label)
                data[label] = setup["dataset"] or "?"
                sizes[label] = (setup["train size"], setup["test size"])
            label = keys[key]
            for name, value in metrics.items():
                if name.endswith("_top1") and isinstance(value, (int, float)):
                    columns.add(name)
                    cell = (float(value), metrics.get(name + "_std"))
                    if (label, name) in values and values[(label, name)] != cell:
                        conflicts.append(f"{label}, {name}: {values[(label, name)][0]:.2f} in "
                                         f"{sources[(label, name)]} vs {cell[0]:.2f} in {path}")
                        continue
                    values[(label, name)], sources[(label, name)] = cell, path
    differences += [f"two values for {c}" for c in conflicts]
    if differences and not allow_mismatch:
        raise ConfigError(f"these reports were not evaluated the same way, so one table would mislead: "
                          f"{' | '.join(differences)}; compare reports made with the same settings, or pass "
                          "--allow-mismatch to tabulate them anyway with the differences listed")
    ordered = [r for r in rows if not r.startswith("random init")] + [r for r in rows if r.startswith("random init")]
    return ComparisonTable(ordered, sorted(columns, key=_metric_order), values, data, sizes, differences)


def format_markdown(table: ComparisonTable) -> str:
    header = table.header()
    lines = ["| " + " | ".join(header) + " |", "|---|---|" + "|".join("---:" for _ in header[2:]) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in table.body()]
    if table.differences:
        lines += ["", "**These reports were not evaluated the same way** (tabulated with --allow-mismatch):", ""]
        lines += [f"- {line}" for line in table.differences]
    return "\n".join(lines)


def format_terminal(table: ComparisonTable) -> str:
    header = table.header()
    body = table.body()
    widths = [max(len(str(r[i])) for r in [header, *body]) for i in range(len(header))]
    fmt = lambda r: "  ".join(str(v).ljust(w) if i < 2 else str(v).rjust(w) for i, (v, w) in enumerate(zip(r, widths)))
    lines = [fmt(header), "  ".join("-" * w for w in widths), *(fmt(r) for r in body)]
    if table.differences:
        lines += ["", "not evaluated the same way (--allow-mismatch):", *(f"  {line}" for line in table.differences)]
    return "\n".join(lines)


def plot_comparison(table: ComparisonTable, path: str | Path) -> Path:
    """Grouped bar chart (one group per metric, one bar per run; few-shot std as error bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_rows, n_cols = len(table.rows), len(table.columns)
    width = 0.8 / max(n_rows, 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * n_cols + 2), 4.2))
    for i, row in enumerate(table.rows):
        xs, ys, err_points = [], [], []
        for j, col in enumerate(table.columns):
            if (row, col) in table.values:
                v, s = table.values[(row, col)]
                xs.append(j - 0.4 + width * (i + 0.5))
                ys.append(v)
                if s is not None:
                    err_points.append((xs[-1], v, s))
        hatch = "//" if row.startswith("random init") else None
        ax.bar(xs, ys, width, label=row, hatch=hatch)
        if err_points:
            ex, ey, es = zip(*err_points)
            ax.errorbar(ex, ey, yerr=es, fmt="none", ecolor="black", capsize=2, linewidth=1)
    ax.set_xticks(range(n_cols))
    ax.set_xticklabels([c.replace("_top1", "") for c in table.columns], rotation=20, ha="right")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def compare(paths: list[str | Path], markdown: str | Path | None = None, plot: str | Path | None = None,
            allow_mismatch: bool = False) -> ComparisonTable:
    """``clmae compare``: the table of ``paths`` (report JSONs or run folders), written as markdown and/or a bar
    chart when asked. Reports evaluated differently are refused before anything is written."""
    table = comparison_table(paths, allow_mismatch)
    target = markdown or plot
    try:
        if markdown is not None:
            write_text(markdown, format_markdown(table) + "\n")
        if plot is not None:
            plot_comparison(table, plot)
    except OSError as exc:
        raise ConfigError(f"--output-dir: cannot write {exc.filename or target}: {exc.strerror or exc}; choose "
                          "another folder") from None
    return table


def default_output_dir(paths: list[str | Path]) -> Path:
    """Beside the first report: the first input's folder (a run folder is its own)."""
    first = Path(paths[0])
    return first if first.is_dir() else first.parent
