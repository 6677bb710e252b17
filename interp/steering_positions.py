"""Which token positions a steering intervention touches, tracked across KV-cache steps.

A position is named by its *real-token index*: 0 for the first real token of a sequence (its BOS),
1 for the next, ... — padding never counts. The index comes from the attention mask
(``cumsum(mask) - 1``) and, under a KV cache, from the number of tokens already seen, so the
same token gets the same index whether the sequence runs alone, left-padded in a batch, in one
full forward or one token per step. Raw tensor positions are never used.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from interp.errors import UserError

__all__ = ["Positions", "as_positions", "PositionTracker"]

_KINDS = ("all", "prompt", "generated", "after", "mask")


@dataclass(frozen=True, eq=False)
class Positions:
    """A position policy: ``all`` (default), ``prompt``, ``generated``, ``after`` a marker, or an explicit ``mask``."""

    kind: str = "all"
    """One of all, prompt, generated, after, mask."""
    marker: str | tuple[int, ...] | None = None
    """For ``after``: a string (tokenized without BOS) or token ids; positions after its first occurrence."""
    mask: Tensor | None = None
    """For ``mask``: bool ``[batch or 1, n_tokens]`` indexed by real-token index (prompt then generated)."""

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise UserError(f"unknown position policy {self.kind!r}; use one of {', '.join(_KINDS)}")
        if self.kind == "after" and not self.marker:
            raise UserError("the 'after' position policy needs a non-empty marker string or token ids")
        if self.kind == "mask" and (self.mask is None or self.mask.ndim != 2):
            raise UserError("the 'mask' position policy needs a bool mask of shape [batch, n_tokens]")

    @classmethod
    def after(cls, marker: str | Sequence[int]) -> Positions:
        """Positions strictly after the first occurrence of ``marker`` (the marker itself is untouched)."""
        return cls("after", marker=marker if isinstance(marker, str) else tuple(int(t) for t in marker))

    @classmethod
    def explicit(cls, mask: Tensor) -> Positions:
        """Positions where ``mask[row, real_token_index]`` is True."""
        mask = torch.as_tensor(mask, dtype=torch.bool)
        return cls("mask", mask=mask[None] if mask.ndim == 1 else mask)


def as_positions(value: Positions | str | None) -> Positions:
    """Accept a Positions, None (all) or a string: ``all``, ``prompt``, ``generated``, ``after:<marker>``."""
    if value is None:
        return Positions()
    if isinstance(value, Positions):
        return value
    if isinstance(value, str) and value.startswith("after:"):
        return Positions.after(value[len("after:") :])
    if isinstance(value, str) and value in ("all", "prompt", "generated"):
        return Positions(value)
    raise UserError(f"unknown position policy {value!r}; use all, prompt, generated or after:<marker>")


def _find_end(history: list[int], marker: tuple[int, ...]) -> int | None:
    """Real-token index of the last marker token at its first occurrence in ``history``, or None."""
    m = len(marker)
    for start in range(len(history) - m + 1):
        if tuple(history[start : start + m]) == marker:
            return start + m - 1
    return None


class PositionTracker:
    """Follows the tokens of each forward call (fed by a pre-hook on the wrapped model).

    ``begin_call`` is told the call's new tokens, its attention mask and whether a KV cache is
    continued; ``mask(positions, batch, n)`` then says which of the call's ``n`` positions the
    policy selects. ``prompt_lengths`` (set by :func:`interp.generate`) splits prompt from
    generated tokens; outside generation every token counts as prompt.
    """

    def __init__(self, tokenizer: Any = None):
        self.tokenizer = tokenizer
        self.prompt_lengths: Int[Tensor, " batch"] | None = None
        self._index: Int[Tensor, "batch n"] | None = None
        self._history: list[list[int]] = []
        self._n_columns = 0
        self._cache: dict[int, Tensor] = {}

    def begin_call(self, tokens: Tensor | None, attention_mask: Tensor | None, continues_cache: bool) -> None:
        """Record one forward call: ``tokens [batch, n]`` new ids, mask over cached + new columns."""
        self._cache = {}
        if tokens is None or not isinstance(tokens, Tensor) or tokens.is_floating_point():
            self._index, self._history, self._n_columns = None, [], 0
            return
        tokens = tokens if tokens.ndim == 2 else tokens[None]
        batch, n = tokens.shape
        if not continues_cache:
            self._history, self._n_columns = [[] for _ in range(batch)], 0
        if attention_mask is None or attention_mask.ndim != 2:
            attention_mask = torch.ones(batch, self._n_columns + n, dtype=torch.long, device=tokens.device)
        elif attention_mask.shape[1] < n:
            attention_mask = torch.ones(batch, n, dtype=torch.long, device=tokens.device)
        mask = attention_mask.long()
        index = (mask.cumsum(-1) - 1)[:, -n:]
        real = mask[:, -n:].bool()
        self._index = torch.where(real, index, torch.full_like(index, -1)).to(tokens.device)
        if len(self._history) != batch:
            self._history = [[] for _ in range(batch)]
        for row in range(batch):
            self._history[row].extend(tokens[row][real[row]].tolist())
        self._n_columns = attention_mask.shape[1]

    def _marker_ids(self, marker: str | tuple[int, ...]) -> tuple[int, ...]:
        if not isinstance(marker, str):
            return marker
        if self.tokenizer is None:
            raise UserError("a string marker needs a model with a tokenizer; pass the marker as token ids instead")
        ids = tuple(self.tokenizer.encode(marker, add_special_tokens=False))
        if not ids:
            raise UserError(f"the marker {marker!r} tokenizes to nothing; choose a non-empty marker")
        return ids

    def mask(self, positions: Positions, batch: int, n: int, device: torch.device) -> Bool[Tensor, "batch n"]:
        """Which of the current call's ``n`` positions ``positions`` selects (padding never)."""
        key = id(positions)
        if key in self._cache and self._cache[key].shape == (batch, n):
            return self._cache[key]
        index = self._index
        if index is None or index.shape != (batch, n):
            # No token information (e.g. embeddings were passed): every position is a real prompt token.
            index = torch.arange(n, device=device).expand(batch, n)
        index = index.to(device)
        real = index >= 0
        if positions.kind == "all":
            selected = real
        elif positions.kind in ("prompt", "generated"):
            lengths = self.prompt_lengths
            if lengths is None:
                is_prompt = real
            else:
                is_prompt = real & (index < lengths.to(device)[:, None])
            selected = is_prompt if positions.kind == "prompt" else real & ~is_prompt
        elif positions.kind == "after":
            marker = self._marker_ids(positions.marker)  # type: ignore[arg-type]
            ends = []
            for row in range(batch):
                end = _find_end(self._history[row], marker) if row < len(self._history) else None
                ends.append(end if end is not None else 2**62)
            selected = real & (index > torch.tensor(ends, device=device)[:, None])
        else:
            explicit = positions.mask.to(device)  # type: ignore[union-attr]
            if explicit.shape[0] not in (1, batch):
                raise UserError(f"the explicit position mask has {explicit.shape[0]} rows but the batch has {batch}; pass one row per prompt or a single row")
            explicit = explicit.expand(batch, -1)
            width = explicit.shape[1]
            inside = real & (index < width)
            picked = torch.gather(explicit, 1, index.clamp(0, max(width - 1, 0))) if width else torch.zeros_like(real)
            selected = inside & picked
        self._cache[key] = selected
        return selected
