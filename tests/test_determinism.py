"""Properties and determinism: the store returns exactly what was stored; same seed and threads give the same bits.

The shuffled-batch stream is property-tested in tests/test_store.py
(``test_iter_batches_covers_every_row_once_per_epoch``); here the on-disk store's ``read``,
``tokens`` and ``iter_batches`` are checked against the tensors it was made from, for random
shard sizes, ranges and batch sizes. Determinism runs the same work twice in one process.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from interp.activations import harvest
from interp.store import ActivationStore
from saes.config import TrainConfig
from saes.trainer import train


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 300),
    shard_rows=st.integers(1, 130),
    ranges=st.lists(st.tuples(st.floats(0, 1), st.floats(0, 1)), min_size=1, max_size=5),
    batch_size=st.integers(1, 97),
    seed=st.integers(0, 3),
)
def test_store_reads_exactly_the_stored_rows(n, shard_rows, ranges, batch_size, seed):
    gen = torch.Generator().manual_seed(n)
    acts = {"a": torch.randn(n, 3, generator=gen), "b": torch.randn(n, 5, generator=gen)}
    tokens = torch.randint(0, 1000, (n,), generator=gen)
    root = Path(tempfile.mkdtemp())
    try:
        store = ActivationStore.from_tensors(root / "s", acts, tokens=tokens, model="m", shard_rows=shard_rows)
        assert store.n_shards == -(-n // shard_rows) and store.n_tokens == n
        for lo, hi in ranges:
            start, stop = sorted((int(lo * n), int(hi * n)))
            assert torch.equal(store.read("a", start, stop), acts["a"][start:stop])
            assert torch.equal(store.read("b", start, stop), acts["b"][start:stop])
            assert torch.equal(store.tokens(start, stop), tokens[start:stop])
        batches = list(store.iter_batches(["a", "b"], batch_size, seed=seed, buffer_rows=max(1, n // 2), epochs=1))
        a, b = torch.cat([x["a"] for x in batches]), torch.cat([x["b"] for x in batches])
        order = torch.cat([torch.nonzero((acts["a"] == row).all(1))[0] for row in a])  # rows are distinct (random floats)
        assert torch.equal(order.sort().values, torch.arange(n))  # every row once, none lost, none twice
        assert torch.equal(b, acts["b"][order])  # the same rows for every hook
        assert [len(x["a"]) for x in batches[:-1]] == [batch_size] * (len(batches) - 1)
    finally:
        shutil.rmtree(root)


def test_same_seed_same_store_bits(tiny_model, tmp_path):
    windows = torch.randint(3, 2000, (10, 16), generator=torch.Generator().manual_seed(0))
    windows[:, 0] = 1
    hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"]
    kwargs = dict(n_tokens=120, batch_size=3, shard_rows=50, progress=False)
    first = harvest(tiny_model, windows, hooks, out=tmp_path / "one", **kwargs)
    second = harvest(tiny_model, windows, hooks, out=tmp_path / "two", **kwargs)
    assert first.manifest["shards"] == second.manifest["shards"]  # every file's sha256 is the same
    files = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*.safetensors"))
    assert files and all((tmp_path / "one" / f).read_bytes() == (tmp_path / "two" / f).read_bytes() for f in files)


def _train(store: ActivationStore, out: Path, seed: int) -> dict[str, torch.Tensor]:
    cfg = TrainConfig(hooks=["h"], settings=[(32, 4), (48, 6)], n_tokens=8 * 64, batch_size=64, checkpoint_every=0, log_every=4,
                      init_sample_rows=256, buffer_rows=256, progress=False, device="cpu", seed=seed, dead_tokens_threshold=128)
    train(store, cfg, out)
    return {f"{d.name}/{k}": v for d in sorted(out.glob("*/")) if (d / "cfg.json").is_file()
            for k, v in load_file(d / "sae_weights.safetensors").items()}


@pytest.mark.parametrize("threads", [1, 2])
def test_same_seed_and_threads_same_sae_bits(tmp_path, threads):
    store = ActivationStore.from_tensors(tmp_path / "s", {"h": torch.randn(512, 16, generator=torch.Generator().manual_seed(0))}, shard_rows=100)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        one, two, other = _train(store, tmp_path / "one", 0), _train(store, tmp_path / "two", 0), _train(store, tmp_path / "three", 1)
    finally:
        torch.set_num_threads(before)
    assert len(one) == 8 and one.keys() == two.keys()
    assert all(torch.equal(one[k], two[k]) for k in one)
    assert not torch.equal(one[next(iter(one))], other[next(iter(other))])  # the seed matters
