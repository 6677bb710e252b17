"""Corpora: default-corpus building (filter, dedup, licenses), splits, local files, HF stand-in, bad inputs, CLI."""

from __future__ import annotations

import json
import sqlite3
import textwrap

import pytest

from interp.corpus import list_corpora, load_corpus
from interp.corpus_build import build_corpus, split_of
from interp.corpus_files import local_documents
from interp.corpus_sources import Source, available_sources, docstring_paragraphs, is_prose, kjv_chapters
from interp.errors import UserError


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    """Every test gets its own empty cache directory."""
    monkeypatch.setenv("INTERP_CACHE", str(tmp_path / "cache"))


def _fake_package(root):
    """A package with a doctest, a code paragraph, an exact and a whitespace-variant duplicate, a test file."""
    (root / "tests").mkdir(parents=True)
    (root / "mod_a.py").write_text(textwrap.dedent('''
        """Module docstring that explains the purpose of this tiny module in plain words.

        >>> do_something(1, 2)
        3
        """

        def f():
            """Return the sum of two numbers, added together in the usual way for integers."""

        class C:
            """A class that holds a value and gives it back when asked to do so politely.

            x = {"a": [1, 2], "b": [3]}; y = x["a"][0] + x["b"][0]  # what it does with a, b
            """
        '''))
    (root / "mod_b.py").write_text(textwrap.dedent('''
        def g():
            """Return the sum of two numbers,   added together
            in the usual way for integers."""

        def h():
            """Too short."""
        '''))
    (root / "tests" / "helpers.py").write_text('"""This file is in a tests directory and must never be read by the builder at all."""\n')
    return Source(name="fake-docstrings", kind="docstrings", root=str(root), license="MIT", version="1.0", url="file://fake")


def _fake_kjv(path):
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE Books(TestamentID INT, BookID INT, ShortName TEXT, LongName TEXT)")
    con.execute("CREATE TABLE Bible(TestamentID INT, BookID INT, ChapterID INT, VerseID INT, Index_ TEXT, IndexTypeID INT, NumParagraphs INT, Passage1 TEXT, Passage2 TEXT)")
    con.execute("INSERT INTO Books VALUES (1, 1, 'Gen', 'The Book of Beginnings')")
    rows = [
        (1, 1, 2, 1, "2:1", 0, 1, "2:1 Second chapter text here.", ""),
        (1, 1, 1, 1, "1:1", 0, 1, "1:1 In the beginning was the word.", ""),
        (1, 1, 1, 2, "1:2", 0, 2, "1:2 And the word was good.", "A new paragraph starts here."),
    ]
    con.executemany("INSERT INTO Bible VALUES (?,?,?,?,?,?,?,?,?)", rows)
    con.commit()
    con.close()
    return Source(name="kjv-bible", kind="kjv-sqlite", root=str(path), license="public domain", version="1.0", url="file://kjv")


def _documents(directory):
    return [json.loads(line) for line in (directory / "documents.jsonl").read_text().splitlines()]


def test_kjv_chapters_strip_verse_numbers_and_keep_paragraphs(tmp_path):
    source = _fake_kjv(tmp_path / "bible.db")
    assert list(kjv_chapters(source["root"])) == [
        "The Book of Beginnings, chapter 1.\n\nIn the beginning was the word. And the word was good.\n\nA new paragraph starts here.",
        "The Book of Beginnings, chapter 2.\n\nSecond chapter text here.",
    ]


def test_prose_filter_by_hand():
    assert is_prose("Return the sum of two numbers, added together in the usual way.")
    assert not is_prose("Too short to keep.")
    assert not is_prose(">>> import numpy as np\n>>> np.zeros(3) gives an array of zeros here")
    assert not is_prose('x = {"a": [1, 2], "b": [3]}; y = x["a"][0] + x["b"][0] and more words here')
    # RST underline lines are dropped before the check; paragraphs are re-flowed onto one line.
    assert docstring_paragraphs("Notes\n-----\nThis function keeps   the order\nof its inputs in every case.") == [
        "Notes This function keeps the order of its inputs in every case."
    ]


def test_build_removes_duplicates_and_code_and_records_licenses(tmp_path):
    sources = [_fake_kjv(tmp_path / "bible.db"), _fake_package(tmp_path / "pkg")]
    meta = build_corpus(sources, tmp_path / "out", workers=1, progress=False)
    docs = _documents(tmp_path / "out")
    texts = {d["text"] for d in docs if d["source"] == "fake-docstrings"}
    assert texts == {
        "Module docstring that explains the purpose of this tiny module in plain words.",
        "Return the sum of two numbers, added together in the usual way for integers.",
        "A class that holds a value and gives it back when asked to do so politely.",
    }
    assert sum(d["source"] == "kjv-bible" for d in docs) == 2
    by_name = {s["name"]: s for s in meta["sources"]}
    assert by_name["fake-docstrings"]["duplicate_paragraphs_removed"] == 1
    assert by_name["fake-docstrings"]["n_documents"] == 3
    assert all(s["license"] and s["version"] and s["url"] for s in meta["sources"])
    assert [d["split"] for d in docs] == [split_of(d["text"]) for d in docs]
    # Mixed order: sorted by content hash, not grouped by source.
    import hashlib

    hashes = [hashlib.sha256(d["text"].encode()).hexdigest() for d in docs]
    assert hashes == sorted(hashes)


def test_parallel_build_equals_serial_build(tmp_path):
    sources = [_fake_kjv(tmp_path / "bible.db"), _fake_package(tmp_path / "pkg")]
    serial = build_corpus(sources, tmp_path / "one", workers=1, progress=False)
    parallel = build_corpus(sources, tmp_path / "two", workers=2, progress=False)
    assert serial["sha256"] == parallel["sha256"]


def test_installed_sources_have_licenses_and_versions():
    sources = available_sources()
    names = [s["name"] for s in sources]
    assert "kjv-bible" in names and "python-stdlib-docstrings" in names
    assert all(s["license"] not in ("", "unknown") and s["version"] for s in sources)
    rows = {row["name"]: row for row in list_corpora()}
    assert set(rows) == {"default", "kjv", "docstrings"}
    assert all(row["licenses"] and row["offline_available"] for row in rows.values())


def test_registered_corpora_from_a_small_build(tmp_path, monkeypatch):
    sources = [_fake_kjv(tmp_path / "bible.db"), _fake_package(tmp_path / "pkg")]
    monkeypatch.setattr("interp.corpus_build.available_sources", lambda: sources)
    everything = list(load_corpus("default", "all").documents())
    kjv = list(load_corpus("kjv", "all").documents())
    docstrings = list(load_corpus("docstrings", "all").documents())
    assert len(everything) == 5 and sorted(everything) == sorted(kjv + docstrings)
    assert [s["name"] for s in load_corpus("kjv").sources] == ["kjv-bible"]
    assert load_corpus("default").fingerprint != load_corpus("default", "eval").fingerprint != load_corpus("kjv").fingerprint


def test_splits_are_disjoint_deterministic_and_about_two_percent(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": f"document number {i} with some words"}) + "\n" for i in range(5000)))
    train = list(load_corpus(str(path), "train").documents())
    evaluation = list(load_corpus(str(path), "eval").documents())
    assert not set(train) & set(evaluation)
    assert sorted(train + evaluation) == sorted(load_corpus(str(path), "all").documents())
    assert evaluation == list(load_corpus(str(path), "eval").documents())
    # 2 % of 5000 = 100; a binomial standard deviation is ~10, so 60..140 is a > 4 sigma band.
    assert 60 <= len(evaluation) <= 140


def test_local_txt_jsonl_parquet(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("First doc line one\nline two\n\n\n   \nSecond doc\n\nThird\n")
    assert list(local_documents(txt)) == ["First doc line one\nline two", "Second doc", "Third"]
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text('{"text": "one", "id": 1}\n\n{"text": "two"}\n{"text": "  "}\n')
    assert list(local_documents(jsonl)) == ["one", "two"]
    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet = tmp_path / "a.parquet"
    pq.write_table(pa.table({"text": ["alpha", None, "beta", ""], "n": [1, 2, 3, 4]}), parquet, row_group_size=2)
    assert list(local_documents(parquet)) == ["alpha", "beta"]
    corpus = load_corpus(str(txt), "all")
    assert corpus.sources[0]["license"] == "user-provided" and len(corpus.fingerprint) == 64


@pytest.mark.parametrize(
    ("name", "content", "needle"),
    [
        ("missing.txt", None, "does not exist"),
        ("empty.txt", "", "is empty"),
        ("blank.txt", "\n  \n\n", "no text documents"),
        ("notext.jsonl", '{"body": "x"}\n', "no string 'text' field"),
        ("bad.jsonl", '{"text": "ok"}\n{oops\n', "line 2"),
        ("table.csv", "text\nx\n", "unsupported type"),
    ],
)
def test_bad_local_files(tmp_path, name, content, needle):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(UserError, match=needle) as err:
        list(load_corpus(str(path), "all").documents())
    assert "\n" not in str(err.value)


def test_bad_names_parquet_and_offline_hub(tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet = tmp_path / "t.parquet"
    pq.write_table(pa.table({"body": ["x"]}), parquet)
    with pytest.raises(UserError, match="no 'text' column .*body"):
        load_corpus(str(parquet))
    with pytest.raises(UserError, match="did you mean: default"):
        load_corpus("defualt")
    with pytest.raises(UserError, match="unknown split"):
        load_corpus("default", "test")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="hub access is off"):
        load_corpus("hf:someone/some-dataset")
    with pytest.raises(UserError, match="neither a registered name nor an existing file"):
        load_corpus("data/my-corpus")


def test_cli_lists_and_shows_corpora(tmp_path):
    from typer.testing import CliRunner

    from experiments.cli import app

    listed = CliRunner().invoke(app, ["corpora", "--json"])
    assert listed.exit_code == 0, listed.output
    assert [row["name"] for row in json.loads(listed.stdout)] == ["default", "kjv", "docstrings"]
    table = CliRunner().invoke(app, ["corpora"])
    assert table.exit_code == 0 and "PSF-2.0" in table.stdout and "kjv" in table.stdout
    path = tmp_path / "docs.txt"
    path.write_text("one two\n\nthree\n\nfour five six\n")
    shown = CliRunner().invoke(app, ["corpora", "--show", str(path), "--split", "all", "--json"])
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.stdout)["n_documents"] == 3 and json.loads(shown.stdout)["n_chars"] == 7 + 5 + 13


@pytest.mark.parametrize("args", [["--show", "missing.txt"], ["--show", "default", "--split", "dev"], ["--show", "defualt"]])
def test_cli_bad_input_is_one_line(args):
    from typer.testing import CliRunner

    from experiments.cli import app

    result = CliRunner().invoke(app, ["corpora", *args])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error:"), result.stderr


def test_hf_dataset_reader_with_a_stand_in_hub(monkeypatch):
    """The online path, with the hub and datasets replaced by stand-ins (tests run offline)."""
    import sys
    import types

    import huggingface_hub

    calls = {}

    class FakeApi:
        def dataset_info(self, repo):
            calls["repo"] = repo
            card = types.SimpleNamespace(to_dict=lambda: {"license": "cc-by-4.0"})
            return types.SimpleNamespace(sha="abc123", card_data=card)

    def load_dataset(repo, config, split, streaming, revision):
        calls["args"] = (repo, config, split, streaming, revision)
        return iter([{"text": "first row"}, {"text": ""}, {"text": "second row"}])

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    corpus = load_corpus("hf:owner/name:en", "all")
    assert list(corpus.documents()) == ["first row", "second row"]
    assert calls == {"repo": "owner/name", "args": ("owner/name", "en", "train", True, "abc123")}
    assert corpus.sources[0]["license"] == "cc-by-4.0" and corpus.sources[0]["version"] == "abc123"
    assert load_corpus("owner/name", "all").fingerprint != corpus.fingerprint  # config is part of the identity
