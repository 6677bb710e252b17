"""Reading documents from local .txt / .jsonl / .parquet files and from Hugging Face datasets.

Every reader streams: a file is never loaded whole, so corpora larger than memory work. Bad
content (invalid JSON, no ``text`` field or column, undecodable bytes) raises a one-line
:class:`~interp.errors.UserError` naming the file and, where it helps, the line.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from interp.errors import UserError

__all__ = ["local_documents", "txt_documents", "jsonl_documents", "parquet_documents", "hf_corpus", "hub_offline"]

_TRUE = ("1", "true", "yes", "on")


def txt_documents(path: Path) -> Iterator[str]:
    """Documents of a text file: runs of non-blank lines, separated by one or more blank lines."""
    lines: list[str] = []
    try:
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    lines.append(line.rstrip("\n"))
                elif lines:
                    yield "\n".join(lines).strip()
                    lines = []
    except UnicodeDecodeError as err:
        raise UserError(f"corpus file {path} is not UTF-8 text ({err.reason} at byte {err.start}); convert it to UTF-8") from err
    if lines:
        yield "\n".join(lines).strip()


def jsonl_documents(path: Path) -> Iterator[str]:
    """The ``text`` field of each JSON object line (blank lines and empty texts skipped)."""
    try:
        with open(path, encoding="utf-8") as fh:
            for number, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise UserError(f"line {number} of {path} is not valid JSON ({err.msg}); each line must be one JSON object") from err
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise UserError(f"line {number} of {path} has no string 'text' field; each line must look like {{\"text\": \"...\"}}")
                if record["text"].strip():
                    yield record["text"]
    except UnicodeDecodeError as err:
        raise UserError(f"corpus file {path} is not UTF-8 text ({err.reason} at byte {err.start}); convert it to UTF-8") from err


def parquet_documents(path: Path, batch_rows: int = 1024) -> Iterator[str]:
    """The non-empty strings of the ``text`` column, read in record batches."""
    try:
        import pyarrow.parquet as pq
    except ImportError as err:
        raise UserError("reading .parquet corpora needs pyarrow; run: pip install 'interp-workbench[parquet]'") from err
    try:
        reader = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises its own ArrowInvalid for damaged files
        raise UserError(f"corpus file {path} is not a readable parquet file ({type(err).__name__}); check or re-export it") from err
    columns = reader.schema_arrow.names
    if "text" not in columns:
        raise UserError(f"parquet file {path} has no 'text' column (columns: {', '.join(columns) or 'none'}); rename the text column to 'text'")
    for batch in reader.iter_batches(batch_size=batch_rows, columns=["text"]):
        for text in batch.column(0).to_pylist():
            if isinstance(text, str) and text.strip():
                yield text


_READERS: dict[str, Callable[[Path], Iterator[str]]] = {".txt": txt_documents, ".jsonl": jsonl_documents, ".parquet": parquet_documents}


def local_documents(path: str | os.PathLike) -> Iterator[str]:
    """Documents of a local corpus file, chosen by its suffix (.txt, .jsonl, .parquet)."""
    path = Path(path)
    return _READERS[path.suffix.lower()](path)


def hub_offline() -> bool:
    """True when Hugging Face hub access is switched off by the usual environment variables."""
    return any(os.environ.get(var, "").lower() in _TRUE for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hf_corpus(dataset: str) -> tuple[str, list[dict[str, Any]], Callable[[], Iterator[str]]]:
    """``(fingerprint, sources, read)`` for ``owner/name[:config]`` on the Hugging Face hub (streamed train split)."""
    repo, _, config = dataset.partition(":")
    if hub_offline():
        raise UserError(
            f"corpus {dataset!r} is a Hugging Face dataset but hub access is off (HF_HUB_OFFLINE); "
            "go online, or export it to a local .jsonl/.parquet file, or use the offline corpus 'default'"
        )
    try:
        import datasets
        from huggingface_hub import HfApi
    except ImportError as err:
        raise UserError("Hugging Face corpora need the datasets package; run: pip install 'interp-workbench[hf]'") from err
    try:
        info = HfApi().dataset_info(repo)
    except Exception as err:  # network, 404 and auth errors all come as different hub exception types
        raise UserError(f"cannot reach Hugging Face dataset {repo!r} ({type(err).__name__}); check the name and your network") from err
    card = info.card_data.to_dict() if getattr(info, "card_data", None) else {}
    license_ = card.get("license", "unknown")
    sources = [{"name": dataset, "license": license_ if isinstance(license_, str) else " AND ".join(license_),
                "url": f"https://huggingface.co/datasets/{repo}", "version": info.sha}]

    def read() -> Iterator[str]:
        stream = datasets.load_dataset(repo, config or None, split="train", streaming=True, revision=info.sha)
        for row in stream:
            text = row.get("text")
            if not isinstance(text, str):
                raise UserError(f"Hugging Face dataset {dataset!r} has no string 'text' column (columns: {', '.join(row)})")
            if text.strip():
                yield text

    return f"hf:{repo}:{config}:{info.sha}", sources, read
