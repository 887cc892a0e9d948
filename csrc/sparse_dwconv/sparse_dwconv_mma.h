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
// row R = 14 * tile + hr (hr = halo row 0..13) at R * 24 (48 bytes: 16 k
// columns + 8 unused, so 8 consecutive rows start in 8 different 16-byte bank
// groups and ldmatrix has no bank conflicts, and the address of row R + dy is
// an immediate offset); 8-channel groups are skewed by 32 B, so the 32 word
// stores of a staging warp-iteration (8 column pairs x 4 groups, one halo row)
// hit 32 different banks.  Columns 14, 15 are zero.  After the MMAs the same
// buffer holds the bf16/fp16 results (ys).
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
constexpr int kMmaRowElems = 24;                  // k = 16 columns per halo row + 8 pad
constexpr int kMmaChElems = 2 * kMmaSide * kMmaRowElems;  // 672 per channel
constexpr int kMmaXsElems = kMmaCh * kMmaChElems + (kMmaCh / 8) * 16;
static_assert(kMmaXsElems * 2 >= 2 * 64 * (kMmaCh / 2 + 1) * 4, "ys must fit in xs");
// Staging tasks per tile pair: (tile, halo row, column pair, 8-channel group);
// column pair 7 (the k padding, columns 14 and 15) stores zeros.
constexpr int kMmaColPairs = 8;
constexpr int kMmaStageTasks = 2 * kMmaSide * kMmaColPairs * (kMmaCh / 8);  // 896
// Output staging (GPU, aliasing xs): 128 pixels x 16 words (2 channels a
// word), pitch 17 words (the accumulator stores of a warp spread over the banks).
constexpr int kMmaYsPitch = kMmaCh / 2 + 1;
constexpr int kMmaOutTasks = 2 * kMmaTile * kMmaTile * (kMmaCh / 8);  // 512

CNX_HD int xs_channel_base(int cl) { return cl * kMmaChElems + (cl >> 3) * 16; }

// Element index of (channel cl, tile 0/1, halo row hr, column col) in xs.
CNX_HD int xs_index(int cl, int tile, int hr, int col) {
  return xs_channel_base(cl) + (tile * kMmaSide + hr) * kMmaRowElems + col;
}

// ldmatrix.x4 of A_dy for channel cl: lane l supplies the address of row
// r = l & 7 of matrix q = l >> 3; matrix q = (tile q & 1, columns 8 (q >> 1) ..
// + 7), so the four result registers are the m16n8k16 A fragment a0..a3
// (rows 0-7 = tile 0, rows 8-15 = tile 1; k 0-7, then k 8-15).
CNX_HD int mma_a_row_index(int lane, int cl, int dy) {
  const int q = lane >> 3, r = lane & 7;
  return xs_index(cl, q & 1, dy + r, (q >> 1) * 8);
}

// The CTA's taps, staged once: ws[(cl * 7 + dy) * 24 + 8 + d] = taps[dy * 7 + d, cbase + cl]
// for 0 <= d <= 6, zero for the other d in [-8, 16) and for channels >= C, so
// every B-fragment value is one unconditional load (ws aliases xs before the
// first halo is staged on the GPU).
constexpr int kMmaWsPitch = 24;
constexpr int kMmaWsElems = kMmaCh * 7 * kMmaWsPitch;  // 5376
static_assert(kMmaWsElems <= kMmaXsElems, "ws must fit in xs");

CNX_HD int ws_index(int cl, int dy, int e) { return (cl * 7 + dy) * kMmaWsPitch + e; }

// Task i (0 .. kMmaWsTasks) of the taps staging: i < 1792 writes entries
// 8 .. 15 of row (cl, dy) (the 7 taps and a zero; channel-fastest, so lanes
// read consecutive channels of one tap), the rest zero the 16-byte chunks 0 and
// 2 of each row (no two tasks write the same element: one pass, no barrier).
constexpr int kMmaWsTapTasks = kMmaCh * 7 * 8;                     // 1792
constexpr int kMmaWsTasks = kMmaWsTapTasks + kMmaCh * 7 * 2;       // + 448
template <typename T>
CNX_HD void mma_stage_taps(int i, const T* CNX_RESTRICT taps, int C, int cbase,
                           T* CNX_RESTRICT ws) {
  if (i < kMmaWsTapTasks) {
    const int cl = i & (kMmaCh - 1), rest = i / kMmaCh;
    const int dy = rest >> 3, d = rest & 7, c = cbase + cl;
    ws[ws_index(cl, dy, 8 + d)] = (d < 7 && c < C) ? taps[(dy * 7 + d) * C + c] : T(0);
  } else {
    const int j = i - kMmaWsTapTasks;
    Vec<T, 8> z;
    CNX_UNROLL
    for (int e = 0; e < 8; ++e) z.v[e] = T(0);
    store_vec<T, 8>(ws + (j >> 1) * kMmaWsPitch + (j & 1) * 16, z);
  }
}

// B fragment (16 x 8, "col" operand) of W_dy for channel cl, lane l (g = l >> 2,
// t = l & 3): b0 = (k = 2t, 2t + 1; n = g), b1 = (k = 2t + 8, 2t + 9; n = g), i.e.
// W_dy[k][g] = ws value at d = k - g; b[0..3] = the four values in that order
// (the lower k of each pair in the low half of its register).
template <typename T>
CNX_HD void mma_b_frag(const T* CNX_RESTRICT ws, int cl, int dy, int lane, T (&b)[4]) {
  const int g = lane >> 2, t = lane & 3;
  const int base = ws_index(cl, dy, 8 + 2 * t - g);
  b[0] = ws[base];
  b[1] = ws[base + 1];
  b[2] = ws[base + 8];
  b[3] = ws[base + 9];
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

// Two 16-bit values as one word: the low (hi = 0) or high (hi = 1) halves of
// a and b, a's in the low half (one PRMT on the GPU).
CNX_HD uint32_t pair_bits(uint32_t a, uint32_t b, int hi) {
#if defined(__CUDA_ARCH__)
  return __byte_perm(a, b, hi ? 0x7632 : 0x5410);
#else
  return hi ? ((a >> 16) | (b & 0xffff0000u)) : ((a & 0xffffu) | (b << 16));
#endif
}

// The 8 channels [c0, c0 + 8) of row r (r < 0 or c0 >= C: zeros) as 16 bytes.
template <typename T>
CNX_HD Vec<uint32_t, 4> load_px8_bits(const T* CNX_RESTRICT x, int C, int32_t r, int c0) {
  if (r < 0 || c0 >= C) return Vec<uint32_t, 4>{{0u, 0u, 0u, 0u}};
  return load_vec<uint32_t, 4>(reinterpret_cast<const uint32_t*>(x + r * C + c0));
}

// Staging task i (0 .. kMmaStageTasks) of the tile pair (k0, k0 + 1), channels
// [cbase, cbase + 32): i = ((tile * 14 + hr) * 8 + cp) * 4 + cg, i.e. the halo
// pixels (hr, 2 cp) and (hr, 2 cp + 1) of tile k0 + tile, channel group cg
// (4 consecutive lanes read 64 contiguous bytes of a pixel), both read as
// 16-byte vectors (zeros for absent pixels, channels >= C, a tile >= K and the
// padding columns 14, 15 of cp = 7, rewritten every pair since the results
// overwrite xs) and written to xs as 8 two-element words (column 2 cp in the
// low half), one per channel (stride kMmaChElems inside a group of 8): the
// transpose to the channel-major layout.
template <typename T>
CNX_HD void mma_stage(int i, const int32_t* CNX_RESTRICT halo_rows, int K, int k0,
                      const T* CNX_RESTRICT x, int C, int cbase, T* CNX_RESTRICT xs) {
  const int cg = i & 3, col = 2 * ((i >> 2) & 7), R = i >> 5;  // R = 14 tile + hr
  const int tile = R >= kMmaSide, hr = R - kMmaSide * tile;
  const int h = (k0 + tile) * kMmaHaloPx + hr * kMmaSide + col;
  const bool ok = col < kMmaSide && k0 + tile < K;
  // h is even (so is every term): the two rows are one 8-byte load.
  const Vec<int32_t, 2> r = ok ? load_vec<int32_t, 2>(halo_rows + h) : Vec<int32_t, 2>{{-1, -1}};
  const int32_t r0 = r.v[0], r1 = r.v[1];
  const int c0 = cbase + 8 * cg;
  const Vec<uint32_t, 4> v0 = load_px8_bits<T>(x, C, r0, c0);
  const Vec<uint32_t, 4> v1 = load_px8_bits<T>(x, C, r1, c0);
  uint32_t* dst = reinterpret_cast<uint32_t*>(xs + xs_index(8 * cg, tile, hr, col));
  CNX_UNROLL
  for (int e = 0; e < 8; ++e)
    dst[e * (kMmaChElems / 2)] = pair_bits(v0.v[e >> 1], v1.v[e >> 1], e & 1);
}

}  // namespace sdw
}  // namespace convnextv2_fast
