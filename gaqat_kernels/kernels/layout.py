"""Memory layout shared by every fused kernel: a tensor seen as ``(O, C, I)`` in storage order.

A dense (non-overlapping, gap-free) tensor of any strides is a permutation of a contiguous block of memory.
Walking that memory in order, the element at position ``p`` belongs to channel ``(p // I) % C`` where
``I = x.stride(axis)`` and ``C = x.shape[axis]``. So kernels read and write storage linearly, per channel
axis anywhere, with no transposed copy. Only non-dense inputs (slices with gaps, broadcast views) are
copied once into contiguous memory.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor


def is_dense(x: Tensor) -> bool:
    """True when ``x`` covers its memory exactly once with no gaps (any permutation of dimensions)."""
    dims = sorted((x.stride(d), x.shape[d]) for d in range(x.dim()) if x.shape[d] != 1)
    expected = 1
    for stride, size in dims:
        if stride != expected:
            return False
        expected *= size
    return True


def as_dense(x: Tensor) -> Tensor:
    """``x`` itself when dense, else a contiguous copy."""
    return x if is_dense(x) else x.contiguous()


def output_like(x: Tensor) -> Tensor:
    """An uninitialised tensor laid out like ``as_dense(x)``: what every backend writes into.

    The fake (meta) implementation of the ops uses the same function, so compiled graphs see real strides.
    """
    if is_dense(x):
        return torch.empty_like(x)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def same_layout(a: Tensor, b: Tensor) -> bool:
    """True when ``a`` and ``b`` have equal shapes and equal strides on every dimension of size > 1."""
    if a.shape != b.shape:
        return False
    return all(a.stride(d) == b.stride(d) for d in range(a.dim()) if a.shape[d] != 1)


def match_layout(t: Tensor, like: Tensor) -> Tensor:
    """``t`` itself when laid out like ``like``, else a copy of ``t`` in ``like``'s layout."""
    if same_layout(t, like):
        return t
    return torch.empty_like(like, dtype=t.dtype).copy_(t)


def channel_view(x: Tensor, axis: Optional[int]) -> Tuple[int, int, int]:
    """``(O, C, I)`` of a dense tensor in storage order: per-tensor is ``(1, 1, numel)``."""
    n = x.numel()
    if axis is None or x.shape[axis] == 1:
        return 1, 1, n
    c = x.shape[axis]
    i = x.stride(axis)
    return n // (c * i), c, i
