"""Entry point of the ``interp`` console script: imports every command module, exposes ``app``."""

from __future__ import annotations

import importlib
import pkgutil

import experiments.commands as _commands
from experiments.app import app

for _mod in sorted(m.name for m in pkgutil.iter_modules(_commands.__path__)):
    importlib.import_module(f"{_commands.__name__}.{_mod}")

__all__ = ["app"]

if __name__ == "__main__":
    app()
