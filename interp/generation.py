"""Batched, seeded text generation with a KV cache, steered or not.

Why our own loop: TransformerBridge.generate (TL 4.3) does fire hooks on every step, left-pads
batches and derives position ids from the mask, but it gives hooks no way to know which
positions are prompt and which generated, samples from the global RNG (so a row's sample
depends on its batch neighbours) and cannot return unsteered continuations from the same seed.
This loop calls the bridge's forward with an explicit attention mask, explicit position ids
(``cumsum(mask) - 1``, the real-token index, so rotary positions ignore padding) and the HF
``past_key_values``; models without a KV cache (TL-native ones) recompute the whole sequence.
Each prompt samples from its own generator seeded with ``seed + prompt index``, so a prompt's
continuation does not depend on the batch it lands in.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from interp.errors import UserError
from interp.models import model_device
from interp.steering import Intervention, prompt_lengths, steered

__all__ = ["generate", "Generations", "encode_prompts", "supports_kv_cache"]


@dataclass
class Generations:
    """Continuations of a list of prompts (and, with ``compare=True``, the unsteered ones)."""

    prompts: list[str]
    """The prompts as given (before any chat template)."""
    prompt_tokens: list[Tensor]
    """Token ids fed to the model for each prompt (BOS / chat template included)."""
    tokens: list[Tensor]
    """Generated token ids per prompt (stops after EOS, which is kept)."""
    texts: list[str]
    """Decoded continuations (special tokens skipped)."""
    logits: list[Tensor] | None = None
    """Per prompt ``[n_generated, d_vocab]`` logits that produced each token, if asked for."""
    base_tokens: list[Tensor] | None = None
    """Unsteered continuations from the same seeds (``compare=True``)."""
    base_texts: list[str] | None = None
    """Decoded unsteered continuations (``compare=True``)."""
    base_logits: list[Tensor] | None = None
    """Unsteered logits (``compare=True`` and ``return_logits=True``)."""


def encode_prompts(model: Any, prompts: Sequence[str | Tensor], chat: bool = False) -> list[Int[Tensor, " n"]]:
    """Token ids per prompt: strings get BOS (or, with ``chat``, the chat template); tensors pass through."""
    out = []
    for prompt in prompts:
        if isinstance(prompt, Tensor):
            out.append(prompt.reshape(-1).long().cpu())
            continue
        if getattr(model, "tokenizer", None) is None:
            raise UserError("this model has no tokenizer; pass prompts as token-id tensors")
        if chat:
            from interp.models import format_prompt

            # format_prompt drops the template's leading BOS because to_tokens adds it back.
            prompt = format_prompt(model, prompt, chat=True)
        out.append(model.to_tokens(prompt)[0].cpu())
    return out


def supports_kv_cache(model: Any) -> bool:
    """Whether the wrapped model is a transformers model that takes ``past_key_values``."""
    from transformers import PreTrainedModel

    return isinstance(getattr(model, "original_model", None), PreTrainedModel)


def _nucleus(logp: Float[Tensor, " vocab"], top_p: float) -> Float[Tensor, " vocab"]:
    """Keep the smallest set of most likely tokens whose mass reaches ``top_p`` (Holtzman et al. 2020)."""
    k = min(256, logp.numel())
    while True:
        top = logp.topk(k)
        mass = top.values.exp().cumsum(-1)
        if mass[-1] >= top_p or k == logp.numel():
            break
        k = logp.numel()  # a wide nucleus: sort everything once
    # a token is kept when the mass before it is still below top_p (so the first is always kept)
    keep = (mass - top.values.exp()) < top_p
    out = torch.full_like(logp, float("-inf"))
    out[top.indices[keep]] = logp[top.indices[keep]]
    return out


def _pick(logits: Float[Tensor, " vocab"], temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """Greedy when temperature is 0, else a sample at ``temperature`` from the top-p nucleus.

    Sampling uses the Gumbel-max trick, argmax(log p + G) with G ~ Gumbel(0, 1), which draws
    exactly from p and needs only one uniform draw per token from the row's own generator.
    """
    if temperature <= 0:
        return int(logits.argmax())
    logp = torch.log_softmax(logits.float().cpu() / temperature, dim=-1)
    if top_p < 1.0:
        logp = _nucleus(logp, top_p)
    uniform = torch.rand(logp.shape, generator=generator).clamp_(1e-20, 1.0)
    return int((logp - torch.log(-torch.log(uniform))).argmax())


def _run_batch(model: Any, prompts: list[Tensor], first_index: int, max_new_tokens: int, temperature: float, top_p: float, seed: int, use_kv_cache: bool, return_logits: bool, eos_id: int | None) -> tuple[list[Tensor], list[Tensor] | None]:
    """Generate for one batch of token prompts (left-padded); returns new tokens (and logits) per row."""
    device = model_device(model)
    batch = len(prompts)
    lengths = torch.tensor([len(p) for p in prompts])
    width = int(lengths.max())
    ids = torch.zeros(batch, width, dtype=torch.long)
    mask = torch.zeros(batch, width, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = p
        mask[row, width - len(p) :] = 1
    ids, mask = ids.to(device), mask.to(device)
    generators = [torch.Generator().manual_seed(seed + first_index + row) for row in range(batch)] if temperature > 0 else [None] * batch
    new_tokens: list[list[int]] = [[] for _ in range(batch)]
    kept_logits: list[list[Tensor]] = [[] for _ in range(batch)]
    done = torch.zeros(batch, dtype=torch.bool)

    def positions(m: Tensor) -> Tensor:
        return (m.cumsum(-1) - 1).clamp_min(0)

    # No bf16 autocast here, unlike harvest: under autocast an fp32 model's additive attention mask
    # (finfo(float32).min) overflows to -inf in bf16, fully masked pad rows turn to NaN, and the NaN
    # reaches every row through the next layer's attention (seen on an H100). The model's own dtype
    # is safe: load it with dtype="bfloat16" for bf16 generation.
    with torch.inference_mode(), prompt_lengths(model, lengths.to(device)):
        past = None
        if use_kv_cache:
            logits, past = model(ids, attention_mask=mask, position_ids=positions(mask), return_type="logits_and_cache", use_cache=True)
        else:
            logits = model(ids, attention_mask=mask, position_ids=positions(mask))
        for step in range(max_new_tokens):
            last = logits[:, -1].float()
            picked = []
            for row in range(batch):
                tok = int(eos_id if done[row] and eos_id is not None else _pick(last[row], temperature, top_p, generators[row]))
                if not done[row]:
                    new_tokens[row].append(tok)
                    if return_logits:
                        kept_logits[row].append(last[row].cpu())
                    done[row] = eos_id is not None and tok == eos_id
                picked.append(tok)
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            nxt = torch.tensor(picked, dtype=torch.long, device=device)[:, None]
            ids = torch.cat([ids, nxt], dim=1)
            mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
            if use_kv_cache:
                logits, past = model(nxt, attention_mask=mask, position_ids=positions(mask)[:, -1:], past_key_values=past, return_type="logits_and_cache")
            else:
                logits = model(ids, attention_mask=mask, position_ids=positions(mask))
    toks = [torch.tensor(t, dtype=torch.long) for t in new_tokens]
    return toks, ([torch.stack(k) if k else torch.empty(0) for k in kept_logits] if return_logits else None)


def _decode(model: Any, tokens: Tensor) -> str:
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        return " ".join(str(t) for t in tokens.tolist())
    return tokenizer.decode(tokens.tolist(), skip_special_tokens=True)


def _generate_all(model: Any, token_prompts: list[Tensor], interventions: list[Intervention], batch_size: int, progress: bool, label: str, **kw: Any) -> tuple[list[Tensor], list[Tensor] | None]:
    tokens: list[Tensor] = []
    logits: list[Tensor] | None = [] if kw["return_logits"] else None
    starts = range(0, len(token_prompts), batch_size)
    bar = None
    if progress:
        from rich.progress import Progress

        bar = Progress(transient=True)
        task = bar.add_task(label, total=len(token_prompts))
        bar.start()
    try:
        with steered(model, interventions) if interventions else nullcontext():
            for start in starts:
                toks, lg = _run_batch(model, token_prompts[start : start + batch_size], start, **kw)
                tokens += toks
                if logits is not None and lg is not None:
                    logits += lg
                if bar is not None:
                    bar.advance(task, len(toks))
    finally:
        if bar is not None:
            bar.stop()
    return tokens, logits


def generate(
    model: Any,
    prompts: str | Sequence[str | Tensor],
    interventions: Intervention | Iterable[Intervention] = (),
    max_new_tokens: int = 32,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 8,
    chat: bool = False,
    compare: bool = False,
    use_kv_cache: bool = True,
    return_logits: bool = False,
    stop_at_eos: bool = True,
    progress: bool = False,
) -> Generations:
    """Continue each prompt (``temperature=0`` is greedy); ``compare=True`` adds unsteered runs from the same seeds.

    ``chat=True`` wraps each string prompt in the model's chat template; otherwise strings get
    only the BOS token. ``use_kv_cache`` falls back to full recomputation for models without one.
    """
    if isinstance(prompts, (str, Tensor)):
        prompts = [prompts]
    if not prompts:
        raise UserError("no prompts given; pass at least one prompt")
    if max_new_tokens < 1 or batch_size < 1:
        raise UserError("max_new_tokens and batch_size must be at least 1")
    if temperature < 0 or not 0 < top_p <= 1:
        raise UserError("temperature must be >= 0 and top_p in (0, 1]")
    ivs = [interventions] if isinstance(interventions, Intervention) else list(interventions)
    token_prompts = encode_prompts(model, prompts, chat=chat)
    if any(len(p) == 0 for p in token_prompts):
        raise UserError("a prompt tokenized to nothing; give non-empty prompts")
    n_ctx = getattr(model.cfg, "n_ctx", None)
    longest = max(len(p) for p in token_prompts)
    if n_ctx and longest + max_new_tokens > n_ctx:
        raise UserError(f"a prompt of {longest} tokens plus {max_new_tokens} new tokens exceeds the model's context of {n_ctx}; shorten the prompt or lower max_new_tokens")
    tokenizer = getattr(model, "tokenizer", None)
    eos_id = getattr(tokenizer, "eos_token_id", None) if stop_at_eos else None
    kw = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed, use_kv_cache=use_kv_cache and supports_kv_cache(model), return_logits=return_logits, eos_id=eos_id)
    tokens, logits = _generate_all(model, token_prompts, ivs, batch_size, progress, "steered" if ivs else "generating", **kw)
    shown = [p if isinstance(p, str) else _decode(model, p) for p in prompts]
    out = Generations(prompts=shown, prompt_tokens=token_prompts, tokens=tokens, texts=[_decode(model, t) for t in tokens], logits=logits)
    if compare:
        base, base_logits = _generate_all(model, token_prompts, [], batch_size, progress, "unsteered", **kw)
        out.base_tokens, out.base_texts, out.base_logits = base, [_decode(model, t) for t in base], base_logits
    return out
