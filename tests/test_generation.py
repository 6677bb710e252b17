"""Generation: KV cache == full recompute, batched == one-by-one, policies under caching, seeds, eval."""

from __future__ import annotations

import pytest
import torch
from steering_fixtures import ToyTopKSAE, tiny_llama

import interp
from interp.errors import UserError
from interp.generation import _pick, encode_prompts
from interp.steering_eval import (
    concept_hit_rate,
    continuation_nll,
    distinct_n,
    load_steering_prompts,
    random_direction_like,
    repetition_rate,
    strength_sweep,
    write_sweep_html,
)
from interp.steering_positions import Positions

HOOK = "blocks.0.hook_resid_post"
PROMPTS = ["The cat sat", "Hello there, how are you doing today?", "A", "Numbers: 1 2 3 4"]


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.fixture(scope="module")
def interventions(model):
    sae = ToyTopKSAE(model.cfg.d_model, 96, k=8, hook_name=HOOK, seed=1)
    g = torch.Generator().manual_seed(3)
    return {
        "all": [interp.Clamp(sae, [2, 9], [6.0, 3.0]), interp.Add("blocks.1.hook_resid_pre", torch.randn(64, generator=g), 8.0)],
        "generated": [interp.Add(HOOK, torch.randn(64, generator=g), 12.0, positions="generated")],
        "prompt": [interp.Ablate(HOOK, torch.randn(64, generator=g), positions="prompt")],
        "after": [interp.Add(HOOK, torch.randn(64, generator=g), 12.0, positions=Positions.after(" there"))],
    }


def _run(model, ivs, **kw):
    return interp.generate(model, PROMPTS, ivs, max_new_tokens=5, temperature=0, return_logits=True, **kw)


def _agree_until_near_tie(a_logits, b_logits, a_tokens, b_tokens, gap=1e-3):
    """Tokens must agree at every step until the first one whose top-2 logits are within ``gap``."""
    for la, ta, tb in zip(a_logits, a_tokens, b_tokens):
        top2 = la.topk(2).values
        if float(top2[0] - top2[1]) < gap:
            return
        assert int(ta) == int(tb)


@pytest.mark.parametrize("policy", ["all", "generated", "prompt", "after"])
def test_kv_cache_matches_full_recompute(model, interventions, policy):
    cached = _run(model, interventions[policy])
    full = _run(model, interventions[policy], use_kv_cache=False)
    for a, b in zip(cached.logits, full.logits):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    assert [t.tolist() for t in cached.tokens] == [t.tolist() for t in full.tokens]


@pytest.mark.parametrize("policy", ["all", "generated", "after"])
def test_batched_matches_one_by_one(model, interventions, policy):
    batched = _run(model, interventions[policy], batch_size=4)
    single = _run(model, interventions[policy], batch_size=1)
    for la, lb, ta, tb in zip(batched.logits, single.logits, batched.tokens, single.tokens):
        torch.testing.assert_close(la, lb, atol=1e-4, rtol=0)
        _agree_until_near_tie(la, lb, ta, tb)


def test_policies_touch_only_their_positions(model, interventions):
    base = _run(model, [])
    gen = _run(model, interventions["generated"])
    prompt_only = _run(model, interventions["prompt"])
    for b, g, p in zip(base.logits, gen.logits, prompt_only.logits):
        # step 0 is computed at the last prompt token: untouched by a generated-only intervention
        torch.testing.assert_close(g[0], b[0], atol=1e-5, rtol=0)
        assert (p[0] - b[0]).abs().max() > 1e-3
    assert any((g[1:] - b[1:]).abs().max() > 1e-2 for b, g in zip(base.logits, gen.logits) if len(b) > 1)
    after = _run(model, interventions["after"])
    # only the second prompt contains the marker " there": the others are never steered
    for i, (b, a) in enumerate(zip(base.logits, after.logits)):
        changed = (a[0] - b[0]).abs().max() > 1e-3
        assert changed == (i == 1)


def test_steering_changes_continuations_and_compare_returns_the_base(model, interventions):
    out = _run(model, interventions["all"], compare=True)
    base = _run(model, [])
    assert out.base_texts == base.texts
    assert out.texts != out.base_texts
    for a, b in zip(out.base_logits, base.logits):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_sampling_is_seeded_per_prompt(model):
    kw = dict(max_new_tokens=4, temperature=5.0, seed=7)
    one = interp.generate(model, PROMPTS, batch_size=4, **kw)
    two = interp.generate(model, PROMPTS, batch_size=1, **kw)
    other = interp.generate(model, PROMPTS, batch_size=4, **{**kw, "seed": 8})
    assert [t.tolist() for t in one.tokens] == [t.tolist() for t in two.tokens]
    assert [t.tolist() for t in one.tokens] != [t.tolist() for t in other.tokens]


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    g = torch.Generator().manual_seed(0)
    draws = {_pick(logits, 1.0, 0.7, g) for _ in range(300)}
    assert draws == {0, 1}
    assert _pick(logits, 0.0, 1.0, None) == 0


def test_chat_prompts_use_the_template(model):
    from interp.models import format_prompt

    chat = encode_prompts(model, ["Hi"], chat=True)[0]
    assert chat.tolist() == model.to_tokens(format_prompt(model, "Hi"))[0].tolist()
    assert len(chat) > len(encode_prompts(model, ["Hi"])[0])


def test_native_models_generate_without_a_kv_cache(tiny_model):
    out = interp.generate(tiny_model, ["The cat", "Hi"], interp.Add(HOOK, torch.randn(tiny_model.cfg.d_model), 5.0, positions="generated"), max_new_tokens=3, temperature=0, return_logits=True, compare=True)
    assert all(len(t) == 3 for t in out.tokens)
    torch.testing.assert_close(out.logits[0][0], out.base_logits[0][0], atol=1e-5, rtol=0)


def test_bad_generation_inputs(model):
    with pytest.raises(UserError):
        interp.generate(model, [], max_new_tokens=2)
    with pytest.raises(UserError):
        interp.generate(model, ["x"], max_new_tokens=0)
    with pytest.raises(UserError):
        interp.generate(model, ["x"], top_p=0.0)
    with pytest.raises(UserError, match="context"):
        interp.generate(model, ["x"], max_new_tokens=model.cfg.n_ctx)


def test_eval_metrics_by_hand(model, tmp_path):
    assert concept_hit_rate(["The Golden Gate bridges", "a cat", "GOLDEN hour", "ungolden"], ["golden"]) == 0.5
    # whole words with a plural or possessive ending only: no "Lorde", "codec" or "heavenly"
    hits = ["The Lord had", "two lords", "the Lord's day", "my Lord\u2019s", "codes", "in C++.", "Lord."]
    misses = ["Lorde sang", "a codec", "heavenly", "overlord", "Lordy", "Lordes"]
    assert concept_hit_rate(hits, ["Lord", "code", "C++", "heaven"]) == 1.0
    assert concept_hit_rate(misses, ["Lord", "code", "C++", "heaven"]) == 0.0
    assert concept_hit_rate(["two boxes", "the churches", "New\n York", "times"], ["box", "church", "new york", "tim"]) == 0.75
    assert distinct_n(["a b a b", "a b"], 2) == pytest.approx(2 / 4)
    assert repetition_rate([[1, 2, 3, 1, 2, 3], [5, 6, 7]], 3) == pytest.approx((1 - 3 / 4) / 2)
    vec = torch.randn(64)
    rnd = random_direction_like(vec, seed=1)
    assert float(rnd.norm()) == pytest.approx(float(vec.norm()), rel=1e-5) and abs(float(rnd @ vec)) < float(vec.norm() ** 2)
    assert len(load_steering_prompts()) >= 32
    prompt, cont = model.to_tokens("The cat")[0], model.to_tokens("sat down", prepend_bos=False)[0]
    with torch.inference_mode():
        logp = torch.log_softmax(model(torch.cat([prompt, cont])[None])[0].float(), -1)
    by_hand = -(logp[len(prompt) - 1, cont[0]] + logp[len(prompt), cont[1]]) / 2
    assert float(continuation_nll(model, [prompt], [cont])[0]) == pytest.approx(float(by_hand), rel=1e-5)
    with interp.steered(model, []), pytest.raises(UserError, match="unsteered"):
        continuation_nll(model, [prompt], [cont])
    direction = torch.randn(64)
    rows = strength_sweep(model, PROMPTS[:2], lambda s: [interp.Add(HOOK, direction, s)], [0.0, 20.0], keywords=["the"], max_new_tokens=3, temperature=0)
    assert [r["strength"] for r in rows] == [0.0, 20.0] and all(0 <= r["hit_rate"] <= 1 for r in rows)
    html = write_sweep_html({"feature": rows}, tmp_path / "sweep.html").read_text()
    assert "plotly" in html.lower() and "concept hit rate" in html


@pytest.mark.model
def test_real_model_parity_with_chat_prompts(smollm2):
    """SmolLM2 (30 layers, GQA, rotary): steered KV-cache and batched runs match the full recompute."""
    ivs = [interp.Add("blocks.10.hook_resid_post", torch.randn(smollm2.cfg.d_model, generator=torch.Generator().manual_seed(0)), "4x", positions="generated", norm_prompts=["The sea is blue."])]
    prompts = ["Name a colour.", "Tell me something about the sea and the sky."]
    kw = dict(max_new_tokens=4, temperature=0, return_logits=True, chat=True)
    cached = interp.generate(smollm2, prompts, ivs, batch_size=2, **kw)
    full = interp.generate(smollm2, prompts, ivs, batch_size=1, use_kv_cache=False, **kw)
    shown = smollm2.tokenizer.decode(cached.prompt_tokens[0])
    assert "<|im_start|>user\nName a colour." in shown and shown.endswith("<|im_start|>assistant\n")
    assert not shown.startswith("<|im_start|><|im_start|>")
    for la, lb, ta, tb in zip(cached.logits, full.logits, cached.tokens, full.tokens):
        torch.testing.assert_close(la, lb, atol=1e-4, rtol=0)
        _agree_until_near_tie(la, lb, ta, tb)
