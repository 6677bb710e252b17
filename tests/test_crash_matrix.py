"""Crash matrix: SIGKILL `interp harvest`, `interp train-sae` and `interp run` at named points, then resume.

Each case starts the real CLI in a subprocess with ``INTERP_FAULT=point:n`` (see
:mod:`interp.faults`), so the process kills itself at exactly that moment, with no cleanup, as a
pre-empted job would. The same command is then re-run in-process and must give exactly what an
uninterrupted run gives: the same store (manifest, every row of every hook, tokens; no row lost
or repeated) and bit-identical SAE weights. The subprocesses use the pytest process's torch thread
count, so CPU results are comparable bit for bit. Seeded random kill points come from
``random.Random(SEED)``. SIGINT (Ctrl-C) must stop cleanly with one line saying how to resume.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from experiments.cli import app
from interp.store import ActivationStore

SEED = 8
_rng = random.Random(SEED)
HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
# 600 tokens, 4 windows of 15 stored tokens per batch, shards of >= 100 rows: 5 shards, 2 hook files each
HARVEST = ["--model", "tiny-random", *sum((["--hook", h] for h in HOOKS), []), "--ctx", "16", "--batch-size", "4",
           "--tokens", "600", "--shard-rows", "100"]
# two SAEs of different shapes, 12 steps, checkpoints at steps 3, 6, 9, 12
TRAIN = ["--hook", HOOKS[1], "--latents", "32", "--k", "4", "--latents", "48", "--k", "4", "--tokens", "1200",
         "--batch-size", "100", "--checkpoint-every", "3", "--no-progress"]
N_STEPS, N_SHARD_FILES = 12, 10
STUDY = """
name = "crash"
seed = 0
out = "{out}"
[model]
name = "tiny-random"
[harvest]
corpus = "{corpus}"
hooks = ["blocks.1.hook_resid_post"]
n_tokens = 600
ctx = 16
batch_size = 4
[sae]
settings = [{{ n_latents = 32, k = 4 }}]
n_tokens = 1200
batch_size = 100
checkpoint_every = 3
[eval]
n_tokens = 64
[dashboard]
enabled = false
[probes]
enabled = false
[steer]
enabled = false
"""


def _env(fault: str) -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "INTERP_FAULT": fault,
            "OMP_NUM_THREADS": str(torch.get_num_threads()), "PYTHONUNBUFFERED": "1"}


def _interp(args: list[str], fault: str) -> subprocess.CompletedProcess:
    """Run ``interp ARGS`` in a subprocess that injects ``fault``."""
    # A shell running pytest in the background starts it with SIGINT ignored, and children inherit
    # that: restore the default so the injected Ctrl-C reaches Python's KeyboardInterrupt handler.
    return subprocess.run([sys.executable, "-m", "experiments.cli", *args], env=_env(fault), capture_output=True, text=True, timeout=300,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _cli(args: list[str]):
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return result


def _assert_killed(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == -signal.SIGKILL, f"rc={proc.returncode}\n{proc.stderr[-3000:]}"


def assert_same_store(a: str | Path, b: str | Path) -> None:
    """Same manifest shards (files and sha256), same rows at every hook, same tokens, no stray files."""
    sa, sb = ActivationStore(a), ActivationStore(b)
    assert sa.complete and sb.complete
    assert sa.manifest["shards"] == sb.manifest["shards"]
    assert sa.n_tokens == sb.n_tokens
    for hook in sb.hooks:
        assert torch.equal(sa.read(hook), sb.read(hook)), hook
    assert torch.equal(sa.tokens(), sb.tokens())
    files = [{p.relative_to(root) for p in Path(root).rglob("*") if p.is_file() and p.name != ".harvest.lock"} for root in (a, b)]
    assert files[0] == files[1]
    sa.verify()


def assert_same_saes(a: Path, b: Path) -> None:
    """Every SAE directory under ``b`` exists under ``a`` with bit-identical weights and the same cfg."""
    names = sorted(p.parent.name for p in b.glob("*/cfg.json"))
    assert names and names == sorted(p.parent.name for p in a.glob("*/cfg.json"))
    for name in names:
        wa, wb = load_file(a / name / "sae_weights.safetensors"), load_file(b / name / "sae_weights.safetensors")
        assert wa.keys() == wb.keys()
        for key in wb:
            assert torch.equal(wa[key], wb[key]), f"{name}/{key}"
        assert json.loads((a / name / "cfg.json").read_text()) == json.loads((b / name / "cfg.json").read_text())


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "doc.txt"
    words = "the quick brown fox jumps over a lazy dog while an old miller counts his sacks of flour at dawn".split()
    # 400 distinct documents, so that the held-out eval split (about 2%) is not empty
    path.write_text("\n\n".join(" ".join(words[(i * j) % len(words)] for j in range(30)) + f" {i}." for i in range(400)))
    return path


@pytest.fixture(scope="module")
def reference_store(corpus, tmp_path_factory) -> Path:
    """An uninterrupted harvest (in-process)."""
    out = tmp_path_factory.mktemp("ref") / "store"
    _cli(["harvest", *HARVEST, "--corpus", str(corpus), "--out", str(out)])
    assert ActivationStore(out).n_shards == 5
    return out


@pytest.fixture(scope="module")
def reference_saes(reference_store, tmp_path_factory) -> Path:
    """An uninterrupted SAE training run on the reference store (in-process)."""
    out = tmp_path_factory.mktemp("ref") / "train"
    _cli(["train-sae", "--acts", str(reference_store), *TRAIN, "--out", str(out)])
    return out


HARVEST_POINTS = [
    "store.shard_file:1",  # mid-shard: first shard's first hook file written, no manifest yet
    "store.shard_file:5",  # mid-shard: shard 2's first hook file written, not its second nor its meta
    "store.before_manifest:2",  # between shard 1's renames and the manifest update
    "store.before_finish:1",  # every shard listed, store not yet marked complete
    f"store.shard_file:{_rng.randint(1, N_SHARD_FILES)}",  # seeded random point
]


@pytest.mark.parametrize("fault", HARVEST_POINTS)
def test_harvest_killed_then_resumed_equals_uninterrupted(fault, corpus, reference_store, tmp_path):
    out = tmp_path / "store"
    args = ["harvest", *HARVEST, "--corpus", str(corpus), "--out", str(out)]
    _assert_killed(_interp(args, fault))
    manifest = out / "manifest.json"
    stored = json.loads(manifest.read_text()) if manifest.exists() else {"complete": False, "n_tokens": 0}
    assert not stored["complete"]
    resumed = _cli(args)
    assert ("resuming at token" in resumed.output) == (stored["n_tokens"] > 0), resumed.output
    assert_same_store(out, reference_store)


TRAIN_POINTS = [
    "checkpoint.before_commit:2",  # mid-checkpoint: step 6's state file written, meta.json not
    "train.sae_saved:1",  # every step done, first SAE directory written, second not
    f"train.step:{_rng.randint(1, N_STEPS - 1)}",  # seeded random step
]


@pytest.mark.parametrize("fault", TRAIN_POINTS)
def test_train_killed_then_resumed_equals_uninterrupted(fault, reference_store, reference_saes, tmp_path):
    out = tmp_path / "train"
    args = ["train-sae", "--acts", str(reference_store), *TRAIN, "--out", str(out)]
    _assert_killed(_interp(args, fault))
    _cli(args)
    assert_same_saes(out, reference_saes)


@pytest.fixture(scope="module")
def reference_study(corpus, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("study")
    cfg = root / "crash.toml"
    cfg.write_text(STUDY.format(out=root / "run", corpus=corpus))
    _cli(["run", str(cfg)])
    return root / "run"


RUN_POINTS = [
    "stage.done:1",  # between stages: harvest finished, train not started
    f"train.step:{_rng.randint(1, N_STEPS - 1)}",  # inside the train stage, seeded random step
    "stage.done:2",  # between stages: train finished, eval not started
]


@pytest.mark.parametrize("fault", RUN_POINTS)
def test_run_killed_then_resumed_equals_uninterrupted(fault, corpus, reference_study, tmp_path):
    cfg = tmp_path / "crash.toml"
    cfg.write_text(STUDY.format(out=tmp_path / "run", corpus=corpus))
    _assert_killed(_interp(["run", str(cfg)], fault))
    _cli(["run", str(cfg)])
    run, ref = tmp_path / "run", reference_study
    names = sorted(p.name for p in (run / "stages").iterdir())
    assert names == sorted(p.name for p in (ref / "stages").iterdir())  # same stage hashes, no extra directories
    assert all((run / "stages" / name / "stage.json").is_file() for name in names)
    assert_same_store(next(run.glob("stages/harvest-*/store")), next(ref.glob("stages/harvest-*/store")))
    assert_same_saes(next(run.glob("stages/train-*/saes")), next(ref.glob("stages/train-*/saes")))


@pytest.mark.parametrize("command,fault", [("harvest", "store.shard_file:3:INT"), ("train-sae", "train.step:5:INT"),
                                           ("train-sae", "train.mid_step:5:INT")])  # between steps; inside step 5 (it finishes first)
def test_ctrl_c_stops_cleanly_and_says_how_to_resume(command, fault, corpus, reference_store, reference_saes, tmp_path):
    out = tmp_path / "out"
    if command == "harvest":
        args = ["harvest", *HARVEST, "--corpus", str(corpus), "--out", str(out)]
    else:
        args = ["train-sae", "--acts", str(reference_store), *TRAIN, "--out", str(out)]
    proc = _interp(args, fault)
    assert proc.returncode == 130, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "interrupted: re-run the same command to resume" in proc.stderr.strip().splitlines()[-1]
    if command == "train-sae":  # the interrupted step count was checkpointed on the way out
        assert (out / "checkpoints" / "step-00000005" / "meta.json").is_file()
    _cli(args)
    if command == "harvest":
        assert_same_store(out, reference_store)
    else:
        assert_same_saes(out, reference_saes)
