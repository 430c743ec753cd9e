"""ConflictTracker (the stateful conflict reduction): every backend against the functional reference over
several steps, the documented decisions on constructed gradients, and bad input."""
import math

import pytest
import torch

import gaqat_kernels as gk
from gaqat_kernels.algorithms import ConflictTracker
from gaqat_kernels.kernels.reference import conflict_update_reference, freeze_score


def tracker_backends():
    cuda = torch.cuda.is_available()
    out = [pytest.param("reference", "cpu", id="reference-cpu")]
    for name in ("triton", "cuda"):
        usable = name in gk.available_backends()
        marks = ([] if usable else [pytest.mark.skip(reason=f"{name} not available here")])
        marks += [pytest.mark.gpu] if cuda else []
        out.append(pytest.param(name, "cuda" if cuda else "cpu", id=f"{name}-{'cuda' if cuda else 'cpu'}", marks=marks))
    return out


def random_gradients(n, gen, flip_half=True):
    task = torch.randn(n, generator=gen)
    sign = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0) if flip_half else 1.0
    return task, torch.randn(n, generator=gen).abs() * sign * task.sign()


RULES = [
    pytest.param("absolute", 0.3, 0.0, id="absolute"),
    pytest.param("zscore", 0.5, 0.4, id="zscore"),
    pytest.param("ratio", 0.02, 0.03, id="ratio"),
]


def run_against_reference(lengths, backend, device, steps=4, **kwargs):
    gen = torch.Generator().manual_seed(sum(lengths) + len(lengths))
    tracker = ConflictTracker(lengths, device=device, backend=backend, **kwargs)
    offsets = torch.tensor([0] + lengths).cumsum(0)
    n, s = sum(lengths), len(lengths)
    signs, ema, step = torch.zeros(2, n, dtype=torch.int8), torch.zeros(s), torch.zeros(1, dtype=torch.int64)
    for _ in range(steps):
        task, smooth = random_gradients(n, gen)
        tracker.state.stats.fill_(float("nan"))  # poison: every entry must be written
        before = tracker.state.frozen.cpu().clone()
        frozen = tracker.update(task.to(device), smooth.to(device)).cpu()
        stats, ref_frozen, signs, ema = conflict_update_reference(
            task, smooth, offsets, signs, ema, step, before, decay=tracker.decay, flip_weight=tracker.flip_weight,
            threshold=tracker.threshold, warmup=tracker.warmup_steps, top_k=tracker.top_k, rule=tracker.rule,
            hysteresis=tracker.hysteresis)
        step += 1
        got = tracker.stats.cpu()
        for col in (0, 4, 5):  # counts over lengths: exact
            assert torch.equal(got[:, col], stats[:, col])
        torch.testing.assert_close(got, stats, rtol=2e-6, atol=1e-6)
        score = freeze_score(stats[:, 6], tracker.rule)
        bars = (tracker.threshold, tracker.threshold - tracker.hysteresis)
        decided = ((score - bars[0]).abs() > 1e-4) & ((score - bars[1]).abs() > 1e-4)  # far from both bars
        assert torch.equal(frozen[decided], ref_frozen[decided]) or tracker.top_k < s
        if tracker.top_k < s:
            assert int(frozen.sum()) <= tracker.top_k
        assert torch.equal(tracker.state.signs.cpu(), signs)
        assert int(tracker.state.step) == int(step) and int(tracker.state.counter) == 0
    return tracker


@pytest.mark.parametrize("backend,device", tracker_backends())
@pytest.mark.parametrize("lengths", [
    pytest.param([5], id="one"),
    pytest.param([0, 1, 0, 7, 1], id="empty-and-single"),
    pytest.param([3000, 2, 1025, 64], id="long"),
])
@pytest.mark.parametrize("max_frozen", [None, 1], ids=["no-limit", "top1"])
@pytest.mark.parametrize("rule,threshold,hysteresis", RULES)
def test_matches_reference(backend, device, lengths, max_frozen, rule, threshold, hysteresis):
    run_against_reference(lengths, backend, device, threshold=threshold, warmup_steps=1, max_frozen=max_frozen,
                          rule=rule, hysteresis=hysteresis)


@pytest.mark.parametrize("backend,device", tracker_backends())
def test_thousands_of_segments(backend, device):
    gen = torch.Generator().manual_seed(11)
    count = 2100 if device == "cuda" or backend == "reference" else 700  # the interpreter runs programs one by one
    lengths = torch.randint(0, 30, (count,), generator=gen).tolist()
    run_against_reference(lengths, backend, device, steps=2, threshold=0.3, max_frozen=500)
    run_against_reference(lengths, backend, device, steps=2, rule="zscore", threshold=0.5)


def gradients_with_conflict(fractions, length=20, device="cpu"):
    """task = 1 everywhere; in each layer the first round(f * length) smoothness gradients are -1, the rest +1:
    conflict fraction exactly f, cosine 1 - 2f, no flips from one step to the next."""
    smooth = torch.ones(len(fractions), length)
    for k, f in enumerate(fractions):
        smooth[k, :round(f * length)] = -1.0
    return torch.ones(len(fractions) * length, device=device), smooth.reshape(-1).to(device)


# With decay 0 and flip weight 0 the disorder is this step's conflict fraction, so each rule's score is known.
@pytest.mark.parametrize("backend,device", tracker_backends())
@pytest.mark.parametrize("rule,threshold,hysteresis", [
    pytest.param("zscore", 1.0, 0.5, id="zscore"),
    pytest.param("ratio", 0.5, 0.4, id="ratio"),
    pytest.param("absolute", 0.5, 0.2, id="absolute"),
])
def test_only_outliers_freeze_and_hysteresis_holds_them(backend, device, rule, threshold, hysteresis):
    tracker = ConflictTracker([20] * 8, device=device, backend=backend, rule=rule, threshold=threshold,
                              hysteresis=hysteresis, decay=0.0, flip_weight=0.0)
    # one outlier (z = sqrt(7), ratio 1.9, D = 0.8): exactly it freezes
    assert tracker.update(*gradients_with_conflict([0.2] * 7 + [0.8], device=device)).cpu().tolist() == [False] * 7 + [True]
    # five layers at one level (z = 0.77, ratio 0.23, D = 0.4): between both bars, so only the frozen one stays
    step2 = tracker.update(*gradients_with_conflict([0.2] * 3 + [0.4] * 5, device=device)).cpu().tolist()
    assert step2 == [False] * 7 + [True]
    # it falls below the thawing bar (z = -sqrt(7), ratio -0.15, D = 0.25), the others stay under the entry bar
    assert not tracker.update(*gradients_with_conflict([0.3] * 7 + [0.25], device=device)).cpu().any()


@pytest.mark.parametrize("backend,device", tracker_backends())
@pytest.mark.parametrize("rule", ["zscore", "ratio"])
def test_uniform_model_freezes_none(backend, device, rule):
    # every layer has disorder 1/3 (lengths 3, 6, 9, 12: the fractions round to the same float), any bar >= 0
    lengths = [3, 6, 9, 12]
    tracker = ConflictTracker(lengths, device=device, backend=backend, rule=rule, threshold=0.0, decay=0.9)
    task = torch.ones(sum(lengths), device=device)
    smooth = torch.cat([torch.tensor([-1.0] * (n // 3) + [1.0] * (n - n // 3)) for n in lengths]).to(device)
    for _ in range(5):
        assert not tracker.update(task, smooth).cpu().any()
    assert len(set(tracker.stats[:, 6].tolist())) == 1


@pytest.mark.parametrize("backend,device", tracker_backends())
def test_constructed_decisions(backend, device):
    # layer 0: task and smoothness gradients opposite everywhere; layer 1: they agree; layer 2: zeros.
    tracker = ConflictTracker([4, 3, 2], device=device, backend=backend, threshold=0.4, decay=0.9)
    task = torch.tensor([1.0, -2.0, 3.0, 0.5, 1.0, -1.0, 2.0, 0.0, 0.0], device=device)
    smooth = torch.tensor([-1.0, 1.0, -1.0, -2.0, 2.0, -3.0, 1.0, 0.0, 0.0], device=device)
    frozen = tracker.update(task, smooth).cpu()
    assert frozen.tolist() == [True, False, False]
    stats = tracker.stats.cpu()
    assert stats[:, 0].tolist() == [1.0, 0.0, 0.0]
    assert stats[0, 1].item() < -0.5 and stats[1, 1].item() > 0.5
    assert stats[0, 6].item() == pytest.approx(0.5, abs=1e-6)  # (1 - 0.5) * 1 + 0.5 * 0 flips, bias-corrected
    # next step both gradients of layer 0 flip sign and still conflict: disorder rises to 1
    frozen = tracker.update(-task, -smooth).cpu()
    assert frozen.tolist() == [True, False, False]
    assert tracker.stats[0, 4].item() == 1.0 and tracker.stats[0, 5].item() == 1.0
    m = 0.9 * (0.1 * 0.5) + 0.1 * 1.0
    assert tracker.stats[0, 6].item() == pytest.approx(m / (1 - 0.9 ** 2), abs=1e-5)
    # agreement from now on: layer 0 thaws once its disorder falls to the threshold or below
    thawed_at = None
    for k in range(30):
        frozen = tracker.update(task.abs(), task.abs()).cpu()
        if not frozen[0]:
            thawed_at = k
            break
    assert thawed_at is not None and 0 < thawed_at < 30


@pytest.mark.parametrize("backend,device", tracker_backends())
def test_warmup_and_top_k(backend, device):
    tracker = ConflictTracker([2, 2, 2], device=device, backend=backend, threshold=0.1, warmup_steps=2,
                              max_frozen=1, flip_weight=0.0)
    task = torch.ones(6, device=device)
    smooth = torch.tensor([-1.0, -1.0, -1.0, 1.0, -1.0, 1.0], device=device)  # conflict 1, 0.5, 0.5
    assert tracker.update(task, smooth).cpu().tolist() == [False, False, False]  # warm-up
    assert tracker.update(task, smooth).cpu().tolist() == [False, False, False]
    assert tracker.update(task, smooth).cpu().tolist() == [True, False, False]  # only the most disordered
    smooth2 = torch.tensor([1.0, 1.0, -1.0, -1.0, -1.0, 1.0], device=device)  # layers 1, 2 tie ahead of 0
    for _ in range(40):
        frozen = tracker.update(task, smooth2).cpu()
    assert frozen.tolist() == [False, True, False]  # tie: the earlier layer ranks first


@pytest.mark.parametrize("backend,device", tracker_backends())
def test_nan_stays_in_its_layer(backend, device):
    tracker = ConflictTracker([3, 2], device=device, backend=backend, threshold=0.4)
    task = torch.tensor([1.0, float("nan"), -1.0, 1.0, 1.0], device=device)
    smooth = torch.tensor([-1.0, 1.0, 1.0, 1.0, 1.0], device=device)
    tracker.update(task, smooth)
    stats = tracker.stats.cpu()
    assert stats[0, 0].item() == pytest.approx(2 / 3) and math.isnan(stats[0, 2].item())
    assert math.isfinite(stats[0, 6].item())  # the disorder (and so the decision) stays finite
    assert stats[1].tolist()[:4] == [0.0, pytest.approx(1.0), pytest.approx(math.sqrt(2)), pytest.approx(math.sqrt(2))]


def test_state_dict_round_trip():
    gen = torch.Generator().manual_seed(5)
    a = ConflictTracker([4, 5], backend="reference", threshold=0.2)
    for _ in range(3):
        a.update(*random_gradients(9, gen))
    b = ConflictTracker([4, 5], backend="reference", threshold=0.2)
    b.load_state_dict(a.state_dict())
    task, smooth = random_gradients(9, gen)
    assert torch.equal(a.update(task, smooth), b.update(task, smooth)) and torch.equal(a.stats, b.stats)
    with pytest.raises(ValueError, match="ema"):
        ConflictTracker([4, 5, 0]).load_state_dict(a.state_dict())  # same elements, one more layer


@pytest.mark.parametrize("kwargs,match", [
    (dict(sizes=[3, -1]), "sizes"),
    (dict(decay=1.0), "decay"),
    (dict(flip_weight=1.5), "flip_weight"),
    (dict(threshold=float("nan")), "threshold"),
    (dict(rule="median"), "rule"),
    (dict(rule="zscore", hysteresis=-0.1), "hysteresis"),
    (dict(warmup_steps=-1), "warmup_steps"),
    (dict(max_frozen=-2), "max_frozen"),
])
def test_bad_arguments(kwargs, match):
    args = dict(sizes=[3, 2])
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        ConflictTracker(args.pop("sizes"), **args)


def test_bad_gradients():
    tracker = ConflictTracker([3, 2], backend="reference")
    with pytest.raises(ValueError, match="task"):
        tracker.update(torch.zeros(4), torch.zeros(5))
    with pytest.raises(ValueError, match="smooth"):
        tracker.update(torch.zeros(5), torch.zeros(5, dtype=torch.float64))
    with pytest.raises(ValueError, match="backend"):
        ConflictTracker([3, 2], backend="tpu").update(torch.zeros(5), torch.zeros(5))
