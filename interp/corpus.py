"""Text corpora: a registry of offline English corpora, local files, and Hugging Face datasets.

A :class:`Corpus` is a named, fingerprinted stream of documents for one split. Every corpus has
the splits ``"train"`` and ``"eval"`` (held out): a document belongs to ``"eval"`` when a salted
sha256 of its text falls in the first ``EVAL_FRACTION`` (2 %) of the hash range
(:func:`interp.corpus_build.split_of`), so the splits are disjoint by document, deterministic,
and stable when documents are added or removed. ``split="all"`` yields every document.

Registered names (:func:`list_corpora`): ``default`` (the King James Bible plus de-duplicated,
prose-filtered docstrings of installed packages; built once into the cache on first use),
and its two parts ``kjv`` and ``docstrings``. Local files: ``.txt`` (documents separated by blank
lines), ``.jsonl`` (one JSON object per line with a ``text`` field) and ``.parquet`` (a ``text``
column). Hugging Face datasets: ``hf:owner/name[:config]`` (or a bare ``owner/name``), online only.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from interp.corpus_build import EVAL_FRACTION, split_of
from interp.corpus_files import hf_corpus, hub_offline, local_documents
from interp.errors import UserError, suggest
from interp.packing import pack_windows

__all__ = ["Corpus", "load_corpus", "list_corpora", "pack_windows", "SPLITS", "EVAL_FRACTION"]

SPLITS = ("train", "eval", "all")
_LOCAL_SUFFIXES = (".txt", ".jsonl", ".parquet")
# Tokens of all splits, measured with the SmolLM2 tokenizer on the corpus built from this machine's installed versions
# (see benchmarks/RESULTS.md); other versions give slightly different counts.
_REGISTRY: dict[str, dict[str, Any]] = {
    "default": {
        "description": "English mix: King James Bible chapters + prose docstrings of the Python stdlib, numpy, pandas, "
        "networkx, torch, transformer-lens, datasets, huggingface_hub; paragraph-deduplicated",
        "sources": None,
        "approx_tokens": "3.4M",
    },
    "kjv": {
        "description": "King James Bible, one document per chapter (the kjv-bible part of default)",
        "sources": ("kjv-bible",),
        "approx_tokens": "1.0M",
    },
    "docstrings": {
        "description": "prose docstrings of installed Python packages (the docstring part of default)",
        "sources": "docstrings",
        "approx_tokens": "2.4M",
    },
}


@dataclass
class Corpus:
    """One split of a corpus: a fingerprinted, repeatable stream of text documents."""

    name: str
    """Registry name, file path or ``hf:`` dataset name the corpus was loaded under."""
    split: str
    """``"train"``, ``"eval"`` or ``"all"``."""
    sources: list[dict[str, Any]]
    """Provenance of each source: ``name``, ``license``, ``url`` (and version, counts when known)."""
    fingerprint: str
    """sha256 identifying the content and the split (used to key token caches)."""
    _read: Callable[[], Iterator[str]] = field(repr=False)

    def documents(self) -> Iterator[str]:
        """Iterate the documents of this split, in the corpus's fixed order."""
        for text in self._read():
            if self.split == "all" or split_of(text) == self.split:
                yield text


def list_corpora() -> list[dict[str, Any]]:
    """The registered corpora: name, description, licenses, offline availability, approximate tokens."""
    from interp.corpus_sources import available_sources

    sources = available_sources()
    rows = []
    for name, entry in _REGISTRY.items():
        used = [s for s in sources if _wanted(entry, s["name"])]
        rows.append({
            "name": name,
            "description": entry["description"],
            "licenses": sorted({s["license"] for s in used}),
            "offline_available": bool(used),
            "approx_tokens": entry["approx_tokens"],
        })
    return rows


def load_corpus(name_or_path: str = "default", split: str = "train") -> Corpus:
    """A registered corpus, a local .txt/.jsonl/.parquet file, or ``hf:owner/name[:config]`` (online)."""
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; use one of: {', '.join(SPLITS)}")
    name = str(name_or_path)
    if name in _REGISTRY:
        return _registered(name, split)
    path = Path(name).expanduser()
    if path.exists() or path.suffix.lower() in _LOCAL_SUFFIXES:
        return _local(path, split)
    if not name.startswith("hf:") and _looks_like_repo_id(name) and hub_offline():
        raise UserError(
            f"corpus {name!r} is neither a registered name nor an existing file, and Hugging Face datasets need "
            f"the hub, which is off (HF_HUB_OFFLINE); check the path, or use one of: {', '.join(_REGISTRY)}"
        )
    if name.startswith("hf:") or _looks_like_repo_id(name):
        dataset = name.removeprefix("hf:")
        fingerprint, sources, read = hf_corpus(dataset)
        return Corpus(name, split, sources, _split_fingerprint(fingerprint, split), read)
    raise UserError(
        f"unknown corpus {name!r}{suggest(name, _REGISTRY)}; use one of: {', '.join(_REGISTRY)}, "
        "a .txt/.jsonl/.parquet file, or hf:owner/name for a Hugging Face dataset (online)"
    )


def _wanted(entry: dict[str, Any], source_name: str) -> bool:
    chosen = entry["sources"]
    if chosen is None:
        return True
    if chosen == "docstrings":
        return source_name.endswith("-docstrings")
    return source_name in chosen


def _split_fingerprint(content: str, split: str) -> str:
    return hashlib.sha256(f"{content}:{split}".encode()).hexdigest()


def _registered(name: str, split: str) -> Corpus:
    from interp.corpus_build import default_corpus_dir

    directory = default_corpus_dir()
    meta = json.loads((directory / "meta.json").read_text())
    entry = _REGISTRY[name]
    sources = [s for s in meta["sources"] if _wanted(entry, s["name"])]
    wanted = {s["name"] for s in sources}
    path = directory / "documents.jsonl"

    def read() -> Iterator[str]:
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                record = json.loads(line)
                if record["source"] in wanted:
                    yield record["text"]

    content = f"{meta['sha256']}:{name}"
    return Corpus(name, split, sources, _split_fingerprint(content, split), read)


def _local(path: Path, split: str) -> Corpus:
    from interp.files import sha256_file

    if not path.is_file():
        raise UserError(f"corpus file {path} does not exist; check the path or use a registered corpus such as 'default'")
    if path.suffix.lower() not in _LOCAL_SUFFIXES:
        raise UserError(f"corpus file {path} has an unsupported type; use a .txt, .jsonl or .parquet file")
    if path.stat().st_size == 0:
        raise UserError(f"corpus file {path} is empty; give a file with text in it")
    # Validate now (bad JSON, missing text field, no documents) so errors surface at load time.
    if next(local_documents(path), None) is None:
        raise UserError(f"corpus file {path} holds no text documents; give a file with non-empty text")
    source = {"name": path.name, "license": "user-provided", "url": path.resolve().as_uri()}
    content = f"{sha256_file(path)}:{path.suffix.lower()}"
    return Corpus(str(path), split, [source], _split_fingerprint(content, split), lambda: local_documents(path))


def _looks_like_repo_id(name: str) -> bool:
    owner, sep, rest = name.partition("/")
    return bool(sep) and bool(owner) and bool(rest) and "/" not in rest and not name.startswith((".", "~")) and os.sep == "/"
