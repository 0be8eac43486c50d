"""The curriculum factor λ: +1 = partner (easy masks), 0 = neutral, −1 = adversary (hard masks)."""

from __future__ import annotations

from .errors import ConfigError

SCHEDULES = ("official", "linear", "constant", "partner", "neutral", "adversary")
_CONSTANTS = {"partner": 1.0, "neutral": 0.0, "adversary": -1.0}


def curriculum_factor(epoch: float, epochs: int, schedule: str = "official", value: float = 1.0) -> float:
    """λ for ``epoch`` of ``epochs``.

    * ``official`` — the authors' per-epoch schedule: ``1 − 2e/E`` for ``e < E/2``, else
      ``1 − 2(e+1)/E``; for E=200 it goes 1.00, 0.99, …, 0.01, −0.01, …, −1.00 (never 0).
    * ``linear`` — per step: pass a fractional epoch ``e + step/steps_per_epoch``; ``1 − 2e/E``.
    * ``constant`` — ``value`` throughout; ``partner``/``neutral``/``adversary`` are +1/0/−1.
    """
    if epochs <= 0:
        raise ConfigError(f"epochs: must be positive, got {epochs}")
    if schedule == "official":
        e = int(epoch)
        return 1 - 2 * e / epochs if e < epochs / 2 else 1 - 2 * (e + 1) / epochs
    if schedule == "linear":
        return 1 - 2 * min(max(float(epoch), 0.0), float(epochs)) / epochs
    if schedule == "constant":
        return float(value)
    if schedule in _CONSTANTS:
        return _CONSTANTS[schedule]
    raise ConfigError(f"curriculum: unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
