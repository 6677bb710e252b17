"""Low-rank (randomised Nyström) preconditioner for the Newton systems of logistic regression.

The Newton system of a column is ``(XᵀhX + λ)Δ = -g`` with ``h`` the Hessian weights of the rows.
Residual-stream features are strongly correlated: the top 10 of 576 eigenvalues of their
covariance hold 57–97% of its trace (SmolLM2, all 30 layers), so unpreconditioned CG spends its
steps on a few stiff directions. Approximating ``XᵀhX ≈ (Σ_i h_i)·XᵀSX`` (``S`` the row weights:
exact when ``h`` is uncorrelated with the features) and ``XᵀSX ≈ U Λ Uᵀ`` by its top ``k``
eigenpairs gives the preconditioner of Frangella, Tropp & Udell (2023, "Randomized Nyström
preconditioning", SIAM J. Matrix Anal. Appl.; up to a scalar factor, which CG ignores)::

    P⁻¹ = U (βΛ + λ)⁻¹ Uᵀ + (I - UUᵀ) / (βλ_k + λ),   β = Σ_i h_i,

one eigendecomposition per problem shared by every column and Newton step (only ``β`` and ``λ``
change). The bias coordinate is kept out of ``U``: after standardisation it is an exact
eigenvector of ``XᵀSX`` with eigenvalue 1 (the features have weighted mean zero), so its
curvature is ``β`` and its preconditioner ``1/β`` (it is not penalised).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from jaxtyping import Float
from torch import Tensor

__all__ = ["LowRankPreconditioner"]


class LowRankPreconditioner:
    """Top-``k`` eigenpairs of each problem's weighted feature covariance ``XᵀSX`` (bias excluded)."""

    def __init__(self, basis: Float[Tensor, "p D k"], eigvals: Float[Tensor, "p 1 k"]):
        self.basis, self.eigvals = basis, eigvals
        self.basis_t = basis.transpose(1, 2).contiguous()
        # Curvature per unit β outside the basis: the smallest kept eigenvalue for the features
        # (dropped ones are 0 and must not make the tail 0: P⁻¹ would then blow up), 1 for the bias.
        smallest = torch.where(eigvals > 0, eigvals, torch.inf).amin(-1, keepdim=True)
        smallest = torch.where(torch.isfinite(smallest), smallest, torch.ones_like(smallest))
        self.tail = torch.cat([smallest.expand(-1, -1, basis.shape[1] - 1), torch.ones_like(smallest)], -1)

    @staticmethod
    def test_matrix(d: int, rank: int, device: torch.device, dtype: torch.dtype, oversample: int = 8, seed: int = 0) -> Float[Tensor, "d l"]:
        """Orthonormal Gaussian test matrix ``Ω`` with ``rank + oversample`` columns (at most ``d``)."""
        g = torch.Generator(device=device).manual_seed(seed)
        # Drawn and orthonormalised in float64: QR has no half-precision kernels.
        gauss = torch.randn(d, min(d, rank + oversample), generator=g, device=device, dtype=torch.float64)
        return torch.linalg.qr(gauss).Q.to(dtype)

    @staticmethod
    def sample(
        x: Float[Tensor, "p n d"], s: Float[Tensor, "p 1 n"], mean: Float[Tensor, "p 1 d"], std: Float[Tensor, "p 1 d"], omega: Float[Tensor, "d l"]
    ) -> Float[Tensor, "p d l"]:
        """``Y = AᵀSAΩ`` for the standardised features ``A = (x - mean)/std``, from the raw
        features in two passes (run it per cache-sized chunk, right after the chunk's statistics)."""
        # AΩ = x(Ω/σ) - μ(Ω/σ); AᵀS(AΩ) = (xᵀS(AΩ) - μᵀ·Σ_i s_i(AΩ)_i)/σ, and the last sum is 0
        # because μ is the s-weighted mean.
        scaled = omega / std.transpose(1, 2)
        proj = torch.bmm(x, scaled) - torch.bmm(mean, scaled)
        return torch.bmm(x.transpose(1, 2), proj * s.transpose(1, 2)) / std.transpose(1, 2)

    @classmethod
    def from_sample(cls, sample: Float[Tensor, "p d l"], omega: Float[Tensor, "d l"], rank: int, rcond: float = 1e-6) -> LowRankPreconditioner:
        """Randomised Nyström approximation ``Â = Y(ΩᵀY)⁺Yᵀ`` (Tropp, Yurtsever, Udell & Cevher
        2017, Algorithm 3, with a pseudo-inverse instead of their shifted Cholesky) of every
        problem at once, through ``l × l`` matrices only (float64: they cost no pass over the
        features). Eigenvalues below ``rcond`` times the largest count as zero (rank-deficient
        covariances: constant or duplicated features), their basis vectors are dropped."""
        p, d, width = sample.shape
        rank = min(rank, width)
        y = sample.double()
        core = omega.double().T @ y
        theta, vec = torch.linalg.eigh((core + core.transpose(1, 2)) / 2)
        # (ΩᵀY)⁺ = R Rᵀ, R = VΘ₊^(-1/2): Â = (YR)(YR)ᵀ, whose eigenpairs come from the l × l matrix
        # (YR)ᵀ(YR) = RᵀYᵀYR = WΣ²Wᵀ: U = YRWΣ⁻¹.
        keep = theta > rcond * theta[..., -1:]
        half = vec * torch.where(keep, theta.clamp_min(1e-300).rsqrt(), 0.0)[:, None, :]
        small = half.transpose(1, 2) @ torch.bmm(y.transpose(1, 2), y) @ half
        eig, w = torch.linalg.eigh((small + small.transpose(1, 2)) / 2)
        eig, w = eig.flip(-1)[..., :rank], w.flip(-1)[..., :rank]
        kept = eig > rcond * eig[..., :1]
        coef = half @ (w * torch.where(kept, eig.clamp_min(1e-300).rsqrt(), 0.0)[:, None, :])
        basis = torch.zeros(p, d + 1, rank, device=sample.device, dtype=omega.dtype)
        # Built in float64 from the same Y as the small eigenproblems, so U is orthonormal to
        # float64 rounding before the cast (a float32 product was off by ~3e-3, enough to make
        # P⁻¹ indefinite when the kept spectrum spans a few hundred).
        basis[:, :d] = torch.bmm(y, coef).to(omega.dtype)
        return cls(basis, torch.where(kept, eig, 0.0)[:, None, :].to(omega.dtype))

    def select(self, rows: Tensor | slice) -> LowRankPreconditioner:
        """The preconditioner of problems ``rows`` only."""
        return LowRankPreconditioner(self.basis[rows], self.eigvals[rows])

    def apply_fn(self, h_sum: Float[Tensor, "p c 1"], lam: Float[Tensor, "c D"]) -> Callable[[Tensor], Tensor]:
        """``r ↦ P⁻¹r`` for the Newton systems with row-weight sums ``h_sum`` (β) and penalties ``lam``."""
        tail_inv = 1.0 / (h_sum * self.tail + lam + 1e-12)
        # P⁻¹ = tail⁻¹ on everything plus (top⁻¹ - tail⁻¹) on the basis (features share one λ).
        coef = 1.0 / (h_sum * self.eigvals + lam[:, :1] + 1e-12) - tail_inv[..., :1]
        basis, basis_t = self.basis, self.basis_t

        def apply(r: Float[Tensor, "p c D"]) -> Float[Tensor, "p c D"]:
            return torch.baddbmm(tail_inv * r, coef * torch.bmm(r, basis), basis_t)

        return apply
