"""Triton: every segment's gradient-conflict statistics in one launch, one program per segment.

Each program walks its segment in blocks and keeps four fp32 sums in registers: the count of elements whose
task and smoothness gradients have opposite signs, their dot product and both squared norms; no atomics,
so the result has the same bits on every run.
"""
from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _segment_conflict_kernel(task_ptr, smooth_ptr, offsets_ptr, out_ptr, BLOCK: tl.constexpr):
    seg = tl.program_id(0)
    start = tl.load(offsets_ptr + seg)
    end = tl.load(offsets_ptr + seg + 1)
    conflicts = tl.zeros([BLOCK], dtype=tl.float32)
    dot = tl.zeros([BLOCK], dtype=tl.float32)
    tt = tl.zeros([BLOCK], dtype=tl.float32)
    ss = tl.zeros([BLOCK], dtype=tl.float32)
    for b in range(start, end, BLOCK):
        idx = b + tl.arange(0, BLOCK)
        m = idx < end
        t = tl.load(task_ptr + idx, mask=m, other=0.0)
        s = tl.load(smooth_ptr + idx, mask=m, other=0.0)
        p = t * s
        conflicts += tl.where(p < 0, 1.0, 0.0)
        dot += p
        tt += t * t
        ss += s * s
    n_conf = tl.sum(conflicts, axis=0)
    d = tl.sum(dot, axis=0)
    nt = tl.sqrt_rn(tl.sum(tt, axis=0))
    ns = tl.sqrt_rn(tl.sum(ss, axis=0))
    length = (end - start).to(tl.float32)
    denom = nt * ns
    cosine = tl.where(denom == 0, 0.0, tl.div_rn(d, tl.where(denom == 0, 1.0, denom)))  # NaN stays NaN
    fraction = tl.where(length > 0, tl.div_rn(n_conf, tl.maximum(length, 1.0)), 0.0)
    tl.store(out_ptr + seg * 4 + 0, fraction)
    tl.store(out_ptr + seg * 4 + 1, cosine)
    tl.store(out_ptr + seg * 4 + 2, nt)
    tl.store(out_ptr + seg * 4 + 3, ns)


def segment_conflict(task: Tensor, smooth: Tensor, offsets: Tensor, out: Tensor) -> None:
    """Write the ``(S, 4)`` statistics of every segment into ``out`` (float32, contiguous); one launch."""
    n_seg = offsets.numel() - 1
    if n_seg == 0:
        return
    _segment_conflict_kernel[(n_seg,)](task, smooth, offsets, out, BLOCK=1024, num_warps=4)
