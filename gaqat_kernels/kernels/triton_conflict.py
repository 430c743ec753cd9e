"""Triton: every segment's gradient-conflict statistics in one launch, one program per segment.

Each program walks its segment in blocks and keeps fp32 sums in registers: the count of elements whose
task and smoothness gradients have opposite signs, their dot product and both squared norms (and, in the
stateful ``conflict_update``, the sign flips against the previous step); no atomics in the sums, so the
result has the same bits on every run.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from .reference import FREEZE_RULES, SPREAD_FLOOR


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


@triton.jit
def _conflict_update_kernel(task_ptr, smooth_ptr, offsets_ptr, signs_ptr, n, ema_ptr, step_ptr, counter_ptr,
                            stats_ptr, frozen_ptr, n_seg, n_seg_f, decay, log2_decay, flip_weight, enter, stay,
                            warmup, top_k, spread_floor, RULE: tl.constexpr, BLOCK: tl.constexpr,
                            RANK_BLOCK: tl.constexpr):
    seg = tl.program_id(0)
    start = tl.load(offsets_ptr + seg)
    end = tl.load(offsets_ptr + seg + 1)
    step = tl.load(step_ptr)
    conflicts = tl.zeros([BLOCK], dtype=tl.float32)
    dot = tl.zeros([BLOCK], dtype=tl.float32)
    tt = tl.zeros([BLOCK], dtype=tl.float32)
    ss = tl.zeros([BLOCK], dtype=tl.float32)
    flips_t = tl.zeros([BLOCK], dtype=tl.float32)
    flips_s = tl.zeros([BLOCK], dtype=tl.float32)
    for b in range(start, end, BLOCK):
        idx = b + tl.arange(0, BLOCK)
        m = idx < end
        t = tl.load(task_ptr + idx, mask=m, other=0.0)
        s = tl.load(smooth_ptr + idx, mask=m, other=0.0)
        sign_t = (t > 0).to(tl.int32) - (t < 0).to(tl.int32)
        sign_s = (s > 0).to(tl.int32) - (s < 0).to(tl.int32)
        prev_t = tl.load(signs_ptr + idx, mask=m, other=0).to(tl.int32)
        prev_s = tl.load(signs_ptr + n + idx, mask=m, other=0).to(tl.int32)
        flips_t += tl.where(sign_t * prev_t < 0, 1.0, 0.0)
        flips_s += tl.where(sign_s * prev_s < 0, 1.0, 0.0)
        tl.store(signs_ptr + idx, sign_t.to(tl.int8), mask=m)
        tl.store(signs_ptr + n + idx, sign_s.to(tl.int8), mask=m)
        p = t * s
        conflicts += tl.where(p < 0, 1.0, 0.0)
        dot += p
        tt += t * t
        ss += s * s
    length = tl.maximum((end - start).to(tl.float32), 1.0)
    c = tl.div_rn(tl.sum(conflicts, axis=0), length)
    ft = tl.div_rn(tl.sum(flips_t, axis=0), length)
    fs = tl.div_rn(tl.sum(flips_s, axis=0), length)
    nt = tl.sqrt_rn(tl.sum(tt, axis=0))
    ns = tl.sqrt_rn(tl.sum(ss, axis=0))
    denom = nt * ns
    d = tl.sum(dot, axis=0)
    cosine = tl.where(denom == 0, 0.0, tl.div_rn(d, tl.where(denom == 0, 1.0, denom)))
    raw = (1.0 - flip_weight) * c + flip_weight * (0.5 * (ft + fs))
    m_new = decay * tl.load(ema_ptr + seg) + (1.0 - decay) * raw
    disorder = tl.div_rn(m_new, 1.0 - tl.exp2((step + 1).to(tl.float32) * log2_decay))
    tl.store(ema_ptr + seg, m_new)
    row = stats_ptr + seg * 7
    tl.store(row + 0, c)
    tl.store(row + 1, cosine)
    tl.store(row + 2, nt)
    tl.store(row + 3, ns)
    tl.store(row + 4, ft)
    tl.store(row + 5, fs)
    tl.store(row + 6, disorder)
    # The last program to finish sees every segment's D (acq_rel atomic; the barrier orders this program's
    # own stores first): it decides the whole mask (the relative rules need the mean and spread over all
    # segments, the hysteresis the previous mask) and advances the step.
    tl.debug_barrier()
    done = tl.atomic_add(counter_ptr, 1, sem="acq_rel")
    if done == n_seg - 1:
        tl.debug_barrier()
        total = tl.zeros([RANK_BLOCK], dtype=tl.float32)
        for i0 in range(0, n_seg, RANK_BLOCK):
            i = i0 + tl.arange(0, RANK_BLOCK)
            total += tl.load(stats_ptr + i * 7 + 6, mask=i < n_seg, other=0.0, cache_modifier=".cg")
        mean = tl.div_rn(tl.sum(total, axis=0), n_seg_f)
        spread = mean
        if RULE == 1:
            squares = tl.zeros([RANK_BLOCK], dtype=tl.float32)
            for i0 in range(0, n_seg, RANK_BLOCK):
                i = i0 + tl.arange(0, RANK_BLOCK)
                mi = i < n_seg
                dev = tl.load(stats_ptr + i * 7 + 6, mask=mi, other=0.0, cache_modifier=".cg") - mean
                squares += tl.where(mi, dev * dev, 0.0)
            spread = tl.sqrt_rn(tl.div_rn(tl.sum(squares, axis=0), n_seg_f))
        for i0 in range(0, n_seg, RANK_BLOCK):
            i = i0 + tl.arange(0, RANK_BLOCK)
            mi = i < n_seg
            di = tl.load(stats_ptr + i * 7 + 6, mask=mi, other=0.0, cache_modifier=".cg")
            if RULE == 0:
                score = di
            elif RULE == 1:
                spread_ok = spread > spread_floor
                score = tl.where(spread_ok, tl.div_rn(di - mean, tl.where(spread_ok, spread, 1.0)), 0.0)
            else:
                mean_ok = mean > spread_floor
                score = tl.where(mean_ok, tl.div_rn(di, tl.where(mean_ok, mean, 1.0)) - 1.0, 0.0)
            before = tl.load(frozen_ptr + i, mask=mi, other=0) != 0
            keep = (step >= warmup) & ((score > enter) | (before & (score > stay)))
            if top_k < n_seg:
                rank = tl.zeros([RANK_BLOCK], dtype=tl.int32)
                for j0 in range(0, n_seg, RANK_BLOCK):
                    j = j0 + tl.arange(0, RANK_BLOCK)
                    mj = j < n_seg
                    dj = tl.load(stats_ptr + j * 7 + 6, mask=mj, other=0.0, cache_modifier=".cg")
                    ahead = (dj[None, :] > di[:, None]) | ((dj[None, :] == di[:, None]) & (j[None, :] < i[:, None]))
                    rank += tl.sum((ahead & mj[None, :]).to(tl.int32), axis=1)
                keep = keep & (rank < top_k)
            tl.store(frozen_ptr + i, keep.to(tl.uint8), mask=mi)
        tl.store(step_ptr, step + 1)
        tl.store(counter_ptr, 0)


def conflict_update(task: Tensor, smooth: Tensor, offsets: Tensor, signs: Tensor, ema: Tensor, step: Tensor,
                    counter: Tensor, stats: Tensor, frozen: Tensor, decay: float, flip_weight: float,
                    threshold: float, warmup: int, top_k: int, rule: str, hysteresis: float) -> None:
    """One tracker step in one launch (see ``reference.conflict_update_reference`` for the math)."""
    n_seg = offsets.numel() - 1
    if n_seg == 0:
        step.add_(1)
        return
    log2_decay = math.log2(decay) if decay > 0 else -math.inf
    _conflict_update_kernel[(n_seg,)](
        task, smooth, offsets, signs, task.numel(), ema, step, counter, stats, frozen.view(torch.uint8), n_seg,
        float(n_seg), decay, log2_decay, flip_weight, threshold, threshold - hysteresis, warmup, min(top_k, n_seg),
        SPREAD_FLOOR, RULE=FREEZE_RULES.index(rule), BLOCK=512, RANK_BLOCK=64, num_warps=4)
