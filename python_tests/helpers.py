"""Shared test helpers: the float64 oracle, input generation, backend/device pairs, poisoning."""
from __future__ import annotations

from typing import Optional

import pytest
import torch

from gaqat_kernels import available_backends
from gaqat_kernels.kernels.reference import broadcast_scale, default_grad_scale, quant_bounds

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def backend_params():
    """(backend, device) pairs that can run here, as readable pytest params."""
    avail = set(available_backends())
    cuda = torch.cuda.is_available()
    pairs = [("reference", "cpu"), ("cpu", "cpu"), ("triton", "cuda" if cuda else "cpu"), ("cuda", "cuda")]
    if cuda:
        pairs.insert(1, ("reference", "cuda"))
    out = []
    for backend, device in pairs:
        marks = [] if backend in avail else [pytest.mark.skip(reason=f"backend {backend} not available here")]
        if device == "cuda":
            marks.append(pytest.mark.gpu)
        out.append(pytest.param(backend, device, id=f"{backend}-{device}", marks=marks))
    return out


def oracle(x, scale, dy, bits, signed, axis, grad_scale: Optional[float] = None, with_mass: bool = False):
    """Expected (y, dx, ds) of the op contract, evaluated in float64.

    With ``with_mass`` also returns ``g * sum|term|`` per channel: the scale against which the rounding
    error of a sum is measured (a sum with cancellation has a tiny value but not a tiny error bound).

    The contract divides in float32 (IEEE, identical bits on every backend); everything after the
    division (rounding, clamping, products, the scale-gradient sums) is evaluated in float64 here.
    """
    qn, qp = quant_bounds(bits, signed)
    ax = None if axis is None else axis % x.dim()
    s = broadcast_scale(scale, x, ax)
    v = (x.float() / s.float()).double()
    r = torch.round(torch.clamp(v, qn, qp))
    y = (r * s.double()).float().to(x.dtype)
    inside = (v >= qn) & (v <= qp)
    dx = torch.where(inside, dy, torch.zeros((), dtype=dy.dtype, device=dy.device))
    term = dy.double() * (r - torch.where(inside, v, torch.zeros((), dtype=v.dtype, device=v.device)))
    channels = 1 if ax is None else x.shape[ax]
    g = default_grad_scale(x.numel(), channels, qp) if grad_scale is None else grad_scale
    def per_channel(t):
        if ax is None:
            return t.sum().reshape(scale.shape)
        dims = [d for d in range(x.dim()) if d != ax]
        return t.sum(dim=dims) if dims else t

    if with_mass:
        return y, dx, per_channel(term) * g, per_channel(term.abs()) * g
    return y, dx, per_channel(term) * g


def random_case(shape, axis, bits, signed, dtype, device, generator):
    """x spanning the clamp range and beyond (about 10% clamped), positive per-channel scales."""
    qn, qp = quant_bounds(bits, signed)
    ax = None if axis is None else axis % len(shape)
    channels = 1 if ax is None else shape[ax]
    scale = (torch.rand(channels, generator=generator) * 0.9 + 0.1).to(device)
    if not signed:
        base = torch.rand(shape, generator=generator) * 1.1 * qp
        base[torch.rand(shape, generator=generator) < 0.1] *= -1
    else:
        base = torch.randn(shape, generator=generator) * (qp / 2.0)
    x = (base.to(device) * broadcast_scale(scale, base.to(device), ax)).to(dtype)
    dy = torch.randn(shape, generator=generator).to(device=device, dtype=dtype)
    return x, scale, dy


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def sum_err(ds, expected, mass):
    """Largest per-channel error of a computed sum relative to its mass ``sum|terms|``."""
    return ((ds.double() - expected).abs() / mass.clamp_min(1e-300)).max().item()


def poison_allocator(device, nbytes=1 << 22):
    """Fill a freed block with NaN so that outputs a kernel forgets to write show up as NaN."""
    t = torch.full((nbytes // 4,), float("nan"), device=device)
    del t
