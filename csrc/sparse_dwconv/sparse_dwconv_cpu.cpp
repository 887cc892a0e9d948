// C++ (CPU) twin of sparse_dwconv_cuda.cu; see sparse_dwconv.h for the layout.
#include "sparse_dwconv/sparse_dwconv.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>

#include <vector>

namespace convnextv2_fast {

void check_sparse_dwconv_args(const at::Tensor& feats, const at::Tensor& weight,
                              const c10::optional<at::Tensor>& bias,
                              const at::Tensor& site, const at::Tensor& nbr,
                              const char* op) {
  TORCH_CHECK(feats.dim() == 2, op, ": feats must be a 2-D [M, C] tensor of visible-site "
              "features, got ", feats.dim(), " dims");
  TORCH_CHECK(feats.is_contiguous(), op, ": feats must be contiguous");
  const auto st = feats.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16 || st == at::kDouble,
              op, ": feats must be float32, float16, bfloat16 or float64, got ", st);
  const int64_t M = feats.size(0), C = feats.size(1);
  TORCH_CHECK(C > 0, op, ": feats must have at least one channel");
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) == C && weight.size(1) == kTaps, op,
              ": weight must have shape [C, 49] = [", C, ", 49] (depthwise 7x7 taps), got ",
              weight.sizes());
  TORCH_CHECK(weight.scalar_type() == st, op, ": weight dtype ", weight.scalar_type(),
              " must equal the feats dtype ", st);
  TORCH_CHECK(weight.is_contiguous(), op, ": weight must be contiguous");
  TORCH_CHECK(weight.device() == feats.device(), op, ": weight must be on the feats device");
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == C, op, ": bias must have shape [C] = [",
                C, "], got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == st, op, ": bias dtype must equal the feats dtype");
    TORCH_CHECK(bias->is_contiguous(), op, ": bias must be contiguous");
    TORCH_CHECK(bias->device() == feats.device(), op, ": bias must be on the feats device");
  }
  TORCH_CHECK(site.dim() == 1 && site.size(0) == M, op, ": site must be a 1-D tensor with one "
              "flat position per feats row (", M, "), got ", site.sizes());
  TORCH_CHECK(site.scalar_type() == at::kInt, op, ": site must be int32, got ",
              site.scalar_type());
  TORCH_CHECK(site.is_contiguous(), op, ": site must be contiguous");
  TORCH_CHECK(site.device() == feats.device(), op, ": site must be on the feats device");
  TORCH_CHECK(nbr.dim() == 3, op, ": nbr must be an [N, H, W] neighbour index, got ",
              nbr.sizes());
  TORCH_CHECK(nbr.scalar_type() == at::kInt, op, ": nbr must be int32, got ", nbr.scalar_type());
  TORCH_CHECK(nbr.is_contiguous(), op, ": nbr must be contiguous");
  TORCH_CHECK(nbr.device() == feats.device(), op, ": nbr must be on the feats device");
  TORCH_CHECK(nbr.numel() < (int64_t(1) << 31), op, ": nbr has too many positions for int32 "
              "site indices (N * H * W must be < 2^31)");
  TORCH_CHECK(M < (int64_t(1) << 31), op, ": too many rows for int32 row indices");
}

void check_sparse_dwconv_bwd_weight_args(const at::Tensor& grad_out, const at::Tensor& feats,
                                         const at::Tensor& site, const at::Tensor& nbr) {
  TORCH_CHECK(feats.dim() == 2, "sparse_dwconv_bwd_weight: feats must be [M, C], got ",
              feats.sizes());
  const int64_t C = feats.size(1);
  auto dummy_w = at::empty({C, kTaps}, feats.options());  // shape-only for the checks
  check_sparse_dwconv_args(feats, dummy_w, c10::nullopt, site, nbr, "sparse_dwconv_bwd_weight");
  TORCH_CHECK(grad_out.sizes() == feats.sizes(), "sparse_dwconv_bwd_weight: grad_out must have "
              "the shape of feats ", feats.sizes(), ", got ", grad_out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == feats.scalar_type(),
              "sparse_dwconv_bwd_weight: grad_out dtype must equal the feats dtype");
  TORCH_CHECK(grad_out.is_contiguous(), "sparse_dwconv_bwd_weight: grad_out must be contiguous");
}

namespace {

template <typename scalar_t>
void fwd_kernel_cpu(const scalar_t* feats, const scalar_t* weight, const scalar_t* bias,
                    const int32_t* site, const int32_t* nbr, scalar_t* out, int64_t M,
                    int64_t C, int64_t H, int64_t W) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t HW = H * W;
  at::parallel_for(0, M, 64, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(C);
    int32_t rows[kTaps];
    for (int64_t m = begin; m < end; ++m) {
      const int64_t s = site[m];
      const int64_t n = s / HW, h = (s % HW) / W, w = s % W;
      for (int t = 0; t < kTaps; ++t) {
        const int64_t y = h + t / 7 - 3, x = w + t % 7 - 3;
        rows[t] = (y >= 0 && y < H && x >= 0 && x < W) ? nbr[n * HW + y * W + x] : -1;
      }
      for (int64_t c = 0; c < C; ++c) acc[c] = bias ? acc_t(bias[c]) : acc_t(0);
      for (int t = 0; t < kTaps; ++t) {
        if (rows[t] < 0) continue;
        const scalar_t* src = feats + int64_t(rows[t]) * C;
        for (int64_t c = 0; c < C; ++c)
          acc[c] += acc_t(weight[c * kTaps + t]) * acc_t(src[c]);
      }
      scalar_t* dst = out + m * C;
      for (int64_t c = 0; c < C; ++c) dst[c] = scalar_t(acc[c]);
    }
  });
}

template <typename scalar_t>
void wgrad_kernel_cpu(const scalar_t* grad_out, const scalar_t* feats, const int32_t* site,
                      const int32_t* nbr, at::opmath_type<scalar_t>* partial, int64_t M,
                      int64_t C, int64_t H, int64_t W) {
  using acc_t = at::opmath_type<scalar_t>;
  // partial: [chunks, C, 50] fp32 (fp64 for fp64 feats); chunk k covers rows [k * R, (k + 1) * R).
  const int64_t HW = H * W, R = kWgradRowsPerChunk;
  const int64_t chunks = (M + R - 1) / R;
  at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
    int32_t rows[kTaps];
    for (int64_t k = cb; k < ce; ++k) {
      acc_t* p = partial + k * C * (kTaps + 1);
      const int64_t m_end = std::min(M, (k + 1) * R);
      for (int64_t m = k * R; m < m_end; ++m) {
        const int64_t s = site[m];
        const int64_t n = s / HW, h = (s % HW) / W, w = s % W;
        for (int t = 0; t < kTaps; ++t) {
          const int64_t y = h + t / 7 - 3, x = w + t % 7 - 3;
          rows[t] = (y >= 0 && y < H && x >= 0 && x < W) ? nbr[n * HW + y * W + x] : -1;
        }
        const scalar_t* g = grad_out + m * C;
        for (int t = 0; t < kTaps; ++t) {
          if (rows[t] < 0) continue;
          const scalar_t* src = feats + int64_t(rows[t]) * C;
          for (int64_t c = 0; c < C; ++c)
            p[c * (kTaps + 1) + t] += acc_t(g[c]) * acc_t(src[c]);
        }
        for (int64_t c = 0; c < C; ++c) p[c * (kTaps + 1) + kTaps] += acc_t(g[c]);
      }
    }
  });
}

}  // namespace

at::Tensor sparse_dwconv_fwd_cpu(const at::Tensor& feats, const at::Tensor& weight,
                                 const c10::optional<at::Tensor>& bias,
                                 const at::Tensor& site, const at::Tensor& nbr) {
  check_sparse_dwconv_args(feats, weight, bias, site, nbr, "sparse_dwconv_fwd");
  TORCH_CHECK(feats.device().is_cpu(), "sparse_dwconv_fwd_cpu: feats must be a CPU tensor");
  const bool has_bias = bias.has_value() && bias->defined();
  auto out = at::empty_like(feats);
  const int64_t M = feats.size(0), C = feats.size(1), H = nbr.size(1), W = nbr.size(2);
  if (M == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, feats.scalar_type(),
                                  "sparse_dwconv_fwd_cpu", [&] {
    fwd_kernel_cpu<scalar_t>(feats.const_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(),
                             has_bias ? bias->const_data_ptr<scalar_t>() : nullptr,
                             site.const_data_ptr<int32_t>(), nbr.const_data_ptr<int32_t>(),
                             out.mutable_data_ptr<scalar_t>(), M, C, H, W);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> sparse_dwconv_bwd_weight_cpu(
    const at::Tensor& grad_out, const at::Tensor& feats, const at::Tensor& site,
    const at::Tensor& nbr) {
  check_sparse_dwconv_bwd_weight_args(grad_out, feats, site, nbr);
  const int64_t M = feats.size(0), C = feats.size(1);
  TORCH_CHECK(feats.device().is_cpu() && grad_out.device().is_cpu(),
              "sparse_dwconv_bwd_weight_cpu: grad_out and feats must be CPU tensors");
  const int64_t H = nbr.size(1), W = nbr.size(2);
  const int64_t chunks = (M + kWgradRowsPerChunk - 1) / kWgradRowsPerChunk;
  const auto acc_dtype = feats.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto partial = at::zeros({std::max<int64_t>(chunks, 1), C, kTaps + 1},
                           feats.options().dtype(acc_dtype));
  auto total = at::zeros({C, kTaps + 1}, feats.options().dtype(acc_dtype));
  if (M > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, feats.scalar_type(),
                                    "sparse_dwconv_bwd_weight_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      acc_t* pp = partial.mutable_data_ptr<acc_t>();
      wgrad_kernel_cpu<scalar_t>(grad_out.const_data_ptr<scalar_t>(),
                                 feats.const_data_ptr<scalar_t>(), site.const_data_ptr<int32_t>(),
                                 nbr.const_data_ptr<int32_t>(), pp, M, C, H, W);
      // Fixed-order sum over chunks (chunk 0 first), independent of the thread count.
      acc_t* tp = total.mutable_data_ptr<acc_t>();
      const int64_t per = C * (kTaps + 1);
      at::parallel_for(0, per, 1024, [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) {
          acc_t s = 0;
          for (int64_t k = 0; k < chunks; ++k) s += pp[k * per + i];
          tp[i] = s;
        }
      });
    });
  }
  return {total.narrow(1, 0, kTaps).contiguous(), total.select(1, kTaps).contiguous()};
}

}  // namespace convnextv2_fast
