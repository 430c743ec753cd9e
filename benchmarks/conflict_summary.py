"""How much GAQAT / FQAT froze: one markdown row per run from its ``conflict.jsonl`` (the per-layer statistics
the training script logs every ``--log-every`` steps).

    python benchmarks/conflict_summary.py runs/pacs/pacs_w4/PACS_gaqat_w4a4_t0_s2 [RUN_DIR ...]

A freezing rule only differs from plain LSQ+SAM where it freezes some layers and not others, so the table says
how many layers were frozen (at the last record, and on average from the first record with any frozen layer
on), and the statistics that decided it, averaged over layers and records: disorder D, conflict fraction,
cosine, and the sign-flip fractions of the task and smoothness gradients.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict
from statistics import mean
from typing import Dict, List

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from gaqat_kernels.plots import read_jsonl  # noqa: E402

COLUMNS = ("run", "layers", "records", "first freeze step", "frozen at end", "mean frozen after first freeze",
           "D at end (min-max)", "conflict", "cosine", "task flips", "smooth flips")


def summarize(run_dir: str) -> Dict:
    """Statistics of one run's ``conflict.jsonl``; raises FileNotFoundError naming the file if it is missing."""
    path = os.path.join(run_dir, "conflict.jsonl")
    records = read_jsonl(path)
    if not records:
        raise FileNotFoundError(f"run_dir: no records in {path} (a GAQAT/FQAT run with --log-every > 0 writes it)")
    by_step: Dict[int, List[dict]] = defaultdict(list)
    for r in records:
        by_step[r["step"]].append(r)
    steps = sorted(by_step)
    frozen = [sum(r["frozen"] for r in by_step[s]) for s in steps]
    first = next((i for i, n in enumerate(frozen) if n), None)
    end = by_step[steps[-1]]
    return {
        "run": os.path.basename(os.path.normpath(run_dir)),
        "layers": len(end),
        "records": len(steps),
        "first_freeze_step": None if first is None else steps[first],
        "frozen_at_end": frozen[-1],
        "mean_frozen_after_first": 0.0 if first is None else mean(frozen[first:]),
        "disorder_end": (min(r["disorder"] for r in end), max(r["disorder"] for r in end)),
        **{key: mean(r[key] for r in records) for key in ("conflict", "cosine", "task_flips", "smooth_flips")},
    }


def table(summaries: List[Dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for s in summaries:
        lo, hi = s["disorder_end"]
        cells = [s["run"], s["layers"], s["records"], "never" if s["first_freeze_step"] is None else
                 s["first_freeze_step"], f"{s['frozen_at_end']} / {s['layers']}",
                 f"{s['mean_frozen_after_first']:.1f}", f"{lo:.2f}-{hi:.2f}", f"{s['conflict']:.2f}",
                 f"{s['cosine']:.2f}", f"{s['task_flips']:.2f}", f"{s['smooth_flips']:.2f}"]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="run folders holding conflict.jsonl")
    text = table([summarize(d) for d in p.parse_args(argv).runs])
    print(text)
    return text


if __name__ == "__main__":
    main()
