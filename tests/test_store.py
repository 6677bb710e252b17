"""The activation store: round trips, contexts, shuffled batches, crash leftovers, corruption."""

from __future__ import annotations

import json
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from interp.errors import UserError
from interp.store import ActivationStore
from interp.store_batches import iter_batches
from interp.store_manifest import StoreWriter


def _row_store(path, n: int, shard_rows: int) -> ActivationStore:
    """A store whose hook ``a`` holds the row index in every column and ``b`` holds ``-2 * a``."""
    a = torch.arange(n, dtype=torch.float32)[:, None].repeat(1, 3)
    return ActivationStore.from_tensors(path, {"a": a, "b": -2 * a}, tokens=torch.arange(n) % 7, shard_rows=shard_rows)


def test_from_tensors_roundtrip_across_shards(tmp_path):
    x, y = torch.randn(1000, 5), torch.randn(1000, 2)
    store = ActivationStore.from_tensors(tmp_path / "s", {"x": x, "y": y}, tokens=torch.arange(1000) % 13, model="m", shard_rows=97)
    assert store.n_shards == 11 and store.hooks == ["x", "y"] and store.model == "m" and store.complete
    assert store.n_tokens == 1000 and store.d_in("x") == 5 and store.d_in("y") == 2
    assert torch.equal(store.read("x"), x) and torch.equal(store.read("y", 90, 300), y[90:300])
    assert store.read("x", 500, 500).shape == (0, 5)
    assert torch.equal(store.tokens(95, 200), torch.arange(95, 200) % 13)
    reopened = ActivationStore(tmp_path / "s")
    assert torch.equal(reopened.read("x", 193, 195), x[193:195])


def test_windows_rebuild_contexts(tmp_path):
    windows = torch.randint(0, 500, (30, 16))
    acts = torch.randn(30, 16, 4)
    store = ActivationStore.from_tensors(tmp_path / "s", {"h": acts}, tokens=windows, shard_rows=40)
    # shards hold whole windows: 40 rows round down to 32 = 2 windows each
    assert all(s["rows"][1] - s["rows"][0] == 32 for s in store.manifest["shards"])
    rows = torch.tensor([0, 17, 31, 32, 479, 250])
    got, pos = store.windows(rows)
    assert torch.equal(got, windows[rows // 16]) and torch.equal(pos, rows % 16)
    ids, p = store.context(250)
    assert torch.equal(ids, windows[15]) and p == 10 and int(ids[p]) == int(store.tokens(250, 251))
    assert torch.equal(store.read("h", 16, 32), acts[1])


def test_reduced_precision_dtype(tmp_path):
    x = torch.randn(50, 8)
    store = ActivationStore.from_tensors(tmp_path / "s", {"x": x}, dtype="bfloat16")
    assert store.read("x").dtype == torch.float32
    assert torch.equal(store.read("x"), x.bfloat16().float())


def test_store_without_tokens_says_so(tmp_path):
    store = ActivationStore.from_tensors(tmp_path / "s", {"x": torch.randn(10, 2)})
    with pytest.raises(UserError, match="no tokens"):
        store.tokens(0, 3)
    with pytest.raises(UserError, match="window tokens"):
        store.context(0)


def test_bad_inputs_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="different numbers of rows"):
        ActivationStore.from_tensors(tmp_path / "a", {"x": torch.randn(4, 2), "y": torch.randn(5, 2)})
    with pytest.raises(UserError, match="one token id per row"):
        ActivationStore.from_tensors(tmp_path / "b", {"x": torch.randn(4, 2)}, tokens=torch.arange(3))
    with pytest.raises(UserError, match=r"\[rows, d_in\]"):
        ActivationStore.from_tensors(tmp_path / "c", {"x": torch.randn(4)})
    store = ActivationStore.from_tensors(tmp_path / "d", {"blocks.0.hook_resid_post": torch.randn(4, 2)})
    with pytest.raises(UserError, match="did you mean: blocks.0.hook_resid_post"):
        store.read("blocks.0.hook_resid_pst")
    with pytest.raises(UserError, match="outside"):
        store.read("blocks.0.hook_resid_post", 2, 9)
    with pytest.raises(UserError, match="not an activation store"):
        ActivationStore(tmp_path / "nowhere")


def test_existing_store_with_other_content_refused_unless_overwrite(tmp_path):
    first = torch.randn(6, 2)
    ActivationStore.from_tensors(tmp_path / "s", {"x": first})
    with pytest.raises(UserError, match="different config"):
        ActivationStore.from_tensors(tmp_path / "s", {"x": torch.randn(6, 2)})
    assert torch.equal(ActivationStore(tmp_path / "s").read("x"), first)  # nothing damaged
    second = torch.randn(3, 4)
    store = ActivationStore.from_tensors(tmp_path / "s", {"y": second}, overwrite=True)
    assert store.hooks == ["y"] and torch.equal(store.read("y"), second)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not an activation store"):
        ActivationStore.from_tensors(tmp_path / "other", {"x": first}, overwrite=True)
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"
    (tmp_path / "s" / "manifest.json").write_text("{ torn")
    with pytest.raises(UserError, match="not valid JSON"):
        ActivationStore.from_tensors(tmp_path / "s", {"x": first})
    assert torch.equal(ActivationStore.from_tensors(tmp_path / "s", {"x": first}, overwrite=True).read("x"), first)


def test_corrupted_truncated_and_missing_shards_are_detected(tmp_path):
    store = _row_store(tmp_path / "s", 300, 100)
    shard1 = tmp_path / "s" / store.manifest["shards"][1]["files"]["a"]["path"]
    data = bytearray(shard1.read_bytes())
    data[-5] ^= 0xFF
    shard1.write_bytes(bytes(data))
    fresh = ActivationStore(tmp_path / "s")
    assert torch.equal(fresh.read("a", 0, 100)[:, 0], torch.arange(100.0))  # untouched shard still reads
    with pytest.raises(UserError, match="corrupted or truncated"):
        fresh.read("a", 150, 160)
    with pytest.raises(UserError, match="corrupted or truncated"):
        ActivationStore(tmp_path / "s").verify()
    shard1.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(UserError, match="corrupted or truncated"):
        ActivationStore(tmp_path / "s").read("a", 150, 160)
    shard1.unlink()
    with pytest.raises(UserError, match="missing"):
        ActivationStore(tmp_path / "s").verify()


def test_manifest_paths_must_stay_inside(tmp_path):
    store = _row_store(tmp_path / "s", 10, 10)
    manifest = dict(store.manifest)
    manifest["shards"][0]["files"]["a"]["path"] = "../../etc/passwd"
    (tmp_path / "s" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="escapes"):
        ActivationStore(tmp_path / "s")


def test_writer_resumes_and_cleans_crash_leftovers(tmp_path):
    header = {"model": "m", "hooks": ["h"], "d_in": {"h": 2}, "dtype": "float32", "ctx": None, "config": {"k": 1}}
    writer = StoreWriter(tmp_path / "s", header)
    writer.append({"h": torch.ones(5, 2)}, None, 0)
    # a crash after a shard file but before the manifest, and one inside an atomic write
    orphan = tmp_path / "s" / "shards" / "h" / "000001.safetensors"
    orphan.write_bytes(b"half a shard")
    tmp = tmp_path / "s" / ".manifest.json.abc.tmp"
    tmp.write_text("{")
    resumed = StoreWriter(tmp_path / "s", header)
    assert resumed.n_tokens == 5 and not resumed.complete
    assert not orphan.exists() and not tmp.exists()
    resumed.append({"h": torch.zeros(3, 2)}, None, 0)
    resumed.finish()
    store = ActivationStore(tmp_path / "s")
    assert torch.equal(store.read("h"), torch.cat([torch.ones(5, 2), torch.zeros(3, 2)]))
    store.verify()


class _MemoryStore:
    """The part of ActivationStore that iter_batches uses, in memory (rows as in ``_row_store``)."""

    def __init__(self, n: int, shard_rows: int):
        self.path, self.n_tokens, self._shard_rows = "memory", n, shard_rows
        self.n_shards = -(-n // shard_rows)
        self.rows_read = 0

    def d_in(self, hook: str) -> int:
        return 3

    def shard_rows(self, shard: int) -> tuple[int, int]:
        return shard * self._shard_rows, min(self.n_tokens, (shard + 1) * self._shard_rows)

    def read_shard(self, hook: str, shard: int) -> torch.Tensor:
        start, stop = self.shard_rows(shard)
        self.rows_read += (stop - start) * (hook == "a")
        a = torch.arange(start, stop, dtype=torch.float32)[:, None].repeat(1, 3)
        return a if hook == "a" else -2 * a


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 400),
    shard_rows=st.integers(1, 120),
    batch_size=st.integers(1, 90),
    buffer_rows=st.integers(1, 300),
    epochs=st.integers(1, 3),
    seed=st.integers(0, 5),
    start_batch=st.integers(0, 12),
)
def test_iter_batches_covers_every_row_once_per_epoch(n, shard_rows, batch_size, buffer_rows, epochs, seed, start_batch):
    store = _MemoryStore(n, shard_rows)
    seen_epochs = []
    kwargs = dict(batch_size=batch_size, seed=seed, buffer_rows=buffer_rows, epochs=epochs)
    batches, held = [], 0
    for batch in iter_batches(store, ["a", "b"], on_epoch=seen_epochs.append, **kwargs):
        # rows read from shards but not yet handed out: the buffer plus the partial batch
        held = max(held, store.rows_read - sum(len(b["a"]) for b in batches))
        batches.append(batch)
    assert held <= buffer_rows + shard_rows + batch_size  # bounded memory
    rows = torch.cat([b["a"][:, 0] for b in batches]).long()
    assert all(torch.equal(b["b"], -2 * b["a"]) for b in batches)  # same rows for every hook
    assert all(len(b["a"]) == batch_size for b in batches[:-1]) and 0 < len(batches[-1]["a"]) <= batch_size
    assert len(rows) == n * epochs
    for e in range(epochs):  # the stream is a concatenation of permutations of all rows
        assert torch.equal(rows[e * n : (e + 1) * n].sort().values, torch.arange(n))
    assert seen_epochs == list(range(1, epochs))
    resumed = list(iter_batches(store, ["b", "a"], start_batch=start_batch, **kwargs))
    assert len(resumed) == max(0, len(batches) - start_batch)
    assert all(torch.equal(r["a"], b["a"]) for r, b in zip(resumed, batches[start_batch:]))


def test_iter_batches_on_disk_matches_memory(tmp_path):
    disk = list(_row_store(tmp_path / "s", 230, 40).iter_batches(["a", "b"], 32, seed=3, buffer_rows=70, epochs=2))
    memory = list(iter_batches(_MemoryStore(230, 40), ["a", "b"], 32, seed=3, buffer_rows=70, epochs=2))
    assert len(disk) == len(memory) == 15
    assert all(torch.equal(d["a"], m["a"]) and torch.equal(d["b"], m["b"]) for d, m in zip(disk, memory))


def test_iter_batches_is_seeded_and_mixes_shards(tmp_path):
    store = _row_store(tmp_path / "s", 2000, 100)
    first = next(store.iter_batches(["a"], 256, seed=1, buffer_rows=600))["a"][:, 0].long()
    again = next(store.iter_batches(["a"], 256, seed=1, buffer_rows=600))["a"][:, 0].long()
    other = next(store.iter_batches(["a"], 256, seed=2, buffer_rows=600))["a"][:, 0].long()
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert len(set((first // 100).tolist())) >= 5  # rows drawn from many shards, not one


def test_infinite_stream_rolls_into_reshuffled_epochs(tmp_path):
    store = _row_store(tmp_path / "s", 50, 20)
    stream = store.iter_batches(["a"], 25, buffer_rows=30)
    epochs = [torch.cat([next(stream)["a"][:, 0], next(stream)["a"][:, 0]]) for _ in range(3)]
    for rows in epochs:
        assert torch.equal(rows.sort().values, torch.arange(50.0))
    assert not torch.equal(epochs[0], epochs[1])
