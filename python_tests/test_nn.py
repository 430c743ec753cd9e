"""LSQQuantizer, quantized layers and quantize_model: initialisation, conversion, state dicts, optimizers."""
import copy
import io
import math

import pytest
import torch
from torch import nn

from gaqat_kernels.nn import LSQQuantizer, QuantConv2d, QuantLinear, quantize_model


class TinyResNet(nn.Module):
    """A torchvision-style network: stem conv, ReLU'd residual convs, a downsample, pooling, classifier."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.relu = nn.ReLU()
        self.layer1 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
        self.downsample = nn.Conv2d(8, 16, 1, stride=2)
        self.head = nn.Linear(16, 16)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = self.relu(self.conv1(x))
        x = self.relu(x + self.layer1(x))
        x = self.relu(self.downsample(x)).mean(dim=(2, 3))
        return self.fc(self.relu(self.head(x - 0.5)))


def test_quantizer_initialises_from_first_batch_per_channel():
    q = LSQQuantizer(4, signed=True, channels=3, axis=0)
    w = torch.randn(3, 10)
    q(w)
    expected = 2 * w.abs().mean(dim=1) / math.sqrt(7)
    assert torch.allclose(q.scale.detach(), expected) and bool(q.initialized)
    q(w * 100)  # later batches do not re-initialise
    assert torch.allclose(q.scale.detach(), expected)


def test_quantizer_initialises_per_tensor_and_keeps_loaded_scale():
    q = LSQQuantizer(3, signed=False)
    x = torch.rand(4, 5)
    q(x)
    assert torch.allclose(q.scale.detach(), 2 * x.abs().mean() / math.sqrt(7))
    fresh = LSQQuantizer(3, signed=False)
    fresh.load_state_dict(q.state_dict())
    fresh(torch.rand(4, 5) * 50)
    assert torch.equal(fresh.scale, q.scale)


def test_loading_an_initialised_state_leaves_no_first_forward_choice():
    """A loaded, initialised quantizer has nothing to choose on its first forward (a pending choice would flip a
    host flag after a compiled model's first step: one recompile); an uninitialised state still initialises."""
    q = LSQQuantizer(4, signed=True)
    q(torch.randn(8))
    fresh = LSQQuantizer(4, signed=True)
    fresh.load_state_dict(q.state_dict())
    assert not fresh._init_pending
    blank = LSQQuantizer(4, signed=True)
    blank.load_state_dict(LSQQuantizer(4, signed=True).state_dict())
    assert blank._init_pending
    x = torch.rand(6) + 1
    blank(x)
    assert torch.allclose(blank.scale.detach(), 2 * x.mean() / math.sqrt(7)) and bool(blank.initialized)


def test_quantizer_rejects_bad_arguments():
    with pytest.raises(ValueError, match="bits"):
        LSQQuantizer(10, signed=True)
    with pytest.raises(ValueError, match="channels"):
        LSQQuantizer(4, signed=True, channels=0)


def test_quantize_model_keeps_first_and_last_and_reuses_weights():
    model = TinyResNet()
    conv_w = model.layer1[0].weight
    report = quantize_model(model, w_bits=4, a_bits=4)
    assert type(model.conv1) is nn.Conv2d and type(model.fc) is nn.Linear
    assert isinstance(model.layer1[0], QuantConv2d) and isinstance(model.layer1[2], QuantConv2d)
    assert isinstance(model.downsample, QuantConv2d) and isinstance(model.head, QuantLinear)
    assert model.layer1[0].weight is conv_w
    assert [n for n, _ in report.converted] == ["layer1.0", "layer1.2", "downsample", "head"]
    assert {n for n, _ in report.skipped} == {"conv1", "fc"}
    assert "quantized 4 layers" in str(report)


def test_quantize_model_skip_patterns_and_weight_only():
    model = TinyResNet()
    report = quantize_model(model, w_bits=7, a_bits=None, skip=["layer1.*"])
    assert type(model.layer1[0]) is nn.Conv2d
    assert model.downsample.act_quantizer is None and model.downsample.weight_quantizer.bits == 7
    assert ("layer1.0", "matched skip") in report.skipped


def test_example_inputs_make_post_relu_activations_unsigned():
    model = TinyResNet()
    quantize_model(model, 4, 4, example_inputs=torch.randn(2, 3, 8, 8))
    assert model.layer1[0].act_quantizer.signed is False  # after the stem's ReLU
    assert model.layer1[2].act_quantizer.signed is False  # after the ReLU inside the Sequential
    assert model.head.act_quantizer.signed is True  # mean of ReLU outputs minus 0.5
    assert model.layer1[0].act_quantizer.qp == 15


def test_quantized_model_trains_and_optimizer_updates_weights_and_scales():
    torch.manual_seed(0)
    model = TinyResNet()
    quantize_model(model, 4, 4)
    x, target = torch.randn(8, 3, 8, 8), torch.randint(0, 5, (8,))
    model(x)  # initialise the scales
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scales = [m.scale for m in model.modules() if isinstance(m, LSQQuantizer)]
    assert {id(p) for p in scales} <= {id(p) for g in opt.param_groups for p in g["params"]}
    before = [p.detach().clone() for p in scales] + [model.layer1[0].weight.detach().clone()]
    loss = nn.functional.cross_entropy(model(x), target)
    loss.backward()
    opt.step()
    after = [p.detach() for p in scales] + [model.layer1[0].weight.detach()]
    changed = [not torch.equal(a, b) for a, b in zip(before, after)]
    assert all(changed), changed


def test_state_dict_round_trip_gives_identical_outputs():
    torch.manual_seed(1)
    model = TinyResNet()
    quantize_model(model, 3, 3)
    x = torch.randn(4, 3, 8, 8)
    model(x)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LSQQuantizer):
                m.scale.mul_(1.3)  # trained scales differ from any initialisation
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    fresh = TinyResNet()
    quantize_model(fresh, 3, 3)
    buf.seek(0)
    fresh.load_state_dict(torch.load(buf))
    model.eval(), fresh.eval()
    assert torch.equal(model(x), fresh(x))


def test_quant_layers_match_manual_fake_quant():
    torch.manual_seed(2)
    lin = nn.Linear(6, 4)
    q = QuantLinear.from_float(copy.deepcopy(lin), w_bits=4, a_bits=None)
    x = torch.randn(3, 6)
    y = q(x)
    s = q.weight_quantizer.scale.detach()[:, None]
    w_q = torch.round(torch.clamp(lin.weight / s, -8, 7)) * s
    assert torch.allclose(y, nn.functional.linear(x, w_q, lin.bias), atol=1e-6)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_compiled_quantized_model_matches_eager(backend):
    """torch.compile of a whole quantized model, forward and backward (the cpu backend traces to its C++
    operators, the reference to the Python custom op): same loss and gradients as eager within float rounding
    (Inductor generates the ops between the quantizers)."""
    from gaqat_kernels import available_backends

    if backend not in available_backends():
        pytest.skip(f"{backend} not available")
    torch.manual_seed(2)
    model = TinyResNet()
    quantize_model(model, 4, 4, backend=backend, example_inputs=torch.randn(2, 3, 8, 8))
    x, target = torch.randn(8, 3, 8, 8), torch.randint(0, 5, (8,))
    model(x)  # initialise the scales eagerly
    compiled = copy.deepcopy(model)
    step = torch.compile(lambda inp: nn.functional.cross_entropy(compiled(inp), target), fullgraph=True)
    results = []
    for m, f in ((model, lambda inp: nn.functional.cross_entropy(model(inp), target)), (compiled, step)):
        loss = f(x)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in m.parameters()]))
    (l0, g0), (l1, g1) = results
    assert torch.allclose(l0, l1, rtol=1e-5, atol=1e-6)
    for a, b in zip(g0, g1):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)
