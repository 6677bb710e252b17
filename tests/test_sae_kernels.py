"""Sparse SAE kernels against a dense reference: outputs and gradients of every parameter.

Every test runs twice on CPU: with the compiled Numba kernels (:mod:`saes.cpu_kernels`, the
default) and with the plain torch ops (``INTERP_NUMBA=0``).
"""

from __future__ import annotations

import pytest
import torch

from saes import cpu_kernels
from saes.kernels import _grouped_topk, encode_topk, gather_dot, scatter_rows, sparse_decode, topk


@pytest.fixture(params=["numba", "torch"], autouse=True)
def cpu_backend(request, monkeypatch):
    """Which CPU kernels :mod:`saes.kernels` dispatches to (Numba is a core dependency: it must import)."""
    assert cpu_kernels.AVAILABLE, "numba did not import; it is a dependency of the project"
    monkeypatch.setenv("INTERP_NUMBA", "1" if request.param == "numba" else "0")
    return request.param

SHAPES = [(1, 7, 5, 12, 3), (3, 16, 8, 40, 5), (2, 33, 6, 9, 8)]  # (S, B, d, n, k)


def _dense_reference(x, W_enc, b_enc, W_dec, b_dec, k):
    """Textbook TopK SAE with dense autograd: the sparse path must match it exactly."""
    pre = torch.einsum("sbd,sdn->sbn", x - b_dec[:, None], W_enc) + b_enc[:, None]
    _, idx = pre.topk(k, dim=-1)
    f = torch.zeros_like(pre).scatter(-1, idx, pre.gather(-1, idx).relu())
    return torch.einsum("sbn,snd->sbd", f, W_dec) + b_dec[:, None], f


def _params(S, d, n, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    shapes = {"W_enc": (S, d, n), "b_enc": (S, n), "W_dec": (S, n, d), "b_dec": (S, d)}
    return {name: torch.randn(shape, generator=g, dtype=dtype).requires_grad_() for name, shape in shapes.items()}


@pytest.mark.parametrize("S,B,d,n,k", SHAPES)
def test_scatter_rows_and_gather_dot_match_dense(S, B, d, n, k):
    g = torch.Generator().manual_seed(1)
    coef = torch.randn(S, B, k, generator=g, dtype=torch.float64)
    indices = torch.stack([torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(B)]) for _ in range(S)])
    dense = torch.randn(S, B, d, generator=g, dtype=torch.float64)
    table = torch.randn(S, n, d, generator=g, dtype=torch.float64)
    f = torch.zeros(S, B, n, dtype=torch.float64).scatter(-1, indices, coef)
    assert torch.allclose(scatter_rows(coef, indices, dense, n), torch.einsum("sbn,sbd->snd", f, dense), atol=1e-10)
    expected = torch.einsum("sbd,snd->sbn", dense, table).gather(-1, indices)
    assert torch.allclose(gather_dot(dense, table, indices), expected, atol=1e-10)


@pytest.mark.parametrize("S,B,d,n,k", SHAPES)
def test_sparse_forward_and_all_gradients_match_dense_reference(S, B, d, n, k):
    p = _params(S, d, n, seed=S * 100 + n)
    x = torch.randn(S, B, d, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    probe = torch.randn(S, B, d, dtype=torch.float64, generator=torch.Generator().manual_seed(8))

    values, indices, pre = encode_topk(x, p["W_enc"], p["b_enc"], p["b_dec"], k)
    x_hat = sparse_decode(values, indices, p["W_dec"]) + p["b_dec"][:, None]
    loss = ((x_hat - x) ** 2).sum() + (x_hat * probe).sum()
    grads = torch.autograd.grad(loss, list(p.values()))

    q = {name: t.detach().clone().requires_grad_() for name, t in p.items()}
    ref_hat, ref_f = _dense_reference(x, q["W_enc"], q["b_enc"], q["W_dec"], q["b_dec"], k)
    ref_loss = ((ref_hat - x) ** 2).sum() + (ref_hat * probe).sum()
    ref_grads = torch.autograd.grad(ref_loss, list(q.values()))

    assert not pre.requires_grad
    assert torch.allclose(torch.zeros_like(ref_f).scatter(-1, indices, values.detach()), ref_f, atol=1e-10)
    assert torch.allclose(x_hat, ref_hat, atol=1e-10)
    for name, got, want in zip(p, grads, ref_grads):
        assert got.shape == want.shape, name
        assert torch.allclose(got, want, atol=1e-8, rtol=1e-8), name


def test_float32_path_matches_float64_reference():
    S, B, d, n, k = 2, 64, 16, 128, 8
    p = _params(S, d, n, seed=3, dtype=torch.float32)
    x = torch.randn(S, B, d)
    values, indices, _ = encode_topk(x, p["W_enc"], p["b_enc"], p["b_dec"], k)
    x_hat = sparse_decode(values, indices, p["W_dec"]) + p["b_dec"][:, None]
    ((x_hat - x) ** 2).sum().backward()
    q = {name: t.detach().double().requires_grad_() for name, t in p.items()}
    ref_hat, _ = _dense_reference(x.double(), q["W_enc"], q["b_enc"], q["W_dec"], q["b_dec"], k)
    ((ref_hat - x.double()) ** 2).sum().backward()
    for name in p:
        assert torch.allclose(p[name].grad.double(), q[name].grad, rtol=1e-4, atol=1e-3), name


def test_gradient_touches_only_selected_latents():
    S, B, d, n, k = 1, 4, 6, 50, 2
    p = _params(S, d, n, seed=4)
    x = torch.randn(S, B, d, dtype=torch.float64)
    values, indices, _ = encode_topk(x, p["W_enc"], p["b_enc"], p["b_dec"], k)
    (sparse_decode(values, indices, p["W_dec"]) ** 2).sum().backward()
    used = torch.zeros(n, dtype=torch.bool)
    used[indices.flatten()] = True
    assert (p["W_dec"].grad[0, ~used] == 0).all() and (p["W_enc"].grad[0][:, ~used] == 0).all()
    assert (p["b_enc"].grad[0, ~used] == 0).all()


@pytest.mark.parametrize("case", ["random", "ties", "one_group", "masked", "nan"])
@pytest.mark.parametrize("n,k", [(4096, 32), (2048, 1), (4096, 64), (1024, 16), (4096, 256), (1024, 64)])
def test_cpu_grouped_topk_equals_torch_topk(case, n, k, cpu_backend):
    """The CPU top-k from strided group maxima (compiled, or torch ops) returns torch.topk's values, at valid indices."""
    gen = torch.Generator().manual_seed(n + k)
    x = torch.randn(2, 3, n, generator=gen)
    m = n // 8
    if case == "ties":
        x[..., ::5] = 0.5
    elif case == "one_group":  # the k largest all in group 0 (and its 8 members), then in group 1
        x[..., 0::m] = 100 + torch.arange(8.0)
        x[..., 1::m] = 50 + torch.arange(8.0)
    elif case == "masked":  # AuxK-style rows: all but a few entries are -inf
        x = x.masked_fill(torch.rand(x.shape, generator=gen) > 0.01, -float("inf"))
    elif case == "nan":  # torch.topk ranks NaN above everything
        x[0, 0, 7] = float("nan")
    values, indices = (cpu_kernels.topk_rows if cpu_backend == "numba" else _grouped_topk)(x, k)
    want = x.topk(k, dim=-1).values
    assert torch.equal(values.sort(-1).values.nan_to_num(), want.sort(-1).values.nan_to_num())
    assert torch.equal(x.gather(-1, indices).nan_to_num(), values.nan_to_num())
    assert (indices.sort(-1).values.diff(dim=-1) > 0).all()  # k distinct positions
    assert topk(x, k)[1].shape == indices.shape


@pytest.mark.parametrize("case", ["random", "ties", "signed_zeros", "masked", "nan", "negative_nan"])
@pytest.mark.parametrize("n,k", [(4096, 32), (2048, 1), (1024, 16), (4096, 256)])
def test_cpu_topk_of_bf16_rows_equals_torch_topk(case, n, k, cpu_backend):
    """bf16 rows (the bf16 encoder's pre-activations): the compiled kernel reads their bits; torch's values, at valid indices."""
    gen = torch.Generator().manual_seed(n + k + 1)
    x = torch.randn(2, 3, n, generator=gen)
    if case == "ties":
        x[..., ::5] = 0.5
    elif case == "signed_zeros":  # few distinct values: zeros of both signs tie with each other
        x = x.round()
        x[..., ::3] = -x[..., ::3]
    elif case == "masked":
        x = x.masked_fill(torch.rand(x.shape, generator=gen) > 0.01, -float("inf"))
    elif case == "nan":
        x[0, 0, 7] = float("nan")
    elif case == "negative_nan":  # a NaN with the sign bit set: torch still ranks it first
        x[1, 2, 9] = -float("nan")
    x = x.bfloat16()
    want = x.float().topk(k, dim=-1).values.sort(-1).values.nan_to_num()
    runs = [topk(x, k)] + ([cpu_kernels.topk_rows(x, k)] if cpu_backend == "numba" else [])
    for values, indices in runs:
        assert values.dtype == torch.bfloat16
        assert torch.equal(values.float().sort(-1).values.nan_to_num(), want)
        assert torch.equal(x.gather(-1, indices).float().nan_to_num(), values.float().nan_to_num())
        assert (indices.sort(-1).values.diff(dim=-1) > 0).all()  # k distinct positions


def test_compiled_kernels_split_over_threads_give_the_same_bits():
    """With 2 threads the work is split (rows, or output rows for the scatter): the bits equal 1 thread's, and a dense reference."""
    S, B, d, n, k = 2, 512, 64, 4096, 16
    g = torch.Generator().manual_seed(5)
    coef = torch.randn(S, B, k, generator=g)
    indices = torch.randint(0, n, (S, B, k), generator=g)
    indices[:, :, 1] = indices[:, :, 0]  # repeated latents within a token
    coef[:, ::2, 3:6] = 0.0  # zero coefficients are skipped by the compiled kernels
    dense = torch.randn(S, B, d, generator=g)
    table = torch.randn(S, n, d, generator=g)
    x = torch.randn(S, 64, n, generator=g)
    x[0, :8, ::7] = 1.0  # ties
    threads = torch.get_num_threads()
    runs = []
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            assert cpu_kernels._parts(B * S * k * d, S * n) == t
            values = torch.randn(S, B, k, generator=torch.Generator().manual_seed(6))
            values[:, 1::2, :4] = 0.0
            values.requires_grad_()
            W = table.clone().requires_grad_()
            y = sparse_decode(values, indices, W)
            y.backward(dense)
            runs.append((scatter_rows(coef, indices, dense, n), gather_dot(dense, table, indices), y, values.grad, W.grad,
                         *cpu_kernels.topk_rows(x, k)))
    finally:
        torch.set_num_threads(threads)
    for one, two in zip(*runs):
        assert torch.equal(one, two)
    f = torch.zeros(S, B, n, dtype=torch.float64).scatter_add(-1, indices, coef.double())
    assert torch.allclose(runs[0][0].double(), torch.einsum("sbn,sbd->snd", f, dense.double()), atol=1e-4)
    assert torch.allclose(runs[0][1].double(), torch.einsum("sbd,snd->sbn", dense.double(), table.double()).gather(-1, indices), atol=1e-4)
    assert torch.equal(runs[0][5].sort(-1).values, x.topk(k, dim=-1).values.sort(-1).values)
    assert torch.equal(x.gather(-1, runs[0][6]), runs[0][5])


def test_numba_switch_selects_the_kernels(monkeypatch):
    from saes.kernels import _numba_for

    x = torch.zeros(3)
    monkeypatch.setenv("INTERP_NUMBA", "0")
    assert _numba_for(x) is None
    monkeypatch.setenv("INTERP_NUMBA", "1")
    assert _numba_for(x) is cpu_kernels
    assert _numba_for(x.half()) is None and _numba_for(x, x.long()) is None


def _child_scatter(conn) -> None:
    """In a forked child: the compiled scatter split over 2 pool threads (the parent's threads are gone)."""
    import numpy as np

    coef, rows, dense = np.ones((64, 2), np.float32), np.arange(128, dtype=np.int64).reshape(64, 2) % 16, np.ones((64, 8), np.float32)
    out = np.empty((16, 8), np.float32)
    cpu_kernels._run(cpu_kernels._scatter_rows, 2, 16, coef, rows, dense, out)
    conn.send(float(out.sum()))


def test_compiled_kernels_work_in_a_forked_child():
    """A child forked after the parent used the thread pool starts its own (the old one has no threads there)."""
    import multiprocessing

    import numpy as np

    out = np.empty((16, 8), np.float32)
    cpu_kernels._run(cpu_kernels._scatter_rows, 2, 16, np.ones((64, 2), np.float32), np.zeros((64, 2), np.int64), np.ones((64, 8), np.float32), out)
    assert cpu_kernels._pool is not None and out[0, 0] == 128 and out[1:].sum() == 0
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_child_scatter, args=(child,))
    proc.start()
    proc.join(timeout=120)
    if proc.is_alive():
        proc.kill()
    assert proc.exitcode == 0 and parent.poll(1) and parent.recv() == 64 * 2 * 8


def test_out_of_range_latent_indices_raise(cpu_backend):
    """An index outside the decoder table raises (the compiled kernels do not bounds-check their loops;
    torch's CSR sampled product does not check either, so gather-dot is only checked on the compiled path)."""
    values, W, dense = torch.ones(1, 2, 2), torch.randn(1, 5, 3), torch.randn(1, 2, 3)
    for bad in (5, -1):
        indices = torch.tensor([[[0, 1], [2, bad]]])
        with pytest.raises((IndexError, RuntimeError)):
            sparse_decode(values, indices, W)
        if cpu_backend == "numba":
            with pytest.raises(IndexError):
                gather_dot(dense, W, indices)
        with pytest.raises((IndexError, RuntimeError)):
            scatter_rows(values, indices, dense, 5)


def test_cpu_topk_keeps_the_gradient_path():
    """Rows that require grad get values with a gradient on either CPU path (the compiled kernel has none, so it is skipped)."""
    x = torch.randn(3, 1024, requires_grad=True)
    values, indices = topk(x, 8)
    values.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x).scatter(-1, indices, 1.0))
    assert not cpu_kernels.enabled_for(torch.zeros(3, device="meta"))


def test_kernels_still_run_in_a_thread_that_outlives_the_main_thread(tmp_path):
    """After the main thread returns, the thread pool refuses work: the kernel then runs on the calling thread."""
    import subprocess
    import sys

    script = tmp_path / "late.py"
    script.write_text(
        "import threading, time, numpy as np\n"
        "from saes import cpu_kernels\n"
        "def late():\n"
        "    time.sleep(0.5)\n"
        "    out = np.empty((16, 8), np.float32)\n"
        "    cpu_kernels._run(cpu_kernels._scatter_rows, 2, 16, np.ones((64, 2), np.float32), np.zeros((64, 2), np.int64), np.ones((64, 8), np.float32), out)\n"
        "    print('sum', float(out.sum()), flush=True)\n"
        "threading.Thread(target=late).start()\n"
    )
    import os

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0 and "sum 1024.0" in done.stdout, done.stderr[-2000:]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_decoder_row_constraint_and_normalisation_match_a_float64_reference(dtype, cpu_backend):
    """The one-pass compiled row kernels (and torch's ops) against a float64 hand computation: the gradient loses its
    component along each unit decoder row, rows come out unit norm, a zero row stays zero; 2 threads give 1 thread's bits."""
    from saes.step import StackParams, constrain_decoder_grad, normalize_decoder

    S, n, d = 2, 300, 37
    g = torch.Generator().manual_seed(11)
    w = torch.randn(S, n, d, generator=g, dtype=torch.float64)
    w = w / w.norm(dim=-1, keepdim=True)
    grad = torch.randn(S, n, d, generator=g, dtype=torch.float64)
    want_grad = grad - (grad * w).sum(-1, keepdim=True) * w
    scaled = w * torch.rand(S, n, 1, generator=g, dtype=torch.float64).mul(5).add(0.1)
    scaled[1, 7] = 0.0
    want_w = scaled / scaled.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    threads = torch.get_num_threads()
    runs = []
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            params = StackParams(S, d, n, dtype=dtype)
            with torch.no_grad():
                params.W_dec.copy_(w)
            params.W_dec.grad = grad.to(dtype).clone()
            constrain_decoder_grad(params)
            assert torch.allclose(params.W_dec.grad.double(), want_grad, atol=tol), (t, cpu_backend)
            with torch.no_grad():
                params.W_dec.copy_(scaled)
            normalize_decoder(params)
            assert torch.allclose(params.W_dec.detach().double(), want_w, atol=tol), (t, cpu_backend)
            assert torch.equal(params.W_dec[1, 7], torch.zeros(d, dtype=dtype))
            runs.append((params.W_dec.grad.clone(), params.W_dec.detach().clone()))
    finally:
        torch.set_num_threads(threads)
    if cpu_backend == "numba":
        assert cpu_kernels._parts(S * n * d, S * n) == 1  # small: one part; force a split directly
        a, b = grad.to(dtype).clone(), grad.to(dtype).clone()
        cpu_kernels._run(cpu_kernels._constrain_rows, 1, S * n, a.view(-1, d).numpy(), w.to(dtype).view(-1, d).numpy())
        cpu_kernels._run(cpu_kernels._constrain_rows, 2, S * n, b.view(-1, d).numpy(), w.to(dtype).view(-1, d).numpy())
        assert torch.equal(a, b) and torch.equal(a, runs[0][0])
    for one, two in zip(*runs):
        assert torch.equal(one, two)
