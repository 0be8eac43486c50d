"""Option fields of the configuration dataclasses: their flag, their help text, their validation.

Every configurable dataclass (pretraining, evaluation, protocols, fine-tuning) declares its fields
with :func:`opt`, so the help text lives on the field and the CLI builds its flags from it; every
validator raises through :func:`check_option`, so each error names the flag the user typed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import field
from typing import Any

from .errors import ConfigError

DEVICE_CHOICES = "auto, cpu, cuda, cuda:N or mps"  # what --device takes (its help; resolve_device's errors)
PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # what --precision takes (clmae.runtime.resolve_precision)
AUGMENT_ON = ("workers", "device")  # where --augment-on resizes folder and shard crops (clmae.data.loader)
DECODE_ON = ("workers", "device")  # where --decode-on decodes folder and shard JPEGs (clmae.data.images)


def opt(default: Any, help: str, choices: tuple[str, ...] | None = None) -> Any:
    """A dataclass field with the help text of its flag (and its allowed values, for a choice)."""
    return field(default=default, metadata={"help": help, "choices": choices})


def help_of(f: dataclasses.Field) -> str:
    return f.metadata.get("help", "")


def choices_of(f: dataclasses.Field) -> tuple[str, ...] | None:
    return f.metadata.get("choices")


def flag(option: str) -> str:
    """The command-line flag of a config field: ``batch_size`` → ``--batch-size``."""
    return "--" + option.replace("_", "-")


def one_of(names) -> str:
    """``'a', 'b' or 'c'``: the allowed values of a choice, for error messages."""
    quoted = [repr(n) for n in names]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " or " + quoted[-1]


def check_option(cond: bool, option: str, value: Any, allowed: str) -> None:
    """Raise a :class:`ConfigError` naming the flag, the value and what is allowed when ``cond`` is false."""
    if not cond:
        raise ConfigError(f"{flag(option)}: got {value!r}, expected {allowed}")
