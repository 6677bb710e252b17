"""Pooled activations of labelled items at many hooks, all captured in one forward pass per batch.

Items are right-padded: in a causal model a token attends only to earlier positions, so padding
after an item's last token cannot change any of its activations and no attention mask is needed.
Batches are formed from items of similar length (sorted), then restored to the input order.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from interp.errors import UserError, suggest
from probes.tasks import MARKER, strip_marker

__all__ = ["collect_activations", "resid_post_hooks", "POOLINGS"]

POOLINGS = ("last", "mean", "marked")
"""``last`` token; ``mean`` over the item's tokens (BOS excluded); ``marked``: last token of the ``[[word]]``."""


def resid_post_hooks(model: Any, layers: Sequence[int] | None = None) -> list[str]:
    """``blocks.{i}.hook_resid_post`` for ``layers`` (all layers by default)."""
    n_layers = model.cfg.n_layers
    layers = range(n_layers) if layers is None else layers
    for layer in layers:
        if not 0 <= layer < n_layers:
            raise UserError(f"layer {layer} is out of range: the model has {n_layers} layers (0..{n_layers - 1}); pass --layers all or indices in that range")
    return [f"blocks.{layer}.hook_resid_post" for layer in layers]


def _tokenize(model: Any, items: Sequence[str] | Sequence[Tensor], pooling: str) -> list[Tensor]:
    """1-D token ids per item (BOS prepended per the model); ``marked`` cuts each text after its mark."""
    if pooling not in POOLINGS:
        raise UserError(f"unknown pooling {pooling!r}{suggest(pooling, POOLINGS)}; use one of {', '.join(POOLINGS)}")
    if not len(items):
        raise UserError("no items to collect activations for; the task is empty")
    if isinstance(items[0], Tensor):
        if pooling == "marked":
            raise UserError("pooling 'marked' needs texts with a [[word]] marker, not token ids; use last or mean")
        return [t.reshape(-1).long() for t in items]
    if model.tokenizer is None:
        raise UserError("this model has no tokenizer, so it cannot read text items; load a model with a tokenizer")
    if pooling == "marked":
        unmarked = [i for i, text in enumerate(items) if not MARKER.search(text)]
        if unmarked:
            raise UserError(f"pooling 'marked' needs every text to mark a word as [[word]], but item {unmarked[0] + 1} has none; mark it or use --pooling last")
    # For a causal model, the activation at the marked word's last token depends only on the text
    # up to it, so the item is cut there and read at its last token.
    texts = [strip_marker(text, cut=pooling == "marked") for text in items]
    return [model.to_tokens(text).reshape(-1).cpu() for text in texts]


def _stop_layer(hooks: list[str], n_layers: int) -> int | None:
    """``stop_at_layer`` just past the deepest hooked block (skipping the unembedding even when the
    last block is hooked); None if a hook lies after the blocks."""
    deepest = 1
    for hook in hooks:
        match = re.match(r"blocks\.(\d+)\.", hook)
        if match is None:
            return None
        deepest = max(deepest, int(match.group(1)) + 1)
    return min(deepest, n_layers)


def _pool(act: Tensor, lengths: Tensor, pooling: str, skip_first: bool) -> Tensor:
    """Pool ``act [b, pos, d]`` over each item's real tokens (``lengths [b]``)."""
    if pooling in ("last", "marked"):
        return act[torch.arange(act.shape[0], device=act.device), lengths - 1]
    pos = torch.arange(act.shape[1], device=act.device)
    keep = (pos[None, :] < lengths[:, None]) & (pos[None, :] >= int(skip_first))
    # An item that is only BOS keeps BOS rather than averaging nothing.
    keep |= (keep.sum(1, keepdim=True) == 0) & (pos[None, :] == 0)
    weights = keep.to(act.dtype)
    return torch.einsum("bpd,bp->bd", act, weights) / weights.sum(1, keepdim=True)


def collect_activations(
    model: Any,
    items: Sequence[str] | Sequence[Tensor],
    hooks: list[str] | None = None,
    pooling: str = "last",
    batch_size: int = 16,
    progress: bool = True,
) -> dict[str, Float[Tensor, "n d"]]:
    """Pooled activations ``{hook: [n_items, d]}`` (float32, CPU) for texts or 1-D token tensors.

    Every hook is captured in the same forward pass, stopped after the deepest hooked block.
    Mean pooling excludes the BOS token the model prepends (its activations are outliers).
    """
    hooks = resid_post_hooks(model) if hooks is None else list(hooks)
    if not hooks:
        raise UserError("no hooks given; pass at least one layer or hook name")
    for hook in hooks:
        if hook not in model.hook_dict:
            raise UserError(f"unknown hook {hook!r}{suggest(hook, list(model.hook_dict))}; hooks look like blocks.0.hook_resid_post")
    tokens = _tokenize(model, items, pooling)
    n_ctx = model.cfg.n_ctx
    too_long = [i for i, t in enumerate(tokens) if t.numel() > n_ctx]
    if too_long:
        raise UserError(f"item {too_long[0] + 1} has {tokens[too_long[0]].numel()} tokens, more than the model's context of {n_ctx}; shorten it")
    skip_first = bool(getattr(model.cfg, "default_prepend_bos", True)) and not isinstance(items[0], Tensor)
    device = next(model.parameters()).device
    pad_id = getattr(model.tokenizer, "pad_token_id", None) if model.tokenizer is not None else None
    order = sorted(range(len(tokens)), key=lambda i: -tokens[i].numel())
    pooled: dict[str, list[Tensor]] = {h: [] for h in hooks}
    stop_at = _stop_layer(hooks, model.cfg.n_layers)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()

    state: dict[str, Tensor] = {}

    def capture(name: str) -> Callable:
        def hook_fn(act: Tensor, hook: Any) -> None:
            pooled[name].append(_pool(act.float(), state["lengths"], pooling, skip_first).cpu())

        return hook_fn

    bar = _progress(progress, len(order))
    with bar as advance, torch.inference_mode(), autocast, model.hooks(fwd_hooks=[(h, capture(h)) for h in hooks]):
        for start in range(0, len(order), batch_size):
            chunk = [tokens[i] for i in order[start : start + batch_size]]
            lengths = torch.tensor([t.numel() for t in chunk])
            batch = torch.full((len(chunk), int(lengths.max())), pad_id if pad_id is not None else 0, dtype=torch.long)
            for row, toks in enumerate(chunk):
                batch[row, : toks.numel()] = toks
            state["lengths"] = lengths.to(device)
            model(batch.to(device), stop_at_layer=stop_at)
            advance(len(chunk))
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(len(order))
    return {h: torch.cat(pooled[h])[inverse] for h in hooks}


@contextlib.contextmanager
def _progress(enabled: bool, total: int):
    """A rich progress bar over items; yields ``advance(n)``."""
    if not enabled:
        yield lambda n: None
        return
    from rich.progress import Progress

    with Progress(transient=True) as bar:
        task = bar.add_task("collecting activations", total=total)
        yield lambda n: bar.advance(task, n)
