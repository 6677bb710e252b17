"""A probe layer sweep: collect once, fit every layer × label set × penalty in one batched call.

The label sets are the task, its control task and a shuffled-label baseline, so the hygiene
numbers cost one more column in the same solve. The penalty of each layer is chosen on the
validation split (the best layer too); reported metrics are on the held-out test split.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from einops import rearrange, repeat
from torch import Tensor

from probes.artefacts import LinearProbe, save_probe
from probes.collect import collect_activations, resid_post_hooks
from probes.fit import fit_logistic, fit_mass_mean
from probes.metrics import Split, accuracy, auroc, balanced_accuracy, control_labels, f1_score, group_split, shuffled_labels
from probes.tasks import ProbeTask, load_task

__all__ = ["ProbeConfig", "ProbeReport", "run_probe"]


@dataclass
class ProbeConfig:
    """Settings of a probe sweep (the same object drives the library call and the CLI)."""

    layers: list[int] | None = None
    """Layers whose ``hook_resid_post`` is probed; None = all."""
    pooling: str | None = None
    """``last``, ``mean`` or ``marked``; None = the task's default."""
    l2: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1)
    """L2 penalties tried (on standardised features; scikit-learn C = 1/(l2·n_train))."""
    l1: float = 0.0
    """L1 penalty (proximal solver) added to every fit; 0 = none."""
    early_stopping: bool = True
    """Keep the iterate with the lowest validation loss."""
    fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)
    """Train/validation/test fractions (whole groups go to one split)."""
    seed: int = 0
    """Seed of the split, the control task and the shuffled baseline."""
    batch_size: int = 16
    """Items per forward pass while collecting activations."""


@dataclass
class ProbeReport:
    """Everything a sweep produced: per-layer metrics, the probes and the split."""

    metrics: dict[str, Any]
    """The content of ``metrics.json``: per-layer rows and the best layer."""
    probes: dict[int, LinearProbe]
    """Logistic-regression probe per layer."""
    mass_mean: dict[int, LinearProbe]
    """Difference-of-means probe per layer."""
    split: Split
    """Item indices of train/validation/test."""
    files: list[Path] = field(default_factory=list)
    """Files written under ``out``."""


def _cache_key(model: Any, name: str, task: ProbeTask, hooks: list[str], pooling: str) -> str:
    """Hash of the model (name and a strided sample of every weight), the items, hooks and pooling."""
    digest = hashlib.sha256(json.dumps([name, task.texts, hooks, pooling]).encode())
    with torch.no_grad():
        for param in model.parameters():
            digest.update(param.detach().reshape(-1)[::997].float().cpu().numpy().tobytes())
    return digest.hexdigest()


def _activations(model: Any, task: ProbeTask, hooks: list[str], pooling: str, config: ProbeConfig, out: Path | None, progress: bool) -> Tensor:
    """``[layers, items, d]`` activations, reused from ``out/activations.safetensors`` when it matches."""
    from safetensors import safe_open

    from interp.files import save_safetensors_atomic
    from interp.models import model_name

    key = _cache_key(model, model_name(model), task, hooks, pooling)
    cache = out / "activations.safetensors" if out is not None else None
    if cache is not None and cache.is_file():
        try:
            with safe_open(str(cache), "pt") as fh:
                if (fh.metadata() or {}).get("key") == key:
                    return fh.get_tensor("acts")
        except Exception:  # noqa: BLE001 - an unreadable cache is recomputed, never trusted
            pass
    acts = collect_activations(model, task.texts, hooks, pooling, batch_size=config.batch_size, progress=progress)
    stacked = torch.stack([acts[h] for h in hooks])
    if cache is not None:
        save_safetensors_atomic(cache, {"acts": stacked}, metadata={"key": key})
    return stacked


def run_probe(model: Any, task: ProbeTask | str, config: ProbeConfig | None = None, out: str | os.PathLike | None = None, progress: bool = True) -> ProbeReport:
    """Probe every requested layer for ``task``; with ``out``, write metrics.json, the plot and probes."""
    from interp.models import model_name

    config = config or ProbeConfig()
    task = load_task(task) if isinstance(task, str) else task
    task.check()
    pooling = config.pooling or task.default_pooling
    layers = list(range(model.cfg.n_layers)) if config.layers is None else list(config.layers)
    hooks = resid_post_hooks(model, layers)
    out_dir = Path(out) if out is not None else None
    x = _activations(model, task, hooks, pooling, config, out_dir, progress)
    device = next(model.parameters()).device
    x = x.to(device)
    labels = torch.tensor(task.labels, dtype=torch.long)
    split = group_split(labels, task.groups, config.fractions, config.seed)
    label_sets = torch.stack([labels, control_labels(task.types(), config.seed), shuffled_labels(labels, config.seed)])
    n_layers = len(layers)
    # The label sets share the features, so they are extra columns of the same solve.
    x_val = x[:, split.val.to(device)]
    y_train = repeat(label_sets[:, split.train], "s n -> l s n", l=n_layers).to(device).float()
    y_val = repeat(label_sets[:, split.val], "s n -> l s n", l=n_layers).to(device).float()
    fit = fit_logistic(x, y_train, list(config.l2), l1=config.l1, x_val=x_val, y_val=y_val, early_stopping=config.early_stopping,
                       rows=split.train.to(device))
    val_acc = accuracy(fit.scores(x_val), y_val[:, :, None, :])
    # Highest validation accuracy of the task probe; ties go to the stronger penalty.
    n_r = len(config.l2)
    tie_break = torch.arange(n_r, device=device) * 1e-6
    chosen = (val_acc[:, 0] + tie_break).argmax(-1)
    x_test = x[:, split.test.to(device)]
    y_test = label_sets[:, split.test].to(device)
    pick = torch.arange(n_layers, device=device)
    w_best, b_best = fit.weight[pick, :, chosen], fit.bias[pick, :, chosen]
    test_scores = torch.einsum("lnd,lsd->sln", x_test, w_best) + rearrange(b_best, "l s -> s l 1")
    mass = fit_mass_mean(x[:, split.train.to(device)], labels[split.train].to(device).float())
    mass_scores = mass.scores(x_test)

    def metric(fn, scores: Tensor, y: Tensor) -> list[float]:
        return [float(v) for v in fn(scores, y)]

    task_y = y_test[0]
    acc = metric(accuracy, test_scores[0], task_y)
    control_acc = metric(accuracy, test_scores[1], y_test[1])
    rows = []
    for i, layer in enumerate(layers):
        rows.append(
            {
                "layer": layer,
                "hook": hooks[i],
                "accuracy": acc[i],
                "balanced_accuracy": float(balanced_accuracy(test_scores[0, i], task_y)),
                "auroc": float(auroc(test_scores[0, i], task_y)),
                "f1": float(f1_score(test_scores[0, i], task_y)),
                "control_accuracy": control_acc[i],
                "selectivity": acc[i] - control_acc[i],
                "shuffled_accuracy": float(accuracy(test_scores[2, i], y_test[2])),
                "mass_mean_accuracy": float(accuracy(mass_scores[i], task_y)),
                "mass_mean_auroc": float(auroc(mass_scores[i], task_y)),
                "l2": float(config.l2[int(chosen[i])]),
                "val_accuracy": float(val_acc[i, 0, chosen[i]]),
                "iterations": int(fit.n_iter[i, 0, chosen[i]]),
            }
        )
    best = max(rows, key=lambda r: (r["val_accuracy"], -r["layer"]))
    name = model_name(model)
    metrics = {
        "model": name,
        "task": task.name,
        "task_license": task.license,
        "pooling": pooling,
        "n_items": len(task),
        "split": {"train": len(split.train), "val": len(split.val), "test": len(split.test), "seed": config.seed},
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(config).items()},
        "layers": rows,
        "best_layer": {"layer": best["layer"], "hook": best["hook"], "accuracy": best["accuracy"], "auroc": best["auroc"],
                       "selectivity": best["selectivity"], "chosen_by": "validation accuracy"},
    }
    common = {"model": name, "task": task.name, "pooling": pooling, "label_names": task.label_names}
    probes = {layer: LinearProbe(weight=w_best[i, 0].cpu(), bias=float(b_best[i, 0]), hook_name=hooks[i], method="logreg",
                                 info={"layer": layer, "l2": rows[i]["l2"], "test_accuracy": rows[i]["accuracy"], "test_auroc": rows[i]["auroc"]}, **common)
              for i, layer in enumerate(layers)}
    mass_mean = {layer: LinearProbe(weight=mass.weight[i].cpu(), bias=float(mass.bias[i]), hook_name=hooks[i], method="mass_mean",
                                    info={"layer": layer, "test_accuracy": rows[i]["mass_mean_accuracy"], "test_auroc": rows[i]["mass_mean_auroc"]}, **common)
                 for i, layer in enumerate(layers)}
    report = ProbeReport(metrics=metrics, probes=probes, mass_mean=mass_mean, split=split)
    if out_dir is not None:
        report.files = _write(report, out_dir)
    return report


def _write(report: ProbeReport, out: Path) -> list[Path]:
    """metrics.json, the layer curve (HTML, PNG when matplotlib is installed) and every probe."""
    from interp.files import atomic_write_json
    from probes.plot import plot_layer_curve

    files = []
    for layer, probe in report.probes.items():
        files.append(save_probe(probe, out / "probes" / f"layer_{layer:02d}_logreg"))
        files.append(save_probe(report.mass_mean[layer], out / "probes" / f"layer_{layer:02d}_mass_mean"))
    files.extend(plot_layer_curve(report.metrics, out / "layer_curve.html", out / "layer_curve.png"))
    files.append(atomic_write_json(out / "metrics.json", report.metrics))
    return files
