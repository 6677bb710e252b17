"""Probe metrics vs scikit-learn; split and control-task hygiene."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from interp.errors import UserError
from probes.metrics import accuracy, auroc, balanced_accuracy, control_labels, f1_score, group_split, shuffled_labels

metrics = pytest.importorskip("sklearn.metrics")


def test_metrics_match_sklearn_batched_and_with_ties():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 2, (97,), generator=g)
    scores = torch.randn(3, 97, generator=g)
    scores[1] = torch.round(scores[1])  # many ties
    scores[2] = torch.where(labels.bool(), 1.0, -1.0) * 0.5 + torch.randn(97, generator=g)
    acc, bal, f1, area = accuracy(scores, labels), balanced_accuracy(scores, labels), f1_score(scores, labels), auroc(scores, labels)
    assert acc.shape == bal.shape == f1.shape == area.shape == (3,)
    y = labels.numpy()
    for i in range(3):
        pred = (scores[i] > 0).long().numpy()
        assert float(acc[i]) == pytest.approx(metrics.accuracy_score(y, pred))
        assert float(bal[i]) == pytest.approx(metrics.balanced_accuracy_score(y, pred))
        assert float(f1[i]) == pytest.approx(metrics.f1_score(y, pred))
        assert float(area[i]) == pytest.approx(metrics.roc_auc_score(y, scores[i].numpy()), abs=1e-6)


def test_auroc_needs_both_classes():
    with pytest.raises(UserError):
        auroc(torch.randn(5), torch.ones(5, dtype=torch.long))


def test_group_split_is_group_disjoint_and_stratified():
    rng = np.random.default_rng(0)
    groups, labels = [], []
    for g in range(60):
        size = int(rng.integers(5, 30))
        p = 0.2 if g % 3 == 0 else 0.7  # groups differ in class balance
        labels += [int(v) for v in rng.random(size) < p]
        groups += [f"g{g}"] * size
    labels_t = torch.tensor(labels)
    split = group_split(labels_t, groups, (0.6, 0.2, 0.2), seed=1)
    parts = [split.train, split.val, split.test]
    everything = torch.cat(parts)
    assert sorted(everything.tolist()) == list(range(len(labels)))
    sets = [{groups[i] for i in part.tolist()} for part in parts]
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
    overall = labels_t.float().mean()
    for part, fraction in zip(parts, (0.6, 0.2, 0.2)):
        assert abs(len(part) / len(labels) - fraction) < 0.05
        assert abs(float(labels_t[part].float().mean()) - float(overall)) < 0.05
    assert group_split(labels_t, groups, seed=1).test.tolist() == split.test.tolist()


def test_group_split_refuses_too_few_groups():
    with pytest.raises(UserError, match="at least 3 groups"):
        group_split(torch.tensor([0, 1, 0, 1]), ["a", "a", "b", "b"])


def test_control_labels_are_fixed_per_type_and_balanced_over_types():
    types = ["cat", "dog", "cat", "run", "walk", "dog", "run", "sky"] * 3
    control = control_labels(types, seed=4)
    by_type: dict[str, set[int]] = {}
    for t, c in zip(types, control.tolist()):
        by_type.setdefault(t, set()).add(c)
    assert all(len(v) == 1 for v in by_type.values())
    assert sorted(Counter(next(iter(v)) for v in by_type.values()).values()) == [2, 3]
    assert control.tolist() == control_labels(types, seed=4).tolist()


def test_shuffled_labels_are_a_permutation():
    labels = torch.tensor([0, 1, 1, 0, 1, 1, 1, 0, 0, 1])
    shuffled = shuffled_labels(labels, seed=2)
    assert sorted(shuffled.tolist()) == sorted(labels.tolist())
    assert shuffled.tolist() != labels.tolist()
