"""Tokenize a corpus into one document stream and pack it into fixed context windows.

The stream is every document's tokens (no special tokens) followed by one separator token (the
tokenizer's EOS, or its BOS when it has no EOS), in corpus order. With ``bos=True`` window ``i``
is ``[BOS] + stream[i*(ctx-1) : (i+1)*(ctx-1)]``: every window starts with BOS, as the model saw
at training time and as ``model.to_tokens`` does, and no stream token is dropped or repeated; with
``bos=False`` window ``i`` is ``stream[i*ctx : (i+1)*ctx]``. Asking for ``n_tokens`` uses the
first ``ceil(n_tokens / ctx)`` windows of the stream, then shuffles them with ``seed``.

The stream is cached on disk per (tokenizer, corpus fingerprint) as int32 safetensors, and is
built lazily: a request for a few thousand tokens tokenizes only the first documents, and a
later, larger request continues where the cached prefix stopped. ``ctx``, ``seed`` and ``bos``
only change how the cached stream is cut, which is cheap, so they are not part of the cache key.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from interp.errors import UserError
from interp.files import save_safetensors_atomic

__all__ = ["pack_windows", "token_stream", "tokenizer_fingerprint"]

_DOCS_PER_CHUNK = 64
_SAVE_EVERY_TOKENS = 1_000_000


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of a tokenizer's full definition (fast tokenizers) or vocabulary, plus its special ids."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    payload = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    payload += f"|{type(tokenizer).__name__}|{tokenizer.bos_token_id}|{tokenizer.eos_token_id}"
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def _separator(tokenizer: Any) -> int:
    for token_id in (tokenizer.eos_token_id, tokenizer.bos_token_id):
        if token_id is not None:
            return int(token_id)
    raise UserError("the tokenizer has neither an EOS nor a BOS token to separate documents; use a tokenizer that defines one")


def _cache_path(tokenizer: Any, corpus: Any) -> Path:
    from interp.model_cache import cache_dir

    key = hashlib.sha256(f"{tokenizer_fingerprint(tokenizer)}:{corpus.fingerprint}".encode()).hexdigest()[:24]
    return cache_dir() / "tokens" / f"{key}.safetensors"


def _load(path: Path) -> tuple[Tensor, int, bool]:
    from safetensors import safe_open

    if not path.is_file():
        return torch.zeros(0, dtype=torch.int32), 0, False
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata()
            return fh.get_tensor("tokens"), int(meta["n_documents"]), meta["complete"] == "1"
    except Exception:  # a damaged cache file is only a cache: start the stream again
        return torch.zeros(0, dtype=torch.int32), 0, False


def _save(path: Path, tokens: Tensor, n_documents: int, complete: bool, corpus: Any) -> None:
    meta = {"n_documents": str(n_documents), "complete": "1" if complete else "0", "corpus": corpus.name, "split": corpus.split}
    save_safetensors_atomic(path, {"tokens": tokens}, metadata=meta)


def token_stream(tokenizer: Any, corpus: Any, min_tokens: int | None = None, progress: bool = True) -> tuple[Int[Tensor, " n"], bool]:
    """``(stream, complete)``: at least ``min_tokens`` stream tokens (all when None), from the disk cache when possible."""
    from filelock import FileLock
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    separator = _separator(tokenizer)
    path = _cache_path(tokenizer, corpus)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(path) + ".lock")
        lock.acquire()
    except OSError as err:
        raise UserError(f"cannot write the token cache in {path.parent}: {err.strerror or err}; set INTERP_CACHE to a writable directory") from err
    try:
        cached, n_documents, complete = _load(path)
        if complete or (min_tokens is not None and len(cached) >= min_tokens):
            return cached, complete
        parts, n_tokens, unsaved = [cached], len(cached), 0
        documents = itertools.islice(corpus.documents(), n_documents, None)
        columns = (TextColumn(f"tokenizing {corpus.name} ({corpus.split})"), BarColumn(), TextColumn("{task.completed:,} tokens"), TimeElapsedColumn())
        try:
            with Progress(*columns, console=Console(stderr=True), disable=not progress) as bar:
                task = bar.add_task("", total=min_tokens)
                while min_tokens is None or n_tokens < min_tokens:
                    chunk = list(itertools.islice(documents, _DOCS_PER_CHUNK))
                    if not chunk:
                        complete = True
                        break
                    ids = tokenizer(chunk, add_special_tokens=False, verbose=False)["input_ids"]
                    flat = torch.tensor([t for doc in ids for t in (*doc, separator)], dtype=torch.int32)
                    parts.append(flat)
                    n_documents += len(chunk)
                    n_tokens += len(flat)
                    unsaved += len(flat)
                    bar.advance(task, len(flat))
                    if unsaved >= _SAVE_EVERY_TOKENS:
                        parts = [torch.cat(parts)]
                        _save(path, parts[0], n_documents, False, corpus)
                        unsaved = 0
        finally:
            # Whole chunks only were appended, so the prefix is consistent even after Ctrl-C.
            stream = torch.cat(parts)
            if unsaved or complete:
                _save(path, stream, n_documents, complete, corpus)
    finally:
        lock.release()
    return stream, complete


def pack_windows(
    tokenizer: Any,
    corpus: Any,
    ctx: int = 128,
    n_tokens: int | None = None,
    seed: int = 0,
    bos: bool = True,
    progress: bool = True,
) -> Int[Tensor, "n_windows ctx"]:
    """Token windows ``[n_windows, ctx]`` of ``corpus`` (a Corpus or a name/path), shuffled with ``seed``."""
    from interp.corpus import Corpus, load_corpus

    if hasattr(tokenizer, "cfg") and hasattr(tokenizer, "tokenizer"):
        tokenizer = tokenizer.tokenizer  # a model was passed: use its tokenizer
    if tokenizer is None:
        raise UserError("this model has no tokenizer, so text cannot be packed; pass token windows directly instead")
    if not isinstance(corpus, Corpus):
        corpus = load_corpus(str(corpus))
    if ctx < (2 if bos else 1):
        raise UserError(f"ctx must be at least {2 if bos else 1} (got {ctx}); use a longer context such as 128")
    if n_tokens is not None and n_tokens <= 0:
        raise UserError(f"n_tokens must be positive (got {n_tokens}); ask for at least one token or pass None for the whole corpus")
    if bos and tokenizer.bos_token_id is None:
        raise UserError("the tokenizer has no BOS token; pack with bos=False")
    body = ctx - 1 if bos else ctx
    wanted = None if n_tokens is None else math.ceil(n_tokens / ctx)
    stream, _ = token_stream(tokenizer, corpus, None if wanted is None else wanted * body, progress=progress)
    available = len(stream) // body
    n_windows = available if wanted is None else wanted
    if n_windows == 0 or n_windows > available:
        raise UserError(
            f"corpus {corpus.name!r} ({corpus.split}) has {len(stream):,} tokens, enough for {available:,} windows of {ctx}; "
            f"ask for at most {available * ctx:,} tokens or use a larger corpus"
        )
    windows = stream[: n_windows * body].long().view(n_windows, body)
    if bos:
        windows = torch.cat([torch.full((n_windows, 1), int(tokenizer.bos_token_id)), windows], dim=1)
    order = torch.randperm(n_windows, generator=torch.Generator().manual_seed(seed))
    return windows[order].contiguous()
