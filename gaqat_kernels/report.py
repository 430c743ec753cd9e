"""``python -m gaqat_kernels.report DIR...``: a DomainBed-style markdown table of finished runs.

Rows: dataset x algorithm x bits; columns: every test domain and the average; cells: mean +- std over seeds
of the selected model's test-domain accuracy (training-domain validation). The average column averages over
domains within each seed first, then takes mean +- std over seeds (DomainBed's convention). Reads every
run's ``results.json`` (any ``.json`` with a run's results) below the given directories. EoQ results
(``eoq.json`` from ``gaqat_kernels.eoq``) found there add a row "<algorithm> + EoQ" per setting: the
ensemble's test accuracy per domain; its seeds column counts ensembles, its name the members of each. A cell
over fewer seeds than its row's seeds column says how many in brackets (a sweep that has not finished them all;
the average then covers the seeds that have every domain). Runs of one algorithm with other method arguments
(``--threshold``, ``--max-frozen-fraction``, ``--rho``, ...; see ``algorithm_label``) get rows of their own.
"""
from __future__ import annotations

import argparse
import functools
import glob
import json
import os
import sys
from collections import defaultdict
from typing import Dict, List

import numpy as np

# The training-script arguments that make another method of the same algorithm name.
VARIANT_ARGS = {"sam": ("rho",), "lsq_sam": ("rho",), "sagm": ("rho", "sagm_alpha"),
                "gaqat": ("rho", "freeze_rule", "threshold", "hysteresis", "decay", "warmup_fraction",
                          "gaqat_max_frozen_fraction", "freeze_mode", "conflict_signal"),
                "fqat": ("rho", "freeze_rule", "threshold", "hysteresis", "decay", "warmup_fraction",
                         "max_frozen_fraction", "freeze_mode", "conflict_signal")}
# What an argument that older runs lack meant then: before --freeze-rule the rule was the absolute bar 0.5 without
# hysteresis; before --freeze-mode freezing zeroed the gradient only; before --conflict-signal the tracker compared
# the smoothness gradient (the default, so a missing one counts as it).
LEGACY_VALUES = {"freeze_rule": "absolute", "hysteresis": 0.0}
LEGACY_FREEZE_MODE = "gradient"


@functools.lru_cache(maxsize=None)
def _defaults() -> Dict:
    from .train import parse_args

    return vars(parse_args([]))


def algorithm_label(args: Dict) -> str:
    """``args["algorithm"]``, followed by ``(key=value, ...)`` for every ``VARIANT_ARGS`` argument of that
    algorithm that differs from the training script's default, so that variants never share a row or an EoQ.
    Arguments a run's ``args`` lacks (older runs) count as ``LEGACY_VALUES`` says, else as the default; the
    threshold and hysteresis count against the defaults of the run's freezing rule."""
    from .algorithms import DEFAULT_HYSTERESIS, DEFAULT_THRESHOLD

    name = args["algorithm"]
    defaults = dict(_defaults())
    rule = args.get("freeze_rule", LEGACY_VALUES["freeze_rule"])
    if rule in DEFAULT_THRESHOLD:
        defaults.update(threshold=DEFAULT_THRESHOLD[rule], hysteresis=DEFAULT_HYSTERESIS[rule])
    legacy = {"freeze_mode": LEGACY_FREEZE_MODE}
    if "freeze_rule" not in args:
        legacy.update(LEGACY_VALUES, threshold=DEFAULT_THRESHOLD["absolute"])
    changed = []
    for key in VARIANT_ARGS.get(name, ()):
        default = defaults[key]
        value = args.get(key, legacy.get(key, default))
        if value != default:
            changed.append(f"{key}={value}")
    return f"{name} ({', '.join(changed)})" if changed else name


def _json_files(dirs: List[str]):
    for d in dirs:
        pattern = d if d.endswith(".json") else os.path.join(d, "**", "*.json")
        for path in sorted(glob.glob(pattern, recursive=True)):
            with open(path) as f:
                try:
                    r = json.load(f)
                except json.JSONDecodeError:
                    continue
            if isinstance(r, dict):
                r["_path"] = path
                yield r


def find_results(dirs: List[str]) -> List[Dict]:
    """Every single run's results (a dict with ``test_acc`` and ``args``) below ``dirs``."""
    return [r for r in _json_files(dirs) if "test_acc" in r and "args" in r]


def find_ensembles(dirs: List[str]) -> List[Dict]:
    """Every EoQ result below ``dirs``, as rows the table reads: algorithm "<alg> + EoQ(<members>)"."""
    rows = []
    for r in _json_files(dirs):
        if "ensemble" in r and "setting" in r:
            name = f"{r['setting'].get('label', r['setting']['algorithm'])} + EoQ({len(r['members'])})"
            args = dict(r["setting"], algorithm=name, seed=None)
            rows.append({"dataset": r["dataset"], "domains": r["domains"], "test_domain": r["test_domain"],
                         "quantized": r["quantized"], "args": args, "test_acc": r["ensemble"]["test_acc"],
                         "test_acc_all": r["ensemble"]["test_acc_all"], "_path": r["_path"]})
    return rows


def _bits(r: Dict) -> str:
    if not r.get("quantized"):
        return "FP"
    a = r["args"]
    return f"W{a['w_bits']}A{a['a_bits'] or '-fp'}"


def _fmt(values) -> str:
    values = 100 * np.asarray(values)
    return f"{values.mean():.1f} ± {values.std(ddof=1) if len(values) > 1 else 0.0:.1f}"


def table(rows: List[Dict], key: str = "test_acc", only: List[str] = ()) -> str:
    """The markdown table(s), one per dataset; ``only``: these test domains (names) alone, and the average over
    them (for sweeps that skipped domains)."""
    by_dataset = defaultdict(list)
    for r in rows:
        by_dataset[r["dataset"]].append(r)
    out = []
    for dataset, rs in sorted(by_dataset.items()):
        names = rs[0]["domains"]
        unknown = [d for d in only if d not in names]
        if unknown:
            raise ValueError(f"only: {unknown} are not test domains of {dataset} ({names})")
        picked = [k for k, d in enumerate(names) if not only or d in only]
        domains = [names[k] for k in picked]
        groups = defaultdict(lambda: defaultdict(dict))  # (algorithm label, bits) -> seed -> domain -> acc
        for r in rs:
            seed = (r["args"]["seed"], r["args"]["trial_seed"])
            groups[(algorithm_label(r["args"]), _bits(r))][seed][r["test_domain"]] = r[key]
        out += [f"**{dataset}** (test-domain accuracy %, training-domain validation; mean ± std over seeds)", "",
                "| algorithm | bits | " + " | ".join(domains) + " | avg | seeds |",
                "|---|---|" + "---|" * (len(domains) + 2)]
        for (alg, bits), seeds in sorted(groups.items(), key=lambda kv: (kv[0][1] != "FP", kv[0][1], kv[0][0])):
            def cell(vals):
                if not vals:
                    return "–"
                return _fmt(vals) + (f" ({len(vals)})" if len(vals) < len(seeds) else "")

            cells = [cell([s[k] for s in seeds.values() if k in s]) for k in picked]
            cells.append(cell([np.mean([s[k] for k in picked]) for s in seeds.values()
                               if all(k in s for k in picked)]))
            out.append(f"| {alg} | {bits} | " + " | ".join(cells) + f" | {len(seeds)} |")
        out.append("")
    return "\n".join(out)


def main(argv=None) -> str:
    p = argparse.ArgumentParser(prog="gaqat-report", description=__doc__.splitlines()[0])
    p.add_argument("dirs", nargs="+", help="run directories (searched recursively for results.json)")
    p.add_argument("--metric", default="test_acc", choices=["test_acc", "test_acc_all", "val_acc"])
    p.add_argument("--domains", nargs="+", default=(), help="only these test domains (names), averaged over them")
    args = p.parse_args(argv)
    rows = find_results(args.dirs) + (find_ensembles(args.dirs) if args.metric != "val_acc" else [])
    if not rows:
        print(f"gaqat-report: no results.json under {args.dirs}", file=sys.stderr)
        sys.exit(1)
    text = table(rows, args.metric, args.domains)
    print(text)
    return text


if __name__ == "__main__":
    main()
