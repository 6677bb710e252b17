"""Saving and loading probes as direction artefacts, so steering can add or ablate them directly.

A probe directory IS an ``interp`` direction directory (``vector.safetensors`` + ``cfg.json``):
the vector is the probe weight in the raw activation space, and ``cfg.json``'s ``extra`` holds
the bias, the method, the task and the metrics. ``interp.load_direction`` reads it unchanged.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from interp.directions import Direction, load_direction, save_direction
from interp.errors import UserError

__all__ = ["LinearProbe", "save_probe", "load_probe", "PROBE_METHODS"]

PROBE_METHODS = ("logreg", "mass_mean", "sparse_logreg")
"""How a probe was fitted: logistic regression, difference of means, or on SAE latents."""


@dataclass
class LinearProbe:
    """A binary linear probe ``score = x·weight + bias`` at one hook (label 1 when score > 0)."""

    weight: Float[Tensor, " d"]
    """Weight vector in the raw activation space."""
    bias: float
    """Bias of the decision function."""
    hook_name: str
    """Hook whose (pooled) activations the probe reads."""
    model: str
    """Model the probe was fitted on."""
    method: str = "logreg"
    """One of :data:`PROBE_METHODS`."""
    task: str = ""
    """Task the probe was fitted on."""
    pooling: str = "last"
    """Pooling of the activations it was fitted on."""
    label_names: tuple[str, str] = ("0", "1")
    """Meaning of labels 0 and 1."""
    info: dict[str, Any] = field(default_factory=dict)
    """Penalty, metrics and other provenance."""

    def scores(self, x: Float[Tensor, "n d"]) -> Float[Tensor, " n"]:
        """Decision function on activations ``x``."""
        return x.float() @ self.weight.to(x.device).float() + self.bias

    def predict(self, x: Float[Tensor, "n d"]) -> Tensor:
        """Predicted labels (0/1)."""
        return (self.scores(x) > 0).long()

    def to_direction(self) -> Direction:
        """The probe as an ``interp`` direction (vector = weight) with the probe fields in ``extra``."""
        extra = {
            "kind": "probe",
            "bias": float(self.bias),
            "method": self.method,
            "task": self.task,
            "pooling": self.pooling,
            "label_names": list(self.label_names),
            **self.info,
        }
        return Direction(vector=self.weight.detach().float().cpu(), hook_name=self.hook_name, model=self.model,
                         source=f"probe:{self.method}", extra=extra)


def save_probe(probe: LinearProbe, path: str | os.PathLike) -> Path:
    """Write ``probe`` as a direction directory (atomic file writes)."""
    if probe.method not in PROBE_METHODS:
        raise UserError(f"unknown probe method {probe.method!r}; use one of {', '.join(PROBE_METHODS)}")
    if not torch.isfinite(torch.as_tensor(probe.bias)):
        raise UserError(f"probe bias for {probe.hook_name} is not finite; refit it on finite activations")
    return save_direction(probe.to_direction(), path)


def load_probe(path: str | os.PathLike) -> LinearProbe:
    """Read a probe directory written by :func:`save_probe`."""
    direction = load_direction(path)
    extra = dict(direction.extra)
    if extra.pop("kind", None) != "probe" or "bias" not in extra:
        raise UserError(f"{path} is a direction but not a probe (no bias recorded); pass a directory written by save_probe or `interp probe`")
    fields = {k: extra.pop(k) for k in ("bias", "method", "task", "pooling", "label_names") if k in extra}
    return LinearProbe(weight=direction.vector, hook_name=direction.hook_name, model=direction.model,
                       bias=float(fields["bias"]), method=fields.get("method", "logreg"), task=fields.get("task", ""),
                       pooling=fields.get("pooling", "last"), label_names=tuple(fields.get("label_names", ("0", "1"))),
                       info=extra)
