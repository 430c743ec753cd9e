"""Third-party learned-scale fake quantizers for the kernel benchmark, each driven the way its own users drive it.

A peer is ``(param, fn)``: ``param(s)`` turns the benchmark's LSQ step sizes ``s`` (one per channel, or one) into
the peer's own trainable scale, once per case and outside the timings (so no conversion is timed), and
``fn(x, p)`` is the peer's forward, differentiable in ``x`` and ``p``. Both peers get the same quantization grid
as ours (step ``s``, levels ``qn..qp``), so the same elements clip.

- NNCF (``pip install --no-deps nncf-*.whl``): its fused CUDA fake-quant kernels (``Quantize_forward`` /
  ``Quantize_backward``, forward and backward in one launch each, the scale gradient reduced in the kernel),
  built from the installed package's own extension sources with ``torch.utils.cpp_extension.load`` as NNCF builds
  them, and called as its ``QuantizeSymmetric`` autograd function calls them. Only the sources are used: importing
  ``nncf`` itself needs scipy, scikit-learn and more, which the offline GPU box lacks.
- torchao (``pip install --no-deps torchao-*.whl``): ``IntxFakeQuantizer`` with range learning (its QAT fake
  quantizer with a learnable scale), symmetric per-channel; torchao quantizes 2-D weights per channel, so a conv
  weight is viewed as ``(out_channels, -1)``. It has no learnable per-tensor scale: no activation cases.

Each builder returns None when its package is not installed or the case is outside what it does
(``bench_kernels.py`` says which packages it did not find).
"""
from __future__ import annotations

import functools
import importlib.util
import os
from typing import Callable, Optional, Tuple

import torch

Peer = Tuple[Callable, Callable]


def installed(name: str) -> bool:
    """Whether the package is installed (found, not imported)."""
    return _package_dir(name) is not None


def _package_dir(name: str) -> Optional[str]:
    """The installed package's folder, found without importing it."""
    spec = importlib.util.find_spec(name)
    return None if spec is None or not spec.submodule_search_locations else list(spec.submodule_search_locations)[0]


def nncf_functions(device_type: str = "cuda"):
    """NNCF's compiled quantization functions for ``device_type`` ("cuda" or "cpu"), or None if NNCF is missing.
    A failed build raises, the same error on every later call (built, or failed, once per process)."""
    if not installed("nncf"):
        return None
    functions, error = _build_nncf(device_type)
    if error is not None:
        raise error
    return functions


@functools.lru_cache(maxsize=None)
def _build_nncf(device_type: str):
    try:
        return _load_nncf(device_type), None
    except Exception as e:  # kept, so that each benchmark case does not rebuild in vain
        return None, e


def _load_nncf(device_type: str):
    root = _package_dir("nncf")
    from torch.utils.cpp_extension import load

    ext = os.path.join(root, "torch", "extensions")
    src = os.path.join(ext, "src")
    if device_type == "cuda":
        sources = [os.path.join(src, "quantization", "cuda", f) for f in ("functions_cuda.cpp", "functions_cuda_impl.cu")]
    else:
        sources = [os.path.join(src, "quantization", "cpu", "functions_cpu.cpp"),
                   os.path.join(src, "common", "cpu", "tensor_funcs.cpp")]
    return load(f"nncf_quantized_functions_{device_type}", sources, extra_include_paths=[os.path.join(ext, "include")],
                verbose=False)


class _NNCFSymmetric(torch.autograd.Function):
    """NNCF's ``QuantizeSymmetric`` (nncf/torch/quantization/quantize_functions.py), step for step: the range is
    ``[scale * level_low / level_high, scale]``, 16-bit inputs cast the scale to their dtype, and the scale's
    gradient is the kernel's gradient of the range."""

    @staticmethod
    def forward(ctx, x, scale, level_low, level_high, levels, functions):
        if x.dtype in (torch.bfloat16, torch.float16):
            scale = scale.type(x.dtype)
        input_low = scale * (level_low / level_high)
        input_range = scale - input_low
        y = functions.Quantize_forward(x, input_low, input_range, levels)
        ctx.save_for_backward(x, input_low, input_range)
        ctx.args = (levels, level_low, level_high, functions)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, input_low, input_range = ctx.saved_tensors
        levels, level_low, level_high, functions = ctx.args
        if x.is_cuda:
            dx, _, dscale = functions.Quantize_backward(dy.contiguous(), x, input_low, input_range, levels,
                                                        level_low, level_high)
        else:  # the CPU binding takes an is_asymmetric flag
            dx, _, dscale = functions.Quantize_backward(dy.contiguous(), x, input_low, input_range, levels,
                                                        level_low, level_high, False)
        return dx, dscale, None, None, None, None


def nncf_peer(bits: int, signed: bool, axis: Optional[int], ndim: int, device_type: str = "cuda") -> Optional[Peer]:
    """NNCF's symmetric quantizer with ``2**bits`` levels; per-channel only on axis 0, as NNCF's weights."""
    if not signed or axis not in (None, 0):
        return None
    functions = nncf_functions(device_type)
    if functions is None:
        return None
    level_low, level_high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1

    def param(s):  # NNCF's scale is the upper end of the range: the step times level_high
        p = s.detach() * level_high
        p = p.reshape(1) if axis is None else p.reshape((-1,) + (1,) * (ndim - 1))
        return p.requires_grad_()

    def fn(x, p):
        return _NNCFSymmetric.apply(x, p, level_low, level_high, 2 ** bits, functions)
    return param, fn


def torchao_peer(bits: int, signed: bool, axis: Optional[int]) -> Optional[Peer]:
    """torchao's ``IntxFakeQuantizer`` with a learnable per-channel scale (axis 0, symmetric, int``bits``)."""
    if not signed or axis != 0 or bits > 7 or not installed("torchao"):
        return None
    from torchao.quantization.qat import IntxFakeQuantizeConfig, IntxFakeQuantizer

    config = IntxFakeQuantizeConfig(getattr(torch, f"int{bits}"), "per_channel", is_symmetric=True,
                                    is_dynamic=False, range_learning=True)
    quantizer = IntxFakeQuantizer(config)

    def param(s):  # what range learning would have made of its first forward: scale (C, 1), zero point 0
        quantizer.scale = torch.nn.Parameter(s.detach().reshape(-1, 1).clone())
        quantizer.zero_point = torch.zeros_like(quantizer.scale, dtype=torch.int32)
        quantizer._initialized = True
        return quantizer.scale

    def fn(x, p):
        assert p is quantizer.scale
        return quantizer(x.reshape(x.shape[0], -1)).reshape(x.shape)
    return param, fn
