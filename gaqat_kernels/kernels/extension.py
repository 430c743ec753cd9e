"""Loads the compiled extension ``gaqat_kernels._C`` (CPU C++, and CUDA C++ when it was built with CUDA).

The package works without it: ``MODULE`` is None and the reference/Triton backends remain. Availability is
decided once, at import, into plain constants, so that ``torch.compile`` never traces into the extension.
"""
from __future__ import annotations

import contextlib
from typing import ContextManager, Iterator, List, Optional

import torch

# What the Python side calls; an extension built from older sources lacks some of it and is not used.
_FUNCTIONS = ("lsq_forward", "lsq_backward", "lsq_fake_quant_autograd", "quant_input_conv2d_autograd",
              "quant_input_linear_autograd", "conflict_update", "built_with_cuda", "cpu_isa_levels", "cpu_isa",
              "set_cpu_isa")
_OPERATORS = ("lsq_fake_quant_ext", "lsq_fake_quant_ext_backward")  # torch.ops.gaqat_kernels.*, from C++


def _missing(module) -> list:
    needed = _FUNCTIONS + (("set_cuda_division", "set_cuda_launch") if getattr(module, "built_with_cuda", bool)()
                           else ())
    names = [f for f in needed if not hasattr(module, f)]
    return names + [f"torch.ops.gaqat_kernels.{op}" for op in _OPERATORS if not hasattr(torch.ops.gaqat_kernels, op)]


try:
    from gaqat_kernels import _C as MODULE  # type: ignore[attr-defined]
    LOAD_ERROR: Optional[str] = None
    _lacks = _missing(MODULE)
    if _lacks:
        LOAD_ERROR = (f"gaqat_kernels._C is from older sources (it lacks {', '.join(_lacks)}); rebuild it: "
                      "pip install --no-build-isolation .")
        MODULE = None
except ImportError as e:  # not built, or built against another torch
    MODULE = None
    LOAD_ERROR = str(e)

HAS_CPU: bool = MODULE is not None
HAS_CUDA: bool = MODULE is not None and bool(MODULE.built_with_cuda())
# Instruction-set levels of the cpu backend's loops that this CPU runs, lowest first; the highest is used.
CPU_ISA_LEVELS: List[str] = list(MODULE.cpu_isa_levels()) if MODULE is not None else []


@contextlib.contextmanager
def _switched(setter, value: tuple, default: tuple) -> Iterator[None]:
    """``setter(*value)`` (a process-wide switch of the extension) for the block, ``setter(*default)`` after it."""
    setter(*value)
    try:
        yield
    finally:
        setter(*default)


def cpu_isa(level: str) -> ContextManager[None]:
    """Within the block, the cpu backend runs its loops compiled for ``level`` (one of ``CPU_ISA_LEVELS``:
    "baseline", "x86-64-v3" (AVX2), "x86-64-v4" (AVX-512)) instead of the highest this CPU has, so that
    tests cover every level on one machine and benchmarks compare them. y and dx are the same bits at every
    level; the scale gradient's summation order follows the vector width. Not thread-safe: it sets a
    process-wide switch."""
    if level not in CPU_ISA_LEVELS:
        raise ValueError(f"cpu_isa: level must be one of {CPU_ISA_LEVELS} on this machine, got {level!r}")
    return _switched(MODULE.set_cpu_isa, (level,), ("",))


_DIVISION_MODES = {"plan": 0, "ieee": 1, "fast": 2}


def cuda_division(mode: str) -> ContextManager[None]:
    """Within the block, the CUDA kernels divide as ``mode`` says: ``"plan"`` (the default choice per launch),
    ``"ieee"`` (IEEE division everywhere) or ``"fast"`` (the exact multiply-and-correct division wherever the
    scale lies in its range). Results are the same bits in every mode; tests check that and the division
    benchmark times the modes side by side. Not thread-safe: it sets a process-wide switch."""
    if mode not in _DIVISION_MODES:
        raise ValueError(f"cuda_division: mode must be one of {sorted(_DIVISION_MODES)}, got {mode!r}")
    if not HAS_CUDA:
        raise RuntimeError("cuda_division: the extension was built without CUDA")
    return _switched(MODULE.set_cuda_division, (_DIVISION_MODES[mode],), (0,))


def cuda_launch(forward_blocks_per_sm: int = 0, split_blocks_per_sm: int = 0,
                prefetch: Optional[bool] = None) -> ContextManager[None]:
    """Within the block, the CUDA kernels launch at most ``forward_blocks_per_sm`` forward blocks per SM (a
    grid-stride loop covers the rest; with an innermost channel axis, blocks that loop down their rows) and split a channel's backward tiles over up to ``split_blocks_per_sm``
    blocks per SM when the channels alone do not fill the GPU; 0 keeps the built-in value. ``prefetch`` (None:
    built-in) makes backward blocks that loop over tiles load each next tile, of half the usual size, before the
    current tile's math. For benchmarks (``benchmarks/tools/tune_cuda.py``): y and dx do not change, the scale
    gradient's summation order may. Not thread-safe: it sets a process-wide switch."""
    for name, value, top in (("forward_blocks_per_sm", forward_blocks_per_sm, 1 << 16),
                             ("split_blocks_per_sm", split_blocks_per_sm, 64)):
        if not isinstance(value, int) or not 0 <= value <= top:
            raise ValueError(f"cuda_launch: {name} must be an int in [0, {top}] (0 = default), got {value!r}")
    if prefetch is not None and not isinstance(prefetch, bool):
        raise ValueError(f"cuda_launch: prefetch must be None (default), True or False, got {prefetch!r}")
    if not HAS_CUDA:
        raise RuntimeError("cuda_launch: the extension was built without CUDA")
    mode = 0 if prefetch is None else 2 if prefetch else 1
    return _switched(MODULE.set_cuda_launch, (forward_blocks_per_sm, split_blocks_per_sm, mode), (0, 0, 0))
