"""k-sparse probes on the latents of a feature dictionary (an SAE), through ``interp.FeatureDictionary``.

Latents are ranked by the absolute difference of their mean activation between the classes on
the training split (the mean-difference ranking of Gurnee et al. 2023, "Finding Neurons in a
Haystack"); a logistic probe is then fitted on the top-k latents for every k at once: the k
problems share one padded ``[k_max]`` feature tensor whose unused columns are zero.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from interp.dictionary import FeatureDictionary
from interp.errors import UserError
from probes.fit import fit_logistic
from probes.metrics import Split, accuracy, auroc

__all__ = ["SparseProbe", "encode_latents", "rank_latents", "fit_sparse_probes"]


@dataclass
class SparseProbe:
    """A logistic probe reading only ``latents`` of a feature dictionary."""

    k: int
    """Number of latents read."""
    latents: Int[Tensor, " k"]
    """Indices of the latents, best-ranked first."""
    weight: Float[Tensor, " k"]
    """Weight per latent."""
    bias: float
    """Bias of the decision function."""
    accuracy: float
    """Test accuracy."""
    auroc: float
    """Test AUROC."""

    def scores(self, latent_acts: Float[Tensor, "n n_latents"]) -> Float[Tensor, " n"]:
        """Decision function on dense latent activations."""
        return latent_acts[:, self.latents.to(latent_acts.device)].float() @ self.weight.to(latent_acts.device) + self.bias

    def direction(self, dictionary: FeatureDictionary) -> Float[Tensor, " d_in"]:
        """The probe read back into activation space: ``Σ_j weight_j · W_dec[latent_j]``."""
        w_dec = dictionary.W_dec.detach().float()
        return self.weight.to(w_dec.device) @ w_dec[self.latents.to(w_dec.device)]


@torch.inference_mode()
def encode_latents(dictionary: FeatureDictionary, acts: Float[Tensor, "n d_in"], batch_size: int = 1024) -> Float[Tensor, "n n_latents"]:
    """Dense latent activations of ``acts`` (float32, CPU), encoded in batches."""
    w_dec = dictionary.W_dec
    if acts.shape[-1] != w_dec.shape[-1]:
        raise UserError(f"activations have width {acts.shape[-1]} but the dictionary reads width {w_dec.shape[-1]} at {dictionary.hook_name}; collect activations at that hook")
    device = w_dec.device
    parts = [dictionary.encode(acts[i : i + batch_size].to(device, w_dec.dtype)).float().cpu() for i in range(0, len(acts), batch_size)]
    return torch.cat(parts)


def rank_latents(latent_acts: Float[Tensor, "n n_latents"], labels: Int[Tensor, " n"]) -> Int[Tensor, " n_latents"]:
    """Latent indices sorted by |mean(label 1) − mean(label 0)|, largest first."""
    y = labels.bool()
    diff = latent_acts[y].mean(0) - latent_acts[~y].mean(0)
    return diff.abs().argsort(descending=True, stable=True)


def fit_sparse_probes(
    latent_acts: Float[Tensor, "n n_latents"],
    labels: Int[Tensor, " n"],
    split: Split,
    ks: Sequence[int] = (1, 2, 5, 10, 20, 50),
    l2: float = 1e-3,
) -> list[SparseProbe]:
    """One probe per ``k`` on the top-k latents (ranked on the training split), scored on the test split."""
    n_latents = latent_acts.shape[1]
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1 or ks[-1] > n_latents:
        raise UserError(f"k values must lie in 1..{n_latents} (the number of latents), got {ks}")
    order = rank_latents(latent_acts[split.train], labels[split.train])[: ks[-1]]
    top = latent_acts[:, order]
    mask = torch.stack([torch.arange(ks[-1]) < k for k in ks]).float()
    x = top[None] * mask[:, None, :]
    y = labels.float()
    fit = fit_logistic(x[:, split.train], y[split.train], [l2])
    scores = fit.scores(x[:, split.test])[:, 0]
    acc, area = accuracy(scores, labels[split.test]), auroc(scores, labels[split.test])
    return [
        SparseProbe(k=k, latents=order[:k].clone(), weight=fit.weight[i, 0, :k].clone(), bias=float(fit.bias[i, 0]),
                    accuracy=float(acc[i]), auroc=float(area[i]))
        for i, k in enumerate(ks)
    ]
