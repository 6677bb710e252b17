"""The stacked SAE step: dense-reference parity (TopK, AuxK, BatchTopK), decoder constraints, init, quality."""

from __future__ import annotations

import math

import pytest
import torch

from interp.errors import UserError
from saes.model import TopKSAE
from saes.step import (
    StackParams, StepConfig, constrain_decoder_grad, geometric_median, init_stack, init_state,
    input_scale, normalize_decoder, sae_step_loss,
)


def _stack(S, d, n, seed=0, dtype=torch.float64) -> StackParams:
    params = StackParams(S, d, n, dtype=dtype)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=dtype))
    normalize_decoder(params)
    return params


def _dense_loss(p, x, cfg, dead):
    """The objective written out densely with plain autograd (no sparse kernels)."""
    W_enc_t, b_enc, W_dec, b_dec = p  # StackParams' order; W_enc_t is the latent-major [S, n, d] encoder
    W_enc = W_enc_t.transpose(1, 2)
    S, B, d = x.shape
    pre = torch.einsum("sbd,sdn->sbn", x - b_dec[:, None], W_enc) + b_enc[:, None]
    if cfg.batch_topk:
        flat = pre.reshape(S, -1)
        kth = flat.topk(cfg.k * B, dim=1).values[:, -1]
        keep = (pre >= kth[:, None, None]) & (pre > 0)
        f = torch.where(keep, pre, torch.zeros_like(pre))
    else:
        _, idx = pre.topk(cfg.k, dim=-1)
        f = torch.zeros_like(pre).scatter(-1, idx, pre.gather(-1, idx).relu())
    x_hat = f @ W_dec + b_dec[:, None]
    tv = (x - x.mean(1, keepdim=True)).pow(2).sum((1, 2))
    fvu = (x_hat - x).pow(2).sum((1, 2)) / tv
    auxk = torch.zeros_like(fvu)
    if cfg.auxk and dead.any():
        k_aux = cfg.k_aux or d // 2
        n_dead = dead.sum(1)
        k_eff = min(k_aux, int(n_dead.max()))
        masked = pre.masked_fill(~dead[:, None], -math.inf)
        top, idx = masked.topk(k_eff, dim=-1)
        vals = torch.where(torch.isfinite(top), top, torch.zeros_like(top)).relu()
        f_aux = torch.zeros_like(pre).scatter(-1, idx, vals)
        e = (x - x_hat).detach()
        scale = (n_dead.to(x.dtype) / k_aux).clamp(max=1)
        auxk = scale * (f_aux @ W_dec - e).pow(2).sum((1, 2)) / tv
    return (fvu + cfg.aux_coef * auxk).sum(), fvu, auxk, f


@pytest.mark.parametrize("batch_topk", [False, True])
@pytest.mark.parametrize("n_dead", [0, 5, 30])  # none, few (gathered columns), most (masked full rows)
def test_step_matches_dense_reference_with_auxk(n_dead, batch_topk):
    S, B, d, n = 2, 24, 8, 40
    params = _stack(S, d, n, seed=n_dead)
    x = torch.randn(S, B, d, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) + 3.0  # off-centre
    cfg = StepConfig(k=4, k_aux=6, dead_tokens_threshold=100, batch_topk=batch_topk, max_k_per_token=n if batch_topk else None)
    state = init_state(S, n)
    state.tokens_since_fired[0, :n_dead] = 1000
    state.tokens_since_fired[1, n - n_dead // 2:] = 1000  # members differ in how many latents are dead
    loss, metrics, new_state = sae_step_loss(params, state, x, cfg)
    grads = torch.autograd.grad(loss, list(params.parameters()))

    ref = [p.detach().clone().requires_grad_() for p in params.parameters()]
    ref_loss, fvu, auxk, f = _dense_loss(ref, x, cfg, state.tokens_since_fired >= 100)
    ref_grads = torch.autograd.grad(ref_loss, ref)
    assert torch.allclose(loss, ref_loss, atol=1e-10)
    assert torch.allclose(metrics["fvu"], fvu) and torch.allclose(metrics["auxk_loss"], auxk)
    assert (metrics["auxk_loss"] > 0).all() == (n_dead > 0)
    for name, got, want in zip(["W_enc_t", "b_enc", "W_dec", "b_dec"], grads, ref_grads):
        assert torch.allclose(got, want, atol=1e-9, rtol=1e-7), name
    assert torch.allclose(metrics["l0"], (f > 0).sum(-1).double().mean(1))
    # counters: fired latents reset to 0, the rest advance by the batch size
    fired = (f > 0).any(1)
    assert torch.equal(new_state.tokens_since_fired, torch.where(fired, 0, state.tokens_since_fired + B))
    assert new_state.n_steps == 1 and state.n_steps == 0  # the old state is untouched


def test_batch_topk_matches_dense_reference_and_tracks_threshold():
    S, B, d, n, k = 2, 16, 8, 30, 3
    params = _stack(S, d, n, seed=5)
    cfg = StepConfig(k=k, batch_topk=True, auxk=False, max_k_per_token=n, threshold_momentum=0.25)
    state = init_state(S, n)
    x1 = torch.randn(S, B, d, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    loss, metrics, state1 = sae_step_loss(params, state, x1, cfg)
    grads = torch.autograd.grad(loss, list(params.parameters()))
    ref = [p.detach().clone().requires_grad_() for p in params.parameters()]
    ref_loss, _, _, f = _dense_loss(ref, x1, cfg, torch.zeros(S, n, dtype=torch.bool))
    for got, want in zip(grads, torch.autograd.grad(ref_loss, ref)):
        assert torch.allclose(got, want, atol=1e-9)
    assert torch.allclose(loss, ref_loss)
    # k*B activations kept over the batch (per token it varies), threshold = smallest kept value
    assert torch.equal((f > 0).sum((1, 2)), torch.full((S,), k * B))
    assert torch.allclose(metrics["l0"], torch.full((S,), float(k), dtype=torch.float64))
    smallest1 = torch.where(f > 0, f, torch.inf).amin((1, 2))
    assert torch.allclose(state1.threshold, smallest1)
    x2 = torch.randn(S, B, d, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    _, _, state2 = sae_step_loss(params, state1, x2, cfg)
    _, _, _, f2 = _dense_loss(ref, x2, cfg, torch.zeros(S, n, dtype=torch.bool))
    smallest2 = torch.where(f2 > 0, f2, torch.inf).amin((1, 2))
    assert torch.allclose(state2.threshold, smallest1 + 0.25 * (smallest2 - smallest1))


def test_global_total_variance_makes_half_batch_losses_and_grads_add_up():
    # data parallelism: slices normalised by the *global* variance sum to the full-batch objective
    S, B, d, n = 2, 24, 8, 40
    params = _stack(S, d, n, seed=7)
    x = torch.randn(S, B, d, dtype=torch.float64, generator=torch.Generator().manual_seed(4)) + 0.5
    cfg = StepConfig(k=4, k_aux=6, dead_tokens_threshold=100)
    state = init_state(S, n)
    state.tokens_since_fired[:, :12] = 1000  # AuxK active on both members

    def run(xb, tv=None):
        loss, metrics, new = sae_step_loss(params, state, xb, cfg, total_variance=tv)
        return loss, metrics, new, torch.autograd.grad(loss, list(params.parameters()))

    loss, metrics, _, grads = run(x)
    own = (x - x.mean(1, keepdim=True)).pow(2).sum((1, 2))
    loss_own, metrics_own, _, grads_own = run(x, own)
    # the step computes the variance another way (sum of squares minus the mean's): equal to rounding
    assert torch.allclose(loss_own, loss, rtol=1e-12) and all(torch.allclose(a, b, rtol=1e-10, atol=1e-13) for a, b in zip(grads_own, grads))
    assert all(torch.allclose(metrics_own[name], metrics[name], rtol=1e-12) for name in metrics)

    halves = [run(part, own) for part in x.split(B // 2, dim=1)]
    assert torch.allclose(halves[0][0] + halves[1][0], loss, rtol=1e-12)
    for name in ("fvu", "auxk_loss"):
        assert (metrics[name] > 0).all()
        assert torch.allclose(halves[0][1][name] + halves[1][1][name], metrics[name], rtol=1e-12), name
    assert torch.allclose((halves[0][1]["l0"] + halves[1][1]["l0"]) / 2, metrics["l0"], rtol=1e-12)
    for name, a, b, full in zip(["W_enc_t", "b_enc", "W_dec", "b_dec"], halves[0][3], halves[1][3], grads):
        assert torch.allclose(a + b, full, rtol=1e-10, atol=1e-12), name
    # the mean of losses each normalised by its own half's variance (averaged ddp gradients) is not it
    local = [run(part)[0] for part in x.split(B // 2, dim=1)]
    assert not torch.allclose((local[0] + local[1]) / 2, loss, rtol=1e-3)


def test_decoder_constraint_and_normalization():
    params = _stack(2, 6, 10)
    params.W_dec.grad = torch.randn_like(params.W_dec)
    constrain_decoder_grad(params)
    assert (params.W_dec.grad * params.W_dec).sum(-1).abs().max() < 1e-12
    with torch.no_grad():
        params.W_dec.mul_(3.0)
    normalize_decoder(params)
    assert torch.allclose(params.W_dec.norm(dim=-1), torch.ones(2, 10, dtype=torch.float64))


def test_geometric_median_and_init():
    # 1-D: the geometric median is the ordinary median; an outlier moves the mean, not the median.
    pts = torch.tensor([[[0.0], [1.0], [2.0], [3.0], [100.0]]])
    assert abs(float(geometric_median(pts)[0, 0]) - 2.0) < 1e-3
    # d-D: no small step from the result lowers the sum of distances
    cloud = torch.randn(1, 200, 5, generator=torch.Generator().manual_seed(0)) + 3.0
    m = geometric_median(cloud)[0]
    cost = lambda c: (cloud[0] - c).norm(dim=-1).sum()  # noqa: E731
    for direction in torch.eye(5):
        assert cost(m) <= cost(m + 1e-2 * direction) and cost(m) <= cost(m - 1e-2 * direction)
    params = init_stack(2, 5, 12, sample=torch.cat([cloud, cloud * 2]), seed=1, enc_init_scale=1.0)
    assert torch.allclose(params.W_enc, params.W_dec.transpose(1, 2))
    assert torch.allclose(params.W_dec.norm(dim=-1), torch.ones(2, 12))
    assert torch.allclose(params.b_dec[0], m, atol=1e-4) and (params.b_enc == 0).all()
    mean_init = init_stack(2, 5, 12, sample=torch.cat([cloud, cloud * 2]), b_dec_init="mean")
    assert torch.allclose(mean_init.b_dec[1], 2 * cloud[0].mean(0), atol=1e-5)
    scaled = init_stack(2, 5, 12, seed=1, enc_init_scale=0.58)
    assert torch.equal(scaled.W_dec, params.W_dec) and torch.allclose(scaled.W_enc, 0.58 * params.W_dec.transpose(1, 2))
    # the default: encoder rows of norm 1/sqrt(3), as nn.Linear's init leaves them in Gao et al.'s and sparsify's tied init
    default = init_stack(2, 5, 12, seed=1)
    assert torch.allclose(default.W_enc.norm(dim=1), torch.full((2, 12), (1 / 3) ** 0.5))
    assert torch.allclose(default.W_enc, params.W_dec.transpose(1, 2) / 3 ** 0.5)
    with pytest.raises(UserError, match="enc_init_scale"):
        init_stack(1, 5, 12, enc_init_scale=0.0)


def test_input_scale_gives_unit_mean_square_per_dimension():
    sample = 7.0 * torch.randn(2, 500, 16)
    c = input_scale(sample)
    assert torch.allclose((c[:, None, None] * sample).pow(2).sum(-1).mean(1), torch.full((2,), 16.0), rtol=1e-5)


def test_bad_inputs_are_user_errors():
    params = _stack(1, 4, 8, dtype=torch.float32)
    state = init_state(1, 8)
    with pytest.raises(UserError, match="k must satisfy"):
        sae_step_loss(params, state, torch.randn(1, 5, 4), StepConfig(k=8))
    bad = torch.randn(1, 5, 4)
    bad[0, 2, 1] = math.nan
    with pytest.raises(UserError, match="NaN or Inf"):
        sae_step_loss(params, state, bad, StepConfig(k=2))
    bad[0, 2, 1] = -math.inf
    with pytest.raises(UserError, match="NaN or Inf"):
        sae_step_loss(params, state, bad, StepConfig(k=2))
    with pytest.raises(UserError, match="d_in"):
        sae_step_loss(params, state, torch.randn(1, 5, 3), StepConfig(k=2))
    with pytest.raises(UserError, match="b_dec_init"):
        init_stack(1, 4, 8, b_dec_init="median")


def test_saved_member_reproduces_training_reconstruction(tmp_path):
    import saes

    S, d, n, k = 2, 8, 32, 4
    raw = 5.0 * torch.randn(S, 64, d) + 1.0
    c = input_scale(raw)
    params = init_stack(S, d, n, sample=c[:, None, None] * raw, seed=3)
    x = c[:, None, None] * raw
    loss, _, _ = sae_step_loss(params, init_state(S, n), x, StepConfig(k=k, auxk=False))
    from saes.kernels import encode_topk, sparse_decode

    values, indices, _ = encode_topk(x, params.W_enc, params.b_enc, params.b_dec, k)
    x_hat = (sparse_decode(values, indices, params.W_dec) + params.b_dec[:, None]).detach()
    TopKSAE.from_stack(params, 1, k, activation_scale=float(c[1]), hook_name="h", model="m").save(tmp_path / "s")
    sae = saes.load(tmp_path / "s")
    assert torch.allclose(sae(raw[1]), x_hat[1] / c[1], atol=1e-4)


def _sparse_data(gen, directions, batch, p):
    """Tokens that are sums of a few ground-truth directions with magnitudes in [0.5, 1.5)."""
    on = torch.rand(batch, directions.shape[0], generator=gen) < p
    return (on * (0.5 + torch.rand(batch, directions.shape[0], generator=gen))) @ directions


def _train(d, n_true, n, k, steps, auxk=True, batch_topk=False, shrink_half=None, seed=0, cpu_bf16_encoder=False):
    """Train one SAE with the step + torch Adam on synthetic data; return (params, last metrics, directions)."""
    gen = torch.Generator().manual_seed(seed)
    directions = torch.randn(n_true, d, generator=gen)
    directions /= directions.norm(dim=1, keepdim=True)
    p = k / n_true
    sample = _sparse_data(gen, directions, 4096, p)[None]
    c = input_scale(sample)
    params = init_stack(1, d, n, sample=c[:, None, None] * sample, seed=seed)
    if shrink_half is not None:
        with torch.no_grad():
            params.W_enc[:, :, : n // 2] *= shrink_half
    state = init_state(1, n)
    cfg = StepConfig(k=k, auxk=auxk, batch_topk=batch_topk, dead_tokens_threshold=2560, cpu_bf16_encoder=cpu_bf16_encoder)
    opt = torch.optim.Adam(params.parameters(), lr=3e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # these matrices are tiny: a second thread only adds synchronisation
    try:
        for _ in range(steps):
            x = c[:, None, None] * _sparse_data(gen, directions, 256, p)[None]
            loss, metrics, state = sae_step_loss(params, state, x, cfg)
            loss.backward()
            constrain_decoder_grad(params)
            opt.step()
            opt.zero_grad()
            normalize_decoder(params)
    finally:
        torch.set_num_threads(threads)
    return params, metrics, directions


@pytest.mark.parametrize("batch_topk, cpu_bf16_encoder", [(False, False), (True, False), (False, True)])
def test_recovers_ground_truth_directions(batch_topk, cpu_bf16_encoder):
    params, metrics, directions = _train(d=32, n_true=64, n=128, k=4, steps=400, batch_topk=batch_topk, cpu_bf16_encoder=cpu_bf16_encoder)
    best_cos = (directions @ params.W_dec[0].detach().T).max(1).values
    assert (best_cos > 0.9).float().mean() >= 0.9
    assert metrics["fvu"].item() < 0.3


def test_auxk_keeps_latents_alive_where_they_die_without_it():
    # Half the latents start with encoder columns 20x too small: TopK never selects them, so the
    # main loss sends them no gradient and they stay dead; AuxK is the only signal that reaches them.
    _, without, _ = _train(d=32, n_true=256, n=128, k=4, steps=350, auxk=False, shrink_half=0.05)
    _, with_auxk, _ = _train(d=32, n_true=256, n=128, k=4, steps=350, auxk=True, shrink_half=0.05)
    assert without["dead_fraction"].item() >= 0.4
    assert with_auxk["dead_fraction"].item() < 0.01
    assert with_auxk["fvu"].item() < without["fvu"].item()


def test_check_finite_accepts_finite_batches_whose_sum_overflows():
    from saes.step import check_finite

    huge = torch.full((1, 4, 2), 3e38)  # every entry finite, their float32 sum is inf
    assert not torch.isfinite(huge.sum())
    check_finite(huge)
    huge[0, 1, 0] = math.inf
    with pytest.raises(UserError, match="NaN or Inf"):
        check_finite(huge)


def test_reused_pre_activation_buffer_gives_the_fresh_result():
    """The step writes its pre-activations into a buffer kept on the params; stale contents must not leak."""
    S, B, d, n = 2, 12, 6, 20
    cfg = StepConfig(k=3, k_aux=4, dead_tokens_threshold=5)
    x = torch.randn(S, B, d, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    params = _stack(S, d, n, seed=4)
    state = init_state(S, n)
    state.tokens_since_fired[:, : n // 2] = 10  # AuxK reads the buffer too
    fresh_loss, fresh_metrics, _ = sae_step_loss(params, state, x, cfg)
    buffer = params.scratch((S, B, n), torch.float64, x.device)
    buffer.fill_(math.nan)
    loss, metrics, _ = sae_step_loss(params, state, x, cfg)
    assert params.scratch((S, B, n), torch.float64, x.device).data_ptr() == buffer.data_ptr()  # reused, not reallocated
    assert torch.equal(loss, fresh_loss) and all(torch.equal(metrics[key], fresh_metrics[key]) for key in metrics)


def test_checkpoint_tensors_round_trip_and_old_layout_is_a_user_error():
    from types import SimpleNamespace

    from saes.stacking import load_stack_tensors, stack_tensors

    src = SimpleNamespace(params=_stack(2, 4, 8, seed=1, dtype=torch.float32), state=init_state(2, 8), keys=[("h", 8, 2), ("h", 8, 2)])
    dst = SimpleNamespace(params=_stack(2, 4, 8, seed=2, dtype=torch.float32), state=init_state(2, 8), keys=src.keys)
    tensors, meta = stack_tensors([src])
    load_stack_tensors([dst], tensors, meta)
    assert all(torch.equal(a, b) for a, b in zip(src.params.parameters(), dst.params.parameters()))
    # checkpoints written before the encoder became latent-major hold "W_enc" [S, d, n] instead of "W_enc_t"
    tensors["stack0.param.W_enc"] = tensors.pop("stack0.param.W_enc_t").transpose(1, 2).contiguous()
    with pytest.raises(UserError, match="older version.*--no-resume"):
        load_stack_tensors([dst], tensors, meta)


@pytest.mark.parametrize("offset", [0.0, 100.0])
@pytest.mark.parametrize("numba", ["1", "0"])  # the compiled one-pass statistics and the torch ops
def test_variance_from_centered_inputs_is_accurate_in_float32(offset, numba, monkeypatch):
    from saes.step import _centered_sum_sq

    monkeypatch.setenv("INTERP_NUMBA", numba)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4096, 576, generator=g, dtype=torch.float64) * torch.rand(576, generator=g, dtype=torch.float64) + offset
    exact = (x - x.mean(1, keepdim=True)).pow(2).sum((1, 2))
    got = _centered_sum_sq(x.float()).double()
    assert torch.allclose(got, exact, rtol=1e-4 if offset else 1e-6)


def test_auxk_is_on_by_default_with_k_aux_half_d_in_and_coefficient_one_32nd():
    """The trainer's defaults reach the step: AuxK on, ``k_aux = d_in // 2``, ``aux_coef = 1/32`` (the dense reference spells them out)."""
    from types import SimpleNamespace

    from saes.config import TrainConfig
    from saes.stacking import make_step_config

    S, B, d, n = 1, 24, 8, 40
    cfg = make_step_config(TrainConfig(hooks=["h"], settings=[(n, 4)], dead_tokens_threshold=100), 4)
    params = _stack(S, d, n, seed=9)
    x = torch.randn(S, B, d, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    state = init_state(S, n)
    state.tokens_since_fired[:, :30] = 1000  # 30 dead latents: more than d // 2 = 4 of them can be used
    loss, metrics, _ = sae_step_loss(params, state, x, cfg)
    explicit = SimpleNamespace(k=4, batch_topk=False, auxk=True, k_aux=d // 2, aux_coef=1 / 32)
    ref_loss, fvu, auxk, _ = _dense_loss(list(params.parameters()), x, explicit, state.tokens_since_fired >= 100)
    assert float(auxk) > 0
    assert torch.allclose(metrics["auxk_loss"], auxk) and torch.allclose(loss, ref_loss, atol=1e-12)
    other = SimpleNamespace(**{**vars(explicit), "k_aux": d // 2 + 2})  # the reference can tell k_aux apart here
    assert not torch.allclose(_dense_loss(list(params.parameters()), x, other, state.tokens_since_fired >= 100)[2], auxk)


def test_batch_topk_default_candidate_cap_equals_the_exact_rule_when_no_token_needs_more():
    """BatchTopK pre-selects ``4 k`` candidates per token: where the exact top ``k B`` gives no token more, nothing changes."""
    S, B, d, n, k = 2, 32, 8, 60, 3
    params = _stack(S, d, n, seed=6)
    x = torch.randn(S, B, d, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    capped = StepConfig(k=k, batch_topk=True, auxk=False)  # max_k_per_token None: 4 k
    exact = StepConfig(k=k, batch_topk=True, auxk=False, max_k_per_token=n)
    ref = [p.detach().clone().requires_grad_() for p in params.parameters()]
    _, _, _, f = _dense_loss(ref, x, exact, torch.zeros(S, n, dtype=torch.bool))
    assert int((f > 0).sum(-1).max()) <= 4 * k < n  # the premise: the cap does not bind on this batch
    out = {}
    for name, cfg in (("capped", capped), ("exact", exact)):
        loss, metrics, state = sae_step_loss(params, init_state(S, n), x, cfg)
        out[name] = [loss, metrics["l0"], state.threshold, *torch.autograd.grad(loss, list(params.parameters()))]
    for a, b in zip(out["capped"], out["exact"]):
        assert torch.allclose(a, b, atol=1e-12)


@pytest.mark.parametrize("batch_topk", [False, True])
def test_cpu_bf16_encoder_step_is_the_float32_step_up_to_bf16_rounding(batch_topk):
    """The bf16 encoder GEMM only rounds the pre-activations: loss, metrics and gradients stay within bf16 error of fp32."""
    S, B, d, n = 2, 512, 64, 256
    params = _stack(S, d, n, seed=3, dtype=torch.float32)
    x = torch.randn(S, B, d, generator=torch.Generator().manual_seed(5)) + 0.5
    out = {}
    for bf16 in (False, True):
        cfg = StepConfig(k=8, k_aux=16, dead_tokens_threshold=100, batch_topk=batch_topk, cpu_bf16_encoder=bf16)
        state = init_state(S, n)
        state.tokens_since_fired[:, :40] = 1000  # AuxK on
        loss, metrics, _ = sae_step_loss(params, state, x, cfg)
        out[bf16] = [loss.detach(), metrics["fvu"], metrics["auxk_loss"], *torch.autograd.grad(loss, list(params.parameters()))]
    assert float(out[True][2].min()) > 0
    for name, a, b in zip(["loss", "fvu", "auxk", "W_enc_t", "b_enc", "W_dec", "b_dec"], out[True], out[False]):
        rel = float((a - b).norm() / b.norm())
        assert 0 < rel < 2e-2 if name in ("loss", "fvu") else rel < 5e-2, (name, rel)  # nonzero: the bf16 path did run


def test_buffer_pool_hands_out_only_storage_nothing_else_holds():
    from saes.kernels import BufferPool

    pool = BufferPool(keep=2)
    a = pool.empty((4, 3), torch.float32)
    a_ptr = a.data_ptr()
    b = pool.empty((4, 3), torch.float32)
    assert b.data_ptr() != a_ptr  # a is still alive
    del a
    c = pool.empty((4, 3), torch.float32)
    assert c.data_ptr() == a_ptr and c.shape == (4, 3) and c.is_contiguous()
    view = c[1:]  # a view keeps the storage busy
    del c
    d = pool.empty((4, 3), torch.float32)
    assert d.data_ptr() not in (a_ptr, view.data_ptr() - 3 * 4)
    e = pool.empty((4, 3), torch.float32)  # both held storages busy and keep=2 reached: fresh, not held
    assert len(pool._held[((4, 3), torch.float32, torch.device("cpu"))]) == 2
    assert e.data_ptr() not in (a_ptr, d.data_ptr())
    assert pool.empty((2, 6), torch.float32).data_ptr() not in (a_ptr, d.data_ptr())  # another shape, its own storage


@pytest.mark.parametrize("set_to_none", [True, False])
def test_gradient_pool_gives_the_same_training_and_never_overwrites_a_held_gradient(set_to_none):
    """Three Adam steps (AuxK on from the second) with the CPU gradient pool equal three without it, bit
    for bit; the weight gradients come from the pool; a gradient the caller keeps is never written over."""
    S, B, d, n = 2, 48, 6, 40
    x = torch.randn(3, S, B, d, generator=torch.Generator().manual_seed(3), dtype=torch.float32)
    runs = []
    for pooled in (True, False):
        params = _stack(S, d, n, dtype=torch.float32)
        if not pooled:
            params.grad_pool = None
        state = init_state(S, n)
        opt = torch.optim.Adam(params.parameters(), lr=1e-2)
        kept, snapshots = [], []
        for t in range(3):
            loss, _, state = sae_step_loss(params, state, x[t], StepConfig(k=4, dead_tokens_threshold=B))
            loss.backward()
            if pooled and t == 0:  # later steps run AuxK: autograd sums two W_dec gradients into a tensor of its own
                held = {s.data_ptr() for shape_held in params.grad_pool._held.values() for s in shape_held}
                assert params.W_dec.grad.untyped_storage().data_ptr() in held
                assert params.W_enc_t.grad.untyped_storage().data_ptr() in held
            constrain_decoder_grad(params)
            if set_to_none and t == 0:
                kept.append(params.W_dec.grad)  # the caller keeps step 1's gradient tensor
            snapshots.append(params.W_dec.grad.clone())
            opt.step()
            opt.zero_grad(set_to_none=set_to_none)
            normalize_decoder(params)
        assert all(torch.equal(g, s) for g, s in zip(kept, snapshots))
        runs.append(([p.detach().clone() for p in params.parameters()], snapshots))
    (w_pool, g_pool), (w_fresh, g_fresh) = runs
    assert all(torch.equal(a, b) for a, b in zip(w_pool, w_fresh))
    assert all(torch.equal(a, b) for a, b in zip(g_pool, g_fresh))


def test_batch_topk_cap_of_n_latents_is_the_exact_rule_where_the_default_cap_binds():
    """One token far larger than the rest takes more than 4 k of the batch's top k B: the default cap
    trims it, ``batch_topk_cap = n`` (TrainConfig) keeps the exact rule of the dense reference."""
    from saes.config import TrainConfig
    from saes.stacking import make_step_config

    S, B, d, n, k = 1, 16, 8, 40, 2
    params = _stack(S, d, n, seed=9)
    x = torch.randn(S, B, d, dtype=torch.float64, generator=torch.Generator().manual_seed(10))
    x[:, 0] *= 40.0
    base = dict(hooks=["h"], settings=[(n, k)], batch_topk=True, auxk=False)
    exact = make_step_config(TrainConfig(**base, batch_topk_cap=n), k)
    capped = make_step_config(TrainConfig(**base), k)
    assert (exact.max_k_per_token, capped.max_k_per_token) == (n, None)
    ref = [p.detach().clone().requires_grad_() for p in params.parameters()]
    ref_loss, _, _, f = _dense_loss(ref, x, exact, torch.zeros(S, n, dtype=torch.bool))
    assert int((f[0, 0] > 0).sum()) > 4 * k  # the premise: the exact rule gives token 0 more than the default cap
    want = [ref_loss, *torch.autograd.grad(ref_loss, ref)]
    loss, metrics, _ = sae_step_loss(params, init_state(S, n), x, exact)
    got = [loss, *torch.autograd.grad(loss, list(params.parameters()))]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)
    assert float(metrics["l0"][0]) == pytest.approx(float((f > 0).sum()) / B)
    loss_capped, _, _ = sae_step_loss(params, init_state(S, n), x, capped)
    assert not torch.allclose(loss_capped, ref_loss)
    with pytest.raises(UserError, match="batch_topk_cap=1 must be at least every setting's k"):
        TrainConfig(**base, batch_topk_cap=1).validate()
