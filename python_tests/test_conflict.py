"""segment_conflict: per-segment conflict statistics against the float64 oracle, edge cases and errors."""
import math

import pytest
import torch

import gaqat_kernels as gk
from gaqat_kernels.kernels.reference import segment_conflict_reference


def conflict_backends():
    out = [pytest.param("reference", "cpu", id="reference-cpu")]
    cuda = torch.cuda.is_available()
    usable = "triton" in gk.available_backends()
    marks = [] if usable else [pytest.mark.skip(reason="triton not available here")]
    out.append(pytest.param("triton", "cuda" if cuda else "cpu", id=f"triton-{'cuda' if cuda else 'cpu'}",
                            marks=marks + ([pytest.mark.gpu] if cuda else [])))
    return out


def make_segments(lengths, device, gen, zero_segments=()):
    offsets = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0).tolist()), dtype=torch.int64)
    n = int(offsets[-1])
    task = torch.randn(n, generator=gen)
    smooth = torch.randn(n, generator=gen) + 0.3 * task  # correlated, so cosines are not all ~0
    for k in zero_segments:
        task[offsets[k]:offsets[k + 1]] = 0
    return task.to(device), smooth.to(device), offsets.to(device)


def check(task, smooth, offsets, backend):
    out = gk.segment_conflict(task, smooth, offsets, backend=backend)
    ref = segment_conflict_reference(task.double().cpu(), smooth.double().cpu(), offsets.cpu())
    assert out.dtype == torch.float32 and out.shape == (offsets.numel() - 1, 4)
    assert torch.equal(out[:, 0].double().cpu(), ref[:, 0].float().double())  # counts are exact
    torch.testing.assert_close(out[:, 1:].double().cpu(), ref[:, 1:], rtol=1e-5, atol=1e-6)
    return out


@pytest.mark.parametrize("backend,device", conflict_backends())
@pytest.mark.parametrize(
    "lengths",
    [
        pytest.param([5], id="one-segment"),
        pytest.param([0, 1, 0, 7, 1], id="empty-and-single"),
        pytest.param([3000, 2, 1025], id="long-segments"),
        pytest.param([0], id="only-empty"),
    ],
)
def test_matches_oracle(backend, device, lengths):
    gen = torch.Generator().manual_seed(len(lengths))
    check(*make_segments(lengths, device, gen), backend)


@pytest.mark.parametrize("backend,device", conflict_backends())
def test_thousands_of_segments(backend, device):
    gen = torch.Generator().manual_seed(7)
    lengths = torch.randint(0, 40, (2500,), generator=gen).tolist()
    check(*make_segments(lengths, device, gen), backend)


@pytest.mark.parametrize("backend,device", conflict_backends())
def test_known_values_zeros_and_nan(backend, device):
    task = torch.tensor([1.0, -1.0, 2.0, 0.0, 0.0, 3.0, float("nan")], device=device)
    smooth = torch.tensor([1.0, 1.0, -2.0, 5.0, -1.0, 4.0, 1.0], device=device)
    offsets = torch.tensor([0, 3, 5, 5, 7], device=device)
    out = gk.segment_conflict(task, smooth, offsets, backend=backend).cpu()
    assert out[0, 0].item() == pytest.approx(2 / 3)
    assert out[0, 1].item() == pytest.approx(-4 / 6)
    assert out[0, 2].item() == pytest.approx(math.sqrt(6)) and out[0, 3].item() == pytest.approx(math.sqrt(6))
    assert out[1].tolist() == [0.0, 0.0, 0.0, pytest.approx(math.sqrt(26))]  # zero task: cosine 0
    assert out[2].tolist() == [0.0, 0.0, 0.0, 0.0]  # empty segment
    assert out[3, 0].item() == 0.0 and torch.isnan(out[3, 1:3]).all()  # NaN stays in its segment
    assert out[3, 3].item() == pytest.approx(math.sqrt(17))


@pytest.mark.parametrize("backend,device", conflict_backends())
def test_deterministic(backend, device):
    gen = torch.Generator().manual_seed(3)
    args = make_segments([4000, 17, 900], device, gen)
    a, b = (gk.segment_conflict(*args, backend=backend) for _ in range(2))
    assert torch.equal(a, b)


def test_compile_fullgraph():
    gen = torch.Generator().manual_seed(4)
    task, smooth, offsets = make_segments([3, 0, 9], "cpu", gen)
    f = torch.compile(lambda a, b, o: gk.segment_conflict(a, b, o, backend="reference") * 1.0, fullgraph=True,
                      backend="aot_eager")
    assert torch.equal(f(task, smooth, offsets), gk.segment_conflict(task, smooth, offsets, backend="reference"))


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(smooth=torch.zeros(5)), ValueError, "smooth"),
        (dict(task=torch.zeros(6, dtype=torch.float16)), TypeError, "task"),
        (dict(task=torch.zeros(2, 3), smooth=torch.zeros(2, 3)), ValueError, "task"),
        (dict(offsets=torch.tensor([0, 6], dtype=torch.int32)), TypeError, "offsets"),
        (dict(offsets=torch.tensor([1, 6])), ValueError, "offsets"),
        (dict(offsets=torch.tensor([0, 5])), ValueError, "offsets"),
        (dict(offsets=torch.tensor([0, 4, 2, 6])), ValueError, "non-decreasing"),
        (dict(backend="cuda"), ValueError, "backend"),
    ],
)
def test_bad_input_names_the_argument(kwargs, error, match):
    args = dict(task=torch.zeros(6), smooth=torch.zeros(6), offsets=torch.tensor([0, 2, 6]), backend="reference")
    args.update(kwargs)
    with pytest.raises(error, match=match):
        gk.segment_conflict(args.pop("task"), args.pop("smooth"), args.pop("offsets"), **args)
