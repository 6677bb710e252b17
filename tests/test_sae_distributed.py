"""``interp train-sae`` under ``torchrun --standalone`` (gloo, 2 CPU processes): ddp and shard match one process.

ddp is exact up to float reduction order for per-token TopK and for BatchTopK (whose cut and running
threshold are taken over the global batch); shard runs the single-process math on each rank's SAEs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import saes
from interp.store import ActivationStore
from saes.config import sae_name
from saes.distributed import total_variance_over_ranks
from saes.training_log import read_metrics

HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
SETTINGS = [(32, 4), (48, 6)]
NAMES = [sae_name(h, n, k) for h in HOOKS for n, k in SETTINGS]


def _args(store: Path, out: Path, dist: str, batch_topk: bool = True) -> list[str]:
    args = ["train-sae", "--acts", str(store), "--tokens", str(8 * 64), "--batch-size", "64", "--dist", dist,
            "--checkpoint-every", "4", "--log-every", "2", "--dead-tokens", "128", "--no-progress", "--device", "cpu", "--out", str(out)]
    args += ["--batch-topk"] if batch_topk else []
    for h in HOOKS:
        args += ["--hook", h]
    for n, k in SETTINGS:
        args += ["--latents", str(n), "--k", str(k)]
    return args


def _torchrun(store: Path, out: Path, dist: str, batch_topk: bool = True) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "experiments.cli", *_args(store, out, dist, batch_topk)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One store; BatchTopK single, ddp and shard runs; per-token TopK single and ddp runs ('-topk')."""
    root = tmp_path_factory.mktemp("dist")
    gen = torch.Generator().manual_seed(0)
    # hook 1 is nearly one-dimensional, so most of its latents never fire: dead counters have work to do
    line = torch.rand(512, 1, generator=gen) * torch.randn(1, 12, generator=gen) + 0.01 * torch.randn(512, 12, generator=gen)
    acts = {HOOKS[0]: torch.randn(512, 12, generator=gen).relu(), HOOKS[1]: line}
    store = ActivationStore.from_tensors(root / "store", acts, model="synthetic", shard_rows=128).path
    from experiments.cli import app

    for batch_topk, suffix in ((True, ""), (False, "-topk")):
        result = CliRunner().invoke(app, _args(store, root / f"single{suffix}", "none", batch_topk))
        assert result.exit_code == 0, result.output
    for dist in ("ddp", "shard"):
        _torchrun(store, root / dist, dist)
    _torchrun(store, root / "ddp-topk", "ddp", batch_topk=False)
    return root


def _load(run: Path) -> dict[str, saes.TopKSAE]:
    return {name: saes.load(run / name) for name in NAMES}


def _fvu(sae: saes.TopKSAE, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float(((x - sae(x)) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())


def test_total_variance_over_ranks_in_one_process_is_the_two_pass_variance():
    gen = torch.Generator().manual_seed(0)
    # a large common offset: the one-pass formula must not lose the variance to cancellation
    xs = [30.0 + torch.randn(2, 50, 6, generator=gen), torch.randn(3, 50, 4, generator=gen) * torch.arange(1.0, 5.0)]
    for x, got in zip(xs, total_variance_over_ranks(xs, world=1)):
        want = (x.double() - x.double().mean(1, keepdim=True)).pow(2).sum((1, 2))
        assert got.dtype == x.dtype and got.shape == (x.shape[0],)
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=0)


def test_kth_largest_over_ranks_in_one_process_is_the_kth_largest():
    from saes.distributed import kth_largest_over_ranks

    values = torch.tensor([[5.0, 1.0, 3.0, 3.0, 2.0, 0.0], [1.0, 1.0, 1.0, 4.0, 9.0, -2.0]])
    for kth in range(1, 7):
        want = values.sort(dim=1, descending=True).values[:, kth - 1]
        assert torch.equal(kth_largest_over_ranks(values, kth, world=1), want), kth


def _kth_worker(rank: int, world: int, port: int, cases: list, results) -> None:
    import torch.distributed as dist

    from saes.distributed import kth_largest_over_ranks

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        results[rank] = [kth_largest_over_ranks(values.chunk(world, dim=1)[rank], kth, world) for values, kth in cases]
    finally:
        dist.destroy_process_group()


def test_kth_largest_over_two_gloo_ranks_is_the_global_kth_largest():
    """Each rank holds half of every row; the result is the kth largest of the whole row, with kth below and above a rank's share."""
    import socket

    import torch.multiprocessing as mp

    gen = torch.Generator().manual_seed(3)
    values = torch.randint(0, 6, (3, 20), generator=gen).float()  # many ties
    cases = [(values, kth) for kth in (1, 4, 10, 13, 20)]  # a rank holds 10 per row
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_kth_worker, args=(2, port, cases, results), nprocs=2, join=True)
    for rank in (0, 1):
        for (v, kth), got in zip(cases, results[rank]):
            assert torch.equal(got, v.sort(dim=1, descending=True).values[:, kth - 1]), (rank, kth)


# shard ranks run the single-process math on the same rows: equal up to stacking order.
# ddp with per-token TopK: each rank divides by the global batch's variance and gradients are summed,
# so ranks compute the single-process gradient up to float summation order (measured: weights within
# 6e-8 after 8 Adam steps; Adam's eps=6.25e-10 never meets a gradient that is rounding noise here).
# ddp with BatchTopK: the ranks find the top k*B of the whole batch together (their candidates'
# k*B-th largest, the minimum kept value over ranks), so the same activations train as in one process.
@pytest.mark.slow
@pytest.mark.parametrize("reference, dist, atol", [("single", "shard", 1e-5), ("single", "ddp", 1e-5), ("single-topk", "ddp-topk", 1e-5)])
def test_distributed_run_matches_single_process(runs, reference, dist, atol):
    single, other = _load(runs / reference), _load(runs / dist)
    store = ActivationStore(runs / "store")
    for name in NAMES:
        for p in ("W_enc", "b_enc", "W_dec", "b_dec"):
            torch.testing.assert_close(getattr(other[name], p), getattr(single[name], p), atol=atol, rtol=0, msg=f"{name}.{p}")
        assert other[name].activation_scale == pytest.approx(single[name].activation_scale)
        if reference == "single":
            assert other[name].threshold == pytest.approx(single[name].threshold, rel=1e-5)
        else:
            assert single[name].threshold is None and other[name].threshold is None
        x = store.read(single[name].hook_name)
        assert _fvu(other[name], x) == pytest.approx(_fvu(single[name], x), abs=atol / 3)
    rows = read_metrics(runs / dist / "metrics.jsonl")
    assert sorted({r["sae"] for r in rows}) == sorted(NAMES)
    assert sorted(r["step"] for r in rows) == sorted(s for s in (2, 4, 6, 8) for _ in NAMES)
    assert (runs / dist / "checkpoints" / "step-00000008" / "meta.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("reference, dist", [("single-topk", "ddp-topk"), ("single", "ddp")])
def test_ddp_logs_the_single_process_metrics(runs, reference, dist):
    # fvu and auxk_loss are sums of the ranks' globally normalised parts; l0 and dead_fraction are not
    def by_key(run):
        return {(r["step"], r["sae"]): r for r in read_metrics(runs / run / "metrics.jsonl")}

    single, ddp = by_key(reference), by_key(dist)
    assert single.keys() == ddp.keys()
    assert any(r["auxk_loss"] > 0 for r in single.values()) and any(r["dead_fraction"] > 0 for r in single.values())
    for key, row in single.items():
        for metric in ("fvu", "auxk_loss", "l0", "dead_fraction"):
            assert ddp[key][metric] == pytest.approx(row[metric], rel=1e-5, abs=1e-6), (key, metric)


@pytest.mark.slow
def test_ddp_dead_counters_count_the_global_batch(runs):
    step8 = "checkpoints/step-00000008/state-rank0.safetensors"
    single, ddp = load_file(runs / "single" / step8), load_file(runs / "ddp" / step8)
    for key in (k for k in single if k.endswith("state.tokens_since_fired")):
        a, b = single[key], ddp[key]
        assert (a >= 128).any(), "the data should leave some latents dead (AuxK active)"
        # counters advance by the global batch (64 rows) on every rank, not by a rank's 32
        assert bool((b % 64 == 0).all()) and torch.equal(a, b), key  # BatchTopK fires the same latents as one process


@pytest.mark.slow
@pytest.mark.parametrize("reference, dist", [("single-topk", "ddp-topk"), ("single", "ddp")])
def test_ddp_checkpoint_holds_the_single_process_state(runs, reference, dist):
    # Adam's moments see the raw gradients (its update is nearly scale-free): averaging instead of
    # summing the ranks' gradients would halve exp_avg and quarter exp_avg_sq
    step8 = "checkpoints/step-00000008/state-rank0.safetensors"
    single, ddp = load_file(runs / reference / step8), load_file(runs / dist / step8)
    assert single.keys() == ddp.keys() and any(k.endswith("exp_avg_sq") for k in single)
    for key in (k for k in single if k != "rng.torch"):
        if key.endswith("tokens_since_fired"):
            # TopK and BatchTopK fire the same latents on the same rows whether or not the batch is split
            assert (single[key] >= 128).any() and torch.equal(ddp[key], single[key]), key
        else:
            torch.testing.assert_close(ddp[key], single[key], rtol=1e-5, atol=1e-7, equal_nan=True, msg=key)


@pytest.mark.slow
def test_shard_checkpoint_has_one_state_file_per_rank(runs):
    files = sorted(p.name for p in (runs / "shard" / "checkpoints" / "step-00000008").iterdir())
    assert files == ["meta.json", "state-rank0.safetensors", "state-rank1.safetensors"]


# -- failures under torchrun: every rank stops with the same one-line error --------------------------
# Workers join a 2-rank gloo group as torchrun would (RANK, WORLD_SIZE, MASTER_*) and run the CLI
# in-process, so each rank's exit code and last stderr line come back; a rank left behind in a
# collective would instead end with gloo's "connection closed" error (or hang: the join times out).


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _cli_worker(rank: int, world: int, port: int, args: list[str], poison_rank: int, results) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    torch.set_num_threads(1)
    if rank == poison_rank:  # this rank's SAEs report a non-finite FVU after their first step
        import saes.trainer

        original = saes.trainer._Run._step

        def poisoned(self, batch, step):
            metrics = original(self, batch, step)
            metrics[0]["fvu"] = torch.full_like(metrics[0]["fvu"], float("nan"))
            return metrics

        saes.trainer._Run._step = poisoned
    from experiments.cli import app

    result = CliRunner().invoke(app, args)
    lines = result.stderr.strip().splitlines()
    results[rank] = (result.exit_code, lines[-1] if lines else "", repr(result.exception))


def _spawn_cli(args: list[str], poison_rank: int = -1, world: int = 2, timeout: float = 120) -> list[tuple[int, str, str]]:
    import torch.multiprocessing as mp

    results = mp.Manager().dict()
    procs = mp.start_processes(_cli_worker, args=(world, _free_port(), [str(a) for a in args], poison_rank, results), nprocs=world,
                               join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not procs.join(timeout=1):
        if time.monotonic() > deadline:
            for p in procs.processes:
                p.kill()
            pytest.fail(f"ranks still running after {timeout} s (one waits in a collective for a rank that stopped): {dict(results)}")
    return [results[r] for r in range(world)]


def _store_with_a_nan_row(root: Path, rows: int, nan_row: int) -> Path:
    """Two hooks; the second has one NaN row (a batch of 64 puts it on one ddp rank's slice of 32)."""
    gen = torch.Generator().manual_seed(1)
    bad = torch.randn(rows, 12, generator=gen)
    bad[nan_row, 5] = float("nan")
    acts = {HOOKS[0]: torch.randn(rows, 12, generator=gen), HOOKS[1]: bad}
    return ActivationStore.from_tensors(root, acts, model="synthetic", shard_rows=1024).path


@pytest.fixture(scope="module")
def small_store(tmp_path_factory):
    """256 rows: the NaN row is in the initialisation sample (the first 4096 rows)."""
    return _store_with_a_nan_row(tmp_path_factory.mktemp("dist-errors") / "store", 256, 101)


@pytest.fixture(scope="module")
def late_nan_store(tmp_path_factory):
    """4352 rows (68 batches of 64): the NaN row is past the initialisation sample, so training meets it in one step."""
    return _store_with_a_nan_row(tmp_path_factory.mktemp("dist-errors-late") / "store", 4352, 4200)


def _small_args(store: Path, out: Path, dist: str, hooks: list[str], extra: tuple[str, ...] = ()) -> list:
    args = ["train-sae", "--acts", store, "--tokens", str(4 * 64), "--batch-size", "64", "--dist", dist, "--latents", "32", "--k", "4",
            "--log-every", "1", "--checkpoint-every", "2", "--no-progress", "--device", "cpu", "--out", out, *extra]
    for h in hooks:
        args += ["--hook", h]
    return args


def _same_error_everywhere(results: list[tuple[int, str, str]], needle: str) -> None:
    for rank, (code, last, exception) in enumerate(results):
        assert code == 2 and last.startswith("error:") and needle in last, (rank, code, last, exception)
    assert len({last for _, last, _ in results}) == 1, results


@pytest.mark.slow
@pytest.mark.parametrize("dist, store", [("ddp", "late_nan_store"), ("shard", "late_nan_store"), ("shard", "small_store")])
def test_non_finite_rows_stop_every_rank_with_one_error(request, tmp_path, dist, store):
    # ddp: the NaN row is in one rank's slice of one batch; shard: only rank 1 trains the SAE of the
    # NaN hook, and meets the row in a step (late_nan_store) or in its initialisation sample (small_store)
    args = _small_args(request.getfixturevalue(store), tmp_path / "run", dist, HOOKS, ("--tokens", str(68 * 64), "--checkpoint-every", "100"))
    results = _spawn_cli(args)
    _same_error_everywhere(results, "contains NaN or Inf")
    assert ("activation sample" in results[0][1]) == (store == "small_store"), results


@pytest.mark.slow
def test_divergence_on_one_shard_rank_stops_every_rank_with_one_error(small_store, tmp_path):
    results = _spawn_cli(_small_args(small_store, tmp_path / "run", "shard", [HOOKS[0]], ("--latents", "48", "--k", "6")),
                         poison_rank=1)
    _same_error_everywhere(results, "training diverged at step 1 for blocks.0.hook_resid_post")
    assert not (tmp_path / "run" / "checkpoints").exists() or not list((tmp_path / "run" / "checkpoints").glob("*/meta.json"))


@pytest.mark.slow
def test_shard_resume_with_another_world_size_is_one_error(small_store, tmp_path, monkeypatch):
    from test_bad_inputs import hashes

    out = tmp_path / "run"
    args = _small_args(small_store, out, "shard", [HOOKS[0]], ("--latents", "48", "--k", "6"))
    assert [code for code, _, _ in _spawn_cli(args)] == [0, 0]
    assert (out / "checkpoints" / "step-00000004" / "meta.json").exists()
    before = hashes(out)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    from experiments.cli import app
    from test_bad_inputs import assert_one_line_error

    assert_one_line_error(CliRunner().invoke(app, [str(a) for a in args]), "written by 2 shard ranks, this run has 1")
    assert hashes(out) == before


def test_dist_none_under_torchrun_is_one_error(small_store, tmp_path, monkeypatch):
    # N copies of a single-process run would all write the same --out
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    from experiments.cli import app
    from test_bad_inputs import assert_one_line_error

    assert_one_line_error(CliRunner().invoke(app, [str(a) for a in _small_args(small_store, tmp_path / "run", "none", [HOOKS[0]])]),
                          "pass --dist ddp or --dist shard")
    assert not (tmp_path / "run").exists()
    import interp.models

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the launch was refused")

    monkeypatch.setattr(interp.models, "load_model", no_model)
    live = ["train-sae", "--model", "some-model", "--hook", HOOKS[0], "--dist", "none", "--out", str(tmp_path / "live")]
    assert_one_line_error(CliRunner().invoke(app, live), "pass --dist ddp or --dist shard")


def test_each_torchrun_rank_takes_the_gpu_of_its_local_rank(monkeypatch):
    from interp.errors import UserError
    from saes.distributed import _pick_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert _pick_device("cuda", 1, 2) == torch.device("cuda", 1)
    assert _pick_device(None, 1, 2) == torch.device("cuda", 1)
    assert _pick_device("cuda", 0, 1) == torch.device("cuda", 0)  # torchrun with one process: an index for set_device
    assert _pick_device("cuda:1", 0, 1) == torch.device("cuda", 1)  # one process may pin its GPU
    assert _pick_device("cpu", 1, 2) == torch.device("cpu")
    with pytest.raises(UserError, match="would put all 2 ranks on one GPU"):
        _pick_device("cuda:0", 1, 2)
    with pytest.raises(UserError, match="this node has 2; launch at most 2 processes per node"):
        _pick_device("cuda", 2, 3)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5")  # a launcher that gives each process its own single GPU (SLURM)
    assert _pick_device("cuda", 3, 4) == torch.device("cuda", 0)


@pytest.mark.slow
def test_ddp_live_model_run_matches_one_process(tmp_path):
    """``--model DIR`` under ddp: each rank harvests its own slice of every global batch on the fly; the SAE matches one process."""
    from test_sae_trainer import tiny_live_source

    model_dir, text = tiny_live_source(tmp_path)
    hook = "blocks.1.hook_resid_post"

    def args(dist: str, out: Path) -> list:
        return ["train-sae", "--model", model_dir, "--corpus", text, "--hook", hook, "--latents", "16", "--k", "2", "--tokens", str(4 * 32),
                "--batch-size", "32", "--checkpoint-every", "0", "--log-every", "1", "--dead-tokens", "32", "--no-progress", "--device", "cpu",
                "--dist", dist, "--out", out]

    from experiments.cli import app

    single = CliRunner().invoke(app, [str(a) for a in args("none", tmp_path / "single")])
    assert single.exit_code == 0, single.output
    assert [code for code, _, _ in _spawn_cli(args("ddp", tmp_path / "ddp"))] == [0, 0]
    name = sae_name(hook, 16, 2)
    one, two = saes.load(tmp_path / "single" / name), saes.load(tmp_path / "ddp" / name)
    for p in ("W_enc", "b_enc", "W_dec", "b_dec"):
        torch.testing.assert_close(getattr(two, p), getattr(one, p), atol=1e-5, rtol=0, msg=p)
    rows = {r["step"]: r for r in read_metrics(tmp_path / "single" / "metrics.jsonl")}
    for r in read_metrics(tmp_path / "ddp" / "metrics.jsonl"):
        assert r["fvu"] == pytest.approx(rows[r["step"]]["fvu"], rel=1e-5), r["step"]
