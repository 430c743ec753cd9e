"""Runs of one algorithm with other method arguments (a GAQAT threshold, a freezing cap) are another method:
report.algorithm_label names them, and the table, EoQ and the sweep's ensembles keep them apart."""
import json
import os
import sys

import pytest

from gaqat_kernels import eoq, report
from gaqat_kernels.train import parse_args

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "experiments"))
import sweep_dg  # noqa: E402


def args_of(*argv):
    return vars(parse_args(list(argv)))


@pytest.mark.parametrize("argv, label", [
    (["--algorithm", "gaqat"], "gaqat"),
    (["--algorithm", "gaqat", "--gaqat-max-frozen-fraction", "0.25"], "gaqat (gaqat_max_frozen_fraction=0.25)"),
    (["--algorithm", "gaqat", "--max-frozen-fraction", "0.5"], "gaqat"),  # FQAT's cap: GAQAT does not use it
    (["--algorithm", "gaqat", "--threshold", "0.57", "--rho", "0.1"], "gaqat (rho=0.1, threshold=0.57)"),
    (["--algorithm", "fqat"], "fqat"),
    (["--algorithm", "fqat", "--gaqat-max-frozen-fraction", "0.5"], "fqat"),
    (["--algorithm", "fqat", "--max-frozen-fraction", "0.5"], "fqat (max_frozen_fraction=0.5)"),
    (["--algorithm", "gaqat", "--freeze-rule", "ratio"], "gaqat (freeze_rule=ratio)"),
    (["--algorithm", "gaqat", "--freeze-rule", "absolute", "--threshold", "0.6"],
     "gaqat (freeze_rule=absolute, threshold=0.6)"),
    (["--algorithm", "gaqat", "--threshold", "1.5", "--hysteresis", "0.2"], "gaqat (threshold=1.5, hysteresis=0.2)"),
    (["--algorithm", "lsq_sam", "--rho", "0.1"], "lsq_sam (rho=0.1)"),
    (["--algorithm", "fqat", "--freeze-mode", "gradient"], "fqat (freeze_mode=gradient)"),
    (["--algorithm", "gaqat", "--freeze-mode", "task"], "gaqat (freeze_mode=task)"),
    (["--algorithm", "gaqat", "--conflict-signal", "step"], "gaqat (conflict_signal=step)"),
    (["--algorithm", "fqat", "--conflict-signal", "step"], "fqat (conflict_signal=step)"),
    (["--algorithm", "lsq_sam", "--conflict-signal", "step"], "lsq_sam"),  # no tracker in LSQ+SAM
    (["--algorithm", "lsq", "--rho", "0.1", "--threshold", "0.9"], "lsq"),  # neither argument matters to LSQ
], ids=lambda v: v if isinstance(v, str) else None)
def test_algorithm_label(argv, label):
    assert report.algorithm_label(args_of(*argv)) == label


def test_older_runs_without_the_arguments_count_as_defaults():
    # before --freeze-rule every run used the absolute bar 0.5 without hysteresis; before --freeze-mode,
    # freezing zeroed the gradient only
    assert report.algorithm_label({"algorithm": "gaqat"}) == "gaqat (freeze_rule=absolute, freeze_mode=gradient)"
    assert report.algorithm_label({"algorithm": "gaqat", "threshold": 0.57}) == \
        "gaqat (freeze_rule=absolute, threshold=0.57, freeze_mode=gradient)"
    assert report.algorithm_label({"algorithm": "gaqat", "freeze_rule": "zscore", "threshold": 1.0}) == \
        "gaqat (freeze_mode=gradient)"
    assert report.algorithm_label({"algorithm": "gaqat", "freeze_rule": "zscore", "threshold": 1.0,
                                   "freeze_mode": "update"}) == "gaqat"
    # a run that names the default signal shares the default's row (one lacking it is the case just above)
    assert report.algorithm_label({"algorithm": "gaqat", "freeze_rule": "zscore", "threshold": 1.0,
                                   "freeze_mode": "update", "conflict_signal": "smoothness"}) == "gaqat"
    # runs before --gaqat-max-frozen-fraction recorded FQAT's cap for GAQAT too, which GAQAT never used
    assert report.algorithm_label({"algorithm": "gaqat", "max_frozen_fraction": 0.25}) == \
        "gaqat (freeze_rule=absolute, freeze_mode=gradient)"


def row(args, domain, acc):
    return {"dataset": "D", "domains": ["a", "b"], "test_domain": domain, "quantized": True, "test_acc": acc,
            "args": dict(args, seed=0, trial_seed=0)}


def test_table_gives_variants_their_own_rows():
    plain = args_of("--algorithm", "gaqat")
    capped = args_of("--algorithm", "gaqat", "--gaqat-max-frozen-fraction", "0.25")
    rows = [row(plain, 0, 0.5), row(plain, 1, 0.7), row(capped, 0, 0.6), row(capped, 1, 0.8)]
    lines = report.table(rows).splitlines()
    assert "| gaqat | W4A4 | 50.0 ± 0.0 | 70.0 ± 0.0 | 60.0 ± 0.0 | 1 |" in lines
    assert "| gaqat (gaqat_max_frozen_fraction=0.25) | W4A4 | 60.0 ± 0.0 | 80.0 ± 0.0 | 70.0 ± 0.0 | 1 |" in lines


def write_run(path, args, quantized=True):
    """A run folder with only results.json (synthetic: no training), enough for EoQ's setting check."""
    os.makedirs(path)
    with open(os.path.join(path, "results.json"), "w") as f:
        json.dump({"args": args, "quantized": quantized, "test_acc": 0.5, "dataset": "digits"}, f)
    return str(path)


def test_eoq_refuses_to_ensemble_variants(tmp_path):
    a = write_run(tmp_path / "s0", dict(args_of("--dataset", "digits", "--algorithm", "gaqat"), seed=0))
    b = write_run(tmp_path / "s1", dict(args_of("--dataset", "digits", "--algorithm", "gaqat", "--threshold", "0.6"),
                                        seed=1))
    with pytest.raises(ValueError, match=r"algorithm's arguments \(gaqat \(threshold=0.6\) vs gaqat\)"):
        eoq.ensemble([a, b], "cpu")


def test_sweep_ensembles_group_by_variant(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(eoq, "main", lambda argv: calls.append(argv))
    suite = tmp_path / "pacs_w4"
    rows = []
    cap = ["--gaqat-max-frozen-fraction", "0.25"]
    for tag, extra, seed in [("plain_s0", [], 0), ("plain_s1", [], 1), ("cap_s0", cap, 0)]:
        args = dict(args_of("--dataset", "PACS", "--algorithm", "gaqat", *extra), seed=seed)
        rows.append({"args": args, "quantized": True, "test_domain": 0, "_path": str(suite / tag / "results.json")})
    sweep_dg.ensembles([str(suite)], rows)
    plain = [str(suite / "plain_s0"), str(suite / "plain_s1"), "--out", str(suite / "eoq" / "PACS_gaqat_4_4_0")]
    assert calls == [plain]
    rows.append(dict(rows[2], args=dict(rows[2]["args"], seed=1), _path=str(suite / "cap_s1" / "results.json")))
    sweep_dg.ensembles([str(suite)], rows)
    assert calls[-1][-1] == str(suite / "eoq" / "PACS_gaqat_gaqat_max_frozen_fraction=0.25_4_4_0")
