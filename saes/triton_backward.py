"""The opt-in fused sparse SAE backward in Triton (``INTERP_TRITON_FUSED=1``, CUDA only).

:func:`decode_selected` replaces the step's ``sparse_decode(select_pre_acts(...))``: its forward
is :mod:`saes.triton_kernels`' gather-sum, and its backward is :func:`latent_backward`, one pass
over latents that does the gather-dot, both weight-gradient scatters and the encoder-bias sum of
the unfused path. Off by default until it is timed on a GPU (``benchmarks/gpu_session.sh next``).
"""

from __future__ import annotations

import os

import torch
from jaxtyping import Float, Int
from torch import Tensor

from saes.triton_kernels import AVAILABLE, _acc_dtype, _gather_sum

if AVAILABLE:
    import triton
    import triton.language as tl

    from saes.triton_kernels import _TL_DTYPE

__all__ = ["fused_backward_enabled", "latent_backward", "decode_selected"]

_LATENT_CHUNK = 256  # entries per work item of the fused backward (longer segments are split)
_BLOCK_E_FUSED = 8  # entries per iteration of the fused backward (tiles of 8 x d rows)

if AVAILABLE:

    @triton.jit
    def _latent_backward_kernel(values, order, offsets, ends, chunks, item_latent, grad, xc, w_dec,
                                d_w_dec, d_w_enc, d_b_enc, SN, d, k, C,
                                ACC: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr):
        # One work item = (latent, chunk of at most C of its entries sorted by latent). For entry e
        # (token r = e // k, value v): dv = grad[r] . w_dec[lat], dpre = dv if v > 0 else 0;
        # d_w_dec[lat] += v grad[r], d_w_enc[lat] += dpre xc[r], d_b_enc[lat] += dpre. A latent with one
        # chunk stores its rows (zeros when it has no entry); one with several adds atomically.
        it = tl.program_id(0)
        lat = tl.load(item_latent + it).to(tl.int64)
        if lat >= SN:
            return
        n_chunks = tl.load(chunks + lat)
        chunk = it - (tl.load(ends + lat) - n_chunks)
        seg_end = tl.load(offsets + lat + 1)
        start = tl.load(offsets + lat) + chunk * C
        stop = tl.minimum(start + C, seg_end)
        cols = tl.arange(0, BLOCK_D)
        col_ok = cols < d
        w = tl.load(w_dec + lat * d + cols, mask=col_ok, other=0.0).to(ACC)
        acc_dec = tl.zeros([BLOCK_D], dtype=ACC)
        acc_enc = tl.zeros([BLOCK_D], dtype=ACC)
        acc_b = tl.zeros([BLOCK_E], dtype=ACC)
        for p0 in range(start, stop, BLOCK_E):
            ps = p0 + tl.arange(0, BLOCK_E)
            p_ok = ps < stop
            e = tl.load(order + ps, mask=p_ok, other=0).to(tl.int64)
            r = e // k
            v = tl.load(values + e, mask=p_ok, other=0.0).to(ACC)
            tile = p_ok[:, None] & col_ok[None, :]
            g = tl.load(grad + r[:, None] * d + cols[None, :], mask=tile, other=0.0).to(ACC)
            dpre = tl.where(v > 0, tl.sum(g * w[None, :], axis=1), 0.0)
            acc_dec += tl.sum(v[:, None] * g, axis=0)
            xr = tl.load(xc + r[:, None] * d + cols[None, :], mask=tile, other=0.0).to(ACC)
            acc_enc += tl.sum(dpre[:, None] * xr, axis=0)
            acc_b += dpre
        if n_chunks == 1:
            tl.store(d_w_dec + lat * d + cols, acc_dec.to(d_w_dec.dtype.element_ty), mask=col_ok)
            tl.store(d_w_enc + lat * d + cols, acc_enc.to(d_w_enc.dtype.element_ty), mask=col_ok)
            tl.store(d_b_enc + lat, tl.sum(acc_b, axis=0).to(d_b_enc.dtype.element_ty))
        else:
            tl.atomic_add(d_w_dec + lat * d + cols, acc_dec.to(d_w_dec.dtype.element_ty), mask=col_ok)
            tl.atomic_add(d_w_enc + lat * d + cols, acc_enc.to(d_w_enc.dtype.element_ty), mask=col_ok)
            tl.atomic_add(d_b_enc + lat, tl.sum(acc_b, axis=0).to(d_b_enc.dtype.element_ty))



def fused_backward_enabled() -> bool:
    """``INTERP_TRITON_FUSED=1``: the step decodes through :func:`decode_selected` (off by default until measured on a GPU)."""
    return os.environ.get("INTERP_TRITON_FUSED") == "1"


def _latent_items(indices: Tensor, n: int, chunk: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Entries sorted by (flattened) latent and the fused backward's work items, without a host sync.

    Returns ``(order, offsets, ends, chunks, item_latent)``: latent ``i``'s entries are
    ``order[offsets[i]:offsets[i + 1]]``, split into ``chunks[i] = max(1, ceil(count / chunk))``
    items; ``ends`` is their inclusive cumulative sum and ``item_latent[it]`` the latent of item
    ``it``, for a grid of ``S n + floor(S B k / chunk)`` items (an upper bound on their number:
    ``max(1, ceil(c / C)) <= 1 + floor(c / C)``); items past the last have latent ``S n``.
    """
    S, B, k = indices.shape
    flat = indices.reshape(S, B * k).to(torch.int64)
    if S > 1:
        flat = flat + torch.arange(S, device=flat.device, dtype=flat.dtype).mul_(n).view(S, 1)
    rows, order = torch.sort(flat.reshape(-1))
    offsets = torch.searchsorted(rows, torch.arange(S * n + 1, device=flat.device, dtype=flat.dtype))
    chunks = (offsets.diff() + (chunk - 1)).div_(chunk, rounding_mode="floor").clamp_min_(1)
    ends = chunks.cumsum(0)
    grid = S * n + (S * B * k) // chunk
    item_latent = torch.searchsorted(ends, torch.arange(grid, device=flat.device, dtype=ends.dtype), right=True)
    return order, offsets, ends, chunks, item_latent


def latent_backward(
    values: Float[Tensor, "S B k"], indices: Int[Tensor, "S B k"], grad: Float[Tensor, "S B d"],
    x_centered: Float[Tensor, "S B d"], W_dec: Float[Tensor, "S n d"], chunk: int | None = None,
) -> tuple[Float[Tensor, "S n d"], Float[Tensor, "S n d"], Float[Tensor, "S n"]]:
    """The sparse SAE backward in one pass over latents: ``(dW_dec, dW_enc latent-major, db_enc)``.

    For ``x_hat = sum_j values_j W_dec[indices_j]`` with ``values = gate(pre)`` (``gate`` passing
    the pre-activation where ``values > 0``, zero elsewhere) and ``pre = x_centered @ W_enc + b_enc``
    at the selected latents, given ``grad = dL/dx_hat``. The entries are sorted by latent once, and
    one program per (latent, up to ``chunk`` entries) reads the latent's decoder row once and each
    entry's ``grad`` and ``x_centered`` rows: the gather-dot, both weight-gradient scatters and the
    encoder-bias sum of the unfused path (which read a decoder row per entry, sort twice and make
    four passes over the entries) in one kernel. Latents with more than ``chunk`` entries add their
    items atomically (their last bits vary run to run on CUDA).
    """
    S, B, k = values.shape
    n, d = W_dec.shape[-2:]
    C = chunk or _LATENT_CHUNK
    order, offsets, ends, chunks, item_latent = _latent_items(indices, n, C)
    acc = _acc_dtype(values, grad, x_centered, W_dec)
    d_w_dec = torch.zeros(S, n, d, dtype=acc, device=W_dec.device)
    d_w_enc = torch.zeros(S, n, d, dtype=acc, device=W_dec.device)
    d_b_enc = torch.zeros(S, n, dtype=acc, device=W_dec.device)
    block_d = triton.next_power_of_2(d)
    _latent_backward_kernel[(item_latent.numel(),)](
        values.contiguous(), order, offsets, ends, chunks, item_latent, grad.contiguous(), x_centered.contiguous(), W_dec.contiguous(),
        d_w_dec, d_w_enc, d_b_enc, S * n, d, k, C, ACC=_TL_DTYPE[acc], BLOCK_E=_BLOCK_E_FUSED, BLOCK_D=block_d,
        num_warps=8 if block_d >= 1024 else 4)
    return d_w_dec, d_w_enc, d_b_enc


class _DecodeSelected(torch.autograd.Function):
    """Triton gather-sum forward; :func:`latent_backward` for the decoder and the selected encoder entries."""

    @staticmethod
    def forward(ctx, values: Tensor, indices: Tensor, x_centered: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, W_dec: Tensor) -> Tensor:
        ctx.save_for_backward(values, indices, x_centered, W_enc, W_dec)
        return _gather_sum(values, indices, W_dec, None)

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[None, None, None, Tensor, Tensor, Tensor | None, Tensor]:
        values, indices, x_centered, W_enc, W_dec = ctx.saved_tensors
        d_w_dec, d_w_enc, d_b_enc = latent_backward(values, indices, grad_out, x_centered, W_dec)
        grad_b_dec = -torch.bmm(W_enc, d_b_enc.to(W_enc.dtype).unsqueeze(-1)).squeeze(-1) if ctx.needs_input_grad[5] else None
        return (None, None, None, d_w_enc.to(W_enc.dtype).transpose(1, 2), d_b_enc.to(W_enc.dtype), grad_b_dec, d_w_dec.to(W_dec.dtype))


def decode_selected(
    values: Float[Tensor, "S B k"], indices: Int[Tensor, "S B k"], x_centered: Float[Tensor, "S B d"],
    W_enc: Float[Tensor, "S d n"], b_enc: Float[Tensor, "S n"], b_dec: Float[Tensor, "S d"], W_dec: Float[Tensor, "S n d"],
) -> Float[Tensor, "S B d"]:
    """``x_hat - b_dec`` from activations ``values`` (no gradient of their own) at ``indices``, fused backward.

    Equal to ``sparse_decode(select_pre_acts(values, ...) * (values > 0), indices, W_dec)``: the
    gradient reaches ``W_dec`` and, through the selected entries with ``values > 0``, ``W_enc``,
    ``b_enc`` and ``b_dec`` (``x_centered = x - b_dec`` without gradient, as in the step).
    """
    return _DecodeSelected.apply(values.detach(), indices, x_centered.detach(), W_enc, b_enc, b_dec, W_dec)
