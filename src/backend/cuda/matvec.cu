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
//    copies a run of blocks (about 2-3 KB) into its own shared-memory buffer with coalesced
//    16-byte loads, then each lane decodes 8 consecutive weights from shared memory and dots
//    them with x (a warp owns R rows, 4 at B <= 2 else 2, so each x load serves R rows);
//    consecutive lanes take consecutive weights, so the x loads are coalesced
//    (a lane per 32-weight sub-block made every x load touch 32 cache lines, which bound it).
//  * BF16 / FP8 rows whose length breaks 16-byte alignment take a scalar fallback kernel.
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "backend/cuda/cuda_ops.h"
#include "util/error.h"

namespace bigmoe::cuda {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kChunkUnroll = 4;  // 16-byte chunks in flight per lane (BF16 / FP8)

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

// Combines the per-warp sums: warp-reduce, then the KSPLIT warps of a row through shared memory.
template <int NB>
__device__ __forceinline__ void finish(float (&acc)[NB], int row, int out, int ks, int ksplit, int B,
                                       float* __restrict__ y) {
  __shared__ float red[kWarps][NB];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int b = 0; b < NB; ++b) acc[b] = warp_sum(acc[b]);
  if (ksplit == 1) {
    if (row < out && lane == 0) {
#pragma unroll
      for (int b = 0; b < NB; ++b)
        if (b < B) y[size_t(b) * out + row] = acc[b];
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
    y[size_t(lane) * out + row] = s;
  }
}

// ---- BF16 / FP8: 16-byte chunks straight into registers ----

template <bool FP8, int NB, int R>
__global__ void __launch_bounds__(kThreads) matvec_dense(const uint8_t* __restrict__ w, const float* __restrict__ scale,
                                                         int out, int in, const float* __restrict__ x, int B,
                                                         float* __restrict__ y, int ksplit) {
  // R consecutive rows per warp: each x value loaded from L1 serves R rows (x loads, not
  // weight bytes, bound the single-row version).
  constexpr int EPC = FP8 ? 16 : 8;  // weights per 16-byte chunk
  constexpr int U = R >= 4 ? 2 : kChunkUnroll;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int row0 = (blockIdx.x * (kWarps / ksplit) + warp / ksplit) * R, ks = warp % ksplit;
  float acc[R][NB];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int b = 0; b < NB; ++b) acc[r][b] = 0.f;
  if (row0 < out) {
    const int nchunk = in / EPC;
    const int per = (nchunk + ksplit - 1) / ksplit;
    const int c0 = ks * per, c1 = min(nchunk, c0 + per);
    const size_t row_bytes = size_t(in) * (FP8 ? 1 : 2);
    const uint4* wr[R];
    const float* srow[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int row = min(row0 + r, out - 1);  // rows past the end re-read the last row, unused
      wr[r] = reinterpret_cast<const uint4*>(w + size_t(row) * row_bytes);
      srow[r] = FP8 ? scale + size_t(row / 128) * ((in + 127) / 128) : nullptr;
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
          const float sc = FP8 ? __ldg(srow[r] + (ci * EPC) / 128) : 1.f;
          if constexpr (FP8) {
#pragma unroll
            for (int k = 0; k < 4; ++k) {
              float2 a = fp8x2_to_float2(uint16_t(q[k] & 0xffff)), b2 = fp8x2_to_float2(uint16_t(q[k] >> 16));
              f[r][4 * k] = a.x * sc, f[r][4 * k + 1] = a.y * sc, f[r][4 * k + 2] = b2.x * sc, f[r][4 * k + 3] = b2.y * sc;
            }
          } else {
#pragma unroll
            for (int k = 0; k < 4; ++k) f[r][2 * k] = bf16_lo(q[k]), f[r][2 * k + 1] = bf16_hi(q[k]);
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
  for (int r = 0; r < R; ++r) finish<NB>(acc[r], row0 + r, out, ks, ksplit, B, y);
}

// Scalar fallback for BF16 / FP8 rows that are not 16-byte aligned (any in).
template <bool FP8, int NB>
__global__ void __launch_bounds__(kThreads) matvec_dense_scalar(const uint8_t* __restrict__ w,
                                                                const float* __restrict__ scale, int out, int in,
                                                                const float* __restrict__ x, int B,
                                                                float* __restrict__ y) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int row = blockIdx.x * kWarps + warp;
  float acc[NB];
#pragma unroll
  for (int b = 0; b < NB; ++b) acc[b] = 0.f;
  if (row < out) {
    const int sb = (in + 127) / 128;
    for (int i = lane; i < in; i += 32) {
      float wv;
      if constexpr (FP8) {
        __half_raw h = __nv_cvt_fp8_to_halfraw(__nv_fp8_storage_t(w[size_t(row) * in + i]), __NV_E4M3);
        wv = __half2float(__half(h)) * scale[size_t(row / 128) * sb + i / 128];
      } else {
        wv = bf16_lo(reinterpret_cast<const uint16_t*>(w)[size_t(row) * in + i]);
      }
#pragma unroll
      for (int b = 0; b < NB; ++b) acc[b] = fmaf(wv, x[size_t(b < B ? b : B - 1) * in + i], acc[b]);
    }
  }
  finish<NB>(acc, row, out, 0, 1, B, y);
}

// ---- ggml quant formats: stage blocks in shared memory, decode 32 weights per lane ----

template <WeightFormat F>
struct QTraits;
template <>
struct QTraits<WeightFormat::Q8_0> {
  static constexpr int QK = 32, BS = 34, G = 128;  // G blocks staged per warp and step, over its R rows
};
template <>
struct QTraits<WeightFormat::Q4_K> {
  static constexpr int QK = 256, BS = 144, G = 32;
};
template <>
struct QTraits<WeightFormat::Q6_K> {
  static constexpr int QK = 256, BS = 210, G = 16;
};

// The 8 weights 8*idx .. 8*idx+7 of the block at p (in shared memory).
template <WeightFormat F>
__device__ __forceinline__ void decode8(const uint8_t* p, int idx, float (&f)[8]) {
  if constexpr (F == WeightFormat::Q8_0) {
    const float d = half_at(p);
    const uint16_t* q = reinterpret_cast<const uint16_t*>(p + 2 + 8 * idx);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      uint16_t v = q[j];
      f[2 * j] = float(int8_t(v & 0xff)) * d;
      f[2 * j + 1] = float(int8_t(v >> 8)) * d;
    }
  } else if constexpr (F == WeightFormat::Q4_K) {
    const int sub = idx / 4, l0 = 8 * (idx % 4);
    const float d = half_at(p), dmin = half_at(p + 2);
    const uint8_t* s = p + 4;
    int sc, m;
    if (sub < 4) {
      sc = s[sub] & 63;
      m = s[sub + 4] & 63;
    } else {
      sc = (s[sub + 4] & 15) | ((s[sub - 4] >> 6) << 4);
      m = (s[sub + 4] >> 4) | ((s[sub] >> 6) << 4);
    }
    const float dl = d * float(sc), ml = dmin * float(m);
    const uint2 v = *reinterpret_cast<const uint2*>(p + 16 + 32 * (sub / 2) + l0);  // 8-byte aligned
    const int shift = 4 * (sub % 2);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      f[j] = dl * float((v.x >> (8 * j + shift)) & 15) - ml;
      f[4 + j] = dl * float((v.y >> (8 * j + shift)) & 15) - ml;
    }
  } else {  // Q6_K: e = 128h + 32k + l
    const int e0 = 8 * idx, h = e0 / 128, k = (e0 % 128) / 32, l0 = e0 % 32;
    const uint16_t* ql = reinterpret_cast<const uint16_t*>(p + 64 * h + 32 * (k % 2) + l0);
    const uint16_t* qh = reinterpret_cast<const uint16_t*>(p + 128 + 32 * h + l0);
    const float dl = half_at(p + 208) * float(reinterpret_cast<const int8_t*>(p + 192)[e0 / 16]);
    const int lsh = 4 * (k / 2), hsh = 2 * k;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const uint32_t lo = ql[j], hi = qh[j];
#pragma unroll
      for (int t = 0; t < 2; ++t) {
        int q = int(((lo >> (8 * t + lsh)) & 15) | (((hi >> (8 * t + hsh)) & 3) << 4)) - 32;
        f[2 * j + t] = dl * float(q);
      }
    }
  }
}

template <WeightFormat F, int NB, int R>
__global__ void __launch_bounds__(kThreads) matvec_quant(const uint8_t* __restrict__ w, int out, int in,
                                                         const float* __restrict__ x, int B,
                                                         float* __restrict__ y, int ksplit) {
  using T = QTraits<F>;
  constexpr int GR = T::G / R;                                // blocks per row and step
  constexpr int STAGE = (GR * T::BS + 16 + 15) / 16 * 16;     // bytes, + room for misalignment
  constexpr int MAXC = (STAGE / 16 + 31) / 32;                // 16-byte chunks per lane and row
  constexpr int LANES_PER_BLOCK = T::QK / 8;                  // lanes decoding one block
  constexpr int BLOCKS_PER_PASS = 32 / LANES_PER_BLOCK;
  __shared__ __align__(16) uint8_t stage[kWarps][R][STAGE];

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int row0 = (blockIdx.x * (kWarps / ksplit) + warp / ksplit) * R, ks = warp % ksplit;
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
    for (int g = g0; g < g1; g += GR) {
      const int nblk = min(GR, g1 - g);
      int off[R];
      uint4 v[R][MAXC];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const int row = min(row0 + r, out - 1);  // rows past the end re-read the last row, unused
        const uintptr_t start = reinterpret_cast<uintptr_t>(w) + size_t(row) * row_bytes + size_t(g) * T::BS;
        const uintptr_t base = start & ~uintptr_t(15);
        off[r] = int(start - base);
        const int nch = int((start + size_t(nblk) * T::BS - base + 15) / 16);
#pragma unroll
        for (int j = 0; j < MAXC; ++j) {
          const int c = lane + 32 * j;
          const uintptr_t a = base + 16 * size_t(c);
          if (c < nch) {
            if (a + 16 <= wend) {
              v[r][j] = __ldcs(reinterpret_cast<const uint4*>(a));
            } else {  // the matrix ends inside this chunk
              uint8_t tmp[16] = {};
              for (int t = 0; a + t < wend; ++t) tmp[t] = reinterpret_cast<const uint8_t*>(a)[t];
              v[r][j] = *reinterpret_cast<const uint4*>(tmp);
            }
          }
        }
      }
      __syncwarp();
#pragma unroll
      for (int r = 0; r < R; ++r)
#pragma unroll
        for (int j = 0; j < MAXC; ++j)
          if (lane + 32 * j < STAGE / 16) reinterpret_cast<uint4*>(stage[warp][r])[lane + 32 * j] = v[r][j];
      __syncwarp();
      for (int p = 0; p < nblk; p += BLOCKS_PER_PASS) {
        const int blk = p + lane / LANES_PER_BLOCK, sub = lane % LANES_PER_BLOCK;
        if (blk < nblk) {  // lanes read consecutive 32-byte pieces of x: coalesced
          float f[R][8];
#pragma unroll
          for (int r = 0; r < R; ++r) decode8<F>(stage[warp][r] + off[r] + blk * T::BS, sub, f[r]);
          const float* xp = x + size_t(g + blk) * T::QK + 8 * sub;
#pragma unroll
          for (int b = 0; b < NB; ++b) {
            const float* xb = xp + size_t(b < B ? b : B - 1) * in;
            const float4 x0 = __ldg(reinterpret_cast<const float4*>(xb));
            const float4 x1 = __ldg(reinterpret_cast<const float4*>(xb + 4));
#pragma unroll
            for (int r = 0; r < R; ++r) {
              float t = acc[r][b];
              t = fmaf(f[r][0], x0.x, t);
              t = fmaf(f[r][1], x0.y, t);
              t = fmaf(f[r][2], x0.z, t);
              t = fmaf(f[r][3], x0.w, t);
              t = fmaf(f[r][4], x1.x, t);
              t = fmaf(f[r][5], x1.y, t);
              t = fmaf(f[r][6], x1.z, t);
              t = fmaf(f[r][7], x1.w, t);
              acc[r][b] = t;
            }
          }
        }
      }
      __syncwarp();  // the next step overwrites the stage
    }
  }
#pragma unroll
  for (int r = 0; r < R; ++r) finish<NB>(acc[r], row0 + r, out, ks, ksplit, B, y);
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
int choose_ksplit(int out, int units_per_row, int min_units) {
  const long target = long(sm_count()) * 48;
  int k = 1;
  while (k < kWarps && long(out) * k < target && units_per_row / (2 * k) >= min_units) k *= 2;
  return k;
}

template <WeightFormat F, int NB>
void launch_quant(const uint8_t* w, int out, int in, const float* x, int B, float* y, cudaStream_t s) {
  constexpr int R = NB <= 2 ? 4 : 2;  // rows per warp
  const int rows = (out + R - 1) / R;
  const int k = choose_ksplit(rows, in / QTraits<F>::QK, F == WeightFormat::Q8_0 ? 64 : 16);
  const dim3 g(unsigned((rows + kWarps / k - 1) / (kWarps / k)));
  matvec_quant<F, NB, R><<<g, kThreads, 0, s>>>(w, out, in, x, B, y, k);
}

template <int NB>
void launch(WeightFormat fmt, const void* w, const float* scale, int out, int in, const float* x, int B, float* y,
            cudaStream_t s) {
  const auto* wb = static_cast<const uint8_t*>(w);
  switch (fmt) {
    case WeightFormat::BF16:
    case WeightFormat::FP8_E4M3: {
      const bool fp8 = fmt == WeightFormat::FP8_E4M3;
      const int epc = fp8 ? 16 : 8;
      const bool vec = in % epc == 0 && reinterpret_cast<uintptr_t>(w) % 16 == 0 &&
                       reinterpret_cast<uintptr_t>(x) % 16 == 0;
      if (!vec) {
        dim3 g(unsigned((out + kWarps - 1) / kWarps));
        if (fp8) matvec_dense_scalar<true, NB><<<g, kThreads, 0, s>>>(wb, scale, out, in, x, B, y);
        else matvec_dense_scalar<false, NB><<<g, kThreads, 0, s>>>(wb, scale, out, in, x, B, y);
        break;
      }
      constexpr int R = NB <= 2 ? 4 : 2;
      const int rows = (out + R - 1) / R;
      const int k = choose_ksplit(rows, in / epc, 64);
      const dim3 g(unsigned((rows + kWarps / k - 1) / (kWarps / k)));
      if (fp8) matvec_dense<true, NB, R><<<g, kThreads, 0, s>>>(wb, scale, out, in, x, B, y, k);
      else matvec_dense<false, NB, R><<<g, kThreads, 0, s>>>(wb, scale, out, in, x, B, y, k);
      break;
    }
    case WeightFormat::Q8_0: launch_quant<WeightFormat::Q8_0, NB>(wb, out, in, x, B, y, s); break;
    case WeightFormat::Q4_K: launch_quant<WeightFormat::Q4_K, NB>(wb, out, in, x, B, y, s); break;
    case WeightFormat::Q6_K: launch_quant<WeightFormat::Q6_K, NB>(wb, out, in, x, B, y, s); break;
  }
  check(cudaGetLastError(), "matvec launch");
}

}  // namespace

const char* weight_format_name(WeightFormat f) {
  switch (f) {
    case WeightFormat::BF16: return "BF16";
    case WeightFormat::FP8_E4M3: return "FP8";
    case WeightFormat::Q8_0: return "Q8_0";
    case WeightFormat::Q4_K: return "Q4_K";
    case WeightFormat::Q6_K: return "Q6_K";
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
  }
  return 0;
}

void matvec(WeightFormat fmt, const void* w, const float* scale, int out, int in, const float* x, int B, float* y,
            CUstream_st* stream) {
  BIGMOE_CHECK(out > 0 && in > 0, "matvec: bad shape [{} x {}]", out, in);
  BIGMOE_CHECK(B >= 1 && B <= 16, "matvec: batch {} outside 1..16", B);
  BIGMOE_CHECK(fmt != WeightFormat::FP8_E4M3 || scale != nullptr, "matvec: FP8 needs weight_scale_inv");
  if (fmt == WeightFormat::Q8_0 || fmt == WeightFormat::Q4_K || fmt == WeightFormat::Q6_K) {
    const int qk = fmt == WeightFormat::Q8_0 ? 32 : 256;
    BIGMOE_CHECK(in % qk == 0, "matvec: {} needs in % {} == 0, got {}", weight_format_name(fmt), qk, in);
    BIGMOE_CHECK(reinterpret_cast<uintptr_t>(w) % 16 == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0,
                 "matvec: {} needs 16-byte aligned w and x", weight_format_name(fmt));
  }
  if (B == 1) launch<1>(fmt, w, scale, out, in, x, B, y, stream);
  else if (B == 2) launch<2>(fmt, w, scale, out, in, x, B, y, stream);
  else if (B <= 4) launch<4>(fmt, w, scale, out, in, x, B, y, stream);
  else if (B <= 8) launch<8>(fmt, w, scale, out, in, x, B, y, stream);
  else launch<16>(fmt, w, scale, out, in, x, B, y, stream);
}

}  // namespace bigmoe::cuda
