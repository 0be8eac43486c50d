"""Run metrics: one JSON object per line in ``metrics.jsonl``, mirrored to TensorBoard if installed."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any


class MetricsLogger:
    """Append-only JSONL log (safe to resume into) with optional TensorBoard scalars."""

    def __init__(self, output_dir: str | Path, tensorboard: bool = True, enabled: bool = True):
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self.latest: dict[str, dict[str, Any]] = {}  # the last record of each kind ("train", "epoch", "probe", …)
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(log_dir=str(Path(output_dir) / "tensorboard"))
            except Exception:  # noqa: BLE001 — TensorBoard is optional; JSONL always works
                self.tb = None

    def log(self, record: dict[str, Any], step: int | None = None) -> None:
        if not self.enabled:
            return
        clean = {k: _plain(v) for k, v in record.items()}
        clean.setdefault("time", round(time.time(), 3))
        self.latest[str(clean.get("kind", "train"))] = clean
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(clean) + "\n")
        if self.tb is not None and step is not None:
            kind = clean.get("kind", "train")
            for k, v in clean.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "time"):
                    self.tb.add_scalar(f"{kind}/{k}", v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()


class MetricWindow:
    """Running values of each metric since the last :meth:`reset`; :meth:`means` averages them."""

    def __init__(self) -> None:
        self.values: dict[str, list[float]] = {}

    def add(self, metrics: dict[str, float]) -> None:
        for k, v in metrics.items():
            self.values.setdefault(k, []).append(v)

    def means(self) -> dict[str, float]:
        return {k: sum(v) / len(v) for k, v in self.values.items() if v}

    def reset(self) -> None:
        self.values = {}


def _plain(v: Any) -> Any:
    if hasattr(v, "item") and getattr(v, "ndim", 1) == 0:
        v = v.item()
    if isinstance(v, float):
        return v if math.isfinite(v) else str(v)
    return v


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of a run's ``metrics.jsonl`` (a run folder or the file), skipping a torn last line."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    records = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records
