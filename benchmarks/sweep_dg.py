"""Leave-one-domain-out sweeps of the training script on one GPU, several runs at a time.

    python benchmarks/sweep_dg.py --suite rmnist_erm --data-root .data/mnist --out runs/sweep [--parallel 6]

Suites (every test domain; ``--seeds`` sets both --seed and --trial-seed, as DomainBed's trials):
  rmnist_erm, cmnist_erm   FP ERM with DomainBed's CNN and recipe (5001 steps, Adam 1e-3, batch 64/domain)
  rmnist_w4, rmnist_w3     {FP SAM, LSQ, LSQ+SAM, GAQAT, FQAT} at W4A4 / W3A3 on RotatedMNIST
  pacs_w4, pacs_w3         the same on PACS (128 px) with EfficientNet-Lite0 ImageNet weights
A run whose results.json exists is skipped, and unfinished runs continue from their checkpoint, so a sweep
cut off by a time limit resumes where it stopped. Ends with the report table (``gaqat_kernels.report``)
written to ``--out/table.md``.
"""
from __future__ import annotations

import argparse
import itertools
import os
import subprocess
import sys
import time

SUITES = {
    "rmnist_erm": ("RotatedMNIST", 6, [("erm", None)]),
    "cmnist_erm": ("ColoredMNIST", 3, [("erm", None)]),
    "rmnist_w4": ("RotatedMNIST", 6, [("sam", None), ("lsq", 4), ("lsq_sam", 4), ("gaqat", 4), ("fqat", 4)]),
    "rmnist_w3": ("RotatedMNIST", 6, [("lsq", 3), ("lsq_sam", 3), ("gaqat", 3), ("fqat", 3)]),
    "pacs_w4": ("PACS", 4, [("erm", None), ("sam", None), ("lsq", 4), ("lsq_sam", 4), ("gaqat", 4), ("fqat", 4)]),
    "pacs_w3": ("PACS", 4, [("lsq", 3), ("lsq_sam", 3), ("gaqat", 3), ("fqat", 3)]),
}


def commands(suite: str, args) -> list:
    dataset, n_domains, algorithms = SUITES[suite]
    out = []
    tests = range(n_domains) if args.test_domains is None else [t for t in args.test_domains if t < n_domains]
    for (algorithm, bits), test, seed in itertools.product(algorithms, tests, args.seeds):
        tag = f"{dataset}_{algorithm}_{'fp' if bits is None else f'w{bits}a{bits}'}_t{test}_s{seed}"
        cmd = [sys.executable, "-m", "gaqat_kernels.train", "--dataset", dataset, "--data-root", args.data_root,
               "--test-domain", str(test), "--algorithm", algorithm, "--seed", str(seed), "--trial-seed", str(seed),
               "--steps", str(args.steps), "--out", os.path.join(args.out, suite, tag), "--resume", "--no-progress"]
        if bits is not None:
            cmd += ["--w-bits", str(bits), "--a-bits", str(bits)]
        if dataset == "PACS":
            cmd += ["--arch", "efficientnet_lite0", "--pretrained", args.pretrained, "--image-size", "128"]
        cmd += args.extra
        out.append((tag, os.path.join(args.out, suite, tag), cmd))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--suite", nargs="+", required=True, choices=sorted(SUITES))
    p.add_argument("--data-root", required=True)
    p.add_argument("--pretrained", default="auto", help="EfficientNet-Lite0 checkpoint for the PACS suites")
    p.add_argument("--out", default="runs/sweep")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=5001)
    p.add_argument("--test-domains", type=int, nargs="+", default=None, help="only these test domains")
    p.add_argument("--parallel", type=int, default=6)
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more training-script arguments")
    args = p.parse_args()
    todo = [c for s in args.suite for c in commands(s, args)
            if not os.path.exists(os.path.join(c[1], "results.json"))]
    print(f"sweep: {len(todo)} runs to do", flush=True)
    running, start = [], time.time()
    while todo or running:
        while todo and len(running) < args.parallel:
            tag, out, cmd = todo.pop(0)
            os.makedirs(out, exist_ok=True)
            log = open(os.path.join(out, "stdout.txt"), "a")
            env = dict(os.environ, OMP_NUM_THREADS="1")  # many runs share the host's cores
            running.append((tag, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log))
        for item in list(running):
            tag, proc, log = item
            if proc.poll() is not None:
                log.close()
                running.remove(item)
                print(f"[{time.time() - start:6.0f} s] {tag}: exit {proc.returncode}", flush=True)
        time.sleep(0.5)
    from gaqat_kernels import report

    table = report.table(report.find_results([os.path.join(args.out, s) for s in args.suite]))
    with open(os.path.join(args.out, "table.md"), "a") as f:
        f.write(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
