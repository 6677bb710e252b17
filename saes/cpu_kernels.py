"""Compiled CPU versions of the sparse SAE kernels in :mod:`saes.kernels` (Numba, no GIL).

Same flattened layout as the torch path: a stack of S SAEs is one table ``[S * n, d]`` and one
batch ``[S * B, ...]``; ``rows[r, j]`` indexes the table. Each kernel is one loop nest that
torch would run as several ops (each a pass over memory with its own dispatch):

- gather-sum (decoder forward): ``y[r] = sum_j values[r, j] * table[rows[r, j]]``;
- scatter-rows (weight gradients): ``out[i] = sum over (r, j) with rows[r, j] == i of
  coef[r, j] * dense[r]``. Threads own disjoint ranges of output rows and each scans every entry
  in order, so there are no races and the sum order (hence the result) does not depend on the
  thread count. Gather-sum and scatter-rows skip entries whose coefficient is 0 (ReLU'd AuxK
  picks, BatchTopK's unkept candidates: at 3 zeros in 4, 8 vs 26–40 ms and 12 vs 32 ms for 128
  entries per token), so unlike torch a non-finite row times a zero coefficient adds nothing
  rather than NaN;
- gather-dot (gradient of the selected values): ``out[r, j] = dense[r] . table[rows[r, j]]``;
- centred statistics (the FVU's denominator): per member, the float64 column sums and squared
  norm of the batch in one pass;
- decoder-row constraint and renormalisation, one pass per row each: remove from a gradient row
  its component along the (unit) decoder row, and rescale a decoder row to unit norm (torch's
  ``vecdot`` + ``addcmul_`` first writes the ``[S * n, d]`` product to fresh memory, and
  ``vector_norm`` + ``div_`` reads the table twice);
- row top-k, exact (same values as ``torch.topk``): the row is split into ``m = n / 8`` strided
  groups ``{g, g + m, ..., g + 7m}``. The smallest of the maxima of k blocks of group maxima is a
  bound with at least k group maxima above it, which keeps ~100 of the m maxima; a k-slot min-heap
  picks the k largest. Every one of the row's k largest entries lies in one of those k groups
  (an entry outside them has k group maxima at least as large), and only members at least the
  k-th largest group maximum can qualify: ~34 of the 8k members on random rows, selected by the
  same heap. Rows holding a NaN (which ``torch.topk`` ranks above everything) are left to
  ``torch.topk``. Used for rows with ``n >= 16 k`` (where it was measured faster than torch).

On one thread of the 2-core AMD EPYC development machine, for a batch of 4,096 tokens, k 32, d 576 and
4,096 latents: top-k 15 vs 45 ms (torch's strided-group top-k), gather-dot 5.5 vs 10.6 ms,
scatter-rows 8.4 vs 11.6 ms (benchmarks/RESULTS.md). Work is split over ``torch.get_num_threads()``
Python threads (the kernels release the GIL). :mod:`saes.kernels` uses these kernels for CPU
tensors when Numba imports and ``INTERP_NUMBA`` is not ``"0"``.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch import Tensor

from interp.compiled import AVAILABLE, FASTMATH, compiled_enabled_for, njit_cached, numba

__all__ = [
    "AVAILABLE", "enabled_for", "topk_enabled_for", "gather_sum", "scatter_rows", "gather_dot", "centered_stats", "constrain_rows",
    "normalize_rows", "topk_rows", "topk_supported",
]

_GROUPS = 8
_MIN_WORK_PER_THREAD = 1 << 18  # multiply-adds (or row entries) below which one thread does it all


def enabled_for(t: Tensor) -> bool:
    """Whether ``t`` should use these kernels: a CPU tensor of float32 or float64, Numba imports and
    ``INTERP_NUMBA != "0"``."""
    return compiled_enabled_for(t)


def topk_enabled_for(t: Tensor) -> bool:
    """:func:`enabled_for`, or a bf16 CPU tensor under the same switches (:func:`topk_rows` reads its bits)."""
    return compiled_enabled_for(t, dtypes=(torch.float32, torch.float64, torch.bfloat16))


if numba is not None:
    _jit = njit_cached(nogil=True, boundscheck=False, fastmath=FASTMATH)

    @_jit
    def _gather_sum(values, rows, table, out, r0, r1):
        d = table.shape[1]
        for r in range(r0, r1):
            y = out[r]
            y[:] = 0
            for j in range(rows.shape[1]):
                c = values[r, j]
                if c == 0:  # ReLU'd AuxK picks, BatchTopK's unkept candidates
                    continue
                w = table[rows[r, j]]
                for t in range(d):
                    y[t] += c * w[t]

    @_jit
    def _scatter_rows(coef, rows, dense, out, lo, hi):
        d = dense.shape[1]
        out[lo:hi] = 0
        for r in range(rows.shape[0]):
            x = dense[r]
            for j in range(rows.shape[1]):
                i = rows[r, j]
                c = coef[r, j]
                if lo <= i < hi and c != 0:
                    o = out[i]
                    for t in range(d):
                        o[t] += c * x[t]

    @_jit
    def _gather_dot(dense, rows, table, out, r0, r1):
        d = dense.shape[1]
        zero = np.zeros(1, dtype=out.dtype)[0]
        for r in range(r0, r1):
            x = dense[r]
            for j in range(rows.shape[1]):
                w = table[rows[r, j]]
                s = zero
                for t in range(d):
                    s += x[t] * w[t]
                out[r, j] = s

    @_jit
    def _centered_stats(x, col_sum, sq_sum, s0, s1):
        # float64 accumulation in one pass: col_sum[s] = sum_b x[s, b], sq_sum[s] = sum_b ||x[s, b]||^2
        d = x.shape[2]
        for s in range(s0, s1):
            acc = col_sum[s]
            acc[:] = 0
            total = 0.0
            for b in range(x.shape[1]):
                row = x[s, b]
                for t in range(d):
                    v = np.float64(row[t])
                    acc[t] += v
                    total += v * v
            sq_sum[s] = total

    @_jit
    def _constrain_rows(grad, w, r0, r1):
        d = grad.shape[1]
        zero = np.zeros(1, dtype=grad.dtype)[0]
        for r in range(r0, r1):
            g = grad[r]
            v = w[r]
            s = zero
            for t in range(d):
                s += g[t] * v[t]
            for t in range(d):
                g[t] -= s * v[t]

    @_jit
    def _normalize_rows(w, eps, r0, r1):
        d = w.shape[1]
        zero = np.zeros(1, dtype=w.dtype)[0]
        for r in range(r0, r1):
            v = w[r]
            s = zero
            for t in range(d):
                s += v[t] * v[t]
            norm = max(np.sqrt(s), eps)
            for t in range(d):
                v[t] /= norm

    @numba.njit(inline="always")
    def _sift_down(vals, idx, k, pos, v, i):
        """Put ``(v, i)`` at ``pos`` of the min-heap ``vals[:k]`` and move it down to its place."""
        while True:
            c = 2 * pos + 1
            if c >= k:
                break
            if c + 1 < k and vals[c + 1] < vals[c]:
                c += 1
            if vals[c] >= v:
                break
            vals[pos] = vals[c]
            idx[pos] = idx[c]
            pos = c
        vals[pos] = v
        idx[pos] = i

    @numba.njit(inline="always")
    def _heap_top_k(vals, idx, start, count, k, out_v, out_i):
        """The k largest of ``vals[start:start+count]`` (``count >= k``) into ``out_v[:k]`` as a min-heap."""
        for j in range(k):
            out_v[j] = vals[start + j]
            out_i[j] = idx[start + j]
        for s in range(k // 2 - 1, -1, -1):
            _sift_down(out_v, out_i, k, s, out_v[s], out_i[s])
        for j in range(start + k, start + count):
            v = vals[j]
            if v > out_v[0]:
                _sift_down(out_v, out_i, k, 0, v, idx[j])

    @numba.njit(inline="always")
    def _row_top_k(row, k, group_max, cand_v, cand_i, heap_v, heap_i, out_v, out_i):
        """The k largest of ``row`` into ``out_v``/``out_i`` (see the module docstring); False when the
        row holds a NaN or too few candidates (the caller leaves it to ``torch.topk``)."""
        m = row.shape[0] // _GROUPS
        block = m // k  # k blocks of group maxima for the first bound (m >= 2k)
        for j in range(m):
            group_max[j] = row[j]
        for g in range(1, _GROUPS):
            off = g * m
            for j in range(m):
                a = group_max[j]
                b = row[off + j]
                group_max[j] = a if (a > b or a != a) else b  # a NaN member makes the maximum NaN
        bound = group_max[0]
        for blk in range(k):
            bm = group_max[blk * block]
            for j in range(blk * block + 1, (blk + 1) * block):
                bm = max(bm, group_max[j])
            bound = bm if blk == 0 else min(bound, bm)
        count = 0
        nan = False
        for j in range(m):  # branch-free compaction of the maxima >= bound
            v = group_max[j]
            nan |= v != v
            cand_v[count] = v
            cand_i[count] = j
            count += v >= bound
        if nan or count < k:
            return False
        _heap_top_k(cand_v, cand_i, 0, count, k, heap_v, heap_i)
        kth = heap_v[0]
        count = 0
        for a in range(k):
            for g in range(_GROUPS):
                p = heap_i[a] + g * m
                v = row[p]
                cand_v[count] = v
                cand_i[count] = p
                count += v >= kth
        _heap_top_k(cand_v, cand_i, 0, count, k, out_v, out_i)
        return True

    @njit_cached(nogil=True, boundscheck=False)
    def _topk_rows(x, k, out_v, out_i, fallback, r0, r1):
        m = x.shape[1] // _GROUPS
        group_max = np.empty(m, dtype=x.dtype)
        cand_v = np.empty(m + _GROUPS * k, dtype=x.dtype)
        cand_i = np.empty(m + _GROUPS * k, dtype=np.int64)
        heap_v = np.empty(k, dtype=x.dtype)
        heap_i = np.empty(k, dtype=np.int64)
        for r in range(r0, r1):
            fallback[r] = not _row_top_k(x[r], k, group_max, cand_v, cand_i, heap_v, heap_i, out_v[r], out_i[r])

    @njit_cached(nogil=True, boundscheck=False)
    def _topk_rows_bf16(bits, k, out_bits, out_i, fallback, r0, r1):
        # bf16 rows read as int16 bit patterns, ranked through order-preserving int32 keys (the bits of
        # a non-negative float, bits ^ 0x7FFF for a negative one); rows with a NaN of either sign
        # (which the keys would misplace) are left to torch.topk.
        n = bits.shape[1]
        m = n // _GROUPS
        keys = np.empty(n, dtype=np.int32)
        group_max = np.empty(m, dtype=np.int32)
        cand_v = np.empty(m + _GROUPS * k, dtype=np.int32)
        cand_i = np.empty(m + _GROUPS * k, dtype=np.int64)
        heap_v = np.empty(k, dtype=np.int32)
        heap_i = np.empty(k, dtype=np.int64)
        out_v = np.empty(k, dtype=np.int32)
        for r in range(r0, r1):
            row = bits[r]
            nan = False
            for j in range(n):
                b = np.int32(row[j])
                nan |= (b & 0x7FFF) > 0x7F80
                keys[j] = b if b >= 0 else b ^ 0x7FFF
            if nan or not _row_top_k(keys, k, group_max, cand_v, cand_i, heap_v, heap_i, out_v, out_i[r]):
                fallback[r] = True
                continue
            for a in range(k):
                v = out_v[a]
                out_bits[r, a] = v if v >= 0 else v ^ 0x7FFF


_pool: ThreadPoolExecutor | None = None
_pool_size = 0


def _forget_pool() -> None:
    """A forked child has none of the parent's worker threads: it must start its own pool."""
    global _pool, _pool_size
    _pool, _pool_size = None, 0


os.register_at_fork(after_in_child=_forget_pool)


def _run(kernel, parts: int, total: int, *args) -> None:
    """``kernel(*args, lo, hi)`` over ``parts`` contiguous ranges of ``[0, total)``, one per thread."""
    if parts <= 1:
        kernel(*args, 0, total)
        return
    global _pool, _pool_size
    if _pool is None or _pool_size < parts:
        _pool, _pool_size = ThreadPoolExecutor(max_workers=parts, thread_name_prefix="interp-cpu-kernels"), parts
    bounds = np.linspace(0, total, parts + 1).astype(np.int64)
    ranges = [(int(lo), int(hi)) for lo, hi in zip(bounds[:-1], bounds[1:]) if hi > lo]
    try:
        futures = [_pool.submit(kernel, *args, lo, hi) for lo, hi in ranges]
    except RuntimeError:  # the interpreter is shutting down (a thread still training after main returned)
        kernel(*args, 0, total)
        return
    for f in futures:
        f.result()


def _check_rows(rows: Tensor, n_rows: int) -> None:
    """The kernels do not bounds-check: an index outside the table fails here, as torch's ops would."""
    if rows.numel():
        lo, hi = (int(v) for v in torch.aminmax(rows))
        if lo < 0 or hi >= n_rows:
            raise IndexError(f"row index out of range [0, {n_rows}): min {lo}, max {hi}")


def _parts(work: int, total: int) -> int:
    return max(1, min(torch.get_num_threads(), total, work // _MIN_WORK_PER_THREAD))


def gather_sum(values: Tensor, rows: Tensor, table: Tensor) -> Tensor:
    """``[R, d]``: ``sum_j values[r, j] * table[rows[r, j]]`` (``values`` [R, k] in the table's dtype)."""
    R, k = rows.shape
    _check_rows(rows, table.shape[0])
    out = torch.empty(R, table.shape[1], dtype=table.dtype)
    v, t = values.detach().to(table.dtype).contiguous(), table.detach().contiguous()
    _run(_gather_sum, _parts(R * k * t.shape[1], R), R, v.numpy(), rows.contiguous().numpy(), t.numpy(), out.numpy())
    return out


def scatter_rows(coef: Tensor, rows: Tensor, dense: Tensor, n_rows: int, out: Tensor | None = None) -> Tensor:
    """``[n_rows, d]``: row ``i`` is ``sum over (r, j) with rows[r, j] == i of coef[r, j] * dense[r]`` (into ``out`` when given)."""
    R, k = rows.shape
    _check_rows(rows, n_rows)
    if out is None:
        out = torch.empty(n_rows, dense.shape[1], dtype=dense.dtype)
    assert out.shape == (n_rows, dense.shape[1]) and out.dtype == dense.dtype and out.is_contiguous(), (out.shape, out.dtype)
    c, x = coef.detach().to(dense.dtype).contiguous(), dense.detach().contiguous()
    _run(_scatter_rows, _parts(R * k * x.shape[1], n_rows), n_rows, c.numpy(), rows.contiguous().numpy(), x.numpy(), out.numpy())
    return out


def gather_dot(dense: Tensor, rows: Tensor, table: Tensor) -> Tensor:
    """``[R, k]``: ``dense[r] . table[rows[r, j]]`` (in ``dense``'s dtype; ``table`` is cast to it)."""
    R, k = rows.shape
    _check_rows(rows, table.shape[0])
    out = torch.empty(R, k, dtype=dense.dtype)
    x, t = dense.detach().contiguous(), table.detach().to(dense.dtype).contiguous()
    _run(_gather_dot, _parts(R * k * x.shape[1], R), R, x.numpy(), rows.contiguous().numpy(), t.numpy(), out.numpy())
    return out


def centered_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """``(sum over b of x[s, b] [S, d], sum over b of ||x[s, b]||^2 [S])`` of ``x`` ``[S, B, d]``, accumulated in float64
    in one pass (torch's ``x.sum(1, dtype=torch.float64)`` first writes a float64 copy of ``x``)."""
    S, _, d = x.shape
    col_sum = torch.empty(S, d, dtype=torch.float64)
    sq_sum = torch.empty(S, dtype=torch.float64)
    _centered_stats(x.detach().contiguous().numpy(), col_sum.numpy(), sq_sum.numpy(), 0, S)
    return col_sum, sq_sum


def constrain_rows(grad: Tensor, w: Tensor) -> None:
    """In place: ``grad[r] -= (grad[r] . w[r]) w[r]`` for every row of the contiguous ``[..., d]`` tensors."""
    assert grad.shape == w.shape and grad.is_contiguous() and w.dtype == grad.dtype, (grad.shape, w.shape, grad.dtype, w.dtype)
    d = grad.shape[-1]
    g, v = grad.detach().view(-1, d), w.detach().contiguous().view(-1, d)
    _run(_constrain_rows, _parts(g.numel(), g.shape[0]), g.shape[0], g.numpy(), v.numpy())


def normalize_rows(w: Tensor, eps: float = 1e-12) -> None:
    """In place: ``w[r] /= max(||w[r]||, eps)`` for every row of the contiguous ``[..., d]`` tensor."""
    assert w.is_contiguous(), w.shape
    v = w.detach().view(-1, w.shape[-1])
    _run(_normalize_rows, _parts(v.numel(), v.shape[0]), v.shape[0], v.numpy(), eps)


def topk_supported(n: int, k: int) -> bool:
    """Whether :func:`topk_rows` handles rows of ``n`` with this ``k`` and beats ``torch.topk`` there:
    ``n`` divisible by 8 and at least 16k (one thread, 2,048 rows: 30 vs 73 ms for k 128 of 4,096,
    47 vs 76 ms for k 256; at ``n = 8k`` it loses, 36 vs 21 ms for k 128 of 1,024)."""
    return 0 < k and n % _GROUPS == 0 and n >= 16 * k


def topk_rows(x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k largest entries of each row of a contiguous CPU tensor and their indices, unordered.

    Exact: the same values as ``torch.topk`` (among ties at the k-th value, possibly other indices,
    and a tie of zeros may return ``+0.0`` where torch returns ``-0.0``). No autograd: the values
    carry no gradient (:func:`saes.kernels.topk` sends rows that require one to ``torch.topk``).
    float32, float64 and bf16 rows (bf16: the bf16 encoder's pre-activations, read as bit patterns).
    """
    n = x.shape[-1]
    assert topk_supported(n, k) and x.is_contiguous(), (n, k)
    rows = x.reshape(-1, n)
    R = rows.shape[0]
    values = torch.empty(R, k, dtype=x.dtype)
    indices = torch.empty(R, k, dtype=torch.int64)
    fallback = torch.zeros(R, dtype=torch.bool)
    if x.dtype == torch.bfloat16:
        _run(_topk_rows_bf16, _parts(R * n, R), R, rows.detach().view(torch.int16).numpy(), k, values.view(torch.int16).numpy(),
             indices.numpy(), fallback.numpy())
    else:
        _run(_topk_rows, _parts(R * n, R), R, rows.detach().numpy(), k, values.numpy(), indices.numpy(), fallback.numpy())
    if bool(fallback.any()):
        bad = fallback.nonzero().squeeze(1)
        values[bad], indices[bad] = rows[bad].topk(k, dim=-1, sorted=False)
    return values.view(*x.shape[:-1], k), indices.view(*x.shape[:-1], k)
