"""Steering interventions: the math (error term, ablation, clamps), position policies, hook cleanup."""

from __future__ import annotations

import pytest
import torch
from steering_fixtures import ToyTopKSAE, acts_at, tiny_llama

import interp
from interp.errors import UserError
from interp.steering import mean_residual_norm
from interp.steering_positions import Positions, PositionTracker

HOOK = "blocks.0.hook_resid_post"


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.fixture(scope="module")
def sae(model):
    return ToyTopKSAE(model.cfg.d_model, 96, k=8, hook_name=HOOK)


def _tokens(model, text="The quick brown fox jumps over the lazy dog"):
    return model.to_tokens(text)


def _logits(model, tokens, **kw):
    with torch.inference_mode():
        return model(tokens, **kw)


def test_clamp_keeps_the_error_term_exactly(sae):
    x = torch.randn(2, 5, 64) * 3
    clamp = interp.Clamp(sae, [3, 17], [4.0, 0.5])
    x_new = clamp.apply(x)
    f = sae.encode(x)
    f_new = f.clone()
    f_new[..., 3], f_new[..., 17] = 4.0, 0.5
    torch.testing.assert_close(x_new - sae.decode(f_new), x - sae.decode(f), atol=1e-5, rtol=0)


def test_feature_ablation_moves_only_along_decoder_rows(sae):
    x = torch.randn(3, 4, 64) * 3
    f = sae.encode(x)
    feat = int(f[0, 0].argmax())
    x_new = interp.Ablate(sae=sae, features=[feat]).apply(x)
    expected = x - f[..., feat, None] * sae.W_dec[feat].detach()
    torch.testing.assert_close(x_new, expected, atol=1e-5, rtol=0)
    assert (x_new - x).abs().max() > 0.01


def test_direction_ablation_is_a_projection():
    u = torch.randn(64)
    x = torch.randn(2, 3, 64)
    x_new = interp.Ablate(HOOK, u).apply(x)
    unit = u / u.norm()
    assert (x_new @ unit).abs().max() < 1e-5
    # the change is parallel to u: removing the u-component of the change leaves nothing
    change = x_new - x
    assert (change - (change @ unit)[..., None] * unit).abs().max() < 1e-5


def test_scale_and_clamp_values(sae):
    x = torch.randn(1, 2, 64) * 3
    f = sae.encode(x)
    feat = int(f[0, 0].argmax())
    doubled = interp.Scale(sae, feat, 2.0).apply(x)
    torch.testing.assert_close(doubled - x, f[..., feat, None] * sae.W_dec[feat].detach(), atol=1e-5, rtol=0)
    sae.max_activations = torch.arange(96, dtype=torch.float32)
    try:
        assert torch.allclose(interp.Clamp(sae, [5, 7], "10x").values, torch.tensor([50.0, 70.0]))
        assert torch.allclose(interp.Clamp(sae, [5, 7], ["2x", 1.5]).values, torch.tensor([10.0, 1.5]))
    finally:
        sae.max_activations = None
    with pytest.raises(UserError, match="max_activations"):
        interp.Clamp(sae, 5, "10x")
    with pytest.raises(UserError, match="out of range"):
        interp.Clamp(sae, 96, 1.0)
    with pytest.raises(UserError, match="strength"):
        interp.Clamp(sae, 5, "tenx")


def test_clamping_to_the_current_value_changes_nothing(model, sae):
    tokens = _tokens(model)
    pos = 4
    x = acts_at(model, tokens, HOOK)
    f = sae.encode(x)[0, pos]
    feats = f.nonzero().flatten()[:3].tolist()
    assert feats, "the toy SAE should have active features"
    mask = torch.zeros(1, tokens.shape[1], dtype=torch.bool)
    mask[0, pos] = True
    base = _logits(model, tokens)
    with interp.steered(model, interp.Clamp(sae, feats, f[feats].tolist(), positions=Positions.explicit(mask))):
        same = _logits(model, tokens)
    torch.testing.assert_close(same, base, atol=1e-4, rtol=0)
    with interp.steered(model, interp.Clamp(sae, feats, (f[feats] + 5).tolist(), positions=Positions.explicit(mask))):
        moved = _logits(model, tokens)
    assert (moved[0, pos:] - base[0, pos:]).abs().max() > 1e-2
    torch.testing.assert_close(moved[0, :pos], base[0, :pos], atol=1e-5, rtol=0)


def test_explicit_mask_indexes_real_tokens_under_left_padding(model):
    tokens = _tokens(model)[0]
    n, pad = len(tokens), 3
    padded = torch.cat([torch.zeros(pad, dtype=torch.long), tokens])[None]
    attn = torch.cat([torch.zeros(pad), torch.ones(n)]).long()[None]
    mask = torch.zeros(1, n, dtype=torch.bool)
    mask[0, 5] = True
    add = interp.Add(HOOK, torch.randn(64), 6.0, positions=Positions.explicit(mask))
    base_alone = acts_at(model, tokens[None], HOOK)
    with interp.steered(model, add):
        alone = acts_at(model, tokens[None], HOOK)
        padded_acts = acts_at(model, padded, HOOK, attention_mask=attn)
    changed = (alone - base_alone).norm(dim=-1)[0]
    assert changed[5] > 1.0 and changed[:5].max() < 1e-5 and changed[6:].max() < 1e-5
    torch.testing.assert_close(padded_acts[0, pad:], alone[0], atol=1e-4, rtol=0)


def test_after_marker_policy_leaves_earlier_positions_untouched(model):
    tokens = _tokens(model)[0]
    marker = tokens[3:5].tolist()
    base = acts_at(model, tokens[None], HOOK)
    with interp.steered(model, interp.Add(HOOK, torch.randn(64), 6.0, positions=Positions.after(marker))):
        acts = acts_at(model, tokens[None], HOOK)
    changed = (acts - base).norm(dim=-1)[0]
    assert changed[:5].max() < 1e-5 and changed[5:].min() > 1.0


def test_tracker_counts_steps_under_kv_cache():
    tracker = PositionTracker()
    prompt = torch.tensor([[0, 0, 7, 8, 9], [1, 2, 3, 8, 9]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    tracker.prompt_lengths = torch.tensor([3, 5])
    tracker.begin_call(prompt, mask, continues_cache=False)
    gen = Positions("generated")
    after = Positions.after([8, 9])
    assert not tracker.mask(gen, 2, 5, torch.device("cpu")).any()
    assert tracker.mask(Positions(), 2, 5, torch.device("cpu")).tolist() == mask.bool().tolist()
    mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
    tracker.begin_call(torch.tensor([[4], [4]]), mask, continues_cache=True)
    assert tracker.mask(gen, 2, 1, torch.device("cpu")).tolist() == [[True], [True]]
    assert tracker.mask(after, 2, 1, torch.device("cpu")).tolist() == [[True], [True]]
    assert tracker.mask(Positions("prompt"), 2, 1, torch.device("cpu")).tolist() == [[False], [False]]


def test_hooks_are_removed_after_an_exception(model):
    tokens = _tokens(model)
    base = _logits(model, tokens)
    with pytest.raises(RuntimeError, match="boom"):
        with interp.steered(model, interp.Add(HOOK, torch.randn(64), 50.0)):
            assert (_logits(model, tokens) - base).abs().max() > 1e-2
            raise RuntimeError("boom")
    assert not model.hook_dict[HOOK]._forward_hooks
    assert not model.original_model._forward_pre_hooks
    torch.testing.assert_close(_logits(model, tokens), base, atol=0, rtol=0)


def test_relative_add_uses_the_mean_residual_norm(model):
    prompts = ["One two three", "A cat and a dog"]
    norms = torch.cat([acts_at(model, model.to_tokens(p), HOOK)[0, 1:].norm(dim=-1) for p in prompts])
    assert mean_residual_norm(model, HOOK, prompts) == pytest.approx(float(norms.mean()), rel=1e-5)
    add = interp.Add(HOOK, torch.randn(64), "4x", norm_prompts=prompts)
    add.prepare(model)
    assert add.coef == pytest.approx(4 * float(norms.mean()), rel=1e-5)


def test_contrastive_vector_is_a_mean_difference(model):
    pos, neg = ["I love this", "What a joy"], ["I hate this", "What a pain"]
    direction = interp.contrastive_vector(model, pos, neg, HOOK)
    last = lambda p: acts_at(model, model.to_tokens(p), HOOK)[0, -1]  # noqa: E731
    expected = torch.stack([last(p) for p in pos]).mean(0) - torch.stack([last(p) for p in neg]).mean(0)
    torch.testing.assert_close(direction.vector, expected, atol=1e-5, rtol=0)
    assert direction.hook_name == HOOK and direction.source == "caa"


def test_bad_inputs_are_user_errors(model, sae):
    with pytest.raises(UserError, match="unknown hook"):
        with interp.steered(model, interp.Add("blocks.0.hook_resid_pots", torch.randn(64), 1.0)):
            pass
    with pytest.raises(UserError, match="d_model"):
        with interp.steered(model, interp.Add(HOOK, torch.randn(10), 1.0)):
            pass
    with pytest.raises(UserError, match="zero"):
        interp.Add(HOOK, torch.zeros(64), 1.0)
    with pytest.raises(UserError, match="position policy"):
        interp.Add(HOOK, torch.randn(64), 1.0, positions="sometimes")


@pytest.fixture(scope="module")
def sae_dir(tmp_path_factory):
    import saes

    sae = saes.TopKSAE(64, 32, 4, hook_name=HOOK, model="tiny-random")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a fresh TopKSAE has a zero decoder: give it random unit rows
        sae.W_enc.copy_(torch.randn(sae.W_enc.shape, generator=g) / 8)
        sae.W_dec.copy_(torch.nn.functional.normalize(torch.randn(sae.W_dec.shape, generator=g), dim=-1))
    path = tmp_path_factory.mktemp("sae") / "sae"
    sae.save(path)
    return path


def test_cli_steer_writes_side_by_side_json(sae_dir, tmp_path):
    import json

    from typer.testing import CliRunner

    from experiments.cli import app

    out = tmp_path / "steer.json"
    args = ["steer", "--model", "tiny-random", "--sae", str(sae_dir), "--feature", "3", "--sweep", "0,40", "--prompt", "The cat", "--prompt", "Hello", "--n", "2", "--max-new-tokens", "3", "--temperature", "0", "--keywords", "the", "--no-chat", "--device", "cpu", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert [r["strength"] for r in data["results"]] == ["0", "40"]
    assert len(data["results"][0]["samples"]) == 4 and data["intervention"]["features"] == [3]
    first = data["results"][0]["samples"][0]
    assert first["prompt"] == "The cat" and "steered" in first and "base" in first
    assert "base" in result.output and "steered" in result.output
    assert any(s["steered"] != s["base"] for s in data["results"][1]["samples"])
    html = (tmp_path / "steer.html").read_text()  # the concept-vs-fluency curve beside the JSON
    assert "concept hit rate" in html and str(data["results"][1]["nll"])[:6] in html


def test_cli_steer_prompt_set_uses_the_fresh_prompts(sae_dir, tmp_path):
    import json

    from typer.testing import CliRunner

    from experiments.cli import app
    from interp.steering_eval import load_steering_prompts

    out = tmp_path / "fresh.json"
    args = ["steer", "--model", "tiny-random", "--sae", str(sae_dir), "--feature", "3", "--clamp", "4", "--prompt-set", "fresh",
            "--max-new-tokens", "1", "--temperature", "0", "--no-chat", "--device", "cpu", "--batch-size", "36", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    fresh = load_steering_prompts("fresh")
    assert [s["prompt"] for s in json.loads(out.read_text())["results"][0]["samples"]] == fresh
    assert load_steering_prompts("both") == load_steering_prompts() + fresh
    bad = CliRunner().invoke(app, [("held-out" if a == "fresh" else a) for a in args])
    assert bad.exit_code == 2 and bad.stderr.strip() == "error: unknown prompt set 'held-out'; use one of shipped, fresh, both"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--prompt-set", "fresh"], "--prompt and --prompt-set both choose the prompts"),
        (["--clamp", "3", "--coef", "2"], "choose one of"),
        (["--feature", "3", "--clamp", "10x"], "max_activations"),
        (["--clamp", "3"], "needs --feature"),
    ],
)
def test_cli_steer_errors_are_one_line(sae_dir, extra, message):
    from typer.testing import CliRunner

    from experiments.cli import app

    result = CliRunner().invoke(app, ["steer", "--model", "tiny-random", "--sae", str(sae_dir), "--prompt", "x", "--device", "cpu", *extra])
    assert result.exit_code == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_cli_steer_with_a_direction_and_vector_errors(tmp_path):
    import json

    from safetensors.torch import save_file
    from typer.testing import CliRunner

    from experiments.cli import app

    direction = interp.Direction(vector=torch.randn(64), hook_name=HOOK, model="tiny-random", source="test")
    interp.save_direction(direction, tmp_path / "dir")
    out = tmp_path / "d.json"
    args = ["steer", "--model", "tiny-random", "--direction", str(tmp_path / "dir"), "--coef", "30", "--positions", "generated", "--prompt", "Hi", "--max-new-tokens", "2", "--temperature", "0", "--no-chat", "--device", "cpu", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["intervention"]["hook"] == HOOK and data["positions"] == "generated"
    save_file({"vector": torch.randn(64)}, str(tmp_path / "v.safetensors"))
    bad = CliRunner().invoke(app, ["steer", "--model", "tiny-random", "--vector", str(tmp_path / "v.safetensors"), "--coef", "1", "--prompt", "x"])
    assert bad.exit_code == 2 and "--hook" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    clamp = CliRunner().invoke(app, ["steer", "--model", "tiny-random", "--direction", str(tmp_path / "dir"), "--clamp", "3", "--prompt", "x"])
    assert clamp.exit_code == 2 and "need an SAE feature" in clamp.stderr


def test_cli_steer_sweep_resumes_after_an_interrupt(sae_dir, tmp_path, monkeypatch):
    import json

    from typer.testing import CliRunner

    import interp
    from experiments.cli import app

    out = tmp_path / "steer.json"
    args = ["steer", "--model", "tiny-random", "--sae", str(sae_dir), "--feature", "3", "--prompt", "The cat", "--max-new-tokens", "3",
            "--temperature", "0", "--no-chat", "--device", "cpu", "--out", str(out), "--sweep"]
    real, calls = interp.generate, []

    def interrupted_at_third(*a, **kw):  # base, strength 0, then Ctrl-C during strength 40
        calls.append(kw.get("interventions", a[2] if len(a) > 2 else None))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(interp, "generate", interrupted_at_third)
    result = CliRunner().invoke(app, [*args, "0,40,80"])
    assert result.exit_code == 130 and "resume" in result.output
    partial = json.loads(out.read_text())
    assert partial["complete"] is False and [r["strength"] for r in partial["results"]] == ["0"]

    calls.clear()
    monkeypatch.setattr(interp, "generate", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    result = CliRunner().invoke(app, [*args, "0,40,80"])
    assert result.exit_code == 0, result.output
    assert len(calls) == 2  # only 40 and 80: the base and strength 0 came from the file
    resumed = json.loads(out.read_text())
    assert resumed["complete"] is True and [r["strength"] for r in resumed["results"]] == ["0", "40", "80"]
    assert resumed["results"][0] == partial["results"][0]

    # the same sweep from scratch gives the same continuations as the resumed one
    fresh = tmp_path / "fresh.json"
    monkeypatch.setattr(interp, "generate", real)
    assert CliRunner().invoke(app, [*args[:-2], str(fresh), "--sweep", "0,40,80"]).exit_code == 0
    assert json.loads(fresh.read_text())["results"] == resumed["results"]

    # other settings (more tokens) do not reuse the file: everything is generated again
    calls.clear()
    monkeypatch.setattr(interp, "generate", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    longer = [*args[:10], "4", *args[11:]]
    assert CliRunner().invoke(app, [*longer, "0,40"]).exit_code == 0
    assert len(calls) == 3 and json.loads(out.read_text())["settings"]["max_new_tokens"] == 4


def test_cli_steer_random_baseline_matches_the_push(sae_dir, tmp_path):
    import json

    from typer.testing import CliRunner

    import interp
    import saes
    from experiments.cli import app
    from experiments.commands.steer import _random_like

    sae = saes.load(sae_dir)
    clamp = interp.Clamp(sae, [3, 5], [40.0, -10.0])
    (rnd,) = _random_like([clamp], seed=0)
    push = 40.0 * sae.W_dec[3].detach() - 10.0 * sae.W_dec[5].detach()
    assert rnd.coef == pytest.approx(float(push.norm()), rel=1e-5) and abs(float(rnd.unit @ push / push.norm())) < 0.9
    add = interp.Add(HOOK, torch.ones(64), "2.5")
    assert _random_like([add], seed=1)[0].coef == 2.5

    out = tmp_path / "steer.json"
    args = ["steer", "--model", "tiny-random", "--sae", str(sae_dir), "--feature", "3", "--sweep", "0,40", "--prompt", "The cat",
            "--max-new-tokens", "3", "--temperature", "0", "--keywords", "the", "--no-chat", "--device", "cpu", "--out", str(out)]
    result = CliRunner().invoke(app, [*args, "--random-baseline"])
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())["results"]
    assert all("random_nll" in r and "random" in r["samples"][0] for r in rows)
    assert "random direction" in (tmp_path / "steer.html").read_text()
    bad = CliRunner().invoke(app, ["steer", "--model", "tiny-random", "--sae", str(sae_dir), "--feature", "3", "--scale", "2",
                                   "--prompt", "x", "--device", "cpu", "--random-baseline"])
    assert bad.exit_code == 2 and "--random-baseline needs" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_cli_steer_resume_rescores_and_ignores_broken_files(sae_dir, tmp_path, monkeypatch):
    import json

    from typer.testing import CliRunner

    import interp
    from experiments.cli import app
    from interp.steering_eval import concept_hit_rate

    out = tmp_path / "steer.json"
    args = ["steer", "--model", "tiny-random", "--sae", str(sae_dir), "--feature", "3", "--prompt", "The cat", "--prompt", "a dog",
            "--max-new-tokens", "3", "--temperature", "0", "--no-chat", "--device", "cpu", "--out", str(out), "--sweep", "0,40"]
    assert CliRunner().invoke(app, [*args, "--keywords", "the"]).exit_code == 0
    real, calls = interp.generate, []
    monkeypatch.setattr(interp, "generate", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    # other keywords: nothing is generated again, every hit rate is recomputed from the stored texts
    assert CliRunner().invoke(app, [*args, "--keywords", "a"]).exit_code == 0 and calls == []
    data = json.loads(out.read_text())
    assert data["keywords"] == ["a"]
    for row in data["results"]:
        assert row["hit_rate"] == concept_hit_rate([s["steered"] for s in row["samples"]], ["a"])
        assert row["base_hit_rate"] == concept_hit_rate([s["base"] for s in row["samples"]], ["a"])
    # broken results under the right key: the base is kept, the strengths are generated again
    data["results"] = None
    out.write_text(json.dumps(data))
    assert CliRunner().invoke(app, [*args, "--keywords", "a"]).exit_code == 0 and len(calls) == 2
    # a file nested too deep for the JSON parser starts over without a traceback
    out.write_text("[" * 100000 + "]" * 100000)
    assert CliRunner().invoke(app, [*args, "--keywords", "a"]).exit_code == 0 and len(calls) == 5
    bad = CliRunner().invoke(app, [*args[:-4], "--out", str(tmp_path / "run.html"), "--sweep", "0"])
    assert bad.exit_code == 2 and "is the JSON file" in bad.stderr
