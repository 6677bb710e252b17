"""Batched solvers of penalised logistic regression: many problems × columns in a few large matmuls.

A problem ``p`` has its own design ``X[p]`` (features plus a bias column); a column is one (label
set, penalty) pair of that problem. Every solver minimises, per problem and column,

    f(w) = Σ_i s_i·BCE(x_i·w, y_i) + ½·Σ_j λ_j·w_j²  (+ l1·||w||₁ for FISTA, bias not shrunk)

with ``s`` the row weights (mask / number of training rows: the mean over the rows) and ``λ`` zero
on the bias. :func:`truncated_newton` is a batched inexact Newton (Jacobi-preconditioned conjugate
gradient on Hessian-vector products, Nocedal & Wright 2006, Algorithm 7.1); :func:`fista` is
FISTA (Beck & Teboulle 2009) with the L1 soft-threshold prox.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float
from torch import Tensor

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


def _cg(design: Design, h: Tensor, g: Tensor, lam: Tensor, precond: Tensor, done: Tensor, cg_iter: int, stop: float) -> tuple[Tensor, Tensor]:
    """Inexact Newton direction ``Δ`` (``HΔ ≈ -g``, ``H = XᵀhX + λ``) and its logits ``XΔ``.

    ``XΔ`` is accumulated from the CG directions' logits (linearity), so the line search and the
    next iterate's logits need no pass over the features. Columns in ``done`` are not waited for.
    """
    # Constant forcing term ||r|| ≤ 0.5·||g|| (linear local convergence, Dembo, Eisenstat & Steihaug
    # 1982): measured on a 30-layer sweep, it takes 23% fewer CG steps than the superlinear
    # min(0.5, sqrt||g||) of Nocedal & Wright's Algorithm 7.1 for 20% more (cheaper) Newton steps;
    # Eisenstat-Walker forcing and fixed 0.3, 0.6, 0.7 were no better. Squared: compared with r·r.
    # Columns in ``done`` count as solved from the start (an infinite tolerance).
    tol2 = torch.where(done, float("inf"), 0.25 * torch.linalg.vecdot(g, g))
    delta, zdelta = torch.zeros_like(g), torch.zeros_like(h)
    r = -g
    pr = precond * r
    d = pr.clone()
    rs = torch.linalg.vecdot(r, pr)
    for _ in range(cg_iter):
        zd = design.logits(d)
        hd = torch.baddbmm(lam * d, h * zd, design.x)
        alpha = (rs / torch.linalg.vecdot(d, hd).clamp_min(1e-30)).unsqueeze(-1)
        delta.addcmul_(alpha, d)
        zdelta.addcmul_(alpha, zd)
        r.addcmul_(alpha, hd, value=-1)
        # A residual below half the gradient tolerance already makes the next gradient (≈ r for
        # the quadratic model) pass the stopping test: solving further only costs passes.
        solved = (torch.linalg.vecdot(r, r) <= tol2) | (torch.linalg.vector_norm(r, float("inf"), -1) <= stop)
        if bool(solved.all()):
            break
        pr = precond * r
        rs_new = torch.linalg.vecdot(r, pr)
        d = torch.addcmul(pr, (rs_new / rs.clamp_min(1e-30)).unsqueeze(-1), d)
        rs = rs_new
    return delta, zdelta


def _line_search(z, zdelta, w, delta, y, s, lam, g, active, max_halvings: int = 20) -> tuple[Tensor, Tensor]:
    """Backtracking (Armijo, c=1e-4) step per column from tracked logits (no feature pass);
    inactive and stalled columns get step 0. Returns the steps ``[p, c]`` and the stalled mask.

    Near the optimum the decrease falls below the objective's rounding (float32: ~1e-8·f) and an
    exact Armijo test then halves a good Newton step to nothing: like Hager & Zhang's (2005)
    approximate Wolfe conditions, a step may exceed the Armijo bound by ``1e-6·|f|``.
    """
    base = objective(z, w, y, s, lam)
    slope = torch.linalg.vecdot(g, delta)
    step = torch.ones_like(base)
    todo = active.clone()
    for _ in range(max_halvings):
        col = step[..., None]
        trial = objective(torch.addcmul(z, col, zdelta), torch.addcmul(w, col, delta), y, s, lam)
        todo &= trial > base + 1e-4 * step * slope + 1e-6 * base.abs()
        if not bool(todo.any()):
            break
        step = torch.where(todo, step * 0.5, step)
    return torch.where(active & ~todo, step, torch.zeros_like(step)), todo


def _running_columns(active: Bool[Tensor, "p c"]) -> Tensor:
    """Indices of the columns to solve: those still running once at most a quarter of them are."""
    on = active.any(0)
    if 4 * int(on.sum()) <= on.numel():
        return on.nonzero().squeeze(-1)
    return torch.arange(on.numel(), device=on.device)


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
) -> tuple[Tensor, Tensor, Bool[Tensor, "p c"]]:
    """Minimise ``f`` for every column of ``w`` (updated in place) until ``max |∇f| ≤ tol``.

    ``val`` = (design, labels, row weights) of a validation split: the iterate with the lowest
    validation loss is returned and a column stops after ``patience`` steps without improvement.
    Returns the weights, the Newton steps taken and whether each column stopped before ``max_iter``.
    """
    p, c_count, _ = w.shape
    active = torch.ones(p, c_count, dtype=torch.bool, device=w.device)
    n_iter = torch.zeros(p, c_count, dtype=torch.long, device=w.device)
    if val is not None:
        best_w, best_val = w.clone(), torch.full((p, c_count), float("inf"), device=w.device, dtype=w.dtype)
        best_iter, stale = n_iter.clone(), torch.zeros_like(n_iter)
    z = design.logits(w)
    design.sq_mean(s)
    for _ in range(max_iter):
        # Only problems with a column still running are solved, and only their running columns once
        # few are left: on CPU a 1-column GEMM costs half a 4-column one (2 or 3 columns cost as 4).
        rows = active.any(1).nonzero().squeeze(-1)
        if rows.numel() == 0:
            break
        cols = _running_columns(active)
        at = (rows[:, None], cols)
        sub = design.select(rows)
        ws, zs, ys, ss, lams = w[at], z[at], y[at], s[rows], lam[cols]
        prob = torch.sigmoid(zs)
        g = torch.baddbmm(lams * ws, (prob - ys) * ss, sub.x)
        act = active[at] & (g.abs().amax(-1) > tol)
        active[at] = act
        if not bool(act.any()):
            continue
        narrow = _running_columns(act)
        if narrow.numel() < cols.numel():
            cols, at = cols[narrow], (rows[:, None], cols[narrow])
            ws, zs, ys, lams, prob, g, act = ws[:, narrow], zs[:, narrow], ys[:, narrow], lams[narrow], prob[:, narrow], g[:, narrow], act[:, narrow]
        h = prob * (1 - prob) * ss
        # Jacobi preconditioner with diag(XᵀhX)_j = Σ_i h_i x_ij² approximated by
        # (Σ_i h_i)·mean_i x_ij² (exact when h is uncorrelated with x²): no pass over the features.
        precond = 1.0 / (h.sum(-1, keepdim=True) * sub.sq_mean(ss) + lams + 1e-12)
        delta, zdelta = _cg(sub, h, g, lams, precond, ~act, cg_iter, 0.5 * tol)
        # Columns not running keep their weights whatever CG made of their direction.
        delta, zdelta = delta * act[..., None], zdelta * act[..., None]
        step, stalled = _line_search(zs, zdelta, ws, delta, ys, ss, lams, g, act)
        n_iter[at] += act.long()
        # No decrease even at a 2⁻²⁰ step: the iterate is optimal to machine precision.
        act &= ~stalled
        ws.addcmul_(step[..., None], delta)
        w[at], z[at] = ws, zs.addcmul_(step[..., None], zdelta)
        if val is not None:
            val_design, yv, sv = val
            loss = objective(val_design.select(rows).logits(ws), ws, yv[at], sv[rows], torch.zeros_like(lams))
            better = (loss < best_val[at] - 1e-7) & act
            best_val[at] = torch.where(better, loss, best_val[at])
            best_w[at] = torch.where(better[..., None], ws, best_w[at])
            best_iter[at] = torch.where(better, n_iter[at], best_iter[at])
            stale[at] = torch.where(better, torch.zeros_like(stale[at]), stale[at] + act.long())
            act &= stale[at] < patience
        active[at] = act
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
