"""Atomic training checkpoints: tensors in safetensors, everything else in JSON, a manifest last.

Layout: ``<run>/checkpoints/step-00000100/`` holds one ``state-rank<R>.safetensors`` per rank that
owns state (rank 0 only, except under ``dist='shard'``) and ``meta.json``, written last by rank 0,
naming each state file with its sha256. A checkpoint counts only when ``meta.json`` exists and
every file it names matches its hash, so a run killed mid-write resumes from the previous one.
Nothing is unpickled: tensors come back through safetensors, the rest through ``json``.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor

from interp.errors import UserError
from interp.files import atomic_write_json, contained_path, save_safetensors_atomic, sha256_file

__all__ = ["Checkpoint", "checkpoint_dir", "write_state", "commit", "latest", "prune", "optimizer_to_flat", "optimizer_from_flat"]

FORMAT = 1


@dataclass
class Checkpoint:
    """A valid checkpoint found on disk."""

    path: Path
    """Its directory."""
    meta: dict
    """The parsed meta.json (step, data position, fingerprint, per-rank metadata)."""

    @property
    def step(self) -> int:
        """Optimizer steps completed when it was written."""
        return int(self.meta["step"])

    def load_rank(self, rank: int) -> tuple[dict[str, Tensor], dict]:
        """Tensors and JSON metadata saved by ``rank``."""
        name = f"state-rank{rank}.safetensors"
        if name not in self.meta["files"]:
            raise UserError(f"checkpoint {self.path} has no state for rank {rank}; resume with the same number of ranks")
        return load_file(self.path / name), self.meta["ranks"][str(rank)]


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    """Directory of the checkpoint taken after ``step`` optimizer steps."""
    return Path(run_dir) / "checkpoints" / f"step-{step:08d}"


def write_state(run_dir: str | Path, step: int, rank: int, tensors: dict[str, Tensor], meta: dict) -> tuple[str, str, dict]:
    """Write one rank's tensors atomically; return ``(file name, sha256, meta)`` for :func:`commit`."""
    path = checkpoint_dir(run_dir, step) / f"state-rank{rank}.safetensors"
    save_safetensors_atomic(path, tensors)
    return path.name, sha256_file(path), meta


def commit(run_dir: str | Path, step: int, fingerprint: str, shared: dict, parts: list[tuple[str, str, dict]]) -> Path:
    """Write ``meta.json`` (the commit marker) naming every rank's file; call after all ranks wrote theirs."""
    directory = checkpoint_dir(run_dir, step)
    meta = {
        "format": FORMAT,
        "step": step,
        "fingerprint": fingerprint,
        **shared,
        "files": {name: digest for name, digest, _ in parts},
        "ranks": {name.removeprefix("state-rank").removesuffix(".safetensors"): m for name, _, m in parts},
    }
    atomic_write_json(directory / "meta.json", meta)
    return directory


def _valid(directory: Path) -> dict | None:
    """The meta of a complete, uncorrupted checkpoint directory, else None."""
    try:
        meta = json.loads((directory / "meta.json").read_text())
        for name, digest in meta["files"].items():
            if sha256_file(contained_path(directory, name)) != digest:
                return None
    except (OSError, ValueError, KeyError, TypeError, UserError):  # UserError: a name escaping the directory
        return None
    return meta


def latest(run_dir: str | Path, fingerprint: str) -> Checkpoint | None:
    """The newest valid checkpoint of this run, or None; one from a different config is refused."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return None
    for directory in sorted(root.glob("step-*"), reverse=True):
        meta = _valid(directory)
        if meta is None:
            continue
        if meta.get("fingerprint") != fingerprint:
            raise UserError(f"checkpoint {directory} was written by a different training config; "
                            "re-run with the same settings, pass --no-resume to start over, or choose another --out")
        return Checkpoint(directory, meta)
    return None


def prune(run_dir: str | Path, keep: int) -> None:
    """Delete all but the ``keep`` newest valid checkpoints, and incomplete ones older than them."""
    root = Path(run_dir) / "checkpoints"
    dirs = sorted(root.glob("step-*"), reverse=True) if root.is_dir() else []
    kept = 0
    for directory in dirs:
        if kept < keep and _valid(directory) is not None:
            kept += 1
        elif kept >= keep:
            shutil.rmtree(directory, ignore_errors=True)


def optimizer_to_flat(optimizer: torch.optim.Optimizer, prefix: str = "adam") -> tuple[dict[str, Tensor], dict]:
    """An optimizer's state as flat tensors (``prefix.<param id>.<name>``) plus its JSON param groups."""
    sd = optimizer.state_dict()
    tensors = {f"{prefix}.{pid}.{name}": value for pid, st in sd["state"].items() for name, value in st.items()
               if isinstance(value, Tensor)}
    return tensors, {"param_groups": sd["param_groups"]}


def optimizer_from_flat(optimizer: torch.optim.Optimizer, tensors: dict[str, Tensor], meta: dict[str, Any],
                        prefix: str = "adam") -> None:
    """Restore an optimizer written by :func:`optimizer_to_flat` (bit-exact)."""
    state: dict[int, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith(prefix + "."):
            pid, name = key[len(prefix) + 1:].split(".", 1)
            state.setdefault(int(pid), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    # Saved tensors come back contiguous; give each state tensor its parameter's memory layout
    # (e.g. the latent-major W_enc), which fused Adam assumes.
    for param, st in optimizer.state.items():
        for name, value in st.items():
            if isinstance(value, Tensor) and value.shape == param.shape and value.stride() != param.stride():
                st[name] = torch.empty_like(param, dtype=value.dtype).copy_(value)
