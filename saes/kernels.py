"""Sparse kernels for training stacks of TopK SAEs: O(k·d) per token beyond the dense encoder.

A stack holds S SAEs of one shape; tensors carry a leading stack axis ``S``. Per token only k
latents are active, so the decoder forward (gather k rows), the decoder backward (scatter k rows)
and the encoder backward (only the k selected pre-activations have a gradient) all cost O(k·d)
per token. Nothing here materializes a dense ``[batch, n_latents]`` gradient or multiplies two
dense ``n x d``-sized operands in the backward pass.

The stack is handled as one block-diagonal problem: latent ``i`` of member ``s`` is row
``s * n + i`` of the flattened ``[S * n, d]`` table, token ``b`` of member ``s`` is row
``s * B + b``. Kernels (torch ops, same code on CPU and CUDA; optional Triton in
:mod:`saes.triton_kernels` on CUDA and compiled Numba loops in :mod:`saes.cpu_kernels` on CPU):

- gather-sum (decoder forward): ``F.embedding_bag`` with ``per_sample_weights``;
- scatter-rows (weight gradients): a COO sparse ``[S*n, S*B] @ [S*B, d]`` product;
- gather-dot (gradient of the selected values): sampled dense-dense product (SDDMM) on a CSR
  pattern with k entries per token.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

__all__ = [
    "BufferPool", "sparse_decode", "select_pre_acts", "encode_topk", "fused_decode_for", "topk", "dense_pre_acts", "scatter_rows", "gather_dot", "squared_error",
]


def _triton_for(t: Tensor):
    """:mod:`saes.triton_kernels` when ``t`` is on CUDA, Triton imports and ``INTERP_TRITON != "0"``; else None."""
    if not t.is_cuda:  # checked first so CPU runs never import Triton
        return None
    from saes import triton_kernels

    return triton_kernels if triton_kernels.enabled_for(t) else None


def _numba_for(*tensors: Tensor):
    """:mod:`saes.cpu_kernels` when every tensor is a float32/float64 CPU tensor, Numba imports and ``INTERP_NUMBA != "0"``; else None."""
    from saes import cpu_kernels

    return cpu_kernels if all(cpu_kernels.enabled_for(t) for t in tensors) else None


def _numba_topk_for(x: Tensor):
    """:mod:`saes.cpu_kernels` for CPU rows its top-k takes (float32, float64, bf16); else None."""
    from saes import cpu_kernels

    return cpu_kernels if cpu_kernels.topk_enabled_for(x) else None


def topk(x: Float[Tensor, "... n"], k: int) -> tuple[Tensor, Int[Tensor, "... k"]]:
    """The k largest entries of each row and their indices, in no particular order.

    bf16/fp16 rows on CUDA (the encoder's pre-activations) with ``k <= 64`` and ``n <= 65536`` go to
    Triton (:func:`saes.triton_kernels.topk_rows`: 297 vs 1,068 us for k 32 of 32,768 on an H100);
    wide CPU rows (``n >= 16 k``, ``n`` divisible by 8) to the compiled
    :func:`saes.cpu_kernels.topk_rows` (15 vs 45 ms for k 32 of 4,096, 4,096 rows, one thread) or,
    without Numba, rows with ``n >= 64 k`` to :func:`_grouped_topk`; everything else to
    ``torch.topk(sorted=False)``. All are exact; among ties at the k-th value they may keep
    different indices.
    """
    if x.dtype in (torch.bfloat16, torch.float16) and (tk := _triton_for(x)) is not None and tk.topk_fast(x.shape[-1], k):
        return tk.topk_rows(x, k)
    n = x.shape[-1]
    if not x.is_cuda and x.is_contiguous():
        if not x.requires_grad and (ck := _numba_topk_for(x)) is not None and ck.topk_supported(n, k):
            return ck.topk_rows(x, k)
        if 0 < k and n % _GROUPS == 0 and n >= 64 * k:
            return _grouped_topk(x, k)
    return x.topk(k, dim=-1, sorted=False)


_GROUPS = 8  # elements per strided group in the CPU top-k


def _grouped_topk(x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Exact top-k per row from the k strided groups with the largest maxima (CPU).

    Each row is split into ``m = n / 8`` groups ``{g, g + m, ..., g + 7m}``. Every one of the k
    largest entries lies in one of the k groups with the largest maxima: an entry whose group is
    not among them has k group maxima (k other entries) at least as large. So one vectorised max
    over the groups, a top-k over the ``m`` maxima and a top-k over the ``8k`` gathered candidates
    give the same values as ``torch.topk`` (among ties, possibly other indices). On one CPU thread:
    57 vs 80 ms for k 32 of 4,096 per row, 122 vs 199 ms of 16,384, 4,096 rows (RESULTS.md).
    """
    n = x.shape[-1]
    rows = x.reshape(-1, n)
    R, m = rows.shape[0], n // _GROUPS
    group_max = rows.view(R, _GROUPS, m).amax(1)
    groups = group_max.topk(k, dim=-1, sorted=False).indices
    cand = (groups.unsqueeze(-1) + torch.arange(0, n, m, device=x.device).view(1, 1, _GROUPS)).view(R, k * _GROUPS)
    values, pos = rows.gather(1, cand).topk(k, dim=-1, sorted=False)
    return values.view(*x.shape[:-1], k), cand.gather(1, pos).view(*x.shape[:-1], k)


_storage_use_count = getattr(torch._C, "_storage_Use_Count", None)  # private; without it the pool hands out fresh tensors


class BufferPool:
    """Memory for the weight gradients a training loop frees every step, handed out again once nothing else holds it.

    On CPU a freed tensor above glibc's mmap threshold (at most 32 MB) goes back to the kernel, and
    the next step's gradient of the same shape pays a page fault on every 4 KB it first touches: at
    n 16,384, d 576 the ``W_enc`` and ``W_dec`` gradients are 37.7 MB each, 18k faults per step
    (one thread: 707-712 vs 722-740 ms per step with the pool). A storage is handed out only when
    the pool's own reference is its last one (torch's storage use count), so a gradient the caller
    still holds (``zero_grad(set_to_none=False)``, a kept ``.grad``) is never written over; at most
    ``keep`` storages per shape are held, and they live as long as the pool (one per
    :class:`saes.step.StackParams`). CUDA's caching allocator already reuses memory: not used there.
    """

    def __init__(self, keep: int = 4):
        self.keep = keep
        self._held: dict[tuple, list[torch.UntypedStorage]] = {}

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str = "cpu") -> Tensor:
        """An uninitialised contiguous tensor of ``shape``: on a held storage nothing else references, else fresh."""
        shape, device = tuple(shape), torch.device(device)
        held = self._held.setdefault((shape, dtype, device), [])
        if _storage_use_count is not None:
            for storage in held:
                if _storage_use_count(storage._cdata) == 1:
                    return torch.empty(0, dtype=dtype, device=device).set_(storage, 0, shape)
        out = torch.empty(shape, dtype=dtype, device=device)
        if _storage_use_count is not None and len(held) < self.keep:
            held.append(out.untyped_storage())
        return out


def _flat_rows(indices: Int[Tensor, "S B k"], n: int) -> Int[Tensor, "S*B k"]:
    """Indices into the flattened ``[S * n, d]`` table (member ``s`` offset by ``s * n``)."""
    S = indices.shape[0]
    offsets = torch.arange(S, device=indices.device, dtype=indices.dtype).mul_(n).view(S, 1, 1)
    return (indices + offsets).reshape(-1, indices.shape[-1])


def scatter_rows(
    coef: Float[Tensor, "S B k"], indices: Int[Tensor, "S B k"], dense: Float[Tensor, "S B d"], n: int, pool: BufferPool | None = None,
) -> Float[Tensor, "S n d"]:
    """``out[s, i] = sum over (b, j) with indices[s, b, j] == i of coef[s, b, j] * dense[s, b]``
    (written to memory from ``pool`` by the compiled CPU kernel when one is given)."""
    if (tk := _triton_for(dense)) is not None:
        return tk.scatter_rows(coef, indices, dense, n)
    S, B, k = coef.shape
    d = dense.shape[-1]
    if (ck := _numba_for(dense)) is not None:
        out = pool.empty((S * n, d), dense.dtype, dense.device) if pool is not None else None
        return ck.scatter_rows(coef.reshape(S * B, k), _flat_rows(indices, n), dense.reshape(S * B, d), S * n, out=out).view(S, n, d)
    rows = _flat_rows(indices, n).reshape(-1)
    cols = torch.arange(S * B, device=coef.device).repeat_interleave(k)
    matrix = torch.sparse_coo_tensor(torch.stack([rows, cols]), coef.reshape(-1).to(dense.dtype), (S * n, S * B), check_invariants=False)
    if dense.is_cuda:  # the torch path on CUDA (Triton off): sparse.mm, as verified on an H100
        return torch.sparse.mm(matrix, dense.reshape(S * B, d)).reshape(S, n, d)
    # CPU: addmm with beta=0 instead of torch.sparse.mm accumulates the uncoalesced entries as they
    # come, skipping sparse.mm's coalescing sort and second zero-fill (~40 % less time).
    zero = torch.zeros((), dtype=dense.dtype).expand(S * n, d)
    return torch.addmm(zero, matrix, dense.reshape(S * B, d), beta=0).reshape(S, n, d)


def gather_dot(
    dense: Float[Tensor, "S B d"], table: Float[Tensor, "S n d"], indices: Int[Tensor, "S B k"]
) -> Float[Tensor, "S B k"]:
    """``out[s, b, j] = dense[s, b] . table[s, indices[s, b, j]]`` (an SDDMM on a CSR pattern)."""
    if (tk := _triton_for(dense)) is not None:
        return tk.gather_dot(dense, table, indices)
    S, B, k = indices.shape
    n, d = table.shape[-2:]
    if (ck := _numba_for(dense, table)) is not None:
        return ck.gather_dot(dense.reshape(S * B, d), _flat_rows(indices, n), table.reshape(S * n, d)).view(S, B, k)
    crow = torch.arange(0, S * B * k + 1, k, device=indices.device)
    zeros = torch.zeros(S * B * k, dtype=dense.dtype, device=dense.device)
    with warnings.catch_warnings():
        # torch flags CSR tensors as "beta" on first use; this op is covered by our dense-reference tests.
        warnings.simplefilter("ignore", UserWarning)
        pattern = torch.sparse_csr_tensor(crow, _flat_rows(indices, n).reshape(-1), zeros, (S * B, S * n), check_invariants=False)
    out = torch.sparse.sampled_addmm(pattern, dense.reshape(S * B, d), table.reshape(S * n, d).T, beta=0.0)
    return out.values().reshape(S, B, k)


class SparseDecode(torch.autograd.Function):
    """``y[s, b] = sum_j values[s, b, j] * W_dec[s, indices[s, b, j]]`` with sparse gradients."""

    @staticmethod
    def forward(ctx, values: Tensor, indices: Tensor, W_dec: Tensor, pool: BufferPool | None) -> Tensor:
        S, B, k = values.shape
        n, d = W_dec.shape[-2:]
        ctx.save_for_backward(values, indices, W_dec)
        ctx.pool = pool
        if (ck := _numba_for(W_dec)) is not None:
            return ck.gather_sum(values.reshape(S * B, k), _flat_rows(indices, n), W_dec.reshape(S * n, d)).view(S, B, d)
        out = F.embedding_bag(_flat_rows(indices, n), W_dec.reshape(S * n, d), per_sample_weights=values.reshape(S * B, k).to(W_dec.dtype), mode="sum")
        return out.reshape(S, B, d)

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, None, Tensor | None, None]:
        values, indices, W_dec = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_values = gather_dot(grad_out, W_dec, indices).to(values.dtype) if ctx.needs_input_grad[0] else None
        grad_W_dec = scatter_rows(values, indices, grad_out, W_dec.shape[-2], ctx.pool) if ctx.needs_input_grad[2] else None
        return grad_values, None, grad_W_dec, None


class SelectPreActs(torch.autograd.Function):
    """The selected pre-activations ``(x - b_dec) @ W_enc + b_enc`` at ``indices``, values precomputed.

    The forward returns ``values`` (already computed by the dense encoder); the backward sends
    gradient only through those k entries per token: ``dW_enc[:, i] = sum g * (x - b_dec)``,
    ``db_enc = sum g``, ``db_dec = -W_enc @ db_enc``.
    """

    @staticmethod
    def forward(ctx, values: Tensor, indices: Tensor, x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, x_centered: Tensor | None,
                pool: BufferPool | None) -> Tensor:
        ctx.save_for_backward(indices, x, W_enc, b_dec, x_centered)
        ctx.pool = pool
        return values.clone()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[None, None, None, Tensor | None, Tensor | None, Tensor | None, None, None]:
        indices, x, W_enc, b_dec, x_centered = ctx.saved_tensors
        S, d, n = W_enc.shape
        grad = grad.to(W_enc.dtype)
        grad_W_enc = grad_b_enc = grad_b_dec = None
        if ctx.needs_input_grad[3]:
            if x_centered is None:
                x_centered = x.to(W_enc.dtype) - b_dec.unsqueeze(1)
            grad_W_enc = scatter_rows(grad, indices, x_centered, n, ctx.pool).transpose(1, 2)
        if ctx.needs_input_grad[4] or ctx.needs_input_grad[5]:
            grad_b_enc = torch.zeros(S * n, dtype=grad.dtype, device=grad.device)
            grad_b_enc.index_add_(0, _flat_rows(indices, n).reshape(-1), grad.reshape(-1))
            grad_b_enc = grad_b_enc.view(S, n)
            if ctx.needs_input_grad[5]:
                grad_b_dec = -torch.bmm(W_enc, grad_b_enc.unsqueeze(-1)).squeeze(-1)
        return None, None, None, grad_W_enc, grad_b_enc, grad_b_dec, None, None


def sparse_decode(
    values: Float[Tensor, "S B k"], indices: Int[Tensor, "S B k"], W_dec: Float[Tensor, "S n d"], grad_pool: BufferPool | None = None,
) -> Float[Tensor, "S B d"]:
    """Weighted sum of the k selected decoder rows per token (no ``b_dec``), sparse in both passes
    (``grad_pool``: where the CPU backward puts ``W_dec``'s gradient, see :class:`BufferPool`)."""
    if (tk := _triton_for(W_dec)) is not None:
        return tk.sparse_decode(values, indices, W_dec)
    return SparseDecode.apply(values, indices, W_dec, grad_pool)


def select_pre_acts(
    values: Float[Tensor, "S B k"], indices: Int[Tensor, "S B k"], x: Float[Tensor, "S B d"],
    W_enc: Float[Tensor, "S d n"], b_enc: Float[Tensor, "S n"], b_dec: Float[Tensor, "S d"],
    x_centered: Float[Tensor, "S B d"] | None = None, grad_pool: BufferPool | None = None,
) -> Float[Tensor, "S B k"]:
    """Attach the sparse encoder backward to pre-activation ``values`` gathered at ``indices``.

    ``x_centered`` (``x - b_dec``, no gradient) saves the backward recomputing it when the caller has it;
    ``grad_pool``: where the CPU backward puts ``W_enc``'s gradient (see :class:`BufferPool`).
    """
    return SelectPreActs.apply(values, indices, x, W_enc, b_enc, b_dec, x_centered, grad_pool)


class SquaredError(torch.autograd.Function):
    """Per member ``sum_b ||decoded_b + b_dec - x_b||^2`` from ``x_centered = x - b_dec``, and the difference.

    One pass for the difference and one for its square sum; the backward writes one tensor
    (``2 g · diff``) where autograd over ``(decoded + b_dec - x).pow(2).sum()`` writes four.
    """

    @staticmethod
    def forward(ctx, decoded: Tensor, x_centered: Tensor, b_dec: Tensor) -> tuple[Tensor, Tensor]:
        ctx.set_materialize_grads(False)  # the difference's gradient is never used: no zero-filled tensor for it
        diff = decoded - x_centered
        ctx.save_for_backward(diff)
        ctx.mark_non_differentiable(diff)
        return torch.linalg.vecdot(diff, diff).sum(1), diff

    @staticmethod
    def backward(ctx, grad: Tensor | None, _grad_diff: Tensor | None) -> tuple[Tensor | None, None, Tensor | None]:
        if grad is None:
            return None, None, None
        (diff,) = ctx.saved_tensors
        grad_decoded = diff * (2 * grad).view(-1, 1, 1)
        return grad_decoded, None, grad_decoded.sum(1)


def squared_error(
    decoded: Float[Tensor, "S B d"], x_centered: Float[Tensor, "S B d"], b_dec: Float[Tensor, "S d"]
) -> tuple[Float[Tensor, "S"], Float[Tensor, "S B d"]]:
    """``(sum_b ||x_hat_b - x_b||^2 per member, x_hat - x)`` for ``x_hat = decoded + b_dec``; gradients reach ``decoded`` and ``b_dec``."""
    return SquaredError.apply(decoded, x_centered.detach(), b_dec)


def _gemm_with_bias(x: Tensor, W: Tensor, bias: Tensor) -> Tensor:
    """``x @ W + bias[:, None]`` per member on CUDA without writing the output twice.

    ``torch.baddbmm`` first copies the broadcast bias into the whole ``[S, B, n]`` output (as much
    memory traffic as the GEMM's output itself). One member: ``torch.addmm`` with a 1-D bias, which
    cuBLASLt adds in the GEMM's epilogue. Several: the bias rides in the batched GEMM as one more
    input column of ones (K padded to a multiple of 8 with zeros).
    """
    S, B, d = x.shape
    if S == 1:
        return torch.addmm(bias[0], x[0], W[0]).unsqueeze(0)
    kp = (d + 8) // 8 * 8
    xa = torch.zeros(S, B, kp, dtype=x.dtype, device=x.device)
    xa[..., :d] = x
    xa[..., d] = 1
    Wa = torch.zeros(S, W.shape[-1], kp, dtype=W.dtype, device=W.device)  # latent-major, like W_enc_t
    Wa[..., :d] = W.mT
    Wa[..., d] = bias
    return torch.bmm(xa, Wa.mT)


def dense_pre_acts(
    x: Float[Tensor, "S B d"], W_enc: Float[Tensor, "S d n"], b_enc: Float[Tensor, "S n"], b_dec: Float[Tensor, "S d"],
    out: Float[Tensor, "S B n"] | None = None, x_centered: Float[Tensor, "S B d"] | None = None,
    operands: tuple[Float[Tensor, "S B d+1"], Float[Tensor, "S n d+1"]] | None = None,
) -> Float[Tensor, "S B n"]:
    """``(x - b_dec) @ W_enc + b_enc`` without autograd, as one batched GEMM with a fused bias.

    ``x_centered`` (``x - b_dec``, when the caller has it) is then the GEMM's input.

    On CUDA the GEMM runs in bf16 (the output stays bf16 to halve its memory traffic); on CPU fp32,
    written into ``out`` when given (a reused buffer: on CPU a fresh ``[S, B, n]`` allocation is
    mapped from the OS each time, and its page faults cost ~15 % of the GEMM at n 4096). On CPU
    with ``x_centered`` and ``operands`` (reused ``[S, B, d + 1]`` and ``[S, n, d + 1]`` buffers),
    the bias rides in the GEMM as one more input column of ones: ``baddbmm`` would first write the
    broadcast bias over the whole output (one thread, n 4,096, batch 4,096: 118 + 2.2 ms to build
    the operands vs 126 ms; n 16,384: 478 + 9.4 vs 507 ms). bf16 operands and ``out`` run the GEMM
    in bf16 (with AMX: 15 vs 118 ms) and return bf16 pre-activations, as on CUDA.
    """
    with torch.no_grad():
        if x.is_cuda:
            dt = torch.bfloat16
            # W_enc is usually the transposed view of a latent-major parameter: convert that contiguous
            # tensor (a vectorized copy) and transpose back; cuBLAS takes either layout.
            W = W_enc.mT.to(dt).mT if W_enc.mT.is_contiguous() else W_enc.to(dt)
            if x_centered is not None:  # no bias GEMV, and bf16 rounds the smaller centred values
                bias, inp = b_enc, x_centered
            else:
                bias, inp = b_enc - torch.bmm(b_dec.unsqueeze(1), W_enc).squeeze(1), x
            return _gemm_with_bias(inp.to(dt), W, bias.to(dt))
        if x_centered is not None and operands is not None:
            x_aug, w_aug = operands
            d = x.shape[-1]
            x_aug[..., :d] = x_centered
            x_aug[..., d] = 1
            w_aug[..., :d] = W_enc.mT
            w_aug[..., d] = b_enc
            return torch.bmm(x_aug, w_aug.mT, out=out)
        bias = (b_enc - torch.bmm(b_dec.unsqueeze(1), W_enc).squeeze(1)).unsqueeze(1)
        return torch.baddbmm(bias, x.to(W_enc.dtype), W_enc, out=out)


def encode_topk(
    x: Float[Tensor, "S B d"], W_enc: Float[Tensor, "S d n"], b_enc: Float[Tensor, "S n"], b_dec: Float[Tensor, "S d"], k: int,
    out: Float[Tensor, "S B n"] | None = None, x_centered: Float[Tensor, "S B d"] | None = None, attach: bool = True,
    operands: tuple[Tensor, Tensor] | None = None, grad_pool: BufferPool | None = None,
) -> tuple[Float[Tensor, "S B k"], Int[Tensor, "S B k"], Float[Tensor, "S B n"]]:
    """TopK encoder: ``(ReLU of the k largest pre-activations, their indices, all pre-activations)``.

    Only the returned values carry gradient (sparse backward; ``attach=False``: none, for
    :func:`fused_decode_for`'s decoder, which takes the encoder's gradient itself); the dense
    pre-activations are returned without gradient for AuxK's selection (in ``out`` on CPU when given).
    """
    pre = dense_pre_acts(x, W_enc, b_enc, b_dec, out=out, x_centered=x_centered, operands=operands)
    top, indices = topk(pre, k)
    if not attach:
        return top.to(W_enc.dtype).relu(), indices, pre
    values = select_pre_acts(top.to(W_enc.dtype), indices, x, W_enc, b_enc, b_dec, x_centered, grad_pool)
    return values.relu(), indices, pre


def fused_decode_for(x: Tensor):
    """:mod:`saes.triton_backward` when ``x`` takes the Triton path and ``INTERP_TRITON_FUSED=1``, else None.

    Its ``decode_selected`` then replaces ``sparse_decode(select_pre_acts(...))``: one kernel for
    the whole sparse backward (:func:`saes.triton_backward.latent_backward`).
    """
    if _triton_for(x) is None:
        return None
    from saes import triton_backward

    return triton_backward if triton_backward.fused_backward_enabled() else None
