// CUDA: one step of the gradient-conflict tracker in one launch, one block per segment (one layer's
// quantizer scales). Each block reduces its segment in a fixed tree (deterministic), updates the running
// average; the last block to finish decides the freeze mask (mean and spread of the disorders for the
// relative rules, ranks when a top-k limit applies) and advances the step counter. The math is
// reference.conflict_update_reference's.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "lsq.h"

namespace gaqat {
namespace {

constexpr int kConflictThreads = 256;
constexpr int kSums = 6;  // conflicts, dot, |task|^2, |smooth|^2, task flips, smooth flips
constexpr int kZscore = 1, kRatio = 2;  // reference.FREEZE_RULES order; 0: absolute

__device__ __forceinline__ int sign_of(float v) { return (v > 0.f) - (v < 0.f); }  // NaN -> 0

__global__ void conflict_update_kernel(const float* __restrict__ task, const float* __restrict__ smooth,
                                       const int64_t* __restrict__ offsets, int8_t* __restrict__ signs,
                                       int64_t n, float* __restrict__ ema, int64_t* step_ptr, int* counter,
                                       float* stats, uint8_t* frozen, int n_seg, float decay, float log2_decay,
                                       float flip_weight, float enter, float stay, int64_t warmup, int64_t top_k,
                                       int rule, float spread_floor) {
  const int seg = blockIdx.x;
  const int64_t start = offsets[seg], end = offsets[seg + 1];
  const int64_t step = *step_ptr;
  float acc[kSums] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  for (int64_t i = start + threadIdx.x; i < end; i += blockDim.x) {
    const float t = task[i], s = smooth[i];
    const int st = sign_of(t), ss = sign_of(s);
    acc[4] += (st * signs[i] < 0) ? 1.f : 0.f;
    acc[5] += (ss * signs[n + i] < 0) ? 1.f : 0.f;
    signs[i] = static_cast<int8_t>(st);
    signs[n + i] = static_cast<int8_t>(ss);
    const float p = t * s;
    acc[0] += (p < 0.f) ? 1.f : 0.f;
    acc[1] += p;
    acc[2] += t * t;
    acc[3] += s * s;
  }
  __shared__ float partial[kSums][kConflictThreads / 32];
  __shared__ bool is_last;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int k = 0; k < kSums; ++k) {
    for (int o = 16; o > 0; o /= 2) acc[k] += __shfl_xor_sync(0xffffffffu, acc[k], o);
    if (lane == 0) partial[k][warp] = acc[k];
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    float tot[kSums];
    for (int k = 0; k < kSums; ++k) {
      tot[k] = 0.f;
      for (int w = 0; w < kConflictThreads / 32; ++w) tot[k] += partial[k][w];
    }
    const float length = fmaxf(static_cast<float>(end - start), 1.f);
    const float c = __fdiv_rn(tot[0], length);
    const float ft = __fdiv_rn(tot[4], length), fs = __fdiv_rn(tot[5], length);
    const float nt = __fsqrt_rn(tot[2]), ns = __fsqrt_rn(tot[3]);
    const float denom = nt * ns;
    const float cosine = denom == 0.f ? 0.f : __fdiv_rn(tot[1], denom);
    const float raw = (1.f - flip_weight) * c + flip_weight * (0.5f * (ft + fs));
    const float m = decay * ema[seg] + (1.f - decay) * raw;
    const float disorder = __fdiv_rn(m, 1.f - exp2f(static_cast<float>(step + 1) * log2_decay));
    ema[seg] = m;
    float* row = stats + seg * 7;
    row[0] = c; row[1] = cosine; row[2] = nt; row[3] = ns; row[4] = ft; row[5] = fs; row[6] = disorder;
    __threadfence();
    is_last = atomicAdd(counter, 1) == n_seg - 1;
  }
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  // The last block decides the whole mask: the relative rules need the mean and spread of D over all
  // segments, the hysteresis the previous mask (untouched by the other blocks).
  const volatile float* d = stats;
  __shared__ float mean, spread;
  if (threadIdx.x == 0) {
    float total = 0.f;
    for (int j = 0; j < n_seg; ++j) total += d[j * 7 + 6];
    mean = __fdiv_rn(total, static_cast<float>(n_seg));
    float squares = 0.f;
    if (rule == kZscore) {
      for (int j = 0; j < n_seg; ++j) {
        const float dev = d[j * 7 + 6] - mean;
        squares += dev * dev;
      }
    }
    spread = rule == kZscore ? __fsqrt_rn(__fdiv_rn(squares, static_cast<float>(n_seg))) : mean;
  }
  __syncthreads();
  for (int i = threadIdx.x; i < n_seg; i += blockDim.x) {
    const float di = d[i * 7 + 6];
    float score = di;
    if (rule == kZscore) score = spread > spread_floor ? __fdiv_rn(di - mean, spread) : 0.f;
    if (rule == kRatio) score = mean > spread_floor ? __fdiv_rn(di, mean) - 1.f : 0.f;
    bool keep = step >= warmup && (score > enter || (frozen[i] != 0 && score > stay));
    if (top_k < n_seg) {
      int64_t rank = 0;
      for (int j = 0; j < n_seg; ++j) {
        const float dj = d[j * 7 + 6];
        rank += (dj > di || (dj == di && j < i)) ? 1 : 0;
      }
      keep = keep && rank < top_k;
    }
    frozen[i] = keep ? 1 : 0;
  }
  if (threadIdx.x == 0) {
    *step_ptr = step + 1;
    *counter = 0;
  }
}

}  // namespace

void conflict_update_cuda(const at::Tensor& task, const at::Tensor& smooth, const at::Tensor& offsets,
                          at::Tensor& signs, at::Tensor& ema, at::Tensor& step, at::Tensor& counter,
                          at::Tensor& stats, at::Tensor& frozen, double decay, double log2_decay,
                          double flip_weight, double enter, double stay, int64_t warmup, int64_t top_k,
                          int64_t rule, double spread_floor) {
  const int n_seg = static_cast<int>(offsets.numel() - 1);
  const at::cuda::CUDAGuard guard(task.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  conflict_update_kernel<<<n_seg, kConflictThreads, 0, stream>>>(
      task.data_ptr<float>(), smooth.data_ptr<float>(), offsets.data_ptr<int64_t>(), signs.data_ptr<int8_t>(),
      task.numel(), ema.data_ptr<float>(), step.data_ptr<int64_t>(), counter.data_ptr<int>(),
      stats.data_ptr<float>(), reinterpret_cast<uint8_t*>(frozen.data_ptr<bool>()), n_seg,
      static_cast<float>(decay), static_cast<float>(log2_decay), static_cast<float>(flip_weight),
      static_cast<float>(enter), static_cast<float>(stay), warmup, top_k,
      static_cast<int>(rule), static_cast<float>(spread_floor));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace gaqat
