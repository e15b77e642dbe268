// CUDA backend ops. Each op has a CPU reference in backend/cpu/ref_ops.h and a test that
// compares the two on fresh random inputs (tests/test_cuda_ops.cpp, ctest label gpu).
#pragma once
#include <cstddef>
#include <string>

struct CUstream_st;  // cudaStream_t is CUstream_st*

namespace bigmoe::cuda {

// Throws bigmoe::Error naming the CUDA call and the error when a CUDA API call fails.
void check(int err, const char* what);

int device_count();
std::string device_name(int device);

// y[r, :] = w ⊙ x[r, :] / sqrt(mean(x[r, :]²) + eps) for r < rows (device pointers, float32).
void rms_norm(const float* x, const float* w, int rows, int n, float eps, float* y, CUstream_st* stream = nullptr);
// The same over strided rows: row r of x at x + r * x_stride, of y at y + r * y_stride (floats);
// y may alias x.
void rms_norm_strided(const float* x, int x_stride, const float* w, int rows, int n, float eps, float* y,
                      int y_stride, CUstream_st* stream = nullptr);

// Weight formats of matvec. BF16 / FP8_E4M3: row-major [out, in]; FP8 comes with float32 block
// scales weight_scale_inv [ceil(out/128), ceil(in/128)] (W = fp8 * scale per 128x128 block).
// Q8_0 / Q4_K / Q6_K: ggml rows (as backend quant.h decodes them), row o at o * ggml_row_size.
// F32: row-major float32 [out, in] (small or unquantized tensors, e.g. GGUF F32 or owned rows).
// FP8 block scales are 128x128 unless matvec_fp8 names other block sizes.
enum class WeightFormat { BF16, FP8_E4M3, Q8_0, Q4_K, Q6_K, F32 };
const char* weight_format_name(WeightFormat f);
// Bytes of an [out, in] weight matrix in format f (without FP8 scales).
size_t matvec_weight_bytes(WeightFormat f, int out, int in);

// Decode matrix product y[b, o] = sum_i W[o, i] * x[b, i] for b < B (1 <= B <= 16), float32
// accumulation. Device pointers: w (16-byte aligned), scale (FP8 only, else may be null),
// x float32 [B, in], y float32 [B, out]. Quant formats need in % 32 (Q8_0) / % 256 (K-quants)
// == 0 and 16-byte aligned w and x. Asynchronous on `stream`; throws on bad arguments or a
// failed launch.
void matvec(WeightFormat fmt, const void* w, const float* scale, int out, int in, const float* x, int B, float* y,
            CUstream_st* stream = nullptr);
// FP8 e4m3 with scale blocks of bo x bi (weight_block_size [bo, bi]; 128x128 takes matvec's
// fast path): scale [ceil(out/bo), ceil(in/bi)].
void matvec_fp8(const void* w, const float* scale, int bo, int bi, int out, int in, const float* x, int B, float* y,
                CUstream_st* stream = nullptr);

// Fused matvec over n <= 4 matrices stacked by rows that read the same x (e.g. q_a, kv_a and the
// indexer's key projection): W is [Σ outs, in] in one format (FP8: scale blocks bo x bi, every
// part but the last a whole number of bo rows), and rows [Σ_{j<p} outs[j], Σ_{j<=p} outs[j])
// go to ys[p] as [B, outs[p]]. One launch instead of n; same math as n matvecs.
void matvec_multi(WeightFormat fmt, const void* w, const float* scale, int bo, int bi, const int* outs, float* const* ys,
                  int n, int in, const float* x, int B, CUstream_st* stream = nullptr);

// Grouped (MoE) matvec: for each slot s < S, y[s, :] = W_{ids[s]} · x[s / x_div, :], where expert
// e's weight is at w + e * w_stride bytes (FP8: its scales at scale + e * scale_stride floats,
// blocks bo x bi). ids: device int [S], read on the device (no host sync, graph-capturable);
// ids[s] < 0 gives y[s, :] = 0. x float32 [ceil(S / x_div), in], y float32 [S, out]. Same
// format/alignment rules as matvec (w_stride a multiple of 16). Typical use: S = T * top_k
// slots, x_div = top_k so slot s reads token s / top_k. silu_gate (float32 [S, out], or null):
// y[s, o] = silu(silu_gate[s, o]) · (W_{ids[s]} · x)[o], the SwiGLU product of an up projection
// with the gate projection's output, as silu_mul computes it (no separate pass); zeros stay zeros.
struct ExpertWeights {
  WeightFormat fmt;
  const void* w;
  size_t w_stride;         // bytes between experts
  const float* scale = nullptr;
  size_t scale_stride = 0;  // floats between experts' scale arrays (FP8)
  int bo = 128, bi = 128;   // FP8 block sizes
};
void matvec_grouped(const ExpertWeights& ew, int out, int in, const int* ids, int S, const float* x, int x_div,
                    float* y, CUstream_st* stream = nullptr, const float* silu_gate = nullptr);

// Fused SwiGLU of grouped experts: y[s, o] = silu((G_{ids[s]} x)[o]) · (U_{ids[s]} x)[o] with the
// gate and up experts in two pools of the same format and layout (one launch for the quant
// formats: each warp reads a gate row and its up row; BF16 / FP8 / F32 run the gate into
// `scratch` [S, out] and the up projection with matvec_grouped's silu_gate). Same rules as
// matvec_grouped.
void matvec_grouped_glu(const ExpertWeights& gate, const ExpertWeights& up, int out, int in, const int* ids, int S,
                        const float* x, int x_div, float* y, float* scratch, CUstream_st* stream = nullptr);

// Where a sequence's cache rows live (docs/DESIGN.md, "KV cache"). Paged: position r at pool row
// table[r / page_rows] * page_rows + r % page_rows, i.e. at pool + that * width floats for rows
// of `width` floats (pool rows < 2^31). table == nullptr: contiguous, position r at pool row r.
// The kernels read the table from device memory at run time, so a captured CUDA graph keeps
// following it when the host adds pages; every position a kernel reads or writes needs an entry.
struct PageTable {
  const int* table = nullptr;  // device int [ceil(max_context / page_rows)]: a page per page_rows positions
  int page_rows = 0;           // positions per page (>= 1 when paged)
};

// Absorbed-form MLA decode attention (spec §3 steps 5–7, §4) for T >= 1 query tokens of
// one sequence at positions pos0 + t, over the latent cache. Device pointers, float32:
// q_lat [T, H, kv_lora] (q̃ = W_UKᵀ q_nope), q_pe [T, H, rope] (roped), latent [N, kv_lora],
// k_pe [N, rope] (16-byte aligned; with `pages`, pools of rows [pool rows, kv_lora] / [pool
// rows, rope] addressed through the page table), out [T, H, kv_lora]:
//   out[t, h] = Σ_s softmax_s(scale · (q_lat[t,h]·latent[s] + q_pe[t,h]·k_pe[s])) latent[s]
// over s = 0..pos0+t (sel == nullptr: dense causal) or over the entries >= 0 of sel[t, 0..topk)
// (device int [T, topk], e.g. from topk_per_row; -1 = padding). A row with no key gives zeros.
// Any kv_lora <= 512 with kv_lora % 32 == 0 and rope <= 64 with rope % 8 == 0
// (512 / 64, GLM-5.2's, is the tuned case); any T >= 1 (prefill runs it in chunks). Asynchronous on `stream`; throws on bad arguments.
void mla_decode_attention(const float* q_lat, const float* q_pe, const float* latent, const float* k_pe, int T, int H,
                          int kv_lora, int rope, int pos0, const int* sel, int topk, float scale, float* out,
                          CUstream_st* stream = nullptr, const PageTable& pages = {});

// DSA indexer scores (spec §3 step 6) for T queries at positions pos0 + t (pos0 + T <= N):
//   scores[t, s] = Σ_h w_scale · w[t, h] · ReLU(qi[t, h, :]·ki[s, :] / sqrt(Di)) for s <= pos0+t,
//   scores[t, s] = -inf for pos0+t < s < N.
// Device pointers, float32: qi [T, Hi, Di] (roped), ki [N, Di] (cached keys; with `pages`, a pool
// [pool rows, Di] addressed through the page table), w [T, Hi] (raw weights_proj output; pass
// w_scale = Hi^-0.5), scores [T, N]. Needs Di <= 256 and Hi * (Di + 1) floats of shared memory
// within 48 KB.
void dsa_indexer_scores(const float* qi, const float* ki, const float* w, int T, int Hi, int Di, int N, int pos0,
                        float w_scale, float* scores, CUstream_st* stream = nullptr, const PageTable& pages = {});

// Per-row top-k selection of indexer scores [T, N] (rows at positions pos0 + t): out [T, topk]
// (device int) gets the positions of the topk largest scores among s <= pos0+t, in descending
// score order; when pos0+t+1 <= topk, all causal positions 0..pos0+t in order, then -1 padding.
// CUB segmented radix sort; `workspace` (device, topk_per_row_workspace_bytes(T, N) bytes) is
// scratch. Asynchronous on `stream`.
size_t topk_per_row_workspace_bytes(int T, int N);
void topk_per_row(const float* scores, int T, int N, int pos0, int topk, void* workspace, size_t workspace_bytes,
                  int* out, CUstream_st* stream = nullptr);

}  // namespace bigmoe::cuda
