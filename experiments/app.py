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
from typer.core import TyperGroup

try:  # typer >= 0.24 vendors click; Abort is typer.Abort either way
    from typer._click.exceptions import UsageError
except ImportError:  # pragma: no cover - older typer with the click package
    from click.exceptions import UsageError

from interp.errors import UserError

__all__ = ["app", "command", "console", "err_console", "fail"]


class _OneLineErrors(TyperGroup):
    """Click usage errors (a wrong type, a missing option) as one ``error:`` line and exit 2, not a box."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except UsageError as err:
            where = f" (see `{err.ctx.command_path} --help`)" if err.ctx is not None else ""
            raise SystemExit(fail(f"{err.format_message()}{where}").exit_code) from None
        except typer.Abort:
            print("interrupted", file=sys.stderr)
            raise SystemExit(130) from None
        raise SystemExit(code if isinstance(code, int) else 0)


app = typer.Typer(
    name="interp",
    cls=_OneLineErrors,
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


_RESUME_HINT = "interrupted: re-run the same command to resume where it stopped"


def command(*args: Any, on: typer.Typer | None = None, interrupted: str = _RESUME_HINT, **kwargs: Any) -> Callable[[Callable], Callable]:
    """``@app.command`` (or ``on.command`` for a sub-app) that turns UserError and Ctrl-C into one line and an exit code."""

    def register(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*a: Any, **kw: Any) -> Any:
            try:
                return fn(*a, **kw)
            except UserError as err:
                raise fail(str(err)) from None
            except KeyboardInterrupt:
                print(interrupted, file=sys.stderr)
                raise typer.Exit(code=130) from None

        (on or app).command(*args, **kwargs)(wrapper)
        return fn

    return register
