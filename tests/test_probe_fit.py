"""Batched probe fitting vs scikit-learn and hand computations.

Every test runs twice: with the compiled CPU solver (``probes.cpu_solver``, the default) and with
the torch solver (``INTERP_NUMBA=0``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from probes import fit as fit_module
from probes.fit import fit_logistic, fit_mass_mean, l2_from_sklearn_c, sklearn_c_from_l2

sklearn = pytest.importorskip("sklearn")
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402


@pytest.fixture(autouse=True, params=["compiled", "torch"])
def solver(request, monkeypatch):
    monkeypatch.setenv("INTERP_NUMBA", "1" if request.param == "compiled" else "0")
    return request.param


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny matmuls: one thread avoids thread-pool contention on a shared 2-core machine.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _problems(p: int = 3, n: int = 300, d: int = 20, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy linearly generated labels on features of very different scales and offsets."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(p, n, d, generator=g) * (torch.rand(d, generator=g) * 3 + 0.1) + torch.randn(d, generator=g)
    w = torch.randn(p, d, generator=g)
    y = (torch.einsum("pnd,pd->pn", x, w) + 2 * torch.randn(p, n, generator=g) > 0).float()
    return x, y


@pytest.mark.parametrize("standardize", [False, True])
def test_logistic_matches_sklearn_with_the_stated_c_mapping(standardize):
    x, y = _problems()
    n_train, cs = 200, [0.01, 0.1, 1.0]
    fit = fit_logistic(x[:, :n_train], y[:, :n_train], [l2_from_sklearn_c(c, n_train) for c in cs], standardize=standardize, tol=1e-6)
    assert fit.weight.shape == (3, 3, 20) and bool(fit.converged.all())
    scores = fit.scores(x[:, n_train:])
    for p in range(3):
        train = x[p, :n_train].double().numpy()
        test = x[p, n_train:].double().numpy()
        if standardize:
            scaler = StandardScaler().fit(train)
            train, test = scaler.transform(train), scaler.transform(test)
        for r, c in enumerate(cs):
            ref = LogisticRegression(C=c, solver="newton-cholesky", tol=1e-10, max_iter=1000).fit(train, y[p, :n_train].numpy())
            ours_acc = float(((scores[p, r] > 0).float() == y[p, n_train:]).float().mean())
            assert abs(ours_acc - ref.score(test, y[p, n_train:].numpy())) <= 0.01
            np.testing.assert_allclose(scores[p, r].numpy(), ref.decision_function(test), atol=2e-3 * (1 + np.abs(ref.decision_function(test)).max()))
            if not standardize:
                np.testing.assert_allclose(fit.weight[p, r].numpy(), ref.coef_[0], atol=2e-3 * (1 + np.abs(ref.coef_).max()))
                assert abs(float(fit.bias[p, r]) - ref.intercept_[0]) < 5e-3 * (1 + abs(ref.intercept_[0]))


def test_l1_matches_sklearn_saga_and_is_sparse():
    x, y = _problems(p=1, n=300, d=20, seed=1)
    l1 = 0.02
    fit = fit_logistic(x, y, [0.0], l1=l1, tol=1e-7, max_iter=5000)
    xs = StandardScaler().fit_transform(x[0].double().numpy())
    ref = LogisticRegression(C=sklearn_c_from_l2(l1, 300), l1_ratio=1.0, solver="saga", tol=1e-10, max_iter=100_000).fit(xs, y[0].numpy())
    assert (fit.weight[0, 0] == 0).sum() > 0
    assert set(np.flatnonzero(fit.weight[0, 0].numpy())) == set(np.flatnonzero(ref.coef_[0]))
    x_std = torch.from_numpy(xs).float()
    ours = x_std @ (fit.weight[0, 0] * torch.from_numpy(StandardScaler().fit(x[0].numpy()).scale_).float())
    np.testing.assert_allclose((ours - ours.mean()).numpy(), ref.decision_function(xs) - ref.decision_function(xs).mean(), atol=2e-3)


def test_padded_problems_with_a_mask_equal_separate_fits():
    x, y = _problems(p=2, n=120, d=8, seed=2)
    mask = torch.ones(2, 120)
    mask[1, 80:] = 0
    joint = fit_logistic(x, y, [1e-2], mask=mask, tol=1e-6)
    alone = fit_logistic(x[1:, :80], y[1:, :80], [1e-2], tol=1e-6)
    torch.testing.assert_close(joint.weight[1], alone.weight[0], atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(joint.bias[1], alone.bias[0], atol=1e-4, rtol=1e-3)


def test_early_stopping_keeps_the_best_validation_iterate():
    # Few items, many features, almost no penalty: the converged fit overfits.
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 140, 60, generator=g)
    y = (x[..., 0] + 1.5 * torch.randn(1, 140, generator=g) > 0).float()
    xt, yt, xv, yv = x[:, :40], y[:, :40], x[:, 40:], y[:, 40:]

    def val_loss(fit):
        return float(torch.nn.functional.binary_cross_entropy_with_logits(fit.scores(xv)[0, 0], yv[0]))

    full = fit_logistic(xt, yt, [1e-4], max_iter=30)
    stopped = fit_logistic(xt, yt, [1e-4], x_val=xv, y_val=yv, early_stopping=True, patience=2, max_iter=30)
    assert val_loss(stopped) < val_loss(full)
    assert int(stopped.n_iter[0, 0]) < int(full.n_iter[0, 0])


def test_mass_mean_is_the_difference_of_class_means_with_a_midpoint_threshold():
    x = torch.tensor([[[1.0, 0.0], [3.0, 2.0], [0.0, 1.0], [2.0, 5.0]]])
    y = torch.tensor([1.0, 1.0, 0.0, 0.0])
    fit = fit_mass_mean(x, y)
    mu1, mu0 = torch.tensor([2.0, 1.0]), torch.tensor([1.0, 3.0])
    torch.testing.assert_close(fit.weight[0], mu1 - mu0)
    torch.testing.assert_close(fit.bias[0], -(mu1 - mu0) @ (mu1 + mu0) / 2)
    # The midpoint of the class means scores exactly zero.
    assert abs(float(((mu1 + mu0) / 2) @ fit.weight[0] + fit.bias[0])) < 1e-6


def test_label_sets_as_columns_equal_separate_fits():
    x, y = _problems(p=2, n=150, d=10, seed=4)
    flipped = 1 - y
    joint = fit_logistic(x, torch.stack([y, flipped], 1), [1e-2, 1e-1], tol=1e-6)
    assert joint.weight.shape == (2, 2, 2, 10) and joint.bias.shape == (2, 2, 2)
    for s, labels in enumerate((y, flipped)):
        alone = fit_logistic(x, labels, [1e-2, 1e-1], tol=1e-6)
        torch.testing.assert_close(joint.weight[:, s], alone.weight, atol=1e-4, rtol=1e-3)
    # Flipping the labels flips the probe.
    torch.testing.assert_close(joint.weight[:, 1], -joint.weight[:, 0], atol=1e-4, rtol=1e-3)


def test_c_mapping_round_trips():
    assert l2_from_sklearn_c(0.5, 200) == pytest.approx(0.01)
    assert sklearn_c_from_l2(l2_from_sklearn_c(3.0, 77), 77) == pytest.approx(3.0)


def test_chunked_solve_with_reused_buffers_and_warm_starts_equals_one_batch(monkeypatch):
    # Chunks of 2 problems (then 1): buffers are reused, resized, and each chunk warm-starts.
    x, y = _problems(p=3, n=150, d=12, seed=5)
    l2 = [1e-1, 1e-3]
    whole = fit_logistic(x, y, l2, tol=1e-6)
    monkeypatch.setattr(fit_module, "_chunk_size", lambda x: 2)
    chunked = fit_logistic(x, y, l2, tol=1e-6)
    assert bool(chunked.converged.all())
    torch.testing.assert_close(chunked.weight, whole.weight, atol=2e-4, rtol=1e-3)
    torch.testing.assert_close(chunked.bias, whole.bias, atol=2e-4, rtol=1e-3)


def test_a_slow_penalty_left_running_alone_matches_its_own_fit():
    # The weakest penalty needs the most Newton steps, so it ends up solved as the only column.
    x, y = _problems(p=2, n=160, d=15, seed=6)
    l2 = [1.0, 1e-1, 1e-2, 1e-5]
    joint = fit_logistic(x, y, l2, tol=1e-6)
    assert bool((joint.n_iter[:, 3] > joint.n_iter[:, :3].amax(1)).all())
    for r, lam in enumerate(l2):
        alone = fit_logistic(x, y, [lam], tol=1e-6)
        torch.testing.assert_close(joint.weight[:, r], alone.weight[:, 0], atol=5e-4, rtol=2e-3)
        torch.testing.assert_close(joint.bias[:, r], alone.bias[:, 0], atol=5e-4, rtol=2e-3)


def test_early_stopping_of_several_penalties_keeps_better_validation_iterates():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 140, 60, generator=g)
    y = (x[..., 0] + 1.5 * torch.randn(2, 140, generator=g) > 0).float()
    xt, yt, xv, yv = x[:, :40], y[:, :40], x[:, 40:], y[:, 40:]
    l2 = [1e-1, 1e-2, 1e-3, 1e-4]
    full = fit_logistic(xt, yt, l2, max_iter=30)
    stopped = fit_logistic(xt, yt, l2, x_val=xv, y_val=yv, early_stopping=True, patience=2, max_iter=30)

    def val_loss(fit):
        scores = fit.scores(xv)
        return torch.nn.functional.binary_cross_entropy_with_logits(scores, yv[:, None].expand_as(scores), reduction="none").mean(-1)

    assert bool((val_loss(stopped) <= val_loss(full) + 1e-6).all())
    # The almost unpenalised probes overfit: early stopping halts them sooner.
    assert bool((stopped.n_iter[:, -1] < full.n_iter[:, -1]).all())


def _correlated(p: int = 2, n: int = 200, d: int = 30, rank: int = 6, noise: float = 0.0, seed: int = 8) -> torch.Tensor:
    """Features driven by a few latent factors (like a residual stream's dominant directions)."""
    g = torch.Generator().manual_seed(seed)
    factors = torch.randn(p, n, rank, generator=g) * torch.linspace(5, 1, rank)
    x = factors @ torch.randn(p, rank, d, generator=g) + 3 * torch.randn(d, generator=g)
    return x + noise * torch.randn(p, n, d, generator=g)


def _standardised_covariance(x: torch.Tensor) -> torch.Tensor:
    a = x.double()
    a = (a - a.mean(1, keepdim=True)) / a.std(1, unbiased=False, keepdim=True)
    return a.transpose(1, 2) @ a / x.shape[1]


def test_nystrom_sketch_recovers_the_eigenpairs_of_a_low_rank_covariance():
    from probes.precondition import LowRankPreconditioner

    x = _correlated()
    p, n, d = x.shape
    s = torch.full((p, 1, n), 1.0 / n)
    mean, std = fit_module._standardise(x, s)
    omega = LowRankPreconditioner.test_matrix(d, 6, x.device, x.dtype)
    pre = LowRankPreconditioner.from_sample(LowRankPreconditioner.sample(x, s, mean, std, omega), omega, 6)
    evals, evecs = torch.linalg.eigh(_standardised_covariance(x))
    torch.testing.assert_close(pre.eigvals[:, 0].double(), evals.flip(-1)[:, :6], rtol=1e-4, atol=1e-4)
    # Same invariant subspace (eigenvectors up to sign): equal projectors; the bias row stays zero.
    u = pre.basis[:, :d].double()
    top = evecs.flip(-1)[..., :6]
    torch.testing.assert_close(u @ u.transpose(1, 2), top @ top.transpose(1, 2), rtol=0, atol=1e-4)
    assert bool((pre.basis[:, d] == 0).all())


def test_low_rank_preconditioner_applies_the_nystrom_formula():
    from probes.precondition import LowRankPreconditioner

    x = _correlated(noise=0.3)
    p, n, d = x.shape
    s = torch.full((p, 1, n), 1.0 / n)
    mean, std = fit_module._standardise(x, s)
    omega = LowRankPreconditioner.test_matrix(d, 5, x.device, x.dtype)
    pre = LowRankPreconditioner.from_sample(LowRankPreconditioner.sample(x, s, mean, std, omega), omega, 5)
    lam = torch.tensor([[0.3] * d + [0.0], [0.01] * d + [0.0]])
    beta = torch.tensor([[[0.2], [0.05]], [[0.25], [0.1]]])
    r = torch.randn(p, 2, d + 1, generator=torch.Generator().manual_seed(9))
    got = pre.apply_fn(beta, lam)(r)
    u, ev = pre.basis[:, :d].double(), pre.eigvals[:, 0].double()
    for i in range(p):
        for c in range(2):
            b, l2 = float(beta[i, c, 0]), float(lam[c, 0])
            # P⁻¹ = U(βΛ + λ)⁻¹Uᵀ + (I - UUᵀ)/(βλ_k + λ) on the features, 1/β on the bias.
            dense = u[i] @ torch.diag(1 / (b * ev[i] + l2)) @ u[i].T + (torch.eye(d, dtype=torch.float64) - u[i] @ u[i].T) / (b * ev[i, -1] + l2)
            torch.testing.assert_close(got[i, c, :d].double(), dense @ r[i, c, :d].double(), rtol=1e-4, atol=1e-4)
            assert float(got[i, c, d]) == pytest.approx(float(r[i, c, d]) / b, rel=1e-5)


def test_low_rank_preconditioning_reaches_the_jacobi_solution_in_fewer_passes(monkeypatch):
    monkeypatch.setenv("INTERP_NUMBA", "0")  # passes are counted on the torch solver's Design
    x = _correlated(p=2, n=300, d=40, rank=5, noise=0.05, seed=10)
    g = torch.Generator().manual_seed(11)
    y = (x[..., :3].sum(-1) - x[..., :3].sum(-1).mean(-1, keepdim=True) + 2 * torch.randn(2, 300, generator=g) > 0).float()
    passes = []
    logits = fit_module.Design.logits

    def counted(self, w):
        passes[-1] += 1
        return logits(self, w)

    monkeypatch.setattr(fit_module.Design, "logits", counted)
    fits = []
    for rank in (0, 8):
        passes.append(0)
        fits.append(fit_logistic(x, y, [1e-1, 1e-3, 1e-5], tol=1e-6, precond_rank=rank))
    assert all(bool(f.converged.all()) for f in fits)
    torch.testing.assert_close(fits[1].scores(x), fits[0].scores(x), atol=2e-3, rtol=2e-3)
    assert passes[1] < passes[0]


def test_constant_and_duplicated_features_keep_the_preconditioner_well_defined():
    # A rank-deficient covariance (more sketch columns than its rank): no failed factorisation,
    # the same probes as with Jacobi preconditioning.
    x, y = _problems(p=2, n=200, d=12, seed=12)
    x[..., 5:8] = 2.0
    x[..., 8] = 3 * x[..., 0]
    jacobi = fit_logistic(x, y, [1e-1, 1e-3], tol=1e-6, precond_rank=0)
    low_rank = fit_logistic(x, y, [1e-1, 1e-3], tol=1e-6)
    assert bool(low_rank.converged.all()) and bool(torch.isfinite(low_rank.weight).all())
    torch.testing.assert_close(low_rank.scores(x), jacobi.scores(x), atol=2e-3, rtol=2e-3)


def test_fewer_items_than_the_rank_and_tiny_penalties_stay_finite():
    # n_train < precond_rank leaves dropped eigenvalues at 0; the tail must not become 0 (NaN
    # weights once reported as converged), and a NaN must never count as converged.
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 24, 256, generator=g), (torch.rand(2, 24, generator=g) > 0.5).float()
    for l2 in (1e-5, 0.0):
        for rank in (0, 32):
            fit = fit_logistic(x, y, [l2], precond_rank=rank)
            assert bool(torch.isfinite(fit.weight).all()) and bool(fit.converged.all()), (l2, rank)
            assert bool(((fit.scores(x)[:, 0] > 0).float() == y).all())  # separable: every item right
    jacobi = fit_logistic(x, y, [1e-2], tol=1e-7, precond_rank=0)
    low_rank = fit_logistic(x, y, [1e-2], tol=1e-7)
    torch.testing.assert_close(low_rank.weight, jacobi.weight, atol=1e-3, rtol=1e-3)


def test_half_precision_features_fit_like_float32():
    x, y = _problems(p=2, n=150, d=10, seed=13)
    single = fit_logistic(x, y, [1e-2, 1e-1], max_iter=30)
    half = fit_logistic(x.bfloat16(), y, [1e-2, 1e-1], max_iter=30)
    agree = ((half.scores(x.bfloat16()).float() > 0) == (single.scores(x) > 0)).float().mean()
    assert half.weight.dtype == torch.bfloat16 and float(agree) >= 0.95


def _both_solvers(monkeypatch, *args, **kwargs):
    """The same fit by the compiled and the torch solver (give ``precond_rank``: their defaults differ)."""
    fits = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("INTERP_NUMBA", flag)
        fits[flag] = fit_logistic(*args, **kwargs)
    return fits["1"], fits["0"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compiled_solver_equals_the_torch_solver(monkeypatch, dtype):
    # Label sets × penalties (6 columns: a full group of 4 and a part group), a mask, warm starts
    # across 3 problems: the same minimiser on both paths (the Newton step counts may differ: the
    # torch solver runs CG in lock-step over a chunk of problems, the compiled one per problem).
    x, y = _problems(p=3, n=200, d=30, seed=14)
    x = x.to(dtype)
    mask = torch.ones(3, 200)
    mask[2, 150:] = 0
    labels = torch.stack([y, 1 - y, torch.roll(y, 7, -1)], 1)
    compiled, reference = _both_solvers(monkeypatch, x, labels, [1e-1, 1e-3], mask=mask, tol=1e-6, precond_rank=16)
    assert compiled.weight.dtype == dtype and bool(compiled.converged.all()) and bool(reference.converged.all())
    torch.testing.assert_close(compiled.weight, reference.weight, atol=2e-4, rtol=2e-3)
    torch.testing.assert_close(compiled.bias, reference.bias, atol=2e-4, rtol=2e-3)


def test_compiled_early_stopping_picks_the_torch_solvers_iterate(monkeypatch):
    g = torch.Generator().manual_seed(15)
    x = torch.randn(2, 140, 60, generator=g)
    y = (x[..., 0] + 1.5 * torch.randn(2, 140, generator=g) > 0).float()
    kwargs = dict(x_val=x[:, 40:], y_val=y[:, 40:], early_stopping=True, patience=2, max_iter=30, precond_rank=16)
    compiled, reference = _both_solvers(monkeypatch, x[:, :40], y[:, :40], [1e-1, 1e-2, 1e-4], **kwargs)
    assert torch.equal(compiled.n_iter, reference.n_iter) and torch.equal(compiled.converged, reference.converged)
    torch.testing.assert_close(compiled.weight, reference.weight, atol=1e-4, rtol=1e-3)


def test_training_rows_by_index_equal_the_gathered_rows():
    x, y = _problems(p=2, n=260, d=16, seed=16)
    rows = torch.randperm(260, generator=torch.Generator().manual_seed(0))[:180]
    by_index = fit_logistic(x, y[:, rows], [1e-2, 1e-4], rows=rows, tol=1e-6)
    gathered = fit_logistic(x[:, rows], y[:, rows], [1e-2, 1e-4], tol=1e-6)
    torch.testing.assert_close(by_index.weight, gathered.weight)
    torch.testing.assert_close(by_index.bias, gathered.bias)


def test_features_with_a_large_offset_match_sklearn():
    # |mean|/std = 1e3 in float32: a one-pass variance (E[x²] - μ²) lost 1e-2 of σ here.
    g = torch.Generator().manual_seed(7)
    z = torch.randn(1, 300, 4, generator=g)
    y = (z[..., 0] + 0.5 * torch.randn(1, 300, generator=g) > 0).float()
    x = 1000.0 + z
    fit = fit_logistic(x, y, [1e-2], tol=1e-6)
    xs = StandardScaler().fit_transform(x[0].double().numpy())
    ref = LogisticRegression(C=sklearn_c_from_l2(1e-2, 300), solver="newton-cholesky", tol=1e-10).fit(xs, y[0].numpy())
    np.testing.assert_allclose(fit.scores(x)[0, 0].double().numpy(), ref.decision_function(xs), atol=5e-3)


def test_rows_out_of_range_or_not_indices_raise_and_a_mask_selects():
    x, y = _problems(p=1, n=100, d=4, seed=17)
    with pytest.raises(IndexError, match="out of range"):
        fit_logistic(x, y[:, :3], [1e-2], rows=torch.tensor([0, 1, 100]))
    with pytest.raises(IndexError, match="integer indices"):
        fit_logistic(x, y[:, :3], [1e-2], rows=torch.tensor([0.0, 1.0, 2.0]))
    keep = torch.arange(100) % 3 != 0
    by_mask = fit_logistic(x, y[:, keep], [1e-2], rows=keep, tol=1e-6)
    by_index = fit_logistic(x, y[:, keep], [1e-2], rows=keep.nonzero().squeeze(-1) - 100, tol=1e-6)  # negative: from the end
    torch.testing.assert_close(by_mask.weight, by_index.weight)


@pytest.mark.parametrize("l2", [float("nan"), float("inf"), -1e-3])
def test_penalties_must_be_finite_and_non_negative(l2):
    x, y = _problems(p=1, n=30, d=3, seed=18)
    with pytest.raises(ValueError, match="finite and >= 0"):
        fit_logistic(x, y, [1e-2, l2])


def test_a_nan_never_passes_the_compiled_stopping_tests():
    from probes.cpu_solver import _all_within

    assert _all_within(np.array([0.1, -0.2]), 0.5)
    assert not _all_within(np.array([0.1, np.nan]), 0.5)
    assert not _all_within(np.array([0.1, 0.7]), 0.5)
