"""Probe metrics (batched over layers × penalties) and the hygiene around them.

Metrics take ``scores [..., n]`` (positive predicts label 1) and ``labels [n]`` in {0, 1} and
return one value per leading index, so a whole layer curve is scored in one call.

Hygiene follows Hewitt & Liang (2019, "Designing and Interpreting Probes with Control Tasks"):
a control task gives every item *type* (e.g. the probed word) a random but fixed label;
selectivity = task accuracy − control accuracy. A shuffled-label baseline permutes the labels.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from interp.errors import UserError

__all__ = [
    "accuracy",
    "balanced_accuracy",
    "f1_score",
    "auroc",
    "Split",
    "group_split",
    "control_labels",
    "shuffled_labels",
]


def _predictions(scores: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    return (scores > 0).float(), labels.to(scores.device).float().expand_as(scores)


def accuracy(scores: Float[Tensor, "... n"], labels: Int[Tensor, " n"]) -> Float[Tensor, "..."]:
    """Fraction of items whose sign of score matches the label."""
    pred, y = _predictions(scores, labels)
    return (pred == y).float().mean(-1)


def balanced_accuracy(scores: Float[Tensor, "... n"], labels: Int[Tensor, " n"]) -> Float[Tensor, "..."]:
    """Mean of the per-class recalls (sklearn's ``balanced_accuracy_score`` for two classes)."""
    pred, y = _predictions(scores, labels)
    tpr = (pred * y).sum(-1) / y.sum(-1).clamp_min(1)
    tnr = ((1 - pred) * (1 - y)).sum(-1) / (1 - y).sum(-1).clamp_min(1)
    return (tpr + tnr) / 2


def f1_score(scores: Float[Tensor, "... n"], labels: Int[Tensor, " n"]) -> Float[Tensor, "..."]:
    """F1 of class 1: ``2·TP / (2·TP + FP + FN)`` (0 when there are no positives at all)."""
    pred, y = _predictions(scores, labels)
    tp = (pred * y).sum(-1)
    denom = 2 * tp + (pred * (1 - y)).sum(-1) + ((1 - pred) * y).sum(-1)
    return torch.where(denom > 0, 2 * tp / denom.clamp_min(1), torch.zeros_like(tp))


def auroc(scores: Float[Tensor, "... n"], labels: Int[Tensor, " n"], chunk: int = 256) -> Float[Tensor, "..."]:
    """Area under the ROC curve = P(score of a positive > score of a negative), ties count ½.

    The Mann–Whitney form, computed exactly over all positive–negative pairs (chunked).
    """
    y = labels.to(scores.device).bool()
    pos, neg = scores[..., y], scores[..., ~y]
    if pos.shape[-1] == 0 or neg.shape[-1] == 0:
        raise UserError("AUROC needs items of both classes in the evaluation split; use more items or other groups")
    total = torch.zeros(scores.shape[:-1], device=scores.device, dtype=torch.float64)
    for start in range(0, pos.shape[-1], chunk):
        diff = pos[..., start : start + chunk, None] - neg[..., None, :]
        total += ((diff > 0).double() + 0.5 * (diff == 0).double()).sum((-1, -2))
    return (total / (pos.shape[-1] * neg.shape[-1])).to(scores.dtype)


@dataclass
class Split:
    """Item indices of a group-disjoint, label-stratified train/validation/test split."""

    train: Tensor
    """Indices of training items."""
    val: Tensor
    """Indices of validation items (early stopping, choice of penalty)."""
    test: Tensor
    """Indices of held-out test items (reported metrics)."""


def group_split(
    labels: Int[Tensor, " n"], groups: list[str] | None = None, fractions: tuple[float, float, float] = (0.6, 0.2, 0.2), seed: int = 0
) -> Split:
    """Assign whole groups to train/val/test so each split gets ~``fractions`` of every class.

    Groups are visited largest first (ties in a seeded random order) and each goes to the split
    with the largest relative shortfall for the classes it contains. Without ``groups`` every
    item is its own group.
    """
    labels_list = [int(v) for v in labels.tolist()]
    groups = [str(i) for i in range(len(labels_list))] if groups is None else [str(g) for g in groups]
    members: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    if len(members) < 3:
        raise UserError(f"a group-disjoint train/val/test split needs at least 3 groups, got {len(members)}; add a 'group' column with more distinct values or drop it")
    class_totals = Counter(labels_list)
    target = [{c: f * class_totals[c] for c in class_totals} for f in fractions]
    current = [Counter() for _ in fractions]
    order = list(members)
    random.Random(seed).shuffle(order)
    order.sort(key=lambda g: -len(members[g]))
    assigned: list[list[int]] = [[] for _ in fractions]
    for g in order:
        counts = Counter(labels_list[i] for i in members[g])
        need = [sum(k * (target[s][c] - current[s][c]) / max(target[s][c], 1e-9) for c, k in counts.items()) for s in range(len(fractions))]
        best = max(range(len(fractions)), key=lambda s: (need[s], -s))
        assigned[best].extend(members[g])
        current[best].update(counts)
    for name, idx in zip(("train", "validation", "test"), assigned):
        if len({labels_list[i] for i in idx}) < 2:
            raise UserError(f"the {name} split has items of only one class; provide more groups (each with both labels if possible)")
    return Split(*(torch.tensor(sorted(idx), dtype=torch.long) for idx in assigned))


def control_labels(types: list[str], seed: int = 0) -> Int[Tensor, " n"]:
    """Hewitt & Liang control task: each distinct type gets a fixed random label (half of types each)."""
    distinct = sorted(set(types))
    random.Random(seed).shuffle(distinct)
    label_of = {t: i % 2 for i, t in enumerate(distinct)}
    return torch.tensor([label_of[t] for t in types], dtype=torch.long)


def shuffled_labels(labels: Int[Tensor, " n"], seed: int = 0) -> Int[Tensor, " n"]:
    """The labels in a seeded random order (the shuffled-label baseline)."""
    perm = torch.randperm(labels.numel(), generator=torch.Generator().manual_seed(seed))
    return labels[perm]
