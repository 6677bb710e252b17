"""Harvesting: run a model over corpus windows once per batch and store the activations of its hooks.

Every hook is captured in ONE forward pass per batch that stops after the last block needed
(``stop_at_layer``), under ``torch.inference_mode``. Windows come from ``pack_windows(..., seed)``
(or are given), so the same call always sees the same windows in the same batches: resuming an
interrupted harvest skips the windows the manifest lists and gives the same store bit for bit.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import einops
import torch
from torch import Tensor

from interp.errors import UserError, suggest
from interp.models import cache_dir, load_model, model_name
from interp.store import ActivationStore
from interp.store_manifest import DTYPES, StoreWriter
from interp.store_progress import harvest_progress

__all__ = ["harvest"]

log = logging.getLogger(__name__)


def harvest(
    model: Any,
    corpus: Any,
    hooks: list[str],
    n_tokens: int,
    ctx: int = 128,
    batch_size: int = 8,
    out: str | os.PathLike | None = None,
    dtype: torch.dtype | str = torch.float32,
    seed: int = 0,
    overwrite: bool = False,
    include_special: bool = False,
    progress: bool = True,
    shard_rows: int = 2**15,
    on_status: Callable[[str], None] | None = None,
) -> ActivationStore:
    """Store ``n_tokens`` rows of every hook in ``hooks`` and return the store (resumes unfinished ones).

    ``corpus`` is a corpus name/path, a ``Corpus`` or a LongTensor ``[n_windows, ctx]`` (whose
    width then overrides ``ctx``); ``model`` a bridge or a name for ``load_model``. BOS and
    pad positions are skipped unless ``include_special``. ``out`` defaults to a directory in the
    cache keyed by the config. ``on_status`` receives one-line status messages.
    """
    if isinstance(model, (str, os.PathLike)):
        model = load_model(str(model))
    say = on_status or log.info
    hooks = _check_hooks(model, hooks)
    if n_tokens <= 0:
        raise UserError(f"--tokens must be a positive number of tokens to store, got {n_tokens}")
    if batch_size < 1 or shard_rows < 1:
        raise UserError(f"--batch-size and shard_rows must be positive, got {batch_size} and {shard_rows}")
    dtype_name = _dtype_name(dtype)
    windows, corpus_info = _corpus_windows(model, corpus, ctx, n_tokens, seed, include_special, progress)
    keep = _keep_mask(model, windows, include_special)
    # The last window may be used in part: keep exactly the first n_tokens kept positions.
    keep.view(-1)[keep.view(-1).cumsum(0) > n_tokens] = False
    stop_at = _stop_layer(hooks, model.cfg.n_layers)
    config = {
        "model": model_name(model),
        "hooks": hooks,
        "n_tokens": n_tokens,
        "ctx": int(windows.shape[1]),
        "seed": seed,
        # content, not name: the same file given by another path resumes the same store
        "corpus": {"split": corpus_info["split"], "fingerprint": corpus_info["fingerprint"]},
        "dtype": dtype_name,
        "include_special": include_special,
        "windows_sha256": _sha256(windows, keep),
    }
    if out is None:
        out = cache_dir() / "activations" / config["windows_sha256"][:16]
    header = {
        "model": config["model"],
        "hooks": hooks,
        "dtype": dtype_name,
        "ctx": config["ctx"],
        "target_tokens": n_tokens,
        "corpus": corpus_info,
        "seed": seed,
        "include_special": include_special,
        "config": config,
    }
    out = Path(out)
    with _exclusive(out):
        writer = StoreWriter(out, header, overwrite=overwrite)
        if writer.complete:
            say(f"already complete: {writer.n_tokens:,} tokens at {len(hooks)} hook(s) in {out}")
            return ActivationStore(out)
        if writer.n_tokens:
            say(f"resuming at token {writer.n_tokens:,} of {n_tokens:,} in {out}")
        _run(model, writer, windows, keep, hooks, stop_at, batch_size, shard_rows, DTYPES[dtype_name], progress)
        writer.finish()
    say(f"harvested {n_tokens:,} tokens at {len(hooks)} hook(s) into {out}")
    return ActivationStore(out)


def _run(model, writer, windows, keep, hooks, stop_at, batch_size, shard_rows, dtype, progress) -> None:
    """The forward loop: one pass per batch, rows appended as shards of about ``shard_rows`` rows."""
    device = next(model.parameters()).device
    state: dict[str, Any] = {}
    pending: dict[str, list[Tensor]] = {h: [] for h in hooks}
    meta: dict[str, list[Tensor]] = {"tokens": [], "window": [], "position": [], "window_tokens": []}
    pending_windows = 0

    def capture(name: str) -> Callable:
        def hook_fn(act: Tensor, hook: Any) -> None:
            if act.ndim < 3 or act.shape[:2] != state["mask"].shape:
                raise UserError(f"hook {name!r} gives activations of shape {tuple(act.shape)}, not [batch, position, ...]; harvest residual, MLP or attention-output hooks")
            flat = einops.rearrange(act, "b t ... -> b t (...)")
            pending[name].append(flat[state["mask"]].to("cpu", dtype))

        return hook_fn

    def flush() -> None:
        nonlocal pending_windows
        writer.append({h: torch.cat(v) for h, v in pending.items()}, {k: torch.cat(v) for k, v in meta.items()}, pending_windows)
        for parts in [*pending.values(), *meta.values()]:
            parts.clear()
        pending_windows = 0

    # bf16 autocast on CUDA (fast tensor cores); exact fp32 on CPU where bf16 matmuls are ~275x slower.
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    n_windows, ctx = windows.shape
    positions = torch.arange(ctx)
    with harvest_progress(progress, writer.manifest["target_tokens"], writer.n_tokens) as advance:
        with torch.inference_mode(), autocast, model.hooks(fwd_hooks=[(h, capture(h)) for h in hooks]):
            for start in range(writer.n_windows, n_windows, batch_size):
                batch, mask = windows[start : start + batch_size], keep[start : start + batch_size]
                state["mask"] = mask.to(device)
                model(batch.to(device), stop_at_layer=stop_at)
                meta["tokens"].append(batch[mask])
                meta["window"].append((torch.arange(start, start + len(batch))[:, None].expand_as(batch))[mask])
                meta["position"].append(positions.expand_as(batch)[mask])
                meta["window_tokens"].append(batch.clone())
                pending_windows += len(batch)
                advance(int(mask.sum()))
                if sum(len(t) for t in meta["tokens"]) >= shard_rows or start + batch_size >= n_windows:
                    flush()


def _check_hooks(model: Any, hooks: list[str]) -> list[str]:
    if isinstance(hooks, str):
        hooks = [hooks]
    if not hooks:
        raise UserError("no hooks given; pass at least one --hook, e.g. blocks.0.hook_resid_post")
    names = list(model.hook_dict)
    for hook in hooks:
        if hook not in model.hook_dict:
            raise UserError(f"unknown hook {hook!r}{suggest(hook, names)}; hooks look like blocks.0.hook_resid_post (model has {len(names)} hooks)")
    if len(set(hooks)) != len(hooks):
        raise UserError(f"hook names repeat in {hooks}; pass each hook once")
    return list(hooks)


def _dtype_name(dtype: torch.dtype | str) -> str:
    for name, value in DTYPES.items():
        if dtype in (name, value):
            return name
    raise UserError(f"unsupported store dtype {dtype!r}; use one of {', '.join(DTYPES)}")


def _corpus_windows(model, corpus, ctx, n_tokens, seed, include_special, progress) -> tuple[Tensor, dict[str, Any]]:
    """The token windows to run, cut to just enough for ``n_tokens`` stored rows, and the corpus identity."""
    if isinstance(corpus, Tensor):
        if corpus.ndim != 2 or corpus.dtype not in (torch.long, torch.int32, torch.int64) or corpus.shape[1] < 2:
            raise UserError(f"token windows must be a LongTensor [n_windows, ctx >= 2], got {corpus.dtype} {tuple(corpus.shape)}")
        windows, info = corpus.long().cpu(), {"name": "tensor", "split": None, "fingerprint": None}
        return _cut(model, windows, n_tokens, include_special, info), info
    if ctx < 2:
        raise UserError(f"--ctx must be at least 2 (BOS plus one token), got {ctx}")
    if model.tokenizer is None:
        raise UserError("this model has no tokenizer, so a text corpus cannot be tokenized; pass token windows as a LongTensor")
    from interp.corpus import load_corpus, pack_windows

    if isinstance(corpus, (str, os.PathLike)):
        corpus = load_corpus(str(corpus))
    info = {"name": corpus.name, "split": corpus.split, "fingerprint": corpus.fingerprint}
    # Ask for a few spare windows (positions of special tokens are skipped); fall back to all.
    wanted = (-(-n_tokens // (ctx - 1)) + 8) * ctx
    try:
        windows = pack_windows(model.tokenizer, corpus, ctx=ctx, n_tokens=wanted, seed=seed, bos=True, progress=progress)
        return _cut(model, windows, n_tokens, include_special, info), info
    except UserError:
        windows = pack_windows(model.tokenizer, corpus, ctx=ctx, n_tokens=None, seed=seed, bos=True, progress=progress)
        return _cut(model, windows, n_tokens, include_special, info), info


def _cut(model, windows: Tensor, n_tokens: int, include_special: bool, info: dict) -> Tensor:
    """The fewest leading windows whose kept positions reach ``n_tokens``."""
    kept = _keep_mask(model, windows, include_special).sum(1).cumsum(0)
    if len(kept) == 0 or int(kept[-1]) < n_tokens:
        have = int(kept[-1]) if len(kept) else 0
        raise UserError(f"corpus {info['name']} gives only {have:,} tokens in {len(windows)} windows; lower --tokens or use a larger corpus")
    return windows[: int(torch.searchsorted(kept, n_tokens)) + 1]


def _keep_mask(model, windows: Tensor, include_special: bool) -> Tensor:
    """Positions to store: all, or all but BOS and pad tokens (pad only when it is not also EOS)."""
    keep = torch.ones_like(windows, dtype=torch.bool)
    tok = model.tokenizer
    if not include_special and tok is not None:
        special = {tok.bos_token_id} | ({tok.pad_token_id} if tok.pad_token_id != tok.eos_token_id else set())
        special.discard(None)
        keep &= ~torch.isin(windows, torch.tensor(sorted(special), dtype=windows.dtype))
    return keep


def _stop_layer(hooks: list[str], n_layers: int) -> int | None:
    """``stop_at_layer`` just past the deepest block hooked; None when a hook lies after the blocks."""
    deepest = 1  # embedding hooks: run one block rather than rely on stop_at_layer=0
    for hook in hooks:
        match = re.match(r"blocks\.(\d+)\.", hook)
        if match:
            deepest = max(deepest, int(match.group(1)) + 1)
        elif not hook.startswith(("embed.", "pos_embed.", "hook_embed", "hook_pos_embed")):
            return None
    return deepest if deepest < n_layers else None


def _sha256(*tensors: Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(str(tuple(t.shape)).encode())
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


@contextlib.contextmanager
def _exclusive(out: Path):
    """Hold ``out/.harvest.lock`` so that two harvests never write the same store."""
    from filelock import FileLock, Timeout

    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is a file; choose a directory for --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create {out}: {err.strerror}; choose a writable --out") from None
    try:
        with FileLock(out / ".harvest.lock", timeout=0):
            yield
    except Timeout:
        raise UserError(f"another harvest is writing to {out}; wait for it to finish or choose another --out") from None
