"""CUDA paths: compiled Triton kernels, the bf16 training step, the trainer, harvest and steered generation.

These need a CUDA GPU, so CI (CPU only) skips them; they run on the lent GPU machine
(`pytest tests/test_cuda.py`) and their result is recorded in benchmarks/RESULTS.md with the device.
Every check compares the CUDA result with a CPU or float64 reference computed in the same test.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on a GPU machine; see benchmarks/RESULTS.md)")

CUDA = torch.device("cuda")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` in float64 on the CPU (NaN never passes a ``<`` check)."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _indices(S, B, n, k, gen):
    return torch.stack([torch.stack([torch.randperm(n, generator=gen)[:k] for _ in range(B)]) for _ in range(S)])


@pytest.mark.parametrize("S,B,d,n,k", [(1, 64, 100, 300, 33), (3, 257, 768, 2048, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_triton_kernels_match_float64_reference(S, B, d, n, k, dtype):
    from saes import kernels, triton_kernels

    if not triton_kernels.AVAILABLE:
        pytest.skip("triton is not installed")
    gen = torch.Generator().manual_seed(S * 7 + d)
    idx = _indices(S, B, n, k, gen)
    values, W_dec, dense = (torch.randn(shape, generator=gen, dtype=torch.float64) for shape in [(S, B, k), (S, n, d), (S, B, d)])
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    on = {name: t.to(CUDA, dtype) for name, t in dict(values=values, W_dec=W_dec, dense=dense).items()}
    on_idx = idx.to(CUDA)
    # Poison-free outputs: every element must be written (fresh tensors each call) and match float64.
    f = torch.zeros(S, B, n, dtype=torch.float64).scatter(-1, idx, values)
    want_scatter = torch.einsum("sbn,sbd->snd", f, dense)
    want_gather = torch.einsum("sbd,snd->sbn", dense, W_dec).gather(-1, idx)
    want_decode = torch.einsum("sbn,snd->sbd", f, W_dec)
    for label, got, want in [
        ("scatter_rows", triton_kernels.scatter_rows(on["values"], on_idx, on["dense"], n, sorted_segments=False), want_scatter),
        ("scatter_rows sorted", triton_kernels.scatter_rows(on["values"], on_idx, on["dense"], n, sorted_segments=True), want_scatter),
        ("gather_dot", triton_kernels.gather_dot(on["dense"], on["W_dec"], on_idx), want_gather),
        ("sparse_decode", triton_kernels.sparse_decode(on["values"], on_idx, on["W_dec"]), want_decode),
    ]:
        assert torch.isfinite(got).all(), label
        assert _rel(got, want) < tol, (label, _rel(got, want))
    # The dispatcher in saes.kernels routes CUDA tensors here unless INTERP_TRITON=0.
    assert kernels._triton_for(on["dense"]) is triton_kernels


def test_triton_and_torch_paths_agree_on_cuda(monkeypatch):
    from saes import kernels

    gen = torch.Generator().manual_seed(5)
    S, B, d, n, k = 2, 300, 96, 512, 16
    idx = _indices(S, B, n, k, gen).to(CUDA)
    values, W_dec, probe = (torch.randn(shape, generator=gen).to(CUDA) for shape in [(S, B, k), (S, n, d), (S, B, d)])
    results = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("INTERP_TRITON", flag)
        v, w = values.clone().requires_grad_(), W_dec.clone().requires_grad_()
        out = kernels.sparse_decode(v, idx, w)
        results[flag] = (out, *torch.autograd.grad((out * probe).sum(), [v, w]))
    for a, b in zip(results["1"], results["0"]):
        assert _rel(a, b) < 1e-5


def test_bf16_step_gradients_match_float64_dense_reference():
    """On CUDA the encoder GEMM is bf16: the selected latents and gradients must still match a dense float64 step."""
    from saes.kernels import encode_topk, sparse_decode

    gen = torch.Generator().manual_seed(11)
    S, B, d, n, k = 2, 512, 128, 1024, 16
    p = {"W_enc": torch.randn(S, d, n, generator=gen) / d**0.5, "b_enc": torch.randn(S, n, generator=gen) * 0.1,
         "W_dec": torch.randn(S, n, d, generator=gen) / d**0.5, "b_dec": torch.randn(S, d, generator=gen) * 0.1}
    x = torch.randn(S, B, d, generator=gen)
    q = {name: t.to(CUDA).requires_grad_() for name, t in p.items()}
    values, indices, _ = encode_topk(x.to(CUDA), q["W_enc"], q["b_enc"], q["b_dec"], k)
    x_hat = sparse_decode(values, indices, q["W_dec"]) + q["b_dec"][:, None]
    grads = torch.autograd.grad((x_hat - x.to(CUDA)).pow(2).sum(), list(q.values()))

    # Dense float64 reference on the CPU, with the latents the bf16 encoder selected.
    r = {name: t.double().requires_grad_() for name, t in p.items()}
    pre = torch.einsum("sbd,sdn->sbn", x.double() - r["b_dec"][:, None], r["W_enc"]) + r["b_enc"][:, None]
    idx = indices.cpu()
    f = torch.zeros_like(pre).scatter(-1, idx, pre.gather(-1, idx).relu())
    ref_hat = torch.einsum("sbn,snd->sbd", f, r["W_dec"]) + r["b_dec"][:, None]
    ref_grads = torch.autograd.grad((ref_hat - x.double()).pow(2).sum(), list(r.values()))
    # The bf16 selection is the true top-k up to near-ties: >= 97 % of the picks agree.
    true_idx = pre.detach().topk(k, dim=-1).indices
    agree = (torch.zeros_like(pre, dtype=torch.bool).scatter(-1, idx, True) & torch.zeros_like(pre, dtype=torch.bool).scatter(-1, true_idx, True)).sum()
    assert float(agree) / idx.numel() > 0.97
    assert _rel(x_hat, ref_hat) < 1e-2
    for name, got, want in zip(p, grads, ref_grads):
        assert _rel(got, want) < 2e-2, (name, _rel(got, want))


@pytest.mark.parametrize("R,n,k", [(257, 32768, 32), (64, 65536, 64), (100, 4097, 16), (9, 300, 7)])
def test_compiled_lane_group_topk_equals_torch_topk(R, n, k, monkeypatch):
    from saes import kernels, triton_kernels

    gen = torch.Generator().manual_seed(R + n)
    x = torch.randn(R, n, generator=gen).to(CUDA, torch.bfloat16)
    x[0, : n // 2] = 0.25  # ties at the k-th value
    x[1] = x[1].round()  # few distinct values, signed zeros
    values, indices = triton_kernels.topk_rows(x, k, method="lanes")
    want = x.float().topk(k, dim=-1).values.sort(-1).values
    assert torch.equal(values.float().sort(-1).values, want)
    assert torch.equal(x.gather(-1, indices), values)
    assert torch.equal(indices.sort(-1).values.diff(dim=-1).clamp(max=1), torch.ones(R, k - 1, dtype=torch.int64, device=CUDA))  # distinct
    monkeypatch.setenv("INTERP_TRITON_TOPK", "lanes")  # the dispatcher's route
    assert torch.equal(kernels.topk(x, k)[0].float().sort(-1).values, want)


@pytest.mark.parametrize("S,B,d,n,k,chunk", [(1, 4096, 768, 2048, 32, None), (2, 300, 100, 64, 16, 7)])
def test_compiled_latent_backward_matches_float64_reference(S, B, d, n, k, chunk):
    """The fused backward (gather-dot, both weight-gradient scatters, the bias sum) vs dense float64 einsums."""
    from saes import triton_backward

    gen = torch.Generator().manual_seed(B + n)
    idx = _indices(S, B, n, k, gen)
    values, W_dec, grad, xc = (torch.randn(shape, generator=gen, dtype=torch.float64) for shape in [(S, B, k), (S, n, d), (S, B, d), (S, B, d)])
    values = values.relu()
    on = [t.float().to(CUDA) for t in (values, grad, xc, W_dec)]
    got = triton_backward.latent_backward(on[0], idx.to(CUDA), on[1], on[2], on[3], chunk=chunk)
    f = torch.zeros(S, B, n, dtype=torch.float64).scatter(-1, idx, values)
    dpre = torch.einsum("sbd,snd->sbn", grad, W_dec).gather(-1, idx) * (values > 0)
    g = torch.zeros(S, B, n, dtype=torch.float64).scatter(-1, idx, dpre)
    for label, a, want in zip(["W_dec", "W_enc", "b_enc"], got, [torch.einsum("sbn,sbd->snd", f, grad), torch.einsum("sbn,sbd->snd", g, xc), g.sum(1)]):
        assert torch.isfinite(a).all(), label
        assert _rel(a, want) < 1e-5, (label, _rel(a, want))


@pytest.mark.parametrize("batch_topk", [False, True])
def test_fused_cuda_step_equals_the_unfused_cuda_step(batch_topk, monkeypatch):
    from saes.step import StepConfig, init_stack, init_state, sae_step_loss

    cfg = StepConfig(k=16, k_aux=32, dead_tokens_threshold=1000, batch_topk=batch_topk)
    x = torch.randn(2, 2048, 128, generator=torch.Generator().manual_seed(4)).to(CUDA) + 1.0
    out = {}
    for flag in ("0", "1"):
        monkeypatch.setenv("INTERP_TRITON_FUSED", flag)
        params = init_stack(2, 128, 4096, sample=x, seed=2, device=CUDA)
        state = init_state(2, 4096, device=CUDA)
        state.tokens_since_fired[:, :500] = 5000  # AuxK on
        loss, metrics, _ = sae_step_loss(params, state, x, cfg)
        out[flag] = [loss.detach(), metrics["fvu"], metrics["auxk_loss"], *torch.autograd.grad(loss, list(params.parameters()))]
    assert float(out["1"][2].min()) > 0
    for a, b in zip(out["1"], out["0"]):
        assert _rel(a, b) < 1e-5


@pytest.mark.parametrize("R,n,k", [(257, 32768, 32), (64, 4096, 128), (33, 1000, 999)])
def test_compiled_radix_select_topk_equals_torch_topk(R, n, k):
    from saes import kernels, triton_kernels

    gen = torch.Generator().manual_seed(R + n)
    x = torch.randn(R, n, generator=gen).to(CUDA, torch.bfloat16)
    x[0, : n // 2] = 0.25  # ties at the k-th value
    x[1] = x[1].round()  # few distinct values, signed zeros
    values, indices = triton_kernels.topk_rows(x, k)
    want = x.float().topk(k, dim=-1).values.sort(-1).values
    assert torch.equal(values.float().sort(-1).values, want)
    assert torch.equal(x.gather(-1, indices), values)
    assert torch.equal(indices.sort(-1).values.diff(dim=-1).clamp(max=1), torch.ones(R, k - 1, dtype=torch.int64, device=CUDA))  # distinct
    assert kernels.topk(x, k)[1].shape == (R, k)


def test_fused_decoder_row_kernels_on_cuda_match_torch(monkeypatch):
    from saes.step import StackParams, constrain_decoder_grad, normalize_decoder

    gen = torch.Generator().manual_seed(2)
    runs = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("INTERP_TRITON", flag)
        params = StackParams(2, 768, 300, device=CUDA)
        with torch.no_grad():
            params.W_dec.copy_(torch.nn.functional.normalize(torch.randn(2, 300, 768, generator=gen.manual_seed(2)), dim=-1))
        params.W_dec.grad = torch.randn(2, 300, 768, generator=gen.manual_seed(3)).to(CUDA)
        constrain_decoder_grad(params)
        grad = params.W_dec.grad.clone()
        with torch.no_grad():
            params.W_dec.mul_(torch.rand(2, 300, 1, generator=gen.manual_seed(4)).to(CUDA) + 0.5)
        normalize_decoder(params)
        runs[flag] = (grad, params.W_dec.detach().clone())
    assert float((runs["1"][0] * runs["1"][1]).sum(-1).abs().max()) < 1e-4  # no component along the row left
    for a, b in zip(runs["1"], runs["0"]):
        assert _rel(a, b) < 1e-6


def test_cuda_step_reads_the_dead_count_without_a_sync_and_matches_the_synced_step():
    from saes.step import StepConfig, init_stack, init_state, sae_step_loss

    cfg = StepConfig(k=8, dead_tokens_threshold=1000)
    x = torch.randn(2, 256, 64, generator=torch.Generator().manual_seed(9)).to(CUDA)
    params = init_stack(2, 64, 512, device=CUDA)
    state = init_state(2, 512, device=CUDA)
    state.tokens_since_fired[0, :100] = 5000  # member 0: 100 dead latents, member 1: none
    _, _, state = sae_step_loss(params, state, x, cfg)
    assert state.dead_count is not None and state.dead_count[0] is state.tokens_since_fired
    synced = type(state)(state.tokens_since_fired.clone(), state.threshold.clone(), state.n_steps)
    loss, metrics, after = sae_step_loss(params, state, x, cfg)
    loss_s, metrics_s, _ = sae_step_loss(params, synced, x, cfg)
    assert int(state.dead_count[2][0]) == int((state.tokens_since_fired >= 1000).sum(1).max()) > 0
    assert float(metrics["auxk_loss"][0]) > 0 and torch.allclose(metrics["auxk_loss"], metrics_s["auxk_loss"], rtol=1e-5)
    assert torch.allclose(loss, loss_s, rtol=1e-5)


def test_trainer_on_cuda_recovers_directions_like_the_cpu_run(tmp_path):
    from test_sae_trainer import known_directions_problem

    from saes.config import sae_name
    from saes.trainer import train

    runs = {}
    for device in ("cuda", "cpu"):
        store, cfg, x, dirs = known_directions_problem(tmp_path / device, device=device)
        runs[device] = train(store, cfg, tmp_path / device / "run")[sae_name("h", 48, 2)]
    fvu = {}
    for device, sae in runs.items():
        cos = torch.nn.functional.normalize(sae.W_dec.detach().cpu().float(), dim=-1) @ dirs.T
        assert (cos.max(0).values > 0.9).float().mean() >= 0.9, device
        with torch.no_grad():
            x_hat = sae.cpu().float()(x)
        fvu[device] = float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    assert fvu["cuda"] < fvu["cpu"] + 0.02, fvu


def _pair():
    """The same tiny random Llama twice: a CPU copy and a CUDA copy (checked to stay where they were put)."""
    from steering_fixtures import tiny_llama

    from interp.models import model_device

    cpu = tiny_llama()  # cached and shared with other test modules: build a fresh copy for the GPU
    gpu = tiny_llama.__wrapped__().to(CUDA)
    assert model_device(cpu).type == "cpu" and model_device(gpu).type == "cuda"
    return cpu, gpu


def test_harvest_on_cuda_matches_cpu(tmp_path):
    import interp
    from interp.models import model_device

    hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    tokens = torch.randint(5, 1000, (8, 24), generator=torch.Generator().manual_seed(0))
    stores = {}
    for model, name in zip(_pair(), ("cpu", "cuda")):
        stores[name] = interp.harvest(model, tokens, hooks, n_tokens=8 * 23, batch_size=4, out=tmp_path / name, progress=False)
        assert model_device(model).type == name
    for h in hooks:
        a, b = stores["cuda"].read(h), stores["cpu"].read(h)
        assert a.shape == b.shape
        assert _rel(a, b) < 2e-2  # bf16 autocast on CUDA, fp32 on the CPU


def test_steered_generation_on_cuda_kv_cache_batch_and_cpu_parity():
    import interp
    from steering_fixtures import ToyTopKSAE

    cpu, gpu = _pair()
    hook = "blocks.0.hook_resid_post"
    prompts = ["The cat sat", "Hello there, how are you doing today?", "A", "Numbers: 1 2 3 4"]
    vec = torch.randn(64, generator=torch.Generator().manual_seed(3))

    def run(model, device, **kw):
        sae = ToyTopKSAE(64, 96, k=8, hook_name=hook, seed=1).to(device)
        ivs = [interp.Clamp(sae, [2, 9], [6.0, 3.0]), interp.Add("blocks.1.hook_resid_pre", vec.to(device), 8.0, positions="generated")]
        return interp.generate(model, prompts, ivs, max_new_tokens=6, temperature=0, return_logits=True, **kw)

    on_cpu = run(cpu, "cpu")
    cached, full, single = run(gpu, CUDA), run(gpu, CUDA, use_kv_cache=False), run(gpu, CUDA, batch_size=1)
    for other, gap in [(full, 0.05), (single, 0.05), (on_cpu, 0.1)]:
        for la, lb, ta, tb in zip(cached.logits, other.logits, cached.tokens, other.tokens):
            scale = float(lb.abs().max())
            # First-step logits agree to bf16 precision; greedy tokens agree until a near tie.
            assert float((la[0].float().cpu() - lb[0].float().cpu()).abs().max()) < 0.03 * scale
            for step_logits, x, y in zip(la, ta.tolist(), tb.tolist()):
                top2 = step_logits.float().topk(2).values
                if float(top2[0] - top2[1]) < gap * scale:
                    break
                assert x == y


def test_left_padded_generation_of_a_bf16_model_on_cuda_is_finite_and_matches_one_by_one():
    import interp
    from steering_fixtures import tiny_llama

    model = tiny_llama.__wrapped__().to(CUDA, torch.bfloat16)
    prompts = ["The cat sat", "Hello there, how are you doing today?", "A"]
    batched = interp.generate(model, prompts, [], max_new_tokens=4, temperature=0, return_logits=True, batch_size=3)
    single = interp.generate(model, prompts, [], max_new_tokens=4, temperature=0, return_logits=True, batch_size=1)
    for la, lb in zip(batched.logits, single.logits):
        assert torch.isfinite(la).all() and torch.isfinite(lb).all()
        scale = float(lb.abs().max())
        assert float((la[0].float() - lb[0].float()).abs().max()) < 0.05 * scale


@pytest.mark.parametrize("precond_rank", [0, 32])
def test_batched_probe_fit_on_cuda_matches_the_cpu_fit(precond_rank, monkeypatch):
    from probes.fit import fit_logistic, l2_from_sklearn_c

    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # the SAE step turns it on

    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 400, 64, generator=gen) * torch.linspace(0.2, 3.0, 64)  # uneven feature scales
    w_true = torch.randn(3, 64, generator=gen)
    y = ((x @ w_true[..., None])[..., 0] + 0.5 * torch.randn(3, 400, generator=gen) > 0).float()
    l2 = [l2_from_sklearn_c(c, 300) for c in (0.01, 1.0)]
    fits = {dev: fit_logistic(x[:, :300].to(dev), y[:, :300].to(dev), l2, tol=1e-6, precond_rank=precond_rank) for dev in ("cpu", CUDA)}
    assert bool(fits["cpu"].converged.all()) and bool(fits[CUDA].converged.all())
    cpu_scores, gpu_scores = fits["cpu"].scores(x[:, 300:]), fits[CUDA].scores(x[:, 300:].to(CUDA))
    assert _rel(gpu_scores, cpu_scores) < 1e-3
    assert float(((gpu_scores.cpu() > 0) != (cpu_scores > 0)).float().mean()) <= 0.01  # near-zero scores may flip
