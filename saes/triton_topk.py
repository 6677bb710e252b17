"""Exact row top-k of 16-bit floats in Triton (the bf16 pre-activations of the SAE step on CUDA).

One program per row. Floats map to order-preserving 16-bit keys; a candidate is packed as
``(key << 16) | (65535 - index)`` (rows of at most 65,536), so packed keys are unique and a
descending sort puts the answer first. Two exact methods (:func:`topk_rows`):

- filter (default, timed on an H100): the row is split into G = 4k strided groups; the k-th
  largest of the G group maxima is a bound ``t`` with at least k keys >= t, so the top k are
  among the candidates >= t (37 on average, at most 49, for k 32 of 32,768 on random rows; a
  second pass over the row, from L2, collects them). Both passes are elementwise (no reduction or
  scan inside the loops). The candidates take slots of a per-row buffer of 4k by atomic
  increments of the row's counter, and are sorted; the first k are the answer (ties keep the
  lowest indices). Rows with more candidates than the buffer holds (many ties) are finished by a
  radix select: 256-bin histograms of the keys' high and low bytes find the k-th key, then a
  prefix sum writes the keys above it and the first ties;
- lanes (opt-in, ``INTERP_TRITON_TOPK=lanes``, until timed on a GPU): one kernel, no atomics;
  described in :func:`topk_rows`.

Used through :mod:`saes.triton_kernels`, which re-exports :func:`topk_rows`.
"""

from __future__ import annotations

import os

import torch
from jaxtyping import Float, Int
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # Triton is optional: callers check saes.triton_kernels.AVAILABLE first.
    triton = None

__all__ = ["topk_rows", "topk_fast", "topk_method"]

_TOPK_BLOCK = 2048  # keys per chunk
_TOPK_MAX_N = 65536  # indices packed in 16 bits
_TOPK_MAX_K = 64  # larger k: torch.topk (the filter's candidate count grows with k)

if triton is not None:

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
