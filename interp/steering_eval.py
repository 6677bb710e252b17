"""Did steering work, and what did it cost? Concept hit rate, fluency (NLL), diversity, sweeps.

- Concept hit rate: the fraction of continuations that mention a keyword (case-insensitive,
  at a word start, so "bridge" also counts "bridges"), or whose mean projection on a direction
  (e.g. a probe's) exceeds a threshold.
- Fluency: mean negative log-likelihood per token of the *steered* continuation under the
  *unsteered* model (lower is more fluent); distinct-n (Li et al. 2016) and an n-gram
  repetition rate catch degenerate loops.
- A strength sweep draws the concept-vs-fluency curve; a random direction of equal norm is the
  baseline that separates "this concept" from "any large push".
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from interp.directions import Direction
from interp.errors import UserError
from interp.models import model_device
from interp.files import atomic_write_text

__all__ = [
    "load_steering_prompts",
    "mentions",
    "concept_hit_rate",
    "direction_scores",
    "continuation_nll",
    "distinct_n",
    "repetition_rate",
    "random_direction_like",
    "strength_sweep",
    "write_sweep_html",
]


_PROMPT_SETS = {"shipped": "steering_prompts.txt", "fresh": "steering_prompts_fresh.txt"}


def load_steering_prompts(prompt_set: str = "shipped") -> list[str]:
    """Neutral prompts written for this project: ``"shipped"`` (the 36 used since the first demo), ``"fresh"`` or ``"both"``.

    ``"fresh"`` (``interp/data/steering_prompts_fresh.txt``, 36 more) is a held-out replication set for
    reported steering results; choices are made on ``saes.steer_select.load_selection_prompts`` only.
    ``"both"`` is the shipped prompts followed by the fresh ones.
    """
    if prompt_set == "both":
        return load_steering_prompts("shipped") + load_steering_prompts("fresh")
    if prompt_set not in _PROMPT_SETS:
        raise UserError(f"unknown prompt set {prompt_set!r}; use one of {', '.join(_PROMPT_SETS)}, both")
    text = resources.files("interp").joinpath("data", _PROMPT_SETS[prompt_set]).read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def mentions(text: str, keywords: Sequence[str]) -> bool:
    """Whether ``text`` names any keyword as a whole word, optionally plural or possessive (case-insensitive).

    "Lord" counts in "Lord", "Lords" and "Lord's" but not in "Lorde"; "code" in "codes" but not in
    "codec" (list "coding" or "heavenly" yourself if they should count).
    """
    lowered = text.lower()
    return any(re.search(_keyword_pattern(k), lowered) for k in keywords if k.strip())


def _keyword_pattern(keyword: str) -> str:
    """Regex for one keyword: whole word(s), any whitespace between words, English plural ("-s",
    "-es" after s/x/z/ch/sh/o) or possessive ending."""
    word = keyword.strip().lower()
    body = r"\s+".join(re.escape(part) for part in word.split())
    plural = "(?:es|s)" if re.search(r"(?:s|x|z|ch|sh|o)$", word) else "s"
    return r"(?<!\w)" + body + r"(?:" + plural + r"|'s|\u2019s)?(?!\w)"


def concept_hit_rate(texts: Sequence[str], keywords: Sequence[str]) -> float:
    """Fraction of ``texts`` that mention one of ``keywords``."""
    if not texts:
        return float("nan")
    if not any(k.strip() for k in keywords):
        raise UserError("give at least one non-empty keyword for the concept hit rate")
    return sum(mentions(t, keywords) for t in texts) / len(texts)


def direction_scores(model: Any, token_lists: Sequence[Tensor], direction: Direction) -> Tensor:
    """Per sequence: mean over tokens of ``activation · unit(direction)`` at the direction's hook."""
    from interp.steering import _capture

    unit = direction.unit.float().to(model_device(model))
    scores = [(_capture(model, toks, direction.hook_name) @ unit).mean() for toks in token_lists]
    return torch.stack(scores).cpu() if scores else torch.empty(0)


def continuation_nll(model: Any, prompt_tokens: Sequence[Tensor], continuations: Sequence[Tensor]) -> Tensor:
    """Mean NLL (nats/token) of each continuation given its prompt, under the model as it is (call it unsteered)."""
    from interp.steering import _ACTIVE

    if _ACTIVE.get(id(model)):
        raise UserError("continuation_nll must score text under the unsteered model; call it outside `steered(...)`")
    out = []
    device = model_device(model)
    for prompt, cont in zip(prompt_tokens, continuations):
        if len(cont) == 0:
            out.append(float("nan"))
            continue
        seq = torch.cat([prompt.cpu(), cont.cpu()]).to(device)
        with torch.inference_mode():
            logits = model(seq[None])[0].float()
        # token t is predicted by the logits at position t-1
        logp = torch.log_softmax(logits[len(prompt) - 1 : -1], dim=-1)
        out.append(float(-logp.gather(-1, seq[len(prompt) :, None]).mean()))
    return torch.tensor(out)


def _ngrams(words: Sequence[Any], n: int) -> list[tuple]:
    return [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]


def distinct_n(texts: Sequence[str], n: int = 2) -> float:
    """Distinct-n (Li et al. 2016): unique word n-grams / all word n-grams, over all texts."""
    grams = [g for t in texts for g in _ngrams(t.split(), n)]
    return len(set(grams)) / len(grams) if grams else float("nan")


def repetition_rate(token_lists: Sequence[Sequence[int] | Tensor], n: int = 3) -> float:
    """Mean over sequences of the fraction of token n-grams that already occurred earlier in it."""
    rates = []
    for toks in token_lists:
        grams = _ngrams(list(toks.tolist() if isinstance(toks, Tensor) else toks), n)
        if grams:
            rates.append(1 - len(set(grams)) / len(grams))
    return sum(rates) / len(rates) if rates else float("nan")


def random_direction_like(vector: Tensor | Direction, seed: int = 0) -> Tensor:
    """A Gaussian-random vector with the same norm (and shape) as ``vector``: the steering baseline."""
    vec = vector.vector if isinstance(vector, Direction) else vector
    g = torch.Generator().manual_seed(seed)
    rnd = torch.randn(vec.shape, generator=g)
    return rnd * (vec.float().norm() / rnd.norm())


def strength_sweep(
    model: Any,
    prompts: Sequence[str],
    make: Callable[[float | str], Sequence[Any]],
    strengths: Sequence[float | str],
    keywords: Sequence[str] | None = None,
    score_direction: Direction | None = None,
    score_threshold: float = 0.0,
    **generate_kwargs: Any,
) -> list[dict[str, Any]]:
    """Generate at each strength (``make(strength)`` -> interventions) and measure concept and fluency.

    Each row: strength, hit_rate (keywords, or share of direction scores above the threshold),
    nll, distinct_2, repetition and the continuations.
    """
    from interp.generation import generate

    if keywords is None and score_direction is None:
        raise UserError("a sweep needs keywords or a direction to score the concept by")
    rows = []
    for strength in strengths:
        gens = generate(model, list(prompts), make(strength), **generate_kwargs)
        if keywords is not None:
            hit = concept_hit_rate(gens.texts, keywords)
        else:
            seqs = [torch.cat([p, t]) for p, t in zip(gens.prompt_tokens, gens.tokens)]
            hit = float((direction_scores(model, seqs, score_direction) > score_threshold).float().mean())
        nll = continuation_nll(model, gens.prompt_tokens, gens.tokens)
        finite = nll[torch.isfinite(nll)]
        rows.append({
            "strength": strength,
            "hit_rate": hit,
            "nll": float(finite.mean()) if len(finite) else math.nan,
            "distinct_2": distinct_n(gens.texts, 2),
            "repetition": repetition_rate(gens.tokens, 3),
            "texts": gens.texts,
        })
    return rows


def write_sweep_html(curves: dict[str, list[dict[str, Any]]], path: str | Path, title: str = "Steering: concept vs fluency") -> Path:
    """Plot each labelled sweep as hit rate against NLL (one point per strength) to a standalone HTML file."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for label, rows in curves.items():
        fig.add_trace(go.Scatter(
            x=[r["nll"] for r in rows],
            y=[r["hit_rate"] for r in rows],
            text=[str(r["strength"]) for r in rows],
            mode="lines+markers+text",
            textposition="top center",
            name=label,
        ))
    fig.update_layout(title=title, xaxis_title="NLL of steered text under the unsteered model (nats/token)", yaxis_title="concept hit rate", yaxis_range=[-0.05, 1.05])
    return atomic_write_text(path, fig.to_html(include_plotlyjs=True, full_html=True))
