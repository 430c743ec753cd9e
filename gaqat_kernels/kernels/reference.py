"""Pure-PyTorch LSQ fake quantization: the oracle every fused kernel is checked against.

Two forms live here:

* ``reference_forward`` / ``reference_backward``: the op contract written out as closed formulas.
  They are the ``"reference"`` backend and run in float32, or in float64 when ``x`` is float64.
* ``lsq_fake_quant_eager``: LSQ as it is usually written in eager PyTorch (divide, clamp, round with a
  straight-through estimator, multiply), whose autograd produces the gradients. The tests use it to check
  that the closed formulas are the gradients of that composition, and the benchmarks use it as the
  "eager LSQ" baseline.
"""
from __future__ import annotations

import functools
import math
from typing import Optional, Tuple

import torch
from torch import Tensor


def quant_bounds(bits: int, signed: bool) -> Tuple[int, int]:
    """Integer range ``(qn, qp)`` of a ``bits``-bit quantizer: signed ``[-2^(b-1), 2^(b-1)-1]``, else ``[0, 2^b-1]``."""
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2 ** bits - 1


def default_grad_scale(numel: int, channels: int, qp: int) -> float:
    """LSQ's gradient scale ``1/sqrt(n * qp)``, with n the number of elements that share one scale."""
    n = max(numel // max(channels, 1), 1)
    return 1.0 / math.sqrt(n * qp)


def compute_dtype(x: Tensor) -> torch.dtype:
    """float64 inputs are computed in float64 (the oracle); everything else in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def broadcast_scale(scale: Tensor, x: Tensor, axis: Optional[int]) -> Tensor:
    """View ``scale`` so that it broadcasts against ``x`` along ``axis`` (or as a scalar when per-tensor)."""
    if axis is None:
        return scale.reshape(())
    shape = [1] * x.dim()
    shape[axis] = -1
    return scale.reshape(shape)


def as_dtype(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` in ``dtype``, with no ``.to`` call when it already is: under Dynamo in torch 2.11 a no-op ``.to`` on
    an autograd.Function's output detaches the Function from autograd (every input gradient comes back zero)."""
    return t if t.dtype == dtype else t.to(dtype)


def reference_forward(x: Tensor, scale: Tensor, qn: int, qp: int, axis: Optional[int]) -> Tensor:
    """``y = round_half_even(clamp(x / s, qn, qp)) * s`` in x's dtype; math in float32 (float64 for float64 x)."""
    cd = compute_dtype(x)
    s = broadcast_scale(scale, x, axis).to(cd)
    v = x.to(cd) / s
    return as_dtype(torch.round(torch.clamp(v, qn, qp)) * s, x.dtype)


def reference_backward(
    dy: Tensor, x: Tensor, scale: Tensor, qn: int, qp: int, axis: Optional[int], grad_scale: float,
    *, per_tensor_by_dim1: bool = False,
) -> Tuple[Tensor, Tensor]:
    """Gradients of the op: ``dx = dy`` where ``qn <= x/s <= qp`` (inclusive) else 0;
    ``ds = g * sum(dy * (round(v) - v))`` inside plus ``g * sum(dy * qn|qp)`` outside, summed per channel.

    Returns ``dx`` in x's dtype and ``ds`` in scale's dtype with scale's shape. A NaN in ``x`` gives ``dx = 0``
    there and a NaN scale gradient for its own channel only. ``per_tensor_by_dim1`` (the torch.compile lowering):
    a per-tensor sum of a 4-D or larger x is taken over dim 1's slices first, then over dim 1. Same value up to
    the summation order; Inductor then reduces in the tensor's memory layout (channels_last included) instead of
    walking the logical NCHW order, which reads a channels_last tensor with a stride of C elements.
    """
    cd = compute_dtype(x)
    s = broadcast_scale(scale, x, axis).to(cd)
    v = x.to(cd) / s
    inside = (v >= qn) & (v <= qp)
    r = torch.round(torch.clamp(v, qn, qp))
    dx = as_dtype(torch.where(inside, dy, torch.zeros((), dtype=dy.dtype, device=dy.device)), x.dtype)
    term = dy.to(cd) * (r - torch.where(inside, v, torch.zeros((), dtype=cd, device=v.device)))
    if axis is None and per_tensor_by_dim1 and x.dim() >= 4:
        ds = term.sum(dim=[0] + list(range(2, x.dim()))).sum()
    elif axis is None:
        ds = term.sum()
    else:
        dims = [d for d in range(x.dim()) if d != axis]
        ds = term.sum(dim=dims) if dims else term
    ds = ds * grad_scale
    return dx, as_dtype(ds, scale.dtype).reshape(scale.shape)


class _ScaleGradient(torch.autograd.Function):
    """Identity on the value, gradient multiplied by ``g``: the scale's value is used bit for bit."""

    @staticmethod
    def forward(ctx, s: Tensor, g: float) -> Tensor:
        ctx.g = g
        return s.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad * ctx.g, None


class _RoundSTE(torch.autograd.Function):
    """Round half to even, straight-through gradient."""

    @staticmethod
    def forward(ctx, v: Tensor) -> Tensor:
        return torch.round(v)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad


def lsq_fake_quant_eager(
    x: Tensor,
    scale: Tensor,
    *,
    bits: int,
    signed: bool,
    axis: Optional[int] = None,
    grad_scale: Optional[float] = None,
) -> Tensor:
    """LSQ composed from eager PyTorch ops; autograd of this composition defines the op's gradients.

    No input checking: use ``gaqat_kernels.lsq_fake_quant`` for that.
    """
    qn, qp = quant_bounds(bits, signed)
    if axis is not None and axis < 0:
        axis += x.dim()
    channels = 1 if axis is None else x.shape[axis]
    g = default_grad_scale(x.numel(), channels, qp) if grad_scale is None else grad_scale
    cd = compute_dtype(x)
    s = broadcast_scale(_ScaleGradient.apply(scale, g), x, axis).to(cd)
    v = x.to(cd) / s
    return (_RoundSTE.apply(torch.clamp(v, qn, qp)) * s).to(x.dtype)


def segment_conflict_reference(task: Tensor, smooth: Tensor, offsets: Tensor) -> Tensor:
    """Per-segment gradient-conflict statistics, ``(S, 4)``: the oracle of ``segment_conflict``.

    Columns: fraction of elements with ``task * smooth < 0`` (over the segment's length), cosine similarity
    (0 when either norm is 0), ``||task||``, ``||smooth||``. A NaN makes its own segment's cosine and norms
    NaN (it is not counted as a conflict) and leaves the other segments alone. Computed in float64 for
    float64 inputs, else float32 accumulation; empty segments give zeros. Uses no host synchronisation
    (``output_size`` is given).
    """
    cd = torch.float64 if task.dtype == torch.float64 else torch.float32
    n_seg = offsets.numel() - 1
    lengths = offsets[1:] - offsets[:-1]
    seg = torch.repeat_interleave(torch.arange(n_seg, device=task.device), lengths, output_size=task.numel())
    t, s = task.to(cd), smooth.to(cd)

    def per_segment(values: Tensor) -> Tensor:
        return torch.zeros(n_seg, dtype=cd, device=task.device).index_add_(0, seg, values)

    products = t * s
    conflicts = per_segment((products < 0).to(cd))
    dot = per_segment(products)
    nt, ns = per_segment(t * t).sqrt(), per_segment(s * s).sqrt()
    denom = nt * ns
    zero = torch.zeros((), dtype=cd, device=task.device)
    cosine = torch.where(denom == 0, zero, dot / torch.where(denom == 0, 1, denom))
    fraction = conflicts / lengths.clamp_min(1).to(cd)
    return torch.stack([fraction, cosine, nt, ns], dim=1)


def signs_of(g: Tensor) -> Tensor:
    """int8 sign of each element: +1, -1, or 0 for zeros and NaN."""
    return (g > 0).to(torch.int8) - (g < 0).to(torch.int8)


def conflict_update_reference(
    task: Tensor, smooth: Tensor, offsets: Tensor, signs: Tensor, ema: Tensor, step: Tensor, frozen: Tensor, *,
    decay: float, flip_weight: float, threshold: float, warmup: int, top_k: int, rule: str = "absolute",
    hysteresis: float = 0.0,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """One step of the stateful conflict tracker, functionally: the oracle of ``conflict_update``.

    Args:
        task, smooth: float32 (N,) gradients; offsets: int64 (S + 1,) segment bounds.
        signs: int8 (2, N), the previous step's signs of ``task`` and ``smooth`` (zeros before the first step).
        ema: float32 (S,), the running (not bias-corrected) average m of the raw disorder.
        step: int64 (1,), how many updates came before this one.
        frozen: bool (S,), the previous step's freeze mask (for the hysteresis of ``freeze_mask``).

    Returns ``(stats, frozen, new_signs, new_ema)``; ``stats`` is float32 (S, 7) with columns
    conflict fraction c, cosine, ||task||, ||smooth||, flip fractions f_task and f_smooth, disorder D:

        r_t = (1 - flip_weight) * c_t + flip_weight * (f_task + f_smooth) / 2       raw disorder
        m_t = decay * m_{t-1} + (1 - decay) * r_t                                   running average
        D_t = m_t / (1 - decay^(t+1))                                               bias-corrected
        frozen = freeze_mask(D_t, t, frozen, rule, threshold, hysteresis, warmup, top_k)

    A flip is an element whose sign is the opposite of its sign at the previous step (zeros and NaN never flip).
    """
    n_seg = offsets.numel() - 1
    base = segment_conflict_reference(task.float(), smooth.float(), offsets)
    lengths = offsets[1:] - offsets[:-1]
    seg = torch.repeat_interleave(torch.arange(n_seg, device=task.device), lengths, output_size=task.numel())
    new_signs = torch.stack([signs_of(task), signs_of(smooth)])
    flipped = (new_signs.to(torch.int32) * signs.to(torch.int32)) < 0
    counts = torch.zeros(2, n_seg, dtype=torch.float32, device=task.device)
    counts.index_add_(1, seg, flipped.to(torch.float32))
    flips = counts / lengths.clamp_min(1).to(torch.float32)
    f32 = functools.partial(torch.tensor, dtype=torch.float32, device=task.device)
    fw, d = f32(flip_weight), f32(decay)
    raw = (1 - fw) * base[:, 0] + fw * (0.5 * (flips[0] + flips[1]))
    new_ema = d * ema + (1 - d) * raw
    disorder = bias_corrected_disorder(new_ema, step + 1, decay)
    new_frozen = freeze_mask(disorder, step, frozen, rule=rule, threshold=threshold, hysteresis=hysteresis,
                             warmup=warmup, top_k=top_k)
    stats = torch.cat([base, flips.T, disorder[:, None]], dim=1)
    return stats, new_frozen, new_signs, new_ema


def bias_corrected_disorder(ema: Tensor, updates: Tensor, decay: float) -> Tensor:
    """``D = m / (1 - decay^updates)``: the EMA ``m`` (float32 (S,)) after ``updates`` (int64 (1,)) updates."""
    log_decay = math.log2(decay) if decay > 0 else -math.inf  # a Python number: no host-to-device copy
    return ema / (1 - torch.exp2(updates.to(torch.float32) * log_decay))


FREEZE_RULES = ("absolute", "zscore", "ratio")

# Disorder is a fraction in [0, 1]: a spread at or below this is float32 rounding of equal values.
SPREAD_FLOOR = 1e-6


def freeze_score(disorder: Tensor, rule: str) -> Tensor:
    """float32 (S,): the score that ``freeze_mask`` compares with the threshold, by ``rule``.

    ``absolute``: D itself. ``zscore``: (D - mean) / std over the segments (population std; 0 for every
    segment when std <= SPREAD_FLOOR, so a uniform model has no outliers). ``ratio``: D / mean - 1 (0 when
    mean <= SPREAD_FLOOR). Mean and std are plain float32 sums over the segments, as the kernels compute them.
    """
    if rule not in FREEZE_RULES:
        raise ValueError(f"rule: expected one of {FREEZE_RULES}, got {rule!r}")
    d = disorder.to(torch.float32)
    if rule == "absolute" or d.numel() == 0:
        return d
    n = float(d.numel())
    mean = d.sum() / n
    zero = torch.zeros_like(d)
    if rule == "ratio":
        return torch.where(mean > SPREAD_FLOOR, d / torch.where(mean > SPREAD_FLOOR, mean, 1.0) - 1.0, zero)
    std = torch.sqrt(((d - mean) ** 2).sum() / n)
    return torch.where(std > SPREAD_FLOOR, (d - mean) / torch.where(std > SPREAD_FLOOR, std, 1.0), zero)


def freeze_mask(disorder: Tensor, step: Tensor, frozen: Tensor, *, rule: str = "absolute", threshold: float,
                hysteresis: float = 0.0, warmup: int, top_k: int) -> Tensor:
    """bool (S,): which segments are frozen after this step.

        score  = freeze_score(D, rule)
        frozen = (step >= warmup) & (score > threshold | frozen_before & score > threshold - hysteresis)
                 & (rank of D < top_k)

    A segment freezes when its score passes ``threshold`` and thaws only when it falls to ``threshold -
    hysteresis`` (no flapping at the boundary). The rank of a segment counts the segments with a larger D
    (ties: the lower index ranks first).
    """
    score = freeze_score(disorder, rule)
    n_seg = disorder.numel()
    larger = disorder[None, :] > disorder[:, None]
    index = torch.arange(n_seg, device=disorder.device)
    tie_first = (disorder[None, :] == disorder[:, None]) & (index[None, :] < index[:, None])
    rank = (larger | tie_first).sum(dim=1)
    f32 = functools.partial(torch.tensor, dtype=torch.float32, device=disorder.device)
    enter, stay = f32(threshold), f32(threshold - hysteresis)  # as the kernels get them
    passes = (score > enter) | (frozen.to(torch.bool) & (score > stay))
    return (step >= warmup) & passes & (rank < top_k)
