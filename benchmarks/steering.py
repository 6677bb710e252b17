"""Steered vs unsteered generation throughput on the same prompts, alternating in the same run.

    python benchmarks/steering.py [--model smollm2-135m] [--hook blocks.15.hook_resid_post] \
        [--sae DIR] [--n-latents 4096] [--k 32] [--prompts 8] [--max-new-tokens 32] [--repeats 3]

Four settings generate greedily from the same prompts with the same batch: unsteered, a TopK
SAE feature clamp (error term kept, all positions), a vector addition, and the clamp restricted
to generated tokens. Without ``--sae`` a random-weight TopK SAE of the given size stands in
(encode cost does not depend on the weights). Settings alternate within each repeat, so a busy
machine slows them alike; read the ratios, not the absolute figures. Reported: the fastest
repeat by wall clock and by this process's CPU time (the latter is robust to time-slicing).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import interp
from interp.steering_eval import load_steering_prompts


def timed(model, prompts: list[str], interventions: list, max_new_tokens: int, batch_size: int) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds of this process, generated tokens) for one greedy generation."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = interp.generate(model, prompts, interventions, max_new_tokens=max_new_tokens, temperature=0, batch_size=batch_size, stop_at_eos=False)
    return time.perf_counter() - wall, time.process_time() - cpu, sum(len(t) for t in out.tokens)


def main() -> None:
    """Parse flags, run the alternating measurement, print a table of tokens/s and overheads."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--hook", default="blocks.15.hook_resid_post")
    parser.add_argument("--sae", default=None, help="a trained SAE directory (default: a random TopK SAE)")
    parser.add_argument("--n-latents", type=int, default=4096)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import saes

    model = interp.load_model(args.model)
    if args.sae:
        sae = saes.load(args.sae, device=model.cfg.device)
    else:
        sae = saes.TopKSAE(model.cfg.d_model, args.n_latents, args.k, hook_name=args.hook).to(model.cfg.device)
    prompts = load_steering_prompts()[: args.prompts]
    vector = torch.randn(model.cfg.d_model)
    settings = {
        "unsteered": [],
        "clamp (all positions)": [interp.Clamp(sae, [0], 5.0)],
        "add vector": [interp.Add(sae.hook_name, vector, 8.0)],
        "clamp (generated only)": [interp.Clamp(sae, [0], 5.0, positions="generated")],
    }
    timed(model, prompts[:2], [], 4, args.batch_size)  # warm-up
    wall: dict[str, list[float]] = {name: [] for name in settings}
    cpu: dict[str, list[float]] = {name: [] for name in settings}
    tokens: dict[str, int] = {}
    for _ in range(args.repeats):
        for name, ivs in settings.items():
            w, c, n = timed(model, prompts, ivs, args.max_new_tokens, args.batch_size)
            wall[name].append(w)
            cpu[name].append(c)
            tokens[name] = n
    # The fastest repeat is the least disturbed by other processes on a shared machine.
    base_wall, base_cpu = min(wall["unsteered"]) / tokens["unsteered"], min(cpu["unsteered"]) / tokens["unsteered"]
    print(f"model {args.model}, hook {sae.hook_name}, SAE {sae.W_dec.shape[0]} latents k={args.k}, {len(prompts)} prompts x {args.max_new_tokens} tokens, batch {args.batch_size}, {args.repeats} repeats, torch threads {torch.get_num_threads()}")
    print(f"{'setting':<26}{'tok/s wall':>12}{'overhead':>10}{'tok/s CPU':>12}{'overhead':>10}{'median wall':>13}")
    for name in settings:
        w, c = min(wall[name]) / tokens[name], min(cpu[name]) / tokens[name]
        print(f"{name:<26}{1 / w:>12.1f}{w / base_wall - 1:>+10.1%}{1 / c:>12.1f}{c / base_cpu - 1:>+10.1%}{statistics.median(wall[name]):>12.1f}s")


if __name__ == "__main__":
    main()
