"""TopKSAE against hand computations, and SAE files: ours, SAELens's and sparsify's layouts."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

import saes
from interp.dictionary import FeatureDictionary
from interp.errors import UserError
from saes.model import TopKSAE


def _random_sae(d_in=6, n=10, k=3, seed=0, **kw) -> TopKSAE:
    g = torch.Generator().manual_seed(seed)
    sae = TopKSAE(d_in, n, k, hook_name="blocks.0.hook_resid_post", model="tiny-random", **kw)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
        sae.W_dec /= sae.W_dec.norm(dim=1, keepdim=True)
    return sae


def test_encode_decode_match_hand_computation():
    sae = TopKSAE(2, 4, 2)
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor([[1.0, 0.0, -1.0, 2.0], [0.0, 1.0, 0.0, 1.0]]))
        sae.b_enc.copy_(torch.tensor([0.0, 0.5, 0.0, -10.0]))
        sae.W_dec.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, 0.0]]))
        sae.b_dec.copy_(torch.tensor([1.0, 1.0]))
    x = torch.tensor([[4.0, 2.0]])
    # x - b_dec = [3, 1]; pre = [3, 1.5, -3, 7 - 10 = -3]; top-2 = latents 0 (3) and 1 (1.5).
    f = sae.encode(x)
    assert torch.equal(f, torch.tensor([[3.0, 1.5, 0.0, 0.0]]))
    # decode = 3*[1,0] + 1.5*[0,1] + b_dec = [4, 2.5]
    assert torch.allclose(sae.decode(f), torch.tensor([[4.0, 2.5]]))
    assert torch.allclose(sae(x), torch.tensor([[4.0, 2.5]]))
    values, indices = sae.encode_sparse(x)
    assert sorted(indices[0].tolist()) == [0, 1]


def test_topk_applies_relu_after_selection():
    sae = TopKSAE(1, 3, 2)
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor([[1.0, -1.0, -2.0]]))
    f = sae.encode(torch.tensor([[1.0]]))  # pre = [1, -1, -2]: the second pick is negative -> 0
    assert torch.equal(f, torch.tensor([[1.0, 0.0, 0.0]]))


def test_sparse_and_dense_paths_agree_and_protocol_holds():
    sae = _random_sae(d_in=8, n=32, k=4)
    x = torch.randn(3, 5, 8)
    f = sae.encode(x)
    assert f.shape == (3, 5, 32) and ((f > 0).sum(-1) <= 4).all()
    assert torch.allclose(sae.decode(f), sae(x), atol=1e-5)
    assert isinstance(sae, FeatureDictionary)


def test_batch_topk_threshold_inference():
    sae = _random_sae(d_in=8, n=32, k=4, threshold=0.5)
    x = torch.randn(50, 8)
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    f = sae.encode(x)
    assert torch.equal(f, torch.where(pre > 0.5, pre, torch.zeros_like(pre)))
    # active counts vary per token (not fixed at k) and the sparse path reproduces the dense one
    counts = (f > 0).sum(-1)
    assert counts.min() != counts.max()
    assert torch.allclose(sae(x), sae.decode(f), atol=1e-5)


@pytest.mark.parametrize("d_in,n,k", [(4, 4, 4), (4, 4, 5), (4, 8, 0), (0, 8, 2)])
def test_bad_shapes_are_user_errors(d_in, n, k):
    with pytest.raises(UserError):
        TopKSAE(d_in, n, k)


def test_wrong_input_width_is_user_error():
    with pytest.raises(UserError, match="d_in=6"):
        _random_sae().encode(torch.randn(2, 5))


def test_save_load_roundtrip(tmp_path):
    sae = _random_sae(activation_scale=2.5)
    sae.max_activations = torch.arange(10.0)
    sae.extra = {"tokens": 123}
    sae.save(tmp_path / "sae")
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["d_sae"] == 10 and cfg["k"] == 3 and cfg["d_in"] == 6
    assert cfg["normalize_activations"] == "none" and cfg["activation_scale"] == 2.5
    assert cfg["hook_name"] == "blocks.0.hook_resid_post" and cfg["format_version"] == 1
    back = saes.load(tmp_path / "sae")
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(back, name), getattr(sae, name))
    assert torch.equal(back.max_activations, sae.max_activations)
    assert (back.k, back.hook_name, back.model, back.activation_scale, back.extra) == (3, sae.hook_name, "tiny-random", 2.5, {"tokens": 123})
    x = torch.randn(7, 6)
    assert torch.equal(back(x), sae(x))


def test_batch_topk_roundtrip_writes_jumprelu_threshold(tmp_path):
    sae = _random_sae(threshold=0.25)
    sae.save(tmp_path / "b")
    cfg = json.loads((tmp_path / "b" / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu" and cfg["threshold"] == 0.25
    back = saes.load(tmp_path / "b")
    assert back.threshold == 0.25
    x = torch.randn(9, 6)
    assert torch.equal(back.encode(x), sae.encode(x))


def test_folded_scaling_reproduces_training_reconstruction():
    # A stack member trained on scaled inputs c*x; the saved SAE must map raw x to x_hat_scaled / c.
    torch.manual_seed(0)
    S, d, n, k, c = 2, 6, 12, 3, 0.37
    params = SimpleNamespace(W_enc=torch.randn(S, d, n), b_enc=torch.randn(S, n), W_dec=torch.randn(S, n, d), b_dec=torch.randn(S, d))
    x = torch.randn(20, d)
    xs = c * x
    pre = (xs - params.b_dec[1]) @ params.W_enc[1] + params.b_enc[1]
    v, i = pre.topk(k, dim=-1)
    f = torch.zeros_like(pre).scatter(-1, i, v.relu())
    x_hat_scaled = f @ params.W_dec[1] + params.b_dec[1]
    sae = TopKSAE.from_stack(params, 1, k, activation_scale=c)
    assert torch.allclose(sae(x), x_hat_scaled / c, atol=1e-5)
    assert torch.allclose(sae.encode(x), f / c, atol=1e-5)
    tensors, _ = sae.to_stack()
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.allclose(tensors[name][0], getattr(params, name)[1], atol=1e-6)


def test_saelens_layout_directory(tmp_path):
    # Written the way SAELens 6 writes a TopK SAE (hook in metadata, no provenance keys of ours).
    d, n = 5, 9
    W_enc, b_enc, W_dec, b_dec = torch.randn(d, n), torch.randn(n), torch.randn(n, d), torch.randn(d)
    save_file({"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}, str(tmp_path / "sae_weights.safetensors"))
    cfg = {"architecture": "topk", "d_in": d, "d_sae": n, "k": 2, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": False, "normalize_activations": "none",
           "metadata": {"model_name": "gpt2", "hook_name": "blocks.3.hook_resid_pre"}}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    sae = saes.load(tmp_path)
    assert (sae.hook_name, sae.model, sae.k) == ("blocks.3.hook_resid_pre", "gpt2", 2)
    x = torch.randn(4, d)
    pre = x @ W_enc + b_enc  # apply_b_dec_to_input=False: b_dec is not subtracted
    v, i = pre.topk(2, dim=-1)
    expected = torch.zeros_like(pre).scatter(-1, i, v.relu())
    assert torch.allclose(sae.encode(x), expected, atol=1e-5)


def test_saelens_5_topk_and_batchtopk_training_directories(tmp_path):
    """SAELens < 6 writes a TopK SAE as architecture "standard" with activation_fn_str "topk" and k in
    activation_fn_kwargs; its BatchTopK training SAE keeps the threshold as the scalar "topk_threshold"."""
    d, n = 6, 20
    g = torch.Generator().manual_seed(4)
    W_enc, b_enc, W_dec, b_dec = torch.randn(d, n, generator=g), torch.randn(n, generator=g), torch.randn(n, d, generator=g), torch.randn(d, generator=g)
    x = torch.randn(8, d, generator=g)
    pre = (x - b_dec) @ W_enc + b_enc
    old = tmp_path / "v5"
    old.mkdir()
    save_file({"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}, str(old / "sae_weights.safetensors"))
    (old / "cfg.json").write_text(json.dumps({"architecture": "standard", "d_in": d, "d_sae": n, "activation_fn_str": "topk",
                                              "activation_fn_kwargs": {"k": 3}, "apply_b_dec_to_input": True, "normalize_activations": "none"}))
    sae = saes.load(old)
    assert (sae.k, sae.threshold) == (3, None)
    v, i = pre.topk(3, dim=-1)
    assert torch.allclose(sae.encode(x), torch.zeros_like(pre).scatter(-1, i, v.relu()), atol=1e-5)

    btk = tmp_path / "btk"
    btk.mkdir()
    save_file({"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec, "topk_threshold": torch.tensor(0.75, dtype=torch.float64)},
              str(btk / "sae_weights.safetensors"))
    cfg = {"architecture": "batchtopk", "d_in": d, "d_sae": n, "k": 3, "apply_b_dec_to_input": True, "normalize_activations": "none"}
    (btk / "cfg.json").write_text(json.dumps(cfg))
    sae = saes.load(btk)
    assert sae.threshold == pytest.approx(0.75)
    assert torch.allclose(sae.encode(x), torch.where(pre > 0.75, pre, torch.zeros_like(pre)), atol=1e-5)
    save_file({"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}, str(btk / "sae_weights.safetensors"))
    with pytest.raises(UserError, match="without a 'threshold'"):
        saes.load(btk)


def test_saelens_rescale_acts_by_decoder_norm_is_folded(tmp_path):
    """SAELens 6 TopK/BatchTopK with ``rescale_acts_by_decoder_norm``: pre-activations are multiplied by each
    latent's decoder norm, and decode divides them back out; compared with that rule written out by hand."""
    d, n, k = 6, 20, 3
    g = torch.Generator().manual_seed(5)
    W_enc, b_enc, b_dec = torch.randn(d, n, generator=g), torch.randn(n, generator=g), torch.randn(d, generator=g)
    W_dec = torch.randn(n, d, generator=g) * torch.rand(n, 1, generator=g).add(0.2) * 3  # rows far from unit norm
    norms = W_dec.norm(dim=-1)
    x = torch.randn(8, d, generator=g)
    scaled = ((x - b_dec) @ W_enc + b_enc) * norms

    def decode(acts):
        return (acts / norms) @ W_dec + b_dec

    for arch, extra, threshold in (("topk", {}, None), ("batchtopk", {"topk_threshold": torch.tensor(0.5)}, 0.5)):
        path = tmp_path / arch
        path.mkdir()
        save_file({"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec, **extra}, str(path / "sae_weights.safetensors"))
        (path / "cfg.json").write_text(json.dumps({"architecture": arch, "d_in": d, "d_sae": n, "k": k, "apply_b_dec_to_input": True,
                                                   "normalize_activations": "none", "rescale_acts_by_decoder_norm": True}))
        sae = saes.load(path)
        if threshold is None:
            v, i = scaled.topk(k, dim=-1)
            acts = torch.zeros_like(scaled).scatter(-1, i, v.relu())
        else:
            acts = scaled.relu() * (scaled > threshold)
        assert sae.threshold == threshold
        torch.testing.assert_close(sae.encode(x), acts, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(sae(x), decode(acts), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(n))


def test_negative_jumprelu_threshold_keeps_the_relu(tmp_path):
    """SAELens's JumpReLU is ``relu(pre) * (pre > threshold)``: with a threshold below 0, a pre-activation in (threshold, 0] is off."""
    d, n = 5, 12
    g = torch.Generator().manual_seed(6)
    W_enc, b_enc, W_dec, b_dec = torch.randn(d, n, generator=g), torch.randn(n, generator=g), torch.randn(n, d, generator=g), torch.randn(d, generator=g)
    save_file({"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec, "threshold": torch.full((n,), -0.4)}, str(tmp_path / "sae_weights.safetensors"))
    (tmp_path / "cfg.json").write_text(json.dumps({"architecture": "jumprelu", "d_in": d, "d_sae": n, "normalize_activations": "none"}))
    sae = saes.load(tmp_path)
    x = torch.randn(16, d, generator=g)
    pre = (x - b_dec) @ W_enc + b_enc
    assert ((pre > -0.4) & (pre <= 0)).any(), "the data must reach the band the ReLU removes"
    want = pre.relu() * (pre > -0.4)
    torch.testing.assert_close(sae.encode(x), want)
    values, indices = sae.encode_sparse(x)
    torch.testing.assert_close(torch.zeros_like(pre).scatter(-1, indices, values), want)
    assert (values >= 0).all()


def test_sparsify_directory_written_by_sparsify(tmp_path):
    sparsify = pytest.importorskip("sparsify")
    coder = sparsify.SparseCoder(8, sparsify.SparseCoderConfig(num_latents=24, k=4))
    with torch.no_grad():
        coder.b_dec.normal_()
        coder.encoder.bias.normal_()
    coder.save_to_disk(tmp_path / "layers.2")
    sae = saes.load(tmp_path / "layers.2", hook_name="blocks.2.hook_resid_post")
    assert (sae.d_in, sae.n_latents, sae.k, sae.hook_name) == (8, 24, 4, "blocks.2.hook_resid_post")
    x = torch.randn(6, 8)
    with torch.no_grad():
        out = coder(x)
    assert torch.allclose(sae(x), out.sae_out, atol=1e-5)


def test_bad_directories_are_one_line_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        saes.load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no cfg.json"):
        saes.load(tmp_path / "empty")
    good = tmp_path / "good"
    _random_sae().save(good)
    weights = (good / "sae_weights.safetensors").read_bytes()
    (good / "sae_weights.safetensors").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(UserError, match="corrupt or truncated"):
        saes.load(good)
    (good / "sae_weights.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(UserError, match="corrupt"):
        saes.load(good)
    save_file({"W_enc": torch.zeros(6, 10), "b_enc": torch.zeros(10)}, str(good / "sae_weights.safetensors"))
    with pytest.raises(UserError, match="lacks the weight"):
        saes.load(good)
    (good / "cfg.json").write_text("{not json")
    with pytest.raises(UserError, match="corrupt") as err:
        saes.load(good)
    assert "\n" not in str(err.value)


def test_nan_weights_refused_on_save_and_load(tmp_path):
    sae = _random_sae()
    with torch.no_grad():
        sae.W_dec[0, 0] = float("nan")
    with pytest.raises(UserError, match="NaN"):
        sae.save(tmp_path / "x")
    assert not (tmp_path / "x" / "cfg.json").exists()


def test_from_pretrained_offline_is_user_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="cannot fetch SAE"):
        saes.from_pretrained("no-such-user/no-such-sae-repo", subfolder="layers.3")


def test_from_pretrained_loads_the_fetched_subfolder(monkeypatch, tmp_path):
    """The online path without a network: ``snapshot_download`` stands in for the hub and returns a local snapshot."""
    import huggingface_hub

    sae = _random_sae()
    sae.save(tmp_path / "snapshot" / "layers.3")
    calls = []

    def fake_snapshot_download(repo_id, allow_patterns=None, **kw):
        calls.append((repo_id, allow_patterns))
        return str(tmp_path / "snapshot")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    got = saes.from_pretrained("someone/some-saes", subfolder="/layers.3/")
    assert calls == [("someone/some-saes", ["layers.3/*"])]
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(got, name), getattr(sae, name)), name
    assert (got.k, got.hook_name) == (sae.k, sae.hook_name)


def test_from_stack_folds_scale_into_weights_and_threshold():
    """A member saved from training units (inputs multiplied by c) encodes raw inputs to the training activations / c."""
    from saes.step import StackParams

    S, d, n, c, threshold = 2, 6, 10, 0.25, 0.7
    params = StackParams(S, d, n)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in params.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    x = torch.randn(5, d, generator=g) * 4
    sae = TopKSAE.from_stack(params, 1, 3, activation_scale=c, threshold=threshold)
    W_enc, b_enc, W_dec, b_dec = (p.detach()[1] for p in (params.W_enc, params.b_enc, params.W_dec, params.b_dec))
    pre = (c * x - b_dec) @ W_enc + b_enc  # training units
    want = pre * (pre > threshold) / c
    assert sae.threshold == pytest.approx(threshold / c)
    torch.testing.assert_close(sae.encode(x), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sae.decode(want), ((want * c) @ W_dec + b_dec) / c, atol=1e-5, rtol=1e-5)
