"""scripts/pruner_matrix.py: a refused pair is told from a failed one, and the table counts both."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "pruner_matrix.py"
spec = importlib.util.spec_from_file_location("pruner_matrix", SCRIPT)
matrix = importlib.util.module_from_spec(spec)
sys.modules["pruner_matrix"] = matrix  # dataclasses resolve their module by name
spec.loader.exec_module(matrix)


def test_refusal_is_read_from_hydras_quoted_value_error():
    stderr = (
        "Error in call to target 'x.Net':\n"
        'ValueError("ToMeMerger cannot run in Swin UNETR: why.")\n'
        "full_key: model\n"
    )
    assert matrix.refusal_line(stderr) == "ToMeMerger cannot run in Swin UNETR: why."


def test_refusal_is_read_from_a_plain_traceback():
    assert matrix.refusal_line("Traceback ...\nValueError: pruning.q must be in [0, 100)\n") == (
        "pruning.q must be in [0, 100)"
    )


def test_another_error_is_no_refusal():
    assert matrix.refusal_line("Traceback ...\nRuntimeError: shape mismatch\n") is None


def test_table_counts_trained_refused_and_failed_pairs():
    results = [
        matrix.PairResult("unetr_small", "prato", 0, 10.0, dsc=0.5, flop_ratio=0.9),
        matrix.PairResult("swin_unetr_small", "tome", 1, 5.0, refusal="ToMeMerger cannot run in Swin UNETR"),
        matrix.PairResult("segformer_small", "stp", 1, 5.0),
    ]
    text = matrix.table(results, "python scripts/pruner_matrix.py")
    assert "| unetr_small | prato | trained | 0.500 | 0.900 |  |" in text
    assert "| swin_unetr_small | tome | refused |" in text
    assert "| segformer_small | stp | FAILED |" in text
    assert text.rstrip().endswith("1 trained, 1 refused, 1 failed.")
