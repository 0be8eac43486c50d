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

# Bottom to top. A module may import modules of its own layer or below, never above.
LAYERS: list[tuple[str, list[str]]] = [
    ("foundations", ["errors", "version", "options", "atomic", "lazy"]),
    ("runtime and pure pieces", ["runtime", "distributed", "signals", "callbacks", "curriculum", "flops", "losses",
                                 "optim", "metrics", "tool_options", "protocols"]),
    ("images, model, masking", ["images", "augment", "model_configs", "model", "maskers"]),
    ("files and settings", ["shards", "config", "checkpoint"]),
    ("datasets", ["data", "mae_import"]),
    ("batches and runs", ["batches", "run_folder"]),
    ("evaluation data", ["splits", "features", "reports"]),
    ("downstream tools", ["finetune", "visualize"]),
    ("evaluation, probe and console", ["evaluation", "probe", "console"]),
    ("training", ["trainer"]),
    ("commands and API", ["cli", "eval_cli", "report", "compare", "export", "__init__", "__main__"]),
]
LAYER = {module: i for i, (_, modules) in enumerate(LAYERS) for module in modules}


def module_name(path: Path) -> str:
    """``clmae/maskers/random.py`` → ``maskers.random``; ``clmae/__init__.py`` → ``__init__``."""
    rel = path.relative_to(PACKAGE).with_suffix("")
    parts = list(rel.parts)
    if len(parts) > 1 and parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def unit(module: str) -> str:
    """The architectural unit of a module: a package's sub-modules belong to the package."""
    return module.split(".")[0]


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
    missing = sorted({unit(m) for m in graph()} - set(LAYER))
    assert not missing, f"modules without a layer in tests/test_layers.py (and docs/architecture.md): {missing}"


def test_no_module_imports_a_higher_layer():
    wrong = []
    for module, targets in graph().items():
        for target in targets:
            if unit(target) in LAYER and LAYER[unit(target)] > LAYER[unit(module)]:
                wrong.append(f"{module} ({LAYERS[LAYER[unit(module)]][0]}) imports {target} "
                             f"({LAYERS[LAYER[unit(target)]][0]})")
    assert not wrong, "imports of a higher layer:\n" + "\n".join(wrong)


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
