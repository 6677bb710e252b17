"""Linear probes fitted for many problems (layers × tasks) and penalties at once.

Every problem ``p`` has its own features ``x[p]`` (e.g. one layer) and labels ``y[p]``; every
penalty ``r`` is fitted on every problem, so one call solves ``P·R`` logistic regressions with
batched matmuls (CPU or CUDA) instead of a Python loop.

Objective (per problem and penalty), bias unpenalised::

    mean_i BCE(x_i·w + b, y_i) + (l2 / 2)·||w||² + l1·||w||₁

scikit-learn's ``LogisticRegression(C=C)`` minimises ``C·Σ_i BCE + ½||w||²`` (or ``+ ||w||₁``
for ``penalty="l1"``); dividing by ``C·N`` gives the same minimiser with ``l2 = 1/(C·N)`` (resp.
``l1 = 1/(C·N)``), N the number of training items: :func:`l2_from_sklearn_c`.

Without L1 the solver is a batched truncated Newton (:func:`probes.solvers.truncated_newton`:
conjugate gradient on Hessian-vector products, preconditioned by each problem's top feature
covariance eigenpairs (:mod:`probes.precondition`, one randomised sketch per problem), line search
on logits tracked by linearity, so a CG step is the only pass over the features). On the CPU
(float32/float64) the same algorithm runs compiled, one problem at a time while its features are
in cache (:mod:`probes.cpu_solver`: one fused pass over the rows per Hessian-vector product, no
per-op dispatch); the torch version (CUDA, half precision, ``INTERP_NUMBA=0``) runs on chunks of
problems. Each problem starts from the previous one's solution (or from zero where that is
worse). With L1 it is FISTA (:func:`probes.solvers.fista`).
Features are standardised on the training rows by default and the weights folded back into the
raw space, so the penalty acts on standardised weights (as with a ``StandardScaler`` in front of
scikit-learn).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import repeat
from jaxtyping import Float
from torch import Tensor

from interp.compiled import compiled_enabled_for
from probes.precondition import LowRankPreconditioner
from probes.solvers import Design, fista, truncated_newton

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


def _broadcast(x: Tensor, y: Tensor, mask: Tensor | None, n: int | None = None) -> tuple[Tensor, Tensor]:
    p, n = x.shape[0], x.shape[1] if n is None else n
    y = y.to(x.device, x.dtype).expand(p, n)
    m = torch.ones(p, n, device=x.device, dtype=x.dtype) if mask is None else mask.to(x.device, x.dtype).expand(p, n)
    return y, m


def _standardise(x: Float[Tensor, "p n d"], s: Float[Tensor, "p 1 n"]) -> tuple[Tensor, Tensor]:
    """Mean and standard deviation ``[p, 1, d]`` of the features over the rows weighted by ``s`` (two-pass)."""
    mean = torch.bmm(s, x)
    var = torch.bmm(s, (x - mean).square_())
    # Constant features keep scale 1 so that they stay zero instead of exploding.
    std = torch.where(var > 1e-12, var.sqrt(), torch.ones_like(var))
    return mean, std


def _chunk_size(x: Tensor, cache_bytes: int = 2 << 20) -> int:
    """Problems solved together: on CPU as many as fit in ~2 MiB, so that their features stay in
    cache across the CG passes and a problem's CG stops as soon as its own columns are solved
    (not the batch's slowest); on CUDA all of them."""
    p, n, d = x.shape
    if x.is_cuda:
        return p
    return max(1, min(p, cache_bytes // (n * (d + 1) * x.element_size())))


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
    precond_rank: int | None = None,
    rows: Tensor | None = None,
) -> LinearFit:
    """Fit ``P × R`` (or ``P × S × R``) logistic-regression probes, labels in {0, 1}, as one batch.

    ``y`` of shape ``[p, s, n]`` holds ``s`` label sets for the same features (e.g. a task, its
    control task, shuffled labels); the result then has shape ``[p, s, r, ...]``, else
    ``[p, r, ...]``. ``mask`` marks the rows of each problem to train on (problems of different
    sizes share one padded tensor). With ``early_stopping`` the iterate with the lowest
    validation loss is kept and a column stops after ``patience`` iterations without improvement.
    A column has converged when ``max |gradient| ≤ tol`` of the objective above: the same scale
    and criterion as scikit-learn's ``tol`` (default 1e-4) for its lbfgs solver. ``precond_rank``
    eigenpairs of each problem's feature covariance precondition the Newton systems (standardised
    features only; 0: Jacobi; None: 16 for the compiled CPU solver, 32 for the torch one, each
    measured fastest on the 30-layer benchmark); the minimiser does not depend on it. ``rows`` (indices) trains on
    ``x[:, rows]`` without copying those rows out first (``y`` and ``mask`` then index them).

    On the CPU (float32/float64, standardised, no L1, rank > 0) the problems are solved one at a
    time by the compiled solver of :mod:`probes.cpu_solver` (``INTERP_NUMBA=0``: the torch one).
    """
    if rows is not None:
        rows = _checked_rows(rows, x.shape[1])
    compiled = compiled_enabled_for(x) and standardize and l1 == 0 and precond_rank != 0
    if precond_rank is None:
        # The compiled solver's CG steps are cheap next to the sketch (rank 16: 80–89 ms against
        # 110–123 at 32); the torch solver's are not (465 CG steps at 32, 492 + 57 at 16).
        precond_rank = 16 if compiled else 32
    if rows is not None and not compiled:
        x, rows = x[:, rows.to(x.device)], None
    p, d = x.shape[0], x.shape[2]
    n = x.shape[1] if rows is None else rows.numel()
    sets = y.dim() == 3
    y_sets = y if sets else y.expand(p, n)[:, None, :]
    s_count = y_sets.shape[1]
    _, m = _broadcast(x, y_sets[:, 0], mask, n)
    # Row weights of the mean over each problem's training rows.
    s = (m / m.sum(-1, keepdim=True))[:, None, :]
    lam_r = torch.as_tensor(l2, device=x.device, dtype=x.dtype).reshape(-1)
    if not bool((torch.isfinite(lam_r) & (lam_r >= 0)).all()):
        raise ValueError(f"l2 penalties must be finite and >= 0, got {lam_r.tolist()}")
    r_count = lam_r.numel()
    c_count = s_count * r_count
    # Columns are (label set, penalty) pairs, penalty fastest.
    y_cols = repeat(y_sets.to(x.device, x.dtype), "p s n -> p (s r) n", r=r_count)
    unpenalised_bias = torch.cat([torch.ones(d, device=x.device, dtype=x.dtype), torch.zeros(1, device=x.device, dtype=x.dtype)])
    lam = repeat(lam_r, "r -> (s r) 1", s=s_count) * unpenalised_bias[None, :]
    use_val = early_stopping and x_val is not None and y_val is not None
    if use_val:
        x_val = x_val.to(x.device, x.dtype)
        yv = y_val if y_val.dim() == 3 else y_val.expand(p, x_val.shape[1])[:, None, :]
        yv = repeat(yv.to(x.device, x.dtype), "p s n -> p (s r) n", r=r_count)
        sv = torch.full_like(yv[:, :1], 1.0 / x_val.shape[1])
    mean = torch.zeros(p, 1, d, device=x.device, dtype=x.dtype)
    std = torch.ones_like(mean)
    w = torch.zeros(p, c_count, d + 1, device=x.device, dtype=x.dtype)
    n_iter = torch.zeros(p, c_count, dtype=torch.long, device=x.device)
    converged = torch.zeros(p, c_count, dtype=torch.bool, device=x.device)
    design = val_design = None
    # The low-rank preconditioner assumes standardised features (the bias then decouples) and needs
    # at least single precision (a half-precision basis is far from orthonormal): else Jacobi.
    rank = precond_rank if standardize and l1 == 0 and torch.finfo(x.dtype).bits >= 32 else 0
    if rank > 0 and compiled:
        val = (x_val, yv, sv) if use_val else None
        _fit_compiled(x, rows, y_cols, s, lam, w, mean, std, n_iter, converged, val, rank, max_iter or 100, tol, cg_iter, patience)
        return _folded(w, mean, std, n_iter, converged, (p, s_count, r_count) if sets else (p, r_count))
    chunk = p if l1 > 0 else _chunk_size(x)
    if rank > 0:
        omega = LowRankPreconditioner.test_matrix(d, rank, x.device, x.dtype)
        sample = torch.empty(p, d, omega.shape[1], device=x.device, dtype=x.dtype)
    # Statistics (and the preconditioner's sketch) per chunk while its features are in cache.
    for start in range(0, p, chunk) if standardize else ():
        sl = slice(start, start + chunk)
        mean[sl], std[sl] = _standardise(x[sl], s[sl])
        if rank > 0:
            sample[sl] = LowRankPreconditioner.sample(x[sl], s[sl], mean[sl], std[sl], omega)
    if rank > 0:
        low_rank = LowRankPreconditioner.from_sample(sample, omega, rank)
    # Chunks of problems are solved in turn (FISTA: all at once), reusing the design's buffers.
    for start in range(0, p, chunk):
        sl = slice(start, start + chunk)
        design = Design.standardised(x[sl], mean[sl], std[sl], reuse=design)
        if l1 > 0:
            w[sl], n_iter[sl], converged[sl] = fista(design, y_cols[sl], s[sl], lam, l1, w[sl], max_iter or 1000, tol)
            continue
        val = None
        if use_val:
            val_design = Design.standardised(x_val[sl], mean[sl], std[sl], reuse=val_design)
            val = (val_design, yv[sl], sv[sl])
        elif start > 0:
            # Warm start from the previous problem's solution (adjacent layers of a residual
            # stream have nearly the same standardised probe); early stopping starts at zero.
            w[sl] = w[start - 1]
        precond = low_rank.select(sl) if rank > 0 else None
        w[sl], n_iter[sl], converged[sl] = truncated_newton(design, y_cols[sl], s[sl], lam, w[sl], val, max_iter or 100, tol, cg_iter, patience, precond)
    return _folded(w, mean, std, n_iter, converged, (p, s_count, r_count) if sets else (p, r_count))


def _checked_rows(rows: Tensor, n: int) -> Tensor:
    """``rows`` as int64 indices in ``[0, n)`` (a boolean mask becomes its indices; negative ones
    count from the end, as in torch); anything outside raises ``IndexError``: the compiled passes
    do not bounds-check."""
    if rows.dtype == torch.bool:
        if rows.shape != (n,):
            raise IndexError(f"a boolean rows mask needs {n} entries, got shape {tuple(rows.shape)}")
        return rows.nonzero().squeeze(-1)
    if rows.dim() != 1 or rows.dtype.is_floating_point or rows.is_complex():
        raise IndexError(f"rows must be a 1-D tensor of integer indices, got {rows.dtype} of shape {tuple(rows.shape)}")
    rows = rows.long()
    if rows.numel() and not bool(((rows >= -n) & (rows < n)).all()):
        raise IndexError(f"rows index out of range for {n} items: min {int(rows.min())}, max {int(rows.max())}")
    return torch.where(rows < 0, rows + n, rows)


def _folded(w: Tensor, mean: Tensor, std: Tensor, n_iter: Tensor, converged: Tensor, shape: tuple[int, ...]) -> LinearFit:
    """The fit in the raw feature space: w·(x-μ)/σ + b = (w/σ)·x + (b - Σ w·μ/σ)."""
    d = mean.shape[-1]
    weight = w[..., :d] / std
    bias = w[..., d] - (weight * mean).sum(-1)
    return LinearFit(weight=weight.reshape(*shape, d).contiguous(), bias=bias.reshape(shape),
                     n_iter=n_iter.reshape(shape), converged=converged.reshape(shape))


@torch.no_grad()
def _fit_compiled(x, rows, y, s, lam, w, mean, std, n_iter, converged, val, rank, max_iter, tol, cg_iter, patience) -> None:
    """One problem at a time, while its features are in cache: gather its training rows,
    standardise, sketch the preconditioner, solve with :func:`probes.cpu_solver.newton_cg`
    (``w``, ``mean``, ``std``, ``n_iter``, ``converged`` are filled in place)."""
    from probes.cpu_passes import standardised_design
    from probes.cpu_solver import newton_cg

    p, d = x.shape[0], x.shape[2]
    n = y.shape[-1]
    omega = LowRankPreconditioner.test_matrix(d, rank, x.device, x.dtype)
    # A zero row for the bias column: design @ omega_pad = AΩ for the standardised features A.
    omega_pad = torch.cat([omega, omega.new_zeros(1, omega.shape[1])])
    design = torch.empty(n, d + 1, dtype=x.dtype)
    rows_np = (torch.arange(x.shape[1]) if rows is None else rows).to("cpu", torch.int64).numpy()
    y, s, lam = y.contiguous(), s.contiguous(), lam.contiguous()
    if val is not None:
        x_val, y_val, s_val = val
        val_design = torch.empty(x_val.shape[1], d + 1, dtype=x.dtype)
        val_rows = torch.arange(x_val.shape[1], dtype=torch.int64).numpy()
        y_val, s_val = y_val.contiguous(), s_val.contiguous()
    for q in range(p):
        sq = s[q, 0]
        mean_q, std_q = standardised_design(x[q].contiguous().numpy(), rows_np, sq.numpy(), design.numpy())
        mean[q, 0], std[q, 0] = torch.from_numpy(mean_q), torch.from_numpy(std_q)
        # Y = AᵀSAΩ (the Nyström sketch of precondition.py) from the standardised design itself.
        sample = (design.T @ (design @ omega_pad).mul_(sq[:, None]))[:d]
        low_rank = LowRankPreconditioner.from_sample(sample[None], omega, rank)
        problem_val = None
        if val is not None:
            standardised_design(x_val[q].contiguous().numpy(), val_rows, s_val[q, 0].numpy(), val_design.numpy(), mean_q, std_q)
            problem_val = (val_design.numpy(), y_val[q].numpy(), s_val[q, 0].numpy())
        elif q > 0:
            # Warm start from the previous problem's solution (see fit_logistic's torch path).
            w[q] = w[q - 1]
        steps, done = newton_cg(design.numpy(), y[q].numpy(), sq.numpy(), lam.numpy(), w[q].numpy(),
                                low_rank.basis_t[0].numpy(), low_rank.eigvals[0, 0].numpy(), low_rank.tail[0, 0].numpy(),
                                problem_val, max_iter, tol, cg_iter, patience)
        n_iter[q], converged[q] = torch.from_numpy(steps), torch.from_numpy(done)


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
