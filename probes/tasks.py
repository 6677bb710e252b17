"""Labelled probing tasks: the shipped registry and a loader for the user's CSV/JSONL files.

A task is binary: ``labels`` in {0, 1}. A text may mark one word as ``[[word]]``; with the
``marked`` pooling the probe reads the activation at that word's last token. ``groups`` drive
leak-free splits (no group in two splits); ``types`` drive the control task.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from interp.errors import UserError, suggest

__all__ = ["ProbeTask", "list_tasks", "load_task", "strip_marker", "MARKER"]

MARKER = re.compile(r"\[\[(.+?)\]\]")
"""A marked word: ``[[word]]``."""

_FALSE = {"0", "false", "no", "neg", "negative"}
_TRUE = {"1", "true", "yes", "pos", "positive"}


@dataclass
class ProbeTask:
    """A binary probing task: texts, 0/1 labels, split groups and provenance."""

    name: str
    """Registry name or file path."""
    texts: list[str]
    """Items; may contain one ``[[marked]]`` word."""
    labels: list[int]
    """Label of each item, 0 or 1."""
    groups: list[str]
    """Group of each item (template, entity); splits never share a group."""
    label_names: tuple[str, str] = ("0", "1")
    """What labels 0 and 1 mean."""
    description: str = ""
    """One line describing the task."""
    license: str = "unknown"
    """License of the items."""
    source: str = ""
    """Provenance: generator module or file path."""
    default_pooling: str = "last"
    """Pooling that suits the task (``marked`` for token-level tasks)."""
    meta: dict = field(default_factory=dict)
    """Free-form extras (generator seed, counts)."""

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def has_markers(self) -> bool:
        """Whether every item marks a word."""
        return all(MARKER.search(t) for t in self.texts)

    def check(self) -> None:
        """Raise :class:`UserError` unless both classes have enough items for train/val/test."""
        counts = [self.labels.count(0), self.labels.count(1)]
        if min(counts) == 0:
            raise UserError(f"task {self.name} has only one class; a probe needs items of both labels")
        if min(counts) < 3:
            raise UserError(f"task {self.name} has only {min(counts)} item(s) of one class; provide at least 3 per class for train/validation/test")

    def types(self) -> list[str]:
        """Control-task type of each item: the marked word, else the last word (lower case)."""
        out = []
        for text in self.texts:
            found = MARKER.search(text)
            words = re.findall(r"[\w'-]+", found.group(1) if found else text)
            out.append(words[-1].lower() if words else "")
        return out


def strip_marker(text: str, cut: bool = False) -> str:
    """Remove ``[[ ]]``; with ``cut``, also drop everything after the marked word."""
    found = MARKER.search(text)
    if found is None:
        return text
    end = found.start() + len(found.group(1))
    plain = text[: found.start()] + found.group(1) + text[found.end() :]
    return plain[:end] if cut else plain


def _registry() -> dict[str, Callable[[], ProbeTask]]:
    from probes import task_generators as gen

    return {"facts": gen.facts_task, "sentiment": gen.sentiment_task, "pos": gen.pos_task}


def list_tasks() -> list[dict]:
    """The shipped tasks: name, description, items, groups, license, default pooling."""
    rows = []
    for name, make in _registry().items():
        task = make()
        rows.append(
            {
                "name": name,
                "description": task.description,
                "items": len(task),
                "groups": len(set(task.groups)),
                "license": task.license,
                "pooling": task.default_pooling,
            }
        )
    return rows


def load_task(name_or_path: str) -> ProbeTask:
    """A shipped task by name, or a ``.csv``/``.jsonl`` file with columns ``text,label[,group]``."""
    registry = _registry()
    if name_or_path in registry:
        return registry[name_or_path]()
    path = Path(name_or_path)
    if not path.exists():
        raise UserError(f"no task named {name_or_path!r} and no such file{suggest(name_or_path, registry)}; use one of {', '.join(registry)} or a .csv/.jsonl file with columns text,label[,group]")
    if path.is_dir():
        raise UserError(f"{path} is a directory; pass a .csv or .jsonl file with columns text,label[,group]")
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".jsonl", ".json"):
        raise UserError(f"{path} has an unsupported extension {suffix or '(none)'}; use .csv or .jsonl with columns text,label[,group]")
    try:
        content = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise UserError(f"{path} is not UTF-8 text ({err.reason}); save it as UTF-8") from err
    rows = _read_jsonl(path, content) if suffix in (".jsonl", ".json") else _read_csv(path, content)
    return _task_from_rows(path, rows)


def _read_csv(path: Path, content: str) -> list[dict]:
    if not content.strip():
        raise UserError(f"{path} is empty; it needs a header line 'text,label[,group]' and at least two items per class")
    reader = csv.DictReader(content.splitlines())
    fields = [f.strip().lower() for f in (reader.fieldnames or [])]
    missing = [c for c in ("text", "label") if c not in fields]
    if missing:
        raise UserError(f"{path} lacks the column(s) {', '.join(missing)} (found: {', '.join(fields) or 'none'}); the header must be text,label[,group]")
    return [{(k or "").strip().lower(): v for k, v in row.items()} for row in reader]


def _read_jsonl(path: Path, content: str) -> list[dict]:
    rows = []
    for number, line in enumerate(content.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{path} line {number} is not valid JSON ({err.msg}); write one object per line") from err
        if not isinstance(row, dict):
            raise UserError(f"{path} line {number} is not a JSON object; write one {{\"text\": ..., \"label\": ...}} per line")
        rows.append({str(k).lower(): v for k, v in row.items()})
    if not rows:
        raise UserError(f"{path} is empty; it needs one JSON object per line with keys text, label[, group]")
    for number, row in enumerate(rows, 1):
        missing = [c for c in ("text", "label") if c not in row]
        if missing:
            raise UserError(f"{path} item {number} lacks {', '.join(missing)}; every line needs keys text and label (group optional)")
    return rows


def _task_from_rows(path: Path, rows: list[dict]) -> ProbeTask:
    if not rows:
        raise UserError(f"{path} has a header but no items; add at least two items per class")
    texts, raw, groups = [], [], []
    for number, row in enumerate(rows, 1):
        text = row.get("text")
        if not isinstance(text, str) or not text.strip():
            raise UserError(f"{path} item {number} has an empty text; fill it in or remove the item")
        label = row.get("label")
        if label is None or str(label).strip() == "":
            raise UserError(f"{path} item {number} has an empty label; every item needs a label")
        texts.append(text)
        raw.append(str(label).strip().lower() if not isinstance(label, bool) else str(int(label)))
        group = row.get("group")
        groups.append(str(number) if group is None or str(group).strip() == "" else str(group))
    labels, names = _binary_labels(path, raw)
    return ProbeTask(name=str(path), texts=texts, labels=labels, groups=groups, label_names=names, source=str(path),
                     description=f"user task from {path.name}", license="user-provided",
                     default_pooling="marked" if all(MARKER.search(t) for t in texts) else "last")


def _binary_labels(path: Path, raw: list[str]) -> tuple[list[int], tuple[str, str]]:
    distinct = sorted(set(raw))
    if len(distinct) == 1:
        raise UserError(f"{path} has only one class (label {distinct[0]!r}); a probe needs items of two classes")
    if len(distinct) > 2:
        shown = ", ".join(repr(d) for d in distinct[:5])
        raise UserError(f"{path} has {len(distinct)} distinct labels ({shown}{', ...' if len(distinct) > 5 else ''}); a binary probe needs exactly two, e.g. 0/1 or true/false")
    low, high = distinct
    if low in _TRUE and high in _FALSE:
        low, high = high, low
    elif high in _FALSE and low not in _TRUE:
        low, high = high, low
    return [1 if v == high else 0 for v in raw], (low, high)
