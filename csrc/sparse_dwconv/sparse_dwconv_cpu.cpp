// C++ (CPU) twin of sparse_dwconv_cuda.cu; see sparse_dwconv.h for the layout.
// The skip path is sparse_dwconv_skip_cpu.cpp.
#include "sparse_dwconv/sparse_dwconv.h"
#include "sparse_dwconv/sparse_dwconv_mma.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

namespace convnextv2_fast {

namespace {

// feats / taps / bias checks shared by the gather and the tile ops.
void check_feats_taps_bias(const at::Tensor& feats, const at::Tensor& taps,
                           const c10::optional<at::Tensor>& bias, const char* op) {
  TORCH_CHECK(feats.dim() == 2, op, ": feats must be a 2-D [M, C] tensor of visible-site "
              "features, got ", feats.dim(), " dims");
  TORCH_CHECK(feats.is_contiguous(), op, ": feats must be contiguous");
  const auto st = feats.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16 || st == at::kDouble,
              op, ": feats must be float32, float16, bfloat16 or float64, got ", st);
  const int64_t C = feats.size(1);
  TORCH_CHECK(C > 0, op, ": feats must have at least one channel");
  TORCH_CHECK(taps.dim() == 2 && taps.size(0) == kTaps && taps.size(1) == C, op,
              ": taps must have shape [49, C] = [49, ", C, "] (depthwise 7x7 taps, tap-major), "
              "got ", taps.sizes());
  TORCH_CHECK(taps.scalar_type() == st, op, ": taps dtype ", taps.scalar_type(),
              " must equal the feats dtype ", st);
  TORCH_CHECK(taps.is_contiguous(), op, ": taps must be contiguous");
  TORCH_CHECK(taps.device() == feats.device(), op, ": taps must be on the feats device");
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == C, op, ": bias must have shape [C] = [",
                C, "], got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == st, op, ": bias dtype must equal the feats dtype");
    TORCH_CHECK(bias->is_contiguous(), op, ": bias must be contiguous");
    TORCH_CHECK(bias->device() == feats.device(), op, ": bias must be on the feats device");
  }
}

}  // namespace

void check_sparse_dwconv_args(const at::Tensor& feats, const at::Tensor& taps,
                              const c10::optional<at::Tensor>& bias,
                              const at::Tensor& nbr_rows, const char* op) {
  check_feats_taps_bias(feats, taps, bias, op);
  const int64_t M = feats.size(0), C = feats.size(1);
  TORCH_CHECK(nbr_rows.dim() == 2 && nbr_rows.size(0) == M && nbr_rows.size(1) == kTaps, op,
              ": nbr_rows must be an [M, 49] = [", M, ", 49] neighbour-row table "
              "(StageLayout.neighbour_rows()), got ", nbr_rows.sizes());
  TORCH_CHECK(nbr_rows.scalar_type() == at::kInt, op, ": nbr_rows must be int32, got ",
              nbr_rows.scalar_type());
  TORCH_CHECK(nbr_rows.is_contiguous(), op, ": nbr_rows must be contiguous");
  TORCH_CHECK(nbr_rows.device() == feats.device(), op,
              ": nbr_rows must be on the feats device");
  // int32 indexing everywhere: row * C, row * 49 and chunk * 50 * C must fit.
  TORCH_CHECK(M * std::max<int64_t>(C, kTaps + 1) < (int64_t(1) << 31), op,
              ": too many elements for int32 indexing (M * max(C, 50) must be < 2^31)");
}

namespace {

// feats / taps / bias and the [K, (tile + 6)^2] halo table (tile and skip ops).
int64_t check_halo_args(const at::Tensor& feats, const at::Tensor& taps,
                        const c10::optional<at::Tensor>& bias, const at::Tensor& halo_rows,
                        int64_t tile, const char* op) {
  check_feats_taps_bias(feats, taps, bias, op);
  const int64_t halo = (tile + 6) * (tile + 6);
  TORCH_CHECK(halo_rows.dim() == 2 && halo_rows.size(1) == halo, op,
              ": halo_rows must be a [K, (tile + 6)^2] = [K, ", halo, "] tile halo table "
              "(StageLayout.tile_halo_rows(", tile, ")), got ", halo_rows.sizes());
  TORCH_CHECK(halo_rows.scalar_type() == at::kInt, op, ": halo_rows must be int32, got ",
              halo_rows.scalar_type());
  TORCH_CHECK(halo_rows.is_contiguous(), op, ": halo_rows must be contiguous");
  TORCH_CHECK(halo_rows.device() == feats.device(), op,
              ": halo_rows must be on the feats device");
  const int64_t M = feats.size(0), C = feats.size(1), K = halo_rows.size(0);
  TORCH_CHECK(M * C < (int64_t(1) << 31) && K * halo < (int64_t(1) << 31), op,
              ": too many elements for int32 indexing (M * C and K * (tile + 6)^2 must be "
              "< 2^31)");
  return K;
}

// The skip path addresses rows by 32-bit byte offsets (row x C x sizeof(T)).
void check_skip_bytes(const at::Tensor& feats, const char* op) {
  TORCH_CHECK(feats.dim() != 2 || feats.numel() * feats.element_size() < (int64_t(1) << 32),
              op, ": feats must be smaller than 4 GiB (32-bit byte offsets)");
}

}  // namespace

int64_t check_sparse_dwconv_tile_args(const at::Tensor& feats, const at::Tensor& taps,
                                      const c10::optional<at::Tensor>& bias,
                                      const at::Tensor& halo_rows, int64_t tile,
                                      const char* op) {
  TORCH_CHECK(tile == 2 || tile == 4 || tile == 8, op, ": tile must be 2, 4 or 8, got ", tile);
  return check_halo_args(feats, taps, bias, halo_rows, tile, op);
}

int64_t check_sparse_dwconv_skip_args(const at::Tensor& feats, const at::Tensor& taps,
                                      const c10::optional<at::Tensor>& bias,
                                      const at::Tensor& halo_rows, int64_t tile) {
  const char* op = "sparse_dwconv_skip_fwd";
  TORCH_CHECK(tile == 1 || tile == 2 || tile == 4, op, ": tile must be 1, 2 or 4, got ", tile);
  check_skip_bytes(feats, op);
  return check_halo_args(feats, taps, bias, halo_rows, tile, op);
}

int64_t check_sparse_dwconv_mma_args(const at::Tensor& feats, const at::Tensor& taps,
                                     const c10::optional<at::Tensor>& bias,
                                     const at::Tensor& halo_rows) {
  const char* op = "sparse_dwconv_mma_fwd";
  const int64_t K =
      check_sparse_dwconv_tile_args(feats, taps, bias, halo_rows, sdw::kMmaTile, op);
  const auto st = feats.scalar_type();
  TORCH_CHECK(st == at::kHalf || st == at::kBFloat16, op,
              ": feats must be float16 or bfloat16 (tensor cores), got ", st);
  TORCH_CHECK(feats.size(1) % 8 == 0, op, ": C must be a multiple of 8 (16-byte channel "
              "vectors), got ", feats.size(1));
  TORCH_CHECK(reinterpret_cast<uintptr_t>(feats.const_data_ptr()) % 16 == 0, op,
              ": feats must be 16-byte aligned");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(halo_rows.const_data_ptr()) % 8 == 0, op,
              ": halo_rows must be 8-byte aligned (pairs of rows are one load)");
  return K;
}

namespace {

// grad_out / feats checks of both weight-gradient ops; returns a shape-only
// [49, C] taps tensor for the feats checks of the forward ops.
at::Tensor check_grad_out(const at::Tensor& grad_out, const at::Tensor& feats, const char* op) {
  TORCH_CHECK(feats.dim() == 2, op, ": feats must be [M, C], got ", feats.sizes());
  TORCH_CHECK(grad_out.sizes() == feats.sizes(), op, ": grad_out must have the shape of feats ",
              feats.sizes(), ", got ", grad_out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == feats.scalar_type(), op,
              ": grad_out dtype must equal the feats dtype");
  TORCH_CHECK(grad_out.is_contiguous(), op, ": grad_out must be contiguous");
  TORCH_CHECK(grad_out.device() == feats.device(), op, ": grad_out must be on the feats device");
  return at::empty({kTaps, feats.size(1)}, feats.options());
}

}  // namespace

void check_sparse_dwconv_bwd_weight_args(const at::Tensor& grad_out, const at::Tensor& feats,
                                         const at::Tensor& nbr_rows) {
  const char* op = "sparse_dwconv_bwd_weight";
  const at::Tensor dummy = check_grad_out(grad_out, feats, op);
  check_sparse_dwconv_args(feats, dummy, c10::nullopt, nbr_rows, op);
}

int64_t check_sparse_dwconv_tile_wgrad_args(const at::Tensor& grad_out, const at::Tensor& feats,
                                            const at::Tensor& halo_rows, int64_t tile) {
  const char* op = "sparse_dwconv_tile_wgrad";
  const at::Tensor dummy = check_grad_out(grad_out, feats, op);
  return check_sparse_dwconv_tile_args(feats, dummy, c10::nullopt, halo_rows, tile, op);
}

int64_t check_sparse_dwconv_skip_wgrad_args(const at::Tensor& grad_out, const at::Tensor& feats,
                                            const at::Tensor& halo_rows, int64_t tile) {
  const char* op = "sparse_dwconv_skip_wgrad";
  const at::Tensor dummy = check_grad_out(grad_out, feats, op);
  TORCH_CHECK(tile == 1 || tile == 2 || tile == 4, op, ": tile must be 1, 2 or 4, got ", tile);
  check_skip_bytes(feats, op);
  return check_halo_args(feats, dummy, c10::nullopt, halo_rows, tile, op);
}

WgradOut wgrad_outputs(const at::Tensor& feats, int64_t chunks, const char* op) {
  const int64_t C = feats.size(1);
  TORCH_CHECK(chunks * (kTaps + 1) * C < (int64_t(1) << 31), op,
              ": too many partials for int32 indexing");
  const auto acc_dtype = feats.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto opt = feats.options().dtype(acc_dtype);
  return {at::empty({chunks, kTaps + 1, C}, opt), at::empty({kTaps, C}, opt),
          at::empty({C}, opt)};
}

namespace {

// Rows per parallel task of the forward (the GPU's row chunk is its own).
constexpr int kCpuFwdRows = 64;

template <typename T>
int cpu_vec(int64_t C, std::initializer_list<const void*> ptrs) {
  return sdw::pick_vec(C, 16, ptrs, sizeof(T));
}

}  // namespace

// (grad_taps, grad_bias): the chunk partials summed in chunk order.
std::tuple<at::Tensor, at::Tensor> reduce_partials_cpu(WgradOut& o, int64_t chunks) {
  const int C = static_cast<int>(o.grad_bias.size(0));
  AT_DISPATCH_FLOATING_TYPES(o.partial.scalar_type(), "sparse_dwconv_wgrad_reduce_cpu", [&] {
    const scalar_t* pp = o.partial.const_data_ptr<scalar_t>();
    scalar_t* gt = o.grad_taps.mutable_data_ptr<scalar_t>();
    scalar_t* gb = o.grad_bias.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, int64_t(kTaps + 1) * C, 1024, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i)
        sdw::reduce_chunks<scalar_t>(pp, static_cast<int>(chunks), C, static_cast<int>(i), gt,
                                     gb);
    });
  });
  return {o.grad_taps, o.grad_bias};
}


at::Tensor sparse_dwconv_fwd_cpu(const at::Tensor& feats, const at::Tensor& taps,
                                 const c10::optional<at::Tensor>& bias,
                                 const at::Tensor& nbr_rows) {
  check_sparse_dwconv_args(feats, taps, bias, nbr_rows, "sparse_dwconv_fwd");
  TORCH_CHECK(feats.device().is_cpu(), "sparse_dwconv_fwd_cpu: feats must be a CPU tensor");
  const bool has_bias = bias.has_value() && bias->defined();
  auto out = at::empty_like(feats);
  const int M = static_cast<int>(feats.size(0)), C = static_cast<int>(feats.size(1));
  if (M == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, feats.scalar_type(),
                                  "sparse_dwconv_fwd_cpu", [&] {
    const scalar_t* x = feats.const_data_ptr<scalar_t>();
    const scalar_t* w = taps.const_data_ptr<scalar_t>();
    const scalar_t* b = has_bias ? bias->const_data_ptr<scalar_t>() : nullptr;
    const int32_t* nb = nbr_rows.const_data_ptr<int32_t>();
    scalar_t* y = out.mutable_data_ptr<scalar_t>();
    const int vec = cpu_vec<scalar_t>(C, {x, w, b, y});
    dispatch_vec<16, 8, 4, 2, 1>(vec, [&](auto vc) {
      constexpr int V = decltype(vc)::value;
      const int64_t chunks = (M + kCpuFwdRows - 1) / kCpuFwdRows;
      at::parallel_for(0, chunks, 1, [&](int64_t kb, int64_t ke) {
        for (int64_t k = kb; k < ke; ++k) {
          const int m0 = static_cast<int>(k) * kCpuFwdRows;
          const int m1 = std::min(M, m0 + kCpuFwdRows);
          for (int c0 = 0; c0 < C; c0 += V)
            sdw::conv_rows<scalar_t, V>(nb, x, w, b, C, c0, m0, m1, 1, y);
        }
      });
    });
  });
  return out;
}

at::Tensor sparse_dwconv_tile_fwd_cpu(const at::Tensor& feats, const at::Tensor& taps,
                                      const c10::optional<at::Tensor>& bias,
                                      const at::Tensor& halo_rows, int64_t tile) {
  const int64_t K = check_sparse_dwconv_tile_args(feats, taps, bias, halo_rows, tile);
  TORCH_CHECK(feats.device().is_cpu(), "sparse_dwconv_tile_fwd_cpu: feats must be a CPU tensor");
  const bool has_bias = bias.has_value() && bias->defined();
  auto out = at::empty_like(feats);
  const int C = static_cast<int>(feats.size(1));
  if (K == 0 || feats.size(0) == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, feats.scalar_type(),
                                  "sparse_dwconv_tile_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* x = feats.const_data_ptr<scalar_t>();
    const scalar_t* w = taps.const_data_ptr<scalar_t>();
    const scalar_t* b = has_bias ? bias->const_data_ptr<scalar_t>() : nullptr;
    const int32_t* halo_all = halo_rows.const_data_ptr<int32_t>();
    scalar_t* y = out.mutable_data_ptr<scalar_t>();
    const int vec = cpu_vec<scalar_t>(C, {x, w, b, y});
    const auto acc_dtype = c10::CppTypeToScalarType<acc_t>::value;
    dispatch_tile(static_cast<int>(tile), [&](auto tc) {
      constexpr int TS = decltype(tc)::value;
      constexpr int HP = sdw::TileGeom<TS>::kHaloPx;
      dispatch_vec<16, 8, 4, 2, 1>(vec, [&](auto vc) {
        constexpr int V = decltype(vc)::value;
        // One task = whole tiles, all channels: the tile's halo is staged once
        // into a [HP, C] opmath buffer (pitch C; 64-byte aligned allocation),
        // then every pixel-row and channel group runs the shared stencil.
        at::parallel_for(0, K, 1, [&](int64_t kb, int64_t ke) {
          auto buf_t = at::empty({HP * int64_t(C)}, feats.options().dtype(acc_dtype));
          acc_t* buf = buf_t.mutable_data_ptr<acc_t>();
          for (int64_t k = kb; k < ke; ++k) {
            const int32_t* halo = halo_all + k * HP;
            for (int p = 0; p < HP; ++p)
              for (int c0 = 0; c0 < C; c0 += V)
                sdw::stage_halo_px<scalar_t, V>(halo, p, x, C, c0, buf + p * C + c0);
            for (int c0 = 0; c0 < C; c0 += V) {
              acc_t init[V];
              sdw::bias_init<scalar_t, V>(b, c0, init);
              for (int py = 0; py < TS; py += sdw::TileGeom<TS>::kRows)
                sdw::conv_tile_rows<scalar_t, V, TS, sdw::TileGeom<TS>::kRows>(
                    buf, C, c0, py, w, C, c0, init, halo, y);
            }
          }
        });
      });
    });
  });
  return out;
}

namespace {

// What ldmatrix.x4 returns to lane l: register q = row l >> 2 of matrix q,
// elements 2 (l & 3), + 1, where lane 8 q + r supplied the address of row r of
// matrix q (PTX ISA, "ldmatrix").  a[l][q][h].
template <typename T>
void emulate_ldmatrix_x4(const T* xs, int cl, int dy, T (&a)[32][4][2]) {
  for (int l = 0; l < 32; ++l)
    for (int q = 0; q < 4; ++q) {
      const int idx = sdw::mma_a_row_index(8 * q + (l >> 2), cl, dy) + 2 * (l & 3);
      a[l][q][0] = xs[idx];
      a[l][q][1] = xs[idx + 1];
    }
}

// d += A B for mma.sync.m16n8k16.row.col with fp32 accumulation, from the
// lanes' fragments in the PTX ISA layout (g = l >> 2, t = l & 3):
//   A: a[l][j][h] = A[g + 8 (j & 1)][2 t + h + 8 (j >> 1)]
//   B: b[l][2 j + h] = B[2 t + h + 8 j][g]
//   D: d[l][i] = D[g + 8 (i >> 1)][2 t + (i & 1)]
// Each output adds its 16 exact products in k order (the hardware's order and
// internal rounding are its own: GPU and twin agree up to fp32 summation order).
template <typename T>
void emulate_mma_16816(const T (&a)[32][4][2], const T (&b)[32][4], float (&d)[32][4]) {
  float A[16][16], B[16][8];
  for (int l = 0; l < 32; ++l) {
    const int g = l >> 2, t = l & 3;
    for (int j = 0; j < 4; ++j)
      for (int h = 0; h < 2; ++h)
        A[g + 8 * (j & 1)][2 * t + h + 8 * (j >> 1)] = static_cast<float>(a[l][j][h]);
    for (int j = 0; j < 2; ++j)
      for (int h = 0; h < 2; ++h) B[2 * t + h + 8 * j][g] = static_cast<float>(b[l][2 * j + h]);
  }
  for (int l = 0; l < 32; ++l)
    for (int i = 0; i < 4; ++i) {
      const int m = (l >> 2) + 8 * (i >> 1), n = 2 * (l & 3) + (i & 1);
      float s = d[l][i];
      for (int k = 0; k < 16; ++k) s += A[m][k] * B[k][n];
      d[l][i] = s;
    }
}

// The CUDA kernel's work, one (tile pair, 32-channel group) per task, with the
// kernel's staging (mma_stage_taps, mma_stage), fragments (mma_a_row_index via
// the emulated ldmatrix, mma_b_frag), bias init and epilogue map (mma_c_pos,
// mma_own_row); warps and lanes become loops.
template <typename T>
void mma_fwd_twin(const at::Tensor& feats, const at::Tensor& taps, const at::Tensor* bias,
                  const at::Tensor& halo_rows, at::Tensor& out, int K, int C) {
  const T* x = feats.const_data_ptr<T>();
  const T* w = taps.const_data_ptr<T>();
  const T* b = bias ? bias->const_data_ptr<T>() : nullptr;
  const int32_t* halo = halo_rows.const_data_ptr<int32_t>();
  T* y = out.mutable_data_ptr<T>();
  const int pairs = (K + 1) / 2, groups = (C + sdw::kMmaCh - 1) / sdw::kMmaCh;
  at::parallel_for(0, int64_t(pairs) * groups, 1, [&](int64_t ib, int64_t ie) {
    // NaN-filled, as uninitialised shared memory may be: every element an MMA
    // reads must be written by the staging (NaN * 0 would show in the output).
    std::vector<T> xs_v(sdw::kMmaXsElems, T(std::numeric_limits<float>::quiet_NaN())),
        ws_v(sdw::kMmaWsElems, T(std::numeric_limits<float>::quiet_NaN()));
    T* xs = xs_v.data();
    T* ws = ws_v.data();
    for (int64_t item = ib; item < ie; ++item) {
      const int k0 = 2 * static_cast<int>(item / groups);
      const int cbase = sdw::kMmaCh * static_cast<int>(item % groups);
      for (int i = 0; i < sdw::kMmaWsTasks; ++i) sdw::mma_stage_taps<T>(i, w, C, cbase, ws);
      for (int i = 0; i < sdw::kMmaStageTasks; ++i)
        sdw::mma_stage<T>(i, halo, K, k0, x, C, cbase, xs);
      for (int cl = 0; cl < sdw::kMmaCh; ++cl) {
        const int c = cbase + cl;
        float d[32][4];
        const float init = (b != nullptr && c < C) ? static_cast<float>(b[c]) : 0.f;
        for (auto& dl : d)
          for (float& v : dl) v = init;
        for (int dy = 0; dy < 7; ++dy) {
          T a[32][4][2], bf[32][4];
          emulate_ldmatrix_x4<T>(xs, cl, dy, a);
          for (int l = 0; l < 32; ++l) sdw::mma_b_frag<T>(ws, cl, dy, l, bf[l]);
          emulate_mma_16816<T>(a, bf, d);
        }
        if (c >= C) continue;
        for (int l = 0; l < 32; ++l)
          for (int i = 0; i < 4; ++i) {
            int tile, py, px;
            sdw::mma_c_pos(l, i, tile, py, px);
            const int32_t m = sdw::mma_own_row(halo, K, k0 + tile, py, px);
            if (m >= 0) y[m * C + c] = static_cast<T>(d[l][i]);
          }
      }
    }
  });
}

}  // namespace

at::Tensor sparse_dwconv_mma_fwd_cpu(const at::Tensor& feats, const at::Tensor& taps,
                                     const c10::optional<at::Tensor>& bias,
                                     const at::Tensor& halo_rows) {
  const int64_t K = check_sparse_dwconv_mma_args(feats, taps, bias, halo_rows);
  TORCH_CHECK(feats.device().is_cpu(), "sparse_dwconv_mma_fwd_cpu: feats must be a CPU tensor");
  const bool has_bias = bias.has_value() && bias->defined();
  auto out = at::empty_like(feats);
  const int C = static_cast<int>(feats.size(1));
  if (K == 0 || feats.size(0) == 0) return out;
  CNX_DISPATCH_HALF_BF16(feats.scalar_type(), "sparse_dwconv_mma_fwd_cpu", [&] {
    mma_fwd_twin<scalar_t>(feats, taps, has_bias ? &*bias : nullptr, halo_rows, out,
                           static_cast<int>(K), C);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> sparse_dwconv_bwd_weight_cpu(
    const at::Tensor& grad_out, const at::Tensor& feats, const at::Tensor& nbr_rows) {
  check_sparse_dwconv_bwd_weight_args(grad_out, feats, nbr_rows);
  TORCH_CHECK(feats.device().is_cpu(),
              "sparse_dwconv_bwd_weight_cpu: grad_out and feats must be CPU tensors");
  const int M = static_cast<int>(feats.size(0)), C = static_cast<int>(feats.size(1));
  const int chunks = std::max(1, (M + kWgradRowsPerChunk - 1) / kWgradRowsPerChunk);
  const int per = (kTaps + 1) * C;
  WgradOut o = wgrad_outputs(feats, chunks, "sparse_dwconv_bwd_weight_cpu");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, feats.scalar_type(),
                                  "sparse_dwconv_bwd_weight_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* dy = grad_out.const_data_ptr<scalar_t>();
    const scalar_t* x = feats.const_data_ptr<scalar_t>();
    const int32_t* nb = nbr_rows.const_data_ptr<int32_t>();
    acc_t* pp = o.partial.mutable_data_ptr<acc_t>();
    const int vec = cpu_vec<scalar_t>(C, {dy, x});
    dispatch_vec<16, 8, 4, 2, 1>(vec, [&](auto vc) {
      constexpr int V = decltype(vc)::value;
      at::parallel_for(0, chunks, 1, [&](int64_t kb, int64_t ke) {
        for (int64_t k = kb; k < ke; ++k) {
          const int m0 = static_cast<int>(k) * kWgradRowsPerChunk;
          const int m1 = std::min(M, m0 + kWgradRowsPerChunk);
          for (int c0 = 0; c0 < C; c0 += V)
            sdw::wgrad_chunk<scalar_t, V>(nb, dy, x, C, c0, m0, m1, pp + k * per);
        }
      });
    });
  });
  return reduce_partials_cpu(o, chunks);
}

std::tuple<at::Tensor, at::Tensor> sparse_dwconv_tile_wgrad_cpu(const at::Tensor& grad_out,
                                                                const at::Tensor& feats,
                                                                const at::Tensor& halo_rows,
                                                                int64_t tile) {
  const int64_t K = check_sparse_dwconv_tile_wgrad_args(grad_out, feats, halo_rows, tile);
  TORCH_CHECK(feats.device().is_cpu(),
              "sparse_dwconv_tile_wgrad_cpu: grad_out and feats must be CPU tensors");
  const int C = static_cast<int>(feats.size(1));
  const int per = (kTaps + 1) * C;
  const int64_t chunks = wgrad_tile_chunks(K, tile);
  WgradOut o = wgrad_outputs(feats, chunks, "sparse_dwconv_tile_wgrad_cpu");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, feats.scalar_type(),
                                  "sparse_dwconv_tile_wgrad_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* dy = grad_out.const_data_ptr<scalar_t>();
    const scalar_t* x = feats.const_data_ptr<scalar_t>();
    const int32_t* halo_all = halo_rows.const_data_ptr<int32_t>();
    acc_t* pp = o.partial.mutable_data_ptr<acc_t>();
    const int vec = cpu_vec<scalar_t>(C, {dy, x});
    const auto acc_dtype = c10::CppTypeToScalarType<acc_t>::value;
    dispatch_tile(static_cast<int>(tile), [&](auto tc) {
      constexpr int TS = decltype(tc)::value;
      using G = sdw::TileGeom<TS>;
      constexpr int HP = G::kHaloPx, R = G::kRows, NB = TS / R, W = G::kWgradWarps;
      dispatch_vec<16, 8, 4, 2, 1>(vec, [&](auto vc) {
        constexpr int V = decltype(vc)::value;
        using Acc = acc_t[kTaps + 1][V];
        // One task = whole chunks, all channels, in the GPU's order: the
        // chunk's tiles go kWgradSlots at a time to slots s = 0, 1, ...; slot
        // s, pixel-row block b accumulates in partials w = s * NB + b (per
        // channel group: [W][C / V][50][V]), summed over w in order at the end.
        at::parallel_for(0, chunks, 1, [&](int64_t kb, int64_t ke) {
          auto buf_t = at::empty({HP * int64_t(C)}, feats.options().dtype(acc_dtype));
          auto acc_t_ = at::empty({int64_t(W) * per}, feats.options().dtype(acc_dtype));
          acc_t* buf = buf_t.mutable_data_ptr<acc_t>();
          acc_t* accs = acc_t_.mutable_data_ptr<acc_t>();
          for (int64_t k = kb; k < ke; ++k) {
            std::fill(accs, accs + int64_t(W) * per, acc_t(0));
            const int64_t j1 = std::min<int64_t>(K, (k + 1) * G::kWgradTiles);
            for (int64_t j = k * G::kWgradTiles; j < j1; ++j) {
              const int s = static_cast<int>((j - k * G::kWgradTiles) % G::kWgradSlots);
              const int32_t* halo = halo_all + j * HP;
              for (int p = 0; p < HP; ++p)
                for (int c0 = 0; c0 < C; c0 += V)
                  sdw::stage_halo_px<scalar_t, V>(halo, p, x, C, c0, buf + p * C + c0);
              for (int b = 0; b < NB; ++b) {
                for (int c0 = 0; c0 < C; c0 += V) {
                  acc_t g[R][TS][V];
                  sdw::load_tile_dy<scalar_t, V, TS, R>(halo, b * R, dy, C, c0, g);
                  Acc& a = *reinterpret_cast<Acc*>(accs + (s * NB + b) * per
                                                  + c0 * (kTaps + 1));
                  sdw::wgrad_tile_rows<scalar_t, V, TS, R>(buf, C, c0, b * R, g, a);
                }
              }
            }
            for (int c0 = 0; c0 < C; c0 += V)
              for (int t = 0; t <= kTaps; ++t)
                for (int v = 0; v < V; ++v)
                  pp[k * per + t * C + c0 + v] =
                      sdw::sum_slots<acc_t>(accs + c0 * (kTaps + 1) + t * V + v, per, W);
          }
        });
      });
    });
  });
  return reduce_partials_cpu(o, chunks);
}

}  // namespace convnextv2_fast
