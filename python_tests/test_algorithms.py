"""GAQAT / FQAT / SAM / ERM training-step objects: freezing decisions on constructed gradients, equivalences,
logging, state dicts, and (GPU) whole training steps without a host synchronisation."""
import copy

import pytest
import torch
from torch import nn

from gaqat_kernels.algorithms import ALGORITHMS, FQAT, GAQAT, SAMTraining, build_algorithm
from gaqat_kernels.nn import layer_scales, quantize_model, quantized_layers


def small_model(device="cpu", conv=False):
    torch.manual_seed(0)
    if conv:
        model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                              nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                              nn.Linear(8, 4))
    else:
        model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    quantize_model(model, 4, 4, keep_first_last=False)
    return model.to(device)


def batch(device="cpu", conv=False):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(16, 3, 8, 8, generator=gen) if conv else torch.randn(16, 6, generator=gen)
    return x.to(device), torch.randint(0, 4 if conv else 3, (16,), generator=gen).to(device)


def closure_for(model, x, y):
    def closure():
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss
    return closure


def set_constructed_gradients(alg, conflicting):
    """Task gradient +1 on every scale and weight; the SAM gradient agrees (+2) except in ``conflicting``."""
    for k, (_, module) in enumerate(quantized_layers(alg.model)):
        for p in module.parameters():
            alg.sam.state[p]["task_grad"] = torch.ones_like(p)
            p.grad = torch.full_like(p, -1.0 if k in conflicting else 2.0)  # smooth = -2 or +1


@pytest.mark.parametrize("cls", [GAQAT, FQAT], ids=["gaqat", "fqat"])
def test_conflicting_layer_is_frozen_agreeing_ones_are_not(cls):
    model = small_model()
    kwargs = dict(max_frozen_fraction=0.34) if cls is FQAT else {}
    alg = cls(model, lr=0.1, rule="absolute", threshold=0.4, **kwargs)
    set_constructed_gradients(alg, conflicting={1})
    alg.between_passes()
    assert alg.tracker.state.frozen.tolist() == [False, True, False]
    for k, (_, module) in enumerate(quantized_layers(model)):
        for s in layer_scales(module):
            assert torch.all(s.grad == (0.0 if k == 1 else 2.0))
        expected_weight = 0.0 if (k == 1 and cls is FQAT) else (-1.0 if k == 1 else 2.0)
        assert torch.all(module.weight.grad == expected_weight), (cls.name, k)


@pytest.mark.parametrize("cls", [GAQAT, FQAT], ids=["gaqat", "fqat"])
def test_task_mode_steps_frozen_layers_on_their_task_gradient(cls):
    """freeze_mode="task": the frozen layer's gradients become g(w) exactly (GAQAT: its scales; FQAT: all of its
    parameters); every other gradient stays SAM's g(w + e), bit for bit."""
    model = small_model()
    kwargs = dict(max_frozen_fraction=0.34) if cls is FQAT else {}
    alg = cls(model, lr=0.1, rule="absolute", threshold=0.4, freeze_mode="task", **kwargs)
    gen = torch.Generator().manual_seed(7)
    expected = {}
    for k, (_, module) in enumerate(quantized_layers(model)):
        for p in module.parameters():
            task = torch.randn(p.shape, generator=gen)
            alg.sam.state[p]["task_grad"] = task
            # layer 1's SAM gradient points against its task gradient (the conflict), the others' along it
            p.grad = (-1.0 if k == 1 else 2.0) * task + 1e-3 * torch.randn(p.shape, generator=gen)
            replaced = k == 1 and (cls is FQAT or any(p is s for s in layer_scales(module)))
            expected[p] = (task if replaced else p.grad).clone()
    alg.between_passes()
    assert alg.tracker.state.frozen.tolist() == [False, True, False]
    for p, value in expected.items():
        assert torch.equal(p.grad, value)


@pytest.mark.parametrize("cls", [GAQAT, FQAT], ids=["gaqat", "fqat"])
def test_step_signal_freezes_only_where_sams_gradient_opposes_the_task(cls):
    """Every layer's smoothness gradient opposes the task (task +1, SAM's gradient +0.5, so smooth = -0.5) except
    that layer 1's SAM gradient does too (-1): the smoothness signal freezes every layer, the step signal only
    layer 1, and its logged cosine is that of the task and SAM gradients."""
    frozen = {}
    for signal in ("smoothness", "step"):
        model = small_model()
        kwargs = dict(max_frozen_fraction=1.0) if cls is FQAT else {}
        alg = cls(model, lr=0.1, rule="absolute", threshold=0.4, conflict_signal=signal, **kwargs)
        gen = torch.Generator().manual_seed(5)
        for k, (_, module) in enumerate(quantized_layers(model)):
            for p in module.parameters():
                task = 1.0 + 0.1 * torch.rand(p.shape, generator=gen)
                alg.sam.state[p]["task_grad"] = task
                p.grad = (-1.0 if k == 1 else 0.5) * task + 0.01 * torch.rand(p.shape, generator=gen)
        expected_cosine = []
        for _, module in quantized_layers(model):
            t = torch.cat([alg.sam.state[s]["task_grad"].double().reshape(-1) for s in layer_scales(module)])
            g = torch.cat([s.grad.double().reshape(-1) for s in layer_scales(module)])
            other = g - t if signal == "smoothness" else g
            expected_cosine.append(float(t @ other / (t.norm() * other.norm())))
        alg.between_passes()
        frozen[signal] = alg.tracker.state.frozen.tolist()
        cosine = alg.tracker.stats[:, 1].double()
        torch.testing.assert_close(cosine, torch.tensor(expected_cosine, dtype=torch.float64), rtol=1e-5, atol=1e-6)
    assert frozen == {"smoothness": [True, True, True], "step": [False, True, False]}


def test_conflict_signal_is_checked():
    with pytest.raises(ValueError, match="conflict_signal"):
        GAQAT(small_model(), lr=0.1, conflict_signal="sam")


def pcgrad_reference(grads, tasks):
    """float64 PCGrad of one layer's gradient vector (its tensors together) against its task gradient."""
    g = torch.cat([x.double().reshape(-1) for x in grads])
    t = torch.cat([x.double().reshape(-1) for x in tasks])
    coef = min(0.0, float(g @ t)) / float(t @ t)
    return [x.double() - coef * y.double() for x, y in zip(grads, tasks)]


@pytest.mark.parametrize("cls", [GAQAT, FQAT], ids=["gaqat", "fqat"])
@pytest.mark.parametrize("agree", [False, True], ids=["conflicting", "agreeing"])
def test_project_mode_removes_the_conflicting_component(cls, agree):
    """freeze_mode="project": a frozen layer's SAM gradient (GAQAT: over its scales; FQAT: over all of its
    parameters, as one vector) loses its component along the task gradient when they point apart, and is then
    orthogonal to it; a frozen layer whose gradients agree, and every layer not frozen, keeps SAM's bit for bit."""
    model = small_model()
    kwargs = dict(max_frozen_fraction=0.34) if cls is FQAT else {}
    alg = cls(model, lr=0.1, rule="absolute", threshold=0.4, freeze_mode="project", **kwargs)
    gen = torch.Generator().manual_seed(11)
    expected, frozen_params = {}, []
    for k, (_, module) in enumerate(quantized_layers(model)):
        params = [p for p in module.parameters() if cls is FQAT or any(p is s for s in layer_scales(module))]
        for p in module.parameters():
            task = torch.randn(p.shape, generator=gen)
            alg.sam.state[p]["task_grad"] = task
            # layer 1's smoothness gradient points against the task (the tracker freezes it); its SAM gradient
            # g = task + smooth agrees with the task overall in the "agreeing" case, opposes it otherwise
            along = (0.3 if agree else -0.7) if k == 1 else 2.0
            p.grad = along * task + 0.2 * torch.randn(p.shape, generator=gen)
            expected[p] = p.grad.clone()
        if k == 1:
            frozen_params = params
    grads, tasks = [p.grad.clone() for p in frozen_params], [alg.sam.state[p]["task_grad"] for p in frozen_params]
    dot = float(sum((g.double() * t.double()).sum() for g, t in zip(grads, tasks)))
    assert (dot > 0) == agree
    for p, value in zip(frozen_params, pcgrad_reference(grads, tasks)):
        expected[p] = value
    alg.between_passes()
    assert alg.tracker.state.frozen.tolist() == [False, True, False]
    for p, value in expected.items():
        if agree or not any(p is q for q in frozen_params):
            assert torch.equal(p.grad, value.to(p.grad.dtype))
        else:
            torch.testing.assert_close(p.grad.double(), value, rtol=1e-5, atol=1e-6)
    if not agree:
        after = sum((p.grad.double() * alg.sam.state[p]["task_grad"].double()).sum() for p in frozen_params)
        assert abs(float(after)) < 1e-5 * abs(dot)


def test_project_mode_without_frozen_layers_is_sam():
    """No layer frozen (the absolute bar above every disorder): project mode steps exactly as update mode does."""
    x, y = batch()
    results = []
    for mode in ("update", "project"):
        model = small_model()
        alg = GAQAT(model, lr=0.1, rule="absolute", threshold=10.0, freeze_mode=mode)
        for _ in range(2):
            alg.step(closure_for(model, x, y))
        assert not alg.tracker.state.frozen.any()
        results.append(copy.deepcopy(model.state_dict()))
    for key in results[0]:
        assert torch.equal(results[0][key], results[1][key]), key


def test_task_mode_moves_frozen_scales_by_the_task_gradient():
    """Every layer frozen from the first step: the scales move (unlike update mode), by SGD on g(w)."""
    x, y = batch()
    model = small_model()
    model(x)
    alg = GAQAT(model, lr=0.1, rule="absolute", threshold=-1.0, freeze_mode="task")
    scales = [s for _, m in quantized_layers(model) for s in layer_scales(m)]
    before = [s.detach().clone() for s in scales]
    captured = {}
    original = alg.sam.second_step

    def second_step(*args, **kwargs):  # the gradients the update uses, after between_passes
        captured.update({id(s): (s.grad.clone(), alg.sam.state[s]["task_grad"].clone()) for s in scales})
        return original(*args, **kwargs)

    alg.sam.second_step = second_step
    alg.step(closure_for(model, x, y))
    assert alg.tracker.state.frozen.all()
    for s, b in zip(scales, before):
        grad, task = captured[id(s)]
        assert torch.equal(grad, task)
        torch.testing.assert_close(s.detach(), b - 0.1 * task, rtol=1e-6, atol=1e-9)
    assert any(not torch.equal(s, b) for s, b in zip(scales, before))


@pytest.mark.parametrize("cls", [GAQAT, FQAT], ids=["gaqat", "fqat"])
def test_max_frozen_fraction_limits_the_number_of_frozen_layers(cls):
    model = small_model()
    alg = cls(model, lr=0.1, rule="absolute", threshold=0.4, max_frozen_fraction=0.34)
    set_constructed_gradients(alg, conflicting={0, 1, 2})
    alg.between_passes()
    assert alg.tracker.state.frozen.tolist() == [True, False, False]  # equal disorder: the earliest layer
    for k, (_, module) in enumerate(quantized_layers(model)):
        for s in layer_scales(module):
            assert torch.all(s.grad == (0.0 if k == 0 else -1.0))


def test_absolute_rule_freezes_every_conflicting_layer_the_default_rule_only_outliers():
    alg = GAQAT(small_model(), lr=0.1, rule="absolute", threshold=0.4)
    set_constructed_gradients(alg, conflicting={0, 1, 2})
    alg.between_passes()
    assert alg.tracker.state.frozen.tolist() == [True, True, True]
    for conflicting, expected in (({0, 1, 2}, [False] * 3), ({2}, [False, False, True])):
        alg = GAQAT(small_model(), lr=0.1)  # zscore: the layer(s) a standard deviation above the mean
        assert alg.tracker.rule == "zscore"
        set_constructed_gradients(alg, conflicting=conflicting)
        alg.between_passes()
        assert alg.tracker.state.frozen.tolist() == expected


def test_never_freezing_gaqat_is_sam():
    x, y = batch()
    a, b = small_model(), small_model()
    gaqat = GAQAT(a, lr=0.1, momentum=0.9, rho=0.05, rule="absolute", threshold=2.0)  # disorder <= 1: never frozen
    sam = SAMTraining(b, lr=0.1, momentum=0.9, rho=0.05)
    for _ in range(3):
        la, lb = gaqat.step(closure_for(a, x, y)), sam.step(closure_for(b, x, y))
        assert torch.equal(la, lb)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


OPTIMIZERS = {"sgd": (torch.optim.SGD, dict(lr=0.1)),
              "sgd_momentum_decay": (torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=0.01)),
              "adam": (torch.optim.Adam, dict(lr=1e-2)),
              "adamw": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1))}


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
@pytest.mark.parametrize("cls", [GAQAT, FQAT], ids=["gaqat", "fqat"])
def test_always_frozen_parameters_do_not_move(cls, optimizer):
    x, y = batch()
    model = small_model()
    model(x)  # initialise the step sizes first, so that freezing is visible against that state
    kwargs = dict(max_frozen_fraction=1.0) if cls is FQAT else {}
    base, opt_kwargs = OPTIMIZERS[optimizer]
    alg = cls(model, base_optimizer=base, rule="absolute", threshold=-1.0, warmup_steps=2, **kwargs, **opt_kwargs)
    for _ in range(2):  # warm-up steps: everything moves, and the optimizer has momentum to carry on with
        alg.step(closure_for(model, x, y))
    before = copy.deepcopy(model)
    state_before = copy.deepcopy(alg.sam.base_optimizer.state_dict())
    for _ in range(2):
        alg.step(closure_for(model, x, y))
    for (_, m), (_, m0) in zip(quantized_layers(model), quantized_layers(before)):
        for s, s0 in zip(layer_scales(m), layer_scales(m0)):
            assert torch.equal(s, s0)
        assert torch.equal(m.weight, m0.weight) == (cls is FQAT)
    # the frozen parameters' moments / momentum buffers too (their shape's state; Adam's step count goes on)
    state = alg.sam.base_optimizer.state_dict()["state"]
    frozen_ids = {id(p) for _, m in quantized_layers(model)
                  for p in (m.parameters() if cls is FQAT else layer_scales(m))}
    params = [p for g in alg.sam.base_optimizer.param_groups for p in g["params"]]
    held = 0
    for index, p in enumerate(params):
        for key, value in state.get(index, {}).items():
            if id(p) in frozen_ids and torch.is_tensor(value) and value.shape == p.shape:
                assert torch.equal(value, state_before["state"][index][key]), (index, key)
                held += 1
    assert held == (0 if optimizer == "sgd" else len(frozen_ids) * (2 if optimizer.startswith("adam") else 1))


def test_gradient_mode_under_adam_still_moves_frozen_scales():
    """Zeroing the gradient does not freeze under Adam: its first moment keeps moving the scale."""
    x, y = batch()
    model = small_model()
    model(x)
    alg = GAQAT(model, base_optimizer=torch.optim.Adam, lr=1e-2, rule="absolute", threshold=-1.0, warmup_steps=2,
                freeze_mode="gradient")
    for _ in range(2):
        alg.step(closure_for(model, x, y))
    before = [s.detach().clone() for _, m in quantized_layers(model) for s in layer_scales(m)]
    alg.step(closure_for(model, x, y))
    after = [s for _, m in quantized_layers(model) for s in layer_scales(m)]
    assert any(not torch.equal(a, b) for a, b in zip(after, before))
    with pytest.raises(ValueError, match="freeze_mode"):
        GAQAT(small_model(), lr=0.1, freeze_mode="weights")


@pytest.mark.parametrize("optimizer", ["adam", "sgd_momentum_decay"])
def test_held_update_restores_exactly_the_masked_layers(optimizer):
    from gaqat_kernels.algorithms.freezing import HeldUpdate

    def setup():
        torch.manual_seed(3)
        # a scalar too: its state tensors include Adam's step counter, of the same shape ()
        layers = [[nn.Parameter(torch.randn(5, 3)), nn.Parameter(torch.randn(5)), nn.Parameter(torch.randn(()))]
                  for _ in range(3)]
        base, kwargs = OPTIMIZERS[optimizer]
        opt = base([p for ps in layers for p in ps], **kwargs)
        return layers, opt

    def step(layers, opt, seed):
        gen = torch.Generator().manual_seed(seed)
        for ps in layers:
            for p in ps:
                p.grad = torch.randn(p.shape, generator=gen)
        opt.step()

    held_layers, held_opt = setup()
    plain_layers, plain_opt = setup()
    held = HeldUpdate(held_layers, held_opt)
    frozen = torch.tensor([False, True, False])
    # first step: the optimizer's state does not exist before it; the parameter is held, the new state kept
    before = [p.detach().clone() for p in held_layers[1]]
    held.snapshot(frozen)
    step(held_layers, held_opt, 0)
    held.restore()
    assert all(torch.equal(p, b) for p, b in zip(held_layers[1], before))
    step(plain_layers, plain_opt, 0)
    for k in (0, 2):
        assert all(torch.equal(p, q) for p, q in zip(held_layers[k], plain_layers[k]))
    # later steps: the frozen layer's state is held too, bit for bit; the others step exactly as without holding
    for seed in (1, 2):
        state_before = {id(p): {key: v.clone() for key, v in held_opt.state[p].items() if torch.is_tensor(v)}
                        for p in held_layers[1]}
        values_before = [p.detach().clone() for p in held_layers[1]]
        held.snapshot(frozen)
        step(held_layers, held_opt, seed)
        held.restore()
        step(plain_layers, plain_opt, seed)
        for p, q, b in zip(held_layers[1], plain_layers[1], values_before):
            assert torch.equal(p, b)
            for key, v in held_opt.state[p].items():
                if key == "step":  # never held: counts on as for every parameter
                    assert torch.equal(v, plain_opt.state[q][key])
                elif torch.is_tensor(v) and v.shape == p.shape:
                    assert torch.equal(v, state_before[id(p)][key]), key
        for k in (0, 2):
            for p, q in zip(held_layers[k], plain_layers[k]):
                assert torch.equal(p, q)
                for key, v in held_opt.state[p].items():
                    if torch.is_tensor(v) and v.shape == p.shape:
                        assert torch.equal(v, plain_opt.state[q][key]), key


def test_held_update_rejects_a_mask_that_is_not_one_bool_per_layer():
    from gaqat_kernels.algorithms.freezing import HeldUpdate
    layers = [[nn.Parameter(torch.randn(3))] for _ in range(3)]
    held = HeldUpdate(layers, torch.optim.SGD([p for ps in layers for p in ps], lr=0.1))
    for bad in (torch.zeros(2, dtype=torch.bool), torch.zeros(3), torch.zeros(1, 3, dtype=torch.bool)):
        with pytest.raises(ValueError, match=r"frozen: expected a bool tensor of shape \(3,\)"):
            held.snapshot(bad)
    held.snapshot(torch.zeros(3, dtype=torch.bool))


def test_build_algorithm_by_name_and_errors():
    for name in ALGORITHMS:
        alg = build_algorithm(name, small_model(), lr=0.1, rho=0.05)
        assert alg.name == ("sam" if name == "sagm" else name)
        x, y = batch()
        assert torch.isfinite(alg.step(closure_for(alg.model, x, y)))
    assert build_algorithm("sagm", small_model(), lr=0.1).sam.alpha == 0.001
    with pytest.raises(ValueError, match="name"):
        build_algorithm("adam", small_model())
    with pytest.raises(ValueError, match="quantize_model"):
        GAQAT(nn.Linear(3, 2), lr=0.1)
    with pytest.raises(ValueError, match="max_frozen_fraction"):
        FQAT(small_model(), lr=0.1, max_frozen_fraction=2)
    with pytest.raises(ValueError, match="max_frozen_fraction"):
        GAQAT(small_model(), lr=0.1, max_frozen_fraction=-0.5)


def test_statistics_are_logged_every_n_steps(tmp_path):
    x, y = batch()
    model = small_model()
    alg = GAQAT(model, lr=0.1, log_every=2)
    for _ in range(5):
        alg.step(closure_for(model, x, y))
    rows = alg.log.records()
    assert sorted({r["step"] for r in rows}) == [0, 2, 4]
    assert {r["layer"] for r in rows} == set(alg.layer_names)
    assert {"conflict", "cosine", "disorder", "frozen"} <= set(rows[0])
    path = tmp_path / "conflict.jsonl"
    alg.log.write_jsonl(str(path))
    assert len(path.read_text().splitlines()) == len(rows)


def test_state_dict_resumes_identically():
    x, y = batch()
    a = small_model()
    alg = GAQAT(a, lr=0.1, momentum=0.9, rule="absolute", threshold=0.3)
    for _ in range(2):
        alg.step(closure_for(a, x, y))
    b = copy.deepcopy(a)
    resumed = GAQAT(b, lr=0.1, momentum=0.9, rule="absolute", threshold=0.3)
    resumed.load_state_dict(copy.deepcopy(alg.state_dict()))
    for _ in range(2):
        alg.step(closure_for(a, x, y))
        resumed.step(closure_for(b, x, y))
    assert torch.equal(alg.tracker.state.frozen, resumed.tracker.state.frozen)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["gaqat", "fqat"])
@pytest.mark.parametrize("tracker_backend", ["triton", "cuda"])
@pytest.mark.parametrize("freeze_mode, signal", [("update", "smoothness"), ("task", "smoothness"),
                                                 ("project", "smoothness"), ("update", "step")])
def test_training_steps_never_synchronise(name, tracker_backend, freeze_mode, signal):
    from gaqat_kernels import available_backends

    if tracker_backend not in available_backends():
        pytest.skip(f"{tracker_backend} not available")
    model = small_model("cuda", conv=True)
    x, y = batch("cuda", conv=True)
    alg = build_algorithm(name, model, lr=0.05, momentum=0.9, rule="absolute", threshold=0.2, log_every=1,
                          backend=tracker_backend, freeze_mode=freeze_mode, conflict_signal=signal)
    alg.step(closure_for(model, x, y))  # first step: lazy initialisation, Triton compilation, allocator warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            loss = alg.step(closure_for(model, x, y))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(loss)
    assert len(alg.log.records()) == 4 * len(alg.layer_names)


def test_one_argument_set_serves_every_algorithm():
    for name in ALGORITHMS:
        build_algorithm(name, small_model(), lr=0.1, rho=0.05, rule="absolute", threshold=0.3, warmup_steps=2, log_every=1,
                        max_frozen_fraction=0.5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name, optimizer, freeze_mode, signal", [
    ("erm", "sgd", None, None), ("sam", "adam", None, None),
    ("gaqat", "sgd", "update", "smoothness"), ("fqat", "adam", "update", "smoothness"),
    ("gaqat", "adam", "task", "smoothness"), ("fqat", "sgd", "task", "smoothness"),
    ("gaqat", "adam", "project", "smoothness"), ("fqat", "sgd", "project", "smoothness"),
    ("gaqat", "adam", "update", "step"), ("fqat", "sgd", "project", "step")])
def test_cuda_graph_steps_equal_eager_steps(name, optimizer, freeze_mode, signal, monkeypatch):
    """CUDAGraphStep replays the same kernels: the weights after 6 steps (3 eager, 1 captured, 2 replayed)
    equal 6 eager steps; every replay is a real step (counter, logging)."""
    from gaqat_kernels.algorithms import CUDAGraphStep

    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    gen = torch.Generator().manual_seed(5)
    batches = [(torch.randn(16, 3, 8, 8, generator=gen).cuda(), torch.randint(0, 4, (16,), generator=gen).cuda())
               for _ in range(6)]
    runs = []
    for graphed in (False, True):
        model = small_model("cuda", conv=True)
        kwargs = dict(lr=0.05, momentum=0.9) if optimizer == "sgd" else dict(lr=1e-3, capturable=True)
        base = torch.optim.SGD if optimizer == "sgd" else torch.optim.Adam
        if freeze_mode is not None:
            kwargs.update(freeze_mode=freeze_mode, conflict_signal=signal)
        alg = build_algorithm(name, model, base_optimizer=base, rule="absolute", threshold=0.2, log_every=1, **kwargs)
        step = CUDAGraphStep(alg, lambda x, y: nn.functional.cross_entropy(model(x), y))
        losses = []
        for x, y in batches:
            loss = step(x, y) if graphed else alg.step(closure_for(model, x, y))
            losses.append(float(loss))
        runs.append((losses, copy.deepcopy(model.state_dict()), alg))
    (l0, s0, a0), (l1, s1, a1) = runs
    assert a1.steps == a0.steps == 6
    torch.testing.assert_close(torch.tensor(l1), torch.tensor(l0), rtol=1e-6, atol=1e-6)
    for key in s0:
        torch.testing.assert_close(s1[key], s0[key], rtol=1e-5, atol=1e-6, msg=key)
    if name in ("gaqat", "fqat"):
        assert len(a1.log.records()) == len(a0.log.records()) == 6 * len(a0.layer_names)


def test_cuda_graph_step_needs_cuda_and_a_capturable_optimizer():
    from gaqat_kernels.algorithms import CUDAGraphStep

    model = small_model()
    alg = build_algorithm("erm", model, base_optimizer=torch.optim.SGD, lr=0.1)
    step = CUDAGraphStep(alg, lambda x, y: nn.functional.cross_entropy(model(x), y))
    with pytest.raises(ValueError, match="x: CUDA graphs need CUDA tensors"):
        step(*batch())
    adam = build_algorithm("sam", model, base_optimizer=torch.optim.Adam, lr=0.1)
    with pytest.raises(ValueError, match="capturable=True"):
        CUDAGraphStep(adam, lambda x, y: None)
    with pytest.raises(ValueError, match="warmup"):
        CUDAGraphStep(alg, lambda x, y: None, warmup=0)
