"""Cost of conflict tracking inside a SAM training step, on a CUDA GPU.

1. The conflict reduction for ResNet-50's quantizer scales (W4A4, first conv and last linear in full
   precision): gathering the task/smoothness gradients of every scale into flat buffers plus one tracker
   update, per backend, against one SAM + LSQ training step of ResNet-50 (batch 64, 224x224, our kernels).
2. ResNet-18 W4A4, batch 64, 224x224: a plain SAM + LSQ step against GAQAT and FQAT steps (same kernels).

Modes alternate round by round so clock drift hits all of them alike; each figure is the median over rounds
of the mean step time in a round (CUDA events around ``--steps`` steps).

    python benchmarks/bench_conflict.py --out bench_out [--rounds 5 --steps 10]

Writes ``conflict.json`` and ``conflict.md`` into ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics

import torch
from torch import nn

from gaqat_kernels.algorithms import build_algorithm
from gaqat_kernels.nn import quantize_model
from gaqat_kernels.provenance import commit_id


def quantized_resnet(name: str, batch: int):
    torch.manual_seed(0)
    import torchvision  # here: scripts sharing this module's helpers need not have torchvision

    model = getattr(torchvision.models, name)(num_classes=1000).cuda()
    x = torch.randn(batch, 3, 224, 224, device="cuda")
    y = torch.randint(0, 1000, (batch,), device="cuda")
    quantize_model(model, 4, 4, example_inputs=x[:2])
    return model, x, y


def step_fn(alg, model, x, y):
    def closure():
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss
    return lambda: alg.step(closure)


def timed(fn, steps: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / steps


def alternate(fns: dict, rounds: int, steps: int) -> dict:
    for fn in fns.values():  # warm-up: lazy init, autotuning, allocator
        timed(fn, 3)
    samples = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            samples[k].append(timed(fn, steps))
    return {k: statistics.median(v) for k, v in samples.items()}


def reduction_cost(rounds: int, steps: int):
    model, x, y = quantized_resnet("resnet50", 64)
    sam = build_algorithm("sam", model, lr=0.01, momentum=0.9, rho=0.05)
    results = {"layers": None, "scale elements": None}
    fns = {"SAM + LSQ step (ResNet-50)": step_fn(sam, model, x, y)}
    trackers = {}
    for backend in ("triton", "cuda", "reference"):
        alg = build_algorithm("gaqat", model, lr=0.01, momentum=0.9, rho=0.05, backend=backend)
        step_fn(alg, model, x, y)()  # one real step so every scale has both gradients
        trackers[backend] = alg
        results["layers"], results["scale elements"] = len(alg.layer_names), alg.tracker.numel

        def reduce(alg=alg):
            task, smooth = alg.sam.flat_gradients(alg.scales)
            alg.tracker.update(task, smooth)
        fns[f"gather + conflict update ({backend})"] = reduce
    times = alternate(fns, rounds, steps)
    step = times["SAM + LSQ step (ResNet-50)"]
    results["ms"] = times
    results["percent of step"] = {k: 100 * v / step for k, v in times.items() if k.startswith("gather")}
    return results


def step_overhead(rounds: int, steps: int):
    fns = {}
    for name in ("sam", "gaqat", "fqat"):
        model, x, y = quantized_resnet("resnet18", 64)
        alg = build_algorithm(name, model, lr=0.01, momentum=0.9, rho=0.05, threshold=0.3)
        fns[name] = step_fn(alg, model, x, y)
    times = alternate(fns, rounds, steps)
    return {"ms": times, "ratio to SAM + LSQ": {k: v / times["sam"] for k, v in times.items()}}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench_out")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.backends.cudnn.benchmark = True
    commit = commit_id()
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "commit": commit,
              "reduction": reduction_cost(args.rounds, args.steps),
              "resnet18_steps": step_overhead(args.rounds, args.steps)}
    with open(os.path.join(args.out, "conflict.json"), "w") as f:
        json.dump(report, f, indent=2)
    red, ovh = report["reduction"], report["resnet18_steps"]
    lines = [f"Device: {report['device']}, torch {report['torch']}, commit {commit}; fp32, batch 64, 224x224, W4A4.",
             "", f"ResNet-50: {red['layers']} quantized layers, {red['scale elements']} scale elements.", "",
             "| ResNet-50 | ms | % of the SAM + LSQ step |", "|---|---|---|"]
    for k, v in red["ms"].items():
        pct = red["percent of step"].get(k)
        lines.append(f"| {k} | {v:.3f} | {'' if pct is None else f'{pct:.2f}%'} |")
    lines += ["", "| ResNet-18 step | ms | x SAM + LSQ |", "|---|---|---|"]
    for k, v in ovh["ms"].items():
        lines.append(f"| {k} | {v:.2f} | {ovh['ratio to SAM + LSQ'][k]:.3f} |")
    with open(os.path.join(args.out, "conflict.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
