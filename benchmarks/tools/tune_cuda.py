"""Sweep the CUDA backend's launch settings on a CUDA GPU (the Triton sweep's cases, timing and output).

The settings are the extension's process-wide switches (``extension.cuda_division``, ``extension.cuda_launch``);
for every combination, the forward and forward+backward device time as multiples of the copy-bandwidth floor,
beside PyTorch's same-bytes bound.

    python benchmarks/tools/tune_cuda.py --out bench_out [--cases act] [--dtypes fp32 bf16] [--division plan ieee fast]
        [--forward-blocks 8 65536] [--split-blocks 4 8] [--prefetch default 0 1]

A knob left out keeps the built-in value (0 = the built-in launch value).
"""
from __future__ import annotations

import contextlib
import itertools
import os
import sys
from typing import Iterator, Optional

import torch

from gaqat_kernels.kernels.extension import HAS_CUDA, cuda_division, cuda_launch

sys.path.insert(0, os.path.dirname(__file__))
from tune_triton import sweep, sweep_parser  # noqa: E402


@contextlib.contextmanager
def applied(division: str, forward_blocks: int, split_blocks: int, prefetch: Optional[bool]) -> Iterator[None]:
    """The CUDA backend's division and launch shape for the block (the same for every element size)."""
    with cuda_division(division), cuda_launch(forward_blocks, split_blocks, prefetch):
        yield


def main():
    ap = sweep_parser(__doc__.split("\n")[0])
    ap.add_argument("--division", nargs="+", default=["plan"], choices=["plan", "ieee", "fast"])
    ap.add_argument("--forward-blocks", nargs="+", type=int, default=[0], help="forward blocks per SM (0: built-in)")
    ap.add_argument("--split-blocks", nargs="+", type=int, default=[0],
                    help="backward split blocks per SM (0: built-in)")
    ap.add_argument("--prefetch", nargs="+", default=["default"], choices=["default", "0", "1"],
                    help="looping backward blocks prefetch their next tile (default: built-in)")
    args = ap.parse_args()
    prefetch = {"default": None, "0": False, "1": True}
    settings = [(f"division={d}, forward_blocks={f}, split_blocks={b}, prefetch={p}",
                 lambda size, d=d, f=f, b=b, p=p: applied(d, f, b, prefetch[p]))
                for d, f, b, p in itertools.product(args.division, args.forward_blocks, args.split_blocks,
                                                    args.prefetch)]
    sweep(args.out, "tune_cuda", args.cases, args.dtypes, args.bits, settings, "cuda")


if __name__ == "__main__":
    if not (torch.cuda.is_available() and HAS_CUDA):
        sys.exit("tune_cuda.py needs a CUDA GPU and the extension built with CUDA")
    main()
