"""The package's layers import downwards only: tokens <- pruning <- models <- lightning <- inference <- app
and cli; data and metrics stand beside the network layers; report reads runs, never the entry points."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "prato_exp"

# what each lower layer must never import (it would run up the layers)
ENTRY_POINTS = ("prato_exp.cli", "prato_exp.app")
FORBIDDEN = {
    "tokens": (
        "prato_exp.models",
        "prato_exp.pruning",
        "prato_exp.lightning",
        "prato_exp.inference",
        *ENTRY_POINTS,
    ),
    "pruning": ("prato_exp.models", "prato_exp.lightning", "prato_exp.inference", *ENTRY_POINTS),
    "models": (
        "prato_exp.data",
        "prato_exp.lightning",
        "prato_exp.inference",
        "prato_exp.report",
        *ENTRY_POINTS,
    ),
    "data": (
        "prato_exp.models",
        "prato_exp.pruning",
        "prato_exp.lightning",
        "prato_exp.inference",
        *ENTRY_POINTS,
    ),
    "metrics": ("prato_exp.lightning", "prato_exp.inference", "prato_exp.report", *ENTRY_POINTS),
    "lightning": ("prato_exp.inference", "prato_exp.report", *ENTRY_POINTS),
    "inference": ("prato_exp.report", *ENTRY_POINTS),
    "report": ENTRY_POINTS,
}


def imported_modules(path: Path) -> list[str]:
    """Every module ``path`` imports, TYPE_CHECKING blocks and function-local imports included."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
    return names


def test_the_import_scan_sees_imports_in_every_place_they_can_hide(tmp_path):
    path = tmp_path / "m.py"
    path.write_text(
        "import prato_exp.models.base\n"
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from prato_exp.models.unetr import PrunableUNETR\n"
        "def f():\n    from prato_exp.models import plain_vit\n"
    )
    assert imported_modules(path).count("prato_exp.models.unetr") == 1
    assert {"prato_exp.models.base", "prato_exp.models"} <= set(imported_modules(path))


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_lower_layers_never_import_upper_ones(layer):
    offending = [
        f"{path.relative_to(PACKAGE)} imports {name}"
        for path in sorted((PACKAGE / layer).rglob("*.py"))
        for name in imported_modules(path)
        if name.startswith(FORBIDDEN[layer])
    ]
    assert not offending, offending
