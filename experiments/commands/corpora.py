"""``interp corpora``: the registered corpora (licenses, size, offline availability), or one corpus's details."""

from __future__ import annotations

import json

import typer
from rich.table import Table

from experiments.app import command, console


@command("corpora")
def corpora(
    show: str = typer.Option(None, "--show", help="Describe one corpus (a registered name or a .txt/.jsonl/.parquet path) instead of listing."),
    split: str = typer.Option("train", "--split", help="Split to describe with --show: train, eval or all."),
    tokens: bool = typer.Option(False, "--tokens", help="With --show, also count tokens with the default model's tokenizer (cached)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """List the corpora usable offline (``default`` is built into the cache on first use, about a minute)."""
    from interp.corpus import list_corpora

    if show is not None:
        _show(show, split, tokens, as_json)
        return
    rows = list_corpora()
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table(title="corpora")
    for column in ("name", "offline", "tokens", "licenses", "description"):
        table.add_column(column, overflow="fold")
    for row in rows:
        offline = "yes" if row["offline_available"] else "no"
        table.add_row(row["name"], offline, f"≈{row['approx_tokens']}", "; ".join(row["licenses"]), row["description"])
    console.print(table)
    console.print("Also: a local .txt (blank-line separated), .jsonl ('text' field) or .parquet ('text' column) file, or hf:owner/name when online.")


def _show(name: str, split: str, tokens: bool, as_json: bool) -> None:
    """Print the sources, licenses, document count and (optionally) token count of one corpus split."""
    from interp.corpus import load_corpus

    corpus = load_corpus(name, split)
    info = {"name": corpus.name, "split": corpus.split, "fingerprint": corpus.fingerprint, "sources": corpus.sources}
    if not corpus.name.startswith("hf:"):
        texts = list(corpus.documents())
        info |= {"n_documents": len(texts), "n_chars": sum(map(len, texts))}
    if tokens:
        from interp.models import load_tokenizer
        from interp.packing import token_stream

        stream, _ = token_stream(load_tokenizer(), corpus)
        info["n_tokens"] = len(stream)
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    console.print(f"[bold]{corpus.name}[/bold] ({corpus.split}), fingerprint {corpus.fingerprint[:16]}")
    for key in ("n_documents", "n_chars", "n_tokens"):
        if key in info:
            console.print(f"  {key.removeprefix('n_')}: {info[key]:,}")
    table = Table(title="sources")
    for column in ("name", "version", "license", "docs (all splits)", "url"):
        table.add_column(column, overflow="fold")
    for source in corpus.sources:
        table.add_row(source["name"], str(source.get("version", "")), source["license"], f"{source.get('n_documents', '')}", source.get("url", ""))
    console.print(table)
