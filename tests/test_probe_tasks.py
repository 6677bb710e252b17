"""Shipped task generators and the user-file loader."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from interp.errors import UserError
from probes.tasks import MARKER, list_tasks, load_task, strip_marker

SHIPPED = ["facts", "sentiment", "pos"]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_tasks_are_deterministic_balanced_and_grouped(name):
    task = load_task(name)
    again = load_task(name)
    assert task.texts == again.texts and task.labels == again.labels and task.groups == again.groups
    assert len(task) >= 1000
    assert Counter(task.labels) == Counter({0: len(task) // 2, 1: len(task) // 2})
    assert len(set(task.groups)) >= 30
    assert len(set(task.texts)) == len(task)
    assert "Apache-2.0" in task.license
    # Every group holds both classes except where the group is the label-defining frame (pos).
    if name != "pos":
        per_group = {g: {l for g2, l in zip(task.groups, task.labels) if g2 == g} for g in set(task.groups)}
        assert all(v == {0, 1} for v in per_group.values())


def test_pos_task_marks_one_word_that_occurs_in_both_classes():
    task = load_task("pos")
    assert task.default_pooling == "marked" and task.has_markers
    words = {}
    for text, label in zip(task.texts, task.labels):
        assert len(MARKER.findall(text)) == 1
        words.setdefault(MARKER.search(text).group(1), set()).add(label)
    assert all(v == {0, 1} for v in words.values())
    assert task.types()[0] == MARKER.search(task.texts[0]).group(1).lower()


def test_facts_are_true_where_labelled_true():
    task = load_task("facts")
    assert task.labels[task.texts.index("The capital of France is Paris.")] == 1
    assert task.labels[task.texts.index("Adding two and three gives five.")] == 1
    false_sums = [t for t, l in zip(task.texts, task.labels) if l == 0 and t.startswith("Adding two and three gives")]
    assert false_sums and "five" not in false_sums[0]


def test_strip_marker():
    assert strip_marker("The [[walk]] was long.") == "The walk was long."
    assert strip_marker("The [[walk]] was long.", cut=True) == "The walk"
    assert strip_marker("no mark", cut=True) == "no mark"


def test_list_tasks_reports_counts():
    rows = {r["name"]: r for r in list_tasks()}
    assert set(rows) == set(SHIPPED)
    assert rows["pos"]["groups"] == len(set(load_task("pos").groups))


def test_csv_and_jsonl_loaders(tmp_path):
    csv_file = tmp_path / "t.csv"
    csv_file.write_text("Text,Label,group\nhello there,positive,a\nawful day,negative,b\nnice,positive,\n")
    task = load_task(str(csv_file))
    assert task.labels == [1, 0, 1] and task.label_names == ("negative", "positive")
    assert task.groups == ["a", "b", "3"]
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in [{"text": "a", "label": True}, {"text": "b", "label": False}]) + "\n")
    task = load_task(str(jsonl))
    assert task.labels == [1, 0] and task.label_names == ("0", "1")


@pytest.mark.parametrize(
    "content, suffix, message",
    [
        ("", ".csv", "is empty"),
        ("text,label\n", ".csv", "no items"),
        ("text,label\na,1\nb,1\n", ".csv", "only one class"),
        ("sentence,label\na,1\nb,0\n", ".csv", "lacks the column"),
        ("text,label\na,1\nb,0\nc,2\n", ".csv", "3 distinct labels"),
        ("text,label\n,1\nb,0\n", ".csv", "empty text"),
        ('{"text": "a"}\n', ".jsonl", "lacks label"),
        ("{not json\n", ".jsonl", "not valid JSON"),
        ("a,b", ".txt", "unsupported extension"),
    ],
)
def test_bad_task_files_raise_one_line_user_errors(tmp_path, content, suffix, message):
    path = tmp_path / f"task{suffix}"
    path.write_text(content)
    with pytest.raises(UserError, match=message) as err:
        load_task(str(path))
    assert "\n" not in str(err.value)


def test_unknown_task_name_suggests():
    with pytest.raises(UserError, match="did you mean: facts"):
        load_task("fact")
