"""Harvesting: parity with run_with_cache, contexts, exact counts, kill -9 and resume, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from interp.activations import _stop_layer, harvest
from interp.errors import UserError
from interp.store import ActivationStore

HOOKS = ["blocks.0.hook_resid_pre", "blocks.1.hook_mlp_out"]
BOS = 1


def _windows(n: int = 12, ctx: int = 16, seed: int = 0) -> torch.Tensor:
    """Token windows shaped like pack_windows output: BOS then ordinary token ids."""
    windows = torch.randint(3, 2000, (n, ctx), generator=torch.Generator().manual_seed(seed))
    windows[:, 0] = BOS
    return windows


def test_store_equals_run_with_cache_and_contexts_rebuild(tiny_model, tmp_path):
    windows = _windows()
    store = harvest(tiny_model, windows, HOOKS, n_tokens=150, batch_size=4, out=tmp_path / "s", shard_rows=40, progress=False)
    assert store.n_tokens == 150 and store.n_shards == 3 and store.complete
    _, cache = tiny_model.run_with_cache(windows, names_filter=HOOKS)
    keep = windows != BOS
    for hook in HOOKS:
        key = hook if hook in cache else "blocks.0.hook_in"  # resid_pre is cached under its alias
        reference = cache[key][keep][:150]
        assert torch.allclose(store.read(hook), reference, atol=1e-5, rtol=1e-5)
        assert store.d_in(hook) == tiny_model.cfg.d_model
    # 150 rows = 10 whole windows of 15 non-BOS tokens; the BOS positions are never stored
    assert torch.equal(store.tokens(), windows[keep][:150])
    rows = torch.tensor([0, 14, 15, 77, 149])
    contexts, positions = store.windows(rows)
    assert torch.equal(contexts, windows[rows // 15]) and torch.equal(positions, rows % 15 + 1)
    assert torch.equal(contexts[torch.arange(5), positions], store.tokens()[rows])
    assert store.manifest["corpus"]["name"] == "tensor" and store.manifest["model"] == "tiny-random"
    store.verify()


def test_partial_last_window_and_special_positions(tiny_model, tmp_path):
    windows = _windows(n=6, ctx=8)
    part = harvest(tiny_model, windows, ["blocks.0.hook_resid_post"], n_tokens=10, batch_size=8, out=tmp_path / "a", progress=False)
    assert torch.equal(part.tokens(), torch.cat([windows[0, 1:], windows[1, 1:4]]))
    assert part.manifest["n_windows"] == 2
    full = harvest(tiny_model, windows, ["blocks.0.hook_resid_post"], n_tokens=10, include_special=True, out=tmp_path / "b", progress=False)
    assert torch.equal(full.tokens(), torch.cat([windows[0], windows[1, :2]]))
    _, cache = tiny_model.run_with_cache(windows[:2], names_filter=["blocks.0.hook_resid_post"])
    assert torch.allclose(full.read("blocks.0.hook_resid_post"), cache["blocks.0.hook_resid_post"].reshape(-1, 64)[:10], atol=1e-5)


def test_reduced_precision_store(tiny_model, tmp_path):
    windows = _windows(n=4)
    f32 = harvest(tiny_model, windows, HOOKS[:1], n_tokens=40, out=tmp_path / "f", progress=False)
    bf16 = harvest(tiny_model, windows, HOOKS[:1], n_tokens=40, out=tmp_path / "b", dtype="bfloat16", progress=False)
    assert torch.equal(bf16.read(HOOKS[0]), f32.read(HOOKS[0]).bfloat16().float())
    assert bf16.manifest["dtype"] == "bfloat16"


def test_stop_layer_is_just_past_the_deepest_hook():
    assert _stop_layer(["blocks.0.hook_resid_post"], 30) == 1
    assert _stop_layer(["blocks.3.attn.hook_z", "blocks.12.hook_mlp_out"], 30) == 13
    assert _stop_layer(["embed.hook_out"], 30) == 1
    assert _stop_layer(["blocks.29.hook_resid_post"], 30) is None
    assert _stop_layer(["blocks.0.hook_resid_post", "ln_final.hook_normalized"], 30) is None


def test_finished_harvest_reports_complete_and_other_config_is_refused(tiny_model, tmp_path):
    windows = _windows(n=4)
    messages = []
    first = harvest(tiny_model, windows, HOOKS, n_tokens=30, out=tmp_path / "s", progress=False)
    before = first.read(HOOKS[1])
    again = harvest(tiny_model, windows, HOOKS, n_tokens=30, out=tmp_path / "s", progress=False, on_status=messages.append)
    assert messages and messages[0].startswith("already complete") and torch.equal(again.read(HOOKS[1]), before)
    with pytest.raises(UserError, match="different config.*seed"):
        harvest(tiny_model, _windows(n=4, seed=1), HOOKS, n_tokens=30, seed=5, out=tmp_path / "s", progress=False)
    assert torch.equal(ActivationStore(tmp_path / "s").read(HOOKS[1]), before)  # nothing damaged
    replaced = harvest(tiny_model, windows, HOOKS[:1], n_tokens=20, out=tmp_path / "s", overwrite=True, progress=False)
    assert replaced.hooks == HOOKS[:1] and replaced.n_tokens == 20


def test_bad_library_inputs(tiny_model, tmp_path):
    windows = _windows(n=2)
    with pytest.raises(UserError, match="did you mean: blocks.0.hook_resid_post"):
        harvest(tiny_model, windows, ["blocks.0.hook_resid_pst"], n_tokens=5, out=tmp_path / "a")
    with pytest.raises(UserError, match="positive"):
        harvest(tiny_model, windows, HOOKS, n_tokens=0, out=tmp_path / "a")
    with pytest.raises(UserError, match="only 30 tokens"):
        harvest(tiny_model, windows, HOOKS, n_tokens=31, out=tmp_path / "a")
    with pytest.raises(UserError, match=r"not \[batch, position"):
        harvest(tiny_model, windows, ["blocks.0.attn.hook_pattern"], n_tokens=5, out=tmp_path / "a")
    (tmp_path / "busy").mkdir()
    from filelock import FileLock

    with FileLock(tmp_path / "busy" / ".harvest.lock"), pytest.raises(UserError, match="another harvest"):
        harvest(tiny_model, windows, HOOKS, n_tokens=5, out=tmp_path / "busy", progress=False)
    assert not (tmp_path / "a" / "manifest.json").exists()  # failed runs leave no store behind
    assert harvest(tiny_model, windows, HOOKS, n_tokens=5, out=tmp_path / "a", progress=False).n_tokens == 5


_KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys, torch
    import interp, interp.store_manifest as sm
    from interp.activations import harvest
    target, kill_at = sys.argv[2], int(sys.argv[3])
    real = getattr(sm, target)
    calls = [0]
    def dying(*args, **kwargs):
        calls[0] += 1
        if calls[0] == kill_at:
            if target == "atomic_write_bytes":  # die half-way through writing the temp file
                path = args[0]
                os.makedirs(os.path.dirname(path), exist_ok=True)
                open(os.path.join(os.path.dirname(path), "." + os.path.basename(path) + ".x.tmp"), "wb").write(args[1][:100])
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)
    setattr(sm, target, dying)
    windows = torch.randint(3, 2000, (12, 16), generator=torch.Generator().manual_seed(0))
    windows[:, 0] = 1
    harvest(interp.load_model("tiny-random", device="cpu"), windows, {hooks!r}, n_tokens=150, batch_size=4,
            out=sys.argv[1], shard_rows=40, progress=False)
    """
)


# kill points: inside the first shard (no manifest yet), half-way through shard 1's second file,
# and after shard 1's files but before the manifest lists them
@pytest.mark.parametrize("target, kill_at", [("atomic_write_bytes", 2), ("atomic_write_bytes", 5), ("atomic_write_json", 2)])
def test_sigkill_then_resume_equals_uninterrupted_run(tiny_model, tmp_path, target, kill_at):
    out = tmp_path / "killed"
    script = _KILL_SCRIPT.format(hooks=HOOKS)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script, str(out), target, str(kill_at)], env=env, capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    if kill_at == 2 and target == "atomic_write_bytes":
        assert not (out / "manifest.json").exists() and any(out.glob("shards/*/*"))
    else:
        interrupted = json.loads((out / "manifest.json").read_text())
        assert not interrupted["complete"] and interrupted["n_tokens"] == 60
    windows = _windows()
    kwargs = dict(n_tokens=150, batch_size=4, shard_rows=40, progress=False)
    resumed = harvest(tiny_model, windows, HOOKS, out=out, **kwargs)
    clean = harvest(tiny_model, windows, HOOKS, out=tmp_path / "clean", **kwargs)
    assert resumed.manifest["shards"] == clean.manifest["shards"]  # same files, same sha256
    for hook in HOOKS:
        assert torch.equal(resumed.read(hook), clean.read(hook))
    assert torch.equal(resumed.tokens(), clean.tokens())
    on_disk = {p.relative_to(out) for p in Path(out).rglob("*") if p.is_file() and p.name != ".harvest.lock"}
    assert on_disk == {p.relative_to(tmp_path / "clean") for p in (tmp_path / "clean").rglob("*") if p.is_file() and p.name != ".harvest.lock"}
    resumed.verify()


def _cli(args: list[str]):
    from experiments.cli import app

    return CliRunner().invoke(app, ["harvest", *args])


def _assert_one_line_error(result, pattern: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert pattern in lines[0], lines[0]


def test_cli_harvest_resume_and_bad_inputs(tmp_path):
    text = tmp_path / "doc.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    base = ["--model", "tiny-random", "--hook", "blocks.0.hook_resid_post", "--corpus", str(text), "--ctx", "16"]
    out = str(tmp_path / "s")
    ok = _cli([*base, "--tokens", "60", "--out", out])
    assert ok.exit_code == 0, ok.output
    assert ActivationStore(out).n_tokens == 60
    again = _cli([*base, "--tokens", "60", "--out", out])
    assert again.exit_code == 0 and "already complete" in again.output
    _assert_one_line_error(_cli([*base, "--tokens", "61", "--out", out]), "different config")
    _assert_one_line_error(_cli([*base, "--tokens", "0", "--out", out]), "--tokens must be a positive")
    _assert_one_line_error(_cli(["--model", "tiny-randm", *base[2:], "--tokens", "5", "--out", out]), "unknown model")
    bad_hook = ["--model", "tiny-random", "--hook", "blocks.0.hook_resid_pots", "--corpus", str(text)]
    _assert_one_line_error(_cli([*bad_hook, "--tokens", "5", "--out", out]), "did you mean: blocks.0.hook_resid_post")
    missing = ["--model", "tiny-random", "--hook", "blocks.0.hook_resid_post", "--corpus", str(tmp_path / "nope.txt")]
    _assert_one_line_error(_cli([*missing, "--tokens", "5", "--out", str(tmp_path / "m")]), "nope.txt")
    (tmp_path / "empty.txt").write_text("")
    empty = ["--model", "tiny-random", "--hook", "blocks.0.hook_resid_post", "--corpus", str(tmp_path / "empty.txt")]
    _assert_one_line_error(_cli([*empty, "--tokens", "5", "--out", str(tmp_path / "e")]), "empty")
    assert ActivationStore(out).n_tokens == 60  # the refused runs left the store as it was
    from experiments.cli import app

    info = CliRunner().invoke(app, ["store", out, "--verify"])
    assert info.exit_code == 0 and "complete" in info.output and "verified 1 shard" in info.output
    shard = next(Path(out).glob("shards/blocks.0.hook_resid_post/*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-8])
    _assert_one_line_error(CliRunner().invoke(app, ["store", out, "--verify"]), "corrupted or truncated")


@pytest.mark.model
def test_real_model_harvest_matches_run_with_cache(smollm2, tmp_path):
    text = tmp_path / "doc.txt"
    text.write_text("".join(f"On day {i} the river ran past the old mill, and the miller counted {i * 7} sacks of flour before dawn.\n\n" for i in range(60)))
    hooks = ["blocks.2.hook_resid_post", "blocks.3.hook_mlp_out"]
    store = harvest(smollm2, str(text), hooks, n_tokens=300, ctx=64, batch_size=4, out=tmp_path / "s", progress=False)
    assert store.n_tokens == 300 and store.d_in(hooks[0]) == 576 and store.model == "smollm2-135m"
    windows, positions = store.windows(torch.arange(300))
    first = torch.unique_consecutive(windows, dim=0)
    assert (first[:, 0] == smollm2.tokenizer.bos_token_id).all() and (positions > 0).all()
    _, cache = smollm2.run_with_cache(first, names_filter=hooks, stop_at_layer=4)
    for hook in hooks:
        assert torch.allclose(store.read(hook), cache[hook][:, 1:].reshape(-1, 576)[:300], atol=1e-4, rtol=1e-4)
