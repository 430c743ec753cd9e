"""Export a trained fake-quant model to real low-bit integer weights, save/load it, and run it.

``convert(model)`` returns a copy whose QuantConv2d/QuantLinear layers become PackedConv2d/PackedLinear: the
weight is stored as its integer codes ``q = round_half_even(clamp(w / s, qn, qp))`` packed into bytes (2, 3, 4
bits: a little-endian bit stream of ``q - qn``; 8 bits: int8) plus the float32 per-channel scales; activation
quantizers stay (their learned scale fake-quantizes the input exactly as in evaluation). The packed layers
dequantize once (``q * s`` in float32, cached per dtype and device), which is bit for bit the fake-quant weight,
so the converted model computes what the trained model evaluated.

``save(model, path)`` writes a safetensors file (the format is written here, no extra dependency) whose
``__metadata__`` holds a JSON description of every packed layer; ``load(path, model)`` rebuilds the packed
layers on the full-precision architecture ``model`` and loads every tensor, checking names and shapes.
"""
from __future__ import annotations

import copy
import json
import math
import os
import struct
from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .kernels.reference import quant_bounds
from .nn.convert import quantize_model, quantized_layers
from .nn.modules import QuantConv2d
from .nn.quantizer import LSQQuantizer

FORMAT = "gaqat_kernels.packed/1"


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """Pack non-negative integer codes (< 2**bits) into a uint8 bit stream, little-endian within bytes."""
    flat = codes.reshape(-1).to(torch.int64)
    n = flat.numel()
    bit_index = torch.arange(bits, dtype=torch.int64)
    stream = ((flat[:, None] >> bit_index) & 1).reshape(-1)  # bits of each code, lowest first
    stream = F.pad(stream, (0, (-stream.numel()) % 8))
    weights = (1 << torch.arange(8, dtype=torch.int64))
    return (stream.reshape(-1, 8) * weights).sum(1).to(torch.uint8) if n else torch.zeros(0, dtype=torch.uint8)


def unpack_codes(packed: Tensor, bits: int, n: int) -> Tensor:
    """Inverse of ``pack_codes``: the first ``n`` codes as int64."""
    if packed.numel() * 8 < n * bits:
        raise ValueError(f"packed: {packed.numel()} bytes cannot hold {n} codes of {bits} bits (truncated?)")
    if 8 % bits == 0:  # whole codes per byte: shifts and masks on bytes, no bit stream
        shifts = torch.arange(0, 8, bits, device=packed.device, dtype=torch.uint8)
        codes = (packed[:, None] >> shifts) & ((1 << bits) - 1)
        return codes.reshape(-1)[:n].to(torch.int64)
    stream = ((packed.to(torch.int64)[:, None] >> torch.arange(8, device=packed.device)) & 1).reshape(-1)
    stream = stream[: n * bits].reshape(n, bits)
    return (stream << torch.arange(bits, device=packed.device)).sum(1)


class _PackedWeight(nn.Module):
    """Integer weight codes + per-output-channel scales of one layer."""

    def __init__(self, shape, bits: int, signed: bool):
        super().__init__()
        self.shape, self.bits, self.signed = tuple(shape), bits, signed
        self.qn, self.qp = quant_bounds(bits, signed)
        n = math.prod(self.shape)
        storage = (torch.zeros(n, dtype=torch.int8) if bits == 8 and signed
                   else torch.zeros((n * bits + 7) // 8, dtype=torch.uint8))
        self.register_buffer("qweight", storage)
        self.register_buffer("scale", torch.ones(self.shape[0]))

    def set_from(self, weight: Tensor, scale: Tensor) -> None:
        """Store ``weight`` quantized with the per-output-channel ``scale`` (as the fake quantizer rounds it)."""
        s = scale.detach().float().reshape(-1, *([1] * (weight.dim() - 1)))
        codes = torch.round(torch.clamp(weight.detach().float() / s, self.qn, self.qp)).to(torch.int64)
        if self.bits == 8 and self.signed:
            self.qweight = codes.reshape(-1).to(torch.int8)
        else:
            self.qweight = pack_codes((codes - self.qn).cpu(), self.bits).to(weight.device)
        self.scale = scale.detach().float().clone()

    def codes(self) -> Tensor:
        """The integer codes, int64, flat (qn..qp)."""
        n = math.prod(self.shape)
        if self.bits == 8 and self.signed:
            return self.qweight.to(torch.int64)
        return unpack_codes(self.qweight, self.bits, n) + self.qn

    def dequantize(self) -> Tensor:
        """codes x scale in float32, the layer's weight shape: what the fake-quantized weight was."""
        s = self.scale.reshape(-1, *([1] * (len(self.shape) - 1)))
        return self.codes().reshape(self.shape).to(torch.float32) * s

    def describe(self) -> Dict:
        """Shape, bits, signedness and scale axis, for the export's manifest."""
        return {"shape": list(self.shape), "bits": self.bits, "signed": self.signed, "axis": 0}


class _PackedLayer(nn.Module):
    """What a quantized layer keeps after ``convert``: packed integer weight, float bias, activation quantizer."""

    def __init__(self, q: nn.Module):
        super().__init__()
        wq = q.weight_quantizer
        self.packed = _PackedWeight(q.weight.shape, wq.bits, wq.signed)
        self.packed.set_from(q.weight, wq.scale)
        self.bias = None if q.bias is None else nn.Parameter(q.bias.detach().clone(), requires_grad=False)
        self.act_quantizer = copy.deepcopy(q.act_quantizer)

    def _input_and_weight(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        if self.act_quantizer is not None:
            x = self.act_quantizer(x)
        return x, self.dense_weight(x.dtype, x.device)

    def dense_weight(self, dtype: torch.dtype, device: torch.device) -> Tensor:
        """The dequantized weight, computed once per (dtype, device, packed buffers) and cached: a packed
        model is for inference, so unpacking every call would cost more than the fake quantizer it replaces.
        The cache is not part of the state dict; it is rebuilt when the packed buffers are replaced."""
        key = (dtype, device, self.packed.qweight.data_ptr(), self.packed.scale.data_ptr(), self.packed.scale._version)
        cached = getattr(self, "_dense", None)
        if cached is None or cached[0] != key:
            self._dense = (key, self.packed.dequantize().to(device=device, dtype=dtype))
        return self._dense[1]


class PackedConv2d(_PackedLayer):
    """A QuantConv2d after ``convert``."""

    def __init__(self, q: QuantConv2d):
        super().__init__(q)
        self.conv_args = dict(stride=q.stride, padding=q.padding, dilation=q.dilation, groups=q.groups)

    def forward(self, x: Tensor) -> Tensor:
        x, w = self._input_and_weight(x)
        return F.conv2d(x, w, self.bias, **self.conv_args)


class PackedLinear(_PackedLayer):
    """A QuantLinear after ``convert``."""

    def forward(self, x: Tensor) -> Tensor:
        x, w = self._input_and_weight(x)
        return F.linear(x, w, self.bias)


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def convert(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (in eval mode) with every weight-quantized layer holding packed integer weights."""
    out = copy.deepcopy(model).eval()
    for name, module in quantized_layers(out):
        if module.weight_quantizer is None:
            continue
        _set(out, name, PackedConv2d(module) if isinstance(module, QuantConv2d) else PackedLinear(module))
    return out


def _layers(model: nn.Module) -> Dict[str, Dict]:
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, _PackedLayer):
            d = {"kind": "conv2d" if isinstance(m, PackedConv2d) else "linear", **m.packed.describe()}
            if m.act_quantizer is not None:
                d["act"] = {"bits": m.act_quantizer.bits, "signed": m.act_quantizer.signed}
            out[name] = d
    return out


_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.uint8: "U8", torch.int8: "I8",
           torch.int64: "I64", torch.int32: "I32", torch.bool: "BOOL", torch.float64: "F64"}
_FROM = {v: k for k, v in _DTYPES.items()}


def save(model: nn.Module, path: str) -> int:
    """Write the converted ``model``'s state to ``path`` (safetensors); returns the file size in bytes."""
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    header, chunks, offset = {}, [], 0
    for name, t in state.items():
        if t.dtype not in _DTYPES:
            raise TypeError(f"model: tensor {name} has dtype {t.dtype}, which this format does not store")
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    header["__metadata__"] = {"format": FORMAT, "layers": json.dumps(_layers(model))}
    raw = json.dumps(header).encode()
    raw += b" " * ((-len(raw)) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for c in chunks:
            f.write(c)
    os.replace(tmp, path)
    return os.path.getsize(path)


def _read(path: str) -> Tuple[Dict, Dict[str, Tensor]]:
    with open(path, "rb") as f:
        blob = f.read()
    if len(blob) < 8:
        raise ValueError(f"path: {path} is too short to be a safetensors file")
    (n,) = struct.unpack("<Q", blob[:8])
    if n > len(blob) - 8:
        raise ValueError(f"path: {path}: header length {n} exceeds the file (truncated?)")
    try:
        header = json.loads(blob[8:8 + n])
        meta = header.pop("__metadata__")
        if meta.get("format") != FORMAT:
            raise ValueError(f"format {meta.get('format')!r}")
        layers = json.loads(meta["layers"])
    except (ValueError, KeyError, AttributeError) as e:
        raise ValueError(f"path: {path} has no valid {FORMAT} header ({e})") from e
    data, tensors = blob[8 + n:], {}
    for name, info in header.items():
        begin, end = info["data_offsets"]
        if end > len(data):
            raise ValueError(f"path: {path}: tensor {name} ends at byte {end}, data holds {len(data)} (truncated?)")
        dtype = _FROM[info["dtype"]]
        t = torch.frombuffer(bytearray(data[begin:end]), dtype=torch.uint8) if end > begin else torch.zeros(0, dtype=torch.uint8)
        tensors[name] = t.view(dtype).reshape(info["shape"]) if t.numel() else torch.zeros(info["shape"], dtype=dtype)
    return layers, tensors


def load(path: str, model: nn.Module) -> nn.Module:
    """The packed model saved at ``path``, rebuilt on ``model`` (the full-precision architecture, e.g.
    ``build_model(...)``), in eval mode. Raises ValueError for a bad header, truncated data or any mismatch."""
    layers, tensors = _read(path)
    out = copy.deepcopy(model)
    names = list(layers)
    # rebuild the quantized structure, then pack it (values are overwritten by the file below)
    unsigned = [n for n, d in layers.items() if "act" in d and not d["act"]["signed"]]
    bits = {d["bits"] for d in layers.values()}
    a_bits = {d["act"]["bits"] for d in layers.values() if "act" in d}
    if len(bits) > 1 or len(a_bits) > 1:
        raise ValueError(f"path: mixed bit widths {bits} / {a_bits} are not supported by load")
    modules = dict(out.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise ValueError(f"model: has no layers {missing[:3]} named in {path}")
    quantize_model(out, bits.pop() if bits else 4, a_bits.pop() if a_bits else None, keep_first_last=False,
                   skip=[n for n, m in out.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and n not in layers],
                   unsigned_inputs=unsigned)
    for name, module in quantized_layers(out):
        desc = layers[name]
        if list(module.weight.shape) != desc["shape"]:
            raise ValueError(f"model: layer {name} has weight shape {list(module.weight.shape)}, the file "
                             f"{desc['shape']}")
        if module.act_quantizer is not None:
            module.act_quantizer.initialized.fill_(True)
            module.act_quantizer._init_pending = False
        _set(out, name, PackedConv2d(module) if isinstance(module, QuantConv2d) else PackedLinear(module))
    own = out.state_dict()
    if set(own) != set(tensors):
        extra, lacking = sorted(set(tensors) - set(own)), sorted(set(own) - set(tensors))
        raise ValueError(f"path: tensors do not match the model (file only: {extra[:3]}, model only: {lacking[:3]})")
    for k, v in tensors.items():
        if own[k].shape != v.shape or own[k].dtype != v.dtype:
            raise ValueError(f"path: {k} has dtype and shape {v.dtype} {tuple(v.shape)} in the file, the model expects "
                             f"{own[k].dtype} {tuple(own[k].shape)}")
    out.load_state_dict(tensors)
    for m in out.modules():
        if isinstance(m, LSQQuantizer):
            m._init_pending = False  # the loaded scale is the trained one
    return out.eval()


def to_onnx(model: nn.Module, example_inputs, path: str, **kwargs) -> Dict:
    """ONNX with integer Q/DQ weights and activation Q/DQ pairs; see ``gaqat_kernels.onnx_export.to_onnx``."""
    from .onnx_export import to_onnx as export_onnx

    return export_onnx(model, example_inputs, path, **kwargs)
