// CPU LSQ fake quantization: OpenMP (at::parallel_for) over fixed work items; the per-row loops are
// branch-free on raw storage (float, or the 16 bits of bf16/fp16) so that they vectorise, and on x86-64 with
// GCC they are compiled for x86-64-v3 (AVX2) and x86-64-v4 (AVX-512) besides the baseline; the highest level
// the CPU has runs (set_cpu_isa can lower it, so tests run every level on one machine).
// The scale gradient is summed per work item into fp64 partials, then per channel in a fixed order, so its
// bits do not depend on the thread count (they may depend on the vector width the machine selects).
// Built with -ffp-contract=off: a fused multiply-add would change the fp16 conversion and the sums.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/bit_cast.h>
#include <c10/util/Half.h>
#include <c10/util/StringUtil.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include "lsq.h"

// GCC 12 knows the x86-64-v3/v4 level names both as targets and in __builtin_cpu_supports.
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12 && defined(__x86_64__)
#define GAQAT_X86_LEVELS 1
#else
#define GAQAT_X86_LEVELS 0
#endif

namespace gaqat {
namespace {

constexpr int64_t kItemElems = 1 << 16;  // elements per work item
constexpr int64_t kMinRowsPerItem = 1024;  // rows under 1024 elements: a partial sums >= 1024 of a channel's
constexpr int64_t kSpanRow = 64;           // rows shorter than this run as spans (below)
constexpr int64_t kSpan = 512;             // elements per call of the span loops, about
constexpr int64_t kMaxSpan = 4096;         // at most (an item's scales and sums stay small allocations)

// Rows of under kSpanRow elements (an innermost channel axis, I == 1; a conv weight per input channel, I == 9):
// the row loops would run a few elements per call (one per call for I == 1, slower than the eager reference), so
// the loops run over spans of ~kSpan elements instead: a block of adjacent channels' rows, or several whole outer
// rows when one is shorter than that, each element with its own scale from an expanded copy of the scales.
bool spans(int64_t C, int64_t I) { return C > 1 && I < kSpanRow; }

// Work items tile the (O, C, I) view as [o_chunk rows] x [c_block channels] x [i_chunk elements].
struct Plan {
  int64_t i_chunk, o_chunk, c_block, n_i, n_o, n_c;
  int64_t rows_per_span = 1;  // spans: outer rows per span (c_block == C when > 1)
  Plan(int64_t O, int64_t C, int64_t I) {
    i_chunk = std::max<int64_t>(1, std::min(I, kItemElems));
    if (spans(C, I)) {
      if (C * I < kSpan) {
        c_block = C;
        rows_per_span = std::min(O, (kSpan + C * I - 1) / (C * I));
        o_chunk = std::min(O, std::max(rows_per_span, kItemElems / (C * I) / rows_per_span * rows_per_span));
      } else {  // spans of a block of channels' rows, wider (up to kMaxSpan) where few outer rows fill an item
        o_chunk = std::min(O, kItemElems / kSpan);
        c_block = std::min({C, std::max(kSpan, std::min(kMaxSpan, kItemElems / o_chunk)) / I});
      }
    } else {
      o_chunk = std::max<int64_t>(1, std::min(O, (kMinRowsPerItem + i_chunk - 1) / i_chunk));
      c_block = std::max<int64_t>(1, std::min(C, kItemElems / (o_chunk * i_chunk)));
    }
    n_i = (I + i_chunk - 1) / i_chunk;
    n_o = (O + o_chunk - 1) / o_chunk;
    n_c = (C + c_block - 1) / c_block;
  }
  int64_t items() const { return n_i * n_o * n_c; }
};

// ------------------------------------------------------------------------------------------- row loops
// All-ones bits where `keep`, else zero: selections by masking, which vectorise where branches do not.
template <typename U>
inline U keep_mask(bool keep) {
  return static_cast<U>(U(0) - static_cast<U>(keep));
}

// IEEE half <-> float, round to nearest even, NaN kept quiet: the branch-free algorithm of the FP16 library
// (Maratos) that c10::Half also uses, with its two selections written as masks so that it vectorises
// without AVX-512. Same bits as c10::Half's conversions (the tests feed every float16 value through them).
inline float half_bits_to_float(uint16_t h) {
  const uint32_t w = static_cast<uint32_t>(h) << 16;
  const uint32_t sign = w & UINT32_C(0x80000000);
  const uint32_t two_w = w + w;
  const float exp_scale = c10::bit_cast<float>(UINT32_C(15) << 23);  // 2^-112
  const float normalized = c10::bit_cast<float>((two_w >> 4) + (UINT32_C(0xE0) << 23)) * exp_scale;
  const float denormalized = c10::bit_cast<float>((two_w >> 17) | (UINT32_C(126) << 23)) - 0.5f;
  const uint32_t denormal = keep_mask<uint32_t>(two_w < (UINT32_C(1) << 27));
  return c10::bit_cast<float>(sign | (c10::bit_cast<uint32_t>(denormalized) & denormal) |
                              (c10::bit_cast<uint32_t>(normalized) & ~denormal));
}

inline uint16_t float_to_half_bits(float f) {
  const float scale_to_inf = c10::bit_cast<float>(UINT32_C(239) << 23);  // 2^112
  const float scale_to_zero = c10::bit_cast<float>(UINT32_C(17) << 23);  // 2^-110
  float base = (std::fabs(f) * scale_to_inf) * scale_to_zero;
  const uint32_t w = c10::bit_cast<uint32_t>(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & UINT32_C(0x80000000);
  const uint32_t bias = std::max(shl1_w & UINT32_C(0xFF000000), UINT32_C(0x71000000));
  base = c10::bit_cast<float>((bias >> 1) + UINT32_C(0x07800000)) + base;
  const uint32_t bits = c10::bit_cast<uint32_t>(base);
  const uint32_t nonsign = ((bits >> 13) & UINT32_C(0x00007C00)) + (bits & UINT32_C(0x00000FFF));
  const uint32_t nan = keep_mask<uint32_t>(shl1_w > UINT32_C(0xFF000000));
  return static_cast<uint16_t>((sign >> 16) | (UINT32_C(0x7E00) & nan) | (nonsign & ~nan));
}

// Storage <-> float without branches. S is the storage word: float, or uint16_t holding bf16 / fp16 bits.
enum class Kind { F32, BF16, F16 };

template <Kind K, typename S>
inline float load(S v) {
  if constexpr (K == Kind::F32) {
    return v;
  } else if constexpr (K == Kind::BF16) {
    return c10::bit_cast<float>(static_cast<uint32_t>(v) << 16);
  } else {
    return half_bits_to_float(v);
  }
}

template <Kind K, typename S>
inline S store(float v) {
  if constexpr (K == Kind::F32) {
    return v;
  } else if constexpr (K == Kind::BF16) {
    const uint32_t u = c10::bit_cast<uint32_t>(v);  // round to nearest even; NaN -> the canonical quiet NaN
    const uint16_t r = static_cast<uint16_t>((u + UINT32_C(0x7FFF) + ((u >> 16) & 1u)) >> 16);
    return v != v ? static_cast<uint16_t>(0x7FC0) : r;
  } else {
    return float_to_half_bits(v);
  }
}

template <Kind K, typename S>
inline __attribute__((always_inline)) void forward_row_body(const S* __restrict__ x, S* __restrict__ y, int64_t n,
                                                            float sc, float qn, float qp) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] = store<K, S>(round_clamp_host(load<K>(x[i]) / sc, qn, qp) * sc);
}

// Returns the row's sum of the scale-gradient terms dy * (round(clamp(v)) - (inside ? v : 0)).
template <Kind K, typename S>
inline __attribute__((always_inline)) float backward_row_body(const S* __restrict__ dy, const S* __restrict__ x,
                                                              S* __restrict__ dx, int64_t n, float sc, float qn,
                                                              float qp) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) {
    const float v = load<K>(x[i]) / sc;
    const bool inside = (v >= qn) & (v <= qp);
    const float r = round_clamp_host(v, qn, qp);
    const S d = dy[i];
    if constexpr (K == Kind::F32) {
      dx[i] = c10::bit_cast<float>(c10::bit_cast<uint32_t>(d) & keep_mask<uint32_t>(inside));  // dy or +0.0
    } else {
      dx[i] = static_cast<S>(d & keep_mask<uint16_t>(inside));
    }
    acc += load<K>(d) * (r - c10::bit_cast<float>(c10::bit_cast<uint32_t>(v) & keep_mask<uint32_t>(inside)));
  }
  return acc;
}

// A span of n elements, scale s[i] for element i, and each element's scale-gradient term added to acc[i] (so a
// channel's sum runs over the rows in order, whatever the vector width).
template <Kind K, typename S>
inline __attribute__((always_inline)) void forward_span_body(const S* __restrict__ x, S* __restrict__ y, int64_t n,
                                                             const float* __restrict__ s, float qn, float qp) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] = store<K, S>(round_clamp_host(load<K>(x[i]) / s[i], qn, qp) * s[i]);
}

template <Kind K, typename S>
inline __attribute__((always_inline)) void backward_span_body(const S* __restrict__ dy, const S* __restrict__ x,
                                                              S* __restrict__ dx, int64_t n,
                                                              const float* __restrict__ s, double* __restrict__ acc,
                                                              float qn, float qp) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float v = load<K>(x[i]) / s[i];
    const bool inside = (v >= qn) & (v <= qp);
    const float r = round_clamp_host(v, qn, qp);
    const S d = dy[i];
    if constexpr (K == Kind::F32) {
      dx[i] = c10::bit_cast<float>(c10::bit_cast<uint32_t>(d) & keep_mask<uint32_t>(inside));
    } else {
      dx[i] = static_cast<S>(d & keep_mask<uint16_t>(inside));
    }
    acc[i] += load<K>(d) * (r - c10::bit_cast<float>(c10::bit_cast<uint32_t>(v) & keep_mask<uint32_t>(inside)));
  }
}

// The row loops of every input type, compiled once per instruction-set level.
using ForwardRow = void (*)(const void*, void*, int64_t, float, float, float);
using BackwardRow = float (*)(const void*, const void*, void*, int64_t, float, float, float);
using ForwardSpan = void (*)(const void*, void*, int64_t, const float*, float, float);
using BackwardSpan = void (*)(const void*, const void*, void*, int64_t, const float*, double*, float, float);
struct RowLoops {
  ForwardRow forward[3];  // indexed by Kind
  BackwardRow backward[3];
  ForwardSpan forward_span[3];
  BackwardSpan backward_span[3];
};

#define GAQAT_ROW_LOOPS(NAME, ATTR)                                                                       \
  template <Kind K, typename S>                                                                           \
  ATTR void forward_row_##NAME(const void* x, void* y, int64_t n, float sc, float qn, float qp) {         \
    forward_row_body<K>(static_cast<const S*>(x), static_cast<S*>(y), n, sc, qn, qp);                     \
  }                                                                                                       \
  template <Kind K, typename S>                                                                           \
  ATTR float backward_row_##NAME(const void* dy, const void* x, void* dx, int64_t n, float sc, float qn,  \
                                 float qp) {                                                              \
    return backward_row_body<K>(static_cast<const S*>(dy), static_cast<const S*>(x), static_cast<S*>(dx), \
                                n, sc, qn, qp);                                                           \
  }                                                                                                       \
  template <Kind K, typename S>                                                                           \
  ATTR void forward_span_##NAME(const void* x, void* y, int64_t n, const float* s, float qn, float qp) {  \
    forward_span_body<K>(static_cast<const S*>(x), static_cast<S*>(y), n, s, qn, qp);                     \
  }                                                                                                       \
  template <Kind K, typename S>                                                                           \
  ATTR void backward_span_##NAME(const void* dy, const void* x, void* dx, int64_t n, const float* s,      \
                                 double* acc, float qn, float qp) {                                       \
    backward_span_body<K>(static_cast<const S*>(dy), static_cast<const S*>(x), static_cast<S*>(dx), n,    \
                          s, acc, qn, qp);                                                                \
  }                                                                                                       \
  const RowLoops row_loops_##NAME = {                                                                     \
      {forward_row_##NAME<Kind::F32, float>, forward_row_##NAME<Kind::BF16, uint16_t>,                    \
       forward_row_##NAME<Kind::F16, uint16_t>},                                                          \
      {backward_row_##NAME<Kind::F32, float>, backward_row_##NAME<Kind::BF16, uint16_t>,                  \
       backward_row_##NAME<Kind::F16, uint16_t>},                                                         \
      {forward_span_##NAME<Kind::F32, float>, forward_span_##NAME<Kind::BF16, uint16_t>,                  \
       forward_span_##NAME<Kind::F16, uint16_t>},                                                         \
      {backward_span_##NAME<Kind::F32, float>, backward_span_##NAME<Kind::BF16, uint16_t>,                \
       backward_span_##NAME<Kind::F16, uint16_t>}};

GAQAT_ROW_LOOPS(baseline, )
#if GAQAT_X86_LEVELS
GAQAT_ROW_LOOPS(v3, __attribute__((target("arch=x86-64-v3"))))
GAQAT_ROW_LOOPS(v4, __attribute__((target("arch=x86-64-v4"))))
#endif

// Instruction-set levels in order; the loops use the highest the CPU has unless set_cpu_isa lowered it.
struct Level {
  const char* name;
  const RowLoops* loops;
  bool supported;
};

const std::vector<Level>& levels() {
  static const std::vector<Level> all = [] {
    std::vector<Level> out{{"baseline", &row_loops_baseline, true}};
#if GAQAT_X86_LEVELS
    __builtin_cpu_init();
    out.push_back({"x86-64-v3", &row_loops_v3, __builtin_cpu_supports("x86-64-v3") != 0});
    out.push_back({"x86-64-v4", &row_loops_v4, __builtin_cpu_supports("x86-64-v4") != 0});
#endif
    return out;
  }();
  return all;
}

const Level& best_level() {
  static const Level* best = [] {
    const Level* b = &levels()[0];
    for (const Level& l : levels())
      if (l.supported) b = &l;
    return b;
  }();
  return *best;
}

const RowLoops* g_loops = nullptr;  // null: best_level()

const RowLoops& loops() { return g_loops != nullptr ? *g_loops : *best_level().loops; }

template <typename T>
constexpr int kind_of() {
  return static_cast<int>(std::is_same<T, float>::value           ? Kind::F32
                          : std::is_same<T, c10::BFloat16>::value ? Kind::BF16
                                                                  : Kind::F16);
}

// ---------------------------------------------------------------------------------------------- kernels
// The spans of channel block cb: Plan::rows_per_span outer rows of its channels' rows each, element k of a span
// in channel c0 + (k % width) / I; and their scales, one per element. Where every element is its own channel
// (I == 1, one outer row per span), the scales are the channels' own and the sums go to their slots directly.
struct Span {
  int64_t c0, channels, I, rows;
  const float* scales;
  std::vector<float> expanded;  // the scales of the longest span, where they repeat
  Span(const Plan& p, const float* s, int64_t cb, int64_t C, int64_t I_)
      : c0(cb * p.c_block), channels(std::min(C, c0 + p.c_block) - c0), I(I_), rows(p.rows_per_span),
        scales(s + c0) {
    if (direct()) return;
    expanded.reserve(static_cast<size_t>(rows * channels * I));
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = c0; c < c0 + channels; ++c) expanded.insert(expanded.end(), static_cast<size_t>(I), s[c]);
    scales = expanded.data();
  }
  bool direct() const { return I == 1 && rows == 1; }
  int64_t width() const { return channels * I; }
  // Elements of the span that starts at outer row o (fewer rows at the end of the tensor).
  int64_t elements(int64_t o, int64_t O) const { return std::min(rows, O - o) * width(); }
  // Backward: where each element of a span adds its terms up (out: channel c0's slot of this item's partials),
  // and, after the item's spans, each element's sum added to its channel's slot in element order.
  double* sums(std::vector<double>& acc, double* out) const {
    if (direct()) return out + c0;
    acc.assign(static_cast<size_t>(rows * width()), 0.0);
    return acc.data();
  }
  void add_by_channel(const std::vector<double>& acc, double* out) const {
    if (direct()) return;
    size_t k = 0;
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = c0; c < c0 + channels; ++c)
        for (int64_t i = 0; i < I; ++i) out[c] += acc[k++];
  }
};

template <typename T>
void forward_impl(const T* x, const float* s, T* y, int64_t O, int64_t C, int64_t I, float qn, float qp) {
  const ForwardRow row_loop = loops().forward[kind_of<T>()];
  const ForwardSpan span_loop = loops().forward_span[kind_of<T>()];
  const Plan p(O, C, I);
  at::parallel_for(0, p.items(), 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t ic = item % p.n_i, cb = (item / p.n_i) % p.n_c, oc = item / (p.n_i * p.n_c);
      const int64_t i0 = ic * p.i_chunk, i1 = std::min(I, i0 + p.i_chunk);
      if (spans(C, I)) {
        const Span span(p, s, cb, C, I);
        for (int64_t o = oc * p.o_chunk; o < std::min(O, (oc + 1) * p.o_chunk); o += p.rows_per_span) {
          const int64_t start = (o * C + span.c0) * I, n = span.elements(o, O);
          span_loop(x + start, y + start, n, span.scales, qn, qp);
        }
        continue;
      }
      for (int64_t o = oc * p.o_chunk; o < std::min(O, (oc + 1) * p.o_chunk); ++o) {
        for (int64_t c = cb * p.c_block; c < std::min(C, (cb + 1) * p.c_block); ++c) {
          const int64_t row = (o * C + c) * I;
          row_loop(x + row + i0, y + row + i0, i1 - i0, s[c], qn, qp);
        }
      }
    }
  });
}

template <typename T>
void backward_impl(const T* dy, const T* x, const float* s, T* dx, float* ds, int64_t O, int64_t C, int64_t I,
                   float qn, float qp, double g) {
  const BackwardRow row_loop = loops().backward[kind_of<T>()];
  const BackwardSpan span_loop = loops().backward_span[kind_of<T>()];
  const Plan p(O, C, I);
  const int64_t splits = p.n_o * p.n_i;  // partials per channel
  std::vector<double> partial(static_cast<size_t>(splits * C));
  at::parallel_for(0, p.items(), 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t ic = item % p.n_i, cb = (item / p.n_i) % p.n_c, oc = item / (p.n_i * p.n_c);
      const int64_t i0 = ic * p.i_chunk, i1 = std::min(I, i0 + p.i_chunk);
      if (spans(C, I)) {
        const Span span(p, s, cb, C, I);
        double* item_partials = partial.data() + oc * C;  // this item's own slots (n_i == 1), zeroed
        std::vector<double> acc;
        double* sums = span.sums(acc, item_partials);
        for (int64_t o = oc * p.o_chunk; o < std::min(O, (oc + 1) * p.o_chunk); o += p.rows_per_span) {
          const int64_t start = (o * C + span.c0) * I, n = span.elements(o, O);
          span_loop(dy + start, x + start, dx + start, n, span.scales, sums, qn, qp);
        }
        span.add_by_channel(acc, item_partials);
        continue;
      }
      for (int64_t c = cb * p.c_block; c < std::min(C, (cb + 1) * p.c_block); ++c) {
        double acc = 0.0;
        for (int64_t o = oc * p.o_chunk; o < std::min(O, (oc + 1) * p.o_chunk); ++o) {
          const int64_t row = (o * C + c) * I + i0;
          acc += row_loop(dy + row, x + row, dx + row, i1 - i0, s[c], qn, qp);
        }
        partial[(oc * p.n_i + ic) * C + c] = acc;
      }
    }
  });
  at::parallel_for(0, C, 256, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      double total = 0.0;
      for (int64_t k = 0; k < splits; ++k) total += partial[k * C + c];
      ds[c] = static_cast<float>(total * g);
    }
  });
}

}  // namespace

std::vector<std::string> cpu_isa_levels() {
  std::vector<std::string> names;
  for (const Level& l : levels())
    if (l.supported) names.push_back(l.name);
  return names;
}

std::string cpu_isa() {
  for (const Level& l : levels())
    if (l.loops == &loops()) return l.name;
  return "unknown";
}

void set_cpu_isa(const std::string& name) {
  if (name.empty()) {
    g_loops = nullptr;
    return;
  }
  for (const Level& l : levels()) {
    if (l.name == name) {
      TORCH_CHECK(l.supported, "set_cpu_isa: this CPU lacks ", name);
      g_loops = l.loops;
      return;
    }
  }
  TORCH_CHECK(false, "set_cpu_isa: unknown level '", name, "'; this build has ", c10::Join(", ", cpu_isa_levels()));
}

void lsq_forward_cpu(const at::Tensor& x, const at::Tensor& scale, at::Tensor& y,
                     int64_t O, int64_t C, int64_t I, double qn, double qp) {
  GAQAT_DISPATCH_INPUT_TYPES(x.scalar_type(), "lsq_forward_cpu", [&] {
    forward_impl<scalar_t>(x.data_ptr<scalar_t>(), scale.data_ptr<float>(), y.data_ptr<scalar_t>(), O, C, I,
                           static_cast<float>(qn), static_cast<float>(qp));
  });
}

void lsq_backward_cpu(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& scale, at::Tensor& dx,
                      at::Tensor& ds, int64_t O, int64_t C, int64_t I, double qn, double qp, double g) {
  GAQAT_DISPATCH_INPUT_TYPES(x.scalar_type(), "lsq_backward_cpu", [&] {
    backward_impl<scalar_t>(dy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), scale.data_ptr<float>(),
                            dx.data_ptr<scalar_t>(), ds.data_ptr<float>(), O, C, I, static_cast<float>(qn),
                            static_cast<float>(qp), g);
  });
}

}  // namespace gaqat
