"""A run's report: one self-contained HTML page to see what the curriculum did.

``clmae report RUN_DIR`` reads what a run leaves behind — ``metrics.jsonl``, ``config.json``,
the probe snapshots (``probe/``) and any ``eval*.json`` — and writes ``RUN_DIR/report.html`` with
every figure embedded as a base64 PNG (the page needs no other file and no network), plus the same
figures as ``report-*.png`` beside it:

* curriculum — λ and ``mask_difficulty`` over training, the probe losses, how much masks move
  (for every strategy whose masks are not uniformly random; λ for CL-MAE);
* masks / scores — the strategy's masks and score maps of the probe images at each snapshot epoch;
* losses — every loss term over training;
* evaluation — k-NN and other evaluation results over training, when present.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError
from ..io.atomic import write_bytes, write_text
from ..io.records import read_metrics

CURRICULUM_INTRO = (
    "λ is the curriculum factor: +1 asks the masking module for easy masks, −1 for hard ones. mask_difficulty is "
    "measured on a fixed batch of training images: the MAE's loss under the learned masks divided by its loss under "
    "random masks of the same ratio (red). The MAE only ever trains on learned masks, so it may be better at masks "
    "like them than at random ones; the orange curve divides instead by the loss under the learned masks of other "
    "probe images, which keeps the mask distribution and asks whether each mask is easy or hard for its own image."
)
STRATEGY_INTRO = (
    "mask_difficulty is measured on a fixed batch of training images: the MAE's loss under the {method} strategy's "
    "masks divided by its loss under random masks of the same ratio (red); above 1 the strategy's masks are harder "
    "than random ones. The orange curve divides instead by the loss under the masks chosen for other probe images, "
    "which keeps the mask distribution and asks whether each mask is hard for its own image."
)
MAX_SNAPSHOT_COLUMNS = 11
REPORT_CELL = 1.0  # inches per panel in the mask-evolution grids
LINE_WIDTH = 1.2


@dataclass
class RunRecords:
    """Everything the report reads from a run folder."""

    run_dir: Path
    config: dict[str, Any]
    records: list[dict[str, Any]]
    probe_images: dict[str, Any] | None = None
    snapshots: list[dict[str, Any]] = field(default_factory=list)
    evals: dict[str, Any] = field(default_factory=dict)  # file name → contents

    def kind(self, kind: str) -> list[dict[str, Any]]:
        return [r for r in self.records if r.get("kind", "train") == kind]

    @property
    def run_config(self) -> dict[str, Any]:
        return self.config.get("run_config", {})

    @property
    def method(self) -> str:
        return str(self.config.get("method") or self.run_config.get("method", "?"))

    @property
    def masker(self) -> dict[str, Any]:
        """What the run recorded of its strategy (``uniform``, ``mask_label``, ``schedules``); {} for old runs."""
        return dict(self.config.get("masker") or {})

    @property
    def curriculum(self) -> bool:
        """The strategy follows a λ curriculum (CL-MAE): λ was logged."""
        return any("curriculum_factor" in r for r in self.records)

    @property
    def uniform(self) -> bool:
        """The masks are uniformly random (MAE): nothing image-specific to follow."""
        if "uniform" in self.masker:
            return bool(self.masker["uniform"])
        probe = self.kind("probe")
        return bool(probe) and not any("probe_loss_learned" in r for r in probe)


def load_run(run_dir: str | Path) -> RunRecords:
    """Read a run folder; a folder with neither ``metrics.jsonl`` nor ``config.json`` is refused."""
    from .probe import read_snapshots

    run = Path(run_dir)
    if not run.is_dir():
        raise ConfigError(f"RUN_DIR: {run} is not a folder; give the run's output folder (--output-dir of pretrain)")
    has_metrics, has_config = (run / "metrics.jsonl").is_file(), (run / "config.json").is_file()
    if not (has_metrics or has_config):
        raise ConfigError(f"RUN_DIR: {run} holds no metrics.jsonl or config.json; is it a clmae run folder?")
    config: dict[str, Any] = {}
    if has_config:
        try:
            config = json.loads((run / "config.json").read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"RUN_DIR: {run / 'config.json'} is not valid JSON ({exc})") from None
    records = read_metrics(run / "metrics.jsonl") if has_metrics else []
    images, snapshots = read_snapshots(run)
    evals = {}
    for path in sorted(run.glob("eval*.json")):
        try:
            evals[path.name] = json.loads(path.read_text())
        except (json.JSONDecodeError, OSError):
            evals[path.name] = {"error": "unreadable JSON"}
    return RunRecords(run, config, records, images, snapshots, evals)


# ---------------------------------------------------------------------------------------------
# Series helpers


def _number(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def series(records: list[dict[str, Any]], key: str, x: str = "step") -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)`` arrays of the records that have a finite number under ``key``."""
    pts = [(_number(r.get(x)), _number(r.get(key))) for r in records]
    pts = [(a, b) for a, b in pts if a is not None and b is not None]
    if not pts:
        return np.zeros(0), np.zeros(0)
    arr = np.array(pts, dtype=np.float64)
    return arr[:, 0], arr[:, 1]


def loss_terms(records: list[dict[str, Any]]) -> list[str]:
    """Every ``loss_*`` key, in first-seen order (MAE loss first)."""
    keys: list[str] = []
    for r in records:
        for k in r:
            if k.startswith("loss_") and k not in keys and _number(r[k]) is not None:
                keys.append(k)
    return sorted(keys, key=lambda k: (k != "loss_mae", k == "loss_masker", keys.index(k)))


def lambda_crossing(records: list[dict[str, Any]]) -> float | None:
    """The first step at which λ is negative (the curriculum turns adversarial), if any."""
    xs, lam = series([r for r in records if r.get("kind") in ("train", "probe")], "curriculum_factor")
    order = np.argsort(xs, kind="stable")
    xs, lam = xs[order], lam[order]
    if len(lam) and lam[0] >= 0 and (lam < 0).any():
        return float(xs[np.argmax(lam < 0)])
    return None


# ---------------------------------------------------------------------------------------------
# Figures (matplotlib Figure objects, Agg only)


def _new_figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _mark_crossing(ax, crossing: float | None) -> None:
    if crossing is not None:
        ax.axvline(crossing, color="0.6", linestyle=":", linewidth=1)


def figure_curriculum(run: RunRecords):
    """λ with mask_difficulty, the probe losses, and how the masks move; None without probe records."""
    probe = run.kind("probe")
    if not probe:
        return None
    learned = any("mask_difficulty" in r for r in probe)
    has_lambda = any("curriculum_factor" in r for r in probe)
    crossing = lambda_crossing(run.records)
    panels = 3 if learned else 1
    fig = _new_figure(8, 2.4 * panels)
    axes = fig.subplots(panels, 1, sharex=True, squeeze=False)[:, 0]
    if learned:
        ax = axes[0]
        x, y = series(probe, "mask_difficulty")
        ax.plot(x, y, color="C3", marker="o", markersize=2.5, linewidth=LINE_WIDTH, label="vs random masks")
        xs, ys = series(probe, "mask_difficulty_shuffled")
        if len(xs):
            ax.plot(xs, ys, color="C1", marker="o", markersize=2, linewidth=0.9, alpha=0.8,
                    label="vs other images' learned masks")
            y = np.concatenate([y, ys])
        ax.legend(fontsize=7, loc="lower left")
        ax.axhline(1.0, color="0.5", linestyle="--", linewidth=0.8)
        spread = max(float(np.abs(y - 1).max()) if len(y) else 0.0, 0.02) * 1.15
        ax.set_ylim(1 - spread, 1 + spread)  # difficulty 1 and λ 0 share the middle line
        ax.set_ylabel("mask_difficulty\n(loss ratio)")
        if has_lambda:
            twin = ax.twinx()
            lx, ly = series([r for r in run.records if r.get("kind") in ("train", "probe")], "curriculum_factor")
            order = np.argsort(lx, kind="stable")
            twin.plot(lx[order], ly[order], color="C0", linewidth=LINE_WIDTH, drawstyle="steps-post", label="λ")
            twin.set_ylabel("λ (curriculum factor)", color="C0")
            twin.set_ylim(-1.1, 1.1)
            ax.set_title("Learned masks easier (< 1) or harder (> 1) than random ones?  λ > 0 asks for easier; "
                         "dashed: difficulty 1 = λ 0", fontsize=9)
        else:
            ax.set_title(f"{run.method} masks easier (< 1) or harder (> 1) than random ones?", fontsize=9)
        _mark_crossing(ax, crossing)
    ax = axes[1] if learned else axes[0]
    name = "learned" if run.curriculum else run.method
    for key, label, color in (("probe_loss_learned", f"{name} masks", "C3"),
                              ("probe_loss_shuffled", f"other images' {name} masks", "C1"),
                              ("probe_loss_random", "random masks", "0.3")):
        x, y = series(probe, key)
        if len(x):
            ax.plot(x, y, color=color, marker="o", markersize=2, linewidth=LINE_WIDTH, label=label)
    ax.set_ylabel("MAE loss on\nthe probe batch")
    ax.legend(fontsize=8, loc="upper right")
    ax.set_title("Reconstruction loss of the fixed probe images", fontsize=9)
    _mark_crossing(ax, crossing)
    if learned:
        ax = axes[2]
        for key, color in (("mask_overlap", "C2"), ("mask_pairwise_overlap", "C4"), ("score_entropy", "C5")):
            x, y = series(probe, key)
            if len(x):
                ax.plot(x, y, color=color, marker="o", markersize=2, linewidth=LINE_WIDTH, label=key)
        chance = _chance_overlap(run)
        if chance is not None:
            ax.axhline(chance, color="0.5", linestyle="--", linewidth=0.8,
                       label=f"random masks' overlap ({chance:.2f})")
        ax.set_ylim(-0.02, 1.02)
        ax.set_ylabel("fraction / bits")
        ax.legend(fontsize=7, loc="best")
        ax.set_title("Mask overlap with the previous probe and between images; score entropy (bits)", fontsize=9)
        _mark_crossing(ax, crossing)
    axes[-1].set_xlabel("iteration" + ("   (dotted line: λ turns negative)" if crossing is not None else ""))
    return fig


def _chance_overlap(run: RunRecords) -> float | None:
    if run.probe_images is not None:
        return run.probe_images["num_keep"] / run.probe_images["num_patches"]
    mc, ratio = run.config.get("model_config", {}), run.run_config.get("mask_ratio")
    if "img_size" in mc and "patch_size" in mc and ratio is not None:
        length = (mc["img_size"] // mc["patch_size"]) ** 2
        return max(1, int(length * (1 - ratio))) / length
    return None


def figure_losses(run: RunRecords):
    """One small panel per loss term over training; None when the run logged none."""
    train, epochs = run.kind("train"), run.kind("epoch")
    records = train if len(train) >= len(epochs) else epochs  # short runs: per-epoch means have more points
    terms = loss_terms(records)
    if not terms:
        return None
    cols = min(3, len(terms))
    rows = math.ceil(len(terms) / cols)
    fig = _new_figure(3.0 * cols, 2.2 * rows)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    crossing = lambda_crossing(run.records)
    for ax, key in zip(axes, terms):
        x, y = series(records, key)
        ax.plot(x, y, linewidth=LINE_WIDTH, color="C0" if key == "loss_mae" else "C1")
        ax.set_title(key, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.set_xlabel("iteration", fontsize=7)
        _mark_crossing(ax, crossing)
    for ax in axes[len(terms):]:
        ax.set_axis_off()
    return fig


def _snapshot_columns(snapshots: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """At most ``MAX_SNAPSHOT_COLUMNS`` snapshots, evenly spread, first and last included."""
    if len(snapshots) <= MAX_SNAPSHOT_COLUMNS:
        return snapshots
    picks = np.unique(np.round(np.linspace(0, len(snapshots) - 1, MAX_SNAPSHOT_COLUMNS)).astype(int))
    return [snapshots[i] for i in picks]


def _snapshot_title(s: dict[str, Any]) -> str:
    lam = s.get("curriculum_factor")
    when = "start" if s["epoch"] == 0 else f"epoch {s['epoch']}"
    return when + (f"\nλ={lam:+.2f}" if isinstance(lam, (int, float)) else "")


def figure_mask_evolution(run: RunRecords, max_images: int = 6, what: str = "masks"):
    """Rows: probe images; columns: the image, then its mask (or score map) at each snapshot."""
    from .pictures import Panel, draw_grid, mask_overlay, scaled_scores, score_map, to_hwc

    if run.probe_images is None or not run.snapshots:
        return None
    if what != "masks" and not all("scores" in s for s in run.snapshots):
        return None  # a strategy without a score map (block masking)
    info = run.probe_images
    mask_label = info.get("mask_label", "learned mask")
    score_label = info.get("score_label") or "scores"
    score_range = info.get("score_range", (0.0, 1.0)) if "mask_label" in info else (0.0, 1.0)
    images = info["images"][:max_images].float() / 255
    snaps = _snapshot_columns(run.snapshots)
    originals = to_hwc(images)
    cells = []
    for s in snaps:
        if what == "masks":
            cells.append((to_hwc(mask_overlay(images, s["mask"][: len(images)].float(), info["patch_size"])), None))
        else:
            cells.append((score_map(scaled_scores(s["scores"][: len(images)], score_range)).numpy(), "viridis"))
    rows = []
    for i in range(len(images)):
        row = [Panel(originals[i])]
        for arr, cmap in cells:
            row.append(Panel(arr[i], cmap=cmap))
        rows.append(row)
    columns = ["image"] + [_snapshot_title(s) for s in snaps]
    if what == "masks" and mask_label == "learned mask":
        caption = ("Learned masks on the fixed probe images (training set, evaluation view) before training and "
                   "after N epochs, with the λ of that epoch: hidden patches under grey stripes.")
    elif what == "masks":
        caption = (f"The {run.method} strategy's masks ({mask_label}) on the fixed probe images (training set, "
                   "evaluation view) before training and after N epochs: hidden patches under grey stripes.")
    elif score_label == "scores":
        caption = ("Masking-module scores on the probe images before training and after N epochs "
                   "(bright = kept visible, 0 to 1).")
    else:
        caption = (f"The {run.method} strategy's {score_label} on the probe images before training and after N "
                   "epochs, each image scaled to its own range (bright = high).")
    return draw_grid(rows, columns, caption, cell=REPORT_CELL)


def eval_rows(run: RunRecords) -> list[dict[str, Any]]:
    """Evaluation records from metrics.jsonl (``kind == "eval"``)."""
    return run.kind("eval")


def figure_eval(run: RunRecords):
    """Evaluation metrics against the epoch, when evaluated at least twice; else None."""
    rows = eval_rows(run)
    if len(rows) < 2:
        return None
    keys = [k for k in rows[-1] if k not in ("kind", "epoch", "step", "time") and _number(rows[-1][k]) is not None]
    if not keys:
        return None
    fig = _new_figure(6, 2.6)
    ax = fig.subplots()
    for k in keys:
        x, y = series(rows, k, x="epoch")
        ax.plot(x + 1, y, marker="o", markersize=3, linewidth=LINE_WIDTH, label=k)
    ax.set_xlabel("epochs done")
    ax.legend(fontsize=8)
    ax.set_title("Evaluation during pretraining", fontsize=9)
    return fig


# ---------------------------------------------------------------------------------------------
# The HTML page


def png_bytes(fig) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def _flatten(d: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(d, dict):
        out = []
        for k, v in d.items():
            out += _flatten(v, f"{prefix}.{k}" if prefix else str(k))
        return out
    return [(prefix, d)]


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)) and all(isinstance(x, (int, float)) for x in v):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return str(v)


def _table(pairs: list[tuple[str, Any]]) -> str:
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_fmt(v))}</td></tr>" for k, v in pairs)
    return f"<table>{rows}</table>"


def _summary(run: RunRecords) -> list[tuple[str, Any]]:
    rc, data = run.run_config, run.config.get("data", {})
    epochs_done = max((r.get("epoch", -1) for r in run.kind("epoch")), default=-1) + 1
    pairs: list[tuple[str, Any]] = [
        ("method", run.method), ("model", run.config.get("model_name", rc.get("model"))),
        ("data", f"{data.get('name', rc.get('data'))} ({data.get('num_train', '?')} training images)"),
        ("epochs done", f"{epochs_done} of {rc.get('epochs', '?')}"),
        ("curriculum", rc.get("curriculum") if run.curriculum else
         "— (random masks)" if run.uniform else f"— ({run.method} masks)"),
    ]
    last_epoch = run.kind("epoch")[-1] if run.kind("epoch") else {}
    if "loss_mae" in last_epoch:
        pairs.append(("last epoch's MAE loss", last_epoch["loss_mae"]))
    probe = [r for r in run.kind("probe") if "mask_difficulty" in r]
    if probe:
        d = [r["mask_difficulty"] for r in probe if _number(r["mask_difficulty"]) is not None]
        if d:
            pairs.append(("mask_difficulty first → last (min … max)",
                          f"{d[0]:.3f} → {d[-1]:.3f} ({min(d):.3f} … {max(d):.3f})"))
    return pairs


CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1100px;
       padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; }
figure { margin: 1em 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: 0.9em; color: #555; }
table { border-collapse: collapse; font-size: 0.9em; margin: 0.5em 0; }
th, td { border: 1px solid #ddd; padding: 2px 8px; text-align: left; vertical-align: top; }
th { background: #f6f6f6; font-weight: 600; }
.note { color: #666; font-size: 0.9em; }
"""


def build_report(run_dir: str | Path, output: str | Path | None = None, max_images: int = 6) -> Path:
    """Write the HTML report (and ``report-*.png`` beside it); return the HTML path."""
    run = load_run(run_dir)
    out = Path(output) if output else run.run_dir / "report.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    stem = out.stem
    curriculum_intro = CURRICULUM_INTRO if run.curriculum else (
        "An MAE run: masks are random, so the probe shows the reconstruction loss of a fixed batch of training "
        "images under fixed random masks.") if run.uniform else STRATEGY_INTRO.format(method=run.method)
    sections: list[tuple[str, str, list[tuple[str, str, Any]]]] = [
        ("Curriculum", curriculum_intro,
         [("curriculum", "λ and mask_difficulty over training; probe losses; mask overlap and score entropy."
           if not run.uniform else "Probe loss under random masks over training.",
           figure_curriculum(run))]),
        ("Masks over training", "", [
            ("masks", "The strategy's masks of the probe images at each snapshot.",
             figure_mask_evolution(run, max_images)),
            ("scores", "The strategy's per-patch scores of the probe images at each snapshot.",
             figure_mask_evolution(run, max_images, what="scores")),
        ]),
        ("Losses", ("Every loss term as logged during training: loss_mae is the MAE's; loss_rec is the masking "
                    "module's soft reconstruction term before λ; loss_gauss, loss_kl and loss_div include their "
                    "weights; loss_masker is the total the masking module minimises; loss_hpm is HPM's weighted "
                    "ranking loss, added to the MAE's."),
         [("losses", "Loss terms over training.", figure_losses(run))]),
        ("Evaluation", "", [("eval", "Evaluation results over training.", figure_eval(run))]),
    ]
    nav = " · ".join(f"<a href='#{_anchor(t)}'>{t}</a>" for t in [s[0] for s in sections] + ["Configuration"])
    parts = [f"<h1>clmae run report: {html.escape(run.run_dir.name)}</h1>",
             f"<p class='note'>{html.escape(str(run.run_dir.resolve()))}</p>", f"<p>{nav}</p>", _table(_summary(run))]
    written = []
    for title, intro, figures in sections:
        body = []
        for name, caption, fig in figures:
            if fig is None:
                continue
            data = png_bytes(fig)
            png = out.with_name(f"{stem}-{name}.png")
            write_bytes(png, data)
            written.append(png)
            b64 = base64.b64encode(data).decode("ascii")
            body.append(f"<figure><img alt='{name}' src='data:image/png;base64,{b64}'>"
                        f"<figcaption>{html.escape(caption)} (also {html.escape(png.name)})</figcaption></figure>")
        if title == "Evaluation":
            body += _eval_html(run)
        if not body:
            body.append(f"<p class='note'>{_missing_note(title, run)}</p>")
        parts.append(f"<h2 id='{_anchor(title)}'>{title}</h2>" + (f"<p>{html.escape(intro)}</p>" if intro else "")
                     + "".join(body))
    parts.append("<h2 id='configuration'>Configuration</h2><p class='note'>From config.json in the run folder.</p>")
    parts.append(_table(_flatten(run.config.get("run_config", run.config))) if run.config
                 else "<p class='note'>No config.json in the run folder.</p>")
    if run.config.get("model_config"):
        parts.append("<h3>Model</h3>" + _table(_flatten(run.config["model_config"])))
    page = ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f"<title>clmae report: {html.escape(run.run_dir.name)}</title><style>{CSS}</style></head><body>"
            + "\n".join(parts) + "</body></html>\n")
    write_text(out, page)
    return out


def _anchor(title: str) -> str:
    return title.lower().replace(" ", "-")


def _eval_html(run: RunRecords) -> list[str]:
    body = []
    rows = eval_rows(run)
    if rows:
        keys = [k for k in rows[-1] if k not in ("kind", "time")]
        head = "".join(f"<th>{html.escape(k)}</th>" for k in keys)
        cells = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(k, '')))}</td>" for k in keys) + "</tr>"
                        for r in rows)
        body.append(f"<p>Evaluations logged in metrics.jsonl:</p><table><tr>{head}</tr>{cells}</table>")
    for name, contents in run.evals.items():
        if isinstance(contents, dict) and isinstance(contents.get("results"), dict):
            head = [pair for k in ("protocol", "data", "checkpoint", "pretrain_epochs") if k in contents
                    for pair in _flatten(contents[k], k)]
            rest = {k: v for k, v in contents.items() if k != "results"}
            body.append(f"<h3>{html.escape(name)}</h3>" + _table(head + _flatten(contents["results"]))
                        + f"<details><summary>everything in {html.escape(name)}</summary>{_table(_flatten(rest))}"
                        "</details>")
        else:
            body.append(f"<h3>{html.escape(name)}</h3>" + _table(_flatten(contents)))
    return body


def _missing_note(title: str, run: RunRecords) -> str:
    if title == "Curriculum":
        return "No probe records in metrics.jsonl (the run had --probe-every 0)."
    if title == "Masks over training":
        if run.uniform:
            return "MAE masks are random: there is no learned mask to follow."
        return "No probe snapshots in the run folder (the run had --snapshot-every 0)."
    if title == "Evaluation":
        return "No evaluation results (no eval*.json files and no eval records in metrics.jsonl)."
    return "Nothing logged."
