"""Downstream cross-entropy with an SAE spliced into the forward pass, and with the hook ablated.

For a batch of windows the clean forward pass captures ``x`` at the SAE's hook and returns the
clean logits; two more hooked full passes replace the hook's output with the SAE reconstruction
``x_hat`` and with zero at the non-special positions. (Resuming from block ``L + 1`` with
``start_at_layer`` would look cheaper, but for Hugging Face-backed bridges TransformerLens 4.3
still runs blocks ``0..L`` and discards them: measured at 0.92x the CPU time of a full pass.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from saes.sources import autocast, model_device

__all__ = ["Splicer", "next_token_logprobs", "next_token_terms"]


def next_token_logprobs(logits: Float[Tensor, "batch ctx vocab"], target_mask: Bool[Tensor, "batch ctx_minus_1"]) -> Float[Tensor, "m vocab"]:
    """Float32 log-softmax of the predictions at positions ``t`` (of token ``t + 1``) where ``target_mask`` holds."""
    return logits[:, :-1][target_mask.to(logits.device)].float().log_softmax(-1)


def next_token_terms(clean_lp: Float[Tensor, "m vocab"], lp: Float[Tensor, "m vocab"] | None, targets: Int[Tensor, " m"]) -> tuple[Tensor, Tensor]:
    """Summed cross-entropy of ``lp`` (or of ``clean_lp`` when ``lp`` is None) and summed ``KL(clean || lp)``.

    ``CE = -sum_m lp[m, targets[m]]`` and ``KL = sum_m sum_v p_clean(v) (log p_clean(v) - log p(v))``
    (zero when ``lp`` is None). Sums are float64 so that millions of tokens add up exactly enough.
    """
    targets = targets.to(clean_lp.device).unsqueeze(-1)
    if lp is None:
        return -clean_lp.gather(-1, targets).double().sum(), torch.zeros((), dtype=torch.float64)
    kl = (clean_lp.exp() * (clean_lp - lp)).sum(-1)
    return -lp.gather(-1, targets).double().sum(), kl.double().sum()


class Splicer:
    """Runs the clean pass (capturing the hook) and the passes with the hook's value replaced."""

    def __init__(self, model: Any, hook_name: str):
        """Prepare to splice at ``hook_name`` of ``model``."""
        self.model = model
        self.hook_name = hook_name

    def clean(self, tokens: Int[Tensor, "batch ctx"]) -> tuple[Float[Tensor, "batch ctx vocab"], Float[Tensor, "batch ctx d_in"]]:
        """Clean logits and the activations ``x`` captured at the hook (float32)."""
        captured: dict[str, Tensor] = {}

        def capture(act: Tensor, hook: Any) -> None:
            captured["x"] = act.detach()

        device = model_device(self.model)
        with torch.inference_mode(), autocast(device):
            logits = self.model.run_with_hooks(tokens.to(device), fwd_hooks=[(self.hook_name, capture)])
        return logits, captured["x"].float()

    def replaced(self, tokens: Int[Tensor, "batch ctx"], x_new: Float[Tensor, "batch ctx d_in"]) -> Float[Tensor, "batch ctx vocab"]:
        """Logits with the hook's output replaced by ``x_new`` everywhere."""
        device = model_device(self.model)
        with torch.inference_mode(), autocast(device):
            return self.model.run_with_hooks(tokens.to(device), fwd_hooks=[(self.hook_name, _replace_with(x_new))])


def _replace_with(x_new: Tensor) -> Callable[[Tensor, Any], Tensor]:
    def hook_fn(act: Tensor, hook: Any) -> Tensor:
        return x_new.to(device=act.device, dtype=act.dtype)

    return hook_fn
