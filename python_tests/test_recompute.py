"""Quantized layers that recompute their quantized input in backward (nn.recompute): the same outputs and
gradients as the composed layer, and one activation-sized tensor fewer kept for backward."""
import copy
import os
import sys

import pytest
import torch
from torch import nn

from gaqat_kernels import available_backends
from gaqat_kernels.nn import QuantConv2d, QuantLinear, initialize_quantizers, quantize_model
from helpers import backend_params

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "tools"))
from saved_memory import saved_tensor_bytes  # noqa: E402


def _pair(layer: nn.Module):
    """The layer and a copy that stores the quantized input (the composed path), scales initialised alike."""
    composed = copy.deepcopy(layer)
    composed.recompute_quantized_input = False
    return layer, composed


def _grads(layer, x, dy, autocast_dtype=None):
    x = x.detach().clone().requires_grad_(True)
    params = [p for p in layer.parameters()]
    with torch.autocast(x.device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        y = layer(x)
    grads = torch.autograd.grad(y, [x] + params, dy.to(y.dtype))
    return y.detach(), grads


def _assert_same(layer, x, dy, autocast_dtype=None, exact=True):
    fused, composed = _pair(layer)
    y1, g1 = _grads(fused, x, dy, autocast_dtype)
    y2, g2 = _grads(composed, x, dy, autocast_dtype)
    names = ["x"] + [n for n, _ in layer.named_parameters()]
    assert y1.dtype == y2.dtype and torch.equal(y1, y2)
    for name, a, b in zip(names, g1, g2):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        if exact:
            assert torch.equal(a, b), f"{name}: max |diff| {(a - b).abs().max()}"
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def _initialised(layer, x):
    with torch.no_grad():
        layer(x)  # LSQ's data-driven initialisation of both quantizers
    return layer


CONVS = [
    pytest.param(dict(in_channels=6, out_channels=10, kernel_size=3, padding=1), (3, 6, 9, 11), id="3x3-pad1"),
    pytest.param(dict(in_channels=6, out_channels=8, kernel_size=3, stride=2, bias=False), (2, 6, 13, 10),
                 id="3x3-stride2-nobias"),
    pytest.param(dict(in_channels=8, out_channels=8, kernel_size=3, padding=2, dilation=2, groups=4),
                 (2, 8, 7, 7), id="grouped-dilated"),
    pytest.param(dict(in_channels=5, out_channels=7, kernel_size=1), (4, 5, 6, 6), id="1x1"),
]


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("a_signed", [True, False], ids=["signed", "unsigned"])
@pytest.mark.parametrize("kwargs,shape", CONVS)
def test_conv_recompute_equals_composed(backend, device, a_signed, kwargs, shape):
    torch.manual_seed(0)
    layer = QuantConv2d(**kwargs, w_bits=4, a_bits=3, a_signed=a_signed, backend=backend).to(device)
    x = torch.randn(shape, device=device)
    x = x.relu() if not a_signed else x
    layer = _initialised(layer, x)
    dy = torch.randn_like(layer(x))
    _assert_same(layer, x, dy)
    _assert_same(layer, x.to(memory_format=torch.channels_last), dy)


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("shape", [(5, 12), (2, 3, 12)], ids=["2d", "3d"])
def test_linear_recompute_equals_composed(backend, device, shape):
    torch.manual_seed(1)
    layer = QuantLinear(12, 9, w_bits=4, a_bits=4, backend=backend).to(device)
    x = torch.randn(shape, device=device)
    layer = _initialised(layer, x)
    dy = torch.randn(shape[:-1] + (9,), device=device)
    _assert_same(layer, x, dy, exact=False)


# The reference backend takes the Python autograd Functions, the cpu backend the C++ autograd nodes.
CPU_BACKENDS = [pytest.param("reference", id="python-node"),
                pytest.param("cpu", id="cpp-node", marks=pytest.mark.skipif(
                    "cpu" not in available_backends(), reason="the C++ extension is not built"))]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_recompute_under_bf16_autocast_equals_composed(kind, backend):
    torch.manual_seed(2)
    if kind == "conv":
        layer, x = QuantConv2d(4, 6, 3, padding=1, backend=backend), torch.randn(2, 4, 8, 8)
    else:
        layer, x = QuantLinear(8, 5, backend=backend), torch.randn(6, 8)
    layer = _initialised(layer, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        dy = torch.randn_like(layer(x).float())
    _assert_same(layer, x, dy, autocast_dtype=torch.bfloat16, exact=kind == "conv")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_the_extension_backends_build_the_autograd_node_in_cpp(backend):
    """Host time: a Python autograd node per layer costs more than a small layer's kernels."""
    conv = _initialised(QuantConv2d(3, 4, 3, backend=backend), torch.randn(2, 3, 6, 6))
    linear = _initialised(QuantLinear(3, 4, backend=backend), torch.randn(2, 3))
    nodes = [conv(torch.randn(2, 3, 6, 6)).grad_fn, linear(torch.randn(2, 3)).grad_fn]
    python_nodes = [isinstance(n, torch.autograd.function.BackwardCFunction) for n in nodes]
    assert python_nodes == [backend != "cpu"] * 2, nodes
    names = [type(n).__name__ if python else n.name() for n, python in zip(nodes, python_nodes)]
    assert "QuantInputConv2d" in names[0] and "QuantInputLinear" in names[1], names


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_non_float_input_gradients_and_frozen_parts(backend):
    """Only the gradients that are asked for: no input gradient, frozen weights, frozen scales."""
    torch.manual_seed(3)
    layer = _initialised(QuantConv2d(3, 4, 3, backend=backend), torch.randn(2, 3, 6, 6))
    layer.weight.requires_grad_(False)
    layer.act_quantizer.scale.requires_grad_(False)
    x = torch.randn(2, 3, 6, 6)
    layer(x).sum().backward()
    assert layer.weight.grad is None and layer.act_quantizer.scale.grad is None
    assert layer.weight_quantizer.scale.grad is not None and layer.bias.grad is not None


def _saved_bytes(model: nn.Module, x: torch.Tensor) -> int:
    return saved_tensor_bytes(model, lambda m: m(x).sum())


class _ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        chans = [3, 16, 16, 32, 32]
        layers = []
        for a, b in zip(chans[:-1], chans[1:]):
            layers += [nn.Conv2d(a, b, 3, padding=1, bias=False), nn.BatchNorm2d(b), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        return self.fc(self.features(x).mean(dim=(2, 3)))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_recompute_keeps_one_activation_fewer_per_layer(backend):
    """With the quantized input recomputed, a W4A4 conv net keeps about what full precision keeps for backward
    (the quantized weights and a few scalars more); storing the quantized input keeps one activation more."""
    torch.manual_seed(4)
    x = torch.randn(4, 3, 32, 32)
    fp = _ConvNet()
    quantized = copy.deepcopy(fp)
    quantize_model(quantized, w_bits=4, a_bits=4, example_inputs=x, backend=backend)
    initialize_quantizers(quantized, x)
    fp_bytes, recomputed = _saved_bytes(fp, x), _saved_bytes(quantized, x)
    for m in quantized.modules():
        if isinstance(m, (QuantConv2d, QuantLinear)):
            m.recompute_quantized_input = False
    stored = _saved_bytes(quantized, x)
    assert recomputed <= 1.10 * fp_bytes, (recomputed, fp_bytes)
    assert stored >= 1.3 * fp_bytes, (stored, fp_bytes)  # the quantized inputs of the 3 inner convs
