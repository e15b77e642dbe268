// Absorbed-form MLA decode attention and the DSA indexer (spec §3 steps 5–7, §4), float32.
//
// mla_decode_attention: one block per (query token t, group of kGroup heads). The 576-dim key
// [c(s), k_pe(s)] is shared by all heads (MQA), so a tile of kTile keys is staged in shared
// memory once and used by every head of the group. One pass with online softmax: per tile,
// scores [kGroup, kTile] (one warp per key, lanes over the key dims, every head at once), then
// the running max / denominator per head and the latent accumulators (each thread owns
// kLatent / kThreads dims for every head of the group, in registers).
//
// dsa_indexer_scores: one warp per (t, s), lane per index head (qi staged in shared memory,
// padded against bank conflicts), the ReLU-weighted head sum reduced across the warp.
// topk_per_row: CUB segmented radix sort (descending) of each row's causal prefix.
#include <cub/device/device_segmented_radix_sort.cuh>
#include <cuda_runtime.h>

#include <cmath>

#include "backend/cuda/cuda_ops.h"
#include "util/error.h"

namespace bigmoe::cuda {

namespace {

// ---------------------------------------------------------------------------------------------
// MLA decode attention
constexpr int kLatent = 512;  // kv_lora_rank
constexpr int kRope = 64;     // qk_rope_head_dim
constexpr int kKey = kLatent + kRope;
constexpr int kGroup = 16;  // heads per block
constexpr int kTile = 16;   // keys per shared-memory tile
constexpr int kAttnThreads = 256;
constexpr int kAttnWarps = kAttnThreads / 32;
constexpr int kDimsPerThread = kLatent / kAttnThreads;
static_assert(kLatent % kAttnThreads == 0 && kKey % 32 == 0 && kLatent % 4 == 0 && kRope % 4 == 0);

constexpr size_t kAttnSmemFloats = size_t(kGroup) * kKey   // q [g][kLatent | kRope]
                                   + size_t(kTile) * kKey  // key tile [k][c | k_pe]
                                   + size_t(kGroup) * kTile;  // scores / probabilities
constexpr size_t kAttnSmemBytes = kAttnSmemFloats * sizeof(float) + kTile * sizeof(int) + 3 * kGroup * sizeof(float);

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// grid (ceil(H / kGroup), T), kAttnThreads threads.
__global__ void __launch_bounds__(kAttnThreads)
    mla_decode_kernel(const float* __restrict__ q_lat, const float* __restrict__ q_pe, const float* __restrict__ latent,
                      const float* __restrict__ k_pe, int H, int pos0, const int* __restrict__ sel, int topk,
                      float scale, float* __restrict__ out) {
  extern __shared__ __align__(16) float smem[];
  float* sq = smem;                          // [kGroup][kKey]
  float* sk = sq + size_t(kGroup) * kKey;    // [kTile][kKey]
  float* sp = sk + size_t(kTile) * kKey;     // [kGroup][kTile]
  int* spos = reinterpret_cast<int*>(sp + kGroup * kTile);  // [kTile]
  float* s_m = reinterpret_cast<float*>(spos + kTile);       // running max [kGroup]
  float* s_l = s_m + kGroup;                                  // running denominator [kGroup]
  float* s_alpha = s_l + kGroup;                              // rescale of this tile [kGroup]

  const int t = blockIdx.y, h0 = blockIdx.x * kGroup;
  const int G = min(kGroup, H - h0);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;

  // Stage the queries of the group (heads past H are zero and never written out).
  for (int i = tid; i < kGroup * kKey; i += kAttnThreads) {
    int g = i / kKey, d = i % kKey;
    float v = 0.f;
    if (g < G) {
      size_t th = size_t(t) * H + h0 + g;
      v = d < kLatent ? q_lat[th * kLatent + d] : q_pe[th * kRope + (d - kLatent)];
    }
    sq[i] = v;
  }
  if (tid < kGroup) {
    s_m[tid] = -INFINITY;
    s_l[tid] = 0.f;
  }

  float acc[kGroup][kDimsPerThread];
#pragma unroll
  for (int g = 0; g < kGroup; ++g)
#pragma unroll
    for (int j = 0; j < kDimsPerThread; ++j) acc[g][j] = 0.f;

  const int n_keys = sel ? topk : pos0 + t + 1;
  for (int base = 0; base < n_keys; base += kTile) {
    __syncthreads();  // previous tile fully consumed
    if (tid < kTile) {
      int j = base + tid, s = -1;
      if (j < n_keys) s = sel ? sel[size_t(t) * topk + j] : j;
      spos[tid] = s;
    }
    __syncthreads();
    // Load the key tile (float4; invalid slots zero).
    for (int i = tid; i < kTile * (kKey / 4); i += kAttnThreads) {
      int k = i / (kKey / 4), d4 = i % (kKey / 4);
      int s = spos[k];
      float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
      if (s >= 0) {
        int d = d4 * 4;
        v = d < kLatent ? reinterpret_cast<const float4*>(latent + size_t(s) * kLatent)[d4]
                        : reinterpret_cast<const float4*>(k_pe + size_t(s) * kRope)[(d - kLatent) / 4];
      }
      reinterpret_cast<float4*>(sk + size_t(k) * kKey)[d4] = v;
    }
    __syncthreads();
    // Scores: warp per key, every head of the group at once.
    for (int k = warp; k < kTile; k += kAttnWarps) {
      float part[kGroup];
#pragma unroll
      for (int g = 0; g < kGroup; ++g) part[g] = 0.f;
      const float* kr = sk + size_t(k) * kKey;
      for (int d = lane; d < kKey; d += 32) {
        float kv = kr[d];
#pragma unroll
        for (int g = 0; g < kGroup; ++g) part[g] = fmaf(sq[g * kKey + d], kv, part[g]);
      }
      const bool valid = spos[k] >= 0;
#pragma unroll
      for (int g = 0; g < kGroup; ++g) {
        float v = warp_sum(part[g]);
        if (lane == 0) sp[g * kTile + k] = valid ? v * scale : -INFINITY;
      }
    }
    __syncthreads();
    // Online softmax bookkeeping, one thread per head.
    if (tid < kGroup) {
      float* row = sp + tid * kTile;
      float mt = -INFINITY;
      for (int k = 0; k < kTile; ++k) mt = fmaxf(mt, row[k]);
      float m_old = s_m[tid], m_new = fmaxf(m_old, mt);
      float alpha = 1.f, lt = 0.f;
      if (m_new == -INFINITY) {  // nothing valid yet
        for (int k = 0; k < kTile; ++k) row[k] = 0.f;
      } else {
        alpha = expf(m_old - m_new);  // m_old = -inf gives 0
        for (int k = 0; k < kTile; ++k) {
          float p = row[k] == -INFINITY ? 0.f : expf(row[k] - m_new);
          row[k] = p;
          lt += p;
        }
      }
      s_m[tid] = m_new;
      s_l[tid] = s_l[tid] * alpha + lt;
      s_alpha[tid] = alpha;
    }
    __syncthreads();
    // acc = acc * alpha + Σ_k p[g][k] c_k
#pragma unroll
    for (int g = 0; g < kGroup; ++g) {
      float a = s_alpha[g];
#pragma unroll
      for (int j = 0; j < kDimsPerThread; ++j) acc[g][j] *= a;
    }
    for (int k = 0; k < kTile; ++k) {
      float c[kDimsPerThread];
#pragma unroll
      for (int j = 0; j < kDimsPerThread; ++j) c[j] = sk[size_t(k) * kKey + tid + j * kAttnThreads];
#pragma unroll
      for (int g = 0; g < kGroup; ++g) {
        float p = sp[g * kTile + k];
#pragma unroll
        for (int j = 0; j < kDimsPerThread; ++j) acc[g][j] = fmaf(p, c[j], acc[g][j]);
      }
    }
  }
  __syncthreads();
#pragma unroll
  for (int g = 0; g < kGroup; ++g) {
    if (g >= G) break;
    float l = s_l[g];
    float inv = l > 0.f ? 1.f / l : 0.f;  // no valid key: zero output
    float* o = out + (size_t(t) * H + h0 + g) * kLatent;
#pragma unroll
    for (int j = 0; j < kDimsPerThread; ++j) o[tid + j * kAttnThreads] = acc[g][j] * inv;
  }
}

// ---------------------------------------------------------------------------------------------
// DSA indexer scores
constexpr int kIdxThreads = 256;
constexpr int kIdxWarps = kIdxThreads / 32;
constexpr int kIdxKeysPerBlock = 64;
constexpr int kIdxMaxDi = 256;

// grid (ceil(N / kIdxKeysPerBlock), T). Dynamic smem: qi [Hi][Di + 1], w [Hi], key [warps][Di].
__global__ void __launch_bounds__(kIdxThreads)
    indexer_scores_kernel(const float* __restrict__ qi, const float* __restrict__ ki, const float* __restrict__ w,
                          int Hi, int Di, int N, int pos0, float w_scale, float dot_scale, float* __restrict__ scores) {
  extern __shared__ __align__(16) float smem[];
  const int ld = Di + 1;
  float* sq = smem;
  float* sw = sq + size_t(Hi) * ld;
  float* sk = sw + Hi;
  const int t = blockIdx.y, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int pos = pos0 + t;
  for (int i = tid; i < Hi * Di; i += kIdxThreads) sq[(i / Di) * ld + i % Di] = qi[size_t(t) * Hi * Di + i];
  for (int i = tid; i < Hi; i += kIdxThreads) sw[i] = w[size_t(t) * Hi + i] * w_scale;
  __syncthreads();
  float* kw = sk + warp * Di;
  const int s_end = min(N, int(blockIdx.x + 1) * kIdxKeysPerBlock);
  for (int s = blockIdx.x * kIdxKeysPerBlock + warp; s < s_end; s += kIdxWarps) {
    if (s > pos) {
      if (lane == 0) scores[size_t(t) * N + s] = -INFINITY;
      continue;
    }
    for (int d = lane; d < Di; d += 32) kw[d] = ki[size_t(s) * Di + d];
    __syncwarp();
    float acc = 0.f;
    for (int h = lane; h < Hi; h += 32) {
      const float* qh = sq + h * ld;
      float dot = 0.f;
      for (int d = 0; d < Di; ++d) dot = fmaf(qh[d], kw[d], dot);
      acc += sw[h] * fmaxf(dot * dot_scale, 0.f);
    }
    acc = warp_sum(acc);
    if (lane == 0) scores[size_t(t) * N + s] = acc;
    __syncwarp();
  }
}

// ---------------------------------------------------------------------------------------------
// Top-k per row

// vals[t*N + s] = s; segment [t*N, t*N + n_t) sorted only when n_t > topk (else empty).
__global__ void topk_prepare_kernel(int T, int N, int pos0, int topk, int* vals, int* begin, int* end) {
  size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < size_t(T) * N) vals[i] = int(i % N);
  if (i < size_t(T)) {
    int n = pos0 + int(i) + 1;
    begin[i] = int(i) * N;
    end[i] = int(i) * N + (n > topk ? n : 0);
  }
}

// grid T: row t gets its top `topk` (sorted) or all causal positions, -1 padded.
__global__ void topk_gather_kernel(int N, int pos0, int topk, const int* __restrict__ sorted_vals, int* __restrict__ out) {
  const int t = blockIdx.x, n = pos0 + t + 1;
  for (int j = threadIdx.x; j < topk; j += blockDim.x) {
    int v;
    if (n > topk) v = sorted_vals[size_t(t) * N + j];
    else v = j < n ? j : -1;
    out[size_t(t) * topk + j] = v;
  }
}

size_t align256(size_t b) { return (b + 255) & ~size_t(255); }

struct TopkLayout {
  size_t keys_out, vals_in, vals_out, begin, end, temp, temp_bytes, total;
};

TopkLayout topk_layout(int T, int N) {
  TopkLayout L{};
  size_t items = size_t(T) * N;
  L.keys_out = 0;
  L.vals_in = L.keys_out + align256(items * sizeof(float));
  L.vals_out = L.vals_in + align256(items * sizeof(int));
  L.begin = L.vals_out + align256(items * sizeof(int));
  L.end = L.begin + align256(T * sizeof(int));
  L.temp = L.end + align256(T * sizeof(int));
  size_t temp_bytes = 0;
  check(cub::DeviceSegmentedRadixSort::SortPairsDescending(nullptr, temp_bytes, (const float*)nullptr, (float*)nullptr,
                                                             (const int*)nullptr, (int*)nullptr, int64_t(items), T,
                                                             (int*)nullptr, (int*)nullptr),
        "cub::DeviceSegmentedRadixSort (size query)");
  L.temp_bytes = temp_bytes;
  L.total = L.temp + align256(temp_bytes);
  return L;
}

}  // namespace

void mla_decode_attention(const float* q_lat, const float* q_pe, const float* latent, const float* k_pe, int T, int H,
                          int kv_lora, int rope, int pos0, const int* sel, int topk, float scale, float* out,
                          CUstream_st* stream) {
  if (T == 0 || H == 0) return;
  if (kv_lora != kLatent || rope != kRope)
    fail("mla_decode_attention: kv_lora {} / rope {} unsupported (built for {} / {})", kv_lora, rope, kLatent, kRope);
  if (T < 0 || T > 16 || H < 0 || pos0 < 0 || (sel && topk <= 0))
    fail("mla_decode_attention: bad arguments T={} H={} pos0={} topk={}", T, H, pos0, topk);
  check(cudaFuncSetAttribute(mla_decode_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(kAttnSmemBytes)),
        "cudaFuncSetAttribute(mla_decode_kernel)");
  dim3 grid((H + kGroup - 1) / kGroup, T);
  mla_decode_kernel<<<grid, kAttnThreads, kAttnSmemBytes, stream>>>(q_lat, q_pe, latent, k_pe, H, pos0, sel, topk,
                                                                     scale, out);
  check(cudaGetLastError(), "mla_decode_attention launch");
}

void dsa_indexer_scores(const float* qi, const float* ki, const float* w, int T, int Hi, int Di, int N, int pos0,
                        float w_scale, float* scores, CUstream_st* stream) {
  if (T == 0 || N == 0) return;
  if (T < 0 || Hi <= 0 || Di <= 0 || Di > kIdxMaxDi || pos0 < 0 || pos0 + T > N)
    fail("dsa_indexer_scores: bad arguments T={} Hi={} Di={} N={} pos0={}", T, Hi, Di, N, pos0);
  size_t smem = (size_t(Hi) * (Di + 1) + Hi + size_t(kIdxWarps) * Di) * sizeof(float);
  if (smem > 48 * 1024) fail("dsa_indexer_scores: Hi={} Di={} needs {} B shared memory", Hi, Di, smem);
  dim3 grid((N + kIdxKeysPerBlock - 1) / kIdxKeysPerBlock, T);
  indexer_scores_kernel<<<grid, kIdxThreads, smem, stream>>>(qi, ki, w, Hi, Di, N, pos0, w_scale,
                                                             1.f / std::sqrt(float(Di)), scores);
  check(cudaGetLastError(), "dsa_indexer_scores launch");
}

size_t topk_per_row_workspace_bytes(int T, int N) { return T > 0 && N > 0 ? topk_layout(T, N).total : 0; }

void topk_per_row(const float* scores, int T, int N, int pos0, int topk, void* workspace, size_t workspace_bytes,
                  int* out, CUstream_st* stream) {
  if (T == 0) return;
  if (T < 0 || N <= 0 || topk <= 0 || pos0 < 0 || pos0 + T > N)
    fail("topk_per_row: bad arguments T={} N={} pos0={} topk={}", T, N, pos0, topk);
  TopkLayout L = topk_layout(T, N);
  if (workspace_bytes < L.total) fail("topk_per_row: workspace {} B < {} B", workspace_bytes, L.total);
  char* ws = static_cast<char*>(workspace);
  float* keys_out = reinterpret_cast<float*>(ws + L.keys_out);
  int* vals_in = reinterpret_cast<int*>(ws + L.vals_in);
  int* vals_out = reinterpret_cast<int*>(ws + L.vals_out);
  int* begin = reinterpret_cast<int*>(ws + L.begin);
  int* end = reinterpret_cast<int*>(ws + L.end);
  size_t items = size_t(T) * N;
  topk_prepare_kernel<<<unsigned((items + 255) / 256), 256, 0, stream>>>(T, N, pos0, topk, vals_in, begin, end);
  check(cudaGetLastError(), "topk_per_row prepare launch");
  if (pos0 + T > topk) {  // some row has more causal positions than topk
    size_t temp_bytes = L.temp_bytes;
    check(cub::DeviceSegmentedRadixSort::SortPairsDescending(ws + L.temp, temp_bytes, scores, keys_out, vals_in,
                                                               vals_out, int64_t(items), T, begin, end, 0,
                                                               int(sizeof(float) * 8), stream),
          "cub::DeviceSegmentedRadixSort::SortPairsDescending");
  }
  topk_gather_kernel<<<T, 256, 0, stream>>>(N, pos0, topk, vals_out, out);
  check(cudaGetLastError(), "topk_per_row gather launch");
}

}  // namespace bigmoe::cuda
