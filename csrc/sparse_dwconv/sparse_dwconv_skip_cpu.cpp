// C++ (CPU) twin of sparse_dwconv_skip_cuda.cu: the skip path of the sparse
// depthwise conv (sparse_dwconv_math.h, "Skip path").  Its own translation unit:
// the fully unrolled per-tile code is the largest part of the twin's compile,
// and a separate unit builds in parallel with the rest.
#include "sparse_dwconv/sparse_dwconv.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>

namespace convnextv2_fast {

// Skip path (sparse_dwconv_math.h, "Skip path"), the same per-tile functions
// as the CUDA kernels with the halo row read directly (HaloRowView).
at::Tensor sparse_dwconv_skip_fwd_cpu(const at::Tensor& feats, const at::Tensor& taps,
                                      const c10::optional<at::Tensor>& bias,
                                      const at::Tensor& halo_rows, int64_t tile) {
  const int64_t K = check_sparse_dwconv_skip_args(feats, taps, bias, halo_rows, tile);
  TORCH_CHECK(feats.device().is_cpu(), "sparse_dwconv_skip_fwd_cpu: feats must be a CPU tensor");
  const bool has_bias = bias.has_value() && bias->defined();
  auto out = at::empty_like(feats);
  const int C = static_cast<int>(feats.size(1));
  if (K == 0 || feats.size(0) == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, feats.scalar_type(),
                                  "sparse_dwconv_skip_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* x = feats.const_data_ptr<scalar_t>();
    const scalar_t* w = taps.const_data_ptr<scalar_t>();
    const scalar_t* b = has_bias ? bias->const_data_ptr<scalar_t>() : nullptr;
    const int32_t* halo_all = halo_rows.const_data_ptr<int32_t>();
    scalar_t* y = out.mutable_data_ptr<scalar_t>();
    const int vec = sdw::pick_vec(C, 2, {x, w, b, y}, sizeof(scalar_t));
    dispatch_skip_tile(static_cast<int>(tile), [&](auto tc) {
      constexpr int TS = decltype(tc)::value;
      using G = sdw::SkipGeom<TS>;
      constexpr int HP = G::kHaloPx;
      skip_dispatch_vec<G::kVec>(vec, [&](auto vc) {
        constexpr int V = decltype(vc)::value;
        // One task = whole tiles, all channels (taps converted per channel group).
        at::parallel_for(0, K, 16, [&](int64_t kb, int64_t ke) {
          for (int c0 = 0; c0 < C; c0 += V) {
            acc_t wt[kTaps][V];
            for (int t = 0; t < kTaps; ++t)
              for (int v = 0; v < V; ++v) wt[t][v] = static_cast<acc_t>(w[t * C + c0 + v]);
            acc_t init[V];
            sdw::bias_init<scalar_t, V>(b, c0, init);
            for (int64_t k = kb; k < ke; ++k) {
              const sdw::HaloRowView<TS> tab(halo_all + k * HP, C * sizeof(scalar_t));
              sdw::skip_tile_fwd<scalar_t, V, TS>(tab, x, c0, wt, init, true, y);
            }
          }
        });
      });
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> sparse_dwconv_skip_wgrad_cpu(const at::Tensor& grad_out,
                                                                const at::Tensor& feats,
                                                                const at::Tensor& halo_rows,
                                                                int64_t tile) {
  const int64_t K = check_sparse_dwconv_skip_wgrad_args(grad_out, feats, halo_rows, tile);
  TORCH_CHECK(feats.device().is_cpu(),
              "sparse_dwconv_skip_wgrad_cpu: grad_out and feats must be CPU tensors");
  const int C = static_cast<int>(feats.size(1));
  const int per = (kTaps + 1) * C;
  const int64_t chunks = wgrad_skip_chunks(K, tile);
  WgradOut o = wgrad_outputs(feats, chunks, "sparse_dwconv_skip_wgrad_cpu");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, feats.scalar_type(),
                                  "sparse_dwconv_skip_wgrad_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* dy = grad_out.const_data_ptr<scalar_t>();
    const scalar_t* x = feats.const_data_ptr<scalar_t>();
    const int32_t* halo_all = halo_rows.const_data_ptr<int32_t>();
    acc_t* pp = o.partial.mutable_data_ptr<acc_t>();
    const int vec = sdw::pick_vec(C, 2, {dy, x}, sizeof(scalar_t));
    dispatch_skip_tile(static_cast<int>(tile), [&](auto tc) {
      constexpr int TS = decltype(tc)::value;
      using G = sdw::SkipGeom<TS>;
      constexpr int W = G::kWgradWarps;
      skip_dispatch_vec<G::kWgradVec>(vec, [&](auto vc) {
        constexpr int V = decltype(vc)::value;
        // The GPU's order: tile j of chunk k to accumulator (j - k * kWgradTiles) % W
        // (the GPU's warp), each in tile order; the W sums added in order.
        at::parallel_for(0, chunks, 1, [&](int64_t kb, int64_t ke) {
          for (int64_t k = kb; k < ke; ++k) {
            const int64_t j0 = k * G::kWgradTiles, j1 = std::min<int64_t>(K, j0 + G::kWgradTiles);
            for (int c0 = 0; c0 < C; c0 += V) {
              acc_t acc[W][kTaps + 1][V] = {};
              for (int64_t j = j0; j < j1; ++j) {
                const sdw::HaloRowView<TS> tab(halo_all + j * G::kHaloPx, C * sizeof(scalar_t));
                sdw::skip_tile_wgrad<scalar_t, V, TS>(tab, dy, x, c0, acc[(j - j0) % W]);
              }
              for (int t = 0; t <= kTaps; ++t)
                for (int v = 0; v < V; ++v)
                  pp[k * per + t * C + c0 + v] = sdw::sum_slots<acc_t>(
                      &acc[0][t][v], (kTaps + 1) * V, W);
            }
          }
        });
      });
    });
  });
  return reduce_partials_cpu(o, chunks);
}

}  // namespace convnextv2_fast
