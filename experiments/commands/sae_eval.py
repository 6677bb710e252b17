"""``interp eval-sae``, ``interp dashboard`` and ``interp features stats|search``: look at a trained SAE.

Metrics and feature scans run on the corpus's held-out ``eval`` split by default.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer
from rich.table import Table
from rich.text import Text

from experiments.app import app, command, console
from interp.errors import UserError

__all__ = ["eval_sae_command", "dashboard_command", "features_app"]

features_app = typer.Typer(help="Per-feature statistics and feature search for a trained SAE.", no_args_is_help=True)
app.add_typer(features_app, name="features")

_SAE = typer.Option(..., "--sae", help="SAE directory (cfg.json + sae_weights.safetensors).")
_MODEL = typer.Option(None, "--model", help="Model name or directory (default: the model recorded in the SAE's cfg.json).")
_CORPUS = typer.Option("default", "--corpus", help="Corpus name or .txt/.jsonl/.parquet path; its held-out eval split is used.")
_CTX = typer.Option(128, "--ctx", help="Context window length in tokens, BOS included.")
_BATCH = typer.Option(8, "--batch-size", help="Windows per forward pass.")
_DEVICE = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ... (default: CUDA when available).")
_TRUST = typer.Option(False, "--trust-remote-code", help="Allow a local/hub model to run its own Python code (off by default; only for models you trust).")


def _features_command(name: str) -> Callable[[Callable], Callable]:
    """A ``features`` sub-command behind the same one-line error boundary as every command."""
    return command(name, on=features_app, interrupted="interrupted: nothing was written; re-run the command")


def _load(sae_dir: Path, model: str | None, device: str | None, trust_remote_code: bool = False) -> tuple[Any, Any]:
    from interp.models import load_model
    from saes.io import load

    sae = load(sae_dir)
    name = model or getattr(sae, "model", "") or "smollm2-135m"
    loaded = load_model(name, device=device, trust_remote_code=trust_remote_code)
    return sae.to(next(loaded.parameters()).device), loaded


def _positive(value: int, flag: str) -> int:
    if value <= 0:
        raise UserError(f"{flag} must be a positive number, got {value}")
    return value


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


@command("eval-sae")
def eval_sae_command(
    sae: Path = _SAE,
    model: str | None = _MODEL,
    tokens: int = typer.Option(65_536, "--tokens", help="Held-out tokens to evaluate on (non-special positions)."),
    corpus: str = _CORPUS,
    store: Path | None = typer.Option(None, "--store", help="Evaluate on this activation store's rows instead of a corpus."),
    ctx: int = _CTX,
    batch_size: int = _BATCH,
    ce: bool = typer.Option(True, "--ce/--no-ce", help="Also compute the CE-loss terms (3 forward passes per batch)."),
    dense_threshold: float = typer.Option(0.1, "--dense-threshold", help="A latent firing on more than this share of tokens counts as dense."),
    out: Path | None = typer.Option(None, "--out", help="Where to write the metrics JSON (default: eval.json in the SAE directory)."),
    device: str | None = _DEVICE,
    trust_remote_code: bool = _TRUST,
) -> None:
    """Reconstruction, sparsity, density and CE-loss metrics of an SAE; writes eval.json beside it."""
    from interp.store import ActivationStore
    from saes.evaluation import EVAL_FILE, evaluate

    _positive(tokens, "--tokens")
    sae_model, loaded = _load(sae, model, device, trust_remote_code)
    source = ActivationStore(store) if store is not None else corpus
    target = out or sae / EVAL_FILE
    result = evaluate(sae_model, loaded, source, n_tokens=tokens, ctx=ctx, batch_size=batch_size, dense_threshold=dense_threshold, ce=ce, out=target)
    table = Table(title=f"{result['hook_name']} · {result['model']} · {result['n_tokens']:,} tokens from {result['source']}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in ("l0", "fvu", "explained_variance", "normalized_mse", "mse", "dead_fraction", "dense_fraction",
                "ce_loss_clean", "ce_loss_spliced", "ce_loss_zero_ablated", "ce_loss_recovered", "kl_clean_spliced"):
        if key in result:
            table.add_row(key, _fmt(result[key]))
    console.print(table)
    console.print(f"wrote {target}", markup=False, highlight=False)


def _parse_features(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserError(f"--features must be comma-separated latent indices such as 1,2,3 (got {text!r})") from None


@command("dashboard")
def dashboard_command(
    sae: Path = _SAE,
    out: Path = typer.Option(..., "--out", help="HTML file to write (self-contained, opens offline)."),
    model: str | None = _MODEL,
    features: str | None = typer.Option(None, "--features", help="Comma-separated latent indices, e.g. 1,2,3 (default: a random sample of live latents)."),
    n_features: int = typer.Option(32, "--n-features", help="How many live latents to sample when --features is not given."),
    tokens: int = typer.Option(32_768, "--tokens", help="Tokens to scan for statistics and top contexts."),
    top_k: int = typer.Option(10, "--top-k", help="Top-activating contexts per feature."),
    corpus: str = _CORPUS,
    ctx: int = _CTX,
    batch_size: int = _BATCH,
    seed: int = typer.Option(0, "--seed", help="Seed of the window shuffle and of the feature sample."),
    device: str | None = _DEVICE,
    trust_remote_code: bool = _TRUST,
) -> None:
    """Scan held-out text and write one offline HTML page of feature panels."""
    from saes.dashboard import build_dashboard

    _positive(tokens, "--tokens")
    wanted = _parse_features(features)
    sae_model, loaded = _load(sae, model, device, trust_remote_code)
    dash = build_dashboard(sae_model, loaded, corpus, features=wanted, n_tokens=tokens, n_features=n_features, ctx=ctx, batch_size=batch_size, top_k=top_k, seed=seed)
    path = dash.save(out)
    console.print(f"wrote {path} ({len(dash.data['features'])} features, {path.stat().st_size / 1e6:.1f} MB)", markup=False, highlight=False)


@_features_command("stats")
def stats_command(
    sae: Path = _SAE,
    model: str | None = _MODEL,
    tokens: int = typer.Option(262_144, "--tokens", help="Tokens to scan."),
    corpus: str = _CORPUS,
    ctx: int = _CTX,
    batch_size: int = _BATCH,
    device: str | None = _DEVICE,
    trust_remote_code: bool = _TRUST,
) -> None:
    """Stream max activation, mean-when-active and firing frequency per latent into feature_stats.safetensors."""
    from saes.features import save_feature_stats, scan_features

    _positive(tokens, "--tokens")
    sae_model, loaded = _load(sae, model, device, trust_remote_code)
    scan = scan_features(sae_model, loaded, corpus, n_tokens=tokens, ctx=ctx, batch_size=batch_size, top_k=0)
    path = save_feature_stats(scan, sae)
    dead = float((scan.frequency == 0).float().mean())
    console.print(f"wrote {path}: {scan.n_tokens:,} tokens, {dead:.2%} of latents never fired", markup=False, highlight=False)


@_features_command("search")
def search_command(
    sae: Path = _SAE,
    query: str | None = typer.Option(None, "--query", help="Word or phrase whose tokens the features should fire on."),
    example: list[str] = typer.Option([], "--example", help="Example text (repeatable); with --query only its occurrences count."),
    model: str | None = _MODEL,
    corpus: str = typer.Option("default", "--corpus", help="Baseline corpus (eval split)."),
    tokens: int = typer.Option(32_768, "--tokens", help="Baseline tokens."),
    min_count: int = typer.Option(3, "--min-count", help="Rank only latents firing on at least this many matching tokens."),
    top: int = typer.Option(10, "--top", help="How many features to show."),
    ctx: int = _CTX,
    batch_size: int = _BATCH,
    device: str | None = _DEVICE,
    trust_remote_code: bool = _TRUST,
) -> None:
    """Rank features by log-odds of firing on the query's tokens vs a baseline corpus."""
    from saes.search import search_features

    _positive(tokens, "--tokens")
    sae_model, loaded = _load(sae, model, device, trust_remote_code)
    results = search_features(sae_model, loaded, query=query, examples=example or None, baseline=corpus, n_baseline_tokens=tokens, ctx=ctx, batch_size=batch_size, min_count=min_count, top=top)
    table = Table(title=f"features for {query or 'the examples'!r} (score = log-odds of firing vs baseline)")
    for column in ("feature", "score", "fires (match)", "fires (baseline)", "mean act", "example"):
        table.add_column(column, justify="left" if column == "example" else "right")
    for r in results:
        table.add_row(str(r["feature"]), f"{r['score']:.2f}", f"{r['matching_fires']}/{r['matching_tokens']}",
                      f"{r['baseline_fires']}/{r['baseline_tokens']}", f"{r['mean_activation']:.3g}", Text(r["example"][-60:]))
    console.print(table)
