"""Run the Triton SAE kernels on CPU under Triton's interpreter and compare them with the torch path.

Executed as a script by tests/test_triton_kernels.py in a fresh process, because
``TRITON_INTERPRET`` must be set before Triton is imported and kernels are decorated. Prints one
JSON object ``{check name: [max abs error, tolerance]}`` on stdout.
"""

from __future__ import annotations

import json
import os

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

from saes import kernels, triton_backward, triton_kernels, triton_topk  # noqa: E402

# (S, B, d, n, k, dtype, fused b_dec): d > BLOCK_D and k > BLOCK_K exercise the masked tails;
# k == n makes every token hit every latent, so the scatter's atomic adds collide on every row.
CASES = [
    (1, 5, 7, 12, 3, torch.float64, False),
    (2, 3, 70, 40, 20, torch.float64, False),
    (2, 6, 16, 9, 9, torch.float64, True),
    (3, 2, 70, 40, 20, torch.float32, True),
]
TOL = {torch.float64: 1e-10, torch.float32: 1e-4}


def _inputs(S, B, d, n, k, dtype, seed):
    """Random values, distinct per-token indices, decoder table, bias and a probe for gradients."""
    g = torch.Generator().manual_seed(seed)
    indices = torch.stack([torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(B)]) for _ in range(S)])
    values, W_dec, b_dec, probe = (torch.randn(shape, generator=g, dtype=dtype) for shape in [(S, B, k), (S, n, d), (S, d), (S, B, d)])
    return values, indices, W_dec, b_dec, probe


def _err(a: torch.Tensor | None, b: torch.Tensor | None) -> float:
    """Max abs difference in fp64; a missing gradient or a shape/dtype mismatch counts as infinite error."""
    if a is None or b is None or a.shape != b.shape or a.dtype != b.dtype:
        return float("inf")
    return (a.double() - b.double()).abs().max().item()


def decode_checks(results: dict, S, B, d, n, k, dtype, with_bias: bool) -> None:
    """Fused decode and its gradients (values, W_dec, and b_dec when fused); raw scatter/gather kernels."""
    tag = f"{S}x{B}x{d}x{n}x{k}/{str(dtype).removeprefix('torch.')}/{'bias' if with_bias else 'nobias'}"
    tol = TOL[dtype]
    values, indices, W_dec, b_dec, probe = _inputs(S, B, d, n, k, dtype, seed=S * 1000 + n)
    leaves = (values, W_dec, b_dec) if with_bias else (values, W_dec)
    params = [t.clone().requires_grad_() for t in leaves]
    ref = [t.clone().requires_grad_() for t in leaves]
    got = triton_kernels.sparse_decode(params[0], indices, params[1], params[2] if with_bias else None)
    want = kernels.sparse_decode(ref[0], indices, ref[1]) + (ref[2][:, None] if with_bias else 0)
    results[f"{tag}/x_hat"] = [_err(got, want), tol]
    grads = torch.autograd.grad((got * probe).sum(), params)
    ref_grads = torch.autograd.grad((want * probe).sum(), ref)
    for label, a, b in zip(["values", "W_dec", "b_dec"], grads, ref_grads):
        results[f"{tag}/grad_{label}"] = [_err(a, b), tol]
    want = kernels.scatter_rows(values, indices, probe, n)
    results[f"{tag}/scatter_rows"] = [_err(triton_kernels.scatter_rows(values, indices, probe, n, sorted_segments=False), want), tol]
    results[f"{tag}/scatter_rows_sorted"] = [_err(triton_kernels.scatter_rows(values, indices, probe, n, sorted_segments=True), want), tol]
    results[f"{tag}/gather_dot"] = [_err(triton_kernels.gather_dot(probe, W_dec, indices), kernels.gather_dot(probe, W_dec, indices)), tol]


def dispatch_checks(results: dict) -> None:
    """Route kernels.py through Triton (as on CUDA) and compare a full TopK SAE step with the torch path."""
    S, B, d, n, k = 2, 4, 10, 24, 4
    g = torch.Generator().manual_seed(5)
    shapes = {"W_enc": (S, d, n), "b_enc": (S, n), "W_dec": (S, n, d), "b_dec": (S, d)}
    params = {name: torch.randn(shape, generator=g, dtype=torch.float64) for name, shape in shapes.items()}
    x = torch.randn(S, B, d, generator=g, dtype=torch.float64)

    def step() -> list[torch.Tensor]:
        p = {name: t.clone().requires_grad_() for name, t in params.items()}
        values, indices, _ = kernels.encode_topk(x, p["W_enc"], p["b_enc"], p["b_dec"], k)
        x_hat = kernels.sparse_decode(values, indices, p["W_dec"]) + p["b_dec"][:, None]
        return [x_hat.detach(), *torch.autograd.grad(((x_hat - x) ** 2).sum(), list(p.values()))]

    want = step()
    routed: list[torch.Tensor] = []

    def as_if_cuda(t: torch.Tensor):
        routed.append(t)
        return triton_kernels

    original, kernels._triton_for = kernels._triton_for, as_if_cuda
    try:
        got = step()
    finally:
        kernels._triton_for = original
    # sparse_decode (forward) and scatter_rows (encoder backward) must both have gone to Triton.
    results["dispatch/routed_calls_missing"] = [float(max(0, 2 - len(routed))), 0.0]
    for label, a, b in zip(["x_hat", *shapes], got, want):
        results[f"dispatch/{label}"] = [_err(a, b), TOL[torch.float64]]


def _topk_rows_checks(results: dict, prefix: str, shapes: list[tuple[int, int, int]], seed: int, method: str | None) -> None:
    """``topk_rows`` vs torch.topk on bf16 rows: ties at the k-th value, few distinct values, signed zeros."""
    g = torch.Generator().manual_seed(seed)
    for R, n, k in shapes:
        x = torch.randn(R, n, generator=g).to(torch.bfloat16)
        x[0, : n // 2] = 0.5  # a run of ties straddling the k-th value
        x[-1] = x[-1].round()  # few distinct values: many ties, many exact zeros of both signs
        x[-1, ::3] = -x[-1, ::3]
        values, indices = triton_kernels.topk_rows(x, k, method=method)
        want = x.float().topk(k, dim=-1).values.sort(-1).values
        distinct = all(len(set(row.tolist())) == k for row in indices)
        in_range = bool(((indices >= 0) & (indices < n)).all())
        results[f"{prefix}/{R}x{n}x{k}/values"] = [_err(values.float().sort(-1).values, want), 0.0]
        results[f"{prefix}/{R}x{n}x{k}/values_at_indices"] = [_err(x.gather(-1, indices.clamp(0, n - 1)).float(), values.float()), 0.0]
        results[f"{prefix}/{R}x{n}x{k}/indices_distinct_in_range"] = [0.0 if distinct and in_range else 1.0, 0.0]


def topk_checks(results: dict) -> None:
    """The default top-k (filter, then radix select; k == n, k above the filter's limit, masked tails)."""
    _topk_rows_checks(results, "topk", [(3, 100, 7), (4, 5000, 32), (2, 300, 300), (5, 64, 1), (2, 4097, 130)], seed=3, method=None)


def lanes_topk_checks(results: dict) -> None:
    """The lane-group top-k (masked tails, one member per group, k 1)."""
    shapes = [(3, 5000, 32), (4, 300, 7), (2, 4097, 64), (3, 64, 1), (2, 1024, 16)]
    assert all(triton_topk._lane_groups(n, k) is not None for _, n, k in shapes)
    _topk_rows_checks(results, "lanes", shapes, seed=6, method="lanes")


def latent_backward_checks(results: dict) -> None:
    """The fused one-pass backward vs the torch kernels: gather-dot, both scatters and the bias sum.

    ``chunk=2`` splits every latent with more than 2 entries into atomically added items; k == n
    puts every token on every latent; zero values must block the encoder gradient.
    """
    for S, B, d, n, k, dtype, chunk in [(2, 7, 70, 40, 5, torch.float64, None), (2, 7, 70, 40, 5, torch.float64, 2),
                                         (1, 6, 9, 9, 9, torch.float64, 2), (2, 5, 33, 16, 4, torch.float32, 3)]:
        tag = f"{S}x{B}x{d}x{n}x{k}/{str(dtype).removeprefix('torch.')}/chunk{chunk}"
        values, indices, W_dec, _, grad = _inputs(S, B, d, n, k, dtype, seed=7 * n + k)
        values = values.relu()  # activations: about half are exactly zero
        xc = torch.randn(S, B, d, dtype=dtype, generator=torch.Generator().manual_seed(11))
        d_w_dec, d_w_enc, d_b_enc = triton_backward.latent_backward(values, indices, grad, xc, W_dec, chunk=chunk)
        dpre = kernels.gather_dot(grad, W_dec, indices) * (values > 0)
        want_b = torch.zeros(S * n, dtype=dtype).index_add_(0, (indices + torch.arange(S).view(S, 1, 1) * n).reshape(-1), dpre.reshape(-1))
        tol = TOL[dtype]
        results[f"latent/{tag}/W_dec"] = [_err(d_w_dec, kernels.scatter_rows(values, indices, grad, n)), tol]
        results[f"latent/{tag}/W_enc"] = [_err(d_w_enc, kernels.scatter_rows(dpre, indices, xc, n)), tol]
        results[f"latent/{tag}/b_enc"] = [_err(d_b_enc, want_b.view(S, n)), tol]


def fused_step_checks(results: dict) -> None:
    """A whole step with INTERP_TRITON_FUSED=1 vs the unfused Triton step: loss, metrics, every gradient.

    TopK and BatchTopK, with dead latents so AuxK's own (unfused) decode adds to the same gradients.
    """
    from saes.step import StepConfig, init_stack, init_state, sae_step_loss

    S, B, d, n = 2, 12, 10, 24
    x = torch.randn(S, B, d, dtype=torch.float64, generator=torch.Generator().manual_seed(8)) + 2.0
    original, original_backward = kernels._triton_for, triton_backward.latent_backward
    fused_calls = []
    kernels._triton_for = lambda t: triton_kernels
    triton_backward.latent_backward = lambda *a, **kw: fused_calls.append(1) or original_backward(*a, **kw)
    try:
        for batch_topk in (False, True):
            cfg = StepConfig(k=3, k_aux=5, dead_tokens_threshold=50, batch_topk=batch_topk)
            out = {}
            for fused in ("0", "1"):
                os.environ["INTERP_TRITON_FUSED"] = fused
                params = init_stack(S, d, n, sample=x.float(), seed=3)
                params.double()
                state = init_state(S, n)
                state.tokens_since_fired[:, : n // 3] = 100
                loss, metrics, _ = sae_step_loss(params, state, x, cfg)
                out[fused] = [loss.detach(), *metrics.values(), *torch.autograd.grad(loss, list(params.parameters()))]
            tag = "batch_topk" if batch_topk else "topk"
            names = ["loss", "fvu", "l0", "dead_fraction", "auxk_loss", "W_enc_t", "b_enc", "W_dec", "b_dec"]
            for name, a, b in zip(names, out["1"], out["0"]):
                results[f"fused_step/{tag}/{name}"] = [_err(a, b), TOL[torch.float64]]
            results[f"fused_step/{tag}/auxk_active"] = [0.0 if float(out["1"][4].min()) > 0 else 1.0, 0.0]
            results[f"fused_step/{tag}/fused_backward_ran_once"] = [float(abs(len(fused_calls) - 1)), 0.0]
            fused_calls.clear()
    finally:
        kernels._triton_for, triton_backward.latent_backward = original, original_backward
        os.environ.pop("INTERP_TRITON_FUSED", None)


def decoder_row_checks(results: dict) -> None:
    """Fused decoder-gradient projection and row normalisation vs the plain torch formulas."""
    g = torch.Generator().manual_seed(4)
    grad, w = torch.randn(2, 9, 70, generator=g), torch.nn.functional.normalize(torch.randn(2, 9, 70, generator=g), dim=-1)
    want = grad - (grad * w).sum(-1, keepdim=True) * w
    triton_kernels.constrain_rows(grad, w)
    results["rows/constrain"] = [_err(grad, want), 1e-5]
    w = torch.randn(2, 9, 70, generator=g) * 3
    want = w / w.norm(dim=-1, keepdim=True)
    triton_kernels.normalize_rows(w)
    results["rows/normalize"] = [_err(w, want), 1e-6]


def main() -> None:
    """Run every check and print the error table as JSON."""
    results: dict[str, list[float]] = {}
    for case in CASES:
        decode_checks(results, *case)
    dispatch_checks(results)
    topk_checks(results)
    lanes_topk_checks(results)
    latent_backward_checks(results)
    fused_step_checks(results)
    decoder_row_checks(results)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
