"""The shipped notebooks run headlessly on the real model and their key outputs hold."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parent.parent / "experiments" / "notebooks"


def run_notebook(name: str, workdir: Path, monkeypatch) -> dict:
    """Execute ``name`` and return the JSON summary its last cell prints."""
    monkeypatch.setenv("NOTEBOOK_WORKDIR", str(workdir))
    monkeypatch.setenv("INTERP_REPO", str(NOTEBOOKS.parent.parent))
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            assert out.get("output_type") != "error", out
    last = nb.cells[-1]["outputs"]
    text = "".join(o.get("text", "") for o in last if o.get("output_type") == "stream")
    return json.loads(text.strip().splitlines()[-1])


@pytest.mark.model
@pytest.mark.slow
def test_quickstart_notebook(tmp_path, monkeypatch):
    out = run_notebook("quickstart.ipynb", tmp_path, monkeypatch)
    assert out["n_tokens"] == 12_000
    assert out["fvu"] < 0.9 and 1 <= out["l0"] <= 32
    assert out["live"] > 0 and out["n_contexts"] >= 1
    assert out["changed"] >= 1  # clamping a feature at 10x its max changes greedy text


@pytest.mark.model
@pytest.mark.slow
def test_probing_notebook(tmp_path, monkeypatch):
    out = run_notebook("probing.ipynb", tmp_path, monkeypatch)
    assert out["best_accuracy"] >= 0.7
    assert out["best_layer"] != 0 or out["best_accuracy"] > out["layer0_accuracy"] - 1e-9


@pytest.mark.model
@pytest.mark.slow
def test_steering_notebook(tmp_path, monkeypatch):
    out = run_notebook("steering.ipynb", tmp_path, monkeypatch)
    assert out["kv_max_logit_diff"] < 1e-3 and out["kv_same_tokens"]
    assert out["changed"] >= 1
