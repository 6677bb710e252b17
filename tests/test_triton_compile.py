"""Every CUDA kernel compiles for sm_90 (H100/H200) with the arguments its launch site passes, on CPU.

The interpreter tests (test_triton_kernels.py) check what the kernels compute, but Triton's
interpreter runs some programs its compiler rejects (shapes, dtypes, constructs it does not
lower). Here each launch wrapper of :mod:`saes.triton_kernels`, :mod:`saes.triton_topk` and
:mod:`saes.triton_backward` runs on CPU tensors with its kernels replaced by recorders; each
recorded launch is then compiled ahead of time, through PTX to a cubin with the ``ptxas`` in
Triton's wheel, for a Hopper target. Nothing runs on a GPU.
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from saes import triton_backward as tb  # noqa: E402
from saes import triton_kernels as tk  # noqa: E402
from saes import triton_topk as tt  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
_PTR = {torch.float32: "*fp32", torch.float64: "*fp64", torch.bfloat16: "*bf16", torch.float16: "*fp16",
        torch.int16: "*i16", torch.int32: "*i32", torch.int64: "*i64"}
_OPTIONS = ("num_warps", "num_stages")


class _Recorder:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](*args, **kwargs)`` records the call."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((args, kwargs))


def _signature(fn, args: tuple, kwargs: dict) -> tuple[dict[str, str], dict[str, object], dict[str, object]]:
    """``(signature, constexprs, options)`` for ``ASTSource`` from one recorded launch."""
    options = {key: kwargs[key] for key in _OPTIONS if key in kwargs}
    bound = dict(zip([p.name for p in fn.params], args)) | {k: v for k, v in kwargs.items() if k not in _OPTIONS}
    assert set(bound) == {p.name for p in fn.params}, (fn.__name__, sorted(bound))
    signature, constexprs = {}, {}
    for p in fn.params:
        value = bound[p.name]
        if p.is_constexpr:
            signature[p.name], constexprs[p.name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[p.name] = _PTR[value.dtype]
        elif isinstance(value, bool):
            signature[p.name] = "i1"
        elif isinstance(value, int):
            signature[p.name] = "i32" if -(2**31) <= value < 2**31 else "i64"
        elif isinstance(value, float):
            signature[p.name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}.{p.name}: unexpected argument {value!r}")
    return signature, constexprs, options


def _launches(monkeypatch) -> list[tuple[str, object, tuple, dict]]:
    """Every launch the wrappers make on the step's shapes (d 768, n 32k, k 32) and the edge paths."""
    recorders = {}
    for module in (tk, tb, tt):
        for name in dir(module):
            if name.endswith("_kernel") and name.startswith("_"):
                recorders[name] = _Recorder(getattr(module, name))
                monkeypatch.setattr(module, name, recorders[name])
    S, B, n, d, k = 1, 64, 32768, 768, 32
    g = torch.Generator().manual_seed(0)
    values = torch.rand(S, B, k, generator=g)
    indices = torch.randint(0, n, (S, B, k), generator=g)
    dense = torch.randn(S, B, d, generator=g)
    table = torch.randn(S, n, d, generator=g)
    tk._gather_sum(values, indices, table, None)
    tk._gather_sum(values, indices, table, torch.zeros(S, d))
    tk.scatter_rows(values, indices, dense, n, sorted_segments=False)
    tk.scatter_rows(values, indices, dense, n, sorted_segments=True)
    tk.gather_dot(dense, table, indices)
    tb.latent_backward(values, indices, dense, dense, table)
    tb.latent_backward(values.double(), indices, dense.double(), dense.double(), table.double())
    pre = torch.randn(B, n, generator=g).to(torch.bfloat16)
    tt.topk_rows(pre, k, method="filter")  # filter, then the radix select for rows it could not finish
    tt.topk_rows(pre, k, method="lanes")
    tt.topk_rows(pre[:, :4096], 16, method="lanes")
    tt.topk_rows(pre[:, :1024], 1, method="lanes")  # k 1, one member per group: one-element sorts
    tt.topk_rows(torch.randn(4, 65536, generator=g).half(), 64, method="lanes")
    tt.topk_rows(pre, 100)  # k above the filter's limit: radix select only
    tk.constrain_rows(table[0, :8].clone(), table[0, 8:16].clone())
    tk.normalize_rows(table[0, :8].clone())
    launches = [(name, rec.fn, args, kwargs) for name, rec in recorders.items() for args, kwargs in rec.calls]
    unused = sorted(name for name, rec in recorders.items() if not rec.calls)
    assert not unused, f"kernels no launch above reaches (add one): {unused}"
    return launches


def test_every_cuda_kernel_compiles_for_sm90_at_its_launch_arguments(monkeypatch):
    launches = _launches(monkeypatch)
    seen, failures = set(), []
    for name, fn, args, kwargs in launches:
        signature, constexprs, options = _signature(fn, args, kwargs)
        key = (name, tuple(signature.items()), tuple((k, str(v)) for k, v in constexprs.items()), tuple(options.items()))
        if key in seen:
            continue
        seen.add(key)
        try:
            compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=TARGET, options=options)
        except Exception as exc:  # noqa: BLE001 - collect every kernel's failure, then report them together
            failures.append(f"{name} {constexprs} {options}: {type(exc).__name__}: {' | '.join(str(exc).strip().splitlines()[-4:])}")
            continue
        assert compiled.asm.get("cubin"), f"{name}: no cubin"
    assert not failures, "\n".join(failures)
    assert len(seen) >= 12, sorted(k[0] for k in seen)
