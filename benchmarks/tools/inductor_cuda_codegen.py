"""Inductor's CUDA (Triton) code for one compiled W4A4 ResNet training step, generated on a machine without a GPU,
and the reduction kernels in it whose loads are coalesced along neither axis of their tile.

    python benchmarks/tools/inductor_cuda_codegen.py --impl ours --out bench_out/codegen        # ~1 min, 2 cores
    python benchmarks/tools/inductor_cuda_codegen.py --impl fp eager_lsq ours --no-layout-opt --out bench_out/codegen

Why: the compiled ResNet-50 step's longest quantizer kernels on the H100 are Inductor reductions of the scale
gradients that run far below the memory bandwidth (RESULTS.md "torch.compile"). Reading their source on the GPU box
costs device time; this script makes the same decisions here. How: the step is traced on fake CPU tensors
(AOTAutograd, Inductor's decompositions and min-cut partitioner), then each graph is lowered by Inductor's
``GraphLowering`` for fake CUDA tensors with an H100's device properties, the backward's inputs given the strides the
forward's lowering chose for them (layout optimization included). Nothing is compiled or run. The patches that let
Inductor believe in a GPU are applied in this process only (never import this module from the package); they reach
into Inductor's internals and are tested with torch 2.13 (this repository's CPU torch) only. The GPU box's torch 2.11
may lower differently: treat a finding here as the hypothesis its next device call checks.

The model is ``gaqat_kernels.models``' ResNet-18/50 (torchvision's layout and in-place ReLUs; torchvision is not
installed on the CPU machine), batch 64 at 224x224, W4A4 through ``quantize_model``. ``--impl``: ``fp`` (no quantization),
``eager_lsq`` (LSQ as eager ops) or ``ours`` (the default decomposed lowering). Per impl it writes
``<out>/<model>_<impl>_{forward,backward}.py`` (Inductor's wrapper with every kernel's source) and prints, then
writes to ``<out>/<model>_<impl>_uncoalesced.md``, the reduction kernels with such loads and their share of all
elements the step's reduction kernels load; then each wrapper's Triton launches and bytes (Inductor's own per-kernel
estimate) and the tensors the forward writes and saves for the backward: the traffic budget of a step.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import sys
import types
from typing import Dict, List, Tuple

import torch
import torch.nn as nn

H100 = dict(multi_processor_count=132, major=9, minor=0, warp_size=32, max_threads_per_multi_processor=2048,
            regs_per_multiprocessor=65536)


def kernel_calls(src: str) -> Dict[str, int]:
    """How often the wrapper ``src`` launches each Triton kernel: its ``.run(`` calls outside the kernels' own
    sources (with ``benchmark_kernel`` on, each source holds a benchmarking ``.run(`` of its own)."""
    calls: Dict[str, int] = {}
    for m in re.finditer(r"\b(triton_\w+)\.run\(", re.sub(r"'''.*?'''", "", src, flags=re.S)):
        calls[m.group(1)] = calls.get(m.group(1), 0) + 1
    return calls


def kernel_sources(src: str):
    """``(name, source)`` of each Triton kernel that the wrapper ``src`` defines."""
    return re.findall(r"async_compile\.triton\('(\w+)', '''(.*?)'''", src, re.S)


def uncoalesced_reductions(src: str) -> List[Tuple[str, int, int, int, int, int]]:
    """``(kernel, xnumel, r0_numel, calls, uncoalesced loads, other loads)`` for each reduction kernel of Inductor's
    output ``src`` (2D tiles: x and r0 only). A load is coalesced when a unit step of ``xindex`` or of ``r0_index``
    moves its address by 0 or 1 element at some of three sample points; its index expression is evaluated with the
    kernel's own ``x``/``r0_`` variable definitions."""
    calls = kernel_calls(src)
    rows = []
    for name, body in kernel_sources(src):
        if not name.startswith(("triton_per", "triton_red")) or "ynumel" in body:
            continue
        xn = int(re.search(r"xnumel = (\d+)", body).group(1))
        rn = int(re.search(r"r0_numel = (\d+)", body).group(1))
        defs = [(k, v) for k, v in re.findall(r"^\s+((?:x|r0_)\d+) = (.*)$", body, re.M) if "tl." not in v]

        def at(xi: int, ri: int) -> dict:
            env = {"xindex": xi, "r0_index": ri}
            for k, v in defs:
                try:
                    env[k] = eval(v, {}, env)  # integer index arithmetic of Inductor's own code
                except Exception:  # a definition this evaluator cannot read: loads using it are skipped
                    pass
            return env

        bad = good = 0
        for _, expr in re.findall(r"tl\.load\((\w+) \+ \((.*?)\), ", body):
            coalesced = False
            try:
                for xi, ri in ((0, 0), (xn // 3, rn // 3), (xn // 2 + 1, rn // 2 + 1)):
                    xi, ri = max(min(xi, xn - 2), 0), max(min(ri, rn - 2), 0)
                    base = eval(expr, {}, at(xi, ri))
                    steps = (eval(expr, {}, at(xi + 1, ri)) - base, eval(expr, {}, at(xi, ri + 1)) - base)
                    coalesced = coalesced or any(s in (0, 1) for s in steps)
            except Exception:  # not an index this evaluator reads: counted with the coalesced ones
                coalesced = True
            bad, good = (bad + 1, good) if not coalesced else (bad, good + 1)
        rows.append((name, xn, rn, calls.get(name, 0), bad, good))
    return rows


def report(rows) -> str:
    """Markdown: the uncoalesced kernels, largest first, and their share of the reduction kernels' loaded elements."""
    total = sum(x * r * c * (b + g) for _, x, r, c, b, g in rows)
    bad = sum(x * r * c * b for _, x, r, c, b, g in rows)
    lines = ["| kernel | xnumel | r0_numel | calls | uncoalesced loads |", "|---|---|---|---|---|"]
    for name, x, r, c, b, g in sorted(rows, key=lambda t: -t[1] * t[2] * t[3] * t[4]):
        if b:
            lines.append(f"| `{name}` | {x} | {r} | {c} | {b} of {b + g} |")
    lines.append(f"\nuncoalesced: {bad / 1e6:.0f} M of the {total / 1e6:.0f} M elements the step's reduction kernels "
                 f"load ({bad / max(total, 1):.1%})")
    return "\n".join(lines)


def kernel_traffic(src: str) -> Tuple[int, float]:
    """``(Triton kernel launches, GB)`` of one wrapper ``src``: each kernel's ``kernel_num_gb`` (Inductor's own
    estimate of the bytes of the buffers it reads and writes, present with ``benchmark_kernel`` on) times its calls.
    Extern kernels (cuDNN convolutions, matmuls) are not counted: this is the traffic of Inductor's own kernels."""
    calls = kernel_calls(src)
    launches, gb = 0, 0.0
    for name, body in kernel_sources(src):
        found = re.search(r"'kernel_num_gb': ([0-9.e+-]+)", body)
        n = calls.get(name, 0)
        launches += n
        gb += n * float(found.group(1)) if found else 0.0
    return launches, gb


def saved_by_forward(src: str) -> Tuple[int, float]:
    """``(tensors, GB)`` that the forward wrapper ``src`` allocates itself and returns, i.e. saves for the backward
    (the loss aside): each written once in the forward and read again in the backward. Extern kernels' outputs
    (convolutions) are allocated by cuDNN, not by the wrapper, and are not counted."""
    body = src[src.index("def call("):]
    sizes = {}
    for m in re.finditer(r"(buf\d+) = empty_strided_cuda\(\(([^)]*)\), \([^)]*\), torch\.(\w+)\)", body):
        numel = math.prod(int(d) for d in m.group(2).split(",") if d.strip())
        sizes[m.group(1)] = numel * getattr(torch, m.group(3)).itemsize
    returned = {n.strip() for n in re.findall(r"return \((.*?)\)\n", body, re.S)[-1].split(",")}
    saved = [sizes[n] for n in returned if n in sizes]
    return len(saved), sum(saved) / 1e9


def build(depth: int, impl: str, image: int) -> nn.Module:
    from gaqat_kernels.models import build_model
    from gaqat_kernels.nn import LSQQuantizer, quantize_model

    torch.manual_seed(0)
    model = build_model(f"resnet{depth}", (3, image, image), 1000)  # torchvision's ResNet layout and module names
    if impl == "fp":
        return model
    quantize_model(model, 4, 4, example_inputs=torch.randn(2, 3, image, image), backend="reference")
    if impl == "eager_lsq":
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        from bench_train_step import _eager_lsq_forward
    for q in model.modules():
        if isinstance(q, LSQQuantizer):
            q._init_pending = False
            if impl == "eager_lsq":
                q.forward = types.MethodType(_eager_lsq_forward, q)
    return model


def pretend_h100() -> None:
    """What Inductor asks of the CUDA device while lowering and generating code, answered for an H100."""
    from torch._inductor.runtime.hints import DeviceProperties
    import torch._inductor.scheduler as scheduler
    import torch.utils._triton as triton_utils

    props = types.SimpleNamespace(name="NVIDIA H100 80GB HBM3 (pretended)", total_memory=80 << 30,
                                  L2_cache_size=50 << 20, gcnArchName="", **H100)
    fields = {k: v for k, v in H100.items() if k != "minor"}  # what DeviceProperties holds
    DeviceProperties.create = classmethod(lambda cls, device: DeviceProperties(type="cuda", index=0, cc=90, **fields))
    torch.cuda.get_device_properties = lambda *a, **k: props
    torch.cuda.get_device_capability = lambda *a, **k: (9, 0)
    torch.cuda.is_available = lambda: True
    torch.cuda.device_count = lambda: 1
    torch.cuda.current_device = lambda: 0
    # cuDNN's choice for a convolution's outputs (and its gradients), which a CPU-only build cannot make for fake
    # CUDA tensors (it would pick NCHW): channels_last when the input or the weight is channels_last
    # (cudnn_conv_suggest_memory_format)
    choose = torch._C._conv_determine_backend_memory_format

    def cudnn_memory_format(input_, weight, backend):
        if input_.device.type != "cuda":
            return choose(input_, weight, backend)
        last = any(t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)
                   for t in (input_, weight))
        return torch.channels_last if last else torch.contiguous_format

    torch._C._conv_determine_backend_memory_format = cudnn_memory_format
    triton_utils.has_triton = lambda: True
    triton_utils.triton_hash_with_backend = lambda: "pretended-h100"
    scheduler.has_triton = lambda: True


def generate(depth: int, impl: str, batch: int, image: int, layout_opt: bool, bf16: bool = False) -> Tuple[str, str]:
    """Inductor's forward and backward wrapper code (kernel sources inside) for one step of ``impl``."""
    from torch._functorch.aot_autograd import aot_function
    from torch._functorch.partitioners import min_cut_rematerialization_partition
    from torch._inductor.debug import DebugContext
    from torch._inductor.decomposition import select_decomp_table
    from torch._inductor.graph import GraphLowering
    from torch._inductor.virtualized import V
    from torch._subclasses.fake_tensor import FakeTensorMode
    import torch._inductor.config as inductor_config
    from gaqat_kernels import ops

    model = build(depth, impl, image)
    captured = []
    cpu_fake = FakeTensorMode()
    with cpu_fake:
        params = {k: torch.empty(v.shape, dtype=v.dtype).requires_grad_(True) for k, v in model.named_parameters()}
        buffers = {k: torch.empty(v.shape, dtype=v.dtype) for k, v in model.named_buffers()}
        x = torch.empty(batch, 3, image, image)
        y = torch.zeros(batch, dtype=torch.long)

    def step(p, b, x, y):
        # bf16: autocast as the benchmark's bf16 rows (CPU autocast while tracing: its op lists put convolutions and
        # matmuls in bf16, as CUDA's do)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = torch.func.functional_call(model, {**p, **b}, (x,))
        return nn.functional.cross_entropy(logits.float(), y)

    def capture(is_backward):
        return lambda gm, inputs: captured.append((gm, inputs, is_backward)) or gm

    compiling = torch.compiler.is_compiling, torch.compiler.is_dynamo_compiling
    # the quantized layers take the path they take under torch.compile (the traced, decomposed one)
    torch.compiler.is_compiling = torch.compiler.is_dynamo_compiling = lambda: True
    try:
        f = aot_function(step, fw_compiler=capture(False), bw_compiler=capture(True),
                         partition_fn=min_cut_rematerialization_partition, decompositions=select_decomp_table())
        with cpu_fake, ops.compile_lowering("decomposed"):
            f(params, buffers, x, y).backward()
    finally:
        torch.compiler.is_compiling, torch.compiler.is_dynamo_compiling = compiling

    pretend_h100()
    inductor_config.layout_optimization = layout_opt
    inductor_config.force_layout_optimization = layout_opt  # its heuristics would read cuDNN, absent here
    inductor_config.benchmark_kernel = True  # each kernel's kernel_num_gb, for kernel_traffic
    cuda_fake = FakeTensorMode(allow_non_fake_inputs=True)
    forward_strides: Dict[str, tuple] = {}
    codes = []
    for gm, inputs, is_backward in captured:
        names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]

        def strides(name, t):
            return forward_strides.get(name, t.stride()) if is_backward else t.stride()

        with cuda_fake:
            cuda_inputs = [torch.empty_strided(t.shape, strides(nm, t), dtype=t.dtype, device="cuda")
                           if isinstance(t, torch.Tensor) else t for nm, t in zip(names, inputs)]
            for n in gm.graph.nodes:
                v = n.meta.get("val")
                if isinstance(v, torch.Tensor):
                    st = strides(n.name, v) if n.op == "placeholder" else v.stride()
                    n.meta["val"] = torch.empty_strided(v.shape, st, dtype=v.dtype, device="cuda")
                if n.kwargs.get("device") == torch.device("cpu"):
                    n.kwargs = {**n.kwargs, "device": torch.device("cuda", 0)}
        gm.recompile()
        graph = GraphLowering(gm, example_inputs=cuda_inputs, is_inference=False, is_backward=is_backward)
        with cuda_fake, V.set_graph_handler(graph), V.set_fake_mode(cuda_fake), DebugContext():
            graph.run(*cuda_inputs)
            if not is_backward:  # what the backward receives is laid out as the forward's lowering chose
                for node, out in zip(list(gm.graph.nodes)[-1].args[0], graph.graph_outputs):
                    if isinstance(node, torch.fx.Node) and hasattr(out, "get_stride"):
                        forward_strides[node.name] = tuple(int(s) for s in out.get_stride())
            code = graph.codegen()
        code = code[0] if isinstance(code, tuple) else code
        codes.append(code.value if hasattr(code, "value") else str(code))
    return codes[0], codes[1]


def summary(forward: str, backward: str) -> str:
    """Markdown of one step's wrappers: the backward's uncoalesced reductions, each wrapper's launches and bytes, and
    what the forward saves for the backward."""
    text = report(uncoalesced_reductions(backward))
    traffic = [(part, *kernel_traffic(src)) for part, src in (("forward", forward), ("backward", backward))]
    text += "\n\n" + "\n".join(f"{part}: {n} Triton kernel launches, {gb:.2f} GB (Inductor's kernel_num_gb)"
                                  for part, n, gb in traffic)
    return text + "\nsaved for backward by the forward's own kernels: %d tensors, %.2f GB" % saved_by_forward(forward)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=int, default=50, choices=(18, 50), help="ResNet depth")
    p.add_argument("--impl", nargs="+", default=["ours"], choices=("fp", "eager_lsq", "ours"))
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--image", type=int, default=224)
    p.add_argument("--no-layout-opt", action="store_true",
                   help="Inductor's layout optimization off (torch._inductor.config.layout_optimization = False)")
    p.add_argument("--bf16", action="store_true", help="the step under bf16 autocast (the benchmark's bf16 rows)")
    p.add_argument("--out", default="bench_out/codegen")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if len(args.impl) > 1:  # one process per impl: the pretended GPU cannot be taken back for the next trace
        import subprocess

        common = ["--model", str(args.model), "--batch", str(args.batch), "--image", str(args.image), "--out", args.out]
        common += ["--no-layout-opt"] if args.no_layout_opt else []
        common += ["--bf16"] if args.bf16 else []
        for impl in args.impl:
            subprocess.run([sys.executable, os.path.abspath(__file__), "--impl", impl, *common], check=True)
        return
    impl = args.impl[0]
    forward, backward = generate(args.model, impl, args.batch, args.image, not args.no_layout_opt, args.bf16)
    tag = f"resnet{args.model}_{impl}" + ("_bf16" if args.bf16 else "") + ("_no_layout_opt" if args.no_layout_opt else "")
    for part, src in (("forward", forward), ("backward", backward)):
        with open(os.path.join(args.out, f"{tag}_{part}.py"), "w") as f:
            f.write(src)
    text = summary(forward, backward)
    with open(os.path.join(args.out, f"{tag}_uncoalesced.md"), "w") as f:
        f.write(f"{tag}, backward (Inductor code for a pretended H100, torch {torch.__version__})\n\n{text}\n")
    print(f"## {tag}\n" + "\n".join(text.splitlines()[-5:]))


if __name__ == "__main__":
    main()
