// Shared declarations of the LSQ fake-quant kernels. Tensors arrive dense and laid out alike; the
// Python side passes the storage-order view (O, C, I): element p belongs to channel (p / I) % C.
#pragma once
#include <torch/extension.h>

#include <string>
#include <vector>

// The input dtypes of the op: float32, float16, bfloat16 (float64 stays on the Python reference).
#define GAQAT_DISPATCH_INPUT_TYPES(TYPE, NAME, ...)                   \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                       \
                     AT_DISPATCH_CASE(at::ScalarType::Float, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::ScalarType::Half, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::ScalarType::BFloat16, __VA_ARGS__))

namespace gaqat {

void lsq_forward_cpu(const at::Tensor& x, const at::Tensor& scale, at::Tensor& y,
                     int64_t O, int64_t C, int64_t I, double qn, double qp);
void lsq_backward_cpu(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& scale, at::Tensor& dx,
                      at::Tensor& ds, int64_t O, int64_t C, int64_t I, double qn, double qp, double g);
// Instruction-set levels of the CPU row loops ("baseline", "x86-64-v3", "x86-64-v4") this CPU can run, the
// one in use, and an override ("" = the highest again): every level gives the same y and dx bits.
std::vector<std::string> cpu_isa_levels();
std::string cpu_isa();
void set_cpu_isa(const std::string& name);

#ifdef GAQAT_WITH_CUDA
void lsq_forward_cuda(const at::Tensor& x, const at::Tensor& scale, at::Tensor& y,
                      int64_t O, int64_t C, int64_t I, double qn, double qp);
void lsq_backward_cuda(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& scale, at::Tensor& dx,
                       at::Tensor& ds, int64_t O, int64_t C, int64_t I, double qn, double qp, double g);
// Division used by the CUDA kernels: 0 the built-in plan, 1 IEEE division always, 2 the exact fast division
// wherever the scale allows (results are the same bits; tests and benchmarks compare them).
void set_cuda_division(int64_t mode);
// Launch shape of the CUDA kernels (0 = the built-in default): forward blocks per SM, backward split blocks per
// SM, prefetch in looping backward blocks (1 off, 2 on). For benchmarks; results do not depend on it except the
// order in which the scale gradient is summed.
void set_cuda_launch(int64_t forward_blocks_per_sm, int64_t split_blocks_per_sm, int64_t prefetch);
// One step of the gradient-conflict tracker (conflict_cuda.cu); n_seg >= 1.
void conflict_update_cuda(const at::Tensor& task, const at::Tensor& smooth, const at::Tensor& offsets,
                          at::Tensor& signs, at::Tensor& ema, at::Tensor& step, at::Tensor& counter,
                          at::Tensor& stats, at::Tensor& frozen, double decay, double log2_decay,
                          double flip_weight, double enter, double stay, int64_t warmup, int64_t top_k,
                          int64_t rule, double spread_floor);
#endif

// round(clamp(v, qn, qp)) with ties to even; NaN stays NaN (comparisons with NaN are false).
// 1.5 * 2^23 added and subtracted rounds to an integer in the current (nearest-even) mode; exact for
// |v| < 2^22, and the clamp keeps |v| <= 255. Needs IEEE arithmetic: never build with -ffast-math.
inline float round_clamp_host(float v, float qn, float qp) {
  const float c = v < qn ? qn : (v > qp ? qp : v);
  return (c + 12582912.0f) - 12582912.0f;
}

}  // namespace gaqat
