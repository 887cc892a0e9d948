// CUDA twin of sparse_dwconv_cpu.cpp; see sparse_dwconv.h for the layout.
//
// Forward: one thread per (visible row, channel); a block holds 32 channels x 8
// rows, channels fastest so feature loads are coalesced.  The 49 neighbour rows
// of the block's 8 sites are looked up once into shared memory.
// Weight/bias gradient: a block owns 32 channels x one chunk of
// kWgradRowsPerChunk rows; each thread keeps 50 fp32 accumulators (49 taps +
// bias) in registers, the 4 row-groups are combined in shared memory in fixed
// order and written as a per-chunk partial; a second kernel sums the partials
// in chunk order.  Bit-reproducible: no atomics.
#include "sparse_dwconv/sparse_dwconv.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

namespace convnextv2_fast {
namespace {

constexpr int kFwdChannels = 32;
constexpr int kFwdRows = 8;
constexpr int kWgChannels = 32;
constexpr int kWgRowGroups = 4;

// fp32 / fp16 / bf16 (fp64 is CPU-only: its partial buffer would not fit static smem).
#define CNX_DISPATCH_FLOAT_HALF_BF16(TYPE, NAME, ...)                    \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                          \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)            \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)             \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

template <typename scalar_t>
__global__ void sparse_dwconv_fwd_kernel(
    const scalar_t* __restrict__ feats,   // [M, C]
    const scalar_t* __restrict__ weight,  // [C, 49]
    const scalar_t* __restrict__ bias,    // [C] or nullptr
    const int32_t* __restrict__ site,     // [M]
    const int32_t* __restrict__ nbr,      // [N, H, W]
    scalar_t* __restrict__ out,           // [M, C]
    int64_t M, int64_t C, int64_t H, int64_t W) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ int32_t rows[kFwdRows][kTaps];
  const int64_t row0 = int64_t(blockIdx.x) * kFwdRows;
  const int tid = threadIdx.y * kFwdChannels + threadIdx.x;
  const int64_t HW = H * W;
  for (int i = tid; i < kFwdRows * kTaps; i += kFwdRows * kFwdChannels) {
    const int r = i / kTaps, t = i % kTaps;
    const int64_t m = row0 + r;
    int32_t v = -1;
    if (m < M) {
      const int64_t s = site[m];
      const int64_t n = s / HW, h = (s % HW) / W, w = s % W;
      const int64_t y = h + t / 7 - 3, x = w + t % 7 - 3;
      if (y >= 0 && y < H && x >= 0 && x < W) v = nbr[n * HW + y * W + x];
    }
    rows[r][t] = v;
  }
  __syncthreads();
  const int64_t m = row0 + threadIdx.y;
  const int64_t c = int64_t(blockIdx.y) * kFwdChannels + threadIdx.x;
  if (m >= M || c >= C) return;
  acc_t acc = bias ? static_cast<acc_t>(bias[c]) : acc_t(0);
  const scalar_t* wc = weight + c * kTaps;
#pragma unroll 7
  for (int t = 0; t < kTaps; ++t) {
    const int32_t r = rows[threadIdx.y][t];
    if (r >= 0) acc += static_cast<acc_t>(wc[t]) * static_cast<acc_t>(feats[int64_t(r) * C + c]);
  }
  out[m * C + c] = static_cast<scalar_t>(acc);
}

template <typename scalar_t>
__global__ void sparse_dwconv_wgrad_partial_kernel(
    const scalar_t* __restrict__ grad_out,       // [M, C]
    const scalar_t* __restrict__ feats,          // [M, C]
    const int32_t* __restrict__ site,            // [M]
    const int32_t* __restrict__ nbr,             // [N, H, W]
    at::opmath_type<scalar_t>* __restrict__ partial,  // [chunks, C, 50]
    int64_t M, int64_t C, int64_t H, int64_t W) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t red[kWgRowGroups][kWgChannels][kTaps + 1];
  const int64_t chunk = blockIdx.y;
  const int64_t c0 = int64_t(blockIdx.x) * kWgChannels;
  const int64_t c = c0 + threadIdx.x;
  const int64_t HW = H * W;
  acc_t acc[kTaps + 1];
#pragma unroll
  for (int t = 0; t <= kTaps; ++t) acc[t] = acc_t(0);
  const int64_t m_begin = chunk * kWgradRowsPerChunk;
  const int64_t m_end = min(M, m_begin + kWgradRowsPerChunk);
  if (c < C) {
    for (int64_t m = m_begin + threadIdx.y; m < m_end; m += kWgRowGroups) {
      const int64_t s = site[m];
      const int64_t n = s / HW, h = (s % HW) / W, w = s % W;
      const acc_t g = static_cast<acc_t>(grad_out[m * C + c]);
#pragma unroll
      for (int t = 0; t < kTaps; ++t) {
        const int64_t y = h + t / 7 - 3, x = w + t % 7 - 3;
        if (y >= 0 && y < H && x >= 0 && x < W) {
          const int32_t r = nbr[n * HW + y * W + x];
          if (r >= 0) acc[t] += g * static_cast<acc_t>(feats[int64_t(r) * C + c]);
        }
      }
      acc[kTaps] += g;
    }
  }
#pragma unroll
  for (int t = 0; t <= kTaps; ++t) red[threadIdx.y][threadIdx.x][t] = acc[t];
  __syncthreads();
  const int tid = threadIdx.y * kWgChannels + threadIdx.x;
  for (int i = tid; i < kWgChannels * (kTaps + 1); i += kWgChannels * kWgRowGroups) {
    const int cl = i / (kTaps + 1), t = i % (kTaps + 1);
    if (c0 + cl >= C) continue;
    acc_t s = red[0][cl][t];
#pragma unroll
    for (int g = 1; g < kWgRowGroups; ++g) s += red[g][cl][t];
    partial[(chunk * C + c0 + cl) * (kTaps + 1) + t] = s;
  }
}

template <typename acc_t>
__global__ void sparse_dwconv_wgrad_reduce_kernel(
    const acc_t* __restrict__ partial,  // [chunks, C * 50]
    acc_t* __restrict__ total,          // [C * 50]
    int64_t chunks, int64_t per) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= per) return;
  acc_t s = acc_t(0);
  for (int64_t k = 0; k < chunks; ++k) s += partial[k * per + i];  // fixed order
  total[i] = s;
}

bool chunks_fit(int64_t M) { return (M + kWgradRowsPerChunk - 1) / kWgradRowsPerChunk <= 65535; }

}  // namespace

at::Tensor sparse_dwconv_fwd_cuda(const at::Tensor& feats, const at::Tensor& weight,
                                  const c10::optional<at::Tensor>& bias,
                                  const at::Tensor& site, const at::Tensor& nbr) {
  check_sparse_dwconv_args(feats, weight, bias, site, nbr, "sparse_dwconv_fwd");
  TORCH_CHECK(feats.is_cuda(), "sparse_dwconv_fwd_cuda: feats must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(feats.device());
  const bool has_bias = bias.has_value() && bias->defined();
  auto out = at::empty_like(feats);
  const int64_t M = feats.size(0), C = feats.size(1), H = nbr.size(1), W = nbr.size(2);
  if (M == 0 || C == 0) return out;
  const dim3 block(kFwdChannels, kFwdRows);
  TORCH_CHECK((C + kFwdChannels - 1) / kFwdChannels <= 65535,
              "sparse_dwconv_fwd_cuda: feats has too many channels (C / 32 must be <= 65535)");
  const dim3 grid((M + kFwdRows - 1) / kFwdRows, (C + kFwdChannels - 1) / kFwdChannels);
  auto stream = at::cuda::getCurrentCUDAStream();
  CNX_DISPATCH_FLOAT_HALF_BF16(feats.scalar_type(),
                                  "sparse_dwconv_fwd_cuda", [&] {
    sparse_dwconv_fwd_kernel<scalar_t><<<grid, block, 0, stream>>>(
        feats.const_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(),
        has_bias ? bias->const_data_ptr<scalar_t>() : nullptr, site.const_data_ptr<int32_t>(),
        nbr.const_data_ptr<int32_t>(), out.mutable_data_ptr<scalar_t>(), M, C, H, W);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> sparse_dwconv_bwd_weight_cuda(
    const at::Tensor& grad_out, const at::Tensor& feats, const at::Tensor& site,
    const at::Tensor& nbr) {
  check_sparse_dwconv_bwd_weight_args(grad_out, feats, site, nbr);
  const int64_t M = feats.size(0), C = feats.size(1);
  TORCH_CHECK(feats.is_cuda() && grad_out.device() == feats.device(),
              "sparse_dwconv_bwd_weight_cuda: grad_out and feats must be on one CUDA device");
  TORCH_CHECK(chunks_fit(M), "sparse_dwconv_bwd_weight_cuda: too many rows (M / ",
              kWgradRowsPerChunk, " must be <= 65535)");
  const c10::cuda::CUDAGuard guard(feats.device());
  const int64_t H = nbr.size(1), W = nbr.size(2);
  const int64_t chunks = std::max<int64_t>((M + kWgradRowsPerChunk - 1) / kWgradRowsPerChunk, 1);
  const auto acc_dtype = feats.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto partial = at::empty({chunks, C, kTaps + 1}, feats.options().dtype(acc_dtype));
  auto total = at::empty({C, kTaps + 1}, feats.options().dtype(acc_dtype));
  auto stream = at::cuda::getCurrentCUDAStream();
  CNX_DISPATCH_FLOAT_HALF_BF16(feats.scalar_type(),
                                  "sparse_dwconv_bwd_weight_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const dim3 block(kWgChannels, kWgRowGroups);
    const dim3 grid((C + kWgChannels - 1) / kWgChannels, chunks);
    // M == 0 still launches: every partial is then written with zeros.
    sparse_dwconv_wgrad_partial_kernel<scalar_t><<<grid, block, 0, stream>>>(
        grad_out.const_data_ptr<scalar_t>(), feats.const_data_ptr<scalar_t>(),
        site.const_data_ptr<int32_t>(), nbr.const_data_ptr<int32_t>(),
        partial.mutable_data_ptr<acc_t>(), M, C, H, W);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const int64_t per = C * (kTaps + 1);
    const int threads = 256;
    sparse_dwconv_wgrad_reduce_kernel<acc_t><<<(per + threads - 1) / threads, threads, 0,
                                               stream>>>(partial.const_data_ptr<acc_t>(),
                                                         total.mutable_data_ptr<acc_t>(),
                                                         chunks, per);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {total.narrow(1, 0, kTaps).contiguous(), total.select(1, kTaps).contiguous()};
}

}  // namespace convnextv2_fast
