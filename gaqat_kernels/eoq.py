"""``python -m gaqat_kernels.eoq RUN_DIR...``: EoQ (QT-DoG, ICML 2025), the ensemble of quantized models.

The runs must share dataset, algorithm (and its method arguments: ``report.algorithm_label``), test domain and
quantization, and differ in ``--seed`` (and may
differ in ``--trial-seed``: no member trained on any part of the test domain, so every split of it is unseen
by all). The ensemble averages the members' softmax probabilities on the first run's test domain: each
run's ``test_probs.pt`` (the selected model's predictions, written by the training script), or the
predictions of its selected model (``model.pt``, evaluated here on the data) for runs without one and for
MNIST-like runs of another ``--trial-seed`` (whose domains hold other images). Reports each model's
and the ensemble's accuracy on the test domain's 80% split under the first run's ``--trial-seed``
(DomainBed's test accuracy) and on all of it, and writes ``eoq.json`` into the first run's directory (or
``--out``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from types import SimpleNamespace
from typing import Dict, List, Optional

import torch

from .data import split_indices
from .models import build_model
from .report import algorithm_label
from .train import TEST_PROBS, TRIAL_SEEDED_DATASETS, accuracy, load_data, test_predictions, _quantize

_SAME = ("dataset", "algorithm", "test_domain", "arch", "w_bits", "a_bits", "max_per_domain", "image_size",
         "holdout_fraction")


def _saved_args(run_dir: str) -> Dict:
    """The training arguments of a finished run (results.json), else of its selected model (model.pt)."""
    results = os.path.join(run_dir, "results.json")
    if os.path.exists(results):
        with open(results) as f:
            saved = json.load(f)
        return dict(saved["args"], _quantized=saved["quantized"])
    model = os.path.join(run_dir, "model.pt")
    if not os.path.exists(model):
        raise FileNotFoundError(f"run dirs: {run_dir} has no results.json or model.pt (did the run finish?)")
    saved = torch.load(model, map_location="cpu", weights_only=False)
    return dict(saved["args"], _quantized=saved["unsigned"] is not None)


def _model_predictions(run_dir: str, dataset, test: int, device) -> Dict:
    """``test_predictions`` of a run's selected model, for runs that saved no predictions."""
    path = os.path.join(run_dir, "model.pt")
    if not os.path.exists(path):
        raise FileNotFoundError(f"run dirs: {run_dir} has neither {TEST_PROBS} nor model.pt")
    saved = torch.load(path, map_location=device, weights_only=False)
    model = build_model(saved["args"]["arch"], dataset.input_shape, dataset.num_classes).to(device)
    if saved["unsigned"] is not None:
        _quantize(model, SimpleNamespace(**saved["args"]), unsigned=saved["unsigned"])
    model.load_state_dict(saved["model"])
    return test_predictions(model, dataset, test, device)


def ensemble(run_dirs: List[str], device: Optional[str] = None) -> Dict:
    """Every run's selected model and their probability-averaged ensemble on the test domain."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    settings = [_saved_args(d) for d in run_dirs]
    first = settings[0]
    label = algorithm_label(first)
    for d, s in zip(run_dirs, settings):
        diff = [k for k in _SAME if s.get(k) != first.get(k)]
        if algorithm_label(s) != label:
            diff.append(f"the algorithm's arguments ({algorithm_label(s)} vs {label})")
        if diff:
            raise ValueError(f"run dirs: {d} differs from {run_dirs[0]} in {diff}; EoQ needs the same setting")
    # a run's saved predictions cover the first run's test examples unless the trial seed built other domains
    saved = [os.path.exists(os.path.join(d, TEST_PROBS)) and
             (s["dataset"] not in TRIAL_SEEDED_DATASETS or s["trial_seed"] == first["trial_seed"])
             for d, s in zip(run_dirs, settings)]
    args = SimpleNamespace(**first)
    args.demo = False
    if all(saved):
        args.augment_on_device = False  # labels only: no image is decoded
    dataset = load_data(args)
    test = dataset.domain_index(args.test_domain)
    predictions = [torch.load(os.path.join(d, TEST_PROBS), map_location="cpu") if use
                   else _model_predictions(d, dataset, test, device) for d, use in zip(run_dirs, saved)]
    labels = predictions[0]["labels"].long()  # int16 since the files carry them so, int64 before
    for d, p in zip(run_dirs, predictions):
        if not torch.equal(p["labels"].long(), labels):
            raise ValueError(f"run dirs: {d} predicted another test domain than {run_dirs[0]} (labels differ)")
    in_idx, _ = split_indices(len(labels), test, args.holdout_fraction, args.trial_seed)
    members = [{"run": d, "seed": s["seed"], "test_acc": accuracy(p["probs"][in_idx], labels[in_idx]),
                "test_acc_all": accuracy(p["probs"], labels)} for d, s, p in zip(run_dirs, settings, predictions)]
    mean = torch.stack([p["probs"] for p in predictions]).mean(0)
    setting = {k: first.get(k) for k in _SAME + ("trial_seed",)}
    setting["label"] = label
    return {"dataset": dataset.name, "domains": dataset.domain_names, "test_domain": test,
            "test_domain_name": dataset.domain_names[test], "quantized": first["_quantized"],
            "setting": setting, "members": members,
            "ensemble": {"test_acc": accuracy(mean[in_idx], labels[in_idx]), "test_acc_all": accuracy(mean, labels)}}


def main(argv=None) -> Dict:
    p = argparse.ArgumentParser(prog="gaqat-eoq", description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="finished run directories of one setting, different --seed")
    p.add_argument("--out", default=None, help="where to write eoq.json (default: the first run's directory)")
    p.add_argument("--device", default=None)
    args = p.parse_args(argv)
    result = ensemble(args.runs, args.device)
    out = args.out or args.runs[0]
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "eoq.json"), "w") as f:
        json.dump(result, f, indent=2)
    for m in result["members"]:
        print(f"seed {m['seed']}: test acc {100 * m['test_acc']:.1f}%")
    print(f"EoQ ({len(result['members'])} models): test acc {100 * result['ensemble']['test_acc']:.1f}%", file=sys.stdout)
    return result


if __name__ == "__main__":
    main()
