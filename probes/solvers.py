"""Batched solvers of penalised logistic regression: many problems × columns in a few large matmuls.

A problem ``p`` has its own design ``X[p]`` (features plus a bias column); a column is one (label
set, penalty) pair of that problem. Every solver minimises, per problem and column,

    f(w) = Σ_i s_i·BCE(x_i·w, y_i) + ½·Σ_j λ_j·w_j²  (+ l1·||w||₁ for FISTA, bias not shrunk)

with ``s`` the row weights (mask / number of training rows: the mean over the rows) and ``λ`` zero
on the bias. :func:`truncated_newton` is a batched inexact Newton (preconditioned conjugate gradient
on Hessian-vector products, Nocedal & Wright 2006, Algorithm 7.1; the preconditioner is low-rank
Nyström, :mod:`probes.precondition`, or Jacobi); :func:`fista` is FISTA (Beck & Teboulle 2009)
with the L1 soft-threshold prox.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float
from torch import Tensor

from probes.precondition import LowRankPreconditioner

__all__ = ["Design", "fista", "truncated_newton"]


class Design:
    """Features with a bias column, kept in both layouts: ``[c, D] @ [D, n]`` GEMMs with the many
    items as the wide side run several times faster on CPU BLAS than ``[n, D] @ [D, c]``."""

    def __init__(self, x: Float[Tensor, "p n D"], xt: Float[Tensor, "p D n"]):
        self.x, self.xt = x, xt
        self._sq_mean: Tensor | None = None
        self._key: tuple[int, ...] | None = None

    @classmethod
    def standardised(cls, x: Float[Tensor, "p n d"], mean: Tensor, std: Tensor, reuse: Design | None = None) -> Design:
        """``[(x - mean) / std, 1]``, written into ``reuse``'s buffers when their shape fits: chunks
        of a sweep then need no fresh allocation (each costs page faults as large as a pass)."""
        p, n, d = x.shape
        if reuse is not None and reuse.x.shape == (p, n, d + 1):
            out, out_t = reuse.x, reuse.xt
        else:
            out = torch.empty(p, n, d + 1, device=x.device, dtype=x.dtype)
            out_t = torch.empty(p, d + 1, n, device=x.device, dtype=x.dtype)
        torch.sub(x, mean, out=out[..., :d]).div_(std)
        out[..., d] = 1.0
        out_t.copy_(out.transpose(1, 2))
        return cls(out, out_t)

    def sq_mean(self, s: Float[Tensor, "p 1 n"]) -> Float[Tensor, "p 1 D"]:
        """Mean squared feature over the rows weighted by ``s``, computed once."""
        if self._sq_mean is None:
            self._sq_mean = torch.bmm(s, self.x * self.x)
        return self._sq_mean

    def select(self, rows: Tensor) -> Design:
        """The design of problems ``rows`` only (cached: the set shrinks rarely)."""
        if rows.numel() == self.x.shape[0]:
            return self
        key = tuple(rows.tolist())
        if self._key != key:
            sub = Design(self.x[rows], self.xt[rows])
            sub._sq_mean = None if self._sq_mean is None else self._sq_mean[rows]
            self._key, self._sub = key, sub
        return self._sub

    def logits(self, w: Float[Tensor, "p c D"]) -> Float[Tensor, "p c n"]:
        """``Xw`` per column."""
        return torch.bmm(w, self.xt)


def objective(z: Tensor, w: Tensor, y: Tensor, s: Tensor, lam: Tensor) -> Float[Tensor, "p c"]:
    """``f`` for every (problem, column) from the logits ``z = Xw`` (no pass over the features)."""
    bce = F.binary_cross_entropy_with_logits(z, y, reduction="none")
    return torch.linalg.vecdot(bce, s) + 0.5 * torch.linalg.vecdot(lam * w, w)


def _cg(design: Design, h: Tensor, g: Tensor, lam: Tensor, precond: Callable[[Tensor], Tensor], done: Tensor, cg_iter: int, stop: float) -> tuple[Tensor, Tensor]:
    """Inexact Newton direction ``Δ`` (``HΔ ≈ -g``, ``H = XᵀhX + λ``) and its logits ``XΔ``.

    ``XΔ`` is accumulated from the CG directions' logits (linearity), so the line search and the
    next iterate's logits need no pass over the features. Columns in ``done`` are not waited for;
    ``precond`` maps a residual ``r`` to ``P⁻¹r``.
    """
    # Constant forcing term ||r|| ≤ 0.5·||g|| (linear local convergence, Dembo, Eisenstat & Steihaug
    # 1982), in the preconditioner's norm ``rᵀPr`` that CG computes anyway: measured on a 30-layer
    # sweep, it takes 23% fewer CG steps than the superlinear min(0.5, sqrt||g||) of Nocedal &
    # Wright's Algorithm 7.1 for 20% more (cheaper) Newton steps; Eisenstat-Walker forcing and fixed
    # 0.3, 0.6, 0.7 were no better (with the low-rank preconditioner 0.6 and 0.7 were within 5% in
    # CG + Newton steps). Columns in ``done`` count as solved from the start.
    r = -g
    d = precond(r)
    rs = torch.linalg.vecdot(r, d)
    tol2 = torch.where(done, float("inf"), 0.25 * rs)
    delta, zdelta = torch.zeros_like(g), torch.zeros_like(h)
    for _ in range(cg_iter):
        zd = design.logits(d)
        hd = torch.baddbmm(lam * d, h * zd, design.x)
        alpha = (rs / torch.linalg.vecdot(d, hd).clamp_min(1e-30)).unsqueeze(-1)
        delta.addcmul_(alpha, d)
        zdelta.addcmul_(alpha, zd)
        r.addcmul_(alpha, hd, value=-1)
        pr = precond(r)
        rs_new = torch.linalg.vecdot(r, pr)
        # A residual below half the gradient tolerance already makes the next gradient (≈ r for
        # the quadratic model) pass the stopping test: solving further only costs passes.
        if bool(((rs_new <= tol2) | (torch.linalg.vector_norm(r, float("inf"), -1) <= stop)).all()):
            break
        d = torch.addcmul(pr, (rs_new / rs.clamp_min(1e-30)).unsqueeze(-1), d)
        rs = rs_new
    return delta, zdelta


def _line_search(z, zdelta, w, delta, y, s, lam, g, active, base, max_halvings: int = 20) -> tuple[Tensor, Tensor, Tensor]:
    """Backtracking (Armijo, c=1e-4) step per column from tracked logits (no feature pass), from
    the objective ``base`` at the current iterate; inactive and stalled columns get step 0.
    Returns the steps ``[p, c]``, the stalled mask and the objective at the new iterate.

    Near the optimum the decrease falls below the objective's rounding (float32: ~1e-8·f) and an
    exact Armijo test then halves a good Newton step to nothing: like Hager & Zhang's (2005)
    approximate Wolfe conditions, a step may exceed the Armijo bound by ``1e-6·|f|``.
    """
    bound = base + 1e-6 * base.abs()
    slope = 1e-4 * torch.linalg.vecdot(g, delta)
    step, todo = active.to(z.dtype), active
    for _ in range(max_halvings):
        col = step[..., None]
        trial = objective(torch.addcmul(z, col, zdelta), torch.addcmul(w, col, delta), y, s, lam)
        todo = todo & ~(trial <= torch.addcmul(bound, step, slope))  # a NaN trial is no decrease
        if not bool(todo.any()):
            break
        step = torch.where(todo, step * 0.5, step)
    # The last trial evaluated every column at its final step (inactive ones at step 0).
    return step.masked_fill(todo, 0.0), todo, torch.where(todo, base, trial)


def truncated_newton(
    design: Design,
    y: Float[Tensor, "p c n"],
    s: Float[Tensor, "p 1 n"],
    lam: Float[Tensor, "c D"],
    w: Float[Tensor, "p c D"],
    val: tuple[Design, Tensor, Tensor] | None,
    max_iter: int,
    tol: float,
    cg_iter: int,
    patience: int,
    low_rank: LowRankPreconditioner | None = None,
) -> tuple[Tensor, Tensor, Bool[Tensor, "p c"]]:
    """Minimise ``f`` for every column of ``w`` (updated in place) until ``max |∇f| ≤ tol``.

    ``val`` = (design, labels, row weights) of a validation split: the iterate with the lowest
    validation loss is returned and a column stops after ``patience`` steps without improvement.
    ``low_rank`` preconditions CG (standardised features only); without it, Jacobi does.
    Returns the weights, the Newton steps taken and whether each column stopped before ``max_iter``.
    """
    p, c_count, _ = w.shape
    active = torch.ones(p, c_count, dtype=torch.bool, device=w.device)
    n_iter = torch.zeros(p, c_count, dtype=torch.long, device=w.device)
    if val is not None:
        best_w, best_val = w.clone(), torch.full((p, c_count), float("inf"), device=w.device, dtype=w.dtype)
        best_iter, stale = n_iter.clone(), torch.zeros_like(n_iter)
    z = design.logits(w)
    # A warm start worse than the origin (f(0) = log 2 for any labels) starts at the origin.
    f = objective(z, w, y, s, lam)
    worse = f > math.log(2.0)
    w.masked_fill_(worse[..., None], 0.0)
    z.masked_fill_(worse[..., None], 0.0)
    f.masked_fill_(worse, math.log(2.0))
    # The working set: problems with a column still running and, once at most a quarter of the
    # columns run, only those (a 1-column GEMM costs half a 4-column one on CPU; 2 or 3 cost as 4).
    # It starts as views of the full tensors and is gathered anew only when it shrinks (rarely).
    rows, cols = torch.arange(p, device=w.device), torch.arange(c_count, device=w.device)
    at = (rows[:, None], cols)
    ws, zs, fs, ys, ss, lams, act, its, sub = w, z, f, y, s, lam, active, n_iter, design
    n_on = act.numel()
    sq = design.sq_mean(s) if low_rank is None else None
    sub_low_rank = low_rank
    for _ in range(max_iter):
        prob = torch.sigmoid(zs)
        g = torch.baddbmm(lams * ws, (prob - ys) * ss, sub.x)
        act &= ~(g.abs().amax(-1) <= tol)  # a NaN gradient never counts as converged
        # The working set can only shrink when a column has stopped since the last look.
        n_on, n_was = int(act.sum()), n_on
        if n_on == 0:
            break
        if n_on < n_was:
            row_on, col_on = act.any(1), act.any(0)
            n_rows, n_cols = int(row_on.sum()), int(col_on.sum())
            narrow = 4 * n_cols <= c_count and n_cols < cols.numel()
            if n_rows < rows.numel() or narrow:
                if ws is not w:
                    w[at], z[at], active[at], n_iter[at] = ws, zs, act, its
                keep_r = row_on.nonzero().squeeze(-1)
                keep_c = col_on.nonzero().squeeze(-1) if narrow else torch.arange(cols.numel(), device=w.device)
                rows, cols = rows[keep_r], cols[keep_c]
                at, sel = (rows[:, None], cols), (keep_r[:, None], keep_c)
                ws, zs, fs, ys, act, its, g, prob = ws[sel], zs[sel], fs[sel], ys[sel], act[sel], its[sel], g[sel], prob[sel]
                ss, lams, sub = s[rows], lam[cols], design.select(rows)
                sub_low_rank = None if low_rank is None else low_rank.select(rows)
        h = prob * (1 - prob) * ss
        if sub_low_rank is not None:
            precond = sub_low_rank.apply_fn(h.sum(-1, keepdim=True), lams)
        else:
            # Jacobi with diag(XᵀhX)_j = Σ_i h_i x_ij² approximated by (Σ_i h_i)·mean_i x_ij²
            # (exact when h is uncorrelated with x²): no pass over the features.
            precond = partial(torch.mul, 1.0 / (h.sum(-1, keepdim=True) * sq[rows] + lams + 1e-12))
        delta, zdelta = _cg(sub, h, g, lams, precond, ~act, cg_iter, 0.5 * tol)
        # Columns not running keep their weights whatever CG made of their direction (even NaN).
        on = act[..., None]
        delta, zdelta = delta.where(on, 0.0), zdelta.where(on, 0.0)
        step, stalled, fs = _line_search(zs, zdelta, ws, delta, ys, ss, lams, g, act, fs)
        its += act
        # No decrease even at a 2⁻²⁰ step: the iterate is optimal to machine precision.
        act &= ~stalled
        ws.addcmul_(step[..., None], delta)
        zs.addcmul_(step[..., None], zdelta)
        if val is not None:
            val_design, yv, sv = val
            loss = objective(val_design.select(rows).logits(ws), ws, yv[at], sv[rows], torch.zeros_like(lams))
            better = (loss < best_val[at] - 1e-7) & act
            best_val[at] = torch.where(better, loss, best_val[at])
            best_w[at] = torch.where(better[..., None], ws, best_w[at])
            best_iter[at] = torch.where(better, its, best_iter[at])
            stale[at] = torch.where(better, torch.zeros_like(stale[at]), stale[at] + act.long())
            act &= stale[at] < patience
    if ws is not w:
        w[at], z[at], active[at], n_iter[at] = ws, zs, act, its
    if val is not None:
        return best_w, best_iter, ~active
    return w, n_iter, ~active


def fista(design: Design, y: Tensor, s: Tensor, lam: Tensor, l1: float, w: Tensor, max_iter: int, tol: float) -> tuple[Tensor, Tensor, Tensor]:
    """FISTA on the smooth part (mean BCE + L2) with the L1 soft-threshold prox (bias not shrunk).

    Converged when the prox-gradient step moves no weight by more than ``tol`` times the step size.
    """
    xm = design.x * s.transpose(1, 2).sqrt()
    # Lipschitz constant of the weighted-BCE gradient: λ_max(Xᵀ diag(s) X)/4 (power iteration) + L2.
    v = torch.ones(xm.shape[0], xm.shape[2], 1, device=xm.device, dtype=xm.dtype)
    for _ in range(30):
        v = xm.transpose(1, 2) @ (xm @ v)
        v = v / v.norm(dim=1, keepdim=True).clamp_min(1e-30)
    lip = (xm @ v).pow(2).sum(1, keepdim=True) / 4 + lam.amax(-1, keepdim=True)
    step = 1.0 / lip
    shrink = torch.ones_like(lam[:1])
    shrink[..., -1] = 0.0
    z, t = w.clone(), 1.0
    n_iter = torch.zeros(w.shape[0], w.shape[1], dtype=torch.long, device=w.device)
    converged = torch.zeros_like(n_iter, dtype=torch.bool)
    for _ in range(max_iter):
        grad = torch.baddbmm(lam * z, (torch.sigmoid(design.logits(z)) - y) * s, design.x)
        u = z - step * grad
        w_new = torch.sign(u) * (u.abs() - step * l1 * shrink).clamp_min(0)
        moved = (w_new - w).abs().amax(-1) / step.squeeze(-1)
        n_iter += (~converged).long()
        converged |= moved < tol
        t_new = (1 + (1 + 4 * t * t) ** 0.5) / 2
        z = w_new + ((t - 1) / t_new) * (w_new - w)
        w, t = w_new, t_new
        if bool(converged.all()):
            break
    return w, n_iter, converged
