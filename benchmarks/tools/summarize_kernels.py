"""Condenses a kernels.json from bench_kernels.py into one markdown row per case: ×floor of each implementation.

    python benchmarks/tools/summarize_kernels.py benchmarks/results/kernels_h100_<commit>.json [more.json ...] [--mode graph|eager]

Rows of a later file replace those of an earlier one with the same case, dtype, bits and implementation.
"""
import argparse
import json
import math


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("paths", nargs="+")
    ap.add_argument("--mode", default="graph", choices=["graph", "eager"])
    args = ap.parse_args()
    merged, metas = {}, []
    for path in args.paths:
        data = json.load(open(path))
        metas.append(data["meta"])
        for r in data["rows"]:
            merged[(r["case"], r["dtype"], r["bits"], r["impl"])] = r
    rows = list(merged.values())  # a replaced row keeps its place
    meta, commits = metas[0], [m["commit"] for m in metas]
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    groups = {}
    for r in rows:
        groups.setdefault((r["case"], r["dtype"], r["bits"]), {})[r["impl"]] = r
    print(f"fwd+bwd time / floor ({args.mode}); floor = 5 passes at the measured copy bandwidth "
          f"({meta['copy_bandwidth_GBps']:.0f} GB/s); {meta['device']}, commit {' + '.join(dict.fromkeys(commits))}\n")
    print("| case | dtype | bits | floor µs | " + " | ".join(impls) + " | best of ours vs best peer |")
    print("|---|---|---|---|" + "---|" * (len(impls) + 1))
    for (case, dtype, bits), by_impl in groups.items():
        floor = next(iter(by_impl.values()))["floor_fwdbwd_ms"]
        cells, ours, peers = [], [], []
        for impl in impls:
            r = by_impl.get(impl)
            t = r[f"{args.mode}_fwdbwd_ms"] if r else float("nan")
            cells.append("—" if math.isnan(t) else f"{t / floor:.2f}")
            if not math.isnan(t) and not impl.startswith("bound"):
                (ours if impl.startswith("ours") else peers).append(t)
        ratio = f"{min(peers) / min(ours):.2f}× faster" if ours and peers else "—"
        print(f"| {case} | {dtype} | {bits} | {floor * 1e3:.1f} | " + " | ".join(cells) + f" | {ratio} |")


if __name__ == "__main__":
    main()
