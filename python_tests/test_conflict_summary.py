"""benchmarks/experiments/conflict_summary.py reads what ConflictLog writes and counts frozen layers as stated."""
import json
import os
import sys

import pytest
import torch

from gaqat_kernels.algorithms.conflict import STAT_NAMES
from gaqat_kernels.algorithms.stats_log import ConflictLog

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "experiments"))
import conflict_summary  # noqa: E402


def write_log(run_dir, frozen_per_step, disorder_per_step):
    """Synthetic statistics (not from training), written by the training script's own ConflictLog."""
    log = ConflictLog(["a", "b", "c"], every=10)
    for k, (frozen, disorder) in enumerate(zip(frozen_per_step, disorder_per_step)):
        stats = torch.zeros(3, len(STAT_NAMES))
        stats[:, STAT_NAMES.index("conflict")] = torch.tensor([0.2, 0.4, 0.6])
        stats[:, STAT_NAMES.index("cosine")] = -0.5
        stats[:, STAT_NAMES.index("task_flips")] = 0.25
        stats[:, STAT_NAMES.index("smooth_flips")] = 0.75
        stats[:, STAT_NAMES.index("disorder")] = torch.tensor(disorder)
        log.record(10 * k, stats, torch.tensor(frozen))
    log.write_jsonl(os.path.join(run_dir, "conflict.jsonl"))


def test_counts_frozen_layers_from_the_first_freeze(tmp_path):
    write_log(tmp_path, [[False, False, False], [True, False, True], [True, True, True], [False, True, False]],
              [[0.1, 0.2, 0.3]] * 3 + [[0.45, 0.55, 0.65]])
    s = conflict_summary.summarize(str(tmp_path))
    assert (s["layers"], s["records"], s["first_freeze_step"], s["frozen_at_end"]) == (3, 4, 10, 1)
    assert s["mean_frozen_after_first"] == pytest.approx((2 + 3 + 1) / 3)
    assert s["disorder_end"] == pytest.approx((0.45, 0.65))
    assert s["conflict"] == pytest.approx(0.4)
    assert (s["cosine"], s["task_flips"], s["smooth_flips"]) == pytest.approx((-0.5, 0.25, 0.75))
    row = conflict_summary.table([s]).splitlines()[-1]
    assert "| 10 | 1 / 3 | 2.0 | 0.45-0.65 |" in row


def test_never_frozen(tmp_path):
    write_log(tmp_path, [[False] * 3] * 2, [[0.1, 0.2, 0.3]] * 2)
    s = conflict_summary.summarize(str(tmp_path))
    assert s["first_freeze_step"] is None and s["mean_frozen_after_first"] == 0.0
    assert "| never | 0 / 3 |" in conflict_summary.table([s])


def test_missing_log_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="conflict.jsonl"):
        conflict_summary.summarize(str(tmp_path))


def test_persistence_separates_a_stable_ranking_from_noise(tmp_path):
    """Layer c is always the most disordered and always frozen; a and b alternate, equal on average."""
    disorder = [[0.50, 0.52, 0.60], [0.52, 0.50, 0.61]] * 2 + [[0.52, 0.50, 0.60], [0.50, 0.52, 0.61]] * 2
    frozen = [[False, False, True]] * 8
    stable = tmp_path / "stable"
    stable.mkdir()
    write_log(stable, frozen, disorder)
    r = conflict_summary.persistence(str(stable))
    assert r["most_frozen"][0] == ("c", 1.0) and r["most_frozen"][1][1] == 0.0
    late_means = [0.51, 0.51, 0.605]
    m = sum(late_means) / 3
    assert r["between"] == pytest.approx((sum((v - m) ** 2 for v in late_means) / 3) ** 0.5)
    assert r["within"] == pytest.approx((0.01 + 0.01 + 0.005) / 3)
    assert r["cosine_between"] == pytest.approx(0.0) and r["cosine_within"] == pytest.approx(0.0)
    # ranks by mean D: a = b in both halves (order breaks the tie), c first: perfectly correlated
    assert r["rank_correlation"] == pytest.approx(1.0)
    row = conflict_summary.persistence_table([r]).splitlines()[-1]
    assert row.startswith("| stable | ") and "c (1.00)" in row
    with pytest.raises(ValueError, match="fewer than 2 records"):
        conflict_summary.persistence(str(stable), warmup_step=70)


def test_persistence_rank_correlation_of_a_reversed_ranking(tmp_path):
    disorder = [[0.1, 0.2, 0.3]] * 2 + [[0.3, 0.2, 0.1]] * 2
    write_log(tmp_path, [[False] * 3] * 4, disorder)
    assert conflict_summary.persistence(str(tmp_path))["rank_correlation"] == pytest.approx(-1.0)


def test_counts_files_merge_with_run_folders(tmp_path):
    """Seeds finished in different calls: a saved counts file and a fresh run folder land in one counts file."""
    first, second = tmp_path / "s0", tmp_path / "s1"
    first.mkdir()
    second.mkdir()
    write_log(first, [[True, False, False]] * 2, [[0.1, 0.2, 0.3]] * 2)
    write_log(second, [[True, True, False]] * 3, [[0.1, 0.2, 0.3]] * 3)
    saved = tmp_path / "s0_counts.json"
    conflict_summary.main([str(first), "--counts", str(saved)])
    merged = tmp_path / "merged.json"
    text = conflict_summary.main([str(saved), str(second), "--counts", str(merged)])
    counts = json.load(open(merged))
    assert set(counts["counts"]) == {"s0", "s1"}
    assert [r[1] for r in counts["counts"]["s0"]] == [1, 1] and [r[1] for r in counts["counts"]["s1"]] == [2, 2, 2]
    assert counts["layers"] == {"s0": 3, "s1": 3}
    rows = [line for line in text.splitlines() if line.startswith("| s")]
    assert len(rows) == 1 and rows[0].startswith("| s1 ")  # the table has rows for the fresh folders only


TASK = torch.tensor([1.0, 0.0, 2.0, 0.0, 1.0, 1.0], dtype=torch.float32)
SAM = torch.tensor([0.5, 0.5, -1.0, -0.5, 2.0, 2.0], dtype=torch.float32)


def write_tracked_run(run_dir, signal):
    """Stats of constructed vectors, computed by the tracker itself and logged as the training script does, with a
    results.json naming ``signal`` (None: a run from before the option, whose args lack it): layer a's SAM gradient
    is the task gradient rotated by 45 degrees (cosine(g_t, g_sam - g_t) is negative, yet the step agrees with the
    task), layer b's points against it, layer c's along it."""
    from gaqat_kernels.algorithms import ConflictTracker

    tracker = ConflictTracker([2, 2, 2], device="cpu", backend="reference", rule="absolute", threshold=10.0)
    log = ConflictLog(["a", "b", "c"], every=1)
    for step in range(3):
        tracker.update(TASK, SAM if signal == "step" else SAM - TASK)
        log.record(step, tracker.stats, torch.tensor([False, True, True]))
    log.write_jsonl(os.path.join(run_dir, "conflict.jsonl"))
    with open(os.path.join(run_dir, "results.json"), "w") as f:
        json.dump({"args": {} if signal is None else {"conflict_signal": signal}}, f)


def expected_sam_cosines():
    out = {}
    for k, name in enumerate("abc"):
        t, g = TASK[2 * k: 2 * k + 2].double(), SAM[2 * k: 2 * k + 2].double()
        out[name] = float(t @ g / (t.norm() * g.norm()))
    return out


def test_alignment_recovers_the_sam_gradient_cosine_from_the_tracker_statistics(tmp_path):
    write_tracked_run(tmp_path, None)
    records = conflict_summary.read_jsonl(os.path.join(tmp_path, "conflict.jsonl"))
    by_layer = {r["layer"]: r for r in records if r["step"] == 0}
    expected = expected_sam_cosines()
    for name in "abc":
        r = by_layer[name]
        assert conflict_summary.sam_task_cosine(r["cosine"], r["task_norm"], r["smooth_norm"]) == \
            pytest.approx(expected[name], abs=1e-6)
    assert by_layer["a"]["cosine"] < 0 < expected["a"]
    row = conflict_summary.alignment(str(tmp_path))
    assert row["signal"] == "smoothness" and row["records"] == 9
    assert row["opposed"] == pytest.approx(1 / 3)       # layer b
    assert row["opposed_frozen"] == pytest.approx(1 / 2)  # b and c frozen, b opposed
    assert row["sam_cosine"][1] == pytest.approx(expected["a"], abs=1e-6)
    assert "0.333 / 0.500" in conflict_summary.alignment_table([row])


def test_alignment_of_a_step_signal_run_matches_the_same_gradients_logged_as_smoothness(tmp_path):
    """A run with conflict_signal='step' logs (g_t, g_sam) statistics; the table must say the same about the same
    gradients as it does for a run that logged (g_t, g_s)."""
    step_dir, smooth_dir = tmp_path / "step", tmp_path / "smooth"
    step_dir.mkdir(), smooth_dir.mkdir()
    write_tracked_run(step_dir, "step")
    write_tracked_run(smooth_dir, "smoothness")
    step, smooth = conflict_summary.alignment(str(step_dir)), conflict_summary.alignment(str(smooth_dir))
    assert (step["signal"], smooth["signal"]) == ("step", "smoothness")
    for key in ("norm_ratio", "cosine", "opposed", "opposed_frozen"):
        assert step[key] == pytest.approx(smooth[key], abs=1e-5), key
    assert step["sam_cosine"] == pytest.approx(smooth["sam_cosine"], abs=1e-5)
    assert step["sam_cosine"][1] == pytest.approx(expected_sam_cosines()["a"], abs=1e-6)
    t, g = TASK[:2].double(), (SAM - TASK)[:2].double()
    cos_s, norm_s = conflict_summary.task_smooth_from_step(
        float(t @ (t + g) / (t.norm() * (t + g).norm())), float(t.norm()), float((t + g).norm()))
    assert (cos_s, norm_s) == pytest.approx((float(t @ g / (t.norm() * g.norm())), float(g.norm())), abs=1e-12)


def test_alignment_names_a_missing_results_file(tmp_path):
    write_tracked_run(tmp_path, "step")
    os.remove(os.path.join(tmp_path, "results.json"))
    with pytest.raises(FileNotFoundError, match="results.json"):
        conflict_summary.alignment(str(tmp_path))


def test_alignment_of_a_zero_task_gradient_is_zero():
    assert conflict_summary.sam_task_cosine(0.0, 0.0, 1.0) == 0.0
