// Small device ops the GLM-DSA forward needs between the matrix products: rope, layer norm,
// SwiGLU, MoE routing and combination, per-head products of the absorbed MLA, and the prefill
// GEMM. Each has a CPU reference it is tested against (tests/test_cuda_model_ops.cpp,
// tests/test_cuda_gemm.cpp, ctest label gpu). All pointers are device pointers, float32 unless
// named otherwise; every op is asynchronous on `stream` and throws bigmoe::Error on bad
// arguments or a failed launch.
#pragma once
#include <cstddef>

#include "backend/cuda/cuda_ops.h"

namespace bigmoe::cuda {

// Rotary embedding in place, as cpu::Rope::apply: for rows r < rows, the `dim` values at
// x + r * stride + offset are rotated for position pos0 + r / rows_per_pos (e.g. rows = T * H,
// rows_per_pos = H for per-head query vectors). Angle = inv_freq[j] * float(pos) in float32,
// cos/sin times `factor` (yarn's attention factor). interleave: pairs (2j, 2j+1), else
// (j, j + dim/2). inv_freq: device float [dim/2]. pos_dev (a device int), when given, replaces
// pos0 at run time (graph-captured decode steps: see decode_ops.h).
void rope(float* x, int rows, int stride, int offset, int dim, int rows_per_pos, int pos0, const float* inv_freq,
          float factor, bool interleave, CUstream_st* stream = nullptr, const int* pos_dev = nullptr);

// rope out of place: the rotated `dim` values of row r (read at x + r * stride + offset) are
// written to out + r * out_stride; x is not modified. (The absorbed MLA's q_pe, gathered.)
void rope_to(const float* x, int rows, int stride, int offset, int dim, int rows_per_pos, int pos0,
             const float* inv_freq, float factor, bool interleave, float* out, int out_stride,
             CUstream_st* stream = nullptr, const int* pos_dev = nullptr);

// y[r, :] = (x[r, :] - mean) / sqrt(var + eps) ⊙ w + b (biased variance, torch LayerNorm),
// rows of n contiguous floats; y may alias x.
void layer_norm(const float* x, const float* w, const float* b, int rows, int n, float eps, float* y,
                CUstream_st* stream = nullptr);

// out[i] = silu(g[i]) * u[i] for i < n (out may alias g or u).
void silu_mul(const float* g, const float* u, size_t n, float* out, CUstream_st* stream = nullptr);

// x[i] += y[i] for i < n.
void add_inplace(float* x, const float* y, size_t n, CUstream_st* stream = nullptr);

// MoE routing (spec §3.9), as GlmDsaModel::ffn on the CPU, one token per row of logits [T, E]:
// s = sigmoid(logit); choice = s + bias (bias: device float [E]); with n_group > 1, groups of
// E / n_group experts are ranked by the sum of their two largest choices and all but the
// topk_group best are masked; the K largest choices are taken (ties: lower index first); weight
// = s / (Σ s of the K + 1e-20 when norm_topk) * scaling. ids: device int [T, K] (descending
// choice order), weights [T, K]. Needs E <= 1024, K <= 32.
void moe_route(const float* logits, const float* bias, int T, int E, int n_group, int topk_group, int K,
               bool norm_topk, float scaling, int* ids, float* weights, CUstream_st* stream = nullptr);

// x[t, :] += Σ_k w[t, k] · y[t * K + k, :] (+ shared[t, :] when shared != nullptr), d floats
// per row: the MoE output (routed experts from matvec_grouped, shared expert) added to the
// residual stream.
void moe_combine(const float* y, const float* w, int T, int K, int d, const float* shared, float* x,
                 CUstream_st* stream = nullptr);

// Row gather / scatter for grouped prefill: out[i, :] = x[rows[i], :] and y[rows[i], :] = src[i, :]
// for i < n (rows: device int [n]; d floats per row).
void gather_rows(const float* x, const int* rows, int n, int d, float* out, CUstream_st* stream = nullptr);
void scatter_rows(const float* src, const int* rows, int n, int d, float* y, CUstream_st* stream = nullptr);

// Per-head products of the absorbed MLA: y[t, h, :rows] = W_h · x[t, h, :cols] for t < T,
// h < H, with W [H, rows, cols] row-major in BF16 or F32 (fmt), x row (t, h) at
// x + t * x_stride_t + h * x_stride_h, y contiguous [T, H, rows]. Used for q̃ = W_UKᵀ q_nope
// (W [H, kv_lora, nope]) and o = W_UV ō (W [H, v, kv_lora]).
void head_matvec(WeightFormat fmt, const void* w, int H, int rows, int cols, const float* x, int x_stride_t,
                 int x_stride_h, int T, float* y, CUstream_st* stream = nullptr);

// Dequantizes a whole [out, in] weight (any WeightFormat; FP8 with bo x bi scale blocks) to
// BF16 row-major [out, in] in dst (device, out * in * 2 bytes), exactly as the CPU reference
// decodes it (then rounded to BF16, round-to-nearest-even).
void dequant_bf16(WeightFormat fmt, const void* w, const float* scale, int bo, int bi, int out, int in, void* dst,
                  CUstream_st* stream = nullptr);

// Prefill product on tensor cores: y[t, o] = Σ_i W[o, i] · x[t, i] for t < T (any T >= 1), with
// W given as BF16 row-major [out, in] (e.g. from dequant_bf16) and x float32 [T, in] rounded to
// BF16; float32 accumulation and output y [T, out]. Needs in % 8 == 0.
void gemm_bf16(const void* w_bf16, int out, int in, const float* x, int T, float* y, CUstream_st* stream = nullptr);

}  // namespace bigmoe::cuda
