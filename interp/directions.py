"""The direction artefact: one vector at one hook, written by probes/CAA and read by steering.

On disk: a directory with ``vector.safetensors`` (key ``vector``, shape ``[d_model]``) and
``cfg.json`` (``hook_name``, ``model``, ``norm``, ``source``, ``format_version`` and free-form
``extra``).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from interp.errors import UserError
from interp.files import atomic_write_json, save_safetensors_atomic

__all__ = ["Direction", "save_direction", "load_direction", "DIRECTION_FORMAT_VERSION"]

DIRECTION_FORMAT_VERSION = 1
_REQUIRED = ("hook_name", "model", "norm", "source", "format_version")


@dataclass
class Direction:
    """A vector in a model's activation space at ``hook_name``."""

    vector: Tensor
    """The direction, shape ``[d_model]`` (not necessarily unit norm; ``norm`` records its norm)."""
    hook_name: str
    """Hook the vector lives at, e.g. ``blocks.10.hook_resid_post``."""
    model: str
    """Name of the model it was computed on."""
    source: str
    """How it was made: ``probe:logreg``, ``mass_mean``, ``caa``, ``sae:<dir>#<feature>``..."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form provenance (task, layer, accuracy, ...)."""

    @property
    def norm(self) -> float:
        return float(self.vector.float().norm())

    @property
    def unit(self) -> Tensor:
        return self.vector / self.vector.norm().clamp_min(1e-12)


def save_direction(direction: Direction, path: str | os.PathLike) -> Path:
    """Write ``direction`` to the directory ``path`` (atomically, file by file)."""
    path = Path(path)
    vec = direction.vector.detach().float().reshape(-1)
    if not torch.isfinite(vec).all():
        raise UserError(f"direction for {direction.hook_name} contains NaN or Inf; recompute it from finite activations")
    save_safetensors_atomic(path / "vector.safetensors", {"vector": vec})
    cfg = {
        "hook_name": direction.hook_name,
        "model": direction.model,
        "norm": float(vec.norm()),
        "source": direction.source,
        "format_version": DIRECTION_FORMAT_VERSION,
        "d_model": int(vec.numel()),
        "extra": direction.extra,
    }
    atomic_write_json(path / "cfg.json", cfg)
    return path


def load_direction(path: str | os.PathLike) -> Direction:
    """Read a direction directory written by :func:`save_direction` (safetensors only, no pickle)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    cfg_path, vec_path = path / "cfg.json", path / "vector.safetensors"
    if not path.is_dir() or not cfg_path.is_file() or not vec_path.is_file():
        raise UserError(f"{path} is not a direction directory (needs cfg.json and vector.safetensors); pass a directory written by save_direction or a probe run")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{cfg_path} is not valid JSON ({err}); re-create the direction") from err
    missing = [k for k in _REQUIRED if k not in cfg]
    if missing:
        raise UserError(f"{cfg_path} lacks {', '.join(missing)}; re-create the direction with save_direction")
    if cfg["format_version"] > DIRECTION_FORMAT_VERSION:
        raise UserError(f"{path} has direction format {cfg['format_version']}, newer than this version understands ({DIRECTION_FORMAT_VERSION}); upgrade interp-workbench")
    try:
        vec = load_file(str(vec_path))["vector"]
    except (SafetensorError, KeyError, OSError) as err:
        raise UserError(f"{vec_path} is corrupted or lacks the 'vector' tensor ({err}); re-create the direction") from err
    if not math.isclose(float(vec.norm()), float(cfg["norm"]), rel_tol=1e-4, abs_tol=1e-6):
        raise UserError(f"{path}: the stored norm does not match the vector; the files are inconsistent, re-create the direction")
    return Direction(vector=vec, hook_name=cfg["hook_name"], model=cfg["model"], source=cfg["source"], extra=cfg.get("extra", {}))
