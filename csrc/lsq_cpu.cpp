// CPU LSQ fake quantization: OpenMP (at::parallel_for) over fixed work items, vectorisable inner loops.
// The scale gradient is summed per work item into fp64 partials, then per channel in a fixed order, so
// its bits do not depend on the thread count.
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "lsq.h"

namespace gaqat {
namespace {

constexpr int64_t kItemElems = 1 << 16;  // elements per work item
constexpr int64_t kMinRowsPerItem = 1024;  // for short rows, >= 1024 elements of a channel per partial

// Work items tile the (O, C, I) view as [o_chunk rows] x [c_block channels] x [i_chunk elements].
struct Plan {
  int64_t i_chunk, o_chunk, c_block, n_i, n_o, n_c;
  Plan(int64_t O, int64_t C, int64_t I) {
    i_chunk = std::max<int64_t>(1, std::min(I, kItemElems));
    o_chunk = std::max<int64_t>(1, std::min(O, (kMinRowsPerItem + i_chunk - 1) / i_chunk));
    c_block = std::max<int64_t>(1, std::min(C, kItemElems / (o_chunk * i_chunk)));
    n_i = (I + i_chunk - 1) / i_chunk;
    n_o = (O + o_chunk - 1) / o_chunk;
    n_c = (C + c_block - 1) / c_block;
  }
  int64_t items() const { return n_i * n_o * n_c; }
};

template <typename T>
void forward_impl(const T* x, const float* s, T* y, int64_t O, int64_t C, int64_t I, float qn, float qp) {
  const Plan p(O, C, I);
  at::parallel_for(0, p.items(), 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t ic = item % p.n_i, cb = (item / p.n_i) % p.n_c, oc = item / (p.n_i * p.n_c);
      const int64_t i0 = ic * p.i_chunk, i1 = std::min(I, i0 + p.i_chunk);
      for (int64_t o = oc * p.o_chunk; o < std::min(O, (oc + 1) * p.o_chunk); ++o) {
        for (int64_t c = cb * p.c_block; c < std::min(C, (cb + 1) * p.c_block); ++c) {
          const float sc = s[c];
          const T* xr = x + (o * C + c) * I;
          T* yr = y + (o * C + c) * I;
#pragma omp simd
          for (int64_t i = i0; i < i1; ++i) {
            yr[i] = static_cast<T>(round_clamp_host(static_cast<float>(xr[i]) / sc, qn, qp) * sc);
          }
        }
      }
    }
  });
}

template <typename T>
void backward_impl(const T* dy, const T* x, const float* s, T* dx, float* ds, int64_t O, int64_t C, int64_t I,
                   float qn, float qp, double g) {
  const Plan p(O, C, I);
  const int64_t splits = p.n_o * p.n_i;  // partials per channel
  std::vector<double> partial(static_cast<size_t>(splits * C));
  at::parallel_for(0, p.items(), 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t ic = item % p.n_i, cb = (item / p.n_i) % p.n_c, oc = item / (p.n_i * p.n_c);
      const int64_t i0 = ic * p.i_chunk, i1 = std::min(I, i0 + p.i_chunk);
      for (int64_t c = cb * p.c_block; c < std::min(C, (cb + 1) * p.c_block); ++c) {
        const float sc = s[c];
        double acc = 0.0;
        for (int64_t o = oc * p.o_chunk; o < std::min(O, (oc + 1) * p.o_chunk); ++o) {
          const int64_t row = (o * C + c) * I;
          float row_acc = 0.f;
#pragma omp simd reduction(+ : row_acc)
          for (int64_t i = i0; i < i1; ++i) {
            const float v = static_cast<float>(x[row + i]) / sc;
            const bool inside = v >= qn && v <= qp;
            const float r = round_clamp_host(v, qn, qp);
            const float d = static_cast<float>(dy[row + i]);
            dx[row + i] = inside ? dy[row + i] : static_cast<T>(0.f);
            row_acc += d * (r - (inside ? v : 0.f));
          }
          acc += row_acc;
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
