// AVX2 and AVX-512 kernels for dequantize_row / vec_dot.
//
// Each SIMD function carries its own target attribute (no global -mavx flags), so this file
// compiles into a binary that runs on any x86-64; quant.cpp calls in only after checking the
// CPU. Compiled with -ffp-contract=off: dequantization must round each step as numpy does.
//
// Every quantized type is decoded the same way: a block becomes chunks of 32 weights held as 32
// int8 lanes q, with w[i] = s[i / 16] * q[i] + m (m = 0 and two scales for symmetric types, one
// scale and an offset for the affine ones). The decoders are AVX2 code; the AVX-512 kernels
// inline the same decoders and only widen the float arithmetic to 16 lanes.
#include "tensor/quant_kernels.h"

#if defined(__x86_64__)

// GCC 12's AVX-512 intrinsics start from _mm512_undefined_*() (a self-initialized variable),
// which -Wall reports as uninitialized once they are inlined into target-attributed code.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include <immintrin.h>

#include <cstring>

#define BIGMOE_AVX2 __attribute__((target("avx2,fma,f16c")))
#define BIGMOE_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")))

namespace bigmoe::detail {

namespace {

// 32 weights: w[i] = (i < 16 ? s0 : s1) * q[i] + m, q as signed bytes.
struct Chunk {
  __m256i q;
  float s0, s1, m;
};

BIGMOE_AVX2 inline float half(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

BIGMOE_AVX2 inline __m256i load256(const uint8_t* p) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
}

BIGMOE_AVX2 inline __m256i low_nibbles(__m256i v) {
  return _mm256_and_si256(v, _mm256_set1_epi8(15));
}

BIGMOE_AVX2 inline __m256i high_nibbles(__m256i v) {
  return _mm256_and_si256(_mm256_srli_epi16(v, 4), _mm256_set1_epi8(15));
}

// 16 bytes of nibbles -> 32 bytes: the low nibbles (weights 0-15) then the high ones (16-31).
BIGMOE_AVX2 inline __m256i unpack_q4_32(const uint8_t* qs) {
  __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
  __m128i m = _mm_set1_epi8(15);
  return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), m), _mm_and_si128(v, m));
}

// Byte j = 16 if bit j of qh is set, else 0.
BIGMOE_AVX2 inline __m256i q5_high_bits(uint32_t qh) {
  const __m256i pick = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2,
                                        2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
  const __m256i bit = _mm256_set1_epi64x(0x8040201008040201LL);
  __m256i bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(int(qh)), pick);
  __m256i set = _mm256_cmpeq_epi8(_mm256_and_si256(bytes, bit), bit);
  return _mm256_and_si256(set, _mm256_set1_epi8(16));
}

// ---- decoders: one block -> kChunks chunks. Layouts are documented in quant.cpp. ----

struct DecQ4_0 {
  static constexpr int kBlock = 32, kBytes = 18, kChunks = 1;
  static constexpr bool kAffine = false;
  BIGMOE_AVX2 static void decode(const uint8_t* b, Chunk* c) {
    float d = half(b);
    c[0] = {_mm256_sub_epi8(unpack_q4_32(b + 2), _mm256_set1_epi8(8)), d, d, 0.f};
  }
};

struct DecQ4_1 {
  static constexpr int kBlock = 32, kBytes = 20, kChunks = 1;
  static constexpr bool kAffine = true;
  BIGMOE_AVX2 static void decode(const uint8_t* b, Chunk* c) {
    float d = half(b);
    c[0] = {unpack_q4_32(b + 4), d, d, half(b + 2)};
  }
};

struct DecQ5_0 {
  static constexpr int kBlock = 32, kBytes = 22, kChunks = 1;
  static constexpr bool kAffine = false;
  BIGMOE_AVX2 static void decode(const uint8_t* b, Chunk* c) {
    float d = half(b);
    uint32_t qh;
    std::memcpy(&qh, b + 2, 4);
    __m256i q = _mm256_or_si256(unpack_q4_32(b + 6), q5_high_bits(qh));
    c[0] = {_mm256_sub_epi8(q, _mm256_set1_epi8(16)), d, d, 0.f};
  }
};

struct DecQ5_1 {
  static constexpr int kBlock = 32, kBytes = 24, kChunks = 1;
  static constexpr bool kAffine = true;
  BIGMOE_AVX2 static void decode(const uint8_t* b, Chunk* c) {
    float d = half(b);
    uint32_t qh;
    std::memcpy(&qh, b + 4, 4);
    c[0] = {_mm256_or_si256(unpack_q4_32(b + 8), q5_high_bits(qh)), d, d, half(b + 2)};
  }
};

struct DecQ8_0 {
  static constexpr int kBlock = 32, kBytes = 34, kChunks = 1;
  static constexpr bool kAffine = false;
  BIGMOE_AVX2 static void decode(const uint8_t* b, Chunk* c) {
    float d = half(b);
    c[0] = {load256(b + 2), d, d, 0.f};
  }
};

// Scale and min of sub-block j from the 12 packed bytes (see k_scale_min in quant.cpp).
inline void k_scale_min(const uint8_t* s, int j, int& sc, int& m) {
  if (j < 4) {
    sc = s[j] & 63;
    m = s[j + 4] & 63;
  } else {
    sc = (s[j + 4] & 15) | ((s[j - 4] >> 6) << 4);
    m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
  }
}

struct DecQ4_K {
  static constexpr int kBlock = 256, kBytes = 144, kChunks = 8;
  static constexpr bool kAffine = true;
  BIGMOE_AVX2 static void decode(const uint8_t* b, Chunk* c) {
    float d = half(b), dmin = half(b + 2);
    for (int p = 0; p < 4; ++p) {
      __m256i raw = load256(b + 16 + 32 * p);
      for (int h = 0; h < 2; ++h) {
        int j = 2 * p + h, sc, m;
        k_scale_min(b + 4, j, sc, m);
        float dl = d * float(sc);
        c[j] = {h ? high_nibbles(raw) : low_nibbles(raw), dl, dl, -(dmin * float(m))};
      }
    }
  }
};

struct DecQ5_K {
  static constexpr int kBlock = 256, kBytes = 176, kChunks = 8;
  static constexpr bool kAffine = true;
  BIGMOE_AVX2 static void decode(const uint8_t* b, Chunk* c) {
    float d = half(b), dmin = half(b + 2);
    __m256i qh = load256(b + 16);
    const __m256i one = _mm256_set1_epi8(1);
    for (int p = 0; p < 4; ++p) {
      __m256i raw = load256(b + 48 + 32 * p);
      for (int h = 0; h < 2; ++h) {
        int j = 2 * p + h, sc, m;
        k_scale_min(b + 4, j, sc, m);
        // Shifting 16-bit lanes right by j then masking each byte with 1 leaves bit j of that
        // byte: the bits that cross from the upper byte are masked off.
        __m256i hb = _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(j)), one);
        __m256i q =
            _mm256_or_si256(h ? high_nibbles(raw) : low_nibbles(raw), _mm256_slli_epi16(hb, 4));
        float dl = d * float(sc);
        c[j] = {q, dl, dl, -(dmin * float(m))};
      }
    }
  }
};

struct DecQ6_K {
  static constexpr int kBlock = 256, kBytes = 210, kChunks = 8;
  static constexpr bool kAffine = false;
  BIGMOE_AVX2 static void decode(const uint8_t* b, Chunk* c) {
    const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
    float d = half(b + 208);
    const __m256i three = _mm256_set1_epi8(3);
    for (int h = 0; h < 2; ++h) {
      __m256i qh = load256(b + 128 + 32 * h);
      for (int k = 0; k < 4; ++k) {
        __m256i raw = load256(b + 64 * h + 32 * (k % 2));
        __m256i lo = k / 2 ? high_nibbles(raw) : low_nibbles(raw);
        __m256i hi = _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * k)), three);
        __m256i q = _mm256_or_si256(lo, _mm256_slli_epi16(hi, 4));
        int s = 8 * h + 2 * k;
        c[4 * h + k] = {_mm256_sub_epi8(q, _mm256_set1_epi8(32)), d * float(sc[s]),
                        d * float(sc[s + 1]), 0.f};
      }
    }
  }
};

// ---- AVX2: 8 float lanes ----

// The 32 int8 lanes of q as four vectors of 8 floats.
BIGMOE_AVX2 inline void q_to_f32x8(__m256i q, __m256 f[4]) {
  __m128i lo = _mm256_castsi256_si128(q), hi = _mm256_extracti128_si256(q, 1);
  f[0] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo));
  f[1] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8)));
  f[2] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi));
  f[3] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8)));
}

BIGMOE_AVX2 inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <class D>
BIGMOE_AVX2 void dequant_avx2(const void* src, float* y, int64_t n) {
  const uint8_t* b = static_cast<const uint8_t*>(src);
  Chunk c[D::kChunks];
  __m256 f[4];
  for (int64_t i = 0; i < n; i += D::kBlock, b += D::kBytes) {
    D::decode(b, c);
    for (int k = 0; k < D::kChunks; ++k, y += 32) {
      q_to_f32x8(c[k].q, f);
      for (int g = 0; g < 4; ++g) {
        __m256 w = _mm256_mul_ps(_mm256_set1_ps(g < 2 ? c[k].s0 : c[k].s1), f[g]);
        if constexpr (D::kAffine) w = _mm256_add_ps(w, _mm256_set1_ps(c[k].m));
        _mm256_storeu_ps(y + 8 * g, w);
      }
    }
  }
}

template <class D>
BIGMOE_AVX2 float dot_avx2(const void* row, const float* x, int64_t n) {
  const uint8_t* b = static_cast<const uint8_t*>(row);
  Chunk c[D::kChunks];
  __m256 f[4];
  __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(),
                   _mm256_setzero_ps()};
  for (int64_t i = 0; i < n; i += D::kBlock, b += D::kBytes) {
    D::decode(b, c);
    for (int k = 0; k < D::kChunks; ++k, x += 32) {
      q_to_f32x8(c[k].q, f);
      if constexpr (D::kAffine) {
        // Apply the offset per weight: factoring it out as m * sum(x) would cancel badly when
        // s * q is close to -m.
        __m256 s = _mm256_set1_ps(c[k].s0), m = _mm256_set1_ps(c[k].m);
        for (int g = 0; g < 4; ++g)
          acc[g] = _mm256_fmadd_ps(_mm256_fmadd_ps(s, f[g], m), _mm256_loadu_ps(x + 8 * g), acc[g]);
      } else {
        __m256 p0 = _mm256_mul_ps(f[0], _mm256_loadu_ps(x));
        __m256 p1 = _mm256_mul_ps(f[2], _mm256_loadu_ps(x + 16));
        p0 = _mm256_fmadd_ps(f[1], _mm256_loadu_ps(x + 8), p0);
        p1 = _mm256_fmadd_ps(f[3], _mm256_loadu_ps(x + 24), p1);
        acc[k % 2] = _mm256_fmadd_ps(_mm256_set1_ps(c[k].s0), p0, acc[k % 2]);
        acc[2 + k % 2] = _mm256_fmadd_ps(_mm256_set1_ps(c[k].s1), p1, acc[2 + k % 2]);
      }
    }
  }
  return hsum(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
}

// Plain float types: Load gives 8 floats at element i, Scalar one.
struct F32x8 {
  BIGMOE_AVX2 static __m256 load(const uint8_t* p, int64_t i) {
    return _mm256_loadu_ps(reinterpret_cast<const float*>(p) + i);
  }
  BIGMOE_AVX2 static float scalar(const uint8_t* p, int64_t i) {
    float v;
    std::memcpy(&v, p + 4 * i, 4);
    return v;
  }
};

struct F16x8 {
  BIGMOE_AVX2 static __m256 load(const uint8_t* p, int64_t i) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 2 * i)));
  }
  BIGMOE_AVX2 static float scalar(const uint8_t* p, int64_t i) { return half(p + 2 * i); }
};

struct BF16x8 {
  BIGMOE_AVX2 static __m256 load(const uint8_t* p, int64_t i) {
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 2 * i));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  BIGMOE_AVX2 static float scalar(const uint8_t* p, int64_t i) {
    uint16_t h;
    std::memcpy(&h, p + 2 * i, 2);
    uint32_t u = uint32_t(h) << 16;
    float v;
    std::memcpy(&v, &u, 4);
    return v;
  }
};

template <class T>
BIGMOE_AVX2 void dequant_plain_avx2(const void* src, float* y, int64_t n) {
  const uint8_t* p = static_cast<const uint8_t*>(src);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, T::load(p, i));
  for (; i < n; ++i) y[i] = T::scalar(p, i);
}

template <class T>
BIGMOE_AVX2 float dot_plain_avx2(const void* row, const float* x, int64_t n) {
  const uint8_t* p = static_cast<const uint8_t*>(row);
  __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(),
                   _mm256_setzero_ps()};
  int64_t i = 0;
  for (; i + 32 <= n; i += 32)
    for (int g = 0; g < 4; ++g)
      acc[g] = _mm256_fmadd_ps(T::load(p, i + 8 * g), _mm256_loadu_ps(x + i + 8 * g), acc[g]);
  for (; i + 8 <= n; i += 8)
    acc[0] = _mm256_fmadd_ps(T::load(p, i), _mm256_loadu_ps(x + i), acc[0]);
  float s = hsum(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
  for (; i < n; ++i) s += T::scalar(p, i) * x[i];
  return s;
}

// ---- AVX-512: 16 float lanes ----

BIGMOE_AVX512 inline void q_to_f32x16(__m256i q, __m512 f[2]) {
  f[0] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(q)));
  f[1] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(q, 1)));
}

template <class D>
BIGMOE_AVX512 void dequant_avx512(const void* src, float* y, int64_t n) {
  const uint8_t* b = static_cast<const uint8_t*>(src);
  Chunk c[D::kChunks];
  __m512 f[2];
  for (int64_t i = 0; i < n; i += D::kBlock, b += D::kBytes) {
    D::decode(b, c);
    for (int k = 0; k < D::kChunks; ++k, y += 32) {
      q_to_f32x16(c[k].q, f);
      __m512 w0 = _mm512_mul_ps(_mm512_set1_ps(c[k].s0), f[0]);
      __m512 w1 = _mm512_mul_ps(_mm512_set1_ps(c[k].s1), f[1]);
      if constexpr (D::kAffine) {
        w0 = _mm512_add_ps(w0, _mm512_set1_ps(c[k].m));
        w1 = _mm512_add_ps(w1, _mm512_set1_ps(c[k].m));
      }
      _mm512_storeu_ps(y, w0);
      _mm512_storeu_ps(y + 16, w1);
    }
  }
}

template <class D>
BIGMOE_AVX512 float dot_avx512(const void* row, const float* x, int64_t n) {
  const uint8_t* b = static_cast<const uint8_t*>(row);
  Chunk c[D::kChunks];
  __m512 f[2];
  __m512 acc[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
  for (int64_t i = 0; i < n; i += D::kBlock, b += D::kBytes) {
    D::decode(b, c);
    for (int k = 0; k < D::kChunks; ++k, x += 32) {
      q_to_f32x16(c[k].q, f);
      __m512 x0 = _mm512_loadu_ps(x), x1 = _mm512_loadu_ps(x + 16);
      if constexpr (D::kAffine) {
        __m512 s = _mm512_set1_ps(c[k].s0), m = _mm512_set1_ps(c[k].m);
        acc[0] = _mm512_fmadd_ps(_mm512_fmadd_ps(s, f[0], m), x0, acc[0]);
        acc[1] = _mm512_fmadd_ps(_mm512_fmadd_ps(s, f[1], m), x1, acc[1]);
      } else {
        acc[0] = _mm512_fmadd_ps(_mm512_set1_ps(c[k].s0), _mm512_mul_ps(f[0], x0), acc[0]);
        acc[1] = _mm512_fmadd_ps(_mm512_set1_ps(c[k].s1), _mm512_mul_ps(f[1], x1), acc[1]);
      }
    }
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(acc[0], acc[1]));
}

struct F32x16 {
  BIGMOE_AVX512 static __m512 load(const uint8_t* p, int64_t i) {
    return _mm512_loadu_ps(reinterpret_cast<const float*>(p) + i);
  }
};

struct F16x16 {
  BIGMOE_AVX512 static __m512 load(const uint8_t* p, int64_t i) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 2 * i)));
  }
};

struct BF16x16 {
  BIGMOE_AVX512 static __m512 load(const uint8_t* p, int64_t i) {
    __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 2 * i));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
};

// T16 loads 16 lanes; T8 (the AVX2 loader) finishes the tail.
template <class T16, class T8>
BIGMOE_AVX512 void dequant_plain_avx512(const void* src, float* y, int64_t n) {
  const uint8_t* p = static_cast<const uint8_t*>(src);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(y + i, T16::load(p, i));
  for (; i < n; ++i) y[i] = T8::scalar(p, i);
}

template <class T16, class T8>
BIGMOE_AVX512 float dot_plain_avx512(const void* row, const float* x, int64_t n) {
  const uint8_t* p = static_cast<const uint8_t*>(row);
  __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(),
                   _mm512_setzero_ps()};
  int64_t i = 0;
  for (; i + 64 <= n; i += 64)
    for (int g = 0; g < 4; ++g)
      acc[g] = _mm512_fmadd_ps(T16::load(p, i + 16 * g), _mm512_loadu_ps(x + i + 16 * g), acc[g]);
  for (; i + 16 <= n; i += 16)
    acc[0] = _mm512_fmadd_ps(T16::load(p, i), _mm512_loadu_ps(x + i), acc[0]);
  float s = _mm512_reduce_add_ps(
      _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3])));
  for (; i < n; ++i) s += T8::scalar(p, i) * x[i];
  return s;
}

}  // namespace

QuantKernels avx2_kernels(GgmlType t) {
  switch (t) {
    case GgmlType::F32: return {dequant_plain_avx2<F32x8>, dot_plain_avx2<F32x8>};
    case GgmlType::F16: return {dequant_plain_avx2<F16x8>, dot_plain_avx2<F16x8>};
    case GgmlType::BF16: return {dequant_plain_avx2<BF16x8>, dot_plain_avx2<BF16x8>};
    case GgmlType::Q4_0: return {dequant_avx2<DecQ4_0>, dot_avx2<DecQ4_0>};
    case GgmlType::Q4_1: return {dequant_avx2<DecQ4_1>, dot_avx2<DecQ4_1>};
    case GgmlType::Q5_0: return {dequant_avx2<DecQ5_0>, dot_avx2<DecQ5_0>};
    case GgmlType::Q5_1: return {dequant_avx2<DecQ5_1>, dot_avx2<DecQ5_1>};
    case GgmlType::Q8_0: return {dequant_avx2<DecQ8_0>, dot_avx2<DecQ8_0>};
    case GgmlType::Q4_K: return {dequant_avx2<DecQ4_K>, dot_avx2<DecQ4_K>};
    case GgmlType::Q5_K: return {dequant_avx2<DecQ5_K>, dot_avx2<DecQ5_K>};
    case GgmlType::Q6_K: return {dequant_avx2<DecQ6_K>, dot_avx2<DecQ6_K>};
    default: return {};
  }
}

QuantKernels avx512_kernels(GgmlType t) {
  switch (t) {
    case GgmlType::F32:
      return {dequant_plain_avx512<F32x16, F32x8>, dot_plain_avx512<F32x16, F32x8>};
    case GgmlType::F16:
      return {dequant_plain_avx512<F16x16, F16x8>, dot_plain_avx512<F16x16, F16x8>};
    case GgmlType::BF16:
      return {dequant_plain_avx512<BF16x16, BF16x8>, dot_plain_avx512<BF16x16, BF16x8>};
    case GgmlType::Q4_0: return {dequant_avx512<DecQ4_0>, dot_avx512<DecQ4_0>};
    case GgmlType::Q4_1: return {dequant_avx512<DecQ4_1>, dot_avx512<DecQ4_1>};
    case GgmlType::Q5_0: return {dequant_avx512<DecQ5_0>, dot_avx512<DecQ5_0>};
    case GgmlType::Q5_1: return {dequant_avx512<DecQ5_1>, dot_avx512<DecQ5_1>};
    case GgmlType::Q8_0: return {dequant_avx512<DecQ8_0>, dot_avx512<DecQ8_0>};
    case GgmlType::Q4_K: return {dequant_avx512<DecQ4_K>, dot_avx512<DecQ4_K>};
    case GgmlType::Q5_K: return {dequant_avx512<DecQ5_K>, dot_avx512<DecQ5_K>};
    case GgmlType::Q6_K: return {dequant_avx512<DecQ6_K>, dot_avx512<DecQ6_K>};
    default: return {};
  }
}

}  // namespace bigmoe::detail

#else  // not x86-64: scalar only

namespace bigmoe::detail {
QuantKernels avx2_kernels(GgmlType) { return {}; }
QuantKernels avx512_kernels(GgmlType) { return {}; }
}  // namespace bigmoe::detail

#endif
