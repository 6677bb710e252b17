"""Pooled activation collection vs run_with_cache and hand pooling, with padding."""

from __future__ import annotations

import pytest
import torch

from interp.errors import UserError
from probes.collect import collect_activations, resid_post_hooks

TEXTS = ["The cat sat on the mat and looked around.", "Hi", "The [[walk]] was long.", "One two three four five."]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _reference(model, text: str, hook: str) -> torch.Tensor:
    _, cache = model.run_with_cache(model.to_tokens(text), names_filter=[hook])
    return cache[hook][0]


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_pooling_equals_hand_computation_on_unpadded_items(tiny_model, pooling):
    hooks = resid_post_hooks(tiny_model)
    # batch_size 3 puts items of different lengths in one right-padded batch.
    acts = collect_activations(tiny_model, TEXTS, hooks, pooling=pooling, batch_size=3, progress=False)
    for i, text in enumerate(TEXTS):
        plain = text.replace("[[", "").replace("]]", "")
        for hook in hooks:
            ref = _reference(tiny_model, plain, hook)
            # mean excludes BOS at position 0
            expected = ref[-1] if pooling == "last" else ref[1:].mean(0)
            torch.testing.assert_close(acts[hook][i], expected, atol=1e-5, rtol=1e-5)


def test_other_hooks_in_one_pass_equal_run_with_cache(tiny_model):
    hooks = ["blocks.0.hook_resid_pre", "blocks.0.hook_mlp_out", "blocks.1.hook_resid_post"]
    acts = collect_activations(tiny_model, TEXTS, hooks, pooling="last", batch_size=4, progress=False)
    for i, text in enumerate(TEXTS):
        tokens = tiny_model.to_tokens(text.replace("[[", "").replace("]]", ""))
        _, cache = tiny_model.run_with_cache(tokens)
        for hook in hooks:
            key = "blocks.0.hook_in" if hook == "blocks.0.hook_resid_pre" and hook not in cache else hook
            torch.testing.assert_close(acts[hook][i], cache[key][0, -1], atol=1e-5, rtol=1e-5)


def test_marked_pooling_reads_the_last_token_of_the_marked_word(tiny_model):
    acts = collect_activations(tiny_model, ["The [[walk]] was long.", "They will [[walk]] soon."], pooling="marked", progress=False)
    hook = "blocks.1.hook_resid_post"
    tokens = tiny_model.to_tokens("The walk was long.")[0]
    prefix = tiny_model.to_tokens("The walk")[0]
    assert torch.equal(tokens[: len(prefix)], prefix)  # the cut keeps the full-text tokenisation
    torch.testing.assert_close(acts[hook][0], _reference(tiny_model, "The walk was long.", hook)[len(prefix) - 1], atol=1e-5, rtol=1e-5)


def test_token_tensor_items_and_order_is_preserved(tiny_model):
    g = torch.Generator().manual_seed(0)
    items = [torch.randint(3, 500, (n,), generator=g) for n in (5, 9, 2, 7)]
    acts = collect_activations(tiny_model, items, ["blocks.1.hook_resid_post"], pooling="mean", batch_size=2, progress=False)
    for i, toks in enumerate(items):
        _, cache = tiny_model.run_with_cache(toks[None])
        torch.testing.assert_close(acts["blocks.1.hook_resid_post"][i], cache["blocks.1.hook_resid_post"][0].mean(0), atol=1e-5, rtol=1e-5)


def test_bad_inputs(tiny_model):
    with pytest.raises(UserError, match="out of range"):
        resid_post_hooks(tiny_model, [0, 7])
    with pytest.raises(UserError, match="unknown hook"):
        collect_activations(tiny_model, TEXTS, ["blocks.0.hook_resid_pots"], progress=False)
    with pytest.raises(UserError, match="unknown pooling"):
        collect_activations(tiny_model, TEXTS, pooling="max", progress=False)
    with pytest.raises(UserError, match="item 1 has none"):
        collect_activations(tiny_model, TEXTS, pooling="marked", progress=False)
