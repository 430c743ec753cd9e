"""SAM against a hand-written two-pass SAM, and the task/smoothness gradient decomposition."""
import copy

import pytest
import torch
from torch import nn

from gaqat_kernels.algorithms import SAM


def model_and_data():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    return model, x, y


def loss_of(model, x, y):
    return nn.functional.cross_entropy(model(x), y)


def closure_for(opt, model, x, y):
    def closure():
        opt.zero_grad()
        loss = loss_of(model, x, y)
        loss.backward()
        return loss
    return closure


def manual_sam_step(model, x, y, rho, lr, adaptive):
    params = list(model.parameters())
    g = torch.autograd.grad(loss_of(model, x, y), params)
    scaled = [(p.abs() * gi if adaptive else gi) for p, gi in zip(params, g)]
    norm = torch.sqrt(sum((s * s).sum() for s in scaled))
    es = [rho * (p.abs() ** 2 if adaptive else 1) * gi / (norm + 1e-12) for p, gi in zip(params, g)]
    with torch.no_grad():
        for p, e in zip(params, es):
            p.add_(e)
    g_sam = torch.autograd.grad(loss_of(model, x, y), params)
    with torch.no_grad():
        for p, e, gs in zip(params, es, g_sam):
            p.sub_(e)
            p.sub_(lr * gs)
    return g, g_sam


@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
def test_matches_hand_written_two_pass_sam(adaptive):
    model, x, y = model_and_data()
    reference = copy.deepcopy(model)
    rho = 0.5 if adaptive else 0.05
    opt = SAM(model.parameters(), torch.optim.SGD, rho=rho, adaptive=adaptive, lr=0.1)
    for _ in range(3):
        opt.step(closure_for(opt, model, x, y))
        g_task, g_sam = manual_sam_step(reference, x, y, rho, 0.1, adaptive)
        task, smooth = opt.gradients(list(model.parameters()))
        for a, b in zip(task, g_task):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
        for a, b, c in zip(smooth, g_sam, g_task):
            torch.testing.assert_close(a, b - c, rtol=1e-5, atol=1e-7)
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_zero_rho_is_the_base_optimizer():
    model, x, y = model_and_data()
    plain = copy.deepcopy(model)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.0, lr=0.1)
    base = torch.optim.SGD(plain.parameters(), lr=0.1)
    opt.zero_grad(), loss_of(model, x, y).backward(), opt.first_step(zero_grad=True)
    loss_of(model, x, y).backward(), opt.second_step()
    base.zero_grad(), loss_of(plain, x, y).backward(), base.step()
    for p, q in zip(model.parameters(), plain.parameters()):
        torch.testing.assert_close(p, q)


def test_bad_arguments():
    params = [nn.Parameter(torch.ones(2))]
    with pytest.raises(ValueError, match="rho"):
        SAM(params, torch.optim.SGD, rho=-1.0, lr=0.1)
    with pytest.raises(TypeError, match="base_optimizer"):
        SAM(params, "sgd", lr=0.1)
    opt = SAM(params, torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="closure"):
        opt.step()
    with pytest.raises(ValueError, match="params"):
        opt.gradients(params)


def test_quantizer_scale_gradients_feed_segment_conflict():
    """The pieces GAQAT will join: SAM's task/smoothness split of every LSQ scale, reduced per layer."""
    import gaqat_kernels as gk
    from gaqat_kernels.nn import LSQQuantizer, quantize_model

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 3))
    quantize_model(model, 4, 4)
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    model(x)  # initialise the scales
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    opt.zero_grad()
    loss_of(model, x, y).backward()
    opt.first_step(zero_grad=True)
    loss_of(model, x, y).backward()
    scales = [m.scale for m in model.modules() if isinstance(m, LSQQuantizer)]
    task, smooth = opt.gradients(scales)
    opt.second_step()
    lengths = torch.tensor([t.numel() for t in task])
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    stats = gk.segment_conflict(torch.cat(task), torch.cat(smooth), offsets)
    assert stats.shape == (len(scales), 4) and torch.isfinite(stats).all()
    assert (stats[:, 2] > 0).all()  # every scale received a task gradient


def test_sagm_variant_matches_hand_written():
    model, x, y = model_and_data()
    reference = copy.deepcopy(model)
    rho, alpha, lr = 0.05, 0.01, 0.1
    opt = SAM(model.parameters(), torch.optim.SGD, rho=rho, alpha=alpha, lr=lr)
    for _ in range(3):
        opt.step(closure_for(opt, model, x, y))
        params = list(reference.parameters())
        g = torch.autograd.grad(loss_of(reference, x, y), params)
        norm = torch.sqrt(sum((gi * gi).sum() for gi in g))
        es = [(rho / (norm + 1e-12) - alpha) * gi for gi in g]
        with torch.no_grad():
            for p, e in zip(params, es):
                p.add_(e)
        g_pert = torch.autograd.grad(loss_of(reference, x, y), params)
        with torch.no_grad():
            for p, e, gi, gp in zip(params, es, g, g_pert):
                p.sub_(e)
                p.sub_(lr * 0.5 * (gi + gp))
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="alpha"):
        SAM(model.parameters(), torch.optim.SGD, alpha=-1.0, lr=0.1)
