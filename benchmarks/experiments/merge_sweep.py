"""Put the runs a device call finished (``sweep_gpu.sh``'s ``$OUT/sweep_NAME.tar.gz``, or its ``.part-aa``, ``-ab``,
... when it was split to come back) where the next call and the
tables need them, so that no finished run is lost or run twice.

    python benchmarks/experiments/merge_sweep.py /work/.device/3/sweep_pacs.tar.gz --results benchmarks/experiments/results/dg_pacs \
        --carry runs/pacs [--full runs/pacs_all]

For every run of the tar with a ``results.json``:
  --results DIR/<tag>/   results.json, log.jsonl, test_probs.pt (what the report and EoQ read; committed)
  --carry DIR/<suite>/<tag>/results.json   what a later call carries so that its sweep skips the run
  --full DIR/<suite>/<tag>/                everything the tar holds for the run (conflict.jsonl, stdout.txt)
A run already under --results with the same results.json is one an earlier call of the same machine finished (a
warm machine keeps its runs between calls): it is passed over. With a different results.json it is a repeat (the
same setting and seed run again): it is kept as ``<results>_repeats/<tag>.json`` (the first result stays the one
in the tables) and reported. Runs the call did not finish (stopped at its deadline) are listed: a later call on
the same warm machine continues them from their checkpoints if it carries no runs folder, any other call starts
them anew. Run directories holding only results.json are what the call carried in, and are passed over.

After merging, EoQ (``sweep_dg.ensembles``) for every quantized setting of --results with at least two finished
seeds, into ``<results>/eoq/<setting>/eoq.json``: the members' saved test predictions suffice, so a machine
without a GPU does it, and seeds finished in different calls ensemble together.

With no tars, ``--carry`` is rebuilt from ``--results`` (on a fresh checkout, where the git-ignored carry folder
is missing): each run's results.json goes under the suite of ``sweep_dg.py`` that runs its setting.
"""
from __future__ import annotations

import argparse
import filecmp
import glob
import io
import os
import re
import shutil
import tarfile
import tempfile

from sweep_dg import SUITES, ensembles  # the script's folder is on sys.path when it runs

KEPT = ("results.json", "log.jsonl", "test_probs.pt")


def runs_of_the_call(root: str):
    """``(suite, tag, path, finished)`` of every run that the call ran below ``root`` (``runs/NAME/<suite>/<tag>``):
    directories with a ``log.jsonl`` (the results.json-only directories are what the call carried in)."""
    for dirpath, _, files in os.walk(root):
        if "log.jsonl" in files:
            suite_dir, tag = os.path.split(dirpath)
            yield os.path.basename(suite_dir), tag, dirpath, "results.json" in files


def open_tar(tar_path: str) -> tarfile.TarFile:
    """The tar at ``tar_path``; for ``X.part-aa`` the tar that ``X.part-*`` make together (sweep_gpu.sh splits a tar
    larger than one file the device tool brings back)."""
    if not tar_path.endswith(".part-aa"):
        return tarfile.open(tar_path)
    parts = sorted(glob.glob(glob.escape(tar_path[: -len("aa")]) + "*"))
    data = b"".join(open(part, "rb").read() for part in parts)
    return tarfile.open(fileobj=io.BytesIO(data), mode="r:gz")


def merge(tar_path: str, results: str, carry: str, full: str = None) -> dict:
    """Merge one call's tar; returns ``{"new", "merged", "repeats", "unfinished"}``: lists of run tags."""
    summary = {"new": [], "merged": [], "repeats": [], "unfinished": []}
    with tempfile.TemporaryDirectory() as tmp:
        with open_tar(tar_path) as tar:
            tar.extractall(tmp, filter="data")
        for suite, tag, path, done in sorted(runs_of_the_call(tmp)):
            if not done:
                summary["unfinished"].append(tag)
                continue
            merged = os.path.join(results, tag, "results.json")
            if os.path.exists(merged):
                if filecmp.cmp(merged, os.path.join(path, "results.json"), shallow=False):
                    summary["merged"].append(tag)
                else:
                    repeats = results.rstrip("/") + "_repeats"
                    os.makedirs(repeats, exist_ok=True)
                    shutil.copy(os.path.join(path, "results.json"), os.path.join(repeats, f"{tag}.json"))
                    summary["repeats"].append(tag)
                continue
            os.makedirs(os.path.join(results, tag), exist_ok=True)
            for name in KEPT:
                if os.path.exists(os.path.join(path, name)):
                    shutil.copy(os.path.join(path, name), os.path.join(results, tag, name))
            os.makedirs(os.path.join(carry, suite, tag), exist_ok=True)
            shutil.copy(os.path.join(path, "results.json"), os.path.join(carry, suite, tag, "results.json"))
            if full:
                shutil.copytree(path, os.path.join(full, suite, tag), dirs_exist_ok=True)
            summary["new"].append(tag)
    return summary


def suite_of(tag: str) -> str:
    """The ``sweep_dg.py`` suite whose runs carry ``tag`` (``<dataset>_<algorithm>_<fp|wNaN>_t<k>_s<seed>``, N bits)."""
    m = re.fullmatch(r"([A-Za-z]+)_(\w+?)_(fp|w(\d+)a\d+)_t\d+_s\d+", tag)
    if m:
        dataset, algorithm, bits = m.group(1), m.group(2), None if m.group(3) == "fp" else int(m.group(4))
        for suite, (suite_dataset, _, settings) in SUITES.items():
            if suite_dataset == dataset and (algorithm, bits) in settings:
                return suite
    raise ValueError(f"run {tag!r}: no sweep_dg.py suite runs this setting")


def rebuild_carry(results: str, carry: str) -> list:
    """Copy every ``results/<tag>/results.json`` to ``carry/<suite>/<tag>/``; returns the tags."""
    tags = sorted(t for t in os.listdir(results) if os.path.exists(os.path.join(results, t, "results.json")))
    for tag in tags:
        target = os.path.join(carry, suite_of(tag), tag)
        os.makedirs(target, exist_ok=True)
        shutil.copy(os.path.join(results, tag, "results.json"), target)
    return tags


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("tars", nargs="*", help="sweep_NAME.tar.gz (or its .part-aa) of one or more calls, oldest first "
                   "(none: rebuild --carry from --results)")
    p.add_argument("--results", required=True, help="per-run results for the tables (committed)")
    p.add_argument("--carry", required=True, help="the runs/NAME folder a later call carries")
    p.add_argument("--full", default=None, help="also keep every file of each run here")
    args = p.parse_args(argv)
    if not args.tars:
        tags = rebuild_carry(args.results, args.carry)
        print(f"{args.carry}: results.json of {len(tags)} runs")
        return {"carried": tags}
    total = {"new": [], "merged": [], "repeats": [], "unfinished": []}
    for tar_path in args.tars:
        summary = merge(tar_path, args.results, args.carry, args.full)
        for key, tags in summary.items():
            total[key] += tags
            if tags and key != "merged":
                print(f"{tar_path}: {key}: {' '.join(tags)}")
    print(f"{len(total['new'])} new, {len(total['merged'])} merged before, {len(total['repeats'])} repeats, "
          f"{len(total['unfinished'])} unfinished")
    if total["new"]:
        from gaqat_kernels import report

        ensembles([args.results], report.find_results([args.results]))
    return total


if __name__ == "__main__":
    main()
