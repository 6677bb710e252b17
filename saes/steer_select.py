"""Which feature to steer with: rerank the feature search's candidates by their measured effect.

The feature search (:mod:`saes.search`) ranks latents that fire *on* a concept's tokens. Clamping
such an input-side latent often says "the concept was just read", not "say it next", and a
mid-layer decoder row's direct logit lens is mostly noise. So the search's top candidates are
reranked by a teacher-forced steering effect, measured on *selection* prompts that are kept
apart from the prompts results are reported on. Each selection prompt is followed by its
unsteered greedy continuation; that sequence is run once per candidate ``i``, with ``i``
clamped on the continuation positions (the Clamp formula ``x' = x + (v_i - f_i(x)) W_dec[i]``,
error term kept), and

    effect_i = mean over prompts and continuation positions t of
               [log Σ_{w ∈ K} p_i(w | x_≤t) - log Σ_{w ∈ K} p_0(w | x_≤t)]

where ``K`` holds the single-token spellings of the concept's keywords and ``p_0`` is the
unsteered model: the mean log-factor by which the clamp raises the chance that the next token
names the concept. The cost beside it is the mean rise in NLL of the continuation's own tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib import resources
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from interp.errors import UserError
from interp.models import model_device

__all__ = ["select_steering_feature", "steering_effect", "predictive_search", "keyword_token_ids", "load_selection_prompts", "choose_steering_pair"]


def load_selection_prompts() -> list[str]:
    """Neutral prompts for choosing feature and strength (``interp/data/steering_selection_prompts.txt``)."""
    text = resources.files("interp").joinpath("data/steering_selection_prompts.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def keyword_token_ids(tokenizer: Any, keywords: Sequence[str]) -> list[int]:
    """Token ids of every single-token spelling of each keyword (as is, lower, capitalised; with and without a leading space)."""
    ids: set[int] = set()
    for word in (k.strip() for k in keywords):
        if not word:
            continue
        for form in {word, word.lower(), word.capitalize()}:
            for variant in (form, " " + form):
                encoded = tokenizer.encode(variant, add_special_tokens=False)
                if len(encoded) == 1:
                    ids.add(int(encoded[0]))
    if not ids:
        raise UserError(f"none of the keywords {list(keywords)} is a single token for this tokenizer; add shorter keywords")
    return sorted(ids)


def _keyword_logp(logits: Float[Tensor, "rows pos vocab"], ids: Tensor) -> Float[Tensor, "rows pos"]:
    """log Σ_{w ∈ ids} p(w) at every position."""
    return torch.log_softmax(logits.float(), dim=-1)[..., ids].logsumexp(-1)


def _token_nll(logits: Float[Tensor, "rows pos vocab"], tokens: Int[Tensor, " pos"]) -> Float[Tensor, "rows pos_minus_1"]:
    """NLL of each next token of ``tokens`` (position t predicts token t + 1)."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    return -logp.gather(-1, tokens[1:].expand(logits.shape[0], -1)[..., None].to(logp.device))[..., 0]


def predictive_search(
    sae: Any,
    model: Any,
    keywords: Sequence[str],
    baseline: Any = "default",
    n_tokens: int = 65_536,
    ctx: int = 128,
    batch_size: int = 8,
    min_count: int = 3,
    top: int = 20,
    seed: int = 0,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Latents that fire on the token *before* a keyword (output-side candidates), ranked by log-odds.

    Matching tokens are the non-special positions whose next token is a keyword spelling
    (:func:`keyword_token_ids`); every other scored position is baseline; the score is
    :func:`saes.search.log_odds`, ties broken by mean activation on matching tokens.
    """
    from saes.features import feature_activations
    from saes.search import log_odds
    from saes.sources import batched, check_hook, progress_bar, special_mask, token_windows

    check_hook(model, sae.hook_name)
    ids = torch.tensor(keyword_token_ids(model.tokenizer, keywords))
    windows, _ = token_windows(model, baseline, n_tokens, ctx, seed)
    n_latents = sae.W_dec.shape[0]
    match_fires = torch.zeros(n_latents, dtype=torch.long)
    base_fires = torch.zeros(n_latents, dtype=torch.long)
    match_sum = torch.zeros(n_latents, dtype=torch.float64)
    n_match = n_base = 0
    with progress_bar(progress) as bar:
        task = bar.add_task("predictive search", total=windows.shape[0])
        for start, stop in batched(windows.shape[0], batch_size):
            tokens = windows[start:stop]
            f = feature_activations(sae, model, tokens).cpu()[:, :-1]  # the last position has no next token here
            keep = ~special_mask(model, tokens)[:, :-1]
            before = torch.isin(tokens[:, 1:], ids) & keep
            fm, fb = f[before], f[keep & ~before]
            n_match, n_base = n_match + fm.shape[0], n_base + fb.shape[0]
            match_fires += (fm > 0).sum(0)
            match_sum += fm.sum(0, dtype=torch.float64)
            base_fires += (fb > 0).sum(0)
            bar.advance(task, stop - start)
    if n_match == 0:
        raise UserError(f"no keyword of {list(keywords)} occurs in {n_tokens} baseline tokens; raise the token budget or pick other keywords")
    score = log_odds(match_fires, n_match, base_fires, max(n_base, 1))
    eligible = (match_fires >= min_count).nonzero().flatten()
    mean_act = match_sum / n_match
    order = eligible[mean_act[eligible].argsort(descending=True, stable=True)]
    order = order[score[order].argsort(descending=True, stable=True)][:top]
    return [
        {"feature": i, "score": float(score[i]), "matching_fires": int(match_fires[i]), "matching_tokens": n_match,
         "baseline_fires": int(base_fires[i]), "baseline_tokens": n_base, "mean_activation": float(mean_act[i])}
        for i in order.tolist()
    ]


def steering_effect(
    model: Any,
    sae: Any,
    features: Sequence[int],
    keywords: Sequence[str],
    prompts: Sequence[str],
    strength: float | str = "5x",
    positions: str = "generated",
    continuation_tokens: int = 16,
    chat: bool = True,
    progress: bool = False,
) -> dict[str, Tensor]:
    """Teacher-forced effect (module docstring) of clamping each feature alone to ``strength``.

    ``positions`` is ``"generated"`` (clamp only the continuation) or ``"all"`` (prompt too).
    Returns ``effect`` and ``nll_increase``, one entry per feature, in nats.
    """
    import interp

    if positions not in ("generated", "all"):
        raise UserError(f"positions must be 'generated' or 'all' for the effect score, not {positions!r}")
    if continuation_tokens < 1:
        raise UserError(f"continuation_tokens must be at least 1 (got {continuation_tokens})")
    if not prompts:
        raise UserError("steering_effect needs at least one selection prompt")
    feats = [int(f) for f in features]
    # Clamp resolves "5x" against each feature's max activation and checks the ids.
    values = interp.Clamp(sae, feats, [strength] * len(feats)).values
    ids = torch.tensor(keyword_token_ids(model.tokenizer, keywords))
    device = model_device(model)
    w_dec = sae.W_dec.detach()
    idx = torch.tensor(feats, device=w_dec.device)
    base = interp.generate(model, list(prompts), max_new_tokens=continuation_tokens, temperature=0.0, chat=chat, stop_at_eos=False, progress=progress)
    effect = torch.zeros(len(feats), dtype=torch.float64)
    cost = torch.zeros(len(feats), dtype=torch.float64)
    n_rows = len(feats) + 1  # row 0 runs unsteered
    for prompt, cont in zip(base.prompt_tokens, base.tokens):
        seq = torch.cat([prompt, cont]).to(device)
        start = len(prompt) if positions == "generated" else 0
        scored = slice(len(prompt), len(seq))

        def clamp_rows(x: Tensor, hook: Any) -> Tensor:
            xs = x[1:, start:].to(w_dec.device, w_dec.dtype)
            f = sae.encode(xs).gather(-1, idx[:, None, None].expand(-1, xs.shape[1], 1))  # [features, pos, 1]
            delta = (values.to(f)[:, None, None] - f) * w_dec[idx][:, None, :]
            x = x.clone()
            x[1:, start:] = (xs + delta).to(x.device, x.dtype)
            return x

        with torch.inference_mode(), model.hooks(fwd_hooks=[(sae.hook_name, clamp_rows)]):
            logits = model(seq[None].repeat(n_rows, 1))
        kw = _keyword_logp(logits[:, scored], ids.to(logits.device)).double().cpu()
        nll = _token_nll(logits, seq)[:, len(prompt) - 1 :].double().cpu()
        effect += (kw[1:] - kw[:1]).mean(1)
        cost += (nll[1:] - nll[:1]).mean(1)
    n = len(base.tokens)
    return {"effect": effect / n, "nll_increase": cost / n}


def select_steering_feature(
    sae: Any,
    model: Any,
    concept: str,
    keywords: Sequence[str] | None = None,
    prompts: Sequence[str] | None = None,
    n_candidates: int = 20,
    strength: float | str = "5x",
    positions: str = "generated",
    continuation_tokens: int = 16,
    chat: bool = True,
    search: list[dict[str, Any]] | None = None,
    progress: bool = False,
    **search_kwargs: Any,
) -> list[dict[str, Any]]:
    """Search ``concept``'s top ``n_candidates`` features, then rank them by steering effect (best first).

    ``prompts`` default to the shipped selection prompts; ``keywords`` to the concept itself;
    ``search`` reuses rows already returned by ``saes.search_features``. Each row is the search row
    plus ``search_rank``, ``effect`` and ``nll_increase``.
    """
    from saes.search import search_features

    if n_candidates < 1:
        raise UserError(f"n_candidates must be at least 1 (got {n_candidates})")
    rows = search if search is not None else search_features(sae, model, query=concept, top=n_candidates, progress=progress, **search_kwargs)
    rows = [dict(r, search_rank=rank) for rank, r in enumerate(rows[:n_candidates])]
    if not rows:
        raise UserError(f"the feature search found no candidate for {concept!r}; try another concept or a lower min_count")
    measured = steering_effect(
        model, sae, [r["feature"] for r in rows], list(keywords or [concept]), list(prompts or load_selection_prompts()),
        strength=strength, positions=positions, continuation_tokens=continuation_tokens, chat=chat, progress=progress,
    )
    for row, effect, cost in zip(rows, measured["effect"].tolist(), measured["nll_increase"].tolist()):
        row.update(effect=effect, nll_increase=cost)
    return sorted(rows, key=lambda r: -r["effect"])


def choose_steering_pair(rows: Sequence[dict[str, Any]], max_nll: float) -> dict[str, Any]:
    """The (feature, strength) row with the highest selection hit rate among rows whose NLL is at most ``max_nll``.

    Rows carry ``hit_rate`` and ``nll`` (nats/token under the unsteered model); ties go to the lower
    NLL, then to the earlier row. A row with a NaN NLL is never affordable.
    """
    affordable = [(i, r) for i, r in enumerate(rows) if r["nll"] <= max_nll]  # NaN <= x is False
    if not affordable:
        raise UserError(f"no (feature, strength) pair has a selection NLL <= {max_nll} nats/token; raise --max-nll or add weaker strengths")
    return min(affordable, key=lambda ir: (-ir[1]["hit_rate"], ir[1]["nll"], ir[0]))[1]
