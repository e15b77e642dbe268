#include "tensor/quant_act.h"

#include <immintrin.h>

#include <cmath>
#include <cstring>

#include "tensor/dtype.h"
#include "util/error.h"

namespace bigmoe {

namespace {

constexpr int QK = 32;

struct BlockQ8_0 { uint16_t d; int8_t qs[QK]; };
struct BlockQ8_1 { uint16_t d, s; int8_t qs[QK]; };
struct BlockQ4_0 { uint16_t d; uint8_t qs[QK / 2]; };
struct BlockQ4_1 { uint16_t d, m; uint8_t qs[QK / 2]; };
struct BlockQ5_0 { uint16_t d; uint8_t qh[4]; uint8_t qs[QK / 2]; };
struct BlockQ5_1 { uint16_t d, m; uint8_t qh[4]; uint8_t qs[QK / 2]; };
static_assert(sizeof(BlockQ8_0) == 34 && sizeof(BlockQ8_1) == 36 && sizeof(BlockQ4_0) == 18 &&
              sizeof(BlockQ4_1) == 20 && sizeof(BlockQ5_0) == 22 && sizeof(BlockQ5_1) == 24);

template <typename B>
const B* blocks(const void* p) { return static_cast<const B*>(p); }

// Weight block b's 32 integer levels (before scale/offset).
inline void q4_levels(const uint8_t* qs, int* q) {
  for (int j = 0; j < 16; ++j) {
    q[j] = qs[j] & 0xf;
    q[j + 16] = qs[j] >> 4;
  }
}
inline void q5_levels(const uint8_t* qh4, const uint8_t* qs, int* q) {
  uint32_t qh;
  std::memcpy(&qh, qh4, 4);
  for (int j = 0; j < 16; ++j) {
    q[j] = (qs[j] & 0xf) | (((qh >> j) & 1) << 4);
    q[j + 16] = (qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4);
  }
}

bool has_avx2() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}

// Σ_j a[j]·b[j] for 32 unsigned (0..15) a and signed b, in AVX2: the integer core of the
// Q4 dots.
__attribute__((target("avx2,fma"))) inline __m256i unpack_q4(const uint8_t* qs) {
  __m128i t = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
  __m256i v = _mm256_set_m128i(_mm_srli_epi16(t, 4), t);
  return _mm256_and_si256(v, _mm256_set1_epi8(0xf));
}

__attribute__((target("avx2,fma"))) inline __m256 sum_i8_pairs(__m256i u, __m256i s) {
  // u unsigned 0..255 (here ≤ 31), s signed: maddubs gives i16 pairs, madd sums to i32.
  __m256i p16 = _mm256_maddubs_epi16(u, s);
  __m256i p32 = _mm256_madd_epi16(p16, _mm256_set1_epi16(1));
  return _mm256_cvtepi32_ps(p32);
}

__attribute__((target("avx2,fma"))) inline float hsum(__m256 v) {
  __m128 r = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  r = _mm_add_ps(r, _mm_movehl_ps(r, r));
  r = _mm_add_ss(r, _mm_movehdup_ps(r));
  return _mm_cvtss_f32(r);
}

__attribute__((target("avx2,fma"))) float dot_q4_1_q8_1_avx2(const void* row, const void* act, int64_t nb) {
  const BlockQ4_1* x = blocks<BlockQ4_1>(row);
  const BlockQ8_1* y = blocks<BlockQ8_1>(act);
  __m256 acc = _mm256_setzero_ps();
  float summs = 0;
  for (int64_t b = 0; b < nb; ++b) {
    summs += f16_to_f32(x[b].m) * f16_to_f32(y[b].s);
    __m256 d = _mm256_set1_ps(f16_to_f32(x[b].d) * f16_to_f32(y[b].d));
    __m256i q4 = unpack_q4(x[b].qs);
    __m256i q8 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(y[b].qs));
    acc = _mm256_fmadd_ps(d, sum_i8_pairs(q4, q8), acc);
  }
  return hsum(acc) + summs;
}

__attribute__((target("avx2,fma"))) float dot_q8_0_q8_0_avx2(const void* row, const void* act, int64_t nb) {
  const BlockQ8_0* x = blocks<BlockQ8_0>(row);
  const BlockQ8_0* y = blocks<BlockQ8_0>(act);
  __m256 acc = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    __m256 d = _mm256_set1_ps(f16_to_f32(x[b].d) * f16_to_f32(y[b].d));
    __m256i qx = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[b].qs));
    __m256i qy = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(y[b].qs));
    // maddubs needs an unsigned operand: |x| · (y with x's sign).
    __m256i ax = _mm256_sign_epi8(qx, qx), sy = _mm256_sign_epi8(qy, qx);
    acc = _mm256_fmadd_ps(d, sum_i8_pairs(ax, sy), acc);
  }
  return hsum(acc);
}

__attribute__((target("avx2,fma"))) float dot_q4_0_q8_0_avx2(const void* row, const void* act, int64_t nb) {
  const BlockQ4_0* x = blocks<BlockQ4_0>(row);
  const BlockQ8_0* y = blocks<BlockQ8_0>(act);
  __m256 acc = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    __m256 d = _mm256_set1_ps(f16_to_f32(x[b].d) * f16_to_f32(y[b].d));
    __m256i qx = _mm256_sub_epi8(unpack_q4(x[b].qs), _mm256_set1_epi8(8));
    __m256i qy = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(y[b].qs));
    __m256i ax = _mm256_sign_epi8(qx, qx), sy = _mm256_sign_epi8(qy, qx);
    acc = _mm256_fmadd_ps(d, sum_i8_pairs(ax, sy), acc);
  }
  return hsum(acc);
}

}  // namespace

uint16_t f32_to_f16(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  uint32_t sign = (x >> 16) & 0x8000u;
  uint32_t ax = x & 0x7fffffffu;
  if (ax >= 0x7f800000u) return uint16_t(sign | 0x7c00u | (ax > 0x7f800000u ? 0x200u : 0));  // inf / nan
  if (ax >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // rounds to inf
  if (ax < 0x38800000u) {  // subnormal or zero in f16
    float a;
    std::memcpy(&a, &ax, 4);
    // a * 2^24 rounded to even gives the subnormal mantissa (0x400 = smallest normal).
    return uint16_t(sign | uint32_t(std::nearbyint(a * 16777216.0f)));
  }
  uint32_t e = (ax >> 23) - 127 + 15, m = ax & 0x7fffffu;
  uint32_t h = (e << 10) | (m >> 13);
  uint32_t rest = m & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1))) ++h;  // carries into the exponent correctly
  return uint16_t(sign | h);
}

GgmlType act_type_for(GgmlType w) {
  switch (w) {
    case GgmlType::Q4_0: case GgmlType::Q5_0: case GgmlType::Q8_0: return GgmlType::Q8_0;
    case GgmlType::Q4_1: case GgmlType::Q5_1: return GgmlType::Q8_1;
    default: return GgmlType::F32;
  }
}

size_t act_row_size(GgmlType t, int64_t n) {
  if (t == GgmlType::Q8_0) return size_t(n / QK) * sizeof(BlockQ8_0);
  if (t == GgmlType::Q8_1) return size_t(n / QK) * sizeof(BlockQ8_1);
  fail("act_row_size: {} is not an activation format", ggml_type_name(t));
}

void quantize_act(GgmlType t, const float* x, void* dst, int64_t n) {
  if (n % QK) fail("quantize_act: row length {} is not a multiple of {}", n, QK);
  if (t != GgmlType::Q8_0 && t != GgmlType::Q8_1) fail("quantize_act: {} is not an activation format", ggml_type_name(t));
  for (int64_t b = 0; b < n / QK; ++b) {
    const float* xb = x + b * QK;
    float amax = 0;
    for (int j = 0; j < QK; ++j) amax = std::max(amax, std::fabs(xb[j]));
    const float d = amax / 127.f, id = amax != 0.0f ? 127.f / amax : 0.0f;
    int8_t* qs;
    if (t == GgmlType::Q8_0) {
      auto* y = static_cast<BlockQ8_0*>(dst) + b;
      y->d = f32_to_f16(d);
      qs = y->qs;
    } else {
      auto* y = static_cast<BlockQ8_1*>(dst) + b;
      y->d = f32_to_f16(d);
      qs = y->qs;
    }
    int sum = 0;
    for (int j = 0; j < QK; ++j) {
      qs[j] = int8_t(std::nearbyint(xb[j] * id));
      sum += qs[j];
    }
    if (t == GgmlType::Q8_1) (static_cast<BlockQ8_1*>(dst) + b)->s = f32_to_f16(d * float(sum));
  }
}

float vec_dot_act_ref(GgmlType w, const void* row, const void* act, int64_t n) {
  const int64_t nb = n / QK;
  double sum = 0;
  int q[QK];
  for (int64_t b = 0; b < nb; ++b) {
    switch (w) {
      case GgmlType::Q8_0: {
        auto x = blocks<BlockQ8_0>(row) + b;
        auto y = blocks<BlockQ8_0>(act) + b;
        int s = 0;
        for (int j = 0; j < QK; ++j) s += int(x->qs[j]) * y->qs[j];
        sum += double(f16_to_f32(x->d)) * f16_to_f32(y->d) * s;
        break;
      }
      case GgmlType::Q4_0: case GgmlType::Q5_0: {
        auto y = blocks<BlockQ8_0>(act) + b;
        uint16_t d;
        if (w == GgmlType::Q4_0) {
          auto x = blocks<BlockQ4_0>(row) + b;
          q4_levels(x->qs, q);
          for (int j = 0; j < QK; ++j) q[j] -= 8;
          d = x->d;
        } else {
          auto x = blocks<BlockQ5_0>(row) + b;
          q5_levels(x->qh, x->qs, q);
          for (int j = 0; j < QK; ++j) q[j] -= 16;
          d = x->d;
        }
        int s = 0;
        for (int j = 0; j < QK; ++j) s += q[j] * y->qs[j];
        sum += double(f16_to_f32(d)) * f16_to_f32(y->d) * s;
        break;
      }
      case GgmlType::Q4_1: case GgmlType::Q5_1: {
        auto y = blocks<BlockQ8_1>(act) + b;
        uint16_t d, m;
        if (w == GgmlType::Q4_1) {
          auto x = blocks<BlockQ4_1>(row) + b;
          q4_levels(x->qs, q);
          d = x->d, m = x->m;
        } else {
          auto x = blocks<BlockQ5_1>(row) + b;
          q5_levels(x->qh, x->qs, q);
          d = x->d, m = x->m;
        }
        int s = 0;
        for (int j = 0; j < QK; ++j) s += q[j] * y->qs[j];
        sum += double(f16_to_f32(d)) * f16_to_f32(y->d) * s + double(f16_to_f32(m)) * f16_to_f32(y->s);
        break;
      }
      default: fail("vec_dot_act: no quantized-activation path for {}", ggml_type_name(w));
    }
  }
  return float(sum);
}

float vec_dot_act(GgmlType w, const void* row, const void* act, int64_t n) {
  if (has_avx2() && simd_level() != SimdLevel::Scalar) {
    if (w == GgmlType::Q4_1) return dot_q4_1_q8_1_avx2(row, act, n / QK);
    if (w == GgmlType::Q8_0) return dot_q8_0_q8_0_avx2(row, act, n / QK);
    if (w == GgmlType::Q4_0) return dot_q4_0_q8_0_avx2(row, act, n / QK);
  }
  return vec_dot_act_ref(w, row, act, n);
}

}  // namespace bigmoe
