"""k-sparse probes on the latents of a synthetic feature dictionary with planted latents."""

from __future__ import annotations

import torch

from interp.dictionary import FeatureDictionary
from probes.metrics import group_split
from probes.sparse import encode_latents, fit_sparse_probes, rank_latents


class OrthogonalDictionary:
    """encode(x) = relu(x @ W_decᵀ) with orthonormal decoder rows, so latents are recovered exactly."""

    def __init__(self, n: int, seed: int = 0):
        q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed)))
        self._w_dec = q
        self.hook_name = "blocks.0.hook_resid_post"
        self.max_activations = None

    @property
    def W_dec(self) -> torch.Tensor:
        return self._w_dec

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x @ self._w_dec.T)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return f @ self._w_dec


def test_sparse_probes_pick_the_planted_latents():
    n_items, n_latents, planted = 600, 64, [11, 40]
    g = torch.Generator().manual_seed(1)
    labels = torch.arange(n_items) % 2
    latents = torch.rand(n_items, n_latents, generator=g) * (torch.rand(n_items, n_latents, generator=g) < 0.2)
    latents[:, planted[0]] = labels * (1.0 + torch.rand(n_items, generator=g)) + 0.3 * torch.rand(n_items, generator=g)
    latents[:, planted[1]] = labels * (0.6 * torch.rand(n_items, generator=g)) + 0.5 * torch.rand(n_items, generator=g)
    sae = OrthogonalDictionary(n_latents)
    assert isinstance(sae, FeatureDictionary)
    acts = sae.decode(latents)
    encoded = encode_latents(sae, acts, batch_size=128)
    torch.testing.assert_close(encoded, latents, atol=1e-5, rtol=1e-5)
    split = group_split(labels, [str(i // 10) for i in range(n_items)], seed=0)
    ranked = rank_latents(encoded[split.train], labels[split.train])
    assert ranked[:2].tolist() == planted
    probes = fit_sparse_probes(encoded, labels, split, ks=(1, 2, 5))
    assert [p.k for p in probes] == [1, 2, 5]
    assert probes[0].latents.tolist() == planted[:1] and probes[1].latents.tolist() == planted
    assert probes[1].accuracy > 0.95 and probes[1].auroc > 0.99
    # The k=1 probe reads one latent: its score is monotone in that latent alone.
    scores = probes[0].scores(encoded)
    order = encoded[:, planted[0]].argsort()
    assert bool((scores[order].diff() >= -1e-6).all())
    direction = probes[1].direction(sae)
    torch.testing.assert_close(direction, probes[1].weight @ sae.W_dec[planted])
