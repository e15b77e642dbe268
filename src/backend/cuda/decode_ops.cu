// Device-position ops of the graph-captured decode step (see decode_ops.h): grid-stride loops,
// one thread per element; they move a few KB per call.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>

#include "backend/cuda/decode_ops.h"
#include "util/error.h"

namespace bigmoe::cuda {

namespace {

constexpr int kThreads = 256;

unsigned blocks_for(size_t n) { return unsigned(std::min<size_t>((n + kThreads - 1) / kThreads, 4096)); }

__global__ void append_rows_kernel(float* dst, int dst_stride, const int* pos, const float* src, int src_stride, int T,
                                   int n) {
  const int p = *pos;
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < size_t(T) * n; i += size_t(gridDim.x) * blockDim.x) {
    const int t = int(i / n), j = int(i % n);
    dst[size_t(p + t) * dst_stride + j] = src[size_t(t) * src_stride + j];
  }
}

__global__ void mask_scores_kernel(float* scores, int T, int ncap, const int* pos) {
  const int p = *pos;
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < size_t(T) * ncap;
       i += size_t(gridDim.x) * blockDim.x) {
    const int t = int(i / ncap), s = int(i % ncap);
    if (s > p + t) scores[i] = -INFINITY;
  }
}

__global__ void mask_sel_kernel(int* sel, int T, int k, const int* pos) {
  const int p = *pos;
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < size_t(T) * k; i += size_t(gridDim.x) * blockDim.x) {
    const int t = int(i / k);
    if (sel[i] > p + t) sel[i] = -1;
  }
}

__global__ void causal_sel_kernel(int* sel, int T, int ncap, const int* pos) {
  const int p = *pos;
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < size_t(T) * ncap;
       i += size_t(gridDim.x) * blockDim.x) {
    const int t = int(i / ncap), s = int(i % ncap);
    sel[i] = s <= p + t ? s : -1;
  }
}

}  // namespace

void append_rows(float* dst, int dst_stride, const int* pos, const float* src, int src_stride, int T, int n,
                 CUstream_st* stream) {
  BIGMOE_CHECK(T >= 0 && n >= 0 && dst_stride >= n && src_stride >= n, "append_rows: bad shape T {} n {}", T, n);
  if (T == 0 || n == 0) return;
  append_rows_kernel<<<blocks_for(size_t(T) * n), kThreads, 0, stream>>>(dst, dst_stride, pos, src, src_stride, T, n);
  check(cudaGetLastError(), "append_rows launch");
}

void mask_future_scores(float* scores, int T, int ncap, const int* pos, CUstream_st* stream) {
  BIGMOE_CHECK(T >= 0 && ncap >= 0, "mask_future_scores: bad shape");
  if (T == 0 || ncap == 0) return;
  mask_scores_kernel<<<blocks_for(size_t(T) * ncap), kThreads, 0, stream>>>(scores, T, ncap, pos);
  check(cudaGetLastError(), "mask_future_scores launch");
}

void mask_future_selection(int* sel, int T, int k, const int* pos, CUstream_st* stream) {
  BIGMOE_CHECK(T >= 0 && k >= 0, "mask_future_selection: bad shape");
  if (T == 0 || k == 0) return;
  mask_sel_kernel<<<blocks_for(size_t(T) * k), kThreads, 0, stream>>>(sel, T, k, pos);
  check(cudaGetLastError(), "mask_future_selection launch");
}

void causal_selection(int* sel, int T, int ncap, const int* pos, CUstream_st* stream) {
  BIGMOE_CHECK(T >= 0 && ncap >= 0, "causal_selection: bad shape");
  if (T == 0 || ncap == 0) return;
  causal_sel_kernel<<<blocks_for(size_t(T) * ncap), kThreads, 0, stream>>>(sel, T, ncap, pos);
  check(cudaGetLastError(), "causal_selection launch");
}

}  // namespace bigmoe::cuda
