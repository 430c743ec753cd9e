"""Bytes autograd keeps for backward in one training forward: full precision vs W4A4 (quantized input stored
vs recomputed, ``nn.recompute``). Device-independent (it counts tensors, it does not time anything), so it
runs on a CPU; the activations kept for backward are what makes eager QAT's peak memory exceed FP's.

    python benchmarks/tools/saved_memory.py [--models resnet18 resnet50] [--batch 8] [--size 224]
"""
from __future__ import annotations

import argparse
import copy
from typing import Callable

import torch
from torch import Tensor, nn

from gaqat_kernels.models import build_model
from gaqat_kernels.nn import QuantConv2d, QuantLinear, initialize_quantizers, quantize_model


def saved_tensor_bytes(model: nn.Module, forward: Callable[[nn.Module], Tensor]) -> int:
    """Bytes of the distinct storages that autograd saves for backward while ``forward(model)`` runs.

    Parameters are left out (they exist anyway); a storage saved by several nodes (a ReLU's output that is
    also the next layer's input) counts once. It counts tensors and times nothing, so CPU figures hold for
    the GPU too.
    """
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t: Tensor) -> Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward(model)
    del out
    return sum(storages.values())


def saved_bytes(model: torch.nn.Module, x: torch.Tensor) -> int:
    return saved_tensor_bytes(model, lambda m: m(x).float().logsumexp(1).mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["resnet18", "resnet50"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=224)
    args = p.parse_args()
    print("| model | batch, size | FP MiB | W4A4 stored MiB (x FP) | W4A4 recomputed MiB (x FP) |")
    print("|---|---|---|---|---|")
    for name in args.models:
        torch.manual_seed(0)
        x = torch.randn(args.batch, 3, args.size, args.size)
        fp = build_model(name, (3, args.size, args.size), 1000)
        quantized = copy.deepcopy(fp)
        quantize_model(quantized, w_bits=4, a_bits=4, example_inputs=x[:2])
        initialize_quantizers(quantized, x[:2])
        base, recomputed = saved_bytes(fp, x), saved_bytes(quantized, x)
        for m in quantized.modules():
            if isinstance(m, (QuantConv2d, QuantLinear)):
                m.recompute_quantized_input = False
        stored = saved_bytes(quantized, x)
        mib = 2 ** 20
        print(f"| {name} | {args.batch}, {args.size} | {base / mib:.0f} | {stored / mib:.0f} ({stored / base:.2f}) "
              f"| {recomputed / mib:.0f} ({recomputed / base:.2f}) |", flush=True)


if __name__ == "__main__":
    main()
