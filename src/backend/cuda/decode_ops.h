// Device-position ops of the graph-captured decode step (backend/cuda/glm_dsa_cuda.cpp): a
// captured CUDA graph bakes every kernel argument, so what changes from step to step — the
// positions of the sequences — is read from device memory (`pos`, a device int per sequence,
// updated by a copy node at the start of the graph) and the key range is a fixed capacity
// `ncap` (a power of two, re-captured when a sequence outgrows it). Tested against host-side
// equivalents in tests/test_cuda_model_ops.cpp.
#pragma once
#include "backend/cuda/cuda_ops.h"

namespace bigmoe::cuda {

// dst row (*pos + t) = src row t for t < T (n floats per row; dst rows dst_stride apart, src
// rows src_stride apart).
void append_rows(float* dst, int dst_stride, const int* pos, const float* src, int src_stride, int T, int n,
                 CUstream_st* stream = nullptr);

// scores [T, ncap]: entries s > *pos + t set to -inf (positions not yet written).
void mask_future_scores(float* scores, int T, int ncap, const int* pos, CUstream_st* stream = nullptr);

// sel [T, k]: entries > *pos + t set to -1 (padding past the causal range).
void mask_future_selection(int* sel, int T, int k, const int* pos, CUstream_st* stream = nullptr);

// sel [T, ncap]: sel[t, s] = s for s <= *pos + t, else -1 (dense causal attention as a selection).
void causal_selection(int* sel, int T, int ncap, const int* pos, CUstream_st* stream = nullptr);

}  // namespace bigmoe::cuda
