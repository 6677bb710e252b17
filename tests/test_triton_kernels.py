"""Triton SAE kernels equal the torch kernels: run on CPU under Triton's interpreter (no GPU needed).

The kernels run in a subprocess (tests/triton_interpreted.py) because ``TRITON_INTERPRET=1``
must be set before Triton is imported, and must not leak into other tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("triton")

SCRIPT = Path(__file__).with_name("triton_interpreted.py")
ROOT = SCRIPT.parent.parent


@pytest.fixture(scope="module")
def interpreted_errors() -> dict[str, list[float]]:
    """``{check: [max abs error, tolerance]}`` from one interpreter run of every kernel check."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("part", ["x_hat", "grad_values", "grad_W_dec", "grad_b_dec", "scatter_rows", "scatter_rows_sorted", "gather_dot"])
def test_triton_kernels_match_torch_path(interpreted_errors, part):
    checks = {name: v for name, v in interpreted_errors.items() if name.endswith("/" + part) and not name.startswith("dispatch/")}
    expected = 2 if part == "grad_b_dec" else 4  # b_dec is fused in 2 of the 4 cases
    assert len(checks) == expected, sorted(interpreted_errors)
    failed = {name: v for name, v in checks.items() if not v[0] <= v[1]}
    assert not failed, failed


def test_kernels_py_routes_a_full_sae_step_through_triton(interpreted_errors):
    checks = {name: v for name, v in interpreted_errors.items() if name.startswith("dispatch/")}
    assert set(checks) == {"dispatch/routed_calls_missing", "dispatch/x_hat", "dispatch/W_enc", "dispatch/b_enc", "dispatch/W_dec", "dispatch/b_dec"}
    failed = {name: v for name, v in checks.items() if not v[0] <= v[1]}
    assert not failed, failed


@pytest.mark.parametrize("prefix, count", [
    ("topk/", 15),  # radix-select / filter top-k vs torch.topk
    ("lanes/", 15),  # lane-group top-k vs torch.topk
    ("latent/", 12),  # fused latent backward vs the torch kernels
    ("fused_step/", 22),  # the fused step (with AuxK) vs the unfused step
])
def test_interpreted_checks_pass(interpreted_errors, prefix, count):
    checks = {name: v for name, v in interpreted_errors.items() if name.startswith(prefix)}
    assert len(checks) == count, sorted(checks)
    failed = {name: v for name, v in checks.items() if not v[0] <= v[1]}
    assert not failed, failed


def test_lane_groups_apply_only_where_the_row_has_4k_groups():
    from saes import triton_topk

    assert triton_topk._lane_groups(32768, 32) == (1024, 32, 32)
    assert triton_topk._lane_groups(65536, 32) == (2048, 32, 32)
    assert triton_topk._lane_groups(5000, 32) == (1024, 8, 32)
    assert triton_topk._lane_groups(100, 32) is None  # 64 groups < 4 x 32
    assert triton_topk._lane_groups(70000, 8) is None  # indices packed in 16 bits
    assert triton_topk._lane_groups(32768, 65) is None


def test_topk_method_switch(monkeypatch):
    from saes import triton_kernels

    assert triton_kernels.topk_method() == "filter"
    monkeypatch.setenv("INTERP_TRITON_TOPK", "lanes")
    assert triton_kernels.topk_method() == "lanes"
    monkeypatch.setenv("INTERP_TRITON_TOPK", "radix")
    with pytest.raises(ValueError, match="INTERP_TRITON_TOPK"):
        triton_kernels.topk_method()
    with pytest.raises(ValueError, match="method must be"):
        triton_kernels.topk_rows(torch.zeros(2, 64, dtype=torch.bfloat16), 4, method="lane")


def test_fused_decode_only_on_the_triton_path_and_when_asked(monkeypatch):
    from saes import kernels, triton_backward, triton_kernels

    x = torch.zeros(1, 2, 3)
    assert kernels.fused_decode_for(x) is None  # CPU
    monkeypatch.setattr(kernels, "_triton_for", lambda t: triton_kernels)
    monkeypatch.delenv("INTERP_TRITON_FUSED", raising=False)
    assert kernels.fused_decode_for(x) is None  # not asked
    monkeypatch.setenv("INTERP_TRITON_FUSED", "1")
    assert kernels.fused_decode_for(x) is triton_backward


def test_fused_decoder_row_kernels_match_torch(interpreted_errors):
    checks = {name: v for name, v in interpreted_errors.items() if name.startswith("rows/")}
    assert set(checks) == {"rows/constrain", "rows/normalize"}
    failed = {name: v for name, v in checks.items() if not v[0] <= v[1]}
    assert not failed, failed


def test_topk_goes_to_triton_only_where_its_filter_is_fast(monkeypatch):
    from saes import kernels, triton_kernels

    calls = []
    stub = SimpleNamespace(topk_fast=triton_kernels.topk_fast, topk_rows=lambda x, k: calls.append(k) or x.topk(k, dim=-1))
    monkeypatch.setattr(kernels, "_triton_for", lambda t: stub)
    x = torch.randn(3, 300).to(torch.bfloat16)
    for k in (1, 32, 64, 65, 128, 300):
        values, _ = kernels.topk(x, k)
        assert torch.equal(values.float().sort(-1).values, x.float().topk(k, dim=-1).values.sort(-1).values)
    kernels.topk(torch.randn(3, 300), 8)  # fp32: torch.topk
    kernels.topk(torch.randn(1, 70000).to(torch.bfloat16), 8)  # too wide for 16-bit indices
    assert calls == [1, 32, 64]


def test_dispatch_only_for_cuda_and_not_when_disabled(monkeypatch):
    from saes import kernels, triton_kernels

    cpu, cuda = SimpleNamespace(is_cuda=False), SimpleNamespace(is_cuda=True)
    monkeypatch.delenv("INTERP_TRITON", raising=False)
    assert kernels._triton_for(cpu) is None
    assert kernels._triton_for(cuda) is triton_kernels
    monkeypatch.setenv("INTERP_TRITON", "0")
    assert kernels._triton_for(cuda) is None
    monkeypatch.setattr(triton_kernels, "AVAILABLE", False)
    monkeypatch.setenv("INTERP_TRITON", "1")
    assert kernels._triton_for(cuda) is None
