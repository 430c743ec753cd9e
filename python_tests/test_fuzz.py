"""Seeded property-based fuzzing of every op on every available backend against the float64 oracle: random
shapes (0-4 dims, sizes 1-70), permuted and strided layouts, dtypes, bits 2-8, signedness, axes (negative and
None included), scales over many decades down to subnormal, and NaN/Inf sprinkled into x.

The default ("ci") profile (conftest.py) runs a fixed, derandomized budget of 300 examples per backend;
``--hypothesis-profile=long`` runs 10k per backend (RESULTS.md, "Property-based fuzzing", has its count and result).
"""
from __future__ import annotations

import math

import pytest
import torch

import gaqat_kernels as gk
from gaqat_kernels.kernels.reference import broadcast_scale, quant_bounds, segment_conflict_reference
from helpers import backend_params, oracle, sum_err

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import assume, given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MAX_ELEMENTS = 3000  # the Triton interpreter runs every program in Python


@st.composite
def lsq_cases(draw):
    ndim = draw(st.integers(0, 4))
    shape = tuple(draw(st.lists(st.integers(1, 70), min_size=ndim, max_size=ndim)))
    while math.prod(shape) > MAX_ELEMENTS:
        shape = tuple(max(1, d // 2) for d in shape)
    axis = None if ndim == 0 else draw(st.one_of(st.none(), st.integers(-ndim, ndim - 1)))
    return dict(
        shape=shape, axis=axis, dtype=draw(st.sampled_from(sorted(DTYPES))), bits=draw(st.integers(2, 8)),
        signed=draw(st.booleans()), perm=draw(st.permutations(range(ndim))), step=draw(st.sampled_from([1, 1, 2])),
        decades=draw(st.sampled_from([(-1, 0), (-4, 2), (-30, 3), (-38, -37), (-44, -39)])),  # last two: tiny, subnormal
        special=draw(st.sampled_from([0.0, 0.0, 0.02])), seed=draw(st.integers(0, 2**31 - 1)),
    )


def make_inputs(case, device):
    """x as a (possibly permuted and strided) view, positive scales spanning ``decades``, dy."""
    gen = torch.Generator().manual_seed(case["seed"])
    shape, axis, dtype = case["shape"], case["axis"], DTYPES[case["dtype"]]
    qn, qp = quant_bounds(case["bits"], case["signed"])
    ax = None if axis is None else axis % len(shape)
    channels = 1 if ax is None else shape[ax]
    lo, hi = case["decades"]
    scale = torch.pow(10.0, torch.rand(channels, generator=gen, dtype=torch.float64) * (hi - lo) + lo).float()
    scale = torch.where(scale > 0, scale, torch.tensor(1e-45))  # float32's smallest subnormal at the bottom
    # the permuted layout is built first, then viewed back into `shape`: x is the same tensor, strided
    perm = case["perm"]
    stored = [shape[p] for p in perm] if perm else list(shape)
    if stored:
        stored[-1] *= case["step"]
    v = torch.randn(stored, generator=gen, dtype=torch.float64) * (qp - qn) / 2
    if stored:
        v = v[..., ::case["step"]]
    if perm:
        v = v.permute(*[perm.index(d) for d in range(len(shape))])
    x = v * broadcast_scale(scale.double(), v, ax)
    if case["special"]:
        pick = torch.rand(x.shape, generator=gen, dtype=torch.float64)
        x = torch.where(pick < case["special"] / 3, float("nan"), x)
        x = torch.where((pick >= case["special"] / 3) & (pick < case["special"]), float("inf"), x)
        x = torch.where(torch.rand(x.shape, generator=gen) < 0.5, x, -x)
    x = x.to(dtype)
    x = torch.empty_strided(x.shape, x.stride(), dtype=dtype, device=device).copy_(x)  # same strides there
    dy = torch.randn(x.shape, generator=gen).to(dtype=dtype, device=device)
    return x, scale.to(device), dy


def same(a, b):
    return bool(((a == b) | (torch.isnan(a) & torch.isnan(b))).all())


def check_lsq(case, backend, device):
    x, scale, dy = make_inputs(case, device)
    kw = dict(bits=case["bits"], signed=case["signed"], axis=case["axis"])
    xr, sr = x.detach().requires_grad_(), scale.detach().clone().requires_grad_()
    y = gk.lsq_fake_quant(xr, sr, backend=backend, **kw)
    y.backward(dy)
    ey, edx, eds, mass = oracle(x, scale, dy, case["bits"], case["signed"], case["axis"], with_mass=True)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert same(y, ey), f"y differs at {((y != ey) & ~(torch.isnan(y) & torch.isnan(ey))).nonzero()[:5].tolist()}"
    assert same(xr.grad, edx), "dx differs"
    ds = sr.grad
    assert ds.shape == scale.shape and ds.dtype == torch.float32
    nan = torch.isnan(eds)
    assert torch.equal(torch.isnan(ds), nan), "dscale: NaN in other channels than the oracle's"
    finite = ~nan & torch.isfinite(eds)
    if finite.any():
        assert sum_err(ds[finite], eds[finite], mass[finite]) < 2e-6
    assert torch.equal(torch.isinf(ds), torch.isinf(eds))


@pytest.mark.parametrize("backend,device", backend_params())
@given(case=lsq_cases())
def test_lsq_fake_quant_fuzz(backend, device, case):
    # Triton's CPU interpreter casts float32 to bfloat16 wrongly near the bottom of the float32 range (2e-38 ->
    # 1.993e-38, 3e-40 -> 7.4e-39; compiled Triton and torch round correctly), so those scales run compiled only
    interpreted = backend == "triton" and device == "cpu"
    assume(not (interpreted and case["dtype"] == "bf16" and case["decades"][1] <= -37))
    check_lsq(case, backend, device)


@st.composite
def conflict_cases(draw):
    lengths = draw(st.lists(st.integers(0, 70), min_size=1, max_size=12))
    return dict(lengths=lengths, special=draw(st.sampled_from([0.0, 0.05])), seed=draw(st.integers(0, 2**31 - 1)),
                # float32 sums of squares: below ~1e-19 the squares are subnormal and the norms lose digits
                # (a documented float32-accumulation limit; scale gradients are far above it)
                decade=draw(st.integers(-17, 10)))


def conflict_backends():
    out = []
    for b in gk.available_backends():
        cuda = b == "cuda" or (b == "triton" and torch.cuda.is_available())
        out.append(pytest.param(b, "cuda" if cuda else "cpu", id=b, marks=[pytest.mark.gpu] if cuda else []))
    return out


@pytest.mark.parametrize("backend,device", conflict_backends())
@given(case=conflict_cases())
def test_segment_conflict_fuzz(backend, device, case):
    gen = torch.Generator().manual_seed(case["seed"])
    n = sum(case["lengths"])
    task = torch.randn(n, generator=gen) * 10.0 ** case["decade"]
    smooth = torch.randn(n, generator=gen) * 10.0 ** case["decade"]
    if case["special"]:
        task[torch.rand(n, generator=gen) < case["special"]] = float("nan")
        smooth[torch.rand(n, generator=gen) < case["special"]] = 0.0
    offsets = torch.tensor([0] + case["lengths"]).cumsum(0)
    got = gk.segment_conflict(task.to(device), smooth.to(device), offsets.to(device), backend=backend).cpu()
    expected = segment_conflict_reference(task.double(), smooth.double(), offsets).float()
    assert torch.equal(got[:, 0], expected[:, 0])  # counts over lengths: exact
    # the cosine is a float32 dot product with cancellation: its error is absolute (|cos| <= 1), the norms' relative
    torch.testing.assert_close(got[:, 1], expected[:, 1], rtol=0, atol=2e-5, equal_nan=True)
    torch.testing.assert_close(got[:, 2:], expected[:, 2:], rtol=2e-5, atol=1e-30, equal_nan=True)
