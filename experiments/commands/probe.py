"""``interp probe``: a linear-probe layer sweep of one task; ``interp probe-tasks`` lists the tasks."""

from __future__ import annotations

from pathlib import Path

import typer

from experiments.app import command, console
from interp.errors import UserError

__all__ = ["probe", "probe_tasks"]


def _parse_layers(text: str) -> list[int] | None:
    """``all`` -> None; ``0,5,10`` -> [0, 5, 10]."""
    if text.strip().lower() == "all":
        return None
    try:
        layers = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserError(f"--layers {text!r} is not 'all' or a comma-separated list of layer indices such as 0,5,10") from None
    if not layers:
        raise UserError("--layers is empty; pass 'all' or indices such as 0,5,10")
    if len(set(layers)) != len(layers):
        raise UserError(f"--layers {text!r} repeats a layer; list each layer once")
    return layers


def _parse_floats(text: str, flag: str) -> tuple[float, ...]:
    try:
        values = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise UserError(f"{flag} {text!r} is not a comma-separated list of numbers such as 1e-3,1e-2") from None
    if not values or any(v < 0 for v in values):
        raise UserError(f"{flag} needs one or more non-negative numbers, got {text!r}")
    return values


@command("probe")
def probe(
    task: str = typer.Option(..., "--task", help="Shipped task name (see `interp probe-tasks`) or a .csv/.jsonl file with columns text,label[,group]."),
    out: Path = typer.Option(..., "--out", help="Directory for metrics.json, layer_curve.html/.png and probes/."),
    model: str = typer.Option("smollm2-135m", "--model", help="Model name or local directory."),
    layers: str = typer.Option("all", "--layers", help="'all' or comma-separated layer indices, e.g. 0,5,10."),
    pooling: str = typer.Option(None, "--pooling", help="last, mean or marked (default: the task's own)."),
    l2: str = typer.Option("1e-4,1e-3,1e-2,1e-1", "--l2", help="L2 penalties to try (sklearn C = 1/(l2*n_train))."),
    l1: float = typer.Option(0.0, "--l1", help="L1 penalty added to every probe (0 = none)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the split, control task and shuffled baseline."),
    batch_size: int = typer.Option(16, "--batch-size", help="Items per forward pass."),
    early_stopping: bool = typer.Option(True, "--early-stopping/--no-early-stopping", help="Keep the iterate with the best validation loss."),
    device: str = typer.Option(None, "--device", help="cpu or cuda (default: cuda when available)."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow a local/hub model to run its own Python code (off by default; only for models you trust)."),
) -> None:
    """Fit linear probes on every requested layer at once; write per-layer metrics, the plot and probes."""
    from interp.models import load_model
    from probes.collect import POOLINGS, resid_post_hooks
    from probes.sweep import ProbeConfig, run_probe
    from probes.tasks import load_task

    layer_list = _parse_layers(layers)
    l2_values = _parse_floats(l2, "--l2")
    if l1 < 0:
        raise UserError(f"--l1 must be non-negative, got {l1}")
    if pooling is not None and pooling not in POOLINGS:
        raise UserError(f"unknown --pooling {pooling!r}; use one of {', '.join(POOLINGS)}")
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; pass a directory")
    probe_task = load_task(task)
    probe_task.check()
    bridge = load_model(model, device=device, trust_remote_code=trust_remote_code)
    resid_post_hooks(bridge, layer_list)
    config = ProbeConfig(layers=layer_list, pooling=pooling, l2=l2_values, l1=l1, early_stopping=early_stopping, seed=seed, batch_size=batch_size)
    report = run_probe(bridge, probe_task, config, out=out)
    from rich.table import Table

    table = Table(title=f"{probe_task.name} on {model} ({report.metrics['pooling']} pooling), test split")
    for column in ("layer", "accuracy", "AUROC", "selectivity", "mass-mean acc", "shuffled acc"):
        table.add_column(column, justify="right")
    for row in report.metrics["layers"]:
        table.add_row(str(row["layer"]), f"{row['accuracy']:.3f}", f"{row['auroc']:.3f}", f"{row['selectivity']:+.3f}",
                      f"{row['mass_mean_accuracy']:.3f}", f"{row['shuffled_accuracy']:.3f}")
    console.print(table)
    best = report.metrics["best_layer"]
    console.print(f"best layer (validation): {best['layer']}  test accuracy {best['accuracy']:.3f}  AUROC {best['auroc']:.3f}")
    console.print(f"wrote {out / 'metrics.json'}, {out / 'layer_curve.html'} and {len(report.probes) * 2} probes under {out / 'probes'}")


@command("probe-tasks")
def probe_tasks() -> None:
    """List the shipped probing tasks (items, groups, license, default pooling)."""
    from rich.table import Table

    from probes.tasks import list_tasks

    table = Table(title="probing tasks")
    for column in ("name", "items", "groups", "pooling", "description", "license"):
        table.add_column(column)
    for row in list_tasks():
        table.add_row(row["name"], str(row["items"]), str(row["groups"]), row["pooling"], row["description"], row["license"])
    console.print(table)
