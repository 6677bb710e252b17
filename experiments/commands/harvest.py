"""``interp harvest``: store a model's activations at some hooks over a corpus (crash-safe, resumable).

Text is raw (no chat template): corpus documents are packed into windows of ``--ctx`` tokens, each
starting with BOS, and the BOS positions are not stored.
"""

from __future__ import annotations

from pathlib import Path

import typer

from experiments.app import command, console

__all__ = ["harvest_command", "store_command"]


@command("harvest")
def harvest_command(
    out: Path = typer.Option(..., "--out", help="Store directory; re-running the same command resumes an interrupted harvest."),
    hook: list[str] = typer.Option(..., "--hook", help="Hook to store, e.g. blocks.6.hook_resid_post; repeat for several (one forward pass)."),
    tokens: int = typer.Option(..., "--tokens", help="Number of token positions to store (BOS positions are skipped)."),
    model: str = typer.Option("smollm2-135m", "--model", help="Model name (see `interp models`) or a local Hugging Face directory."),
    corpus: str = typer.Option("default", "--corpus", help="Corpus name (see `interp corpora`) or a .txt/.jsonl/.parquet path."),
    ctx: int = typer.Option(128, "--ctx", help="Context window length in tokens, BOS included."),
    batch_size: int = typer.Option(8, "--batch-size", help="Windows per forward pass."),
    seed: int = typer.Option(0, "--seed", help="Seed of the window shuffle (part of the store's identity)."),
    dtype: str = typer.Option("float32", "--dtype", help="Stored precision: float32, bfloat16 or float16."),
    include_special: bool = typer.Option(False, "--include-special", help="Also store BOS/pad positions."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing store made with a different config."),
    device: str | None = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ... (default: CUDA when available)."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow a local/hub model to run its own Python code (off by default; only for models you trust)."),
    shard_rows: int = typer.Option(2**15, "--shard-rows", help="Rows per shard file (a crash loses at most one shard of work)."),
) -> None:
    """Run the model over corpus windows and store every --hook's activations, one forward pass per batch."""
    from interp.activations import harvest
    from interp.corpus import load_corpus
    from interp.errors import UserError
    from interp.models import load_model

    # Cheap checks first, so a typo does not wait for the model to load.
    if tokens <= 0:
        raise UserError(f"--tokens must be a positive number of tokens to store, got {tokens}")
    text = load_corpus(corpus)
    store = harvest(
        load_model(model, device=device, trust_remote_code=trust_remote_code),
        text,
        hook,
        n_tokens=tokens,
        ctx=ctx,
        batch_size=batch_size,
        out=out,
        dtype=dtype,
        seed=seed,
        overwrite=overwrite,
        include_special=include_special,
        progress=True,
        shard_rows=shard_rows,
        on_status=lambda message: console.print(message, markup=False, highlight=False),
    )
    widths = ", ".join(f"{h} ({store.d_in(h)})" for h in store.hooks)
    console.print(f"store {store.path}: {store.n_tokens:,} tokens x {widths}, {store.n_shards} shard(s), model {store.model}")


@command("store")
def store_command(
    path: Path = typer.Argument(..., help="Activation store directory (from `interp harvest` or ActivationStore.from_tensors)."),
    verify: bool = typer.Option(False, "--verify", help="Check every shard against its sha256 (reads the whole store)."),
) -> None:
    """Describe an activation store: model, hooks and widths, tokens, corpus, completeness."""
    from interp.store import ActivationStore

    store = ActivationStore(path)
    manifest = store.manifest
    corpus = manifest.get("corpus") or {}
    state = "complete" if store.complete else f"unfinished ({store.n_tokens:,} of {manifest.get('target_tokens') or '?'} tokens; re-run the harvest to resume)"
    lines = [
        f"store {store.path}: {state}",
        f"model {store.model}, dtype {manifest['dtype']}, ctx {manifest.get('ctx')}, seed {manifest.get('seed')}",
        f"corpus {corpus.get('name')} ({corpus.get('split')}), {store.n_tokens:,} tokens in {store.n_shards} shard(s)",
        *(f"  {hook}: d_in {store.d_in(hook)}" for hook in store.hooks),
    ]
    for line in lines:
        console.print(line, markup=False, highlight=False)
    if verify:
        store.verify()
        console.print(f"verified {store.n_shards} shard(s): every sha256 matches", markup=False, highlight=False)
