"""ONNX export with integer Q/DQ (``export.to_onnx``): ONNX Runtime (CPU) against the fake-quant model on an MNIST
CNN, ResNet-18 and a trained digits model, the integer types and the file size, and clear errors."""
import os

import numpy as np
import pytest
import torch

from gaqat_kernels import train
from gaqat_kernels.export import convert, to_onnx
from gaqat_kernels.models import build_model
from gaqat_kernels.nn import quantize_model, quantized_layers

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


def quantized(arch, shape, w_bits, a_bits, seed=0):
    torch.manual_seed(seed)
    model = build_model(arch, shape, 5)
    x = torch.randn(16, *shape)
    quantize_model(model, w_bits, a_bits, example_inputs=x)
    model.eval()
    model(x)  # initialise the step sizes
    return model, x


def run_ort(path, x):
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return session.run(None, {"input0": x.numpy()})[0]


def relative_rows(got, expected):
    """Per example: the largest logit difference over the largest |logit|."""
    return np.abs(got - expected).max(1) / np.abs(expected).max(1)


@pytest.mark.parametrize("bits,opset,weight_type", [
    pytest.param(4, 21, "INT4", id="w4a4-int4"),
    pytest.param(4, 17, "INT8", id="w4a4-opset17-int8"),
    pytest.param(3, 21, "INT8", id="w3a3"),
    pytest.param(8, 21, "INT8", id="w8a8"),
])
def test_resnet18_runs_in_onnx_runtime_as_fake_quant(tmp_path, bits, opset, weight_type):
    model, x = quantized("resnet18", (3, 32, 32), bits, bits, seed=bits)
    with torch.no_grad():
        expected = model(x).numpy()
    info = to_onnx(model, x[:1], str(tmp_path / "m.onnx"), opset=opset)
    layers = [n for n, m in quantized_layers(model) if m.weight_quantizer is not None]
    assert set(info["weight_types"].values()) == {weight_type} and sorted(info["weight_types"]) == sorted(layers)
    proto = onnx.load(info["path"])
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("DequantizeLinear") >= 2 * ops.count("QuantizeLinear") > 0  # weights and activations
    assert "BatchNormalization" in ops  # not folded into the integer weights
    float_weights = [i for i in proto.graph.initializer if i.data_type == onnx.TensorProto.FLOAT and len(i.dims) == 4]
    assert len(float_weights) == 1, "a quantized convolution weight stayed float"  # the stem, kept FP (keep_first_last)
    # BatchNorm in both runtimes agrees to float rounding, so no activation lands on another code here
    assert relative_rows(run_ort(info["path"], x), expected).max() < 1e-5  # dynamic batch: 16 rows, traced with 1
    fp_bytes = sum(p.numel() * 4 for p in build_model("resnet18", (3, 32, 32), 5).parameters())
    assert info["bytes"] < fp_bytes * (0.5 if weight_type == "INT4" else 1) / 3.4  # 4 (int8) or 8 (int4) x smaller


def test_mnist_cnn_groupnorm_differs_only_by_rounding_flips(tmp_path):
    """GroupNorm exports as InstanceNormalization, whose float evaluation order differs from torch's by ~1e-6;
    an activation that falls that close to a rounding boundary of the next 4-bit quantizer takes the neighbouring
    code there. Weights-only quantization (no activation boundaries) agrees to float rounding."""
    model, x = quantized("mnist_cnn", (2, 28, 28), 4, None)
    with torch.no_grad():
        expected = model(x).numpy()
    path = to_onnx(model, x[:1], str(tmp_path / "w.onnx"))["path"]
    assert relative_rows(run_ort(path, x), expected).max() < 1e-5
    model, x = quantized("mnist_cnn", (2, 28, 28), 4, 4)
    with torch.no_grad():
        expected = model(x).numpy()
    got = run_ort(to_onnx(model, x[:1], str(tmp_path / "m.onnx"))["path"], x)
    rows = relative_rows(got, expected)
    assert (rows < 1e-5).mean() >= 0.75 and rows.max() < 0.05
    assert (got.argmax(1) == expected.argmax(1)).mean() >= 0.9


def test_trained_digits_model_keeps_its_test_accuracy(tmp_path):
    out = str(tmp_path / "run")
    train.main(["--dataset", "digits", "--algorithm", "lsq", "--steps", "6", "--checkpoint-freq", "3",
                "--batch-size", "16", "--no-progress", "--device", "cpu", "--out", out, "--w-bits", "4", "--a-bits", "4"])
    saved = torch.load(os.path.join(out, "model.pt"), weights_only=False)
    args = train.parse_args(["--dataset", "digits", "--w-bits", "4", "--a-bits", "4"])
    dataset = train.load_data(args)
    model = build_model("mnist_cnn", dataset.input_shape, dataset.num_classes)
    train._quantize(model, args, unsigned=saved["unsigned"])
    model.load_state_dict(saved["model"])
    model.eval()
    test_in, _ = dataset.split(0, 0.2, 0)
    labels = train.labels_of(test_in)
    fake = train.predict(model, test_in, "cpu")
    xs = torch.cat([x for x, _ in train._eval_batches(test_in, "cpu", batch=1024, workers=0)])
    info = to_onnx(model, xs[:1], str(tmp_path / "digits.onnx"))
    logits = torch.from_numpy(run_ort(info["path"], xs))
    real = torch.softmax(logits, dim=1)
    agree = (real.argmax(1) == fake.argmax(1)).float().mean().item()
    assert agree >= 0.99, agree
    acc_fake, acc_real = train.accuracy(fake, labels), train.accuracy(real, labels)
    assert abs(acc_fake - acc_real) <= 0.01, (acc_fake, acc_real)


def test_bad_input_is_a_clear_error(tmp_path):
    fp = build_model("resnet18", (3, 32, 32), 5)
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(ValueError, match="model: no quantized layers"):
        to_onnx(fp, x, str(tmp_path / "a.onnx"))
    model, x = quantized("resnet18", (3, 32, 32), 4, 4)
    with pytest.raises(ValueError, match="opset"):
        to_onnx(model, x[:1], str(tmp_path / "b.onnx"), opset=11)
    with pytest.raises(TypeError, match="example_inputs"):
        to_onnx(model, [1, 2], str(tmp_path / "c.onnx"))
    packed = convert(model)  # the packed model exports too
    assert to_onnx(packed, x[:1], str(tmp_path / "d.onnx"))["bytes"] > 0
