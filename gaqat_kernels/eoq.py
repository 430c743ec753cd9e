"""``python -m gaqat_kernels.eoq RUN_DIR...``: EoQ (QT-DoG, ICML 2025), the ensemble of quantized models.

The runs must share dataset, algorithm, test domain and quantization, and differ in ``--seed`` (and may
differ in ``--trial-seed``: no member trained on any part of the test domain, so every split of it is unseen
by all). Each run's selected model (``model.pt``) predicts the test domain; the ensemble averages their
softmax probabilities. Reports each model's and the ensemble's accuracy on the test domain's 80% split under
the first run's ``--trial-seed`` (DomainBed's test accuracy) and on all of it, and writes ``eoq.json`` into
the first run's directory (or ``--out``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from types import SimpleNamespace
from typing import Dict, List

import torch

from .models import build_model
from .train import accuracy, labels_of, load_data, predict, _quantize

_SAME = ("dataset", "algorithm", "test_domain", "arch", "w_bits", "a_bits", "max_per_domain", "image_size",
         "holdout_fraction")


def ensemble(run_dirs: List[str], device=None) -> Dict:
    """Evaluate every run's selected model and their probability-averaged ensemble on the test domain."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    saved = []
    for d in run_dirs:
        path = os.path.join(d, "model.pt")
        if not os.path.exists(path):
            raise FileNotFoundError(f"run dirs: {d} has no model.pt (did the run finish?)")
        saved.append(torch.load(path, map_location=device, weights_only=False))
    first = saved[0]["args"]
    for d, s in zip(run_dirs, saved):
        diff = [k for k in _SAME if s["args"].get(k) != first.get(k)]
        if diff:
            raise ValueError(f"run dirs: {d} differs from {run_dirs[0]} in {diff}; EoQ needs the same setting")
    args = SimpleNamespace(**first)
    args.demo = False
    dataset = load_data(args)
    test = dataset.domain_index(args.test_domain)
    split_in, split_out = dataset.split(test, args.holdout_fraction, args.trial_seed)
    y_in, y_out = labels_of(split_in), labels_of(split_out)
    members, p_in, p_out = [], [], []
    for d, s in zip(run_dirs, saved):
        model = build_model(args.arch, dataset.input_shape, dataset.num_classes).to(device)
        if s["unsigned"] is not None:
            _quantize(model, SimpleNamespace(**s["args"]), unsigned=s["unsigned"])
        model.load_state_dict(s["model"])
        a, b = predict(model, split_in, device), predict(model, split_out, device)
        p_in.append(a)
        p_out.append(b)
        members.append({"run": d, "seed": s["args"]["seed"], "test_acc": accuracy(a, y_in),
                        "test_acc_all": accuracy(torch.cat([a, b]), torch.cat([y_in, y_out]))})
    mean_in, mean_out = torch.stack(p_in).mean(0), torch.stack(p_out).mean(0)
    setting = {k: first.get(k) for k in _SAME + ("trial_seed",)}
    return {"dataset": dataset.name, "domains": dataset.domain_names, "test_domain": test,
            "test_domain_name": dataset.domain_names[test], "quantized": saved[0]["unsigned"] is not None,
            "setting": setting, "members": members,
            "ensemble": {"test_acc": accuracy(mean_in, y_in),
                         "test_acc_all": accuracy(torch.cat([mean_in, mean_out]), torch.cat([y_in, y_out]))}}


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
