// Submanifold depthwise 7x7 convolution over the visible sites of a batch.
//
// Layout shared by the C++ (CPU) and CUDA twins (one signature each):
//   feats  [M, C]   compact features of the M visible sites (fp32/fp16/bf16/fp64)
//   weight [C, 49]  depthwise taps, tap t = dy * 7 + dx (dy, dx in 0..6), same dtype as feats
//   bias   [C] or undefined
//   site   [M] int32  flat position n * H * W + h * W + w of row m
//   nbr    [N, H, W] int32  row of the visible site at each position, or -1
//
// Forward: out[m, c] = bias[c] + sum_t weight[c, t] * feats[nbr[n, h + dy - 3, w + dx - 3], c]
// (taps outside the map or on an invisible site contribute nothing).  The input
// gradient is the same op with the tap order reversed (submanifold neighbourhoods
// are symmetric), so it needs no kernel of its own.
//
// Weight/bias gradient: deterministic.  Rows are split into fixed chunks of
// kWgradRowsPerChunk; each chunk writes fp32 partials [chunks, C, 50] (49 taps +
// bias), summed afterwards in chunk order.  No float atomics anywhere.
#pragma once
#include <ATen/core/Tensor.h>
#include <tuple>

namespace convnextv2_fast {

constexpr int kTaps = 49;
constexpr int kWgradRowsPerChunk = 256;

void check_sparse_dwconv_args(const at::Tensor& feats, const at::Tensor& weight,
                              const c10::optional<at::Tensor>& bias,
                              const at::Tensor& site, const at::Tensor& nbr,
                              const char* op);
// grad_out/feats/site/nbr checks shared by both twins' weight-gradient ops.
void check_sparse_dwconv_bwd_weight_args(const at::Tensor& grad_out, const at::Tensor& feats,
                                         const at::Tensor& site, const at::Tensor& nbr);

at::Tensor sparse_dwconv_fwd_cpu(const at::Tensor& feats, const at::Tensor& weight,
                                 const c10::optional<at::Tensor>& bias,
                                 const at::Tensor& site, const at::Tensor& nbr);
std::tuple<at::Tensor, at::Tensor> sparse_dwconv_bwd_weight_cpu(
    const at::Tensor& grad_out, const at::Tensor& feats, const at::Tensor& site,
    const at::Tensor& nbr);

#ifdef WITH_CUDA
at::Tensor sparse_dwconv_fwd_cuda(const at::Tensor& feats, const at::Tensor& weight,
                                  const c10::optional<at::Tensor>& bias,
                                  const at::Tensor& site, const at::Tensor& nbr);
std::tuple<at::Tensor, at::Tensor> sparse_dwconv_bwd_weight_cuda(
    const at::Tensor& grad_out, const at::Tensor& feats, const at::Tensor& site,
    const at::Tensor& nbr);
#endif

}  // namespace convnextv2_fast
