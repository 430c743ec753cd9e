"""How much GAQAT / FQAT froze: one markdown row per run from its ``conflict.jsonl`` (the per-layer statistics
the training script logs every ``--log-every`` steps).

    python benchmarks/experiments/conflict_summary.py runs/pacs/pacs_w4/PACS_gaqat_w4a4_t0_s2 [RUN_DIR ...] \
        [--counts freeze_counts.json] [--plot conflict.png]

``--alignment`` adds a table of whether SAM's scale gradient itself (``g_sam = g_task + g_smooth``, what the step
uses) points against the task gradient, derived from the logged norms and cosine; which gradient those compare
with the task's (the smoothness gradient or SAM's own) is read from the run's results.json (``conflict_signal``). ``--persistence`` adds a table:
whether the layers' disorder differs *persistently* (a rule can only single out layers that stay apart): the spread of the layers' mean D over the second half of the records against
each layer's own spread over that half, the rank correlation of the layers' mean D between the two halves after
warm-up, and how often the most often frozen layers were frozen.

A freezing rule only differs from plain LSQ+SAM where it freezes some layers and not others, so the table says
how many layers were frozen (at the last record, and on average from the first record with any frozen layer
on), and the statistics that decided it, averaged over layers and records: disorder D, conflict fraction,
cosine, and the sign-flip fractions of the task and smoothness gradients. ``--counts`` keeps the number of
frozen layers per record of every run (a few kB instead of each run's multi-MB ``conflict.jsonl``), ``--plot``
draws it over the steps, one line per run; either also reads back counts files given beside (or in place of) run folders, so seeds run in different calls plot together.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections import defaultdict
from statistics import correlation, mean, median, pstdev
from typing import Dict, List

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # the repository
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
        "counts": [[step, n] for step, n in zip(steps, frozen)],
        "layers": len(end),
        "records": len(steps),
        "first_freeze_step": None if first is None else steps[first],
        "frozen_at_end": frozen[-1],
        "mean_frozen_after_first": 0.0 if first is None else mean(frozen[first:]),
        "disorder_end": (min(r["disorder"] for r in end), max(r["disorder"] for r in end)),
        **{key: mean(r[key] for r in records) for key in ("conflict", "cosine", "task_flips", "smooth_flips")},
    }


PERSISTENCE_COLUMNS = ("run", "D between layers (std of late means)", "D within a layer (late std, mean)",
                       "rank corr. of mean D, halves", "cosine between / within", "most frozen layers (share of records)")


def _ranks(values: List[float]) -> List[float]:
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    for rank, i in enumerate(order):
        ranks[i] = float(rank)
    return ranks


def records_after(run_dir: str, warmup_step: int) -> List[dict]:
    """The records of ``run_dir``'s ``conflict.jsonl`` at steps >= ``warmup_step``."""
    return [r for r in read_jsonl(os.path.join(run_dir, "conflict.jsonl")) if r["step"] >= warmup_step]


def persistence(run_dir: str, warmup_step: int = 0, top: int = 3) -> Dict:
    """Whether the layers' disorder differs persistently in one run: records at steps >= ``warmup_step`` are split
    into halves; population standard deviations; Spearman's rank correlation (ties broken by order)."""
    records = records_after(run_dir, warmup_step)
    by_layer: Dict[str, List[dict]] = defaultdict(list)
    for r in records:
        by_layer[r["layer"]].append(r)
    layers = sorted(by_layer)
    n = min(len(v) for v in by_layer.values())
    if n < 2:
        raise ValueError(f"run_dir: {run_dir} has fewer than 2 records per layer after step {warmup_step}")

    early = [mean(r["disorder"] for r in by_layer[k][: n // 2]) for k in layers]
    late_records = {k: by_layer[k][n // 2: n] for k in layers}
    late = [mean(r["disorder"] for r in late_records[k]) for k in layers]
    cos_late = [mean(r["cosine"] for r in late_records[k]) for k in layers]
    share = {k: mean(float(r["frozen"]) for r in by_layer[k][:n]) for k in layers}
    most = sorted(layers, key=lambda k: -share[k])[:top]
    return {
        "run": os.path.basename(os.path.normpath(run_dir)),
        "between": pstdev(late),
        "within": mean(pstdev([r["disorder"] for r in late_records[k]]) for k in layers),
        "rank_correlation": correlation(_ranks(early), _ranks(late)) if len(layers) > 1 else float("nan"),
        "cosine_between": pstdev(cos_late),
        "cosine_within": mean(pstdev([r["cosine"] for r in late_records[k]]) for k in layers),
        "most_frozen": [(k, share[k]) for k in most],
    }


ALIGNMENT_COLUMNS = ("run", "records", "|g_s| / |g_t| (median)", "cos(g_t, g_s) (median)",
                     "cos(g_t, g_sam) (p10 / median / p90)", "<g_sam, g_t> < 0: all / frozen")


def sam_task_cosine(cosine: float, task_norm: float, smooth_norm: float) -> float:
    """cos(g_t, g_sam) of a record, from what the tracker logs: g_sam = g_t + g_s, so with r = |g_s| / |g_t| and
    c = cos(g_t, g_s), cos(g_t, g_sam) = (1 + c r) / sqrt(1 + 2 c r + r^2). 0 for a zero gradient."""
    if task_norm == 0:
        return 0.0
    r = smooth_norm / task_norm
    norm2 = 1 + 2 * cosine * r + r * r
    return (1 + cosine * r) / math.sqrt(norm2) if norm2 > 0 else 0.0


def task_smooth_from_step(cosine: float, task_norm: float, step_norm: float) -> tuple:
    """(cos(g_t, g_s), |g_s|) of a record logged with ``conflict_signal="step"`` (the tracker compared g_t with
    g_sam = g_t + g_s, so ``cosine`` is cos(g_t, g_sam) and ``smooth_norm`` is |g_sam|): g_s = g_sam - g_t, so
    |g_s|^2 = |g_sam|^2 - 2 c |g_sam| |g_t| + |g_t|^2 and cos(g_t, g_s) = (c |g_sam| - |g_t|) / |g_s|."""
    dot = cosine * step_norm * task_norm
    smooth_norm = math.sqrt(max(step_norm * step_norm - 2 * dot + task_norm * task_norm, 0.0))
    if smooth_norm == 0 or task_norm == 0:
        return 0.0, smooth_norm
    return (dot - task_norm * task_norm) / (task_norm * smooth_norm), smooth_norm


def conflict_signal(run_dir: str) -> str:
    """The gradient the run's tracker compared with the task's, from its ``results.json`` (``args.conflict_signal``;
    runs from before the option compared the smoothness gradient). Raises FileNotFoundError naming the file."""
    path = os.path.join(run_dir, "results.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"run_dir: {path} is missing (it says which gradient the logged statistics compare)")
    with open(path) as f:
        return json.load(f)["args"].get("conflict_signal", "smoothness")


def alignment(run_dir: str, warmup_step: int = 0) -> Dict:
    """Whether SAM's scale gradient g_sam (the one the step uses) points against the task gradient g_t, in the
    records at steps >= ``warmup_step``: a negative cos(g_t, g_s) with g_s = g_sam - g_t (the tracker's conflict)
    only needs g_sam's component along g_t to be shorter than |g_t|, e.g. a g_sam merely decorrelated from g_t.
    The columns mean the same for either ``conflict_signal``: each record is read as its run's tracker logged it."""
    records = records_after(run_dir, warmup_step)
    if not records:
        raise ValueError(f"run_dir: {run_dir} has no records after step {warmup_step}")
    signal = conflict_signal(run_dir)
    if signal == "step":
        cos_sam = [r["cosine"] for r in records]
        smooth = [task_smooth_from_step(r["cosine"], r["task_norm"], r["smooth_norm"]) for r in records]
    elif signal == "smoothness":
        cos_sam = [sam_task_cosine(r["cosine"], r["task_norm"], r["smooth_norm"]) for r in records]
        smooth = [(r["cosine"], r["smooth_norm"]) for r in records]
    else:
        raise ValueError(f"run_dir: {run_dir}/results.json names an unknown conflict_signal {signal!r}")
    frozen = [c for c, r in zip(cos_sam, records) if r["frozen"]]
    ordered = sorted(cos_sam)
    return {
        "run": os.path.basename(os.path.normpath(run_dir)),
        "signal": signal,
        "records": len(records),
        "norm_ratio": median(n / r["task_norm"] for (_, n), r in zip(smooth, records) if r["task_norm"] > 0),
        "cosine": median(c for c, _ in smooth),
        "sam_cosine": (ordered[len(ordered) // 10], median(ordered), ordered[(9 * len(ordered)) // 10]),
        "opposed": mean(float(c < 0) for c in cos_sam),
        "opposed_frozen": mean(float(c < 0) for c in frozen) if frozen else float("nan"),
    }


def alignment_table(rows: List[Dict]) -> str:
    lines = ["| " + " | ".join(ALIGNMENT_COLUMNS) + " |", "|" + "---|" * len(ALIGNMENT_COLUMNS)]
    for r in rows:
        lo, mid, hi = r["sam_cosine"]
        cells = [r["run"], str(r["records"]), f"{r['norm_ratio']:.2f}", f"{r['cosine']:.2f}",
                 f"{lo:.2f} / {mid:.2f} / {hi:.2f}", f"{r['opposed']:.3f} / {r['opposed_frozen']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def persistence_table(rows: List[Dict]) -> str:
    lines = ["| " + " | ".join(PERSISTENCE_COLUMNS) + " |", "|" + "---|" * len(PERSISTENCE_COLUMNS)]
    for r in rows:
        most = ", ".join(f"{k} ({v:.2f})" for k, v in r["most_frozen"])
        cells = [r["run"], f"{r['between']:.4f}", f"{r['within']:.4f}", f"{r['rank_correlation']:.2f}",
                 f"{r['cosine_between']:.3f} / {r['cosine_within']:.3f}", most]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


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


def plot_counts(counts: Dict[str, List[List[int]]], layers: Dict[str, int], path: str) -> None:
    """Frozen layers over the steps, one line per run (matplotlib, without a display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    for run, rows in sorted(counts.items()):
        ax.plot([r[0] for r in rows], [r[1] for r in rows], lw=0.8, label=f"{run} ({layers[run]} layers)")
    ax.set_xlabel("step")
    ax.set_ylabel("layers frozen")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="run folders holding conflict.jsonl, and --counts files of earlier runs (merged with them)")
    p.add_argument("--counts", default=None, help="write the frozen-layer counts of every run to this JSON file")
    p.add_argument("--plot", default=None, help="draw the frozen-layer counts over the steps into this image")
    p.add_argument("--persistence", type=int, default=None, metavar="WARMUP_STEP",
                   help="also the persistence table, from the records at steps >= WARMUP_STEP (the freezing warm-up)")
    p.add_argument("--alignment", type=int, default=None, metavar="WARMUP_STEP",
                   help="also the alignment table (does SAM's scale gradient oppose the task's?), steps >= WARMUP_STEP")
    args = p.parse_args(argv)
    # counts files saved by earlier calls (e.g. another seed's runs) merge with the run folders given beside them
    saved = [json.load(open(r)) for r in args.runs if r.endswith(".json")]
    run_dirs = [r for r in args.runs if not r.endswith(".json")]
    counts = {run: rows for f in saved for run, rows in f["counts"].items()}
    layers = {run: n for f in saved for run, n in f["layers"].items()}
    text = ""
    if run_dirs:
        summaries = [summarize(d) for d in run_dirs]
        counts.update({s["run"]: s["counts"] for s in summaries})
        layers.update({s["run"]: s["layers"] for s in summaries})
        text = table(summaries)
        if args.persistence is not None:
            text += "\n\n" + persistence_table([persistence(d, args.persistence) for d in run_dirs])
        if args.alignment is not None:
            text += "\n\n" + alignment_table([alignment(d, args.alignment) for d in run_dirs])
        print(text)
    if args.counts:
        with open(args.counts, "w") as f:
            json.dump({"counts": counts, "layers": layers}, f)
    if args.plot:
        plot_counts(counts, layers, args.plot)
    return text


if __name__ == "__main__":
    main()
