// CUDA LSQ fake quantization. Forward: one elementwise pass with 16-byte accesses. Backward: the scale
// gradient is reduced inside the kernel (registers -> warp shuffles -> shared memory, a fixed tree), one
// value per (channel, split); with more than one split a second kernel sums the splits in a fixed order.
// No atomics, no host synchronisation, the current stream, grid sized from the SM count.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>

#include "lsq.h"

namespace gaqat {
namespace {

constexpr int kThreads = 256;
constexpr int kUnroll = 4;            // vectors per thread in flight (forward)

// Backward row tiles hold 16 elements per thread whatever the width (4096 per block): a tile wider than the
// rows it covers would leave threads idle.
constexpr int bwd_unroll(int vec) { return vec >= 4 ? 16 / vec : 4; }
constexpr int64_t kSmallRow = 1024;   // rows up to this length use the channel-block kernel

// round_clamp_host's rounding (lsq.h), with _rn intrinsics so that nvcc cannot fold the two additions: two
// full-rate adds instead of rintf's conversion-pipe instruction.
__device__ __forceinline__ float round_clamp(float v, float qn, float qp) {
  constexpr float kRoundMagic = 12582912.0f;         // 1.5 * 2^23
  const float c = v < qn ? qn : (v > qp ? qp : v);  // NaN stays NaN
  return __fsub_rn(__fadd_rn(c, kRoundMagic), kRoundMagic);
}

// Scales whose reciprocal and quotients stay in float32's normal range (NaN is not among them): there the
// quotient by multiplication plus one correction equals the IEEE quotient.
__device__ __forceinline__ bool fast_div_ok(float s) {
  const float a = fabsf(s);
  return a >= 0x1p-100f && a <= 0x1p100f;
}

// x / s rounded to nearest; r = RN(1/s) is read only when FAST. FAST: q = RN(x * r) is within one ulp of
// x / s, and RN(q + RN(x - q * s) * r), the residual exact through the fma, is the correctly rounded quotient
// (Markstein's theorem; Handbook of Floating-Point Arithmetic, 2nd ed., Thm 4.14) while nothing over- or
// underflows: scales pass fast_div_ok and an infinite q is the quotient. Explicit _rn intrinsics: nvcc must
// not contract the product into the fma.
template <bool FAST>
__device__ __forceinline__ float divide(float x, float s, float r) {
  if (FAST) {
    const float q = __fmul_rn(x, r);
    return fabsf(q) < INFINITY ? __fmaf_rn(__fmaf_rn(-q, s, x), r, q) : q;
  }
  return __fdiv_rn(x, s);
}

// Which division the kernels may use (set_cuda_division): 0 the plan's choice below, 1 IEEE always, 2 fast
// wherever the scale allows it (tests and the division benchmark compare the three).
int g_division_mode = 0;
// The plan, measured on H100 (benchmarks/tune_cuda.py, RESULTS.md): fast division in the forward and in backward
// blocks that visit one tile; IEEE where a block loops (a looping kernel that may divide fast holds both
// variants and ran its 16-bit per-tensor backward up to 40% slower).
constexpr bool kFastForward = true;
constexpr bool kFastBackwardOneTile = true;
constexpr bool kFastBackwardLoop = false;
// lsq_bwd_columns_kernel holds both variants whatever it is told (the choice is a branch before its loop), so it
// divides fast wherever the scales allow.
constexpr bool kFastBackwardColumns = true;

// Launch shape. Forward blocks per SM, a grid-stride loop beyond that: 2^16, i.e. one block per 16-byte x
// kThreads x kUnroll tile (measured on H100: 8 persistent blocks per SM made the forward 5-9% slower).
// Backward blocks per SM over which a channel's tiles are split when the channels alone do not fill the GPU.
// set_cuda_launch overrides them (0 = these defaults) so that one benchmark process can compare shapes.
constexpr int kForwardBlocksPerSm = 1 << 16;
constexpr int kSplitBlocksPerSm = 8;
// The innermost-channel forward's blocks per SM (each loops down its rows, computing its reciprocals once):
// set_cuda_launch's forward_blocks_per_sm overrides this too. Measured on H200, 4096x11008 last axis, forward x
// floor at 3 / 8 / 16 / 65536 (a block per 4 rows): fp32 1.195 / 1.124 / 1.113 / 1.072, bf16 1.558 / 1.258 /
// 1.237 / 1.290.
constexpr int kForwardColumnBlocksPerSm = 16;
int g_forward_blocks_per_sm = 0;
int g_split_blocks_per_sm = 0;
int forward_blocks_per_sm() { return g_forward_blocks_per_sm > 0 ? g_forward_blocks_per_sm : kForwardBlocksPerSm; }
int split_blocks_per_sm() { return g_split_blocks_per_sm > 0 ? g_split_blocks_per_sm : kSplitBlocksPerSm; }
int forward_column_blocks_per_sm() {
  return g_forward_blocks_per_sm > 0 ? g_forward_blocks_per_sm : kForwardColumnBlocksPerSm;
}
// Backward blocks that loop over tiles may load the next tile (half the usual tile, so that two fit the
// registers) before the current tile's math: set_cuda_launch's prefetch, 0 = this default, 1 = off, 2 = on.
// Off until measured on a GPU (the Triton backend's 16-bit loop gained 1-3% fwd+bwd from it on H200).
constexpr bool kPrefetch = false;
int g_prefetch = 0;
bool prefetch() { return g_prefetch == 0 ? kPrefetch : g_prefetch == 2; }

// v, opaque to the compiler from here on, and (the memory clobber) ordered after the loads issued before it: an
// instruction that uses the scale stalls its warp until the scale has arrived, so nothing that uses it (the
// division branch, the reciprocal, whose slow path is a branch) may be scheduled ahead of a tile's loads.
__device__ __forceinline__ float after_loads(float v) {
  asm volatile("" : "+f"(v)::"memory");
  return v;
}

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Vec {
  T v[VEC];
};

// One 16-byte store of v where it fills 16 bytes, written in PTX: storing the Vec itself (or a uint4), nvcc wrote
// the backward's dx in 4- or 2-byte pieces (four to eight store instructions per vector).
template <typename T, int VEC>
__device__ __forceinline__ void store_vec(T* __restrict__ p, const Vec<T, VEC>& v) {
  if constexpr (sizeof(Vec<T, VEC>) == sizeof(uint4)) {
    uint4 w;
    memcpy(&w, &v, sizeof(w));
    asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(w.x), "r"(w.y), "r"(w.z), "r"(w.w)
                 : "memory");
  } else {
    *reinterpret_cast<Vec<T, VEC>*>(p) = v;
  }
}

// First element of this thread's vector u in a tile of kThreads * VEC * U elements (vector u of every thread,
// then vector u + 1: each vector step is one coalesced 16-byte access per thread).
template <int VEC>
__device__ __forceinline__ int vector_first(int u) { return (u * kThreads + static_cast<int>(threadIdx.x)) * VEC; }

int num_sms() {
  int device = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return sms;
}

// VEC consecutive scales from p (16-byte aligned) as 16-byte loads; VEC is 4 or 8.
template <int VEC>
__device__ __forceinline__ void load_scales(const float* __restrict__ p, float (&out)[VEC]) {
  static_assert(VEC % 4 == 0, "scales load as float4");
#pragma unroll
  for (int j = 0; j < VEC; j += 4) {
    const float4 f = *reinterpret_cast<const float4*>(p + j);
    out[j] = f.x;
    out[j + 1] = f.y;
    out[j + 2] = f.z;
    out[j + 3] = f.w;
  }
}

// ---------------------------------------------------------------------------------------------- forward
template <bool FAST, typename T, int VEC>
__device__ __forceinline__ Vec<T, VEC> quantize_vec(const Vec<T, VEC>& in, float sc, float r, float qn, float qp) {
  Vec<T, VEC> out;
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    out.v[j] = static_cast<T>(round_clamp(divide<FAST>(static_cast<float>(in.v[j]), sc, r), qn, qp) * sc);
  }
  return out;
}

// quantize_vec with a scale per element.
template <bool FAST, typename T, int VEC>
__device__ __forceinline__ Vec<T, VEC> quantize_elems(const Vec<T, VEC>& in, const float (&sc)[VEC],
                                                      const float (&r)[VEC], float qn, float qp) {
  Vec<T, VEC> out;
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    out.v[j] = static_cast<T>(round_clamp(divide<FAST>(static_cast<float>(in.v[j]), sc[j], r[j]), qn, qp) * sc[j]);
  }
  return out;
}

// n / d for n < 2^31 as a multiply-high, an add and a shift (Granlund and Montgomery; PyTorch's IntDivider): the
// GPU has no integer divider, and its emulation costs two conversions and a reciprocal per division.
struct Divider32 {
  uint32_t m, shift;
  explicit Divider32(int64_t d) : m(0), shift(0) {
    if (d < 1 || d >= (int64_t(1) << 31)) return;  // unused: the launcher takes the 64-bit path
    while ((int64_t(1) << shift) < d) ++shift;
    const uint64_t one = 1;
    const uint64_t ud = static_cast<uint64_t>(d);
    m = static_cast<uint32_t>(((one << 32) * ((one << shift) - ud)) / ud + 1);
  }
  __device__ __forceinline__ uint32_t div(uint32_t n) const { return (__umulhi(n, m) + n) >> shift; }
};

// Channel (p / I) % C of element p of the dense storage; 32-bit through the dividers when index32 (n < 2^31).
struct ChannelOf {
  int64_t C, I;
  Divider32 by_i, by_c;
  bool index32;
  __device__ __forceinline__ int64_t operator()(int64_t p) const {
    if (index32) {
      const uint32_t q = by_i.div(static_cast<uint32_t>(p));
      return q - by_c.div(q) * static_cast<uint32_t>(C);
    }
    return (p / I) % C;
  }
};

// Per-channel scales are loaded with the vectors (not one at a time as each vector is computed, which put a
// cache round trip per vector on the warp's critical path). PER_TENSOR: one scale; otherwise one per vector
// (I % VEC == 0: every vector lies in one channel, or VEC == 1).
template <typename T, int VEC, bool PER_TENSOR>
__global__ void __launch_bounds__(kThreads) lsq_fwd_kernel(const T* __restrict__ x, const float* __restrict__ s,
                                                           T* __restrict__ y, int64_t n_vec, ChannelOf channel,
                                                           float qn, float qp, bool allow_fast) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  const float s0 = PER_TENSOR ? s[0] : 0.f;
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * kThreads * kUnroll + threadIdx.x; base < n_vec;
       base += stride * kUnroll) {
    Vec<T, VEC> in[kUnroll];
    float su[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t k = base + u * kThreads;
      if (k < n_vec) {
        in[u] = reinterpret_cast<const Vec<T, VEC>*>(x)[k];
        if (!PER_TENSOR) su[u] = s[channel(k * VEC)];
      }
    }
    const float st = PER_TENSOR ? after_loads(s0) : 0.f;
    const float rt = PER_TENSOR ? __frcp_rn(st) : 0.f;
    const bool fast_t = PER_TENSOR && allow_fast && fast_div_ok(st);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t k = base + u * kThreads;
      if (k >= n_vec) continue;
      float sc = st, r = rt;
      bool fast = fast_t;
      if (!PER_TENSOR) {
        sc = su[u];
        r = __frcp_rn(sc);
        fast = allow_fast && fast_div_ok(sc);
      }
      reinterpret_cast<Vec<T, VEC>*>(y)[k] =
          fast ? quantize_vec<true>(in[u], sc, r, qn, qp) : quantize_vec<false>(in[u], sc, r, qn, qp);
    }
  }
}

// Per-channel rows of at least one vector per thread: block b quantizes tile b (chunk b % tiles_i of row
// b / tiles_i, rows in storage order, row r of channel r % C) with one scale, loaded alongside the tile, instead of
// a channel index and a scale per vector. Tiles hold n (a multiple of VEC) elements, as the backward's RowTile.
template <typename T, int VEC, int U>
__global__ void __launch_bounds__(kThreads) lsq_fwd_row_kernel(const T* __restrict__ x, const float* __restrict__ s,
                                                               T* __restrict__ y, int64_t C, int64_t I,
                                                               int64_t tiles_i, Divider32 by_tiles, Divider32 by_c,
                                                               float qn, float qp, bool allow_fast) {
  constexpr int64_t kTile = static_cast<int64_t>(kThreads) * VEC * U;
  const uint32_t b = blockIdx.x;
  const uint32_t row = by_tiles.div(b);
  const uint32_t chunk = b - row * static_cast<uint32_t>(tiles_i);
  const uint32_t c = row - by_c.div(row) * static_cast<uint32_t>(C);
  const int64_t offset = static_cast<int64_t>(row) * I + chunk * kTile;
  const int n = static_cast<int>(::min(I - chunk * kTile, kTile));
  const float s_loaded = s[c];
  Vec<T, VEC> in[U];
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int i = vector_first<VEC>(u);
    if (i < n) in[u] = *reinterpret_cast<const Vec<T, VEC>*>(x + offset + i);
  }
  const float sc = after_loads(s_loaded);
  const float r = __frcp_rn(sc);
  const bool fast = allow_fast && fast_div_ok(sc);
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int i = vector_first<VEC>(u);
    if (i < n)
      store_vec(y + offset + i,
                fast ? quantize_vec<true>(in[u], sc, r, qn, qp) : quantize_vec<false>(in[u], sc, r, qn, qp));
  }
}

// Innermost channels (I == 1, C % VEC == 0: a transposed Linear weight, a channels-last activation per channel): a
// thread owns the VEC consecutive channels of one 16-byte column and walks down the rows, so a scale's reciprocal
// and fast-division check are computed once per thread, not per element, and there is no per-element channel
// index. A block is kColRows row groups of one warp each (a warp reads 512 contiguous bytes of a row) covering
// kWidth channels; block (b, split) visits row steps split, split + n_splits, ... of kColRows * R rows (R rows
// per thread in flight).
constexpr int kColRows = kThreads / 32;

template <int VEC, int R_ = 16 / VEC>
struct Columns {
  static constexpr int R = R_;  // backward: 16 elements of x and of dy per thread in flight, as RowTile
  static constexpr int64_t kWidth = 32 * VEC;
  static constexpr int64_t kRowStep = kColRows * R;
};
// The forward's: kUnroll rows of x per thread in flight, as lsq_fwd_kernel.
template <int VEC>
using ForwardColumns = Columns<VEC, kUnroll>;

template <bool FAST, typename T, int VEC>
__device__ __forceinline__ void quantize_column(const T* __restrict__ x, T* __restrict__ y, const float (&sc)[VEC],
                                                const float (&r)[VEC], int64_t c, int64_t O, int64_t C, int n_splits,
                                                float qn, float qp) {
  constexpr int R = ForwardColumns<VEC>::R;
  constexpr int64_t kStep = ForwardColumns<VEC>::kRowStep;
  for (int64_t o0 = blockIdx.y * kStep + threadIdx.x / 32; o0 < O; o0 += n_splits * kStep) {
    Vec<T, VEC> in[R];
#pragma unroll
    for (int u = 0; u < R; ++u) {
      const int64_t o = o0 + u * kColRows;
      if (o < O) in[u] = *reinterpret_cast<const Vec<T, VEC>*>(x + o * C + c);
    }
#pragma unroll
    for (int u = 0; u < R; ++u) {
      const int64_t o = o0 + u * kColRows;
      if (o < O) store_vec(y + o * C + c, quantize_elems<FAST>(in[u], sc, r, qn, qp));
    }
  }
}

// A thread's channels choose their division once: the fast one unless one of its VEC scales is out of its range.
// Three blocks per SM: 62-80 registers, no spills (at four, 64 registers, bf16 spilled 16 bytes).
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads, 3) lsq_fwd_columns_kernel(
    const T* __restrict__ x, const float* __restrict__ s, T* __restrict__ y, int64_t O, int64_t C, int n_splits,
    float qn, float qp, bool allow_fast) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * ForwardColumns<VEC>::kWidth + (threadIdx.x % 32) * VEC;
  if (c >= C) return;
  float sc[VEC], r[VEC];
  load_scales<VEC>(s + c, sc);
  bool fast = allow_fast;
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    r[j] = __frcp_rn(sc[j]);
    fast = fast && fast_div_ok(sc[j]);
  }
  if (fast) quantize_column<true, T, VEC>(x, y, sc, r, c, O, C, n_splits, qn, qp);
  else quantize_column<false, T, VEC>(x, y, sc, r, c, O, C, n_splits, qn, qp);
}

// --------------------------------------------------------------------------------------------- backward
template <bool FAST, typename T>
__device__ __forceinline__ float lsq_grad(T xv, T dyv, float sc, float r, float qn, float qp, T& dxv) {
  const float v = divide<FAST>(static_cast<float>(xv), sc, r);
  const bool inside = v >= qn && v <= qp;
  const float q = round_clamp(v, qn, qp);
  dxv = inside ? dyv : static_cast<T>(0.f);
  return static_cast<float>(dyv) * (q - (inside ? v : 0.f));
}

// Fixed-order block sum; the result is valid in thread 0.
__device__ __forceinline__ float block_sum(float v, float* smem) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  if (threadIdx.x == 0) {
    v = 0.f;
    for (int w = 0; w < kThreads / 32; ++w) v += smem[w];
  }
  return v;
}

// Channel c's summed scale gradient: g times it as the gradient itself (one split), or the raw sum as split
// `split`'s partial (sum_partials_* add the splits and apply g). Every backward kernel writes through this.
__device__ __forceinline__ void write_channel_sum(float* __restrict__ out, float total, int64_t c, int64_t split,
                                                  int64_t C, float g, bool final_write) {
  if (final_write) out[c] = total * g;
  else out[split * C + c] = total;
}

// Thread 0 writes the block's sum as channel c's (write_channel_sum).
__device__ __forceinline__ void write_block_sum(float acc, float* smem, float* __restrict__ out, int64_t c, int split,
                                                int64_t C, float g, bool final_write) {
  acc = block_sum(acc, smem);
  if (threadIdx.x == 0) write_channel_sum(out, acc, c, split, C, g, final_write);
}

// Long rows (and per-tensor): block (c, split) walks tiles of channel c's rows; tile t is row t / tiles_i,
// chunk t % tiles_i of kThreads * VEC * U elements (< 2^31: in-tile offsets are int). A tile's element count n is
// a multiple of VEC (the vector kernels need I % VEC == 0), so a thread's vector is either whole or absent: no
// element-wise tail. That also keeps 16-bit vectors packed: where a vector path joined an element-wise one, nvcc
// unpacked each vector into 16-bit registers as soon as its load returned, and the warp waited for it before
// issuing the next vector's loads.
template <typename T, int VEC, int U>
struct RowTile {
  static constexpr int64_t kSize = static_cast<int64_t>(kThreads) * VEC * U;
  Vec<T, VEC> x[U], g[U];

  // Reads the tile's n elements at xt and gt.
  __device__ __forceinline__ void load(const T* __restrict__ xt, const T* __restrict__ gt, int n) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int i = vector_first<VEC>(u);
      if (i < n) {
        x[u] = *reinterpret_cast<const Vec<T, VEC>*>(xt + i);
        g[u] = *reinterpret_cast<const Vec<T, VEC>*>(gt + i);
      }
    }
  }

  // Writes the tile's dx at dt and adds this thread's terms of the scale-gradient sum to acc.
  template <bool FAST>
  __device__ __forceinline__ void apply(T* __restrict__ dt, int n, float sc, float r, float qn, float qp,
                                        float& acc) const {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int i = vector_first<VEC>(u);
      if (i < n) {
        Vec<T, VEC> d;
#pragma unroll
        for (int j = 0; j < VEC; ++j) acc += lsq_grad<FAST>(x[u].v[j], g[u].v[j], sc, r, qn, qp, d.v[j]);
        store_vec(dt + i, d);
      }
    }
  }
};

// Offset of tile t's first element and its number of elements.
template <int64_t kTile>
__device__ __forceinline__ int64_t tile_offset(int64_t t, int64_t c, int64_t C, int64_t I, int64_t tiles_i, int& n) {
  const int64_t o = t / tiles_i, chunk = t % tiles_i;
  n = static_cast<int>(::min(I - chunk * kTile, kTile));
  return (o * C + c) * I + chunk * kTile;
}

// Every tile of block (c, split), in turn. Returns this thread's share of the sum.
template <bool FAST, typename T, int VEC, int U>
__device__ __forceinline__ float row_tiles(const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ dx,
                                           float sc, float r, int64_t c, int64_t O, int64_t C, int64_t I,
                                           int64_t tiles_i, int split, int n_splits, float qn, float qp) {
  using Tile = RowTile<T, VEC, U>;
  float acc = 0.f;
  for (int64_t t = split; t < O * tiles_i; t += n_splits) {
    int n;
    const int64_t offset = tile_offset<Tile::kSize>(t, c, C, I, tiles_i, n);
    Tile tile;
    tile.load(x + offset, dy + offset, n);
    tile.template apply<FAST>(dx + offset, n, sc, r, qn, qp, acc);
  }
  return acc;
}

// row_tiles, with each next tile's loads issued before the current tile's math: the loads are in flight while
// it computes. Only for blocks that loop (a block that visits one tile has nothing to overlap).
template <bool FAST, typename T, int VEC, int U>
__device__ __forceinline__ float row_tiles_prefetched(const T* __restrict__ dy, const T* __restrict__ x,
                                                      T* __restrict__ dx, float sc, float r, int64_t c, int64_t O,
                                                      int64_t C, int64_t I, int64_t tiles_i, int split, int n_splits,
                                                      float qn, float qp) {
  using Tile = RowTile<T, VEC, U>;
  const int64_t tiles = O * tiles_i;
  float acc = 0.f;
  int n;
  int64_t offset = tile_offset<Tile::kSize>(split, c, C, I, tiles_i, n);
  Tile tile;
  tile.load(x + offset, dy + offset, n);
  for (int64_t t = split; t < tiles; t += n_splits) {
    Tile next;
    int next_n = 0;
    int64_t next_offset = 0;
    if (t + n_splits < tiles) {
      next_offset = tile_offset<Tile::kSize>(t + n_splits, c, C, I, tiles_i, next_n);
      next.load(x + next_offset, dy + next_offset, next_n);
    }
    tile.template apply<FAST>(dx + offset, n, sc, r, qn, qp, acc);
    tile = next;
    offset = next_offset;
    n = next_n;
  }
  return acc;
}

// Blocks that loop over tiles, and one-tile blocks under IEEE division (set_cuda_division; otherwise
// lsq_bwd_one_tile_kernel below). Four blocks per SM (at most 64 registers, no spills): 4 x 132 row blocks (a
// 512-channel conv weight) run in one wave; capped at 40 or 32 registers (6 or 8 blocks per SM) the kernels spill and
// ran 10-100% slower on H100. MAY_FAST is a template argument so that a kernel launched for IEEE division holds only
// that variant. The branch on the scale comes before the tile loop: inside it, the loaded tile would stay live
// across both variants (72 instead of 62 registers for bf16, one-tile rows 4-5% slower on H100).
template <typename T, int VEC, int U, bool MAY_FAST, bool PREFETCH = false>
__global__ void __launch_bounds__(kThreads, 4) lsq_bwd_row_kernel(
    const T* __restrict__ dy, const T* __restrict__ x, const float* __restrict__ s, T* __restrict__ dx,
    float* __restrict__ out, int64_t O, int64_t C, int64_t I, int64_t tiles_i, int n_splits, float qn, float qp,
    float g, bool final_write) {
  __shared__ float smem[kThreads / 32];
  const int64_t c = blockIdx.x;
  const int split = blockIdx.y;
  const float sc = s[c];
  const float r = __frcp_rn(sc);
  float acc;
  if (PREFETCH)
    acc = MAY_FAST && fast_div_ok(sc)
              ? row_tiles_prefetched<true, T, VEC, U>(dy, x, dx, sc, r, c, O, C, I, tiles_i, split, n_splits, qn, qp)
              : row_tiles_prefetched<false, T, VEC, U>(dy, x, dx, sc, r, c, O, C, I, tiles_i, split, n_splits, qn, qp);
  else
    acc = MAY_FAST && fast_div_ok(sc)
              ? row_tiles<true, T, VEC, U>(dy, x, dx, sc, r, c, O, C, I, tiles_i, split, n_splits, qn, qp)
              : row_tiles<false, T, VEC, U>(dy, x, dx, sc, r, c, O, C, I, tiles_i, split, n_splits, qn, qp);
  write_block_sum(acc, smem, out, c, split, C, g, final_write);
}

// Blocks that visit at most one tile, dividing fast: the tile's loads are issued with the scale's instead of
// after it has arrived (a second memory round trip per block, which 16-bit tiles of 4096 elements did not hide).
// A scale outside the fast division's range reads the tile again with IEEE division: keeping the loaded tile
// live across both division variants would raise the registers per thread (see lsq_bwd_row_kernel). Four
// blocks per SM: at most 64 registers (fp32 takes 76 uncapped), no spills; five fit 16-bit tiles in 48 registers
// without spills but ran 1-5% slower on H100.
template <typename T, int VEC, int U>
__global__ void __launch_bounds__(kThreads, 4) lsq_bwd_one_tile_kernel(
    const T* __restrict__ dy, const T* __restrict__ x, const float* __restrict__ s, T* __restrict__ dx,
    float* __restrict__ out, int64_t O, int64_t C, int64_t I, int64_t tiles_i, int n_splits, float qn, float qp,
    float g, bool final_write) {
  __shared__ float smem[kThreads / 32];
  const int64_t c = blockIdx.x;
  const int split = blockIdx.y;
  float acc = 0.f;
  if (split < O * tiles_i) {
    using Tile = RowTile<T, VEC, U>;
    const float s_loaded = s[c];
    int n;
    const int64_t offset = tile_offset<Tile::kSize>(split, c, C, I, tiles_i, n);
    Tile tile;
    tile.load(x + offset, dy + offset, n);
    const float sc = after_loads(s_loaded);
    if (fast_div_ok(sc))
      tile.template apply<true>(dx + offset, n, sc, __frcp_rn(sc), qn, qp, acc);
    else
      acc = row_tiles<false, T, VEC, U>(dy, x, dx, sc, 0.f, c, O, C, I, tiles_i, split, n_splits, qn, qp);
  }
  write_block_sum(acc, smem, out, c, split, C, g, final_write);
}

// Short rows (I <= kSmallRow): a block owns `cb` channels whose rows are contiguous for each o, so thread k
// always sees position k of that span (channel k / I) and keeps its sums in registers across rows.
constexpr int kSlots = kSmallRow / kThreads;

template <bool FAST, typename T>
__device__ __forceinline__ void short_rows(const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ dx,
                                           const float (&sc)[kSlots], const float (&r)[kSlots], float (&acc)[kSlots],
                                           int64_t c0, int64_t span, int64_t O, int64_t C, int64_t I, int n_splits,
                                           float qn, float qp) {
  for (int64_t o = blockIdx.y; o < O; o += n_splits) {
    const int64_t base = (o * C + c0) * I;
    // Every slot's loads before the first store: interleaved, nvcc kept one load of each in flight.
    T xv[kSlots], gv[kSlots];
#pragma unroll
    for (int j = 0; j < kSlots; ++j) {
      const int64_t k = j * kThreads + threadIdx.x;
      if (k < span) {
        xv[j] = x[base + k];
        gv[j] = dy[base + k];
      }
    }
#pragma unroll
    for (int j = 0; j < kSlots; ++j) {
      const int64_t k = j * kThreads + threadIdx.x;
      if (k < span) {
        T d;
        acc[j] += lsq_grad<FAST>(xv[j], gv[j], sc[j], r[j], qn, qp, d);
        dx[base + k] = d;
      }
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) lsq_bwd_short_kernel(
    const T* __restrict__ dy, const T* __restrict__ x, const float* __restrict__ s, T* __restrict__ dx,
    float* __restrict__ out, int64_t O, int64_t C, int64_t I, int64_t cb, int n_splits, float qn, float qp,
    float g, bool final_write, bool allow_fast) {
  __shared__ float sums[kSmallRow];
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * cb;
  const int64_t nc = min(cb, C - c0);
  const int64_t span = nc * I;
  float acc[kSlots], sc[kSlots], r[kSlots];
  bool ok = true;
#pragma unroll
  for (int j = 0; j < kSlots; ++j) {
    const int64_t k = j * kThreads + threadIdx.x;
    acc[j] = 0.f;
    sc[j] = k < span ? s[c0 + k / I] : 1.f;
    r[j] = __frcp_rn(sc[j]);
    ok = ok && fast_div_ok(sc[j]);
  }
  // One division variant for the whole block: a per-element choice would keep both in the loop.
  if (__syncthreads_and(allow_fast && ok)) {
    short_rows<true>(dy, x, dx, sc, r, acc, c0, span, O, C, I, n_splits, qn, qp);
  } else {
    short_rows<false>(dy, x, dx, sc, r, acc, c0, span, O, C, I, n_splits, qn, qp);
  }
#pragma unroll
  for (int j = 0; j < kSlots; ++j) sums[j * kThreads + threadIdx.x] = acc[j];
  __syncthreads();
  // A channel's I sums: a warp each (lanes stride the row, then a fixed-order shuffle) where rows are long enough
  // that one thread's serial walk would keep the block waiting, a thread each otherwise.
  const auto write = [&](int64_t cl, float total) {
    write_channel_sum(out, total, c0 + cl, blockIdx.y, C, g, final_write);
  };
  if (I >= 32) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    for (int64_t cl = warp; cl < nc; cl += kThreads / 32) {
      float total = 0.f;
      for (int64_t i = lane; i < I; i += 32) total += sums[cl * I + i];
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) total += __shfl_down_sync(0xffffffffu, total, off);
      if (lane == 0) write(cl, total);
    }
  } else {
    for (int64_t cl = threadIdx.x; cl < nc; cl += kThreads) {
      float total = 0.f;
      for (int64_t i = 0; i < I; ++i) total += sums[cl * I + i];
      write(cl, total);
    }
  }
}

// Innermost channels in the backward (Columns above): each thread sums its channels' terms in registers down the
// rows, and the block adds its row groups' sums in a fixed order at the end.
template <bool FAST, typename T, int VEC>
__device__ __forceinline__ void column_rows(const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ dx,
                                            const float (&sc)[VEC], const float (&r)[VEC], float (&acc)[VEC],
                                            int64_t c, int64_t O, int64_t C, int n_splits, float qn, float qp) {
  constexpr int R = Columns<VEC>::R;
  constexpr int64_t kStep = Columns<VEC>::kRowStep;
  const int64_t group = threadIdx.x / 32;
  for (int64_t o0 = blockIdx.y * kStep + group; o0 < O; o0 += n_splits * kStep) {
    Vec<T, VEC> xv[R], gv[R];
#pragma unroll
    for (int u = 0; u < R; ++u) {
      const int64_t o = o0 + u * kColRows;
      if (o < O) {
        xv[u] = *reinterpret_cast<const Vec<T, VEC>*>(x + o * C + c);
        gv[u] = *reinterpret_cast<const Vec<T, VEC>*>(dy + o * C + c);
      }
    }
#pragma unroll
    for (int u = 0; u < R; ++u) {
      const int64_t o = o0 + u * kColRows;
      if (o < O) {
        Vec<T, VEC> d;
#pragma unroll
        for (int j = 0; j < VEC; ++j) acc[j] += lsq_grad<FAST>(xv[u].v[j], gv[u].v[j], sc[j], r[j], qn, qp, d.v[j]);
        store_vec(dx + o * C + c, d);
      }
    }
  }
}

// Three blocks per SM: at most 80 registers, no spills (capped at 64 for four, bf16 spilled 56 bytes, fp32 16).
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads, 3) lsq_bwd_columns_kernel(
    const T* __restrict__ dy, const T* __restrict__ x, const float* __restrict__ s, T* __restrict__ dx,
    float* __restrict__ out, int64_t O, int64_t C, int n_splits, float qn, float qp, float g, bool final_write,
    bool allow_fast) {
  constexpr int64_t kWidth = Columns<VEC>::kWidth;
  __shared__ float sums[kColRows][kWidth];
  const int lane = threadIdx.x % 32, group = threadIdx.x / 32;
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * kWidth;
  const int64_t c = c0 + lane * VEC;
  const bool active = c < C;
  float sc[VEC], r[VEC], acc[VEC];
  if (active) {
    load_scales<VEC>(s + c, sc);
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j) sc[j] = 1.f;
  }
  bool ok = true;
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    r[j] = __frcp_rn(sc[j]);
    acc[j] = 0.f;
    ok = ok && fast_div_ok(sc[j]);
  }
  // One division variant for the whole block, as lsq_bwd_short_kernel.
  if (__syncthreads_and(allow_fast && ok)) {
    if (active) column_rows<true, T, VEC>(dy, x, dx, sc, r, acc, c, O, C, n_splits, qn, qp);
  } else {
    if (active) column_rows<false, T, VEC>(dy, x, dx, sc, r, acc, c, O, C, n_splits, qn, qp);
  }
#pragma unroll
  for (int j = 0; j < VEC; ++j) sums[group][lane * VEC + j] = acc[j];
  __syncthreads();
  for (int64_t k = threadIdx.x; k < kWidth && c0 + k < C; k += kThreads) {
    float total = 0.f;
#pragma unroll
    for (int q = 0; q < kColRows; ++q) total += sums[q][k];
    write_channel_sum(out, total, c0 + k, blockIdx.y, C, g, final_write);
  }
}

// ds[c] = g * sum over splits of partial[split, c], one block per channel, fixed tree.
__global__ void __launch_bounds__(kThreads) sum_partials_kernel(const float* __restrict__ partial,
                                                                float* __restrict__ ds, int64_t C, int n_splits,
                                                                float g) {
  __shared__ float smem[kThreads / 32];
  const int64_t c = blockIdx.x;
  float acc = 0.f;
  for (int k = threadIdx.x; k < n_splits; k += kThreads) acc += partial[static_cast<int64_t>(k) * C + c];
  acc = block_sum(acc, smem);
  if (threadIdx.x == 0) ds[c] = acc * g;
}

// The same sum for many channels and few splits (lsq_bwd_columns_kernel): a thread per channel adds the splits in
// order, reads coalesced across channels (a block per channel reads one float per 32-byte sector there).
__global__ void __launch_bounds__(kThreads) sum_partials_by_channel_kernel(const float* __restrict__ partial,
                                                                           float* __restrict__ ds, int64_t C,
                                                                           int n_splits, float g) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (c >= C) return;
  float acc = 0.f;
  for (int k = 0; k < n_splits; ++k) acc += partial[static_cast<int64_t>(k) * C + c];
  ds[c] = acc * g;
}

bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

// Innermost channels whose scales load as vectors beside the data's (the data's own alignment is checked apart).
template <int VEC>
bool inner_channel_vectors(const at::Tensor& scale, int64_t C, int64_t I) {
  return C > 1 && I == 1 && C % VEC == 0 && aligned16(scale);
}

// Division per launch: fast (Markstein) where g_division_mode or, by default, the plan allows it.
bool allow_fast(bool plan) { return g_division_mode == 2 || (g_division_mode == 0 && plan); }

// Tiles of long rows: U vectors per thread, or a wide tile (kWideU) where that makes the row of a single-row
// channel (O == 1) one tile: every load of the row is then in flight at once instead of a second, mostly idle
// round (a conv weight's 4608-element rows). Wide: 1.25 U for 16-byte fp32 vectors (5120 elements; with 1.5 U
// the kernel spilled under its 64-register cap), 1.5 U otherwise; not 2 U: twice the registers would halve the
// blocks per SM.
template <int VEC>
struct RowTiles {
  static constexpr int U = bwd_unroll(VEC);
  static constexpr int kWideU = VEC == 4 ? U + U / 4 : U + U / 2;
  static constexpr int kPrefetchU = U > 1 ? U / 2 : 1;  // two tiles in registers at once
  static constexpr int64_t kTile = static_cast<int64_t>(kThreads) * VEC * U;
  static constexpr int64_t kPrefetchTile = static_cast<int64_t>(kThreads) * VEC * kPrefetchU;
  bool wide;
  int64_t tiles_i;  // tiles per row
  int64_t prefetch_tiles_i;  // tiles per row of kPrefetchTile elements
  RowTiles(int64_t O, int64_t I)
      : wide(O == 1 && I > kTile && I <= kTile * kWideU / U), tiles_i(wide ? 1 : (I + kTile - 1) / kTile),
        prefetch_tiles_i((I + kPrefetchTile - 1) / kPrefetchTile) {}
};

// Blocks over which each of blocks_c channel blocks splits its work (rows, tiles) when the channel blocks alone do
// not fill the GPU: about blocks_per_sm per SM, at most one per unit of work and 65535 (the grid's y limit).
int split_count(int64_t blocks_c, int64_t work, int64_t sms, int64_t blocks_per_sm) {
  if (blocks_c >= 2 * sms) return 1;
  return static_cast<int>(
      std::max<int64_t>(1, std::min<int64_t>({work, (blocks_per_sm * sms + blocks_c - 1) / blocks_c, 65535})));
}

template <typename T>
void launch_forward(const at::Tensor& x, const at::Tensor& scale, at::Tensor& y, int64_t O, int64_t C, int64_t I,
                    float qn, float qp) {
  constexpr int VEC = 16 / sizeof(T);
  const int64_t n = x.numel();
  const bool per_tensor = C == 1;
  const bool aligned = aligned16(x) && aligned16(y);
  const bool vec = aligned && n % VEC == 0 && (per_tensor || I % VEC == 0);
  auto stream = c10::cuda::getCurrentCUDAStream();
  const bool fast = allow_fast(kFastForward);
  if (aligned && inner_channel_vectors<VEC>(scale, C, I)) {
    using Cols = ForwardColumns<VEC>;
    const int64_t blocks_c = (C + Cols::kWidth - 1) / Cols::kWidth;
    const int n_splits = split_count(blocks_c, (O + Cols::kRowStep - 1) / Cols::kRowStep, num_sms(),
                                     forward_column_blocks_per_sm());
    lsq_fwd_columns_kernel<T, VEC><<<dim3(static_cast<unsigned>(blocks_c), static_cast<unsigned>(n_splits)), kThreads,
                                     0, stream>>>(x.data_ptr<T>(), scale.data_ptr<float>(), y.data_ptr<T>(), O, C,
                                                  n_splits, qn, qp, fast);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  const RowTiles<VEC> tiles(O, I);
  const int64_t row_blocks = O * C * tiles.tiles_i;
  if (vec && !per_tensor && I >= static_cast<int64_t>(kThreads) * VEC && row_blocks < (int64_t(1) << 31)) {
    const Divider32 by_tiles(tiles.tiles_i), by_c(C);
    const T* xp = x.data_ptr<T>();
    T* yp = y.data_ptr<T>();
    if (tiles.wide)
      lsq_fwd_row_kernel<T, VEC, RowTiles<VEC>::kWideU><<<static_cast<unsigned>(row_blocks), kThreads, 0, stream>>>(
          xp, scale.data_ptr<float>(), yp, C, I, tiles.tiles_i, by_tiles, by_c, qn, qp, fast);
    else
      lsq_fwd_row_kernel<T, VEC, RowTiles<VEC>::U><<<static_cast<unsigned>(row_blocks), kThreads, 0, stream>>>(
          xp, scale.data_ptr<float>(), yp, C, I, tiles.tiles_i, by_tiles, by_c, qn, qp, fast);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  const int64_t n_vec = vec ? n / VEC : n;
  const int64_t per_block = static_cast<int64_t>(kThreads) * kUnroll;
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>((n_vec + per_block - 1) / per_block,
                                                                 num_sms() * int64_t(forward_blocks_per_sm())));
  const T* xp = x.data_ptr<T>();
  const float* sp = scale.data_ptr<float>();
  T* yp = y.data_ptr<T>();
  const ChannelOf channel{C, I, Divider32(I), Divider32(C), n < (int64_t(1) << 31)};
  if (vec && per_tensor)
    lsq_fwd_kernel<T, VEC, true><<<blocks, kThreads, 0, stream>>>(xp, sp, yp, n_vec, channel, qn, qp, fast);
  else if (vec)
    lsq_fwd_kernel<T, VEC, false><<<blocks, kThreads, 0, stream>>>(xp, sp, yp, n_vec, channel, qn, qp, fast);
  else if (per_tensor)
    lsq_fwd_kernel<T, 1, true><<<blocks, kThreads, 0, stream>>>(xp, sp, yp, n_vec, channel, qn, qp, fast);
  else
    lsq_fwd_kernel<T, 1, false><<<blocks, kThreads, 0, stream>>>(xp, sp, yp, n_vec, channel, qn, qp, fast);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int VEC, int U>
void launch_row_kernel(bool fast, bool one_tile, const dim3& grid, cudaStream_t stream, const T* dyp, const T* xp,
                       const float* sp, T* dxp, float* outp, int64_t O, int64_t C, int64_t I, int64_t tiles_i,
                       int n_splits, float qn, float qp, float g, bool final_write) {
  if (fast && one_tile)
    lsq_bwd_one_tile_kernel<T, VEC, U><<<grid, kThreads, 0, stream>>>(
        dyp, xp, sp, dxp, outp, O, C, I, tiles_i, n_splits, qn, qp, g, final_write);
  else if (fast)
    lsq_bwd_row_kernel<T, VEC, U, true><<<grid, kThreads, 0, stream>>>(
        dyp, xp, sp, dxp, outp, O, C, I, tiles_i, n_splits, qn, qp, g, final_write);
  else
    lsq_bwd_row_kernel<T, VEC, U, false><<<grid, kThreads, 0, stream>>>(
        dyp, xp, sp, dxp, outp, O, C, I, tiles_i, n_splits, qn, qp, g, final_write);
}

template <typename T, int VEC>
void launch_rows(const RowTiles<VEC>& tiles, const dim3& grid, cudaStream_t stream, const T* dyp, const T* xp,
                 const float* sp, T* dxp, float* outp, int64_t O, int64_t C, int64_t I, int n_splits, float qn,
                 float qp, float g, bool final_write) {
  const bool one_tile = O * tiles.tiles_i <= n_splits;
  const bool fast = allow_fast(one_tile ? kFastBackwardOneTile : kFastBackwardLoop);
  if (tiles.wide)
    launch_row_kernel<T, VEC, RowTiles<VEC>::kWideU>(fast, one_tile, grid, stream, dyp, xp, sp, dxp, outp, O, C,
                                                        I, 1, n_splits, qn, qp, g, final_write);
  else
    launch_row_kernel<T, VEC, RowTiles<VEC>::U>(fast, one_tile, grid, stream, dyp, xp, sp, dxp, outp, O, C, I,
                                                    tiles.tiles_i, n_splits, qn, qp, g, final_write);
}

template <typename T>
void launch_backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& scale, at::Tensor& dx,
                     at::Tensor& ds, int64_t O, int64_t C, int64_t I, float qn, float qp, float g) {
  constexpr int VEC = 16 / sizeof(T);
  const int64_t sms = num_sms();
  auto stream = c10::cuda::getCurrentCUDAStream();
  const bool aligned = aligned16(x) && aligned16(dy) && aligned16(dx);
  const bool columns = aligned && inner_channel_vectors<VEC>(scale, C, I);
  const bool short_rows = !columns && C > 1 && I <= kSmallRow;
  const bool vec = aligned && I % VEC == 0;
  const RowTiles<VEC> vec_tiles(O, I);
  const RowTiles<1> scalar_tiles(O, I);
  int64_t blocks_c, work_per_c, cb = 1;
  if (columns) {
    blocks_c = (C + Columns<VEC>::kWidth - 1) / Columns<VEC>::kWidth;
    work_per_c = (O + Columns<VEC>::kRowStep - 1) / Columns<VEC>::kRowStep;
  } else if (short_rows) {
    cb = std::max<int64_t>(1, kSmallRow / I);
    blocks_c = (C + cb - 1) / cb;
    work_per_c = O;
  } else {
    blocks_c = C;
    work_per_c = O * (vec ? vec_tiles.tiles_i : scalar_tiles.tiles_i);
  }
  const auto splits_for = [&](int64_t work) { return split_count(blocks_c, work, sms, split_blocks_per_sm()); };
  int n_splits = splits_for(work_per_c);
  // Prefetching blocks: split rows that still loop over several of the smaller tiles.
  const int64_t prefetch_work = O * vec_tiles.prefetch_tiles_i;
  const bool prefetching = !columns && !short_rows && vec && prefetch() && !vec_tiles.wide && blocks_c < 2 * sms &&
                           prefetch_work > splits_for(prefetch_work);
  if (prefetching) n_splits = splits_for(prefetch_work);
  const bool final_write = n_splits == 1;
  at::Tensor partial = final_write ? ds : at::empty({n_splits, C}, x.options().dtype(at::kFloat));
  float* outp = partial.data_ptr<float>();
  const dim3 grid(static_cast<unsigned>(blocks_c), static_cast<unsigned>(n_splits));
  const T* dyp = dy.data_ptr<T>();
  const T* xp = x.data_ptr<T>();
  const float* sp = scale.data_ptr<float>();
  T* dxp = dx.data_ptr<T>();
  if (columns) {
    const bool fast = allow_fast(kFastBackwardColumns);
    lsq_bwd_columns_kernel<T, VEC><<<grid, kThreads, 0, stream>>>(dyp, xp, sp, dxp, outp, O, C, n_splits, qn, qp, g,
                                                                  final_write, fast);
  } else if (short_rows) {
    const bool fast = allow_fast(O <= n_splits ? kFastBackwardOneTile : kFastBackwardLoop);
    lsq_bwd_short_kernel<T><<<grid, kThreads, 0, stream>>>(dyp, xp, sp, dxp, outp, O, C, I, cb, n_splits, qn, qp, g,
                                                           final_write, fast);
  } else if (prefetching) {
    constexpr int PU = RowTiles<VEC>::kPrefetchU;
    const int64_t tiles_i = vec_tiles.prefetch_tiles_i;
    if (allow_fast(kFastBackwardLoop))
      lsq_bwd_row_kernel<T, VEC, PU, true, true><<<grid, kThreads, 0, stream>>>(
          dyp, xp, sp, dxp, outp, O, C, I, tiles_i, n_splits, qn, qp, g, final_write);
    else
      lsq_bwd_row_kernel<T, VEC, PU, false, true><<<grid, kThreads, 0, stream>>>(
          dyp, xp, sp, dxp, outp, O, C, I, tiles_i, n_splits, qn, qp, g, final_write);
  } else if (vec) {
    launch_rows<T, VEC>(vec_tiles, grid, stream, dyp, xp, sp, dxp, outp, O, C, I, n_splits, qn, qp, g, final_write);
  } else {
    launch_rows<T, 1>(scalar_tiles, grid, stream, dyp, xp, sp, dxp, outp, O, C, I, n_splits, qn, qp, g, final_write);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (!final_write && columns) {
    sum_partials_by_channel_kernel<<<static_cast<unsigned>((C + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
        outp, ds.data_ptr<float>(), C, n_splits, g);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else if (!final_write) {
    sum_partials_kernel<<<static_cast<unsigned>(C), kThreads, 0, stream>>>(outp, ds.data_ptr<float>(), C, n_splits, g);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace

void set_cuda_division(int64_t mode) {
  TORCH_CHECK(mode >= 0 && mode <= 2, "set_cuda_division: mode must be 0 (plan), 1 (IEEE) or 2 (fast), got ", mode);
  g_division_mode = static_cast<int>(mode);
}

void set_cuda_launch(int64_t forward_blocks_per_sm, int64_t split_blocks_per_sm, int64_t prefetch) {
  TORCH_CHECK(forward_blocks_per_sm >= 0 && forward_blocks_per_sm <= (1 << 16),
              "set_cuda_launch: forward_blocks_per_sm must be in [0, 65536] (0 = default), got ", forward_blocks_per_sm);
  TORCH_CHECK(split_blocks_per_sm >= 0 && split_blocks_per_sm <= 64,
              "set_cuda_launch: split_blocks_per_sm must be in [0, 64] (0 = default), got ", split_blocks_per_sm);
  TORCH_CHECK(prefetch >= 0 && prefetch <= 2, "set_cuda_launch: prefetch must be 0 (default), 1 (off) or 2 (on), got ",
              prefetch);
  g_forward_blocks_per_sm = static_cast<int>(forward_blocks_per_sm);
  g_split_blocks_per_sm = static_cast<int>(split_blocks_per_sm);
  g_prefetch = static_cast<int>(prefetch);
}

void lsq_forward_cuda(const at::Tensor& x, const at::Tensor& scale, at::Tensor& y,
                      int64_t O, int64_t C, int64_t I, double qn, double qp) {
  const c10::cuda::CUDAGuard guard(x.device());
  GAQAT_DISPATCH_INPUT_TYPES(x.scalar_type(), "lsq_forward_cuda", [&] {
    launch_forward<scalar_t>(x, scale, y, O, C, I, static_cast<float>(qn), static_cast<float>(qp));
  });
}

void lsq_backward_cuda(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& scale, at::Tensor& dx,
                       at::Tensor& ds, int64_t O, int64_t C, int64_t I, double qn, double qp, double g) {
  const c10::cuda::CUDAGuard guard(x.device());
  GAQAT_DISPATCH_INPUT_TYPES(x.scalar_type(), "lsq_backward_cuda", [&] {
    launch_backward<scalar_t>(dy, x, scale, dx, ds, O, C, I, static_cast<float>(qn), static_cast<float>(qp),
                              static_cast<float>(g));
  });
}

}  // namespace gaqat
