// Device-position ops of the graph-captured decode step (backend/cuda/glm_dsa_cuda.cpp): a
// captured CUDA graph bakes every kernel argument, so what changes from step to step — the
// positions of the sequences — is read from device memory (`pos`, a device int per sequence,
// updated by a copy node at the start of the graph) and the key range is a fixed capacity
// `ncap` (a power of two, re-captured when a sequence outgrows it). The cache writers take the
// sequence's PageTable (cuda_ops.h; a null table: contiguous rows), which the graph also reads
// from device memory, so pages added between steps need no re-capture. Tested against host-side
// equivalents in tests/test_cuda_decode_ops.cpp.
#pragma once
#include "backend/cuda/cuda_ops.h"

namespace bigmoe::cuda {

// dst row p + t = src row t for t < T, p = *pos (device) or pos0 when pos is null (n floats per
// row; dst rows dst_stride apart, through `pages` when paged; src rows src_stride apart).
void append_rows(float* dst, int dst_stride, int pos0, const int* pos, const float* src, int src_stride, int T, int n,
                 CUstream_st* stream = nullptr, const PageTable& pages = {});

// Fused cache writers of the attention's key side, for rows t < T at position p + t (p = *pos,
// or pos0 when pos is null). kv_to_cache: kv rows (stride apart) hold [latent kvr | k_pe dim]; the
// latent cache row gets RMSNorm(latent) ⊙ norm_w (as rms_norm), the k_pe cache row the roped k_pe
// (as rope, one position per row). index_key_to_cache: the indexer key rows [T, n] get LayerNorm
// (w, b; as layer_norm), then rope over their first dim values, into cache rows of n. Rope turns
// by the position; the row written is its pool row under `pages` (the same for latent and k_pe).
void kv_to_cache(const float* kv, int stride, int T, int kvr, const float* norm_w, float eps, int dim,
                 const float* inv_freq, float factor, bool interleave, float* latent, float* k_pe, int pos0,
                 const int* pos, CUstream_st* stream = nullptr, const PageTable& pages = {});
void index_key_to_cache(const float* k, int T, int n, const float* w, const float* b, float eps, int dim,
                        const float* inv_freq, float factor, bool interleave, float* cache, int pos0, const int* pos,
                        CUstream_st* stream = nullptr, const PageTable& pages = {});

// sel [T, ncap]: sel[t, s] = s for s <= *pos + t, else -1 (dense causal attention as a selection).
void causal_selection(int* sel, int T, int ncap, const int* pos, CUstream_st* stream = nullptr);

// Top-k selection by radix select, one block per row (rows t < T at positions pos0 + t, scores
// [T, N] with row stride N): out[t, :k] gets the positions of the k largest scores among
// s <= pos0 + t, in ascending position order; ties at the k-th score go to the lower positions
// (cpu::topk's choice). When pos0 + t + 1 <= k, all causal positions 0..pos0+t, then -1. The
// same set as topk_per_row without its segmented sort (4 histogram passes over the row in one
// kernel); scores past a row's position are never read. pos (device int, optional) replaces
// pos0 at run time.
void topk_select(const float* scores, int T, int N, int pos0, int k, int* out, CUstream_st* stream = nullptr,
                 const int* pos = nullptr);

}  // namespace bigmoe::cuda
