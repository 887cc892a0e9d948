// Tensor-core tile path of the submanifold depthwise 7x7 conv (forward / input
// gradient, fp16 and bf16, 8x8 tiles): the index arithmetic shared by the CUDA
// kernel (sparse_dwconv_cuda.cu, mma.sync m16n8k16 + ldmatrix) and its C++ twin
// (sparse_dwconv_cpu.cpp, which emulates ldmatrix and mma.sync lane by lane
// with the very functions below, so the CPU tests run the GPU's staging,
// fragment and epilogue index math).
//
// Why tensor cores.  With fp32 accumulation an FFMA stencil spends 49 FFMAs per
// output; at bf16 on an H200 those alone take 1.76x the op's HBM time, so no
// FFMA kernel gets within 2x of the HBM floor.  Per channel the 7x7 stencil on
// a tile is a sum of seven small GEMMs: with the tile's (8 + 6) x (8 + 6) halo
// X (channel c, zeros for absent pixels) and, per kernel row dy, the banded
// matrix W_dy[j][px] = taps[dy * 7 + j - px, c] (0 unless 0 <= j - px <= 6),
//     out[py][px] = bias + sum_dy sum_j X[py + dy][j] * W_dy[j][px],
// i.e. D(16 x 8) += A_dy(16 x 16) B_dy(16 x 8) with
//   rows m = 8 * tile + py  (two tiles share one MMA: M = 16),
//   k = halo column j (14 used, 2 zero columns), n = px,
//   A_dy[m][j] = X_tile[py + dy][j]  (an ldmatrix of 8 halo rows shifted by dy),
//   B_dy[j][n] = W_dy[j][n]          (per channel, fixed: kept in registers).
// Products are exact in fp32 and the MMA accumulates in fp32; only the order
// (and the hardware's internal rounding) of the sum differs from the FFMA path.
// A visible input that is inf/NaN reaches the outputs of its whole tile row
// band (inf * 0 = NaN in the zero band of W_dy), not only its 7x7
// neighbourhood; an absent input is a staged 0 and never does.
//
// Shared-memory layout of the staged halos (elements of T, one CTA = a pair
// of tiles x kMmaCh channels): channel cl (0..31) at xs_channel_base(cl); in it
// row R = 14 * tile + hr (hr = halo row 0..13) of 16 columns (32 B); the two
// 16-byte halves of a row are swapped on rows with bit 2 of R set (any 8
// consecutive rows then cover all 8 16-byte bank groups: ldmatrix without
// bank conflicts); 8-channel groups are skewed by 16 B (the staging stores of
// 4 groups land in different banks).  Columns 14, 15 are zero.
#pragma once
#include <cstdint>

#include "sparse_dwconv/sparse_dwconv_math.h"

namespace convnextv2_fast {
namespace sdw {

constexpr int kMmaTile = 8;                       // tile side (8x8 tiles only)
constexpr int kMmaSide = kMmaTile + 6;            // halo side (14)
constexpr int kMmaHaloPx = kMmaSide * kMmaSide;   // 196
constexpr int kMmaCh = 32;                        // channels per CTA / CPU task
constexpr int kMmaThreads = 256;                  // threads per CTA (8 warps)
constexpr int kMmaWarps = kMmaThreads / 32;
constexpr int kMmaChPerWarp = kMmaCh / kMmaWarps;  // 4 channels per warp
constexpr int kMmaRowElems = 16;                  // k = 16 columns per halo row
constexpr int kMmaChElems = 2 * kMmaSide * kMmaRowElems;  // 448 per channel
constexpr int kMmaXsElems = kMmaCh * kMmaChElems + (kMmaCh / 8) * 8;
// Staging tasks per tile pair: (tile, halo row, column pair, 8-channel group).
constexpr int kMmaColPairs = kMmaSide / 2;        // 7
constexpr int kMmaStageTasks = 2 * kMmaSide * kMmaColPairs * (kMmaCh / 8);  // 784
// Output staging (GPU): 128 pixels x 16 words (2 channels a word), pitch 17 words.
constexpr int kMmaYsPitch = kMmaCh / 2 + 1;
constexpr int kMmaOutTasks = 2 * kMmaTile * kMmaTile * (kMmaCh / 8);  // 512

CNX_HD int xs_channel_base(int cl) { return cl * kMmaChElems + (cl >> 3) * 8; }

// Element index of (channel cl, tile 0/1, halo row hr, column col) in xs.
CNX_HD int xs_index(int cl, int tile, int hr, int col) {
  const int R = tile * kMmaSide + hr;
  return xs_channel_base(cl) + R * kMmaRowElems + ((((col >> 3) ^ (R >> 2)) & 1) << 3) +
         (col & 7);
}

// ldmatrix.x4 of A_dy for channel cl: lane l supplies the address of row
// r = l & 7 of matrix q = l >> 3; matrix q = (tile q & 1, columns 8 (q >> 1) ..
// + 7), so the four result registers are the m16n8k16 A fragment a0..a3
// (rows 0-7 = tile 0, rows 8-15 = tile 1; k 0-7, then k 8-15).
CNX_HD int mma_a_row_index(int lane, int cl, int dy) {
  const int q = lane >> 3, r = lane & 7;
  return xs_index(cl, q & 1, dy + r, (q >> 1) * 8);
}

// The 16-bit value at (kernel row dy, offset d = j - px) of channel c: taps[dy * 7 + d, c],
// 0 outside 0 <= d <= 6.
template <typename T>
CNX_HD T band_tap(const T* CNX_RESTRICT taps, int C, int c, int dy, int d) {
  return (d < 0 || d > 6) ? T(0) : taps[(dy * 7 + d) * C + c];
}

// B fragment (16 x 8, "col" operand) of W_dy for channel c, lane l (g = l >> 2,
// t = l & 3): b0 = (k = 2t, 2t + 1; n = g), b1 = (k = 2t + 8, 2t + 9; n = g),
// each as two 16-bit values, the lower k in the low half.  b[0..3] = the four
// values in that order.  Channels >= C give zeros.
template <typename T>
CNX_HD void mma_b_frag(const T* CNX_RESTRICT taps, int C, int c, int dy, int lane, T (&b)[4]) {
  const int g = lane >> 2, t = lane & 3;
  const int d = 2 * t - g;
  const bool ok = c < C;
  b[0] = ok ? band_tap<T>(taps, C, c, dy, d) : T(0);
  b[1] = ok ? band_tap<T>(taps, C, c, dy, d + 1) : T(0);
  b[2] = ok ? band_tap<T>(taps, C, c, dy, d + 8) : T(0);
  b[3] = ok ? band_tap<T>(taps, C, c, dy, d + 9) : T(0);
}

// Accumulator register i (0..3) of lane l: (m, n) = (g + 8 (i >> 1), 2t + (i & 1)),
// i.e. tile i >> 1, tile pixel (py, px) = (g, 2t + (i & 1)).
CNX_HD void mma_c_pos(int lane, int i, int& tile, int& py, int& px) {
  tile = i >> 1;
  py = lane >> 2;
  px = 2 * (lane & 3) + (i & 1);
}

// Row of halo pixel (hr, col) of tile k, or -1 (absent, or no such tile).
CNX_HD int32_t mma_halo_row(const int32_t* CNX_RESTRICT halo_rows, int K, int k, int hr,
                            int col) {
  return k < K ? halo_rows[k * kMmaHaloPx + hr * kMmaSide + col] : -1;
}

// Row of own pixel (py, px) of tile k, or -1 (invisible pixel, or no such tile).
CNX_HD int32_t mma_own_row(const int32_t* CNX_RESTRICT halo_rows, int K, int k, int py,
                           int px) {
  return mma_halo_row(halo_rows, K, k, py + 3, px + 3);
}

// The 8 channels [c0, c0 + 8) of row r (r < 0 or c0 >= C: zeros) as one 16-byte vector.
template <typename T>
CNX_HD Vec<T, 8> load_px8(const T* CNX_RESTRICT x, int C, int r, int c0) {
  if (r < 0 || c0 >= C) {
    Vec<T, 8> z;
    CNX_UNROLL
    for (int e = 0; e < 8; ++e) z.v[e] = T(0);
    return z;
  }
  return load_vec<T, 8>(x + r * C + c0);
}

// Staging task i (0 .. kMmaStageTasks) of the tile pair (k0, k0 + 1), channels
// [cbase, cbase + 32): the halo pixels (hr, 2 cp) and (hr, 2 cp + 1) of tile
// k0 + tile, 8 channels (group cg = i & 3, so 4 consecutive lanes read 64
// contiguous bytes of a pixel), read as 16-byte vectors (zeros for absent
// pixels, channels >= C or a tile >= K) and written to xs as 8 two-element
// words (col 2 cp in the low half), one per channel: the transpose to the
// channel-major layout.
template <typename T>
CNX_HD void mma_stage(int i, const int32_t* CNX_RESTRICT halo_rows, int K, int k0,
                      const T* CNX_RESTRICT x, int C, int cbase, T* CNX_RESTRICT xs) {
  const int cg = i & 3, q = i >> 2;
  constexpr int kPerTile = kMmaSide * kMmaColPairs;
  const int tile = q / kPerTile, rem = q % kPerTile;
  const int hr = rem / kMmaColPairs, col = 2 * (rem % kMmaColPairs);
  const int k = k0 + tile, c0 = cbase + 8 * cg;
  const Vec<T, 8> v0 = load_px8<T>(x, C, mma_halo_row(halo_rows, K, k, hr, col), c0);
  const Vec<T, 8> v1 = load_px8<T>(x, C, mma_halo_row(halo_rows, K, k, hr, col + 1), c0);
  CNX_UNROLL
  for (int e = 0; e < 8; ++e) {
    Vec<T, 2> w;
    w.v[0] = v0.v[e];
    w.v[1] = v1.v[e];
    store_vec<T, 2>(xs + xs_index(8 * cg + e, tile, hr, col), w);
  }
}

// Zero task i (0 .. kMmaCh * 2 * kMmaSide): columns 14, 15 of one xs row (the
// k padding; staging never writes them, so once per CTA / buffer suffices).
template <typename T>
CNX_HD void mma_zero_pad(int i, T* CNX_RESTRICT xs) {
  const int cl = i / (2 * kMmaSide), R = i % (2 * kMmaSide);
  Vec<T, 2> z;
  z.v[0] = T(0);
  z.v[1] = T(0);
  store_vec<T, 2>(xs + xs_index(cl, R / kMmaSide, R % kMmaSide, kMmaSide), z);
}

}  // namespace sdw
}  // namespace convnextv2_fast
