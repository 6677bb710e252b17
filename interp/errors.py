"""The one boundary for errors a user can cause.

Library code raises :class:`UserError` with a single line that says what was wrong and what to
do; the CLI prints it on stderr and exits with code 2 (no traceback). Internal invariants stay
``assert``s.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = ["UserError", "suggest"]


class UserError(Exception):
    """A mistake in the user's input (a name, a value, a file), reported as one line."""

    exit_code = 2

    def __init__(self, message: str):
        # One line only: newlines would break the "one line on stderr" contract.
        super().__init__(" ".join(str(message).split()))


def suggest(name: str, options: Iterable[str], n: int = 3) -> str:
    """Return ' (did you mean: a, b?)' for close matches of ``name`` among ``options``, or ''."""
    close = difflib.get_close_matches(name, list(options), n=n, cutoff=0.6)
    return f" (did you mean: {', '.join(close)}?)" if close else ""
