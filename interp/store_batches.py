"""Shuffled, resumable batch iteration over an activation store through a bounded mixing buffer.

The stream is a sequence of epochs; each epoch is a permutation of all stored rows, and batches
are cut from the concatenated stream, so every batch but the very last (finite ``epochs``) is
full and every row appears exactly once per epoch. Within an epoch the shards are visited in a
seeded random order; their rows go into a buffer of at most ``buffer_rows + shard rows`` rows
that is shuffled whenever it is full, and all but ``buffer_rows // 2`` rows are emitted (the
rest stay to mix with the next shards), like a shuffle buffer in a data loader.

The order depends only on the row indices (``seed``, the epoch, the shard sizes), never on the
data, so ``start_batch`` replays the index permutations without reading any shard and loads
data only from the point where batches are produced.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from interp.errors import UserError

if TYPE_CHECKING:
    from interp.store import ActivationStore

__all__ = ["iter_batches"]

log = logging.getLogger(__name__)


def _generator(seed: int, epoch: int) -> torch.Generator:
    # One independent stream per (seed, epoch); the large odd multiplier keeps pairs apart.
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch) % (2**63))


def _epoch(
    store: ActivationStore, hooks: list[str], seed: int, epoch: int, buffer_rows: int, skip: int
) -> Iterator[tuple[Tensor, dict[str, Tensor]]]:
    """Yield ``(rows, {hook: acts})`` chunks of one epoch's permutation, after skipping ``skip`` rows."""
    gen = _generator(seed, epoch)
    order = torch.randperm(store.n_shards, generator=gen).tolist()
    buf_rows = torch.empty(0, dtype=torch.long)
    # Per hook, the buffer as a list of parts (concatenated once per shuffle, not once per
    # shard); None while skipping: indices only, no data read.
    buf_parts: dict[str, list[Tensor]] | None = None
    for n_done, shard in enumerate(order):
        start, stop = store.shard_rows(shard)
        buf_rows = torch.cat([buf_rows, torch.arange(start, stop)])
        if buf_parts is not None:
            for h in hooks:
                buf_parts[h].append(store.read_shard(h, shard))
        last = n_done == len(order) - 1
        if len(buf_rows) < buffer_rows and not last:
            continue
        keep = 0 if last else buffer_rows // 2
        n_emit = len(buf_rows) - keep
        if buf_parts is None and skip < n_emit:
            buf_parts = {h: [a] for h, a in _materialize(store, hooks, buf_rows).items()}
        perm = torch.randperm(len(buf_rows), generator=gen)
        buf_rows = buf_rows[perm]
        if buf_parts is None:
            skip -= n_emit
        else:
            mixed = {h: torch.cat(parts)[perm] for h, parts in buf_parts.items()}
            yield buf_rows[skip:n_emit], {h: a[skip:n_emit] for h, a in mixed.items()}
            buf_parts = {h: [a[n_emit:]] for h, a in mixed.items()}
            skip = 0
        buf_rows = buf_rows[n_emit:]


def _materialize(store: ActivationStore, hooks: list[str], rows: Tensor) -> dict[str, Tensor]:
    """Read the activations of arbitrary global ``rows`` (grouped by shard) in the given order."""
    out = {h: torch.empty(len(rows), store.d_in(h)) for h in hooks}
    for shard in range(store.n_shards):
        start, stop = store.shard_rows(shard)
        where = ((rows >= start) & (rows < stop)).nonzero().squeeze(1)
        if len(where):
            for h in hooks:
                out[h][where] = store.read_shard(h, shard)[rows[where] - start]
    return out


def iter_batches(
    store: ActivationStore,
    hooks: list[str],
    batch_size: int,
    seed: int = 0,
    start_batch: int = 0,
    buffer_rows: int = 2**18,
    epochs: int | None = None,
    on_epoch: Callable[[int], None] | None = None,
) -> Iterator[dict[str, Tensor]]:
    """Yield ``{hook: [batch_size, d_in]}`` float32 batches; infinite when ``epochs`` is None.

    ``on_epoch(e)`` is called (and logged) whenever the stream enters epoch ``e`` >= 1.
    """
    if isinstance(hooks, str):
        hooks = [hooks]
    for hook in hooks:
        store.d_in(hook)  # raises a UserError naming the stored hooks
    if batch_size < 1 or buffer_rows < 1 or start_batch < 0 or (epochs is not None and epochs < 1):
        raise UserError(
            f"iter_batches needs batch_size >= 1, buffer_rows >= 1, start_batch >= 0 and epochs >= 1 or None "
            f"(got {batch_size}, {buffer_rows}, {start_batch}, {epochs})"
        )
    n = store.n_tokens
    if n == 0:
        raise UserError(f"the store at {store.path} holds no rows; harvest some tokens first")
    skip = start_batch * batch_size
    epoch, skip = divmod(skip, n)
    first_epoch = epoch
    carry: dict[str, Tensor] = {h: torch.empty(0, store.d_in(h)) for h in hooks}
    while epochs is None or epoch < epochs:
        if epoch > first_epoch:
            log.info("activation store %s: starting epoch %d", store.path, epoch)
            if on_epoch is not None:
                on_epoch(epoch)
        for _, acts in _epoch(store, hooks, seed, epoch, buffer_rows, skip):
            carry = {h: torch.cat([carry[h], acts[h]]) for h in hooks}
            n_full = len(carry[hooks[0]]) // batch_size * batch_size
            for i in range(0, n_full, batch_size):
                yield {h: carry[h][i : i + batch_size] for h in hooks}
            carry = {h: carry[h][n_full:] for h in hooks}
        skip = 0
        epoch += 1
    if len(carry[hooks[0]]):
        yield carry
