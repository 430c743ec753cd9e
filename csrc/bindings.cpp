// Python bindings of gaqat_kernels._C. Arguments are checked here once more (cheaply) because a wrong
// pointer or shape in a kernel corrupts memory instead of raising.
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>

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
                     double decay, double log2_decay, double flip_weight, double enter, double stay, int64_t warmup,
                     int64_t top_k, int64_t rule, double spread_floor) {
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
  TORCH_CHECK(rule >= 0 && rule <= 2, "rule: expected 0 (absolute), 1 (zscore) or 2 (ratio), got ", rule);
#ifdef GAQAT_WITH_CUDA
  conflict_update_cuda(task, smooth, offsets, signs, ema, step, counter, stats, frozen, decay, log2_decay,
                       flip_weight, enter, stay, warmup, top_k, rule, spread_floor);
#else
  TORCH_CHECK(false, "gaqat_kernels._C was built without CUDA");
#endif
}

// (O, C, I) storage-order view of a dense tensor (see gaqat_kernels/kernels/layout.py); axis < 0: per-tensor.
void channel_view(const at::Tensor& x, int64_t axis, int64_t& O, int64_t& C, int64_t& I) {
  const int64_t n = x.numel();
  if (axis < 0 || x.size(axis) == 1) {
    O = 1, C = 1, I = n;
    return;
  }
  C = x.size(axis);
  I = x.stride(axis);
  O = n / (C * I);
}

at::Tensor dense(const at::Tensor& x) { return x.is_non_overlapping_and_dense() ? x : x.contiguous(); }

// Forward of the op on a dense x into a new tensor laid out like x; axis < 0: per-tensor.
at::Tensor lsq_values(const at::Tensor& xd, const at::Tensor& scale, int64_t axis, int64_t qn, int64_t qp) {
  at::Tensor y = at::empty_like(xd);  // keeps a dense tensor's strides
  int64_t O, C, I;
  channel_view(xd, axis, O, C, I);
  lsq_forward(xd, scale.contiguous().view(-1), y, O, C, I, static_cast<double>(qn), static_cast<double>(qp));
  return y;
}

// (dx, ds) of the op for the gradient dy of its output, on a dense x; axis < 0: per-tensor.
std::pair<at::Tensor, at::Tensor> lsq_grads(const at::Tensor& dy_in, const at::Tensor& xd, const at::Tensor& scale,
                                            int64_t axis, int64_t qn, int64_t qp, double g) {
  at::Tensor dy = dy_in.to(xd.scalar_type());
  if (!same_layout(dy, xd)) dy = at::empty_like(xd).copy_(dy);
  at::Tensor dx = at::empty_like(xd);
  at::Tensor ds = at::empty(scale.sizes(), scale.options());
  at::Tensor ds_flat = ds.view(-1);
  int64_t O, C, I;
  channel_view(xd, axis, O, C, I);
  lsq_backward(dy, xd, scale.contiguous().view(-1), dx, ds_flat, O, C, I, static_cast<double>(qn),
               static_cast<double>(qp), g);
  return {dx, ds};
}

// The eager path of lsq_fake_quant for the cpu/cuda backends: the same kernels as the custom op, with the
// autograd node built in C++ (a Python custom op costs ~100 us of host time per forward + backward, which
// dominates small layers; this costs a few). torch.compile keeps using the custom op.
class LSQFunction : public torch::autograd::Function<LSQFunction> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& scale,
                            int64_t qn, int64_t qp, int64_t axis, double g) {
    at::Tensor y = lsq_values(dense(x), scale, axis, qn, qp);
    ctx->save_for_backward({x, scale});
    ctx->saved_data["qn"] = qn;
    ctx->saved_data["qp"] = qp;
    ctx->saved_data["axis"] = axis;
    ctx->saved_data["g"] = g;
    return y;
  }

  static torch::autograd::tensor_list backward(torch::autograd::AutogradContext* ctx,
                                               torch::autograd::tensor_list grads) {
    const auto saved = ctx->get_saved_variables();
    auto [dx, ds] = lsq_grads(grads[0], dense(saved[0]), saved[1], ctx->saved_data["axis"].toInt(),
                              ctx->saved_data["qn"].toInt(), ctx->saved_data["qp"].toInt(),
                              ctx->saved_data["g"].toDouble());
    return {dx, ds, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor lsq_fake_quant_autograd(const at::Tensor& x, const at::Tensor& scale, int64_t qn, int64_t qp,
                                   int64_t axis, double g) {
  return LSQFunction::apply(x, scale, qn, qp, axis, g);
}

at::Tensor cast_to(const at::Tensor& t, const std::optional<at::ScalarType>& dtype) {
  return (!t.defined() || !dtype.has_value() || t.scalar_type() == at::kDouble) ? t : t.to(*dtype);
}

// Conv2d / linear of a per-tensor LSQ-quantized input that keeps x (not the quantized input) for backward
// and recomputes the quantized input there (gaqat_kernels/nn/recompute.py): the autograd node in C++, as
// LSQFunction's, because a Python node costs far more host time than a small layer's kernels.
// `dtype`: the autocast dtype the conv/matmul runs in (inputs, weight and bias cast to it), or none.
struct QuantInputConfig {
  int64_t qn, qp;
  double g;
  std::optional<at::ScalarType> dtype;
};

void save_config(torch::autograd::AutogradContext* ctx, const QuantInputConfig& c, const at::Tensor& bias) {
  ctx->saved_data["qn"] = c.qn;
  ctx->saved_data["qp"] = c.qp;
  ctx->saved_data["g"] = c.g;
  ctx->saved_data["dtype"] = c.dtype.has_value() ? static_cast<int64_t>(*c.dtype) : int64_t(-1);
  ctx->saved_data["bias_dtype"] = bias.defined() ? static_cast<int64_t>(bias.scalar_type()) : int64_t(-1);
}

QuantInputConfig load_config(torch::autograd::AutogradContext* ctx) {
  const int64_t dtype = ctx->saved_data["dtype"].toInt();
  return {ctx->saved_data["qn"].toInt(), ctx->saved_data["qp"].toInt(), ctx->saved_data["g"].toDouble(),
          dtype < 0 ? std::nullopt : std::optional<at::ScalarType>(static_cast<at::ScalarType>(dtype))};
}

class QuantInputConv2d : public torch::autograd::Function<QuantInputConv2d> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& scale,
                            const at::Tensor& weight, const std::optional<at::Tensor>& bias_opt, int64_t qn,
                            int64_t qp, double g, std::optional<at::ScalarType> dtype, std::vector<int64_t> stride,
                            std::vector<int64_t> padding, std::vector<int64_t> dilation, int64_t groups) {
    const at::Tensor xd = dense(x), bias = bias_opt.value_or(at::Tensor());
    const at::Tensor xq = cast_to(lsq_values(xd, scale, -1, qn, qp), dtype);
    const at::Tensor y = at::convolution(xq, cast_to(weight, dtype), cast_to(bias, dtype), stride, padding,
                                         dilation, false, {0, 0}, groups);
    ctx->save_for_backward({x, scale, weight});
    save_config(ctx, {qn, qp, g, dtype}, bias);
    ctx->saved_data["stride"] = stride;
    ctx->saved_data["padding"] = padding;
    ctx->saved_data["dilation"] = dilation;
    ctx->saved_data["groups"] = groups;
    return y;
  }

  static torch::autograd::tensor_list backward(torch::autograd::AutogradContext* ctx,
                                               torch::autograd::tensor_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor xd = dense(saved[0]), scale = saved[1], weight = saved[2];
    const QuantInputConfig c = load_config(ctx);
    const int64_t bias_dtype = ctx->saved_data["bias_dtype"].toInt();
    const bool need_xs = ctx->needs_input_grad(0) || ctx->needs_input_grad(1);
    const bool need_w = ctx->needs_input_grad(2), need_b = bias_dtype >= 0 && ctx->needs_input_grad(3);
    const at::Tensor xq = cast_to(lsq_values(xd, scale, -1, c.qn, c.qp), c.dtype);
    const at::Tensor wc = cast_to(weight, c.dtype);
    const auto stride = ctx->saved_data["stride"].toIntVector();
    const auto padding = ctx->saved_data["padding"].toIntVector();
    const auto dilation = ctx->saved_data["dilation"].toIntVector();
    std::optional<at::IntArrayRef> bias_sizes;
    std::vector<int64_t> bias_shape{wc.size(0)};
    if (bias_dtype >= 0) bias_sizes = bias_shape;
    auto [dxq, dw, db] = at::convolution_backward(grads[0], xq, wc, bias_sizes, stride, padding, dilation, false,
                                                  {0, 0}, ctx->saved_data["groups"].toInt(),
                                                  {need_xs, need_w, need_b});
    at::Tensor dx, ds;
    if (need_xs) std::tie(dx, ds) = lsq_grads(dxq, xd, scale, -1, c.qn, c.qp, c.g);
    return {ctx->needs_input_grad(0) ? dx : at::Tensor(), ctx->needs_input_grad(1) ? ds : at::Tensor(),
            need_w ? dw.to(weight.scalar_type()) : at::Tensor(),
            need_b ? db.to(static_cast<at::ScalarType>(bias_dtype)) : at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor()};
  }
};

class QuantInputLinear : public torch::autograd::Function<QuantInputLinear> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& scale,
                            const at::Tensor& weight, const std::optional<at::Tensor>& bias_opt, int64_t qn,
                            int64_t qp, double g, std::optional<at::ScalarType> dtype) {
    const at::Tensor xd = dense(x), bias = bias_opt.value_or(at::Tensor());
    const at::Tensor xq = cast_to(lsq_values(xd, scale, -1, qn, qp), dtype);
    const at::Tensor y = at::linear(xq, cast_to(weight, dtype), cast_to(bias, dtype));
    ctx->save_for_backward({x, scale, weight});
    save_config(ctx, {qn, qp, g, dtype}, bias);
    return y;
  }

  static torch::autograd::tensor_list backward(torch::autograd::AutogradContext* ctx,
                                               torch::autograd::tensor_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor xd = dense(saved[0]), scale = saved[1], weight = saved[2];
    const QuantInputConfig c = load_config(ctx);
    const int64_t bias_dtype = ctx->saved_data["bias_dtype"].toInt();
    const at::Tensor& dy = grads[0];
    const at::Tensor dy2 = dy.reshape({-1, dy.size(-1)});
    at::Tensor dx, ds, dw, db;
    if (ctx->needs_input_grad(0) || ctx->needs_input_grad(1))
      std::tie(dx, ds) = lsq_grads(dy.matmul(cast_to(weight, c.dtype)), xd, scale, -1, c.qn, c.qp, c.g);
    if (ctx->needs_input_grad(2)) {
      const at::Tensor xq = cast_to(lsq_values(xd, scale, -1, c.qn, c.qp), c.dtype);
      dw = dy2.t().matmul(xq.reshape({-1, xq.size(-1)})).to(weight.scalar_type());
    }
    if (bias_dtype >= 0 && ctx->needs_input_grad(3)) db = dy2.sum(0).to(static_cast<at::ScalarType>(bias_dtype));
    return {ctx->needs_input_grad(0) ? dx : at::Tensor(), ctx->needs_input_grad(1) ? ds : at::Tensor(), dw, db,
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor quant_input_conv2d_autograd(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& weight,
                                       const std::optional<at::Tensor>& bias, int64_t qn, int64_t qp, double g,
                                       std::optional<at::ScalarType> dtype, std::vector<int64_t> stride,
                                       std::vector<int64_t> padding, std::vector<int64_t> dilation, int64_t groups) {
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
              "stride, padding, dilation: expected two values each");
  return QuantInputConv2d::apply(x, scale, weight, bias, qn, qp, g, dtype, stride, padding,
                                 dilation, groups);
}

at::Tensor quant_input_linear_autograd(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& weight,
                                       const std::optional<at::Tensor>& bias, int64_t qn, int64_t qp, double g,
                                       std::optional<at::ScalarType> dtype) {
  return QuantInputLinear::apply(x, scale, weight, bias, qn, qp, g, dtype);
}

// LSQ's default scale-gradient factor 1 / sqrt(n * qp), n the elements per scale (reference.default_grad_scale).
double default_grad_scale(int64_t numel, int64_t channels, int64_t qp) {
  const int64_t n = std::max<int64_t>(numel / std::max<int64_t>(channels, 1), 1);
  return 1.0 / std::sqrt(static_cast<double>(n * qp));
}

void check_axis(const at::Tensor& x, int64_t axis) {
  TORCH_CHECK(axis >= -1 && axis < std::max<int64_t>(x.dim(), 1), "axis: expected -1 (per-tensor) or a dimension of x "
              "(shape ", x.sizes(), "), got ", axis);
}

// The op's forward and backward as dispatcher operators (gaqat_kernels::lsq_fake_quant_ext*, registered below)
// for the cpu/cuda backends: compiled graphs call them with no Python in between. Their fake implementations
// and autograd formula live in gaqat_kernels/ops.py; axis -1 is per-tensor.
at::Tensor lsq_fake_quant_ext(const at::Tensor& x, const at::Tensor& scale, int64_t qn, int64_t qp, int64_t axis,
                              std::optional<double> /*grad_scale: used by the backward*/) {
  check_axis(x, axis);
  return lsq_values(dense(x), scale, axis, qn, qp);
}

std::tuple<at::Tensor, at::Tensor> lsq_fake_quant_ext_backward(const at::Tensor& dy, const at::Tensor& x,
                                                               const at::Tensor& scale, int64_t qn, int64_t qp,
                                                               int64_t axis, std::optional<double> grad_scale) {
  check_axis(x, axis);
  const double g = grad_scale.has_value() ? *grad_scale
                                          : default_grad_scale(x.numel(), axis < 0 ? 1 : x.size(axis), qp);
  auto [dx, ds] = lsq_grads(dy, dense(x), scale, axis, qn, qp, g);
  return {dx, ds};
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
  m.def("lsq_fake_quant_autograd", &gaqat::lsq_fake_quant_autograd,
        "LSQ fake quant with its autograd node in C++ (eager path of the cpu/cuda backends); axis < 0: per-tensor");
  m.def("quant_input_conv2d_autograd", &gaqat::quant_input_conv2d_autograd,
        "conv2d of the per-tensor LSQ-quantized x, recomputing the quantized x in backward (autograd in C++)");
  m.def("quant_input_linear_autograd", &gaqat::quant_input_linear_autograd,
        "linear map of the per-tensor LSQ-quantized x, recomputing the quantized x in backward (autograd in C++)");
  m.def("conflict_update", &gaqat::conflict_update, "one gradient-conflict tracker step (CUDA), in place");
  m.def("built_with_cuda", &gaqat::built_with_cuda, "True when the CUDA kernels were compiled in");
  m.def("cpu_isa_levels", &gaqat::cpu_isa_levels, "instruction-set levels of the CPU kernels this CPU can run");
  m.def("cpu_isa", &gaqat::cpu_isa, "the instruction-set level the CPU kernels use");
  m.def("set_cpu_isa", &gaqat::set_cpu_isa, "use this level of the CPU kernels (\"\" = the highest available)");
#ifdef GAQAT_WITH_CUDA
  m.def("set_cuda_division", &gaqat::set_cuda_division,
        "division in the CUDA kernels: 0 the built-in plan, 1 IEEE always, 2 exact fast division where valid");
  m.def("set_cuda_launch", &gaqat::set_cuda_launch,
        "launch shape of the CUDA kernels: forward blocks per SM, backward split blocks per SM (0 = default), "
        "prefetch in looping backward blocks (0 = default, 1 = off, 2 = on)");
#endif
}

TORCH_LIBRARY_FRAGMENT(gaqat_kernels, m) {
  m.set_python_module("gaqat_kernels.ops");  // registers the fake implementations and the autograd formula
  m.def("lsq_fake_quant_ext(Tensor x, Tensor scale, int qn, int qp, int axis, float? grad_scale) -> Tensor");
  m.def("lsq_fake_quant_ext_backward(Tensor dy, Tensor x, Tensor scale, int qn, int qp, int axis, "
        "float? grad_scale) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(gaqat_kernels, CPU, m) {
  m.impl("lsq_fake_quant_ext", &gaqat::lsq_fake_quant_ext);
  m.impl("lsq_fake_quant_ext_backward", &gaqat::lsq_fake_quant_ext_backward);
}

#ifdef GAQAT_WITH_CUDA
TORCH_LIBRARY_IMPL(gaqat_kernels, CUDA, m) {
  m.impl("lsq_fake_quant_ext", &gaqat::lsq_fake_quant_ext);
  m.impl("lsq_fake_quant_ext_backward", &gaqat::lsq_fake_quant_ext_backward);
}
#endif
