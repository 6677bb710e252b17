"""Time the parts of one CUDA SAE training step in isolation (median of CUDA-event timings).

    python benchmarks/cuda_parts.py --d-in 768 --latents 32768 --batch 4096

Parts: the bf16 encoder GEMM (the roofline), ``torch.topk`` vs the Triton top-ks (filter and lane
groups), the sparse backward unfused vs fused (:func:`saes.triton_backward.latent_backward`), the sparse
weight-gradient scatter (torch sparse, Triton atomics, Triton sorted segments) and gather-dot,
the fused Adam update of all weights, and the decoder constraint + renormalization (Triton vs
torch). Each part's result is checked against the plain version before it is timed. Never asserts
a time.
"""

from __future__ import annotations

import argparse
import os

import torch
from triton.testing import do_bench

from saes import kernels, triton_backward, triton_kernels
from saes.step import StackParams, constrain_decoder_grad, normalize_decoder


SMOKE = False  # --smoke: one untimed call of each part on the CPU (Triton's interpreter), to check the script before device time


def ms(fn) -> float:
    if SMOKE:
        fn()
        return float("nan")
    return do_bench(fn, warmup=25, rep=200, return_mode="median")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-in", type=int, default=768)
    parser.add_argument("--latents", type=int, default=32768)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--smoke", action="store_true", help="CPU under TRITON_INTERPRET=1 at small sizes: checks only, no timings")
    args = parser.parse_args()
    global SMOKE
    SMOKE = args.smoke
    if SMOKE and os.environ.get("TRITON_INTERPRET") != "1":
        parser.error("--smoke needs TRITON_INTERPRET=1 in the environment")
    d, n, B, k, dev = args.d_in, args.latents, args.batch, args.k, torch.device("cpu" if SMOKE else "cuda")
    torch.manual_seed(0)
    rows = []
    x = torch.randn(1, B, d, device=dev, dtype=torch.bfloat16)
    W = torch.randn(1, d, n, device=dev, dtype=torch.bfloat16)
    gemm = ms(lambda: torch.bmm(x, W))
    rows.append(("encoder GEMM bf16", gemm, f"{2 * B * d * n / gemm / 1e9:.0f} TFLOP/s"))

    pre = torch.bmm(x, W)
    ref = pre.topk(k, dim=-1, sorted=False)
    rows.append(("topk torch", ms(lambda: pre.topk(k, dim=-1, sorted=False)), ""))
    got = triton_kernels.topk_rows(pre, k)
    same = torch.equal(got[0].float().sort(-1).values, ref[0].float().sort(-1).values)
    rows.append(("topk triton (filter + radix)", ms(lambda: triton_kernels.topk_rows(pre, k, method="filter")), f"values equal torch.topk: {same}"))
    got = triton_kernels.topk_rows(pre, k, method="lanes")
    same = torch.equal(got[0].float().sort(-1).values, ref[0].float().sort(-1).values)
    rows.append(("topk triton (lane groups)", ms(lambda: triton_kernels.topk_rows(pre, k, method="lanes")), f"values equal torch.topk: {same}"))
    idx = ref[1].contiguous()
    coef = torch.randn(1, B, k, device=dev)
    dense = torch.randn(1, B, d, device=dev)
    table = torch.randn(1, n, d, device=dev)
    tri_scatter = triton_kernels.scatter_rows(coef, idx, dense, n, sorted_segments=False)
    os.environ["INTERP_TRITON"] = "0"
    torch_scatter = kernels.scatter_rows(coef, idx, dense, n)
    rows.append(("scatter_rows torch sparse", ms(lambda: kernels.scatter_rows(coef, idx, dense, n)), ""))
    rows.append(("gather_dot torch sparse", ms(lambda: kernels.gather_dot(dense, table, idx)), ""))
    os.environ.pop("INTERP_TRITON")
    err = float((tri_scatter - torch_scatter).norm() / torch_scatter.norm())
    rows.append(("scatter_rows triton atomics", ms(lambda: triton_kernels.scatter_rows(coef, idx, dense, n, sorted_segments=False)), f"rel diff {err:.1e}"))
    seg = triton_kernels.scatter_rows(coef, idx, dense, n, sorted_segments=True)
    seg_err = float((seg - torch_scatter).norm() / torch_scatter.norm())
    rows.append(("scatter_rows triton sorted", ms(lambda: triton_kernels.scatter_rows(coef, idx, dense, n, sorted_segments=True)), f"rel diff {seg_err:.1e}"))
    rows.append(("gather_dot triton", ms(lambda: triton_kernels.gather_dot(dense, table, idx)), ""))
    rows.append(("decode triton", ms(lambda: triton_kernels.sparse_decode(coef, idx, table)), ""))

    # The sparse backward of one step: unfused (gather-dot, two scatters as scatter_rows picks them, the bias sum) vs one pass over latents.
    act = coef.relu()
    xc = torch.randn(1, B, d, device=dev)
    flat_idx = idx.reshape(-1)

    def unfused():
        dpre = triton_kernels.gather_dot(dense, table, idx) * (act > 0)
        return (triton_kernels.scatter_rows(act, idx, dense, n), triton_kernels.scatter_rows(dpre, idx, xc, n),
                torch.zeros(n, device=dev).index_add_(0, flat_idx, dpre.reshape(-1)))

    want = unfused()
    got = triton_backward.latent_backward(act, idx, dense, xc, table)
    errs = ", ".join(f"{float((a.reshape(b.shape) - b).norm() / b.norm()):.1e}" for a, b in zip(got, want))
    rows.append(("backward unfused (4 kernels)", ms(unfused), ""))
    rows.append(("backward fused (latent pass)", ms(lambda: triton_backward.latent_backward(act, idx, dense, xc, table)), f"rel diff {errs}"))

    params = StackParams(1, d, n, device=dev)
    with torch.no_grad():
        params.W_dec.copy_(torch.nn.functional.normalize(torch.randn(1, n, d, device=dev), dim=-1))
    for p in params.parameters():
        p.grad = torch.randn_like(p)
    opt = torch.optim.Adam(params.parameters(), lr=1e-4, fused=True)
    rows.append(("Adam fused (all weights)", ms(opt.step), f"{sum(p.numel() for p in params.parameters()) / 1e6:.0f} M params"))
    rows.append(("decoder constrain + normalize", ms(lambda: (constrain_decoder_grad(params), normalize_decoder(params))), "triton"))
    os.environ["INTERP_TRITON"] = "0"
    rows.append(("decoder constrain + normalize", ms(lambda: (constrain_decoder_grad(params), normalize_decoder(params))), "torch"))
    os.environ.pop("INTERP_TRITON")

    print(f"\n{'smoke run (CPU, interpreter)' if SMOKE else torch.cuda.get_device_name()}: d_in {d}, n {n}, batch {B}, k {k}")
    for name, t, note in rows:
        print(f"  {name:32s} {t * 1000:9.1f} us  {note}")


if __name__ == "__main__":
    main()
