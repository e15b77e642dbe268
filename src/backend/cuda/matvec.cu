// Decode-shaped matrix products y[b, o] = sum_i W[o, i] * x[b, i] (B <= 16), bandwidth-bound.
//
// Layout of the work: a block of 8 warps; each warp owns one output row (R rows for BF16 / FP8)
// and a contiguous part of its K range (K is split over KSPLIT warps of the same block when there are too few rows
// to fill the GPU; the partial sums meet in shared memory). Each weight byte is loaded once,
// with 16-byte streaming loads, and used for all B rows of x (x is read through L1, it is
// small and every warp of the SM reads the same vector).
//
//  * BF16 / FP8: a warp owns R rows (4 at B <= 2, else 2) so each x load serves R rows; each lane
//    loads 16-byte chunks of the rows straight into registers, 4-8 chunks
//    in flight per lane. FP8 multiplies each weight by its 128x128 block scale, as the reference.
//  * Q8_0 / Q4_K / Q6_K: ggml blocks are 34 / 144 / 210 bytes, not multiples of 16, so the warp
//    copies a run of blocks (about 1-2 KB per row) into its own shared-memory buffer with coalesced
//    16-byte cp.async copies (a warp owns R rows, 4 at B <= 2 else 2, so each x load serves R rows),
//    two buffers per warp: the next run is in flight while this one is decoded. Each lane
//    then takes a fixed task per block (Q8_0 8 weights, Q4_K 16, Q6_K 32; groups of 4 lanes read
//    whole 128-byte lines of x) and decodes without I2F: PRMT puts a quant byte into a float's
//    mantissa (128 + q, or 2^23 + u for Q8_0), the lane sums (128 + q)·x and x, and applies the
//    sub-block scale once per task (see QTask).
//  * F32 takes the BF16 / FP8 kernel with 4 weights per chunk. FP8 with other scale blocks than
//    128x128 (matvec_fp8) uses the same kernel with runtime block sizes when bi % 16 == 0.
//  * BF16 / FP8 / F32 rows whose length breaks 16-byte alignment (or FP8 blocks with bi % 16 != 0)
//    take a scalar fallback kernel.
//  * Fused launches (matvec_multi): matrices with the same input stacked by rows; only the store
//    differs (OutSplit sends each row to its part's output).
//  * Grouped (MoE) launches: blockIdx.y is the slot; each block reads its slot's expert id at the
//    start, moves w / scale / x / y to that expert and token (enter_slot), then runs the B = 1
//    code unchanged. The kernels take a template flag G for this, so that plain matvec code is
//    compiled exactly as before (pointers straight from the parameter bank); only NB = 1 (and for
//    the quant formats R = 4) is built with G. A grouped up projection may end in the SwiGLU
//    epilogue (silu(gate) * sum, finish); the quant kernels also fuse gate and up (GLU: a warp's
//    rows are a gate row pair and its up row pair, finish_glu writes silu(gate) * up).
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>

#include "backend/cuda/cuda_ops.h"
#include "backend/cuda/pdl.h"
#include "util/error.h"

namespace bigmoe::cuda {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kChunkUnroll = 4;  // 16-byte chunks in flight per lane (BF16 / FP8)
constexpr int kMaxParts = 4;     // outputs of one fused launch (matvec_multi)

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float bf16_lo(uint32_t u) { return __uint_as_float(u << 16); }
__device__ __forceinline__ float bf16_hi(uint32_t u) { return __uint_as_float(u & 0xffff0000u); }

__device__ __forceinline__ float2 fp8x2_to_float2(uint16_t v) {
  __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(__nv_fp8x2_storage_t(v), __NV_E4M3);
  return __half22float2(*reinterpret_cast<__half2*>(&h));
}

__device__ __forceinline__ float half_at(const uint8_t* p) {  // p 2-byte aligned
  return __half2float(__ushort_as_half(*reinterpret_cast<const uint16_t*>(p)));
}

// acc[b] += sum_j w[j] * x[b, j] for N consecutive weights; x 16-byte aligned when in % 4 == 0.
template <int NB, int N>
__device__ __forceinline__ void dot_x(const float (&w)[N], const float* __restrict__ x, int in, int B,
                                      float (&acc)[NB]) {
#pragma unroll
  for (int b = 0; b < NB; ++b) {
    const float* xb = x + size_t(b < B ? b : B - 1) * in;
    float s = 0.f;
#pragma unroll
    for (int j = 0; j < N; j += 4) {
      float4 v = __ldg(reinterpret_cast<const float4*>(xb + j));
      s = fmaf(w[j], v.x, s);
      s = fmaf(w[j + 1], v.y, s);
      s = fmaf(w[j + 2], v.z, s);
      s = fmaf(w[j + 3], v.w, s);
    }
    acc[b] += s;
  }
}

// Fused launches (matvec_multi): rows [end[p - 1], end[p]) of the stacked matrix go to ys[p],
// row-major [B, end[p] - end[p - 1]]. n == 0: a single output, the kernel's y [B, out].
struct OutSplit {
  float* ys[kMaxParts];
  int end[kMaxParts];
  int n;
};

__device__ __forceinline__ void store_out(const OutSplit& os, float* __restrict__ y, int out, int b, int row,
                                          float v) {
  if (os.n == 0) {
    y[size_t(b) * out + row] = v;
    return;
  }
  // Constant indices only, so the parameter struct is never copied to local memory.
  float* yp = os.ys[0];
  int start = 0, len = os.end[0];
#pragma unroll
  for (int q = 1; q < kMaxParts; ++q)
    if (q < os.n && row >= os.end[q - 1]) yp = os.ys[q], start = os.end[q - 1], len = os.end[q] - os.end[q - 1];
  yp[size_t(b) * len + row - start] = v;
}

// The SwiGLU epilogue of a grouped up projection (matvec_grouped's silu_gate): silu(g) * v, as
// silu_mul computes it.
__device__ __forceinline__ float silu_times(float g, float v) { return g / (1.0f + expf(-g)) * v; }

// Combines the per-warp sums: warp-reduce, then the KSPLIT warps of a row through shared memory.
// gate (grouped launches, B = 1; else null): the row's value becomes silu(gate[row]) * sum.
template <int NB>
__device__ __forceinline__ void finish(float (&acc)[NB], int row, int out, int ks, int ksplit, int B,
                                       float* __restrict__ y, const OutSplit& os, const float* __restrict__ gate = nullptr) {
  __shared__ float red[kWarps][NB];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int b = 0; b < NB; ++b) acc[b] = warp_sum(acc[b]);
  if (ksplit == 1) {
    if (row < out && lane == 0) {
#pragma unroll
      for (int b = 0; b < NB; ++b)
        if (b < B) store_out(os, y, out, b, row, gate ? silu_times(gate[row], acc[b]) : acc[b]);
    }
    return;
  }
  __syncthreads();  // red may still be read by the previous call
  if (lane == 0) {
#pragma unroll
    for (int b = 0; b < NB; ++b) red[warp][b] = acc[b];
  }
  __syncthreads();
  if (ks == 0 && row < out && lane < B) {
    float s = 0.f;
    for (int k = 0; k < ksplit; ++k) s += red[warp + k][lane];
    store_out(os, y, out, lane, row, gate ? silu_times(gate[row], s) : s);
  }
}

// GLU kernels: acc[0..1] are gate rows row0, row0 + 1 and acc[2..3] the up rows; writes
// y[row] = silu(gate) * up for both (B = 1), the K-split warps summed through shared memory first.
__device__ __forceinline__ void finish_glu(float (&acc)[4][1], int row0, int out, int ks, int ksplit,
                                           float* __restrict__ y) {
  __shared__ float red[kWarps][4];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  float v[4];
#pragma unroll
  for (int r = 0; r < 4; ++r) v[r] = warp_sum(acc[r][0]);
  if (ksplit == 1) {
    if (lane < 2 && row0 + lane < out) y[row0 + lane] = silu_times(lane ? v[1] : v[0], lane ? v[3] : v[2]);
    return;
  }
  __syncthreads();
  if (lane == 0) {
#pragma unroll
    for (int r = 0; r < 4; ++r) red[warp][r] = v[r];
  }
  __syncthreads();
  if (ks == 0 && lane < 2 && row0 + lane < out) {
    float g = 0.f, u = 0.f;
    for (int k = 0; k < ksplit; ++k) g += red[warp + k][lane], u += red[warp + k][2 + lane];
    y[row0 + lane] = silu_times(g, u);
  }
}

// Grouped launches: slot blockIdx.y computes y[slot, :] = W_{ids[slot]} x[slot / x_div, :] (B = 1).
// ids == nullptr for a plain matvec (gridDim.y = 1; the kernels ignore sl unless G).
struct Slots {
  const int* ids;
  size_t w_stride;  // bytes between experts
  size_t s_stride;  // floats between experts' scales
  int x_div;
  const float* gate = nullptr;  // [S, out]: the SwiGLU epilogue (finish), or null
  ptrdiff_t up_off = 0;         // fused gate + up (GLU kernels): bytes from the gate to the up experts
};
// This block's slot's row of the epilogue's gate (grouped launches), else null.
__device__ __forceinline__ const float* slot_gate(const Slots& sl, int out) {
  return sl.gate ? sl.gate + size_t(blockIdx.y) * out : nullptr;
}

// Moves w / scale / x / y to this block's slot. Returns false for a negative expert id, after
// zeroing the block's rows [r0, r0 + nr) of y[slot] (block-uniform: the whole block returns).
__device__ __forceinline__ bool enter_slot(const Slots& sl, const uint8_t* __restrict__& w,
                                           const float* __restrict__& scale, const float* __restrict__& x,
                                           float* __restrict__& y, int out, int in, int r0, int nr) {
  const int slot = blockIdx.y;
  const int e = __ldg(sl.ids + slot);
  y += size_t(slot) * out;
  if (e < 0) {
    for (int i = threadIdx.x; i < nr && r0 + i < out; i += kThreads) y[r0 + i] = 0.f;
    return false;
  }
  w += size_t(e) * sl.w_stride;
  if (scale != nullptr) scale += size_t(e) * sl.s_stride;
  x += size_t(slot / sl.x_div) * in;
  return true;
}

// ---- BF16 / FP8 / F32: 16-byte chunks straight into registers ----

// FP8: 128x128 scale blocks (constant); FP8_BLOCKS: runtime bo x bi (vector kernel: bi % 16 == 0).
enum class Dense { BF16, FP8, FP8_BLOCKS, F32 };
constexpr bool is_fp8(Dense k) { return k == Dense::FP8 || k == Dense::FP8_BLOCKS; }
constexpr int dense_epc(Dense k) { return is_fp8(k) ? 16 : k == Dense::BF16 ? 8 : 4; }  // weights per 16 bytes

template <Dense K, int NB, int R, bool G>
__global__ void __launch_bounds__(kThreads) matvec_dense(const uint8_t* __restrict__ w, const float* __restrict__ scale,
                                                         int bo, int bi, int out, int in, const float* __restrict__ x,
                                                         int B, float* __restrict__ y, int ksplit, Slots sl,
                                                         OutSplit os) {
  // R consecutive rows per warp: each x value loaded from L1 serves R rows (x loads, not
  // weight bytes, bound the single-row version).
  constexpr bool FP8 = is_fp8(K);
  constexpr int EPC = dense_epc(K);  // weights per 16-byte chunk
  constexpr int U = R >= 4 ? 2 : kChunkUnroll;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int row0 = (blockIdx.x * (kWarps / ksplit) + warp / ksplit) * R, ks = warp % ksplit;
  pdl_trigger();
  pdl_wait();
  if constexpr (G)
    if (!enter_slot(sl, w, scale, x, y, out, in, blockIdx.x * (kWarps / ksplit) * R, (kWarps / ksplit) * R)) return;
  float acc[R][NB];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int b = 0; b < NB; ++b) acc[r][b] = 0.f;
  if (row0 < out) {
    const int nchunk = in / EPC;
    const int per = (nchunk + ksplit - 1) / ksplit;
    const int c0 = ks * per, c1 = min(nchunk, c0 + per);
    const size_t row_bytes = size_t(in) * (16 / EPC);
    const int cpb = K == Dense::FP8_BLOCKS ? bi / EPC : 128 / EPC;  // chunks per scale block
    const uint4* wr[R];
    const float* srow[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int row = min(row0 + r, out - 1);  // rows past the end re-read the last row, unused
      wr[r] = reinterpret_cast<const uint4*>(w + size_t(row) * row_bytes);
      if constexpr (K == Dense::FP8) srow[r] = scale + size_t(row / 128) * ((in + 127) / 128);
      else if constexpr (K == Dense::FP8_BLOCKS) srow[r] = scale + size_t(row / bo) * ((in + bi - 1) / bi);
      else srow[r] = nullptr;
    }
    for (int c = c0; c < c1; c += 32 * U) {
      uint4 v[R][U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int ci = c + u * 32 + lane;
#pragma unroll
        for (int r = 0; r < R; ++r)
          if (ci < c1) v[r][u] = __ldcs(wr[r] + ci);
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int ci = c + u * 32 + lane;
        if (ci >= c1) continue;
        float f[R][EPC];
#pragma unroll
        for (int r = 0; r < R; ++r) {
          const uint32_t q[4] = {v[r][u].x, v[r][u].y, v[r][u].z, v[r][u].w};
          const float sc = K == Dense::FP8 ? __ldg(srow[r] + (ci * EPC) / 128)
                           : K == Dense::FP8_BLOCKS ? __ldg(srow[r] + ci / cpb)
                                                    : 1.f;
          if constexpr (FP8) {
#pragma unroll
            for (int k = 0; k < 4; ++k) {
              float2 a = fp8x2_to_float2(uint16_t(q[k] & 0xffff)), b2 = fp8x2_to_float2(uint16_t(q[k] >> 16));
              f[r][4 * k] = a.x * sc, f[r][4 * k + 1] = a.y * sc, f[r][4 * k + 2] = b2.x * sc, f[r][4 * k + 3] = b2.y * sc;
            }
          } else if constexpr (K == Dense::BF16) {
#pragma unroll
            for (int k = 0; k < 4; ++k) f[r][2 * k] = bf16_lo(q[k]), f[r][2 * k + 1] = bf16_hi(q[k]);
          } else {
#pragma unroll
            for (int k = 0; k < 4; ++k) f[r][k] = __uint_as_float(q[k]);
          }
        }
#pragma unroll
        for (int b = 0; b < NB; ++b) {
          const float* xb = x + size_t(b < B ? b : B - 1) * in + size_t(ci) * EPC;
#pragma unroll
          for (int j = 0; j < EPC; j += 4) {
            const float4 xv = __ldg(reinterpret_cast<const float4*>(xb + j));
#pragma unroll
            for (int r = 0; r < R; ++r) {
              float t = acc[r][b];
              t = fmaf(f[r][j], xv.x, t);
              t = fmaf(f[r][j + 1], xv.y, t);
              t = fmaf(f[r][j + 2], xv.z, t);
              t = fmaf(f[r][j + 3], xv.w, t);
              acc[r][b] = t;
            }
          }
        }
      }
    }
  }
#pragma unroll
  for (int r = 0; r < R; ++r) finish<NB>(acc[r], row0 + r, out, ks, ksplit, B, y, os, G ? slot_gate(sl, out) : nullptr);
}

// Scalar fallback for BF16 / FP8 / F32 rows that are not 16-byte aligned (any in), and FP8 scale
// blocks with bi % 16 != 0. K is BF16, FP8_BLOCKS (any bo x bi, 128x128 included) or F32.
template <Dense K, int NB, bool G>
__global__ void __launch_bounds__(kThreads) matvec_dense_scalar(const uint8_t* __restrict__ w,
                                                                const float* __restrict__ scale, int bo, int bi,
                                                                int out, int in, const float* __restrict__ x, int B,
                                                                float* __restrict__ y, Slots sl, OutSplit os) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int row = blockIdx.x * kWarps + warp;
  pdl_trigger();
  pdl_wait();
  if constexpr (G)
    if (!enter_slot(sl, w, scale, x, y, out, in, blockIdx.x * kWarps, kWarps)) return;
  float acc[NB];
#pragma unroll
  for (int b = 0; b < NB; ++b) acc[b] = 0.f;
  if (row < out) {
    const int sb = (in + bi - 1) / bi;
    const float* srow = is_fp8(K) ? scale + size_t(row / bo) * sb : nullptr;
    for (int i = lane; i < in; i += 32) {
      float wv;
      if constexpr (is_fp8(K)) {
        __half_raw h = __nv_cvt_fp8_to_halfraw(__nv_fp8_storage_t(w[size_t(row) * in + i]), __NV_E4M3);
        wv = __half2float(__half(h)) * srow[i / bi];
      } else if constexpr (K == Dense::BF16) {
        wv = bf16_lo(reinterpret_cast<const uint16_t*>(w)[size_t(row) * in + i]);
      } else {
        wv = reinterpret_cast<const float*>(w)[size_t(row) * in + i];
      }
#pragma unroll
      for (int b = 0; b < NB; ++b) acc[b] = fmaf(wv, x[size_t(b < B ? b : B - 1) * in + i], acc[b]);
    }
  }
  finish<NB>(acc, row, out, 0, 1, B, y, os, G ? slot_gate(sl, out) : nullptr);
}

// ---- ggml quant formats: stage blocks in shared memory, decode 32 weights per lane ----

template <WeightFormat F>
struct QTraits;
template <>
struct QTraits<WeightFormat::Q8_0> {
  static constexpr int QK = 32, BS = 34, G = 64;  // G blocks staged per warp and step, over its R rows
};
template <>
struct QTraits<WeightFormat::Q4_K> {
  static constexpr int QK = 256, BS = 144, G = 16;
};
template <>
struct QTraits<WeightFormat::Q6_K> {
  static constexpr int QK = 256, BS = 210, G = 16;
};

// Quant decode without I2F: a byte q (< 128) placed by PRMT in bits 16..23 of 0x43000000 is the
// float 128 + q exactly; a byte u (any) in bits 0..7 of 0x4B000000 is 2^23 + u exactly.
__device__ __forceinline__ float f128(uint32_t w, int j) {  // 128 + byte j of w (byte < 128)
  return __uint_as_float(__byte_perm(w, 0x43000000u, 0x7054u | (uint32_t(j) << 8)));
}
__device__ __forceinline__ float f2p23(uint32_t w, int j) {  // 2^23 + byte j of w
  return __uint_as_float(__byte_perm(w, 0x4B000000u, 0x7650u | uint32_t(j)));
}
// Q4_K: d * sc and dmin * m of sub-blocks j0 and j0 + 1 of a block whose first 16 bytes are h
// (d, dmin, 12 bytes of 6-bit scales and mins), k = j0 / 2: one rounding each (the 6-bit value
// enters through the mantissa, the power-of-2 offset cancels exactly).
__device__ __forceinline__ void q4k_scales(const uint4& h, int k, int j0, float& dl0, float& dl1, float& ml0,
                                           float& ml1) {
  const float2 dd = __half22float2(*reinterpret_cast<const __half2*>(&h.x));
  uint32_t scw, mw;
  if (k < 2) {
    scw = h.y & 0x3F3F3F3Fu;
    mw = h.z & 0x3F3F3F3Fu;
  } else {
    scw = (h.w & 0x0F0F0F0Fu) | ((h.y >> 2) & 0x30303030u);
    mw = ((h.w >> 4) & 0x0F0F0F0Fu) | ((h.z >> 2) & 0x30303030u);
  }
  const float nd = -dd.x * 8388608.f, nm = -dd.y * 8388608.f;  // exact (power of 2)
  dl0 = fmaf(dd.x, f2p23(scw, j0), nd);
  dl1 = fmaf(dd.x, f2p23(scw, j0 + 1), nd);
  ml0 = fmaf(dd.y, f2p23(mw, j0), nm);
  ml1 = fmaf(dd.y, f2p23(mw, j0 + 1), nm);
}

// 8 bytes at a 2-byte-aligned shared-memory address (reads up to 4 bytes past them).
__device__ __forceinline__ uint2 lds8_a2(const uint8_t* p) {
  const uint32_t* a = reinterpret_cast<const uint32_t*>(reinterpret_cast<uintptr_t>(p) & ~uintptr_t(3));
  const uint32_t sel = (reinterpret_cast<uintptr_t>(p) & 2) ? 0x5432u : 0x3210u;
  const uint32_t w0 = a[0], w1 = a[1], w2 = a[2];
  return make_uint2(__byte_perm(w0, w1, sel), __byte_perm(w1, w2, sel));
}
template <int N>
__device__ __forceinline__ void load_x(const float* __restrict__ xp, float (&xv)[N]) {  // xp 16-byte aligned
#pragma unroll
  for (int j = 0; j < N; j += 4) {
    const float4 v = __ldg(reinterpret_cast<const float4*>(xp + j));
    xv[j] = v.x, xv[j + 1] = v.y, xv[j + 2] = v.z, xv[j + 3] = v.w;
  }
}

// A Q4_K lane task's x: N values at xp (sub-block 2k) and N at xp + 32 (sub-block 2k + 1), and
// the sum of each.
template <int N>
__device__ __forceinline__ void load_x_pair(const float* __restrict__ xp, float (&xa)[N], float (&xb)[N], float& X0,
                                            float& X1) {
  load_x(xp, xa);
  load_x(xp + 32, xb);
  X0 = 0.f, X1 = 0.f;
#pragma unroll
  for (int j = 0; j < N; ++j) X0 += xa[j], X1 += xb[j];
}

// One lane task: TW weights of one block (LANES lanes per block).
//  Q8_0: 8 consecutive weights (lane's 1/4 of a block); q converted once to float, dot, times d.
//  Q4_K: 8 bytes of qs = 8 weights of sub-block 2k (low nibbles) + 8 of 2k+1 (high nibbles);
//        acc += dl (S - 128 X) - ml X with S = sum (128 + q) x, X = sum x, scales decoded per task.
//  Q6_K: 8 positions l of half h, all four 32-runs kk: 32 weights, 4 sub-block scales;
//        acc += d sc (S - 160 X) (the stored 6-bit value is q + 32).
template <WeightFormat F>
struct QTask;
template <>
struct QTask<WeightFormat::Q8_0> {
  static constexpr int LANES = 4;
};
template <>
struct QTask<WeightFormat::Q4_K> {
  static constexpr int LANES = 16;
};
// Lanes per block: Q4_K at B = 1 takes 32-weight tasks (8 lanes a block), so each lane decodes
// a block's scales for twice the weights (the scale decode is a third of the work at 16).
template <WeightFormat F, int NB>
constexpr int q_lanes() {
  return F == WeightFormat::Q4_K && NB == 1 ? 8 : QTask<F>::LANES;
}
template <>
struct QTask<WeightFormat::Q6_K> {
  static constexpr int LANES = 8;
};

// cp.async of 16 bytes global -> shared (address d in the shared window), zero-filling past
// `bytes` (0..16) of the source.
__device__ __forceinline__ void cp_async16(uint32_t d, const void* src, int bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src), "r"(bytes));
}
__device__ __forceinline__ void cp_async16(uint32_t d, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(d), "l"(src));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

template <WeightFormat F, int R>
struct QStage {
  using T = QTraits<F>;
  static constexpr int GR = T::G / R;                             // blocks per row and step
  static constexpr int STAGE = (GR * T::BS + 32 + 15) / 16 * 16;  // bytes, + misalignment + lds8_a2 overread
  static constexpr int MAXC = (STAGE / 16 + 31) / 32;             // 16-byte chunks per lane and row
  static constexpr size_t smem = size_t(2) * kWarps * R * STAGE;  // two stages per warp (dynamic shared memory)
};

extern __shared__ uint4 matvec_qsmem[];

// Blocks per SM at B = 1 (register caps without spills: Q8_0 64, Q4_K 80).
template <WeightFormat F, int NB>
constexpr int q_min_blocks() {
  return NB != 1 ? 1 : F == WeightFormat::Q8_0 ? 4 : F == WeightFormat::Q4_K ? 3 : 1;
}

// CH: the launch found every run of this matrix chunk-aligned (see issue() below).
// GLU (grouped, R = 4): the warp's rows are gate rows o, o + 1 and up rows o, o + 1 (the up
// experts at w + sl.up_off), and it writes silu(gate) * up for output rows o, o + 1.
template <WeightFormat F, int NB, int R, bool G, bool CH, bool GLU>
__global__ void __launch_bounds__(kThreads, q_min_blocks<F, NB>()) matvec_quant(const uint8_t* __restrict__ w, int out, int in,
                                                         const float* __restrict__ x, int B,
                                                         float* __restrict__ y, int ksplit, Slots sl, OutSplit os) {
  using T = QTraits<F>;
  using S = QStage<F, R>;
  constexpr int GR = S::GR, STAGE = S::STAGE, MAXC = S::MAXC;
  constexpr int LANES_PER_BLOCK = q_lanes<F, NB>();           // lanes sharing one block
  constexpr int BLOCKS_PER_PASS = 32 / LANES_PER_BLOCK;
  // Two stages per warp: the run of blocks of step i + 1 is in flight (cp.async) while step i
  // is decoded, so a warp always has loads outstanding.
  uint8_t* const wstage = reinterpret_cast<uint8_t*>(matvec_qsmem) + size_t(threadIdx.x >> 5) * 2 * R * STAGE;
  const uint32_t sstage = uint32_t(__cvta_generic_to_shared(wstage));  // the same, as cp.async takes it

  constexpr int RO = GLU ? R / 2 : R;  // output rows per warp
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int row0 = (blockIdx.x * (kWarps / ksplit) + warp / ksplit) * RO, ks = warp % ksplit;
  const int li = lane % LANES_PER_BLOCK;  // the lane's task inside a block (fixed)
  pdl_trigger();
  if constexpr (G) {
    pdl_wait();  // the expert ids come from the kernel before
    const float* __restrict__ no_scale = nullptr;
    if (!enter_slot(sl, w, no_scale, x, y, out, in, blockIdx.x * (kWarps / ksplit) * RO, (kWarps / ksplit) * RO))
      return;
  }
  // Staged row r: output row row0 + r % RO of the gate (or only) matrix, or of the up one.
  auto row_of = [&](int r) { return GLU ? r % RO : r; };
  auto up_of = [&](int r) { return GLU && r >= RO ? sl.up_off : ptrdiff_t(0); };
  float acc[R][NB];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int b = 0; b < NB; ++b) acc[r][b] = 0.f;
  if (row0 < out) {
    const int nb = in / T::QK;
    const size_t row_bytes = size_t(nb) * T::BS;
    const uintptr_t wend = reinterpret_cast<uintptr_t>(w) + size_t(out) * row_bytes;
    const int per = (nb + ksplit - 1) / ksplit;
    const int g0 = ks * per, g1 = min(nb, g0 + per);
    // Row r's bytes of step g: from the 16-byte boundary at or below its first block.
    auto row_start = [&](int r, int g) {
      const int row = min(row0 + row_of(r), out - 1);  // rows past the end re-read the last row, unused
      return reinterpret_cast<uintptr_t>(w + up_of(r)) + size_t(row) * row_bytes + size_t(g) * T::BS;
    };
    // Runs that start on a 16-byte chunk in rows of whole chunks (w is 16-byte aligned): plain
    // copies from one row pointer; the last chunk of a run ends inside its row. Always so for
    // Q4_K (144-byte blocks); for Q8_0 (34) when the launch says so (CH: rows and K parts of
    // multiples of 8 blocks, as all of GLM-5.2's are).
    constexpr bool kChunked = T::BS % 16 == 0 || CH;
    const uint8_t* const wrow = w + size_t(row0) * row_bytes;
    auto issue = [&](int g, int buf) {
      const int nblk = min(GR, g1 - g);
      if constexpr (kChunked) {
        const uint8_t* const p = wrow + size_t(g) * T::BS + 16 * lane;
        const int nch = (nblk * T::BS + 15) >> 4;
#pragma unroll
        for (int r = 0; r < R; ++r) {
          const int rr = min(row0 + row_of(r), out - 1) - row0;  // rows past the end re-read the last row, unused
          const uint8_t* const q = p + up_of(r) + size_t(rr) * row_bytes;
          const uint32_t dst = sstage + uint32_t((buf * R + r) * STAGE + 16 * lane);
#pragma unroll
          for (int j = 0; j < MAXC; ++j)
            if (lane + 32 * j < nch && lane + 32 * j < STAGE / 16) cp_async16(dst + 512 * j, q + 512 * j);
        }
      } else {
#pragma unroll
        for (int r = 0; r < R; ++r) {
          const uintptr_t start = row_start(r, g), base = start & ~uintptr_t(15);
          const int nch = (int(start & 15) + nblk * T::BS + 15) >> 4;
          // Bytes readable from base (32-bit from here on): the last chunk of the matrix is
          // copied in part and zero-filled.
          const int avail = int(min(wend + up_of(r) - base, uintptr_t(STAGE)));
          const uint32_t dst = sstage + uint32_t((buf * R + r) * STAGE);
#pragma unroll
          for (int j = 0; j < MAXC; ++j) {
            const int c = lane + 32 * j;
            if (c < nch && c < STAGE / 16)
              cp_async16(dst + 16 * c, reinterpret_cast<const void*>(base + 16 * size_t(c)), min(16, avail - 16 * c));
          }
        }
      }
    };
    int buf = 0;
    if (g0 < g1) issue(g0, 0);
    cp_async_commit();
    pdl_wait();  // weights need nothing from the kernel before; x does (and y may be its input)
    for (int g = g0; g < g1; g += GR) {
      const int nblk = min(GR, g1 - g);
      if (g + GR < g1) issue(g + GR, buf ^ 1);
      cp_async_commit();
      cp_async_wait<1>();  // every group but the newest: this step's bytes have landed
      __syncwarp();
      const uint8_t* sb[R];
#pragma unroll
      for (int r = 0; r < R; ++r) sb[r] = wstage + size_t(buf * R + r) * STAGE + (row_start(r, g) & 15);
      for (int p = 0; p < nblk; p += BLOCKS_PER_PASS) {
        const int blk = p + lane / LANES_PER_BLOCK;
        if (blk >= nblk) continue;
        const float* xblk = x + size_t(g + blk) * T::QK;
        if constexpr (F == WeightFormat::Q8_0) {
          float q[R][8], d[R];
#pragma unroll
          for (int r = 0; r < R; ++r) {
            const uint8_t* bp = sb[r] + blk * T::BS;
            d[r] = half_at(bp);
            const uint2 u = lds8_a2(bp + 2 + 8 * li);
            const uint32_t u0 = u.x ^ 0x80808080u, u1 = u.y ^ 0x80808080u;
#pragma unroll
            for (int j = 0; j < 4; ++j) {
              q[r][j] = f2p23(u0, j) - 8388736.f;  // - (2^23 + 128): exact
              q[r][4 + j] = f2p23(u1, j) - 8388736.f;
            }
          }
#pragma unroll
          for (int b = 0; b < NB; ++b) {
            float xv[8];
            load_x(xblk + size_t(b < B ? b : B - 1) * in + 8 * li, xv);
#pragma unroll
            for (int r = 0; r < R; ++r) {
              float s = 0.f;
#pragma unroll
              for (int j = 0; j < 8; ++j) s = fmaf(q[r][j], xv[j], s);
              acc[r][b] = fmaf(d[r], s, acc[r][b]);
            }
          }
        } else if constexpr (F == WeightFormat::Q4_K && NB == 1) {
          // 8 lanes a block: lane li takes the 16 bytes of qs at 32 k + l0 (k = li / 2, l0 = 0 or
          // 16): 16 weights of sub-block 2k (low nibbles) and 16 of 2k + 1 (high nibbles). x is
          // loaded once for the R rows; each row's scales are decoded once per 32 weights.
          const int k = li / 2, l0 = 16 * (li % 2), j0 = 2 * (k & 1);
          float xa[16], xb[16], X0, X1;
          load_x_pair(xblk + 64 * k + l0, xa, xb, X0, X1);
#pragma unroll
          for (int r = 0; r < R; ++r) {
            const uint8_t* bp = sb[r] + blk * T::BS;  // 16-byte aligned
            const uint4 h = *reinterpret_cast<const uint4*>(bp);
            const uint4 qv = *reinterpret_cast<const uint4*>(bp + 16 + 32 * k + l0);
            float dl0, dl1, ml0, ml1;
            q4k_scales(h, k, j0, dl0, dl1, ml0, ml1);
            const uint32_t q4[4] = {qv.x, qv.y, qv.z, qv.w};
            float s0 = 0.f, s1 = 0.f;
#pragma unroll
            for (int w4 = 0; w4 < 4; ++w4) {
              const uint32_t lo = q4[w4] & 0x0F0F0F0Fu, hi = (q4[w4] >> 4) & 0x0F0F0F0Fu;
#pragma unroll
              for (int j = 0; j < 4; ++j) {
                s0 = fmaf(f128(lo, j), xa[4 * w4 + j], s0);
                s1 = fmaf(f128(hi, j), xb[4 * w4 + j], s1);
              }
            }
            float a = acc[r][0];
            a = fmaf(dl0, fmaf(-128.f, X0, s0), a);
            a = fmaf(-ml0, X0, a);
            a = fmaf(dl1, fmaf(-128.f, X1, s1), a);
            a = fmaf(-ml1, X1, a);
            acc[r][0] = a;
          }
        } else if constexpr (F == WeightFormat::Q4_K) {
          const int k = li / 4, l0 = 8 * (li % 4), j0 = 2 * (k & 1);
          uint32_t lo[R][2], hi[R][2];
          float dl0[R], ml0[R], dl1[R], ml1[R];
#pragma unroll
          for (int r = 0; r < R; ++r) {
            const uint8_t* bp = sb[r] + blk * T::BS;  // 16-byte aligned (off = 0)
            const uint4 h = *reinterpret_cast<const uint4*>(bp);
            const uint2 qv = *reinterpret_cast<const uint2*>(bp + 16 + 32 * k + l0);
            q4k_scales(h, k, j0, dl0[r], dl1[r], ml0[r], ml1[r]);
            lo[r][0] = qv.x & 0x0F0F0F0Fu, lo[r][1] = qv.y & 0x0F0F0F0Fu;
            hi[r][0] = (qv.x >> 4) & 0x0F0F0F0Fu, hi[r][1] = (qv.y >> 4) & 0x0F0F0F0Fu;
          }
#pragma unroll
          for (int b = 0; b < NB; ++b) {
            float xa[8], xb[8], X0, X1;
            load_x_pair(xblk + size_t(b < B ? b : B - 1) * in + 64 * k + l0, xa, xb, X0, X1);
#pragma unroll
            for (int r = 0; r < R; ++r) {
              float s0 = 0.f, s1 = 0.f;
#pragma unroll
              for (int j = 0; j < 8; ++j) {
                s0 = fmaf(f128(lo[r][j / 4], j % 4), xa[j], s0);
                s1 = fmaf(f128(hi[r][j / 4], j % 4), xb[j], s1);
              }
              float a = acc[r][b];
              a = fmaf(dl0[r], fmaf(-128.f, X0, s0), a);
              a = fmaf(-ml0[r], X0, a);
              a = fmaf(dl1[r], fmaf(-128.f, X1, s1), a);
              a = fmaf(-ml1[r], X1, a);
              acc[r][b] = a;
            }
          }
        } else {  // Q6_K
          const int h = li / 4, l0 = 8 * (li % 4);
          uint32_t qw[R][4][2];
          float dsc[R][4];
#pragma unroll
          for (int r = 0; r < R; ++r) {
            const uint8_t* bp = sb[r] + blk * T::BS;  // 2-byte aligned
            const uint2 qa = lds8_a2(bp + 64 * h + l0), qb = lds8_a2(bp + 64 * h + 32 + l0);
            const uint2 qh = lds8_a2(bp + 128 + 32 * h + l0);
            const uint32_t a2[2] = {qa.x, qa.y}, b2[2] = {qb.x, qb.y}, h2[2] = {qh.x, qh.y};
#pragma unroll
            for (int t = 0; t < 2; ++t) {
              qw[r][0][t] = (a2[t] & 0x0F0F0F0Fu) | ((h2[t] << 4) & 0x30303030u);
              qw[r][1][t] = (b2[t] & 0x0F0F0F0Fu) | ((h2[t] << 2) & 0x30303030u);
              qw[r][2][t] = ((a2[t] >> 4) & 0x0F0F0F0Fu) | (h2[t] & 0x30303030u);
              qw[r][3][t] = ((b2[t] >> 4) & 0x0F0F0F0Fu) | ((h2[t] >> 2) & 0x30303030u);
            }
            const float d = half_at(bp + 208);
            const int8_t* sc = reinterpret_cast<const int8_t*>(bp + 192 + 8 * h + l0 / 16);
#pragma unroll
            for (int kk = 0; kk < 4; ++kk) dsc[r][kk] = d * float(sc[2 * kk]);
          }
#pragma unroll
          for (int b = 0; b < NB; ++b) {
            const float* xp = xblk + size_t(b < B ? b : B - 1) * in + 128 * h + l0;
#pragma unroll
            for (int kk = 0; kk < 4; ++kk) {
              float xv[8];
              load_x(xp + 32 * kk, xv);
              float X = 0.f;
#pragma unroll
              for (int j = 0; j < 8; ++j) X += xv[j];
#pragma unroll
              for (int r = 0; r < R; ++r) {
                float s = 0.f;
#pragma unroll
                for (int j = 0; j < 8; ++j) s = fmaf(f128(qw[r][kk][j / 4], j % 4), xv[j], s);
                acc[r][b] = fmaf(dsc[r][kk], fmaf(-160.f, X, s), acc[r][b]);
              }
            }
          }
        }
      }
      __syncwarp();  // the next step's issue overwrites this stage
      buf ^= 1;
    }
  } else {
    pdl_wait();
  }
  if constexpr (GLU) {
    finish_glu(acc, row0, out, ks, ksplit, y);
  } else {
#pragma unroll
    for (int r = 0; r < R; ++r) finish<NB>(acc[r], row0 + r, out, ks, ksplit, B, y, os, G ? slot_gate(sl, out) : nullptr);
  }
}

int sm_count() {
  static int n = [] {
    int dev = 0, v = 0;
    check(cudaGetDevice(&dev), "cudaGetDevice");
    check(cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, dev), "cudaDeviceGetAttribute");
    return v;
  }();
  return n;
}

// Warps per row: enough warps in all to fill the GPU, while each keeps >= min_units of work.
// `rows` counts the rows of all slots of a grouped launch.
int choose_ksplit(long rows, int units_per_row, int min_units) {
  const long target = long(sm_count()) * 48;  // warps
  int k = 1;
  while (k < kWarps && rows * k < target && units_per_row / (2 * k) >= min_units) k *= 2;
  return k;
}

// Rows per warp for the quant formats at B <= 2: 4 by default; BIGMOE_MATVEC_QROWS=1|2|4 overrides
// (a tuning knob for bench_matvec, read once).
int quant_rows_b12() {
  static int r = [] {
    const char* e = std::getenv("BIGMOE_MATVEC_QROWS");
    const int v = e ? std::atoi(e) : 4;
    return v == 1 || v == 2 ? v : 4;
  }();
  return r;
}

// One launch: a plain matvec (S = 1, sl.ids == nullptr) or a grouped one (S slots, B = 1).
struct Problem {
  WeightFormat fmt;
  const uint8_t* w;
  const float* scale;
  int bo, bi;  // FP8 scale blocks
  int out, in;
  const float* x;
  int B;
  float* y;
  Slots sl;
  int S;
  OutSplit os;  // n == 0 unless matvec_multi
  bool glu = false;  // fused gate + up (matvec_grouped_glu): sl.up_off to the up experts
};

// `rows`: warp rows per slot (R output rows each, R / 2 for GLU); k: the K split.
template <WeightFormat F, int NB, int R, bool G, bool CH, bool GLU>
void launch_quant_k(const Problem& p, int rows, int k, cudaStream_t s) {
  using St = QStage<F, R>;
  static const bool attr = [] {  // the two stages exceed the 48 KB a launch gets by default
    check(cudaFuncSetAttribute(matvec_quant<F, NB, R, G, CH, GLU>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               int(St::smem)),
          "cudaFuncSetAttribute (matvec)");
    return true;
  }();
  (void)attr;
  const dim3 g(unsigned((rows + kWarps / k - 1) / (kWarps / k)), unsigned(p.S));
  check(pdl_launch(matvec_quant<F, NB, R, G, CH, GLU>, g, dim3(kThreads), St::smem, s, p.w, p.out, p.in, p.x, p.B, p.y, k,
                   p.sl, p.os),
        "matvec launch");
}

template <WeightFormat F, int NB, int R, bool G, bool GLU = false>
void launch_quant_r(const Problem& p, cudaStream_t s) {
  using T = QTraits<F>;
  using St = QStage<F, R>;
  constexpr int RO = GLU ? R / 2 : R;  // output rows per warp
  const int rows = (p.out + RO - 1) / RO;
  // Split K down to about one staged step per warp, so that short matrices still fill the GPU.
  const int nb = p.in / T::QK;
  const int k = choose_ksplit(long(rows) * p.S, nb, std::max(1, St::GR / 2));
  if constexpr (F == WeightFormat::Q8_0 && NB == 1 && R == 4) {
    // Chunk-aligned runs (the kernel's plain copies): whole-chunk rows, K parts and steps.
    const int per = (nb + k - 1) / k;
    const bool ch = size_t(nb) * T::BS % 16 == 0 && size_t(per) * T::BS % 16 == 0 && St::GR * T::BS % 16 == 0 &&
                    reinterpret_cast<uintptr_t>(p.w) % 16 == 0 && (p.sl.ids == nullptr || p.sl.w_stride % 16 == 0) &&
                    p.sl.up_off % 16 == 0;
    if (ch) return launch_quant_k<F, NB, R, G, true, GLU>(p, rows, k, s);
  }
  launch_quant_k<F, NB, R, G, false, GLU>(p, rows, k, s);
}

template <WeightFormat F, int NB>
void launch_quant(const Problem& p, cudaStream_t s) {
  if constexpr (NB == 1) {
    if (p.sl.ids != nullptr) {  // grouped: R = 4
      if (p.glu) return launch_quant_r<F, 1, 4, true, true>(p, s);
      return launch_quant_r<F, 1, 4, true>(p, s);
    }
  }
  if constexpr (NB <= 2) {
    const int r = quant_rows_b12();
    if (r == 1) launch_quant_r<F, NB, 1, false>(p, s);
    else if (r == 2) launch_quant_r<F, NB, 2, false>(p, s);
    else launch_quant_r<F, NB, 4, false>(p, s);
  } else {
    launch_quant_r<F, NB, 2, false>(p, s);
  }
}

template <Dense K, int NB, bool G, int R>
void launch_dense_r(const Problem& p, cudaStream_t s) {
  const int rows = (p.out + R - 1) / R;
  const int k = choose_ksplit(long(rows) * p.S, p.in / dense_epc(K), 64);
  const dim3 g(unsigned((rows + kWarps / k - 1) / (kWarps / k)), unsigned(p.S));
  check(pdl_launch(matvec_dense<K, NB, R, G>, g, dim3(kThreads), 0, s, p.w, p.scale, p.bo, p.bi, p.out, p.in, p.x, p.B,
                   p.y, k, p.sl, p.os),
        "matvec launch");
}

template <Dense K, int NB, bool G>
void launch_dense(const Problem& p, cudaStream_t s) {
  // A plain matvec with few rows (e.g. the router, 256 x 6144 F32) at B = 1: a row per warp, so
  // its K-split warps fill every SM (4 rows per warp left half of them idle).
  if constexpr (NB == 1 && !G)
    if (long(p.out) < long(sm_count()) * 8) return launch_dense_r<K, NB, G, 1>(p, s);
  launch_dense_r<K, NB, G, NB <= 2 ? 4 : 2>(p, s);
}

template <Dense K, int NB, bool G>
void launch_dense_scalar(const Problem& p, cudaStream_t s) {
  const dim3 g(unsigned((p.out + kWarps - 1) / kWarps), unsigned(p.S));
  check(pdl_launch(matvec_dense_scalar<K, NB, G>, g, dim3(kThreads), 0, s, p.w, p.scale, p.bo, p.bi, p.out, p.in, p.x,
                   p.B, p.y, p.sl, p.os),
        "matvec launch");
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <int NB, bool G>
void launch_dense_kind(Dense k, bool vec, const Problem& p, cudaStream_t s) {
  if (!vec) {
    if (is_fp8(k)) launch_dense_scalar<Dense::FP8_BLOCKS, NB, G>(p, s);
    else if (k == Dense::BF16) launch_dense_scalar<Dense::BF16, NB, G>(p, s);
    else launch_dense_scalar<Dense::F32, NB, G>(p, s);
    return;
  }
  switch (k) {
    case Dense::BF16: launch_dense<Dense::BF16, NB, G>(p, s); break;
    case Dense::FP8: launch_dense<Dense::FP8, NB, G>(p, s); break;
    case Dense::FP8_BLOCKS: launch_dense<Dense::FP8_BLOCKS, NB, G>(p, s); break;
    case Dense::F32: launch_dense<Dense::F32, NB, G>(p, s); break;
  }
}

template <int NB>
void launch(const Problem& p, cudaStream_t s) {
  switch (p.fmt) {
    case WeightFormat::BF16:
    case WeightFormat::FP8_E4M3:
    case WeightFormat::F32: {
      const bool fp8 = p.fmt == WeightFormat::FP8_E4M3;
      const Dense k = !fp8 ? (p.fmt == WeightFormat::BF16 ? Dense::BF16 : Dense::F32)
                      : p.bo == 128 && p.bi == 128 ? Dense::FP8
                                                   : Dense::FP8_BLOCKS;
      const bool vec = p.in % dense_epc(k) == 0 && (k != Dense::FP8_BLOCKS || p.bi % 16 == 0) && aligned16(p.w) &&
                       aligned16(p.x) && (p.sl.ids == nullptr || p.sl.w_stride % 16 == 0);
      if constexpr (NB == 1) {
        if (p.sl.ids != nullptr) {
          launch_dense_kind<1, true>(k, vec, p, s);
          break;
        }
      }
      launch_dense_kind<NB, false>(k, vec, p, s);
      break;
    }
    case WeightFormat::Q8_0: launch_quant<WeightFormat::Q8_0, NB>(p, s); break;
    case WeightFormat::Q4_K: launch_quant<WeightFormat::Q4_K, NB>(p, s); break;
    case WeightFormat::Q6_K: launch_quant<WeightFormat::Q6_K, NB>(p, s); break;
  }
  check(cudaGetLastError(), "matvec launch");
}

void launch_batch(const Problem& p, cudaStream_t s) {
  if (p.B == 1) launch<1>(p, s);
  else if (p.B == 2) launch<2>(p, s);
  else if (p.B <= 4) launch<4>(p, s);
  else if (p.B <= 8) launch<8>(p, s);
  else launch<16>(p, s);
}

bool is_quant(WeightFormat f) { return f == WeightFormat::Q8_0 || f == WeightFormat::Q4_K || f == WeightFormat::Q6_K; }

// Checks shared by matvec, matvec_fp8 and matvec_grouped (fn names the caller in messages).
void check_args(const char* fn, WeightFormat fmt, const void* w, const float* scale, int bo, int bi, int out, int in,
                const float* x) {
  BIGMOE_CHECK(int(fmt) >= int(WeightFormat::BF16) && int(fmt) <= int(WeightFormat::F32), "{}: unknown weight format {}",
               fn, int(fmt));
  BIGMOE_CHECK(out > 0 && in > 0, "{}: bad shape [{} x {}]", fn, out, in);
  if (fmt == WeightFormat::FP8_E4M3) {
    BIGMOE_CHECK(scale != nullptr, "{}: FP8 needs weight_scale_inv", fn);
    BIGMOE_CHECK(bo > 0 && bi > 0, "{}: bad FP8 scale block [{} x {}]", fn, bo, bi);
  }
  if (is_quant(fmt)) {
    const int qk = fmt == WeightFormat::Q8_0 ? 32 : 256;
    BIGMOE_CHECK(in % qk == 0, "{}: {} needs in % {} == 0, got {}", fn, weight_format_name(fmt), qk, in);
    BIGMOE_CHECK(aligned16(w) && aligned16(x), "{}: {} needs 16-byte aligned w and x", fn, weight_format_name(fmt));
  }
  if (fmt == WeightFormat::BF16 || fmt == WeightFormat::F32) {
    const size_t a = fmt == WeightFormat::BF16 ? 2 : 4;
    BIGMOE_CHECK(reinterpret_cast<uintptr_t>(w) % a == 0, "{}: {} needs {}-byte aligned w", fn,
                 weight_format_name(fmt), a);
  }
}

}  // namespace

const char* weight_format_name(WeightFormat f) {
  switch (f) {
    case WeightFormat::BF16: return "BF16";
    case WeightFormat::FP8_E4M3: return "FP8";
    case WeightFormat::Q8_0: return "Q8_0";
    case WeightFormat::Q4_K: return "Q4_K";
    case WeightFormat::Q6_K: return "Q6_K";
    case WeightFormat::F32: return "F32";
  }
  return "?";
}

size_t matvec_weight_bytes(WeightFormat f, int out, int in) {
  switch (f) {
    case WeightFormat::BF16: return size_t(out) * in * 2;
    case WeightFormat::FP8_E4M3: return size_t(out) * in;
    case WeightFormat::Q8_0: return size_t(out) * (in / 32) * 34;
    case WeightFormat::Q4_K: return size_t(out) * (in / 256) * 144;
    case WeightFormat::Q6_K: return size_t(out) * (in / 256) * 210;
    case WeightFormat::F32: return size_t(out) * in * 4;
  }
  return 0;
}

void matvec(WeightFormat fmt, const void* w, const float* scale, int out, int in, const float* x, int B, float* y,
            CUstream_st* stream) {
  check_args("matvec", fmt, w, scale, 128, 128, out, in, x);
  BIGMOE_CHECK(B >= 1 && B <= 16, "matvec: batch {} outside 1..16", B);
  launch_batch({fmt, static_cast<const uint8_t*>(w), scale, 128, 128, out, in, x, B, y, Slots{nullptr, 0, 0, 1}, 1},
               stream);
}

void matvec_fp8(const void* w, const float* scale, int bo, int bi, int out, int in, const float* x, int B, float* y,
                CUstream_st* stream) {
  check_args("matvec_fp8", WeightFormat::FP8_E4M3, w, scale, bo, bi, out, in, x);
  BIGMOE_CHECK(B >= 1 && B <= 16, "matvec_fp8: batch {} outside 1..16", B);
  launch_batch({WeightFormat::FP8_E4M3, static_cast<const uint8_t*>(w), scale, bo, bi, out, in, x, B, y,
                Slots{nullptr, 0, 0, 1}, 1},
               stream);
}

void matvec_multi(WeightFormat fmt, const void* w, const float* scale, int bo, int bi, const int* outs, float* const* ys,
                  int n, int in, const float* x, int B, CUstream_st* stream) {
  BIGMOE_CHECK(n >= 1 && n <= kMaxParts, "matvec_multi: {} outputs outside 1..{}", n, kMaxParts);
  OutSplit os{};
  int total = 0;
  for (int i = 0; i < n; ++i) {
    BIGMOE_CHECK(outs[i] > 0 && ys[i] != nullptr, "matvec_multi: output {} has {} rows / null pointer", i, outs[i]);
    if (fmt == WeightFormat::FP8_E4M3 && i + 1 < n)
      BIGMOE_CHECK(outs[i] % bo == 0, "matvec_multi: FP8 part {} of {} rows is not a whole number of {}-row scale blocks",
                   i, outs[i], bo);
    total += outs[i];
    os.ys[i] = ys[i];
    os.end[i] = total;
  }
  os.n = n;
  check_args("matvec_multi", fmt, w, scale, bo, bi, total, in, x);
  BIGMOE_CHECK(B >= 1 && B <= 16, "matvec_multi: batch {} outside 1..16", B);
  Problem p{fmt, static_cast<const uint8_t*>(w), scale, bo, bi, total, in, x, B, ys[0], Slots{nullptr, 0, 0, 1}, 1};
  p.os = os;
  launch_batch(p, stream);
}

void matvec_grouped_glu(const ExpertWeights& gate, const ExpertWeights& up, int out, int in, const int* ids, int S,
                        const float* x, int x_div, float* y, float* scratch, CUstream_st* stream) {
  BIGMOE_CHECK(gate.fmt == up.fmt && gate.w_stride == up.w_stride && gate.scale_stride == up.scale_stride &&
                   gate.bo == up.bo && gate.bi == up.bi,
               "matvec_grouped_glu: gate and up experts differ in format or layout ({} / {}, stride {} / {})",
               weight_format_name(gate.fmt), weight_format_name(up.fmt), gate.w_stride, up.w_stride);
  if (!is_quant(gate.fmt)) {  // BF16 / FP8 / F32: the gate, then the up projection with the epilogue
    BIGMOE_CHECK(scratch != nullptr, "matvec_grouped_glu: {} needs a scratch [S, out]", weight_format_name(gate.fmt));
    matvec_grouped(gate, out, in, ids, S, x, x_div, scratch, stream);
    matvec_grouped(up, out, in, ids, S, x, x_div, y, stream, scratch);
    return;
  }
  check_args("matvec_grouped_glu", gate.fmt, gate.w, nullptr, 128, 128, out, in, x);
  check_args("matvec_grouped_glu", up.fmt, up.w, nullptr, 128, 128, out, in, x);
  BIGMOE_CHECK(ids != nullptr, "matvec_grouped_glu: ids is null");
  BIGMOE_CHECK(S >= 1 && S <= 65535, "matvec_grouped_glu: slot count {} outside 1..65535", S);
  BIGMOE_CHECK(x_div >= 1, "matvec_grouped_glu: x_div {} < 1", x_div);
  BIGMOE_CHECK(gate.w_stride % 16 == 0, "matvec_grouped_glu: {} needs w_stride % 16 == 0, got {}",
               weight_format_name(gate.fmt), gate.w_stride);
  Problem p{gate.fmt, static_cast<const uint8_t*>(gate.w), nullptr, 128, 128, out, in, x, 1, y,
            Slots{ids, gate.w_stride, 0, x_div}, S};
  p.sl.up_off = static_cast<const uint8_t*>(up.w) - static_cast<const uint8_t*>(gate.w);
  p.glu = true;
  launch_batch(p, stream);
}

void matvec_grouped(const ExpertWeights& ew, int out, int in, const int* ids, int S, const float* x, int x_div,
                    float* y, CUstream_st* stream, const float* silu_gate) {
  check_args("matvec_grouped", ew.fmt, ew.w, ew.scale, ew.bo, ew.bi, out, in, x);
  BIGMOE_CHECK(ids != nullptr, "matvec_grouped: ids is null");
  BIGMOE_CHECK(S >= 1 && S <= 65535, "matvec_grouped: slot count {} outside 1..65535", S);
  BIGMOE_CHECK(x_div >= 1, "matvec_grouped: x_div {} < 1", x_div);
  // Quant formats need every expert 16-byte aligned; BF16 / F32 need whole elements (an expert
  // stride that is not a multiple of 16 takes the scalar kernel).
  const size_t align = is_quant(ew.fmt) ? 16 : ew.fmt == WeightFormat::BF16 ? 2 : ew.fmt == WeightFormat::F32 ? 4 : 1;
  BIGMOE_CHECK(ew.w_stride % align == 0, "matvec_grouped: {} needs w_stride % {} == 0, got {}",
               weight_format_name(ew.fmt), align, ew.w_stride);
  launch_batch({ew.fmt, static_cast<const uint8_t*>(ew.w), ew.scale, ew.bo, ew.bi, out, in, x, 1, y,
                Slots{ids, ew.w_stride, ew.scale_stride, x_div, silu_gate}, S},
               stream);
}

}  // namespace bigmoe::cuda
