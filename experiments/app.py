"""The typer application and the user-error boundary every CLI command goes through.

Commands live one module per area in ``experiments/commands/`` and register themselves with
``@command()``; :mod:`experiments.cli` imports them all.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

import typer
from rich.console import Console

from interp.errors import UserError

__all__ = ["app", "command", "console", "err_console", "fail"]

app = typer.Typer(
    name="interp",
    help="Mechanistic-interpretability workbench: models, activations, SAEs, probes, steering. Offline by default.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)


def fail(message: str) -> typer.Exit:
    """Print ``error: message`` as one line on stderr and return the exit to raise (code 2)."""
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
    return typer.Exit(code=2)


def command(*args: Any, **kwargs: Any) -> Callable[[Callable], Callable]:
    """``@app.command`` that turns UserError (and Ctrl-C) into one line and an exit code."""

    def register(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*a: Any, **kw: Any) -> Any:
            try:
                return fn(*a, **kw)
            except UserError as err:
                raise fail(str(err)) from None
            except KeyboardInterrupt:
                print("interrupted: re-run the same command to resume where it stopped", file=sys.stderr)
                raise typer.Exit(code=130) from None

        app.command(*args, **kwargs)(wrapper)
        return fn

    return register
