// Device-position ops of the graph-captured decode step (see decode_ops.h): grid-stride loops,
// one thread per element; they move a few KB per call.
#include <cub/block/block_scan.cuh>
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

void causal_selection(int* sel, int T, int ncap, const int* pos, CUstream_st* stream) {
  BIGMOE_CHECK(T >= 0 && ncap >= 0, "causal_selection: bad shape");
  if (T == 0 || ncap == 0) return;
  causal_sel_kernel<<<blocks_for(size_t(T) * ncap), kThreads, 0, stream>>>(sel, T, ncap, pos);
  check(cudaGetLastError(), "causal_selection launch");
}

// ---- top-k by radix select ----

namespace {

constexpr int kSelThreads = 512;

// Order-preserving map of a float to uint32: larger float, larger key (-inf lowest but NaN).
__device__ __forceinline__ uint32_t order_key(float f) {
  uint32_t u = __float_as_uint(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__global__ void __launch_bounds__(kSelThreads) topk_select_kernel(const float* __restrict__ scores, int N, int pos0,
                                                                  int k, int* __restrict__ out, const int* pos) {
  using Scan = cub::BlockScan<int, kSelThreads>;
  __shared__ typename Scan::TempStorage scan_tmp;
  __shared__ int hist[256];
  __shared__ uint32_t s_prefix;
  __shared__ int s_remaining;
  const int t = blockIdx.x;
  const int p = (pos ? *pos : pos0) + t;  // last causal position of this row
  const int n = min(p + 1, N);
  const float* row = scores + size_t(t) * N;
  int* o = out + size_t(t) * k;
  if (n <= k) {  // every causal position, then padding
    for (int i = threadIdx.x; i < k; i += kSelThreads) o[i] = i < n ? i : -1;
    return;
  }
  // Radix select: the k-th largest key, 8 bits at a time from the top.
  uint32_t prefix = 0, mask = 0;
  int remaining = k;  // how many still to take from the elements matching prefix
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int i = threadIdx.x; i < 256; i += kSelThreads) hist[i] = 0;
    __syncthreads();
    for (int i = threadIdx.x; i < n; i += kSelThreads) {
      const uint32_t key = order_key(row[i]);
      if ((key & mask) == prefix) atomicAdd(&hist[(key >> shift) & 255u], 1);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      int r = remaining, b = 255;
      for (; b > 0; --b) {
        if (hist[b] >= r) break;
        r -= hist[b];
      }
      s_prefix = prefix | (uint32_t(b) << shift);
      s_remaining = r;
    }
    __syncthreads();
    prefix = s_prefix;
    remaining = s_remaining;
    mask |= 255u << shift;
    __syncthreads();
  }
  // prefix is the k-th largest key; take every key above it and the first `remaining` equal to
  // it in position order. Each thread owns a contiguous run of positions so a block scan gives
  // each its write offsets in position order.
  const int per = (n + kSelThreads - 1) / kSelThreads, i0 = threadIdx.x * per, i1 = min(n, i0 + per);
  int above = 0, equal = 0;
  for (int i = i0; i < i1; ++i) {
    const uint32_t key = order_key(row[i]);
    above += key > prefix;
    equal += key == prefix;
  }
  int eq_before = 0;
  Scan(scan_tmp).ExclusiveSum(equal, eq_before);
  __syncthreads();
  // Keep only the equal ones that are among the first `remaining`.
  int eq_take = max(0, min(equal, remaining - eq_before));
  int count = above + eq_take, off = 0;
  Scan(scan_tmp).ExclusiveSum(count, off);
  int e = 0;
  for (int i = i0; i < i1; ++i) {
    const uint32_t key = order_key(row[i]);
    if (key > prefix) o[off++] = i;
    else if (key == prefix && e < eq_take) {
      o[off++] = i;
      ++e;
    }
  }
}

}  // namespace

void topk_select(const float* scores, int T, int N, int pos0, int k, int* out, CUstream_st* stream, const int* pos) {
  BIGMOE_CHECK(T >= 0 && N >= 1 && k >= 1 && pos0 >= 0, "topk_select: bad arguments T {} N {} k {} pos0 {}", T, N, k,
               pos0);
  BIGMOE_CHECK(pos || pos0 + T <= N, "topk_select: rows reach position {} past N {}", pos0 + T - 1, N);
  if (T == 0) return;
  BIGMOE_CHECK(T <= 65535 * 32, "topk_select: T {} too large", T);
  for (int t0 = 0; t0 < T; t0 += 65535) {
    const int n = std::min(65535, T - t0);
    // Rows t0.. are at positions pos0 + t0 + ...: shift pos0 (pos: the kernel adds blockIdx.x
    // to *pos, so chunks past the first are only valid without pos).
    BIGMOE_CHECK(t0 == 0 || !pos, "topk_select: more than 65535 rows need pos0 on the host");
    topk_select_kernel<<<n, kSelThreads, 0, stream>>>(scores + size_t(t0) * N, N, pos0 + t0, k, out + size_t(t0) * k,
                                                      pos);
  }
  check(cudaGetLastError(), "topk_select launch");
}

}  // namespace bigmoe::cuda
