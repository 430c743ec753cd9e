"""The Triton kernels lower to GPU code (sm_90) for every specialisation the launchers use, on machines with
no GPU too: the interpreter that runs them in CI never compiles them, and a kernel can interpret fine and
still fail to compile (an unstructured `if` did so under Triton 3.6). Compiled in a subprocess because this
process may run Triton in interpreter mode."""
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

COMPILE_ALL = r'''
import itertools, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from gaqat_kernels.kernels import triton_lsq

FWD = ["x_ptr", "s_ptr", "y_ptr", "O", "C", "I", "tiles_i", "tiles_per_cb", "qn", "qp"]
BWD = ["x_ptr", "dy_ptr", "s_ptr", "dx_ptr", "out_ptr", "O", "C", "I", "tiles_i", "tiles_per_cb", "n_splits",
       "qn", "qp", "g"]

def compile_one(fn, names, dtype, constexprs, scalar="fp32", **options):
    types = {n: ("*fp32" if n in ("s_ptr", "out_ptr", "part_ptr", "ds_ptr") else f"*{dtype}") if n.endswith("_ptr")
             else (scalar if n in ("qn", "qp", "g") else "i32") for n in names}
    types.update({k: "constexpr" for k in constexprs})
    sig = {n: types[n] for n in fn.arg_names}  # in the kernel's parameter order: constexprs are found by position
    src = ASTSource(fn=fn, signature=sig, constexprs={(list(sig).index(k),): v for k, v in constexprs.items()})
    try:
        assert triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8, **options}).asm["ptx"]
    except FileNotFoundError as e:  # no ptxas: Triton's wheel ships one, so this is unusual
        print("SKIP", e)
        sys.exit(0)

for dtype, even, fast_div in itertools.product(["fp32", "bf16", "fp16"], [True, False], [True, False]):
    common = dict(BLOCK_C=2, BLOCK_I=1024, EVEN=even, FAST_DIV=fast_div, ROWS=False)
    compile_one(triton_lsq._lsq_fwd_kernel, FWD, dtype, dict(common, INTERPRETED_BF16=False))
    for final, prefetch in itertools.product((True, False), (True, False)):
        compile_one(triton_lsq._lsq_bwd_kernel, BWD, dtype, dict(common, FINAL=final, TAIL_I=0, TAIL_EVEN=False,
                                                                  PREFETCH=prefetch),
                    maxnreg=triton_lsq._BACKWARD_MAX_REGISTERS)
    for prefetch in (True, False):  # split tiles along a row's channels (an innermost channel axis)
        compile_one(triton_lsq._lsq_bwd_kernel, BWD, dtype, dict(common, BLOCK_C=2048, BLOCK_I=1, FINAL=False, TAIL_I=0,
                                                                  TAIL_EVEN=False, PREFETCH=prefetch),
                    maxnreg=triton_lsq._BACKWARD_MAX_REGISTERS)
    # innermost channels: ROWS tiles of 512 bytes of adjacent channels x rows
    width = 128 if dtype == "fp32" else 256
    rows = dict(common, BLOCK_C=width, ROWS=True)
    size = 4 if dtype == "fp32" else 2
    rows_forward_tile = triton_lsq._ROWS_FORWARD_TILE_BYTES[size] // size
    compile_one(triton_lsq._lsq_fwd_kernel, FWD, dtype, dict(rows, BLOCK_I=rows_forward_tile // width,
                                                              INTERPRETED_BF16=False))
    for final, prefetch in ((True, False), (False, False), (False, True)):  # only split ROWS programs prefetch
        compile_one(triton_lsq._lsq_bwd_kernel, BWD, dtype, dict(rows, BLOCK_I=triton_lsq._ROWS_BACKWARD_TILE // width,
                                                                  FINAL=final, TAIL_I=0, TAIL_EVEN=False,
                                                                  PREFETCH=prefetch),
                    maxnreg=triton_lsq._BACKWARD_MAX_REGISTERS)
    for tail_even in (True, False):  # whole rows in two blocks (_ROW_TILE_SPLIT)
        compile_one(triton_lsq._lsq_bwd_kernel, BWD, dtype, dict(common, BLOCK_C=1, BLOCK_I=4096, FINAL=True,
                                                                  TAIL_I=512, TAIL_EVEN=tail_even, PREFETCH=False),
                    maxnreg=triton_lsq._BACKWARD_MAX_REGISTERS)
# Python floats become fp64 kernel arguments where Inductor launches the kernels (wrap_triton inside a triton_op)
SUM = ["part_ptr", "ds_ptr", "C", "n_splits", "g"]
for dtype in ["fp32", "bf16"]:
    common = dict(BLOCK_C=2, BLOCK_I=1024, EVEN=False, FAST_DIV=True, ROWS=False)
    compile_one(triton_lsq._lsq_fwd_kernel, FWD, dtype, dict(common, INTERPRETED_BF16=False), scalar="fp64")
    for final, prefetch in ((True, False), (False, False), (False, True)):
        compile_one(triton_lsq._lsq_bwd_kernel, BWD, dtype, dict(common, FINAL=final, TAIL_I=0, TAIL_EVEN=False,
                                                                  PREFETCH=prefetch), scalar="fp64")
compile_one(triton_lsq._sum_partials_kernel, SUM, "fp32", dict(BLOCK_C=256, BLOCK_S=16), scalar="fp64")
print("compiled", triton.__version__)
'''


def test_lsq_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    done = subprocess.run([sys.executable, "-c", COMPILE_ALL], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    if done.stdout.startswith("SKIP"):
        pytest.skip(done.stdout.strip())
    assert "compiled" in done.stdout
