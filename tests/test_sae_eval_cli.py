"""``interp eval-sae``, ``interp dashboard`` and ``interp features stats|search`` in-process."""

from __future__ import annotations

import json
import random

import pytest
import torch
from test_sae_eval import HOOK, make_sae
from typer.testing import CliRunner

WORDS = "the bridge river city golden gate fog water boat light house stone road hill wind sea north old new red".split()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("sae_cli")
    rng = random.Random(0)
    # 2% of documents land in the eval split, so write plenty of short ones.
    lines = [json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(20)) + " Golden Gate"}) for _ in range(800)]
    (root / "corpus.jsonl").write_text("\n".join(lines) + "\n")
    make_sae(tiny_model.cfg.d_model, 32, 4, HOOK, seed=9).save(root / "sae")
    return root


def run(*args: str):
    from experiments.cli import app

    return CliRunner().invoke(app, list(args))


def common(workdir) -> list[str]:
    return ["--sae", str(workdir / "sae"), "--model", "tiny-random", "--corpus", str(workdir / "corpus.jsonl"), "--ctx", "16"]


def test_eval_sae_writes_eval_json(workdir):
    from interp import load_corpus, load_model, pack_windows
    from saes.evaluation import evaluate
    from saes.io import load

    result = run("eval-sae", *common(workdir), "--tokens", "45")
    assert result.exit_code == 0, result.output
    assert "ce_loss_recovered" in result.output
    saved = json.loads((workdir / "sae" / "eval.json").read_text())
    # Same numbers as the library call on the same held-out windows (3 windows of 15 tokens).
    model = load_model("tiny-random", device="cpu")
    windows = pack_windows(model.tokenizer, load_corpus(str(workdir / "corpus.jsonl"), split="eval"), ctx=16, n_tokens=48, seed=0)
    direct = evaluate(load(workdir / "sae"), model, windows, n_tokens=45, progress=False)
    for key in ("fvu", "l0", "ce_loss_spliced", "kl_clean_spliced"):
        assert saved[key] == pytest.approx(direct[key], rel=1e-5), key


def test_dashboard_and_stats(workdir):
    from saes.io import load

    out = workdir / "report.html"
    result = run("dashboard", *common(workdir), "--tokens", "45", "--features", "0,3,5", "--out", str(out))
    assert result.exit_code == 0, result.output
    page = out.read_text()
    assert 'id="dashboard-data"' in page and '"id": 3' in page
    result = run("features", "stats", *common(workdir), "--tokens", "45")
    assert result.exit_code == 0, result.output
    sae = load(workdir / "sae")
    assert sae.max_activations is not None and sae.max_activations.shape == (32,)
    assert torch.all(sae.max_activations >= 0)


def test_features_search(workdir):
    result = run("features", "search", *common(workdir), "--tokens", "45", "--query", "Golden Gate", "--min-count", "1", "--top", "3")
    assert result.exit_code == 0, result.output
    assert "log-odds" in result.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["eval-sae", "--sae", "/nonexistent/sae", "--model", "tiny-random"], "/nonexistent/sae"),
        (["dashboard", "--features", "a,b", "--out", "x.html"], "--features"),
        (["eval-sae", "--tokens", "0"], "--tokens"),
    ],
)
def test_cli_errors_are_one_line(workdir, args, message):
    if "--sae" not in args:
        args = [*args, *common(workdir)]
    result = run(*args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0]
