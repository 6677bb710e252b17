"""Writing user-supplied activation tensors as an activation store (``ActivationStore.from_tensors``)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import einops
import torch
from torch import Tensor

from interp.errors import UserError
from interp.store_manifest import DTYPES, StoreWriter

__all__ = ["write_tensors"]


def _fingerprint(acts: dict[str, Tensor], tokens: Tensor | None) -> str:
    """sha256 over hook names, shapes and bytes: the config identity of a from_tensors store."""
    h = hashlib.sha256()
    for hook in acts:
        h.update(f"{hook}:{tuple(acts[hook].shape)}".encode())
        h.update(acts[hook].detach().float().cpu().contiguous().numpy().tobytes())
    if tokens is not None:
        h.update(tokens.detach().long().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def write_tensors(
    path: str | os.PathLike,
    acts: dict[str, Tensor],
    tokens: Tensor | None,
    model: str,
    shard_rows: int,
    dtype: str,
    overwrite: bool,
) -> Path:
    """Validate ``acts``/``tokens`` and write them as a complete store at ``path``."""
    if not acts:
        raise UserError("from_tensors needs at least one hook: pass {hook_name: tensor}")
    if dtype not in DTYPES:
        raise UserError(f"unknown store dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    if shard_rows < 1:
        raise UserError(f"shard_rows must be positive, got {shard_rows}")
    ctx = None
    if tokens is not None and tokens.ndim == 2:
        ctx = int(tokens.shape[1])
        acts = {h: einops.rearrange(a, "w c d -> (w c) d") if a.ndim == 3 else a for h, a in acts.items()}
    for hook, a in acts.items():
        if a.ndim != 2:
            raise UserError(f"activations for {hook!r} have shape {tuple(a.shape)}; pass [rows, d_in] (or [windows, ctx, d_in] with 2-D tokens)")
        if not a.is_floating_point():
            raise UserError(f"activations for {hook!r} are {a.dtype}; pass a floating-point tensor")
    n_rows = {int(a.shape[0]) for a in acts.values()}
    if len(n_rows) != 1:
        raise UserError(f"hooks have different numbers of rows {sorted(n_rows)}; every hook needs one row per token")
    n = n_rows.pop()
    if tokens is not None and tokens.numel() != n:
        raise UserError(f"tokens hold {tokens.numel()} ids but activations have {n} rows; pass one token id per row")
    header = {
        "model": model,
        "hooks": list(acts),
        "d_in": {h: int(a.shape[1]) for h, a in acts.items()},
        "dtype": dtype,
        "ctx": ctx,
        "target_tokens": n,
        "corpus": None,
        "seed": None,
        "config": {"source": "from_tensors", "model": model, "dtype": dtype, "fingerprint": _fingerprint(acts, tokens)},
    }
    writer = StoreWriter(path, header, overwrite=overwrite)
    if writer.complete:
        return Path(path)
    # Whole windows per shard when windows are known, so every window lives in one shard.
    step = max(ctx, shard_rows - shard_rows % ctx) if ctx else shard_rows
    rows = torch.arange(n)
    for start in range(writer.n_tokens, n, step):
        stop = min(start + step, n)
        meta = None
        n_windows = 0
        if tokens is not None:
            flat = tokens.reshape(-1).long().cpu()
            meta = {"tokens": flat[start:stop].clone()}
            if ctx:
                n_windows = (stop - start) // ctx
                meta["window"] = rows[start:stop] // ctx
                meta["position"] = rows[start:stop] % ctx
                meta["window_tokens"] = tokens[start // ctx : stop // ctx].long().cpu()
        writer.append({h: a[start:stop].detach().cpu() for h, a in acts.items()}, meta, n_windows)
    writer.finish()
    return Path(path)
