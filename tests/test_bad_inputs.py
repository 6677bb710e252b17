"""Bad-input catalogue (docs/RELIABILITY.md): every case is one line on stderr, exit code 2, files intact.

Cases already covered by other test files are listed in the catalogue and not repeated here.
Full and read-only disks are simulated by injecting ``OSError`` (tests run as root, so chmod
proves nothing).
"""

from __future__ import annotations

import errno
import json
import math
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

import saes
from experiments.cli import app
from interp.files import sha256_file
from interp.store import ActivationStore

HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]


def _invoke(args: list[str]):
    return CliRunner().invoke(app, [str(a) for a in args])


def assert_one_line_error(result, needle: str) -> str:
    """Exit code 2, one 'error:' line on stderr naming ``needle`` (the last line), no traceback.

    Only a progress line of work done before the check (e.g. tokenizing the corpus) may precede it.
    """
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    assert all(line.startswith("tokenizing ") for line in lines[:-1]), result.stderr
    assert needle in errors[0], errors[0]
    assert "Traceback" not in result.output
    return errors[0]


def hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (lock files excluded)."""
    return {str(p.relative_to(root)): sha256_file(p) for p in sorted(Path(root).rglob("*")) if p.is_file() and not p.name.endswith(".lock")}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "doc.txt"
    path.write_text("\n\n".join(f"Paragraph {i} tells of the river, the mill and the miller's flour." for i in range(200)))
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """A 2-hook store of 256 rows (d_in 64, the tiny-random width) in 2 shards."""
    gen = torch.Generator().manual_seed(0)
    path = tmp_path_factory.mktemp("acts") / "store"
    ActivationStore.from_tensors(path, {h: torch.randn(256, 64, generator=gen) for h in HOOKS}, model="tiny-random", shard_rows=128)
    return path


@pytest.fixture()
def store_copy(store, tmp_path) -> Path:
    import shutil

    return Path(shutil.copytree(store, tmp_path / "copy"))


def _harvest(corpus: Path, out: Path, *extra: str) -> list[str]:
    return ["harvest", "--model", "tiny-random", "--hook", HOOKS[0], "--corpus", str(corpus), "--ctx", "16", "--tokens", "40", "--out", str(out), *extra]


def _train(store: Path, out: Path, *extra: str) -> list[str]:
    return ["train-sae", "--acts", str(store), "--hook", HOOKS[0], "--latents", "32", "--k", "4", "--tokens", "256",
            "--batch-size", "64", "--no-progress", "--out", str(out), *extra]


# -- harvest ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--dtype", "float64"], "unsupported store dtype 'float64'"),
        (["--batch-size", "0"], "--batch-size and shard_rows must be positive"),
        (["--device", "tpu"], "unknown device 'tpu'"),
        (["--shard-rows", "0"], "shard_rows must be positive"),
    ],
)
def test_harvest_out_of_range_values(corpus, tmp_path, extra, needle):
    assert_one_line_error(_invoke(_harvest(corpus, tmp_path / "s", *extra)), needle)
    assert not (tmp_path / "s" / "manifest.json").exists()


def test_harvest_ctx_too_short(corpus, tmp_path):
    args = _harvest(corpus, tmp_path / "s")
    args[args.index("--ctx") + 1] = "1"
    assert_one_line_error(_invoke(args), "--ctx must be at least 2")


def test_harvest_out_is_a_file(corpus, tmp_path):
    (tmp_path / "f").write_text("keep me")
    assert_one_line_error(_invoke(_harvest(corpus, tmp_path / "f")), "exists and is a file")
    assert (tmp_path / "f").read_text() == "keep me"


def test_harvest_out_is_a_foreign_directory(corpus, tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.txt").write_text("keep me")
    assert_one_line_error(_invoke(_harvest(corpus, tmp_path / "d")), "is not an activation store (it holds notes.txt)")
    assert sorted(p.name for p in (tmp_path / "d").iterdir() if not p.name.startswith(".")) == ["notes.txt"]


def _failing_replace(code: int, after: int):
    """An ``os.replace`` stand-in that works ``after`` times, then raises OSError(code)."""
    real, calls = os.replace, [0]

    def replace(src, dst):
        calls[0] += 1
        if calls[0] > after:
            raise OSError(code, os.strerror(code), str(dst))
        return real(src, dst)

    return replace


def test_harvest_full_disk_keeps_what_was_written_and_resumes(corpus, tmp_path, monkeypatch):
    out = tmp_path / "s"
    args = _harvest(corpus, out, "--shard-rows", "10", "--batch-size", "1")
    # three renames succeed (shard 0's hook file, its meta, the manifest), the next finds the disk full
    monkeypatch.setattr("interp.files.os.replace", _failing_replace(errno.ENOSPC, 3))
    assert_one_line_error(_invoke(args), "no space left on the device")
    before = hashes(out)
    assert json.loads((out / "manifest.json").read_text())["n_tokens"] > 0 and not any(".tmp" in name for name in before)
    monkeypatch.setattr("interp.files.os.replace", _failing_replace(errno.ENOSPC, 0))
    assert_one_line_error(_invoke(args), "no space left on the device")
    assert hashes(out) == before  # nothing already written was damaged, no temp files left
    monkeypatch.undo()
    assert _invoke(args).exit_code == 0
    clean = tmp_path / "clean"
    assert _invoke(_harvest(corpus, clean, "--shard-rows", "10", "--batch-size", "1")).exit_code == 0
    assert torch.equal(ActivationStore(out).read(HOOKS[0]), ActivationStore(clean).read(HOOKS[0]))


# -- stores -------------------------------------------------------------------------------------


def test_store_manifest_not_json(store_copy):
    (store_copy / "manifest.json").write_text("{truncated")
    assert_one_line_error(_invoke(["store", store_copy]), "is not valid JSON")


def test_store_manifest_missing_keys(store_copy):
    manifest = json.loads((store_copy / "manifest.json").read_text())
    del manifest["d_in"], manifest["shards"]
    (store_copy / "manifest.json").write_text(json.dumps(manifest))
    assert_one_line_error(_invoke(["store", store_copy]), "lacks d_in, shards")


def test_store_from_a_newer_version(store_copy):
    manifest = json.loads((store_copy / "manifest.json").read_text())
    manifest["format_version"] = 99
    (store_copy / "manifest.json").write_text(json.dumps(manifest))
    assert_one_line_error(_invoke(["store", store_copy]), "upgrade interp-workbench")


def test_store_shard_missing(store_copy):
    next(store_copy.glob("shards/blocks.1*/000001.safetensors")).unlink()
    assert_one_line_error(_invoke(["store", store_copy, "--verify"]), "is missing")


def test_store_shard_with_bad_checksum_stops_training(store_copy, tmp_path):
    shard = next(store_copy.glob("shards/blocks.0*/000000.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-4] ^= 0xFF  # same size, one flipped byte
    shard.write_bytes(bytes(data))
    assert_one_line_error(_invoke(_train(store_copy, tmp_path / "run")), "sha256 mismatch")
    assert not list((tmp_path / "run").glob("*/cfg.json"))


def test_train_acts_not_a_store(tmp_path):
    (tmp_path / "d").mkdir()
    assert_one_line_error(_invoke(_train(tmp_path / "d", tmp_path / "run")), "is not an activation store (no manifest.json)")


@pytest.mark.parametrize(
    "hook, pairs, extra, needle",
    [
        ("blocks.5.hook_resid_post", ["--latents", "32", "--k", "4"], [], "'blocks.5.hook_resid_post' is not in the activations"),
        (HOOKS[0], ["--latents", "8", "--k", "8"], [], "must be smaller than n_latents"),
        (HOOKS[0], ["--latents", "32", "--k", "4", "--latents", "16"], [], "give one --k for each --latents"),
        (HOOKS[0], ["--latents", "32", "--k", "4"], ["--dist", "bogus"], "unknown dist 'bogus'"),
        (HOOKS[0], ["--latents", "32", "--k", "4"], ["--lr", "-1"], "lr must be a positive number"),
        (HOOKS[0], ["--latents", "32", "--k", "4"], ["--model", "tiny-random"], "pass exactly one data source"),
        (HOOKS[0], ["--latents", "32", "--k", "4"], ["--device", "bogus"], "unknown device 'bogus'"),
    ] + ([(HOOKS[0], ["--latents", "32", "--k", "4"], ["--device", "cuda"], "no CUDA GPU is available")] if not torch.cuda.is_available() else []),
)
def test_train_bad_options(store, tmp_path, hook, pairs, extra, needle):
    args = ["train-sae", "--acts", store, "--hook", hook, *pairs, "--tokens", "256", "--batch-size", "64", "--no-progress",
            "--out", tmp_path / "run", *extra]
    assert_one_line_error(_invoke(args), needle)
    assert not list((tmp_path / "run").glob("*/cfg.json"))


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_train_on_non_finite_activations(tmp_path, bad):
    x = torch.randn(256, 16, generator=torch.Generator().manual_seed(0))
    x[17, 3] = bad
    ActivationStore.from_tensors(tmp_path / "acts", {"h": x}, model="m")
    args = ["train-sae", "--acts", tmp_path / "acts", "--hook", "h", "--latents", "16", "--k", "2", "--tokens", "128",
            "--batch-size", "64", "--no-progress", "--out", tmp_path / "run"]
    assert_one_line_error(_invoke(args), "NaN or Inf")


def test_train_read_only_output_keeps_the_finished_run(store, tmp_path, monkeypatch):
    out = tmp_path / "run"
    assert _invoke(_train(store, out)).exit_code == 0
    before = hashes(out)

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr("interp.files.tempfile.mkstemp", read_only)
    assert_one_line_error(_invoke(_train(store, out)), "read-only")
    assert hashes(out) == before


# -- SAE files ----------------------------------------------------------------------------------


@pytest.fixture()
def sae_dir(tmp_path) -> Path:
    torch.manual_seed(0)
    saes.TopKSAE(64, 32, 4, hook_name=HOOKS[1], model="tiny-random").save(tmp_path / "sae")
    return tmp_path / "sae"


def _eval(sae: Path, store: Path) -> list[str]:
    return ["eval-sae", "--sae", sae, "--model", "tiny-random", "--store", store, "--tokens", "64", "--no-ce", "--out", sae.parent / "eval.json"]


def test_sae_weights_with_a_bad_header(sae_dir, store):
    (sae_dir / "sae_weights.safetensors").write_bytes((1 << 40).to_bytes(8, "little") + b"{}")
    assert_one_line_error(_invoke(_eval(sae_dir, store)), "corrupt or truncated")


def test_sae_cfg_missing_k(sae_dir, store):
    cfg = json.loads((sae_dir / "cfg.json").read_text())
    for key in ("k", "activation_fn_kwargs"):
        cfg.pop(key)
    (sae_dir / "cfg.json").write_text(json.dumps(cfg))
    assert_one_line_error(_invoke(_eval(sae_dir, store)), "'k'")


def test_sae_weights_disagree_with_each_other(sae_dir, store):
    save_file({"W_enc": torch.zeros(64, 32), "b_enc": torch.zeros(32), "W_dec": torch.zeros(32, 48), "b_dec": torch.zeros(64)},
              str(sae_dir / "sae_weights.safetensors"))
    assert_one_line_error(_invoke(_eval(sae_dir, store)), "has shape")


def test_sae_d_in_does_not_match_the_hook(tmp_path):
    saes.TopKSAE(16, 32, 4, hook_name=HOOKS[1], model="tiny-random").save(tmp_path / "sae")
    args = ["steer", "--model", "tiny-random", "--sae", tmp_path / "sae", "--feature", "1", "--scale", "2", "--prompt", "x",
            "--device", "cpu", "--max-new-tokens", "2"]
    assert_one_line_error(_invoke(args), "expects d_in=16")


def test_sae_feature_out_of_range(sae_dir):
    args = ["steer", "--model", "tiny-random", "--sae", sae_dir, "--feature", "999", "--scale", "2", "--prompt", "x",
            "--device", "cpu", "--max-new-tokens", "2"]
    assert_one_line_error(_invoke(args), "feature ids [999] are out of range")


def test_store_from_another_model(sae_dir, tmp_path):
    gen = torch.Generator().manual_seed(1)
    ActivationStore.from_tensors(tmp_path / "other", {HOOKS[1]: torch.randn(64, 64, generator=gen)}, model="other-model")
    assert_one_line_error(_invoke(_eval(sae_dir, tmp_path / "other")), "holds activations of model 'other-model'")
    assert not (tmp_path / "eval.json").exists()


def test_sae_store_lacks_the_hook(sae_dir, tmp_path):
    ActivationStore.from_tensors(tmp_path / "h0", {HOOKS[0]: torch.randn(64, 64)}, model="tiny-random")
    assert_one_line_error(_invoke(_eval(sae_dir, tmp_path / "h0")), "has no activations for")


# -- study configs ------------------------------------------------------------------------------


def test_run_config_missing(tmp_path):
    assert_one_line_error(_invoke(["run", tmp_path / "nope.toml"]), "does not exist")


def test_run_config_is_a_directory(tmp_path):
    assert_one_line_error(_invoke(["run", tmp_path]), str(tmp_path))


def test_run_config_not_utf8(tmp_path):
    (tmp_path / "c.toml").write_bytes(b"name = \"\xff\xfe\"\n")
    assert_one_line_error(_invoke(["run", tmp_path / "c.toml"]), "c.toml")
