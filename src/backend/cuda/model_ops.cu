// Small device ops of the GLM-DSA forward (model_ops.h), except dequant_bf16 / gemm_bf16
// (gemm.cu). Kernel layouts:
//  * rope: one thread per rotated pair; cos/sin are taken in double from the float32 angle, as
//    the CPU reference does, so both agree to rounding.
//  * layer_norm: one block per row, two CUB block reductions (mean, then Σ(x - mean)²).
//  * silu_mul / add_inplace: grid-stride elementwise loops.
//  * moe_route: one block of 256 threads per token; sigmoid (in double, as the reference, so
//    that the discrete choice agrees bit for bit) and choices in shared memory; group scores by
//    one warp per group (top-2 merge over shuffles); groups kept by rank; then warp 0 alone runs
//    K rounds of a warp arg-max over 64-bit (value, index) keys (ties to the lower index), after
//    each of which only the winner's lane rescans its experts (held in registers); the weights
//    are computed in double, as the reference.
//  * moe_combine / gather_rows / scatter_rows: a 2-D grid (rows x column blocks).
//  * head_matvec: grid (row blocks, H, token chunks of up to 16). Each of the block's 8 warps
//    owns 4 consecutive output rows of one head; lanes stride over the columns in 4-element
//    chunks (8-byte BF16 / 16-byte F32 streaming loads, x as float4 through L1, shared by the
//    block's warps; a scalar loop when rows or x break that alignment), so every x value loaded
//    serves 4 rows. The (row, token) accumulators are summed over the warp by a transposing
//    reduction (N - 1 shuffles for N values instead of 5 N).
#include <cub/block/block_reduce.cuh>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "backend/cuda/model_ops.h"
#include "backend/cuda/block_norm.h"
#include "backend/cuda/pdl.h"
#include "backend/cuda/rope_math.h"
#include "util/error.h"

namespace bigmoe::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

unsigned elementwise_blocks(size_t n) { return unsigned(std::min<size_t>((n + kThreads - 1) / kThreads, 1u << 20)); }

// ---- rope ----

__global__ void rope_kernel(float* x, int rows, size_t stride, int offset, int dim, int rows_per_pos, int pos0,
                            const float* __restrict__ inv_freq, float factor, bool interleave, const int* pos_dev,
                            float* out, size_t out_stride) {
  pdl_wait();  // launched with PDL: nothing is read or written before the kernel ahead finishes
  pdl_trigger();  // then the next kernel may start (after the wait: one kernel ahead at most)
  if (pos_dev) pos0 = *pos_dev;
  const int half = dim / 2;
  const size_t total = size_t(rows) * half;
  for (size_t p = blockIdx.x * size_t(blockDim.x) + threadIdx.x; p < total; p += size_t(gridDim.x) * blockDim.x) {
    const int r = int(p / half), j = int(p % half);
    const int pos = pos0 + r / rows_per_pos;
    float c, s;
    rope_cos_sin(inv_freq[j], pos, factor, c, s);
    float* xr = x + r * stride + offset;
    int a, b;
    rope_pair_index(j, dim, interleave, a, b);
    const float x0 = xr[a], x1 = xr[b];
    float* o = out ? out + r * out_stride : xr;  // out of place: the rotated vector alone, dim wide
    o[a] = x0 * c - x1 * s;
    o[b] = x1 * c + x0 * s;
  }
}

// ---- layer norm ----

__global__ void layer_norm_kernel(const float* x, const float* __restrict__ w, const float* __restrict__ b, int n,
                                  float eps, float* y) {
  pdl_wait();  // launched with PDL: nothing is read or written before the kernel ahead finishes
  pdl_trigger();  // then the next kernel may start (after the wait: one kernel ahead at most)
  const float* xr = x + size_t(blockIdx.x) * n;
  float* yr = y + size_t(blockIdx.x) * n;
  float mean, inv;
  block_layer_norm_stats<kThreads>(xr, n, eps, mean, inv);
  for (int i = threadIdx.x; i < n; i += kThreads) yr[i] = ((xr[i] - mean) * inv) * w[i] + b[i];
}

// ---- elementwise ----

__global__ void silu_mul_kernel(const float* g, const float* u, size_t n, float* out) {
  pdl_wait();  // launched with PDL: nothing is read or written before the kernel ahead finishes
  pdl_trigger();  // then the next kernel may start (after the wait: one kernel ahead at most)
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    const float a = g[i];
    out[i] = a / (1.0f + expf(-a)) * u[i];
  }
}

__global__ void add_kernel(float* x, const float* __restrict__ y, size_t n) {
  pdl_wait();  // launched with PDL: nothing is read or written before the kernel ahead finishes
  pdl_trigger();  // then the next kernel may start (after the wait: one kernel ahead at most)
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x)
    x[i] += y[i];
}

// ---- MoE routing ----

constexpr int kMaxExperts = 1024, kMaxTopK = 32;
constexpr int kRoutePerLane = kMaxExperts / 32;

// Orders (choice, expert) as cpu::topk does: a larger key is a larger value, ties to the lower
// index (-0 is taken as +0, so the two compare equal as in C++). Key 0 is below every expert.
__device__ __forceinline__ unsigned long long route_key(float v, int e) {
  const unsigned u = __float_as_uint(v == 0.f ? 0.f : v);
  const unsigned ord = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  return (static_cast<unsigned long long>(ord) << 32) | ~unsigned(e);
}

// One block of 256 threads per token for the sigmoid and the group masking; then warp 0 alone
// picks the K experts (a chain of K dependent steps: block barriers in it cost more than the
// work). In the selection lane l owns experts l, l + 32, ...
__global__ void __launch_bounds__(kThreads) moe_route_kernel(const float* __restrict__ logits,
                                                             const float* __restrict__ bias, int E, int G,
                                                             int topk_group, int K, bool norm_topk, float scaling,
                                                             int* __restrict__ ids, float* __restrict__ weights) {
  pdl_wait();  // launched with PDL: nothing is read or written before the kernel ahead finishes
  pdl_trigger();  // then the next kernel may start (after the wait: one kernel ahead at most)
  __shared__ float sig[kMaxExperts], choice[kMaxExperts];
  __shared__ float gscore[kMaxExperts / 2];
  __shared__ bool gkeep[kMaxExperts / 2];
  __shared__ int picked[kMaxTopK];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const float* lg = logits + size_t(blockIdx.x) * E;
  for (int e = tid; e < E; e += kThreads) {
    const float s = float(1.0 / (1.0 + exp(-double(lg[e]))));  // in double, as the reference
    sig[e] = s;
    choice[e] = s + (bias ? bias[e] : 0.f);  // the bias only steers the choice
  }
  __syncthreads();
  if (G > 1) {
    // Group score: the sum of the group's two largest choices (one warp per group, a top-2
    // merge over shuffles); the topk_group best groups (ties to the lower group) stay.
    const int per = E / G;
    for (int g = warp; g < G; g += kWarps) {
      float m1 = -INFINITY, m2 = -INFINITY;
      for (int i = lane; i < per; i += 32) {
        const float v = choice[g * per + i];
        if (v > m1) m2 = m1, m1 = v;
        else if (v > m2) m2 = v;
      }
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) {
        const float b1 = __shfl_xor_sync(0xffffffffu, m1, o), b2 = __shfl_xor_sync(0xffffffffu, m2, o);
        if (m1 >= b1) m2 = fmaxf(m2, b1);
        else m2 = fmaxf(m1, b2), m1 = b1;
      }
      if (lane == 0) gscore[g] = m1 + m2;
    }
    __syncthreads();
    for (int g = tid; g < G; g += kThreads) {
      const unsigned long long kg = route_key(gscore[g], g);
      int rank = 0;
      for (int h = 0; h < G; ++h) rank += route_key(gscore[h], h) > kg;
      gkeep[g] = rank < topk_group;
    }
    __syncthreads();
    for (int e = tid; e < E; e += kThreads)
      if (!gkeep[e / per]) choice[e] = -INFINITY;
    __syncthreads();
  }
  if (warp != 0) return;
  // K rounds of a warp arg-max; only the lane that owned the winner rescans its experts.
  float cv[kRoutePerLane];
#pragma unroll
  for (int j = 0; j < kRoutePerLane; ++j) cv[j] = lane + 32 * j < E ? choice[lane + 32 * j] : 0.f;
  unsigned taken = 0;
  auto lane_best = [&] {
    unsigned long long b = 0;
#pragma unroll
    for (int j = 0; j < kRoutePerLane; ++j) {
      const int e = lane + 32 * j;
      if (e >= E) break;
      const unsigned long long key = route_key(cv[j], e);
      if (!(taken >> j & 1u) && key > b) b = key;
    }
    return b;
  };
  unsigned long long best = lane_best();
  for (int k = 0; k < K; ++k) {
    unsigned long long m = best;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const unsigned long long other = __shfl_xor_sync(0xffffffffu, m, o);
      if (other > m) m = other;
    }
    const int win = int(~unsigned(m));
    if (lane == 0) picked[k] = win;
    if ((win & 31) == lane) {
      taken |= 1u << (win >> 5);
      best = lane_best();
    }
  }
  __syncwarp();
  if (lane < K) {  // each lane sums in the reference's order, then writes its own slot
    double sum = 0;
    for (int k = 0; k < K; ++k) sum += sig[picked[k]];
    double wt = sig[picked[lane]];
    if (norm_topk) wt /= (sum + 1e-20);
    wt *= double(scaling);
    ids[size_t(blockIdx.x) * K + lane] = picked[lane];
    weights[size_t(blockIdx.x) * K + lane] = float(wt);
  }
}

// ---- MoE combine, row gather / scatter ----

__global__ void moe_combine_kernel(const float* __restrict__ y, const float* __restrict__ w, int K, int d,
                                   const float* __restrict__ shared, float* __restrict__ x) {
  pdl_wait();  // launched with PDL: nothing is read or written before the kernel ahead finishes
  pdl_trigger();  // then the next kernel may start (after the wait: one kernel ahead at most)
  const int t = blockIdx.x;
  const int i = blockIdx.y * kThreads + threadIdx.x;
  if (i >= d) return;
  float s = 0.f;
  for (int k = 0; k < K; ++k) s += w[size_t(t) * K + k] * y[(size_t(t) * K + k) * d + i];
  if (shared) s += shared[size_t(t) * d + i];
  x[size_t(t) * d + i] += s;
}

// Rows < 0 gather zeros and are skipped by the scatter (the padding convention of
// matvec_grouped's ids).
__global__ void gather_rows_kernel(const float* __restrict__ x, const int* __restrict__ rows, int d,
                                   float* __restrict__ out) {
  const int r = rows[blockIdx.x];
  float* o = out + size_t(blockIdx.x) * d;
  for (int i = blockIdx.y * kThreads + threadIdx.x; i < d; i += gridDim.y * kThreads)
    o[i] = r >= 0 ? x[size_t(r) * d + i] : 0.f;
}

__global__ void scatter_rows_kernel(const float* __restrict__ src, const int* __restrict__ rows, int d,
                                    float* __restrict__ y) {
  const int r = rows[blockIdx.x];
  if (r < 0) return;
  const float* s = src + size_t(blockIdx.x) * d;
  for (int i = blockIdx.y * kThreads + threadIdx.x; i < d; i += gridDim.y * kThreads) y[size_t(r) * d + i] = s[i];
}

unsigned column_blocks(int d) { return unsigned(std::min((d + kThreads - 1) / kThreads, 64)); }

// ---- per-head matvec ----

constexpr int kHeadRows = 4;                        // output rows per warp
constexpr int kHeadBlockRows = kWarps * kHeadRows;  // output rows per block
constexpr int kHeadMaxT = 16;                       // tokens per block (grid z splits more)

__device__ __forceinline__ float bf16_lo(uint32_t u) { return __uint_as_float(u << 16); }
__device__ __forceinline__ float bf16_hi(uint32_t u) { return __uint_as_float(u & 0xffff0000u); }

template <bool F32>
__device__ __forceinline__ float load_w1(const void* w, size_t i) {
  if constexpr (F32) return __ldg(static_cast<const float*>(w) + i);
  else return __uint_as_float(uint32_t(__ldg(static_cast<const unsigned short*>(w) + i)) << 16);
}

template <bool F32>
__device__ __forceinline__ float4 load_w4(const void* w, size_t i) {  // i % 4 == 0, aligned
  if constexpr (F32) {
    return __ldcs(reinterpret_cast<const float4*>(static_cast<const float*>(w) + i));
  } else {
    const uint2 u = __ldcs(reinterpret_cast<const uint2*>(static_cast<const uint16_t*>(w) + i));
    return make_float4(bf16_lo(u.x), bf16_hi(u.x), bf16_lo(u.y), bf16_hi(u.y));
  }
}

// Sums each of the N values v[OFF .. OFF + N) (N a power of two, <= 32) over the warp in
// N - 1 + (5 - log2 N) shuffles: every step halves the values a lane keeps, sending the other
// half to its partner (lane ^ O). Returns, on lane l, the total of value OFF + (l >> (5 - log2 N)).
// (Recursive templates, not loops: every index must be a compile-time constant, or the
// accumulators go to local memory.)
template <int N, int OFF, int O = 16, int M>
__device__ __forceinline__ float warp_transpose_sum(float (&v)[M], int lane) {
  if constexpr (O == 0) {
    return v[OFF];
  } else if constexpr (N == 1) {
    v[OFF] += __shfl_xor_sync(0xffffffffu, v[OFF], O);
    return warp_transpose_sum<1, OFF, O / 2>(v, lane);
  } else {
    constexpr int half = N / 2;
    const bool upper = lane & O;
#pragma unroll
    for (int i = 0; i < half; ++i) {
      const float send = upper ? v[OFF + i] : v[OFF + i + half];
      const float keep = upper ? v[OFF + i + half] : v[OFF + i];
      v[OFF + i] = keep + __shfl_xor_sync(0xffffffffu, send, O);
    }
    return warp_transpose_sum<half, OFF, O / 2>(v, lane);
  }
}

// NB: accumulator slots per row (>= tokens of a chunk). x is read through L1: the 8 warps of a
// block work on the same head, so after the first warp the x rows are L1 hits.
template <bool F32, int NB>
__global__ void __launch_bounds__(kThreads, 2) head_matvec_kernel(const void* __restrict__ w, int H, int rows, int cols,
                                                               const float* __restrict__ x, size_t x_stride_t,
                                                               size_t x_stride_h, int T, bool vec,
                                                               float* __restrict__ y) {
  pdl_wait();  // launched with PDL: nothing is read or written before the kernel ahead finishes
  pdl_trigger();  // then the next kernel may start (after the wait: one kernel ahead at most)
  constexpr int N = kHeadRows * NB;  // accumulators per lane: value r * NB + b
  const int h = blockIdx.y, t0 = blockIdx.z * kHeadMaxT, tc = min(kHeadMaxT, T - t0);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int row0 = blockIdx.x * kHeadBlockRows + warp * kHeadRows;
  if (row0 >= rows) return;
  const float* xh = x + size_t(t0) * x_stride_t + h * x_stride_h;
  size_t wrow[kHeadRows];  // element offsets of the rows (past the end: the last row, unused)
#pragma unroll
  for (int r = 0; r < kHeadRows; ++r) wrow[r] = (size_t(h) * rows + min(row0 + r, rows - 1)) * cols;
  float acc[N];
#pragma unroll
  for (int i = 0; i < N; ++i) acc[i] = 0.f;
  if (vec) {
    const int nchunk = cols / 4;
    for (int ci = lane; ci < nchunk; ci += 32) {
      float4 wv[kHeadRows];
#pragma unroll
      for (int r = 0; r < kHeadRows; ++r) wv[r] = load_w4<F32>(w, wrow[r] + size_t(ci) * 4);
#pragma unroll
      for (int b = 0; b < NB; ++b) {
        // Slots past the chunk's tokens re-read its last token (no branch between the loads).
        const float4 xv = __ldg(reinterpret_cast<const float4*>(xh + min(b, tc - 1) * x_stride_t) + ci);
#pragma unroll
        for (int r = 0; r < kHeadRows; ++r) {
          float s = acc[r * NB + b];
          s = fmaf(wv[r].x, xv.x, s);
          s = fmaf(wv[r].y, xv.y, s);
          s = fmaf(wv[r].z, xv.z, s);
          acc[r * NB + b] = fmaf(wv[r].w, xv.w, s);
        }
      }
    }
  } else {
    for (int c = lane; c < cols; c += 32) {
      float wv[kHeadRows];
#pragma unroll
      for (int r = 0; r < kHeadRows; ++r) wv[r] = load_w1<F32>(w, wrow[r] + c);
#pragma unroll
      for (int b = 0; b < NB; ++b) {
        const float xv = __ldg(xh + min(b, tc - 1) * x_stride_t + c);
#pragma unroll
        for (int r = 0; r < kHeadRows; ++r) acc[r * NB + b] = fmaf(wv[r], xv, acc[r * NB + b]);
      }
    }
  }
  // Reduce in groups of up to 32 values; lane l then owns value g * 32 + (l >> shift).
  constexpr int G = N < 32 ? N : 32, shift = N >= 32 ? 0 : (N == 16 ? 1 : N == 8 ? 2 : N == 4 ? 3 : 4);
  static_assert((G << shift) == 32 && (N == G || N == 2 * G), "head_matvec: N must be 4..64, a power of two");
  auto store = [&](float s, int g) {
    const int v = g * G + (lane >> shift), r = v / NB, b = v % NB;
    if ((lane & ((1 << shift) - 1)) == 0 && b < tc && row0 + r < rows)
      y[((size_t(t0) + b) * H + h) * rows + row0 + r] = s;
  };
  store(warp_transpose_sum<G, 0>(acc, lane), 0);
  if constexpr (N > G) store(warp_transpose_sum<G, G>(acc, lane), 1);
}

}  // namespace

void rope(float* x, int rows, int stride, int offset, int dim, int rows_per_pos, int pos0, const float* inv_freq,
          float factor, bool interleave, CUstream_st* stream, const int* pos_dev) {
  BIGMOE_CHECK(rows >= 0 && dim >= 2 && dim % 2 == 0 && rows_per_pos >= 1 && pos0 >= 0 && offset >= 0,
               "rope: bad arguments rows={} dim={} rows_per_pos={} pos0={} offset={}", rows, dim, rows_per_pos, pos0,
               offset);
  BIGMOE_CHECK(rows <= 1 || stride >= offset + dim, "rope: row stride {} < offset {} + dim {}", stride, offset, dim);
  if (rows == 0) return;
  BIGMOE_CHECK(x && inv_freq, "rope: null pointer");
  const size_t pairs = size_t(rows) * (dim / 2);
  check(pdl_launch(rope_kernel, dim3(elementwise_blocks(pairs)), dim3(kThreads), 0, stream, x, rows, size_t(stride),
                   offset, dim, rows_per_pos, pos0, inv_freq, factor, interleave, pos_dev, nullptr, 0),
        "rope_kernel launch");
  check(cudaGetLastError(), "rope kernel launch");
}

void rope_to(const float* x, int rows, int stride, int offset, int dim, int rows_per_pos, int pos0,
             const float* inv_freq, float factor, bool interleave, float* out, int out_stride, CUstream_st* stream,
             const int* pos_dev) {
  BIGMOE_CHECK(rows >= 0 && dim >= 2 && dim % 2 == 0 && rows_per_pos >= 1 && pos0 >= 0 && offset >= 0,
               "rope_to: bad arguments rows={} dim={} rows_per_pos={} pos0={} offset={}", rows, dim, rows_per_pos,
               pos0, offset);
  BIGMOE_CHECK(rows <= 1 || (stride >= offset + dim && out_stride >= dim), "rope_to: strides {} / {} too short",
               stride, out_stride);
  if (rows == 0) return;
  BIGMOE_CHECK(x && inv_freq && out, "rope_to: null pointer");
  const size_t pairs = size_t(rows) * (dim / 2);
  check(pdl_launch(rope_kernel, dim3(elementwise_blocks(pairs)), dim3(kThreads), 0, stream, const_cast<float*>(x), rows,
                   size_t(stride), offset, dim, rows_per_pos, pos0, inv_freq, factor, interleave, pos_dev, out,
                   size_t(out_stride)),
        "rope_kernel launch");
  check(cudaGetLastError(), "rope kernel launch");
}

void layer_norm(const float* x, const float* w, const float* b, int rows, int n, float eps, float* y,
                CUstream_st* stream) {
  BIGMOE_CHECK(rows >= 0 && n >= 1, "layer_norm: bad shape rows={} n={}", rows, n);
  if (rows == 0) return;
  BIGMOE_CHECK(x && w && b && y, "layer_norm: null pointer");
  check(pdl_launch(layer_norm_kernel, dim3(rows), dim3(kThreads), 0, stream, x, w, b, n, eps, y),
        "layer_norm_kernel launch");
  check(cudaGetLastError(), "layer_norm kernel launch");
}

void silu_mul(const float* g, const float* u, size_t n, float* out, CUstream_st* stream) {
  if (n == 0) return;
  BIGMOE_CHECK(g && u && out, "silu_mul: null pointer");
  check(pdl_launch(silu_mul_kernel, dim3(elementwise_blocks(n)), dim3(kThreads), 0, stream, g, u, n, out),
        "silu_mul_kernel launch");
  check(cudaGetLastError(), "silu_mul kernel launch");
}

void add_inplace(float* x, const float* y, size_t n, CUstream_st* stream) {
  if (n == 0) return;
  BIGMOE_CHECK(x && y, "add_inplace: null pointer");
  check(pdl_launch(add_kernel, dim3(elementwise_blocks(n)), dim3(kThreads), 0, stream, x, y, n), "add_kernel launch");
  check(cudaGetLastError(), "add_inplace kernel launch");
}

void moe_route(const float* logits, const float* bias, int T, int E, int n_group, int topk_group, int K,
               bool norm_topk, float scaling, int* ids, float* weights, CUstream_st* stream) {
  BIGMOE_CHECK(T >= 0 && E >= 1 && E <= kMaxExperts, "moe_route: T={} E={} (needs E <= {})", T, E, kMaxExperts);
  BIGMOE_CHECK(K >= 1 && K <= kMaxTopK && K <= E, "moe_route: top-k {} outside 1..min({}, E={})", K, kMaxTopK, E);
  BIGMOE_CHECK(n_group >= 1 && E % n_group == 0 && (n_group == 1 || E / n_group >= 2),
               "moe_route: {} experts do not split into {} groups of >= 2", E, n_group);
  BIGMOE_CHECK(topk_group >= 1 && topk_group <= n_group, "moe_route: topk_group {} outside 1..{}", topk_group,
               n_group);
  if (T == 0) return;
  BIGMOE_CHECK(logits && ids && weights, "moe_route: null pointer");
  check(pdl_launch(moe_route_kernel, dim3(T), dim3(kThreads), 0, stream, logits, bias, E, n_group, topk_group, K,
                   norm_topk, scaling, ids, weights),
        "moe_route_kernel launch");
  check(cudaGetLastError(), "moe_route kernel launch");
}

void moe_combine(const float* y, const float* w, int T, int K, int d, const float* shared, float* x,
                 CUstream_st* stream) {
  BIGMOE_CHECK(T >= 0 && K >= 0 && d >= 1 && d <= 65535 * kThreads, "moe_combine: bad shape T={} K={} d={}", T, K, d);
  if (T == 0) return;
  BIGMOE_CHECK(x && (K == 0 || (y && w)), "moe_combine: null pointer");
  const dim3 grid(unsigned(T), unsigned((d + kThreads - 1) / kThreads));
  check(pdl_launch(moe_combine_kernel, dim3(grid), dim3(kThreads), 0, stream, y, w, K, d, shared, x),
        "moe_combine_kernel launch");
  check(cudaGetLastError(), "moe_combine kernel launch");
}

void gather_rows(const float* x, const int* rows, int n, int d, float* out, CUstream_st* stream) {
  BIGMOE_CHECK(n >= 0 && d >= 1, "gather_rows: bad shape n={} d={}", n, d);
  if (n == 0) return;
  BIGMOE_CHECK(x && rows && out, "gather_rows: null pointer");
  gather_rows_kernel<<<dim3(unsigned(n), column_blocks(d)), kThreads, 0, stream>>>(x, rows, d, out);
  check(cudaGetLastError(), "gather_rows kernel launch");
}

void scatter_rows(const float* src, const int* rows, int n, int d, float* y, CUstream_st* stream) {
  BIGMOE_CHECK(n >= 0 && d >= 1, "scatter_rows: bad shape n={} d={}", n, d);
  if (n == 0) return;
  BIGMOE_CHECK(src && rows && y, "scatter_rows: null pointer");
  scatter_rows_kernel<<<dim3(unsigned(n), column_blocks(d)), kThreads, 0, stream>>>(src, rows, d, y);
  check(cudaGetLastError(), "scatter_rows kernel launch");
}

void head_matvec(WeightFormat fmt, const void* w, int H, int rows, int cols, const float* x, int x_stride_t,
                 int x_stride_h, int T, float* y, CUstream_st* stream) {
  BIGMOE_CHECK(fmt == WeightFormat::BF16 || fmt == WeightFormat::F32, "head_matvec: format {} unsupported (BF16, F32)",
               weight_format_name(fmt));
  BIGMOE_CHECK(H >= 1 && H <= 65535 && rows >= 1 && cols >= 1 && T >= 0,
               "head_matvec: bad shape H={} rows={} cols={} T={}", H, rows, cols, T);
  BIGMOE_CHECK(x_stride_t >= 0 && x_stride_h >= 0, "head_matvec: negative x strides {} / {}", x_stride_t, x_stride_h);
  BIGMOE_CHECK(T <= 65535 * kHeadMaxT, "head_matvec: T={} too large", T);
  if (T == 0) return;
  BIGMOE_CHECK(w && x && y, "head_matvec: null pointer");
  const bool f32 = fmt == WeightFormat::F32;
  const bool vec = cols % 4 == 0 && reinterpret_cast<uintptr_t>(w) % (f32 ? 16 : 8) == 0 &&
                   reinterpret_cast<uintptr_t>(x) % 16 == 0 && x_stride_t % 4 == 0 && x_stride_h % 4 == 0;
  const dim3 grid(unsigned((rows + kHeadBlockRows - 1) / kHeadBlockRows), unsigned(H),
                  unsigned((T + kHeadMaxT - 1) / kHeadMaxT));
  const auto xt = size_t(x_stride_t), xh = size_t(x_stride_h);
  auto launch = [&](auto kernel) {
    check(pdl_launch(kernel, grid, dim3(kThreads), 0, stream, w, H, rows, cols, x, xt, xh, T, vec, y),
          "head_matvec_kernel launch");
  };
  // Accumulator slots: the smallest of 1 / 4 / 8 / 16 that holds the tokens (T > 16: chunks of 16).
  if (T == 1) f32 ? launch(head_matvec_kernel<true, 1>) : launch(head_matvec_kernel<false, 1>);
  else if (T <= 4) f32 ? launch(head_matvec_kernel<true, 4>) : launch(head_matvec_kernel<false, 4>);
  else if (T <= 8) f32 ? launch(head_matvec_kernel<true, 8>) : launch(head_matvec_kernel<false, 8>);
  else f32 ? launch(head_matvec_kernel<true, kHeadMaxT>) : launch(head_matvec_kernel<false, kHeadMaxT>);
  check(cudaGetLastError(), "head_matvec kernel launch");
}

}  // namespace bigmoe::cuda
