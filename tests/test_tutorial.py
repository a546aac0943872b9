"""docs/tutorial.ipynb runs from top to bottom (nbclient, a fresh kernel) and is stored without outputs."""

from __future__ import annotations

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


@pytest.mark.slow
def test_tutorial_runs(tmp_path, monkeypatch):
    # The kernel (and the `illusions analyze` it starts) import this checkout's package.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel shows figures inline
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]
    text = "\n".join(out.get("text", "") + out.get("data", {}).get("text/plain", "") for out in outputs)
    assert "custom: svd(rank=4)" in text and "agreement (proxy accuracy / original accuracy) by" in text
    assert "long  agreement" in text and "iid   original_accuracy" in text
    assert sum("image/png" in out.get("data", {}) for out in outputs) == 1  # the attention view
    run = tmp_path / "tutorial-output" / "run"
    assert {"config.json", "metrics.csv", "metrics.json", "report.html"} <= {p.name for p in run.iterdir()}
