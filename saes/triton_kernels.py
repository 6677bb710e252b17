"""Optional Triton versions of the sparse SAE kernels in :mod:`saes.kernels` (CUDA only).

Same stacked layout and contracts as the torch path: a stack of S SAEs, latent ``i`` of member
``s`` is row ``s * n + i`` of the flattened ``[S * n, d]`` table, token ``b`` of member ``s`` is
row ``s * B + b`` of the flattened ``[S * B, ...]`` batch. Three kernels, one program per
(token, block of d):

- gather-sum (decoder forward): ``y[r] = sum_j values[r, j] * table[row(r, j)] (+ bias[s])``;
- scatter-rows (weight gradients), two ways. Few entries per output row (``B * k < 8 n``):
  ``out[row(r, j)] += coef[r, j] * dense[r]`` with atomic adds, so on CUDA the summation order
  (and the last bits of the result) varies run to run. Many (large batches): the entries are
  sorted by row (``torch.sort``), then one program per (row, block of d) sums its segment and
  writes the row once, with no atomics and no zero-fill. On an H100 (n 32k, d 768, k 32) the sorted
  version takes 405 / 613 / 2,162 us at batch 4k / 16k / 64k against the atomics' 289 / 1,022 /
  3,915 us;
- gather-dot (gradient of the selected values): ``out[r, j] = dense[r] . table[row(r, j)]``;
- row top-k of 16-bit floats (the bf16 pre-activations on CUDA), exact, one program per row.
  Floats map to order-preserving 16-bit keys. The row is split into G = 4k strided groups; the
  k-th largest of the G group maxima is a bound ``t`` with at least k keys >= t, so the top k are
  among the candidates >= t (37 on average, at most 49, for k 32 of 32,768 on random rows; a
  second pass over the row, from L2, collects them). Both passes are elementwise (no reduction or
  scan inside the loops). The candidates, packed as ``(key << 16) | (65535 - index)``, take slots
  of a per-row buffer of 4k by atomic increments of the row's counter, and are sorted; the first
  k are the answer (ties keep the lowest indices). Rows with more candidates than the buffer holds (many
  ties) are finished by a radix select: 256-bin histograms of the keys' high and low bytes find
  the k-th key, then a prefix sum writes the keys above it and the first ties;
- decoder rows: remove from each gradient row its component along the (unit) decoder row, and
  rescale rows to unit norm, each in one pass instead of torch's three.

Accumulation is fp32 (fp64 for fp64 inputs). :mod:`saes.kernels` dispatches here only for CUDA
tensors when Triton imports and ``INTERP_TRITON`` is not ``"0"``; the tests run these kernels on
CPU under Triton's interpreter (``TRITON_INTERPRET=1``) against the torch path.
"""

from __future__ import annotations

import os

import torch
from jaxtyping import Float, Int
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # Triton is the optional `triton` extra; the torch kernels cover everything.
    triton = None

AVAILABLE: bool = triton is not None
"""Whether Triton imported; without it every caller uses the torch kernels."""

__all__ = [
    "AVAILABLE", "enabled_for", "sparse_decode", "scatter_rows", "gather_dot", "topk_rows", "topk_fast", "topk_method", "constrain_rows",
    "normalize_rows", "fused_backward_enabled", "decode_selected",
]

_BLOCK_K = 16
_BLOCK_D = 64
_BLOCK_E = 16  # sorted entries summed per iteration of a segment
_BLOCK_D_SEG = 256
_SEGMENT_MIN_ENTRIES = 8  # entries per output row from which scatter-rows sorts instead of adding atomically
_TOPK_BLOCK = 2048  # keys per chunk
_TOPK_MAX_N = 65536  # indices packed in 16 bits
_TOPK_MAX_K = 64  # larger k: torch.topk (the filter's candidate count grows with k)
_LATENT_CHUNK = 256  # entries per work item of the fused backward (longer segments are split)
_BLOCK_E_FUSED = 8  # entries per iteration of the fused backward (tiles of 8 x d rows)


def enabled_for(t: Tensor) -> bool:
    """True when ``t`` is on CUDA, Triton is installed, and ``INTERP_TRITON`` is not ``"0"``."""
    return t.is_cuda and AVAILABLE and os.environ.get("INTERP_TRITON") != "0"


def _acc_dtype(*tensors: Tensor) -> torch.dtype:
    """fp64 accumulation when any input is fp64, else fp32 (bf16/fp16/fp32 inputs)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


if AVAILABLE:
    _TL_DTYPE = {torch.float32: tl.float32, torch.float64: tl.float64}

    @triton.jit
    def _gather_sum_kernel(values, indices, table, bias, out, B, n, d, k,
                           HAS_BIAS: tl.constexpr, ACC: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
        r = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        col_ok = cols < d
        base = (r // B) * n
        acc = tl.zeros([BLOCK_D], dtype=ACC)
        for j0 in range(0, k, BLOCK_K):
            js = j0 + tl.arange(0, BLOCK_K)
            j_ok = js < k
            rows = base + tl.load(indices + r * k + js, mask=j_ok, other=0).to(tl.int64)
            v = tl.load(values + r * k + js, mask=j_ok, other=0.0).to(ACC)
            w = tl.load(table + rows[:, None] * d + cols[None, :], mask=j_ok[:, None] & col_ok[None, :], other=0.0)
            acc += tl.sum(v[:, None] * w.to(ACC), axis=0)
        if HAS_BIAS:
            acc += tl.load(bias + (r // B) * d + cols, mask=col_ok, other=0.0).to(ACC)
        tl.store(out + r * d + cols, acc.to(out.dtype.element_ty), mask=col_ok)

    @triton.jit
    def _scatter_rows_kernel(coef, indices, dense, out, B, n, d, k,
                             ACC: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
        r = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        col_ok = cols < d
        base = (r // B) * n
        g = tl.load(dense + r * d + cols, mask=col_ok, other=0.0).to(ACC)
        for j0 in range(0, k, BLOCK_K):
            js = j0 + tl.arange(0, BLOCK_K)
            j_ok = js < k
            rows = base + tl.load(indices + r * k + js, mask=j_ok, other=0).to(tl.int64)
            c = tl.load(coef + r * k + js, mask=j_ok, other=0.0).to(ACC)
            tl.atomic_add(out + rows[:, None] * d + cols[None, :], c[:, None] * g[None, :], mask=j_ok[:, None] & col_ok[None, :])

    @triton.jit
    def _key16(bits):
        # Order-preserving map of 16-bit float bit patterns (as signed int32) to keys in [0, 65535].
        return tl.where(bits >= 0, bits + 32768, -1 - bits)

    @triton.jit
    def _topk16_kernel(src, out_bits, out_idx, counts, n, k, CAP, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        if tl.load(counts + row) <= CAP:  # the filter kernel finished this row
            return
        base = src + row * n
        bins = tl.arange(0, 256)
        # Pass 1: histogram of the keys' high byte; the k-th largest key's high byte is the largest
        # bin whose count together with every bin above it reaches k.
        hist = tl.zeros([256], dtype=tl.int32)
        for c0 in range(0, n, BLOCK):
            offs = c0 + tl.arange(0, BLOCK)
            ok = offs < n
            key = _key16(tl.load(base + offs, mask=ok, other=0).to(tl.int32))
            hist += tl.histogram(key >> 8, 256, mask=ok)
        at_or_above = tl.sum(hist, axis=0) - tl.cumsum(hist, axis=0) + hist
        hi = tl.max(tl.where(at_or_above >= k, bins, -1), axis=0)
        above = tl.sum(tl.where(bins > hi, hist, 0), axis=0)
        # Pass 2: the same for the low byte among keys whose high byte is `hi`.
        hist = tl.zeros([256], dtype=tl.int32)
        for c0 in range(0, n, BLOCK):
            offs = c0 + tl.arange(0, BLOCK)
            ok = offs < n
            key = _key16(tl.load(base + offs, mask=ok, other=0).to(tl.int32))
            hist += tl.histogram(key & 255, 256, mask=ok & ((key >> 8) == hi))
        need = k - above
        at_or_above = tl.sum(hist, axis=0) - tl.cumsum(hist, axis=0) + hist
        lo = tl.max(tl.where(at_or_above >= need, bins, -1), axis=0)
        threshold = hi * 256 + lo
        ties = need - tl.sum(tl.where(bins > lo, hist, 0), axis=0)  # keys equal to the threshold to keep (>= 1)
        # Pass 3: write keys above the threshold and the first `ties` equal ones, in index order.
        written = tl.zeros([], dtype=tl.int32)
        equal_seen = tl.zeros([], dtype=tl.int32)
        for c0 in range(0, n, BLOCK):
            offs = c0 + tl.arange(0, BLOCK)
            ok = offs < n
            bits = tl.load(base + offs, mask=ok, other=0)
            key = _key16(bits.to(tl.int32))
            eq = (ok & (key == threshold)).to(tl.int32)
            take = (ok & (key > threshold)) | ((eq != 0) & (equal_seen + tl.cumsum(eq, axis=0) <= ties))
            pos = written + tl.cumsum(take.to(tl.int32), axis=0) - 1
            tl.store(out_bits + row * k + pos, bits, mask=take)
            tl.store(out_idx + row * k + pos, offs.to(tl.int64), mask=take)
            written += tl.sum(take.to(tl.int32), axis=0)
            equal_seen += tl.sum(eq, axis=0)

    @triton.jit
    def _topk16_filter_kernel(src, out_bits, out_idx, scratch, counts, n, k,
                              G: tl.constexpr, BLOCK: tl.constexpr, CAP: tl.constexpr, KP: tl.constexpr):
        # counts[row] must be 0 on entry (it is the candidate counter).
        row = tl.program_id(0).to(tl.int64)
        base = src + row * n
        lanes = tl.arange(0, BLOCK)
        # Pass 1, elementwise only: lane j's running maximum over keys j, j + BLOCK, ...; then the
        # maxima of G strided groups (BLOCK is a multiple of G) and their k-th largest, t: k keys
        # of k different groups are >= t.
        lane_max = tl.full([BLOCK], -1, dtype=tl.int32)
        for c0 in range(0, n, BLOCK):
            offs = c0 + lanes
            ok = offs < n
            lane_max = tl.maximum(lane_max, tl.where(ok, _key16(tl.load(base + offs, mask=ok, other=0).to(tl.int32)), -1))
        group_max = tl.max(tl.reshape(lane_max, [BLOCK // G, G]), axis=0)
        t = tl.sum(tl.where(tl.arange(0, G) == k - 1, tl.sort(group_max, descending=True), 0), axis=0)
        # Pass 2 (the row is in L2 now), elementwise only: each candidate >= t takes a slot of the
        # row's buffer with an atomic increment of the row's counter.
        for c0 in range(0, n, BLOCK):
            offs = c0 + lanes
            ok = offs < n
            key = _key16(tl.load(base + offs, mask=ok, other=0).to(tl.int32))
            cand = ok & (key >= t)
            pos = tl.atomic_add(counts + row + lanes * 0, 1, mask=cand, sem="relaxed")
            tl.store(scratch + row * CAP + pos, ((key - 32768) << 16) | (65535 - offs), mask=cand & (pos < CAP))
        tl.debug_barrier()
        written = tl.atomic_add(counts + row, 0, sem="acquire")
        if written <= CAP:
            slots = tl.arange(0, CAP)
            sorted_keys = tl.sort(tl.load(scratch + row * CAP + slots, mask=slots < written, other=-2147483648), descending=True)
            tl.debug_barrier()
            tl.store(scratch + row * CAP + slots, sorted_keys)
            tl.debug_barrier()
            js = tl.arange(0, KP)
            best = tl.load(scratch + row * CAP + js, mask=js < k, other=0)
            kk = (best >> 16) + 32768
            bits = tl.where(kk >= 32768, kk - 32768, -1 - kk)
            tl.store(out_bits + row * k + js, bits.to(tl.int16), mask=js < k)
            tl.store(out_idx + row * k + js, (65535 - (best & 65535)).to(tl.int64), mask=js < k)

    @triton.jit
    def _topk16_lanes_kernel(src, out_bits, out_idx, scratch, n, k,
                             NG: tl.constexpr, MP: tl.constexpr, KP: tl.constexpr, SCR: tl.constexpr):
        # Groups are the NG lanes of a chunked pass over the row: group j = {j, j + NG, j + 2 NG, ...}
        # (MP members at most, NG <= n so every group has a real member). Pass 1 (elementwise, from
        # HBM): each lane's maximum key. The k groups with the largest maxima hold a top k (a key
        # outside them is <= the smallest of their k maxima, and each of them has a key >= it).
        # Pass 2 reads only those k groups' k * MP keys (from L2). Packed keys are unique (they
        # carry the lane or the index), so "the first k after a descending sort" is exact.
        row = tl.program_id(0).to(tl.int64)
        base = src + row * n
        lanes = tl.arange(0, NG)
        lane_max = tl.zeros([NG], dtype=tl.int32)
        for c0 in range(0, n, NG):
            offs = c0 + lanes
            ok = offs < n
            lane_max = tl.maximum(lane_max, tl.where(ok, _key16(tl.load(base + offs, mask=ok, other=0).to(tl.int32)), 0))
        ranked = tl.sort(((lane_max - 32768) << 16) | (65535 - lanes), descending=True)
        scr = scratch + row * SCR
        tl.store(scr + lanes, ranked)
        tl.debug_barrier()
        js = tl.arange(0, KP)
        top_lanes = 65535 - (tl.load(scr + js) & 65535)  # KP <= NG slots, all written
        tl.debug_barrier()
        offs = top_lanes[:, None] + tl.arange(0, MP)[None, :] * NG
        ok = (js[:, None] < k) & (offs < n)
        key = _key16(tl.load(base + offs, mask=ok, other=0).to(tl.int32))
        packed = tl.where(ok, ((key - 32768) << 16) | (65535 - offs), -2147483648)
        best = tl.sort(tl.reshape(packed, [KP * MP]), descending=True)
        tl.store(scr + tl.arange(0, KP * MP), best)
        tl.debug_barrier()
        best = tl.load(scr + js)
        kk = (best >> 16) + 32768
        bits = tl.where(kk >= 32768, kk - 32768, -1 - kk)
        tl.store(out_bits + row * k + js, bits.to(tl.int16), mask=js < k)
        tl.store(out_idx + row * k + js, (65535 - (best & 65535)).to(tl.int64), mask=js < k)

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

    @triton.jit
    def _constrain_rows_kernel(grad, w, d, BLOCK_D: tl.constexpr):
        r = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK_D)
        ok = cols < d
        g = tl.load(grad + r * d + cols, mask=ok, other=0.0).to(tl.float32)
        v = tl.load(w + r * d + cols, mask=ok, other=0.0).to(tl.float32)
        g -= tl.sum(g * v, axis=0) * v
        tl.store(grad + r * d + cols, g.to(grad.dtype.element_ty), mask=ok)

    @triton.jit
    def _normalize_rows_kernel(w, d, eps, BLOCK_D: tl.constexpr):
        r = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK_D)
        ok = cols < d
        v = tl.load(w + r * d + cols, mask=ok, other=0.0).to(tl.float32)
        norm = tl.maximum(tl.sqrt(tl.sum(v * v, axis=0)), eps)
        tl.store(w + r * d + cols, (v / norm).to(w.dtype.element_ty), mask=ok)

    @triton.jit
    def _segment_sum_kernel(coef, order, offsets, dense, out, d, k,
                            ACC: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr):
        # out[i, cols] = sum over sorted entries p in [offsets[i], offsets[i+1]) of coef[e] * dense[e // k, cols], e = order[p]
        i = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        col_ok = cols < d
        start = tl.load(offsets + i)
        end = tl.load(offsets + i + 1)
        acc = tl.zeros([BLOCK_D], dtype=ACC)
        for p0 in range(start, end, BLOCK_E):
            ps = p0 + tl.arange(0, BLOCK_E)
            p_ok = ps < end
            e = tl.load(order + ps, mask=p_ok, other=0).to(tl.int64)
            c = tl.load(coef + e, mask=p_ok, other=0.0).to(ACC)
            g = tl.load(dense + (e // k)[:, None] * d + cols[None, :], mask=p_ok[:, None] & col_ok[None, :], other=0.0)
            acc += tl.sum(c[:, None] * g.to(ACC), axis=0)
        tl.store(out + i * d + cols, acc.to(out.dtype.element_ty), mask=col_ok)

    @triton.jit
    def _gather_dot_kernel(dense, table, indices, out, B, n, d, k,
                           ACC: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
        r = tl.program_id(0).to(tl.int64)
        js = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        j_ok = js < k
        rows = (r // B) * n + tl.load(indices + r * k + js, mask=j_ok, other=0).to(tl.int64)
        acc = tl.zeros([BLOCK_K], dtype=ACC)
        for c0 in range(0, d, BLOCK_D):
            cols = c0 + tl.arange(0, BLOCK_D)
            col_ok = cols < d
            x = tl.load(dense + r * d + cols, mask=col_ok, other=0.0).to(ACC)
            w = tl.load(table + rows[:, None] * d + cols[None, :], mask=j_ok[:, None] & col_ok[None, :], other=0.0)
            acc += tl.sum(w.to(ACC) * x[None, :], axis=1)
        tl.store(out + r * k + js, acc.to(out.dtype.element_ty), mask=j_ok)


def _gather_sum(values: Tensor, indices: Tensor, table: Tensor, bias: Tensor | None) -> Tensor:
    """Launch gather-sum; returns ``[S, B, d]`` in ``table.dtype``."""
    S, B, k = values.shape
    n, d = table.shape[-2:]
    out = torch.empty(S, B, d, dtype=table.dtype, device=table.device)
    acc = _acc_dtype(values, table)
    bias_arg = bias.contiguous() if bias is not None else table
    grid = (S * B, triton.cdiv(d, _BLOCK_D))
    _gather_sum_kernel[grid](values.contiguous(), indices.contiguous(), table.contiguous(), bias_arg, out, B, n, d, k,
                             HAS_BIAS=bias is not None, ACC=_TL_DTYPE[acc], BLOCK_K=_BLOCK_K, BLOCK_D=_BLOCK_D)
    return out


def scatter_rows(
    coef: Float[Tensor, "S B k"], indices: Int[Tensor, "S B k"], dense: Float[Tensor, "S B d"], n: int,
    sorted_segments: bool | None = None,
) -> Float[Tensor, "S n d"]:
    """``out[s, i] = sum over (b, j) with indices[s, b, j] == i of coef[s, b, j] * dense[s, b]``.

    ``sorted_segments`` picks the sorted segment sums (True) or atomic adds (False); None picks
    segments when there are at least 8 entries per output row on average (``B * k >= 8 n``).
    """
    S, B, k = coef.shape
    d = dense.shape[-1]
    acc = _acc_dtype(coef, dense)
    if sorted_segments is None:
        sorted_segments = B * k >= _SEGMENT_MIN_ENTRIES * n
    if not sorted_segments:
        out = torch.zeros(S, n, d, dtype=acc, device=dense.device)
        grid = (S * B, triton.cdiv(d, _BLOCK_D))
        _scatter_rows_kernel[grid](coef.contiguous(), indices.contiguous(), dense.contiguous(), out, B, n, d, k,
                                   ACC=_TL_DTYPE[acc], BLOCK_K=_BLOCK_K, BLOCK_D=_BLOCK_D)
        return out.to(dense.dtype)
    flat = indices.reshape(S, B * k).to(torch.int32 if S * n < 2**31 else torch.int64)
    if S > 1:
        flat = flat + torch.arange(S, device=flat.device, dtype=flat.dtype).mul_(n).view(S, 1)
    rows, order = torch.sort(flat.reshape(-1))
    offsets = torch.searchsorted(rows, torch.arange(S * n + 1, device=flat.device, dtype=flat.dtype))
    out = torch.empty(S, n, d, dtype=dense.dtype, device=dense.device)
    grid = (S * n, triton.cdiv(d, _BLOCK_D_SEG))
    _segment_sum_kernel[grid](coef.contiguous(), order, offsets, dense.contiguous(), out, d, k,
                              ACC=_TL_DTYPE[acc], BLOCK_E=_BLOCK_E, BLOCK_D=_BLOCK_D_SEG)
    return out


def gather_dot(
    dense: Float[Tensor, "S B d"], table: Float[Tensor, "S n d"], indices: Int[Tensor, "S B k"]
) -> Float[Tensor, "S B k"]:
    """``out[s, b, j] = dense[s, b] . table[s, indices[s, b, j]]``."""
    S, B, k = indices.shape
    n, d = table.shape[-2:]
    out = torch.empty(S, B, k, dtype=dense.dtype, device=dense.device)
    acc = _acc_dtype(dense, table)
    grid = (S * B, triton.cdiv(k, _BLOCK_K))
    _gather_dot_kernel[grid](dense.contiguous(), table.contiguous(), indices.contiguous(), out, B, n, d, k,
                             ACC=_TL_DTYPE[acc], BLOCK_K=_BLOCK_K, BLOCK_D=_BLOCK_D)
    return out


class _SparseDecode(torch.autograd.Function):
    """Triton gather-sum forward; backward is gather-dot (values) and scatter-rows (table)."""

    @staticmethod
    def forward(ctx, values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor | None) -> Tensor:
        ctx.save_for_backward(values, indices, W_dec)
        ctx.has_bias = b_dec is not None
        return _gather_sum(values, indices, W_dec, b_dec)

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, None, Tensor | None, Tensor | None]:
        values, indices, W_dec = ctx.saved_tensors
        grad_values = gather_dot(grad_out, W_dec, indices).to(values.dtype) if ctx.needs_input_grad[0] else None
        grad_W_dec = scatter_rows(values, indices, grad_out, W_dec.shape[-2]).to(W_dec.dtype) if ctx.needs_input_grad[2] else None
        grad_b_dec = grad_out.sum(1) if ctx.has_bias and ctx.needs_input_grad[3] else None
        return grad_values, None, grad_W_dec, grad_b_dec


def sparse_decode(
    values: Float[Tensor, "S B k"], indices: Int[Tensor, "S B k"], W_dec: Float[Tensor, "S n d"],
    b_dec: Float[Tensor, "S d"] | None = None,
) -> Float[Tensor, "S B d"]:
    """``x_hat[s, b] = sum_j values[s, b, j] * W_dec[s, indices[s, b, j]] (+ b_dec[s])``, fused, sparse backward."""
    return _SparseDecode.apply(values, indices, W_dec, b_dec)


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


def topk_fast(n: int, k: int) -> bool:
    """Whether :func:`topk_rows` takes its filter path for rows of ``n`` and this ``k`` (else every
    row goes to the radix select, measured slower than ``torch.topk``: 1,565 vs 1,068 us at n 32k)."""
    return 0 < k <= min(n, _TOPK_MAX_K) and triton.next_power_of_2(n) <= _TOPK_MAX_N


_TOPK_METHODS = ("filter", "lanes")


def topk_method() -> str:
    """``INTERP_TRITON_TOPK``: ``"filter"`` (default; measured on an H100) or ``"lanes"`` (see :func:`topk_rows`)."""
    method = os.environ.get("INTERP_TRITON_TOPK", "filter")
    if method not in _TOPK_METHODS:
        raise ValueError(f"INTERP_TRITON_TOPK must be 'filter' or 'lanes', got {method!r}")
    return method


def _lane_groups(n: int, k: int) -> tuple[int, int, int] | None:
    """``(NG, MP, KP)`` of the lane-group top-k for rows of ``n``, or None when it does not apply.

    NG groups (a power of two <= n, 1,024 up to n 32k, then n / 32), MP members per group padded
    to a power of two, KP = k padded; it applies when there are at least 4 KP groups.
    """
    if not 0 < k <= _TOPK_MAX_K or n > _TOPK_MAX_N:
        return None
    kp = triton.next_power_of_2(k)
    ng = min(1 << (n.bit_length() - 1), max(1024, triton.next_power_of_2(n) // 32))
    if ng < 4 * kp:
        return None
    return ng, triton.next_power_of_2(triton.cdiv(n, ng)), kp


def topk_rows(x: Float[Tensor, "... n"], k: int, method: str | None = None) -> tuple[Tensor, Int[Tensor, "... k"]]:
    """The k largest entries of each row of a bf16/fp16 tensor and their indices (exact, unsorted).

    Values come back bit for bit (NaN counts as larger than +inf, as an order-preserving key).
    Other dtypes: use ``torch.topk``. Two exact methods (``method`` None reads :func:`topk_method`):

    - ``"filter"``: strided-group bound, candidates by atomic slots, radix select for rows with
      many ties (module docstring); ties at the k-th value keep the lowest indices;
    - ``"lanes"``: one kernel, no atomics and no second kernel: the row's maximum per lane of a
      chunked pass (NG groups of n / NG strided members), a sort of the NG lane maxima picks the k
      best groups, and a sort of their k·n/NG members (read from L2) gives the answer. Among ties
      at the k-th value it may keep other indices than the lowest. Rows it does not suit
      (:func:`_lane_groups`) take the filter.
    """
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise TypeError(f"topk_rows takes bf16/fp16 rows, got {x.dtype}")
    method = method or topk_method()
    if method not in _TOPK_METHODS:
        raise ValueError(f"topk_rows: method must be 'filter' or 'lanes', got {method!r}")
    n = x.shape[-1]
    if not 0 < k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    rows = x.reshape(-1, n).contiguous().view(torch.int16)
    R = rows.shape[0]
    values = torch.empty(R, k, dtype=x.dtype, device=x.device)
    indices = torch.empty(R, k, dtype=torch.int64, device=x.device)
    out_bits = values.view(torch.int16)
    if method == "lanes" and (shape := _lane_groups(n, k)) is not None:
        ng, mp, kp = shape
        scr = max(ng, kp * mp)
        scratch = torch.empty(R, scr, dtype=torch.int32, device=x.device)
        _topk16_lanes_kernel[(R,)](rows, out_bits, indices, scratch, n, k, NG=ng, MP=mp, KP=kp, SCR=scr, num_warps=8 if ng >= 1024 else 4)
        return values.view(*x.shape[:-1], k), indices.view(*x.shape[:-1], k)
    counts = torch.empty(R, dtype=torch.int32, device=x.device)
    kp = triton.next_power_of_2(k)
    n_pad = triton.next_power_of_2(n)
    if topk_fast(n, k):
        G = min(4 * kp, n_pad)  # groups: G >= k always (k <= n <= n_pad)
        cap = 4 * kp  # candidates kept per row; more go to the radix select
        scratch = torch.empty(R, cap, dtype=torch.int32, device=x.device)
        counts.zero_()
        block = max(G, min(_TOPK_BLOCK, n_pad))
        _topk16_filter_kernel[(R,)](rows, out_bits, indices, scratch, counts, n, k, G=G, BLOCK=block, CAP=cap, KP=kp, num_warps=4)
    else:
        cap = -1  # every row takes the radix select
        counts.zero_()
    block = min(_TOPK_BLOCK, triton.next_power_of_2(n))
    _topk16_kernel[(R,)](rows, out_bits, indices, counts, n, k, cap, BLOCK=block, num_warps=8 if block >= 2048 else 4)
    return values.view(*x.shape[:-1], k), indices.view(*x.shape[:-1], k)


def constrain_rows(grad: Float[Tensor, "... d"], w: Float[Tensor, "... d"]) -> None:
    """In place: ``grad[r] -= (grad[r] . w[r]) w[r]`` for every row (fp32 arithmetic)."""
    d = grad.shape[-1]
    assert grad.is_contiguous() and w.is_contiguous() and grad.shape == w.shape
    _constrain_rows_kernel[(grad.numel() // d,)](grad, w, d, BLOCK_D=triton.next_power_of_2(d))


def normalize_rows(w: Float[Tensor, "... d"], eps: float = 1e-12) -> None:
    """In place: ``w[r] /= max(||w[r]||, eps)`` for every row (fp32 arithmetic)."""
    d = w.shape[-1]
    assert w.is_contiguous()
    _normalize_rows_kernel[(w.numel() // d,)](w, d, eps, BLOCK_D=triton.next_power_of_2(d))
