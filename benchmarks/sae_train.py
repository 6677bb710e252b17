"""TopK SAE training throughput: our sparse step vs eai-sparsify vs a dense reference, side by side.

All three train on the same synthetic sparse activations (sums of k random ground-truth directions,
scaled so that ``E||x||^2 = d_in``) with Adam, the decoder-gradient projection and decoder
renormalization. Reported per implementation: samples/s (wall clock and per CPU-second, the latter
being robust on a shared machine), the fraction of the encoder-matmul roofline
``2 * d_in * n_latents * samples/s / matmul FLOP/s`` (the matmul measured in the same run, with a
fresh output as from the start and, in brackets, into a reused output: see :func:`matmul_flops`) and
the held-out FVU after the same number of tokens.

    python benchmarks/sae_train.py                      # d_in 576, n 4096 and 16384, k 32, batch 4096
    python benchmarks/sae_train.py --latents 4096 --steps 5 --threads 1
    python benchmarks/sae_train.py --device cuda --d-in 768 --latents 32768 --steps 30   # GPU
    python benchmarks/sae_train.py --latents 4096 --steps 4 --threads 1 --saelens-python /tmp/saelens-venv/bin/python

``--saelens-python`` adds sae-lens, which pins ``transformer-lens<4`` and so lives in its own venv
(see ``benchmarks/saelens_train.py``): after ours, for each size, that interpreter runs
``saelens_train.py`` on the same data (the raw data's sha256 is printed by both and compared) and
the ratios ours / sae-lens are printed with the others.

On CUDA the roofline is the bf16 encoder GEMM (every implementation runs its encoder in bf16:
ours by design, sparsify and the dense reference under ``torch.autocast``), times are wall clock
with the device synchronized, and ``--profile`` prints where our step spends its GPU time.

Never asserts a time: figures go to benchmarks/RESULTS.md by hand.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import subprocess
import time
from collections.abc import Callable

import torch

from saes.step import DEFAULT_ENC_INIT_SCALE, StepConfig, constrain_decoder_grad, init_stack, init_state, input_scale, normalize_decoder, sae_step_loss


def synthetic(n_rows: int, d_in: int, n_true: int, k: int, seed: int) -> torch.Tensor:
    """Rows that are sums of ``k`` of ``n_true`` unit directions with magnitudes in [0.5, 1.5)."""
    gen = torch.Generator().manual_seed(seed)
    directions = torch.randn(n_true, d_in, generator=torch.Generator().manual_seed(1234))
    directions /= directions.norm(dim=1, keepdim=True)
    which = torch.randint(0, n_true, (n_rows, k), generator=gen)
    magnitude = 0.5 + torch.rand(n_rows, k, generator=gen)
    return torch.nn.functional.embedding_bag(which, directions, per_sample_weights=magnitude, mode="sum")


def fvu(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Fraction of variance unexplained: sum ||x - x_hat||^2 / sum ||x - mean(x)||^2."""
    return float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


DEVICE = torch.device("cpu")
ENC_INIT_SCALE = DEFAULT_ENC_INIT_SCALE


def matmul_flops(batch: int, d_in: int, n: int, repeats: int = 3, reuse_output: bool = False,
                 dtype: torch.dtype | None = None) -> tuple[float, float]:
    """FLOP/s of the encoder GEMM ``[batch, d] @ [d, n]`` (fp32 on CPU, bf16 on CUDA): (per wall second, per CPU-second).

    By default each product gets a fresh output, as the roofline was measured from the start; on
    CPU that output's first-touch page faults are part of the time. ``reuse_output`` writes into
    one buffer instead: the GEMM's own speed (on this 2-core Xeon, 167 vs 134-145 GFLOP/s at n 4,096).
    """
    dt = dtype or (torch.bfloat16 if DEVICE.type == "cuda" else torch.float32)
    a, b = torch.randn(batch, d_in, device=DEVICE, dtype=dt), torch.randn(d_in, n, device=DEVICE, dtype=dt)
    out = (a @ b) if reuse_output else None
    reps = 20 if DEVICE.type == "cuda" else 1
    def run() -> None:
        for _ in range(reps):  # results dropped at once: at batch 65,536 each is 4 GiB
            torch.mm(a, b, out=out) if reuse_output else a @ b

    times = [_timed(run) for _ in range(repeats)]
    flop = 2 * batch * d_in * n * reps
    return flop / min(t[0] for t in times), flop / min(t[1] for t in times)


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn: Callable[[], object]) -> tuple[float, float]:
    _sync()
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    _sync()
    return time.perf_counter() - wall, time.process_time() - cpu


def _autocast():
    """bf16 autocast on CUDA for the implementations that rely on it (sparsify's own trainer does this)."""
    import contextlib

    return torch.autocast("cuda", dtype=torch.bfloat16) if DEVICE.type == "cuda" else contextlib.nullcontext()


def ours(d_in, n, k, data, sample, cpu_bf16_encoder=False):
    """Our stacked sparse step with S = 1; returns (step fn, reconstruct fn)."""
    params = init_stack(1, d_in, n, sample=sample[None].cpu(), seed=0, enc_init_scale=ENC_INIT_SCALE).to(DEVICE)
    state = [init_state(1, n, device=DEVICE)]
    cfg = StepConfig(k=k, cpu_bf16_encoder=cpu_bf16_encoder)
    opt = torch.optim.Adam(params.parameters(), lr=2e-4 / (n / 2**14) ** 0.5, fused=True)

    def step(x):
        loss, _, state[0] = sae_step_loss(params, state[0], x[None], cfg)
        loss.backward()
        constrain_decoder_grad(params)
        opt.step()
        opt.zero_grad(set_to_none=True)
        normalize_decoder(params)

    def reconstruct(x):
        from saes.model import TopKSAE

        return TopKSAE.from_stack(params, 0, k).to(DEVICE)(x)

    return step, reconstruct


def dense_reference(d_in, n, k, data, sample):
    """The same objective with dense autograd (dense [B, n] gradients, dense weight-grad GEMMs)."""
    params = init_stack(1, d_in, n, sample=sample[None].cpu(), seed=0, enc_init_scale=ENC_INIT_SCALE)
    W_enc, b_enc, W_dec, b_dec = (p[0].detach().to(DEVICE).clone().requires_grad_() for p in (params.W_enc, params.b_enc, params.W_dec, params.b_dec))
    opt = torch.optim.Adam([W_enc, b_enc, W_dec, b_dec], lr=2e-4 / (n / 2**14) ** 0.5, fused=True)

    def forward(x):
        pre = (x - b_dec) @ W_enc + b_enc
        _, idx = pre.topk(k, dim=-1, sorted=False)
        f = torch.zeros_like(pre).scatter(-1, idx, pre.gather(-1, idx).relu())
        return f @ W_dec + b_dec

    def step(x):
        with _autocast():
            loss = (forward(x).float() - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
        loss.backward()
        with torch.no_grad():
            W_dec.grad -= (W_dec.grad * W_dec).sum(-1, keepdim=True) * W_dec
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            W_dec.div_(W_dec.norm(dim=-1, keepdim=True))

    return step, forward


def sparsify_coder(d_in, n, k, data, sample):
    """eai-sparsify's SparseCoder with its own fused encoder and decoder, trained the same way."""
    import os

    if not torch.cuda.is_available():  # sparsify's Triton decoder needs a GPU driver
        os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
    from sparsify import SparseCoder, SparseCoderConfig

    torch.manual_seed(0)
    coder = SparseCoder(d_in, SparseCoderConfig(num_latents=n, k=k), device=DEVICE)
    with torch.no_grad():
        coder.b_dec.copy_(sample.mean(0))
    opt = torch.optim.Adam(coder.parameters(), lr=2e-4 / (n / 2**14) ** 0.5, fused=True)

    def step(x):
        with _autocast():
            fvu = coder(x).fvu
        fvu.backward()
        coder.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad(set_to_none=True)
        coder.set_decoder_norm_to_unit_norm()

    return step, lambda x: coder(x).sae_out


def profile(step: Callable, data: torch.Tensor, B: int, steps: int = 5) -> None:
    """Print the top operators of ``steps`` calls of ``step`` by device (CUDA) or CPU self time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEVICE.type == "cuda" else [])
    with torch_profile(activities=activities, record_shapes=DEVICE.type == "cuda") as prof:
        for i in range(steps):
            step(data[i * B:(i + 1) * B])
        _sync()
    key = "self_cuda_time_total" if DEVICE.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=18, max_name_column_width=50))
    if DEVICE.type == "cuda":  # the same by input shapes: which conversion or elementwise pass costs what
        table = prof.key_averages(group_by_input_shape=True).table(sort_by=key, row_limit=40, max_name_column_width=36, max_shapes_column_width=70)
        print("\n".join(line for line in table.splitlines() if "aten::" in line or "Name" in line))
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=50))


def checksum(t: torch.Tensor) -> str:
    """First 16 hex digits of the sha256 of the tensor's contiguous bytes (``saelens_train.py`` prints the same)."""
    return hashlib.sha256(t.contiguous().cpu().numpy().tobytes()).hexdigest()[:16]


def saelens_run(python: str, n: int, args: argparse.Namespace, data_sha: str) -> tuple[float, float] | None:
    """sae-lens's ``(samples/s, per CPU-s)`` at ``n`` latents from ``saelens_train.py`` under ``python`` (its own venv).

    Same sizes, steps and threads as this run; None (with the reason printed) when it fails or saw other data.
    """
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "saelens_train.py")
    cmd = [python, script, "--latents", str(n), "--d-in", str(args.d_in), "--k", str(args.k), "--batch", str(args.batch),
           "--steps", str(args.steps)] + (["--threads", str(args.threads)] if args.threads else [])
    env = {**os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        print(f"  sae-lens failed (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:] or ''}")
        return None
    if f"raw data sha256 {data_sha}" not in proc.stdout:
        print(f"  sae-lens saw other data (expected raw data sha256 {data_sha}); not compared")
        return None
    line = next((line for line in proc.stdout.splitlines() if line.strip().startswith("sae-lens ") and "per CPU-s" in line), None)
    if line is None:
        print("  sae-lens printed no result line; not compared")
        return None
    print(line, flush=True)
    wall, cpu = (float(v.replace(",", "")) for v in re.findall(r"([\d,]+) (?:samples/s|per CPU-s)", line))
    return wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-in", type=int, default=576)
    parser.add_argument("--latents", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per implementation (after 1 warm-up step)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["dense", "sparsify"])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (allocations, Triton compiles)")
    parser.add_argument("--profile", action="store_true", help="print our step's operator profile per size")
    parser.add_argument("--cpu-bf16", action="store_true", help="also time ours with the bf16 encoder GEMM on CPU (fast with AMX-BF16)")
    parser.add_argument("--saelens-python", default=None, help="python of a venv with sae-lens: also run benchmarks/saelens_train.py on the same data")
    parser.add_argument("--enc-init-scale", type=float, default=DEFAULT_ENC_INIT_SCALE, help="ours and dense: W_enc = s * W_dec^T at init (default 1/sqrt(3), as sparsify; 1: exact transpose)")
    args = parser.parse_args()
    global DEVICE, ENC_INIT_SCALE
    DEVICE, ENC_INIT_SCALE = torch.device(args.device), args.enc_init_scale
    if DEVICE.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}")
    if args.threads:
        torch.set_num_threads(args.threads)
    d, k, B = args.d_in, args.k, args.batch
    raw = synthetic((args.steps + 1) * B + 8192, d, n_true=8 * d, k=k, seed=0)
    scale = float(input_scale(raw[None, :8192])[0])
    data, held_out = (scale * raw[:-8192]).to(DEVICE), (scale * raw[-8192:]).to(DEVICE)
    data_sha = checksum(raw)
    print(f"threads {torch.get_num_threads()}, d_in {d}, k {k}, batch {B}, {args.steps} timed steps, inputs scaled by {scale:.4f}, "
          f"raw data sha256 {data_sha}")
    bf16 = {"ours-bf16": lambda *a: ours(*a, cpu_bf16_encoder=True)} if args.cpu_bf16 and DEVICE.type == "cpu" else {}
    impls = {"ours": ours, **bf16, "sparsify": sparsify_coder, "dense": dense_reference}
    for n in args.latents:
        flops, flops_cpu = matmul_flops(B, d, n)
        _, reused_cpu = matmul_flops(B, d, n, reuse_output=True)
        print(f"\nn_latents {n}: encoder matmul {flops / 1e9:.1f} GFLOP/s wall, {flops_cpu / 1e9:.1f} per CPU-second "
              f"({reused_cpu / 1e9:.1f} per CPU-second into a reused output)")
        results = {}
        for name, build in impls.items():
            if name in args.skip:
                continue
            step, reconstruct = build(d, n, k, data, data[:8192])
            for _ in range(args.warmup):
                step(data[:B])  # warm-up (allocations, first-call dispatch, Triton compiles)
            wall = cpu = 0.0
            for i in range(args.steps):
                w, c = _timed(lambda: step(data[(i + 1) * B:(i + 2) * B]))
                wall, cpu = wall + w, cpu + c
            with torch.no_grad():
                held = fvu(held_out, reconstruct(held_out).float())
            if args.profile and name == "ours":
                profile(step, data, B)
            sps, sps_cpu = args.steps * B / wall, args.steps * B / cpu
            results[name] = (sps, sps_cpu)
            print(f"  {name:9s} {sps:8,.0f} samples/s, roofline {2 * d * n * sps / flops:6.1%} | {sps_cpu:8,.0f} per CPU-s, "
                  f"roofline {2 * d * n * sps_cpu / flops_cpu:6.1%} ({2 * d * n * sps_cpu / reused_cpu:5.1%} of the reused-output GEMM) | "
                  f"held-out FVU {held:.4f}", flush=True)
            if name == "ours-bf16":  # its own roofline: the bf16 GEMM (AMX where the CPU has it)
                _, bf16_cpu = matmul_flops(B, d, n, reuse_output=True, dtype=torch.bfloat16)
                print(f"            (bf16 GEMM {bf16_cpu / 1e9:.1f} GFLOP/s per CPU-second into a reused output: "
                      f"ours-bf16 at {2 * d * n * sps_cpu / bf16_cpu:.1%} of it)")
        if args.saelens_python and DEVICE.type == "cpu":
            found = saelens_run(args.saelens_python, n, args, data_sha)
            if found is not None:
                results["sae-lens"] = found
        for mine in ("ours", "ours-bf16"):
            for other in ("sparsify", "sae-lens", "dense"):
                if mine in results and other in results:
                    print(f"  {mine} / {other}: {results[mine][0] / results[other][0]:.2f}x wall, {results[mine][1] / results[other][1]:.2f}x per CPU-s")


if __name__ == "__main__":
    main()
