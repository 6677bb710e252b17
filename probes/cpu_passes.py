"""The passes over a probe design that the compiled solver (:mod:`probes.cpu_solver`) makes.

``x`` ``[n, D]`` is one problem's standardised design with its bias column, row-major (one
layout suffices here, unlike the torch solver's two). Columns come in groups of 4 (``w4``,
``d4``, ``v4``: ``[4, D]``; logits ``[4, n]``). Measured on the 2-core development machine (one
thread, 624 × 577, 4 columns): the Hessian-vector product ``Xᵀ(h ⊙ X d)`` in one pass 60 µs
against 127 µs for torch's two GEMMs (which read the design twice; 120 vs 260 µs out of cache).
"""

from __future__ import annotations

import math

import numpy as np

from interp.compiled import FASTMATH, njit_cached

__all__ = ["GROUP", "hvp4", "logits", "standardised_design", "transposed4"]

GROUP = 4
"""Columns per group (one pass over the rows serves a group)."""
_R = 4  # rows per block in the accumulating loops

_jit = njit_cached(nogil=True, boundscheck=False, fastmath=FASTMATH)
# The inner loops are inlined into their callers (as one function, LLVM sees the local buffers).
_inline = njit_cached(nogil=True, boundscheck=False, fastmath=FASTMATH, inline="always")



@_jit
def _standardise(x, rows, s, mean, std):
    """Weighted mean and standard deviation of the rows ``x[rows]``: two passes in float64, as the
    torch path (one pass of sums and squares lost 1e-2 of σ at |μ|/σ = 1e3 in float32); a constant
    feature (variance ≤ 1e-12) keeps scale 1, so that it stays zero instead of exploding."""
    d = x.shape[1]
    mu = np.zeros(d)
    for i in range(rows.shape[0]):
        si = np.float64(s[i])
        for j in range(d):
            mu[j] += si * np.float64(x[rows[i], j])
    var = np.zeros(d)
    for i in range(rows.shape[0]):
        si = np.float64(s[i])
        for j in range(d):
            diff = np.float64(x[rows[i], j]) - mu[j]
            var[j] += si * diff * diff
    for j in range(d):
        mean[j] = mu[j]
        std[j] = math.sqrt(var[j]) if var[j] > 1e-12 else 1.0


@_jit
def _write_design(x, rows, mean, std, out):
    """``out[i] = [(x[rows[i]] - mean) / std, 1]``."""
    d = x.shape[1]
    inv = np.empty(d, x.dtype)
    for j in range(d):
        inv[j] = 1.0 / std[j]
    for i in range(rows.shape[0]):
        r = rows[i]
        for j in range(d):
            out[i, j] = (x[r, j] - mean[j]) * inv[j]
        out[i, d] = 1.0


@_inline
def _dots4(x, w4, z4, i0, i1):
    """``z4[c, i] = x[i] · w4[c]`` for the 4 rows of ``w4`` and the rows ``i0 ≤ i < i1``.

    Two rows at a time share the loads of ``w4`` (27 vs 42 µs for 624 × 577 and 4 columns); an
    odd last row is paired with itself."""
    zero = np.zeros(1, x.dtype)[0]
    for i in range(i0, i1, 2):
        k = min(i + 1, i1 - 1)
        a0 = a1 = a2 = a3 = b0 = b1 = b2 = b3 = zero
        for j in range(x.shape[1]):
            u = x[i, j]
            v = x[k, j]
            w0 = w4[0, j]
            w1 = w4[1, j]
            w2 = w4[2, j]
            w3 = w4[3, j]
            a0 += u * w0
            a1 += u * w1
            a2 += u * w2
            a3 += u * w3
            b0 += v * w0
            b1 += v * w1
            b2 += v * w2
            b3 += v * w3
        z4[0, i], z4[1, i], z4[2, i], z4[3, i] = a0, a1, a2, a3
        z4[0, k], z4[1, k], z4[2, k], z4[3, k] = b0, b1, b2, b3


@_inline
def _accumulate4(x, coef, out4, i0, i1):
    """``out4[c] += Σ_{i0 ≤ i < i1} coef[i - i0, c] · x[i]`` (at most 4 rows).

    The coefficients are read into scalars first: ``out4`` could alias ``coef`` as far as LLVM
    knows, and it would reload them after every store (54 vs 100 µs per product)."""
    dd = x.shape[1]
    if i1 - i0 == 4:
        c00, c01, c02, c03 = coef[0, 0], coef[0, 1], coef[0, 2], coef[0, 3]
        c10, c11, c12, c13 = coef[1, 0], coef[1, 1], coef[1, 2], coef[1, 3]
        c20, c21, c22, c23 = coef[2, 0], coef[2, 1], coef[2, 2], coef[2, 3]
        c30, c31, c32, c33 = coef[3, 0], coef[3, 1], coef[3, 2], coef[3, 3]
        for j in range(dd):
            x0 = x[i0, j]
            x1 = x[i0 + 1, j]
            x2 = x[i0 + 2, j]
            x3 = x[i0 + 3, j]
            out4[0, j] += c00 * x0 + c10 * x1 + c20 * x2 + c30 * x3
            out4[1, j] += c01 * x0 + c11 * x1 + c21 * x2 + c31 * x3
            out4[2, j] += c02 * x0 + c12 * x1 + c22 * x2 + c32 * x3
            out4[3, j] += c03 * x0 + c13 * x1 + c23 * x2 + c33 * x3
    else:
        for r in range(i1 - i0):
            c0, c1, c2, c3 = coef[r, 0], coef[r, 1], coef[r, 2], coef[r, 3]
            for j in range(dd):
                v = x[i0 + r, j]
                out4[0, j] += c0 * v
                out4[1, j] += c1 * v
                out4[2, j] += c2 * v
                out4[3, j] += c3 * v


@_jit
def transposed4(x, v4, out4):
    """``out4[c] = Σ_i v4[c, i] · x[i]`` (``Xᵀv`` for the 4 rows of ``v4``)."""
    n = x.shape[0]
    out4[:] = 0
    coef = np.empty((_R, 4), x.dtype)
    for i0 in range(0, n, _R):
        i1 = min(i0 + _R, n)
        for r in range(i1 - i0):
            for c in range(4):
                coef[r, c] = v4[c, i0 + r]
        _accumulate4(x, coef, out4, i0, i1)


@_jit
def hvp4(x, d4, h4, z4, out4):
    """``z4 = X d4`` and ``out4 = Xᵀ(h4 ⊙ z4)`` in one pass: each block of rows is accumulated
    right after its logits, while it is still in L1."""
    n = x.shape[0]
    out4[:] = 0
    coef = np.empty((_R, 4), x.dtype)
    for i0 in range(0, n, _R):
        i1 = min(i0 + _R, n)
        _dots4(x, d4, z4, i0, i1)
        for r in range(i1 - i0):
            for c in range(4):
                coef[r, c] = z4[c, i0 + r] * h4[c, i0 + r]
        _accumulate4(x, coef, out4, i0, i1)


@_jit
def logits(x, w, cols, z, buf_w, buf_z):
    """``z[c] = X w[c]`` for the columns ``cols``, 4 at a time."""
    m = cols.shape[0]
    for g in range(0, m, GROUP):
        buf_w[:] = 0
        for q in range(min(GROUP, m - g)):
            buf_w[q] = w[cols[g + q]]
        _dots4(x, buf_w, buf_z, 0, x.shape[0])
        for q in range(min(GROUP, m - g)):
            z[cols[g + q]] = buf_z[q]


def standardised_design(x: np.ndarray, rows: np.ndarray, s: np.ndarray, out: np.ndarray, mean: np.ndarray | None = None, std: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Write ``[(x[rows] - μ)/σ, 1]`` into ``out`` (``[len(rows), d + 1]``); ``μ``, ``σ`` are the
    ``s``-weighted statistics of those rows unless given. Returns ``(μ, σ)``."""
    if mean is None or std is None:
        mean, std = np.empty(x.shape[1], x.dtype), np.empty(x.shape[1], x.dtype)
        _standardise(x, rows, s, mean, std)
    _write_design(x, rows, mean, std, out)
    return mean, std
