"""The layer sweep as a library call, its artefacts, and resuming from cached activations."""

from __future__ import annotations

import json

import pytest
import torch

import interp
from probes import sweep
from probes.artefacts import LinearProbe, load_probe, save_probe
from probes.sweep import ProbeConfig, run_probe
from probes.tasks import ProbeTask

WORDS = {1: ["good", "great", "nice", "fine", "happy"], 0: ["bad", "awful", "sad", "poor", "ugly"]}
THINGS = ["day", "film", "meal", "trip", "song", "book", "game", "room", "view", "show", "walk", "talk"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def word_task() -> ProbeTask:
    """Label = which word list the last word comes from: readable from a random model's residual."""
    texts, labels, groups = [], [], []
    for thing in THINGS:
        for label, words in WORDS.items():
            for word in words:
                texts.append(f"The {thing} was {word}")
                labels.append(label)
                groups.append(thing)
    return ProbeTask(name="words", texts=texts, labels=labels, groups=groups)


def test_run_probe_writes_metrics_plots_and_loadable_probes(tiny_model, tmp_path, monkeypatch):
    task = word_task()
    report = run_probe(tiny_model, task, ProbeConfig(l2=(1e-3, 1e-1)), out=tmp_path, progress=False)
    rows = report.metrics["layers"]
    assert [r["layer"] for r in rows] == [0, 1]
    for row in rows:
        assert row["accuracy"] >= 0.8 and row["auroc"] >= 0.95 and row["shuffled_accuracy"] <= 0.7
        assert row["selectivity"] == pytest.approx(row["accuracy"] - row["control_accuracy"])
        assert row["l2"] in (1e-3, 1e-1)
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk["best_layer"]["layer"] in (0, 1) and on_disk["split"]["test"] == len(report.split.test)
    assert (tmp_path / "layer_curve.html").stat().st_size > 1000
    assert (tmp_path / "layer_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # matplotlib is in the dev extra
    # The saved probe is a direction steering can read, and it reproduces the reported accuracy.
    direction = interp.load_direction(tmp_path / "probes" / "layer_01_logreg")
    assert direction.hook_name == "blocks.1.hook_resid_post" and direction.source == "probe:logreg"
    probe = load_probe(tmp_path / "probes" / "layer_01_logreg")
    from safetensors.torch import load_file

    x = load_file(str(tmp_path / "activations.safetensors"))["acts"][1]
    test = report.split.test
    acc = float((probe.predict(x[test]) == torch.tensor(task.labels)[test]).float().mean())
    assert acc == pytest.approx(rows[1]["accuracy"])
    mass = load_probe(tmp_path / "probes" / "layer_01_mass_mean")
    assert mass.method == "mass_mean"
    # A re-run resumes from the cached activations: no forward pass at all.
    monkeypatch.setattr(sweep, "collect_activations", lambda *a, **k: pytest.fail("activations were recomputed"))
    again = run_probe(tiny_model, task, ProbeConfig(l2=(1e-3, 1e-1)), out=tmp_path, progress=False)
    assert again.metrics["layers"] == rows


def test_shuffled_baseline_and_control_stay_near_chance_on_a_random_label_task(tiny_model):
    task = word_task()
    g = torch.Generator().manual_seed(5)
    task.labels = torch.randint(0, 2, (len(task),), generator=g).tolist()
    report = run_probe(tiny_model, task, ProbeConfig(l2=(1e-1,)), progress=False)
    for row in report.metrics["layers"]:
        assert row["accuracy"] < 0.75 and row["shuffled_accuracy"] < 0.75


def test_probe_artefact_round_trip(tmp_path):
    probe = LinearProbe(weight=torch.tensor([1.0, -2.0, 0.5]), bias=0.25, hook_name="blocks.3.hook_resid_post", model="m",
                        method="mass_mean", task="t", label_names=("no", "yes"), info={"layer": 3})
    save_probe(probe, tmp_path / "p")
    back = load_probe(tmp_path / "p")
    assert torch.equal(back.weight, probe.weight) and back.bias == 0.25 and back.label_names == ("no", "yes")
    assert back.info == {"layer": 3} and back.method == "mass_mean"
    interp.save_direction(interp.Direction(vector=torch.ones(3), hook_name="h", model="m", source="caa"), tmp_path / "d")
    with pytest.raises(interp.UserError, match="not a probe"):
        load_probe(tmp_path / "d")
