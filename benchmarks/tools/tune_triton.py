"""Sweep the Triton backend's launch settings on a CUDA GPU.

For each combination of settings, the forward and forward+backward device time (CUDA-graph replay, cold L2) of
the kernel benchmark's cases, as multiples of the copy-bandwidth floor, beside PyTorch's same-bytes bound. The
settings are module globals of ``triton_lsq`` (see KNOBS); this script only sets them for its own process.

    python benchmarks/tools/tune_triton.py --out bench_out [--cases conv] [--dtypes bf16] [--tiles 8192 16384]
        [--forward-tiles 8192 16384] [--split-tiles 4096 8192]
        [--warps 4 8] [--splits 4 8] [--row-warps 8 16] [--backward-fast-div rows one-tile loops all]
        [--backward-max-registers 64 none]
        [--row-split 0 1] [--prefetch 0 1] [--rows-width 256 512 1024] [--rows-backward-tile 1024 2048]
        [--rows-prefetch 0 1]

A knob left out keeps the package's value for the dtype.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import json
import os
import sys
from typing import Iterator

import torch

import gaqat_kernels as gk
from gaqat_kernels.kernels import triton_lsq

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # benchmarks/: the harness
from bench_kernels import CASES, DTYPES, SAME_BYTES, copy_bandwidth, make_inputs, same_bytes, time_modes  # noqa: E402

# option, triton_lsq attribute, keyed by element size, value type, help
KNOBS = [
    ("tiles", "_TILE_BYTES", True, int, "tile bytes per tensor of unsplit backward programs"),
    ("forward-tiles", "_FORWARD_TILE_BYTES", True, int, "tile bytes per tensor of the forward"),
    ("warps", "_NUM_WARPS", False, int, "warps per program"),
    ("split-tiles", "_SPLIT_TILE_BYTES", True, int, "tile bytes per tensor of split backward programs"),
    ("splits", "_SPLIT_PROGRAMS_PER_SM", True, int, "split programs per SM"),
    ("one-wave", "_SPLIT_ONE_WAVE", False, lambda v: bool(int(v)), "split counts rounded down to one wave of "
                                                                    "programs (1) or up (0)"),
    ("row-warps", "_ROW_TILE_WARPS", True, int, "warps of the backward's whole-row tiles"),
    ("backward-fast-div", "_FAST_DIV_BACKWARD", False, str, "where the backward uses the fast division: rows, "
                                                              "one-tile, loops or all"),
    ("short-row-waste", "_SHORT_ROW_MAX_WASTE", False, float, "lanes per element a short row's single block may "
                                                                "spend (1.1: short rows in small blocks)"),
    ("rows-forward-tiles", "_ROWS_FORWARD_TILE_BYTES", True, int, "tile bytes per tensor of the ROWS forward"),
    ("row-split", "_ROW_TILE_SPLIT", False, lambda v: bool(int(v)), "whole-row tiles as two blocks (0/1)"),
    ("prefetch", "_PREFETCH", True, lambda v: bool(int(v)), "split backward programs load the next tile before "
                                                             "the current tile's math (0/1)"),
    ("backward-max-registers", "_BACKWARD_MAX_REGISTERS", False, lambda v: None if v == "none" else int(v),
     "registers per thread of the backward (a number, or none: Triton's choice)"),
    ("rows-width", "_ROWS_TILE_WIDTH_BYTES", False, int, "bytes of adjacent channels per ROWS tile (innermost "
                                                          "channels)"),
    ("rows-backward-tile", "_ROWS_BACKWARD_TILE", False, int, "elements per ROWS backward tile, at most"),
    ("rows-prefetch", "_ROWS_PREFETCH", True, lambda v: bool(int(v)), "split ROWS backward programs load the next "
                                                                       "tile before the current tile's math (0/1)"),
]


@contextlib.contextmanager
def applied(setting: dict, size: int) -> Iterator[None]:
    """The module's globals set to ``setting`` (attribute -> value) for dtype element size ``size``, every other
    knob at the package's value; all restored afterwards."""
    defaults = {attr: getattr(triton_lsq, attr) for _, attr, _, _, _ in KNOBS}
    for attr, value in setting.items():
        per_size = next(k[2] for k in KNOBS if k[1] == attr)
        setattr(triton_lsq, attr, {**defaults[attr], size: value} if per_size else value)
    triton_lsq.clear_plans()
    try:
        yield
    finally:
        for attr, value in defaults.items():
            setattr(triton_lsq, attr, value)
        triton_lsq.clear_plans()


def sweep(out: str, name: str, cases, dtypes, bits: int, settings, backend: str) -> list:
    """Time ``backend``'s forward and forward+backward (CUDA-graph replay, cold L2) under each ``(label,
    context(size))`` of ``settings``, beside PyTorch's same-bytes bound, on the benchmark cases whose name
    contains one of ``cases`` (all when None); rows as multiples of the copy-bandwidth floor, written to
    ``out/name.json`` after every case."""
    os.makedirs(out, exist_ok=True)
    bw = copy_bandwidth()
    rows = []
    for case, shape, axis in CASES:
        if cases and not any(k in case for k in cases):
            continue
        for dname in dtypes:
            dtype = DTYPES[dname]
            size = dtype.itemsize
            numel = torch.Size(shape).numel()
            floor_fwd, floor_fb = 2 * numel * size / bw * 1e3, 5 * numel * size / bw * 1e3
            copies = max(1, min(8, (256 << 20) // (2 * numel * size)))
            s, sets = make_inputs(shape, axis, dtype, bits, True, copies)
            kernel = (lambda x, s_, axis=axis: gk.lsq_fake_quant(x, s_, bits=bits, signed=True, axis=axis,
                                                                backend=backend))
            for label, context in [(SAME_BYTES, None)] + list(settings):
                if context is None:
                    t = time_modes(same_bytes(), sets, s, eager=False)
                else:
                    with context(size):  # a CUDA graph bakes the launch in at capture: capture inside
                        t = time_modes(kernel, sets, s, eager=False)
                row = dict(case=case, dtype=dname, setting=label, graph_fwd_x=t[2] / floor_fwd,
                           graph_fwdbwd_x=t[3] / floor_fb, graph_bwd_x=(t[3] - t[2]) / (floor_fb - floor_fwd))
                rows.append(row)
                print(f"{case:38s} {dname} {label:64s} x floor: fwd {row['graph_fwd_x']:.3f}  "
                      f"bwd {row['graph_bwd_x']:.3f}  fwd+bwd {row['graph_fwdbwd_x']:.3f}", flush=True)
            del sets
            torch.cuda.empty_cache()
            with open(os.path.join(out, f"{name}.json"), "w") as f:
                json.dump({"copy_bandwidth_GBps": bw / 1e9, "device": torch.cuda.get_device_name(), "rows": rows},
                          f, indent=1)
    return rows


def sweep_parser(description: str) -> argparse.ArgumentParser:
    """The options every launch-setting sweep takes: where to write, which cases, dtypes and bits."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--out", default="bench_out")
    ap.add_argument("--cases", nargs="+", default=None, help="only cases whose name contains one of these")
    ap.add_argument("--dtypes", nargs="+", default=["bf16"], choices=list(DTYPES))
    ap.add_argument("--bits", type=int, default=4)
    return ap


def main():
    ap = sweep_parser(__doc__.split("\n")[0])
    for option, attr, _, kind, text in KNOBS:
        ap.add_argument(f"--{option}", nargs="+", type=kind, default=None, help=f"{text} (triton_lsq.{attr})")
    args = ap.parse_args()
    swept = [(attr, getattr(args, option.replace("-", "_"))) for option, attr, _, _, _ in KNOBS
             if getattr(args, option.replace("-", "_")) is not None]
    settings = []
    for values in itertools.product(*(vals for _, vals in swept)):
        setting = dict(zip((attr for attr, _ in swept), values))
        label = ", ".join(f"{attr.strip('_').lower()}={v}" for attr, v in setting.items()) or "defaults"
        settings.append((label, functools.partial(applied, setting)))
    sweep(args.out, "tune_triton", args.cases, args.dtypes, args.bits, settings, "triton")


if __name__ == "__main__":
    if not torch.cuda.is_available():
        sys.exit("tune_triton.py needs a CUDA GPU")
    main()
