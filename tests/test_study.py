"""`interp run`: a whole tiny study end to end, stage caching, --stage, and config errors."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from experiments.cli import app

TINY = """
name = "tiny"
seed = 0
out = "{out}"
[model]
name = "tiny-random"
[harvest]
hooks = ["blocks.1.hook_resid_post"]
n_tokens = 2000
ctx = 32
batch_size = 8
[sae]
settings = [{{ n_latents = 64, k = 4 }}]
n_tokens = 4096
batch_size = 512
checkpoint_every = 4
[eval]
n_tokens = 256
[dashboard]
n_features = 3
n_tokens = 256
[probes]
tasks = ["sentiment"]
layers = "0,1"
[steer]
query = "the"
n_prompts = 2
max_new_tokens = 3
"""


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    cfg = root / "tiny.toml"
    cfg.write_text(TINY.format(out=root / "run"))
    result = CliRunner().invoke(app, ["run", str(cfg)])
    assert result.exit_code == 0, result.output
    return cfg, root / "run"


def test_study_writes_every_artefact(finished_run):
    _, run = finished_run
    for name in ("config.toml", "provenance.json", "metrics.jsonl", "report.html"):
        assert (run / name).is_file(), name
    stages = {p.name.split("-")[0] for p in (run / "stages").iterdir()}
    assert stages == {"harvest", "train", "eval", "dashboard", "probes", "steer"}
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert sum(e["event"] == "stage_done" for e in events) == 6
    assert any(e["event"] == "train_step" and "fvu" in e for e in events)
    prov = json.loads((run / "provenance.json").read_text())
    assert prov["seed"] == 0 and prov["packages"]["torch"]
    report = (run / "report.html").read_text()
    assert "http://" not in report and "https://" not in report  # offline, self-contained
    for stage in stages:
        assert f"<h2>{stage}</h2>" in report
    eval_summary = json.loads(next(run.glob("stages/eval-*/stage.json")).read_text())["summary"]
    assert {k.rsplit(".", 1)[1] for k in eval_summary} >= {"ce_loss_recovered", "fvu", "l0", "dead_fraction", "kl_clean_spliced"}
    steer = json.loads(next(run.glob("stages/steer-*/steer.json")).read_text())
    assert len(steer["samples"]) == 2 and 0.0 <= steer["hit_rate_steered"] <= 1.0


def test_rerun_reuses_finished_stages(finished_run):
    cfg, run = finished_run
    before = (run / "metrics.jsonl").read_text().count("stage_done")
    result = CliRunner().invoke(app, ["run", str(cfg)])
    assert result.exit_code == 0, result.output
    text = (run / "metrics.jsonl").read_text()
    assert text.count("stage_done") == before and text.count("stage_cached") >= 6


def test_single_stage_with_force(finished_run):
    cfg, run = finished_run
    before = (run / "metrics.jsonl").read_text().count("stage_done")
    result = CliRunner().invoke(app, ["run", str(cfg), "--stage", "eval", "--force"])
    assert result.exit_code == 0, result.output
    assert (run / "metrics.jsonl").read_text().count("stage_done") == before + 1


@pytest.mark.parametrize(
    "patch, message",
    [
        (("[harvest]\n", "[harvest]\nbogus = 1\n"), "unknown key config.harvest.bogus"),
        (('hooks = ["blocks.1.hook_resid_post"]', 'hooks = ["blocks.9.hook_resid_post"]'), "has no hook 'blocks.9.hook_resid_post'"),
        (('layers = "0,1"', 'layers = "0,7"'), "out of range"),
        (("k = 4", "k = 64"), "must be smaller than n_latents"),
    ],
)
def test_bad_config_exits_2_before_work(tmp_path, patch, message):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(TINY.format(out=tmp_path / "run").replace(*patch))
    result = CliRunner().invoke(app, ["run", str(cfg)])
    assert result.exit_code == 2, result.output
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run" / "stages").exists()


def test_unknown_stage(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(TINY.format(out=tmp_path / "run"))
    result = CliRunner().invoke(app, ["run", str(cfg), "--stage", "trian"])
    assert result.exit_code == 2 and "did you mean: train" in result.stderr
