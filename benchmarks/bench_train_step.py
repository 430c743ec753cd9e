"""Training-step time and peak memory of W4A4 QAT against full precision, on a CUDA GPU.

Models: ResNet-18 and ResNet-50 (torchvision, random weights, 1000 classes) and ViT-B/16 (torchvision; its
MLP and other nn.Linear layers become QuantLinear), batch 64 of random 224x224 inputs (a synthetic
stand-in of the real shape: step time does not depend on pixel values). W4A4 LSQ, first conv and last
linear in full precision, SGD with momentum.

Implementations (``impl``): ``fp`` (no quantization), ``eager_lsq`` (LSQ written as eager PyTorch ops, the
usual reference), ``triton`` and ``cuda`` (our kernels; quantized layers recompute their quantized input in backward),
``cuda_stored`` (our kernels, quantized input stored for backward instead). Algorithms: ``erm`` (one pass), ``sam`` (two
passes), ``gaqat`` (SAM + conflict tracker + freezing; quantized only). Precision: fp32, or bf16 autocast.
Run modes: ``eager``; ``graph`` (the whole step captured by ``CUDAGraphStep``); ``compile``
(``torch.compile`` of the model, the algorithm around it eager).

    python benchmarks/bench_train_step.py --suite resnet18 --out bench_out
    python benchmarks/bench_train_step.py --suite resnet50 vit --out bench_out
    python benchmarks/bench_train_step.py --suite compile --algorithms erm --prewarm 6 --out bench_out

(``--prewarm N``: the compile rows are first compiled N at a time in separate processes, which fill Inductor's
on-disk caches; the timed rows, one after another as always, then compile from them.)

Per configuration: median over rounds of the mean step time (CUDA events), the ratio to the ``fp`` step of
the same model/algorithm/precision/mode, peak ``torch.cuda.max_memory_allocated`` during the timed steps
and its ratio. Appends JSON lines to ``--out/train_step.jsonl``; writes ``train_step_<suite>.md`` and, for
resnet18, ``profile_resnet18.md`` (top CUDA kernels of a W4A4 SAM step with our kernels).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import time
import types

import torch
from torch import nn

from bench_conflict import commit_id, timed  # benchmarks/ is on the path when this runs as a script
from gaqat_kernels import ops
from gaqat_kernels.algorithms import CUDAGraphStep, build_algorithm
from gaqat_kernels.kernels.reference import lsq_fake_quant_eager
from gaqat_kernels.nn import LSQQuantizer, quantize_model

# compiled: FP, torch.compile of eager LSQ, our modules lowered as plain ops (the default), with our Triton backward
# (cuda_triton_backward: ops.compile_lowering("triton_backward") while tracing) and as the opaque custom op
# (cuda_custom_op: "custom_op")
COMPILE_IMPLS = ["fp", "eager_lsq", "cuda", "cuda_triton_backward", "cuda_custom_op"]
LOWERING_OF_IMPL = {"cuda_triton_backward": "triton_backward", "cuda_custom_op": "custom_op"}
COMPILE_MODES = ["default", "reduce-overhead", "max-autotune-no-cudagraphs", "cpp-wrapper", "combo-kernels",
                 "reduce-overhead-no-persistent", "reduce-overhead-multi-kernel", "reduce-overhead-no-layout-opt"]
# reduce-overhead (Inductor's CUDA graphs) with a reduction setting changed: the longest quantizer kernels of the
# compiled ResNet-50 rows are Inductor persistent reductions of the scale gradients (RESULTS.md "torch.compile")
REDUCE_OVERHEAD_VARIANTS = {
    "reduce-overhead-no-persistent": {"triton.cudagraphs": True, "triton.persistent_reductions": False},
    "reduce-overhead-multi-kernel": {"triton.cudagraphs": True, "triton.multi_kernel": 1},
    # Inductor's channels_last layout optimization off (NCHW everywhere): a full-tensor sum over channels_last
    # operands walks the logical NCHW order (benchmarks/tools/inductor_cuda_codegen.py), as compiled eager LSQ's does
    "reduce-overhead-no-layout-opt": {"triton.cudagraphs": True, "layout_optimization": False},
}


def compile_model(model, compile_mode: str):
    """``torch.compile(model)`` in one of ``COMPILE_MODES``; "cpp-wrapper": the default mode with Inductor's C++
    wrapper (``options={"cpp_wrapper": True}``), which calls the graph's kernels from C++ instead of the generated
    Python code, whose per-kernel host time is what a compiled quantized step spends beyond its kernels;
    "combo-kernels": the default mode with Inductor's horizontal fusion (``combo_kernels``), which launches independent
    kernels (such as the layers' weight quantizers) as one; "reduce-overhead-no-persistent": CUDA graphs with looped
    instead of persistent reductions; "reduce-overhead-multi-kernel": CUDA graphs with Inductor's multi-kernel, which
    compiles both and keeps the faster at run time; "reduce-overhead-no-layout-opt": CUDA graphs with Inductor's
    layout optimization (channels_last convolutions) off."""
    if compile_mode in REDUCE_OVERHEAD_VARIANTS:
        return torch.compile(model, options=REDUCE_OVERHEAD_VARIANTS[compile_mode])
    if compile_mode == "cpp-wrapper":
        return torch.compile(model, options={"cpp_wrapper": True})
    if compile_mode == "combo-kernels":
        return torch.compile(model, options={"combo_kernels": True})
    return torch.compile(model, mode=None if compile_mode == "default" else compile_mode)

SUITES = {
    # (model, impls, algorithms, precisions, modes)
    "resnet18": [("resnet18", ["fp", "eager_lsq", "triton", "cuda", "cuda_stored"], ["erm", "sam", "gaqat"],
                  ["fp32", "bf16"], ["eager", "graph"]),
                 ("resnet18", COMPILE_IMPLS, ["erm", "sam", "gaqat"], ["fp32", "bf16"], ["compile"])],
    "resnet50": [("resnet50", ["fp", "eager_lsq", "cuda"], ["erm", "sam", "gaqat"], ["fp32", "bf16"],
                  ["eager", "graph"]),
                 ("resnet50", COMPILE_IMPLS, ["erm", "sam", "gaqat"], ["fp32", "bf16"], ["compile"])],
    "compile": [(m, COMPILE_IMPLS, ["erm", "sam", "gaqat"], ["fp32", "bf16"], ["compile"])
                for m in ("resnet18", "resnet50")],
    "vit": [("vit_b_16", ["fp", "eager_lsq", "cuda"], ["erm", "sam"], ["fp32", "bf16"], ["eager", "graph"])],
    "quick": [("resnet18", ["fp", "cuda"], ["erm", "sam"], ["fp32"], ["eager", "graph"])],
    # eager only: memory (recomputed vs stored quantized inputs) and host-bound step time
    "resnet18-eager": [("resnet18", ["fp", "eager_lsq", "cuda", "cuda_stored"], ["erm", "sam", "gaqat"],
                        ["fp32", "bf16"], ["eager"])],
    "resnet50-eager": [("resnet50", ["fp", "cuda", "cuda_stored"], ["erm", "sam", "gaqat"], ["fp32", "bf16"],
                        ["eager"])],
}


def _eager_lsq_forward(self, x):
    if self._init_pending:
        self._initialize_from(x)
        self._init_pending = False
    return lsq_fake_quant_eager(x, self.scale, bits=self.bits, signed=self.signed,
                                axis=self.axis if self.per_channel else None)


def build(model_name: str, impl: str, batch: int):
    torch.manual_seed(0)
    import torchvision  # here: scripts sharing this module's helpers need not have torchvision

    model = getattr(torchvision.models, model_name)(num_classes=1000).cuda()
    x = torch.randn(batch, 3, 224, 224, device="cuda")
    y = torch.randint(0, 1000, (batch,), device="cuda")
    if impl != "fp":
        backend = "cuda" if impl in ("eager_lsq", "cuda_stored") or impl in LOWERING_OF_IMPL else impl
        # eager_lsq stores too: the recomputing path would bypass the quantizers' forward
        quantize_model(model, 4, 4, example_inputs=x[:2], backend=backend,
                       recompute_quantized_input=impl not in ("eager_lsq", "cuda_stored"))
        if impl == "eager_lsq":
            for q in model.modules():
                if isinstance(q, LSQQuantizer):
                    q.forward = types.MethodType(_eager_lsq_forward, q)
    return model, x, y


def make_step(model, x, y, algorithm: str, precision: str, mode: str, impl: str = "", compile_mode: str = "default"):
    net = compile_model(model, compile_mode) if mode == "compile" else model
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if precision == "bf16" else contextlib.nullcontext
    alg = build_algorithm(algorithm, model, base_optimizer=torch.optim.SGD, lr=0.01, momentum=0.9, rho=0.05,
                          threshold=0.5)

    lowering = LOWERING_OF_IMPL.get(impl, "decomposed")

    def lowering_context():
        return ops.compile_lowering(lowering)

    def loss_fn(inputs, labels):
        with autocast(), lowering_context():
            return nn.functional.cross_entropy(net(inputs), labels)

    return as_step(alg, loss_fn, x, y, mode)


def as_step(alg, loss_fn, x, y, mode: str):
    """One step of ``alg`` on ``(x, y)`` as a zero-argument callable: replayed from a CUDA graph ("graph") or eager."""
    if mode == "graph":
        graphed = CUDAGraphStep(alg, loss_fn)
        return lambda: graphed(x, y)

    def closure():
        loss = loss_fn(x, y)
        loss.backward()
        return loss
    return lambda: alg.step(closure)


def warmed_step(config, warmup: int, compile_mode: str):
    """``(model, step, seconds)``: ``config``'s model and step after ``warmup`` steps, and how long those took."""
    model_name, impl, algorithm, precision, mode = config
    torch.cuda.empty_cache()
    # every configuration compiles afresh: Dynamo's cache is per code object (ResNet.forward is shared by all
    # rows), so without a reset the rows after its recompile limit (8) would silently run eager
    torch._dynamo.reset()
    model, x, y = build(model_name, impl, 64)
    step = make_step(model, x, y, algorithm, precision, mode, impl, compile_mode)
    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    return model, step, time.perf_counter() - t0


def measure(config, rounds: int, steps: int, warmup: int, profile_top: int = 0, compile_mode: str = "default") -> dict:
    model_name, impl, algorithm, precision, mode = config
    model, step, warmup_s = warmed_step(config, warmup, compile_mode)
    torch.cuda.reset_peak_memory_stats()
    times = [timed(step, steps) for _ in range(rounds)]
    # a fast row must still train everything: every parameter got a finite, non-zero gradient in the last step
    # (GAQAT zeroes the scale gradients of the layers it freezes)
    grads = [p.grad for n, p in model.named_parameters()
             if p.requires_grad and not (algorithm == "gaqat" and n.endswith("scale"))]
    grads_ok = all(g is not None and bool(torch.isfinite(g).all()) and bool(g.abs().sum() > 0) for g in grads)
    row = {"model": model_name, "impl": impl, "algorithm": algorithm, "precision": precision, "mode": mode,
           "ms": statistics.median(times), "rounds_ms": times, "peak_gib": torch.cuda.max_memory_allocated() / 2 ** 30,
           "warmup_s": warmup_s, "grads_ok": grads_ok}
    if profile_top:  # where the step's time goes, on the step just timed (no second compile)
        row.update(top_kernels(step, 3, profile_top))
    del step, model
    gc.collect()
    return row


def top_kernels(step, steps: int = 5, top: int = 15) -> dict:
    """Where ``steps`` calls of ``step`` spend their time, per step: ``top_kernels`` ([CUDA kernel, ms, calls]),
    ``gpu_ms`` (all kernels), ``kernel_launches`` (how many kernels) and ``top_host_ops`` ([op, self CPU ms,
    calls]): a step whose wall time exceeds its GPU time is host-bound, and these say by what."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    averages = prof.key_averages()
    # a record_function range (e.g. "Optimizer.step#SGD.step") also shows as a CUDA event spanning its kernels:
    # counted, it would add their time twice
    events = [e for e in averages
              if str(e.device_type).endswith("CUDA") and not getattr(e, "is_user_annotation", False)]
    key = "self_device_time_total" if events and hasattr(events[0], "self_device_time_total") else "self_cuda_time_total"
    events.sort(key=lambda e: getattr(e, key), reverse=True)
    total_us = sum(getattr(e, key) for e in events)
    host = sorted((e for e in averages if str(e.device_type).endswith("CPU")), key=lambda e: e.self_cpu_time_total,
                  reverse=True)
    return {"top_kernels": [[e.key, getattr(e, key) / 1e3 / steps, e.count // steps] for e in events[:top]],
            "gpu_ms": total_us / 1e3 / steps,
            "kernel_launches": sum(e.count for e in events) / steps,
            "top_host_ops": [[e.key, e.self_cpu_time_total / 1e3 / steps, e.count // steps] for e in host[:top]]}


def profile_summary(out: str, top: int = 15) -> None:
    """Top CUDA kernels of a ResNet-18 W4A4 SAM step with our CUDA kernels (fp32, eager)."""
    model, x, y = build("resnet18", "cuda", 64)
    step = make_step(model, x, y, "sam", "fp32", "eager")
    for _ in range(5):
        step()
    profiled = top_kernels(step, 5, top)
    kernels, total_ms = profiled["top_kernels"], profiled["gpu_ms"]
    lines = ["| kernel | ms per step | % of GPU time | calls per step |", "|---|---|---|---|"]
    for name, ms, calls in kernels:
        name = name if len(name) < 90 else name[:87] + "..."
        lines.append(f"| `{name}` | {ms:.3f} | {100 * ms / total_ms:.1f}% | {calls} |")
    lines.append(f"| total GPU time | {total_ms:.2f} | 100% | |")
    with open(os.path.join(out, "profile_resnet18.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def table(rows) -> str:
    fp = {(r["model"], r["algorithm"], r["precision"], r["mode"]): r for r in rows if r["impl"] == "fp"}
    lines = ["| model | precision | mode | algorithm | impl | ms/step | x FP | GPU ms | kernels | peak GiB | x FP |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        base = fp.get((r["model"], "sam" if r["algorithm"] == "gaqat" else r["algorithm"], r["precision"], r["mode"]))
        ratio = f"{r['ms'] / base['ms']:.2f}" if base else "-"
        mem = f"{r['peak_gib'] / base['peak_gib']:.2f}" if base else "-"
        lines.append(f"| {r['model']} | {r['precision']} | {r['mode']} | {r['algorithm']} | {r['impl']} | "
                     f"{r['ms']:.2f} | {ratio} | {r.get('gpu_ms', float('nan')):.2f} | "
                     f"{r.get('kernel_launches', float('nan')):.0f} | {r['peak_gib']:.2f} | {mem} |")
    return "\n".join(lines)


AXES = ("models", "impls", "algorithms", "precisions", "modes")


def selected_configs(suite: str, keep: dict) -> list:
    """The ``(model, impl, algorithm, precision, mode)`` rows of ``suite`` that every ``keep`` filter admits."""
    configs = []
    for model_name, impls, algorithms, precisions, modes in SUITES[suite]:
        for mode in modes:
            for precision in precisions:
                for algorithm in algorithms:
                    for impl in impls:
                        if algorithm == "gaqat" and impl == "fp":
                            continue
                        config = (model_name, impl, algorithm, precision, mode)
                        if all(value in keep.get(axis, {value}) for axis, value in zip(AXES, config)):
                            configs.append(config)
    return configs


def compile_only(config, warmup: int, compile_mode: str) -> None:
    """Build ``config`` and run its warm-up steps: fills Inductor's on-disk caches (FX graph, AOTAutograd, Triton)
    for the timed process, which then compiles the row from them."""
    warmed_step(config, max(warmup, 2), compile_mode)


def prewarm(rows, jobs: int, warmup: int, log_dir: str) -> None:
    """Compile the ``(config, compile_mode)`` ``rows`` in ``jobs`` processes at once before any row is timed: a
    row's compilation is CPU work (tens of seconds to minutes) that the timed rows would otherwise do one after
    another. Each process's output goes to ``log_dir/prewarm_<row>.log``; a failed prewarm only leaves that row to
    compile in the timed run."""
    import subprocess
    import sys

    pending = list(rows)
    running = []
    t0 = time.perf_counter()
    while pending or running:
        while pending and len(running) < jobs:
            config, compile_mode = pending.pop(0)
            name = "_".join(config + (compile_mode,))
            argv = [sys.executable, os.path.abspath(__file__), "--compile-only", "--warmup", str(warmup),
                    "--compile-mode", compile_mode]
            for axis, value in zip(AXES, config):
                argv += [f"--{axis}", value]
            log = open(os.path.join(log_dir, f"prewarm_{name}.log"), "w")
            running.append((name, subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT), log))
        time.sleep(1)
        for entry in [e for e in running if e[1].poll() is not None]:
            running.remove(entry)
            entry[2].close()
            print(f"prewarm {entry[0]}: exit {entry[1].returncode} at {time.perf_counter() - t0:.0f} s", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--suite", nargs="+", default=["resnet18"], choices=sorted(SUITES))
    p.add_argument("--out", default="bench_out")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--profile-top", type=int, default=0,
                   help="also record each row's N largest CUDA kernels and its GPU time per step (a profiled pass)")
    p.add_argument("--compile-mode", nargs="+", default=["default"], choices=COMPILE_MODES,
                   help="torch.compile's modes for the compile rows, each a set of rows (reduce-overhead: Inductor's "
                        "CUDA graphs, which remove the per-launch host cost; cpp-wrapper: the default mode with "
                        "Inductor's C++ wrapper; combo-kernels: with Inductor's horizontal fusion); the eager and "
                        "graph rows run once")
    p.add_argument("--prewarm", type=int, default=0, metavar="JOBS",
                   help="first compile every compile row in JOBS processes at once (filling Inductor's on-disk "
                        "caches), then time the rows one by one; their warmup_s then shows the cached compile")
    p.add_argument("--prewarm-only", action="store_true",
                   help="with --prewarm: fill the caches and time nothing (e.g. beside other GPU work, so that a later "
                        "run on the same machine, with TORCHINDUCTOR_CACHE_DIR kept, times the rows from them)")
    p.add_argument("--compile-only", action="store_true",
                   help="internal (--prewarm): build and warm up the one row the filters name, time nothing")
    # a part of the suites' grid (one device call cannot compile every row); each filter keeps the rows it names
    for axis in AXES:
        p.add_argument(f"--{axis}", nargs="+", default=None, help=f"only these {axis} of the suites")
    args = p.parse_args()
    keep = {axis: set(getattr(args, axis)) for axis in AXES if getattr(args, axis) is not None}
    torch.backends.cudnn.benchmark = True
    if args.prewarm_only and not args.prewarm:
        p.error("--prewarm-only needs --prewarm JOBS")
    if args.compile_only:
        if len(keep) != len(AXES) or any(len(v) != 1 for v in keep.values()):
            p.error("--compile-only: name one row, one value for each of --" + " --".join(AXES))
        if len(args.compile_mode) != 1:
            p.error("--compile-only: one --compile-mode")
        compile_only(tuple(next(iter(keep[axis])) for axis in AXES), args.warmup, args.compile_mode[0])
        return
    os.makedirs(args.out, exist_ok=True)
    commit = commit_id()
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "commit": commit, "batch": 64}
    # the eager and graph rows with the first compile mode only: the mode changes nothing for them
    plan = [(suite, compile_mode, [c for c in selected_configs(suite, keep) if c[4] == "compile" or first])
            for suite in args.suite for first, compile_mode in zip([True] + [False] * len(args.compile_mode),
                                                                   args.compile_mode)]
    if args.prewarm:
        prewarm([(c, compile_mode) for _, compile_mode, configs in plan for c in configs if c[4] == "compile"],
                args.prewarm, args.warmup, args.out)
    if args.prewarm_only:
        return
    for suite, compile_mode, configs in plan:
        rows = []
        for config in configs:
            model_name, impl, algorithm, precision, mode = config
            row_meta = {**meta, "compile_mode": compile_mode}
            try:
                row = {**row_meta, **measure(config, args.rounds, args.steps, args.warmup, args.profile_top,
                                             compile_mode)}
            except Exception as e:  # one failing configuration must not lose the others
                row = {**row_meta, "model": model_name, "impl": impl, "algorithm": algorithm,
                       "precision": precision, "mode": mode, "error": repr(e)[:300]}
                print("FAILED", config, row["error"], flush=True)
                continue
            finally:
                gc.collect()
            rows.append(row)
            print(json.dumps(row), flush=True)
            with open(os.path.join(args.out, "train_step.jsonl"), "a") as f:
                f.write(json.dumps(row) + "\n")
        if not rows:
            continue
        md = (f"{meta['device']}, torch {meta['torch']}, commit {commit}, batch 64, 224x224, W4A4, "
              f"compile mode {compile_mode}\n\n" + table(rows))
        name = suite if len(args.compile_mode) == 1 else f"{suite}_{compile_mode}"
        with open(os.path.join(args.out, f"train_step_{name}.md"), "w") as f:
            f.write(md + "\n")
        print(md)
        if suite == "resnet18" and compile_mode == args.compile_mode[0]:
            try:
                profile_summary(args.out)
            except Exception as e:  # the profile is a summary; the table above is the result
                print("profile failed:", repr(e))


if __name__ == "__main__":
    main()
