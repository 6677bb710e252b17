"""Harvest throughput against a bare forward pass truncated at the same layer, same batches, same run.

    python benchmarks/harvest.py [--model smollm2-135m] [--hook blocks.15.hook_resid_post] \
        [--batches 10] [--batch-size 8] [--ctx 128] [--repeats 3]

Wall and CPU (process) time are both reported; on a shared machine the CPU-time ratio is the
fairer one. A third line times writing the same rows as a store with no model at all: an
upper bound on the harvest's own cost that the machine's noise does not hide. Both sides see the same token windows (packed from the default corpus once, outside the timing)
and alternate, so a busy machine slows both alike; the figure to read is the ratio. The harvest
side includes everything ``interp.harvest`` does: the hook probe, capture, BOS masking, copies
to CPU, the shard write with sha256 and fsync, and the manifest.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

import interp
from interp.activations import _stop_layer, harvest
from interp.store import ActivationStore


def bare_forward(model, windows: torch.Tensor, batch_size: int, stop_at: int | None) -> tuple[float, float]:
    """(wall, CPU) seconds for the plain truncated forward over all windows."""
    wall, cpu = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        for i in range(0, len(windows), batch_size):
            model(windows[i : i + batch_size], stop_at_layer=stop_at)
    return time.perf_counter() - wall, time.process_time() - cpu


def harvested(model, windows: torch.Tensor, hooks: list[str], n_tokens: int, batch_size: int) -> tuple[float, float]:
    """(wall, CPU) seconds for ``interp.harvest`` of the same windows into a fresh store."""
    with tempfile.TemporaryDirectory() as tmp:
        wall, cpu = time.perf_counter(), time.process_time()
        harvest(model, windows, hooks, n_tokens=n_tokens, batch_size=batch_size, out=f"{tmp}/store", progress=False)
        return time.perf_counter() - wall, time.process_time() - cpu


def store_write(n_tokens: int, d_in: int, windows: torch.Tensor) -> tuple[float, float]:
    """(wall, CPU) seconds to write ``n_tokens`` rows of width ``d_in`` as a store, with no model at all."""
    acts = torch.randn(windows.numel(), d_in)
    with tempfile.TemporaryDirectory() as tmp:
        wall, cpu = time.perf_counter(), time.process_time()
        ActivationStore.from_tensors(f"{tmp}/store", {"acts": acts}, tokens=windows)
        return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    """Run the comparison and print tokens/s for both sides and the overhead."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--hook", action="append", dest="hooks")
    parser.add_argument("--corpus", default="default")
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--ctx", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    hooks = args.hooks or ["blocks.15.hook_resid_post"]

    model = interp.load_model(args.model)
    n_windows = args.batches * args.batch_size
    windows = interp.pack_windows(model.tokenizer, interp.load_corpus(args.corpus), ctx=args.ctx, n_tokens=n_windows * args.ctx, seed=0)
    windows = windows[:n_windows]
    n_tokens = int((windows != model.tokenizer.bos_token_id).sum())  # what harvest stores
    stop_at = _stop_layer(hooks, model.cfg.n_layers)
    bare_forward(model, windows[: args.batch_size], args.batch_size, stop_at)  # warm-up

    bare, full, write = [], [], []
    for repeat in range(args.repeats):
        # swap which side goes first every repeat, so order effects (caches, clocks) cancel
        if repeat % 2:
            full.append(harvested(model, windows, hooks, n_tokens, args.batch_size))
        bare.append(bare_forward(model, windows, args.batch_size, stop_at))
        if not repeat % 2:
            full.append(harvested(model, windows, hooks, n_tokens, args.batch_size))
        write.append(store_write(n_tokens, model.cfg.d_model * len(hooks), windows))
    tokens_run = windows.numel()
    print(f"model {args.model}, hooks {hooks}, stop_at_layer {stop_at}, {args.batches} batches of {args.batch_size}x{args.ctx}")
    print(f"threads {torch.get_num_threads()}, device {next(model.parameters()).device}, repeats {args.repeats} (alternating, order swapped each repeat)")
    # CPU seconds of this process are far less disturbed by other jobs on a shared machine than wall time.
    for clock, index in (("wall", 0), ("CPU", 1)):
        for name, runs in (("bare forward", bare), ("harvest", full)):
            times = [r[index] for r in runs]
            median = statistics.median(times)
            print(f"{clock:4s} {name:13s} median {median:7.2f} s  {tokens_run / median:8.0f} tok/s  min {min(times):7.2f} s  runs {[round(t, 2) for t in times]}")
        print(f"{clock:4s} store write alone (no model; hashes the data too): median {statistics.median(w[index] for w in write):.3f} s")
        ratios = [f[index] / b[index] for f, b in zip(full, bare)]
        best = min(r[index] for r in full) / min(r[index] for r in bare)
        print(f"{clock:4s} overhead (harvest/bare - 1): median of pairs {100 * (statistics.median(ratios) - 1):+.1f} %, min/min {100 * (best - 1):+.1f} %, per pair {[f'{100 * (r - 1):+.1f}' for r in ratios]}")

if __name__ == "__main__":
    main()
