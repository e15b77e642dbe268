// Prefill matrix products on tensor cores (gemm_bf16) and the whole-matrix decoder that feeds
// them (dequant_bf16), declared in model_ops.h.
//
// dequant_bf16: one thread per 8 consecutive outputs of the flattened [out, in] matrix, one
//   16-byte store each (coalesced). Quant blocks are decoded exactly as the CPU reference
//   (tensor/quant.cpp) does, every step rounded to float32 (__fmul_rn / __fsub_rn: no FMA
//   contraction), then rounded to BF16 (RNE, as dtype.h's f32_to_bf16). FP8: fp8 -> float
//   (exact) times its bo x bi block scale.
//
// gemm_bf16: y[T, out] = x[T, in] · Wᵀ as an M = T, N = out, K = in product with both operands
//   K-contiguous (mma.sync m16n8k16 .row.col, bf16 in, float32 accumulate). A block of 4 warps
//   (2 x 2) computes a BM x 128 tile of y, each warp a (BM/2) x 64 sub-tile; BM = 128, or 64
//   when 128-row tiles would leave SMs idle, and then, if even that leaves SMs idle, K is split
//   in two halves that add into a zeroed y (0 + a + b: deterministic). K advances in steps of 32
//   through a 4-stage ring of shared-memory tiles (rows padded to 40 bf16 = 80 bytes so
//   ldmatrix is conflict-free):
//    * W tiles come by cp.async (16 bytes, zero-filled past out / in), 3 tiles in flight;
//    * x tiles are float32 in memory: each thread loads its float4s into registers one step
//      ahead, rounds them to bf16 (RNE) and stores them into the ring, so the load latency
//      hides behind a step of MMAs and shared memory only ever holds bf16.
//   Fragments come from ldmatrix.x4, loaded one group of MMAs ahead. Blocks are numbered in
//   groups of 8 row tiles so that blocks running together share W and x tiles in L2. Edges:
//   rows of x past T and rows of W past out are zero-filled and their outputs not stored;
//   in % 8 == 0 keeps every 16-byte W chunk and float4 of x wholly inside or outside K.
//   Measured (bench_gemm, H100): ~250-290 TFLOP/s at T = 4096, ~140-210 at T = 512; the
//   128 x 128 tile streams about 24 bytes of L2 per 1k flops (x is read as float32), which
//   looks like the limit at that rate.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "backend/cuda/model_ops.h"
#include "util/error.h"

namespace bigmoe::cuda {
namespace {

// ---- dequant_bf16 ----

constexpr int kDqThreads = 256;

// float32 -> bf16 bits, round-to-nearest-even, NaN kept NaN (as f32_to_bf16 in tensor/dtype.h).
__device__ __forceinline__ uint32_t bf16_rne(float f) {
  uint32_t u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (u >> 16) | 0x40u;
  u += 0x7fffu + ((u >> 16) & 1u);
  return u >> 16;
}

__device__ __forceinline__ uint4 pack8(const float (&v)[8]) {
  uint32_t p[4];
#pragma unroll
  for (int k = 0; k < 4; ++k) p[k] = bf16_rne(v[2 * k]) | (bf16_rne(v[2 * k + 1]) << 16);
  return make_uint4(p[0], p[1], p[2], p[3]);
}

__device__ __forceinline__ float half_at(const uint8_t* p) {  // p 2-byte aligned
  return __half2float(__ushort_as_half(__ldg(reinterpret_cast<const unsigned short*>(p))));
}

__device__ __forceinline__ float fp8_to_float(uint8_t v) {  // exact: every e4m3 value is a half
  __half_raw h = __nv_cvt_fp8_to_halfraw(__nv_fp8_storage_t(v), __NV_E4M3);
  return __half2float(__half(h));
}

// 8 bytes at a 2-byte aligned address, as 8 values.
__device__ __forceinline__ void load8_a2(const uint8_t* p, uint8_t (&b)[8]) {
  const unsigned short* s = reinterpret_cast<const unsigned short*>(p);
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const unsigned short v = __ldg(s + k);
    b[2 * k] = uint8_t(v), b[2 * k + 1] = uint8_t(v >> 8);
  }
}

// F32 / FP8 (and any `in`): thread c decodes flat elements 8c .. 8c+7 of out * in.
// vec: the source allows 16-byte (F32) / 8-byte (FP8) loads of the 8 elements.
template <bool FP8>
__global__ void __launch_bounds__(kDqThreads) dequant_dense(const void* __restrict__ w, const float* __restrict__ scale,
                                                            int bo, int bi, int in, size_t n, bool vec,
                                                            bool one_scale, uint16_t* __restrict__ dst) {
  const size_t c = blockIdx.x * size_t(kDqThreads) + threadIdx.x;
  const size_t e0 = c * 8;
  if (e0 >= n) return;
  const int nsi = (in + bi - 1) / bi;
  float v[8];
  const bool full = e0 + 8 <= n;
  if (FP8) {
    const uint8_t* wb = static_cast<const uint8_t*>(w);
    uint8_t q[8];
    if (full && vec) {
      const uint2 u = __ldg(reinterpret_cast<const uint2*>(wb + e0));
#pragma unroll
      for (int k = 0; k < 4; ++k) q[k] = uint8_t(u.x >> (8 * k)), q[4 + k] = uint8_t(u.y >> (8 * k));
    } else {
#pragma unroll
      for (int k = 0; k < 8; ++k) q[k] = e0 + k < n ? __ldg(wb + e0 + k) : uint8_t(0);
    }
    int o = int(e0 / in), i = int(e0 % in);  // (row, column) of element e0 + k, stepped along
    if (full && one_scale) {  // in % 8 == 0 and bi % 8 == 0: the 8 share one row and scale block
      const float sc = __ldg(scale + size_t(o / bo) * nsi + i / bi);
#pragma unroll
      for (int k = 0; k < 8; ++k) v[k] = __fmul_rn(fp8_to_float(q[k]), sc);
    } else {
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        v[k] = e0 + k < n ? __fmul_rn(fp8_to_float(q[k]), __ldg(scale + size_t(o / bo) * nsi + i / bi)) : 0.f;
        if (++i == in) i = 0, ++o;
      }
    }
  } else {
    const float* wf = static_cast<const float*>(w);
    if (full && vec) {
      const float4 a = __ldg(reinterpret_cast<const float4*>(wf + e0));
      const float4 b = __ldg(reinterpret_cast<const float4*>(wf + e0) + 1);
      v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
    } else {
#pragma unroll
      for (int k = 0; k < 8; ++k) v[k] = e0 + k < n ? __ldg(wf + e0 + k) : 0.f;
    }
  }
  if (full) {
    *reinterpret_cast<uint4*>(dst + e0) = pack8(v);
  } else {
#pragma unroll
    for (int k = 0; k < 8; ++k)
      if (e0 + k < n) dst[e0 + k] = uint16_t(bf16_rne(v[k]));
  }
}

// ggml formats: thread c decodes weights 8j .. 8j+7 of row o (c = o * in/8 + j), inside one
// block (in % 32 == 0). w 16-byte aligned.
template <WeightFormat F>
__global__ void __launch_bounds__(kDqThreads) dequant_quant(const uint8_t* __restrict__ w, int in, size_t nchunk,
                                                            uint16_t* __restrict__ dst) {
  const size_t c = blockIdx.x * size_t(kDqThreads) + threadIdx.x;
  if (c >= nchunk) return;
  const int cpr = in / 8;
  const size_t o = c / cpr;
  const int e0 = int(c % cpr) * 8;
  float v[8];
  if constexpr (F == WeightFormat::Q8_0) {  // 34 bytes: f16 d | 32 int8; w = q * d
    const uint8_t* blk = w + o * size_t(in / 32) * 34 + size_t(e0 / 32) * 34;
    const float d = half_at(blk);
    uint8_t q[8];
    load8_a2(blk + 2 + (e0 % 32), q);
#pragma unroll
    for (int k = 0; k < 8; ++k) v[k] = __fmul_rn(float(int8_t(q[k])), d);
  } else if constexpr (F == WeightFormat::Q4_K) {
    // 144 bytes: f16 d | f16 dmin | 12 bytes scales | 128 bytes qs; w = (d sc_j) q - (dmin m_j)
    const uint8_t* blk = w + o * size_t(in / 256) * 144 + size_t(e0 / 256) * 144;
    const int e = e0 % 256, j = e / 32, l0 = e % 32;
    const float d = half_at(blk), dmin = half_at(blk + 2);
    const uint8_t* s = blk + 4;
    int sc, m;
    if (j < 4) {
      sc = __ldg(s + j) & 63;
      m = __ldg(s + j + 4) & 63;
    } else {
      sc = (__ldg(s + j + 4) & 15) | ((__ldg(s + j - 4) >> 6) << 4);
      m = (__ldg(s + j + 4) >> 4) | ((__ldg(s + j) >> 6) << 4);
    }
    const float dl = __fmul_rn(d, float(sc)), ml = __fmul_rn(dmin, float(m));
    const uint2 u = __ldg(reinterpret_cast<const uint2*>(blk + 16 + 32 * (j / 2) + l0));
    const int shift = 4 * (j % 2);
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      const uint32_t word = k < 4 ? u.x : u.y;
      const int q = (word >> (8 * (k % 4) + shift)) & 15;
      v[k] = __fsub_rn(__fmul_rn(dl, float(q)), ml);
    }
  } else {
    // Q6_K, 210 bytes: 128 ql | 64 qh | 16 int8 scales | f16 d. Weight e = 128h + 32k + l:
    // low nibble k/2 of ql[64h + 32(k%2) + l], bits 2k.. of qh[32h + l]; w = (d sc[e/16]) (q - 32)
    const uint8_t* blk = w + o * size_t(in / 256) * 210 + size_t(e0 / 256) * 210;
    const int e = e0 % 256, h = e / 128, k = (e % 128) / 32, l0 = e % 32;
    uint8_t ql[8], qh[8];
    load8_a2(blk + 64 * h + 32 * (k % 2) + l0, ql);
    load8_a2(blk + 128 + 32 * h + l0, qh);
    const float ds = __fmul_rn(half_at(blk + 208), float(int8_t(__ldg(blk + 192 + e / 16))));
#pragma unroll
    for (int t = 0; t < 8; ++t) {
      const int q = ((ql[t] >> (4 * (k / 2))) & 15) | (((qh[t] >> (2 * k)) & 3) << 4);
      v[t] = __fmul_rn(ds, float(q - 32));
    }
  }
  *reinterpret_cast<uint4*>(dst + c * 8) = pack8(v);
}

unsigned dq_blocks(size_t threads) { return unsigned((threads + kDqThreads - 1) / kDqThreads); }

// ---- gemm_bf16 ----

constexpr int kBK = 32;        // K step
constexpr int kLds = kBK + 8;  // shared row stride in bf16 (80 bytes: ldmatrix conflict-free)
constexpr int kStages = 4;     // ring depth
constexpr int kGroupM = 8;     // row tiles per block-numbering group

constexpr size_t gemm_smem_bytes(int bm, int bn) { return size_t(kStages) * (bm + bn) * kLds * 2; }

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

__device__ __forceinline__ void mma_bf16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);  // .x = lo (low half)
  return *reinterpret_cast<uint32_t*>(&v);
}

// A BM x BN tile of y per block; WARPS_M x WARPS_N warps, each a (BM / WARPS_M) x
// (BN / WARPS_N) sub-tile. With gridDim.y == 2 the block takes half of the K steps and adds its sums into y (zeroed before):
// 0 + a + b is the same float whichever half lands first, so the result stays deterministic.
template <int BM, int BN, int WARPS_M, int WARPS_N>
__global__ void __launch_bounds__(WARPS_M* WARPS_N * 32) gemm_bf16_kernel(const uint16_t* __restrict__ w, int out, int in,
                                                       const float* __restrict__ x, int T, float* __restrict__ y,
                                                       int tiles_m, int tiles_n) {
  constexpr int kThreads = WARPS_M * WARPS_N * 32;
  constexpr int WM = BM / WARPS_M, WN = BN / WARPS_N;  // warp tile
  constexpr int MT = WM / 16;                          // m16 tiles per warp
  constexpr int NT = WN / 8;                           // n8 tiles per warp (even: ldmatrix.x4 loads two)
  constexpr int XV = BM * kBK / 4 / kThreads;    // float4s of x per thread and step
  constexpr int WV = BN * kBK / 8 / kThreads;    // 16-byte W chunks per thread and step
  extern __shared__ __align__(16) uint16_t smem[];
  uint16_t* As = smem;                        // [kStages][BM][kLds]  x tiles
  uint16_t* Bs = smem + kStages * BM * kLds;  // [kStages][BN][kLds]  W tiles

  // Block numbering: groups of kGroupM row tiles, row tile fastest inside a group.
  const int pid = blockIdx.x, per_group = kGroupM * tiles_n;
  const int first_m = (pid / per_group) * kGroupM;
  const int gm = min(tiles_m - first_m, kGroupM);
  const int tm = first_m + (pid % per_group) % gm, tn = (pid % per_group) / gm;
  const int m0 = tm * BM, n0 = tn * BN;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp / WARPS_N, wn = warp % WARPS_N;
  const int KT_all = (in + kBK - 1) / kBK;
  const int ksplit = gridDim.y;
  const int kt0 = KT_all * int(blockIdx.y) / ksplit, KT = KT_all * (int(blockIdx.y) + 1) / ksplit - kt0;

  auto load_w = [&](int stage, int kt) {
    const int k0 = (kt0 + kt) * kBK;
    uint16_t* bs = Bs + stage * BN * kLds;
#pragma unroll
    for (int j = 0; j < WV; ++j) {
      const int c = tid + j * kThreads, r = c >> 2, kc = (c & 3) * 8;
      const bool ok = n0 + r < out && k0 + kc < in;
      const uint16_t* src = ok ? w + size_t(n0 + r) * in + k0 + kc : w;
      cp_async16(smem_addr(bs + r * kLds + kc), src, ok);
    }
  };
  float4 xr[XV];
  auto load_x = [&](int kt) {
    const int k0 = (kt0 + kt) * kBK;
#pragma unroll
    for (int j = 0; j < XV; ++j) {
      const int c = tid + j * kThreads, r = c >> 3, kc = (c & 7) * 4;
      xr[j] = m0 + r < T && k0 + kc < in ? __ldg(reinterpret_cast<const float4*>(x + size_t(m0 + r) * in + k0 + kc))
                                         : make_float4(0.f, 0.f, 0.f, 0.f);
    }
  };
  auto store_x = [&](int stage) {
    uint16_t* as = As + stage * BM * kLds;
#pragma unroll
    for (int j = 0; j < XV; ++j) {
      const int c = tid + j * kThreads, r = c >> 3, kc = (c & 7) * 4;
      *reinterpret_cast<uint2*>(as + r * kLds + kc) =
          make_uint2(pack_bf16x2(xr[j].x, xr[j].y), pack_bf16x2(xr[j].z, xr[j].w));
    }
  };

  float acc[MT][NT][4];
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int k = 0; k < 4; ++k) acc[i][j][k] = 0.f;

  // Prologue: W tiles 0 .. kStages-2 in flight, x tile 0 in the ring, x tile 1 in registers.
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < KT) load_w(s, s);
    cp_async_commit();
  }
  if (KT > 0) load_x(0), store_x(0);
  if (KT > 1) load_x(1);

  // ldmatrix lane offsets: A (x) rows lane % 16, k half lane / 16; B (W) rows lane % 8 plus
  // 8 for lanes >= 16, k half (lane / 8) % 2.
  const int a_off = (wm * WM + (lane & 15)) * kLds + (lane >> 4) * 8;
  const int b_off = (wn * WN + (lane & 7) + ((lane >> 4) << 3)) * kLds + ((lane >> 3) & 1) * 8;

  for (int kt = 0; kt < KT; ++kt) {
    cp_async_wait<kStages - 2>();  // W tile kt has landed (this thread's part)
    __syncthreads();               // ... everyone's, x tile kt too; stage (kt-1) % kStages is free
    {
      const int nk = kt + kStages - 1;
      if (nk < KT) load_w(nk % kStages, nk);
      cp_async_commit();
    }
    if (kt + 1 < KT) {
      store_x((kt + 1) % kStages);  // read at kt + 1, after the next barrier
      if (kt + 2 < KT) load_x(kt + 2);
    }
    const int stage = kt % kStages;
    const uint32_t as = smem_addr(As + stage * BM * kLds + a_off);
    const uint32_t bs = smem_addr(Bs + stage * BN * kLds + b_off);
    // Fragments are software-pipelined: the B pair (two n8 tiles) for the next group of MMAs,
    // and at the end of a k16 half the next half's A fragments, are loaded before the MMAs
    // of the current group are issued.
    constexpr int NP = NT / 2, NQ = (kBK / 16) * NP;
    uint32_t a[2][MT][4], b[2][4];
#pragma unroll
    for (int i = 0; i < MT; ++i) ldsm_x4(a[0][i], as + i * 16 * kLds * 2);
    ldsm_x4(b[0], bs);
#pragma unroll
    for (int q = 0; q < NQ; ++q) {  // q = k16 half * NP + B pair
      const int ki = q / NP, jp = q % NP;
      if (q + 1 < NQ) {
        const int k2 = (q + 1) / NP, j2 = (q + 1) % NP;
        ldsm_x4(b[(q + 1) & 1], bs + (j2 * 16 * kLds + k2 * 16) * 2);
        if (j2 == 0) {
#pragma unroll
          for (int i = 0; i < MT; ++i) ldsm_x4(a[k2 & 1][i], as + (i * 16 * kLds + k2 * 16) * 2);
        }
      }
#pragma unroll
      for (int i = 0; i < MT; ++i) {
        mma_bf16(acc[i][2 * jp], a[ki & 1][i], b[q & 1][0], b[q & 1][1]);
        mma_bf16(acc[i][2 * jp + 1], a[ki & 1][i], b[q & 1][2], b[q & 1][3]);
      }
    }
  }
  cp_async_wait<0>();  // no copies outstanding at exit (the trailing groups are empty)

  // Epilogue: c0, c1 at (row g, cols 2t, 2t+1), c2, c3 at row g + 8.
  const int g = lane >> 2, t4 = lane & 3;
  const bool pair = ksplit == 1 && (out & 1) == 0 && (reinterpret_cast<uintptr_t>(y) & 7) == 0;
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = m0 + wm * WM + i * 16 + g + 8 * h;
      if (row >= T) continue;
      float* yr = y + size_t(row) * out;
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        const int col = n0 + wn * WN + j * 8 + 2 * t4;
        const float v0 = acc[i][j][2 * h], v1 = acc[i][j][2 * h + 1];
        if (pair && col + 1 < out) {
          *reinterpret_cast<float2*>(yr + col) = make_float2(v0, v1);
        } else if (ksplit == 1) {
          if (col < out) yr[col] = v0;
          if (col + 1 < out) yr[col + 1] = v1;
        } else {
          if (col < out) atomicAdd(yr + col, v0);
          if (col + 1 < out) atomicAdd(yr + col + 1, v1);
        }
      }
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

// Tile configurations: BM x BN tile, WARPS_M x WARPS_N warps, K split in 1 or 2.
struct GemmCfg {
  int bm, bn, warps_m, warps_n, ksplit;
};
constexpr GemmCfg kCfgs[] = {{64, 128, 2, 2, 1}, {128, 128, 2, 2, 1}};

long cfg_blocks(const GemmCfg& c, int T, int out) {
  return long((T + c.bm - 1) / c.bm) * ((out + c.bn - 1) / c.bn) * c.ksplit;
}

// 128 x 128 tiles when they make at least 1.5 blocks per SM, else 64 x 128, split over K in
// two when even that leaves SMs idle and K is long (measured on H100 with bench_gemm --configs). BIGMOE_GEMM_CFG=BMxBN_WMxWN[s2] (e.g. 64x128_2x2s2)
// forces a configuration (a tuning knob for bench_gemm and the tests, read at every call).
GemmCfg choose_cfg(int T, int out, int in) {
  if (const char* e = std::getenv("BIGMOE_GEMM_CFG")) {
    for (GemmCfg c : kCfgs) {
      char name[48];
      std::snprintf(name, sizeof name, "%dx%d_%dx%d", c.bm, c.bn, c.warps_m, c.warps_n);
      const size_t len = std::strlen(name);
      if (std::strncmp(e, name, len) == 0 && (e[len] == 0 || std::strcmp(e + len, "s2") == 0)) {
        if (e[len]) c.ksplit = 2;
        return c;
      }
    }
  }
  const long sms = sm_count();
  const GemmCfg big = kCfgs[1], small = kCfgs[0];
  if (cfg_blocks(big, T, out) * 2 >= 3 * sms) return big;
  if (cfg_blocks(small, T, out) <= sms && in >= 1024) return GemmCfg{64, 128, 2, 2, 2};
  return small;
}

template <int BM, int BN, int WARPS_M, int WARPS_N>
void launch_gemm(const uint16_t* w, int out, int in, const float* x, int T, float* y, int ksplit, cudaStream_t s) {
  const auto kernel = gemm_bf16_kernel<BM, BN, WARPS_M, WARPS_N>;
  check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(gemm_smem_bytes(BM, BN))),
        "cudaFuncSetAttribute(gemm_bf16)");
  const int tiles_m = (T + BM - 1) / BM, tiles_n = (out + BN - 1) / BN;
  const long blocks = long(tiles_m) * tiles_n;
  BIGMOE_CHECK(blocks < (1L << 31), "gemm_bf16: {} x {} output too large", T, out);
  if (ksplit > 1) check(cudaMemsetAsync(y, 0, size_t(T) * out * sizeof(float), s), "gemm_bf16 memset");
  const dim3 grid{unsigned(blocks), unsigned(ksplit)};
  kernel<<<grid, WARPS_M * WARPS_N * 32, gemm_smem_bytes(BM, BN), s>>>(w, out, in, x, T, y, tiles_m, tiles_n);
}

}  // namespace

void dequant_bf16(WeightFormat fmt, const void* w, const float* scale, int bo, int bi, int out, int in, void* dst,
                  CUstream_st* stream) {
  BIGMOE_CHECK(out > 0 && in > 0, "dequant_bf16: bad shape [{} x {}]", out, in);
  BIGMOE_CHECK(w && dst, "dequant_bf16: null pointer");
  BIGMOE_CHECK(reinterpret_cast<uintptr_t>(dst) % 16 == 0, "dequant_bf16: dst must be 16-byte aligned");
  const size_t n = size_t(out) * in;
  auto* d16 = static_cast<uint16_t*>(dst);
  switch (fmt) {
    case WeightFormat::BF16:
      check(cudaMemcpyAsync(dst, w, n * 2, cudaMemcpyDeviceToDevice, stream), "dequant_bf16 copy");
      return;
    case WeightFormat::F32: {
      const bool vec = reinterpret_cast<uintptr_t>(w) % 16 == 0;
      dequant_dense<false><<<dq_blocks((n + 7) / 8), kDqThreads, 0, stream>>>(w, nullptr, 1, 1, in, n, vec, false, d16);
      break;
    }
    case WeightFormat::FP8_E4M3: {
      BIGMOE_CHECK(scale != nullptr, "dequant_bf16: FP8 needs weight_scale_inv");
      BIGMOE_CHECK(bo > 0 && bi > 0, "dequant_bf16: bad FP8 block size {} x {}", bo, bi);
      const bool vec = reinterpret_cast<uintptr_t>(w) % 8 == 0;
      dequant_dense<true><<<dq_blocks((n + 7) / 8), kDqThreads, 0, stream>>>(w, scale, bo, bi, in, n, vec,
                                                                               in % 8 == 0 && bi % 8 == 0, d16);
      break;
    }
    case WeightFormat::Q8_0:
    case WeightFormat::Q4_K:
    case WeightFormat::Q6_K: {
      const int qk = fmt == WeightFormat::Q8_0 ? 32 : 256;
      BIGMOE_CHECK(in % qk == 0, "dequant_bf16: {} needs in % {} == 0, got {}", weight_format_name(fmt), qk, in);
      BIGMOE_CHECK(reinterpret_cast<uintptr_t>(w) % 16 == 0, "dequant_bf16: {} needs a 16-byte aligned w",
                   weight_format_name(fmt));
      const auto* wb = static_cast<const uint8_t*>(w);
      const size_t nchunk = n / 8;
      const unsigned g = dq_blocks(nchunk);
      if (fmt == WeightFormat::Q8_0) dequant_quant<WeightFormat::Q8_0><<<g, kDqThreads, 0, stream>>>(wb, in, nchunk, d16);
      else if (fmt == WeightFormat::Q4_K) dequant_quant<WeightFormat::Q4_K><<<g, kDqThreads, 0, stream>>>(wb, in, nchunk, d16);
      else dequant_quant<WeightFormat::Q6_K><<<g, kDqThreads, 0, stream>>>(wb, in, nchunk, d16);
      break;
    }
    default: fail("dequant_bf16: unknown weight format {}", int(fmt));
  }
  check(cudaGetLastError(), "dequant_bf16 launch");
}

void gemm_bf16(const void* w_bf16, int out, int in, const float* x, int T, float* y, CUstream_st* stream) {
  BIGMOE_CHECK(out > 0 && in > 0 && T >= 0, "gemm_bf16: bad shape T={} out={} in={}", T, out, in);
  BIGMOE_CHECK(in % 8 == 0, "gemm_bf16: needs in % 8 == 0, got {}", in);
  if (T == 0) return;
  BIGMOE_CHECK(w_bf16 && x && y, "gemm_bf16: null pointer");
  BIGMOE_CHECK(reinterpret_cast<uintptr_t>(w_bf16) % 16 == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0,
               "gemm_bf16: needs 16-byte aligned w and x");
  const auto* w = static_cast<const uint16_t*>(w_bf16);
  const GemmCfg c = choose_cfg(T, out, in);
  if (c.bm == 64) launch_gemm<64, 128, 2, 2>(w, out, in, x, T, y, c.ksplit, stream);
  else launch_gemm<128, 128, 2, 2>(w, out, in, x, T, y, c.ksplit, stream);
  check(cudaGetLastError(), "gemm_bf16 launch");
}

}  // namespace bigmoe::cuda
