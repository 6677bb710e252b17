"""The TopK sparse autoencoder used at inference time (and as the unit of save/load).

``encode(x) = TopK_k(ReLU((x - b_dec) @ W_enc + b_enc))`` and ``decode(f) = f @ W_dec + b_dec``
(Gao et al. 2024, "Scaling and evaluating sparse autoencoders", eq. 1-2). A BatchTopK SAE
(Bussmann et al. 2024) is trained with a batch-wide top ``k * batch``; at inference it keeps every
pre-activation above one global ``threshold`` instead, so the number of active latents varies per
token around ``k``.

Weights on disk are in raw activation units: the training-time input scale ``c`` (chosen so that
``E||c x||^2 = d_in``) is folded in as ``b_enc / c``, ``b_dec / c`` and ``threshold / c``, which keeps
decoder rows unit-norm and makes feature activations the length of each direction in the raw
residual. ``activation_scale`` records ``c``.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn

from interp.errors import UserError
from saes.kernels import topk

__all__ = ["TopKSAE"]


def check_shape(d_in: int, n_latents: int, k: int) -> None:
    """Raise UserError unless ``0 < k < n_latents`` and ``d_in > 0``."""
    if d_in <= 0 or n_latents <= 0:
        raise UserError(f"SAE sizes must be positive (got d_in={d_in}, n_latents={n_latents})")
    if not 0 < k < n_latents:
        raise UserError(f"k must satisfy 0 < k < n_latents (got k={k}, n_latents={n_latents}); lower --k or raise --latents")


class TopKSAE(nn.Module):
    """A TopK (or BatchTopK, when ``threshold`` is set) sparse autoencoder on one hook."""

    def __init__(
        self,
        d_in: int,
        n_latents: int,
        k: int,
        hook_name: str = "",
        model: str = "",
        threshold: float | None = None,
        activation_scale: float = 1.0,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device | None = None,
    ):
        super().__init__()
        check_shape(d_in, n_latents, k)
        self.d_in, self.n_latents, self.k = d_in, n_latents, k
        self.hook_name = hook_name
        """Hook whose activations this SAE encodes (FeatureDictionary contract)."""
        self.model = model
        """Name of the model the SAE was trained on."""
        self.threshold = threshold
        """BatchTopK inference threshold in raw units; None for a plain TopK SAE."""
        self.activation_scale = float(activation_scale)
        """The training-time input scale ``c`` that is folded into the saved weights."""
        self.max_activations: Tensor | None = None
        """Per-latent maximum activation over a corpus (from ``feature_stats.safetensors``)."""
        self.extra: dict[str, Any] = {}
        """Free-form provenance carried through save/load (training tokens, corpus, ...)."""
        kw = {"dtype": dtype, "device": device}
        self.W_enc = nn.Parameter(torch.zeros(d_in, n_latents, **kw))
        self.b_enc = nn.Parameter(torch.zeros(n_latents, **kw))
        self.W_dec = nn.Parameter(torch.zeros(n_latents, d_in, **kw))
        self.b_dec = nn.Parameter(torch.zeros(d_in, **kw))

    @property
    def batch_topk(self) -> bool:
        """True when inference uses the global BatchTopK threshold instead of per-token TopK."""
        return self.threshold is not None

    @property
    def cfg(self) -> dict[str, Any]:
        """The ``cfg.json`` contents (SAELens layout plus our provenance keys)."""
        from saes.io import sae_cfg

        return sae_cfg(self)

    def _check_input(self, x: Tensor) -> None:
        if x.shape[-1] != self.d_in:
            raise UserError(f"activations have width {x.shape[-1]} but the SAE for {self.hook_name or 'this hook'} expects d_in={self.d_in}; pass activations from the hook it was trained on")

    def pre_acts(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... n_latents"]:
        """Encoder pre-activations ``(x - b_dec) @ W_enc + b_enc``."""
        self._check_input(x)
        x = x.to(self.W_enc.dtype)
        return (x - self.b_dec) @ self.W_enc + self.b_enc

    def _cut(self) -> float:
        """The BatchTopK/JumpReLU rule ``relu(pre) * (pre > threshold)`` as one comparison: a latent is
        active above ``max(threshold, 0)`` (a negative threshold, from a foreign file, never passes a non-positive pre-activation)."""
        return max(float(self.threshold), 0.0)

    def encode_sparse(
        self, x: Float[Tensor, "... d_in"]
    ) -> tuple[Float[Tensor, "... k_active"], Int[Tensor, "... k_active"]]:
        """Active latents as ``(values, indices)``; ``k_active = k`` for TopK.

        With a BatchTopK threshold, ``k_active`` is the largest number of latents above the threshold
        in any row of this batch; shorter rows are padded with zero values.
        """
        pre = self.pre_acts(x)
        if self.threshold is None:
            values, indices = topk(pre, self.k)  # compiled on CPU (3x torch.topk at k 32 of 4,096)
            return values.relu(), indices
        above = pre > self._cut()
        k_active = max(int(above.sum(-1).max()) if above.numel() else 0, 1)
        values, indices = pre.masked_fill(~above, 0.0).topk(min(k_active, self.n_latents), dim=-1, sorted=False)
        return values, indices

    def encode(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... n_latents"]:
        """Dense feature activations: the TopK (or above-threshold) values, zeros elsewhere."""
        if self.threshold is not None:
            pre = self.pre_acts(x)
            return pre * (pre > self._cut())
        values, indices = self.encode_sparse(x)
        return torch.zeros(*values.shape[:-1], self.n_latents, dtype=values.dtype, device=values.device).scatter_(-1, indices, values)

    def decode(self, f: Float[Tensor, "... n_latents"]) -> Float[Tensor, "... d_in"]:
        """Reconstruction ``f @ W_dec + b_dec`` from dense feature activations."""
        return f.to(self.W_dec.dtype) @ self.W_dec + self.b_dec

    def decode_sparse(
        self, values: Float[Tensor, "... k"], indices: Int[Tensor, "... k"]
    ) -> Float[Tensor, "... d_in"]:
        """Reconstruction from ``(values, indices)``: a weighted sum of k gathered decoder rows."""
        lead = values.shape[:-1]
        flat_v = values.reshape(-1, values.shape[-1]).to(self.W_dec.dtype)
        flat_i = indices.reshape(-1, indices.shape[-1])
        out = F.embedding_bag(flat_i, self.W_dec, per_sample_weights=flat_v, mode="sum")
        return (out + self.b_dec).reshape(*lead, self.d_in)

    def forward(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_in"]:
        """``decode(encode(x))`` computed sparsely."""
        return self.decode_sparse(*self.encode_sparse(x))

    def save(self, path: str | os.PathLike) -> os.PathLike:
        """Write ``cfg.json`` + ``sae_weights.safetensors`` (SAELens layout) to the directory ``path``."""
        from saes.io import save

        return save(self, path)

    @classmethod
    def from_stack(cls, params: Any, i: int, k: int, activation_scale: float = 1.0, threshold: float | None = None, hook_name: str = "", model: str = "") -> TopKSAE:
        """Member ``i`` of a training stack as a standalone SAE in raw units (scale ``c`` folded in).

        ``threshold`` is the BatchTopK running threshold in training (scaled) units, or None.
        """
        W_enc, b_enc, W_dec, b_dec = (p.detach()[i].float().cpu() for p in (params.W_enc, params.b_enc, params.W_dec, params.b_dec))
        c = float(activation_scale)
        sae = cls(W_enc.shape[0], W_enc.shape[1], k, hook_name=hook_name, model=model,
                  threshold=None if threshold is None else float(threshold) / c, activation_scale=c)
        with torch.no_grad():
            sae.W_enc.copy_(W_enc)
            sae.b_enc.copy_(b_enc / c)
            sae.W_dec.copy_(W_dec)
            sae.b_dec.copy_(b_dec / c)
        return sae

    def to_stack(self) -> tuple[dict[str, Tensor], float | None]:
        """Weights in training (scaled) units with a leading stack axis of 1, and the scaled threshold.

        Inverse of :meth:`from_stack`: returns ``({"W_enc": [1, d, n], ...}, threshold * c)``.
        """
        c = self.activation_scale
        tensors = {
            "W_enc": self.W_enc.detach()[None].clone(),
            "b_enc": (self.b_enc.detach() * c)[None],
            "W_dec": self.W_dec.detach()[None].clone(),
            "b_dec": (self.b_dec.detach() * c)[None],
        }
        return tensors, None if self.threshold is None else self.threshold * c

    def extra_repr(self) -> str:
        kind = f"threshold={self.threshold:.4g}" if self.threshold is not None else "topk"
        return f"d_in={self.d_in}, n_latents={self.n_latents}, k={self.k}, {kind}, hook_name={self.hook_name!r}"
