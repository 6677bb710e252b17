"""What SAE evaluation and feature scans cost, in units of a bare forward pass, side by side in one run.

    python benchmarks/sae_eval.py [--model smollm2-135m] [--hook blocks.15.hook_resid_post] \
        [--latents 4096] [--k 32] [--windows 16] [--batch-size 8] [--ctx 128] [--repeats 2]

On the same held-out windows (packed once, outside the timing), alternating so that a busy machine
slows every side alike:
1. ``forward``: one plain full forward pass over the windows;
2. ``eval``: :func:`saes.evaluate` (clean, spliced and zero-ablated hooked passes, reconstruction
   metrics, CE and KL): three forward passes is the floor, so read its ratio against 3.0;
3. ``scan``: :func:`saes.scan_features` (forward truncated after the hook's block, encode, stats,
   top-k merge).
The SAE has random weights: the cost does not depend on what it learned. Read the ratios.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import interp
from saes import TopKSAE, evaluate, scan_features


def random_sae(d_in: int, n_latents: int, k: int, hook: str) -> TopKSAE:
    """A TopK SAE with random unit decoder rows and a tied encoder."""
    g = torch.Generator().manual_seed(0)
    sae = TopKSAE(d_in, n_latents, k, hook_name=hook)
    W = torch.randn(n_latents, d_in, generator=g)
    with torch.no_grad():
        sae.W_dec.copy_(W / W.norm(dim=1, keepdim=True))
        sae.W_enc.copy_(sae.W_dec.T)
    return sae


def timed(fn) -> float:
    """CPU seconds of one call of ``fn`` (process time: less distorted than wall time on a shared machine)."""
    start = time.process_time()
    fn()
    return time.process_time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--hook", default="blocks.15.hook_resid_post")
    parser.add_argument("--corpus", default="default")
    parser.add_argument("--latents", type=int, default=4096)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--ctx", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    model = interp.load_model(args.model)
    windows = interp.pack_windows(model.tokenizer, interp.load_corpus(args.corpus, split="eval"), ctx=args.ctx, n_tokens=args.windows * args.ctx)
    sae = random_sae(model.cfg.d_model, args.latents, args.k, args.hook).to(next(model.parameters()).device)
    n_tokens = windows.shape[0] * (args.ctx - 1)
    bs = args.batch_size

    def forward() -> None:
        with torch.inference_mode():
            for i in range(0, len(windows), bs):
                model(windows[i : i + bs])

    sides = {
        "forward": forward,
        "eval": lambda: evaluate(sae, model, windows, n_tokens=n_tokens, batch_size=bs, progress=False),
        "scan": lambda: scan_features(sae, model, windows, n_tokens=n_tokens, batch_size=bs, top_k=10, progress=False),
    }
    forward()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(args.repeats):
        for name, fn in sides.items():
            times[name].append(timed(fn))
    base = statistics.median(times["forward"])
    print(f"model {args.model}, hook {args.hook}, SAE {args.latents} latents k={args.k}, {windows.shape[0]} windows x {args.ctx} tokens, batch {bs}, {torch.get_num_threads()} threads")
    for name, values in times.items():
        med = statistics.median(values)
        print(f"{name:>8}: {med:7.2f} CPU s  {med / base:5.2f}x forward")


if __name__ == "__main__":
    main()
