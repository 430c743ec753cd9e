"""The op boundary: ``lsq_fake_quant`` as torch custom ops with autograd and fake (meta) implementations.

Everything above this module calls ``lsq_fake_quant``; everything below it is a backend (``backends.py``).
Because the op is a ``torch.library.custom_op`` with ``register_fake`` and ``register_autograd``, it runs
in eager mode, traces under ``torch.compile(fullgraph=True)`` without graph breaks, and can be captured
in CUDA graphs (no host synchronisation on any path unless checked mode is on). The C++ backends (cpu,
cuda) have their own dispatcher operators defined in C++ (``lsq_fake_quant_ext``), so compiled graphs reach
their kernels without Python; in plain eager mode they take a shorter road still: an autograd node built in
C++ (``plain_eager``). The reference and Triton backends go through the Python custom ops below.
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
from typing import Iterator, Optional, Tuple

import torch
from torch import Tensor

from . import backends
from .kernels import extension
from .kernels.layout import as_dense, match_layout, output_like
from .kernels.reference import default_grad_scale, quant_bounds, reference_backward, reference_forward

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_checked = False

# How lsq_fake_quant lowers under torch.compile (dynamo): "decomposed" traces the op's formulas as plain torch ops
# (forward and backward, in an autograd.Function), which Inductor fuses with the neighbouring ops and schedules
# itself; "triton_backward" traces the forward so and runs the backward as our fused Triton kernel (a triton_op, which
# Inductor launches from its own code but does not split: one pass over x and dy for dx and the scale gradient) on
# CUDA tensors (elsewhere: as "decomposed"); "custom_op" keeps the opaque custom op, i.e. the chosen backend's
# kernels inside the compiled graph.
COMPILE_LOWERINGS = ("decomposed", "triton_backward", "custom_op")
_compile_lowering = os.environ.get("GAQAT_COMPILE_LOWERING", "decomposed")
if _compile_lowering not in COMPILE_LOWERINGS:
    raise ValueError(f"GAQAT_COMPILE_LOWERING: expected one of {COMPILE_LOWERINGS}, got {_compile_lowering!r}")


@contextlib.contextmanager
def checked_mode(enabled: bool = True) -> Iterator[None]:
    """Within this context, ``lsq_fake_quant`` also checks that every scale is finite and positive.

    The check reads the scale's values, so it synchronises with the device; it is skipped while tracing
    under ``torch.compile``. Outside the context no value is ever read on the host.
    """
    global _checked
    previous, _checked = _checked, enabled
    try:
        yield
    finally:
        _checked = previous


def inductor_ieee_division() -> None:
    """Make Inductor's float32 ``/`` IEEE round-to-nearest, as the kernels' and eager's: its Triton code otherwise
    divides with the approximate ``div.full.f32`` (up to 2 ulp), which moves ``x / s`` across rounding ties of
    the decomposed lowering. Inductor's own switch (``config.eager_numerics.division_rounding``, env
    ``TORCHINDUCTOR_EMULATE_DIVISION_ROUNDING``); an explicit ``=0`` in the environment is respected. Set through
    the environment while Inductor's config is not imported yet (importing it costs seconds)."""
    if os.environ.get("TORCHINDUCTOR_EMULATE_DIVISION_ROUNDING") == "0":
        return
    config = sys.modules.get("torch._inductor.config")
    numerics = getattr(config, "eager_numerics", None)
    if numerics is not None and hasattr(numerics, "division_rounding"):
        numerics.division_rounding = True
    else:
        os.environ["TORCHINDUCTOR_EMULATE_DIVISION_ROUNDING"] = "1"


if _compile_lowering != "custom_op":
    inductor_ieee_division()


@contextlib.contextmanager
def compile_lowering(mode: str) -> Iterator[None]:
    """Within this context, ``torch.compile`` traces ``lsq_fake_quant`` as ``mode`` (``COMPILE_LOWERINGS``; default
    "decomposed", or the environment's ``GAQAT_COMPILE_LOWERING``). Read while tracing: compile inside it."""
    global _compile_lowering
    if mode not in COMPILE_LOWERINGS:
        raise ValueError(f"mode: expected one of {COMPILE_LOWERINGS}, got {mode!r}")
    previous, _compile_lowering = _compile_lowering, mode
    if mode != "custom_op":
        inductor_ieee_division()
    try:
        yield
    finally:
        _compile_lowering = previous


def _dynamo_compiling() -> bool:
    is_dynamo = getattr(torch.compiler, "is_dynamo_compiling", None)
    return is_dynamo() if is_dynamo is not None else torch.compiler.is_compiling()


class _DecomposedFakeQuant(torch.autograd.Function):
    """The op as plain torch ops, for Inductor: ``reference_forward`` / ``reference_backward``, the contract's
    formulas (IEEE float32 division, half-to-even ``torch.round``, inclusive STE bounds, the scale used as stored,
    the LSQ gradient scale, NaN kept in its channel). Inductor fuses the backward's elementwise terms into the
    per-channel sum, so no full-size float32 temporary needs to reach memory; only the sum order differs from the
    kernels (the scale gradient agrees to float rounding, y and dx bit for bit)."""

    @staticmethod
    def forward(ctx, x, scale, qn, qp, axis, grad_scale):
        ctx.save_for_backward(x, scale)
        ctx.config = (qn, qp, axis, grad_scale)
        return reference_forward(x, scale, qn, qp, axis)

    @staticmethod
    def backward(ctx, dy):
        x, scale = ctx.saved_tensors
        dx, ds = reference_backward(dy, x, scale, *ctx.config, per_tensor_by_dim1=True)
        return (dx if ctx.needs_input_grad[0] else None, ds if ctx.needs_input_grad[1] else None,
                None, None, None, None)


def triton_backward_values(dy: Tensor, x: Tensor, scale: Tensor, qn: int, qp: int, axis: Optional[int],
                           g: float) -> Tuple[Tensor, Tensor]:
    """``(dx, ds)`` from our Triton backward, on CUDA tensors launched through ``torch.library.wrap_triton``: traced
    (Inductor, ``make_fx``), the launches become Triton-kernel calls in the graph; in eager they run. The triton_op's
    body."""
    from .kernels import triton_lsq

    xd = as_dense(x)
    dx = output_like(x)
    ds = torch.empty(scale.shape, dtype=torch.float32, device=scale.device)
    # Triton on CPU tensors runs interpreted, which nothing traces and torch 2.11's wrap_triton rejects
    launch = {"launch": torch.library.wrap_triton} if x.is_cuda else {}
    triton_lsq.backward(match_layout(dy.to(x.dtype), xd), xd, scale.contiguous().reshape(-1), dx, ds.view(-1),
                        qn, qp, axis, g, **launch)
    return dx, ds


if backends.TRITON_INSTALLED:
    torch.library.triton_op("gaqat_kernels::lsq_fake_quant_backward_triton", triton_backward_values, mutates_args=())


class _TritonBackwardFakeQuant(_DecomposedFakeQuant):
    """``_DecomposedFakeQuant``'s forward (fused by Inductor into its neighbours) with our fused Triton backward, a
    ``triton_op`` that Inductor launches as one kernel (two when a channel's sum is split over programs): dx and the
    scale gradient from one read of x and dy, the scale gradient summed in a fixed order."""

    @staticmethod
    def backward(ctx, dy):
        x, scale = ctx.saved_tensors
        dx, ds = torch.ops.gaqat_kernels.lsq_fake_quant_backward_triton(dy, x, scale, *ctx.config)
        return (dx if ctx.needs_input_grad[0] else None, ds if ctx.needs_input_grad[1] else None,
                None, None, None, None)


def _traced_function(x: Tensor):
    """The autograd.Function that ``lsq_fake_quant`` traces as under Dynamo for the current lowering."""
    # on CPU tensors Triton runs interpreted and is launched directly: not traceable
    if _compile_lowering == "triton_backward" and backends.TRITON_INSTALLED and x.is_cuda:
        return _TritonBackwardFakeQuant
    return _DecomposedFakeQuant


def checked_mode_on() -> bool:
    """Whether ``checked_mode()`` is active."""
    return _checked


def _channels(x: Tensor, axis: Optional[int]) -> int:
    return 1 if axis is None else x.shape[axis]


def kernel_args(x: Tensor, bits: int, signed: bool, axis: Optional[int], grad_scale: Optional[float]
                ) -> Tuple[int, int, float]:
    """``(qn, qp, g)`` that every kernel takes: the integer bounds and the scale-gradient factor (LSQ's default
    ``1 / sqrt(numel / channels * qp)`` unless ``grad_scale`` is given)."""
    qn, qp = quant_bounds(bits, signed)
    g = default_grad_scale(x.numel(), _channels(x, axis), qp) if grad_scale is None else grad_scale
    return qn, qp, g


def lsq_forward_values(x: Tensor, scale: Tensor, bits: int, signed: bool, axis: Optional[int], backend: str) -> Tensor:
    """The op's forward on a concrete backend, outside autograd (for layers that fuse it into their own
    backward); arguments as ``lsq_fake_quant``'s, already validated, ``axis`` non-negative or None."""
    qn, qp = quant_bounds(bits, signed)
    y = output_like(x)
    backends.get(backend).forward(as_dense(x), scale.contiguous().reshape(-1), y, qn, qp, axis)
    return y


def lsq_backward_values(dy: Tensor, x: Tensor, scale: Tensor, bits: int, signed: bool, axis: Optional[int],
                        grad_scale: Optional[float], backend: str) -> Tuple[Tensor, Tensor]:
    """``(dx, ds)`` of the op for output gradient ``dy``, outside autograd (see ``lsq_forward_values``)."""
    qn, qp, g = kernel_args(x, bits, signed, axis, grad_scale)
    xd = as_dense(x)
    dx = output_like(x)
    ds = torch.empty(scale.shape, dtype=scale.dtype, device=scale.device)
    backends.get(backend).backward(
        match_layout(dy.to(x.dtype), xd), xd, scale.contiguous().reshape(-1), dx, ds.view(-1), qn, qp, axis, g
    )
    return dx, ds


@torch.library.custom_op("gaqat_kernels::lsq_fake_quant", mutates_args=())
def _lsq_forward_op(
    x: Tensor, scale: Tensor, bits: int, signed: bool, axis: Optional[int], grad_scale: Optional[float], backend: str
) -> Tensor:
    return lsq_forward_values(x, scale, bits, signed, axis, backend)


@_lsq_forward_op.register_fake
def _(x, scale, bits, signed, axis, grad_scale, backend):
    return output_like(x)


@torch.library.custom_op("gaqat_kernels::lsq_fake_quant_backward", mutates_args=())
def _lsq_backward_op(
    dy: Tensor, x: Tensor, scale: Tensor, bits: int, signed: bool, axis: Optional[int],
    grad_scale: Optional[float], backend: str,
) -> Tuple[Tensor, Tensor]:
    return lsq_backward_values(dy, x, scale, bits, signed, axis, grad_scale, backend)


@_lsq_backward_op.register_fake
def _(dy, x, scale, bits, signed, axis, grad_scale, backend):
    return output_like(x), torch.empty(scale.shape, dtype=scale.dtype, device=scale.device)


def _setup_context(ctx, inputs, output):
    x, scale, bits, signed, axis, grad_scale, backend = inputs
    ctx.save_for_backward(x, scale)
    ctx.config = (bits, signed, axis, grad_scale, backend)


def _backward(ctx, dy):
    x, scale = ctx.saved_tensors
    dx, ds = _lsq_backward_op(dy, x, scale, *ctx.config)
    return (
        dx if ctx.needs_input_grad[0] else None,
        ds if ctx.needs_input_grad[1] else None,
        None, None, None, None, None,
    )


_lsq_forward_op.register_autograd(_backward, setup_context=_setup_context)


# The cpu/cuda backends' operators, defined in C++ (csrc/bindings.cpp, gaqat_kernels::lsq_fake_quant_ext*):
# their fake implementations and autograd formula. Traced graphs call them through the dispatcher with no
# Python in between (a Python custom op costs tens of microseconds of host time per call).
if extension.HAS_CPU:
    @torch.library.register_fake("gaqat_kernels::lsq_fake_quant_ext")
    def _(x, scale, qn, qp, axis, grad_scale):
        return output_like(x)

    @torch.library.register_fake("gaqat_kernels::lsq_fake_quant_ext_backward")
    def _(dy, x, scale, qn, qp, axis, grad_scale):
        return output_like(x), torch.empty(scale.shape, dtype=scale.dtype, device=scale.device)

    def _ext_setup_context(ctx, inputs, output):
        x, scale, qn, qp, axis, grad_scale = inputs
        ctx.save_for_backward(x, scale)
        ctx.config = (qn, qp, axis, grad_scale)

    def _ext_backward(ctx, dy):
        x, scale = ctx.saved_tensors
        dx, ds = torch.ops.gaqat_kernels.lsq_fake_quant_ext_backward(dy, x, scale, *ctx.config)
        return (dx if ctx.needs_input_grad[0] else None, ds if ctx.needs_input_grad[1] else None,
                None, None, None, None)

    torch.library.register_autograd("gaqat_kernels::lsq_fake_quant_ext", _ext_backward,
                                    setup_context=_ext_setup_context)


def validate(x, scale, bits, signed, axis, grad_scale) -> Optional[int]:
    """Check the arguments; return the axis made non-negative. Errors name the argument."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if not isinstance(scale, Tensor):
        raise TypeError(f"scale: expected a torch.Tensor, got {type(scale).__name__}")
    if x.dtype not in SUPPORTED_DTYPES + (torch.float64,):
        raise TypeError(f"x: expected float32, bfloat16 or float16 (float64 for the reference), got {x.dtype}")
    if scale.dtype != torch.float32 and not (scale.dtype == torch.float64 and x.dtype == torch.float64):
        raise TypeError(f"scale: expected float32 (float64 only with float64 x), got {scale.dtype}")
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits: expected an integer in 2..8, got {bits!r}")
    if not isinstance(signed, bool):
        raise TypeError(f"signed: expected a bool, got {signed!r}")
    if x.device != scale.device:
        raise ValueError(f"scale: expected it on x's device {x.device}, got {scale.device}")
    if axis is None:
        if scale.numel() != 1:
            raise ValueError(f"scale: per-tensor quantization (axis=None) needs one element, got shape {tuple(scale.shape)}")
    else:
        if isinstance(axis, bool) or not isinstance(axis, int):
            raise TypeError(f"axis: expected None or an int, got {axis!r}")
        if not -x.dim() <= axis < x.dim():
            raise ValueError(f"axis: expected a dimension in [{-x.dim()}, {x.dim() - 1}] of x (shape {tuple(x.shape)}), got {axis}")
        axis = axis % x.dim()
        if tuple(scale.shape) != (x.shape[axis],):
            raise ValueError(f"scale: per-channel quantization along axis {axis} needs shape ({x.shape[axis]},), got {tuple(scale.shape)}")
    if grad_scale is not None:
        if isinstance(grad_scale, bool) or not isinstance(grad_scale, (int, float)) or not (
            math.isfinite(grad_scale) and grad_scale > 0
        ):
            raise ValueError(f"grad_scale: expected None or a finite positive number, got {grad_scale!r}")
        grad_scale = float(grad_scale)
    return axis


def lsq_fake_quant(
    x: Tensor,
    scale: Tensor,
    *,
    bits: int,
    signed: bool,
    axis: Optional[int] = None,
    grad_scale: Optional[float] = None,
    backend: str = "auto",
) -> Tensor:
    """LSQ fake quantization ``y = round_half_even(clamp(x / s, qn, qp)) * s``, differentiable in x and s.

    Args:
        x: float32, bfloat16 or float16 tensor of any shape and strides, on CPU or CUDA (float64 runs on
            the reference backend, as the oracle).
        scale: float32 step size; one element for per-tensor, shape ``(x.shape[axis],)`` per-channel.
            Its value is used exactly.
        bits: 2..8. signed: range ``[-2^(b-1), 2^(b-1)-1]`` if True, else ``[0, 2^b-1]``.
        axis: None for per-tensor, else the channel dimension (negative allowed).
        grad_scale: multiplier on the scale gradient; None is LSQ's ``1/sqrt(n * qp)``, n = elements per scale.
        backend: "auto", "reference", "triton", "cuda" or "cpu" (see ``available_backends()``). Under
            ``torch.compile`` the op is traced as plain torch ops by default (``compile_lowering``), for any backend.

    Returns:
        ``y`` with x's shape and dtype. Backward: ``dx = dy`` where ``qn <= x/s <= qp`` (inclusive) else 0;
        the scale gradient is float32 with scale's shape (LSQ formula, reduced per channel).
    """
    axis = validate(x, scale, bits, signed, axis, grad_scale)
    concrete = backends.resolve(backend, x)
    compiling = torch.compiler.is_compiling()
    if _checked and not compiling:
        if not bool(torch.isfinite(scale).all()) or not bool((scale > 0).all()):
            raise ValueError("scale: checked mode requires every scale to be finite and > 0")
    if compiling and _compile_lowering != "custom_op" and _dynamo_compiling():
        qn, qp, g = kernel_args(x, bits, signed, axis, grad_scale)
        return _traced_function(x).apply(x, scale, qn, qp, axis, g)
    if concrete in ("cpu", "cuda"):
        if not compiling and plain_eager(x, scale):
            qn, qp, g = kernel_args(x, bits, signed, axis, grad_scale)
            return extension.MODULE.lsq_fake_quant_autograd(x, scale, qn, qp, -1 if axis is None else axis, g)
        qn, qp = quant_bounds(bits, signed)
        return torch.ops.gaqat_kernels.lsq_fake_quant_ext(x, scale, qn, qp, -1 if axis is None else axis, grad_scale)
    if concrete == "triton" and not compiling and plain_eager(x, scale):
        return _EagerFakeQuant.apply(x, scale, bits, signed, axis, grad_scale, concrete)
    return _lsq_forward_op(x, scale, bits, signed, axis, grad_scale, concrete)


class _EagerFakeQuant(torch.autograd.Function):
    """The custom op's autograd for plain eager calls of the Triton backend, without the custom-op dispatch
    (its Python layers cost more host time than the kernels on small tensors); same launchers, same bits."""

    @staticmethod
    def forward(ctx, x, scale, bits, signed, axis, grad_scale, backend):
        ctx.save_for_backward(x, scale)
        ctx.config = (bits, signed, axis, grad_scale, backend)
        return lsq_forward_values(x, scale, bits, signed, axis, backend)

    @staticmethod
    def backward(ctx, dy):
        x, scale = ctx.saved_tensors
        dx, ds = lsq_backward_values(dy, x, scale, *ctx.config)
        return (dx if ctx.needs_input_grad[0] else None, ds if ctx.needs_input_grad[1] else None,
                None, None, None, None, None)


PLAIN_TYPES = (Tensor, torch.nn.Parameter)  # not FakeTensors, not tensor subclasses
_dispatch_modes = getattr(torch._C, "_len_torch_dispatch_stack", lambda: 0)


def plain_eager(x: Tensor, scale: Tensor) -> bool:
    """True for ordinary tensors with no tracing or dispatch mode active: then the C++ autograd path runs
    the same kernels as the custom op with less host time. Anything else (FakeTensors, functionalisation,
    dispatch modes) goes through the custom op and its fake implementation."""
    return type(x) in PLAIN_TYPES and type(scale) in PLAIN_TYPES and _dispatch_modes() == 0


def _conflict_output(task: Tensor, offsets: Tensor) -> Tensor:
    """The (S, 4) float32 result buffer; shared by the real and the fake implementation."""
    return torch.empty((offsets.numel() - 1, 4), dtype=torch.float32, device=task.device)


@torch.library.custom_op("gaqat_kernels::segment_conflict", mutates_args=())
def _segment_conflict_op(task: Tensor, smooth: Tensor, offsets: Tensor, backend: str) -> Tensor:
    out = _conflict_output(task, offsets)
    backends.conflict_kernel(backend)(task, smooth, offsets, out)
    return out


@_segment_conflict_op.register_fake
def _(task, smooth, offsets, backend):
    return _conflict_output(task, offsets)


def _check_offsets_values(offsets: Tensor, n: int) -> None:
    if offsets[0].item() != 0 or offsets[-1].item() != n:
        raise ValueError(f"offsets: expected offsets[0] == 0 and offsets[-1] == {n} (the length of task)")
    if offsets.numel() > 1 and bool((offsets[1:] < offsets[:-1]).any()):
        raise ValueError("offsets: expected non-decreasing values")


def segment_conflict(task: Tensor, smooth: Tensor, offsets: Tensor, *, backend: str = "auto") -> Tensor:
    """Per-segment conflict statistics of two gradients, all segments in one launch.

    Args:
        task, smooth: float32 1-D tensors of equal length N (e.g. the task-loss and smoothness-loss gradients
            of every quantizer scale, packed into one buffer); float64 runs on the reference backend.
        offsets: int64 1-D, length S + 1: segment k is ``[offsets[k], offsets[k+1])``; ``offsets[0] = 0``,
            non-decreasing, ``offsets[-1] = N``; empty segments are allowed. Its values are checked when it
            lives on the CPU, and on the GPU only in ``checked_mode()`` (reading them would synchronise).
        backend: "auto" (triton on CUDA, else reference), "reference" or "triton".

    Returns:
        float32 ``(S, 4)``: fraction of elements with ``task * smooth < 0``, cosine similarity (0 when either
        norm is 0), ``||task||``, ``||smooth||``. Empty segments give zeros; a NaN affects its own segment only.
    """
    for name, t in (("task", task), ("smooth", smooth)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"{name}: expected float32 (float64 for the reference), got {t.dtype}")
        if t.dim() != 1:
            raise ValueError(f"{name}: expected a 1-D tensor, got shape {tuple(t.shape)}")
    if smooth.shape != task.shape or smooth.dtype != task.dtype or smooth.device != task.device:
        raise ValueError(f"smooth: expected task's length {task.numel()}, dtype and device, got "
                         f"{smooth.numel()} {smooth.dtype} {smooth.device}")
    if not isinstance(offsets, Tensor) or offsets.dtype != torch.int64 or offsets.dim() != 1 or offsets.numel() < 1:
        raise TypeError("offsets: expected a 1-D int64 tensor with at least one element")
    if offsets.device != task.device:
        raise ValueError(f"offsets: expected it on task's device {task.device}, got {offsets.device}")
    concrete = backends.resolve_conflict(backend, task)
    if not torch.compiler.is_compiling() and (offsets.device.type == "cpu" or _checked):
        _check_offsets_values(offsets, task.numel())
    return _segment_conflict_op(task.contiguous(), smooth.contiguous(), offsets.contiguous(), concrete)


@torch.library.custom_op("gaqat_kernels::conflict_update",
                         mutates_args=("signs", "ema", "step", "counter", "stats", "frozen"))
def _conflict_update_op(task: Tensor, smooth: Tensor, offsets: Tensor, signs: Tensor, ema: Tensor, step: Tensor,
                        counter: Tensor, stats: Tensor, frozen: Tensor, decay: float, flip_weight: float,
                        threshold: float, warmup: int, top_k: int, rule: str, hysteresis: float,
                        backend: str) -> None:
    backends.tracker_kernel(backend)(task, smooth, offsets, signs, ema, step, counter, stats, frozen, decay,
                                     flip_weight, threshold, warmup, top_k, rule, hysteresis)


@_conflict_update_op.register_fake
def _(task, smooth, offsets, signs, ema, step, counter, stats, frozen, decay, flip_weight, threshold, warmup,
      top_k, rule, hysteresis, backend):
    return None


def conflict_update(task: Tensor, smooth: Tensor, offsets: Tensor, state, *, decay: float, flip_weight: float,
                    threshold: float, warmup: int, top_k: int, rule: str = "absolute", hysteresis: float = 0.0,
                    backend: str = "auto") -> None:
    """One step of the stateful conflict tracker, in place on ``state`` (a ``ConflictState``), one launch.

    ``task``/``smooth``/``offsets`` follow ``segment_conflict``'s contract. Afterwards ``state.stats``
    (float32 (S, 7)) holds this step's statistics and ``state.frozen`` (bool (S,)) the freeze mask; the
    math is written out in ``kernels.reference.conflict_update_reference`` (``rule``/``hysteresis``: see
    ``kernels.reference.freeze_mask``). Use it through
    ``gaqat_kernels.algorithms.ConflictTracker``, which owns the state and checks the arguments.
    """
    concrete = backends.resolve_tracker(backend, task)
    _conflict_update_op(task, smooth, offsets, state.signs, state.ema, state.step, state.counter, state.stats,
                        state.frozen, float(decay), float(flip_weight), float(threshold), int(warmup),
                        int(top_k), str(rule), float(hysteresis), concrete)
