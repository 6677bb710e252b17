"""saes.evaluate against hand computations on the tiny random model."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from interp.errors import UserError

HOOK = "blocks.0.hook_resid_post"
CTX = 12


def make_sae(d_in: int, n_latents: int, k: int, hook: str, seed: int = 0):
    """A TopK SAE with random unit decoder rows and a tied encoder (reconstructs part of x)."""
    from saes.model import TopKSAE

    g = torch.Generator().manual_seed(seed)
    sae = TopKSAE(d_in, n_latents, k, hook_name=hook, model="tiny-random")
    W = torch.randn(n_latents, d_in, generator=g)
    W = W / W.norm(dim=1, keepdim=True)
    with torch.no_grad():
        sae.W_dec.copy_(W)
        sae.W_enc.copy_(W.T)
        sae.b_enc.copy_(0.1 * torch.randn(n_latents, generator=g))
        sae.b_dec.copy_(0.01 * torch.randn(d_in, generator=g))
    return sae


def random_windows(model, n: int, ctx: int = CTX, seed: int = 0) -> torch.Tensor:
    """[n, ctx] token ids with BOS first and an extra BOS mid-window (a special position)."""
    g = torch.Generator().manual_seed(seed)
    windows = torch.randint(3, 1000, (n, ctx), generator=g)
    windows[:, 0] = model.tokenizer.bos_token_id
    windows[1, 5] = model.tokenizer.bos_token_id
    return windows


def hand_metrics(model, sae, windows, hook):
    """Every evaluate() number computed directly with run_with_hooks and plain tensor algebra."""
    bos = model.tokenizer.bos_token_id
    keep = windows != bos
    keep[:, 0] = False
    with torch.no_grad():
        _, cache = model.run_with_cache(windows, names_filter=[hook])
        x_full = cache[hook]
        x = x_full[keep]
        f = sae.encode(x)
        x_hat = sae.decode(f)

        def spliced(act, hook):
            out = act.clone()
            out[keep] = sae.decode(sae.encode(act[keep]))
            return out

        def zeroed(act, hook):
            out = act.clone()
            out[keep] = 0.0
            return out

        clean = model(windows)
        s_logits = model.run_with_hooks(windows, fwd_hooks=[(hook, spliced)])
        z_logits = model.run_with_hooks(windows, fwd_hooks=[(hook, zeroed)])
    target = keep[:, 1:]

    def ce(logits):
        return F.cross_entropy(logits[:, :-1][target], windows[:, 1:][target]).item()

    def kl(logits):
        p = clean[:, :-1][target].log_softmax(-1)
        q = logits[:, :-1][target].log_softmax(-1)
        return F.kl_div(q, p, log_target=True, reduction="batchmean").item()

    ce_clean, ce_s, ce_z = ce(clean), ce(s_logits), ce(z_logits)
    freq = (f > 0).float().mean(0)
    return {
        "l0": (f > 0).sum(-1).float().mean().item(),
        "mse": ((x - x_hat) ** 2).mean().item(),
        "normalized_mse": (((x - x_hat) ** 2).sum() / (x**2).sum()).item(),
        "fvu": (((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()).item(),
        "dead_fraction": (freq == 0).float().mean().item(),
        "dense_fraction": (freq > 0.1).float().mean().item(),
        "ce_loss_clean": ce_clean,
        "ce_loss_spliced": ce_s,
        "ce_loss_zero_ablated": ce_z,
        "ce_loss_recovered": (ce_z - ce_s) / (ce_z - ce_clean),
        "kl_clean_spliced": kl(s_logits),
        "kl_clean_zero": kl(z_logits),
        "n_tokens": int(keep.sum()),
        "n_ce_predictions": int(target.sum()),
    }


@pytest.mark.parametrize("hook", [HOOK, "blocks.1.hook_mlp_out"])
def test_evaluate_matches_hand_computation(tiny_model, tmp_path, hook):
    from saes.evaluation import evaluate

    sae = make_sae(tiny_model.cfg.d_model, 96, 4, hook)
    windows = random_windows(tiny_model, 5)
    n_tokens = 4 * (CTX - 1)  # four windows' worth of tokens
    out = tmp_path / "eval.json"
    result = evaluate(sae, tiny_model, windows, n_tokens=n_tokens, batch_size=3, out=out, progress=False)
    expected = hand_metrics(tiny_model, sae, windows[:4], hook)
    for key, value in expected.items():
        assert result[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key
    assert json.loads(out.read_text())["ce_loss_recovered"] == pytest.approx(result["ce_loss_recovered"])
    hist = result["density_histogram"]
    assert sum(hist["counts"]) + hist["n_dead"] == 96
    assert hist["n_dead"] == round(expected["dead_fraction"] * 96)


def test_density_histogram_bins_by_hand():
    from saes.evaluation import density_histogram

    counts = torch.tensor([0, 1, 10, 100, 1000, 0])
    hist = density_histogram(counts, 1000, bins_per_decade=1)
    # frequencies 1e-3, 1e-2, 1e-1, 1 -> log10 -3, -2, -1, 0 with edges [-3, -2, -1, 0]
    assert hist["log10_bin_edges"] == [-3.0, -2.0, -1.0, 0.0]
    assert hist["counts"] == [1, 1, 2]
    assert hist["n_dead"] == 2


def test_perfect_sae_recovers_all_loss(tiny_model):
    """An identity dictionary reconstructs exactly: FVU 0, CE recovered 1, KL 0."""
    from saes.evaluation import evaluate
    from saes.model import TopKSAE

    d = tiny_model.cfg.d_model
    sae = TopKSAE(d, 2 * d, d, hook_name=HOOK)
    with torch.no_grad():
        # f = relu([x, -x]) keeps every coordinate in one of the two halves; decode adds them back.
        eye = torch.eye(d)
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
    result = evaluate(sae, tiny_model, random_windows(tiny_model, 2), n_tokens=2 * (CTX - 1), progress=False)
    assert result["fvu"] == pytest.approx(0.0, abs=1e-10)
    assert result["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-5)
    assert result["kl_clean_spliced"] == pytest.approx(0.0, abs=1e-6)


def test_evaluate_on_store_rows(tiny_model, tmp_path):
    from interp.store import ActivationStore
    from saes.evaluation import evaluate

    sae = make_sae(tiny_model.cfg.d_model, 64, 3, HOOK, seed=1)
    windows = random_windows(tiny_model, 3, seed=2)
    with torch.no_grad():
        _, cache = tiny_model.run_with_cache(windows, names_filter=[HOOK])
    acts = cache[HOOK]
    store = ActivationStore.from_tensors(tmp_path / "store", {HOOK: acts}, tokens=windows, model="tiny-random")
    n_rows = 2 * CTX  # exactly the first two windows
    result = evaluate(sae, tiny_model, store, n_tokens=n_rows, batch_size=1, ctx=CTX, progress=False)
    x = acts[:2].reshape(-1, acts.shape[-1])
    x_hat = sae.decode(sae.encode(x)).detach()
    assert result["n_tokens"] == n_rows
    assert result["fvu"] == pytest.approx((((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()).item(), rel=1e-4)
    # CE terms come from rebuilding exactly the two windows behind those rows.
    expected = hand_metrics(tiny_model, sae, windows[:2], HOOK)
    assert result["ce_loss_spliced"] == pytest.approx(expected["ce_loss_spliced"], rel=1e-4)
    assert result["kl_clean_spliced"] == pytest.approx(expected["kl_clean_spliced"], rel=1e-4, abs=1e-6)


def test_evaluate_rejects_bad_input(tiny_model, tmp_path):
    from saes.evaluation import evaluate

    sae = make_sae(tiny_model.cfg.d_model, 32, 2, HOOK)
    windows = random_windows(tiny_model, 2)
    with pytest.raises(UserError, match="positive"):
        evaluate(sae, tiny_model, windows, n_tokens=0, progress=False)
    with pytest.raises(UserError, match="integer tensor"):
        evaluate(sae, tiny_model, windows.float(), n_tokens=10, progress=False)
    with pytest.raises(UserError, match="no hook"):
        evaluate(make_sae(tiny_model.cfg.d_model, 32, 2, "blocks.9.hook_resid_post"), tiny_model, windows, n_tokens=10, progress=False)
    with pytest.raises(UserError, match="model is needed"):
        evaluate(sae, None, windows, n_tokens=10, progress=False)


@pytest.mark.model
def test_evaluate_on_default_model_matches_hand(smollm2):
    """On the real model (HF-backed bridge) the mid-depth metrics equal the hand computation."""
    from saes.evaluation import evaluate

    hook = "blocks.15.hook_resid_post"
    sae = make_sae(smollm2.cfg.d_model, 256, 16, hook, seed=11)
    windows = random_windows(smollm2, 2, ctx=24, seed=12)
    result = evaluate(sae, smollm2, windows, n_tokens=2 * 23, batch_size=2, progress=False)
    expected = hand_metrics(smollm2, sae, windows, hook)
    for key in ("fvu", "l0", "ce_loss_clean", "ce_loss_spliced", "ce_loss_zero_ablated", "kl_clean_spliced"):
        assert result[key] == pytest.approx(expected[key], rel=1e-3, abs=1e-4), key


def test_interrupted_evaluation_resumes(tiny_model, tmp_path, monkeypatch):
    """Ctrl-C saves the running sums; the re-run processes only the rest and gives the same numbers."""
    import saes.evaluation as evaluation

    sae = make_sae(tiny_model.cfg.d_model, 64, 4, HOOK, seed=2)
    windows = random_windows(tiny_model, 6, seed=3)
    kwargs = dict(n_tokens=6 * (CTX - 1), batch_size=2, progress=False)
    reference = evaluation.evaluate(sae, tiny_model, windows, **kwargs)
    real = evaluation._batch_terms
    calls: list[int] = []

    def flaky(*args, **kw):
        calls.append(args[3].shape[0])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(evaluation, "_batch_terms", flaky)
    out = tmp_path / "eval.json"
    with pytest.raises(KeyboardInterrupt):
        evaluation.evaluate(sae, tiny_model, windows, out=out, **kwargs)
    partial = tmp_path / "eval.json.partial.safetensors"
    assert partial.exists() and not out.exists()
    calls.clear()
    monkeypatch.setattr(evaluation, "_batch_terms", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    resumed = evaluation.evaluate(sae, tiny_model, windows, out=out, **kwargs)
    assert len(calls) == 2  # batches 2 and 3 of 3
    assert not partial.exists()
    for key in ("fvu", "l0", "dead_fraction", "ce_loss_spliced", "kl_clean_spliced", "n_tokens", "n_ce_predictions"):
        assert resumed[key] == pytest.approx(reference[key], rel=1e-9), key


def test_reconstruction_only(tiny_model):
    """ce=False skips the CE passes but gives the same reconstruction metrics."""
    from saes.evaluation import evaluate

    sae = make_sae(tiny_model.cfg.d_model, 48, 3, HOOK, seed=5)
    windows = random_windows(tiny_model, 3, seed=6)
    full = evaluate(sae, tiny_model, windows, n_tokens=3 * (CTX - 1), progress=False)
    recon = evaluate(sae, tiny_model, windows, n_tokens=3 * (CTX - 1), ce=False, progress=False)
    assert "ce_loss_recovered" not in recon
    for key in ("fvu", "l0", "mse", "dead_fraction"):
        assert recon[key] == pytest.approx(full[key], rel=1e-5), key
