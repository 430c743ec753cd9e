"""Size on disk and inference latency of an exported (packed integer) model against the fake-quant model.

    python benchmarks/bench_export.py [--arch resnet18] [--batch 8] [--size 224] [--device cpu] [--bits 8 4 3 2]

ResNet-18 (this package's torchvision-layout copy, random weights, 1000 classes) quantized W{2,3,4,8}A{same}
with the first conv and the last linear in full precision; sizes: ``export.save`` file vs ``torch.save`` of
the fp32 state dict, and ``export.to_onnx``'s file (integer Q/DQ). Latency: median of eval-mode forward passes,
fake-quant model vs converted model (dequantized weights cached), measured in alternation, with the median of
their paired ratios; and, on the CPU with onnxruntime installed, ONNX Runtime's CPU provider on the ONNX file
(its default threads).
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch

from gaqat_kernels.export import convert, save, to_onnx
from gaqat_kernels.models import build_model
from gaqat_kernels.nn import quantize_model


def once_ms(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - t)


def median_ms(fn, reps: int, device) -> float:
    """Median ms of ``reps`` calls after two warm-up calls."""
    return statistics.median([once_ms(fn, device) for _ in range(reps + 2)][2:])


def interleaved_ms(a, b, reps: int, device):
    """Median ms of ``a`` and of ``b``, measured in alternation (a, b, a, b, ...) after two warm-up pairs, and the
    median of the per-pair ratios b/a: drift of a shared machine's speed falls on both alike, and the paired ratio
    is steadier than the ratio of two medians when one call's noise is larger than the difference measured."""
    pairs = [(once_ms(a, device), once_ms(b, device)) for _ in range(reps + 2)][2:]
    return (statistics.median(t for t, _ in pairs), statistics.median(t for _, t in pairs),
            statistics.median(u / t for t, u in pairs))


@torch.no_grad()
def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--bits", type=int, nargs="+", default=[8, 4, 3, 2], choices=range(2, 9))
    args = p.parse_args()
    device = torch.device(args.device)
    tmp = tempfile.mkdtemp()
    fp = build_model(args.arch, (3, args.size, args.size), 1000)
    torch.save(fp.state_dict(), os.path.join(tmp, "fp32.pt"))
    fp_size = os.path.getsize(os.path.join(tmp, "fp32.pt"))
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    print(f"{args.arch}, batch {args.batch}, {args.size}x{args.size}, device {device}, torch {torch.__version__}")
    try:
        import onnxruntime as ort
    except ImportError:
        ort = None
    print("| bits | file MB | ONNX MB | fp32 MB | x smaller | fake-quant ms | converted ms | converted / fake-quant "
          "(paired median) | ONNX Runtime ms |")
    print("|---|---|---|---|---|---|---|---|---|")
    for bits in args.bits:
        torch.manual_seed(0)
        model = build_model(args.arch, (3, args.size, args.size), 1000)
        quantize_model(model, bits, bits, example_inputs=x[:2].cpu())
        model = model.to(device).eval()
        model(x)
        packed = convert(model)
        size = save(packed, os.path.join(tmp, f"w{bits}.safetensors"))
        fake_ms, packed_ms, ratio = interleaved_ms(lambda: model(x), lambda: packed(x), args.reps, device)
        onnx_path = os.path.join(tmp, f"w{bits}.onnx")
        onnx_size = to_onnx(model, x[:1].cpu(), onnx_path)["bytes"]
        ort_ms = float("nan")
        if ort is not None and device.type == "cpu":
            session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
            feed = {"input0": x.cpu().numpy()}
            ort_ms = median_ms(lambda: session.run(None, feed), args.reps, device)
        print(f"| W{bits}A{bits} | {size / 1e6:.2f} | {onnx_size / 1e6:.2f} | {fp_size / 1e6:.2f} | "
              f"{fp_size / size:.1f} | {fake_ms:.1f} | {packed_ms:.1f} | {ratio:.3f} | {ort_ms:.1f} |")


if __name__ == "__main__":
    main()
