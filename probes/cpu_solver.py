"""Compiled (Numba) truncated Newton for one problem's logistic-regression columns on the CPU.

The same algorithm, objective and stopping rule as :func:`probes.solvers.truncated_newton` with
the low-rank preconditioner (see there and :mod:`probes.precondition`), written as loops instead
of torch ops, for two reasons measured on the 2-core development machine (one thread, the
benchmark's 624 × 577 design, 4 columns):

- the Hessian-vector product is one pass over the rows (:func:`probes.cpu_passes.hvp4`): 60 µs
  against 127 µs for torch's two GEMMs;
- the ~60 small ops of a Newton step and ~25 of a CG step cost nanoseconds here instead of
  3–5 µs of dispatch each, about 40 % of the torch solver's time.

Columns are solved in groups of 4 (a group pads with zero directions): the active columns are
packed so that a group only holds running columns. Scalar reductions (objective, dot products of
directions) accumulate in float64; the passes over the design run in its dtype.
"""

from __future__ import annotations

import math

import numpy as np

from interp.compiled import FASTMATH, njit_cached
from probes.cpu_passes import GROUP as _G
from probes.cpu_passes import hvp4, logits, transposed4

__all__ = ["newton_cg"]

_jit = njit_cached(nogil=True, boundscheck=False, fastmath=FASTMATH)


@_jit
def _bce_sum(z, y, s, w, lam):
    """``Σ_i s_i·BCE(z_i, y_i) + ½ Σ_j λ_j w_j²`` for one column, in float64."""
    total = 0.0
    for i in range(z.shape[0]):
        zi = float(z[i])
        # BCE with logits, stable: max(z, 0) - z·y + log(1 + e^-|z|).
        total += s[i] * (max(zi, 0.0) - zi * y[i] + math.log1p(math.exp(-abs(zi))))
    pen = 0.0
    for j in range(w.shape[0]):
        pen += lam[j] * float(w[j]) * w[j]
    return total + 0.5 * pen


@_jit
def _trial(z, zd, t, w, wd, y, s, lam, zbuf, wbuf):
    """The objective at ``(w + t·wd)`` from the logits ``z + t·zd`` (no pass over the design)."""
    for i in range(z.shape[0]):
        zbuf[i] = z[i] + t * zd[i]
    for j in range(w.shape[0]):
        wbuf[j] = w[j] + t * wd[j]
    return _bce_sum(zbuf, y, s, wbuf, lam)


@_jit
def _all_within(v, bound):
    """``max |v| ≤ bound``, false when ``v`` holds a NaN (``max`` would skip it)."""
    for j in range(v.shape[0]):
        if not abs(v[j]) <= bound:
            return False
    return True


@_jit
def _dot(a, b):
    total = 0.0
    for j in range(a.shape[0]):
        total += float(a[j]) * b[j]
    return total


@_jit
def _precond(r, tail_inv, coef, basis_t, proj, out):
    """``out = P⁻¹r = tail⁻¹ ⊙ r + Uᵀ(coef ⊙ (U r))`` for one column (``basis_t`` = Uᵀ, ``[k, D]``)."""
    k, dd = basis_t.shape
    zero = np.zeros(1, r.dtype)[0]
    for t in range(k):
        acc = zero
        for j in range(dd):
            acc += basis_t[t, j] * r[j]
        proj[t] = acc * coef[t]
    for j in range(dd):
        out[j] = tail_inv[j] * r[j]
    for t in range(k):
        pt = proj[t]
        for j in range(dd):
            out[j] += pt * basis_t[t, j]


@_jit
def _newton_cg(x, y, s, lam, w, basis_t, eigvals, tail, xv, yv, sv, use_val, max_iter, tol, cg_iter, patience, n_iter, converged):
    """Truncated Newton for every column of ``w`` (``[c, D]``, updated in place), one problem.

    ``x`` ``[n, D]`` is the standardised design with its bias column, ``y`` ``[c, n]`` the labels,
    ``s`` ``[n]`` the row weights, ``lam`` ``[c, D]`` the penalties (0 on the bias). With
    ``use_val``, ``w`` ends as the iterate of lowest validation loss (``xv``, ``yv``, ``sv``).
    """
    n, dd = x.shape
    c_count = w.shape[0]
    k = basis_t.shape[0]
    dt = x.dtype
    buf_w = np.zeros((_G, dd), dt)
    buf_z = np.zeros((_G, n), dt)
    zbuf = np.empty(n, dt)
    wbuf = np.empty(dd, dt)
    proj = np.empty(k, dt)
    all_cols = np.arange(c_count)
    z = np.zeros((c_count, n), dt)
    logits(x, w, all_cols, z, buf_w, buf_z)
    f = np.empty(c_count, np.float64)
    log2 = math.log(2.0)
    for c in range(c_count):
        f[c] = _bce_sum(z[c], y[c], s, w[c], lam[c])
        # A warm start worse than the origin (f(0) = log 2 for any labels) starts at the origin.
        if not f[c] <= log2:
            w[c] = 0
            z[c] = 0
            f[c] = log2
    active = np.ones(c_count, np.bool_)
    n_iter[:] = 0
    if use_val:
        m_val = xv.shape[0]
        zv = np.zeros((c_count, m_val), dt)
        zero_lam = np.zeros(dd, np.float64)
        best_w = w.copy()
        best_val = np.full(c_count, np.inf)
        best_iter = np.zeros(c_count, np.int64)
        stale = np.zeros(c_count, np.int64)
        buf_zv = np.zeros((_G, m_val), dt)
    prob = np.empty((c_count, n), dt)
    grad = np.zeros((c_count, dd), dt)
    for _ in range(max_iter):
        # Gradient of the running columns: Xᵀ(s ⊙ (σ(z) - y)) + λw.
        on = np.nonzero(active)[0]
        for c in on:
            for i in range(n):
                zi = float(z[c, i])
                if zi >= 0:
                    p = 1.0 / (1.0 + math.exp(-zi))
                else:
                    e = math.exp(zi)
                    p = e / (1.0 + e)
                prob[c, i] = p
        for g in range(0, on.shape[0], _G):
            size = min(_G, on.shape[0] - g)
            buf_z[:] = 0
            for q in range(size):
                c = on[g + q]
                for i in range(n):
                    buf_z[q, i] = (prob[c, i] - y[c, i]) * s[i]
            transposed4(x, buf_z, buf_w)
            for q in range(size):
                c = on[g + q]
                for j in range(dd):
                    grad[c, j] = buf_w[q, j] + lam[c, j] * w[c, j]
        for c in on:
            if _all_within(grad[c], tol):
                active[c] = False
        on = np.nonzero(active)[0]
        m = on.shape[0]
        if m == 0:
            break
        m4 = ((m + _G - 1) // _G) * _G
        # Packed state of the running columns (padding rows stay zero: zero directions).
        h = np.zeros((m4, n), dt)
        tail_inv = np.zeros((m4, dd), dt)
        coef = np.zeros((m4, k), dt)
        lam_on = np.zeros((m4, dd), dt)
        r = np.zeros((m4, dd), dt)
        pr = np.zeros((m4, dd), dt)
        dirs = np.zeros((m4, dd), dt)
        delta = np.zeros((m4, dd), dt)
        zdelta = np.zeros((m4, n), dt)
        zd = np.zeros((m4, n), dt)
        hd = np.zeros((m4, dd), dt)
        rs = np.zeros(m4, np.float64)
        tol2 = np.zeros(m4, np.float64)
        for q in range(m):
            c = on[q]
            beta = 0.0
            for i in range(n):
                hv = float(prob[c, i]) * (1.0 - prob[c, i]) * s[i]
                h[q, i] = hv
                beta += hv
            for j in range(dd):
                tail_inv[q, j] = 1.0 / (beta * tail[j] + lam[c, j] + 1e-12)
                lam_on[q, j] = lam[c, j]
                r[q, j] = -grad[c, j]
            for t in range(k):
                coef[q, t] = 1.0 / (beta * eigvals[t] + lam[c, 0] + 1e-12) - tail_inv[q, 0]
            _precond(r[q], tail_inv[q], coef[q], basis_t, proj, pr[q])
            dirs[q] = pr[q]
            rs[q] = _dot(r[q], pr[q])
            # Forcing term ||r|| ≤ 0.5·||g|| in the preconditioner's norm (see solvers._cg).
            tol2[q] = 0.25 * rs[q]
        stop = 0.5 * tol
        for _cg in range(cg_iter):
            for g in range(0, m4, _G):
                hvp4(x, dirs[g:g + _G], h[g:g + _G], zd[g:g + _G], hd[g:g + _G])
            done = True
            for q in range(m):
                for j in range(dd):
                    hd[q, j] += lam_on[q, j] * dirs[q, j]
                alpha = rs[q] / max(_dot(dirs[q], hd[q]), 1e-30)
                for j in range(dd):
                    delta[q, j] += alpha * dirs[q, j]
                    r[q, j] -= alpha * hd[q, j]
                for i in range(n):
                    zdelta[q, i] += alpha * zd[q, i]
                _precond(r[q], tail_inv[q], coef[q], basis_t, proj, pr[q])
                rs_new = _dot(r[q], pr[q])
                if not (rs_new <= tol2[q] or _all_within(r[q], stop)):
                    done = False
                beta_cg = rs_new / max(rs[q], 1e-30)
                for j in range(dd):
                    dirs[q, j] = pr[q, j] + beta_cg * dirs[q, j]
                rs[q] = rs_new
            if done:
                break
        # Backtracking line search (Armijo, c = 1e-4, up to 1e-6·|f| above the bound: see
        # solvers._line_search) on the tracked logits; no decrease at 2⁻¹⁹ means stalled.
        for q in range(m):
            c = on[q]
            base = f[c]
            bound = base + 1e-6 * abs(base)
            slope = 1e-4 * _dot(grad[c], delta[q])
            t = 1.0
            accepted = False
            trial = base
            for _h in range(20):
                trial = _trial(z[c], zdelta[q], t, w[c], delta[q], y[c], s, lam[c], zbuf, wbuf)
                if trial <= bound + t * slope:
                    accepted = True
                    break
                t *= 0.5
            n_iter[c] += 1
            if accepted:
                f[c] = trial
                for j in range(dd):
                    w[c, j] += t * delta[q, j]
                for i in range(n):
                    z[c, i] += t * zdelta[q, i]
            else:
                active[c] = False
        if use_val:
            logits(xv, w, on, zv, buf_w, buf_zv)
            for c in on:
                loss = _bce_sum(zv[c], yv[c], sv, w[c], zero_lam)
                if active[c] and loss < best_val[c] - 1e-7:
                    best_val[c] = loss
                    best_w[c] = w[c]
                    best_iter[c] = n_iter[c]
                    stale[c] = 0
                elif active[c]:
                    stale[c] += 1
                if stale[c] >= patience:
                    active[c] = False
    for c in range(c_count):
        converged[c] = not active[c]
    if use_val:
        w[:] = best_w
        n_iter[:] = best_iter


def newton_cg(x, y, s, lam, w, basis_t, eigvals, tail, val, max_iter: int, tol: float, cg_iter: int, patience: int) -> tuple[np.ndarray, np.ndarray]:
    """Solve one problem in place (NumPy arrays, ``w`` ``[c, D]``); returns (Newton steps, converged).

    ``val`` is ``None`` or (design, labels ``[c, m]``, row weights ``[m]``) of a validation split.
    """
    c_count = w.shape[0]
    n_iter = np.zeros(c_count, np.int64)
    converged = np.zeros(c_count, np.bool_)
    if val is None:
        xv, yv, sv = x[:0], y[:, :0], s[:0]
    else:
        xv, yv, sv = val
    _newton_cg(x, y, s, lam, w, basis_t, eigvals, tail, xv, yv, sv, val is not None, max_iter, tol, cg_iter, patience, n_iter, converged)
    return n_iter, converged
