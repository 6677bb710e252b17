"""Time the parts of one CUDA SAE training step in isolation (median of CUDA-event timings).

    python benchmarks/cuda_parts.py --d-in 768 --latents 32768 --batch 4096

Parts: the bf16 encoder GEMM (the roofline), ``torch.topk`` vs the Triton top-k, the sparse
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

from saes import kernels, triton_kernels
from saes.step import StackParams, constrain_decoder_grad, normalize_decoder


def ms(fn) -> float:
    return do_bench(fn, warmup=25, rep=200, return_mode="median")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-in", type=int, default=768)
    parser.add_argument("--latents", type=int, default=32768)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--k", type=int, default=32)
    args = parser.parse_args()
    d, n, B, k, dev = args.d_in, args.latents, args.batch, args.k, torch.device("cuda")
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
    rows.append(("topk triton (filter + radix)", ms(lambda: triton_kernels.topk_rows(pre, k)), f"values equal torch.topk: {same}"))
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

    print(f"\n{torch.cuda.get_device_name()}: d_in {d}, n {n}, batch {B}, k {k}")
    for name, t, note in rows:
        print(f"  {name:32s} {t * 1000:9.1f} us  {note}")


if __name__ == "__main__":
    main()
