// CUDA twin of sparse_dwconv_cpu.cpp; see sparse_dwconv.h for the layout and
// sparse_dwconv_math.h for the arithmetic (shared with the C++ twin).  The skip
// path is sparse_dwconv_skip_cuda.cu.
//
// Forward / input gradient: one CTA covers ALL channels of a chunk of rows.
// Thread (x, y) owns the channel group [V * x, V * x + V) (V = 2 fp32, 4 fp16,
// 2 bf16; 1 when C or a pointer does not allow it), keeps that group's 49 taps
// in registers (<= 98 registers; <= 128 in all, 2 CTAs of 256 per SM) and computes rows
// m0 + y, m0 + y + blockDim.y, ... of the chunk, kFwdRowsPerThread of them:
// per row 49 branch-free 8-byte gathers + fp32 FMAs.  Neighbour rows come
// from the per-stage [M, 49] int32 table (a broadcast load: every lane of a
// row reads the same word).  int32 indexing.
// Tile path (forward / input gradient, sparse_dwconv_tile_fwd): one CTA per
// (tile, chunk of kTileCh = 32 channels).  The CTA stages the tile's
// (TS + 6)^2 halo pixels x 32 channels in shared memory as fp32, with
// 16-byte loads (VS channels a lane; zeros for absent pixels, no load).
// Then thread (x, y) computes channel cbase + x (one channel: its 49 taps
// stay in 49 registers) for tile pixel-rows R y .. R y + R - 1 (R =
// min(TS, 4)), all TS columns: per thread (R + 6)(TS + 6) shared loads and
// 49 R TS FFMAs (conv_tile_rows).  Threads (32, TS / R).  No [M, 49] table: one
// int32 halo row per tile.  Shared memory (static, so the static gate sees
// it): (TS + 6)^2 * 32 * 4 B = 25 KB (TS = 8), 12.5 KB (4), 8 KB (2).
// Tile path of the weight/bias gradient (sparse_dwconv_tile_wgrad): one CTA
// per (chunk of kWgradTiles consecutive tiles, 32 channels), threads (32,
// kWgradWarps): warp y = (slot s, pixel-row block b).  Per round the CTA
// stages kWgradSlots tiles' halos in shared memory (fp32, 16-byte loads, zeros
// for absent pixels, as the forward), warp (s, b) reads its R x TS dy values
// of tile s (issued before the staging sync, so both are in flight together)
// and adds all 49 tap products + the bias to its 50 fp32 registers
// (wgrad_tile_rows).  At the end of the chunk the warps' partials go through
// shared memory and are summed in slot order (sum_slots) into the chunk's
// [50, C] partial; the [chunks, 50, C] partials are then summed in chunk order
// by the gather path's reduce kernel.  No atomics; the C++ twin runs the same
// chunks, slots and orders.  Shared memory (static): kWgradSlots (TS + 6)^2 *
// 32 * 4 B = 25 KB (TS = 8, 1 slot), 25.6 KB (4, 2 slots), 32 KB (2, 4 slots).
// Weight/bias gradient: one CTA per chunk of kWgradRowsPerChunk rows, thread x
// owns a group of V = 2 channels and its 50 x 2 fp32 accumulators (49 taps +
// bias) in registers: one pass over dy and x of the chunk, every tap inside.
// The per-chunk partials [chunks, 50, C] are summed in chunk order by a second
// kernel.  Bit-reproducible: no atomics, and the same chunking as the C++ twin.
#include "sparse_dwconv/sparse_dwconv.h"
#include "sparse_dwconv/sparse_dwconv_mma.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <type_traits>

namespace convnextv2_fast {
namespace {

constexpr int kThreads = 256;         // max threads per CTA (launch bounds)
constexpr int kFwdRowsPerThread = 8;  // rows per thread per channel group (tap reuse)
constexpr int kWgradVec = 2;          // channels per thread in the weight gradient
constexpr int kReduceThreads = 256;
constexpr int kTileCh = 32;           // channels per CTA of the tile path
constexpr int kTileThreads = 64;      // upper bound: kTileCh * TS / R <= 32 * 2
constexpr int kTileWgradThreads = 128;  // upper bound: kTileCh * kWgradWarps <= 32 * 4


using sdw::kMmaThreads;  // threads per CTA of the tensor-core kernel (launch and bounds)

struct Launch {
  int bx, by, rows_per_cta;
};

// Threads along channel groups (a multiple of 32, at most kThreads), the rest
// along rows.  What the host launches (and the static check reads) is this.
Launch fwd_launch(int C, int V) {
  const int groups = (C + V - 1) / V;
  const int bx = std::min(kThreads, (groups + 31) / 32 * 32);
  const int by = kThreads / bx;
  return {bx, by, by * kFwdRowsPerThread};
}

int wgrad_threads(int C, int V) {
  const int groups = (C + V - 1) / V;
  return std::min(kThreads, (groups + 31) / 32 * 32);
}

template <typename T, int V>
__global__ void __launch_bounds__(kThreads, 2) sparse_dwconv_fwd_kernel(
    const T* __restrict__ x,            // [M, C] feats (or grad_out for the input grad)
    const T* __restrict__ taps,         // [49, C] (reversed for the input grad)
    const T* __restrict__ bias,         // [C] or nullptr
    const int32_t* __restrict__ nbr,    // [M, 49] neighbour rows, -1 = absent
    T* __restrict__ out,                // [M, C]
    int M, int C, int rows_per_cta) {
  const int m0 = blockIdx.x * rows_per_cta;
  const int m1 = min(M, m0 + rows_per_cta);
  for (int g = threadIdx.x; g * V < C; g += blockDim.x)
    sdw::conv_rows<T, V>(nbr, x, taps, bias, C, g * V, m0 + threadIdx.y, m1, blockDim.y, out);
}

template <typename T, int VS, int TS>
__global__ void __launch_bounds__(kTileThreads) sparse_dwconv_tile_fwd_kernel(
    const T* __restrict__ x,            // [M, C] feats (or grad_out for the input grad)
    const T* __restrict__ taps,         // [49, C] (reversed for the input grad)
    const T* __restrict__ bias,         // [C] or nullptr
    const int32_t* __restrict__ halo_rows,  // [K, (TS + 6)^2] halo rows, -1 = absent
    T* __restrict__ out,                // [M, C]
    int C) {
  using acc_t = at::opmath_type<T>;
  constexpr int kHaloPx = sdw::TileGeom<TS>::kHaloPx;
  constexpr int R = sdw::TileGeom<TS>::kRows;
  constexpr int kStageGroups = kTileCh / VS;  // lanes staging one pixel
  constexpr int kNumThreads = kTileCh * (TS / R);
  __shared__ __align__(32) acc_t buf[kHaloPx * kTileCh];
  const int32_t* halo = halo_rows + blockIdx.x * kHaloPx;
  const int cbase = blockIdx.y * kTileCh;
  const int tid = threadIdx.y * kTileCh + threadIdx.x;
  for (int i = tid; i < kHaloPx * kStageGroups; i += kNumThreads) {
    const int p = i / kStageGroups, g = i % kStageGroups;
    if (cbase + g * VS < C)
      sdw::stage_halo_px<T, VS>(halo, p, x, C, cbase + g * VS, buf + p * kTileCh + g * VS);
  }
  __syncthreads();
  const int c0 = cbase + threadIdx.x;
  if (c0 >= C) return;
  acc_t init[1];
  sdw::bias_init<T, 1>(bias, c0, init);
  sdw::conv_tile_rows<T, 1, TS, R>(buf, kTileCh, threadIdx.x, threadIdx.y * R, taps, C, c0,
                                   init, halo, out);
}

// 16-bit pair of two values (lo in the low half): one register of an MMA fragment.
template <typename T>
__device__ __forceinline__ uint32_t pack2(T lo, T hi) {
  return static_cast<uint32_t>(lo.x) | (static_cast<uint32_t>(hi.x) << 16);
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&a)[4], const void* smem) {
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(a[0]), "=r"(a[1]), "=r"(a[2]), "=r"(a[3])
               : "r"(addr));
}

// d += A B, m16n8k16, fp32 accumulation; A row-major (a0..a3), B "col" (b0, b1).
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1) {
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// Tensor-core tile path (sparse_dwconv_mma_fwd; the math and the layouts are in
// sparse_dwconv_mma.h).  One CTA = kMmaCh channels x a run of `pairs_per_cta`
// tile pairs; 8 warps, warp w owns channels 4w .. 4w + 3 and keeps their 7 B
// fragments (the banded taps) in 56 registers for the whole run.  Per pair:
// stage both halos (896 tasks: two 16-byte loads + 8 word stores each, the
// transpose to channel-major, the k padding included), then per channel 7 x
// (ldmatrix.x4 + mma) into 4 fp32 accumulators initialised with the bias, the
// bf16/fp16 results packed two channels a word into ys (aliasing xs), and 512
// tasks store 16-byte vectors of 8 channels to the visible own pixels.  Shared
// memory (static): xs 43 KB.
template <typename T>
__global__ void __launch_bounds__(kMmaThreads, 2) sparse_dwconv_mma_fwd_kernel(
    const T* __restrict__ x,                // [M, C] feats (or grad_out for the input grad)
    const T* __restrict__ taps,             // [49, C] (reversed for the input grad)
    const T* __restrict__ bias,             // [C] or nullptr
    const int32_t* __restrict__ halo_rows,  // [K, 196] halo rows of the 8x8 tiles, -1 = absent
    T* __restrict__ out,                    // [M, C]
    int K, int C, int pairs_per_cta) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // mma.sync.m16n8k16 needs sm_80+; the host never launches it below
#else
  using namespace sdw;
  __shared__ __align__(16) T xs[kMmaXsElems];
  uint32_t* ys = reinterpret_cast<uint32_t*>(xs);  // the results, after the MMAs
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int cbase = blockIdx.y * kMmaCh;
  // The taps of the CTA's channels, staged once (in xs, before any halo), then
  // each warp's B fragments and bias init into registers.
  for (int i = tid; i < kMmaWsTasks; i += kMmaThreads) mma_stage_taps<T>(i, taps, C, cbase, xs);
  __syncthreads();
  uint32_t bfrag[kMmaChPerWarp][7][2];
  float binit[kMmaChPerWarp];
  CNX_UNROLL
  for (int ch = 0; ch < kMmaChPerWarp; ++ch) {
    const int cl = warp * kMmaChPerWarp + ch, c = cbase + cl;
    CNX_UNROLL
    for (int dy = 0; dy < 7; ++dy) {
      T b[4];
      mma_b_frag<T>(xs, cl, dy, lane, b);
      bfrag[ch][dy][0] = pack2<T>(b[0], b[1]);
      bfrag[ch][dy][1] = pack2<T>(b[2], b[3]);
    }
    binit[ch] = (bias != nullptr && c < C) ? static_cast<float>(bias[c]) : 0.f;
  }
  constexpr int kSlots = (kMmaStageTasks + kMmaThreads - 1) / kMmaThreads;
  const int pairs = (K + 1) / 2;
  const int p1 = min(pairs, (blockIdx.x + 1) * pairs_per_cta);
  for (int p = blockIdx.x * pairs_per_cta; p < p1; ++p) {
    const int k0 = 2 * p;
    __syncthreads();  // the B-fragment (first pair) or previous pair's xs / ys reads are done
    CNX_UNROLL
    for (int j = 0; j < kSlots; ++j)
      if (tid + j * kMmaThreads < kMmaStageTasks)
        mma_stage<T>(tid + j * kMmaThreads, halo_rows, K, k0, x, C, cbase, xs);
    __syncthreads();
    float acc[kMmaChPerWarp][4];
    CNX_UNROLL
    for (int ch = 0; ch < kMmaChPerWarp; ++ch) {
      const int cl = warp * kMmaChPerWarp + ch;
      CNX_UNROLL
      for (int i = 0; i < 4; ++i) acc[ch][i] = binit[ch];
      CNX_UNROLL
      for (int dy = 0; dy < 7; ++dy) {
        uint32_t a[4];
        ldmatrix_x4(a, xs + mma_a_row_index(lane, cl, dy));
        mma_16816<T>(acc[ch], a, bfrag[ch][dy][0], bfrag[ch][dy][1]);
      }
    }
    __syncthreads();  // every warp is done with xs: it becomes ys
    CNX_UNROLL
    for (int pr = 0; pr < kMmaChPerWarp / 2; ++pr) {
      const int word = (warp * kMmaChPerWarp + 2 * pr) / 2;
      CNX_UNROLL
      for (int i = 0; i < 4; ++i) {
        int tile, py, px;
        mma_c_pos(lane, i, tile, py, px);
        const int P = (tile * kMmaTile + py) * kMmaTile + px;
        ys[P * kMmaYsPitch + word] =
            pack2<T>(static_cast<T>(acc[2 * pr][i]), static_cast<T>(acc[2 * pr + 1][i]));
      }
    }
    __syncthreads();
    static_assert(kMmaOutTasks % kMmaThreads == 0, "output tasks: whole slots");
    CNX_UNROLL
    for (int j = 0; j < kMmaOutTasks / kMmaThreads; ++j) {
      const int i = tid + j * kMmaThreads;
      const int P = i >> 2, cg = i & 3;
      const int c0 = cbase + 8 * cg;
      const int32_t m = mma_own_row(halo_rows, K, k0 + (P >> 6), (P >> 3) & 7, P & 7);
      if (m < 0 || c0 >= C) continue;
      Vec<uint32_t, 4> w;
      CNX_UNROLL
      for (int e = 0; e < 4; ++e) w.v[e] = ys[P * kMmaYsPitch + 4 * cg + e];
      store_vec<uint32_t, 4>(reinterpret_cast<uint32_t*>(out + m * C + c0), w);
    }
  }
#endif
}

template <typename T, int V>
__global__ void __launch_bounds__(kThreads) sparse_dwconv_wgrad_partial_kernel(
    const T* __restrict__ dy,           // [M, C]
    const T* __restrict__ x,            // [M, C]
    const int32_t* __restrict__ nbr,    // [M, 49]
    at::opmath_type<T>* __restrict__ partial,  // [chunks, 50, C]
    int M, int C) {
  const int k = blockIdx.x;
  const int m0 = k * kWgradRowsPerChunk;
  const int m1 = min(M, m0 + kWgradRowsPerChunk);
  for (int g = threadIdx.x; g * V < C; g += blockDim.x)
    sdw::wgrad_chunk<T, V>(nbr, dy, x, C, g * V, m0, m1, partial + k * (kTaps + 1) * C);
}

template <typename T, int VS, int TS>
__global__ void __launch_bounds__(kTileWgradThreads) sparse_dwconv_tile_wgrad_kernel(
    const T* __restrict__ dy,           // [M, C]
    const T* __restrict__ x,            // [M, C]
    const int32_t* __restrict__ halo_rows,  // [K, (TS + 6)^2] halo rows, -1 = absent
    at::opmath_type<T>* __restrict__ partial,  // [chunks, 50, C]
    int K, int C) {
  using acc_t = at::opmath_type<T>;
  using G = sdw::TileGeom<TS>;
  constexpr int kHaloPx = G::kHaloPx;
  constexpr int R = G::kRows, NB = TS / R, P = G::kWgradSlots, W = G::kWgradWarps;
  constexpr int kStageGroups = kTileCh / VS;  // lanes staging one pixel
  constexpr int kNumThreads = kTileCh * W;
  static_assert(W * (sdw::kTaps + 1) <= P * kHaloPx, "slot partials must fit the buffer");
  __shared__ __align__(32) acc_t buf[P * kHaloPx * kTileCh];
  const int k = blockIdx.x;
  const int cbase = blockIdx.y * kTileCh;
  const int tid = threadIdx.y * kTileCh + threadIdx.x;
  const int s = threadIdx.y / NB, b = threadIdx.y % NB;
  const int c0 = cbase + threadIdx.x;
  const bool active = c0 < C;
  acc_t acc[sdw::kTaps + 1][1];
  CNX_UNROLL
  for (int t = 0; t <= sdw::kTaps; ++t) acc[t][0] = acc_t(0);
  const int j_end = min(K, (k + 1) * G::kWgradTiles);
  for (int j0 = k * G::kWgradTiles; j0 < j_end; j0 += P) {
    const int j = j0 + s;
    const bool mine = active && j < j_end;
    acc_t g[R][TS][1];
    if (mine) sdw::load_tile_dy<T, 1, TS, R>(halo_rows + j * kHaloPx, b * R, dy, C, c0, g);
    for (int i = tid; i < P * kHaloPx * kStageGroups; i += kNumThreads) {
      const int q = i / (kHaloPx * kStageGroups), rem = i % (kHaloPx * kStageGroups);
      const int p = rem / kStageGroups, gi = rem % kStageGroups;
      if (j0 + q < j_end && cbase + gi * VS < C)
        sdw::stage_halo_px<T, VS>(halo_rows + (j0 + q) * kHaloPx, p, x, C, cbase + gi * VS,
                                  buf + (q * kHaloPx + p) * kTileCh + gi * VS);
    }
    __syncthreads();
    if (mine)
      sdw::wgrad_tile_rows<T, 1, TS, R>(buf + s * kHaloPx * kTileCh, kTileCh, threadIdx.x,
                                        b * R, g, acc);
    __syncthreads();
  }
  // The W warps' partials, summed in slot order (sum_slots), as the C++ twin does.
  constexpr int kSlotStride = (sdw::kTaps + 1) * kTileCh;
  CNX_UNROLL
  for (int t = 0; t <= sdw::kTaps; ++t)
    buf[threadIdx.y * kSlotStride + t * kTileCh + threadIdx.x] = acc[t][0];
  __syncthreads();
  if (!active) return;
  for (int t = threadIdx.y; t <= sdw::kTaps; t += W)
    partial[(k * (sdw::kTaps + 1) + t) * C + c0] =
        sdw::sum_slots<acc_t>(buf + t * kTileCh + threadIdx.x, kSlotStride, W);
}

template <typename acc_t>
__global__ void __launch_bounds__(kReduceThreads) sparse_dwconv_wgrad_reduce_kernel(
    const acc_t* __restrict__ partial,  // [chunks, 50, C]
    acc_t* __restrict__ grad_taps,      // [49, C]
    acc_t* __restrict__ grad_bias,      // [C]
    int chunks, int C) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < (kTaps + 1) * C) sdw::reduce_chunks<acc_t>(partial, chunks, C, i, grad_taps, grad_bias);
}

}  // namespace

// (grad_taps, grad_bias): the chunk partials summed in chunk order (gather, tile and skip paths).
std::tuple<at::Tensor, at::Tensor> reduce_partials_cuda(WgradOut& o, int64_t chunks) {
  const int C = static_cast<int>(o.grad_bias.size(0));
  const int per = (kTaps + 1) * C;
  auto stream = at::cuda::getCurrentCUDAStream();
  using acc_t = float;  // fp64 is CPU-only
  sparse_dwconv_wgrad_reduce_kernel<acc_t>
      <<<(per + kReduceThreads - 1) / kReduceThreads, kReduceThreads, 0, stream>>>(
          o.partial.const_data_ptr<acc_t>(), o.grad_taps.mutable_data_ptr<acc_t>(),
          o.grad_bias.mutable_data_ptr<acc_t>(), static_cast<int>(chunks), C);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {o.grad_taps, o.grad_bias};
}


at::Tensor sparse_dwconv_fwd_cuda(const at::Tensor& feats, const at::Tensor& taps,
                                  const c10::optional<at::Tensor>& bias,
                                  const at::Tensor& nbr_rows) {
  check_sparse_dwconv_args(feats, taps, bias, nbr_rows, "sparse_dwconv_fwd");
  TORCH_CHECK(feats.is_cuda(), "sparse_dwconv_fwd_cuda: feats must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(feats.device());
  const bool has_bias = bias.has_value() && bias->defined();
  auto out = at::empty_like(feats);
  const int M = static_cast<int>(feats.size(0)), C = static_cast<int>(feats.size(1));
  if (M == 0) return out;
  auto stream = at::cuda::getCurrentCUDAStream();
  CNX_DISPATCH_FLOAT_HALF_BF16(feats.scalar_type(), "sparse_dwconv_fwd_cuda", [&] {
    const scalar_t* x = feats.const_data_ptr<scalar_t>();
    const scalar_t* w = taps.const_data_ptr<scalar_t>();
    const scalar_t* b = has_bias ? bias->const_data_ptr<scalar_t>() : nullptr;
    scalar_t* y = out.mutable_data_ptr<scalar_t>();
    const int32_t* nb = nbr_rows.const_data_ptr<int32_t>();
    // 8-byte vectors for fp32 (2) and fp16 (4); bf16 uses 4-byte vectors (2): with 4
    // bf16 channels nvcc hoists the taps' bf16 -> fp32 conversion out of the row loop
    // (196 registers of taps) and, capped at 128 registers for 2 CTAs/SM, spills.
    constexpr int kVmax = std::is_same_v<scalar_t, at::Half> ? 4 : 2;
    const int vec = sdw::pick_vec(C, kVmax, {x, w, b, y}, sizeof(scalar_t));
    auto launch = [&](auto vc) {
      constexpr int V = decltype(vc)::value;
      const Launch l = fwd_launch(C, V);
      const int grid = (M + l.rows_per_cta - 1) / l.rows_per_cta;
      sparse_dwconv_fwd_kernel<scalar_t, V><<<grid, dim3(l.bx, l.by), 0, stream>>>(
          x, w, b, nb, y, M, C, l.rows_per_cta);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if constexpr (kVmax == 4) dispatch_vec<4, 2, 1>(vec, launch);
    else dispatch_vec<2, 1>(vec, launch);
  });
  return out;
}

at::Tensor sparse_dwconv_tile_fwd_cuda(const at::Tensor& feats, const at::Tensor& taps,
                                       const c10::optional<at::Tensor>& bias,
                                       const at::Tensor& halo_rows, int64_t tile) {
  const int64_t K = check_sparse_dwconv_tile_args(feats, taps, bias, halo_rows, tile);
  TORCH_CHECK(feats.is_cuda(), "sparse_dwconv_tile_fwd_cuda: feats must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(feats.device());
  const bool has_bias = bias.has_value() && bias->defined();
  auto out = at::empty_like(feats);
  const int C = static_cast<int>(feats.size(1));
  if (K == 0 || feats.size(0) == 0) return out;
  TORCH_CHECK(K < (int64_t(1) << 31), "sparse_dwconv_tile_fwd_cuda: too many tiles");
  auto stream = at::cuda::getCurrentCUDAStream();
  CNX_DISPATCH_FLOAT_HALF_BF16(feats.scalar_type(), "sparse_dwconv_tile_fwd_cuda", [&] {
    const scalar_t* x = feats.const_data_ptr<scalar_t>();
    const scalar_t* w = taps.const_data_ptr<scalar_t>();
    const scalar_t* b = has_bias ? bias->const_data_ptr<scalar_t>() : nullptr;
    const int32_t* hr = halo_rows.const_data_ptr<int32_t>();
    scalar_t* y = out.mutable_data_ptr<scalar_t>();
    // Staging: 16-byte loads (8 channels of fp16/bf16, 4 of fp32) where C and the
    // feats pointer allow it, else one channel a lane.
    constexpr int kVS = 16 / sizeof(scalar_t);
    const int vec = sdw::pick_vec(C, kVS, {x}, sizeof(scalar_t)) == kVS ? kVS : 1;
    dispatch_tile(static_cast<int>(tile), [&](auto tc) {
      constexpr int TS = decltype(tc)::value;
      dispatch_vec<kVS, 1>(vec, [&](auto vc) {
        constexpr int VS = decltype(vc)::value;
        const dim3 grid(static_cast<unsigned>(K), (C + kTileCh - 1) / kTileCh);
        const dim3 block(kTileCh, TS / sdw::TileGeom<TS>::kRows);
        sparse_dwconv_tile_fwd_kernel<scalar_t, VS, TS><<<grid, block, 0, stream>>>(
            x, w, b, hr, y, C);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> sparse_dwconv_bwd_weight_cuda(
    const at::Tensor& grad_out, const at::Tensor& feats, const at::Tensor& nbr_rows) {
  check_sparse_dwconv_bwd_weight_args(grad_out, feats, nbr_rows);
  TORCH_CHECK(feats.is_cuda(),
              "sparse_dwconv_bwd_weight_cuda: grad_out and feats must be CUDA tensors");
  const c10::cuda::CUDAGuard guard(feats.device());
  const int M = static_cast<int>(feats.size(0)), C = static_cast<int>(feats.size(1));
  const int chunks = std::max(1, (M + kWgradRowsPerChunk - 1) / kWgradRowsPerChunk);
  WgradOut o = wgrad_outputs(feats, chunks, "sparse_dwconv_bwd_weight_cuda");
  auto stream = at::cuda::getCurrentCUDAStream();
  CNX_DISPATCH_FLOAT_HALF_BF16(feats.scalar_type(), "sparse_dwconv_bwd_weight_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* dy = grad_out.const_data_ptr<scalar_t>();
    const scalar_t* x = feats.const_data_ptr<scalar_t>();
    const int32_t* nb = nbr_rows.const_data_ptr<int32_t>();
    acc_t* pp = o.partial.mutable_data_ptr<acc_t>();
    const int vec = sdw::pick_vec(C, kWgradVec, {dy, x}, sizeof(scalar_t));
    dispatch_vec<2, 1>(vec, [&](auto vc) {
      constexpr int V = decltype(vc)::value;
      // M == 0 still launches one chunk: its partial is then written with zeros.
      sparse_dwconv_wgrad_partial_kernel<scalar_t, V>
          <<<chunks, wgrad_threads(C, V), 0, stream>>>(dy, x, nb, pp, M, C);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return reduce_partials_cuda(o, chunks);
}

std::tuple<at::Tensor, at::Tensor> sparse_dwconv_tile_wgrad_cuda(const at::Tensor& grad_out,
                                                                 const at::Tensor& feats,
                                                                 const at::Tensor& halo_rows,
                                                                 int64_t tile) {
  const int64_t K = check_sparse_dwconv_tile_wgrad_args(grad_out, feats, halo_rows, tile);
  TORCH_CHECK(feats.is_cuda(),
              "sparse_dwconv_tile_wgrad_cuda: grad_out and feats must be CUDA tensors");
  TORCH_CHECK(K < (int64_t(1) << 31), "sparse_dwconv_tile_wgrad_cuda: too many tiles");
  const c10::cuda::CUDAGuard guard(feats.device());
  const int C = static_cast<int>(feats.size(1));
  const int chunks = static_cast<int>(wgrad_tile_chunks(K, tile));
  WgradOut o = wgrad_outputs(feats, chunks, "sparse_dwconv_tile_wgrad_cuda");
  auto stream = at::cuda::getCurrentCUDAStream();
  CNX_DISPATCH_FLOAT_HALF_BF16(feats.scalar_type(), "sparse_dwconv_tile_wgrad_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* dy = grad_out.const_data_ptr<scalar_t>();
    const scalar_t* x = feats.const_data_ptr<scalar_t>();
    const int32_t* hr = halo_rows.const_data_ptr<int32_t>();
    acc_t* pp = o.partial.mutable_data_ptr<acc_t>();
    // Staging as in the forward: 16-byte loads where C and feats allow it.
    constexpr int kVS = 16 / sizeof(scalar_t);
    const int vec = sdw::pick_vec(C, kVS, {x}, sizeof(scalar_t)) == kVS ? kVS : 1;
    dispatch_tile(static_cast<int>(tile), [&](auto tc) {
      constexpr int TS = decltype(tc)::value;
      dispatch_vec<kVS, 1>(vec, [&](auto vc) {
        constexpr int VS = decltype(vc)::value;
        // K == 0 still launches one chunk: its partial is then written with zeros.
        const dim3 grid(static_cast<unsigned>(chunks), (C + kTileCh - 1) / kTileCh);
        const dim3 block(kTileCh, sdw::TileGeom<TS>::kWgradWarps);
        sparse_dwconv_tile_wgrad_kernel<scalar_t, VS, TS><<<grid, block, 0, stream>>>(
            dy, x, hr, pp, static_cast<int>(K), C);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  return reduce_partials_cuda(o, chunks);
}

at::Tensor sparse_dwconv_mma_fwd_cuda(const at::Tensor& feats, const at::Tensor& taps,
                                      const c10::optional<at::Tensor>& bias,
                                      const at::Tensor& halo_rows) {
  const int64_t K = check_sparse_dwconv_mma_args(feats, taps, bias, halo_rows);
  TORCH_CHECK(feats.is_cuda(), "sparse_dwconv_mma_fwd_cuda: feats must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(feats.device());
  TORCH_CHECK(at::cuda::getCurrentDeviceProperties()->major >= 8,
              "sparse_dwconv_mma_fwd_cuda: needs compute capability 8.0 or newer "
              "(mma.sync.m16n8k16); use the FFMA tile path (mma=False)");
  const bool has_bias = bias.has_value() && bias->defined();
  auto out = at::empty_like(feats);
  const int C = static_cast<int>(feats.size(1));
  if (K == 0 || feats.size(0) == 0) return out;
  auto stream = at::cuda::getCurrentCUDAStream();
  const int groups = (C + sdw::kMmaCh - 1) / sdw::kMmaCh;
  const int pairs = static_cast<int>((K + 1) / 2);
  // One wave (2 CTAs resident per SM): each CTA stages its taps and builds its B
  // fragments once and reuses them over its run of pairs.
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int per = std::clamp((pairs * groups + 2 * sms - 1) / (2 * sms), 1, 64);
  const dim3 grid((pairs + per - 1) / per, groups);
  CNX_DISPATCH_HALF_BF16(feats.scalar_type(), "sparse_dwconv_mma_fwd_cuda", [&] {
    sparse_dwconv_mma_fwd_kernel<scalar_t><<<grid, kMmaThreads, 0, stream>>>(
        feats.const_data_ptr<scalar_t>(), taps.const_data_ptr<scalar_t>(),
        has_bias ? bias->const_data_ptr<scalar_t>() : nullptr,
        halo_rows.const_data_ptr<int32_t>(), out.mutable_data_ptr<scalar_t>(),
        static_cast<int>(K), C, per);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace convnextv2_fast
