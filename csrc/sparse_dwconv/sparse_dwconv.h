// Submanifold depthwise 7x7 convolution over the visible sites of a batch.
//
// Layout shared by the C++ (CPU) and CUDA twins (one signature each):
//   feats    [M, C]   compact features of the M visible sites (fp32/fp16/bf16/fp64)
//   taps     [49, C]  depthwise taps, tap t = dy * 7 + dx (dy, dx in 0..6) major, so the
//                     channels of one tap are contiguous; same dtype as feats
//   bias     [C] or undefined
//   nbr_rows [M, 49] int32  row of the site at offset (dy - 3, dx - 3) of row m, or -1
//            (outside the map or invisible); built once per stage by the layout
//            (StageLayout.neighbour_rows) and shared by every block and pass.
//
// Forward: out[m, c] = bias[c] + sum_{t: nbr_rows[m, t] >= 0} taps[t, c] * feats[nbr_rows[m, t], c].
// The input gradient is the same op with the taps reversed (taps[48 - t]; submanifold
// neighbourhoods are symmetric), so it needs no kernel of its own.
//
// Tile path of the forward / input gradient (same result as the gather path
// above, bit for bit under one compiler; see sparse_dwconv_math.h, "Tile path"):
//   halo_rows [K, (tile + 6)^2] int32  per tile (an aligned tile x tile block of
//            the stage map, tile = 2, 4 or 8) the rows of its (tile + 6)^2 halo
//            pixels, -1 = absent (StageLayout.tile_halo_rows(tile)); every
//            visible site is an own pixel of exactly one tile.
//   out[m, c] as above for the rows that are own pixels of a tile; rows of no
//   tile are NOT written (the layout's tiles cover every row).
// Each tile's halo is staged once per channel group (shared memory on the GPU)
// and the dense 7x7 stencil runs on it: no [M, 49] table reads.
//
// Tile path of the weight/bias gradient (sparse_dwconv_tile_wgrad(grad_out, feats,
// halo_rows, tile) -> (grad_taps, grad_bias), same outputs as the gather op below
// up to fp32 summation order): per tile the x halo is staged once (zeros for
// absent pixels) and the tile's dy read once, all 49 taps + the bias
// accumulated in opmath; chunks of TileGeom<tile>::kWgradTiles consecutive
// tiles write partials [chunks, 50, C], summed in chunk order like the gather's.
//
// Tensor-core tile path of the forward / input gradient (fp16 / bf16, 8x8 tiles;
// sparse_dwconv_mma.h): sparse_dwconv_mma_fwd(feats, taps, bias, halo_rows) with
// halo_rows = StageLayout.tile_halo_rows(8) -> out as the tile path, up to the
// fp32 summation order (mma.sync accumulates each 16-column k block in
// hardware).  C % 8 == 0 and 16-byte aligned feats (the host falls back to the
// FFMA tile path otherwise).  The C++ twin emulates ldmatrix / mma.sync lane by
// lane with the kernel's index functions.
//
// Weight/bias gradient: deterministic.  Rows are split into fixed chunks of
// sdw::kWgradRowsPerChunk; each chunk writes fp32 (fp64 for fp64) partials
// [chunks, 50, C] (49 taps + bias), summed afterwards in chunk order.  No float
// atomics anywhere.  Returns (grad_taps [49, C], grad_bias [C]) in fp32 (fp64).
//
// The per-output and per-chunk arithmetic lives in sparse_dwconv_math.h and is
// compiled into both twins.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <tuple>
#include <type_traits>

#include "sparse_dwconv/sparse_dwconv_math.h"

namespace convnextv2_fast {

using sdw::kTaps;
using sdw::kWgradRowsPerChunk;

// fp32 / fp16 / bf16: the CUDA kernels' dtypes (fp64 is CPU-only).
#define CNX_DISPATCH_FLOAT_HALF_BF16(TYPE, NAME, ...)                    \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                          \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)            \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)             \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

// fp16 / bf16: the dtypes of the tensor-core path (both twins).
#define CNX_DISPATCH_HALF_BF16(TYPE, NAME, ...)                           \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

// Calls f(std::integral_constant<int, V>{}) for the runtime vector width v, one of Vs.
template <int... Vs, typename F>
void dispatch_vec(int v, F&& f) {
  const bool done = ((v == Vs ? (f(std::integral_constant<int, Vs>{}), true) : false) || ...);
  TORCH_CHECK(done, "sparse_dwconv: internal error, no instantiation for vector width ", v);
}

void check_sparse_dwconv_args(const at::Tensor& feats, const at::Tensor& taps,
                              const c10::optional<at::Tensor>& bias,
                              const at::Tensor& nbr_rows, const char* op);
// grad_out/feats/nbr_rows checks shared by both twins' weight-gradient ops.
void check_sparse_dwconv_bwd_weight_args(const at::Tensor& grad_out, const at::Tensor& feats,
                                         const at::Tensor& nbr_rows);

// Tile sizes with an instantiation (the template parameter TS of the tile path).
// Calls f(std::integral_constant<int, TS>{}) for the runtime tile size.
template <typename F>
void dispatch_tile(int tile, F&& f) {
  switch (tile) {
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 8: f(std::integral_constant<int, 8>{}); break;
    default: TORCH_CHECK(false, "sparse_dwconv_tile_fwd: tile must be 2, 4 or 8, got ", tile);
  }
}

// Tile sizes of the skip path (sparse_dwconv_skip_fwd / _wgrad, TS = 1, 2, 4).
template <typename F>
void dispatch_skip_tile(int tile, F&& f) {
  switch (tile) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    default: TORCH_CHECK(false, "sparse_dwconv_skip: tile must be 1, 2 or 4, got ", tile);
  }
}

// Checks of the tile op's arguments (both twins); returns the number of tiles.
int64_t check_sparse_dwconv_tile_args(const at::Tensor& feats, const at::Tensor& taps,
                                      const c10::optional<at::Tensor>& bias,
                                      const at::Tensor& halo_rows, int64_t tile,
                                      const char* op = "sparse_dwconv_tile_fwd");
// Checks of the tensor-core tile op's arguments (both twins); returns the number of tiles.
int64_t check_sparse_dwconv_mma_args(const at::Tensor& feats, const at::Tensor& taps,
                                     const c10::optional<at::Tensor>& bias,
                                     const at::Tensor& halo_rows);
// Checks of the tile weight-gradient op's arguments; returns the number of tiles.
int64_t check_sparse_dwconv_tile_wgrad_args(const at::Tensor& grad_out, const at::Tensor& feats,
                                            const at::Tensor& halo_rows, int64_t tile);

// Checks of the skip ops' arguments (both twins); return the number of tiles.
int64_t check_sparse_dwconv_skip_args(const at::Tensor& feats, const at::Tensor& taps,
                                      const c10::optional<at::Tensor>& bias,
                                      const at::Tensor& halo_rows, int64_t tile);
int64_t check_sparse_dwconv_skip_wgrad_args(const at::Tensor& grad_out, const at::Tensor& feats,
                                            const at::Tensor& halo_rows, int64_t tile);

// Channels a lane (GPU) / an inner loop (CPU twin) of the skip path computes:
// VMAX = SkipGeom<TS>::kVec (forward) or kWgradVec (weight gradient) where C and
// the pointers allow it (`vec` from pick_vec(C, 2, ...)), else 1.  Both twins
// instantiate exactly these widths (the unrolled skip code is large: wider CPU
// widths would multiply the host compile, and the CPU keeps the gather path).
template <int VMAX, typename F>
void skip_dispatch_vec(int vec, F&& f) {
  if constexpr (VMAX == 2) dispatch_vec<2, 1>(vec, f);
  else dispatch_vec<1>(1, f);
}

// Chunks of the skip weight gradient (at least one: it writes zeros for K == 0).
inline int64_t wgrad_skip_chunks(int64_t K, int64_t tile) {
  int64_t chunks = 1;
  dispatch_skip_tile(static_cast<int>(tile), [&](auto tc) {
    constexpr int n = sdw::SkipGeom<decltype(tc)::value>::kWgradTiles;
    chunks = std::max<int64_t>(1, (K + n - 1) / n);
  });
  return chunks;
}

// Chunks of the tile weight gradient (at least one: it writes zeros for K == 0).
inline int64_t wgrad_tile_chunks(int64_t K, int64_t tile) {
  int64_t chunks = 1;
  dispatch_tile(static_cast<int>(tile), [&](auto tc) {
    constexpr int n = sdw::TileGeom<decltype(tc)::value>::kWgradTiles;
    chunks = std::max<int64_t>(1, (K + n - 1) / n);
  });
  return chunks;
}

// The weight-gradient outputs of both paths: opmath partials [chunks, 50, C],
// grad_taps [49, C], grad_bias [C] (fp32; fp64 for fp64 feats).
struct WgradOut {
  at::Tensor partial, grad_taps, grad_bias;
};
WgradOut wgrad_outputs(const at::Tensor& feats, int64_t chunks, const char* op);
// (grad_taps, grad_bias) of `o`: its [chunks, 50, C] partials summed in chunk
// order (every weight-gradient path of the twin).
std::tuple<at::Tensor, at::Tensor> reduce_partials_cpu(WgradOut& o, int64_t chunks);
#ifdef WITH_CUDA
std::tuple<at::Tensor, at::Tensor> reduce_partials_cuda(WgradOut& o, int64_t chunks);
#endif

at::Tensor sparse_dwconv_fwd_cpu(const at::Tensor& feats, const at::Tensor& taps,
                                 const c10::optional<at::Tensor>& bias,
                                 const at::Tensor& nbr_rows);
at::Tensor sparse_dwconv_tile_fwd_cpu(const at::Tensor& feats, const at::Tensor& taps,
                                      const c10::optional<at::Tensor>& bias,
                                      const at::Tensor& halo_rows, int64_t tile);
at::Tensor sparse_dwconv_mma_fwd_cpu(const at::Tensor& feats, const at::Tensor& taps,
                                     const c10::optional<at::Tensor>& bias,
                                     const at::Tensor& halo_rows);
std::tuple<at::Tensor, at::Tensor> sparse_dwconv_bwd_weight_cpu(
    const at::Tensor& grad_out, const at::Tensor& feats, const at::Tensor& nbr_rows);
std::tuple<at::Tensor, at::Tensor> sparse_dwconv_tile_wgrad_cpu(
    const at::Tensor& grad_out, const at::Tensor& feats, const at::Tensor& halo_rows,
    int64_t tile);
at::Tensor sparse_dwconv_skip_fwd_cpu(const at::Tensor& feats, const at::Tensor& taps,
                                      const c10::optional<at::Tensor>& bias,
                                      const at::Tensor& halo_rows, int64_t tile);
std::tuple<at::Tensor, at::Tensor> sparse_dwconv_skip_wgrad_cpu(
    const at::Tensor& grad_out, const at::Tensor& feats, const at::Tensor& halo_rows,
    int64_t tile);

#ifdef WITH_CUDA
at::Tensor sparse_dwconv_fwd_cuda(const at::Tensor& feats, const at::Tensor& taps,
                                  const c10::optional<at::Tensor>& bias,
                                  const at::Tensor& nbr_rows);
at::Tensor sparse_dwconv_tile_fwd_cuda(const at::Tensor& feats, const at::Tensor& taps,
                                       const c10::optional<at::Tensor>& bias,
                                       const at::Tensor& halo_rows, int64_t tile);
at::Tensor sparse_dwconv_mma_fwd_cuda(const at::Tensor& feats, const at::Tensor& taps,
                                      const c10::optional<at::Tensor>& bias,
                                      const at::Tensor& halo_rows);
std::tuple<at::Tensor, at::Tensor> sparse_dwconv_bwd_weight_cuda(
    const at::Tensor& grad_out, const at::Tensor& feats, const at::Tensor& nbr_rows);
std::tuple<at::Tensor, at::Tensor> sparse_dwconv_tile_wgrad_cuda(
    const at::Tensor& grad_out, const at::Tensor& feats, const at::Tensor& halo_rows,
    int64_t tile);
at::Tensor sparse_dwconv_skip_fwd_cuda(const at::Tensor& feats, const at::Tensor& taps,
                                       const c10::optional<at::Tensor>& bias,
                                       const at::Tensor& halo_rows, int64_t tile);
std::tuple<at::Tensor, at::Tensor> sparse_dwconv_skip_wgrad_cuda(
    const at::Tensor& grad_out, const at::Tensor& feats, const at::Tensor& halo_rows,
    int64_t tile);
#endif

}  // namespace convnextv2_fast
