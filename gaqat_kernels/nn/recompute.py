"""Conv2d / linear with an LSQ-quantized input that keeps only the float input for backward.

Built from autograd pieces, a quantized layer stores its input x (for the LSQ gradient) and the quantized
input (for the weight gradient of the conv or matmul): one activation-sized tensor more than full precision
per layer, while x itself is usually kept anyway by the layer before (a ReLU keeps its output, which is x).
These Functions save x, the scale and the (small) quantized weight, and in backward recompute the quantized
input with one forward kernel, a memory-bound pass that is cheap next to the conv, before the conv/matmul
backward and the LSQ backward. Under autocast they cast exactly as autocast would (input, weight and bias to
the autocast dtype for the conv/matmul, gradients back to the original dtypes), so the gradients are those of
the composed layer.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import ops
from ..backends import resolve
from ..kernels import extension


def _autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def _cast(t: Optional[Tensor], dtype: Optional[torch.dtype]) -> Optional[Tensor]:
    """Autocast's rule: floating tensors other than float64 go to the autocast dtype."""
    if t is None or dtype is None or t.dtype == torch.float64:
        return t
    return t.to(dtype)


class _Quantized:
    """The activation quantizer's fixed arguments, resolved once per call."""

    def __init__(self, quantizer, x: Tensor):
        self.bits, self.signed = quantizer.bits, quantizer.signed
        self.backend = resolve(quantizer.backend, x)

    def forward(self, x: Tensor, scale: Tensor) -> Tensor:
        return ops.lsq_forward_values(x, scale, self.bits, self.signed, None, self.backend)

    def backward(self, dxq: Tensor, x: Tensor, scale: Tensor) -> Tuple[Tensor, Tensor]:
        return ops.lsq_backward_values(dxq, x, scale, self.bits, self.signed, None, None, self.backend)


class _QuantInputConv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, weight, bias, quant: _Quantized, stride, padding, dilation, groups):
        dtype = _autocast_dtype(x.device.type)
        xq = quant.forward(x, scale)
        with torch.autocast(x.device.type, enabled=False):
            y = F.conv2d(_cast(xq, dtype), _cast(weight, dtype), _cast(bias, dtype), stride, padding, dilation,
                         groups)
        ctx.save_for_backward(x, scale, weight)
        ctx.quant, ctx.dtype, ctx.conv = quant, dtype, (stride, padding, dilation, groups)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        x, scale, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        need_x, need_s, need_w, need_b = ctx.needs_input_grad[:4]
        xq = _cast(ctx.quant.forward(x, scale), ctx.dtype)  # recomputed: only x was kept
        wc = _cast(weight, ctx.dtype)
        bias_sizes = None if ctx.bias_dtype is None else [wc.shape[0]]
        dxq, dw, db = torch.ops.aten.convolution_backward(
            dy, xq, wc, bias_sizes, list(stride), list(padding), list(dilation), False, [0, 0], groups,
            [need_x or need_s, need_w, need_b])
        dx = ds = None
        if need_x or need_s:
            dx, ds = ctx.quant.backward(dxq, x, scale)
        return (dx if need_x else None, ds if need_s else None, dw.to(weight.dtype) if need_w else None,
                db.to(ctx.bias_dtype) if need_b else None, None, None, None, None, None)


class _QuantInputLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, weight, bias, quant: _Quantized):
        dtype = _autocast_dtype(x.device.type)
        xq = quant.forward(x, scale)
        with torch.autocast(x.device.type, enabled=False):
            y = F.linear(_cast(xq, dtype), _cast(weight, dtype), _cast(bias, dtype))
        ctx.save_for_backward(x, scale, weight)
        ctx.quant, ctx.dtype = quant, dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        x, scale, weight = ctx.saved_tensors
        need_x, need_s, need_w, need_b = ctx.needs_input_grad[:4]
        dy2 = dy.reshape(-1, dy.shape[-1])
        dx = ds = dw = db = None
        if need_x or need_s:
            dxq = dy.matmul(_cast(weight, ctx.dtype))
            dx, ds = ctx.quant.backward(dxq, x, scale)
        if need_w:
            xq = _cast(ctx.quant.forward(x, scale), ctx.dtype)  # recomputed: only x was kept
            dw = dy2.t().matmul(xq.reshape(-1, xq.shape[-1])).to(weight.dtype)
        if need_b:
            db = dy2.sum(0).to(ctx.bias_dtype)
        return dx if need_x else None, ds if need_s else None, dw, db, None


def can_recompute(module, x: Tensor) -> bool:
    """Whether ``module`` (a QuantConv2d / QuantLinear) may take the recomputing path for input ``x``.

    Only in plain eager training with an initialised per-tensor activation quantizer that has no hooks (its
    hooks, e.g. ``initialize_quantizers``', must see the call) and outside checked mode; under
    torch.compile the composed layer is traced instead and Inductor decides what to keep.
    """
    q = module.act_quantizer
    return (getattr(module, "recompute_quantized_input", True) and q is not None and not q.per_channel and not q._init_pending
            and torch.is_grad_enabled() and not torch.compiler.is_compiling() and not ops.checked_mode_on()
            and not (q._forward_hooks or q._forward_pre_hooks) and type(x) in ops.PLAIN_TYPES
            and x.dtype in ops.SUPPORTED_DTYPES)


def _cpp_args(q, x: Tensor, quant: _Quantized):
    """``(qn, qp, grad scale, autocast dtype)`` for the C++ autograd nodes, or None where they do not apply:
    only the cpu/cuda backends, plain tensors and no dispatch mode (the Python Functions cover the rest)."""
    if quant.backend not in ("cpu", "cuda") or not ops.plain_eager(x, q.scale) or not hasattr(
            extension.MODULE, "quant_input_conv2d_autograd"):
        return None
    return (*ops.kernel_args(x, q.bits, q.signed, None, None), _autocast_dtype(x.device.type))


def quant_input_conv2d(module, x: Tensor, weight: Tensor) -> Tensor:
    """``module``'s conv of its quantized input with ``weight`` (already quantized), keeping only ``x``."""
    q = module.act_quantizer
    ops.validate(x, q.scale, q.bits, q.signed, None, None)
    quant = _Quantized(q, x)
    cpp = _cpp_args(q, x, quant)
    if cpp is not None:  # the same computation with its autograd node in C++: far less host time per layer
        return extension.MODULE.quant_input_conv2d_autograd(
            x, q.scale, weight, module.bias, *cpp, list(module.stride), list(module.padding), list(module.dilation),
            module.groups)
    return _QuantInputConv2d.apply(x, q.scale, weight, module.bias, quant, module.stride,
                                   module.padding, module.dilation, module.groups)


def quant_input_linear(module, x: Tensor, weight: Tensor) -> Tensor:
    """``module``'s linear map of its quantized input with ``weight`` (already quantized), keeping only ``x``."""
    q = module.act_quantizer
    ops.validate(x, q.scale, q.bits, q.signed, None, None)
    quant = _Quantized(q, x)
    cpp = _cpp_args(q, x, quant)
    if cpp is not None:
        return extension.MODULE.quant_input_linear_autograd(x, q.scale, weight, module.bias, *cpp)
    return _QuantInputLinear.apply(x, q.scale, weight, module.bias, quant)
