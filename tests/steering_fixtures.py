"""Shared stand-ins for the steering and generation tests: a tiny HF Llama bridge and a TopK SAE."""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn


@functools.lru_cache(maxsize=1)
def tiny_llama():
    """A 2-layer random Llama (rotary, GQA, KV cache) wrapped in a TransformerBridge, with SmolLM2's tokenizer."""
    from transformer_lens import TransformerBridge
    from transformers import LlamaConfig, LlamaForCausalLM

    from interp.models import load_tokenizer

    tokenizer = load_tokenizer("tiny-random")
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    hf = LlamaForCausalLM(cfg).eval()
    # Larger random embeddings make the toy model's logits depend more on its input, so that
    # steering visibly changes greedy continuations.
    with torch.no_grad():
        hf.model.embed_tokens.weight.mul_(20.0)
    model = TransformerBridge.boot_transformers("tiny-llama", hf_model=hf, tokenizer=tokenizer, device="cpu")
    model.eval()
    return model


class ToyTopKSAE(nn.Module):
    """A TopK SAE (Gao et al. 2024) implementing interp.FeatureDictionary, random weights."""

    def __init__(self, d_in: int, n_latents: int, k: int, hook_name: str, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.W_enc = nn.Parameter(torch.randn(d_in, n_latents, generator=g) / d_in**0.5)
        self.b_enc = nn.Parameter(torch.zeros(n_latents))
        self.W_dec = nn.Parameter(torch.randn(n_latents, d_in, generator=g) / d_in**0.5)
        self.b_dec = nn.Parameter(torch.randn(d_in, generator=g) * 0.1)
        self.k = k
        self.hook_name = hook_name
        self.max_activations: Tensor | None = None

    def encode(self, x: Tensor) -> Tensor:
        pre = torch.relu((x - self.b_dec) @ self.W_enc + self.b_enc)
        top = pre.topk(self.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, top.indices, top.values)

    def decode(self, f: Tensor) -> Tensor:
        return f @ self.W_dec + self.b_dec

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))


def acts_at(model, tokens: Tensor, hook: str, attention_mask: Tensor | None = None) -> Tensor:
    """The activation at ``hook`` for a batch of token ids (whatever hooks are active)."""
    seen: list[Tensor] = []

    def keep(x: Tensor, hook) -> Tensor:
        seen.append(x.detach().clone())
        return x

    kwargs = {} if attention_mask is None else {"attention_mask": attention_mask}
    with torch.inference_mode(), model.hooks(fwd_hooks=[(hook, keep)]):
        model(tokens, **kwargs)
    return seen[-1]
