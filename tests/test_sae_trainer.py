"""The SAE training loop: resume parity, stacking parity, metrics, epochs, live data, checkpoints, CLI."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import subprocess
import sys
import textwrap

import pytest
import torch
from typer.testing import CliRunner

from interp.errors import UserError
from interp.store import ActivationStore
from saes.config import TrainConfig, default_lr, sae_name
from saes.trainer import train
from saes.training_log import read_metrics

D_IN, ROWS = 16, 1024
HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]


def _sparse_data(n: int, d: int, n_dirs: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows that are sparse non-negative combinations of ``n_dirs`` unit directions, plus the directions."""
    gen = torch.Generator().manual_seed(seed)
    dirs = torch.nn.functional.normalize(torch.randn(n_dirs, d, generator=gen), dim=-1)
    active = torch.rand(n, n_dirs, generator=gen) < 3 / n_dirs
    coef = active * (1 + torch.rand(n, n_dirs, generator=gen))
    return coef @ dirs + 0.01 * torch.randn(n, d, generator=gen), dirs


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A 2-hook store of 1,024 rows (d_in 16), in 4 shards."""
    acts = {h: _sparse_data(ROWS, D_IN, 24, seed=i)[0] + 3.0 * (i + 1) for i, h in enumerate(HOOKS)}
    return ActivationStore.from_tensors(tmp_path_factory.mktemp("acts") / "store", acts, model="synthetic", shard_rows=256)


def _cfg(**kw) -> TrainConfig:
    base = dict(hooks=HOOKS[:1], settings=[(32, 4)], n_tokens=12 * 64, batch_size=64, checkpoint_every=4, log_every=2,
                init_sample_rows=256, buffer_rows=512, b_dec_init="mean", progress=False, device="cpu", dead_tokens_threshold=256)
    base.update(kw)
    return TrainConfig(**base)


def _weights(saes: dict) -> dict[str, torch.Tensor]:
    return {f"{name}.{p}": getattr(sae, p).detach().clone() for name, sae in saes.items() for p in ("W_enc", "b_enc", "W_dec", "b_dec")}


def _assert_same(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if atol == 0.0:
            assert torch.equal(a[key], b[key]), key
        else:
            torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0, msg=key)


class _Stop(Exception):
    pass


def _stop_at(n: int):
    def hook(step: int, _info: dict) -> None:
        if step == n:
            raise _Stop

    return hook


def test_config_validation_and_schedule():
    assert default_lr(2**14) == pytest.approx(2e-4) and default_lr(4 * 2**14) == pytest.approx(1e-4)
    cfg = _cfg(n_tokens=100 * 64, warmup_frac=0.1, decay_frac=0.2)
    # hand-computed: warmup over 10 steps, flat, then linear decay over the last 20 steps
    assert [cfg.lr_factor(s) for s in (0, 4, 9, 50, 80, 90, 99)] == pytest.approx([0.1, 0.5, 1, 1, 1, 0.5, 0.05])
    assert cfg.fingerprint() == _cfg(n_tokens=100 * 64, warmup_frac=0.1, decay_frac=0.2, checkpoint_every=9).fingerprint()
    assert cfg.fingerprint() != _cfg(n_tokens=100 * 64, warmup_frac=0.1, decay_frac=0.2, seed=1).fingerprint()
    # enc_init_scale = 1.0 (the only value before the option existed) leaves fingerprints as they were then
    old = _cfg(n_tokens=100 * 64, warmup_frac=0.1, decay_frac=0.2, enc_init_scale=1.0)
    plain = {key: value for key, value in old.to_dict().items() if key not in ("checkpoint_every", "log_every", "keep_checkpoints", "device",
                                                                                "progress", "enc_init_scale", "cpu_bf16_encoder",
                                                                                "batch_topk_cap")}
    assert old.fingerprint() == hashlib.sha256(json.dumps(plain, sort_keys=True).encode()).hexdigest()[:16]
    assert cfg.enc_init_scale == pytest.approx(0.57735) and len({cfg.fingerprint(), old.fingerprint(),
                                                                 _cfg(n_tokens=100 * 64, warmup_frac=0.1, decay_frac=0.2, enc_init_scale=0.58).fingerprint()}) == 3
    for bad in (dict(settings=[(32, 32)]), dict(batch_size=0), dict(hooks=[]), dict(dist="ddpp"), dict(n_tokens=10),
                dict(settings=[(32, 4), (32, 4)]), dict(lr=-1.0), dict(enc_init_scale=0.0)):
        with pytest.raises(UserError):
            _cfg(**bad).validate()
    with pytest.raises(UserError, match="did you mean"):
        _cfg(hooks=["blocks.0.hook_resid_pst"]).check_hooks(HOOKS)


def test_config_toml_round_trip(tmp_path):
    cfg = _cfg(hooks=HOOKS, settings=[(32, 4), (64, 8)], lr=1e-3, batch_topk=True, k_aux=5)
    (tmp_path / "c.toml").write_text(cfg.to_toml())
    assert TrainConfig.from_toml(tmp_path / "c.toml") == cfg
    (tmp_path / "bad.toml").write_text("[train]\nlatents = 3\n")
    with pytest.raises(UserError, match="unknown key train.latents"):
        TrainConfig.from_toml(tmp_path / "bad.toml")
    for body, needle in [('settings = [[32]]', r"train.settings\[0\] must have 2 entries \(int, int\), got \[32\]"),
                         ('batch_size = "64"', "train.batch_size must be an integer, got '64'"),
                         ('hooks = "blocks.0.hook_resid_post"', "train.hooks must be a list, got str"),
                         ('lr = true', "train.lr = True has the wrong type; expected float"),
                         ('adam_betas = [0.9]', r"train.adam_betas must have 2 entries")]:
        (tmp_path / "bad.toml").write_text(f"[train]\n{body}\n")
        with pytest.raises(UserError, match=needle):
            TrainConfig.from_toml(tmp_path / "bad.toml")


@pytest.fixture(scope="module")
def full_run(store, tmp_path_factory):
    """Weights and metrics of an uninterrupted 12-step run."""
    out = tmp_path_factory.mktemp("full")
    return _weights(train(store, _cfg(), out)), read_metrics(out / "metrics.jsonl")


def _strip(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "samples_per_s"} for r in rows]


@pytest.mark.parametrize("error, checkpoints", [(_Stop, ["step-00000004"]), (KeyboardInterrupt, ["step-00000004", "step-00000006"])])
def test_resume_after_exception_is_bit_exact(store, full_run, tmp_path, error, checkpoints):
    def stop(step: int, _info: dict) -> None:
        if step == 6:
            raise error

    with pytest.raises(error):
        train(store, _cfg(), tmp_path, on_step=stop)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == checkpoints
    _assert_same(full_run[0], _weights(train(store, _cfg(), tmp_path)))
    assert _strip(read_metrics(tmp_path / "metrics.jsonl")) == _strip(full_run[1])


def test_resume_after_sigkill_is_bit_exact(store, full_run, tmp_path):
    script = textwrap.dedent(f"""
        import os, signal, torch
        torch.set_num_threads({torch.get_num_threads()})
        from interp.store import ActivationStore
        from saes.config import TrainConfig
        from saes.trainer import train
        cfg = TrainConfig(**{_cfg().to_dict()!r})
        def kill(step, info):
            if step == 7:
                os.kill(os.getpid(), signal.SIGKILL)
        train(ActivationStore({str(store.path)!r}), cfg, {str(tmp_path)!r}, on_step=kill)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    _assert_same(full_run[0], _weights(train(store, _cfg(), tmp_path)))


def test_checkpoints_refuse_other_config_or_data_and_skip_corrupt_ones(store, full_run, tmp_path):
    with pytest.raises(_Stop):
        train(store, _cfg(checkpoint_every=2), tmp_path / "run", on_step=_stop_at(5))
    with pytest.raises(UserError, match="different training config"):
        train(store, _cfg(checkpoint_every=2, seed=3), tmp_path / "run")
    # a run from before the default encoder init changed gets told which option resumes it
    with pytest.raises(_Stop):
        train(store, _cfg(checkpoint_every=2, enc_init_scale=1.0), tmp_path / "old", on_step=_stop_at(3))
    with pytest.raises(UserError, match="written with enc_init_scale 1 .*pass --enc-init-scale 1 to resume"):
        train(store, _cfg(checkpoint_every=2), tmp_path / "old")
    wide = ActivationStore.from_tensors(tmp_path / "wide", {HOOKS[0]: torch.randn(512, D_IN + 4)})
    with pytest.raises(UserError, match="trained on other data"):
        train(wide, _cfg(checkpoint_every=2), tmp_path / "run")
    # same model name, hooks, shape and row count, other values: refused too (the scale and epochs would be the old store's)
    other = ActivationStore.from_tensors(tmp_path / "other", {h: 100 * store.read(h) + 50 for h in HOOKS}, model="synthetic", shard_rows=256)
    with pytest.raises(UserError, match=r"trained on other data \(activations [0-9a-f]+, model synthetic, rows 1024; now activations"):
        train(other, _cfg(checkpoint_every=2), tmp_path / "run")
    newest = tmp_path / "run" / "checkpoints" / "step-00000004" / "state-rank0.safetensors"
    newest.write_bytes(newest.read_bytes()[:-8] + b"\0" * 8)
    _assert_same(full_run[0], _weights(train(store, _cfg(checkpoint_every=2), tmp_path / "run")))
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(2, 13, 2))


def test_stacked_saes_equal_each_trained_alone(store, tmp_path):
    settings = [(32, 4), (48, 6)]
    together = train(store, _cfg(hooks=HOOKS, settings=settings, checkpoint_every=0), tmp_path / "all")
    assert sorted(together) == sorted(sae_name(h, n, k) for h in HOOKS for n, k in settings)
    for h in HOOKS:
        for n, k in settings:
            alone = train(store, _cfg(hooks=[h], settings=[(n, k)], checkpoint_every=0), tmp_path / f"{h}{n}")
            name = sae_name(h, n, k)
            _assert_same(_weights({name: together[name]}), _weights(alone), atol=1e-5)


def test_metrics_saved_saes_and_epoch_rollover(store, tmp_path, capsys):
    cfg = _cfg(n_tokens=3 * ROWS, batch_size=128, checkpoint_every=0, log_every=4)
    saes = train(store, cfg, tmp_path)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    fields = {"step", "sae", "hook", "n_latents", "k", "tokens", "epoch", "fvu", "l0", "dead_fraction", "auxk_loss", "lr", "samples_per_s"}
    assert all(fields <= set(r) for r in rows)
    assert [r["step"] for r in rows] == [4, 8, 12, 16, 20, 24]
    assert [r["epoch"] for r in rows] == [0, 0, 1, 1, 2, 2]  # 8 batches of 128 per 1,024-row epoch
    # each rollover is said once, even without a progress bar
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if "starting epoch" in line] == [
        f"data: starting epoch {e} (the activations were all seen; rows reshuffled)" for e in (2, 3)]
    # the logged lr is the schedule's at the step just taken, from the default lr of 32 latents
    assert [r["lr"] for r in rows] == pytest.approx([default_lr(32) * cfg.lr_factor(r["step"] - 1) for r in rows])
    assert rows[-1]["lr"] < rows[0]["lr"] and all(r["samples_per_s"] > 0 for r in rows)
    torch.testing.assert_close(saes[sae_name(HOOKS[0], 32, 4)].W_dec.norm(dim=-1), torch.ones(32))  # unit decoder rows
    assert all(0 < r["l0"] <= 4 for r in rows)
    assert rows[-1]["fvu"] < rows[0]["fvu"]
    assert (tmp_path / "config.toml").read_text().startswith("[train]")
    # the saved SAE works on raw activations: its FVU matches the logged (scaled) FVU's magnitude
    import saes as saes_pkg

    sae = saes_pkg.load(tmp_path / sae_name(HOOKS[0], 32, 4))
    x = store.read(HOOKS[0], 0, 512)
    with torch.no_grad():
        fvu = ((x - sae(x)) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
        assert float(fvu) == pytest.approx(rows[-1]["fvu"], abs=0.15)
    torch.testing.assert_close(sae.W_dec, saes[sae_name(HOOKS[0], 32, 4)].W_dec)


def known_directions_problem(tmp_path, device: str = "cpu") -> tuple[ActivationStore, TrainConfig, torch.Tensor, torch.Tensor]:
    """8,192 rows mixing 2 of 16 known unit directions (d 32), their store, a training config, the data and the directions."""
    gen = torch.Generator().manual_seed(3)
    dirs = torch.nn.functional.normalize(torch.randn(16, 32, generator=gen), dim=-1)
    coef = (torch.rand(8192, 16, generator=gen) < 2 / 16) * (1 + torch.rand(8192, 16, generator=gen))
    x = coef @ dirs + 0.01 * torch.randn(8192, 32, generator=gen)
    store = ActivationStore.from_tensors(tmp_path / "gt", {"h": x}, shard_rows=4096)
    cfg = _cfg(hooks=["h"], settings=[(48, 2)], n_tokens=150 * 128, batch_size=128, lr=1e-2, checkpoint_every=0,
               log_every=50, init_sample_rows=2048, b_dec_init="geometric_median", dead_tokens_threshold=1024, device=device)
    return store, cfg, x, dirs


def test_recovers_known_sparse_directions(tmp_path):
    store, cfg, _, dirs = known_directions_problem(tmp_path)
    sae = train(store, cfg, tmp_path / "run")[sae_name("h", 48, 2)]
    cos = torch.nn.functional.normalize(sae.W_dec.detach(), dim=-1) @ dirs.T
    assert (cos.max(0).values > 0.9).float().mean() >= 0.9


def test_live_model_stream_matches_direct_harvest(tiny_model, tmp_path):
    from saes.streams import LiveStream

    hook = "blocks.1.hook_resid_post"
    windows = torch.randint(0, tiny_model.cfg.d_vocab, (6, 9), generator=torch.Generator().manual_seed(0))
    stream = LiveStream(tiny_model, windows, [hook], batch_size=10, seed=0, model_batch_size=4)
    with torch.inference_mode():
        _, cache = tiny_model.run_with_cache(windows, names_filter=[hook])
    order = stream._order(0)
    direct = cache[hook][order][:, 1:].reshape(-1, cache[hook].shape[-1])
    torch.testing.assert_close(stream.rows(13, 37)[hook], direct[13:37], atol=1e-5, rtol=1e-5)
    batches = stream.batches(0)
    seen = [next(batches) for _ in range(6)]
    assert seen[5][0] == 6 and torch.equal(next(stream.batches(5))[1][hook], seen[5][1][hook])
    assert seen[4][1][hook].shape == (10, tiny_model.cfg.d_model)  # rows 40..50 cross into epoch 1
    cfg = _cfg(hooks=[hook], n_tokens=5 * 16, batch_size=16, checkpoint_every=0, init_sample_rows=32)
    saes = train(tiny_model, cfg, tmp_path, corpus=windows)
    assert saes[sae_name(hook, 32, 4)].d_in == tiny_model.cfg.d_model
    assert len(read_metrics(tmp_path / "metrics.jsonl")) == 3


def test_nan_activations_are_a_user_error(tmp_path):
    x = torch.randn(256, D_IN)
    x[3, 2] = math.nan
    store = ActivationStore.from_tensors(tmp_path / "nan", {"h": x})
    with pytest.raises(UserError, match="NaN"):
        train(store, _cfg(hooks=["h"]), tmp_path / "run")


def test_nan_in_a_later_batch_stops_with_a_user_error_and_keeps_checkpoints(tmp_path):
    """A bad row past the initialisation sample reaches the per-batch check; the checkpoints written before it stay valid."""
    x = torch.randn(1024, D_IN)
    x[900, 5] = math.inf  # with seed 0 its batch comes after the step-2 checkpoint (the shuffle is deterministic)
    store = ActivationStore.from_tensors(tmp_path / "inf", {"h": x})
    cfg = _cfg(hooks=["h"], n_tokens=3 * 1024, batch_size=64, checkpoint_every=2, init_sample_rows=256)
    with pytest.raises(UserError, match="NaN or Inf"):
        train(store, cfg, tmp_path / "run")
    from saes import checkpoint as ckpt

    found = ckpt.latest(tmp_path / "run", cfg.fingerprint())
    assert found is not None and found.step >= 2
    assert not (tmp_path / "run" / sae_name("h", 32, 4)).exists()


def test_batch_topk_saved_threshold_gives_about_k_latents_on_raw_activations(store, tmp_path):
    """The BatchTopK threshold is folded with the input scale: the saved SAE keeps about k latents per raw row."""
    cfg = _cfg(n_tokens=2 * ROWS, batch_size=128, checkpoint_every=0, batch_topk=True, settings=[(64, 4)])
    sae = train(store, cfg, tmp_path)[sae_name(HOOKS[0], 64, 4)]
    saved = json.loads((tmp_path / sae_name(HOOKS[0], 64, 4) / "cfg.json").read_text())
    assert saved["threshold"] == pytest.approx(sae.threshold) and saved["normalize_activations"] == "none"
    with torch.no_grad():
        l0 = (sae.encode(store.read(HOOKS[0], 0, ROWS)) > 0).sum(-1).float().mean()
    assert 2 <= float(l0) <= 8, float(l0)  # an unfolded threshold (off by the scale, ~1/3 here) keeps several times more


def test_progress_bar_shows_steps_and_status(store, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # rich abbreviates columns on narrow terminals
    train(store, _cfg(checkpoint_every=0, progress=True), tmp_path)
    err = capsys.readouterr().err
    assert "train-sae" in err and "12/12" in err and "fvu " in err, err


def _cli(*args: str):
    from experiments.cli import app

    return CliRunner().invoke(app, ["train-sae", *args])


def test_cli_trains_and_rejects_bad_input(store, tmp_path):
    common = ["--acts", str(store.path), "--hook", HOOKS[0], "--tokens", "256", "--batch-size", "64", "--no-progress"]
    ok = _cli(*common, "--latents", "32", "--k", "4", "--latents", "40", "--k", "5", "--out", str(tmp_path / "run"))
    assert ok.exit_code == 0, ok.output
    for n, k in ((32, 4), (40, 5)):
        cfg = json.loads((tmp_path / "run" / sae_name(HOOKS[0], n, k) / "cfg.json").read_text())
        assert (cfg["d_in"], cfg["d_sae"], cfg["k"], cfg["hook_name"]) == (D_IN, n, k, HOOKS[0])
    assert {r["sae"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")} == {sae_name(HOOKS[0], 32, 4), sae_name(HOOKS[0], 40, 5)}
    bad = {
        "k >= n_latents": [*common, "--latents", "8", "--k", "8"],
        "counts": [*common, "--latents", "32", "--latents", "64", "--k", "4"],
        "hook": ["--acts", str(store.path), "--hook", "blocks.9.hook_resid_post", "--tokens", "256", "--batch-size", "64"],
        "store": ["--acts", str(tmp_path / "nowhere"), "--hook", HOOKS[0], "--tokens", "256", "--batch-size", "64"],
        "dist": [*common, "--dist", "ddp"],
        "init scale": [*common, "--enc-init-scale", "-1"],
    }
    for why, args in bad.items():
        result = _cli(*args, "--out", str(tmp_path / "bad"))
        assert result.exit_code == 2, (why, result.output)
        assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, (why, result.stderr)
    assert not (tmp_path / "bad").exists()


def tiny_live_source(tmp_path) -> tuple:
    """A local tiny Llama directory and a small corpus file: what a live ``--model DIR --corpus FILE`` run needs offline."""
    from test_models import _save_tiny_llama

    model_dir = tmp_path / "tiny-llama"
    _save_tiny_llama(model_dir)
    text = tmp_path / "corpus.txt"
    text.write_text("\n\n".join(f"Paragraph {i}: the river runs past the mill, and the miller counts {i} sacks of grain." for i in range(60)))
    return model_dir, text


def test_cli_trains_live_from_a_local_model_directory(tmp_path):
    """``train-sae --model DIR --corpus FILE``: the offline path a user with a local HF directory takes; equal to the library call."""
    from interp.models import load_model

    model_dir, text = tiny_live_source(tmp_path)
    hook = "blocks.1.hook_resid_post"
    args = ["--model", str(model_dir), "--corpus", str(text), "--hook", hook, "--latents", "16", "--k", "2", "--tokens", "96",
            "--batch-size", "32", "--checkpoint-every", "0", "--log-every", "1", "--no-progress", "--device", "cpu"]
    result = _cli(*args, "--out", str(tmp_path / "cli"))
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "cli" / sae_name(hook, 16, 2) / "cfg.json").read_text())
    assert (saved["d_in"], saved["d_sae"], saved["hook_name"]) == (32, 16, hook)
    assert [r["step"] for r in read_metrics(tmp_path / "cli" / "metrics.jsonl")] == [1, 2, 3]
    cfg = TrainConfig(hooks=[hook], settings=[(16, 2)], n_tokens=96, batch_size=32, checkpoint_every=0, log_every=1, progress=False,
                      device="cpu", corpus=str(text))
    library = train(load_model(str(model_dir), device="cpu"), cfg, tmp_path / "lib")
    import saes as saes_pkg

    _assert_same(_weights({"cli": saes_pkg.load(tmp_path / "cli" / sae_name(hook, 16, 2))}), _weights({"cli": library[sae_name(hook, 16, 2)]}))


def test_cli_cpu_bf16_encoder_is_recorded_and_changes_the_fingerprint(store, tmp_path):
    common = ["--acts", str(store.path), "--hook", HOOKS[0], "--tokens", "128", "--batch-size", "64", "--no-progress",
              "--latents", "32", "--k", "4", "--checkpoint-every", "0"]
    result = _cli(*common, "--cpu-bf16-encoder", "--out", str(tmp_path / "bf16"))
    assert result.exit_code == 0, result.output
    cfg = TrainConfig.from_toml(tmp_path / "bf16" / "config.toml")
    assert cfg.cpu_bf16_encoder is True
    assert cfg.fingerprint() != TrainConfig.from_dict({**cfg.to_dict(), "cpu_bf16_encoder": False}).fingerprint()


def test_a_ctrl_c_inside_a_step_is_held_until_it_ends_and_a_second_one_is_not():
    import os
    import signal

    from saes.trainer import _HeldInterrupt

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # a background shell may start us with SIGINT ignored
    try:
        done = []
        with pytest.raises(KeyboardInterrupt):
            with _HeldInterrupt():
                os.kill(os.getpid(), signal.SIGINT)
                done.append("rest of the step")  # runs: the first Ctrl-C is held
        assert done == ["rest of the step"]
        with pytest.raises(KeyboardInterrupt):
            with _HeldInterrupt():
                os.kill(os.getpid(), signal.SIGINT)
                os.kill(os.getpid(), signal.SIGINT)
                done.append("not reached")
        assert done == ["rest of the step"]
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
        with _HeldInterrupt():
            pass  # no Ctrl-C: nothing raised
    finally:
        signal.signal(signal.SIGINT, previous)


def test_live_stream_identity_names_model_rows_and_token_windows():
    from types import SimpleNamespace

    from saes.streams import LiveStream

    model = SimpleNamespace(cfg=SimpleNamespace(model_name="tiny"))
    windows = torch.arange(40).view(4, 10)
    one = LiveStream(model, windows, ["h"], 8, 0).identity()
    assert one == LiveStream(model, windows.clone(), ["h"], 8, 0).identity()
    assert one["model"] == "tiny" and one["rows"] == 4 * 9
    other = windows.clone()
    other[2, 3] += 1
    assert LiveStream(model, other, ["h"], 8, 0).identity()["tokens"] != one["tokens"]


def test_a_diverged_run_writes_no_checkpoint_over_the_good_ones(store, tmp_path):
    """Checkpoints come every step here but divergence is only logged every 10: the NaN weights must not be saved."""
    from safetensors.torch import load_file

    with pytest.raises(UserError, match=r"training diverged by step \d+: .* has NaN/Inf weights, so no checkpoint was written"):
        train(store, _cfg(lr=1e30, log_every=10, checkpoint_every=1, keep_checkpoints=2), tmp_path)
    states = sorted((tmp_path / "checkpoints").glob("step-*/state-rank0.safetensors"))
    assert states, "the steps before the divergence were checkpointed"
    for path in states:
        tensors = load_file(str(path))
        params = {name: t for name, t in tensors.items() if ".param." in name}
        assert params and all(torch.isfinite(t).all() for t in params.values()), (path, [n for n, t in params.items() if not torch.isfinite(t).all()])


def test_default_dead_window_is_a_tenth_of_the_run_capped_at_10m(store, tmp_path):
    """A fixed 10M-token window never fires in a shorter run: AuxK and dead_fraction must work in a default run."""
    def window(n_tokens: int, batch: int = 4096, given: int | None = None) -> int:
        return TrainConfig(hooks=["h"], n_tokens=n_tokens, batch_size=batch, dead_tokens_threshold=given).dead_tokens()

    assert window(400_000) == 40_000 and window(2_000_000) == 200_000 and window(10**9) == 10_000_000
    assert window(5_000) == 4096 and window(400_000, given=256) == 256  # at least one batch; an explicit window wins
    # runs long enough for the old fixed default keep their fingerprints (their checkpoints still resume)
    long = dict(hooks=["h"], n_tokens=10**9)
    assert TrainConfig(**long).fingerprint() == TrainConfig(**long, dead_tokens_threshold=10_000_000).fingerprint()
    assert TrainConfig(hooks=["h"]).fingerprint() != TrainConfig(hooks=["h"], dead_tokens_threshold=10_000_000).fingerprint()
    # a default run of 40 steps (window 4 steps): latents that stop firing are counted dead and AuxK trains them
    train(store, _cfg(dead_tokens_threshold=None, n_tokens=40 * 64, checkpoint_every=0, log_every=1, settings=[(128, 2)]), tmp_path / "run")
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert any(r["dead_fraction"] > 0 for r in rows) and any(r["auxk_loss"] > 0 for r in rows)
    assert TrainConfig.from_toml(tmp_path / "run" / "config.toml").dead_tokens() == 256


def test_checkpoints_from_the_old_fixed_dead_window_say_how_to_resume(store, tmp_path):
    with pytest.raises(_Stop):
        train(store, _cfg(dead_tokens_threshold=10_000_000), tmp_path, on_step=_stop_at(4))
    with pytest.raises(UserError, match="dead-latent window of 10,000,000 tokens .*pass --dead-tokens 10000000 to resume"):
        train(store, _cfg(dead_tokens_threshold=None), tmp_path)
    assert len(train(store, _cfg(dead_tokens_threshold=10_000_000), tmp_path)) == 1  # as told: it resumes
    both = tmp_path / "both"  # written before both defaults changed: one hint names both flags
    with pytest.raises(_Stop):
        train(store, _cfg(dead_tokens_threshold=10_000_000, enc_init_scale=1.0), both, on_step=_stop_at(4))
    with pytest.raises(UserError, match="pass --enc-init-scale 1 --dead-tokens 10000000 to resume"):
        train(store, _cfg(dead_tokens_threshold=None), both)


@pytest.mark.parametrize("extra, env, want", [
    (["--device", "cpu"], {}, "cpu"),
    (["--device", "cuda", "--dist", "ddp"], {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2"}, "cuda:1"),
    (["--dist", "shard"], {"RANK": "3", "LOCAL_RANK": "0", "WORLD_SIZE": "4"}, "cuda:0"),
])
def test_cli_live_model_loads_on_this_ranks_device(tmp_path, monkeypatch, extra, env, want):
    """Under torchrun each rank's model harvests on its own GPU (it used to load on the default, cuda:0, on every rank)."""
    import interp.models

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    seen = []

    def fake_load(name, device=None, dtype=None, trust_remote_code=False):
        seen.append(torch.device(device))
        raise UserError("stop here")

    monkeypatch.setattr(interp.models, "load_model", fake_load)
    result = _cli("--model", "some-model", "--hook", HOOKS[0], "--latents", "32", "--k", "4", *extra, "--out", str(tmp_path / "run"))
    assert result.exit_code == 2 and "stop here" in result.stderr, result.output
    assert seen == [torch.device(want)]


def test_cli_config_file_with_flags_on_top(store, tmp_path):
    """``--config`` starts from a [train] table (a run's own config.toml re-runs it); flags typed on the command line win."""
    base = _cfg(hooks=HOOKS, settings=[(32, 4), (48, 6)], n_tokens=4 * 64, k_aux=5, aux_coef=0.25, threshold_momentum=0.05,
                batch_topk=True, log_every=1)
    (tmp_path / "train.toml").write_text(base.to_toml())
    result = _cli("--config", str(tmp_path / "train.toml"), "--acts", str(store.path), "--seed", "3", "--latents", "40", "--k", "5",
                  "--out", str(tmp_path / "run"))
    assert result.exit_code == 0, result.output
    got = TrainConfig.from_toml(tmp_path / "run" / "config.toml")
    assert got == dataclasses.replace(base, seed=3, settings=[(40, 5)])
    assert sorted(p.parent.name for p in (tmp_path / "run").glob("*/cfg.json")) == sorted(sae_name(h, 40, 5) for h in HOOKS)
    # the run's own config.toml re-runs it (same weights)
    again = _cli("--config", str(tmp_path / "run" / "config.toml"), "--acts", str(store.path), "--out", str(tmp_path / "again"))
    assert again.exit_code == 0, again.output
    import saes as saes_pkg

    for h in HOOKS:
        name = sae_name(h, 40, 5)
        _assert_same(_weights({name: saes_pkg.load(tmp_path / "run" / name)}), _weights({name: saes_pkg.load(tmp_path / "again" / name)}))
    # one half of the pairs typed: the other half is the file's, setting by setting
    for typed, want in ((["--latents", "64", "--latents", "96"], [(64, 4), (96, 6)]), (["--k", "3", "--k", "5"], [(32, 3), (48, 5)])):
        out = tmp_path / f"half-{typed[0]}"
        half = _cli("--config", str(tmp_path / "train.toml"), "--acts", str(store.path), *typed, "--tokens", "64", "--out", str(out))
        assert half.exit_code == 0, half.output
        assert TrainConfig.from_toml(out / "config.toml").settings == want
    one = _cli("--config", str(tmp_path / "train.toml"), "--acts", str(store.path), "--k", "3", "--out", str(tmp_path / "one"))
    assert one.exit_code == 2 and "has 2 settings but 1 --k were given; pass both --latents and --k" in one.stderr, one.output
    # the AuxK/init flags reach the config without a file too
    flags = _cli("--acts", str(store.path), "--hook", HOOKS[0], "--latents", "32", "--k", "4", "--tokens", "128", "--batch-size", "64",
                 "--k-aux", "7", "--aux-coef", "0.5", "--b-dec-init", "mean", "--threshold-momentum", "0.2", "--no-progress",
                 "--checkpoint-every", "0", "--out", str(tmp_path / "flags"))
    assert flags.exit_code == 0, flags.output
    got = TrainConfig.from_toml(tmp_path / "flags" / "config.toml")
    assert (got.k_aux, got.aux_coef, got.b_dec_init, got.threshold_momentum) == (7, 0.5, "mean", 0.2)
    (tmp_path / "bad.toml").write_text("[train]\nlatents = 3\n")
    bad = _cli("--config", str(tmp_path / "bad.toml"), "--acts", str(store.path), "--out", str(tmp_path / "bad"))
    assert bad.exit_code == 2 and bad.stderr.count("\n") == 1 and "unknown key train.latents" in bad.stderr, bad.output
