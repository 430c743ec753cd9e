"""The decomposed lowering under Inductor (CPU): forward and backward are one fused kernel each, and the backward
allocates nothing full-size but dx; the per-channel scale gradient is reduced inside that kernel."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "tools"))
import inductor_buffers  # noqa: E402


@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")])
def test_scale_gradient_needs_no_full_size_temporary(dtype):
    torch._dynamo.reset()
    shape = (4, 6, 5, 7)
    forward, backward = inductor_buffers.generated_code("cpu", dtype, shape, 1, 4)
    full = ", ".join(str(n) for n in shape)
    fwd_buffers, fwd_kernels = inductor_buffers.summarize(forward)
    bwd_buffers, bwd_kernels = inductor_buffers.summarize(backward)
    assert len(fwd_kernels) == 1 and len(bwd_kernels) == 1, (fwd_kernels, bwd_kernels)
    # forward: y and ReLU's bool mask; backward: dx and the (6,) float32 scale gradient
    assert sorted((shape, dt) for _, shape, dt in fwd_buffers) == sorted([(full, str(dtype)), (full, "torch.bool")])
    assert sorted((shape, dt) for _, shape, dt in bwd_buffers) == sorted([(full, str(dtype)), ("6, ", "torch.float32")])
