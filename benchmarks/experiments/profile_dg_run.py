"""Where a DomainBed-style training step spends the GPU: step time and top kernels of the training script's own
model, data and algorithm, per precision / memory format, on a CUDA GPU (one process, nothing else running).

    python benchmarks/experiments/profile_dg_run.py --data-root .data/mnist --algorithm gaqat --precision fp32 bf16
    python benchmarks/experiments/profile_dg_run.py --dataset PACS --data-root .data/pacs128 --precision fp32 \
        --extra --image-size 128 --pretrained .data/weights/efficientnet-lite0-57934424.pth

For each setting: the CUDA-graph step time (what a sweep run replays 5001 times), the eager step time, and
the eager step's GPU time by kernel (torch.profiler), so that the GPU time per step, the quantity that bounds
how many runs share one GPU, is visible apart from host overhead. Writes the tables to stdout and JSON to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from gaqat_kernels.data import DomainBatches
from gaqat_kernels.models import build_model
from gaqat_kernels.nn import find_unsigned_inputs
from gaqat_kernels.train import ALGORITHMS, _algorithm, _quantize, load_data, parse_args

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # benchmarks/: the harness
from bench_conflict import timed  # noqa: E402
from bench_train_step import as_step  # noqa: E402


def build_step(argv, dataset, channels_last: bool, mode: str):
    """The training script's step for ``argv`` on ``dataset`` (load_data of the same arguments; loaded once for
    every setting), quantized from step 0, as a zero-argument callable."""
    args = parse_args(argv)
    device = torch.device("cuda")
    test = dataset.domain_index(args.test_domain)
    splits_in = [dataset.split(k, args.holdout_fraction, args.trial_seed)[0] for k in range(len(dataset))]
    batches = DomainBatches([s for k, s in enumerate(splits_in) if k != test], args.batch_size, device, args.seed, 0)
    torch.manual_seed(args.seed)
    model = build_model(args.arch, dataset.input_shape, dataset.num_classes, args.pretrained).to(device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    minibatches = batches.next()
    x = torch.cat([b[0] for b in minibatches]).contiguous(memory_format=memory_format)
    y = torch.cat([b[1] for b in minibatches])
    quantized = ALGORITHMS[args.algorithm][1]
    if quantized:
        _quantize(model, args, unsigned=find_unsigned_inputs(model, x) if args.a_bits else [])
    alg = _algorithm(model, args, args.steps, quantized)

    def loss_fn(inputs, labels):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.precision == "bf16", cache_enabled=False):
            logits = model(inputs)
        return nn.functional.cross_entropy(logits.float(), labels)

    return as_step(alg, loss_fn, x, y, mode)


def step_ms(step, steps: int, warmup: int) -> float:
    for _ in range(warmup):
        step()
    return timed(step, steps)


def kernel_table(step, steps: int, top: int):
    """(GPU ms per step, [(kernel name, ms per step, calls per step)]) of ``steps`` profiled eager steps."""
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    rows = [(e.key, e.device_time_total / 1e3 / steps, e.count / steps) for e in prof.key_averages()
            if e.device_time_total > 0]
    rows.sort(key=lambda r: -r[1])
    return sum(r[1] for r in rows), rows[:top]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", required=True)
    p.add_argument("--dataset", default="RotatedMNIST")
    p.add_argument("--algorithm", nargs="+", default=["gaqat"])
    p.add_argument("--precision", nargs="+", default=["fp32", "bf16"])
    p.add_argument("--channels-last", nargs="+", type=int, default=[0], help="0, 1 or both")
    p.add_argument("--cudnn-benchmark", nargs="+", type=int, default=[0], help="0, 1 or both")
    p.add_argument("--backend", default="triton")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--out", default=None)
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more training-script arguments "
                   "(e.g. --image-size 128 --pretrained PATH for PACS)")
    args = p.parse_args()
    common = ["--dataset", args.dataset, "--data-root", args.data_root, "--test-domain", "0", "--backend",
              args.backend, "--cuda-graph", *args.extra]
    dataset = load_data(parse_args(common))
    results = []
    for algorithm in args.algorithm:
        for precision in args.precision:
            for channels_last in args.channels_last:
                for bench in args.cudnn_benchmark:
                    torch.backends.cudnn.benchmark = bool(bench)
                    argv = common + ["--algorithm", algorithm, "--precision", precision]
                    name = f"{algorithm} {precision} channels_last={channels_last} cudnn.benchmark={bench}"
                    graph = step_ms(build_step(argv, dataset, channels_last, "graph"), args.steps, 10)
                    eager_step = build_step(argv, dataset, channels_last, "eager")
                    eager = step_ms(eager_step, args.steps, 5)
                    gpu, rows = kernel_table(eager_step, 10, args.top)
                    print(f"\n## {name}: graph {graph:.2f} ms/step, eager {eager:.2f} ms/step, "
                          f"eager GPU time {gpu:.2f} ms/step", flush=True)
                    for key, ms, calls in rows:
                        print(f"{ms:8.3f} ms {calls:6.1f}x  {key[:110]}")
                    results.append({"setting": name, "graph_ms": graph, "eager_ms": eager, "gpu_ms": gpu,
                                    "kernels": rows})
                    torch.cuda.empty_cache()
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "profile_dg_run.json"), "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "results": results}, f,
                      indent=1)


if __name__ == "__main__":
    main()
