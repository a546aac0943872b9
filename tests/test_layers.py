"""Layers point one way: a module imports only from its own layer or the layers below it.

The pipeline reads top to bottom (tasks -> models -> activations -> simplifiers -> analyses -> reports ->
reproduction -> cli); every ``import illusions.*`` in the package, at module level or inside a function,
is checked against this order, so an upward arrow or an import cycle between packages fails here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import illusions

PACKAGE = Path(illusions.__file__).parent

# Rank of each top-level module or package of illusions; an import may only go to an equal or lower rank.
RANK = {
    "errors": 0, "config": 0, "io": 0, "devices": 0, "weights": 0,
    "tasks": 1, "metrics": 1, "metric_table": 1,
    "scoring": 2,
    "models": 3, "model_folders": 3, "activations": 3, "backends": 3,
    "training": 4, "training_setup": 4, "training_batches": 4,
    "bundled": 5, "simplifiers": 5,
    "registry": 6,
    "analyses": 7, "recipes": 7,
    "reports": 8,
    "reproduction": 9, "engines": 9, "api": 9,
    "cli": 10, "__main__": 11,
}


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("illusions"):
            if node.module == "illusions":  # from illusions import registry / __version__
                submodules = [a.name for a in node.names
                              if (PACKAGE / f"{a.name}.py").exists() or (PACKAGE / a.name).is_dir()]
                out += [f"illusions.{name}" for name in submodules]
            else:
                out.append(node.module)
        elif isinstance(node, ast.Import):
            out += [a.name for a in node.names if a.name.startswith("illusions.")]
    return out


def test_every_module_has_a_layer():
    units = {p.stem for p in PACKAGE.glob("*.py")} | {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    assert units - {"__init__"} <= set(RANK), sorted(units - {"__init__"} - set(RANK))


def test_no_import_points_upward():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        here = _unit(".".join(rel.parts).removesuffix(".__init__"))
        if here == "__init__":
            continue
        for target in _imports(path):
            there = _unit(target)
            if there != "__init__" and RANK[there] > RANK[here]:
                upward.append(f"{rel} imports {target}")
    assert upward == []
