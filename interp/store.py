"""Reading an activation store: rows of hook activations, the tokens behind them, their contexts.

Row ``i`` of every hook is the same token position, so ``read(h1, a, b)`` and ``read(h2, a, b)``
line up, and ``tokens(a, b)`` / ``context(i)`` say which token of which context window produced
it. Shards are verified against the manifest's sha256 the first time each file is opened;
:meth:`ActivationStore.verify` checks them all. The layout and the writer live in
:mod:`interp.store_manifest`, shuffled batch iteration in :mod:`interp.store_batches`.
"""

from __future__ import annotations

import bisect
import os
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from interp.errors import UserError, suggest
from interp.files import contained_path, sha256_file
from interp.store_manifest import read_manifest

__all__ = ["ActivationStore"]

_META_CACHE = 8  # meta shards kept in memory for repeated context look-ups


class ActivationStore:
    """A directory of activation shards described by ``manifest.json`` (see :mod:`interp.store_manifest`)."""

    def __init__(self, path: str | os.PathLike):
        """Open the store at ``path`` (reads only the manifest; shards load on demand)."""
        self.path = Path(path)
        self.manifest: dict[str, Any] = read_manifest(self.path)
        self._row_starts = [s["rows"][0] for s in self.manifest["shards"]]
        self._window_starts = [s["windows"][0] for s in self.manifest["shards"]]
        self._verified: set[str] = set()
        self._meta_cache: OrderedDict[int, dict[str, Tensor]] = OrderedDict()

    def __repr__(self) -> str:
        return f"ActivationStore({str(self.path)!r}, model={self.model!r}, hooks={self.hooks}, n_tokens={self.n_tokens})"

    @property
    def hooks(self) -> list[str]:
        """Hook names stored, in harvest order."""
        return list(self.manifest["hooks"])

    @property
    def n_tokens(self) -> int:
        """Number of stored rows (token positions)."""
        return int(self.manifest["n_tokens"])

    @property
    def model(self) -> str:
        """Name of the model the activations came from."""
        return str(self.manifest["model"])

    @property
    def complete(self) -> bool:
        """False while a harvest into this store is unfinished (interrupted or running)."""
        return bool(self.manifest["complete"])

    @property
    def n_shards(self) -> int:
        """Number of shards."""
        return len(self.manifest["shards"])

    def d_in(self, hook: str) -> int:
        """Width of ``hook``'s activations."""
        return int(self.manifest["d_in"][self._check_hook(hook)])

    def shard_rows(self, shard: int) -> tuple[int, int]:
        """Global row range ``[start, stop)`` of ``shard``."""
        start, stop = self.manifest["shards"][shard]["rows"]
        return int(start), int(stop)

    # -- activations ---------------------------------------------------------------------------

    def read(self, hook: str, start: int = 0, stop: int | None = None) -> Float[Tensor, "rows d_in"]:
        """Rows ``[start, stop)`` of ``hook`` as float32 (stop defaults to the end)."""
        self._check_hook(hook)
        start, stop = self._check_range(start, stop)
        parts = [self.read_shard(hook, i, a, b) for i, a, b in self._pieces(start, stop)]
        if not parts:
            return torch.empty(0, self.d_in(hook))
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def read_shard(self, hook: str, shard: int, start: int = 0, stop: int | None = None) -> Float[Tensor, "rows d_in"]:
        """Local rows ``[start, stop)`` of one shard of ``hook`` as float32 (the file is verified on first open)."""
        from safetensors import SafetensorError, safe_open

        entry = self.manifest["shards"][shard]["files"][self._check_hook(hook)]
        path = self._verify(entry)
        try:
            with safe_open(path, framework="pt") as fh:
                return fh.get_slice("acts")[start:stop].float()
        except (SafetensorError, OSError) as err:
            raise UserError(f"cannot read shard {entry['path']} in {self.path} ({err}); the store is damaged, re-harvest with --overwrite") from None

    def verify(self) -> None:
        """Check every shard file against its sha256; raise a one-line UserError on the first mismatch."""
        for shard in self.manifest["shards"]:
            for entry in [*shard["files"].values(), shard.get("meta")]:
                if entry is not None:
                    self._verify(entry)

    # -- tokens and contexts -------------------------------------------------------------------

    def tokens(self, start: int = 0, stop: int | None = None) -> Int[Tensor, " rows"]:
        """Token id at each row ``[start, stop)``."""
        start, stop = self._check_range(start, stop)
        parts = [self._meta(i, "tokens")["tokens"][a:b] for i, a, b in self._pieces(start, stop)]
        return torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)

    def context(self, row: int) -> tuple[Int[Tensor, " ctx"], int]:
        """``(window_token_ids, position)``: the window row ``row`` was computed in, and its position there."""
        windows, positions = self.windows([row])
        return windows[0], int(positions[0])

    def windows(self, rows: list[int] | Tensor) -> tuple[Int[Tensor, "n ctx"], Int[Tensor, " n"]]:
        """Batched :meth:`context`: the window token ids and position of every row in ``rows``."""
        rows = torch.as_tensor(rows, dtype=torch.long).reshape(-1)
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= self.n_tokens):
            raise UserError(f"row out of range: this store has rows 0..{self.n_tokens - 1}")
        window_ids = torch.empty_like(rows)
        positions = torch.empty_like(rows)
        for shard in _shards_of(rows, self._row_starts):
            start, stop = self.shard_rows(shard)
            mask = (rows >= start) & (rows < stop)
            meta = self._meta(shard, "window_tokens")
            window_ids[mask] = meta["window"][rows[mask] - start]
            positions[mask] = meta["position"][rows[mask] - start]
        out = torch.empty(rows.numel(), self.manifest.get("ctx") or 0, dtype=torch.long)
        for shard in _shards_of(window_ids, self._window_starts):
            w_start, w_stop = self.manifest["shards"][shard]["windows"]
            mask = (window_ids >= w_start) & (window_ids < w_stop)
            out[mask] = self._meta(shard, "window_tokens")["window_tokens"][window_ids[mask] - w_start]
        return out, positions

    # -- batches -------------------------------------------------------------------------------

    def iter_batches(
        self,
        hooks: list[str],
        batch_size: int,
        seed: int = 0,
        start_batch: int = 0,
        buffer_rows: int = 2**18,
        epochs: int | None = None,
        on_epoch: Callable[[int], None] | None = None,
    ) -> Iterator[dict[str, Float[Tensor, "batch d_in"]]]:
        """Shuffled batches ``{hook: [batch_size, d_in]}`` (same rows for every hook); see :mod:`interp.store_batches`."""
        from interp.store_batches import iter_batches

        return iter_batches(self, hooks, batch_size, seed, start_batch, buffer_rows, epochs, on_epoch)

    # -- creation from user tensors ------------------------------------------------------------

    @classmethod
    def from_tensors(
        cls,
        path: str | os.PathLike,
        acts: dict[str, Tensor],
        tokens: Tensor | None = None,
        model: str = "unknown",
        shard_rows: int = 2**16,
        dtype: str = "float32",
        overwrite: bool = False,
    ) -> ActivationStore:
        """Write your own activations as a store.

        ``acts[hook]`` is ``[rows, d_in]`` or ``[windows, ctx, d_in]``; ``tokens`` is ``[rows]``
        (token id per row) or ``[windows, ctx]`` (full windows, so ``context`` works).
        """
        from interp.store_tensors import write_tensors

        write_tensors(path, acts, tokens, model, shard_rows, dtype, overwrite)
        return cls(path)

    # -- internals -----------------------------------------------------------------------------

    def _check_hook(self, hook: str) -> str:
        if hook not in self.manifest["d_in"]:
            raise UserError(f"hook {hook!r} is not in the store at {self.path}{suggest(hook, self.hooks)}; stored hooks: {', '.join(self.hooks)}")
        return hook

    def _check_range(self, start: int, stop: int | None) -> tuple[int, int]:
        stop = self.n_tokens if stop is None else stop
        if not 0 <= start <= stop <= self.n_tokens:
            raise UserError(f"row range [{start}, {stop}) is outside this store's rows [0, {self.n_tokens})")
        return start, stop

    def _pieces(self, start: int, stop: int) -> Iterator[tuple[int, int, int]]:
        """``(shard, local_start, local_stop)`` covering global rows ``[start, stop)``."""
        shard = bisect.bisect_right(self._row_starts, start) - 1
        while start < stop:
            s_start, s_stop = self.shard_rows(shard)
            take = min(stop, s_stop)
            if take > start:
                yield shard, start - s_start, take - s_start
            start, shard = take, shard + 1

    def _meta(self, shard: int, need: str) -> dict[str, Tensor]:
        if shard in self._meta_cache:
            self._meta_cache.move_to_end(shard)
            meta = self._meta_cache[shard]
        else:
            entry = self.manifest["shards"][shard].get("meta")
            meta = self._load(entry) if entry else {}
            self._meta_cache[shard] = meta
            if len(self._meta_cache) > _META_CACHE:
                self._meta_cache.popitem(last=False)
        if need not in meta:
            raise UserError(f"the store at {self.path} has no {need.replace('_', ' ')} (made from tensors without them); pass tokens to from_tensors")
        return meta

    def _load(self, entry: dict[str, str]) -> dict[str, Tensor]:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = self._verify(entry)
        try:
            return load_file(path)
        except (SafetensorError, OSError) as err:
            raise UserError(f"cannot read shard {entry['path']} in {self.path} ({err}); the store is damaged, re-harvest with --overwrite") from None

    def _verify(self, entry: dict[str, str]) -> Path:
        path = contained_path(self.path, entry["path"])
        if entry["path"] in self._verified:
            return path
        if not path.is_file():
            raise UserError(f"shard {entry['path']} of the store at {self.path} is missing; the store is damaged, re-harvest with --overwrite")
        if sha256_file(path) != entry["sha256"]:
            raise UserError(f"shard {entry['path']} of the store at {self.path} is corrupted or truncated (sha256 mismatch); re-harvest with --overwrite")
        self._verified.add(entry["path"])
        return path


def _shards_of(index: Int[Tensor, " n"], starts: list[int]) -> list[int]:
    """The distinct shards holding ``index`` values, given each shard's first index (ascending)."""
    found = torch.searchsorted(torch.tensor(starts, dtype=torch.long), index, right=True) - 1
    return found.unique().tolist()
