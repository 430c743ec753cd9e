"""Quantized drop-in layers: weights per output channel (signed), activations per tensor."""
from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch import Tensor, nn

from .quantizer import LSQQuantizer
from .recompute import can_recompute, quant_input_conv2d, quant_input_linear


def _quantizers(module: nn.Module, out_channels: int, w_bits: Optional[int], a_bits: Optional[int],
                a_signed: bool, backend: str) -> None:
    module.weight_quantizer = (
        LSQQuantizer(w_bits, signed=True, channels=out_channels, axis=0, backend=backend) if w_bits else None
    )
    module.act_quantizer = LSQQuantizer(a_bits, signed=a_signed, backend=backend) if a_bits else None
    module.recompute_quantized_input = True


def _quantized_weight(module: nn.Module) -> Tensor:
    return module.weight_quantizer(module.weight) if module.weight_quantizer is not None else module.weight


def _quantized_input_and_weight(module: nn.Module, x: Tensor):
    """The layer's input and weight after their quantizers (either may be None: full precision)."""
    if module.act_quantizer is not None:
        x = module.act_quantizer(x)
    return x, _quantized_weight(module)


class QuantConv2d(nn.Conv2d):
    """``nn.Conv2d`` whose input (per-tensor) and weight (per output channel) are LSQ fake-quantized.

    ``w_bits`` / ``a_bits`` of None leave that side in full precision. ``a_signed`` False suits inputs
    that come out of a ReLU. In eager training the quantized input is recomputed in backward instead of
    stored (``nn.recompute``; set ``recompute_quantized_input = False`` to store it).
    """

    def __init__(self, *args, w_bits: Optional[int] = 4, a_bits: Optional[int] = 4, a_signed: bool = True,
                 backend: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        _quantizers(self, self.out_channels, w_bits, a_bits, a_signed, backend)

    @classmethod
    def from_float(cls, conv: nn.Conv2d, **quant_kwargs) -> "QuantConv2d":
        """A QuantConv2d that shares ``conv``'s weight and bias Parameters (same objects, same values)."""
        q = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None,
                padding_mode=conv.padding_mode, device=conv.weight.device, dtype=conv.weight.dtype, **quant_kwargs)
        q.weight = conv.weight
        q.bias = conv.bias
        return q.to(conv.weight.device)

    def forward(self, x: Tensor) -> Tensor:
        if self.padding_mode == "zeros" and not isinstance(self.padding, str) and can_recompute(self, x):
            return quant_input_conv2d(self, x, _quantized_weight(self))
        x, w = _quantized_input_and_weight(self, x)
        return self._conv_forward(x, w, self.bias)


class QuantLinear(nn.Linear):
    """``nn.Linear`` whose input (per-tensor) and weight (per output feature) are LSQ fake-quantized.

    In eager training the quantized input is recomputed in backward instead of stored (see QuantConv2d).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, w_bits: Optional[int] = 4,
                 a_bits: Optional[int] = 4, a_signed: bool = True, backend: str = "auto", device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        _quantizers(self, out_features, w_bits, a_bits, a_signed, backend)

    @classmethod
    def from_float(cls, linear: nn.Linear, **quant_kwargs) -> "QuantLinear":
        """A QuantLinear that shares ``linear``'s weight and bias Parameters."""
        q = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                device=linear.weight.device, dtype=linear.weight.dtype, **quant_kwargs)
        q.weight = linear.weight
        q.bias = linear.bias
        return q.to(linear.weight.device)

    def forward(self, x: Tensor) -> Tensor:
        if can_recompute(self, x):
            return quant_input_linear(self, x, _quantized_weight(self))
        x, w = _quantized_input_and_weight(self, x)
        return F.linear(x, w, self.bias)
