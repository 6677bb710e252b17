"""Choosing a steering feature: keyword spellings, the teacher-forced effect against interp.Clamp run
one feature at a time, the rerank order, and the predictive search against a loop over positions."""

from __future__ import annotations

import re

import pytest
import torch

import interp
from interp.errors import UserError
from interp.steering_positions import Positions
from saes.search import log_odds
from saes.steer_select import (
    choose_steering_pair,
    keyword_token_ids,
    load_selection_prompts,
    predictive_search,
    select_steering_feature,
    steering_effect,
)
from steering_fixtures import ToyTopKSAE, tiny_llama

HOOK = "blocks.0.hook_resid_post"
PROMPTS = ["Tell me about a river.", "What is a good breakfast?"]
KEYWORDS = ["the", "water"]


@pytest.fixture(scope="module")
def toy():
    model = tiny_llama()
    sae = ToyTopKSAE(model.cfg.d_model, 32, 4, HOOK, seed=1)
    return model, sae


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z']+", text.lower()))


def test_selection_prompts_are_apart_from_reported_ones():
    from interp.steering_eval import load_steering_prompts

    selection, reported = load_selection_prompts(), load_steering_prompts()
    assert len(selection) >= 48 and len(set(selection)) == len(selection)
    assert not set(selection) & set(reported)
    # near-equal = same words but for one swapped noun or fewer (word-set Jaccard >= 0.75)
    for s in selection:
        for r in reported:
            assert len(_words(s) & _words(r)) / len(_words(s) | _words(r)) < 0.75, (s, r)


def test_fresh_prompts_are_apart_from_selection_and_shipped_ones():
    from interp.steering_eval import load_steering_prompts

    fresh, shipped, selection = load_steering_prompts("fresh"), load_steering_prompts(), load_selection_prompts()
    assert len(fresh) >= 36 and len(set(fresh)) == len(fresh)
    for f in fresh:
        for other in shipped + selection:
            assert len(_words(f) & _words(other)) / len(_words(f) | _words(other)) < 0.75, (f, other)


def test_unknown_prompt_set_is_a_one_line_error():
    from interp.errors import UserError
    from interp.steering_eval import load_steering_prompts

    with pytest.raises(UserError, match="unknown prompt set 'held-out'; use one of shipped, fresh, both"):
        load_steering_prompts("held-out")


def test_selection_prompts_do_not_name_the_steered_concepts():
    concept_words = re.compile(r"\b(god|lord|jesus|heaven|divine|holy|church|bible|pray|python|code|coding|program|computer|software"
                               r"|king|queen|royal|throne|snake|language)", re.IGNORECASE)
    from interp.steering_eval import load_steering_prompts

    neutral = load_selection_prompts() + load_steering_prompts("fresh")
    assert [p for p in neutral if concept_words.search(p)] == []


def _row(feature: int, strength: str, hit_rate: float, nll: float) -> dict:
    return {"feature": feature, "strength": strength, "hit_rate": hit_rate, "nll": nll}


def test_choose_pair_takes_best_hit_rate_within_the_nll_budget():
    rows = [_row(1, "3x", 0.10, 2.0), _row(1, "8x", 0.90, 6.5), _row(2, "5x", 0.40, 4.9), _row(3, "5x", 0.35, 3.0)]
    assert choose_steering_pair(rows, 5.0) is rows[2]  # 8x is over budget despite its 90 %
    assert choose_steering_pair(rows, 7.0) is rows[1]
    assert choose_steering_pair(rows, 4.89) is rows[3]  # 40 % at NLL 4.9 is now over budget
    assert choose_steering_pair(rows, 4.9) is rows[2]  # the budget is inclusive


def test_choose_pair_breaks_ties_by_lower_nll_then_order_and_skips_nan():
    rows = [_row(1, "3x", 0.5, 4.0), _row(2, "3x", 0.5, 3.5), _row(3, "5x", 0.5, 3.5), _row(4, "8x", 0.9, float("nan"))]
    assert choose_steering_pair(rows, 5.0) is rows[1]
    with pytest.raises(UserError, match="max-nll"):
        choose_steering_pair(rows, 3.0)
    with pytest.raises(UserError, match="max-nll"):
        choose_steering_pair([], 5.0)


def test_keyword_token_ids_are_single_token_spellings(toy):
    tokenizer = toy[0].tokenizer
    ids = keyword_token_ids(tokenizer, ["God"])
    assert tokenizer.encode(" God", add_special_tokens=False)[0] in ids
    assert {tokenizer.decode([i]).strip().lower() for i in ids} == {"god"}
    with pytest.raises(UserError, match="single token"):
        keyword_token_ids(tokenizer, ["qzxwvkjhgfdsapoiu"])


def _hand_effect(model, sae, feature: int, value: float, ids: torch.Tensor, positions: str) -> tuple[float, float]:
    """The effect and NLL cost of one feature, by running interp.Clamp inside interp.steered per prompt."""
    base = interp.generate(model, PROMPTS, max_new_tokens=5, temperature=0.0, stop_at_eos=False)
    effects, costs = [], []
    for prompt, cont in zip(base.prompt_tokens, base.tokens):
        seq = torch.cat([prompt, cont])
        n = len(prompt)
        mask = torch.arange(len(seq)) >= (n if positions == "generated" else 0)
        with torch.inference_mode():
            clean = model(seq[None])[0].log_softmax(-1)
            with interp.steered(model, interp.Clamp(sae, feature, value, positions=Positions.explicit(mask))):
                steered = model(seq[None])[0].log_softmax(-1)
        kw = lambda lp: lp[n:, ids].logsumexp(-1)  # noqa: E731
        nll = lambda lp: -lp[n - 1 : -1].gather(-1, seq[n:, None])[:, 0]  # noqa: E731
        effects.append(float((kw(steered) - kw(clean)).mean()))
        costs.append(float((nll(steered) - nll(clean)).mean()))
    return sum(effects) / len(effects), sum(costs) / len(costs)


@pytest.mark.parametrize("positions", ["generated", "all"])
def test_effect_matches_clamp_run_one_feature_at_a_time(toy, positions):
    model, sae = toy
    features, value = [3, 7, 11], 4.0
    ids = torch.tensor(keyword_token_ids(model.tokenizer, KEYWORDS))
    got = steering_effect(model, sae, features, KEYWORDS, PROMPTS, strength=value, positions=positions, continuation_tokens=5, chat=False)
    for row, feature in enumerate(features):
        effect, cost = _hand_effect(model, sae, feature, value, ids, positions)
        assert got["effect"][row].item() == pytest.approx(effect, abs=1e-4)
        assert got["nll_increase"][row].item() == pytest.approx(cost, abs=1e-4)
    assert got["effect"].abs().max() > 1e-3  # the clamp really moved something


def test_select_ranks_candidates_by_effect(toy):
    model, sae = toy
    search = [{"feature": f, "score": 10.0 - f} for f in (2, 5, 9, 13, 21)]
    rows = select_steering_feature(sae, model, "water", KEYWORDS, prompts=PROMPTS, n_candidates=4, strength=4.0,
                                   continuation_tokens=5, chat=False, search=search)
    effect = steering_effect(model, sae, [2, 5, 9, 13], KEYWORDS, PROMPTS, strength=4.0, continuation_tokens=5, chat=False)["effect"]
    assert [r["feature"] for r in rows] == [[2, 5, 9, 13][i] for i in effect.argsort(descending=True).tolist()]
    assert sorted(r["search_rank"] for r in rows) == [0, 1, 2, 3]
    with pytest.raises(UserError):
        select_steering_feature(sae, model, "water", KEYWORDS, prompts=PROMPTS, n_candidates=0, search=search)


def test_effect_rejects_bad_positions(toy):
    model, sae = toy
    with pytest.raises(UserError, match="positions"):
        steering_effect(model, sae, [1], KEYWORDS, PROMPTS, strength=1.0, positions="prompt")


def test_predictive_search_matches_a_loop_over_positions(toy):
    model, sae = toy
    ids = keyword_token_ids(model.tokenizer, KEYWORDS)
    text = "the water ran over the stones and the river took the water to the sea " * 3
    row = model.to_tokens(text)[0][:40]
    windows = torch.stack([row, torch.cat([row[:1], row[1:].roll(3)])])  # BOS stays first
    rows = predictive_search(sae, model, KEYWORDS, baseline=windows, n_tokens=10_000, min_count=1, top=5)
    from saes.features import feature_activations

    f = feature_activations(sae, model, windows)
    a = torch.zeros(32, dtype=torch.long)
    b = torch.zeros(32, dtype=torch.long)
    m = n = 0
    for w in range(windows.shape[0]):
        for t in range(1, windows.shape[1] - 1):  # position 0 is BOS; the last has no next token
            fired = (f[w, t] > 0).long()
            if int(windows[w, t + 1]) in ids:
                a, m = a + fired, m + 1
            else:
                b, n = b + fired, n + 1
    score = log_odds(a, m, b, n)
    assert rows[0]["matching_tokens"] == m and rows[0]["baseline_tokens"] == n
    for r in rows:
        assert r["matching_fires"] == int(a[r["feature"]]) and r["score"] == pytest.approx(float(score[r["feature"]]))
    eligible = score.clone()
    eligible[a < 1] = -float("inf")
    assert rows[0]["score"] == pytest.approx(float(eligible.max()))
