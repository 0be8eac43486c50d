"""The package version, in a module of its own so every layer can read it without importing the API.

The one place it is written: pyproject.toml reads it (``dynamic = ["version"]``, setuptools ``attr``,
which parses this file without importing clmae), so a wheel and ``clmae --version`` always agree.
"""

__version__ = "0.1.0"
