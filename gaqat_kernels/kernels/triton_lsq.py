"""Fused LSQ fake quantization in Triton: forward, backward with the scale gradient reduced in-kernel.

Every tensor is walked in storage order as ``(O, C, I)`` tiles of ``[BLOCK_C, BLOCK_I]`` (see ``layout.py``),
so the channel of a tile row is known without per-element division, and any channel axis reads memory
linearly. The backward keeps each thread's scale-gradient terms in registers, element by element, and reduces
them per channel once, after its last tile; each program writes its own fp32 partial (or the final value when
one program owns a channel block), and a second tiny kernel sums the partials in a fixed order. No atomics: the
scale gradient has the same bits on every run. Programs that loop over tiles may load the next tile while the
current one is computed (``_PREFETCH``).
"""
from __future__ import annotations

import functools
from typing import Callable, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .layout import channel_view

# 1.5 * 2**23: adding and subtracting it rounds a float32 to the nearest integer, ties to even,
# exactly for |v| < 2**22. The clamp guarantees |v| <= 255 here.
_ROUND_MAGIC = tl.constexpr(12582912.0)


@triton.jit
def _clamp(v, qn, qp):
    # NaN-propagating min/max (min.NaN/max.NaN, one instruction each): NaN must stay NaN.
    return tl.minimum(tl.maximum(v, qn, propagate_nan=tl.PropagateNan.ALL), qp, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _round(c):
    return (c + _ROUND_MAGIC) - _ROUND_MAGIC


# Scales whose reciprocal and quotients stay in float32's normal range: there the quotient by multiplication
# plus one correction step equals the IEEE quotient.
_SCALE_LO = tl.constexpr(2.0 ** -100)
_SCALE_HI = tl.constexpr(2.0 ** 100)


@triton.jit
def _divide(x, s, r, FAST: tl.constexpr):
    """``x / s`` rounded to nearest (IEEE); ``r = RN(1/s)`` is read only when FAST.

    FAST: ``q = RN(x*r)`` is within one ulp of x/s, and one correction ``RN(q + RN(x - q*s) * r)`` (the
    residual exact through the fma) is the correctly rounded quotient (Markstein's theorem; Handbook of
    Floating-Point Arithmetic, 2nd ed., Thm 4.14). Valid while no step over- or underflows: scales in
    [2**-100, 2**100] (the caller checks) and a finite ``q`` (an infinite q is the quotient). Three
    instructions and a select instead of IEEE division's longer sequence: the 16-bit cases are issue-bound.
    """
    if FAST:
        q = x * r
        v = tl.where(tl.abs(q) < float("inf"), tl.fma(tl.fma(-q, s, x), r, q), q)
    else:
        v = tl.div_rn(x, s)
    return v


@triton.jit
def _fast_div_ok(s, c_mask):
    """True when every scale of the block lies in the fast division's range (NaN does not)."""
    a = tl.abs(s)
    bad = tl.where(c_mask & ~((a >= _SCALE_LO) & (a <= _SCALE_HI)), 1, 0)
    return tl.max(bad, axis=0) == 0


@triton.jit
def _round_to_bf16_grid(v):
    # Round-to-nearest-even onto bfloat16's grid, in fp32 bits. Only for the CPU interpreter, whose
    # fp32 -> bf16 cast truncates; compiled kernels use the hardware's rounding cast.
    bits = v.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _tile_offsets(t, cb, O, C, I, tiles_i, BLOCK_C: tl.constexpr, BLOCK_I: tl.constexpr, ROWS: tl.constexpr):
    """Tile t of channel block cb: BLOCK_C channels x BLOCK_I elements of one row (row t // tiles_i), or with
    ROWS (I == 1) BLOCK_C adjacent channels x BLOCK_I rows (row block t), so that a scale serves BLOCK_I elements."""
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    if ROWS:
        o = t * BLOCK_I + tl.arange(0, BLOCK_I)
        # int64 tile base, int32 in-tile offsets: BLOCK_I * C < 2**31 is checked by the launcher.
        base = tl.cast(t, tl.int64) * BLOCK_I * C + cb * BLOCK_C
        local = tl.arange(0, BLOCK_C)[:, None] + tl.arange(0, BLOCK_I)[None, :] * C
        mask = (c < C)[:, None] & (o < O)[None, :]
    else:
        o = t // tiles_i
        ib = t % tiles_i
        i = ib * BLOCK_I + tl.arange(0, BLOCK_I)
        # int64 tile base, int32 in-tile offsets: BLOCK_C * I < 2**31 is checked by the launcher.
        base = (o.to(tl.int64) * C + cb * BLOCK_C) * I + ib * BLOCK_I
        local = tl.arange(0, BLOCK_C)[:, None] * I + tl.arange(0, BLOCK_I)[None, :]
        mask = (c < C)[:, None] & (i < I)[None, :]
    return c, base + local, mask


@triton.jit
def _fwd_tile(x_ptr, y_ptr, offs, mask, s, qn, qp, INTERPRETED_BF16: tl.constexpr, EVEN: tl.constexpr,
              FAST: tl.constexpr):
    if EVEN:  # every tile full: no masks to compute
        x = tl.load(x_ptr + offs).to(tl.float32)
    else:
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    r = s  # read only when FAST
    if FAST:
        r = tl.div_rn(tl.full(s.shape, 1.0, tl.float32), s)
    y = _round(_clamp(_divide(x, s, r, FAST), qn, qp)) * s
    if INTERPRETED_BF16:
        y = _round_to_bf16_grid(y)
    if EVEN:
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty))
    else:
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _lsq_fwd_kernel(
    x_ptr, s_ptr, y_ptr, O, C, I, tiles_i, tiles_per_cb, qn, qp,
    BLOCK_C: tl.constexpr, BLOCK_I: tl.constexpr, INTERPRETED_BF16: tl.constexpr, EVEN: tl.constexpr,
    FAST_DIV: tl.constexpr, ROWS: tl.constexpr,
):
    # Inductor passes Python floats as fp64 (wrap_triton); the contract's arithmetic is fp32 everywhere
    qn, qp = tl.cast(qn, tl.float32), tl.cast(qp, tl.float32)
    pid = tl.program_id(0)
    cb = pid // tiles_per_cb
    c, offs, mask = _tile_offsets(pid % tiles_per_cb, cb, O, C, I, tiles_i, BLOCK_C, BLOCK_I, ROWS)
    s = tl.load(s_ptr + c, mask=c < C, other=1.0)
    # Fast division first and unconditionally, so that the tile's loads need not wait for the scale; a scale
    # outside its range (never in practice) writes the tile again with IEEE division.
    _fwd_tile(x_ptr, y_ptr, offs, mask, s[:, None], qn, qp, INTERPRETED_BF16, EVEN, FAST_DIV)
    if FAST_DIV:
        if not _fast_div_ok(s, c < C):
            tl.debug_barrier()  # every thread's fast-division stores land before the rewrite
            _fwd_tile(x_ptr, y_ptr, offs, mask, s[:, None], qn, qp, INTERPRETED_BF16, EVEN, False)


@triton.jit
def _load_pair(x_ptr, dy_ptr, offs, mask, EVEN: tl.constexpr):
    """A tile of x and dy in their storage dtype (0 where masked)."""
    if EVEN:
        x = tl.load(x_ptr + offs)
        dy = tl.load(dy_ptr + offs)
    else:
        x = tl.load(x_ptr + offs, mask=mask, other=0.0)
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0)
    return x, dy


@triton.jit
def _bwd_math(x, dy, dx_ptr, offs, mask, s, r, qn, qp, EVEN: tl.constexpr, FAST: tl.constexpr):
    """Store dx of a loaded tile; return its scale-gradient terms element by element (0 where masked)."""
    v = _divide(x.to(tl.float32), s, r, FAST)
    c = _clamp(v, qn, qp)
    inside = c == v  # qn <= v <= qp; false for NaN
    term = dy.to(tl.float32) * (_round(c) - tl.where(inside, v, 0.0))
    dx = tl.where(inside, dy, 0.0).to(dx_ptr.dtype.element_ty)
    if EVEN:
        tl.store(dx_ptr + offs, dx)
    else:
        tl.store(dx_ptr + offs, dx, mask=mask)
        term = tl.where(mask, term, 0.0)
    return term


@triton.jit
def _bwd_block(x_ptr, dy_ptr, dx_ptr, offs, mask, s, r, qn, qp, EVEN: tl.constexpr, FAST: tl.constexpr):
    """dx of one tile, and its scale-gradient terms element by element (0 where masked)."""
    x, dy = _load_pair(x_ptr, dy_ptr, offs, mask, EVEN)
    return _bwd_math(x, dy, dx_ptr, offs, mask, s, r, qn, qp, EVEN, FAST)


@triton.jit
def _bwd_tiles(x_ptr, dy_ptr, dx_ptr, cb, sp, s, O, C, I, tiles_i, tiles_per_cb, n_splits, qn, qp,
               BLOCK_C: tl.constexpr, BLOCK_I: tl.constexpr, EVEN: tl.constexpr, FAST: tl.constexpr,
               TAIL_I: tl.constexpr, TAIL_EVEN: tl.constexpr, PREFETCH: tl.constexpr, ROWS: tl.constexpr):
    """dx of this program's tiles and their per-row sums of the scale-gradient terms.

    The loop adds the terms element by element and reduces once at the end: a reduction per tile would put a
    block-wide barrier into every iteration. TAIL_I > 0: the program's one row (BLOCK_C == 1, one row per
    channel) as two power-of-two blocks, BLOCK_I (<= I, unmasked) and TAIL_I, instead of one block of
    next_power_of_2(I) lanes (a conv weight's 4608 = 4096 + 512, not 8192 with 44% of the lanes masked).
    """
    r = s  # read only when FAST
    if FAST:
        r = tl.div_rn(tl.full(s.shape, 1.0, tl.float32), s)
    if TAIL_I > 0:
        base = cb.to(tl.int64) * I
        i = tl.arange(0, BLOCK_I)[None, :]
        acc = tl.sum(_bwd_block(x_ptr, dy_ptr, dx_ptr, base + i, i < I, s, r, qn, qp, True, FAST), axis=1)
        j = BLOCK_I + tl.arange(0, TAIL_I)[None, :]
        acc += tl.sum(_bwd_block(x_ptr, dy_ptr, dx_ptr, base + j, j < I, s, r, qn, qp, TAIL_EVEN, FAST), axis=1)
    else:
        terms = tl.zeros([BLOCK_C, BLOCK_I], dtype=tl.float32)
        if PREFETCH:
            # The next tile's loads are issued before this tile's math, so they are in flight while it runs.
            # sp < tiles_per_cb (n_splits <= tiles); past the last tile the prefetch is masked off entirely.
            _, offs, mask = _tile_offsets(sp, cb, O, C, I, tiles_i, BLOCK_C, BLOCK_I, ROWS)
            x, dy = _load_pair(x_ptr, dy_ptr, offs, mask, EVEN)
            for t in range(sp, tiles_per_cb, n_splits):
                live = tl.full([BLOCK_C, BLOCK_I], t + n_splits, tl.int32) < tiles_per_cb  # uniform
                _, offs_n, mask_n = _tile_offsets(t + n_splits, cb, O, C, I, tiles_i, BLOCK_C, BLOCK_I, ROWS)
                if EVEN:
                    x_n, dy_n = _load_pair(x_ptr, dy_ptr, offs_n, live, False)
                else:
                    x_n, dy_n = _load_pair(x_ptr, dy_ptr, offs_n, mask_n & live, False)
                terms += _bwd_math(x, dy, dx_ptr, offs, mask, s, r, qn, qp, EVEN, FAST)
                x, dy, offs, mask = x_n, dy_n, offs_n, mask_n
        else:
            for t in range(sp, tiles_per_cb, n_splits):
                _, offs, mask = _tile_offsets(t, cb, O, C, I, tiles_i, BLOCK_C, BLOCK_I, ROWS)
                terms += _bwd_block(x_ptr, dy_ptr, dx_ptr, offs, mask, s, r, qn, qp, EVEN, FAST)
        acc = tl.sum(terms, axis=1)
    return acc


@triton.jit
def _lsq_bwd_kernel(
    x_ptr, dy_ptr, s_ptr, dx_ptr, out_ptr, O, C, I, tiles_i, tiles_per_cb, n_splits, qn, qp, g,
    BLOCK_C: tl.constexpr, BLOCK_I: tl.constexpr, FINAL: tl.constexpr, EVEN: tl.constexpr,
    FAST_DIV: tl.constexpr, TAIL_I: tl.constexpr, TAIL_EVEN: tl.constexpr, PREFETCH: tl.constexpr,
    ROWS: tl.constexpr,
):
    # fp64 where Inductor launches it (see the forward)
    qn, qp, g = tl.cast(qn, tl.float32), tl.cast(qp, tl.float32), tl.cast(g, tl.float32)
    cb = tl.program_id(0)
    sp = tl.program_id(1)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    s = tl.load(s_ptr + c, mask=c < C, other=1.0)
    # As in the forward: fast division first, its loads not held back by a branch on the scale; a scale outside
    # its range does the program's tiles again with IEEE division, rewriting dx.
    acc = _bwd_tiles(x_ptr, dy_ptr, dx_ptr, cb, sp, s[:, None], O, C, I, tiles_i, tiles_per_cb, n_splits, qn, qp,
                     BLOCK_C, BLOCK_I, EVEN, FAST_DIV, TAIL_I, TAIL_EVEN, PREFETCH, ROWS)
    if FAST_DIV:
        if not _fast_div_ok(s, c < C):
            tl.debug_barrier()
            acc = _bwd_tiles(x_ptr, dy_ptr, dx_ptr, cb, sp, s[:, None], O, C, I, tiles_i, tiles_per_cb, n_splits, qn,
                             qp, BLOCK_C, BLOCK_I, EVEN, False, TAIL_I, TAIL_EVEN, PREFETCH, ROWS)
    if FINAL:
        tl.store(out_ptr + c, acc * g, mask=c < C)
    else:
        tl.store(out_ptr + sp * C + c, acc, mask=c < C)


@triton.jit
def _sum_partials_kernel(part_ptr, ds_ptr, C, n_splits, g, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    g = tl.cast(g, tl.float32)  # fp64 where Inductor launches it
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for s0 in range(0, n_splits, BLOCK_S):
        sp = s0 + tl.arange(0, BLOCK_S)
        m = (sp < n_splits)[:, None] & (c < C)[None, :]
        acc += tl.sum(tl.load(part_ptr + sp[:, None] * C + c[None, :], mask=m, other=0.0), axis=0)
    tl.store(ds_ptr + c, acc * g, mask=c < C)


# Division by multiplication + one exact correction (see _divide): 5 instructions per element against IEEE
# division's ~10 (with its slow-path branch). A program that may divide fast does so first, without waiting
# for its scale, and does its tiles again with IEEE division if the scale is outside the fast range.
_FAST_DIV_FORWARD = True
# Where the backward divides fast: "rows" (whole-row tiles only), "one-tile" (also programs that visit a single
# tile), "loops" (whole-row tiles and programs that loop over several tiles), "all". Measured on H200 at 4 bits
# (RESULTS.md, side by side in one run, fwd+bwd x floor, bf16): "loops" and "all" take the per-tensor
# 64x256x56x56 from 1.189 ("rows", IEEE) to 1.161 and 8x4096x4096 from 1.114 to 1.089; fast division in
# one-tile programs costs 4096x4096 1.188 -> 1.201 and 11008x4096 1.122 -> 1.141.
_FAST_DIV_BACKWARD = "loops"
# Launch constants by element size, measured on H100 (``benchmarks/tools/tune_triton.py``, RESULTS.md). Tile bytes
# per tensor: fp32 16 KB (64 bytes per thread at 8 warps); 16-bit 8 KB, whose backward ran 6-9% faster than
# with 16 KB (fewer registers per thread, more programs resident). Split programs per SM, for channel blocks
# whose tiles are split over programs (per-tensor): 4, resident in one wave (fp32 64x256x56x56 fwd+bwd 1.060 ->
# 1.054x floor, 8x4096x4096 1.035 -> 1.031; 16-bit 1.118 -> 1.093 and 1.061 -> 1.045).
_TILE_BYTES = {4: 16384, 2: 8192}
_SPLIT_PROGRAMS_PER_SM = {4: 4, 2: 4}
# Split counts per channel block: rounded up (False, every figure in RESULTS.md so far), or rounded down so that
# num_channel_blocks x splits <= programs per SM x SMs, one wave. Rounded up, a channel-block count that does not
# divide 4 x 132 leaves a second wave of a few programs, each as long as the first wave's (4096x11008 last axis,
# bf16: 43 blocks x 13 = 559 programs for 528 slots). Per-tensor (one block) is the same either way. Not yet
# measured on a GPU: `tune_triton.py --one-wave 0 1` (gpu_check.sh tune).
_SPLIT_ONE_WAVE = False
_NUM_WARPS = 8  # measured on H100: 4 warps made every backward slower, by up to 3x with large tiles
# Registers per thread of backward programs, except those that visit one tile with IEEE division: 64 keeps four
# 8-warp programs resident per SM (64K registers), the split count above. Left to itself, Triton 3.6 gives the
# backward 77-80 registers (sm_90; terms kept element by element, the fast tile loop beside the IEEE one): three
# programs per SM, so the 4-per-SM split grid ran in two waves (per-tensor bf16 64x256x56x56 on H200, fwd+bwd x
# floor: fast division 1.265 -> 1.161 with the cap, IEEE 1.312 -> 1.189). One-tile IEEE programs ran faster
# uncapped (4096x4096 bf16 1.224 -> 1.188). At 64: no spills in 16-bit, a few bytes of stack in fp32 outside the
# tile loop. None: Triton's choice everywhere.
_BACKWARD_MAX_REGISTERS = 64
# Split backward programs (a channel block's tiles shared out over several programs, e.g. per-tensor) by element
# size: their tile bytes per tensor, and whether they load the next tile before the current tile's math (more
# bytes in flight per thread without larger tiles). Measured on H200 at 4 bits (RESULTS.md), backward x floor,
# per-tensor bf16 64x256x56x56 / 8x4096x4096: 8 KB tiles 1.122 / 1.081; 4 KB 1.110 / 1.059; 4 KB with prefetch
# 1.092 / 1.034. 8 KB tiles with prefetch need ~100 registers (spills at the cap of 64; 3 programs per SM
# uncapped): 1.140-1.554. fp32: 8 KB with prefetch and 16 KB without are equal within 0.007.
_SPLIT_TILE_BYTES = {4: 16384, 2: 4096}
# Forward tile bytes per tensor (one tile per program). As _TILE_BYTES until measured apart: in the backward
# sweeps above, 16-bit forward tiles of 8 KB ran 2.4-2.6% faster than 4 KB on H200 (64x256x56x56 1.200 -> 1.171x
# floor, 8x4096x4096 1.106 -> 1.077); larger forward tiles have not been measured apart from the backward's.
_FORWARD_TILE_BYTES = dict(_TILE_BYTES)
_PREFETCH = {4: False, 2: True}
# Warps of the backward's whole-row tiles (conv weights), measured on H100 on 512x512x3x3 with the rows split
# (below): 8 for both sizes (16 warps: fp32 1.145 -> 1.151x floor, bf16 1.423 -> 1.429).
_ROW_TILE_WARPS = {4: 8, 2: 8}
# Whole-row tiles as two power-of-two blocks (no masked lanes in the first; see _bwd_tiles) instead of one
# next_power_of_2(I) block: measured on H100, 512x512x3x3 fwd+bwd fp32 1.195 -> 1.145x floor, bf16 1.685 -> 1.423.
_ROW_TILE_SPLIT = True
# Rows no longer than a program's threads (a 14x14 feature map's 196 elements) take one block per row where it
# spends at most this many lanes per element; longer rows, and short rows past it, take the largest block that
# spends at most 1.10 (196: 16-element blocks, 32 bytes of bf16 per channel per access). Measured on H200,
# 64x512x14x14 per-channel along axis 1, fwd+bwd x floor at 1.10 / 1.5: fp32 4.47 / 3.40, bf16 6.84 / 5.51
# (RESULTS.md, "Innermost channel axis: the column forward, and short rows", as are the ROWS settings below).
_SHORT_ROW_MAX_WASTE = 1.5
# Innermost channels (I == 1, a transposed Linear weight) take row-block tiles (_tile_offsets' ROWS): this many
# bytes of adjacent channels (one warp's 16-byte accesses) x as many rows as the tile holds, so that a scale and
# its reciprocal, loaded and computed per channel, serve every row of the tile instead of one element.
_ROWS_TILE_WIDTH_BYTES = 512
# Elements of a ROWS backward tile at most: under the 64-register cap (sm_90, Triton 3.6) the loop spilled 48-96
# bytes at 4096 elements, none at 2048. Measured on H200, 4096x11008 last axis, backward x floor, 2048 / 4096
# elements: fp32 1.180 / 1.234, bf16 1.620 / 1.620.
_ROWS_BACKWARD_TILE = 2048
# Split ROWS backward programs prefetch their next tile by element size. Same run, 2048-element tiles, off / on:
# fp32 1.180 / 1.278, bf16 1.620 / 1.563 (bf16 spills 32 bytes with it and still gains).
_ROWS_PREFETCH = {4: False, 2: True}
# ROWS forward tile bytes per tensor: a ROWS tile's channels load their scales and reciprocals once per tile, so
# taller tiles pay. Forward x floor at 16 / 32 / 64 KB: fp32 1.138 / 1.138 / 1.164, bf16 1.333 / 1.285 / 1.366.
_ROWS_FORWARD_TILE_BYTES = {4: 32768, 2: 32768}


def _for_size(table: dict, x: Tensor) -> int:
    """``x``'s entry of a table keyed by element size; other sizes (float64) take the fp32 entry."""
    return table.get(x.element_size(), table[4])


def _tile(x: Tensor, table: Optional[dict] = None) -> int:
    """Elements per tile of ``x`` by a table of tile bytes (``_TILE_BYTES`` when None)."""
    return _for_size(_TILE_BYTES if table is None else table, x) // x.element_size()


def _block_i(inner: int, tile: int) -> int:
    """Power-of-two row block (<= tile): one block for a whole short row (``_SHORT_ROW_MAX_WASTE``), otherwise the
    largest that wastes at most 10% of lanes on a row's last block."""
    b = min(tile, triton.next_power_of_2(inner))
    if b < 16 or (b <= _NUM_WARPS * 32 and b / inner <= _SHORT_ROW_MAX_WASTE):
        return b
    best, best_waste = b, float("inf")
    while b >= 16:
        waste = triton.cdiv(inner, b) * b / inner
        if waste <= 1.10:
            return b
        if waste < best_waste:
            best, best_waste = b, waste
        b //= 2
    return best


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _device_sms(x: Tensor) -> int:
    return _num_sms(x.device.index or 0) if x.is_cuda else 4


def _rows(O: int, C: int, I: int) -> bool:
    """Whether tiles run over rows of adjacent channels (``_tile_offsets``' ROWS): an innermost channel axis."""
    return I == 1 and O > 1 and C > 1


def _rows_tile_shape(O: int, C: int, tile: int, width: int) -> Tuple[int, int, int]:
    """``(BLOCK_C, BLOCK_I, row blocks)`` of ROWS tiles: ``width`` channels (fewer if C is smaller) x rows."""
    bc = min(triton.next_power_of_2(C), width)
    bi = min(max(tile // bc, 1), triton.next_power_of_2(O))
    return bc, bi, triton.cdiv(O, bi)


def _tile_shape(C: int, I: int, tile: int) -> Tuple[int, int, int]:
    """``(largest BLOCK_C, BLOCK_I, row blocks per row)`` of tiles holding at most ``tile`` elements."""
    bi = _block_i(I, tile)
    return min(max(tile // bi, 1), triton.next_power_of_2(C)), bi, triton.cdiv(I, bi)


@functools.lru_cache(maxsize=4096)
def _plan(O: int, C: int, I: int, sms: int, tile: int, split_tile: int, splits_per_sm: int, row_tile_warps: int
          ) -> Tuple[int, int, int, int, int, bool, Optional[int], int, int]:
    """Backward grid: ``(BLOCK_C, BLOCK_I, tiles_i, num_channel_blocks, n_splits, fast_div, max_registers,
    num_warps, TAIL_I)``.

    One program per channel block when there are enough of them to fill the GPU (one launch, no partials) and
    its tiles are not tiny; otherwise each channel block's tiles (of ``split_tile`` elements) are split over
    ``n_splits`` programs and summed by a second kernel.
    """
    bc, bi, tiles_i = _tile_shape(C, I, tile)
    while bc > 1 and triton.cdiv(C, bc) < 2 * sms:
        bc //= 2
    num_cb = triton.cdiv(C, bc)
    # Short rows under many outer rows (a channel axis next to a short innermost one; I == 1 takes _rows_plan) would
    # leave each channel block's program looping over O tiles of a few elements; split programs over wide channel
    # blocks move whole rows instead.
    tiny_loop = O > 1 and bc * bi < tile // 4
    if num_cb >= 2 * sms and not tiny_loop:
        if bc == 1 and O == 1 and tiles_i > 1 and triton.next_power_of_2(I) <= 2 * tile:
            # One program per channel and a short row (a conv weight's 4608): one tile covers the row, so the
            # program waits for memory once instead of once per row block; the masked tail costs only issue,
            # which the fast division pays back.
            if _ROW_TILE_SPLIT:
                main = 1 << (I.bit_length() - 1)  # the largest power of two <= I
                tail = triton.next_power_of_2(I - main) if I > main else 0
                return bc, main, 1, num_cb, 1, True, _BACKWARD_MAX_REGISTERS, row_tile_warps, tail
            return bc, triton.next_power_of_2(I), 1, num_cb, 1, True, _BACKWARD_MAX_REGISTERS, row_tile_warps, 0
        return (bc, bi, tiles_i, num_cb, 1) + _backward_division(O * tiles_i == 1) + (_NUM_WARPS, 0)
    if I == 1:  # a single row of channels (O == 1)
        # Tiles of one element per channel hold a scale and its reciprocal per element: at 4096 elements the loop
        # spills 104-176 bytes under the register cap, at 2048 it does not (sm_90, Triton 3.6).
        split_tile = min(split_tile, 2048)
    bc, bi, tiles_i = _tile_shape(C, I, split_tile)
    num_cb = triton.cdiv(C, bc)
    tiles = O * tiles_i
    n_splits = _split_count(tiles, num_cb, splits_per_sm * sms)
    return (bc, bi, tiles_i, num_cb, n_splits) + _backward_division(tiles <= n_splits) + (_NUM_WARPS, 0)


def _split_count(tiles: int, num_cb: int, programs: int) -> int:
    """Programs over which each of ``num_cb`` channel blocks splits its ``tiles``, about ``programs`` in all."""
    per_block = programs // num_cb if _SPLIT_ONE_WAVE else triton.cdiv(programs, num_cb)
    return max(1, min(tiles, per_block))


@functools.lru_cache(maxsize=4096)
def _rows_plan(O: int, C: int, sms: int, tile: int, split_tile: int, splits_per_sm: int, width: int
               ) -> Tuple[int, int, int, int, int, bool, Optional[int], int, int]:
    """``_plan`` for ROWS tiles (``_rows``): one program per channel block when they fill the GPU, otherwise each
    block's row blocks split over programs."""
    tile, split_tile = min(tile, _ROWS_BACKWARD_TILE), min(split_tile, _ROWS_BACKWARD_TILE)
    bc, bi, tiles = _rows_tile_shape(O, C, tile, width)
    num_cb = triton.cdiv(C, bc)
    n_splits = 1
    if num_cb < 2 * sms:
        bc, bi, tiles = _rows_tile_shape(O, C, split_tile, width)
        n_splits = _split_count(tiles, num_cb, splits_per_sm * sms)
    return (bc, bi, 1, num_cb, n_splits) + _backward_division(tiles <= n_splits) + (_NUM_WARPS, 0)


@triton.jit
def _fma_probe_kernel(a_ptr):
    a = tl.load(a_ptr)
    tl.store(a_ptr, tl.fma(a, a, -(a * a)))


@functools.lru_cache(maxsize=None)
def _interpreter_fma_rounds_once() -> bool:
    """Whether the Triton interpreter's fma rounds once, as the fast division's exact residual needs. Triton 3.6's
    interpreter multiplies and adds (two roundings); with a = 1 + 2**-13, fma(a, a, -RN(a*a)) is 2**-26 when fused,
    0 when not."""
    a = torch.tensor([1.0 + 2.0 ** -13], dtype=torch.float32)
    _fma_probe_kernel[(1,)](a)
    return a.item() == 2.0 ** -26


def _fast_division_exact(x: Tensor) -> bool:
    """Compiled kernels fuse the fma (CUDA tensors); interpreted ones (CPU tensors) where the interpreter does."""
    return x.is_cuda or _interpreter_fma_rounds_once()


def _backward_division(one_tile: bool) -> Tuple[bool, Optional[int]]:
    """``(fast_div, max_registers)`` of backward programs that visit one tile or loop over several."""
    fast = (_FAST_DIV_BACKWARD == "all" or (_FAST_DIV_BACKWARD == "one-tile" and one_tile)
            or (_FAST_DIV_BACKWARD == "loops" and not one_tile))
    return fast, None if one_tile and not fast else _BACKWARD_MAX_REGISTERS


def _even(C: int, second: int, block_c: int, block_i: int) -> bool:
    """Every tile full (``second``: I, or O for ROWS tiles): the kernels then skip their masks."""
    return C % block_c == 0 and second % block_i == 0


def clear_plans() -> None:
    """Drop the cached backward plans; they read the module's settings (tests and tune_triton.py change them)."""
    _plan.cache_clear()
    _rows_plan.cache_clear()


def _launch_extent(rows: bool, O: int, C: int, I: int, bc: int, bi: int, tiles_i: int) -> Tuple[int, bool]:
    """``(tiles per channel block, every tile full)`` of a launch with these tiles; raises where the in-tile
    offsets would overflow int32."""
    if rows:
        _check_int32(bi, C, "row stride")
        return triton.cdiv(O, bi), _even(C, O, bc, bi)
    _check_int32(bc, I, "channel stride")
    return O * tiles_i, _even(C, I, bc, bi)


def _check_int32(block: int, stride: int, what: str) -> None:
    """In-tile offsets are int32: ``block`` rows or channels of ``stride`` elements must span less than 2**31."""
    if block * stride >= 2 ** 31:
        raise ValueError(f"x: a {what} of {stride} elements is too large for the triton backend")


def forward(x: Tensor, scale: Tensor, y: Tensor, qn: int, qp: int, axis: Optional[int]) -> None:
    """Write ``round(clamp(x/s)) * s`` into ``y`` (laid out like the dense ``x``); one launch."""
    O, C, I = channel_view(x, axis)
    if x.numel() == 0:
        return
    min_programs = 4 * _device_sms(x)  # small tensors: smaller tiles, so that the grid fills the GPU
    rows = _rows(O, C, I)
    tile = _tile(x, _ROWS_FORWARD_TILE_BYTES if rows else _FORWARD_TILE_BYTES)
    if rows:
        bc, bi, _ = _rows_tile_shape(O, C, tile, _ROWS_TILE_WIDTH_BYTES // x.element_size())
        tiles_i = 1
        while bi > 1 and triton.cdiv(C, bc) * triton.cdiv(O, bi) < min_programs:
            bi //= 2
    else:
        bc, bi, tiles_i = _tile_shape(C, I, tile)
        while bc > 1 and triton.cdiv(C, bc) * O * tiles_i < min_programs:
            bc //= 2
    tiles_per_cb, even = _launch_extent(rows, O, C, I, bc, bi, tiles_i)
    grid = (triton.cdiv(C, bc) * tiles_per_cb,)
    _lsq_fwd_kernel[grid](
        x, scale, y, O, C, I, tiles_i, tiles_per_cb, float(qn), float(qp),
        BLOCK_C=bc, BLOCK_I=bi, INTERPRETED_BF16=(y.dtype == torch.bfloat16 and not y.is_cuda),
        EVEN=even, FAST_DIV=_FAST_DIV_FORWARD and _fast_division_exact(x), ROWS=rows, num_warps=_NUM_WARPS,
    )


def _direct(kernel):
    return kernel


def backward(
    dy: Tensor, x: Tensor, scale: Tensor, dx: Tensor, ds: Tensor, qn: int, qp: int, axis: Optional[int], g: float,
    launch: Callable = _direct,
) -> None:
    """Write the input gradient into ``dx`` and the reduced scale gradient into ``ds`` (fp32, C values).

    ``dy``, ``x`` and ``dx`` share one dense layout. One launch when each channel block has its own program,
    two otherwise (partials, then a fixed-order sum). ``launch(kernel)`` is what gets launched:
    ``torch.library.wrap_triton`` inside a ``triton_op``, which cannot pass Triton's ``maxnreg`` (the register cap is
    then the compiler's own).
    """
    O, C, I = channel_view(x, axis)
    if x.numel() == 0:
        ds.zero_()
        return
    rows = _rows(O, C, I)
    sizes = (_device_sms(x), _tile(x), _tile(x, _SPLIT_TILE_BYTES), _for_size(_SPLIT_PROGRAMS_PER_SM, x))
    if rows:
        plan = _rows_plan(O, C, *sizes, _ROWS_TILE_WIDTH_BYTES // x.element_size())
    else:
        plan = _plan(O, C, I, *sizes, _for_size(_ROW_TILE_WARPS, x))
    bc, bi, tiles_i, num_cb, n_splits, fast_div, max_registers, num_warps, tail_i = plan
    fast_div = fast_div and _fast_division_exact(x)
    tiles_per_cb, even = _launch_extent(rows, O, C, I, bc, bi, tiles_i)
    final = n_splits == 1
    out = ds if final else torch.empty((n_splits, C), dtype=torch.float32, device=x.device)
    prefetch = _for_size(_ROWS_PREFETCH if rows else _PREFETCH, x) and not final
    register_cap = {} if launch is not _direct else {"maxnreg": max_registers}
    launch(_lsq_bwd_kernel)[(num_cb, n_splits)](
        x, dy, scale, dx, out, O, C, I, tiles_i, tiles_per_cb, n_splits, float(qn), float(qp), float(g),
        BLOCK_C=bc, BLOCK_I=bi, FINAL=final, EVEN=even, FAST_DIV=fast_div,
        TAIL_I=tail_i, TAIL_EVEN=I - bi == tail_i, PREFETCH=prefetch,
        ROWS=rows, num_warps=num_warps, **register_cap,
    )
    if not final:
        block_c = min(triton.next_power_of_2(C), 256)
        launch(_sum_partials_kernel)[(triton.cdiv(C, block_c),)](
            out, ds, C, n_splits, float(g), BLOCK_C=block_c, BLOCK_S=16, num_warps=4,
        )
