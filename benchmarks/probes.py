"""Benchmark: the full layer sweep of one task, batched probe fit vs a scikit-learn per-layer loop.

Both fit the same L2 logistic regressions (same standardised features, same train split, the same
penalty grid through ``C = 1/(l2·n_train)``, no early stopping), pick the penalty per layer on the
validation split and report test accuracy; the script prints the wall-clock ratio of every repeat
(the two sides alternate which runs first), the median ratio and the largest per-layer accuracy
difference. Activations are collected once (one forward pass per batch for all layers) and cached
under ``--cache`` (default ``~/.cache/interp/bench-probes``), so a rerun skips the ~230 s collection.

    python benchmarks/probes.py --model smollm2-135m --task sentiment
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Run as a script, this file's directory comes first on sys.path and its name would shadow the
# `probes` package: put the repository root there instead.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [str(_HERE.parent)] + [p for p in sys.path if Path(p or ".").resolve() != _HERE]


def collect(model_name: str, task_name: str, pooling: str | None, cache: Path, device: str | None) -> tuple[torch.Tensor, object, float]:
    """``[layers, items, d]`` activations (cached) and the seconds collection took (0 if cached)."""
    from safetensors.torch import load_file, save_file

    from interp.models import load_model
    from probes.collect import collect_activations, resid_post_hooks
    from probes.tasks import load_task

    task = load_task(task_name)
    path = cache / f"{model_name}-{task_name}-{pooling or task.default_pooling}.safetensors"
    if path.is_file():
        return load_file(str(path))["acts"], task, 0.0
    model = load_model(model_name, device=device)
    hooks = resid_post_hooks(model)
    start = time.perf_counter()
    acts = collect_activations(model, task.texts, hooks, pooling or task.default_pooling, batch_size=32)
    seconds = time.perf_counter() - start
    x = torch.stack([acts[h] for h in hooks])
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"acts": x}, str(path))
    return x, task, seconds


def sklearn_sweep(x: np.ndarray, y: np.ndarray, split, cs: list[float]) -> tuple[list[float], float, float]:
    """Per layer, per C: StandardScaler + LogisticRegression(lbfgs); best C on validation; test accuracy."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    start, cpu = time.perf_counter(), time.process_time()
    accs = []
    for layer in range(x.shape[0]):
        scaler = StandardScaler().fit(x[layer, split.train])
        tr, va, te = (scaler.transform(x[layer, idx]) for idx in (split.train, split.val, split.test))
        best = (-1.0, 0.0)
        for c in cs:
            clf = LogisticRegression(C=c, max_iter=1000).fit(tr, y[split.train])
            best = max(best, (clf.score(va, y[split.val]), clf.score(te, y[split.test])))
        accs.append(best[1])
    return accs, time.perf_counter() - start, time.process_time() - cpu


def batched_sweep(x: torch.Tensor, y: torch.Tensor, split, l2: list[float], device: str) -> tuple[list[float], float, float]:
    """All layers × penalties in one fit_logistic call; best penalty on validation; test accuracy."""
    from probes.fit import fit_logistic
    from probes.metrics import accuracy

    x = x.to(device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start, cpu = time.perf_counter(), time.process_time()
    # The training rows by index: on the CPU the compiled solver gathers them per layer, in cache.
    fit = fit_logistic(x, y[split.train].to(device).float(), l2, rows=split.train.to(device))
    # Every item scored in one batched product, then split (cheaper than gathering the rows first).
    scores = fit.scores(x)
    val = accuracy(scores[..., split.val.to(device)], y[split.val].to(device))
    test = accuracy(scores[..., split.test.to(device)], y[split.test].to(device))
    # Same tie rule as the sklearn loop: highest validation accuracy, then highest test (max over pairs).
    pairs = torch.stack([val, test], -1).cpu().tolist()
    accs = [max(map(tuple, layer))[1] for layer in pairs]
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return accs, time.perf_counter() - start, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--task", default="sentiment")
    parser.add_argument("--pooling", default=None)
    parser.add_argument("--cs", default="0.01,0.1,1,10", help="scikit-learn C grid (our l2 = 1/(C·n_train))")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "interp" / "bench-probes"))
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch and for scikit-learn's BLAS alike")
    args = parser.parse_args()
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(args.threads)
    threadpool_limits(args.threads)

    from probes.metrics import group_split

    x, task, collect_s = collect(args.model, args.task, args.pooling, Path(args.cache), args.device)
    y = torch.tensor(task.labels)
    split = group_split(y, task.groups, seed=0)
    cs = [float(c) for c in args.cs.split(",")]
    l2 = [1.0 / (c * len(split.train)) for c in cs]
    print(f"model {args.model}, task {args.task}: {x.shape[0]} layers × {x.shape[1]} items × d {x.shape[2]}; "
          f"train/val/test {len(split.train)}/{len(split.val)}/{len(split.test)}; C grid {cs}; threads {torch.get_num_threads()}")
    if collect_s:
        print(f"collection (all layers, one pass per batch): {collect_s:.1f} s = {x.shape[1] / collect_s:.1f} items/s")
    x_np = x.double().numpy()
    # One untimed call of each side first: imports, Numba's compiled-code cache, first-touch pages.
    batched_sweep(x, y, split, l2, args.device)
    sklearn_sweep(x_np[:1], y.numpy(), split, cs[:1])
    ratios, cpu_ratios, batched_times, sk_times = [], [], [], []
    for i in range(args.repeats):
        # Alternate which side runs first, so that a load swing on the shared machine hits both.
        if i % 2 == 0:
            ours, t_ours, c_ours = batched_sweep(x, y, split, l2, args.device)
            ref, t_ref, c_ref = sklearn_sweep(x_np, y.numpy(), split, cs)
        else:
            ref, t_ref, c_ref = sklearn_sweep(x_np, y.numpy(), split, cs)
            ours, t_ours, c_ours = batched_sweep(x, y, split, l2, args.device)
        batched_times.append(t_ours)
        sk_times.append(t_ref)
        ratios.append(t_ref / t_ours)
        cpu_ratios.append(c_ref / c_ours)
        # CPU seconds of this process: far less disturbed than wall time when other jobs share the cores.
        print(f"repeat {i + 1}: batched {t_ours:.2f} s ({c_ours:.2f} CPU s), sklearn {t_ref:.2f} s ({c_ref:.2f} CPU s), "
              f"ratio {t_ref / t_ours:.1f}× wall, {c_ref / c_ours:.1f}× CPU", flush=True)
    t_ours, t_ref = float(np.median(batched_times)), float(np.median(sk_times))
    diff = max(abs(a - b) for a, b in zip(ours, ref))
    print("layer  batched  sklearn")
    for layer, (a, b) in enumerate(zip(ours, ref)):
        print(f"{layer:5d}  {a:7.3f}  {b:7.3f}")
    print(f"batched fit ({args.device}): median {t_ours:.2f} s; sklearn loop ({len(cs)} C × {x.shape[0]} layers): median {t_ref:.2f} s; "
          f"median speed-up {float(np.median(ratios)):.1f}× wall (per-repeat {', '.join(f'{r:.1f}' for r in ratios)}), "
          f"{float(np.median(cpu_ratios)):.1f}× CPU time (per-repeat {', '.join(f'{r:.1f}' for r in cpu_ratios)}); "
          f"max |Δ test accuracy| {100 * diff:.1f} points; "
          f"best layer batched {int(np.argmax(ours))} ({max(ours):.3f}), sklearn {int(np.argmax(ref))} ({max(ref):.3f})")


if __name__ == "__main__":
    main()
