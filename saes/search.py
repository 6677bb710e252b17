"""Feature search: which latents fire on a word, phrase or set of example texts?

Matching tokens are the tokens of every occurrence of ``query`` (its token ids with and without a
leading space) in the example texts, or in the query text itself plus the baseline windows when
no examples are given; with examples and no query, every non-special example token matches. The
baseline is every other non-special token of the baseline corpus. For latent ``i``, with ``a`` of
the ``m`` matching tokens and ``b`` of the ``n`` baseline tokens firing (activation > 0):

    score_i = log((a + 1/2) / (m - a + 1/2)) - log((b + 1/2) / (n - b + 1/2))

the log-odds ratio of firing, with the Haldane-Anscombe 1/2 correction so that ``a = m`` or
``b = 0`` stay finite. Only latents with ``a >= min_count`` are ranked; ties are broken by the
mean activation on the matching tokens, which is reported with the baseline's.
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from interp.errors import UserError
from saes.features import feature_activations, token_strings
from saes.sources import batched, check_hook, progress_bar, special_mask, token_windows

__all__ = ["search_features", "log_odds"]


def log_odds(a: Tensor, m: int, b: Tensor, n: int) -> Tensor:
    """Log-odds ratio of firing on matching (``a`` of ``m``) vs baseline (``b`` of ``n``) tokens, 1/2-corrected."""
    a, b = a.double(), b.double()
    return torch.log((a + 0.5) / (m - a + 0.5)) - torch.log((b + 0.5) / (n - b + 0.5))


def _occurrences(tokens: Int[Tensor, "batch ctx"], patterns: list[list[int]]) -> Bool[Tensor, "batch ctx"]:
    """True at every token of every occurrence of any pattern (a list of token ids) in ``tokens``."""
    hit = torch.zeros_like(tokens, dtype=torch.bool)
    for pattern in patterns:
        n = len(pattern)
        if n == 0 or n > tokens.shape[1]:
            continue
        starts = (tokens.unfold(1, n, 1) == torch.tensor(pattern)).all(-1)  # [batch, ctx - n + 1]
        for offset in range(n):
            hit[:, offset : offset + starts.shape[1]] |= starts
    return hit


def _patterns(model: Any, query: str) -> list[list[int]]:
    tokenizer = model.tokenizer
    variants = {query, " " + query.lstrip()}
    return [tokenizer.encode(v, add_special_tokens=False) for v in sorted(variants)]


def search_features(
    sae: Any,
    model: Any,
    query: str | None = None,
    examples: list[str] | None = None,
    baseline: Any = "default",
    n_baseline_tokens: int = 32_768,
    ctx: int = 128,
    batch_size: int = 8,
    min_count: int = 3,
    top: int = 10,
    seed: int = 0,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Rank latents for ``query`` and/or ``examples`` by the log-odds score in the module docstring.

    Returns up to ``top`` dicts: feature, score, matching_fires, matching_tokens, baseline_fires,
    baseline_tokens, mean_activation, baseline_mean_activation, and ``example`` (the matching token
    where the latent fired hardest, with its left context).
    """
    if not query and not examples:
        raise UserError("give a --query word/phrase or example texts to search for")
    if min_count < 1:
        raise UserError(f"minimum count must be at least 1 (got {min_count})")
    if getattr(model, "tokenizer", None) is None:
        raise UserError("feature search needs a model with a tokenizer to find the query's tokens")
    check_hook(model, sae.hook_name)
    patterns = _patterns(model, query) if query else []
    n_latents = sae.W_dec.shape[0]
    match_fires = torch.zeros(n_latents, dtype=torch.long)
    match_sum = torch.zeros(n_latents, dtype=torch.float64)
    base_fires = torch.zeros(n_latents, dtype=torch.long)
    base_sum = torch.zeros(n_latents, dtype=torch.float64)
    best = torch.zeros(n_latents)
    best_where: list[tuple[Tensor, int]] = [(torch.empty(0, dtype=torch.long), 0)] * n_latents
    n_match = n_base = 0

    def accumulate(tokens: Tensor, matching: Tensor, counts_as_baseline: bool) -> None:
        nonlocal n_match, n_base
        f = feature_activations(sae, model, tokens).cpu()
        keep = ~special_mask(model, tokens)
        matching = matching & keep
        fm = f[matching]  # [m, n_latents]
        n_match += fm.shape[0]
        match_fires.add_((fm > 0).sum(0))
        match_sum.add_(fm.sum(0, dtype=torch.float64))
        if fm.shape[0]:
            value, row = fm.max(0)
            b_idx, t_idx = matching.nonzero(as_tuple=True)
            for i in (value > best).nonzero().flatten().tolist():
                best[i] = value[i]
                best_where[i] = (tokens[b_idx[row[i]]], int(t_idx[row[i]]))
        if counts_as_baseline:
            fb = f[keep & ~matching]
            n_base += fb.shape[0]
            base_fires.add_((fb > 0).sum(0))
            base_sum.add_(fb.sum(0, dtype=torch.float64))

    texts = list(examples or []) or [query]
    for text in texts:
        tokens = model.to_tokens(text).cpu()
        matching = _occurrences(tokens, patterns) if patterns else torch.ones_like(tokens, dtype=torch.bool)
        accumulate(tokens, matching, counts_as_baseline=False)
    windows, _ = token_windows(model, baseline, n_baseline_tokens, ctx, seed)
    with progress_bar(progress) as bar:
        task = bar.add_task("baseline", total=windows.shape[0])
        for start, stop in batched(windows.shape[0], batch_size):
            tokens = windows[start:stop]
            # Without examples, the query's occurrences in the baseline are matching tokens too.
            matching = _occurrences(tokens, patterns) if patterns and not examples else torch.zeros_like(tokens, dtype=torch.bool)
            accumulate(tokens, matching, counts_as_baseline=True)
            bar.advance(task, stop - start)
    if n_match == 0:
        raise UserError(f"the query {query!r} does not occur in the example texts; check its spelling or pass examples that contain it")
    if n_base == 0:
        raise UserError("the baseline corpus gave no tokens; raise the baseline token budget")
    score = log_odds(match_fires, n_match, base_fires, n_base)
    mean_act = match_sum / n_match
    eligible = (match_fires >= min_count).nonzero().flatten()
    if eligible.numel() == 0:
        raise UserError(f"no latent fired on at least {min_count} of the {n_match} matching tokens; lower --min-count or give more examples")
    # Sort by mean activation first, then stably by score: score decides, mean activation breaks ties.
    order = eligible[mean_act[eligible].argsort(descending=True, stable=True)]
    order = order[score[order].argsort(descending=True, stable=True)][:top]
    results = []
    for i in order.tolist():
        window, pos = best_where[i]
        left = max(0, pos - 12)
        results.append({
            "feature": i,
            "score": float(score[i]),
            "matching_fires": int(match_fires[i]),
            "matching_tokens": n_match,
            "baseline_fires": int(base_fires[i]),
            "baseline_tokens": n_base,
            "mean_activation": float(mean_act[i]),
            "baseline_mean_activation": float(base_sum[i] / n_base),
            "example": "".join(token_strings(model, window[left : pos + 1])) if window.numel() else "",
        })
    return results
