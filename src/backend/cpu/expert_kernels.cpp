// CPU expert kernels: repacking, activation quantization, the tile dot products (scalar, AVX2,
// AVX-512 VNNI; the AMX ones are in expert_kernels_amx.inc) and the parallel drivers. The
// layouts and the arithmetic are described at the top of expert_kernels.h.
//
// A tile kernel computes y[t][r] = W[tile rows r] · x_t for the R rows of one tile and a group of
// TG tokens held in registers (TG = 1, 2 or 4: the weights of a tile are decoded once per group
// and read again from L1/L2 for the next group). SIMD code carries per-function target
// attributes, so the binary runs on any x86-64 and picks the kernels at run time.
#include "backend/cpu/expert_kernels.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <utility>

#include "backend/cpu/expert_kernels_amx.h"
#include "backend/cpu/ref_ops.h"
#include "tensor/dtype.h"
#include "tensor/quant.h"
#include "tensor/quant_act.h"
#include "util/error.h"

#if defined(__x86_64__)
#define BIGMOE_EXPERT_X86 1
#include <cpuid.h>
#if defined(__linux__)
#include <sys/syscall.h>
#endif
// GCC 12's AVX-512 intrinsics start from _mm512_undefined_*(), which -Wall reports as
// uninitialized once inlined into target-attributed code.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#define BM_AVX2 __attribute__((target("avx2,fma,f16c")))
#define BM_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")))
#endif

namespace bigmoe::cpu {

namespace {

// ---- layout constants ----

constexpr int kQ4KPiece = 1152;  // bytes per tile per 256 k
constexpr int kQ80Piece = 272;   // per 32 k
constexpr int kFP8Piece = 64;    // per 16 k
constexpr int kBF16Piece = 128;  // per 16 k
constexpr int kChunkRows = 16;   // rows per work item (a multiple of every tile height)
constexpr int kPrefetch = 2048;  // bytes ahead of the loads that the kernels prefetch

int tile_rows_of(ExpertFormat f) { return f == ExpertFormat::Q4_K || f == ExpertFormat::Q8_0 ? 8 : 4; }
int block_of(ExpertFormat f) {
  switch (f) {
    case ExpertFormat::Q4_K: return 256;
    case ExpertFormat::Q8_0: return 32;
    default: return 16;
  }
}
int piece_of(ExpertFormat f) {
  switch (f) {
    case ExpertFormat::Q4_K: return kQ4KPiece;
    case ExpertFormat::Q8_0: return kQ80Piece;
    case ExpertFormat::FP8: return kFP8Piece;
    case ExpertFormat::BF16: return kBF16Piece;
  }
  return 0;
}

// Int formats: where row r's 8 bytes of a group sit. Q4_K: slot (8-byte quarter of the 32-byte
// group) and nibble; Q8_0: slot in the 64-byte group, order {0,1,4,5,2,3,6,7}.
inline int q4_slot(int r) { return (r & 1) + 2 * (r >> 2); }
inline int q4_shift(int r) { return ((r >> 1) & 1) * 4; }
inline int q8_slot(int r) { return q4_slot(r) + 4 * ((r >> 1) & 1); }

inline float half_at(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return f16_to_f32(h);
}

// ggml Q4_K 6-bit scale / min of sub-block j from the 12 packed bytes, and the inverse.
inline void k_scale_min(const uint8_t* s, int j, int& sc, int& m) {
  if (j < 4) {
    sc = s[j] & 63;
    m = s[j + 4] & 63;
  } else {
    sc = (s[j + 4] & 15) | ((s[j - 4] >> 6) << 4);
    m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
  }
}
void k_pack_scales(const int* sc, const int* m, uint8_t* s) {
  for (int j = 0; j < 4; ++j) {
    s[j] = uint8_t(sc[j] | (sc[j + 4] >> 4) << 6);
    s[j + 4] = uint8_t(m[j] | (m[j + 4] >> 4) << 6);
    s[j + 8] = uint8_t((sc[j + 4] & 15) | (m[j + 4] & 15) << 4);
  }
}
// Scale / min of sub-block j, row r from a packed Q4_K piece.
inline void piece_scale_min(const uint8_t* b, int j, int r, int& sc, int& m) {
  int lo = b[32 + 8 * j + r], hi = (b[96 + 8 * (j & 3) + r] >> (4 * (j >> 2))) & 15;
  sc = (lo & 15) | (hi & 3) << 4;
  m = (lo >> 4) | (hi >> 2) << 4;
}
inline int piece_q4(const uint8_t* b, int r, int k) {
  return (b[128 + 32 * (k / 8) + 8 * q4_slot(r) + k % 8] >> q4_shift(r)) & 15;
}
inline int8_t piece_q8(const uint8_t* b, int r, int k) {
  return int8_t(b[16 + 64 * (k / 8) + 8 * q8_slot(r) + k % 8]);
}

// ---- activations ----

enum class ActKind { Q8K, Q8_0, F32 };
ActKind act_kind(ExpertFormat f) {
  switch (f) {
    case ExpertFormat::Q4_K: return ActKind::Q8K;
    case ExpertFormat::Q8_0: return ActKind::Q8_0;
    default: return ActKind::F32;
  }
}
int act_block(ActKind k) { return k == ActKind::Q8K ? 256 : 32; }

// Activations of T tokens in the form one kernel family reads: token t's int8 row at q + t·K,
// block scales at d + t·K/block, Σq per 32 at s + t·K/32; or floats at x + t·ldx.
struct ActView {
  const int8_t* q = nullptr;
  const float* d = nullptr;
  const int16_t* s = nullptr;
  const float* x = nullptr;
  int K = 0;
  size_t ldx = 0;
};

void quantize_row_scalar(ActKind kind, const float* x, int K, int8_t* q, float* d, int16_t* s) {
  const int bs = act_block(kind);
  for (int b = 0; b < K / bs; ++b) {
    const float* xb = x + size_t(b) * bs;
    float amax = 0;
    for (int j = 0; j < bs; ++j) amax = std::max(amax, std::fabs(xb[j]));
    const float dd = amax / 127.f, id = amax != 0.0f ? 127.f / amax : 0.0f;
    d[b] = kind == ActKind::Q8_0 ? f16_to_f32(f32_to_f16(dd)) : dd;
    for (int j = 0; j < bs; ++j) q[size_t(b) * bs + j] = int8_t(std::nearbyint(xb[j] * id));
  }
  for (int g = 0; g < K / 32; ++g) {
    int sum = 0;
    for (int j = 0; j < 32; ++j) sum += q[size_t(g) * 32 + j];
    s[g] = int16_t(sum);
  }
}

#if BIGMOE_EXPERT_X86
BM_AVX2 inline float hmax8(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

BM_AVX2 inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

BM_AVX2 inline int hsum8i(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
  return _mm_cvtsi128_si32(s);
}

// Same values as quantize_row_scalar: the product x·id is one IEEE multiply either way, and
// cvtps rounds to nearest even as nearbyint does in the default rounding mode.
BM_AVX2 void quantize_row_avx2(ActKind kind, const float* x, int K, int8_t* q, float* d, int16_t* s) {
  const int bs = act_block(kind);
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int b = 0; b < K / bs; ++b) {
    const float* xb = x + size_t(b) * bs;
    __m256 mx = _mm256_setzero_ps();
    for (int i = 0; i < bs; i += 8) mx = _mm256_max_ps(mx, _mm256_and_ps(_mm256_loadu_ps(xb + i), absmask));
    const float amax = hmax8(mx);
    const float dd = amax / 127.f, id = amax != 0.0f ? 127.f / amax : 0.0f;
    d[b] = kind == ActKind::Q8_0 ? f16_to_f32(f32_to_f16(dd)) : dd;
    const __m256 vid = _mm256_set1_ps(id);
    for (int i = 0; i < bs; i += 32) {
      __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xb + i), vid));
      __m256i i1 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xb + i + 8), vid));
      __m256i i2 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xb + i + 16), vid));
      __m256i i3 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xb + i + 24), vid));
      s[(size_t(b) * bs + i) / 32] =
          int16_t(hsum8i(_mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3))));
      __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + size_t(b) * bs + i),
                          _mm256_permutevar8x32_epi32(p, order));
    }
  }
}
#endif

void quantize_row(ActKind kind, const float* x, int K, int8_t* q, float* d, int16_t* s, CpuIsa isa) {
#if BIGMOE_EXPERT_X86
  if (isa != CpuIsa::Scalar) return quantize_row_avx2(kind, x, K, q, d, s);
#endif
  quantize_row_scalar(kind, x, K, q, d, s);
}

// ---- tile kernels ----

struct TileArgs {
  const uint8_t* tile = nullptr;
  const float* srow = nullptr;  // FP8: the tile's row of block scales
  int K = 0, bi = 0;
  const ActView* a = nullptr;
  int nt = 0;          // tokens 0..nt of a
  float* y = nullptr;  // y[t * ldy + r], r < tile rows
  size_t ldy = 0;
};

using GroupFn = void (*)(const TileArgs&, int t0);
struct KernelSet {
  GroupFn g1 = nullptr, g2 = nullptr, g4 = nullptr;
  // AMX: 16-row chunks of jobs with at least chunk_min_rows rows go to the tile kernel instead.
  amx::ChunkFn chunk = nullptr;
  int chunk_min_rows = 0;
};

// Scalar kernels on the packed layouts (one token per call): integer sums exact, the rest in
// double. The reference the SIMD kernels are tested against.
void q4k_scalar(const TileArgs& ta, int t) {
  const ActView& a = *ta.a;
  const int nsb = ta.K / 256;
  const int8_t* aq = a.q + size_t(t) * ta.K;
  const float* ad = a.d + size_t(t) * nsb;
  const int16_t* as = a.s + size_t(t) * (ta.K / 32);
  for (int r = 0; r < 8; ++r) {
    double acc = 0;
    for (int sb = 0; sb < nsb; ++sb) {
      const uint8_t* b = ta.tile + size_t(sb) * kQ4KPiece;
      int64_t isum = 0, msum = 0;
      for (int j = 0; j < 8; ++j) {
        int sc, m;
        piece_scale_min(b, j, r, sc, m);
        int dot = 0;
        for (int l = 0; l < 32; ++l) dot += piece_q4(b, r, 32 * j + l) * aq[256 * sb + 32 * j + l];
        isum += int64_t(sc) * dot;
        msum += int64_t(m) * as[8 * sb + j];
      }
      acc += double(half_at(b + 2 * r)) * ad[sb] * double(isum) -
             double(half_at(b + 16 + 2 * r)) * ad[sb] * double(msum);
    }
    ta.y[size_t(t) * ta.ldy + r] = float(acc);
  }
}

void q80_scalar(const TileArgs& ta, int t) {
  const ActView& a = *ta.a;
  const int nb = ta.K / 32;
  const int8_t* aq = a.q + size_t(t) * ta.K;
  const float* ad = a.d + size_t(t) * nb;
  for (int r = 0; r < 8; ++r) {
    double acc = 0;
    for (int b = 0; b < nb; ++b) {
      const uint8_t* blk = ta.tile + size_t(b) * kQ80Piece;
      int dot = 0;
      for (int k = 0; k < 32; ++k) dot += piece_q8(blk, r, k) * aq[32 * b + k];
      acc += double(half_at(blk + 2 * r)) * ad[b] * dot;
    }
    ta.y[size_t(t) * ta.ldy + r] = float(acc);
  }
}

template <ExpertFormat F>
void float_scalar(const TileArgs& ta, int t) {
  const float* x = ta.a->x + size_t(t) * ta.a->ldx;
  for (int r = 0; r < 4; ++r) {
    double acc = 0;
    for (int k = 0; k < ta.K; ++k) {
      float w;
      if constexpr (F == ExpertFormat::FP8) {
        w = f8e4m3_to_f32(ta.tile[size_t(k / 16) * kFP8Piece + 16 * r + k % 16]) * ta.srow[k / ta.bi];
      } else {
        uint16_t h;
        std::memcpy(&h, ta.tile + size_t(k / 16) * kBF16Piece + 32 * r + 2 * (k % 16), 2);
        w = bf16_to_f32(h);
      }
      acc += double(w) * x[k];
    }
    ta.y[size_t(t) * ta.ldy + r] = float(acc);
  }
}

#if BIGMOE_EXPERT_X86

BM_AVX2 inline int64_t load_i64(const void* p) {
  int64_t v;
  std::memcpy(&v, p, 8);
  return v;
}
BM_AVX2 inline int32_t load_i32(const void* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}
// Software prefetch of the piece kPrefetch bytes ahead: the hardware streamers stop at 4 KiB
// page boundaries and a thread's tiles are a few tens of KiB; this keeps the loads in flight
// (about +10% of streamed GB/s on the development machine).
BM_AVX2 inline void prefetch_ahead(const uint8_t* p, int bytes) {
  for (int l = 0; l < bytes; l += 64) _mm_prefetch(reinterpret_cast<const char*>(p + kPrefetch + l), _MM_HINT_T0);
}
BM_AVX2 inline __m256i loadu256(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }
BM_AVX2 inline __m128i loadu128(const void* p) { return _mm_loadu_si128(static_cast<const __m128i*>(p)); }

// The 64 six-bit scales and mins of a Q4_K piece as bytes, sc[8j + r] and mn[8j + r].
BM_AVX2 inline void q4k_unpack_scales(const uint8_t* b, uint8_t* sc, uint8_t* mn) {
  const __m256i m4 = _mm256_set1_epi8(15), m3 = _mm256_set1_epi8(3);
  const __m256i L0 = loadu256(b + 32), L1 = loadu256(b + 64), H = loadu256(b + 96);
  const __m256i Hl = _mm256_and_si256(H, m4), Hh = _mm256_and_si256(_mm256_srli_epi16(H, 4), m4);
  // (values <= 3 shifted left by 4 stay inside their byte)
  _mm256_store_si256(reinterpret_cast<__m256i*>(sc),
                     _mm256_or_si256(_mm256_and_si256(L0, m4), _mm256_slli_epi16(_mm256_and_si256(Hl, m3), 4)));
  _mm256_store_si256(reinterpret_cast<__m256i*>(sc + 32),
                     _mm256_or_si256(_mm256_and_si256(L1, m4), _mm256_slli_epi16(_mm256_and_si256(Hh, m3), 4)));
  _mm256_store_si256(reinterpret_cast<__m256i*>(mn),
                     _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(L0, 4), m4),
                                     _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(Hl, 2), m3), 4)));
  _mm256_store_si256(reinterpret_cast<__m256i*>(mn + 32),
                     _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(L1, 4), m4),
                                     _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(Hh, 2), m3), 4)));
}

// Σ_j m[r][j] · bsum[j] for rows 0..7 (int32 lanes in row order): madd of (m[r][2p], m[r][2p+1])
// pairs with the activation's (bsum[2p], bsum[2p+1]).
BM_AVX2 inline __m256i q4k_min_sums(const uint8_t* mn, const int16_t* bs) {
  __m256i acc = _mm256_setzero_si256();
  for (int p = 0; p < 4; ++p) {
    __m128i pair = _mm_unpacklo_epi8(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(mn + 16 * p)),
                                     _mm_loadl_epi64(reinterpret_cast<const __m128i*>(mn + 16 * p + 8)));
    acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_cvtepu8_epi16(pair), _mm256_set1_epi32(load_i32(bs + 2 * p))));
  }
  return acc;
}

// Shuffles that spread the 8 scale bytes of one sub-block (one per row) to the int16 lanes of
// the low-nibble rows {0,1,4,5} and the high-nibble rows {2,3,6,7}, four lanes per row.
#define BM_SC_PAT(a, b)                                                                         \
  a, -128, a, -128, a, -128, a, -128, b, -128, b, -128, b, -128, b, -128
#define BM_Q4K_PAT_LO BM_SC_PAT(0, 1), BM_SC_PAT(4, 5)
#define BM_Q4K_PAT_HI BM_SC_PAT(2, 3), BM_SC_PAT(6, 7)

// One super-block's end: acc += d·da·Σ sc·(q·a) − dmin·da·Σ m·bsum, rows 0..7 in the lanes.
BM_AVX2 inline __m256 q4k_finish(__m256 acc, __m256i isum, const uint8_t* b, const uint8_t* mn,
                                 const int16_t* bs, float da) {
  const __m256 vda = _mm256_set1_ps(da);
  const __m256 dd = _mm256_mul_ps(_mm256_cvtph_ps(loadu128(b)), vda);
  const __m256 dm = _mm256_mul_ps(_mm256_cvtph_ps(loadu128(b + 16)), vda);
  acc = _mm256_fmadd_ps(dd, _mm256_cvtepi32_ps(isum), acc);
  return _mm256_fnmadd_ps(dm, _mm256_cvtepi32_ps(q4k_min_sums(mn, bs)), acc);
}

template <int TG>
BM_AVX2 void q4k_avx2(const TileArgs& ta, int t0) {
  const ActView& a = *ta.a;
  const int K = ta.K, nsb = K / 256;
  const __m256i m4 = _mm256_set1_epi8(15);
  const __m256i pat_lo = _mm256_setr_epi8(BM_Q4K_PAT_LO), pat_hi = _mm256_setr_epi8(BM_Q4K_PAT_HI);
  const int8_t* aq[TG];
  for (int t = 0; t < TG; ++t) aq[t] = a.q + size_t(t0 + t) * K;
  __m256 acc[TG];
  for (int t = 0; t < TG; ++t) acc[t] = _mm256_setzero_ps();
  alignas(32) uint8_t sc[64], mn[64];
  for (int sb = 0; sb < nsb; ++sb) {
    const uint8_t* b = ta.tile + size_t(sb) * kQ4KPiece;
    const uint8_t* qs = b + 128;
    prefetch_ahead(b, kQ4KPiece);
    q4k_unpack_scales(b, sc, mn);
    __m256i isl[TG], ish[TG];
    for (int t = 0; t < TG; ++t) isl[t] = ish[t] = _mm256_setzero_si256();
    for (int j = 0; j < 8; ++j) {
      __m256i pl[TG], ph[TG];
      for (int g = 0; g < 4; ++g) {
        const __m256i raw = loadu256(qs + 32 * (4 * j + g));
        const __m256i wl = _mm256_and_si256(raw, m4), wh = _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4);
        for (int t = 0; t < TG; ++t) {
          const __m256i a8 = _mm256_set1_epi64x(load_i64(aq[t] + 256 * sb + 32 * j + 8 * g));
          const __m256i l = _mm256_maddubs_epi16(wl, a8), h = _mm256_maddubs_epi16(wh, a8);
          pl[t] = g ? _mm256_add_epi16(pl[t], l) : l;  // <= 4·2·15·127 = 15240: no overflow
          ph[t] = g ? _mm256_add_epi16(ph[t], h) : h;
        }
      }
      const __m256i s8 = _mm256_set1_epi64x(load_i64(sc + 8 * j));
      const __m256i slo = _mm256_shuffle_epi8(s8, pat_lo), shi = _mm256_shuffle_epi8(s8, pat_hi);
      for (int t = 0; t < TG; ++t) {
        isl[t] = _mm256_add_epi32(isl[t], _mm256_madd_epi16(pl[t], slo));
        ish[t] = _mm256_add_epi32(ish[t], _mm256_madd_epi16(ph[t], shi));
      }
    }
    for (int t = 0; t < TG; ++t) {
      const size_t tt = size_t(t0 + t);
      acc[t] = q4k_finish(acc[t], _mm256_hadd_epi32(isl[t], ish[t]), b, mn, a.s + tt * (K / 32) + 8 * sb,
                          a.d[tt * nsb + sb]);
    }
  }
  for (int t = 0; t < TG; ++t) _mm256_storeu_ps(ta.y + size_t(t0 + t) * ta.ldy, acc[t]);
}

template <int TG>
BM_AVX2 void q80_avx2(const TileArgs& ta, int t0) {
  const ActView& a = *ta.a;
  const int K = ta.K, nb = K / 32;
  const __m256i ones = _mm256_set1_epi16(1);
  const int8_t* aq[TG];
  const float* ad[TG];
  for (int t = 0; t < TG; ++t) aq[t] = a.q + size_t(t0 + t) * K, ad[t] = a.d + size_t(t0 + t) * nb;
  __m256 acc[TG];
  for (int t = 0; t < TG; ++t) acc[t] = _mm256_setzero_ps();
  for (int b = 0; b < nb; ++b) {
    const uint8_t* blk = ta.tile + size_t(b) * kQ80Piece;
    prefetch_ahead(blk, kQ80Piece);
    __m256i il[TG], ih[TG];
    for (int g = 0; g < 4; ++g) {
      const __m256i w0 = loadu256(blk + 16 + 64 * g), w1 = loadu256(blk + 48 + 64 * g);
      const __m256i u0 = _mm256_abs_epi8(w0), u1 = _mm256_abs_epi8(w1);
      for (int t = 0; t < TG; ++t) {
        const __m256i a8 = _mm256_set1_epi64x(load_i64(aq[t] + 32 * b + 8 * g));
        // |w| · (a with w's sign): pairs <= 2·128·127 fit maddubs' int16.
        const __m256i l = _mm256_madd_epi16(_mm256_maddubs_epi16(u0, _mm256_sign_epi8(a8, w0)), ones);
        const __m256i h = _mm256_madd_epi16(_mm256_maddubs_epi16(u1, _mm256_sign_epi8(a8, w1)), ones);
        il[t] = g ? _mm256_add_epi32(il[t], l) : l;
        ih[t] = g ? _mm256_add_epi32(ih[t], h) : h;
      }
    }
    const __m256 dv = _mm256_cvtph_ps(loadu128(blk));
    for (int t = 0; t < TG; ++t)
      acc[t] = _mm256_fmadd_ps(_mm256_mul_ps(dv, _mm256_set1_ps(ad[t][b])),
                               _mm256_cvtepi32_ps(_mm256_hadd_epi32(il[t], ih[t])), acc[t]);
  }
  for (int t = 0; t < TG; ++t) _mm256_storeu_ps(ta.y + size_t(t0 + t) * ta.ldy, acc[t]);
}

// 16 weights of one row as two vectors of 8 floats. FP8 e4m3 → the f16 with the same sign,
// exponent and mantissa bits (v << 7, sign to bit 15) is exactly v / 256, subnormals included;
// `s` = 256 · block scale puts the value back and applies the scale in one rounding, as the
// reference's fp8 · scale. (The NaN encodings 0x7f / 0xff are not special-cased.)
BM_AVX2 inline void fp8x16_avx2(const uint8_t* p, __m256 s, __m256& w0, __m256& w1) {
  __m256i v = _mm256_cvtepu8_epi16(loadu128(p));
  v = _mm256_and_si256(_mm256_srai_epi16(_mm256_slli_epi16(v, 8), 1), _mm256_set1_epi16(int16_t(0xbf80)));
  w0 = _mm256_mul_ps(_mm256_cvtph_ps(_mm256_castsi256_si128(v)), s);
  w1 = _mm256_mul_ps(_mm256_cvtph_ps(_mm256_extracti128_si256(v, 1)), s);
}
BM_AVX2 inline void bf16x16_avx2(const uint8_t* p, __m256& w0, __m256& w1) {
  w0 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(loadu128(p)), 16));
  w1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(loadu128(p + 16)), 16));
}

template <ExpertFormat F, int TG>
BM_AVX2 void float_avx2(const TileArgs& ta, int t0) {
  constexpr bool kFP8 = F == ExpertFormat::FP8;
  constexpr int kPiece = kFP8 ? kFP8Piece : kBF16Piece, kRow = kPiece / 4;
  const float* x[TG];
  for (int t = 0; t < TG; ++t) x[t] = ta.a->x + size_t(t0 + t) * ta.a->ldx;
  __m256 acc[4][TG];
  for (int r = 0; r < 4; ++r)
    for (int t = 0; t < TG; ++t) acc[r][t] = _mm256_setzero_ps();
  const int step = kFP8 ? ta.bi : ta.K;  // k per scale block
  for (int k0 = 0; k0 < ta.K; k0 += step) {
    const __m256 s = _mm256_set1_ps(kFP8 ? 256.0f * ta.srow[k0 / step] : 1.0f);
    const int k1 = std::min(ta.K, k0 + step);
    for (int k = k0; k < k1; k += 16) {
      const uint8_t* p = ta.tile + size_t(k / 16) * kPiece;
      prefetch_ahead(p, kPiece);
      for (int r = 0; r < 4; ++r) {
        __m256 w0, w1;
        if constexpr (kFP8) fp8x16_avx2(p + kRow * r, s, w0, w1);
        else bf16x16_avx2(p + kRow * r, w0, w1);
        for (int t = 0; t < TG; ++t) {
          acc[r][t] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x[t] + k), acc[r][t]);
          acc[r][t] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x[t] + k + 8), acc[r][t]);
        }
      }
    }
  }
  for (int t = 0; t < TG; ++t)
    for (int r = 0; r < 4; ++r) ta.y[size_t(t0 + t) * ta.ldy + r] = hsum8(acc[r][t]);
}

// ---- AVX-512 (F/BW/VL/VNNI) ----

template <int TG>
BM_AVX512 void q4k_avx512(const TileArgs& ta, int t0) {
  const ActView& a = *ta.a;
  const int K = ta.K, nsb = K / 256;
  const __m512i m4 = _mm512_set1_epi8(15);
  const __m512i pat_lo = _mm512_broadcast_i64x4(_mm256_setr_epi8(BM_Q4K_PAT_LO));
  const __m512i pat_hi = _mm512_broadcast_i64x4(_mm256_setr_epi8(BM_Q4K_PAT_HI));
  const __m512i apick = _mm512_setr_epi64(0, 0, 0, 0, 1, 1, 1, 1);  // group g | group g + 1
  const int8_t* aq[TG];
  for (int t = 0; t < TG; ++t) aq[t] = a.q + size_t(t0 + t) * K;
  __m256 acc[TG];
  for (int t = 0; t < TG; ++t) acc[t] = _mm256_setzero_ps();
  alignas(32) uint8_t sc[64], mn[64];
  for (int sb = 0; sb < nsb; ++sb) {
    const uint8_t* b = ta.tile + size_t(sb) * kQ4KPiece;
    const uint8_t* qs = b + 128;
    prefetch_ahead(b, kQ4KPiece);
    q4k_unpack_scales(b, sc, mn);
    __m512i isl[TG], ish[TG];
    for (int t = 0; t < TG; ++t) isl[t] = ish[t] = _mm512_setzero_si512();
    for (int j = 0; j < 8; ++j) {
      __m512i pl[TG], ph[TG];
      for (int h = 0; h < 2; ++h) {  // two 64-byte vectors = groups 4j + 2h, 4j + 2h + 1
        const __m512i raw = _mm512_loadu_si512(qs + 64 * (2 * j + h));
        const __m512i wl = _mm512_and_si512(raw, m4), wh = _mm512_and_si512(_mm512_srli_epi16(raw, 4), m4);
        for (int t = 0; t < TG; ++t) {
          const __m512i a16 = _mm512_permutexvar_epi64(
              apick, _mm512_castsi128_si512(loadu128(aq[t] + 256 * sb + 32 * j + 16 * h)));
          const __m512i l = _mm512_maddubs_epi16(wl, a16), hh = _mm512_maddubs_epi16(wh, a16);
          pl[t] = h ? _mm512_add_epi16(pl[t], l) : l;
          ph[t] = h ? _mm512_add_epi16(ph[t], hh) : hh;
        }
      }
      const __m512i s8 = _mm512_set1_epi64(load_i64(sc + 8 * j));
      const __m512i slo = _mm512_shuffle_epi8(s8, pat_lo), shi = _mm512_shuffle_epi8(s8, pat_hi);
      for (int t = 0; t < TG; ++t) {
        isl[t] = _mm512_dpwssd_epi32(isl[t], pl[t], slo);
        ish[t] = _mm512_dpwssd_epi32(ish[t], ph[t], shi);
      }
    }
    for (int t = 0; t < TG; ++t) {
      const size_t tt = size_t(t0 + t);
      const __m256i l = _mm256_add_epi32(_mm512_castsi512_si256(isl[t]), _mm512_extracti64x4_epi64(isl[t], 1));
      const __m256i h = _mm256_add_epi32(_mm512_castsi512_si256(ish[t]), _mm512_extracti64x4_epi64(ish[t], 1));
      acc[t] = q4k_finish(acc[t], _mm256_hadd_epi32(l, h), b, mn, a.s + tt * (K / 32) + 8 * sb, a.d[tt * nsb + sb]);
    }
  }
  for (int t = 0; t < TG; ++t) _mm256_storeu_ps(ta.y + size_t(t0 + t) * ta.ldy, acc[t]);
}

template <int TG>
BM_AVX512 void q80_avx512(const TileArgs& ta, int t0) {
  const ActView& a = *ta.a;
  const int K = ta.K, nb = K / 32;
  const __m512i x80 = _mm512_set1_epi8(int8_t(0x80));
  // int32 lane l of a group's sums belongs to row {0,0,1,1,4,4,5,5,2,2,3,3,6,6,7,7}[l].
  const __m512i dlane = _mm512_setr_epi32(0, 0, 1, 1, 4, 4, 5, 5, 2, 2, 3, 3, 6, 6, 7, 7);
  const int8_t* aq[TG];
  const float* ad[TG];
  const int16_t* as[TG];
  for (int t = 0; t < TG; ++t) {
    aq[t] = a.q + size_t(t0 + t) * K;
    ad[t] = a.d + size_t(t0 + t) * nb;
    as[t] = a.s + size_t(t0 + t) * nb;
  }
  __m512 acc[TG];
  for (int t = 0; t < TG; ++t) acc[t] = _mm512_setzero_ps();
  for (int b = 0; b < nb; ++b) {
    const uint8_t* blk = ta.tile + size_t(b) * kQ80Piece;
    prefetch_ahead(blk, kQ80Piece);
    __m512i is[TG];
    for (int t = 0; t < TG; ++t) is[t] = _mm512_setzero_si512();
    for (int g = 0; g < 4; ++g) {
      const __m512i u = _mm512_xor_si512(_mm512_loadu_si512(blk + 16 + 64 * g), x80);  // w + 128
      for (int t = 0; t < TG; ++t)
        is[t] = _mm512_dpbusd_epi32(is[t], u, _mm512_set1_epi64(load_i64(aq[t] + 32 * b + 8 * g)));
    }
    const __m512 dv = _mm512_permutexvar_ps(dlane, _mm512_castps256_ps512(_mm256_cvtph_ps(loadu128(blk))));
    for (int t = 0; t < TG; ++t) {
      // Σ (w + 128)·a over a row's two lanes counts 128·Σa once: take 64·Σa from each lane.
      const __m512i exact = _mm512_sub_epi32(is[t], _mm512_set1_epi32(64 * as[t][b]));
      acc[t] = _mm512_fmadd_ps(_mm512_mul_ps(dv, _mm512_set1_ps(ad[t][b])), _mm512_cvtepi32_ps(exact), acc[t]);
    }
  }
  for (int t = 0; t < TG; ++t) {
    const __m256 lo = _mm512_castps512_ps256(acc[t]);
    const __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc[t]), 1));
    _mm256_storeu_ps(ta.y + size_t(t0 + t) * ta.ldy, _mm256_hadd_ps(lo, hi));
  }
}

BM_AVX512 inline __m512 fp8x16_avx512(const uint8_t* p, __m512 s) {
  __m256i v = _mm256_cvtepu8_epi16(loadu128(p));
  v = _mm256_and_si256(_mm256_srai_epi16(_mm256_slli_epi16(v, 8), 1), _mm256_set1_epi16(int16_t(0xbf80)));
  return _mm512_mul_ps(_mm512_cvtph_ps(v), s);
}
BM_AVX512 inline __m512 bf16x16_avx512(const uint8_t* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(loadu256(p)), 16));
}

template <ExpertFormat F, int TG>
BM_AVX512 void float_avx512(const TileArgs& ta, int t0) {
  constexpr bool kFP8 = F == ExpertFormat::FP8;
  constexpr int kPiece = kFP8 ? kFP8Piece : kBF16Piece, kRow = kPiece / 4;
  const float* x[TG];
  for (int t = 0; t < TG; ++t) x[t] = ta.a->x + size_t(t0 + t) * ta.a->ldx;
  __m512 acc[4][TG];
  for (int r = 0; r < 4; ++r)
    for (int t = 0; t < TG; ++t) acc[r][t] = _mm512_setzero_ps();
  const int step = kFP8 ? ta.bi : ta.K;
  for (int k0 = 0; k0 < ta.K; k0 += step) {
    const __m512 s = _mm512_set1_ps(kFP8 ? 256.0f * ta.srow[k0 / step] : 1.0f);
    const int k1 = std::min(ta.K, k0 + step);
    for (int k = k0; k < k1; k += 16) {
      const uint8_t* p = ta.tile + size_t(k / 16) * kPiece;
      prefetch_ahead(p, kPiece);
      for (int r = 0; r < 4; ++r) {
        __m512 w;
        if constexpr (kFP8) w = fp8x16_avx512(p + kRow * r, s);
        else w = bf16x16_avx512(p + kRow * r);
        for (int t = 0; t < TG; ++t) acc[r][t] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x[t] + k), acc[r][t]);
      }
    }
  }
  for (int t = 0; t < TG; ++t)
    for (int r = 0; r < 4; ++r) ta.y[size_t(t0 + t) * ta.ldy + r] = _mm512_reduce_add_ps(acc[r][t]);
}

#endif  // BIGMOE_EXPERT_X86

KernelSet kernels_for(ExpertFormat f, CpuIsa isa, int amx_min_rows) {
#if BIGMOE_EXPERT_X86
  if (isa == CpuIsa::AMX) {
    KernelSet ks = kernels_for(f, CpuIsa::AVX512, amx_min_rows);
    if (f == ExpertFormat::Q4_K) ks.chunk = amx::q4k_chunk_hw;
    if (f == ExpertFormat::Q8_0) ks.chunk = amx::q80_chunk_hw;
    ks.chunk_min_rows = amx_min_rows;
    return ks;
  }
  if (isa == CpuIsa::AVX512) {
    switch (f) {
      case ExpertFormat::Q4_K: return {q4k_avx512<1>, q4k_avx512<2>, q4k_avx512<4>};
      case ExpertFormat::Q8_0: return {q80_avx512<1>, q80_avx512<2>, q80_avx512<4>};
      case ExpertFormat::FP8:
        return {float_avx512<ExpertFormat::FP8, 1>, float_avx512<ExpertFormat::FP8, 2>,
                float_avx512<ExpertFormat::FP8, 4>};
      case ExpertFormat::BF16:
        return {float_avx512<ExpertFormat::BF16, 1>, float_avx512<ExpertFormat::BF16, 2>,
                float_avx512<ExpertFormat::BF16, 4>};
    }
  }
  // AVX2 has 16 vector registers: the int kernels keep two tokens per pass in them; the float
  // kernels take four (their decode is dearer, and 16 accumulators spill only a little).
  if (isa == CpuIsa::AVX2) {
    switch (f) {
      case ExpertFormat::Q4_K: return {q4k_avx2<1>, q4k_avx2<2>, nullptr};
      case ExpertFormat::Q8_0: return {q80_avx2<1>, q80_avx2<2>, nullptr};
      case ExpertFormat::FP8:
        return {float_avx2<ExpertFormat::FP8, 1>, float_avx2<ExpertFormat::FP8, 2>, float_avx2<ExpertFormat::FP8, 4>};
      case ExpertFormat::BF16:
        return {float_avx2<ExpertFormat::BF16, 1>, float_avx2<ExpertFormat::BF16, 2>, float_avx2<ExpertFormat::BF16, 4>};
    }
  }
#endif
  switch (f) {
    case ExpertFormat::Q4_K: return {q4k_scalar, nullptr, nullptr};
    case ExpertFormat::Q8_0: return {q80_scalar, nullptr, nullptr};
    case ExpertFormat::FP8: return {float_scalar<ExpertFormat::FP8>, nullptr, nullptr};
    case ExpertFormat::BF16: return {float_scalar<ExpertFormat::BF16>, nullptr, nullptr};
  }
  return {};
}

// y[t * ldy + (row - r0)] = W[row] · x_t for rows [r0, r0 + kChunkRows) ∩ [0, out) rounded up to
// whole tiles (y must have room for kChunkRows columns), t < nt.
void compute_chunk(const PackedMatrix& W, const KernelSet& ks, const ActView& a, int nt, int r0, float* y,
                   size_t ldy) {
  const int R = W.tile_rows();
  if (ks.chunk && nt >= ks.chunk_min_rows) {  // two 8-row tiles; y has room for 16 columns
    amx::Chunk c;
    c.tile0 = W.tile(r0 / R);
    c.tile1 = r0 / R + 1 < W.n_tiles() ? W.tile(r0 / R + 1) : c.tile0;
    c.K = W.in();
    c.q = a.q, c.d = a.d, c.s = a.s;
    c.nt = nt;
    c.y = y, c.ldy = ldy;
    ks.chunk(c);
    return;
  }
  TileArgs ta;
  ta.K = W.in();
  ta.bi = W.block_in();
  ta.a = &a;
  ta.nt = nt;
  ta.ldy = ldy;
  for (int tile = r0 / R; tile < W.n_tiles() && tile * R < r0 + kChunkRows; ++tile) {
    ta.tile = W.tile(tile);
    ta.srow = W.format() == ExpertFormat::FP8 ? W.scale_row(tile * R) : nullptr;
    ta.y = y + (tile * R - r0);
    int t = 0;
    if (ks.g4)
      for (; t + 4 <= nt; t += 4) ks.g4(ta, t);
    if (ks.g2)
      for (; t + 2 <= nt; t += 2) ks.g2(ta, t);
    for (; t < nt; ++t) ks.g1(ta, t);
  }
}

void check_isa(CpuIsa isa) {
  if (!cpu_isa_supported(isa))
    fail("CPU expert kernels: this CPU cannot run {} (best: {})", cpu_isa_name(isa), cpu_isa_name(cpu_isa_best()));
}

// AMX-TILE and AMX-INT8 (CPUID.(7,0):EDX bits 24, 25), kernels built for them, and the tile
// data state granted to this process: Linux enables it per process on request
// (ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA), and a tile instruction before that faults.
bool amx_tiles_usable() {
#if BIGMOE_EXPERT_X86 && defined(__linux__)
  if (!amx::q4k_chunk_hw || !amx::q80_chunk_hw) return false;
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(d & (1u << 24)) || !(d & (1u << 25))) return false;
  constexpr long kGetPerm = 0x1022, kReqPerm = 0x1023;  // ARCH_GET_XCOMP_PERM, ARCH_REQ_XCOMP_PERM
  constexpr int kXtileData = 18;
  if (syscall(SYS_arch_prctl, kReqPerm, kXtileData) != 0) return false;
  unsigned long perm = 0;
  return syscall(SYS_arch_prctl, kGetPerm, &perm) == 0 && (perm >> kXtileData) & 1;
#else
  return false;
#endif
}

CpuIsa detect_isa() {
#if BIGMOE_EXPERT_X86
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
  if (avx512 && amx_tiles_usable()) return CpuIsa::AMX;
  if (avx512) return CpuIsa::AVX512;
  if (avx2) return CpuIsa::AVX2;
#endif
  return CpuIsa::Scalar;
}

// Owned activation buffers of T tokens of one kind (arena-free: the runner keeps them).
struct ActBuf {
  ActKind kind = ActKind::F32;
  int K = 0;
  std::vector<int8_t> q;
  std::vector<float> d, x;
  std::vector<int16_t> s;
  void resize(ActKind k, int T, int n) {
    kind = k;
    K = n;
    if (k == ActKind::F32) {
      x.resize(size_t(T) * n);
    } else {
      // Whole 16-token tiles for the AMX kernels' loads (the padding rows' results are dropped).
      const size_t Tp = size_t(T + amx::kTileTokens - 1) / amx::kTileTokens * amx::kTileTokens;
      q.resize(Tp * n);
      d.resize(Tp * (n / act_block(k)));
      s.resize(Tp * (n / 32));
    }
  }
  // Fills token t from the float row src.
  void fill(int t, const float* src, CpuIsa isa) {
    if (kind == ActKind::F32) {
      std::copy_n(src, K, x.data() + size_t(t) * K);
      return;
    }
    quantize_row(kind, src, K, q.data() + size_t(t) * K, d.data() + size_t(t) * (K / act_block(kind)),
                 s.data() + size_t(t) * (K / 32), isa);
  }
  ActView view() const {
    ActView v;
    v.q = q.data();
    v.d = d.data();
    v.s = s.data();
    v.x = x.data();
    v.K = K;
    v.ldx = size_t(K);
    return v;
  }
};

}  // namespace

// ---- public: names, ISA ----

const char* expert_format_name(ExpertFormat f) {
  switch (f) {
    case ExpertFormat::Q4_K: return "Q4_K";
    case ExpertFormat::Q8_0: return "Q8_0";
    case ExpertFormat::FP8: return "FP8";
    case ExpertFormat::BF16: return "BF16";
  }
  return "?";
}

const char* cpu_isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::Scalar: return "scalar";
    case CpuIsa::AVX2: return "avx2";
    case CpuIsa::AVX512: return "avx512vnni";
    case CpuIsa::AMX: return "amx";
  }
  return "?";
}

CpuIsa cpu_isa_best() {
  static const CpuIsa best = detect_isa();
  return best;
}

bool cpu_isa_supported(CpuIsa isa) { return int(isa) <= int(cpu_isa_best()); }

QuantizedRow quantize_activation_row(ExpertFormat f, const float* x, int n, CpuIsa isa) {
  check_isa(isa);
  const ActKind k = act_kind(f);
  QuantizedRow r;
  if (k == ActKind::F32) return r;
  if (n % act_block(k)) fail("quantize_activation_row: {} is not a multiple of {}", n, act_block(k));
  r.q.resize(size_t(n));
  r.d.resize(size_t(n / act_block(k)));
  r.sum.resize(size_t(n / 32));
  quantize_row(k, x, n, r.q.data(), r.d.data(), r.sum.data(), isa);
  return r;
}

// ---- PackedMatrix ----

PackedMatrix::~PackedMatrix() { release(); }

PackedMatrix::PackedMatrix(PackedMatrix&& o) noexcept { *this = std::move(o); }

PackedMatrix& PackedMatrix::operator=(PackedMatrix&& o) noexcept {
  if (this != &o) {
    release();
    fmt_ = o.fmt_;
    out_ = o.out_, in_ = o.in_, tile_rows_ = o.tile_rows_, n_tiles_ = o.n_tiles_;
    tile_bytes_ = o.tile_bytes_;
    data_ = std::exchange(o.data_, nullptr);
    alloc_bytes_ = std::exchange(o.alloc_bytes_, 0);
    scales_ = std::move(o.scales_);
    bo_ = o.bo_, bi_ = o.bi_, sc_cols_ = o.sc_cols_;
  }
  return *this;
}

void PackedMatrix::release() {
  if (data_) munmap(data_, alloc_bytes_);
  data_ = nullptr;
  alloc_bytes_ = 0;
}

void PackedMatrix::allocate(int numa_node) {
  // Page-aligned anonymous memory (zero-filled: padding rows need no writes); from 2 MiB up,
  // aligned to 2 MiB and marked for transparent huge pages, which streaming needs (4 KiB pages
  // cost about a quarter of the read bandwidth in TLB misses).
  const size_t page = size_t(sysconf(_SC_PAGESIZE)), huge = size_t(2) << 20;
  const size_t need = std::max<size_t>(1, tile_bytes_ * size_t(n_tiles_));
  const size_t align = need >= huge ? huge : page;
  alloc_bytes_ = (need + align - 1) / align * align;
  const size_t span = alloc_bytes_ + (align > page ? align : 0);
  void* p = mmap(nullptr, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) {
    alloc_bytes_ = 0;
    fail("PackedMatrix: cannot map {} bytes for a [{}, {}] {} matrix", need, out_, in_, expert_format_name(fmt_));
  }
  uintptr_t a = (reinterpret_cast<uintptr_t>(p) + align - 1) / align * align;
  const uintptr_t end = reinterpret_cast<uintptr_t>(p) + span;
  if (a > reinterpret_cast<uintptr_t>(p)) munmap(p, a - reinterpret_cast<uintptr_t>(p));
  if (end > a + alloc_bytes_) munmap(reinterpret_cast<void*>(a + alloc_bytes_), end - (a + alloc_bytes_));
  data_ = reinterpret_cast<uint8_t*>(a);
#ifdef MADV_HUGEPAGE
  if (align == huge) madvise(data_, alloc_bytes_, MADV_HUGEPAGE);  // a hint only
#endif
  if (numa_node >= 0) bind_memory_to_node(data_, alloc_bytes_, numa_node);  // before the first touch
}

PackedMatrix PackedMatrix::pack(const Linear& W, int numa_node) {
  PackedMatrix m;
  m.out_ = W.out;
  m.in_ = W.in;
  const uint8_t* base = nullptr;
  size_t row_bytes = 0;
  std::string what;
  if (W.g) {
    what = "GGUF tensor '" + W.g->name + "'";
    switch (W.g->type) {
      case GgmlType::Q4_K: m.fmt_ = ExpertFormat::Q4_K; break;
      case GgmlType::Q8_0: m.fmt_ = ExpertFormat::Q8_0; break;
      case GgmlType::BF16: m.fmt_ = ExpertFormat::BF16; break;
      default:
        fail("PackedMatrix: {} has type {}; the CPU expert kernels take Q4_K, Q8_0, BF16 (GGUF) or FP8 / BF16 "
             "(checkpoint)",
             what, ggml_type_name(W.g->type));
    }
    base = W.g->data + W.g_offset;
    row_bytes = W.row_bytes;
  } else if (W.w) {
    what = "tensor '" + W.w->name + "'";
    if (W.w->dtype == DType::F8_E4M3 && W.scale) m.fmt_ = ExpertFormat::FP8;
    else if (W.w->dtype == DType::BF16 && !W.scale) m.fmt_ = ExpertFormat::BF16;
    else
      fail("PackedMatrix: {} has dtype {}{}; the CPU expert kernels take FP8 e4m3 with block scales or BF16", what,
           dtype_name(W.w->dtype), W.scale ? " with scales" : "");
    base = W.w->data;
    row_bytes = size_t(W.in) * dtype_size(W.w->dtype);
  } else {
    fail("PackedMatrix: a Linear of owned float32 rows has no CPU expert kernel");
  }
  const int blk = block_of(m.fmt_);
  if (W.out <= 0 || W.in <= 0 || W.in % blk)
    fail("PackedMatrix: {} is [{}, {}]; {} needs in > 0 and a multiple of {}", what, W.out, W.in,
         expert_format_name(m.fmt_), blk);
  if (W.g) {
    const size_t want = ggml_row_size(W.g->type, W.in);
    if (row_bytes != want) fail("PackedMatrix: {} has {} bytes per row, expected {}", what, row_bytes, want);
  }
  if (m.fmt_ == ExpertFormat::FP8) {
    if (W.bo <= 0 || W.bi <= 0 || W.bo % 4 || W.bi % 16)
      fail("PackedMatrix: {} has FP8 scale blocks {}x{}; the CPU layout needs rows a multiple of 4 and columns a "
           "multiple of 16",
           what, W.bo, W.bi);
    m.bo_ = W.bo;
    m.bi_ = W.bi;
    const int srows = (W.out + W.bo - 1) / W.bo;
    m.sc_cols_ = (W.in + W.bi - 1) / W.bi;
    if (W.scale->numel() != int64_t(srows) * m.sc_cols_)
      fail("PackedMatrix: {} scales have {} values, expected {}x{}", what, W.scale->numel(), srows, m.sc_cols_);
    m.scales_.resize(size_t(srows) * m.sc_cols_);
    to_f32(W.scale->dtype, W.scale->data, m.scales_.data(), m.scales_.size());
  } else {
    m.bi_ = blk;
  }
  m.tile_rows_ = tile_rows_of(m.fmt_);
  m.n_tiles_ = (W.out + m.tile_rows_ - 1) / m.tile_rows_;
  m.tile_bytes_ = size_t(W.in / blk) * size_t(piece_of(m.fmt_));
  m.allocate(numa_node);

  const int R = m.tile_rows_, npieces = W.in / blk;
  const ExpertFormat fmt = m.fmt_;
#pragma omp parallel for schedule(static)
  for (int tile = 0; tile < m.n_tiles_; ++tile) {
    uint8_t* dst = m.data_ + size_t(tile) * m.tile_bytes_;
    for (int r = 0; r < R; ++r) {
      const int o = tile * R + r;
      if (o >= W.out) break;  // padding rows stay zero
      const uint8_t* src = base + size_t(o) * row_bytes;
      for (int p = 0; p < npieces; ++p) {
        uint8_t* piece = dst + size_t(p) * piece_of(fmt);
        switch (fmt) {
          case ExpertFormat::Q4_K: {
            const uint8_t* b = src + size_t(p) * 144;
            std::memcpy(piece + 2 * r, b, 2);
            std::memcpy(piece + 16 + 2 * r, b + 2, 2);
            for (int j = 0; j < 8; ++j) {
              int sc, mm;
              k_scale_min(b + 4, j, sc, mm);
              piece[32 + 8 * j + r] = uint8_t((sc & 15) | (mm & 15) << 4);
              piece[96 + 8 * (j & 3) + r] |= uint8_t(((sc >> 4) | (mm >> 4) << 2) << (4 * (j >> 2)));
            }
            for (int k = 0; k < 256; ++k) {
              const int q = (b[16 + 32 * (k / 64) + k % 32] >> (4 * ((k / 32) % 2))) & 15;
              piece[128 + 32 * (k / 8) + 8 * q4_slot(r) + k % 8] |= uint8_t(q << q4_shift(r));
            }
            break;
          }
          case ExpertFormat::Q8_0: {
            const uint8_t* b = src + size_t(p) * 34;
            std::memcpy(piece + 2 * r, b, 2);
            for (int k = 0; k < 32; ++k) piece[16 + 64 * (k / 8) + 8 * q8_slot(r) + k % 8] = b[2 + k];
            break;
          }
          case ExpertFormat::FP8: std::memcpy(piece + 16 * r, src + size_t(p) * 16, 16); break;
          case ExpertFormat::BF16: std::memcpy(piece + 32 * r, src + size_t(p) * 32, 32); break;
        }
      }
    }
  }
  return m;
}

PackedMatrix PackedMatrix::clone(int numa_node) const {
  PackedMatrix m;
  m.fmt_ = fmt_;
  m.out_ = out_, m.in_ = in_, m.tile_rows_ = tile_rows_, m.n_tiles_ = n_tiles_;
  m.tile_bytes_ = tile_bytes_;
  m.scales_ = scales_;
  m.bo_ = bo_, m.bi_ = bi_, m.sc_cols_ = sc_cols_;
  m.allocate(numa_node);
  std::memcpy(m.data_, data_, tile_bytes_ * size_t(n_tiles_));
  return m;
}

std::vector<uint8_t> PackedMatrix::source_row(int o) const {
  if (o < 0 || o >= out_) fail("PackedMatrix::source_row: row {} of {}", o, out_);
  const int R = tile_rows_, r = o % R, blk = block_of(fmt_), npieces = in_ / blk;
  const uint8_t* t = tile(o / R);
  std::vector<uint8_t> row;
  for (int p = 0; p < npieces; ++p) {
    const uint8_t* piece = t + size_t(p) * piece_of(fmt_);
    switch (fmt_) {
      case ExpertFormat::Q4_K: {
        uint8_t b[144] = {};
        std::memcpy(b, piece + 2 * r, 2);
        std::memcpy(b + 2, piece + 16 + 2 * r, 2);
        int sc[8], mm[8];
        for (int j = 0; j < 8; ++j) piece_scale_min(piece, j, r, sc[j], mm[j]);
        k_pack_scales(sc, mm, b + 4);
        for (int k = 0; k < 256; ++k)
          b[16 + 32 * (k / 64) + k % 32] |= uint8_t(piece_q4(piece, r, k) << (4 * ((k / 32) % 2)));
        row.insert(row.end(), b, b + 144);
        break;
      }
      case ExpertFormat::Q8_0:
        row.insert(row.end(), piece + 2 * r, piece + 2 * r + 2);
        for (int k = 0; k < 32; ++k) row.push_back(uint8_t(piece_q8(piece, r, k)));
        break;
      case ExpertFormat::FP8: row.insert(row.end(), piece + 16 * r, piece + 16 * r + 16); break;
      case ExpertFormat::BF16: row.insert(row.end(), piece + 32 * r, piece + 32 * r + 32); break;
    }
  }
  return row;
}

void PackedMatrix::dequantize_row(int o, float* dst) const {
  std::vector<uint8_t> row = source_row(o);
  switch (fmt_) {
    case ExpertFormat::Q4_K: dequantize_row_ref(GgmlType::Q4_K, row.data(), dst, in_); return;
    case ExpertFormat::Q8_0: dequantize_row_ref(GgmlType::Q8_0, row.data(), dst, in_); return;
    case ExpertFormat::BF16: to_f32(DType::BF16, row.data(), dst, size_t(in_)); return;
    case ExpertFormat::FP8: {
      to_f32(DType::F8_E4M3, row.data(), dst, size_t(in_));
      const float* s = scale_row(o);
      for (int i = 0; i < in_; ++i) dst[i] *= s[i / bi_];
      return;
    }
  }
}

// ---- single matrix ----

void packed_linear(const PackedMatrix& W, const float* x, int T, float* y, ThreadPool& pool, CpuIsa isa,
                   int amx_min_rows) {
  check_isa(isa);
  if (T < 0) fail("packed_linear: {} rows", T);
  if (amx_min_rows < 1) fail("packed_linear: amx_min_rows {} (>= 1 expected)", amx_min_rows);
  if (T == 0) return;
  if (!x || !y) fail("packed_linear: null input or output");
  const ActKind kind = act_kind(W.format());
  ActBuf buf;
  ActView view;
  if (kind == ActKind::F32) {
    view.x = x;
    view.K = W.in();
    view.ldx = size_t(W.in());
  } else {
    buf.resize(kind, T, W.in());
    view = buf.view();
  }
  const KernelSet ks = kernels_for(W.format(), isa, amx_min_rows);
  const int n_chunks = (W.out() + kChunkRows - 1) / kChunkRows;
  std::atomic<int64_t> ctr_rows{0}, ctr_chunks{0};
  std::vector<std::vector<float>> tmp(size_t(pool.size()));
  pool.run([&](int w) {
    if (kind != ActKind::F32) {
      for (int64_t t; (t = ThreadPool::next_task(ctr_rows, T)) >= 0;) buf.fill(int(t), x + size_t(t) * W.in(), isa);
      pool.barrier();
    }
    std::vector<float>& ybuf = tmp[size_t(w)];
    ybuf.resize(size_t(T) * kChunkRows);
    for (int64_t c; (c = ThreadPool::next_task(ctr_chunks, n_chunks)) >= 0;) {
      const int r0 = int(c) * kChunkRows, nr = std::min(kChunkRows, W.out() - r0);
      compute_chunk(W, ks, view, T, r0, ybuf.data(), kChunkRows);
      for (int t = 0; t < T; ++t) std::copy_n(&ybuf[size_t(t) * kChunkRows], nr, y + size_t(t) * W.out() + r0);
    }
  });
}

// ---- experts ----

PackedExpert PackedExpert::pack(const Linear& gate, const Linear& up, const Linear& down, int numa_node) {
  if (gate.out != up.out || gate.in != up.in || down.in != gate.out || down.out != gate.in)
    fail("PackedExpert: gate [{}, {}], up [{}, {}] and down [{}, {}] do not form an expert (gate = up = [d_ff, "
         "d_model], down = [d_model, d_ff])",
         gate.out, gate.in, up.out, up.in, down.out, down.in);
  PackedExpert e;
  e.gate = PackedMatrix::pack(gate, numa_node);
  e.up = PackedMatrix::pack(up, numa_node);
  e.down = PackedMatrix::pack(down, numa_node);
  return e;
}

struct ExpertRunner::Scratch {
  struct Job {
    int n = 0;
    ActBuf xg, xu;  // inputs quantized for gate and for up (xu unused when the kinds agree)
    bool share = true;
    std::vector<float> h;  // [n, d_ff]
    ActBuf hd;             // h quantized for down (unused for float down)
    ActView vg, vu, vd;
  };
  std::vector<Job> jobs;
  std::vector<std::pair<int, int>> row_tasks;  // (job, row)
  std::vector<std::pair<int, int>> ff_tasks;   // (job, 16-row chunk of d_ff)
  std::vector<std::vector<float>> worker;      // per worker: 3 × [n_max, 16]
  std::atomic<int64_t> ctr[4];
};

ExpertRunner::ExpertRunner(ThreadPool& pool, CpuIsa isa, int amx_min_rows)
    : pool_(pool), isa_(isa), amx_min_rows_(amx_min_rows), s_(std::make_unique<Scratch>()) {
  check_isa(isa);
  if (amx_min_rows < 1) fail("ExpertRunner: amx_min_rows {} (>= 1 expected)", amx_min_rows);
}

ExpertRunner::~ExpertRunner() = default;

void ExpertRunner::run_experts(const std::vector<ExpertJob>& jobs) {
  int d_model = -1, n_max = 0;
  for (size_t j = 0; j < jobs.size(); ++j) {
    const ExpertJob& job = jobs[j];
    if (!job.expert) fail("run_experts: job {} has no expert", j);
    if (job.rows.size() != job.weights.size())
      fail("run_experts: job {} has {} rows but {} routing weights", j, job.rows.size(), job.weights.size());
    if (job.rows.empty()) continue;
    if (!job.x || !job.y) fail("run_experts: job {} has a null input or output", j);
    for (int r : job.rows)
      if (r < 0) fail("run_experts: job {} routes row {}", j, r);
    if (d_model >= 0 && job.expert->d_model() != d_model)
      fail("run_experts: job {} has d_model {}, an earlier job {}", j, job.expert->d_model(), d_model);
    d_model = job.expert->d_model();
    n_max = std::max(n_max, int(job.rows.size()));
  }
  if (d_model < 0) return;

  Scratch& s = *s_;
  s.jobs.resize(jobs.size());
  s.row_tasks.clear();
  s.ff_tasks.clear();
  for (size_t j = 0; j < jobs.size(); ++j) {
    const ExpertJob& job = jobs[j];
    Scratch::Job& sj = s.jobs[j];
    sj.n = int(job.rows.size());
    if (!sj.n) continue;
    const PackedExpert& e = *job.expert;
    const ActKind kg = act_kind(e.gate.format()), ku = act_kind(e.up.format()), kd = act_kind(e.down.format());
    sj.xg.resize(kg, sj.n, d_model);
    sj.share = kg == ku;
    if (!sj.share) sj.xu.resize(ku, sj.n, d_model);
    sj.h.resize(size_t(sj.n) * e.d_ff());
    sj.vg = sj.xg.view();
    sj.vu = sj.share ? sj.vg : sj.xu.view();
    if (kd == ActKind::F32) {
      sj.hd.K = 0;  // marks "down reads h as floats"
      sj.vd = ActView{};
      sj.vd.x = sj.h.data();
      sj.vd.K = e.d_ff();
      sj.vd.ldx = size_t(e.d_ff());
    } else {
      sj.hd.resize(kd, sj.n, e.d_ff());
      sj.vd = sj.hd.view();
    }
    for (int i = 0; i < sj.n; ++i) s.row_tasks.emplace_back(int(j), i);
    for (int c = 0; c < (e.d_ff() + kChunkRows - 1) / kChunkRows; ++c) s.ff_tasks.emplace_back(int(j), c);
  }
  s.worker.resize(size_t(pool_.size()));
  for (auto& w : s.worker) w.resize(size_t(3) * n_max * kChunkRows);
  for (auto& c : s.ctr) c.store(0, std::memory_order_relaxed);
  const int64_t n_rows = int64_t(s.row_tasks.size()), n_ff = int64_t(s.ff_tasks.size());
  const int n_out_chunks = (d_model + kChunkRows - 1) / kChunkRows;
  const CpuIsa isa = isa_;
  const int amx_min = amx_min_rows_;

  pool_.run([&](int w) {
    float* g = s.worker[size_t(w)].data();
    float* u = g + size_t(n_max) * kChunkRows;
    float* yb = u + size_t(n_max) * kChunkRows;
    // 1. inputs -> activations for gate and up
    for (int64_t i; (i = ThreadPool::next_task(s.ctr[0], n_rows)) >= 0;) {
      auto [j, r] = s.row_tasks[size_t(i)];
      const float* xr = jobs[size_t(j)].x + size_t(jobs[size_t(j)].rows[size_t(r)]) * d_model;
      s.jobs[size_t(j)].xg.fill(r, xr, isa);
      if (!s.jobs[size_t(j)].share) s.jobs[size_t(j)].xu.fill(r, xr, isa);
    }
    pool_.barrier();
    // 2. gate and up, 16 rows of d_ff at a time: h = silu(gate x) ⊙ up x
    for (int64_t i; (i = ThreadPool::next_task(s.ctr[1], n_ff)) >= 0;) {
      auto [j, c] = s.ff_tasks[size_t(i)];
      const PackedExpert& e = *jobs[size_t(j)].expert;
      Scratch::Job& sj = s.jobs[size_t(j)];
      const int r0 = c * kChunkRows, nr = std::min(kChunkRows, e.d_ff() - r0);
      compute_chunk(e.gate, kernels_for(e.gate.format(), isa, amx_min), sj.vg, sj.n, r0, g, kChunkRows);
      compute_chunk(e.up, kernels_for(e.up.format(), isa, amx_min), sj.vu, sj.n, r0, u, kChunkRows);
      for (int t = 0; t < sj.n; ++t)
        for (int r = 0; r < nr; ++r) {
          const size_t k = size_t(t) * kChunkRows + r;
          sj.h[size_t(t) * e.d_ff() + r0 + r] = silu(g[k]) * u[k];
        }
    }
    pool_.barrier();
    // 3. h -> activations for down
    for (int64_t i; (i = ThreadPool::next_task(s.ctr[2], n_rows)) >= 0;) {
      auto [j, r] = s.row_tasks[size_t(i)];
      Scratch::Job& sj = s.jobs[size_t(j)];
      if (!sj.hd.K) continue;  // float down reads h itself
      sj.hd.fill(r, sj.h.data() + size_t(r) * jobs[size_t(j)].expert->d_ff(), isa);
    }
    pool_.barrier();
    // 4. down, 16 output columns at a time across all jobs in order: y += weight · down h
    for (int64_t c; (c = ThreadPool::next_task(s.ctr[3], n_out_chunks)) >= 0;) {
      const int r0 = int(c) * kChunkRows, nr = std::min(kChunkRows, d_model - r0);
      for (size_t j = 0; j < jobs.size(); ++j) {
        const Scratch::Job& sj = s.jobs[j];
        if (!sj.n) continue;
        const PackedMatrix& D = jobs[j].expert->down;
        compute_chunk(D, kernels_for(D.format(), isa, amx_min), sj.vd, sj.n, r0, yb, kChunkRows);
        for (int t = 0; t < sj.n; ++t) {
          float* yr = jobs[j].y + size_t(jobs[j].rows[size_t(t)]) * d_model + r0;
          const float wt = jobs[j].weights[size_t(t)];
          for (int r = 0; r < nr; ++r) yr[r] += wt * yb[size_t(t) * kChunkRows + r];
        }
      }
    }
  });
}

}  // namespace bigmoe::cpu
