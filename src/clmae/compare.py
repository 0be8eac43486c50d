"""Comparing evaluation reports: one table (markdown and terminal) and one bar chart for several runs.

Reads the JSON reports :mod:`clmae.evaluation` writes (files, or run folders holding ``eval-*.json``);
``clmae compare`` is the command.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import DataError
from .reports import REPORT_FORMAT

PRIMARY_ORDER = ("knn_majority_top1", "knn_weighted_top1", "linear_top1")


def _read_reports(path: str | Path) -> list[dict[str, Any]]:
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
        return [obj]
    if isinstance(obj, dict) and isinstance(obj.get("reports"), list):  # a benchmark summary
        return [r for r in obj["reports"] if isinstance(r, dict) and r.get("format") == REPORT_FORMAT]
    if path.parent.is_dir() and path.name.startswith("eval-"):
        raise DataError(f"{path}: not a clmae evaluation report")
    return []


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

    def cell(self, row: str, col: str) -> str:
        if (row, col) not in self.values:
            return "—"
        v, s = self.values[(row, col)]
        return f"{v:.2f}" + (f" ± {s:.2f}" if s is not None else "")


def comparison_table(paths: list[str | Path]) -> ComparisonTable:
    """Top-1 metrics of several runs: one row per (checkpoint, dataset) and one per random-init reference."""
    reports = [r for p in paths for r in _read_reports(p)]
    if not reports:
        raise DataError("no evaluation reports found in " + ", ".join(str(p) for p in paths))
    rows: list[str] = []
    values: dict[tuple[str, str], tuple[float, float | None]] = {}
    data: dict[str, str] = {}
    keys: dict[tuple, str] = {}
    columns: set[str] = set()
    for rep in reports:
        dname = rep.get("data", {}).get("name", "?")
        for role, metrics in rep.get("results", {}).items():
            if role == "pretrained":
                key = ("pre", rep.get("checkpoint_sha256"), dname, rep.get("label"))
                label = _run_label(rep)
            else:
                key = ("rand", rep.get("model"), rep.get("random_init_seed"), dname)
                label = f"random init ({rep.get('model')})"
            if key not in keys:
                base, i = label, 2
                while label in rows:  # two runs with the same folder name
                    label, i = f"{base} #{i}", i + 1
                keys[key] = label
                rows.append(label)
                data[label] = dname
            label = keys[key]
            for name, value in metrics.items():
                if name.endswith("_top1") and isinstance(value, (int, float)):
                    columns.add(name)
                    values[(label, name)] = (float(value), metrics.get(name + "_std"))
    ordered = [r for r in rows if not r.startswith("random init")] + [r for r in rows if r.startswith("random init")]
    return ComparisonTable(ordered, sorted(columns, key=_metric_order), values, data)


def format_markdown(table: ComparisonTable) -> str:
    head = "| run | data | " + " | ".join(table.columns) + " |"
    sep = "|---|---|" + "|".join("---:" for _ in table.columns) + "|"
    lines = [head, sep]
    for row in table.rows:
        lines.append(f"| {row} | {table.data[row]} | " + " | ".join(table.cell(row, c) for c in table.columns) + " |")
    return "\n".join(lines)


def format_terminal(table: ComparisonTable) -> str:
    header = ["run", "data", *table.columns]
    body = [[row, table.data[row], *(table.cell(row, c) for c in table.columns)] for row in table.rows]
    widths = [max(len(str(r[i])) for r in [header, *body]) for i in range(len(header))]
    fmt = lambda r: "  ".join(str(v).ljust(w) if i < 2 else str(v).rjust(w) for i, (v, w) in enumerate(zip(r, widths)))
    return "\n".join([fmt(header), "  ".join("-" * w for w in widths), *(fmt(r) for r in body)])


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


def compare(paths: list[str | Path], markdown: str | Path | None = None,
            plot: str | Path | None = None) -> ComparisonTable:
    """Build the comparison of ``paths`` (report JSONs or run folders); write markdown and/or PNG if asked."""
    table = comparison_table(paths)
    if markdown is not None:
        Path(markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(markdown).write_text(format_markdown(table) + "\n")
    if plot is not None:
        plot_comparison(table, plot)
    return table


def add_cli(sub: argparse._SubParsersAction) -> None:
    """``clmae compare RUN_OR_JSON ...``."""
    c = sub.add_parser("compare", help="table and bar chart of several evaluation reports",
                       description="Compare evaluation reports: JSON files or run folders (their eval-*.json).")
    c.add_argument("inputs", nargs="+", metavar="RUN_OR_JSON")
    c.add_argument("--markdown", default="compare.md", metavar="FILE.md", help="markdown table (default compare.md)")
    c.add_argument("--plot", default="compare.png", metavar="FILE.png", help="bar chart (default compare.png)")
    c.set_defaults(func=_run_compare)


def _run_compare(args: argparse.Namespace) -> int:
    table = compare(args.inputs, args.markdown, args.plot)
    print(format_terminal(table))
    print(f"markdown: {args.markdown}\nchart: {args.plot}", file=sys.stderr)
    return 0
