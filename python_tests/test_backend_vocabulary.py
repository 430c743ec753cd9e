"""One backend vocabulary: every public op and the tracker take every name ``available_backends()`` lists
(and "auto"), and give the reference's values for it."""
import pytest
import torch

import gaqat_kernels as gk
from gaqat_kernels.algorithms import ConflictTracker
from gaqat_kernels.kernels.reference import segment_conflict_reference


def device_for(backend):
    """Where a backend runs: cuda on CUDA tensors; triton on them too when a GPU exists (else interpreted)."""
    if backend == "cuda" or (backend in ("triton", "auto") and torch.cuda.is_available()):
        return "cuda"
    return "cpu"


BACKENDS = [pytest.param(b, id=b, marks=[pytest.mark.gpu] if device_for(b) == "cuda" else [])
            for b in ["auto"] + gk.available_backends()]


def conflict_inputs(device):
    gen = torch.Generator().manual_seed(3)
    task, smooth = torch.randn(50, generator=gen), torch.randn(50, generator=gen)
    return task.to(device), smooth.to(device), torch.tensor([0, 7, 7, 31, 50], device=device)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lsq_fake_quant_takes_every_listed_backend(backend):
    device = device_for(backend)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, 9, generator=gen).to(device).requires_grad_()
    scale = torch.full((6,), 0.1, device=device, requires_grad=True)
    y = gk.lsq_fake_quant(x, scale, bits=4, signed=True, axis=0, backend=backend)
    y.sum().backward()
    x_ref = x.detach().double().requires_grad_()
    s_ref = scale.detach().double().requires_grad_()
    y_ref = gk.lsq_fake_quant(x_ref, s_ref, bits=4, signed=True, axis=0, backend="reference")
    y_ref.sum().backward()
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(scale.grad.double(), s_ref.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_segment_conflict_takes_every_listed_backend(backend):
    task, smooth, offsets = conflict_inputs(device_for(backend))
    got = gk.segment_conflict(task, smooth, offsets, backend=backend).cpu()
    torch.testing.assert_close(got, segment_conflict_reference(task.cpu(), smooth.cpu(), offsets.cpu()),
                               rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tracker_takes_every_listed_backend(backend):
    device = device_for(backend)
    task, smooth, _ = conflict_inputs(device)
    tracker = ConflictTracker([7, 0, 24, 19], device=device, backend=backend, rule="zscore", threshold=0.5)
    reference = ConflictTracker([7, 0, 24, 19], backend="reference", rule="zscore", threshold=0.5)
    for sign in (1.0, -1.0, 1.0):
        frozen = tracker.update(task * sign, smooth).cpu()
        assert torch.equal(frozen, reference.update(task.cpu() * sign, smooth.cpu()))
        torch.testing.assert_close(tracker.stats.cpu(), reference.stats, rtol=2e-6, atol=1e-6)


def test_unknown_backend_names_the_choices():
    task, smooth, offsets = conflict_inputs("cpu")
    with pytest.raises(ValueError, match="backend.*'tpu'"):
        gk.segment_conflict(task, smooth, offsets, backend="tpu")
    with pytest.raises(ValueError, match="backend.*'tpu'"):
        gk.lsq_fake_quant(task, torch.tensor(0.1), bits=4, signed=True, backend="tpu")
