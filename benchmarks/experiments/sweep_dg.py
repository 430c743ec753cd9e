"""Leave-one-domain-out sweeps of the training script on one GPU, several runs at a time.

    python benchmarks/experiments/sweep_dg.py --suite rmnist_erm --data-root .data/mnist --out runs/sweep [--parallel 6]

Suites (every test domain; ``--seeds`` sets both --seed and --trial-seed, as DomainBed's trials):
  rmnist_erm, cmnist_erm   FP ERM with DomainBed's CNN and recipe (5001 steps, Adam 1e-3, batch 64/domain)
  rmnist_w4, rmnist_w3     {FP SAM, LSQ, LSQ+SAM, GAQAT, FQAT} at W4A4 / W3A3 on RotatedMNIST
  pacs_w4, pacs_w3         the same (and FP ERM) on PACS (128 px) with EfficientNet-Lite0 ImageNet weights
                           (images decoded once and augmented on the device: --augment-on-device; NHWC
                           weights and batches: --channels-last)
``--algorithms`` and ``--test-domains`` pick a part of the suites. ``--extra`` arguments are not part of a run's
tag, so a variant (``--extra --threshold 0.57 ...``) needs its own ``--out``; its tables and EoQ keep it apart
(``report.algorithm_label``). A run whose results.json exists is
skipped, and unfinished runs continue from their checkpoint, so a sweep cut off by a time limit resumes where
it stopped. ``--budget-s`` starts a run only if it is expected to end within that many seconds of the sweep's
start (expected duration: ``--run-estimate-s`` or the longest finished run if longer), for time-limited
machines; ``--deadline-s`` stops what is still running then. Then EoQ (``gaqat_kernels.eoq``, from each run's
saved test predictions, so seeds finished in different calls ensemble too) for every quantized setting with at
least two finished seeds, into ``--out/<suite>/eoq/<setting>/eoq.json``, and the report table with the EoQ rows
(``gaqat_kernels.report``) written to ``--out/table.md``.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import re
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
    if args.algorithms:
        algorithms = [a for a in algorithms if a[0] in args.algorithms]
    for (algorithm, bits), test, seed in itertools.product(algorithms, tests, args.seeds):
        tag = f"{dataset}_{algorithm}_{'fp' if bits is None else f'w{bits}a{bits}'}_t{test}_s{seed}"
        cmd = [sys.executable, "-m", "gaqat_kernels.train", "--dataset", dataset, "--data-root", args.data_root,
               "--test-domain", str(test), "--algorithm", algorithm, "--seed", str(seed), "--trial-seed", str(seed),
               "--steps", str(args.steps), "--out", os.path.join(args.out, suite, tag), "--resume", "--no-progress"]
        if bits is not None:
            cmd += ["--w-bits", str(bits), "--a-bits", str(bits)]
        if dataset == "PACS":
            # the JPEG pipeline would starve runs that share a machine; NHWC: cuDNN's BN and depthwise kernels
            cmd += ["--arch", "efficientnet_lite0", "--pretrained", args.pretrained, "--image-size", "128",
                    "--augment-on-device", "--channels-last"]
        cmd += args.extra
        out.append((tag, os.path.join(args.out, suite, tag), cmd, tag.rsplit("_s", 1)[0]))
    return out


def ensembles(dirs: list, rows: list) -> None:
    """EoQ of every quantized setting with >= 2 finished seeds whose ensemble is missing or has fewer members."""
    from collections import defaultdict

    from gaqat_kernels import eoq
    from gaqat_kernels.report import algorithm_label

    groups = defaultdict(list)
    for r in rows:
        a = r["args"]
        if r.get("quantized"):
            key = (a["dataset"], algorithm_label(a), a["w_bits"], a["a_bits"], r["test_domain"])
            groups[key].append(os.path.dirname(r["_path"]))
    for key, runs in sorted(groups.items()):
        suite_dir = next(d for d in dirs if os.path.commonpath([d, runs[0]]) == d)
        # one folder name per setting, e.g. PACS_gaqat_threshold=0.57_4_4_0
        folder = "_".join(re.sub(r"[^\w.=-]+", "_", str(k)).strip("_") for k in key)
        out = os.path.join(suite_dir, "eoq", folder)
        path = os.path.join(out, "eoq.json")
        if len(runs) < 2 or (os.path.exists(path) and len(json.load(open(path))["members"]) == len(runs)):
            continue
        try:
            eoq.main(sorted(runs) + ["--out", out])
        except FileNotFoundError as e:  # an earlier call's run without its predictions or model here
            print(f"sweep: no EoQ for {key}: {e}", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--suite", nargs="+", required=True, choices=sorted(SUITES))
    p.add_argument("--data-root", required=True)
    p.add_argument("--pretrained", default="auto", help="EfficientNet-Lite0 checkpoint for the PACS suites")
    p.add_argument("--out", default="runs/sweep")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=5001)
    p.add_argument("--test-domains", type=int, nargs="+", default=None, help="only these test domains")
    p.add_argument("--algorithms", nargs="+", default=None, help="only these algorithms of the suites")
    p.add_argument("--parallel", type=int, default=6)
    p.add_argument("--budget-s", type=float, default=None, help="start no run expected to end after this")
    p.add_argument("--run-estimate-s", type=float, default=120.0, help="expected run time (at least)")
    p.add_argument("--deadline-s", type=float, default=None, help="stop runs still going after this many seconds "
                   "(they keep their last checkpoint), then EoQ and the table of what finished")
    p.add_argument("--no-eoq", action="store_true", help="skip the EoQ ensembles")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more training-script arguments")
    args = p.parse_args()
    todo = [c for s in args.suite for c in commands(s, args)
            if not os.path.exists(os.path.join(c[1], "results.json"))]
    print(f"sweep: {len(todo)} runs to do", flush=True)
    running, start, longest, admitted = [], time.time(), None, set()

    def may_start(group: str) -> bool:
        """Seeds of one setting start together or not at all, so that each call's EoQ sees whole groups."""
        expected = args.run_estimate_s if longest is None else max(longest, args.run_estimate_s)
        return group in admitted or args.budget_s is None or time.time() - start + expected <= args.budget_s

    while (todo and may_start(todo[0][3])) or running:
        while todo and len(running) < args.parallel and may_start(todo[0][3]):
            tag, out, cmd, group = todo.pop(0)
            admitted.add(group)
            os.makedirs(out, exist_ok=True)
            log = open(os.path.join(out, "stdout.txt"), "a")
            env = dict(os.environ, OMP_NUM_THREADS="1")  # many runs share the host's cores
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
            running.append((tag, proc, log, time.time()))
        for item in list(running):
            tag, proc, log, began = item
            if proc.poll() is not None:
                log.close()
                running.remove(item)
                took = time.time() - began
                longest = took if longest is None else max(longest, took)
                print(f"[{time.time() - start:6.0f} s] {tag}: exit {proc.returncode} ({took:.0f} s)", flush=True)
        if args.deadline_s is not None and time.time() - start > args.deadline_s:
            for tag, proc, log, _ in running:
                proc.terminate()
                proc.wait()
                log.close()
                print(f"[{time.time() - start:6.0f} s] {tag}: stopped at the deadline", flush=True)
            running = []
            break
        time.sleep(0.5)
    if todo:
        print(f"sweep: {len(todo)} runs left for a later call", flush=True)
    from gaqat_kernels import report

    dirs = [os.path.join(args.out, s) for s in args.suite]
    if not args.no_eoq:
        ensembles(dirs, report.find_results(dirs))
    table = report.table(report.find_results(dirs) + report.find_ensembles(dirs))
    with open(os.path.join(args.out, "table.md"), "a") as f:
        f.write(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
