"""Building the default English corpus once into the cache: extract, filter, de-duplicate, split.

The build reads every source of :func:`interp.corpus_sources.available_sources`, removes
paragraphs already seen (exact match after whitespace normalisation, across all sources, in
source order), orders the documents by a hash of their text so that sources are mixed, assigns
each document to a split by another hash (:func:`split_of`), and writes ``documents.jsonl``
(``text``, ``source``, ``split`` per line) plus ``meta.json`` (recipe, per-source licenses and
counts, sha256 of the documents) into a cache entry named after the recipe. The entry is built
under a file lock and appears only when complete, so an interrupted build is simply re-run.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import sys
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from interp.corpus_sources import Source, available_sources, file_documents, kjv_chapters, python_files
from interp.files import sha256_file

__all__ = ["BUILD_VERSION", "EVAL_FRACTION", "recipe", "recipe_key", "split_of", "build_corpus", "default_corpus_dir"]

BUILD_VERSION = 1  # bump whenever the filter, the split or the file layout changes
EVAL_FRACTION = 0.02
_SPLIT_SALT = b"interp-corpus-split-v1:"


def split_of(text: str) -> str:
    """``"eval"`` for a fixed pseudo-random ``EVAL_FRACTION`` of documents (by sha256 of the text), else ``"train"``."""
    digest = hashlib.sha256(_SPLIT_SALT + text.encode("utf-8")).digest()
    return "eval" if int.from_bytes(digest[:8], "big") < EVAL_FRACTION * 2**64 else "train"


def recipe(sources: list[Source]) -> dict[str, Any]:
    """Everything that determines the built corpus: build version, split fraction, Python and source versions."""
    return {
        "build_version": BUILD_VERSION,
        "eval_fraction": EVAL_FRACTION,
        "python": ".".join(map(str, sys.version_info[:3])),
        "sources": [{k: s[k] for k in ("name", "kind", "version", "license")} for s in sources],
    }


def recipe_key(spec: dict[str, Any]) -> str:
    """A short stable hash of a recipe, naming its cache entry."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def _source_documents(source: Source, pool: ProcessPoolExecutor | None, advance) -> Iterable[list[str]]:
    if source["kind"] == "kjv-sqlite":
        for chapter in kjv_chapters(source["root"]):
            yield chapter.split("\n\n")
        advance(1)
        return
    files = python_files(source["root"])
    results = pool.map(file_documents, files, chunksize=8) if pool is not None else map(file_documents, files)
    for documents in results:
        yield from documents
        advance(1)


def _n_units(source: Source) -> int:
    return 1 if source["kind"] == "kjv-sqlite" else len(python_files(source["root"]))


def build_corpus(sources: list[Source], out: str | os.PathLike, workers: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Build ``documents.jsonl`` and ``meta.json`` in the directory ``out`` from ``sources``; return the meta."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    out = Path(out)
    workers = workers if workers is not None else min(4, os.cpu_count() or 1)
    seen: set[str] = set()
    documents: list[tuple[str, str, str]] = []  # (order hash, source name, text)
    stats = []
    units = [_n_units(s) for s in sources]
    columns = (TextColumn("building corpus: {task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) if workers > 1 else None
    try:
        with Progress(*columns, console=Console(stderr=True), disable=not progress) as bar:
            task = bar.add_task("", total=sum(units))
            for source in sources:
                bar.update(task, description=source["name"])
                kept = chars = duplicates = 0
                for paragraphs in _source_documents(source, pool, lambda n: bar.advance(task, n)):
                    unique = []
                    for paragraph in paragraphs:
                        if paragraph in seen:
                            duplicates += 1
                            continue
                        seen.add(paragraph)
                        unique.append(paragraph)
                    if unique:
                        text = "\n\n".join(unique)
                        documents.append((hashlib.sha256(text.encode("utf-8")).hexdigest(), source["name"], text))
                        kept += 1
                        chars += len(text)
                info = {k: source[k] for k in ("name", "kind", "version", "license", "url")}
                stats.append({**info, "n_documents": kept, "n_chars": chars, "duplicate_paragraphs_removed": duplicates})
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    documents.sort()
    out.mkdir(parents=True, exist_ok=True)
    path = out / "documents.jsonl"
    with open(path, "w", encoding="utf-8") as fh:
        for _, name, text in documents:
            fh.write(json.dumps({"text": text, "source": name, "split": split_of(text)}, ensure_ascii=False) + "\n")
    n_eval = sum(split_of(text) == "eval" for _, _, text in documents)
    meta = {
        "recipe": recipe(sources),
        "sources": stats,
        "n_documents": len(documents),
        "n_documents_eval": n_eval,
        "n_chars": sum(len(text) for _, _, text in documents),
        "sha256": sha256_file(path),
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def default_corpus_dir(progress: bool = True) -> Path:
    """The cache entry holding the default corpus for the installed versions, built on first use."""
    from interp.model_cache import cache_dir, cached_build

    sources = available_sources()
    target = cache_dir() / "corpora" / f"default-{recipe_key(recipe(sources))}"
    return cached_build(target, lambda tmp: build_corpus(sources, tmp, progress=progress), "corpus cache")
