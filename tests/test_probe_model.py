"""Probes on the real SmolLM2-135M (marked `model`: a few hundred short items, a few layers)."""

from __future__ import annotations

import pytest
import torch

from probes.collect import collect_activations
from probes.sweep import ProbeConfig, run_probe
from probes.tasks import ProbeTask, load_task

pytestmark = pytest.mark.model


def test_padded_batches_equal_one_by_one_on_the_real_model(smollm2):
    texts = ["The capital of France is Paris.", "Hi", "I regret buying this toaster; it is flimsy.", "The [[walk]] was long."]
    hooks = ["blocks.0.hook_resid_post", "blocks.8.hook_resid_post"]
    for pooling in ("last", "mean"):
        batched = collect_activations(smollm2, texts, hooks, pooling=pooling, batch_size=4, progress=False)
        single = collect_activations(smollm2, texts, hooks, pooling=pooling, batch_size=1, progress=False)
        for hook in hooks:
            torch.testing.assert_close(batched[hook], single[hook], atol=1e-3, rtol=1e-4)


def test_sentiment_is_linearly_readable_in_the_middle_layers(smollm2):
    full = load_task("sentiment")
    keep = [i for i, g in enumerate(full.groups) if g in sorted(set(full.groups))[:10]]
    task = ProbeTask(name="sentiment-subset", texts=[full.texts[i] for i in keep], labels=[full.labels[i] for i in keep],
                     groups=[full.groups[i] for i in keep])
    report = run_probe(smollm2, task, ProbeConfig(layers=[2, 12], l2=(1e-2, 1e-1), batch_size=32), progress=False)
    best = max(report.metrics["layers"], key=lambda r: r["accuracy"])
    assert best["accuracy"] >= 0.85 and best["auroc"] >= 0.9
    assert all(r["shuffled_accuracy"] <= 0.75 for r in report.metrics["layers"])
