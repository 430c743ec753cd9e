"""ONNX export with integer Q/DQ: what a trained fake-quant model computes, in a file ONNX Runtime runs.

``to_onnx(model, example_inputs, path)`` packs ``model`` (``export.convert``), traces it with torch's ONNX
exporter, then rewrites the graph: every quantized layer's float weight initializer becomes an integer
initializer of its codes (INT4/UINT4 at 4 bits from opset 21 on, else INT8/UINT8) and a DequantizeLinear with
the per-output-channel scales (axis 0; 1 where the exporter transposed a Linear weight), and every activation
quantizer is a QuantizeLinear/DequantizeLinear pair with its learned scale (int8/uint8; a Clip to the
quantizer's range in float after the pair below 8 bits: clamping round(x/s) to integer bounds before or
after the rounding is the same, so the graph computes round_half_even(clamp(x/s, qn, qp)) * s).

Batch norm stays a separate node (the exporter's eval-mode Conv+BN folding would change the integer weights).
"""
from __future__ import annotations

import copy
import os
from typing import Dict, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .export import PackedConv2d, _PackedLayer, convert
from .nn.modules import QuantConv2d, QuantLinear


class _ActQDQ(nn.Module):
    """An activation quantizer as the exporter sees it: fake_quantize (Q/DQ in ONNX), then the clamp to
    the quantizer's bits (a no-op at 8 bits)."""

    def __init__(self, quantizer: nn.Module):
        super().__init__()
        self.scale = float(quantizer.scale.detach().float().reshape(-1)[0])
        self.qn, self.qp = quantizer.qn, quantizer.qp
        self.lo, self.hi = (-128, 127) if quantizer.signed else (0, 255)

    def forward(self, x: Tensor) -> Tensor:
        y = torch.fake_quantize_per_tensor_affine(x, self.scale, 0, self.lo, self.hi)
        if (self.qn, self.qp) != (self.lo, self.hi):
            y = torch.clamp(y, self.qn * self.scale, self.qp * self.scale)
        return y


class _ExportLayer(nn.Module):
    """A packed layer for tracing: its dequantized weight as a float buffer (rewritten to integers after)."""

    def __init__(self, layer: _PackedLayer):
        super().__init__()
        self.is_conv = isinstance(layer, PackedConv2d)
        self.conv_args = getattr(layer, "conv_args", None)
        self.register_buffer("weight", layer.packed.dequantize().detach().clone())
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
        self.act = None if layer.act_quantizer is None else _ActQDQ(layer.act_quantizer)

    def forward(self, x: Tensor) -> Tensor:
        if self.act is not None:
            x = self.act(x)
        if self.is_conv:
            return F.conv2d(x, self.weight, self.bias, **self.conv_args)
        return F.linear(x, self.weight, self.bias)


def _packed_model(model: nn.Module) -> nn.Module:
    """``model`` packed (if it is a fake-quant model) with every packed layer swapped for its export form."""
    if any(isinstance(m, (QuantConv2d, QuantLinear)) and m.weight_quantizer is None and m.act_quantizer is not None
           for m in model.modules()):
        raise ValueError("model: a layer quantizes only its input; to_onnx exports layers with quantized weights")
    if any(isinstance(m, (QuantConv2d, QuantLinear)) for m in model.modules()):
        model = convert(model)
    out = copy.deepcopy(model).eval().cpu()
    layers = [(n, m) for n, m in out.named_modules() if isinstance(m, _PackedLayer)]
    if not layers:
        raise ValueError("model: no quantized layers to export; run gaqat_kernels.nn.quantize_model and train it "
                         "(or pass export.convert's packed model)")
    info = {}
    for name, m in layers:
        parent, _, child = name.rpartition(".")
        setattr(out.get_submodule(parent) if parent else out, child, _ExportLayer(m))
        info[name] = m.packed
    return out, info


def _int_type(bits: int, signed: bool, opset: int):
    import onnx

    if bits == 4 and opset >= 21:
        return onnx.TensorProto.INT4 if signed else onnx.TensorProto.UINT4
    return onnx.TensorProto.INT8 if signed else onnx.TensorProto.UINT8


def _integer_initializer(name: str, itype: int, codes):
    """An initializer of integer ``codes`` as raw little-endian bytes (4-bit: two per byte, low nibble first)."""
    import numpy as np
    import onnx
    from onnx import helper

    flat = codes.reshape(-1).astype(np.int64)
    if itype in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
        nibbles = (flat & 0xF).astype(np.uint8)
        if nibbles.size % 2:
            nibbles = np.append(nibbles, np.uint8(0))
        raw = (nibbles[0::2] | (nibbles[1::2] << 4)).astype(np.uint8).tobytes()
    else:
        raw = flat.astype(np.int8 if itype == onnx.TensorProto.INT8 else np.uint8).tobytes()
    return helper.make_tensor(name, itype, list(codes.shape), raw, raw=True)


def _integer_weights(graph, packed: Dict[str, nn.Module], opset: int) -> Dict[str, str]:
    """Replace each packed layer's float weight initializer by integer codes + DequantizeLinear; the type used
    per layer. The initializer is found by value (it is codes x scales exactly), so exporter renames do not matter."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    inits = {init.name: init for init in graph.initializer}
    arrays = {name: numpy_helper.to_array(init) for name, init in inits.items()}
    types, nodes = {}, []
    for layer, p in packed.items():
        w = p.dequantize().detach().cpu().numpy()
        codes = p.codes().reshape(p.shape).cpu().numpy()
        found = None
        for name, a in arrays.items():
            if a.dtype == np.float32 and a.shape == w.shape and np.array_equal(a, w):
                found, axis, q = name, 0, codes
            elif a.dtype == np.float32 and w.ndim == 2 and a.shape == w.T.shape and np.array_equal(a, w.T):
                found, axis, q = name, 1, codes.T
            if found:
                break
        if found is None:
            raise RuntimeError(f"to_onnx: the weight of layer {layer} is not an initializer of the exported graph")
        del arrays[found]
        itype = _int_type(p.bits, p.signed, opset)
        scale = p.scale.detach().cpu().float().numpy().reshape(-1)
        q_init = _integer_initializer(f"{layer}.weight_q", itype, q)
        s_init = numpy_helper.from_array(scale, f"{layer}.weight_scale")
        graph.initializer.remove(inits[found])
        graph.initializer.extend([q_init, s_init])
        attrs = {"axis": axis} if scale.size > 1 else {}
        inputs = [q_init.name, s_init.name]
        if scale.size == 1:
            s_init.CopyFrom(numpy_helper.from_array(scale.reshape(()), s_init.name))
        nodes.append(helper.make_node("DequantizeLinear", inputs, [found], name=f"{layer}.weight_dq", **attrs))
        types[layer] = onnx.TensorProto.DataType.Name(itype)
    for n in reversed(nodes):  # inputs are initializers only: first in topological order
        graph.node.insert(0, n)
    return types


def to_onnx(model: nn.Module, example_inputs: Union[Tensor, Sequence[Tensor]], path: str, *, opset: int = 21,
            dynamic_batch: bool = True) -> Dict:
    """Export a trained fake-quant model (or ``export.convert``'s packed model) to ONNX with integer Q/DQ.

    Args:
        model: a model with QuantConv2d/QuantLinear layers (weights quantized), or its packed form.
        example_inputs: one tensor or a tuple of them, for tracing (the model runs on the CPU copy).
        path: the .onnx file to write.
        opset: 13..21 (per-channel DequantizeLinear needs 13; INT4/UINT4 weights need 21, else INT8/UINT8).
        dynamic_batch: the first input dimension is symbolic, so one file serves every batch size.

    Returns ``{"path", "bytes", "opset", "weight_types": {layer: "INT4" | ...}}``. ``onnx.checker`` passes on
    the file (checked here).
    """
    try:
        import onnx
        from onnx import version_converter
    except ImportError as e:
        raise ImportError("to_onnx needs onnx: pip install onnx onnxruntime (the package's 'export' extra)") from e
    if not isinstance(opset, int) or not 13 <= opset <= 21:
        raise ValueError(f"opset: expected an int in 13..21 (per-channel DequantizeLinear needs 13), got {opset!r}")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a file path, got {type(path).__name__}")
    inputs = (example_inputs,) if isinstance(example_inputs, Tensor) else tuple(example_inputs)
    if not inputs or not all(isinstance(t, Tensor) for t in inputs):
        raise TypeError("example_inputs: expected a tensor or a sequence of tensors")
    traced, packed = _packed_model(model)
    inputs = tuple(t.detach().cpu().float() for t in inputs)
    names = [f"input{i}" for i in range(len(inputs))]
    axes = {n: {0: "batch"} for n in names + ["output"]} if dynamic_batch else None
    tmp = str(path) + ".tmp"
    export_opset = min(opset, 17)  # the TorchScript exporter's well-trodden opsets; converted up below
    # PRESERVE on an eval-mode model: no Conv+BatchNorm folding (it would change the integer weights)
    torch.onnx.export(traced, inputs, tmp, input_names=names, output_names=["output"], dynamic_axes=axes,
                      opset_version=export_opset, training=torch.onnx.TrainingMode.PRESERVE,
                      do_constant_folding=False, dynamo=False)
    proto = onnx.load(tmp)
    os.remove(tmp)
    if opset > export_opset:
        proto = version_converter.convert_version(proto, opset)
    types = _integer_weights(proto.graph, packed, opset)
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(path))
    return {"path": str(path), "bytes": os.path.getsize(path), "opset": opset, "weight_types": types}
