"""Where evaluation and feature analysis get their tokens and activations from.

Every analysis in :mod:`saes.evaluation`, :mod:`saes.features` and :mod:`saes.search` takes
either a corpus (name, path or ``Corpus``), a ``LongTensor [n_windows, ctx]`` of token windows,
or an ``ActivationStore``. Windows are run through the model up to the SAE's hook; positions
holding BOS (or a pad token distinct from EOS) and position 0 of every window are *special*:
they are excluded from every statistic, as in harvesting, because their residuals are
outliers the SAE was not trained on.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from contextlib import nullcontext
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from interp.errors import UserError, suggest
from interp.models import model_device

__all__ = ["hook_layer", "special_mask", "token_windows", "hook_activations", "autocast", "check_hook", "model_device", "batched", "progress_bar", "sae_device"]

_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def hook_layer(hook_name: str) -> int | None:
    """The block index ``i`` of a ``blocks.{i}.*`` hook, or None for hooks outside the blocks."""
    match = _BLOCK.match(hook_name)
    return int(match.group(1)) if match else None


def special_mask(model: Any, tokens: Int[Tensor, "batch ctx"]) -> Bool[Tensor, "batch ctx"]:
    """True at position 0 and wherever the token is BOS (or a pad token that is not also EOS)."""
    special = torch.zeros_like(tokens, dtype=torch.bool)
    special[:, 0] = True
    tokenizer = getattr(model, "tokenizer", None) if model is not None else None
    if tokenizer is not None:
        ids = {tokenizer.bos_token_id}
        if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
            ids.add(tokenizer.pad_token_id)
        for i in ids - {None}:
            special |= tokens == i
    return special


def token_windows(model: Any, source: Any, n_tokens: int, ctx: int = 128, seed: int = 0, split: str = "eval") -> tuple[Int[Tensor, "n_windows ctx"], str]:
    """Enough token windows to hold ``n_tokens`` non-special tokens, and a description of their source.

    ``source`` is a corpus name/path (its held-out ``split``, by default ``eval``), a ``Corpus``, or
    a ``LongTensor [n_windows, ctx]`` used as is (its first ``ceil(n_tokens / (ctx - 1))`` rows).
    """
    if n_tokens <= 0:
        raise UserError(f"the token budget must be positive (got {n_tokens}); pass --tokens N with N > 0")
    if isinstance(source, Tensor):
        if source.ndim != 2 or source.dtype not in (torch.long, torch.int32, torch.int64) or source.shape[1] < 2:
            raise UserError(f"token windows must be an integer tensor [n_windows, ctx >= 2], got {tuple(source.shape)} {source.dtype}")
        n_windows = min(source.shape[0], math.ceil(n_tokens / (source.shape[1] - 1)))
        return source[:n_windows].long(), f"tensor[{source.shape[0]}x{source.shape[1]}]"
    if ctx < 2:
        raise UserError(f"context length must be at least 2 tokens (got {ctx}); pass --ctx 128")
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise UserError("this model has no tokenizer, so a corpus cannot be tokenized; pass token windows (a LongTensor) or an activation store instead")
    from interp.corpus import Corpus, load_corpus, pack_windows

    corpus = source if isinstance(source, Corpus) else load_corpus(str(source), split=split)
    budget = math.ceil(n_tokens / (ctx - 1)) * ctx
    windows = pack_windows(tokenizer, corpus, ctx=ctx, n_tokens=budget, seed=seed, bos=True)
    if windows.shape[0] == 0:
        raise UserError(f"corpus {corpus.name!r} ({corpus.split}) produced no windows of {ctx} tokens; use a larger corpus or a smaller --ctx")
    return windows, f"{corpus.name}:{corpus.split}:{corpus.fingerprint[:12]}"


def check_hook(model: Any, hook_name: str) -> None:
    """Raise UserError unless ``model`` has a hook called ``hook_name``."""
    if hook_name not in model.hook_dict:
        raise UserError(f"model has no hook {hook_name!r}{suggest(hook_name, model.hook_dict)}; use an SAE trained on this model (it has {model.cfg.n_layers} layers)")


def autocast(device: torch.device) -> Any:
    """bf16 autocast on CUDA (fast tensor cores); plain fp32 on CPU, where bf16 matmuls are ~275x slower."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def sae_device(sae: Any) -> torch.device:
    """The device of the SAE's decoder."""
    return sae.W_dec.device


def hook_activations(model: Any, tokens: Int[Tensor, "batch ctx"], hook_name: str) -> Float[Tensor, "batch ctx d_in"]:
    """Activations at ``hook_name`` (float32), stopping the forward pass after the hook's block."""
    layer = hook_layer(hook_name)
    stop = layer + 1 if layer is not None and layer + 1 < model.cfg.n_layers else None
    check_hook(model, hook_name)
    device = model_device(model)
    with torch.inference_mode(), autocast(device):
        _, cache = model.run_with_cache(tokens.to(device), names_filter=[hook_name], stop_at_layer=stop)
    return cache[hook_name].float()


def batched(n: int, batch_size: int) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` pairs covering ``range(n)`` in steps of ``batch_size``."""
    if batch_size <= 0:
        raise UserError(f"batch size must be positive (got {batch_size})")
    for start in range(0, n, batch_size):
        yield start, min(n, start + batch_size)


def progress_bar(enabled: bool) -> Any:
    """A rich progress bar (transient) or a no-op stand-in when ``enabled`` is False."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), transient=True, disable=not enabled)
