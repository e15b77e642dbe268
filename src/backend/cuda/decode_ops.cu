// Device-position ops of the graph-captured decode step (see decode_ops.h): grid-stride loops,
// one thread per element; they move a few KB per call.
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>

#include "backend/cuda/decode_ops.h"
#include "backend/cuda/block_norm.h"
#include "backend/cuda/page_math.h"
#include "backend/cuda/pdl.h"
#include "backend/cuda/rope_math.h"
#include "util/error.h"

namespace bigmoe::cuda {

namespace {

constexpr int kThreads = 256;

unsigned blocks_for(size_t n) { return unsigned(std::min<size_t>((n + kThreads - 1) / kThreads, 4096)); }

__global__ void append_rows_kernel(float* dst, int dst_stride, int pos0, const int* pos, const float* src,
                                   int src_stride, int T, int n, const PageTable pages) {
  const int p = pos ? *pos : pos0;
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < size_t(T) * n; i += size_t(gridDim.x) * blockDim.x) {
    const int t = int(i / n), j = int(i % n);
    dst[size_t(pool_row(pages, p + t)) * dst_stride + j] = src[size_t(t) * src_stride + j];
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

// One block per row t (position p = *pos + t, or pos0 + t): the latent RMSNorm and the k_pe rope
// of kv_a's output row, written straight into the two caches (rms_norm_strided + rope + two
// append_rows in one launch, the same arithmetic).
__global__ void kv_to_cache_kernel(const float* __restrict__ kv, int stride, int kvr, const float* __restrict__ w,
                                   float eps, int dim, const float* __restrict__ inv_freq, float factor,
                                   bool interleave, float* __restrict__ latent, float* __restrict__ k_pe, int pos0,
                                   const int* pos, const PageTable pages) {
  pdl_wait();  // launched with PDL: nothing is read or written before the kernel ahead finishes
  pdl_trigger();  // then the next kernel may start (after the wait: one kernel ahead at most)
  using Reduce = cub::BlockReduce<float, kThreads>;
  __shared__ typename Reduce::TempStorage tmp;
  __shared__ float inv_s;
  const int t = blockIdx.x, p = (pos ? *pos : pos0) + t;
  const float* xr = kv + size_t(t) * stride;
  float ss = 0.f;
  for (int i = threadIdx.x; i < kvr; i += kThreads) ss += xr[i] * xr[i];
  const float total = Reduce(tmp).Sum(ss);
  if (threadIdx.x == 0) inv_s = rsqrtf(total / kvr + eps);
  __syncthreads();
  const float inv = inv_s;
  const size_t row = size_t(pool_row(pages, p));  // rope turns by p, the row lives at `row`
  float* lr = latent + row * kvr;
  for (int i = threadIdx.x; i < kvr; i += kThreads) lr[i] = w[i] * (xr[i] * inv);
  const float* er = xr + kvr;
  float* kr = k_pe + row * dim;
  for (int j = threadIdx.x; j < dim / 2; j += kThreads) {
    float c, sn;
    rope_cos_sin(inv_freq[j], p, factor, c, sn);
    int a, b;
    rope_pair_index(j, dim, interleave, a, b);
    const float x0 = er[a], x1 = er[b];
    kr[a] = x0 * c - x1 * sn;
    kr[b] = x1 * c + x0 * sn;
  }
}

// One block per row: the indexer key's LayerNorm (as layer_norm), then rope over its first `dim`
// values, into the indexer cache (layer_norm + rope + append_rows in one launch).
__global__ void index_key_to_cache_kernel(const float* __restrict__ k, int n, const float* __restrict__ w,
                                          const float* __restrict__ b, float eps, int dim,
                                          const float* __restrict__ inv_freq, float factor, bool interleave,
                                          float* __restrict__ cache, int pos0, const int* pos, const PageTable pages) {
  pdl_wait();  // launched with PDL: nothing is read or written before the kernel ahead finishes
  pdl_trigger();  // then the next kernel may start (after the wait: one kernel ahead at most)
  extern __shared__ float row[];
  const int t = blockIdx.x, p = (pos ? *pos : pos0) + t;
  const float* xr = k + size_t(t) * n;
  float mean, inv;
  block_layer_norm_stats<kThreads>(xr, n, eps, mean, inv);
  for (int i = threadIdx.x; i < n; i += kThreads) row[i] = ((xr[i] - mean) * inv) * w[i] + b[i];
  __syncthreads();
  float* cr = cache + size_t(pool_row(pages, p)) * n;
  for (int i = dim + threadIdx.x; i < n; i += kThreads) cr[i] = row[i];
  for (int j = threadIdx.x; j < dim / 2; j += kThreads) {
    float c, sn;
    rope_cos_sin(inv_freq[j], p, factor, c, sn);
    int a, bb;
    rope_pair_index(j, dim, interleave, a, bb);
    const float x0 = row[a], x1 = row[bb];
    cr[a] = x0 * c - x1 * sn;
    cr[bb] = x1 * c + x0 * sn;
  }
}

}  // namespace

void kv_to_cache(const float* kv, int stride, int T, int kvr, const float* norm_w, float eps, int dim,
                 const float* inv_freq, float factor, bool interleave, float* latent, float* k_pe, int pos0,
                 const int* pos, CUstream_st* stream, const PageTable& pages) {
  BIGMOE_CHECK(T >= 0 && kvr >= 1 && dim >= 2 && dim % 2 == 0 && stride >= kvr + dim && pos0 >= 0,
               "kv_to_cache: bad shape T {} kv_lora {} rope {} stride {}", T, kvr, dim, stride);
  if (T == 0) return;
  BIGMOE_CHECK(kv && norm_w && inv_freq && latent && k_pe, "kv_to_cache: null pointer");
  BIGMOE_CHECK(!pages.table || pages.page_rows >= 1, "kv_to_cache: page table with {} rows per page", pages.page_rows);
  check(pdl_launch(kv_to_cache_kernel, dim3(T), dim3(kThreads), 0, stream, kv, stride, kvr, norm_w, eps, dim, inv_freq,
                   factor, interleave, latent, k_pe, pos0, pos, pages),
        "kv_to_cache_kernel launch");
  check(cudaGetLastError(), "kv_to_cache launch");
}

void index_key_to_cache(const float* k, int T, int n, const float* w, const float* b, float eps, int dim,
                        const float* inv_freq, float factor, bool interleave, float* cache, int pos0, const int* pos,
                        CUstream_st* stream, const PageTable& pages) {
  BIGMOE_CHECK(T >= 0 && n >= 1 && dim >= 0 && dim % 2 == 0 && dim <= n && pos0 >= 0 && n <= 8192,
               "index_key_to_cache: bad shape T {} n {} rope {}", T, n, dim);
  if (T == 0) return;
  BIGMOE_CHECK(k && w && b && cache && (dim == 0 || inv_freq), "index_key_to_cache: null pointer");
  BIGMOE_CHECK(!pages.table || pages.page_rows >= 1, "index_key_to_cache: page table with {} rows per page",
               pages.page_rows);
  check(pdl_launch(index_key_to_cache_kernel, dim3(T), dim3(kThreads), size_t(n) * 4, stream, k, n, w, b, eps, dim,
                   inv_freq, factor, interleave, cache, pos0, pos, pages),
        "index_key_to_cache_kernel launch");
  check(cudaGetLastError(), "index_key_to_cache launch");
}

void append_rows(float* dst, int dst_stride, int pos0, const int* pos, const float* src, int src_stride, int T, int n,
                 CUstream_st* stream, const PageTable& pages) {
  BIGMOE_CHECK(T >= 0 && n >= 0 && dst_stride >= n && src_stride >= n && pos0 >= 0,
               "append_rows: bad shape T {} n {} pos0 {}", T, n, pos0);
  BIGMOE_CHECK(!pages.table || pages.page_rows >= 1, "append_rows: page table with {} rows per page", pages.page_rows);
  if (T == 0 || n == 0) return;
  append_rows_kernel<<<blocks_for(size_t(T) * n), kThreads, 0, stream>>>(dst, dst_stride, pos0, pos, src, src_stride,
                                                                         T, n, pages);
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
  pdl_wait();  // launched with PDL: nothing is read or written before the kernel ahead finishes
  pdl_trigger();  // then the next kernel may start (after the wait: one kernel ahead at most)
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
    check(pdl_launch(topk_select_kernel, dim3(n), dim3(kSelThreads), 0, stream, scores + size_t(t0) * N, N, pos0 + t0,
                     k, out + size_t(t0) * k, pos),
          "topk_select_kernel launch");
  }
  check(cudaGetLastError(), "topk_select launch");
}

}  // namespace bigmoe::cuda
