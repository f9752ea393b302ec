"""The package's layers: no module imports from a layer above its own, and Ray only under ``distributed/``.

Bottom to top: settings and errors; pure compute (tensors and arrays in, tensors and arrays out); on-disk
schemas and I/O; Ray orchestration; stages and applications; the public façade and the CLI.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "freeshap_ray"

LAYERS = {
    "errors": 0, "config": 0, "types": 0,
    "values": 1, "data": 1, "models": 1, "grads": 1, "kernel": 1, "utility": 1, "valuation": 1, "reagent": 1,
    "apps.finetune": 1, "apps.curves": 1, "apps.kernel_baselines": 1, "apps.feature_surrogate": 1,
    "io": 2,
    "distributed": 3,
    "apps": 4, "pipeline": 4, "explain": 4,
    "reagent.api": 5, "api": 5, "cli": 5, "__init__": 5, "__main__": 5,
}


def layer(module: str) -> int:
    """Layer of ``freeshap_ray.<module>`` (dotted, without the package name): the longest listed prefix."""
    parts = module.split(".")
    for k in range(len(parts), 0, -1):
        key = ".".join(parts[:k])
        if key in LAYERS:
            return LAYERS[key]
    raise KeyError(f"freeshap_ray.{module}: not assigned to a layer in tests/test_layers.py")


def modules() -> list[tuple[str, Path]]:
    out = []
    for p in sorted(PKG.rglob("*.py")):
        rel = p.relative_to(PKG).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        out.append((".".join(parts), p))
    return out


def imports(path: Path, module: str) -> list[tuple[int, str]]:
    """(line, imported module) for every import in the file, top level or inside functions."""
    tree = ast.parse(path.read_text())
    is_pkg = path.name == "__init__.py"
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                target = ".".join([*anchor, *(node.module.split(".") if node.module else [])])
                found.append((node.lineno, "freeshap_ray." + target if target else "freeshap_ray"))
                if not node.module:  # "from . import x": each name is a module of that package
                    found += [(node.lineno, f"freeshap_ray.{'.'.join([*anchor, a.name])}") for a in node.names]
            else:
                found.append((node.lineno, node.module or ""))
    return found


@pytest.mark.parametrize("module,path", modules(), ids=[m for m, _ in modules()])
def test_no_upward_imports_and_ray_only_in_distributed(module, path):
    own = layer(module)
    for line, target in imports(path, module):
        if target == "ray" or target.startswith("ray."):
            assert module.startswith("distributed"), f"{path.name}:{line} imports Ray outside distributed/"
        if target == "freeshap_ray" or target.startswith("freeshap_ray."):
            inner = target[len("freeshap_ray."):] if target != "freeshap_ray" else "__init__"
            assert layer(inner) <= own, (f"freeshap_ray.{module} (layer {own}) imports freeshap_ray.{inner} "
                                         f"(layer {layer(inner)}) at line {line}")


def test_every_layer_is_used():
    assert {layer(m) for m, _ in modules()} == set(range(6))
