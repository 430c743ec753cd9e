"""Sweep the Triton backend's launch constants (tile bytes, warps, split programs per SM) on a CUDA GPU.

For each setting, the forward and forward+backward device time (CUDA-graph replay, cold L2) of the kernel
benchmark's cases, as multiples of the copy-bandwidth floor, beside PyTorch's same-bytes bound. The
constants are module globals of ``triton_lsq``; this script only sets them for its own process.

    python benchmarks/tune_triton.py --out bench_out [--cases conv] [--dtypes bf16] [--tiles 8192 16384]
        [--warps 4 8] [--splits 4 8] [--row-warps 8 16] [--backward-fast-div rows one-tile all] [--row-split 0 1]

A knob left out keeps the package's value for the dtype.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

import torch

import gaqat_kernels as gk
from gaqat_kernels.kernels import triton_lsq

sys.path.insert(0, os.path.dirname(__file__))
from bench_kernels import CASES, DTYPES, SAME_BYTES, copy_bandwidth, make_inputs, same_bytes, time_modes  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="bench_out")
    ap.add_argument("--dtypes", nargs="+", default=["bf16"], choices=list(DTYPES))
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--cases", nargs="+", default=None, help="only cases whose name contains one of these")
    ap.add_argument("--tiles", nargs="+", type=int, default=[None], help="tile bytes per tensor")
    ap.add_argument("--warps", nargs="+", type=int, default=[None])
    ap.add_argument("--splits", nargs="+", type=int, default=[None], help="split programs per SM")
    ap.add_argument("--row-warps", nargs="+", type=int, default=[None], help="warps of one-tile backward rows")
    ap.add_argument("--backward-fast-div", nargs="+", default=[None], choices=["rows", "one-tile", "all"],
                    help="where the backward divides with the exact fast division (triton_lsq._FAST_DIV_BACKWARD)")
    ap.add_argument("--row-split", nargs="+", type=int, default=[None], choices=[0, 1],
                    help="whole-row backward tiles as two power-of-two blocks (triton_lsq._ROW_TILE_SPLIT)")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    bw = copy_bandwidth()
    rows = []
    defaults = (dict(triton_lsq._TILE_BYTES), triton_lsq._NUM_WARPS, dict(triton_lsq._SPLIT_PROGRAMS_PER_SM),
                dict(triton_lsq._ROW_TILE_WARPS), triton_lsq._FAST_DIV_BACKWARD,
                triton_lsq._ROW_TILE_SPLIT)
    for name, shape, axis in CASES:
        if args.cases and not any(k in name for k in args.cases):
            continue
        for dname in args.dtypes:
            dtype = DTYPES[dname]
            numel = torch.Size(shape).numel()
            floor_fwd, floor_fb = 2 * numel * dtype.itemsize / bw * 1e3, 5 * numel * dtype.itemsize / bw * 1e3
            copies = max(1, min(8, (256 << 20) // (2 * numel * dtype.itemsize)))
            s, sets = make_inputs(shape, axis, dtype, args.bits, True, copies)
            size = dtype.itemsize
            settings = [(SAME_BYTES, None)]
            for t, w, p, rw, fd, rs in itertools.product(args.tiles, args.warps, args.splits, args.row_warps,
                                                         args.backward_fast_div, args.row_split):
                t = defaults[0][size] if t is None else t
                w = defaults[1] if w is None else w
                p = defaults[2][size] if p is None else p
                rw = defaults[3][size] if rw is None else rw
                fd = defaults[4] if fd is None else fd
                rs = defaults[5] if rs is None else bool(rs)
                settings.append((f"tile {t} B, {w} warps, {p} splits/SM, rows {rw} warps"
                                 + f", fast div {fd}" + (", rows split" if rs else ""), (t, w, p, rw, fd, rs)))
            for label, knobs in settings:
                if knobs is None:
                    fn = same_bytes()
                else:
                    (tile, triton_lsq._NUM_WARPS, splits, row_warps, triton_lsq._FAST_DIV_BACKWARD,
                     triton_lsq._ROW_TILE_SPLIT) = knobs
                    triton_lsq._TILE_BYTES = {size: tile}
                    triton_lsq._SPLIT_PROGRAMS_PER_SM = {size: splits}
                    triton_lsq._ROW_TILE_WARPS = {size: row_warps}
                    triton_lsq._plan.cache_clear()  # it reads the module's settings
                    fn = (lambda x, s_: gk.lsq_fake_quant(x, s_, bits=args.bits, signed=True, axis=axis,
                                                          backend="triton"))
                t = time_modes(fn, sets, s, eager=False)
                row = dict(case=name, dtype=dname, setting=label, graph_fwd_x=t[2] / floor_fwd,
                           graph_fwdbwd_x=t[3] / floor_fb, graph_bwd_x=(t[3] - t[2]) / (floor_fb - floor_fwd))
                rows.append(row)
                print(f"{name:38s} {dname} {label:64s} x floor: fwd {row['graph_fwd_x']:.3f}  "
                      f"bwd {row['graph_bwd_x']:.3f}  fwd+bwd {row['graph_fwdbwd_x']:.3f}", flush=True)
            del sets
            torch.cuda.empty_cache()
            with open(os.path.join(args.out, "tune_triton.json"), "w") as f:
                json.dump({"copy_bandwidth_GBps": bw / 1e9, "device": torch.cuda.get_device_name(), "rows": rows},
                          f, indent=1)


if __name__ == "__main__":
    if not torch.cuda.is_available():
        sys.exit("tune_triton.py needs a CUDA GPU")
    main()
