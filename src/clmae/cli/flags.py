"""One way from an option dataclass to command-line flags, for every sub-command.

A field declared with :func:`clmae.options.opt` becomes ``--field-name`` with its help text, its
type, its choices and its default written the same way everywhere (``(default: X)``). Tuples are
comma-separated lists, booleans get ``--x/--no-x``. Flags not given are absent from the parsed
namespace (``argparse.SUPPRESS``), so a caller can tell what the user typed from the defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

from ..options import choices_of, flag, help_of


def with_default(text: str, default: Any) -> str:
    """Help text ending with the default, unless the text already says what happens by default."""
    if "default" in text or default is None or default is dataclasses.MISSING:
        return text
    if isinstance(default, bool):
        default = "on" if default else "off"
    elif isinstance(default, tuple):
        default = ",".join(str(v) for v in default)
    return f"{text} (default: {default})"


def _comma_list(conv: type, name: str) -> Callable[[str], tuple]:
    def parse(text: str) -> tuple:
        try:
            return tuple(conv(v) for v in text.split(",") if v.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name}: expected comma-separated numbers, got {text!r}") from None

    return parse


def add_field(parser, f: dataclasses.Field, key: str, dest: str, choices: Iterable[str] | None = None) -> None:
    """``--KEY`` for field ``f``, stored as ``dest``."""
    name, kind = flag(key), str(f.type)
    choices = list(choices) if choices is not None else (list(choices_of(f)) if choices_of(f) else None)
    kw: dict[str, Any] = {"dest": dest, "default": argparse.SUPPRESS, "help": with_default(help_of(f), f.default)}
    if kind.startswith("bool"):
        parser.add_argument(name, action=argparse.BooleanOptionalAction, **kw)
    elif kind.startswith("tuple"):
        parser.add_argument(name, type=_comma_list(float if "float" in kind else int, name), metavar="A,B,...", **kw)
    else:
        conv = float if kind.startswith("float") else int if kind.startswith("int") else str
        metavar = None if choices else {float: "X", int: "N", str: "TEXT"}[conv]
        parser.add_argument(name, type=conv, choices=choices, metavar=metavar, **kw)


def add_dataclass_flags(parser, cls: type, dest_prefix: str = "", flag_prefix: str = "", skip: Iterable[str] = (),
                        choices: dict[str, Iterable[str]] | None = None) -> None:
    """One flag per field of ``cls``: ``--{flag_prefix}{name}`` stored as ``{dest_prefix}{name}``."""
    for f in dataclasses.fields(cls):
        if f.name not in skip:
            add_field(parser, f, flag_prefix + f.name, dest_prefix + f.name, (choices or {}).get(f.name))


def collect(args: argparse.Namespace, dest_prefix: str) -> dict[str, Any]:
    """The values the user gave for the flags stored under ``dest_prefix`` (the prefix removed)."""
    return {k[len(dest_prefix):]: v for k, v in vars(args).items() if k.startswith(dest_prefix)}
