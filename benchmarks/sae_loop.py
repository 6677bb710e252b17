"""What the training loop costs on top of the step, and what stacking SAEs buys, side by side in one run.

Three measurements on the same synthetic activations (an in-memory store, no checkpoints):
1. ``step``: a bare loop of ``sae_step_loss`` + backward + Adam on one SAE (rows already in memory);
2. ``train``: :func:`saes.train` for the same SAE (store reads, shuffling, scaling, logging);
3. ``stacked`` vs ``separate``: 2 hooks x 2 settings in one :func:`saes.train` call against four calls.
Ratios, not absolute figures, are the result: the machine may be shared.

    python benchmarks/sae_loop.py --d-in 256 --latents 2048 --k 32 --batch 1024 --steps 30
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

import saes
from interp.store import ActivationStore
from saes.step import StepConfig, constrain_decoder_grad, init_stack, init_state, input_scale, normalize_decoder, sae_step_loss


def bare_step_rate(x: torch.Tensor, n: int, k: int, batch: int, steps: int) -> float:
    """Samples/s of the step alone: forward, backward, decoder-grad projection, Adam, renormalisation."""
    d = x.shape[1]
    scale = float(input_scale(x[None, :4096])[0])
    params = init_stack(1, d, n, x[None, :4096] * scale, b_dec_init="mean", seed=0)
    state, cfg = init_state(1, n), StepConfig(k=k)
    opt = torch.optim.Adam(params.parameters(), lr=1e-4)
    start = None
    for i in range(steps + 3):
        if i == 3:
            start = time.perf_counter()  # 3 warm-up steps
        rows = x[(i * batch) % (len(x) - batch):][:batch] * scale
        loss, _, state = sae_step_loss(params, state, rows[None], cfg)
        loss.backward()
        constrain_decoder_grad(params)
        opt.step()
        opt.zero_grad(set_to_none=True)
        normalize_decoder(params)
    return steps * batch / (time.perf_counter() - start)


def train_seconds(store: ActivationStore, hooks: list[str], settings: list[tuple[int, int]], batch: int, steps: int, out: Path) -> float:
    """Wall-clock seconds of one :func:`saes.train` call (including its setup)."""
    cfg = saes.TrainConfig(hooks=hooks, settings=settings, n_tokens=steps * batch, batch_size=batch, checkpoint_every=0,
                           log_every=10, b_dec_init="mean", progress=False, device="cpu")
    start = time.perf_counter()
    saes.train(store, cfg, out)
    return time.perf_counter() - start


def main() -> None:
    """Run the three measurements and print a table of rates and ratios."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d-in", type=int, default=256)
    p.add_argument("--latents", type=int, default=2048)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--steps", type=int, default=30)
    a = p.parse_args()
    gen = torch.Generator().manual_seed(0)
    rows = max(16 * a.batch, 8192)
    hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    acts = {h: torch.randn(rows, a.d_in, generator=gen).relu() for h in hooks}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        store = ActivationStore.from_tensors(root / "store", acts, shard_rows=4096)
        train_seconds(store, hooks[:1], [(a.latents, a.k)], a.batch, 2, root / "warm")  # imports, first-call costs
        step_rate = bare_step_rate(acts[hooks[0]], a.latents, a.k, a.batch, a.steps)
        one = train_seconds(store, hooks[:1], [(a.latents, a.k)], a.batch, a.steps, root / "one")
        settings = [(a.latents, a.k), (a.latents, a.k // 2)]
        stacked = train_seconds(store, hooks, settings, a.batch, a.steps, root / "stacked")
        separate = sum(train_seconds(store, [h], [s], a.batch, a.steps, root / f"sep{i}{j}")
                       for i, h in enumerate(hooks) for j, s in enumerate(settings))
    train_rate = a.steps * a.batch / one
    print(f"shape d_in={a.d_in} n_latents={a.latents} k={a.k} batch={a.batch} steps={a.steps}, torch threads={torch.get_num_threads()}")
    print(f"bare step loop      {step_rate:10,.0f} samples/s")
    print(f"saes.train, 1 SAE   {train_rate:10,.0f} samples/s  ({train_rate / step_rate:.2f}x the bare step, setup included)")
    print(f"4 SAEs stacked      {stacked:10.2f} s")
    print(f"4 SAEs one by one   {separate:10.2f} s  (stacked is {separate / stacked:.2f}x faster)")


if __name__ == "__main__":
    main()
