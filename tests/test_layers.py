"""The package's architecture, enforced: modules sit in layers and import only downward, with no cycles.

Every ``import`` counts, also those inside functions. A new module must be given a layer here (and
drawn in docs/architecture.md); an import of a higher layer or a cycle fails with the offending
module named.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "clmae"

# Bottom to top. A module may import modules of its own layer or below, never above. Package
# __init__ files are listed by the package's name (``maskers`` is maskers/__init__.py, the registry).
LAYERS: list[tuple[str, list[str]]] = [
    ("foundations", ["errors", "version", "options", "lazy", "io.atomic"]),
    ("runtime", ["runtime", "distributed", "optim"]),
    ("model", ["models", "models.configs", "models.layers", "models.mae"]),
    ("masking strategies", ["maskers.options", "maskers", "maskers.indices", "maskers.base", "maskers.ema",
                            "maskers.random", "maskers.block", "maskers.clmae", "maskers.hpm", "maskers.attmask",
                            "maskers.colormae", "maskers.sbam", "maskers.automae"]),
    ("run configuration", ["config"]),
    ("data", ["data", "data.images", "data.augment", "data.shards", "data.datasets", "data.loader"]),
    ("files", ["io", "io.records", "io.checkpoint", "io.mae_import", "io.export"]),
    ("evaluation", ["evaluation", "evaluation.options", "evaluation.splits", "evaluation.features",
                    "evaluation.protocols", "evaluation.results", "evaluation.finetune", "evaluation.runner",
                    "evaluation.compare"]),
    ("pictures", ["viz", "viz.pictures", "viz.visualize", "viz.probe", "viz.report"]),
    ("training", ["train", "train.signals", "train.callbacks", "train.console", "train.run_folder", "train.steps",
                  "train.build", "train.trainer"]),
    ("commands and API", ["cli", "cli.flags", "cli.eval", "cli.app", "__init__", "__main__"]),
]
LAYER = {module: i for i, (_, modules) in enumerate(LAYERS) for module in modules}
# The folders, bottom to top: a package imports only packages (and top-level modules) below it or itself.
PACKAGE_ORDER = ["errors", "version", "options", "lazy", "runtime", "distributed", "optim", "models", "maskers",
                 "config", "data", "io", "evaluation", "viz", "train", "cli", "__init__", "__main__"]


def module_name(path: Path) -> str:
    """``clmae/maskers/random.py`` → ``maskers.random``; ``clmae/__init__.py`` → ``__init__``."""
    rel = path.relative_to(PACKAGE).with_suffix("")
    parts = list(rel.parts)
    if len(parts) > 1 and parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def unit(module: str) -> str:
    """The folder (or top-level module) a module belongs to."""
    return module.split(".")[0]


def layer_of(module: str) -> str | None:
    """The entry of LAYERS for ``module``, or for the module a ``module.name`` import refers to."""
    while module and module not in LAYER:
        module = module.rpartition(".")[0]
    return module or None


def imported_modules(path: Path, module: str) -> set[str]:
    """Every clmae module ``path`` imports (absolute or relative, anywhere in the file)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    package = module.split(".") if is_package else module.split(".")[:-1]
    if module == "__init__":
        package = []
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "clmae" or alias.name.startswith("clmae."):
                    found.add(alias.name[len("clmae."):] or "__init__")
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                if node.module and (node.module == "clmae" or node.module.startswith("clmae.")):
                    base = node.module[len("clmae."):] if node.module != "clmae" else ""
                else:
                    continue
            else:
                anchor = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                base = ".".join(anchor + ([node.module] if node.module else []))
            if base and node.module:
                found.add(base)
            else:  # ``from . import x, y`` imports modules x and y of that package
                for alias in node.names:
                    found.add(f"{base}.{alias.name}" if base else alias.name)
    return {m for m in found if m}


def graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        module = module_name(path)
        edges[module] = imported_modules(path, module) - {module}
    return edges


def test_every_module_has_a_layer():
    missing = sorted(set(graph()) - set(LAYER))
    assert not missing, f"modules without a layer in tests/test_layers.py (and docs/architecture.md): {missing}"
    assert not sorted(set(LAYER) - set(graph())), "LAYERS lists modules that do not exist"


def test_no_module_imports_a_higher_layer():
    wrong = []
    for module, targets in graph().items():
        for target in targets:
            where = layer_of(target)
            if where is not None and LAYER[where] > LAYER[module]:
                wrong.append(f"{module} ({LAYERS[LAYER[module]][0]}) imports {target} ({LAYERS[LAYER[where]][0]})")
    assert not wrong, "imports of a higher layer:\n" + "\n".join(wrong)


def test_folders_import_only_downward():
    """The same rule one level up: a folder (package) never imports a folder above it, so none import each other."""
    assert set(PACKAGE_ORDER) == {unit(m) for m in graph()}, "PACKAGE_ORDER must name every folder and top module"
    rank = {name: i for i, name in enumerate(PACKAGE_ORDER)}
    wrong = sorted({f"{unit(m)} imports {unit(t)} ({m} -> {t})" for m, targets in graph().items() for t in targets
                    if unit(t) in rank and rank[unit(t)] > rank[unit(m)]})
    assert not wrong, "folders importing a folder above them:\n" + "\n".join(wrong)


def test_top_level_holds_few_modules():
    """Every module but a handful of foundations lives in a folder named for its job."""
    top = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem not in ("__init__", "__main__"))
    assert len(top) <= 10, top


def test_no_import_cycles():
    edges = graph()
    known = set(edges)

    def resolve(target: str) -> str | None:  # ``maskers.base.Masker`` style names → the module that exists
        while target and target not in known:
            target = target.rpartition(".")[0]
        return target or None

    adjacency = {m: {t for t in map(resolve, targets) if t and t != m} for m, targets in edges.items()}
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(adjacency[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for module in sorted(adjacency):
        if module not in state:
            visit(module)


def test_the_checker_sees_imports_inside_functions(tmp_path):
    """The parser is what keeps the layers honest: it must see relative, absolute and nested imports."""
    code = tmp_path / "x.py"
    code.write_text("from .a import b\nimport clmae.c\ndef f():\n    from . import d\n    from ..e import g\n")
    assert imported_modules(code, "pkg.x") == {"pkg.a", "c", "pkg.d", "e"}
