"""`interp probe` in-process: a small end-to-end run and one-line errors with exit code 2."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from experiments.cli import app


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _csv(path, rows):
    path.write_text("\n".join(rows) + "\n")
    return str(path)


def small_task(tmp_path):
    rows = ["text,label,group"]
    for i, thing in enumerate(["day", "film", "meal", "trip", "song", "book"]):
        for word, label in (("good", 1), ("great", 1), ("nice", 1), ("bad", 0), ("awful", 0), ("sad", 0)):
            rows.append(f"The {thing} was {word},{label},{thing}")
    return _csv(tmp_path / "task.csv", rows)


def test_probe_command_end_to_end(tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["probe", "--model", "tiny-random", "--task", small_task(tmp_path), "--layers", "0,1", "--out", str(out), "--l2", "1e-2"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert [r["layer"] for r in metrics["layers"]] == [0, 1]
    assert {"accuracy", "auroc", "selectivity"} <= set(metrics["layers"][0])
    assert metrics["best_layer"]["layer"] in (0, 1)
    assert (out / "probes" / "layer_00_logreg" / "vector.safetensors").is_file()
    assert "best layer" in result.output


@pytest.mark.parametrize(
    "rows, args, message",
    [
        ([], [], "is empty"),
        (["text,label", "a,1", "b,1", "c,1"], [], "only one class"),
        (["sentence,label", "a,1", "b,0"], [], "lacks the column"),
        (["text,y", "a,1", "b,0"], [], "lacks the column(s) label"),
        (["text,label", "a,1", "b,0", "c,2"], [], "distinct labels"),
        (None, ["--layers", "0,9"], "out of range"),
        (None, ["--layers", "zero"], "not 'all'"),
        (None, ["--pooling", "max"], "unknown --pooling"),
    ],
)
def test_bad_inputs_exit_2_with_one_line(tmp_path, rows, args, message):
    task = small_task(tmp_path) if rows is None else _csv(tmp_path / "bad.csv", rows) if rows else _csv(tmp_path / "bad.csv", [""])
    result = CliRunner().invoke(app, ["probe", "--model", "tiny-random", "--task", task, "--out", str(tmp_path / "o"), *args])
    assert result.exit_code == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.stderr
    assert not (tmp_path / "o" / "metrics.json").exists()


def test_probe_tasks_lists_the_shipped_tasks():
    result = CliRunner().invoke(app, ["probe-tasks"])
    assert result.exit_code == 0
    assert all(name in result.output for name in ("facts", "sentiment", "pos"))
