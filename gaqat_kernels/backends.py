"""The one place that decides which kernel runs: backend names, availability, and the ``"auto"`` rule.

Each backend provides ``forward(x, scale, y, qn, qp, axis)`` and
``backward(dy, x, scale, dx, ds, qn, qp, axis, g)`` writing into preallocated outputs, on dense inputs
laid out alike (see ``kernels/layout.py``).
"""
from __future__ import annotations

import functools
import importlib.util
import math
import os
from typing import Callable, List, NamedTuple, Optional

import torch
from torch import Tensor

from .kernels import extension
from .kernels.layout import channel_view
from .kernels.reference import (
    FREEZE_RULES,
    SPREAD_FLOOR,
    conflict_update_reference,
    reference_backward,
    reference_forward,
    segment_conflict_reference,
)

BACKENDS = ("auto", "reference", "triton", "cuda", "cpu")


class Backend(NamedTuple):
    """One backend's launchers: ``forward(x, scale, y, qn, qp, axis)`` and ``backward(dy, x, scale, dx, ds, qn, qp,
    axis, g)``, writing into the given outputs."""

    forward: Callable
    backward: Callable


def _reference_forward(x, scale, y, qn, qp, axis):
    y.copy_(reference_forward(x, scale, qn, qp, axis))


def _reference_backward(dy, x, scale, dx, ds, qn, qp, axis, g):
    rdx, rds = reference_backward(dy, x, scale, qn, qp, axis, g)
    dx.copy_(rdx)
    ds.copy_(rds.reshape(ds.shape))


def _extension_forward(x, scale, y, qn, qp, axis):
    O, C, I = channel_view(x, axis)
    extension.MODULE.lsq_forward(x, scale, y, O, C, I, qn, qp)


def _extension_backward(dy, x, scale, dx, ds, qn, qp, axis, g):
    O, C, I = channel_view(x, axis)
    extension.MODULE.lsq_backward(dy, x, scale, dx, ds, O, C, I, qn, qp, g)


# Decided at import, as constants, so that torch.compile traces no availability probing.
TRITON_INSTALLED: bool = importlib.util.find_spec("triton") is not None
# Triton reads TRITON_INTERPRET when it decorates kernels, i.e. when triton_lsq is first imported.
TRITON_INTERPRETED: bool = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _triton() -> Backend:
    from .kernels import triton_lsq  # imported on first use: importing Triton costs about a second

    return Backend(triton_lsq.forward, triton_lsq.backward)


def available_backends() -> List[str]:
    """Backends usable on this machine (besides ``"auto"``), in no particular order of speed."""
    names = ["reference"]
    if TRITON_INSTALLED and (torch.cuda.is_available() or TRITON_INTERPRETED):
        names.append("triton")
    if extension.HAS_CPU:
        names.append("cpu")
    if extension.HAS_CUDA and torch.cuda.is_available():
        names.append("cuda")
    return names


def _unusable_reason(name: str, x: Tensor) -> Optional[str]:
    """Why backend ``name`` cannot run on ``x``, or None when it can."""
    if name == "reference":
        return None
    if x.dtype == torch.float64:
        return "float64 inputs run on the reference backend only"
    if name == "triton":
        if not TRITON_INSTALLED:
            return "triton is not installed"
        if x.is_cuda or (x.device.type == "cpu" and TRITON_INTERPRETED):
            return None
        return "triton needs a CUDA tensor (or TRITON_INTERPRET=1 for CPU tensors)"
    if name == "cpu":
        if not extension.HAS_CPU:
            return f"the C++ extension is not built ({extension.LOAD_ERROR})"
        return None if x.device.type == "cpu" else "the cpu backend needs CPU tensors"
    if name == "cuda":
        if not extension.HAS_CUDA:
            return "the C++ extension was built without CUDA" if extension.HAS_CPU else (
                f"the C++ extension is not built ({extension.LOAD_ERROR})")
        return None if x.is_cuda else "the cuda backend needs CUDA tensors"
    return f"unknown backend (expected one of {BACKENDS})"


def resolve(name: str, x: Tensor) -> str:
    """The concrete backend that runs ``x``: ``name`` itself, checked, or the ``"auto"`` choice.

    auto: float64 -> reference; CUDA -> cuda, else triton, else reference; CPU -> cpu, else reference.
    """
    if name not in BACKENDS:
        raise ValueError(f"backend: unknown backend {name!r}; expected one of {BACKENDS}")
    if name != "auto":
        reason = _unusable_reason(name, x)
        if reason is not None:
            raise ValueError(f"backend: {name!r} is not available for this input: {reason}")
        return name
    order = ["cuda", "triton"] if x.is_cuda else ["cpu"]
    for candidate in order:
        if _unusable_reason(candidate, x) is None:
            return candidate
    return "reference"


def get(name: str) -> Backend:
    """The kernels of a concrete (already resolved) backend."""
    if name == "reference":
        return Backend(_reference_forward, _reference_backward)
    if name == "triton":
        return _triton()
    if name in ("cpu", "cuda"):
        return Backend(_extension_forward, _extension_backward)
    raise ValueError(f"backend: {name!r} is not a concrete backend")


# The conflict ops accept every backend name. The extension has no CPU kernel for them, so "cpu" runs the
# reference (torch's vectorised reductions; on CPU, Triton is only the interpreter), and segment_conflict's
# "cuda" runs the Triton kernel (the extension's CUDA conflict kernel is the tracker's).
CONFLICT_BACKENDS = BACKENDS
CONFLICT_ALIASES = {"cpu": "reference", "cuda": "triton"}


def _resolve_alias(name: str, x: Tensor, concrete: tuple) -> str:
    reason = _unusable_reason(name, x)
    if reason is not None:
        raise ValueError(f"backend: {name!r} is not available for this input: {reason}")
    if name not in concrete:
        name = CONFLICT_ALIASES[name]
        reason = _unusable_reason(name, x)
        if reason is not None:
            raise ValueError(f"backend: {name!r} (which runs this op for the requested backend) is not available "
                             f"for this input: {reason}")
    return name


def resolve_conflict(name: str, x: Tensor) -> str:
    """The backend that runs ``segment_conflict`` on ``x``: reference or triton (auto: triton on CUDA;
    ``CONFLICT_ALIASES`` maps cpu and cuda)."""
    if name not in CONFLICT_BACKENDS:
        raise ValueError(f"backend: segment_conflict has backends {CONFLICT_BACKENDS}, got {name!r}")
    if name == "auto":
        return "triton" if _unusable_reason("triton", x) is None and x.is_cuda else "reference"
    return _resolve_alias(name, x, ("reference", "triton"))


def conflict_kernel(name: str) -> Callable:
    """``fn(task, smooth, offsets, out)`` of a concrete segment_conflict backend."""
    if name == "triton":
        from .kernels import triton_conflict

        return triton_conflict.segment_conflict
    return lambda task, smooth, offsets, out: out.copy_(segment_conflict_reference(task, smooth, offsets))


TRACKER_BACKENDS = BACKENDS


def resolve_tracker(name: str, x: Tensor) -> str:
    """The backend that runs ``conflict_update`` on ``x`` (auto: cuda, else triton on CUDA; else reference;
    "cpu" runs the reference, see ``CONFLICT_ALIASES``)."""
    if name not in TRACKER_BACKENDS:
        raise ValueError(f"backend: the conflict tracker has backends {TRACKER_BACKENDS}, got {name!r}")
    if name == "auto":
        for candidate in ("cuda", "triton") if x.is_cuda else ():
            if _unusable_reason(candidate, x) is None:
                return candidate
        return "reference"
    return _resolve_alias(name, x, ("reference", "triton", "cuda"))


def _reference_tracker(task, smooth, offsets, signs, ema, step, counter, stats, frozen, decay, flip_weight,
                       threshold, warmup, top_k, rule, hysteresis):
    out = conflict_update_reference(task, smooth, offsets, signs, ema, step, frozen, decay=decay,
                                    flip_weight=flip_weight, threshold=threshold, warmup=warmup, top_k=top_k,
                                    rule=rule, hysteresis=hysteresis)
    for dst, src in zip((stats, frozen, signs, ema), out):
        dst.copy_(src)
    step.add_(1)


def _cuda_tracker(task, smooth, offsets, signs, ema, step, counter, stats, frozen, decay, flip_weight, threshold,
                  warmup, top_k, rule, hysteresis):
    if offsets.numel() == 1:
        step.add_(1)
        return
    log2_decay = math.log2(decay) if decay > 0 else -math.inf
    extension.MODULE.conflict_update(task, smooth, offsets, signs.reshape(-1), ema, step, counter,
                                     stats.reshape(-1), frozen, decay, log2_decay, flip_weight, threshold,
                                     threshold - hysteresis, warmup, top_k, FREEZE_RULES.index(rule),
                                     SPREAD_FLOOR)


def tracker_kernel(name: str) -> Callable:
    """``fn(task, smooth, offsets, signs, ema, step, counter, stats, frozen, decay, flip_weight, threshold,
    warmup, top_k, rule, hysteresis)`` of a concrete tracker backend; updates the state tensors in place."""
    if name == "triton":
        from .kernels import triton_conflict

        return triton_conflict.conflict_update
    if name == "cuda":
        return _cuda_tracker
    return _reference_tracker
