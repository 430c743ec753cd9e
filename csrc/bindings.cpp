// Python bindings of gaqat_kernels._C. Arguments are checked here once more (cheaply) because a wrong
// pointer or shape in a kernel corrupts memory instead of raising.
#include "lsq.h"

namespace gaqat {
namespace {

// Equal shapes and equal strides on every dimension of size > 1 (size-1 strides are arbitrary).
bool same_layout(const at::Tensor& a, const at::Tensor& b) {
  if (a.sizes() != b.sizes()) return false;
  for (int64_t d = 0; d < a.dim(); ++d)
    if (a.size(d) != 1 && a.stride(d) != b.stride(d)) return false;
  return true;
}

void check_args(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& out, int64_t O, int64_t C,
                int64_t I) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
              "x: expected float32, float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.numel() == C,
              "scale: expected a contiguous float32 tensor of ", C, " elements");
  TORCH_CHECK(O * C * I == x.numel(), "x: the (O, C, I) view does not cover the tensor");
  TORCH_CHECK(out.numel() == x.numel() && out.scalar_type() == x.scalar_type() && same_layout(out, x),
              "output: expected x's dtype and layout");
  TORCH_CHECK(x.device() == scale.device() && x.device() == out.device(), "all tensors must be on one device");
}

void lsq_forward(const at::Tensor& x, const at::Tensor& scale, at::Tensor& y, int64_t O, int64_t C, int64_t I,
                 double qn, double qp) {
  check_args(x, scale, y, O, C, I);
  if (x.numel() == 0) return;
  if (x.is_cuda()) {
#ifdef GAQAT_WITH_CUDA
    lsq_forward_cuda(x, scale, y, O, C, I, qn, qp);
    return;
#else
    TORCH_CHECK(false, "gaqat_kernels._C was built without CUDA");
#endif
  }
  lsq_forward_cpu(x, scale, y, O, C, I, qn, qp);
}

void lsq_backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& scale, at::Tensor& dx,
                  at::Tensor& ds, int64_t O, int64_t C, int64_t I, double qn, double qp, double g) {
  check_args(x, scale, dx, O, C, I);
  check_args(x, scale, dy, O, C, I);
  TORCH_CHECK(ds.scalar_type() == at::kFloat && ds.is_contiguous() && ds.numel() == C,
              "ds: expected a contiguous float32 tensor of ", C, " elements");
  if (x.numel() == 0) {
    ds.zero_();
    return;
  }
  if (x.is_cuda()) {
#ifdef GAQAT_WITH_CUDA
    lsq_backward_cuda(dy, x, scale, dx, ds, O, C, I, qn, qp, g);
    return;
#else
    TORCH_CHECK(false, "gaqat_kernels._C was built without CUDA");
#endif
  }
  lsq_backward_cpu(dy, x, scale, dx, ds, O, C, I, qn, qp, g);
}

void conflict_update(const at::Tensor& task, const at::Tensor& smooth, const at::Tensor& offsets, at::Tensor& signs,
                     at::Tensor& ema, at::Tensor& step, at::Tensor& counter, at::Tensor& stats, at::Tensor& frozen,
                     double decay, double log2_decay, double flip_weight, double threshold, int64_t warmup,
                     int64_t top_k) {
  const int64_t n = task.numel(), s = offsets.numel() - 1;
  auto on = [&](const at::Tensor& t, at::ScalarType type, int64_t numel, const char* name) {
    TORCH_CHECK(t.is_cuda() && t.device() == task.device() && t.scalar_type() == type && t.is_contiguous() &&
                    t.numel() == numel, name, ": expected a contiguous ", type, " CUDA tensor of ", numel,
                " elements on task's device");
  };
  on(task, at::kFloat, n, "task");
  on(smooth, at::kFloat, n, "smooth");
  on(offsets, at::kLong, s + 1, "offsets");
  on(signs, at::kChar, 2 * n, "signs");
  on(ema, at::kFloat, s, "ema");
  on(step, at::kLong, 1, "step");
  on(counter, at::kInt, 1, "counter");
  on(stats, at::kFloat, 7 * s, "stats");
  on(frozen, at::kBool, s, "frozen");
  TORCH_CHECK(s >= 1, "offsets: expected at least one segment");
#ifdef GAQAT_WITH_CUDA
  conflict_update_cuda(task, smooth, offsets, signs, ema, step, counter, stats, frozen, decay, log2_decay,
                       flip_weight, threshold, warmup, top_k);
#else
  TORCH_CHECK(false, "gaqat_kernels._C was built without CUDA");
#endif
}

bool built_with_cuda() {
#ifdef GAQAT_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace
}  // namespace gaqat

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "gaqat_kernels C++/CUDA kernels (LSQ fake quantization)";
  m.def("lsq_forward", &gaqat::lsq_forward, "LSQ forward into a preallocated y (dense, (O, C, I) view)");
  m.def("lsq_backward", &gaqat::lsq_backward, "LSQ backward into preallocated dx and ds");
  m.def("conflict_update", &gaqat::conflict_update, "one gradient-conflict tracker step (CUDA), in place");
  m.def("built_with_cuda", &gaqat::built_with_cuda, "True when the CUDA kernels were compiled in");
}
