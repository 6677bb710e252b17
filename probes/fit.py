"""Linear probes fitted for many problems (layers × tasks) and penalties at once.

Every problem ``p`` has its own features ``x[p]`` (e.g. one layer) and labels ``y[p]``; every
penalty ``r`` is fitted on every problem, so one call solves ``P·R`` logistic regressions with
batched matmuls (CPU or CUDA) instead of a Python loop.

Objective (per problem and penalty), bias unpenalised::

    mean_i BCE(x_i·w + b, y_i) + (l2 / 2)·||w||² + l1·||w||₁

scikit-learn's ``LogisticRegression(C=C)`` minimises ``C·Σ_i BCE + ½||w||²`` (or ``+ ||w||₁``
for ``penalty="l1"``); dividing by ``C·N`` gives the same minimiser with ``l2 = 1/(C·N)`` (resp.
``l1 = 1/(C·N)``), N the number of training items: :func:`l2_from_sklearn_c`.

Without L1 the solver is a batched truncated Newton (Jacobi-preconditioned conjugate gradient on
Hessian-vector products, backtracking line search on logits tracked by linearity, so a CG step
is the only pass over the features); on CPU it runs on cache-sized chunks of problems, so that
each chunk's CG stops with its own columns. With L1 it is FISTA (Beck & Teboulle 2009)
with the proximal soft-threshold step. Features are standardised on the training rows by
default and the weights folded back into the raw space, so the penalty acts on standardised
weights (as with a ``StandardScaler`` in front of scikit-learn).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import repeat
from jaxtyping import Float
from torch import Tensor

__all__ = ["LinearFit", "fit_logistic", "fit_mass_mean", "l2_from_sklearn_c", "sklearn_c_from_l2"]


@dataclass
class LinearFit:
    """Fitted linear probes ``score = x·weight + bias`` for a batch of problems (and penalties)."""

    weight: Float[Tensor, "*batch d"]
    """Probe weights in the raw (unstandardised) feature space."""
    bias: Float[Tensor, "*batch"]
    """Probe biases; a positive score predicts label 1."""
    n_iter: Tensor
    """Solver iterations each problem used (the best iterate's, with early stopping)."""
    converged: Tensor
    """Whether the gradient-norm (or FISTA step) tolerance was reached."""

    def scores(self, x: Float[Tensor, "p n d"]) -> Float[Tensor, "p *cols n"]:
        """Scores of items ``x[p]`` under every probe of problem ``p``."""
        w = self.weight.to(x.device, x.dtype)
        flat = w.reshape(w.shape[0], -1, w.shape[-1])
        scores = torch.bmm(flat, x.transpose(1, 2)) + self.bias.to(x.device, x.dtype).reshape(w.shape[0], -1, 1)
        return scores.reshape(*w.shape[:-1], x.shape[1])


def l2_from_sklearn_c(c: float, n_train: int) -> float:
    """Our ``l2`` giving the same minimiser as scikit-learn's ``C`` on ``n_train`` items."""
    return 1.0 / (c * n_train)


def sklearn_c_from_l2(l2: float, n_train: int) -> float:
    """scikit-learn's ``C`` giving the same minimiser as our ``l2`` on ``n_train`` items."""
    return 1.0 / (l2 * n_train)


def _broadcast(x: Tensor, y: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    p, n, _ = x.shape
    y = y.to(x.device, x.dtype).expand(p, n)
    m = torch.ones(p, n, device=x.device, dtype=x.dtype) if mask is None else mask.to(x.device, x.dtype).expand(p, n)
    return y, m


def _standardise(x: Tensor, m: Tensor) -> tuple[Tensor, Tensor]:
    count = m.sum(1, keepdim=True)[..., None]
    mean = (x * m[..., None]).sum(1, keepdim=True) / count
    var = (((x - mean) ** 2) * m[..., None]).sum(1, keepdim=True) / count
    # Constant features keep scale 1 so that they stay zero instead of exploding.
    std = torch.where(var > 1e-12, var.sqrt(), torch.ones_like(var))
    return mean, std


class _Design:
    """Features with a bias column, kept in both layouts: ``[c, D] @ [D, n]`` GEMMs with the many
    items as the wide side run several times faster on CPU BLAS than ``[n, D] @ [D, c]``."""

    def __init__(self, x: Tensor):
        self.x = torch.cat([x, torch.ones_like(x[..., :1])], dim=-1).contiguous()
        self.xt = self.x.transpose(1, 2).contiguous()
        self._sq_mean: Tensor | None = None

    def sq_mean(self, m: Tensor) -> Tensor:
        """``[p, 1, D]`` mean squared feature over the rows weighted by ``m`` ``[p, 1, n]``, computed once."""
        if self._sq_mean is None:
            self._sq_mean = torch.bmm(m / m.sum(-1, keepdim=True), self.x * self.x)
        return self._sq_mean

    def select(self, rows: Tensor) -> _Design:
        """The design of problems ``rows`` only (cached: the set shrinks rarely)."""
        if rows.numel() == self.x.shape[0]:
            return self
        key = tuple(rows.tolist())
        if getattr(self, "_key", None) != key:
            sub = _Design.__new__(_Design)
            sub.x, sub.xt = self.x[rows], self.xt[rows]
            sub._sq_mean = None if self._sq_mean is None else self._sq_mean[rows]
            self._key, self._sub = key, sub
        return self._sub

    def logits(self, w: Tensor) -> Tensor:
        """``[p, c, D] -> [p, c, n]``."""
        return torch.bmm(w, self.xt)

    def back(self, z: Tensor) -> Tensor:
        """``[p, c, n] -> [p, c, D]`` (``Xᵀz`` per column)."""
        return torch.bmm(z, self.x)


def _objective(z: Tensor, w: Tensor, y: Tensor, m: Tensor, lam: Tensor) -> Tensor:
    """Penalised mean BCE for every (problem, column) from the logits ``z = Xw``: ``[p, c]``."""
    bce = F.binary_cross_entropy_with_logits(z, y.expand_as(z), reduction="none")
    return (bce * m).sum(-1) / m.sum(-1) + 0.5 * (lam * w * w).sum(-1)


def _loss(design: _Design, w: Tensor, y: Tensor, m: Tensor, lam: Tensor) -> Tensor:
    """Penalised mean BCE for every (problem, column): ``[p, c]``."""
    return _objective(design.logits(w), w, y, m, lam)


def _newton_cg(design: _Design, z, y, m, lam, w, active, cg_iter: int, stop: float) -> tuple[Tensor, Tensor, Tensor]:
    """Inexact Newton direction ``Δ``, its logits ``XΔ`` and the gradient, for every active column.

    ``XΔ`` is accumulated from the CG directions' logits (linearity), so the line search and the
    next iterate's logits need no pass over the features.
    """
    msum = m.sum(-1, keepdim=True)
    prob = torch.sigmoid(z)
    g = design.back((prob - y) * m / msum) + lam * w
    h = prob * (1 - prob) * m / msum
    # Jacobi preconditioner with diag(XᵀHX)_j = Σ_i h_i x_ij² approximated by (Σ_i h_i)·mean_i x_ij²
    # (exact when h is uncorrelated with x²): it keeps the scaling of raw features without a pass.
    precond = 1.0 / (h.sum(-1, keepdim=True) * design.sq_mean(m) + lam + 1e-12)
    # Preconditioned CG on H·Δ = -g, stopped at the forcing tolerance min(0.5, sqrt|g|)·|g|
    # (Nocedal & Wright, Algorithm 7.1).
    gnorm = g.norm(dim=-1, keepdim=True)
    tol = torch.minimum(torch.full_like(gnorm, 0.5), gnorm.sqrt()) * gnorm
    delta, zdelta = torch.zeros_like(w), torch.zeros_like(z)
    r = -g
    s = precond * r
    d = s.clone()
    rs = (r * s).sum(-1, keepdim=True)
    for _ in range(cg_iter):
        zd = design.logits(d)
        hd = torch.baddbmm(lam * d, h * zd, design.x)
        alpha = rs / torch.linalg.vecdot(d, hd).unsqueeze(-1).clamp_min(1e-30)
        delta.addcmul_(alpha, d)
        zdelta.addcmul_(alpha, zd)
        r.addcmul_(alpha, hd, value=-1)
        # A residual below half the gradient tolerance already makes the next gradient (≈ r for
        # the quadratic model) pass the stopping test: solving further only costs passes.
        if bool(((r.norm(dim=-1, keepdim=True) <= tol) | (r.abs().amax(-1, keepdim=True) <= stop)).all()):
            break
        s = precond * r
        rs_new = torch.linalg.vecdot(r, s).unsqueeze(-1)
        d = torch.addcmul(s, rs_new / rs.clamp_min(1e-30), d)
        rs = rs_new
    keep = active[..., None]
    return delta * keep, zdelta * keep, g


def _line_search(z, zdelta, w, delta, y, m, lam, g, active, max_halvings: int = 20) -> tuple[Tensor, Tensor]:
    """Backtracking (Armijo, c=1e-4) step per column from tracked logits (no feature pass);
    inactive and stalled columns get step 0. Returns the steps ``[p, c]`` and the stalled mask."""
    base = _objective(z, w, y, m, lam)
    slope = (g * delta).sum(-1)
    step = torch.ones_like(base)
    todo = active.clone()
    for _ in range(max_halvings):
        trial = _objective(z + step[..., None] * zdelta, w + step[..., None] * delta, y, m, lam)
        ok = trial <= base + 1e-4 * step * slope
        todo &= ~ok
        if not bool(todo.any()):
            break
        step = torch.where(todo, step * 0.5, step)
    return torch.where(active & ~todo, step, torch.zeros_like(step)), todo


def _chunk_size(x: Tensor, cache_bytes: int = 2 << 20) -> int:
    """Problems solved together: on CPU as many as fit in ~2 MiB, so that their features stay in
    cache across the CG passes and a problem's CG stops as soon as its own columns are solved
    (not the batch's slowest); on CUDA all of them."""
    p, n, d = x.shape
    if x.is_cuda:
        return p
    return max(1, min(p, cache_bytes // (n * (d + 1) * x.element_size())))


def _newton(design: _Design, y, m, lam, w, val, max_iter: int, tol: float, cg_iter: int, patience: int) -> tuple[Tensor, Tensor, Tensor]:
    """Truncated Newton for every column of ``w`` ``[p, c, D]``; ``val`` = (design, y, mask) or None."""
    p, c_count, _ = w.shape
    active = torch.ones(p, c_count, dtype=torch.bool, device=w.device)
    n_iter = torch.zeros(p, c_count, dtype=torch.long, device=w.device)
    best_w, best_val = w.clone(), torch.full((p, c_count), float("inf"), device=w.device, dtype=w.dtype)
    best_iter, stale = n_iter.clone(), torch.zeros_like(n_iter)
    zero_lam = torch.zeros_like(lam)
    z = design.logits(w)
    for _ in range(max_iter):
        # Only problems with a column still running are solved: finished layers cost nothing.
        rows = active.any(-1).nonzero().squeeze(-1)
        if rows.numel() == 0:
            break
        sub = design.select(rows)
        act, z_rows, w_rows = active[rows], z[rows], w[rows]
        delta, zdelta, g = _newton_cg(sub, z_rows, y[rows], m[rows], lam, w_rows, act.to(w.dtype), cg_iter, 0.5 * tol)
        act &= g.abs().amax(-1) > tol
        step, stalled = _line_search(z_rows, zdelta, w_rows, delta, y[rows], m[rows], lam, g, act)
        n_iter[rows] += act.long()
        # No decrease even at a 2⁻²⁰ step: the iterate is optimal to machine precision.
        act &= ~stalled
        w_rows = w_rows + step[..., None] * delta
        w[rows], z[rows] = w_rows, z_rows + step[..., None] * zdelta
        if val is not None:
            val_design, yv, mv = val
            loss = _loss(val_design.select(rows), w_rows, yv[rows], mv[rows], zero_lam)
            better = (loss < best_val[rows] - 1e-7) & act
            best_val[rows] = torch.where(better, loss, best_val[rows])
            best_w[rows] = torch.where(better[..., None], w_rows, best_w[rows])
            best_iter[rows] = torch.where(better, n_iter[rows], best_iter[rows])
            stale_rows = torch.where(better, torch.zeros_like(act, dtype=torch.long), stale[rows] + act.long())
            stale[rows] = stale_rows
            act &= stale_rows < patience
        active[rows] = act
    if val is not None:
        return best_w, best_iter, ~active
    return w, n_iter, ~active


def fit_logistic(
    x: Float[Tensor, "p n d"],
    y: Float[Tensor, "p s n"] | Float[Tensor, "p n"] | Float[Tensor, " n"],
    l2: Float[Tensor, " r"] | list[float],
    *,
    l1: float = 0.0,
    mask: Float[Tensor, "p n"] | None = None,
    x_val: Float[Tensor, "p m d"] | None = None,
    y_val: Float[Tensor, "p s m"] | Float[Tensor, "p m"] | Float[Tensor, " m"] | None = None,
    early_stopping: bool = False,
    patience: int = 3,
    standardize: bool = True,
    max_iter: int | None = None,
    tol: float = 1e-4,
    cg_iter: int = 20,
) -> LinearFit:
    """Fit ``P × R`` (or ``P × S × R``) logistic-regression probes, labels in {0, 1}, as one batch.

    ``y`` of shape ``[p, s, n]`` holds ``s`` label sets for the same features (e.g. a task, its
    control task, shuffled labels); the result then has shape ``[p, s, r, ...]``, else
    ``[p, r, ...]``. ``mask`` marks the rows of each problem to train on (problems of different
    sizes share one padded tensor). With ``early_stopping`` the iterate with the lowest
    validation loss is kept and a column stops after ``patience`` iterations without improvement.
    A column has converged when ``max |gradient| ≤ tol`` of the objective above: the same scale
    and criterion as scikit-learn's ``tol`` (default 1e-4) for its lbfgs solver.
    """
    p, n, d = x.shape
    sets = y.dim() == 3
    y_sets = y if sets else y.expand(p, n)[:, None, :]
    s_count = y_sets.shape[1]
    _, m = _broadcast(x, y_sets[:, 0], mask)
    lam_r = torch.as_tensor(l2, device=x.device, dtype=x.dtype).reshape(-1)
    r_count = lam_r.numel()
    c_count = s_count * r_count
    # Columns are (label set, penalty) pairs, penalty fastest.
    y_cols = repeat(y_sets.to(x.device, x.dtype), "p s n -> p (s r) n", r=r_count)
    m = m[:, None, :]
    unpenalised_bias = torch.cat([torch.ones(d, device=x.device, dtype=x.dtype), torch.zeros(1, device=x.device, dtype=x.dtype)])
    lam = repeat(lam_r, "r -> (s r) 1", s=s_count) * unpenalised_bias[None, :]
    use_val = early_stopping and x_val is not None and y_val is not None
    if use_val:
        x_val = x_val.to(x.device, x.dtype)
        yv = y_val if y_val.dim() == 3 else y_val.expand(p, x_val.shape[1])[:, None, :]
        yv = repeat(yv.to(x.device, x.dtype), "p s n -> p (s r) n", r=r_count)
        mv = torch.ones_like(yv[:, :1])
    mean = torch.zeros(p, 1, d, device=x.device, dtype=x.dtype)
    std = torch.ones_like(mean)
    w = torch.zeros(p, c_count, d + 1, device=x.device, dtype=x.dtype)
    n_iter = torch.zeros(p, c_count, dtype=torch.long, device=x.device)
    converged = torch.zeros(p, c_count, dtype=torch.bool, device=x.device)
    # Chunks of problems are standardised and solved in turn (FISTA: all at once).
    chunk = p if l1 > 0 else _chunk_size(x)
    for start in range(0, p, chunk):
        sl = slice(start, start + chunk)
        if standardize:
            mean[sl], std[sl] = _standardise(x[sl], m[sl, 0])
        design = _Design((x[sl] - mean[sl]) / std[sl])
        if l1 > 0:
            w[sl], n_iter[sl], converged[sl] = _fista(design, y_cols[sl], m[sl], lam, l1, w[sl], max_iter or 1000, tol)
        else:
            val = (_Design((x_val[sl] - mean[sl]) / std[sl]), yv[sl], mv[sl]) if use_val else None
            if start > 0 and not use_val:
                # Warm start from the previous problem's solution (adjacent layers of a residual
                # stream have nearly the same standardised probe); early stopping starts at zero.
                w[sl] = w[start - 1]
            w[sl], n_iter[sl], converged[sl] = _newton(design, y_cols[sl], m[sl], lam, w[sl], val, max_iter or 100, tol, cg_iter, patience)
    # Fold the standardisation back: w·(x-μ)/σ + b = (w/σ)·x + (b - Σ w·μ/σ).
    weight = w[..., :d] / std
    bias = w[..., d] - (weight * mean).sum(-1)
    shape = (p, s_count, r_count) if sets else (p, r_count)
    return LinearFit(weight=weight.reshape(*shape, d).contiguous(), bias=bias.reshape(shape),
                     n_iter=n_iter.reshape(shape), converged=converged.reshape(shape))


def _fista(design: _Design, y, m, lam, l1: float, w, max_iter: int, tol: float) -> tuple[Tensor, Tensor, Tensor]:
    """FISTA on the smooth part (mean BCE + L2) with the L1 soft-threshold prox (bias not shrunk)."""
    msum = m.sum(-1, keepdim=True)
    xm = design.x * m.transpose(1, 2).sqrt()
    # Lipschitz constant of the mean-BCE gradient: λ_max(XᵀX)/(4N) (power iteration) + L2.
    v = torch.ones(xm.shape[0], xm.shape[2], 1, device=xm.device, dtype=xm.dtype)
    for _ in range(30):
        v = xm.transpose(1, 2) @ (xm @ v)
        v = v / v.norm(dim=1, keepdim=True).clamp_min(1e-30)
    lip = (xm @ v).pow(2).sum(1, keepdim=True) / (4 * msum) + lam.amax(-1, keepdim=True)
    step = 1.0 / lip
    shrink = torch.ones_like(lam[:1])
    shrink[..., -1] = 0.0
    z, t = w.clone(), 1.0
    n_iter = torch.zeros(w.shape[0], w.shape[1], dtype=torch.long, device=w.device)
    converged = torch.zeros_like(n_iter, dtype=torch.bool)
    for _ in range(max_iter):
        grad = design.back((torch.sigmoid(design.logits(z)) - y) * m / msum) + lam * z
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


def fit_mass_mean(
    x: Float[Tensor, "p n d"], y: Float[Tensor, "p n"] | Float[Tensor, " n"], mask: Float[Tensor, "p n"] | None = None
) -> LinearFit:
    """Difference-of-means probe: ``w = μ₁ - μ₀``, ``b = -w·(μ₁ + μ₀)/2`` (midpoint threshold).

    The mass-mean direction of Marks & Tegmark (2023), without their covariance correction.
    """
    y, m = _broadcast(x, y, mask)
    pos, neg = (y * m)[..., None], ((1 - y) * m)[..., None]
    mu1 = (x * pos).sum(1) / pos.sum(1).clamp_min(1)
    mu0 = (x * neg).sum(1) / neg.sum(1).clamp_min(1)
    w = mu1 - mu0
    b = -(w * (mu1 + mu0)).sum(-1) / 2
    ones = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    return LinearFit(weight=w, bias=b, n_iter=ones.long(), converged=ones)
