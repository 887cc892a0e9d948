// CUDA skip path of the sparse depthwise conv (sparse_dwconv_math.h, "Skip
// path"; its C++ twin is sparse_dwconv_skip_cpu.cpp): per T x T output tile
// (T = 1, 2, 4) only the visible source tiles of its halo are loaded and
// multiplied, with compile-time taps.  Its own translation unit: the fully
// unrolled kernels compile in parallel with the other sparse dwconv kernels.
#include "sparse_dwconv/sparse_dwconv.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>

namespace convnextv2_fast {
namespace {

constexpr int kSkipWarps = 4;           // warps per CTA of the skip kernels
constexpr int kSkipThreads = 32 * kSkipWarps;
// The skip kernels' bodies are compiled for sm_90 (Hopper, the GPU the project
// targets) only: every further architecture adds their fully unrolled code to
// each build (the default list has eight targets), for GPUs the project does not
// tune for.  Elsewhere the host refuses them and conv_skip takes the gather /
// tile paths.
#define kSkipArch 900
constexpr int kSkipMajor = 9;

// Skip path (sparse_dwconv_math.h, "Skip path"): the warp's view of one halo
// row -- entry 32 i + lane loaded in one coalesced load per 32 entries, kept as
// its row's byte offset in o[i] (row x pitch), the ballots of entry >= 0 in
// m[i] (warp-uniform); offset(p) is a shuffle from lane p % 32.
template <int TS>
struct WarpHaloView {
  static constexpr int kWords = sdw::SkipGeom<TS>::kWords;
  uint32_t o[kWords];
  uint32_t m[kWords];
  __device__ __forceinline__ WarpHaloView(const int32_t* __restrict__ halo, int lane,
                                          uint32_t pitch) {
    CNX_UNROLL
    for (int i = 0; i < kWords; ++i) {
      const int p = 32 * i + lane;
      const int32_t r = p < sdw::SkipGeom<TS>::kHaloPx ? __ldg(halo + p) : -1;
      m[i] = __ballot_sync(0xffffffffu, r >= 0);
      o[i] = static_cast<uint32_t>(r) * pitch;
    }
  }
  CNX_HD uint32_t offset(int p) const {
#ifdef __CUDA_ARCH__
    return __shfl_sync(0xffffffffu, o[p >> 5], p & 31);
#else
    return 0;  // host pass only: the view is never built on the host
#endif
  }
  CNX_HD uint32_t word(int i) const { return m[i]; }
};

// Channel group of lane `lane` of channel block `blk`: V channels from c0;
// lanes past C compute the last group (valid loads, the shuffles and ballots
// need every lane) and store nothing.
struct SkipLane {
  int c0;
  bool active;
};
template <int V>
__device__ __forceinline__ SkipLane skip_lane(int blk, int lane, int C) {
  const int c = (blk * 32 + lane) * V;
  return {c < C ? c : C - V, c < C};
}

// Forward / input gradient: warp y of CTA (x, channel block) runs tiles
// x * kSkipWarps * tiles_per_warp + y, + kSkipWarps, ... (consecutive tiles of
// one image share most source pixels: L1 hits), lanes along channels (V each),
// its 49 taps in opmath registers for all of them.
template <typename T, int V, int TS>
__global__ void __launch_bounds__(kSkipThreads, 3) sparse_dwconv_skip_fwd_kernel(
    const T* __restrict__ x,            // [M, C] feats (or grad_out for the input grad)
    const T* __restrict__ taps,         // [49, C] (reversed for the input grad)
    const T* __restrict__ bias,         // [C] or nullptr
    const int32_t* __restrict__ halo_rows,  // [K, (TS + 6)^2] halo rows, -1 = absent
    T* __restrict__ out,                // [M, C]
    int K, int C, int tiles_per_warp) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ != kSkipArch
  __trap();  // compiled for sm_90 only (kSkipArch); the host never launches it elsewhere
#else
  using acc_t = at::opmath_type<T>;
  constexpr int kHaloPx = sdw::SkipGeom<TS>::kHaloPx;
  const SkipLane ln = skip_lane<V>(blockIdx.y, threadIdx.x, C);
  acc_t w[sdw::kTaps][V];
  CNX_UNROLL
  for (int t = 0; t < sdw::kTaps; ++t) {
    const sdw::Vec<T, V> wv = sdw::load_vec<T, V>(taps + t * C + ln.c0);
    CNX_UNROLL
    for (int v = 0; v < V; ++v) w[t][v] = static_cast<acc_t>(wv.v[v]);
  }
  acc_t init[V];
  sdw::bias_init<T, V>(bias, ln.c0, init);
  const uint32_t pitch = static_cast<uint32_t>(C) * sizeof(T);
  const int k0 = blockIdx.x * kSkipWarps * tiles_per_warp;
  const int k1 = min(K, k0 + kSkipWarps * tiles_per_warp);
  for (int k = k0 + threadIdx.y; k < k1; k += kSkipWarps) {
    const WarpHaloView<TS> tab(halo_rows + k * kHaloPx, threadIdx.x, pitch);
    sdw::skip_tile_fwd<T, V, TS>(tab, x, ln.c0, w, init, ln.active, out);
  }
#endif
}

// Weight / bias gradient: CTA (chunk, channel block); warp y accumulates tiles
// chunk * kWgradTiles + y, + kSkipWarps, ... in 50 x V opmath registers; the
// warps' sums are added in warp order through shared memory (((a0 + a1) + a2) +
// a3, sum_slots' order), the last warp storing the chunk's partial.
template <typename T, int V, int TS>
__global__ void __launch_bounds__(kSkipThreads, 2) sparse_dwconv_skip_wgrad_kernel(
    const T* __restrict__ dy,           // [M, C]
    const T* __restrict__ x,            // [M, C]
    const int32_t* __restrict__ halo_rows,  // [K, (TS + 6)^2]
    at::opmath_type<T>* __restrict__ partial,  // [chunks, 50, C]
    int K, int C) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ != kSkipArch
  __trap();  // compiled for sm_90 only (kSkipArch); the host never launches it elsewhere
#else
  using acc_t = at::opmath_type<T>;
  using G = sdw::SkipGeom<TS>;
  static_assert(G::kWgradWarps == kSkipWarps, "one warp per accumulator");
  __shared__ acc_t buf[(sdw::kTaps + 1) * V * 32];
  const SkipLane ln = skip_lane<V>(blockIdx.y, threadIdx.x, C);
  acc_t acc[sdw::kTaps + 1][V];
  CNX_UNROLL
  for (int t = 0; t <= sdw::kTaps; ++t) {
    CNX_UNROLL
    for (int v = 0; v < V; ++v) acc[t][v] = acc_t(0);
  }
  const uint32_t pitch = static_cast<uint32_t>(C) * sizeof(T);
  const int k = blockIdx.x;
  const int j1 = min(K, (k + 1) * G::kWgradTiles);
  for (int j = k * G::kWgradTiles + threadIdx.y; j < j1; j += kSkipWarps) {
    const WarpHaloView<TS> tab(halo_rows + j * G::kHaloPx, threadIdx.x, pitch);
    sdw::skip_tile_wgrad<T, V, TS>(tab, dy, x, ln.c0, acc);
  }
  acc_t* part = partial + static_cast<int64_t>(k) * (sdw::kTaps + 1) * C + ln.c0;
  for (int wp = 0; wp < kSkipWarps; ++wp) {
    if (threadIdx.y == wp) {
      CNX_UNROLL
      for (int t = 0; t <= sdw::kTaps; ++t) {
        CNX_UNROLL
        for (int v = 0; v < V; ++v) {
          acc_t& b = buf[(t * V + v) * 32 + threadIdx.x];  // conflict-free
          const acc_t s = wp == 0 ? acc[t][v] : b + acc[t][v];
          if (wp < kSkipWarps - 1) b = s;
          else if (ln.active) part[t * C + v] = s;
        }
      }
    }
    __syncthreads();
  }
#endif
}

}  // namespace

// The skip kernels exist for compute capability 9.x only (kSkipArch).
void check_skip_device(const char* op) {
  TORCH_CHECK(at::cuda::getCurrentDeviceProperties()->major == kSkipMajor, op,
              ": the skip kernels are built for sm_90 only; use the gather or tile path "
              "(skip=False)");
}

// Tiles a warp of the skip forward runs (its 49 taps loaded and widened once for
// all of them: ~160-310 instructions, a sixth of a 2x2 tile's work at 4 tiles).
int skip_tiles_per_warp(int tile) { return tile == 1 ? 8 : tile == 2 ? 8 : 4; }

at::Tensor sparse_dwconv_skip_fwd_cuda(const at::Tensor& feats, const at::Tensor& taps,
                                       const c10::optional<at::Tensor>& bias,
                                       const at::Tensor& halo_rows, int64_t tile) {
  const int64_t K = check_sparse_dwconv_skip_args(feats, taps, bias, halo_rows, tile);
  TORCH_CHECK(feats.is_cuda(), "sparse_dwconv_skip_fwd_cuda: feats must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(feats.device());
  check_skip_device("sparse_dwconv_skip_fwd_cuda");
  const bool has_bias = bias.has_value() && bias->defined();
  auto out = at::empty_like(feats);
  const int C = static_cast<int>(feats.size(1));
  if (K == 0 || feats.size(0) == 0) return out;
  auto stream = at::cuda::getCurrentCUDAStream();
  CNX_DISPATCH_FLOAT_HALF_BF16(feats.scalar_type(), "sparse_dwconv_skip_fwd_cuda", [&] {
    const scalar_t* x = feats.const_data_ptr<scalar_t>();
    const scalar_t* w = taps.const_data_ptr<scalar_t>();
    const scalar_t* b = has_bias ? bias->const_data_ptr<scalar_t>() : nullptr;
    const int32_t* hr = halo_rows.const_data_ptr<int32_t>();
    scalar_t* y = out.mutable_data_ptr<scalar_t>();
    const int vec = sdw::pick_vec(C, 2, {x, w, b, y}, sizeof(scalar_t));
    dispatch_skip_tile(static_cast<int>(tile), [&](auto tc) {
      constexpr int TS = decltype(tc)::value;
      skip_dispatch_vec<sdw::SkipGeom<TS>::kVec>(vec, [&](auto vc) {
        constexpr int V = decltype(vc)::value;
        const int tpw = skip_tiles_per_warp(TS);
        const dim3 grid(static_cast<unsigned>((K + kSkipWarps * tpw - 1) / (kSkipWarps * tpw)),
                        (C + 32 * V - 1) / (32 * V));
        const dim3 block(32, kSkipWarps);
        sparse_dwconv_skip_fwd_kernel<scalar_t, V, TS><<<grid, block, 0, stream>>>(
            x, w, b, hr, y, static_cast<int>(K), C, tpw);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> sparse_dwconv_skip_wgrad_cuda(const at::Tensor& grad_out,
                                                                 const at::Tensor& feats,
                                                                 const at::Tensor& halo_rows,
                                                                 int64_t tile) {
  const int64_t K = check_sparse_dwconv_skip_wgrad_args(grad_out, feats, halo_rows, tile);
  TORCH_CHECK(feats.is_cuda(),
              "sparse_dwconv_skip_wgrad_cuda: grad_out and feats must be CUDA tensors");
  const c10::cuda::CUDAGuard guard(feats.device());
  check_skip_device("sparse_dwconv_skip_wgrad_cuda");
  const int C = static_cast<int>(feats.size(1));
  const int chunks = static_cast<int>(wgrad_skip_chunks(K, tile));
  WgradOut o = wgrad_outputs(feats, chunks, "sparse_dwconv_skip_wgrad_cuda");
  auto stream = at::cuda::getCurrentCUDAStream();
  CNX_DISPATCH_FLOAT_HALF_BF16(feats.scalar_type(), "sparse_dwconv_skip_wgrad_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* dy = grad_out.const_data_ptr<scalar_t>();
    const scalar_t* x = feats.const_data_ptr<scalar_t>();
    const int32_t* hr = halo_rows.const_data_ptr<int32_t>();
    acc_t* pp = o.partial.mutable_data_ptr<acc_t>();
    const int vec = sdw::pick_vec(C, 2, {dy, x}, sizeof(scalar_t));
    dispatch_skip_tile(static_cast<int>(tile), [&](auto tc) {
      constexpr int TS = decltype(tc)::value;
      skip_dispatch_vec<sdw::SkipGeom<TS>::kWgradVec>(vec, [&](auto vc) {
        constexpr int V = decltype(vc)::value;
        // K == 0 still launches one chunk: its partial is then written with zeros.
        const dim3 grid(static_cast<unsigned>(chunks), (C + 32 * V - 1) / (32 * V));
        const dim3 block(32, kSkipWarps);
        sparse_dwconv_skip_wgrad_kernel<scalar_t, V, TS><<<grid, block, 0, stream>>>(
            dy, x, hr, pp, static_cast<int>(K), C);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  return reduce_partials_cuda(o, chunks);
}

}  // namespace convnextv2_fast
