"""lsq_fake_quant on every available backend against the float64 oracle, plus contract edge cases."""
import math

import pytest
import torch

import gaqat_kernels as gk
from gaqat_kernels import backends, ops
from gaqat_kernels.kernels import extension
from gaqat_kernels.kernels.reference import lsq_fake_quant_eager, quant_bounds

from helpers import DTYPES, backend_params, oracle, poison_allocator, random_case, rel_err, sum_err

CASES = [
    pytest.param((33,), None, id="n33-tensor"),
    pytest.param((33,), 0, id="n33-ch0"),
    pytest.param((7, 33), 0, id="7x33-ch0"),
    pytest.param((7, 33), -1, id="7x33-ch-1"),
    pytest.param((5, 3, 4, 7), 0, id="conv-ch0"),
    pytest.param((5, 3, 4, 7), 1, id="act-ch1"),
    pytest.param((5, 3, 4, 7), 2, id="4d-ch2"),
    pytest.param((5, 3, 4, 7), -1, id="4d-ch-1"),
    pytest.param((5, 3, 4, 7), None, id="4d-tensor"),
    pytest.param((1, 9), 0, id="one-channel"),
    pytest.param((6, 1, 5), 1, id="one-channel-mid"),
    pytest.param((3, 2001), 0, id="few-long-channels"),
    pytest.param((3001,), None, id="n3001-tensor"),
    pytest.param((300, 1100), 0, id="many-long-channels"),
    pytest.param((4, 300, 3), 1, id="many-short-channels"),
    pytest.param((200, 8), 1, id="channels-last-like"),
]
LAYOUTS = ["contiguous", "transposed", "strided"]


def with_layout(t, layout):
    """Same values as ``t``, laid out contiguous, as a dense permutation, or as a non-dense slice."""
    if layout == "contiguous" or t.dim() == 0:
        return t.contiguous()
    if layout == "transposed":
        return t.transpose(0, -1).contiguous().transpose(0, -1)
    big = torch.zeros(t.shape[:-1] + (2 * t.shape[-1],), dtype=t.dtype, device=t.device)
    big[..., ::2] = t
    return big[..., ::2]


def run_op(x, scale, dy, backend, **kw):
    xr = x.detach().requires_grad_()
    sr = scale.detach().clone().requires_grad_()
    poison_allocator(x.device)
    y = gk.lsq_fake_quant(xr, sr, backend=backend, **kw)
    y.backward(dy)
    return y, xr.grad, sr.grad


def check(x, scale, dy, backend, bits, signed, axis):
    y, dx, ds = run_op(x, scale, dy, backend, bits=bits, signed=signed, axis=axis)
    ey, edx, eds, mass = oracle(x, scale, dy, bits, signed, axis, with_mass=True)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert torch.equal(y, ey), f"y differs at {(y != ey).nonzero()[:5].tolist()}"
    assert torch.equal(dx, edx), "dx differs"
    assert ds.dtype == torch.float32 and ds.shape == scale.shape
    assert sum_err(ds, eds, mass) < 2e-6


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
@pytest.mark.parametrize("shape,axis", [CASES[2], CASES[8]])
def test_every_bit_width(backend, device, dtype, bits, signed, shape, axis):
    gen = torch.Generator().manual_seed(bits * 7 + signed)
    x, s, dy = random_case(shape, axis, bits, signed, dtype, device, gen)
    check(x, s, dy, backend, bits, signed, axis)


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,axis", CASES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_shapes_axes_layouts(backend, device, dtype, shape, axis, layout, signed):
    if backend == "triton" and device == "cpu" and math.prod(shape) > 2000 and layout != "contiguous":
        pytest.skip("large permuted layouts are too slow for the Triton interpreter; they run compiled on GPU")
    gen = torch.Generator().manual_seed(hash((shape, axis, layout, signed)) % 2**31)
    x, s, dy = random_case(shape, axis, 3, signed, dtype, device, gen)
    check(with_layout(x, layout), s, with_layout(dy, layout), backend, 3, signed, axis)


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_ties_and_clamp_bounds(backend, device, dtype, signed):
    """Exact halves round to even; x/s exactly at qn or qp passes the gradient, one ulp beyond does not."""
    bits = 4
    qn, qp = quant_bounds(bits, signed)
    s = 0.5
    halves = [(k + 0.5) * s for k in range(qn - 3, qp + 3)]
    exact_bounds = [qn * s, qp * s]
    beyond = [math.nextafter(qp * s, math.inf), math.nextafter(qn * s, -math.inf) if qn < 0 else -1e-3]
    vals = torch.tensor(halves + exact_bounds + beyond, dtype=torch.float64)
    vals = vals[vals.to(dtype).double() == vals]  # keep values the dtype holds exactly
    x = vals.to(device=device, dtype=dtype)
    scale = torch.tensor([s], device=device)
    dy = torch.ones_like(x)
    y, dx, ds = run_op(x, scale, dy, backend, bits=bits, signed=signed)
    v = vals / s
    expected = torch.round(torch.clamp(v, qn, qp)) * s  # torch.round: half to even
    assert torch.equal(y.double().cpu(), expected)
    inside = ((v >= qn) & (v <= qp)).to(dtype)
    assert torch.equal(dx.cpu(), inside)
    for b in exact_bounds:
        if b in vals.tolist():
            assert dx.cpu()[vals.tolist().index(b)] == 1
    if beyond[0] in vals.tolist():
        assert dx.cpu()[vals.tolist().index(beyond[0])] == 0
    _, _, eds = oracle(x, scale, dy, bits, signed, None)
    assert rel_err(ds, eds) < 1e-5


def _near(v: torch.Tensor, ulps: int) -> torch.Tensor:
    """Every float32 within ``ulps`` units in the last place of each value of ``v``."""
    bits = v.view(torch.int32)
    return torch.stack([(bits + k).view(torch.float32) for k in range(-ulps, ulps + 1)], dim=-1).flatten(-2)


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("channels", [12, 300])  # the Triton backward's whole-row tiles: 12 interpreted, 300 on GPU
def test_quotients_near_ties_and_bounds_divide_as_ieee(backend, device, channels):
    """x/s must be the IEEE float32 quotient wherever it decides the result: x a few ulps around (k + 1/2) * s
    and around the clamp bounds, for scales that are not powers of two (all-ones significands among them)."""
    bits, signed = 4, True
    qn, qp = quant_bounds(bits, signed)
    gen = torch.Generator().manual_seed(11)
    scales = torch.cat([torch.rand(29, generator=gen) * 0.2 + 1e-3,
                        torch.tensor([0.1, 0.3, 1 / 3, 0.7, 1.0, 3.0])])
    all_ones = (torch.tensor([1.0, 0.25, 2.0 ** -7]).view(torch.int32) - 1).view(torch.float32)  # 0.99999994, ...
    scales = torch.cat([all_ones, scales]).float().repeat(10)[:channels]
    points = torch.tensor([k + 0.5 for k in range(qn - 2, qp + 2)] + [qn, qp], dtype=torch.float64)
    x = _near((points[None, :] * scales.double()[:, None]).float(), 3)  # (channels, values)
    dy = torch.randn(x.shape, generator=gen)
    check(x.to(device), scales.to(device), dy.to(device), backend, bits, signed, 0)


# Inputs whose quotients overflow or underflow at extreme scales, beside ordinary ones.
EXTREME_INPUTS = (3e38, -3e38, 1e-38, -1e-44, 0.0, 1.0, -2.5, 7e30, 1e-30)


def extreme_inputs(n: int) -> torch.Tensor:
    """``EXTREME_INPUTS`` repeated to ``n`` float32 values."""
    x = torch.tensor(EXTREME_INPUTS, dtype=torch.float32)
    return x.repeat(n // x.numel() + 1)[:n]


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("scale", [1e-39, 1e-35, 3e-31, 1e-29, 1e29, 1e30, 1e35], ids=lambda s: f"s{s:g}")
def test_extreme_scales_and_inputs(backend, device, scale):
    """Scales near float32's limits and inputs whose quotient overflows or underflows."""
    x = extreme_inputs(len(EXTREME_INPUTS))
    s = torch.tensor([scale], dtype=torch.float32)
    dy = torch.linspace(-1, 1, x.numel())
    check(x.to(device), s.to(device), dy.to(device), backend, 4, True, None)
    # Per channel, extreme and ordinary scales side by side; 10 rows of 37 take the whole-row backward tiles.
    row, drow = torch.cat([x] * 4 + [x[:1]]), torch.cat([dy] * 4 + [dy[:1]])
    scales = torch.tensor([scale, 0.3] * 5)
    check(torch.stack([row] * 10).to(device), scales.to(device), torch.stack([drow] * 10).to(device), backend, 4,
          True, 0)


CPU_LEVELS = extension.CPU_ISA_LEVELS or ["none"]


@pytest.mark.skipif(not extension.HAS_CPU, reason="the C++ extension is not built")
@pytest.mark.parametrize("level", CPU_LEVELS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,axis", CASES)
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_cpu_backend_at_every_instruction_set_level(level, dtype, shape, axis, layout):
    """The cpu backend's loops are compiled per x86-64 level and the highest the CPU has runs: each level must
    meet the contract on its own (y and dx the oracle's bits, ds within rounding), including odd row lengths
    that leave vector tails, infinities and signed zeros."""
    gen = torch.Generator().manual_seed(hash((shape, axis, layout)) % 2**31)
    x, s, dy = random_case(shape, axis, 3, True, dtype, "cpu", gen)
    flat = x.view(-1)
    specials = torch.tensor([float("inf"), -float("inf"), 0.0, -0.0], dtype=dtype)  # NaN: its own test
    flat[:4] = specials
    with extension.cpu_isa(level):
        assert extension.MODULE.cpu_isa() == level
        check(with_layout(x, layout), s, with_layout(dy, layout), "cpu", 3, True, axis)


@pytest.mark.skipif(not extension.HAS_CPU, reason="the C++ extension is not built")
@pytest.mark.parametrize("level", CPU_LEVELS)
def test_cpu_levels_divide_as_ieee_near_ties_and_bounds(level):
    """Vector division gives the IEEE quotient where it decides the result, and NaN stays NaN, at every level."""
    with extension.cpu_isa(level):
        test_quotients_near_ties_and_bounds_divide_as_ieee("cpu", "cpu", 300)
        for scale in (1e-39, 1e35):
            test_extreme_scales_and_inputs("cpu", "cpu", scale)
        for dtype in DTYPES:
            test_nan_stays_in_its_channel("cpu", "cpu", dtype)


@pytest.mark.skipif(not extension.HAS_CPU, reason="the C++ extension is not built")
@pytest.mark.parametrize("level", CPU_LEVELS)
@pytest.mark.parametrize("scale", [2.0 ** -24, 1.0, 4096.0], ids=["s2^-24", "s1", "s4096"])
def test_cpu_fp16_every_half_value(level, scale):
    """Every non-NaN float16 through the cpu backend's own fp16 conversions: subnormals (scale 2^-24 maps
    them onto the integer grid, so y must equal x), the normal range, and results that overflow to inf."""
    bits = torch.arange(-(2 ** 15), 2 ** 15, dtype=torch.int32).to(torch.int16)
    x = bits.view(torch.float16)
    x = x[~torch.isnan(x)]
    dy = torch.linspace(-1, 1, x.numel()).to(torch.float16)
    with extension.cpu_isa(level):
        check(x, torch.tensor([scale]), dy, "cpu", 8, True, None)


# (shape, axis) of rows under 64 elements, which the cpu backend runs as spans with a scale per element
CPU_SPANS = [
    pytest.param((300, 1100), 1, id="inner-channel-blocks"),  # 512 channels x 128 rows per item, last ones partial
    pytest.param((300, 60, 9), 1, id="short-rows-blocks"),  # 56 channels' rows of 9 per span, 130 rows per item
    pytest.param((300, 3, 7), 1, id="whole-rows-per-span"),  # 25 outer rows of 21 elements per span
    pytest.param((40000, 4), 1, id="whole-rows-items"),  # 128 rows per span, 16384 per item, the last partial
    pytest.param((100, 10, 63), 1, id="longest-span-rows"),  # 8 channels' rows of 63 per span, then 2
]


@pytest.mark.skipif(not extension.HAS_CPU, reason="the C++ extension is not built")
@pytest.mark.parametrize("level", CPU_LEVELS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,axis", CPU_SPANS)
def test_cpu_short_row_spans(level, dtype, shape, axis):
    """Short rows run as spans of adjacent channels' rows, or of several whole outer rows, each element with its
    own scale: every way of cutting them gives the oracle's results around every tie and bound, at every level."""
    x, s, dy = _near_tie_case(shape, axis, dtype, "cpu")
    with extension.cpu_isa(level):
        check(x, s, dy, "cpu", 4, True, axis)


@pytest.mark.skipif(not extension.HAS_CPU, reason="the C++ extension is not built")
@pytest.mark.parametrize("shape,axis", [pytest.param((300, 1100), 0, id="rows"),
                                        pytest.param((3001, 70), None, id="per-tensor")] + CPU_SPANS)
def test_cpu_scale_gradient_bits_do_not_depend_on_threads(shape, axis):
    """The scale gradient is summed per work item, then per channel in a fixed order: one thread and two give
    the same bits."""
    x, s, dy = _near_tie_case(shape, axis, torch.float32, "cpu")
    threads = torch.get_num_threads()
    try:
        grads = []
        for n in (1, 2):
            torch.set_num_threads(n)
            grads.append(run_op(x, s, dy, "cpu", bits=4, signed=True, axis=axis)[2])
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(grads[0], grads[1])


def test_cpu_isa_rejects_unknown_level():
    with pytest.raises(ValueError, match="level must be one of"):
        with extension.cpu_isa("sse9"):
            pass


# (shape, axis): which CUDA kernels run (forward rows from 1024 fp32 / 2048 16-bit elements per row, backward as
# named), and how their blocks walk the rows.
CUDA_KERNEL_PATHS = [
    pytest.param((40, 700), 0, id="short-rows"),
    pytest.param((40, 600, 100), 1, id="short-rows-looped"),
    pytest.param((20, 4608), 0, id="conv-rows-one-wide-tile"),
    pytest.param((300, 4096), 0, id="rows-one-tile"),
    pytest.param((5, 20000), 0, id="long-rows-split"),
    pytest.param((300, 4, 2048), 1, id="rows-looped"),
    pytest.param((20, 4601), 0, id="odd-rows-scalar"),
    # innermost channels (C a multiple of 8): 16-byte columns, the last column block partly outside C
    pytest.param((37, 264), 1, id="inner-channel-columns"),
    pytest.param((4096, 2056), 1, id="inner-channel-columns-looped"),
    pytest.param((40, 300), 1, id="inner-channel-columns-fp32-only"),  # 16-bit vectors of 8 straddle rows
    pytest.param((70001,), None, id="per-tensor-split"),
    pytest.param((4_400_000,), None, id="per-tensor-looped"),
    pytest.param((4_400_001,), None, id="per-tensor-looped-scalar"),
]


def needs_cuda_extension(test):
    """GPU test of the CUDA backend: skipped without a GPU or without the extension built with CUDA."""
    skip = pytest.mark.skipif(not (torch.cuda.is_available() and "cuda" in gk.available_backends()),
                              reason="needs the CUDA extension and a GPU")
    return pytest.mark.gpu(skip(test))


@needs_cuda_extension
@pytest.mark.parametrize("prefetch", [None, True], ids=["", "prefetch"])
@pytest.mark.parametrize("mode", ["plan", "ieee", "fast"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,axis", CUDA_KERNEL_PATHS)
def test_cuda_division_modes_divide_as_ieee(prefetch, mode, dtype, shape, axis):
    """Every CUDA kernel path in every division mode, looping backward blocks with and without prefetch, gives
    the oracle's bits, on inputs a few ulps around the ties and clamp bounds of scales that are not powers of two
    (the only inputs where a division error shows)."""
    from gaqat_kernels.kernels.extension import cuda_division, cuda_launch

    x, s, dy = _near_tie_case(shape, axis, dtype, "cuda")
    with cuda_division(mode), cuda_launch(prefetch=prefetch):
        check(x, s, dy, "cuda", 4, True, axis)


@needs_cuda_extension
@pytest.mark.parametrize("launch", [(1, 1), (3, 5), (1 << 16, 64), (0, 1, True), (0, 3, True), (0, 64, True),
                                    (0, 0, False)], ids=lambda v: f"fwd{v[0]}-split{v[1]}" + (
                                        f"-prefetch{int(v[2])}" if len(v) > 2 else ""))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,axis", CUDA_KERNEL_PATHS)
def test_cuda_launch_shapes_match_the_oracle(launch, dtype, shape, axis):
    """Every CUDA kernel path under other launch shapes (a forward grid of one block per SM looping over the
    tensor or one block per tile; one split block per SM or 64; looping backward blocks that prefetch their
    next tile or not) gives the oracle's results."""
    from gaqat_kernels.kernels.extension import cuda_launch

    x, s, dy = _near_tie_case(shape, axis, dtype, "cuda")
    with cuda_launch(*launch):
        check(x, s, dy, "cuda", 4, True, axis)


@needs_cuda_extension
@pytest.mark.parametrize("scale", [1e-39, 1e35], ids=lambda s: f"s{s:g}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(10, 4096), (10, 4608), (10, 2000), (5, 20000)],
                         ids=["one-tile", "one-wide-tile", "one-partial-tile", "one-tile-per-split"])
def test_cuda_one_tile_rows_with_extreme_scales(scale, dtype, shape):
    """Row blocks that visit one tile divide fast and load the tile before the scale has arrived; a scale
    outside the fast division's range must take the IEEE path (which reads the tile again) in the same block,
    beside channels with ordinary scales."""
    x = extreme_inputs(shape[1])
    dy = torch.linspace(-1, 1, shape[1])
    scales = torch.tensor([scale, 0.3] * shape[0])[: shape[0]]
    check(torch.stack([x] * shape[0]).to(dtype).cuda(), scales.cuda(), torch.stack([dy] * shape[0]).to(dtype).cuda(),
          "cuda", 4, True, 0)


@needs_cuda_extension
@pytest.mark.parametrize("scale", [1e-39, 1e35], ids=lambda s: f"s{s:g}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows", [37, 300], ids=lambda o: f"rows{o}")
def test_cuda_inner_channel_columns_with_extreme_scales(scale, dtype, rows):
    """Innermost-channel threads choose fast or IEEE division once for their column of channels: a column with
    a scale outside the fast range (the first and a middle one) must divide as IEEE beside lanes that divide
    fast, in the forward and the backward, on every row."""
    C = 264
    x = extreme_inputs(rows)[:, None].expand(rows, C) * torch.linspace(0.5, 2, C)
    dy = torch.linspace(-1, 1, rows * C).reshape(rows, C)
    scales = torch.full((C,), 0.3)
    scales[0], scales[133] = scale, scale
    check(x.to(dtype).cuda(), scales.cuda(), dy.to(dtype).cuda(), "cuda", 4, True, 1)


@needs_cuda_extension
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_inner_channel_misaligned_scales(dtype):
    """Innermost channels whose scales do not start on 16 bytes (a view one float into its storage) cannot load
    them as vectors; the element-wise kernels must take over and still give the oracle's results."""
    x, s, dy = _near_tie_case((37, 264), 1, dtype, "cuda")
    sr = torch.empty(s.numel() + 1, device="cuda")[1:].copy_(s).requires_grad_()
    assert sr.data_ptr() % 16 != 0
    xr = x.detach().requires_grad_()
    y = gk.lsq_fake_quant(xr, sr, bits=4, signed=True, axis=1, backend="cuda")
    y.backward(dy)
    ey, edx, eds, mass = oracle(x, s, dy, 4, True, 1, with_mass=True)
    assert torch.equal(y, ey) and torch.equal(xr.grad, edx)
    assert sum_err(sr.grad, eds, mass) < 2e-6


@pytest.mark.parametrize("kwargs", [dict(forward_blocks_per_sm=-1), dict(split_blocks_per_sm=65),
                                    dict(forward_blocks_per_sm=2.0), dict(prefetch=1)], ids=str)
def test_cuda_launch_rejects_bad_shapes(kwargs):
    from gaqat_kernels.kernels.extension import cuda_launch

    with pytest.raises(ValueError, match=next(iter(kwargs))):
        with cuda_launch(**kwargs):
            pass


def _near_tie_case(shape, axis, dtype, device, bits=4, signed=True):
    """(x, s, dy): every channel's values a few ulps around its scale's ties and clamp bounds, in random order;
    scales that are not powers of two, the first three with all-ones significands."""
    qn, qp = quant_bounds(bits, signed)
    gen = torch.Generator().manual_seed(hash((shape, axis)) % 2**31)
    channels = 1 if axis is None else shape[axis]
    scales = torch.rand(channels, generator=gen) * 0.2 + 1e-3
    scales[: min(3, channels)] = (torch.tensor([1.0, 0.25, 2.0 ** -7])[: min(3, channels)].view(torch.int32) - 1
                                  ).view(torch.float32)
    points = torch.tensor([k + 0.5 for k in range(qn - 2, qp + 2)] + [qn, qp], dtype=torch.float64)
    near = _near((points[None, :] * scales.double()[:, None]).float(), 3)  # (channels, values)
    per_row = math.prod(shape) // channels
    pick = torch.randint(near.shape[1], (channels, per_row), generator=gen)
    rows = torch.gather(near, 1, pick)  # each channel's values, in random order
    ax = 0 if axis is None else axis % len(shape)
    moved = [shape[ax]] + [d for i, d in enumerate(shape) if i != ax]
    x = rows.reshape(moved).movedim(0, ax).contiguous().to(dtype).to(device)
    dy = torch.randn(shape, generator=gen).to(dtype).to(device)
    return x, scales.to(device), dy


TRITON_PARAMS = [p for p in backend_params() if p.values[0] == "triton"]
# (shape interpreted on 4 "SMs", shape on a GPU), axis: the same kind of backward program either way
TRITON_BACKWARD_PATHS = [
    pytest.param(((12, 64), (300, 64)), 0, id="channel-one-tile"),
    pytest.param(((12, 3, 64), (12, 3, 64)), 1, id="channel-blocks-split-one-tile"),
    pytest.param(((200, 3, 64), (3000, 3, 64)), 1, id="channel-blocks-split-looped"),
    pytest.param(((5000,), (5000,)), None, id="per-tensor-split-one-tile"),
    pytest.param(((300000,), (4_400_000,)), None, id="per-tensor-split-looped"),
    pytest.param(((12, 4608), (300, 4608)), 0, id="whole-row-tiles"),
    pytest.param(((200, 8), (4096, 300)), 1, id="inner-channel-split"),
    # innermost channels: ROWS tiles of adjacent channels x rows
    pytest.param(((2500, 24), (20000, 264)), 1, id="inner-channel-rows-split-looped"),
    pytest.param(((20, 2056), (40, 67592)), 1, id="inner-channel-rows-program-per-block"),
    pytest.param(((64, 256), (512, 2048)), 1, id="inner-channel-rows-even"),
]


@pytest.fixture
def triton_settings(monkeypatch):
    """Sets module settings of the Triton backend for one test; its cached launch plans are dropped on the
    way in and out, since they depend on the settings."""
    from gaqat_kernels.kernels import triton_lsq

    def apply(**settings):
        for name, value in settings.items():
            monkeypatch.setattr(triton_lsq, name, value)
        triton_lsq.clear_plans()

    yield apply
    monkeypatch.undo()
    triton_lsq.clear_plans()


@pytest.mark.parametrize("backend,device", TRITON_PARAMS)
@pytest.mark.parametrize("where", ["rows", "one-tile", "loops", "all"])
@pytest.mark.parametrize("shapes,axis", TRITON_BACKWARD_PATHS)
def test_triton_backward_division_settings_divide_as_ieee(backend, device, where, shapes, axis, triton_settings):
    """Wherever the Triton backward is set to use the exact fast division (``_FAST_DIV_BACKWARD``), its
    programs (one tile, looping, whole rows) give the oracle's bits on inputs around every tie and bound."""
    triton_settings(_FAST_DIV_BACKWARD=where)
    x, s, dy = _near_tie_case(shapes[device == "cuda"], axis, torch.float32, device)
    check(x, s, dy, backend, 4, True, axis)


@pytest.mark.parametrize("backend,device", [p for p in TRITON_PARAMS if p.values[1] == "cpu"])
@pytest.mark.parametrize("shapes,axis", TRITON_BACKWARD_PATHS)
def test_triton_interpreter_whose_fma_rounds_twice_divides_as_ieee(backend, device, shapes, axis, triton_settings,
                                                                   monkeypatch):
    """Where the interpreter's fma rounds twice (Triton 3.6), fast division would be off by an ulp at ties, so the
    launchers divide with IEEE there: the oracle's bits around every tie and bound, fast division asked for
    everywhere."""
    from gaqat_kernels.kernels import triton_lsq

    triton_settings(_FAST_DIV_BACKWARD="all")
    monkeypatch.setattr(triton_lsq, "_interpreter_fma_rounds_once", lambda: False)
    x, s, dy = _near_tie_case(shapes[0], axis, torch.float32, device)
    check(x, s, dy, backend, 4, True, axis)


@pytest.mark.parametrize("backend,device", TRITON_PARAMS)
@pytest.mark.parametrize("where", ["rows", "one-tile", "loops", "all"])
@pytest.mark.parametrize("scale", [1e-39, 1e35], ids=lambda s: f"s{s:g}")
@pytest.mark.parametrize("shapes,axis", TRITON_BACKWARD_PATHS)
def test_triton_fast_division_redone_for_extreme_scales(backend, device, where, scale, shapes, axis,
                                                        triton_settings):
    """Programs that divide fast do so before they know their scale; one whose scale lies outside the fast
    division's range does its tiles again with IEEE division (forward and backward, every kind of backward
    program), beside channels with ordinary scales, on inputs whose quotients overflow and underflow."""
    triton_settings(_FAST_DIV_BACKWARD=where)
    shape = shapes[device == "cuda"]
    n = math.prod(shape)
    x = extreme_inputs(n).reshape(shape)
    dy = torch.linspace(-1, 1, n).reshape(shape)
    channels = 1 if axis is None else shape[axis]
    s = torch.tensor([scale, 0.3] * channels)[:channels]
    check(x.to(device), s.to(device), dy.to(device), backend, 4, True, axis)


@pytest.mark.parametrize("backend,device", TRITON_PARAMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shapes,axis", [p for p in TRITON_BACKWARD_PATHS if "split" in p.id or "rows-even" in p.id] + [
    pytest.param(((40 * 4096,), (1024 * 4096,)), None, id="per-tensor-split-looped-even")])
def test_triton_backward_prefetch(backend, device, dtype, shapes, axis, triton_settings):
    """``_PREFETCH`` (``_ROWS_PREFETCH`` for innermost channels): split backward programs that load their next
    tile before the current tile's math (the last prefetch masked off) give the oracle's results around every tie
    and bound, masked tiles included."""
    triton_settings(_PREFETCH={4: True, 2: True}, _ROWS_PREFETCH={4: True, 2: True})
    x, s, dy = _near_tie_case(shapes[device == "cuda"], axis, dtype, device)
    check(x, s, dy, backend, 4, True, axis)


@pytest.mark.parametrize("backend,device", TRITON_PARAMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tile_bytes", [2048, 32768], ids=lambda b: f"fwd{b // 1024}KB")
@pytest.mark.parametrize("shape,axis", [pytest.param((12, 4608), 0, id="rows"),
                                        pytest.param((6, 5, 40, 7), 1, id="inner-channel"),
                                        pytest.param((70001,), None, id="per-tensor")])
def test_triton_forward_tile_sizes(backend, device, dtype, tile_bytes, shape, axis, triton_settings):
    """``_FORWARD_TILE_BYTES``: forward tiles smaller or larger than the default give the oracle's results."""
    triton_settings(_FORWARD_TILE_BYTES={4: tile_bytes, 2: tile_bytes})
    x, s, dy = _near_tie_case(shape, axis, dtype, device)
    check(x, s, dy, backend, 4, True, axis)


@pytest.mark.parametrize("backend,device", TRITON_PARAMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("one_wave", [True, False], ids=["rounded-down", "rounded-up"])
@pytest.mark.parametrize("shapes", [pytest.param(((200, 600), (3000, 1100)), id="inner-channel-rows")])
def test_triton_split_counts(backend, device, dtype, one_wave, shapes, triton_settings):
    """``_SPLIT_ONE_WAVE``: split counts per channel block rounded down (one wave of programs) or up give the
    oracle's results; the two settings give different grids on these shapes (3 or 5 channel blocks on the CPU's
    16 program slots, 58 or 105 split against 59 or 106 on the GPU's)."""
    from gaqat_kernels.kernels import triton_lsq

    shape = shapes[device == "cuda"]
    x, s, dy = _near_tie_case(shape, 1, dtype, device)
    t = triton_lsq
    sizes = (t._device_sms(x), t._tile(x), t._tile(x, t._SPLIT_TILE_BYTES), t._for_size(t._SPLIT_PROGRAMS_PER_SM, x),
             t._ROWS_TILE_WIDTH_BYTES // x.element_size())

    def splits(wave):
        triton_settings(_SPLIT_ONE_WAVE=wave)
        return t._rows_plan(*shape, *sizes)[4]

    assert splits(not one_wave) != splits(one_wave)
    check(x, s, dy, backend, 4, True, 1)


@pytest.mark.parametrize("backend,device", TRITON_PARAMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("waste", [1.10, 1.5], ids=lambda w: f"waste{w}")
@pytest.mark.parametrize("shapes", [pytest.param(((3, 6, 14, 14), (64, 40, 14, 14)), id="short-rows"),
                                    pytest.param(((3, 5, 100), (8, 300, 100)), id="rows-of-100")])
def test_triton_short_row_blocks(backend, device, dtype, waste, shapes, triton_settings):
    """``_SHORT_ROW_MAX_WASTE``: short rows in several small blocks (1.10) or one masked block per row (1.5) give
    the oracle's results around every tie and bound, forward and backward."""
    import triton

    from gaqat_kernels.kernels import triton_lsq

    triton_settings(_SHORT_ROW_MAX_WASTE=waste)
    shape = shapes[device == "cuda"]
    row = math.prod(shape[2:])
    assert (triton_lsq._block_i(row, 4096) == triton.next_power_of_2(row)) == (waste == 1.5)
    x, s, dy = _near_tie_case(shape, 1, dtype, device)
    check(x, s, dy, backend, 4, True, 1)


@pytest.mark.parametrize("backend,device", TRITON_PARAMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("inner", [4608, 4601, 6000, 8192], ids=lambda i: f"row{i}")
@pytest.mark.parametrize("split", [True, False], ids=["two-blocks", "one-block"])
def test_triton_whole_row_tiles(backend, device, dtype, inner, split, triton_settings):
    """``_ROW_TILE_SPLIT``: whole-row backward tiles as a power-of-two block plus a tail block (exact, masked,
    or none; the default), or as one masked next_power_of_2 block, give the oracle's results around every tie
    and bound."""
    triton_settings(_ROW_TILE_SPLIT=split)
    x, s, dy = _near_tie_case((12 if device == "cpu" else 300, inner), 0, dtype, device)
    check(x, s, dy, backend, 4, True, 0)


@pytest.mark.parametrize("rows,shape,what", [(True, (4096, 2 ** 28, 1), "row stride of 268435456"),
                                             (False, (2, 16, 2 ** 28), "channel stride of 268435456")],
                         ids=["rows", "channels"])
def test_triton_rejects_tiles_past_int32_offsets(rows, shape, what):
    """In-tile offsets are int32: a tile of 16 rows of 2**28 channels (innermost channels) or of 16 channels of
    2**28 elements spans 2**32 elements, and the error names which stride is too large."""
    pytest.importorskip("triton")
    from gaqat_kernels.kernels import triton_lsq

    with pytest.raises(ValueError, match=what):
        triton_lsq._launch_extent(rows, *shape, 16, 16, 1)


def test_cuda_division_rejects_unknown_mode():
    from gaqat_kernels.kernels.extension import cuda_division

    with pytest.raises(ValueError, match="mode must be one of"):
        with cuda_division("approximate"):
            pass


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_stays_in_its_channel(backend, device, dtype):
    gen = torch.Generator().manual_seed(3)
    x, s, dy = random_case((4, 37), 0, 4, True, dtype, device, gen)
    x[1, 5] = float("nan")
    y, dx, ds = run_op(x, s, dy, backend, bits=4, signed=True, axis=0)
    assert torch.isnan(y[1, 5]) and torch.isnan(y).sum() == 1
    assert dx[1, 5] == 0
    assert torch.isnan(ds[1]) and torch.isfinite(ds[[0, 2, 3]]).all()
    _, _, eds = oracle(x, s, dy, 4, True, 0)
    assert rel_err(ds[[0, 2, 3]], eds[[0, 2, 3]]) < 1e-5


@pytest.mark.parametrize("backend,device", backend_params())
def test_infinite_input_clamps(backend, device):
    x = torch.tensor([float("inf"), -float("inf"), 0.3], device=device)
    s = torch.tensor([0.25], device=device)
    y, dx, ds = run_op(x, s, torch.ones_like(x), backend, bits=3, signed=True, grad_scale=1.0)
    assert y.tolist() == [0.75, -1.0, 0.25]
    assert dx.tolist() == [0.0, 0.0, 1.0]
    assert ds.item() == pytest.approx(3 - 4 + (1 - 1.2), rel=1e-6)


@pytest.mark.parametrize("backend,device", backend_params())
def test_scale_gradient_is_deterministic(backend, device):
    gen = torch.Generator().manual_seed(5)
    x, s, dy = random_case((3, 2001), 0, 4, True, torch.float32, device, gen)
    runs = [run_op(x, s, dy, backend, bits=4, signed=True, axis=0)[2] for _ in range(3)]
    assert all(torch.equal(runs[0], r) for r in runs[1:])


@pytest.mark.parametrize("backend,device", backend_params())
def test_empty_input(backend, device):
    x = torch.empty(0, 3, device=device, requires_grad=True)
    s = torch.ones(3, device=device, requires_grad=True)
    y = gk.lsq_fake_quant(x, s, bits=4, signed=True, axis=1, backend=backend)
    y.sum().backward()
    assert y.shape == (0, 3) and torch.equal(s.grad, torch.zeros(3, device=device))


@pytest.mark.parametrize("backend,device", backend_params())
def test_grad_scale_argument_multiplies_scale_gradient(backend, device):
    gen = torch.Generator().manual_seed(9)
    x, s, dy = random_case((7, 33), 0, 4, True, torch.float32, device, gen)
    _, _, ds_default = run_op(x, s, dy, backend, bits=4, signed=True, axis=0)
    _, _, ds_one = run_op(x, s, dy, backend, bits=4, signed=True, axis=0, grad_scale=1.0)
    g = 1 / math.sqrt(33 * 7)
    assert rel_err(ds_default, ds_one * g) < 1e-6


def test_reference_closed_form_is_the_gradient_of_eager_lsq():
    """The reference backend's formulas equal autograd through the eager composition (float64)."""
    gen = torch.Generator().manual_seed(0)
    for axis in (None, 0, 1):
        x, s, dy = random_case((6, 5, 4), axis, 3, True, torch.float64, "cpu", gen)
        s = s.double()
        outs = []
        for fn in (lambda a, b: gk.lsq_fake_quant(a, b, bits=3, signed=True, axis=axis, backend="reference"),
                   lambda a, b: lsq_fake_quant_eager(a, b, bits=3, signed=True, axis=axis)):
            a, b = x.clone().requires_grad_(), s.clone().requires_grad_()
            y = fn(a, b)
            y.backward(dy)
            outs.append((y, a.grad, b.grad))
        assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
        assert rel_err(outs[0][2], outs[1][2]) < 1e-12


def test_gradcheck_reference_where_differentiable():
    """Outside the clamp range y = qn*s or qp*s is smooth in s and flat in x: gradcheck holds exactly."""
    gen = torch.Generator().manual_seed(1)
    s = (torch.rand(4, generator=gen, dtype=torch.float64) + 0.5).requires_grad_()
    sign = torch.where(torch.rand(3, 4, generator=gen) < 0.5, -1.0, 1.0).double()
    x = (sign * (20 + 10 * torch.rand(3, 4, generator=gen, dtype=torch.float64)) * s.detach()).requires_grad_()
    f = lambda a, b: gk.lsq_fake_quant(a, b, bits=3, signed=True, axis=1, grad_scale=1.0, backend="reference")
    assert torch.autograd.gradcheck(f, (x, s))
    assert torch.autograd.gradcheck(lambda b: f(x.detach(), b), (s,))


def test_scale_value_is_used_exactly():
    """No (s - s*g).detach() + s*g: the output is round(x/s)*s with the stored s, bit for bit."""
    s = torch.tensor([0.1234567], requires_grad=True)
    x = torch.tensor([0.7, -0.31, 5.0])
    y = gk.lsq_fake_quant(x, s, bits=8, signed=True, backend="reference")
    assert torch.equal(y, torch.round(x / s.detach()) * s.detach())


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("lowering", ops.COMPILE_LOWERINGS)
def test_compile_fullgraph_matches_eager(backend, device, lowering):
    """custom_op: the backend's kernels inside the compiled graph, bit for bit. decomposed: Inductor's code for
    the op's formulas, y and dx bit for bit, the scale gradient within float rounding of its sum.
    triton_backward: decomposed forward, our Triton backward (on CUDA; decomposed elsewhere), the same bounds."""
    if backend == "triton" and device == "cpu":
        pytest.skip("torch.compile of interpreted Triton is not meaningful")
    gen = torch.Generator().manual_seed(2)
    x, s, dy = random_case((5, 3, 4, 7), 0, 4, True, torch.float32, device, gen)

    def f(a, b):
        return gk.lsq_fake_quant(a, b, bits=4, signed=True, axis=0, backend=backend) * 2.0

    torch._dynamo.reset()
    results = []
    with ops.compile_lowering(lowering):
        for fn in (f, torch.compile(f, fullgraph=True, backend="inductor")):
            a, b = x.clone().requires_grad_(), s.clone().requires_grad_()
            y = fn(a, b)
            y.backward(dy)
            results.append((y, a.grad, b.grad))
    (y0, dx0, ds0), (y1, dx1, ds1) = results
    assert torch.equal(y0, y1) and torch.equal(dx0, dx1)
    if lowering == "custom_op":
        assert torch.equal(ds0, ds1)
    else:
        _, _, eds, mass = oracle(x, s, dy * 2.0, 4, True, 0, with_mass=True)
        assert sum_err(ds1, eds, mass) < 2e-6


@pytest.mark.parametrize("device", [pytest.param("cpu", id="cpu-interpreted"),
                                    pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,axis,layout", [
    pytest.param((5, 3, 4, 7), None, "contiguous", id="4d-tensor"),
    pytest.param((5, 3, 4, 7), 1, "channels_last", id="act-ch1-channels-last"),
    pytest.param((300, 1100), 0, "contiguous", id="many-long-channels"),
    pytest.param((7, 33), 0, "transposed", id="7x33-ch0-transposed"),
])
def test_triton_backward_op_matches_the_oracle(device, dtype, shape, axis, layout):
    """The triton_backward lowering's op (``gaqat_kernels::lsq_fake_quant_backward_triton``) called directly: dx bit
    for bit, the scale gradient within rounding of its sum, on any layout of x and dy; under torch.compile on a
    GPU it is what Inductor launches (``test_compile_fullgraph_matches_eager``)."""
    if "triton" not in gk.available_backends() or (device == "cuda" and not torch.cuda.is_available()):
        pytest.skip("no Triton here")
    if device == "cpu" and not backends.TRITON_INTERPRETED:
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1 (set by conftest.py where there is no GPU)")
    gen = torch.Generator().manual_seed(4)
    x, s, dy = random_case(shape, axis, 4, True, dtype, device, gen)
    if layout == "channels_last":
        x, dy = x.to(memory_format=torch.channels_last), dy.contiguous()
    elif layout == "transposed":
        x, dy = x.t().contiguous().t(), dy.t().contiguous().t()
    qn, qp = quant_bounds(4, True)
    g = 0.37
    scale = s if axis is not None else s.reshape(())
    dx, ds = torch.ops.gaqat_kernels.lsq_fake_quant_backward_triton(dy, x, scale, qn, qp, axis, g)
    _, edx, eds, mass = oracle(x, scale, dy, 4, True, axis, grad_scale=g, with_mass=True)
    assert dx.dtype == x.dtype and dx.shape == x.shape and ds.shape == scale.shape and ds.dtype == torch.float32
    assert torch.equal(dx, edx.to(dtype))
    assert sum_err(ds.reshape(-1), eds.reshape(-1), mass.reshape(-1)) < 2e-6


@pytest.mark.parametrize("backend,device", [p for p in backend_params() if p.values[0] in ("cpu", "cuda", "triton")])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("axis", [None, 1], ids=["per-tensor", "axis1"])
def test_eager_path_equals_the_custom_op(backend, device, dtype, axis):
    """Eager calls skip the custom op's dispatch (the C++ backends build their autograd node in C++, Triton
    uses an autograd.Function); the traced paths (the C++ dispatcher op of the C++ backends, the Python custom
    op of every backend) must give the same bits and strides, non-contiguous input included."""
    gen = torch.Generator().manual_seed(9)
    x, s, dy = random_case((6, 5, 7), axis, 3, False, dtype, device, gen)
    x = x.transpose(0, 2)
    dy = dy.transpose(0, 2)
    ax = None if axis is None else 1
    paths = ["eager", "python-op"] + (["cpp-op"] if backend in ("cpu", "cuda") else [])
    results = []
    for path in paths:
        a, b = x.clone().requires_grad_(), s.clone().requires_grad_()
        if path == "eager":
            y = gk.lsq_fake_quant(a, b, bits=3, signed=False, axis=ax, backend=backend)
            assert ("_EagerFakeQuant" if backend == "triton" else "LSQFunction") in y.grad_fn.name()
        elif path == "python-op":
            y = torch.ops.gaqat_kernels.lsq_fake_quant(a, b, 3, False, ax, None, backend)
            assert "lsq_fake_quant" in y.grad_fn.name()
        else:
            y = torch.ops.gaqat_kernels.lsq_fake_quant_ext(a, b, 0, 7, -1 if ax is None else ax, None)
            assert "lsq_fake_quant_ext" in y.grad_fn.name()
        y.backward(dy)
        results.append((y, a.grad, b.grad))
    y0, dx0, ds0 = results[0]
    for y1, dx1, ds1 in results[1:]:
        assert torch.equal(y0, y1) and y0.stride() == y1.stride()
        assert torch.equal(dx0, dx1) and dx0.stride() == dx1.stride() and torch.equal(ds0, ds1)


CPP_BACKENDS = [p for p in backend_params() if p.values[0] in ("cpu", "cuda")]


@pytest.mark.parametrize("backend,device", CPP_BACKENDS)
def test_traced_graphs_call_the_cpp_operators(backend, device):
    """Under tracing (torch.compile, make_fx) the C++ backends run as their C++ dispatcher operators, forward
    and backward, so compiled graphs call the kernels without a Python layer."""
    from torch.fx.experimental.proxy_tensor import make_fx

    gen = torch.Generator().manual_seed(1)
    x, s, dy = random_case((4, 6), 0, 4, True, torch.float32, device, gen)

    def step(a, b, g):
        a, b = a.detach().requires_grad_(), b.detach().requires_grad_()
        y = gk.lsq_fake_quant(a, b, bits=4, signed=True, axis=0, backend=backend)
        return torch.autograd.grad(y, (a, b), g)

    code = make_fx(step)(x, s, dy).code
    assert "gaqat_kernels.lsq_fake_quant_ext.default" in code
    assert "gaqat_kernels.lsq_fake_quant_ext_backward.default" in code
    assert "gaqat_kernels.lsq_fake_quant.default" not in code


@pytest.mark.parametrize("backend,device", CPP_BACKENDS)
@pytest.mark.parametrize("shape,axis", [((8, 5), 0), ((5, 8), 1), ((3, 4, 5), -1), ((2, 3, 4), 1)])
def test_cpp_operators_pass_opcheck(backend, device, shape, axis):
    """Schema, fake implementation (shapes, strides), autograd registration and AOT tracing of the C++
    operators, on contiguous and permuted inputs."""
    gen = torch.Generator().manual_seed(3)
    x, s, dy = random_case(shape, None if axis == -1 else axis, 4, True, torch.float32, device, gen)
    if axis == 1:
        x = x.transpose(0, 2 if x.dim() == 3 else 1).contiguous().transpose(0, 2 if x.dim() == 3 else 1)
    s = s[:1] if axis == -1 else s
    args = (x.requires_grad_(), s.clone().requires_grad_(), -8, 7, axis, None if axis != 1 else 0.25)
    torch.library.opcheck(torch.ops.gaqat_kernels.lsq_fake_quant_ext, args)
    torch.library.opcheck(torch.ops.gaqat_kernels.lsq_fake_quant_ext_backward,
                          (dy, x.detach(), s.detach(), -8, 7, axis, None))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["reference", "triton", "cuda"])
def test_cuda_graph_capture(backend):
    if backend not in gk.available_backends():
        pytest.skip(f"{backend} not available")
    gen = torch.Generator().manual_seed(4)
    x, s, dy = random_case((64, 300), 0, 4, True, torch.float32, "cuda", gen)
    x.requires_grad_()
    s.requires_grad_()

    def step():
        x.grad = s.grad = None
        y = gk.lsq_fake_quant(x, s, bits=4, signed=True, axis=0, backend=backend)
        y.backward(dy)
        return y

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    x.grad = s.grad = None
    with torch.cuda.graph(graph):
        y = gk.lsq_fake_quant(x, s, bits=4, signed=True, axis=0, backend=backend)
        y.backward(dy)
    with torch.no_grad():
        x.copy_(x * 1.5)
    graph.replay()
    torch.cuda.synchronize()
    ey, edx, eds = oracle(x.detach(), s.detach(), dy, 4, True, 0)
    assert torch.equal(y, ey) and torch.equal(x.grad, edx) and rel_err(s.grad, eds) < 1e-5


def test_checked_mode_rejects_bad_scales():
    x = torch.randn(4)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with gk.checked_mode(), pytest.raises(ValueError, match="scale"):
            gk.lsq_fake_quant(x, torch.tensor([bad]), bits=4, signed=True)
        gk.lsq_fake_quant(x, torch.tensor([bad]), bits=4, signed=True)  # unchecked: no host sync, no error


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(bits=1), ValueError, "bits"),
        (dict(bits=9), ValueError, "bits"),
        (dict(bits=4.0), ValueError, "bits"),
        (dict(bits=True), ValueError, "bits"),
        (dict(signed="yes"), TypeError, "signed"),
        (dict(axis=2), ValueError, "axis"),
        (dict(axis=-3), ValueError, "axis"),
        (dict(axis=1.0), TypeError, "axis"),
        (dict(axis=0), ValueError, "scale"),  # scale has 3 elements, dim 0 has 2
        (dict(axis=None, scale=torch.ones(3)), ValueError, "scale"),
        (dict(scale=torch.ones(3, dtype=torch.float16)), TypeError, "scale"),
        (dict(scale=[1.0, 1.0, 1.0]), TypeError, "scale"),
        (dict(x=torch.ones(2, 3, dtype=torch.int32)), TypeError, "x"),
        (dict(scale=torch.ones(3, dtype=torch.float64)), TypeError, "scale"),
        (dict(x=[[1.0]]), TypeError, "x"),
        (dict(grad_scale=-1.0), ValueError, "grad_scale"),
        (dict(grad_scale=float("nan")), ValueError, "grad_scale"),
        (dict(backend="fastest"), ValueError, "backend"),
        (dict(x=torch.ones(2, 3, dtype=torch.float64), scale=torch.ones(3, dtype=torch.float64), backend="cpu"),
         ValueError, "backend"),
    ],
)
def test_bad_input_names_the_argument(kwargs, error, match):
    args = dict(x=torch.ones(2, 3), scale=torch.ones(3), bits=4, signed=True, axis=1)
    args.update(kwargs)
    x, scale = args.pop("x"), args.pop("scale")
    with pytest.raises(error, match=match):
        gk.lsq_fake_quant(x, scale, **args)


def test_unavailable_backend_is_an_error():
    missing = [b for b in ("triton", "cuda") if b not in gk.available_backends()]
    if not torch.cuda.is_available():
        missing.append("cuda")
    for b in missing:
        with pytest.raises(ValueError, match="backend"):
            gk.lsq_fake_quant(torch.ones(3), torch.ones(1), bits=4, signed=True, backend=b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_devices_must_match():
    with pytest.raises(ValueError, match="scale"):
        gk.lsq_fake_quant(torch.ones(3, device="cuda"), torch.ones(1), bits=4, signed=True)


def test_available_backends_tell_the_truth():
    names = gk.available_backends()
    assert "reference" in names
    for name in names:
        device = "cuda" if name == "cuda" or (name == "triton" and torch.cuda.is_available()) else "cpu"
        y = gk.lsq_fake_quant(torch.ones(4, device=device), torch.ones(1, device=device), bits=4, signed=True,
                              backend=name)
        assert torch.equal(y.cpu(), torch.ones(4))


def test_an_extension_from_older_sources_is_not_used():
    """A stale gaqat_kernels._C (built before functions the Python side calls) would fail at the first call;
    the loader checks for everything it needs and treats a stale build as absent, saying what is missing."""
    assert extension._missing(object())[:2] == ["lsq_forward", "lsq_backward"]
    if extension.HAS_CPU:
        assert extension._missing(extension.MODULE) == [] and extension.LOAD_ERROR is None
