"""Kernel benchmark: LSQ fake quant forward and forward+backward against PyTorch baselines, on a CUDA GPU.

Side by side in one run, per case: eager LSQ (``lsq_fake_quant_eager``), PyTorch's built-in learnable fake
quant (``torch._fake_quantize_learnable_per_{channel,tensor}_affine``), ``torch.compile`` of eager LSQ
(fullgraph, so it cannot silently fall back to eager), NNCF's fused CUDA kernels and torchao's QAT fake quantizer
where installed (``peers.py``: each with its own trainable scale, on our quantization grid), and each available
backend of ours. Times are medians
of CUDA-event timings (``triton.testing.do_bench``), launched eagerly ("eager": includes host overhead when
the host is the bottleneck) and replayed from a CUDA graph ("graph": device time only). The floor is the
copy-bandwidth time of the bytes that must move: 2 passes over the tensor forward, 5 forward+backward.
"bound: same bytes in torch" is not LSQ: PyTorch's copy and multiply kernels moving exactly those bytes, the
practical floor at each size (launch and tail included).

    python benchmarks/bench_kernels.py --out bench_out [--quick] [--impls triton cuda] [--division-variants]

``--division-variants`` adds the cuda backend with each division forced (``extension.cuda_division``):
"ieee" everywhere and the exact "fast" division everywhere, beside the default plan.

Writes ``kernels.json`` and ``kernels.md`` into ``--out``.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import sys
import time

import torch
import triton.testing

import gaqat_kernels as gk
from peers import installed, nncf_peer, torchao_peer
from gaqat_kernels.kernels.extension import cuda_division
from gaqat_kernels.kernels.reference import lsq_fake_quant_eager, quant_bounds
from gaqat_kernels.provenance import commit_id

CASES = [  # name, shape, axis (None = per-tensor)
    ("weight 4096x4096 per-channel", (4096, 4096), 0),
    ("weight 11008x4096 per-channel", (11008, 4096), 0),
    ("conv weight 512x512x3x3 per-channel", (512, 512, 3, 3), 0),
    # the channel axis innermost (a transposed Linear weight, GPT-2's Conv1D): tiles run along a row's channels
    ("weight 4096x11008 per-channel, last axis", (4096, 11008), 1),
    # a channel axis over short rows (196 elements: 14x14 feature maps): the backward's channel-block kernels
    ("act 64x512x14x14 per-channel, short rows", (64, 512, 14, 14), 1),
    ("act 64x256x56x56 per-tensor", (64, 256, 56, 56), None),
    ("act 8x4096x4096 per-tensor", (8, 4096, 4096), None),
]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def copy_bandwidth() -> float:
    """Bytes per second of a large device-to-device copy, counting bytes read plus bytes written."""
    a = torch.empty(1 << 28, dtype=torch.float32, device="cuda")
    b = torch.empty_like(a)
    ms = triton.testing.do_bench(lambda: b.copy_(a), warmup=50, rep=300, return_mode="median")
    return 2 * a.numel() * 4 / (ms * 1e-3)


def builtin_fake_quant(bits, signed, axis):
    qn, qp = quant_bounds(bits, signed)

    def f(x, s):
        zp = torch.zeros_like(s)
        if axis is None:
            return torch._fake_quantize_learnable_per_tensor_affine(x, s, zp, qn, qp, 1.0)
        return torch._fake_quantize_learnable_per_channel_affine(x, s, zp, axis, qn, qp, 1.0)
    return f


class _SameBytes(torch.autograd.Function):
    """Not LSQ: PyTorch's own elementwise kernels moving the bytes of the floor (forward: copy x into y;
    backward: dx = x * dy). What a plain memory-bound kernel reaches at this size, launch and tail included:
    the practical floor beside the copy-bandwidth one. The scale gradient is a preallocated zero (no launch)."""

    @staticmethod
    def forward(ctx, x, s, zero_ds):
        ctx.save_for_backward(x)
        ctx.zero_ds = zero_ds
        return x.clone()

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        return torch.mul(x, dy), ctx.zero_ds, None


SAME_BYTES = "bound: same bytes in torch"


def same_bytes():
    zeros = {}

    def f(x, s):
        if s not in zeros:  # made on the first (warm-up) call, outside any graph capture
            zeros[s] = torch.zeros_like(s)
        return _SameBytes.apply(x, s, zeros[s])
    return f


_REPORTED_MISSING = set()


def implementations(bits, signed, axis, ndim, with_compile, division_variants=False):
    """Name -> fn(x, p), or -> (param, fn) for a peer whose trainable scale p = param(s) is its own."""
    impls = {
        SAME_BYTES: same_bytes(),
        "eager LSQ": lambda x, s: lsq_fake_quant_eager(x, s, bits=bits, signed=signed, axis=axis),
        "torch built-in": builtin_fake_quant(bits, signed, axis),
    }
    if with_compile:
        torch._dynamo.config.cache_size_limit = 256
        torch._dynamo.reset()
        impls["torch.compile(eager LSQ)"] = torch.compile(impls["eager LSQ"], fullgraph=True, dynamic=False)
    for name, package, build in (("NNCF (CUDA ext)", "nncf", lambda: nncf_peer(bits, signed, axis, ndim)),
                                 ("torchao QAT", "torchao", lambda: torchao_peer(bits, signed, axis))):
        if not installed(package):
            if package not in _REPORTED_MISSING:
                _REPORTED_MISSING.add(package)
                print(f"  {name}: not installed (pip install --no-deps {package}-*.whl to compare)", flush=True)
            continue
        try:
            peer = build()
        except Exception as e:  # e.g. its extension does not build here
            print(f"  {name}: unavailable: {type(e).__name__}: {str(e)[:160]}", flush=True)
            continue
        if peer is not None:
            impls[name] = peer
    for backend in ("triton", "cuda"):
        if backend in gk.available_backends():
            impls[f"ours: {backend}"] = (
                lambda x, s, b=backend: gk.lsq_fake_quant(x, s, bits=bits, signed=signed, axis=axis, backend=b))
    if division_variants and "ours: cuda" in impls:
        for mode in ("ieee", "fast"):
            impls[f"ours: cuda {mode}-div"] = impls["ours: cuda"]
    return impls


def division_of(impl: str):
    """The forced CUDA division of a ``--division-variants`` implementation, else a no-op context."""
    for mode in ("ieee", "fast"):
        if impl.endswith(f"{mode}-div"):
            return cuda_division(mode)
    return contextlib.nullcontext()


def make_inputs(shape, axis, dtype, bits, signed, copies):
    qn, qp = quant_bounds(bits, signed)
    channels = 1 if axis is None else shape[axis]
    s = (torch.rand(channels, device="cuda") * 0.5 + 0.5) * (3.0 / qp)
    sets = []
    for _ in range(copies):
        x = (torch.randn(shape, device="cuda") * 1.5).to(dtype).requires_grad_()
        sets.append((x, torch.randn(shape, device="cuda").to(dtype)))
    return s.requires_grad_(), sets


def time_modes(fn, sets, s, eager=True):
    """(eager_fwd, eager_fwdbwd, graph_fwd, graph_fwdbwd) medians in ms, cycling input sets (cold L2);
    the eager pair is NaN when not ``eager``."""
    state = {"i": 0}

    def fwd():
        x, _ = sets[state["i"] % len(sets)]
        state["i"] += 1
        with torch.no_grad():
            return fn(x, s)

    def fwd_bwd():
        x, dy = sets[state["i"] % len(sets)]
        state["i"] += 1
        y = fn(x, s)
        return torch.autograd.grad(y, (x, s), dy)

    out = []
    for f in (fwd, fwd_bwd):
        out.append(triton.testing.do_bench(f, warmup=25, rep=200, return_mode="median") if eager else float("nan"))
    for f in (fwd, fwd_bwd):
        try:
            out.append(_graph_time(f, len(sets)))
        except Exception as e:  # some baselines cannot be captured (host syncs)
            out.append(float("nan"))
            print(f"      graph capture failed: {type(e).__name__}: {str(e)[:120]}", flush=True)
    return out


def _graph_time(f, n_sets):
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            f()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(n_sets):  # one replay = one call per input set
            f()
    ms = triton.testing.do_bench(graph.replay, warmup=10, rep=200, return_mode="median")
    return ms / n_sets


def count_launches(fn, x, dy, s):
    """Kernels launched by one forward+backward (profiler), to check the small-tensor launch budget."""
    from torch.profiler import ProfilerActivity, profile
    y = fn(x, s)
    torch.autograd.grad(y, (x, s), dy)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        y = fn(x, s)
        torch.autograd.grad(y, (x, s), dy)
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="bench_out")
    ap.add_argument("--quick", action="store_true", help="fp32 and bf16, bits 4 only")
    ap.add_argument("--impls", nargs="+", metavar="NAME",
                    help="only implementations whose name contains one of these (e.g. triton cuda)")
    ap.add_argument("--cases", nargs="+", metavar="NAME", help="only cases whose name contains one of these")
    ap.add_argument("--division-variants", action="store_true",
                    help="also time the cuda backend with IEEE division and with the fast division forced")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    bw = copy_bandwidth()
    commit = commit_id()
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "copy_bandwidth_GBps": bw / 1e9, "commit": commit or "unknown", "time": time.strftime("%Y-%m-%d %H:%M")}
    print(json.dumps(meta), flush=True)
    rows = []
    dtypes = ["fp32", "bf16"] if args.quick else ["fp32", "bf16", "fp16"]
    bit_list = [4] if args.quick else [4, 3]
    for name, shape, axis in CASES:
        if args.cases and not any(k in name for k in args.cases):
            continue
        for dname in dtypes:
            for bits in bit_list:
                dtype = DTYPES[dname]
                numel = 1
                for d in shape:
                    numel *= d
                nbytes = numel * dtype.itemsize
                floor_fwd, floor_fb = 2 * nbytes / bw * 1e3, 5 * nbytes / bw * 1e3
                copies = max(1, min(8, (256 << 20) // (2 * nbytes)))  # > L2 per cycle of sets
                s, sets = make_inputs(shape, axis, dtype, bits, True, copies)
                with_compile = bits == 4 and dname != "fp16" and (
                    not args.impls or any(k in "torch.compile" for k in args.impls))
                impls = implementations(bits, True, axis, len(shape), with_compile, args.division_variants)
                for impl, fn in impls.items():
                    if args.impls and impl != SAME_BYTES and not any(k in impl for k in args.impls):
                        continue
                    param, fn = fn if isinstance(fn, tuple) else (None, fn)
                    try:
                        p = s if param is None else param(s)
                        with division_of(impl):
                            t = time_modes(fn, sets, p)
                    except Exception as e:
                        print(f"  {impl}: failed: {type(e).__name__}: {str(e)[:160]}", flush=True)
                        continue
                    finally:  # a failed capture (eager LSQ on the largest cases) must not starve the next
                        gc.collect()
                        torch.cuda.empty_cache()
                    row = dict(case=name, shape=list(shape), axis=axis, dtype=dname, bits=bits, impl=impl,
                               numel=numel, floor_fwd_ms=floor_fwd, floor_fwdbwd_ms=floor_fb,
                               eager_fwd_ms=t[0], eager_fwdbwd_ms=t[1], graph_fwd_ms=t[2], graph_fwdbwd_ms=t[3])
                    if impl.startswith("ours") and "conv" in name:
                        row["launches_fwdbwd"] = count_launches(fn, sets[0][0], sets[0][1], p)
                    rows.append(row)
                    print(f"{name:38s} {dname} W{bits} {impl:26s} fwd {t[0]:.4f}/{t[2]:.4f} ms  "
                          f"fwd+bwd {t[1]:.4f}/{t[3]:.4f} ms  x floor {t[1] / floor_fb:.2f}/{t[3] / floor_fb:.2f}"
                          + (f"  launches {row['launches_fwdbwd']}" if "launches_fwdbwd" in row else ""), flush=True)
                del sets
                torch.cuda.empty_cache()
                with open(os.path.join(args.out, "kernels.json"), "w") as f:  # after every case: nothing lost
                    json.dump({"meta": meta, "rows": rows}, f, indent=1)
    with open(os.path.join(args.out, "kernels.md"), "w") as f:
        f.write(markdown(meta, rows))
    print(markdown(meta, rows))


def markdown(meta, rows):
    lines = [f"Device: {meta['device']}, torch {meta['torch']}, triton {meta['triton']}, measured copy bandwidth "
             f"{meta['copy_bandwidth_GBps']:.0f} GB/s, commit {meta['commit']}, {meta['time']}.", "",
             "| case | dtype | bits | implementation | fwd ms (eager / graph) | fwd+bwd ms (eager / graph) | "
             "fwd+bwd × floor (eager / graph) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        fl = r["floor_fwdbwd_ms"]
        lines.append(f"| {r['case']} | {r['dtype']} | {r['bits']} | {r['impl']} | {r['eager_fwd_ms']:.4f} / "
                     f"{r['graph_fwd_ms']:.4f} | {r['eager_fwdbwd_ms']:.4f} / {r['graph_fwdbwd_ms']:.4f} | "
                     f"{r['eager_fwdbwd_ms'] / fl:.2f} / {r['graph_fwdbwd_ms'] / fl:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if not torch.cuda.is_available():
        sys.exit("bench_kernels.py needs a CUDA GPU")
    main()
