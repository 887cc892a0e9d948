// The arithmetic of the submanifold depthwise 7x7 conv, shared by both twins.
//
// These inline functions are compiled by nvcc into the CUDA kernels
// (sparse_dwconv_cuda.cu) AND by the host compiler into the C++ twin
// (sparse_dwconv_cpu.cpp), so the CPU tests run the very code — loads,
// tap order, fp32 (fp64) accumulation, absent-tap handling, chunking of the
// weight gradient — that the GPU runs.  Only the loop over (row chunk,
// channel group) around them differs: CUDA threads there, at::parallel_for
// plus plain loops here.  No CUDA header is needed: CNX_HD expands to
// `__host__ __device__` under nvcc and to `inline` under g++.
//
// Layout (see sparse_dwconv.h): feats/grad [M, C] row-major, taps [49, C]
// (tap-major, so the V channels of one tap are one aligned vector load),
// neighbour rows [M, 49] int32 (-1 = absent).  A "channel group" is V
// consecutive channels starting at c0 = V * g; callers pick V so that C % V == 0
// and every base pointer is aligned to V * sizeof(T) (pick_vec below).
#pragma once
#include <ATen/OpMathType.h>

#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <type_traits>
#include <utility>

#if defined(__CUDACC__)
#define CNX_HD __host__ __device__ __forceinline__
#define CNX_UNROLL _Pragma("unroll")
#define CNX_RESTRICT __restrict__
#else
#define CNX_HD inline
#define CNX_UNROLL
#define CNX_RESTRICT __restrict__
#endif

namespace convnextv2_fast {
namespace sdw {

constexpr int kTaps = 49;
// Rows per weight-gradient chunk.  Both twins use it, so the fp32 partial of
// chunk k sums the same rows in the same order on both devices; the partials
// are then summed in chunk order (bit-reproducible, no atomics).
constexpr int kWgradRowsPerChunk = 128;

// V consecutive elements, aligned so that one load/store is one vector access
// (8 or 16 bytes on the GPU: ld.global.v2/v4), the pattern of ATen's
// memory::aligned_vector.
template <typename T, int V>
struct alignas(sizeof(T) * V) Vec {
  T v[V];
};

template <typename T, int V>
CNX_HD Vec<T, V> load_vec(const T* CNX_RESTRICT p) {
  return *reinterpret_cast<const Vec<T, V>*>(p);
}

template <typename T, int V>
CNX_HD void store_vec(T* CNX_RESTRICT p, const Vec<T, V>& x) {
  *reinterpret_cast<Vec<T, V>*>(p) = x;
}

// Largest power of two <= vmax that divides C and keeps every pointer aligned.
inline int pick_vec(int64_t C, int vmax, std::initializer_list<const void*> ptrs,
                    int elem_size) {
  int v = vmax;
  while (v > 1) {
    bool ok = C % v == 0;
    for (const void* p : ptrs)
      ok = ok && (p == nullptr || reinterpret_cast<uintptr_t>(p) % (v * elem_size) == 0);
    if (ok) break;
    v /= 2;
  }
  return v;
}

// The 49 taps of channels [c0, c0 + V) from taps [49, C]: kept by the caller
// (in registers on the GPU) for every row it computes.
template <typename T, int V>
CNX_HD void load_taps(const T* CNX_RESTRICT taps, int C, int c0, Vec<T, V> (&w)[kTaps]) {
  CNX_UNROLL
  for (int t = 0; t < kTaps; ++t) w[t] = load_vec<T, V>(taps + t * C + c0);
}

// One output vector: out[m, c0:c0+V] = init + sum_{t=0..48, nb[t] >= 0}
// w[t] * x[nb[t], c0:c0+V], accumulated in opmath (fp32; fp64 for double) in tap
// order.  `nb` is row m of the neighbour table.  Branch-free: an absent tap
// reads row 0 (a cache hit) whose value is replaced by 0 before the FMA (so
// even a non-finite row 0 adds exactly w * 0, as the dense-masked conv does),
// and all 49 loads can be in flight at once.  Forward: x = feats, w = taps, init = bias.  Input gradient:
// x = grad_out, w = taps reversed (w'[t] = w[48 - t]), init = 0.
template <typename T, int V>
CNX_HD Vec<T, V> conv_row(const int32_t* CNX_RESTRICT nb, const T* CNX_RESTRICT x, int C,
                          int c0, const Vec<T, V> (&w)[kTaps],
                          const at::opmath_type<T> (&init)[V]) {
  using acc_t = at::opmath_type<T>;
  acc_t acc[V];
  CNX_UNROLL
  for (int v = 0; v < V; ++v) acc[v] = init[v];
  CNX_UNROLL
  for (int t = 0; t < kTaps; ++t) {
    const int32_t r = nb[t];
    const Vec<T, V> f = load_vec<T, V>(x + (r < 0 ? 0 : r) * C + c0);
    CNX_UNROLL
    for (int v = 0; v < V; ++v) {
      const acc_t xv = r < 0 ? acc_t(0) : static_cast<acc_t>(f.v[v]);
      acc[v] += static_cast<acc_t>(w[t].v[v]) * xv;  // one FFMA on the GPU
    }
  }
  Vec<T, V> out;
  CNX_UNROLL
  for (int v = 0; v < V; ++v) out.v[v] = static_cast<T>(acc[v]);
  return out;
}

// Rows m = m_begin, m_begin + m_step, ... < m_end of channels [c0, c0 + V):
// taps loaded once (registers on the GPU) and reused for every row.  The GPU
// thread (y, group) calls it with (m0 + y, m1, blockDim.y), the C++ twin with
// (m0, m1, 1).  `bias` may be null.
// init[v] = bias[c0 + v] in opmath, or 0 without a bias (may be null).
template <typename T, int V>
CNX_HD void bias_init(const T* CNX_RESTRICT bias, int c0, at::opmath_type<T> (&init)[V]) {
  using acc_t = at::opmath_type<T>;
  if (bias != nullptr) {
    const Vec<T, V> b = load_vec<T, V>(bias + c0);
    CNX_UNROLL
    for (int v = 0; v < V; ++v) init[v] = static_cast<acc_t>(b.v[v]);
  } else {
    CNX_UNROLL
    for (int v = 0; v < V; ++v) init[v] = acc_t(0);
  }
}

template <typename T, int V>
CNX_HD void conv_rows(const int32_t* CNX_RESTRICT nbr_rows, const T* CNX_RESTRICT x,
                      const T* CNX_RESTRICT taps, const T* CNX_RESTRICT bias, int C, int c0,
                      int m_begin, int m_end, int m_step, T* CNX_RESTRICT out) {
  using acc_t = at::opmath_type<T>;
  Vec<T, V> w[kTaps];
  load_taps<T, V>(taps, C, c0, w);
  acc_t init[V];
  bias_init<T, V>(bias, c0, init);
  for (int m = m_begin; m < m_end; m += m_step)
    store_vec<T, V>(out + m * C + c0, conv_row<T, V>(nbr_rows + m * kTaps, x, C, c0, w, init));
}

// ---------------------------------------------------------------------------
// Tile path of the forward / input gradient.
//
// A tile is an aligned TS x TS block of the stage map (TS = 2, 4 or 8; FCMAE's
// visible sites are whole tiles: 8x8 at stage 1, 4x4, 2x2, 1x1 later).  Its
// halo row (int32, kHaloPx = (TS + 6)^2 entries, StageLayout.tile_halo_rows)
// lists, row-major, the row of every pixel of the (TS + 6) x (TS + 6) region
// from (ty * TS - 3, tx * TS - 3), or -1 (outside the map or invisible).  The
// tile's own pixel (py, px) is entry (py + 3) * (TS + 6) + px + 3; -1 there =
// no output (a tile may be partly visible: general layouts, super-tiles).
//
// Submanifold semantics, exactly those of conv_row: outputs only at visible
// sites, inputs only from visible sites, an absent input contributes w * 0.
// So EVERY tile takes this path: staging writes 0 for an absent halo pixel
// (no load), and partial halos (image borders, masked neighbour tiles) need
// no fallback.  Staged values are opmath (fp32; fp64 for double), converted
// once when staged.
template <int TS>
struct TileGeom {
  static constexpr int kSide = TS + 6;
  static constexpr int kHaloPx = kSide * kSide;
  // Pixel-rows per conv_tile_rows call (R), the same on both devices so the
  // CPU tests run the GPU's instantiation: 4 rows x 8 columns of one channel
  // (32 fp32 accumulators + 49 taps in registers, no spills at sm_90) for
  // 8x8 tiles, the whole tile for 4x4 and 2x2.
  static constexpr int kRows = TS < 4 ? TS : 4;
  // Weight gradient (wgrad_tile_rows): a chunk is kWgradTiles consecutive
  // tiles (kWgradTileRows pixels; fixed by TS alone, so both twins split the
  // same way), processed kWgradSlots tiles at a time; each (slot, block of
  // kRows pixel-rows) keeps its own opmath partials, summed over the
  // kWgradWarps = kWgradSlots * TS / kRows of them in slot order at the end of
  // the chunk (sum_slots).  GPU: one warp of 32 channels per (slot, block),
  // 2 warps (TS = 8, 4) or 4 (TS = 2), kWgradSlots staged halos in shared memory.
  static constexpr int kWgradTileRows = 256;
  static constexpr int kWgradTiles = kWgradTileRows / (TS * TS);
  static constexpr int kWgradSlots = TS == 8 ? 1 : TS == 4 ? 2 : 4;
  static constexpr int kWgradWarps = kWgradSlots * (TS / kRows);
};

// Stage halo pixel p of channels [c0, c0 + V) to dst[0, V) (shared memory on
// the GPU): the input converted to opmath, or 0 for an absent pixel.
template <typename T, int V>
CNX_HD void stage_halo_px(const int32_t* CNX_RESTRICT halo, int p, const T* CNX_RESTRICT x,
                          int C, int c0, at::opmath_type<T>* CNX_RESTRICT dst) {
  using acc_t = at::opmath_type<T>;
  const int32_t r = halo[p];
  Vec<acc_t, V> s;
  if (r < 0) {
    CNX_UNROLL
    for (int v = 0; v < V; ++v) s.v[v] = acc_t(0);
  } else {
    const Vec<T, V> f = load_vec<T, V>(x + r * C + c0);
    CNX_UNROLL
    for (int v = 0; v < V; ++v) s.v[v] = static_cast<acc_t>(f.v[v]);
  }
  store_vec<acc_t, V>(dst, s);
}

// The R x TS outputs of tile pixel-rows py0 .. py0 + R - 1 (all TS columns),
// channels [c0, c0 + V), from the staged halo: the value of halo pixel p,
// channel c0 + v is buf[p * pitch + cc + v].  All 49 taps are loaded once
// (converted to opmath; registers on the GPU), then the R + 6 halo rows the
// block needs are streamed once: each staged value is loaded once and used
// for every output it reaches (up to 7 columns x 7 rows), so a thread loads
// (R + 6)(TS + 6) values for R TS outputs instead of 49 per output.  Each
// output sums init + w[t] * x over t = dy * 7 + dx in increasing order
// (halo row py0 + r + dy ascending, then column ascending) — conv_row's
// order and operations — so the tile path equals the gather path bit for
// bit under the same compiler, for every (V, R).  An invisible pixel is not
// stored (no output); its FFMAs are spent anyway (no branch per row: FCMAE's
// tiles are whole, so every pixel of a tile of the layout's own size is visible).
template <typename T, int V, int TS, int R>
CNX_HD void conv_tile_rows(const at::opmath_type<T>* CNX_RESTRICT buf, int pitch, int cc,
                           int py0, const T* CNX_RESTRICT taps, int C, int c0,
                           const at::opmath_type<T> (&init)[V],
                           const int32_t* CNX_RESTRICT halo, T* CNX_RESTRICT out) {
  using acc_t = at::opmath_type<T>;
  constexpr int kSide = TileGeom<TS>::kSide;
  static_assert(TS % R == 0, "conv_tile_rows: R must divide TS");
  acc_t w[kTaps][V];
  CNX_UNROLL
  for (int t = 0; t < kTaps; ++t) {
    const Vec<T, V> wv = load_vec<T, V>(taps + t * C + c0);
    CNX_UNROLL
    for (int v = 0; v < V; ++v) w[t][v] = static_cast<acc_t>(wv.v[v]);
  }
  acc_t acc[R][TS][V];
  CNX_UNROLL
  for (int r = 0; r < R; ++r) {
    CNX_UNROLL
    for (int px = 0; px < TS; ++px) {
      CNX_UNROLL
      for (int v = 0; v < V; ++v) acc[r][px][v] = init[v];
    }
  }
  CNX_UNROLL
  for (int hr = 0; hr < R + 6; ++hr) {  // halo row py0 + hr
    const acc_t* row = buf + (py0 + hr) * kSide * pitch + cc;
    CNX_UNROLL
    for (int j = 0; j < kSide; ++j) {
      const Vec<acc_t, V> xv = load_vec<acc_t, V>(row + j * pitch);
      CNX_UNROLL
      for (int r = 0; r < R; ++r) {
        const int dy = hr - r;
        if (dy < 0 || dy > 6) continue;  // compile-time under full unrolling
        CNX_UNROLL
        for (int dx = 0; dx < 7; ++dx) {
          const int px = j - dx;
          if (px < 0 || px >= TS) continue;
          CNX_UNROLL
          for (int v = 0; v < V; ++v)
            acc[r][px][v] += w[dy * 7 + dx][v] * xv.v[v];  // one FFMA
        }
      }
    }
  }
  CNX_UNROLL
  for (int r = 0; r < R; ++r) {
    const int32_t* own = halo + (py0 + r + 3) * kSide + 3;
    CNX_UNROLL
    for (int px = 0; px < TS; ++px) {
      const int32_t m = own[px];
      if (m < 0) continue;
      Vec<T, V> o;
      CNX_UNROLL
      for (int v = 0; v < V; ++v) o.v[v] = static_cast<T>(acc[r][px][v]);
      store_vec<T, V>(out + m * C + c0, o);
    }
  }
}

// Tile path of the weight / bias gradient.
//
// dW[t, c] = sum_p dy[p, c] * x[p + off(t), c], db[c] = sum_p dy[p, c] over the
// visible pixels p.  Per tile the x halo is staged once (stage_halo_px, zeros
// for absent pixels) and the tile's dy is read once (load_tile_dy); every
// staged x value then feeds all the (output, tap) pairs it meets.

// dy of tile pixel-rows py0 .. py0 + R - 1 (all TS columns), channels
// [c0, c0 + V), in opmath: g[r][px] = dy[own pixel] or 0 for an invisible own
// pixel (it then adds 0 * x to every tap and 0 to the bias).
template <typename T, int V, int TS, int R>
CNX_HD void load_tile_dy(const int32_t* CNX_RESTRICT halo, int py0, const T* CNX_RESTRICT dy,
                         int C, int c0, at::opmath_type<T> (&g)[R][TS][V]) {
  using acc_t = at::opmath_type<T>;
  constexpr int kSide = TileGeom<TS>::kSide;
  CNX_UNROLL
  for (int r = 0; r < R; ++r) {
    const int32_t* own = halo + (py0 + r + 3) * kSide + 3;
    CNX_UNROLL
    for (int px = 0; px < TS; ++px) {
      const int32_t m = own[px];
      if (m < 0) {
        CNX_UNROLL
        for (int v = 0; v < V; ++v) g[r][px][v] = acc_t(0);
      } else {
        const Vec<T, V> f = load_vec<T, V>(dy + m * C + c0);
        CNX_UNROLL
        for (int v = 0; v < V; ++v) g[r][px][v] = static_cast<acc_t>(f.v[v]);
      }
    }
  }
}

// Adds the R x TS pixels' products to acc (opmath; registers on the GPU):
//   acc[t][v] += g[r][px][v] * x(halo pixel (py0 + r + dy, px + dx))  (t = dy * 7 + dx)
//   acc[49][v] += g[r][px][v]                                        (bias)
// from the staged halo (value of halo pixel p, channel c0 + v at
// buf[p * pitch + cc + v]).  The R + 6 halo rows the block needs are streamed
// once, each staged value used for every (pixel, tap) it meets (up to 7 x 7):
// (R + 6)(TS + 6) loads for 49 R TS FFMAs, the mirror of conv_tile_rows.
// Per tap the products are added in pixel order (row, then column), the
// bias in the same order.
template <typename T, int V, int TS, int R>
CNX_HD void wgrad_tile_rows(const at::opmath_type<T>* CNX_RESTRICT buf, int pitch, int cc,
                            int py0, const at::opmath_type<T> (&g)[R][TS][V],
                            at::opmath_type<T> (&acc)[kTaps + 1][V]) {
  using acc_t = at::opmath_type<T>;
  constexpr int kSide = TileGeom<TS>::kSide;
  static_assert(TS % R == 0, "wgrad_tile_rows: R must divide TS");
  CNX_UNROLL
  for (int r = 0; r < R; ++r) {
    CNX_UNROLL
    for (int px = 0; px < TS; ++px) {
      CNX_UNROLL
      for (int v = 0; v < V; ++v) acc[kTaps][v] += g[r][px][v];
    }
  }
  CNX_UNROLL
  for (int hr = 0; hr < R + 6; ++hr) {  // halo row py0 + hr
    const acc_t* row = buf + (py0 + hr) * kSide * pitch + cc;
    CNX_UNROLL
    for (int j = 0; j < kSide; ++j) {
      const Vec<acc_t, V> xv = load_vec<acc_t, V>(row + j * pitch);
      CNX_UNROLL
      for (int r = 0; r < R; ++r) {
        const int dy = hr - r;
        if (dy < 0 || dy > 6) continue;  // compile-time under full unrolling
        CNX_UNROLL
        for (int dx = 0; dx < 7; ++dx) {
          const int px = j - dx;
          if (px < 0 || px >= TS) continue;
          CNX_UNROLL
          for (int v = 0; v < V; ++v)
            acc[dy * 7 + dx][v] += g[r][px][v] * xv.v[v];  // one FFMA
        }
      }
    }
  }
}

// The partials of n slots (p[0], p[stride], ...) summed in slot order: the
// fixed-order reduction of a tile-wgrad chunk (no atomics).
template <typename acc_t>
CNX_HD acc_t sum_slots(const acc_t* CNX_RESTRICT p, int stride, int n) {
  acc_t s = p[0];
  for (int w = 1; w < n; ++w) s += p[w * stride];
  return s;
}

// One weight-gradient chunk of channels [c0, c0 + V): rows [m0, m1) in order,
//   part[t][v] = sum_m dy[m, c0+v] * x[nb(m)[t], c0+v]   (t < 49, absent taps add 0)
//   part[49][v] = sum_m dy[m, c0+v]                       (bias)
// in opmath, one pass over dy and x; written to partial [chunks, 50, C] at
// chunk k (channel-contiguous, so GPU lanes store coalesced).
template <typename T, int V>
CNX_HD void wgrad_chunk(const int32_t* CNX_RESTRICT nbr_rows, const T* CNX_RESTRICT dy,
                        const T* CNX_RESTRICT x, int C, int c0, int m0, int m1,
                        at::opmath_type<T>* CNX_RESTRICT partial_k) {
  using acc_t = at::opmath_type<T>;
  acc_t acc[kTaps + 1][V];
  CNX_UNROLL
  for (int t = 0; t <= kTaps; ++t) {
    CNX_UNROLL
    for (int v = 0; v < V; ++v) acc[t][v] = acc_t(0);
  }
  for (int m = m0; m < m1; ++m) {
    const Vec<T, V> gv = load_vec<T, V>(dy + m * C + c0);
    acc_t g[V];
    CNX_UNROLL
    for (int v = 0; v < V; ++v) g[v] = static_cast<acc_t>(gv.v[v]);
    const int32_t* nb = nbr_rows + m * kTaps;
    CNX_UNROLL
    for (int t = 0; t < kTaps; ++t) {
      const int32_t r = nb[t];
      const Vec<T, V> f = load_vec<T, V>(x + (r < 0 ? 0 : r) * C + c0);
      CNX_UNROLL
      for (int v = 0; v < V; ++v) {
        const acc_t xv = r < 0 ? acc_t(0) : static_cast<acc_t>(f.v[v]);
        acc[t][v] += g[v] * xv;
      }
    }
    CNX_UNROLL
    for (int v = 0; v < V; ++v) acc[kTaps][v] += g[v];
  }
  CNX_UNROLL
  for (int t = 0; t <= kTaps; ++t) {
    CNX_UNROLL
    for (int v = 0; v < V; ++v) partial_k[t * C + c0 + v] = acc[t][v];
  }
}

// ---------------------------------------------------------------------------
// Skip path (forward / input gradient and weight gradient) for small tiles
// (TS = 1, 2, 4: FCMAE's stages 2-4, where most of a 7x7 neighbourhood is
// masked).  Same halo table as the tile path (StageLayout.tile_halo_rows), but
// nothing is staged and nothing absent is computed: the halo is cut into the
// (2 kReach + 1)^2 source tiles (aligned TS x TS blocks, clipped to the halo)
// around the output tile, and each source tile that holds a visible pixel
// contributes its pixel x output products, whose taps are compile-time
// constants under full unrolling (taps in registers, no tap index table).  A
// fully visible source tile loads all its pixels first (the loads in flight
// together), a partly visible one (general layouts only) takes a per-pixel
// branch; both add the same products in the same order, so the result does
// not depend on which branch ran.  Masked source tiles cost one test: at mask
// 0.6 about 60% of the 49 taps of an output are never touched.
//
// Per output the products are added in source-tile order (row-major over
// (sy, sx)), then pixel order (row-major) inside the source tile, after init
// (the bias): a different fp32 summation order from the gather and tile paths
// (equal on data whose sums are exact).  The table is read through a view
// (`Tab`): offset(p) = byte offset of halo entry p's row (row x pitch, valid
// where the entry is >= 0), word(i) = bit mask of the entries 32 i .. 32 i + 31
// that are >= 0.  The C++ twin's view reads the halo row, the
// GPU's holds it across the warp's lanes (shuffles and ballots), so both run
// this arithmetic.
template <int TS>
struct SkipGeom {
  static constexpr int kSide = TS + 6;
  static constexpr int kHaloPx = kSide * kSide;
  static constexpr int kReach = (TS + 2) / TS;        // ceil(3 / TS) source tiles a side
  static constexpr int kSrc = 2 * kReach + 1;        // source tiles per dimension
  static constexpr int kWords = (kHaloPx + 31) / 32;  // 32-entry words of a halo row
  // Channels a GPU lane computes: 2 (98 opmath tap registers) for TS <= 2; 1
  // for TS = 4, whose 16 accumulators and 16 source values a channel would
  // otherwise not fit beside the taps.  The arithmetic per channel is the same
  // for any V; the C++ twin instantiates the same widths (skip_dispatch_vec).
  static constexpr int kVec = TS <= 2 ? 2 : 1;
  // The weight gradient's lanes keep 50 x V opmath sums (two CTAs per SM, up
  // to 255 registers: with TS = 2, V = 2 the 100 sums, 8 dy and 8 source
  // values spilled at the 168 registers of three); V = 1 for TS = 4.
  static constexpr int kWgradVec = TS <= 2 ? 2 : 1;
  // Weight gradient: a chunk is kWgradTiles consecutive tiles, split over
  // kWgradWarps accumulators (tile j of the chunk to accumulator j % kWgradWarps;
  // one warp each on the GPU), summed in accumulator order at the end of the
  // chunk (sum_slots), the [chunks, 50, C] partials then in chunk order.
  static constexpr int kWgradTiles = 256 / (TS * TS);
  static constexpr int kWgradWarps = 4;
};

// Halo pixels [lo, hi] (one dimension, halo coordinates 0 .. kSide - 1) of
// source tile s (0 .. kSrc - 1, offset s - kReach tiles from the output tile).
template <int TS>
constexpr int skip_lo(int s) {
  return (s - SkipGeom<TS>::kReach) * TS + 3 < 0 ? 0 : (s - SkipGeom<TS>::kReach) * TS + 3;
}
template <int TS>
constexpr int skip_hi(int s) {
  return (s - SkipGeom<TS>::kReach) * TS + TS + 2 > TS + 5 ? TS + 5
                                                           : (s - SkipGeom<TS>::kReach) * TS + TS + 2;
}

// Bit masks of every source tile's halo entries, per 32-entry word.
template <int TS>
struct SkipMasks {
  using G = SkipGeom<TS>;
  uint32_t m[G::kSrc * G::kSrc][G::kWords];
  constexpr SkipMasks() : m() {
    for (int s = 0; s < G::kSrc * G::kSrc; ++s)
      for (int hy = skip_lo<TS>(s / G::kSrc); hy <= skip_hi<TS>(s / G::kSrc); ++hy)
        for (int hx = skip_lo<TS>(s % G::kSrc); hx <= skip_hi<TS>(s % G::kSrc); ++hx) {
          const int p = hy * G::kSide + hx;
          m[s][p / 32] |= 1u << (p % 32);
        }
  }
};

// The C++ twin's view of one halo row; `pitch` = the byte stride of a row of
// the [M, C] tensors read and written (C * sizeof(T)).
template <int TS>
struct HaloRowView {
  const int32_t* h;
  uint32_t pitch;
  uint32_t m[SkipGeom<TS>::kWords];
  HaloRowView(const int32_t* halo, uint32_t row_pitch) : h(halo), pitch(row_pitch), m() {
    for (int p = 0; p < SkipGeom<TS>::kHaloPx; ++p)
      if (h[p] >= 0) m[p / 32] |= 1u << (p % 32);
  }
  // Byte offset of the row of visible halo entry p (p < 0 never asked).
  uint32_t offset(int p) const { return static_cast<uint32_t>(h[p]) * pitch; }
  uint32_t word(int i) const { return m[i]; }
};

// Whether source tile s has a visible pixel / has only visible pixels: two
// separate tests, so that a masked source tile (most of them) costs one masked
// compare and one branch.
template <int TS, class Tab>
CNX_HD bool skip_src_any(const Tab& tab, int s) {
  constexpr SkipMasks<TS> kMasks{};
  bool any = false;
  CNX_UNROLL
  for (int i = 0; i < SkipGeom<TS>::kWords; ++i) any = any || (tab.word(i) & kMasks.m[s][i]) != 0;
  return any;
}
template <int TS, class Tab>
CNX_HD bool skip_src_all(const Tab& tab, int s) {
  constexpr SkipMasks<TS> kMasks{};
  bool all = true;
  CNX_UNROLL
  for (int i = 0; i < SkipGeom<TS>::kWords; ++i)
    all = all && (tab.word(i) & kMasks.m[s][i]) == kMasks.m[s][i];
  return all;
}

template <class Tab>
CNX_HD bool skip_present(const Tab& tab, int p) {
  return (tab.word(p >> 5) >> (p & 31)) & 1u;
}

// Channels [c0, c0 + V) of halo pixel p in opmath (the caller knows it is
// visible): the address is the base plus the view's premultiplied byte offset
// (a 64-bit add), bf16 pairs widened with two bit operations (exact, as
// static_cast).
template <typename T, int V, class Tab>
CNX_HD void skip_load_px(const Tab& tab, int p, const T* CNX_RESTRICT x, int c0,
                         at::opmath_type<T> (&xv)[V]) {
  const Vec<T, V> f = load_vec<T, V>(reinterpret_cast<const T*>(
      reinterpret_cast<const char*>(x + c0) + tab.offset(p)));
  if constexpr (std::is_same_v<T, c10::BFloat16> && V % 2 == 0) {
    CNX_UNROLL
    for (int i = 0; i < V / 2; ++i) {
      uint32_t u;
      memcpy(&u, &f.v[2 * i], sizeof(u));
      const uint32_t lo = u << 16, hi = u & 0xffff0000u;
      memcpy(&xv[2 * i], &lo, sizeof(lo));
      memcpy(&xv[2 * i + 1], &hi, sizeof(hi));
    }
  } else {
    CNX_UNROLL
    for (int v = 0; v < V; ++v) xv[v] = static_cast<at::opmath_type<T>>(f.v[v]);
  }
}

// The products of halo pixel (hy, hx) (value xv) with the outputs of the tile
// it reaches: acc[oy][ox] += w[t] * xv, t = (hy - oy) * 7 + (hx - ox).
template <typename acc_t, int V, int TS>
CNX_HD void skip_px_fwd(int hy, int hx, const acc_t (&xv)[V], const acc_t (&w)[kTaps][V],
                        acc_t (&acc)[TS][TS][V]) {
  CNX_UNROLL
  for (int oy = 0; oy < TS; ++oy) {
    const int dy = hy - oy;
    if (dy < 0 || dy > 6) continue;  // compile-time under full unrolling
    CNX_UNROLL
    for (int ox = 0; ox < TS; ++ox) {
      const int dx = hx - ox;
      if (dx < 0 || dx > 6) continue;
      CNX_UNROLL
      for (int v = 0; v < V; ++v) acc[oy][ox][v] += w[dy * 7 + dx][v] * xv[v];  // one FFMA
    }
  }
}

// The weight-gradient mirror: acc[t] += g[oy][ox] * xv for the same pairs.
template <typename acc_t, int V, int TS>
CNX_HD void skip_px_wgrad(int hy, int hx, const acc_t (&xv)[V], const acc_t (&g)[TS][TS][V],
                          acc_t (&acc)[kTaps + 1][V]) {
  CNX_UNROLL
  for (int oy = 0; oy < TS; ++oy) {
    const int dy = hy - oy;
    if (dy < 0 || dy > 6) continue;
    CNX_UNROLL
    for (int ox = 0; ox < TS; ++ox) {
      const int dx = hx - ox;
      if (dx < 0 || dx > 6) continue;
      CNX_UNROLL
      for (int v = 0; v < V; ++v) acc[dy * 7 + dx][v] += g[oy][ox][v] * xv[v];  // one FFMA
    }
  }
}

// f(std::integral_constant<int, i>{}) for i = 0 .. N - 1, in order: loops whose
// indices must be compile-time constants for the code inside (taps and
// accumulators in registers), independently of the compiler's unroller.
template <class F, int... Is>
CNX_HD void static_for_seq(F&& f, std::integer_sequence<int, Is...>) {
  (f(std::integral_constant<int, Is>{}), ...);
}
template <int N, class F>
CNX_HD void static_for(F&& f) {
  static_for_seq(f, std::make_integer_sequence<int, N>{});
}

// Runs op(hy, hx, xv) (hy, hx as std::integral_constant) for every visible
// pixel of every source tile holding one, in source-tile then pixel order: a
// fully visible tile's pixels loaded first, a partly visible tile's pixel by
// pixel under a branch.
template <typename T, int V, int TS, class Tab, class Op>
CNX_HD void skip_for_each_px(const Tab& tab, const T* CNX_RESTRICT x, int c0, Op&& op) {
  using acc_t = at::opmath_type<T>;
  using G = SkipGeom<TS>;
  static_for<G::kSrc * G::kSrc>([&](auto sc) {
    constexpr int s = decltype(sc)::value;
    constexpr int y0 = skip_lo<TS>(s / G::kSrc), ny = skip_hi<TS>(s / G::kSrc) - y0 + 1;
    constexpr int x0 = skip_lo<TS>(s % G::kSrc), nx = skip_hi<TS>(s % G::kSrc) - x0 + 1;
    if (!skip_src_any<TS>(tab, s)) return;
    if (skip_src_all<TS>(tab, s)) {
      acc_t xv[ny * nx][V];
      static_for<ny * nx>([&](auto ic) {
        constexpr int i = decltype(ic)::value;
        skip_load_px<T, V>(tab, (y0 + i / nx) * G::kSide + x0 + i % nx, x, c0, xv[i]);
      });
      static_for<ny * nx>([&](auto ic) {
        constexpr int i = decltype(ic)::value;
        op(std::integral_constant<int, y0 + i / nx>{}, std::integral_constant<int, x0 + i % nx>{},
           xv[i]);
      });
    } else {
      static_for<ny * nx>([&](auto ic) {
        constexpr int i = decltype(ic)::value;
        constexpr int p = (y0 + i / nx) * G::kSide + x0 + i % nx;
        if (skip_present(tab, p)) {
          acc_t xv[V];
          skip_load_px<T, V>(tab, p, x, c0, xv);
          op(std::integral_constant<int, y0 + i / nx>{},
             std::integral_constant<int, x0 + i % nx>{}, xv);
        }
      });
    }
  });
}

// Forward / input gradient of one output tile, channels [c0, c0 + V): taps w
// (opmath) and init (the bias) from the caller; stores the visible own pixels
// (`store` false: compute only -- GPU lanes past C).
template <typename T, int V, int TS, class Tab>
CNX_HD void skip_tile_fwd(const Tab& tab, const T* CNX_RESTRICT x, int c0,
                          const at::opmath_type<T> (&w)[kTaps][V],
                          const at::opmath_type<T> (&init)[V], bool store,
                          T* CNX_RESTRICT out) {
  using acc_t = at::opmath_type<T>;
  constexpr int kSide = SkipGeom<TS>::kSide;
  acc_t acc[TS][TS][V];
  CNX_UNROLL
  for (int oy = 0; oy < TS; ++oy) {
    CNX_UNROLL
    for (int ox = 0; ox < TS; ++ox) {
      CNX_UNROLL
      for (int v = 0; v < V; ++v) acc[oy][ox][v] = init[v];
    }
  }
  skip_for_each_px<T, V, TS>(tab, x, c0, [&](auto hy, auto hx, const acc_t (&xv)[V]) {
    skip_px_fwd<acc_t, V, TS>(decltype(hy)::value, decltype(hx)::value, xv, w, acc);
  });
  CNX_UNROLL
  for (int oy = 0; oy < TS; ++oy) {
    CNX_UNROLL
    for (int ox = 0; ox < TS; ++ox) {
      const int p = (oy + 3) * kSide + ox + 3;
      if (!skip_present(tab, p)) continue;
      // the offset before the lane-dependent `store`: on the GPU it is a shuffle
      // every lane of the warp must execute
      const uint32_t off = tab.offset(p);
      Vec<T, V> o;
      CNX_UNROLL
      for (int v = 0; v < V; ++v) o.v[v] = static_cast<T>(acc[oy][ox][v]);
      if (store) store_vec<T, V>(reinterpret_cast<T*>(reinterpret_cast<char*>(out + c0) + off), o);
    }
  }
}

// Weight / bias gradient of one output tile added to acc (opmath): the bias
// row gets the tile's dy in pixel order, then every visible source pixel its
// products with the tile's dy (0 for an invisible own pixel).
template <typename T, int V, int TS, class Tab>
CNX_HD void skip_tile_wgrad(const Tab& tab, const T* CNX_RESTRICT dy, const T* CNX_RESTRICT x,
                            int c0, at::opmath_type<T> (&acc)[kTaps + 1][V]) {
  using acc_t = at::opmath_type<T>;
  constexpr int kSide = SkipGeom<TS>::kSide;
  acc_t g[TS][TS][V];
  CNX_UNROLL
  for (int oy = 0; oy < TS; ++oy) {
    CNX_UNROLL
    for (int ox = 0; ox < TS; ++ox) {
      const int p = (oy + 3) * kSide + ox + 3;
      if (skip_present(tab, p)) {
        skip_load_px<T, V>(tab, p, dy, c0, g[oy][ox]);
      } else {
        CNX_UNROLL
        for (int v = 0; v < V; ++v) g[oy][ox][v] = acc_t(0);
      }
    }
  }
  CNX_UNROLL
  for (int oy = 0; oy < TS; ++oy) {
    CNX_UNROLL
    for (int ox = 0; ox < TS; ++ox) {
      CNX_UNROLL
      for (int v = 0; v < V; ++v) acc[kTaps][v] += g[oy][ox][v];
    }
  }
  skip_for_each_px<T, V, TS>(tab, x, c0, [&](auto hy, auto hx, const acc_t (&xv)[V]) {
    skip_px_wgrad<acc_t, V, TS>(decltype(hy)::value, decltype(hx)::value, xv, g, acc);
  });
}

// Element i of the [50, C] total, the chunk partials summed in chunk order,
// stored to grad_taps [49, C] (i < 49 C) or grad_bias [C] (the last C).
template <typename acc_t>
CNX_HD void reduce_chunks(const acc_t* CNX_RESTRICT partial, int chunks, int C, int i,
                          acc_t* CNX_RESTRICT grad_taps, acc_t* CNX_RESTRICT grad_bias) {
  const int per = (kTaps + 1) * C;
  acc_t s = acc_t(0);
  for (int k = 0; k < chunks; ++k) s += partial[k * per + i];
  if (i < kTaps * C) grad_taps[i] = s;
  else grad_bias[i - kTaps * C] = s;
}

}  // namespace sdw
}  // namespace convnextv2_fast
