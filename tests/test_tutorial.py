"""docs/tutorial.ipynb runs from top to bottom (nbclient, a fresh kernel) and is stored without outputs."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "docs" / "tutorial.ipynb"
SRC = Path(__file__).resolve().parents[1] / "src"


def test_tutorial_is_stored_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, cell.source[:60]


def _uses_illusions(source: str) -> bool:
    return any(isinstance(n, ast.Name) and n.id in ("il", "res") for n in ast.walk(ast.parse(source)))


def test_tutorial_takes_at_most_five_illusions_calls():
    # Issue 26: the notebook's work (evaluate, display, disagreements, attention view, save) is at most
    # five statements that use illusions.
    nb = nbformat.read(NOTEBOOK, as_version=4)
    statements = [node for cell in nb.cells if cell.cell_type == "code"
                  for node in ast.parse(cell.source).body if not isinstance(node, ast.Import | ast.ImportFrom)]
    calls = [node for node in statements if {n.id for n in ast.walk(node) if isinstance(n, ast.Name)} & {"il", "res"}]
    assert 1 <= len(calls) <= 5, [ast.unparse(node)[:60] for node in calls]


@pytest.mark.slow
def test_tutorial_runs(tmp_path, monkeypatch):
    # The kernel imports this checkout's package.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    monkeypatch.delenv("MPLBACKEND", raising=False)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]
    text = "\n".join(out.get("text", "") + out.get("data", {}).get("text/plain", "") for out in outputs)
    pages = [out["data"]["text/html"] for out in outputs if "text/html" in out.get("data", {})]
    # The Evaluation's table (a hand-written hypothesis beside a built-in proxy and an SAE) ...
    assert "mean keys L0H1:" in text and "svd:" in text and "sae:" in text and "gaps vs iid" in text
    assert any("agreement gap vs iid" in page and "mean keys L0H1" in page for page in pages)
    # ... the disagreement table, one inline attention view (original | proxy) ...
    assert "original_token" in text
    assert any("L0H0 original" in page and "L0H0 proxy" in page for page in pages)
    # ... no tqdm widget warning from illusions where ipywidgets is missing (importing transformer_lens
    # may print its own), and the run directory.
    ours = [out for cell in nb.cells if cell.cell_type == "code" and _uses_illusions(cell.source) for out in cell.outputs]
    assert ours and not any("IProgress" in out.get("text", "") for out in ours)
    run = tmp_path / "tutorial-output" / "run"
    assert {"config.json", "metrics.csv", "metrics.json", "report.html"} <= {p.name for p in run.iterdir()}
