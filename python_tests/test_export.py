"""Export to packed integer weights: bit packing, convert == fake-quant evaluation exactly, save/load round trip,
the DG test-domain accuracy after convert -> save -> load, and clear errors for bad files."""
import os

import pytest
import torch

from gaqat_kernels import train
from gaqat_kernels.export import convert, load, pack_codes, save, unpack_codes
from gaqat_kernels.models import build_model
from gaqat_kernels.nn import quantize_model


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
def test_pack_round_trip(bits):
    codes = torch.randint(0, 2 ** bits, (1001,), generator=torch.Generator().manual_seed(bits))
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == (1001 * bits + 7) // 8
    assert torch.equal(unpack_codes(packed, bits, 1001), codes)


def quantized_model(bits, arch="resnet18"):
    torch.manual_seed(bits)
    model = build_model(arch, (3, 32, 32), 5)
    x = torch.randn(4, 3, 32, 32)
    quantize_model(model, bits, bits, example_inputs=x)
    model.eval()
    model(x)  # initialise the step sizes
    return model, x


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_convert_save_load_equal_fake_quant(tmp_path, bits):
    model, x = quantized_model(bits)
    expected = model(x)
    packed = convert(model)
    assert torch.equal(packed(x), expected)  # dequantized q * s is the fake-quant weight, bit for bit
    path = str(tmp_path / "m.safetensors")
    size = save(packed, path)
    torch.save(build_model("resnet18", (3, 32, 32), 5).state_dict(), tmp_path / "fp.pt")
    assert size < os.path.getsize(tmp_path / "fp.pt") * (bits + 1) / 32 + 50_000
    loaded = load(path, build_model("resnet18", (3, 32, 32), 5))
    assert torch.equal(loaded(x), expected)


def test_dg_accuracy_survives_export(tmp_path):
    out = str(tmp_path / "run")
    train.main(["--dataset", "digits", "--algorithm", "lsq", "--steps", "6", "--checkpoint-freq", "3",
                "--batch-size", "16", "--no-progress", "--device", "cpu", "--out", out, "--w-bits", "3", "--a-bits", "4"])
    saved = torch.load(os.path.join(out, "model.pt"), weights_only=False)
    args = train.parse_args(["--dataset", "digits", "--w-bits", "3", "--a-bits", "4"])
    dataset = train.load_data(args)
    model = build_model("mnist_cnn", dataset.input_shape, dataset.num_classes)
    train._quantize(model, args, unsigned=saved["unsigned"])
    model.load_state_dict(saved["model"])
    test_in, _ = dataset.split(0, 0.2, 0)
    labels = train.labels_of(test_in)
    fake = train.predict(model, test_in, "cpu")
    path = str(tmp_path / "digits.safetensors")
    save(convert(model), path)
    deployed = load(path, build_model("mnist_cnn", dataset.input_shape, dataset.num_classes))
    real = train.predict(deployed, test_in, "cpu")
    assert torch.equal(real, fake)
    assert train.accuracy(real, labels) == train.accuracy(fake, labels)


def test_bad_files_fail_clearly(tmp_path):
    model, _ = quantized_model(4)
    path = str(tmp_path / "m.safetensors")
    save(convert(model), path)
    blob = open(path, "rb").read()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(blob[: len(blob) - 1000])
    with pytest.raises(ValueError, match="truncated"):
        load(str(truncated), build_model("resnet18", (3, 32, 32), 5))
    bad_header = tmp_path / "header.safetensors"
    bad_header.write_bytes(blob[:8] + b"X" * (len(blob) - 8))
    with pytest.raises(ValueError, match="header"):
        load(str(bad_header), build_model("resnet18", (3, 32, 32), 5))
    with pytest.raises(ValueError, match="shape"):
        load(path, build_model("resnet18", (3, 32, 32), 9))  # another head size
    with pytest.raises(ValueError, match="no layers|shape"):
        load(path, build_model("resnet50", (3, 32, 32), 5))
