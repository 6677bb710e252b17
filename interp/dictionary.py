"""The contract between feature dictionaries (SAEs) and their consumers (steering, probes).

``interp`` and ``probes`` depend only on this Protocol, never on ``saes``: any object with these
members works, including SAEs loaded from SAELens or sparsify files.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from jaxtyping import Float
from torch import Tensor

__all__ = ["FeatureDictionary"]


@runtime_checkable
class FeatureDictionary(Protocol):
    """A dictionary of features read from and written to one hook of a model."""

    hook_name: str
    """The hook whose activations are encoded, e.g. ``blocks.15.hook_resid_post``."""

    max_activations: Tensor | None
    """Per-feature maximum activation seen on a corpus (``[n_latents]``), or None if not computed."""

    @property
    def W_dec(self) -> Float[Tensor, "n_latents d_in"]:
        """Decoder directions, one row per feature."""
        ...

    def encode(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... n_latents"]:
        """Feature activations (after the sparsity nonlinearity, e.g. TopK)."""
        ...

    def decode(self, f: Float[Tensor, "... n_latents"]) -> Float[Tensor, "... d_in"]:
        """Reconstruction ``f @ W_dec + b_dec``."""
        ...
