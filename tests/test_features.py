"""Feature statistics, top contexts, logit lens, neighbours and search vs brute force."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from interp.errors import UserError
from test_sae_eval import HOOK, make_sae, random_windows

CTX = 10


def dense_features(model, sae, windows):
    """Brute force: every feature activation of every position, zero at special positions."""
    bos = model.tokenizer.bos_token_id
    keep = windows != bos
    keep[:, 0] = False
    with torch.no_grad():
        _, cache = model.run_with_cache(windows, names_filter=[HOOK])
        f = sae.encode(cache[HOOK])
    return f * keep.unsqueeze(-1), keep


@pytest.fixture(scope="module")
def setup(tiny_model):
    from saes.features import scan_features

    sae = make_sae(tiny_model.cfg.d_model, 48, 4, HOOK, seed=3)
    windows = random_windows(tiny_model, 7, ctx=CTX, seed=5)
    # Batches of 3 windows: the running top-k merge crosses batch boundaries.
    scan = scan_features(sae, tiny_model, windows, n_tokens=7 * (CTX - 1), batch_size=3, top_k=3, progress=False)
    f, keep = dense_features(tiny_model, sae, windows)
    return sae, windows, scan, f, keep


def test_stats_match_dense_pass(setup):
    sae, windows, scan, f, keep = setup
    flat = f[keep]
    fired = flat > 0
    assert scan.n_tokens == int(keep.sum())
    torch.testing.assert_close(scan.max_activations, flat.max(0).values)
    torch.testing.assert_close(scan.frequency, fired.float().mean(0))
    mean_active = torch.where(fired.any(0), (flat * fired).sum(0) / fired.sum(0).clamp_min(1), torch.zeros(()))
    torch.testing.assert_close(scan.mean_active, mean_active)
    for i in range(flat.shape[1]):
        values = flat[:, i][flat[:, i] > 0].numpy()
        edges = np.logspace(-3, 3, 61)
        expected, _ = np.histogram(np.clip(values, edges[0], edges[-1]), bins=edges)
        assert scan.histograms[i].tolist() == expected.tolist(), i


def test_top_contexts_match_brute_force(setup, tiny_model):
    from saes.features import top_contexts

    sae, windows, scan, f, keep = setup
    per_window = f.max(1).values  # [windows, n]
    for i in range(f.shape[-1]):
        expected = sorted(((float(v), w) for w, v in enumerate(per_window[:, i]) if v > 0), reverse=True)[:3]
        got = [(float(v), int(w)) for v, w in zip(scan.top_values[i], scan.top_windows[i]) if v > 0]
        assert [v for v, _ in got] == pytest.approx([v for v, _ in expected], rel=1e-5)
        assert {w for _, w in got} == {w for _, w in expected}
    features = [0, 5, 11]
    contexts = top_contexts(sae, tiny_model, scan, features, batch_size=2)
    for i in features:
        for ctx in contexts[i]:
            w = next(j for j in range(windows.shape[0]) if torch.equal(windows[j], ctx["window"]))
            torch.testing.assert_close(ctx["acts"], f[w, :, i])
            assert ctx["acts"][ctx["position"]] == pytest.approx(ctx["value"])


def test_feature_stats_file_fills_max_activations(setup, tmp_path):
    from saes.features import save_feature_stats
    from saes.io import load

    sae, _, scan, _, _ = setup
    sae.save(tmp_path / "sae")
    save_feature_stats(scan, tmp_path / "sae")
    loaded = load(tmp_path / "sae")
    torch.testing.assert_close(loaded.max_activations, scan.max_activations)


def test_logit_lens_and_neighbours_by_hand(setup, tiny_model):
    from sklearn.metrics.pairwise import cosine_similarity

    from saes.features import logit_lens, neighbours

    sae = setup[0]
    lens = logit_lens(sae, tiny_model, [2, 7], k=4)
    with torch.no_grad():
        logits = sae.W_dec[7] @ tiny_model.W_U
    top_ids = logits.argsort(descending=True)[:4].tolist()
    assert [t for t, _ in lens[7]["top"]] == [tiny_model.tokenizer.decode([i]) for i in top_ids]
    assert [v for _, v in lens[7]["bottom"]] == pytest.approx(sorted(logits.tolist())[:4], rel=1e-5)
    sims = cosine_similarity(sae.W_dec.detach().numpy())
    np.fill_diagonal(sims, -np.inf)
    near = neighbours(sae, [2, 7], k=3)
    for i in (2, 7):
        assert [j for j, _ in near[i]] == np.argsort(-sims[i])[:3].tolist()
        assert [c for _, c in near[i]] == pytest.approx(np.sort(sims[i])[::-1][:3].tolist(), rel=1e-5)
    with pytest.raises(UserError, match="out of range"):
        neighbours(sae, [48])


def test_search_scores_by_hand(tiny_model):
    """Log-odds of firing on the query's tokens vs the baseline, computed by hand from a dense pass."""
    from saes.search import search_features

    sae = make_sae(tiny_model.cfg.d_model, 40, 6, HOOK, seed=4)
    tok = tiny_model.tokenizer
    query = " Golden Gate"
    pattern = tok.encode(query, add_special_tokens=False)
    baseline = random_windows(tiny_model, 6, ctx=CTX, seed=8)
    baseline[2, 3 : 3 + len(pattern)] = torch.tensor(pattern)  # one occurrence inside the baseline
    results = search_features(sae, tiny_model, query=query, baseline=baseline, n_baseline_tokens=6 * (CTX - 1), min_count=1, top=40, batch_size=4, progress=False)

    f_base, keep = dense_features(tiny_model, sae, baseline)
    match_mask = torch.zeros_like(keep)
    match_mask[2, 3 : 3 + len(pattern)] = True
    q_tokens = tiny_model.to_tokens(query)
    f_query, _ = dense_features(tiny_model, sae, q_tokens)
    fm = torch.cat([f_query[0, 1:], f_base[match_mask]])  # the query text (minus BOS) + the occurrence
    fb = f_base[keep & ~match_mask]
    a, m = (fm > 0).sum(0), fm.shape[0]
    b, n = (fb > 0).sum(0), fb.shape[0]
    expected = {i: math.log((a[i] + 0.5) / (m - a[i] + 0.5)) - math.log((b[i] + 0.5) / (n - b[i] + 0.5)) for i in range(40) if a[i] >= 1}
    assert {r["feature"] for r in results} == set(expected)
    for r in results:
        assert r["score"] == pytest.approx(expected[r["feature"]], rel=1e-6)
        assert r["matching_tokens"] == m and r["baseline_tokens"] == n
        assert r["mean_activation"] == pytest.approx(float(fm[:, r["feature"]].mean()), rel=1e-5)
    scores = [r["score"] for r in results]
    assert scores == sorted(scores, reverse=True)


def test_search_rejects_missing_query(tiny_model):
    from saes.search import search_features

    sae = make_sae(tiny_model.cfg.d_model, 16, 2, HOOK)
    baseline = random_windows(tiny_model, 2, ctx=CTX)
    with pytest.raises(UserError, match="does not occur"):
        search_features(sae, tiny_model, query="Golden", examples=["nothing to see here"], baseline=baseline, n_baseline_tokens=10, progress=False)
    with pytest.raises(UserError, match="query"):
        search_features(sae, tiny_model, baseline=baseline, progress=False)


def test_scan_of_store_matches_scan_of_windows(setup, tiny_model, tmp_path):
    """Scanning harvested activations (no model) gives the stats and top contexts of the model-driven scan."""
    from interp.activations import harvest
    from saes.features import scan_features

    sae, windows, scan, _, keep = setup
    store = harvest(tiny_model, windows, [HOOK], n_tokens=int(keep.sum()), ctx=CTX, batch_size=4, out=tmp_path / "store", progress=False)
    assert store.n_tokens == int(keep.sum())
    from_store = scan_features(sae, None, store, n_tokens=store.n_tokens, batch_size=2, ctx=CTX, top_k=3, progress=False)
    assert from_store.n_tokens == scan.n_tokens
    torch.testing.assert_close(from_store.max_activations, scan.max_activations)
    torch.testing.assert_close(from_store.frequency, scan.frequency)
    assert torch.equal(from_store.histograms, scan.histograms)
    # Top contexts name the same windows and positions (windows are looked up, not indices).
    for i in range(scan.top_values.shape[0]):
        got = {(tuple(from_store.windows[w].tolist()), int(p)) for v, w, p in zip(from_store.top_values[i], from_store.top_windows[i], from_store.top_positions[i]) if v > 0}
        want = {(tuple(scan.windows[w].tolist()), int(p)) for v, w, p in zip(scan.top_values[i], scan.top_windows[i], scan.top_positions[i]) if v > 0}
        assert got == want, i
