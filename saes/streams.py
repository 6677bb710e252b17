"""Where training rows come from: an activation store on disk, or a live model harvested on the fly.

Both streams are addressed by *batch index*, so a resumed run asks for the stream from the batch
where it stopped and sees exactly the rows an uninterrupted run would have seen. Under data
parallelism every rank walks the same global batches and keeps its own contiguous slice of rows,
so ``W`` ranks with local batch ``B/W`` see exactly the rows of one process with batch ``B``.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from interp.errors import UserError

__all__ = ["StoreStream", "LiveStream", "open_stream"]


def _rank_slice(rows: int, rank: int, world: int) -> slice:
    """Contiguous slice of a global batch of ``rows`` held by ``rank`` (rows divide evenly: checked at setup)."""
    per = rows // world
    return slice(rank * per, (rank + 1) * per)


class StoreStream:
    """Rows of an :class:`interp.ActivationStore`, shuffled by the store, epoch after epoch."""

    def __init__(self, store: Any, hooks: list[str], batch_size: int, seed: int, buffer_rows: int):
        self.store, self.hooks, self.batch_size, self.seed, self.buffer_rows = store, hooks, batch_size, seed, buffer_rows

    @property
    def available_hooks(self) -> list[str]:
        """Hooks present in the store."""
        return list(self.store.hooks)

    @property
    def n_rows(self) -> int | None:
        """Rows in one epoch."""
        return int(self.store.n_tokens)

    @property
    def model_name(self) -> str:
        """Name of the model the store was harvested from."""
        return str(getattr(self.store, "model", "unknown"))

    def identity(self) -> dict[str, Any]:
        """What a checkpoint records to recognise these rows: model, row count and a hash of the trained
        hooks' shard checksums (from the manifest: no data is read)."""
        files = [shard["files"][h]["sha256"] for shard in self.store.manifest["shards"] for h in self.hooks]
        return {"model": self.model_name, "rows": self.n_rows, "activations": hashlib.sha256("".join(files).encode()).hexdigest()[:16]}

    def d_in(self, hook: str) -> int:
        """Width of ``hook``'s activations."""
        return int(self.store.d_in(hook))

    def sample(self, hook: str, n: int) -> Float[Tensor, "n d_in"]:
        """The first ``n`` stored rows of ``hook`` (harvest order is already shuffled across windows)."""
        return self.store.read(hook, 0, min(n, self.store.n_tokens)).float()

    def batches(self, start_batch: int, rank: int = 0, world: int = 1) -> Iterator[tuple[int, dict[str, Tensor]]]:
        """``(batch index to resume after it, this rank's slice)`` for every full global batch from ``start_batch`` on."""
        it = self.store.iter_batches(self.hooks, self.batch_size, seed=self.seed, start_batch=start_batch,
                                     buffer_rows=self.buffer_rows, epochs=None)
        for index, batch in enumerate(it, start=start_batch + 1):
            rows = next(iter(batch.values())).shape[0]
            if rows != self.batch_size:
                continue  # a short tail batch would unbalance ranks and the step size; the store reshuffles next epoch
            part = _rank_slice(rows, rank, world)
            yield index, {h: batch[h][part] for h in self.hooks}


def _layer_of(hook: str) -> int | None:
    """Block index of a ``blocks.N.*`` hook, or None for hooks outside the blocks."""
    m = re.match(r"blocks\.(\d+)\.", hook)
    return int(m.group(1)) if m else None


class LiveStream:
    """Rows harvested on the fly from a model over token windows (no disk).

    Row ``r`` of the stream is position ``1 + r % (ctx-1)`` of window ``perm_e[(r // (ctx-1)) % n_windows]``
    in epoch ``e``: position 0 (the BOS that :func:`interp.pack_windows` puts first) is skipped, and each
    epoch visits the windows in a fresh seeded order. Rows are not shuffled across windows.
    """

    def __init__(self, model: Any, windows: Int[Tensor, "n_windows ctx"], hooks: list[str], batch_size: int, seed: int,
                 model_batch_size: int = 8):
        if windows.ndim != 2 or windows.shape[1] < 2:
            raise UserError(f"token windows must be [n_windows, ctx >= 2], got shape {tuple(windows.shape)}")
        self.model, self.windows, self.hooks = model, windows.long(), hooks
        self.batch_size, self.seed, self.model_batch_size = batch_size, seed, model_batch_size
        self.per_window = windows.shape[1] - 1
        self._d_in: dict[str, int] = {}
        self._orders: dict[int, Tensor] = {}
        self._tokens_hash: str | None = None

    @property
    def available_hooks(self) -> list[str]:
        """Hook names the model exposes."""
        return sorted(self.model.hook_dict) if hasattr(self.model, "hook_dict") else list(self.hooks)

    @property
    def n_rows(self) -> int | None:
        """Rows in one pass over the windows."""
        return self.windows.shape[0] * self.per_window

    @property
    def model_name(self) -> str:
        """Registry name of the model."""
        try:
            from interp.models import model_name

            return model_name(self.model)
        except (ImportError, AttributeError):
            return str(getattr(self.model.cfg, "model_name", "unknown"))

    def identity(self) -> dict[str, Any]:
        """What a checkpoint records to recognise these rows: model name, row count and a hash of the token windows."""
        if self._tokens_hash is None:
            self._tokens_hash = hashlib.sha256(self.windows.contiguous().numpy().tobytes()).hexdigest()[:16]
        return {"model": self.model_name, "rows": self.n_rows, "tokens": self._tokens_hash}

    def d_in(self, hook: str) -> int:
        """Width of ``hook``'s activations (from one tiny forward pass, cached)."""
        if hook not in self._d_in:
            self._d_in[hook] = self._forward(self.windows[:1, :2])[hook].shape[-1]
        return self._d_in[hook]

    def _order(self, epoch: int) -> Tensor:
        """Window order of ``epoch``, seeded by (seed, epoch)."""
        if epoch not in self._orders:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._orders = {epoch: torch.randperm(self.windows.shape[0], generator=gen)}
        return self._orders[epoch]

    @torch.inference_mode()
    def _forward(self, tokens: Int[Tensor, "w ctx"]) -> dict[str, Tensor]:
        """Activations of every training hook for ``tokens``, stopping after the last block needed."""
        layers = [_layer_of(h) for h in self.hooks]
        stop = None if None in layers else max(layers) + 1
        device = next(self.model.parameters()).device
        out: dict[str, list[Tensor]] = {h: [] for h in self.hooks}
        for chunk in tokens.split(self.model_batch_size):
            _, cache = self.model.run_with_cache(chunk.to(device), names_filter=list(self.hooks), stop_at_layer=stop)
            for h in self.hooks:
                out[h].append(cache[h].float())
        return {h: torch.cat(v) for h, v in out.items()}

    def rows(self, start: int, stop: int) -> dict[str, Float[Tensor, "rows d_in"]]:
        """Stream rows ``[start, stop)`` for every hook, harvesting only the windows they touch."""
        first, last = start // self.per_window, (stop - 1) // self.per_window
        n = self.windows.shape[0]
        ids = torch.stack([self._order(w // n)[w % n] for w in range(first, last + 1)])
        acts = self._forward(self.windows[ids])
        offset = start - first * self.per_window
        # drop position 0 of each window, then flatten windows into one row stream
        return {h: a[:, 1:].reshape(-1, a.shape[-1])[offset:offset + stop - start].cpu() for h, a in acts.items()}

    def sample(self, hook: str, n: int) -> Float[Tensor, "n d_in"]:
        """The first ``n`` rows of the stream."""
        return self.rows(0, min(n, self.n_rows))[hook]

    def batches(self, start_batch: int, rank: int = 0, world: int = 1) -> Iterator[tuple[int, dict[str, Tensor]]]:
        """``(batch index to resume after it, this rank's slice)`` for every global batch from ``start_batch`` on."""
        per = self.batch_size // world
        b = start_batch
        while True:
            lo = b * self.batch_size + rank * per
            b += 1
            yield b, self.rows(lo, lo + per)


def open_stream(source: Any, hooks: list[str], batch_size: int, seed: int, buffer_rows: int, *, corpus: str | Tensor = "default",
                ctx: int = 128, model_batch_size: int = 8, n_tokens: int = 0, progress: bool = False) -> StoreStream | LiveStream:
    """A stream over ``source``: an ActivationStore, a store directory, or a live model (with ``corpus``)."""
    if hasattr(source, "iter_batches"):
        return StoreStream(source, hooks, batch_size, seed, buffer_rows)
    if hasattr(source, "run_with_cache"):
        if isinstance(corpus, Tensor):
            windows = corpus
        else:
            from interp.corpus import load_corpus, pack_windows

            if source.tokenizer is None:
                raise UserError("this model has no tokenizer; pass token windows as the corpus to train from it live")
            # one epoch's worth is enough: the stream re-visits windows in a new order after that
            windows = pack_windows(source.tokenizer, load_corpus(corpus), ctx=ctx, n_tokens=n_tokens * ctx // (ctx - 1) + ctx,
                                   seed=seed, progress=progress)
        return LiveStream(source, windows, hooks, batch_size, seed, model_batch_size)
    from pathlib import Path

    if isinstance(source, (str, Path)):
        if not Path(source).is_dir():
            raise UserError(f"activation store {source} does not exist; harvest activations first or fix --acts")
        from interp.store import ActivationStore

        return StoreStream(ActivationStore(source), hooks, batch_size, seed, buffer_rows)
    raise UserError(f"cannot train from a {type(source).__name__}; pass an ActivationStore, a store directory or a model")
