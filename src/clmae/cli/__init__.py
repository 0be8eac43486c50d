"""The ``clmae`` command line: :func:`main` (the console script) and :func:`build_parser`.

Building the parser and answering ``--help`` import no torch (tests/test_cli_startup.py): every
sub-command's flags come from torch-free dataclasses and registries, and what a command runs is
imported when it runs.
"""

from .app import build_parser, main

__all__ = ["build_parser", "main"]
