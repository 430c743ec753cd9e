"""benchmarks/tools/inductor_cuda_codegen.py: its coalescing check on constructed kernel sources, and one run."""
import os
import subprocess
import sys

import pytest

TOOLS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "tools")
sys.path.insert(0, TOOLS)
import inductor_cuda_codegen as codegen  # noqa: E402


def kernel(name: str, load_index: str) -> str:
    """A constructed persistent reduction in Inductor's output format (not generated): one load of in_ptr0."""
    return f"""
{name} = async_compile.triton('{name}', '''
@triton.jit
def {name}(in_ptr0, out_ptr0, xnumel, r0_numel, XBLOCK : tl.constexpr):
    xnumel = 1024
    r0_numel = 128
    xindex = xoffset + tl.arange(0, XBLOCK)[:, None]
    r0_index = tl.arange(0, R0_BLOCK)[None, :]
    r0_1 = r0_index
    x0 = (xindex % 49)
    x1 = xindex // 49
    tmp0 = tl.load(in_ptr0 + ({load_index}), xmask, eviction_policy='evict_first', other=0.0)
''', device_str='cuda')
{name}.run(buf0, buf1, 1024, 128, stream=raw_stream0)
{name}.run(buf2, buf3, 1024, 128, stream=raw_stream0)
"""


def test_unit_stride_along_either_axis_is_coalesced_and_a_channel_stride_is_not():
    src = (kernel("triton_per_fused_rows_0", "r0_1 + 128*xindex")           # contiguous along r
           + kernel("triton_per_fused_cols_1", "xindex + 1024*r0_1")          # contiguous along x
           + kernel("triton_per_fused_nhwc_2", "512*x0 + 25088*x1 + 49*r0_1"))  # neither: channels_last vs NCHW
    rows = {r[0]: r[1:] for r in codegen.uncoalesced_reductions(src)}
    assert rows["triton_per_fused_rows_0"] == (1024, 128, 2, 0, 1)
    assert rows["triton_per_fused_cols_1"] == (1024, 128, 2, 0, 1)
    assert rows["triton_per_fused_nhwc_2"] == (1024, 128, 2, 1, 0)
    text = codegen.report(list(codegen.uncoalesced_reductions(src)))
    assert "`triton_per_fused_nhwc_2`" in text and "rows_0" not in text
    assert text.endswith("(33.3%)")


@pytest.mark.parametrize("bf16", [pytest.param(False, id="fp32"), pytest.param(True, id="bf16-autocast")])
def test_generates_a_small_resnet18_step(tmp_path, bf16):
    """The whole path (trace, pretended-H100 lowering, report) on a small ResNet-18 step, in its own process."""
    pytest.importorskip("triton")
    done = subprocess.run([sys.executable, os.path.join(TOOLS, "inductor_cuda_codegen.py"), "--model", "18",
                           "--impl", "fp", "--batch", "2", "--image", "32", "--out", str(tmp_path)]
                          + (["--bf16"] if bf16 else []),
                          capture_output=True, text=True, timeout=600, env={**os.environ, "TRITON_INTERPRET": "0"})
    assert done.returncode == 0, done.stderr[-3000:]
    tag = "resnet18_fp" + ("_bf16" if bf16 else "")
    backward = (tmp_path / f"{tag}_backward.py").read_text()
    assert ("bfloat16" in backward) == bf16  # autocast reached the lowered code, and only with --bf16
    assert "async_compile.triton(" in backward and "native_batch_norm_backward" in backward
    report = (tmp_path / f"{tag}_uncoalesced.md").read_text()
    assert "uncoalesced:" in report
    launches, gb = codegen.kernel_traffic(backward)
    assert launches > 10 and gb > 0 and f"backward: {launches} Triton kernel launches" in report
    saved, saved_gb = codegen.saved_by_forward((tmp_path / f"{tag}_forward.py").read_text())
    assert saved > 10 and saved_gb > 0 and "saved for backward" in report


def uncoalesced_kernels(tmp_path, impl):
    out = tmp_path / impl
    done = subprocess.run([sys.executable, os.path.join(TOOLS, "inductor_cuda_codegen.py"), "--model", "18",
                           "--impl", impl, "--batch", "4", "--image", "64", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "TRITON_INTERPRET": "0"})
    assert done.returncode == 0, done.stderr[-3000:]
    rows = codegen.uncoalesced_reductions((out / f"resnet18_{impl}_backward.py").read_text())
    return [r[0] for r in rows if r[4]]


def test_compiled_scale_gradient_sums_read_in_memory_order(tmp_path):
    """Under Inductor's channels_last layout optimization (CUDA code generated for a pretended H100, torch as
    installed), our lowering's per-tensor scale-gradient sums read every operand coalesced; eager LSQ's plain
    ``sum()`` walks the logical NCHW order and reads its channels_last operands with a stride of C."""
    pytest.importorskip("triton")
    assert uncoalesced_kernels(tmp_path, "ours") == []
    assert any("round" in name and "sum" in name for name in uncoalesced_kernels(tmp_path, "eager_lsq"))


def test_traffic_counts_the_wrapper_launches_not_the_kernels_own_benchmark_calls():
    """Each kernel's ``kernel_num_gb`` times the wrapper's launches of it; with ``benchmark_kernel`` on, a kernel's
    source holds a ``.run(`` of its own, which is not a launch of the step."""
    def timed(name, gb):
        body = (f"inductor_meta={{'kernel_name': '{name}', 'kernel_num_gb': {gb}}}"
                f"\ndef call(args):\n    {name}.run(*args, stream=stream0)")
        return f"{name} = async_compile.triton('{name}', '''\n{body}\n''', device_str='cuda')\n"

    src = (timed("triton_poi_fused_0", 0.5) + timed("triton_red_fused_1", 0.25)
           + "triton_poi_fused_0.run(buf0, stream=raw_stream0)\n" * 3
           + "triton_red_fused_1.run(buf1, stream=raw_stream0)\n")
    assert codegen.kernel_calls(src) == {"triton_poi_fused_0": 3, "triton_red_fused_1": 1}
    assert codegen.kernel_traffic(src) == (4, 1.75)


def test_saved_by_forward_counts_the_wrappers_own_returned_buffers():
    """Returned buffers the wrapper allocated count with their dtype's size; a returned buffer that an extern kernel
    allocated (a convolution's output) and a buffer kept inside the forward do not."""
    src = """
def call(args):
    buf0 = empty_strided_cuda((64, 8, 4, 4), (128, 1, 32, 8), torch.float32)
    buf1 = empty_strided_cuda((64, 8, 4, 4), (128, 1, 32, 8), torch.bool)
    buf2 = empty_strided_cuda((1000, ), (1, ), torch.bfloat16)
    buf3 = extern_kernels.convolution(buf0, arg1_1, stride=(1, 1))
    return (buf0, buf1, buf3, )
"""
    assert codegen.saved_by_forward(src) == (2, (8192 * 4 + 8192) / 1e9)
