"""benchmarks/experiments/merge_sweep.py: a device call's finished runs land once in the tables' folder and in the carried
folder, repeats and unfinished runs apart, and the carried folder can be rebuilt from the tables' folder."""
import json
import os
import sys
import tarfile

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "experiments"))
import merge_sweep  # noqa: E402


def make_run(root, suite, tag, files, acc=0.5):
    path = root / "runs" / "pacs" / suite / tag
    path.mkdir(parents=True)
    for name in files:
        (path / name).write_text(json.dumps({"tag": tag, "file": name, "acc": acc}))


def call_tar(tmp_path, name, runs, acc=0.5):
    """A tar as sweep_gpu.sh writes it: ``runs/pacs/<suite>/<tag>/...``."""
    root = tmp_path / name
    for suite, tag, files in runs:
        make_run(root, suite, tag, files, acc)
    tar_path = tmp_path / f"{name}.tar.gz"
    with tarfile.open(tar_path, "w:gz") as tar:
        tar.add(root / "runs", arcname="runs")
    return str(tar_path)


FINISHED = ["results.json", "log.jsonl", "test_probs.pt", "conflict.jsonl", "stdout.txt"]


def test_merge_places_new_runs_repeats_and_unfinished(tmp_path):
    results, carry, full = tmp_path / "results", tmp_path / "carry", tmp_path / "full"
    first = call_tar(tmp_path, "call1", [("pacs_w4", "PACS_gaqat_w4a4_t0_s0", FINISHED),
                                         ("pacs_w3", "PACS_lsq_w3a3_t1_s0", ["log.jsonl"]),  # cut at the deadline
                                         ("pacs_w4", "PACS_erm_fp_t0_s0", ["results.json"])])  # carried in
    summary = merge_sweep.main([first, "--results", str(results), "--carry", str(carry), "--full", str(full)])
    assert summary == {"new": ["PACS_gaqat_w4a4_t0_s0"], "merged": [], "repeats": [],
                       "unfinished": ["PACS_lsq_w3a3_t1_s0"]}
    assert sorted(os.listdir(results / "PACS_gaqat_w4a4_t0_s0")) == sorted(merge_sweep.KEPT)
    assert os.listdir(carry / "pacs_w4" / "PACS_gaqat_w4a4_t0_s0") == ["results.json"]
    assert sorted(os.listdir(full / "pacs_w4" / "PACS_gaqat_w4a4_t0_s0")) == sorted(FINISHED)
    assert not (results / "PACS_lsq_w3a3_t1_s0").exists() and not (results / "PACS_erm_fp_t0_s0").exists()

    kept = (results / "PACS_gaqat_w4a4_t0_s0" / "results.json").read_text()
    # a later call of the same warm machine returns the finished run unchanged: nothing to merge
    second = call_tar(tmp_path, "call2", [("pacs_w4", "PACS_gaqat_w4a4_t0_s0", FINISHED)])
    summary = merge_sweep.main([second, "--results", str(results), "--carry", str(carry)])
    assert summary["merged"] == ["PACS_gaqat_w4a4_t0_s0"] and not summary["repeats"] and not summary["new"]
    assert not (tmp_path / "results_repeats").exists()

    third = call_tar(tmp_path, "call3", [("pacs_w4", "PACS_gaqat_w4a4_t0_s0", FINISHED)], acc=0.6)  # run again
    summary = merge_sweep.main([third, "--results", str(results), "--carry", str(carry)])
    assert summary["repeats"] == ["PACS_gaqat_w4a4_t0_s0"] and not summary["new"]
    assert (results / "PACS_gaqat_w4a4_t0_s0" / "results.json").read_text() == kept  # the first result stays
    assert (tmp_path / "results_repeats" / "PACS_gaqat_w4a4_t0_s0.json").exists()


def test_merge_reads_a_tar_split_into_parts(tmp_path):
    """sweep_gpu.sh splits a tar too large to come back in one file (``split -b``): ``X.part-aa`` names them all."""
    whole = call_tar(tmp_path, "call1", [("pacs_w3", f"PACS_gaqat_w3a3_t{t}_s0", FINISHED) for t in range(3)])
    data = open(whole, "rb").read()
    os.remove(whole)
    cut = [0, len(data) // 3, 2 * len(data) // 3, len(data)]
    for suffix, lo, hi in zip(["aa", "ab", "ac"], cut, cut[1:]):
        (tmp_path / f"call1.tar.gz.part-{suffix}").write_bytes(data[lo:hi])
    summary = merge_sweep.main([str(tmp_path / "call1.tar.gz.part-aa"), "--results", str(tmp_path / "results"),
                                "--carry", str(tmp_path / "carry")])
    assert summary["new"] == [f"PACS_gaqat_w3a3_t{t}_s0" for t in range(3)]


def test_rebuild_carry_from_results(tmp_path):
    results = tmp_path / "results"
    for tag in ["PACS_erm_fp_t3_s1", "PACS_lsq_sam_w4a4_t0_s0", "PACS_fqat_w3a3_t2_s2"]:
        (results / tag).mkdir(parents=True)
        (results / tag / "results.json").write_text(json.dumps({"tag": tag}))
    (results / "logs").mkdir()  # the calls' logs live beside the runs
    summary = merge_sweep.main(["--results", str(results), "--carry", str(tmp_path / "carry")])
    assert summary == {"carried": ["PACS_erm_fp_t3_s1", "PACS_fqat_w3a3_t2_s2", "PACS_lsq_sam_w4a4_t0_s0"]}
    for suite, tag in [("pacs_w4", "PACS_erm_fp_t3_s1"), ("pacs_w4", "PACS_lsq_sam_w4a4_t0_s0"),
                       ("pacs_w3", "PACS_fqat_w3a3_t2_s2")]:
        assert json.loads((tmp_path / "carry" / suite / tag / "results.json").read_text()) == {"tag": tag}


@pytest.mark.parametrize("tag,suite", [("RotatedMNIST_erm_fp_t5_s2", "rmnist_erm"),
                                       ("RotatedMNIST_sam_fp_t0_s0", "rmnist_w4"),
                                       ("ColoredMNIST_erm_fp_t1_s0", "cmnist_erm"),
                                       ("PACS_lsq_sam_w3a3_t0_s1", "pacs_w3")])
def test_suite_of(tag, suite):
    assert merge_sweep.suite_of(tag) == suite


@pytest.mark.parametrize("tag", ["PACS_sam_w3a3_t0_s0", "PACS_gaqat_t0_s0", "logs"])
def test_suite_of_rejects_settings_no_suite_runs(tag):
    with pytest.raises(ValueError, match="no sweep_dg.py suite"):
        merge_sweep.suite_of(tag)


def test_merge_ensembles_the_seeds_of_new_runs(tmp_path):
    """Two seeds of a quantized setting, finished in different calls, are ensembled (EoQ) from their saved
    predictions once both are merged."""
    from gaqat_kernels import train

    results, carry = tmp_path / "results", tmp_path / "carry"
    tars = []
    for seed in (0, 1):
        root = tmp_path / f"call{seed}"
        out = root / "runs" / "pacs" / "pacs_w4" / f"digits_lsq_w4a4_t1_s{seed}"
        train.main(["--dataset", "digits", "--algorithm", "lsq", "--steps", "2", "--checkpoint-freq", "2",
                    "--batch-size", "8", "--seed", str(seed), "--test-domain", "1", "--no-progress", "--device",
                    "cpu", "--out", str(out)])
        tars.append(str(tmp_path / f"call{seed}.tar.gz"))
        with tarfile.open(tars[-1], "w:gz") as tar:
            tar.add(root / "runs", arcname="runs")
    merge_sweep.main([tars[0], "--results", str(results), "--carry", str(carry)])
    assert not (results / "eoq").exists()  # one seed: nothing to ensemble
    merge_sweep.main([tars[1], "--results", str(results), "--carry", str(carry)])
    ensemble = json.loads((results / "eoq" / "digits_lsq_4_4_1" / "eoq.json").read_text())
    assert [m["seed"] for m in ensemble["members"]] == [0, 1] and 0 <= ensemble["ensemble"]["test_acc"] <= 1
