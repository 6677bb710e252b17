"""Shared set-up of the compiled (Numba) CPU kernels that ``saes`` and ``probes`` use.

Numba is a dependency, but every compiled kernel has a torch fallback: ``INTERP_NUMBA=0`` (or a
failed import) selects it, and the tests run both.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

try:
    import numba
except ImportError:  # the torch paths cover everything without it
    numba = None

__all__ = ["AVAILABLE", "FASTMATH", "compiled_enabled_for", "njit_cached", "numba"]

AVAILABLE: bool = numba is not None
"""Whether Numba imported; without it every caller uses its torch path."""

FASTMATH = {"reassoc", "contract", "nsz"}
"""reassoc/contract let LLVM vectorise dot products; NaN and Inf keep their IEEE meaning."""


def compiled_enabled_for(*tensors: Tensor, dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float64)) -> bool:
    """Whether the compiled kernels should take ``tensors``: all on the CPU in one of ``dtypes``
    (float32 or float64 unless a kernel reads more), Numba imports and ``INTERP_NUMBA`` is not ``"0"``."""
    return (
        AVAILABLE
        and os.environ.get("INTERP_NUMBA", "1") != "0"
        and all(t.device.type == "cpu" and t.dtype in dtypes for t in tensors)
    )


def njit_cached(**options):
    """``numba.njit`` caching compiled code on disk, or in memory only where no cache directory is
    writable (Numba refuses ``cache=True`` there, at decoration time)."""
    def decorate(fn):
        try:
            return numba.njit(cache=True, **options)(fn)
        except RuntimeError:
            return numba.njit(cache=False, **options)(fn)
    return decorate
