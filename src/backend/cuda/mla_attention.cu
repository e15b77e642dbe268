// Absorbed-form MLA decode attention and the DSA indexer (spec §3 steps 5–7, §4), float32.
//
// mla_decode_attention, split over the keys (flash-decoding). Grid (head group, key split, query
// token): a block owns kGroup = 16 heads of one query token t and one share of t's key list. The
// key list of row t is its entries (sel[t, 0..topk), -1 = padding; dense: 0..pos0+t), cut into
// tiles of kTile = 32 entries; tile j belongs to split j % splits (interleaved, so a list whose
// valid entries come first, e.g. a causal selection of width N, still spreads over every split).
// The block loads 8 of its entry tiles per round (one entry per thread, the next round's in flight
// while it computes), compacts the valid ones into a shared-memory queue, and runs every full
// tile of 32 keys from the queue (the remainder at the end):
//   * cp.async copies the keys [c(s) | k_pe(s)] (kv_lora + rope floats, 576 for GLM-5.2) into
//     shared memory, once for all heads (MQA); the group's queries were staged the same way with
//     the first tile;
//   * scores: warp w takes keys 4w..4w+3, its lanes stride over the key dims in float4s, every
//     head at once (64 partial dot products per lane), then one reduce-scatter across the warp
//     (62 shuffles) leaves lane l with head l/2 of keys 4w + 2(l&1) + {0,1};
//   * online softmax: the tile max per head meets across warps in shared memory; every lane
//     keeps the running max of its head (the same in every warp) and the running sum of exp of
//     its own keys; the probabilities go to shared memory [key][head];
//   * latent accumulation: thread tid owns latent dims tid + j * 256 < kv_lora of every head of the
//     group, in registers: acc = acc · alpha + Σ_k p[k][g] c_k (probabilities read 4 heads at a
//     time as broadcast float4s).
// At the end the block holds, per head, the running max m, the sum of exp l and the unnormalized
// acc[kv_lora]. With one split it writes out = acc / l (zeros for a row with no key); with more
// it writes (m, l) and acc to a workspace [split][t][h] and mla_merge_kernel combines them per (t,
// head): out = Σ_s e^(m_s - M) acc_s / Σ_s e^(m_s - M) l_s, M = max_s m_s (no key anywhere: zeros).
// The split count fills about two waves of resident blocks (SM count x occupancy) when T x head
// groups alone does not, at most 64 and at most one split per entry tile; prefill-sized T gets one
// split and no merge. The workspace is one device buffer per (device, stream), allocated under a
// mutex by the first call that splits, at the most any call with its kv_lora can need (2 x
// target blocks x 16 heads x (kv_lora + 2) floats: ~35 MB at 512 on 132 SMs), so it grows only for
// a larger kv_lora; never during graph capture (such a call throws); old buffers are kept, as
// captured graphs may use them.
// Two instantiations: kv_lora 512 / rope 64 with the dims as constants (the tuned case) and one
// with run-time dims (kv_lora <= 512, % 32; rope <= 64, % 8), same code. Shared memory at 512 / 64:
// 112 KB, two blocks per SM (__launch_bounds__(256, 2) caps registers at 128).
//
// Paged cache (PageTable): an entry's position becomes its pool row when it is read from the key
// list (one page-table load per entry); the queue and the key copies work on pool rows.
//
// dsa_indexer_scores: one warp per (t, s), lane per index head (qi staged in shared memory,
// padded against bank conflicts), the ReLU-weighted head sum reduced across the warp.
// topk_per_row: CUB segmented radix sort (descending) of each row's causal prefix.
#include <cub/device/device_segmented_radix_sort.cuh>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <map>
#include <mutex>
#include <utility>

#include "backend/cuda/cuda_ops.h"
#include "backend/cuda/page_math.h"
#include "backend/cuda/pdl.h"
#include "util/error.h"

namespace bigmoe::cuda {

namespace {

// ---------------------------------------------------------------------------------------------
// MLA decode attention
constexpr int kMaxLatent = 512;  // kv_lora_rank: GLM-5.2's, the largest supported
constexpr int kMaxRope = 64;     // qk_rope_head_dim: likewise
constexpr int kGroup = 16;       // heads per block
constexpr int kTile = 32;        // keys per shared-memory tile (= entries per warp in a round)
constexpr int kAttnThreads = 256;
constexpr int kAttnWarps = kAttnThreads / 32;
constexpr int kKeysPerWarp = kTile / kAttnWarps;           // scores: keys of one warp
constexpr int kDimsPerThread = kMaxLatent / kAttnThreads;  // thread owns latent dims tid + j * kAttnThreads
constexpr int kQueue = kTile - 1 + kAttnThreads;           // leftover of a round + one round of entries
constexpr int kMaxSplits = 64;
constexpr int kMaxRowsPerLaunch = 65535;  // query tokens per launch (gridDim.z)
static_assert(kMaxLatent % kAttnThreads == 0 && kMaxLatent % 32 == 0 && kMaxRope % 8 == 0);
static_assert(kKeysPerWarp == 4 && kGroup == 16, "the reduce-scatter below maps 64 values to 2 per lane");
static_assert(kMaxSplits <= 64, "mla_merge_kernel: one warp reads the (m, l) of all splits, 2 per lane");

// Dynamic shared memory for a key of `key` = kv_lora + rope floats.
size_t attn_smem_bytes(int key) {
  return (size_t(kGroup) * key            // q [g][kv_lora | rope]
          + size_t(kTile) * key           // key tile [k][c | k_pe]
          + size_t(kTile) * kGroup        // probabilities [k][g]
          + size_t(kAttnWarps) * kGroup   // per-warp tile max / final sums [w][g]
          + 3 * kGroup                    // alpha, m, l [g]
          ) * sizeof(float) +
         (kQueue + kAttnWarps) * sizeof(int);  // key queue, per-warp counts
}

// Kernel arguments (one struct: the same for both instantiations).
struct AttnArgs {
  const float* q_lat;   // [T, H, L] (row 0 of this launch)
  const float* q_pe;    // [T, H, R]
  const float* latent;  // [N, L] (paged: [pool rows, L])
  const float* k_pe;    // [N, R] (paged: [pool rows, R])
  PageTable pages;      // table null: contiguous
  const int* sel;       // [T, topk] or null (dense causal)
  int topk;
  int H, L, R;          // L / R: run-time dims (the tuned instantiation ignores them)
  int pos0;             // position of this launch's query row 0
  bool q_vec;           // q_lat / q_pe 16-byte aligned: stage q with 16-byte copies
  float scale;
  float* out;           // [T, H, L], written when there is one split (part_acc null)
  float* part_acc;      // splits > 1: [split][T][H][L] unnormalized Σ e^(score - m) c
  float2* part_ml;      // [split][T][H] (m, l)
  size_t acc_stride;    // floats between splits of part_acc
  size_t ml_stride;     // float2s between splits of part_ml
};

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// cp.async global -> shared (sm_80+); src_bytes 0 writes zeros.
__device__ __forceinline__ void cp_async16(void* dst, const void* src) {
  const unsigned d = unsigned(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(d), "l"(src));
}
__device__ __forceinline__ void cp_async16_zfill(void* dst, const void* src, bool valid) {
  const unsigned d = unsigned(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async4_zfill(void* dst, const void* src, bool valid) {
  const unsigned d = unsigned(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(d), "l"(src), "r"(valid ? 4 : 0));
}
__device__ __forceinline__ void cp_async_wait_all() {
  asm volatile("cp.async.commit_group;\ncp.async.wait_group 0;\n" ::: "memory");
}

// One reduce-scatter step over lane bit `o`: the lane keeps the half of v[0, 2 kHalf) its bit
// selects, adds the partner's copy of that half, and sends the other half.
template <int kHalf>
__device__ __forceinline__ void reduce_scatter_step(float* v, bool upper, int o) {
#pragma unroll
  for (int i = 0; i < kHalf; ++i) {
    const float send = upper ? v[i] : v[i + kHalf];
    const float keep = upper ? v[i + kHalf] : v[i];
    v[i] = keep + __shfl_xor_sync(0xffffffffu, send, o);
  }
}

// 64 values per lane summed over the warp: afterwards v[r] (r < 2) of lane l is the warp sum of
// value 2 l + r.
__device__ __forceinline__ void reduce_scatter64(float (&v)[64], int lane) {
  reduce_scatter_step<32>(v, lane & 16, 16);
  reduce_scatter_step<16>(v, lane & 8, 8);
  reduce_scatter_step<8>(v, lane & 4, 4);
  reduce_scatter_step<4>(v, lane & 2, 2);
  reduce_scatter_step<2>(v, lane & 1, 1);
}

// Head dims kL / kR fixed at compile time (GLM-5.2's 512 / 64, the tuned case), or 0 / 0: taken
// at run time from a.L / a.R (L <= kMaxLatent, % 32 == 0; R <= kMaxRope, % 8 == 0). Both cases
// share this code; the compile-time one folds the guards away.
// grid (ceil(H / kGroup), splits, T), kAttnThreads threads, attn_smem_bytes(L + R) dynamic smem.
template <int kL, int kR>
__global__ void __launch_bounds__(kAttnThreads, 2) mla_attn_kernel(const AttnArgs a) {
  pdl_wait();  // launched with PDL: nothing is read or written before the kernel ahead finishes
  pdl_trigger();  // then the next kernel may start (after the wait: one kernel ahead at most)
  constexpr bool kFull = kL == kMaxLatent;  // every thread owns kDimsPerThread latent dims
  const int L = kL ? kL : a.L, R = kL ? kR : a.R, K = L + R, K4 = K / 4, L4 = L / 4;
  extern __shared__ __align__(16) float smem[];
  float* sq = smem;                         // [kGroup][K]
  float* sk = sq + size_t(kGroup) * K;      // [kTile][K]
  float* sp = sk + size_t(kTile) * K;       // probabilities [kTile][kGroup]
  float* s_part = sp + kTile * kGroup;      // [kAttnWarps][kGroup]: tile max, at the end l
  float* s_alpha = s_part + kAttnWarps * kGroup;  // rescale of this tile [kGroup]
  float* s_m = s_alpha + kGroup;            // final running max [kGroup]
  float* s_l = s_m + kGroup;                // final sum of exp [kGroup]
  int* queue = reinterpret_cast<int*>(s_l + kGroup);  // valid keys not yet run [kQueue]
  int* s_count = queue + kQueue;                       // valid entries per warp this round

  const int h0 = blockIdx.x * kGroup, split = blockIdx.y, splits = gridDim.y, t = blockIdx.z;
  const int G = min(kGroup, a.H - h0);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const size_t row0 = size_t(t) * a.H + h0;  // (t, h0): row of q / out / partials
  // Latent dims of this thread: tid + j * kAttnThreads for j < kDimsPerThread where < L (for L
  // <= 256 only j = 0; threads tid >= L own none, a whole warp at a time as L % 32 == 0).
  const bool owns = kFull || tid < L;

  // Entries of row t and this thread's entry of round r: tile j = split + splits * (8 r + warp),
  // as the pool row of its key (-1: none).
  const int n_entries = a.sel ? a.topk : a.pos0 + t + 1;
  const int n_etiles = (n_entries + kTile - 1) / kTile;
  const int* sel_row = a.sel ? a.sel + size_t(t) * a.topk : nullptr;
  auto entry_key = [&](int r) -> int {
    const long long e = (split + (long long)splits * ((long long)r * kAttnWarps + warp)) * kTile + lane;
    if (e >= n_entries) return -1;
    const int s = sel_row ? __ldg(sel_row + e) : int(e);
    return s < 0 ? s : pool_row(a.pages, s);
  };

  float acc[kGroup][kDimsPerThread];
#pragma unroll
  for (int g = 0; g < kGroup; ++g)
#pragma unroll
    for (int j = 0; j < kDimsPerThread; ++j) acc[g][j] = 0.f;
  // Head lane >> 1 of this lane: running max (equal in every warp), sum of exp of its own keys.
  const int my_g = lane >> 1;
  float m_run = -INFINITY, l_run = 0.f;
  bool staged = false;  // queries staged (the block ran a tile)

  int count = 0;  // valid keys (pool rows) in the queue (block-uniform)
  int key = split < n_etiles ? entry_key(0) : -1;
  for (int r = 0; split < n_etiles; ++r) {
    // Append this round's valid entries to the queue (in entry order).
    const bool valid = key >= 0;
    const unsigned ballot = __ballot_sync(0xffffffffu, valid);
    if (lane == 0) s_count[warp] = __popc(ballot);
    __syncthreads();
    int offset = count, total = 0;
#pragma unroll
    for (int w = 0; w < kAttnWarps; ++w) {
      const int c = s_count[w];
      offset += w < warp ? c : 0;
      total += c;
    }
    if (valid) queue[offset + __popc(ballot & ((1u << lane) - 1u))] = key;
    count += total;
    const bool last = split + (long long)splits * (r + 1) * kAttnWarps >= n_etiles;
    if (!last) key = entry_key(r + 1);  // in flight while this round's tiles run
    __syncthreads();

    int q0 = 0;  // queue position of the next tile
    while (count - q0 >= kTile || (last && count > q0)) {
      const int tile_n = min(kTile, count - q0);
      __syncthreads();  // previous tile consumed (sk, sp, s_alpha)
      if (!staged) {  // the group's queries (heads past H are zero and never written out)
        staged = true;
        if (a.q_vec) {
          for (int i = tid; i < kGroup * K4; i += kAttnThreads) {
            const int g = i / K4, d4 = i - g * K4;
            const size_t rg = row0 + min(g, G - 1);
            const float* src = d4 < L4 ? a.q_lat + rg * L + d4 * 4 : a.q_pe + rg * R + (d4 - L4) * 4;
            cp_async16_zfill(sq + size_t(g) * K + d4 * 4, src, g < G);
          }
        } else {
          for (int i = tid; i < kGroup * K; i += kAttnThreads) {
            const int g = i / K, d = i - g * K;
            const size_t rg = row0 + min(g, G - 1);
            const float* src = d < L ? a.q_lat + rg * L + d : a.q_pe + rg * R + (d - L);
            cp_async4_zfill(sq + i, src, g < G);
          }
        }
      }
      // Keys of this tile (slots past tile_n are never read into a result).
      for (int i = tid; i < tile_n * K4; i += kAttnThreads) {
        const int k = i / K4, d4 = i - k * K4;
        const size_t s = size_t(queue[q0 + k]);
        cp_async16(sk + size_t(k) * K + d4 * 4,
                   d4 < L4 ? a.latent + s * L + d4 * 4 : a.k_pe + s * R + (d4 - L4) * 4);
      }
      cp_async_wait_all();
      __syncthreads();

      // Scores of keys k0..k0+3 for every head: lanes over float4s of the key dims.
      const int k0 = warp * kKeysPerWarp;
      float part[kGroup * kKeysPerWarp];  // [g][i]
#pragma unroll
      for (int i = 0; i < kGroup * kKeysPerWarp; ++i) part[i] = 0.f;
      {
        const int d4_end = k0 < tile_n ? K4 : 0;
        const float4* kr = reinterpret_cast<const float4*>(sk) + size_t(k0) * K4;
        const float4* qr = reinterpret_cast<const float4*>(sq);
        for (int d4 = lane; d4 < d4_end; d4 += 32) {
          float4 kv[kKeysPerWarp];
#pragma unroll
          for (int i = 0; i < kKeysPerWarp; ++i) kv[i] = kr[i * K4 + d4];
#pragma unroll
          for (int g = 0; g < kGroup; ++g) {
            const float4 q = qr[g * K4 + d4];
#pragma unroll
            for (int i = 0; i < kKeysPerWarp; ++i) {
              float& p = part[g * kKeysPerWarp + i];
              p = fmaf(q.x, kv[i].x, p);
              p = fmaf(q.y, kv[i].y, p);
              p = fmaf(q.z, kv[i].z, p);
              p = fmaf(q.w, kv[i].w, p);
            }
          }
        }
      }
      reduce_scatter64(part, lane);  // part[r]: head my_g, key kk + r
      const int kk = k0 + 2 * (lane & 1);
      const float x0 = kk < tile_n ? part[0] * a.scale : -INFINITY;
      const float x1 = kk + 1 < tile_n ? part[1] * a.scale : -INFINITY;
      float mx = fmaxf(x0, x1);
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      if ((lane & 1) == 0) s_part[warp * kGroup + my_g] = mx;
      __syncthreads();
      // Online softmax: every warp updates the same running max per head.
      float mt = s_part[my_g];
#pragma unroll
      for (int w = 1; w < kAttnWarps; ++w) mt = fmaxf(mt, s_part[w * kGroup + my_g]);
      const float m_new = fmaxf(m_run, mt);  // finite: the tile has a valid key
      const float alpha = expf(m_run - m_new);  // m_run = -inf gives 0
      const float p0 = expf(x0 - m_new), p1 = expf(x1 - m_new);  // -inf (no key) gives 0
      m_run = m_new;
      l_run = l_run * alpha + p0 + p1;
      sp[kk * kGroup + my_g] = p0;
      sp[(kk + 1) * kGroup + my_g] = p1;
      if (warp == 0 && (lane & 1) == 0) s_alpha[my_g] = alpha;
      __syncthreads();

      // acc = acc * alpha + Σ_k p[k][g] c_k
      if (owns) {
        const float4* al4 = reinterpret_cast<const float4*>(s_alpha);
#pragma unroll
        for (int c = 0; c < kGroup / 4; ++c) {
          const float4 al = al4[c];
#pragma unroll
          for (int j = 0; j < kDimsPerThread; ++j) {
            acc[4 * c + 0][j] *= al.x;
            acc[4 * c + 1][j] *= al.y;
            acc[4 * c + 2][j] *= al.z;
            acc[4 * c + 3][j] *= al.w;
          }
        }
        for (int k = 0; k < tile_n; ++k) {
          float cv[kDimsPerThread];
#pragma unroll
          for (int j = 0; j < kDimsPerThread; ++j) {
            const int d = tid + j * kAttnThreads;
            cv[j] = kFull || d < L ? sk[size_t(k) * K + d] : 0.f;
          }
          const float4* p4 = reinterpret_cast<const float4*>(sp + k * kGroup);
#pragma unroll
          for (int c = 0; c < kGroup / 4; ++c) {
            const float4 p = p4[c];
#pragma unroll
            for (int j = 0; j < kDimsPerThread; ++j) {
              acc[4 * c + 0][j] = fmaf(p.x, cv[j], acc[4 * c + 0][j]);
              acc[4 * c + 1][j] = fmaf(p.y, cv[j], acc[4 * c + 1][j]);
              acc[4 * c + 2][j] = fmaf(p.z, cv[j], acc[4 * c + 2][j]);
              acc[4 * c + 3][j] = fmaf(p.w, cv[j], acc[4 * c + 3][j]);
            }
          }
        }
      }
      q0 += tile_n;
    }
    // Move the remainder (< kTile keys) to the front; its source lies past kTile, so the
    // copies do not overlap. The next round writes the queue only after its first barrier.
    const int rest = count - q0;
    if (q0 > 0 && tid < rest) queue[tid] = queue[q0 + tid];
    count = rest;
    if (last) break;
  }

  // Per head: m (same in every lane of the head), l = Σ over the lanes of the head and warps.
  l_run += __shfl_xor_sync(0xffffffffu, l_run, 1);
  __syncthreads();  // s_part readers of the last tile done
  if ((lane & 1) == 0) s_part[warp * kGroup + my_g] = l_run;
  if (warp == 0 && (lane & 1) == 0) s_m[my_g] = m_run;
  __syncthreads();
  if (tid < kGroup) {
    float l = 0.f;
#pragma unroll
    for (int w = 0; w < kAttnWarps; ++w) l += s_part[w * kGroup + tid];
    s_l[tid] = l;
  }
  __syncthreads();

  if (!a.part_acc) {  // one split: normalized output, zeros for a row with no key
    if (!owns) return;
#pragma unroll
    for (int g = 0; g < kGroup; ++g) {
      if (g >= G) break;
      const float l = s_l[g];
      const float inv = l > 0.f ? 1.f / l : 0.f;
      float* o = a.out + (row0 + g) * L;
#pragma unroll
      for (int j = 0; j < kDimsPerThread; ++j) {
        const int d = tid + j * kAttnThreads;
        if (kFull || d < L) o[d] = acc[g][j] * inv;
      }
    }
    return;
  }
  if (tid < G) a.part_ml[split * a.ml_stride + row0 + tid] = make_float2(s_m[tid], s_l[tid]);
  if (!staged || !owns) return;  // no key in this split: the merge gives it weight 0, never reads acc
  float* pa = a.part_acc + split * a.acc_stride + row0 * L;
#pragma unroll
  for (int g = 0; g < kGroup; ++g) {
    if (g >= G) break;
#pragma unroll
    for (int j = 0; j < kDimsPerThread; ++j) {
      const int d = tid + j * kAttnThreads;
      if (kFull || d < L) pa[size_t(g) * L + d] = acc[g][j];
    }
  }
}

// Merge of the splits of one (t, head), 128 latent dims per block: warp w sums the splits
// s = w, w + 8, ... of the float4 dims blockIdx.x * 32 + lane with weights e^(m_s - M) / Σ e^(m_s - M)
// l_s (computed once by warp 0), then the 8 partial sums meet in shared memory. Splits of weight 0
// (no key, or underflow) are not read. grid (ceil(L / 128), H, T), kMergeThreads threads.
constexpr int kMergeThreads = 256;
constexpr int kMergeWarps = kMergeThreads / 32;
constexpr int kMergePerWarp = kMaxSplits / kMergeWarps;

__global__ void __launch_bounds__(kMergeThreads)
    mla_merge_kernel(const float* __restrict__ part_acc, const float2* __restrict__ part_ml, int splits,
                     size_t acc_stride, size_t ml_stride, int H, int L, float* __restrict__ out) {
  pdl_wait();  // launched with PDL: nothing is read or written before the kernel ahead finishes
  pdl_trigger();  // then the next kernel may start (after the wait: one kernel ahead at most)
  __shared__ float s_w[kMaxSplits];
  __shared__ float4 s_sum[kMergeWarps][32];
  const int h = blockIdx.y, t = blockIdx.z, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const size_t row = size_t(t) * H + h;
  if (warp == 0) {
    float m[2], l[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int s = lane + 32 * r;
      const float2 ml = s < splits ? part_ml[s * ml_stride + row] : make_float2(-INFINITY, 0.f);
      m[r] = ml.x;
      l[r] = ml.y;
    }
    const float M = warp_max(fmaxf(m[0], m[1]));
    float w[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) w[r] = M == -INFINITY ? 0.f : expf(m[r] - M);  // m = -inf gives 0
    const float den = warp_sum(w[0] * l[0] + w[1] * l[1]);  // >= 1 when M is finite
    const float inv = den > 0.f ? 1.f / den : 0.f;
#pragma unroll
    for (int r = 0; r < 2; ++r)
      if (lane + 32 * r < splits) s_w[lane + 32 * r] = w[r] * inv;
  }
  __syncthreads();
  const int d4 = blockIdx.x * 32 + lane;
  const bool in = d4 * 4 < L;
  float4 v[kMergePerWarp];
#pragma unroll
  for (int r = 0; r < kMergePerWarp; ++r) {  // all loads in flight before the sums
    const int s = warp + kMergeWarps * r;
    v[r] = make_float4(0.f, 0.f, 0.f, 0.f);
    if (in && s < splits && s_w[s] != 0.f)
      v[r] = reinterpret_cast<const float4*>(part_acc + s * acc_stride + row * L)[d4];
  }
  float4 sum = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
  for (int r = 0; r < kMergePerWarp; ++r) {
    const int s = warp + kMergeWarps * r;
    const float w = s < splits ? s_w[s] : 0.f;
    if (w == 0.f) continue;
    sum.x = fmaf(w, v[r].x, sum.x);
    sum.y = fmaf(w, v[r].y, sum.y);
    sum.z = fmaf(w, v[r].z, sum.z);
    sum.w = fmaf(w, v[r].w, sum.w);
  }
  s_sum[warp][lane] = sum;
  __syncthreads();
  if (warp != 0 || !in) return;
  float4 o = s_sum[0][lane];
#pragma unroll
  for (int w = 1; w < kMergeWarps; ++w) {
    const float4 x = s_sum[w][lane];
    o.x += x.x;
    o.y += x.y;
    o.z += x.z;
    o.w += x.w;
  }
  float* dst = out + row * L + d4 * 4;  // out may be only 4-byte aligned
  dst[0] = o.x;
  dst[1] = o.y;
  dst[2] = o.z;
  dst[3] = o.w;
}

// Per device: SM count and resident blocks per SM of each instantiation (the dynamic shared
// memory limit is raised once, for the largest key).
struct AttnDevice {
  int sms = 0;
  int occ[2] = {1, 1};  // [generic, tuned]
};

const AttnDevice& attn_device(int dev) {
  static std::mutex mu;
  static auto* devices = new std::map<int, AttnDevice>;  // kept for the process
  std::lock_guard<std::mutex> lock(mu);
  auto it = devices->find(dev);
  if (it != devices->end()) return it->second;
  AttnDevice d;
  check(cudaDeviceGetAttribute(&d.sms, cudaDevAttrMultiProcessorCount, dev), "cudaDeviceGetAttribute(SM count)");
  const size_t smem = attn_smem_bytes(kMaxLatent + kMaxRope);
  void (*kernels[2])(AttnArgs) = {mla_attn_kernel<0, 0>, mla_attn_kernel<kMaxLatent, kMaxRope>};
  for (int i = 0; i < 2; ++i) {
    check(cudaFuncSetAttribute(kernels[i], cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)),
          "cudaFuncSetAttribute(mla_attn_kernel)");
    int occ = 0;
    check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ, kernels[i], kAttnThreads, smem),
          "cudaOccupancyMaxActiveBlocksPerMultiprocessor(mla_attn_kernel)");
    d.occ[i] = std::max(occ, 1);
  }
  return devices->emplace(dev, d).first->second;
}

// The split workspace of (device, stream): at least `need` bytes. When smaller it is replaced by
// one of `want` >= need bytes (the most any call with these head dims can need, so it grows once
// per kv_lora); the old buffer is never freed, as captured graphs may still use it.
void* attn_workspace(int dev, CUstream_st* stream, size_t need, size_t want) {
  struct Buf {
    void* p = nullptr;
    size_t bytes = 0;
  };
  static std::mutex mu;
  static auto* bufs = new std::map<std::pair<int, CUstream_st*>, Buf>;  // kept for the process
  std::lock_guard<std::mutex> lock(mu);
  Buf& b = (*bufs)[{dev, stream}];
  if (b.bytes >= need) return b.p;
  cudaStreamCaptureStatus capturing = cudaStreamCaptureStatusNone;
  check(cudaStreamIsCapturing(stream, &capturing), "cudaStreamIsCapturing");
  if (capturing != cudaStreamCaptureStatusNone)
    fail("mla_decode_attention: its workspace must grow to {} B during CUDA graph capture; run a call with the same "
         "head dims once on this stream before capturing",
         need);
  want = std::max(want, need);
  check(cudaMalloc(&b.p, want), "cudaMalloc (mla workspace)");
  b.bytes = want;
  return b.p;
}
// ---------------------------------------------------------------------------------------------
// DSA indexer scores
constexpr int kIdxThreads = 256;
constexpr int kIdxWarps = kIdxThreads / 32;
constexpr int kIdxMaxKeysPerBlock = 32;
constexpr int kIdxMaxDi = 256;

// grid (ceil(N / kpb), T), kpb keys per block (8, 16 or 32: fewer when the grid would not fill
// the GPU). Dynamic smem: qi [Hi][Di + 1], w [Hi], keys [kpb][Di]. The block stages its query,
// weights and keys with unrolled loops (all loads in flight at once), then each warp scores
// kpb / 8 keys: lane h takes head h, relu(q_h · k) weighted, summed over the warp. Paged: a
// block's keys are consecutive pool rows when they lie in one page (always when page_rows is a
// multiple of kpb, as blocks start at multiples of kpb); otherwise each key row is looked up.
__global__ void __launch_bounds__(kIdxThreads)
    indexer_scores_kernel(const float* __restrict__ qi, const float* __restrict__ ki, const float* __restrict__ w,
                          int Hi, int Di, int N, int pos0, float w_scale, float dot_scale, float* __restrict__ scores,
                          int kpb, const PageTable pages) {
  pdl_wait();  // launched with PDL: nothing is read or written before the kernel ahead finishes
  pdl_trigger();  // then the next kernel may start (after the wait: one kernel ahead at most)
  extern __shared__ __align__(16) float smem[];
  const int ld = Di + 1;
  float* sq = smem;
  float* sw = sq + size_t(Hi) * ld;
  float* sk = sw + Hi;
  const int t = blockIdx.y, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int pos = pos0 + t;
  const int s0 = blockIdx.x * kpb, s1 = min(N, s0 + kpb), ncausal = max(0, min(s1, pos + 1) - s0);
#pragma unroll 8
  for (int i = tid; i < Hi * Di; i += kIdxThreads) sq[(i / Di) * ld + i % Di] = qi[size_t(t) * Hi * Di + i];
  for (int i = tid; i < Hi; i += kIdxThreads) sw[i] = w[size_t(t) * Hi + i] * w_scale;
  if (ncausal > 0) {
    if (!pages.table || s0 / pages.page_rows == (s0 + ncausal - 1) / pages.page_rows) {
      const float* kb = ki + size_t(pool_row(pages, s0)) * Di;
#pragma unroll 8
      for (int i = tid; i < ncausal * Di; i += kIdxThreads) sk[i] = kb[i];
    } else {
      for (int i = tid; i < ncausal * Di; i += kIdxThreads) {
        const int k = i / Di;
        sk[i] = ki[size_t(pool_row(pages, s0 + k)) * Di + (i - k * Di)];
      }
    }
  }
  __syncthreads();
  for (int s = s0 + warp; s < s1; s += kIdxWarps) {
    if (s > pos) {
      if (lane == 0) scores[size_t(t) * N + s] = -INFINITY;
      continue;
    }
    const float* kw = sk + size_t(s - s0) * Di;
    float acc = 0.f;
    for (int h = lane; h < Hi; h += 32) {
      const float* qh = sq + h * ld;
      float dot = 0.f;
#pragma unroll 8
      for (int d = 0; d < Di; ++d) dot = fmaf(qh[d], kw[d], dot);
      acc += sw[h] * fmaxf(dot * dot_scale, 0.f);
    }
    acc = warp_sum(acc);
    if (lane == 0) scores[size_t(t) * N + s] = acc;
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
  // Segment offsets (begin / end) are int: the whole [T, N] score matrix must index in int.
  if (items > size_t(INT32_MAX)) fail("topk_per_row: T={} x N={} scores exceed 2^31 entries", T, N);
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
                          CUstream_st* stream, const PageTable& pages) {
  if (kv_lora <= 0 || kv_lora > kMaxLatent || kv_lora % 32 != 0 || rope < 0 || rope > kMaxRope || rope % 8 != 0)
    fail("mla_decode_attention: kv_lora {} / rope {} unsupported (need kv_lora <= {}, a multiple of 32, and rope <= {}, "
         "a multiple of 8)",
         kv_lora, rope, kMaxLatent, kMaxRope);
  if (T < 0 || H < 0 || pos0 < 0 || (sel && topk <= 0))
    fail("mla_decode_attention: bad arguments T={} H={} pos0={} topk={}", T, H, pos0, topk);
  if (pages.table && pages.page_rows < 1)
    fail("mla_decode_attention: page table with {} rows per page", pages.page_rows);
  if (T == 0 || H == 0) return;
  if (reinterpret_cast<uintptr_t>(latent) % 16 != 0 || (rope > 0 && reinterpret_cast<uintptr_t>(k_pe) % 16 != 0))
    fail("mla_decode_attention: latent / k_pe must be 16-byte aligned");
  int dev = 0;
  check(cudaGetDevice(&dev), "cudaGetDevice");
  const AttnDevice& info = attn_device(dev);
  const bool tuned = kv_lora == kMaxLatent && rope == kMaxRope;
  auto* kernel = tuned ? mla_attn_kernel<kMaxLatent, kMaxRope> : mla_attn_kernel<0, 0>;
  const size_t smem = attn_smem_bytes(kv_lora + rope);

  // Key splits: enough blocks for about two waves of resident blocks where T x head groups is
  // fewer; at most kMaxSplits and one entry tile (of the longest row) per split.
  const int groups = (H + kGroup - 1) / kGroup;
  const long long base = (long long)T * groups;
  const long long target = 2LL * info.sms * info.occ[tuned ? 1 : 0];
  const long long entries = sel ? topk : (long long)pos0 + T;  // longest row
  int splits = 1;
  if (base < target)
    splits = int(std::clamp<long long>((target + base - 1) / base, 1,
                                       std::min<long long>(kMaxSplits, (entries + kTile - 1) / kTile)));

  AttnArgs a{};
  a.latent = latent;
  a.k_pe = k_pe;
  a.pages = pages;
  a.topk = topk;
  a.H = H;
  a.L = kv_lora;
  a.R = rope;
  a.q_vec = reinterpret_cast<uintptr_t>(q_lat) % 16 == 0 && (rope == 0 || reinterpret_cast<uintptr_t>(q_pe) % 16 == 0);
  a.scale = scale;
  const size_t rows = size_t(T) * H;  // (t, h) rows of the whole call
  if (splits > 1) {                   // workspace [split][T][H]: acc (L floats), then (m, l)
    a.acc_stride = rows * kv_lora;
    a.ml_stride = rows;
    const size_t acc_bytes = align256(splits * a.acc_stride * sizeof(float));
    // Any call splits only when base < target, and then splits * base < 2 * target: at most
    // 2 * target * kGroup (split, t, h) rows at this kv_lora.
    const size_t max_rows = 2 * size_t(target) * kGroup;
    const size_t max_bytes = align256(max_rows * kv_lora * sizeof(float)) + max_rows * sizeof(float2);
    char* ws = static_cast<char*>(attn_workspace(dev, stream, acc_bytes + splits * rows * sizeof(float2), max_bytes));
    a.part_acc = reinterpret_cast<float*>(ws);
    a.part_ml = reinterpret_cast<float2*>(ws + acc_bytes);
  }
  // Every query token is independent (its own pos0 + t and rows of q / sel / out / partials), so
  // long prefills only split where the grid's z dimension ends.
  for (int t0 = 0; t0 < T; t0 += kMaxRowsPerLaunch) {
    const int n = std::min(T - t0, kMaxRowsPerLaunch);
    const size_t r0 = size_t(t0) * H;
    AttnArgs c = a;
    c.q_lat = q_lat + r0 * kv_lora;
    c.q_pe = rope > 0 ? q_pe + r0 * rope : q_pe;
    c.sel = sel ? sel + size_t(t0) * topk : nullptr;
    c.pos0 = pos0 + t0;
    c.out = out + r0 * kv_lora;
    if (splits > 1) {
      c.part_acc = a.part_acc + r0 * kv_lora;
      c.part_ml = a.part_ml + r0;
    }
    check(pdl_launch(kernel, dim3(groups, splits, n), dim3(kAttnThreads), smem, stream, c), "mla_attn_kernel launch");
    check(cudaGetLastError(), "mla_decode_attention launch");
    if (splits > 1) {
      check(pdl_launch(mla_merge_kernel, dim3((kv_lora + 127) / 128, H, n), dim3(kMergeThreads), 0, stream, c.part_acc,
                       c.part_ml, splits, a.acc_stride, a.ml_stride, H, kv_lora, c.out),
            "mla_merge_kernel launch");
      check(cudaGetLastError(), "mla_decode_attention merge launch");
    }
  }
}

void dsa_indexer_scores(const float* qi, const float* ki, const float* w, int T, int Hi, int Di, int N, int pos0,
                        float w_scale, float* scores, CUstream_st* stream, const PageTable& pages) {
  if (T == 0 || N == 0) return;
  if (T < 0 || Hi <= 0 || Di <= 0 || Di > kIdxMaxDi || pos0 < 0 || pos0 + T > N)
    fail("dsa_indexer_scores: bad arguments T={} Hi={} Di={} N={} pos0={}", T, Hi, Di, N, pos0);
  if (pages.table && pages.page_rows < 1) fail("dsa_indexer_scores: page table with {} rows per page", pages.page_rows);
  // Keys per block: 32, or fewer while the grid would be under two blocks per SM.
  int dev = 0;
  check(cudaGetDevice(&dev), "cudaGetDevice");
  const long sms = attn_device(dev).sms;
  int kpb = kIdxMaxKeysPerBlock;
  while (kpb > kIdxWarps && long((N + kpb - 1) / kpb) * T < 2 * sms) kpb /= 2;
  auto smem_for = [&](int k) { return (size_t(Hi) * (Di + 1) + Hi + size_t(k) * Di) * sizeof(float); };
  while (kpb > kIdxWarps && smem_for(kpb) > 48 * 1024) kpb /= 2;
  const size_t smem = smem_for(kpb);
  if (smem > 48 * 1024) fail("dsa_indexer_scores: Hi={} Di={} needs {} B shared memory", Hi, Di, smem);
  for (int t0 = 0; t0 < T; t0 += kMaxRowsPerLaunch) {  // grid y limit; rows are independent
    const int n = std::min(T - t0, kMaxRowsPerLaunch);
    dim3 grid((N + kpb - 1) / kpb, n);
    check(pdl_launch(indexer_scores_kernel, dim3(grid), dim3(kIdxThreads), smem, stream, qi + size_t(t0) * Hi * Di, ki,
                     w + size_t(t0) * Hi, Hi, Di, N, pos0 + t0, w_scale, 1.f / std::sqrt(float(Di)),
                     scores + size_t(t0) * N, kpb, pages),
          "indexer_scores_kernel launch");
    check(cudaGetLastError(), "dsa_indexer_scores launch");
  }
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
