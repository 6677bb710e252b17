"""Per-feature analysis: streamed statistics, max-activating contexts, logit lens, neighbours.

:func:`scan_features` makes one pass over a token budget with memory bounded by the number of
latents (never by the number of tokens): per latent the max activation, the sum and count of
its non-zero activations, a histogram of those activations on fixed log-spaced bins, and the
``top_k`` windows where it fired hardest (one context per window, merged batch by batch with
``topk``). :func:`top_contexts` then re-runs only the chosen windows to get per-token activations.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import einops
import torch
from jaxtyping import Float, Int
from torch import Tensor

from interp.errors import UserError
from interp.files import save_safetensors_atomic
from saes.sources import batched, check_hook, hook_activations, progress_bar, sae_device, special_mask, token_windows

__all__ = ["FeatureScan", "scan_features", "feature_activations", "save_feature_stats", "top_contexts", "logit_lens", "neighbours", "token_strings", "STATS_FILE", "HIST_EDGES"]

STATS_FILE = "feature_stats.safetensors"
HIST_EDGES = torch.logspace(-3, 3, 61)
"""Activation histogram bin edges: 10 per decade from 1e-3 to 1e3 (values outside go to the end bins)."""


@dataclass
class FeatureScan:
    """The result of one streamed pass of an SAE over token windows."""

    max_activations: Float[Tensor, " n_latents"]
    """Largest activation of each latent (0 for a latent that never fired)."""
    mean_active: Float[Tensor, " n_latents"]
    """Mean activation over the tokens where the latent fired (0 if it never fired)."""
    frequency: Float[Tensor, " n_latents"]
    """Share of the scanned tokens on which the latent fired (activation > 0)."""
    histograms: Int[Tensor, "n_latents n_bins"]
    """Counts of non-zero activations per :data:`HIST_EDGES` bin."""
    top_values: Float[Tensor, "n_latents top_k"]
    """Max activation in each of the latent's top windows, descending (0 where fewer windows fired)."""
    top_windows: Int[Tensor, "n_latents top_k"]
    """Index into ``windows`` of each top window."""
    top_positions: Int[Tensor, "n_latents top_k"]
    """Position of the max-activating token inside each top window."""
    windows: Int[Tensor, "n_windows ctx"]
    """The token windows that were scanned."""
    n_tokens: int
    """Number of non-special tokens scanned."""
    source: str
    """Where the windows came from (corpus name, split and fingerprint, or a tensor)."""


def scan_features(
    sae: Any,
    model: Any,
    source: Any = "default",
    n_tokens: int = 65_536,
    ctx: int = 128,
    batch_size: int = 8,
    top_k: int = 10,
    seed: int = 0,
    progress: bool = True,
) -> FeatureScan:
    """Stream ``n_tokens`` tokens of ``source`` through the SAE (and the model, unless it is a store).

    ``source`` is a corpus name/path (its ``eval`` split), a ``LongTensor [n, ctx]`` of windows, or an
    ``ActivationStore`` (its first ``n_tokens`` rows; ``model`` may then be None, and each stretch of
    rows from one window becomes one scanned window).
    """
    from interp.store import ActivationStore

    if top_k < 0:
        raise UserError(f"top_k must be >= 0 (got {top_k})")
    if isinstance(source, ActivationStore):
        batches, total, described = _store_batches(sae, source, n_tokens, batch_size * ctx), min(n_tokens, source.n_tokens), f"store:{source.path}"
    else:
        check_hook(model, sae.hook_name)
        windows, described = token_windows(model, source, n_tokens, ctx, seed)
        batches, total = _model_batches(sae, model, windows, batch_size), windows.shape[0]
    n_latents = sae.W_dec.shape[0]
    n_bins = len(HIST_EDGES) - 1
    max_act = torch.zeros(n_latents)
    sum_act = torch.zeros(n_latents, dtype=torch.float64)
    count = torch.zeros(n_latents, dtype=torch.long)
    hist = torch.zeros(n_latents * n_bins, dtype=torch.long)
    top_v = torch.zeros(n_latents, top_k)
    top_w = torch.zeros(n_latents, top_k, dtype=torch.long)
    top_p = torch.zeros(n_latents, top_k, dtype=torch.long)
    seen = n_windows = 0
    scanned: list[Tensor] = []
    with progress_bar(progress) as bar:
        task = bar.add_task("feature scan", total=total)
        for tokens, f, n_kept, advance in batches:  # f: [batch, ctx, n], zero at positions not scanned
            start = n_windows
            n_windows += tokens.shape[0]
            scanned.append(tokens)
            flat = einops.rearrange(f, "b t n -> (b t) n")
            seen += n_kept
            max_act = torch.maximum(max_act, flat.max(0).values)
            sum_act += flat.sum(0, dtype=torch.float64)
            count += (flat > 0).sum(0)
            rows, latents = flat.nonzero(as_tuple=True)
            bins = torch.bucketize(flat[rows, latents], HIST_EDGES[1:-1])
            hist.index_add_(0, latents * n_bins + bins, torch.ones_like(bins))
            if top_k:
                # One context per window: each window's max per latent, then merge with the running top-k.
                win_max, win_pos = f.max(1)  # [batch, n]
                cand_v = torch.cat([top_v, win_max.T], 1)
                cand_w = torch.cat([top_w, torch.arange(start, start + tokens.shape[0]).expand(n_latents, -1)], 1)
                cand_p = torch.cat([top_p, win_pos.T], 1)
                top_v, order = cand_v.topk(top_k, dim=1)
                top_w, top_p = cand_w.gather(1, order), cand_p.gather(1, order)
            bar.advance(task, advance)
    windows = torch.cat(scanned) if scanned else torch.empty(0, 0, dtype=torch.long)
    if seen == 0:
        raise UserError("no non-special tokens were scanned; raise --tokens")
    return FeatureScan(
        max_activations=max_act,
        mean_active=(sum_act / count.clamp_min(1)).float(),
        frequency=count.double().div(seen).float(),
        histograms=hist.reshape(n_latents, n_bins),
        top_values=top_v,
        top_windows=top_w,
        top_positions=top_p,
        windows=windows,
        n_tokens=seen,
        source=described,
    )


def _model_batches(sae: Any, model: Any, windows: Tensor, batch_size: int) -> Iterator[tuple[Tensor, Tensor, int, int]]:
    """``(tokens, f, n_scanned, progress_step)`` per batch of windows run through the model."""
    for start, stop in batched(windows.shape[0], batch_size):
        tokens = windows[start:stop]
        yield tokens, feature_activations(sae, model, tokens).cpu(), int((~special_mask(model, tokens)).sum()), stop - start


def _store_batches(sae: Any, store: Any, n_tokens: int, chunk: int) -> Iterator[tuple[Tensor, Tensor, int, int]]:
    """The same from store rows: rows are scattered back to (window, position) grids of their windows."""
    if sae.hook_name not in store.hooks:
        raise UserError(f"the store at {store.path} has no activations for {sae.hook_name!r} (it holds {', '.join(store.hooks)}); harvest that hook first")
    if n_tokens <= 0:
        raise UserError(f"the token budget must be positive (got {n_tokens}); pass --tokens N with N > 0")
    start, end = 0, min(n_tokens, store.n_tokens)
    while start < end:
        stop = min(end, start + chunk)
        windows, positions = store.windows(torch.arange(start, stop))
        if windows.ndim != 2 or windows.shape[1] == 0:
            raise UserError(f"the store at {store.path} keeps no token windows, so contexts cannot be rebuilt; re-harvest it")
        unique, which = torch.unique_consecutive(windows, dim=0, return_inverse=True)
        if stop < end and int(which[-1]) > 0:
            # The chunk's last window may go on past it: leave its rows to the next chunk.
            cut = int((which == which[-1]).nonzero()[0])
            stop, unique, which, positions = start + cut, unique[: int(which[-1])], which[:cut], positions[:cut]
        with torch.inference_mode():
            rows_f = sae.encode(store.read(sae.hook_name, start, stop).to(sae_device(sae))).float().cpu()
        f = torch.zeros(unique.shape[0], unique.shape[1], rows_f.shape[1])
        f[which, positions] = rows_f
        yield unique, f, stop - start, stop - start
        start = stop


def feature_activations(sae: Any, model: Any, tokens: Int[Tensor, "batch ctx"]) -> Float[Tensor, "batch ctx n_latents"]:
    """Dense feature activations at every position, zeroed at special positions."""
    x = hook_activations(model, tokens, sae.hook_name)
    with torch.inference_mode():
        f = sae.encode(x.to(sae_device(sae))).float()
    return f * (~special_mask(model, tokens)).to(f.device).unsqueeze(-1)


def save_feature_stats(scan: FeatureScan, sae_dir: str | os.PathLike) -> Path:
    """Write ``feature_stats.safetensors`` (max_activations, mean_active, frequency) into the SAE's directory."""
    tensors = {"max_activations": scan.max_activations, "mean_active": scan.mean_active, "frequency": scan.frequency}
    return save_safetensors_atomic(Path(sae_dir) / STATS_FILE, tensors, metadata={"n_tokens": str(scan.n_tokens), "source": scan.source})


def top_contexts(sae: Any, model: Any, scan: FeatureScan, features: list[int], batch_size: int = 8) -> dict[int, list[dict[str, Any]]]:
    """Top contexts of ``features`` with per-token activations: ``{feature: [{window, position, value, acts}]}``.

    Only the distinct windows behind these contexts are re-run through the model.
    """
    _check_features(features, scan.max_activations.numel())
    wanted = sorted({int(w) for i in features for w, v in zip(scan.top_windows[i], scan.top_values[i]) if v > 0})
    acts: dict[int, Tensor] = {}
    for start, stop in batched(len(wanted), batch_size):
        ids = wanted[start:stop]
        f = feature_activations(sae, model, scan.windows[ids])[..., features].cpu()  # [batch, ctx, len(features)]
        for row, w in enumerate(ids):
            acts[w] = f[row]
    out: dict[int, list[dict[str, Any]]] = {}
    for col, i in enumerate(features):
        out[i] = [
            {"window": scan.windows[int(w)], "position": int(p), "value": float(v), "acts": acts[int(w)][:, col]}
            for v, w, p in zip(scan.top_values[i], scan.top_windows[i], scan.top_positions[i])
            if v > 0
        ]
    return out


def token_strings(model: Any, ids: Tensor | list[int]) -> list[str]:
    """Readable text of each token id (``<id>`` for a tokenizer-less model)."""
    ids = [int(i) for i in ids]
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        return [f"<{i}>" for i in ids]
    return [tokenizer.decode([i]) for i in ids]


def logit_lens(sae: Any, model: Any, features: list[int], k: int = 10) -> dict[int, dict[str, list[tuple[str, float]]]]:
    """Top ``k`` promoted and suppressed tokens of each feature: the largest and smallest entries of ``W_dec[i] @ W_U``.

    The direct path through the unembedding only (no final norm), as in Bricken et al. 2023.
    """
    _check_features(features, sae.W_dec.shape[0])
    with torch.inference_mode():
        W_U = model.W_U.float()
        logits = sae.W_dec[features].float().to(W_U.device) @ W_U  # [len(features), vocab]
        top = logits.topk(k, dim=1)
        bottom = logits.topk(k, dim=1, largest=False)
    return {
        i: {
            "top": list(zip(token_strings(model, top.indices[row]), top.values[row].tolist())),
            "bottom": list(zip(token_strings(model, bottom.indices[row]), bottom.values[row].tolist())),
        }
        for row, i in enumerate(features)
    }


def neighbours(sae: Any, features: list[int], k: int = 5) -> dict[int, list[tuple[int, float]]]:
    """The ``k`` other latents whose decoder rows have the highest cosine similarity with each feature's."""
    n_latents = sae.W_dec.shape[0]
    _check_features(features, n_latents)
    with torch.inference_mode():
        W = sae.W_dec.float()
        W = W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)
        sims = W[features] @ W.T  # [len(features), n_latents]
        sims[torch.arange(len(features)), torch.tensor(features)] = -float("inf")
        top = sims.topk(min(k, n_latents - 1), dim=1)
    return {i: list(zip(top.indices[row].tolist(), top.values[row].tolist())) for row, i in enumerate(features)}


def _check_features(features: list[int], n_latents: int) -> None:
    bad = [i for i in features if not 0 <= int(i) < n_latents]
    if bad:
        raise UserError(f"feature index {bad[0]} is out of range: this SAE has latents 0..{n_latents - 1}")
