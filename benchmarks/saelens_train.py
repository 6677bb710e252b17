"""sae-lens TopK SAE training throughput, measured the way ``benchmarks/sae_train.py`` measures ours.

sae-lens pins ``transformer-lens<4``, so it cannot share this project's venv; it runs in its own,
with the same torch installed first so that the kernels compared are the same (not part of CI):

    python -m venv /tmp/saelens-venv
    /tmp/saelens-venv/bin/pip install torch==2.13.0   # the +cpu wheel; off this machine add
    #   --index-url https://download.pytorch.org/whl/cpu  (this machine's pip finds it in /opt/wheels)
    /tmp/saelens-venv/bin/pip install sae-lens==6.54.12
    OMP_NUM_THREADS=1 /tmp/saelens-venv/bin/python benchmarks/saelens_train.py --latents 4096 --steps 4 --threads 1

This script imports nothing from this project: ``synthetic``, the input scale, ``fvu``,
``matmul_flops`` and the roofline fraction are copies of ``benchmarks/sae_train.py``'s (same data
for the same seed: the raw data's sha256 printed here equals that of ``sae_train.synthetic`` with
the same arguments, checked in the project venv). Per timed step it does
what sae-lens's own ``SAETrainer.fit`` does per step, through the trainer's public seams:
``maybe_reset_sparsity``, ``step`` (``training_forward_pass`` -> MSE + AuxK loss, backward,
``clip_grad_norm_(1.0)``, Adam, LR/coefficient schedulers, dead-latent counters) and the step
counter; wandb logging, checkpoints and the progress bar are off, as with ``log_to_wandb=False``.
sae-lens's TopK has no decoder-gradient projection or renormalization: by default
(``rescale_acts_by_decoder_norm=True``) it scales pre-activations by the decoder row norms instead.
``--sparse-activations`` (sae-lens's COO decode) also turns that rescaling off: on torch 2.13 CPU the
two together fail in backward (``aten::view`` has no SparseCPU kernel).

Never asserts a time: figures go to ``benchmarks/RESULTS.md`` (the sae-lens section) by hand.
"""

from __future__ import annotations

import argparse
import hashlib
import time
from collections.abc import Callable

import torch


def synthetic(n_rows: int, d_in: int, n_true: int, k: int, seed: int) -> torch.Tensor:
    """Rows that are sums of ``k`` of ``n_true`` unit directions with magnitudes in [0.5, 1.5)."""
    gen = torch.Generator().manual_seed(seed)
    directions = torch.randn(n_true, d_in, generator=torch.Generator().manual_seed(1234))
    directions /= directions.norm(dim=1, keepdim=True)
    which = torch.randint(0, n_true, (n_rows, k), generator=gen)
    magnitude = 0.5 + torch.rand(n_rows, k, generator=gen)
    return torch.nn.functional.embedding_bag(which, directions, per_sample_weights=magnitude, mode="sum")


def input_scale(sample: torch.Tensor) -> float:
    """The factor ``c`` with ``E||c x||^2 = d_in`` on ``sample`` (``saes.step.input_scale`` for one member)."""
    mean_sq = sample.double().pow(2).sum(-1).mean()
    return float((sample.shape[-1] / mean_sq).sqrt().float())


def checksum(t: torch.Tensor) -> str:
    """First 16 hex digits of the sha256 of the tensor's contiguous bytes."""
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()[:16]


def fvu(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Fraction of variance unexplained: sum ||x - x_hat||^2 / sum ||x - mean(x)||^2."""
    return float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


def matmul_flops(batch: int, d_in: int, n: int, repeats: int = 3) -> tuple[float, float]:
    """fp32 FLOP/s of the encoder GEMM ``[batch, d] @ [d, n]``: (per wall second, per CPU-second), best of ``repeats``."""
    a, b = torch.randn(batch, d_in), torch.randn(d_in, n)
    a @ b
    times = [_timed(lambda: a @ b) for _ in range(repeats)]
    flop = 2 * batch * d_in * n
    return flop / min(t[0] for t in times), flop / min(t[1] for t in times)


def _timed(fn: Callable[[], object]) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def saelens_topk(d_in: int, n: int, k: int, batch: int, steps: int, args: argparse.Namespace):
    """sae-lens's ``TopKTrainingSAE`` driven by its ``SAETrainer``; returns (step fn, reconstruct fn, trainer)."""
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    lr = args.lr if args.lr is not None else 2e-4 / (n / 2**14) ** 0.5
    torch.manual_seed(0)
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(
        d_in=d_in, d_sae=n, k=k, dtype="float32", device="cpu", use_sparse_activations=args.sparse_activations,
        rescale_acts_by_decoder_norm=not args.sparse_activations,
    ))
    trainer = SAETrainer(
        SAETrainerConfig(
            total_training_samples=(steps + 1) * batch, train_batch_size_samples=batch,
            lr=lr, lr_end=lr / 10,  # lr_end as LanguageModelSAERunnerConfig sets it; unused by the constant schedule
            device="cpu", dead_feature_window=args.dead_window, logger=LoggingConfig(log_to_wandb=False),
        ),
        sae, data_provider=iter(()),
    )

    def step(x):
        trainer.maybe_reset_sparsity()
        trainer.step(x)
        trainer.n_training_steps += 1

    def reconstruct(x):
        return sae(x)

    return step, reconstruct, trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-in", type=int, default=576)
    parser.add_argument("--latents", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=8, help="timed steps (after 1 warm-up step)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--lr", type=float, default=None, help="Adam LR (default: sae_train.py's 2e-4 / sqrt(n / 2^14))")
    parser.add_argument("--dead-window", type=int, default=1000,
                        help="sae-lens dead_feature_window in steps (its default 1000; 0 forces the AuxK path from step 2)")
    parser.add_argument("--sparse-activations", action="store_true",
                        help="sae-lens's use_sparse_activations (COO decode), with rescale_acts_by_decoder_norm off")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    d, k, B = args.d_in, args.k, args.batch
    raw = synthetic((args.steps + 1) * B + 8192, d, n_true=8 * d, k=k, seed=0)
    scale = input_scale(raw[:8192])
    data, held_out = scale * raw[:-8192], scale * raw[-8192:]
    import sae_lens

    print(f"sae-lens {sae_lens.__version__}, torch {torch.__version__}, threads {torch.get_num_threads()}, d_in {d}, k {k}, "
          f"batch {B}, {args.steps} timed steps, inputs scaled by {scale:.4f}, raw data sha256 {checksum(raw)}")
    print(f"AuxK: aux_loss_coefficient 1.0, k_aux d_in//2 = {d // 2}, dead after {args.dead_window} steps without firing; "
          f"use_sparse_activations {args.sparse_activations}, rescale_acts_by_decoder_norm {not args.sparse_activations}")
    for n in args.latents:
        flops, flops_cpu = matmul_flops(B, d, n)
        print(f"\nn_latents {n}: encoder matmul {flops / 1e9:.1f} GFLOP/s wall, {flops_cpu / 1e9:.1f} per CPU-second")
        step, reconstruct, trainer = saelens_topk(d, n, k, B, args.steps, args)
        step(data[:B])  # warm-up (allocations, first-call dispatch)
        wall = cpu = 0.0
        for i in range(args.steps):
            w, c = _timed(lambda: step(data[(i + 1) * B:(i + 2) * B]))
            wall, cpu = wall + w, cpu + c
        with torch.no_grad():
            held = fvu(held_out, reconstruct(held_out))
        sps, sps_cpu = args.steps * B / wall, args.steps * B / cpu
        n_dead = int(trainer.dead_neurons.sum())
        print(f"  {'sae-lens':9s} {sps:8,.0f} samples/s, roofline {2 * d * n * sps / flops:6.1%} | {sps_cpu:8,.0f} per CPU-s, "
              f"roofline {2 * d * n * sps_cpu / flops_cpu:6.1%} | held-out FVU {held:.4f} | dead latents {n_dead}", flush=True)


if __name__ == "__main__":
    main()
