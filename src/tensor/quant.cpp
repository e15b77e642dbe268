// Type table, scalar reference dequantizers and the run-time dispatch to SIMD kernels.
//
// The references mirror gguf/quants.py operation for operation: scales are combined in float32
// first (d * sc), then applied to the integer weight, then the offset is added or subtracted,
// each step rounded to float32. This file is compiled with -ffp-contract=off so that no step
// is fused into an FMA and the results stay bit-identical to numpy's.
#include "tensor/quant.h"

#include <cstring>

#include "tensor/dtype.h"
#include "tensor/quant_kernels.h"
#include "util/error.h"

namespace bigmoe {

namespace {

struct TypeEntry {
  GgmlType type;
  const char* name;
  GgmlTypeTraits traits;
};

// Block sizes and bytes per block, as gguf.constants.GGML_QUANT_SIZES, except Q8_1: the gguf
// package says 40 bytes (float d and s) where ggml's block_q8_1 holds two halves (36 bytes).
// Q8_1 is ggml's activation format and never appears in model files; we follow ggml.
constexpr TypeEntry kTypes[] = {
    {GgmlType::F32, "F32", {1, 4}},
    {GgmlType::F16, "F16", {1, 2}},
    {GgmlType::Q4_0, "Q4_0", {32, 18}},
    {GgmlType::Q4_1, "Q4_1", {32, 20}},
    {GgmlType::Q5_0, "Q5_0", {32, 22}},
    {GgmlType::Q5_1, "Q5_1", {32, 24}},
    {GgmlType::Q8_0, "Q8_0", {32, 34}},
    {GgmlType::Q8_1, "Q8_1", {32, 36}},
    {GgmlType::Q2_K, "Q2_K", {256, 84}},
    {GgmlType::Q3_K, "Q3_K", {256, 110}},
    {GgmlType::Q4_K, "Q4_K", {256, 144}},
    {GgmlType::Q5_K, "Q5_K", {256, 176}},
    {GgmlType::Q6_K, "Q6_K", {256, 210}},
    {GgmlType::Q8_K, "Q8_K", {256, 292}},
    {GgmlType::IQ2_XXS, "IQ2_XXS", {256, 66}},
    {GgmlType::IQ2_XS, "IQ2_XS", {256, 74}},
    {GgmlType::IQ3_XXS, "IQ3_XXS", {256, 98}},
    {GgmlType::IQ1_S, "IQ1_S", {256, 50}},
    {GgmlType::IQ4_NL, "IQ4_NL", {32, 18}},
    {GgmlType::IQ3_S, "IQ3_S", {256, 110}},
    {GgmlType::IQ2_S, "IQ2_S", {256, 82}},
    {GgmlType::IQ4_XS, "IQ4_XS", {256, 136}},
    {GgmlType::I8, "I8", {1, 1}},
    {GgmlType::I16, "I16", {1, 2}},
    {GgmlType::I32, "I32", {1, 4}},
    {GgmlType::I64, "I64", {1, 8}},
    {GgmlType::F64, "F64", {1, 8}},
    {GgmlType::IQ1_M, "IQ1_M", {256, 56}},
    {GgmlType::BF16, "BF16", {1, 2}},
    {GgmlType::TQ1_0, "TQ1_0", {256, 54}},
    {GgmlType::TQ2_0, "TQ2_0", {256, 66}},
    {GgmlType::MXFP4, "MXFP4", {32, 17}},
    {GgmlType::NVFP4, "NVFP4", {64, 36}},
    {GgmlType::Q1_0, "Q1_0", {128, 18}},
};

const TypeEntry* find_type(uint32_t t) {
  for (const auto& e : kTypes)
    if (uint32_t(e.type) == t) return &e;
  return nullptr;
}

float half(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return f16_to_f32(h);
}

// ---- one block of each type -> floats (the reference layouts) ----

// Q4_0, 32 weights in 18 bytes: f16 d | 16 bytes qs. Weight j < 16 is the low nibble of qs[j],
// weight j + 16 its high nibble; w = d * (q - 8).
void ref_q4_0(const uint8_t* b, float* y) {
  float d = half(b);
  const uint8_t* qs = b + 2;
  for (int j = 0; j < 16; ++j) {
    y[j] = d * float(int(qs[j] & 15) - 8);
    y[j + 16] = d * float(int(qs[j] >> 4) - 8);
  }
}

// Q4_1, 32 in 20: f16 d | f16 m | 16 bytes qs (as Q4_0); w = d * q + m.
void ref_q4_1(const uint8_t* b, float* y) {
  float d = half(b), m = half(b + 2);
  const uint8_t* qs = b + 4;
  for (int j = 0; j < 16; ++j) {
    y[j] = d * float(qs[j] & 15) + m;
    y[j + 16] = d * float(qs[j] >> 4) + m;
  }
}

// 5-bit weight j of a Q5_0/Q5_1 block: nibble as Q4_0, fifth bit is bit j of the u32 qh.
int q5_weight(uint32_t qh, const uint8_t* qs, int j) {
  int lo = j < 16 ? (qs[j] & 15) : (qs[j - 16] >> 4);
  return lo | int((qh >> j) & 1) << 4;
}

// Q5_0, 32 in 22: f16 d | u32 qh | 16 bytes qs; w = d * (q - 16).
void ref_q5_0(const uint8_t* b, float* y) {
  float d = half(b);
  uint32_t qh;
  std::memcpy(&qh, b + 2, 4);
  for (int j = 0; j < 32; ++j) y[j] = d * float(q5_weight(qh, b + 6, j) - 16);
}

// Q5_1, 32 in 24: f16 d | f16 m | u32 qh | 16 bytes qs; w = d * q + m.
void ref_q5_1(const uint8_t* b, float* y) {
  float d = half(b), m = half(b + 2);
  uint32_t qh;
  std::memcpy(&qh, b + 4, 4);
  for (int j = 0; j < 32; ++j) y[j] = d * float(q5_weight(qh, b + 8, j)) + m;
}

// Q8_0, 32 in 34: f16 d | 32 int8; w = q * d.
void ref_q8_0(const uint8_t* b, float* y) {
  float d = half(b);
  for (int j = 0; j < 32; ++j) y[j] = float(int8_t(b[2 + j])) * d;
}

// Q4_K/Q5_K pack 8 six-bit scales and 8 six-bit mins in 12 bytes s[]: sub-blocks 0-3 use the
// low 6 bits of s[j] (scale) and s[j+4] (min); sub-blocks 4-7 take their low 4 bits from the
// nibbles of s[j+4] and their top 2 bits from the spare top bits of s[j-4] / s[j].
void k_scale_min(const uint8_t* s, int j, int& sc, int& m) {
  if (j < 4) {
    sc = s[j] & 63;
    m = s[j + 4] & 63;
  } else {
    sc = (s[j + 4] & 15) | ((s[j - 4] >> 6) << 4);
    m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
  }
}

// Q4_K, 256 in 144: f16 d | f16 dmin | 12 bytes scales | 128 bytes qs. Sub-block j (32 weights)
// is the low (j even) or high (j odd) nibbles of qs[32*(j/2) .. +32];
// w = (d * sc_j) * q - (dmin * m_j).
void ref_q4_k(const uint8_t* b, float* y) {
  float d = half(b), dmin = half(b + 2);
  const uint8_t* s = b + 4;
  const uint8_t* qs = b + 16;
  for (int j = 0; j < 8; ++j) {
    int sc, m;
    k_scale_min(s, j, sc, m);
    float dl = d * float(sc), ml = dmin * float(m);
    const uint8_t* q = qs + 32 * (j / 2);
    int shift = 4 * (j % 2);
    for (int l = 0; l < 32; ++l) y[32 * j + l] = dl * float((q[l] >> shift) & 15) - ml;
  }
}

// Q5_K, 256 in 176: f16 d | f16 dmin | 12 bytes scales | 32 bytes qh | 128 bytes qs. As Q4_K,
// plus bit j of qh[l] as the fifth bit of weight l of sub-block j.
void ref_q5_k(const uint8_t* b, float* y) {
  float d = half(b), dmin = half(b + 2);
  const uint8_t* s = b + 4;
  const uint8_t* qh = b + 16;
  const uint8_t* qs = b + 48;
  for (int j = 0; j < 8; ++j) {
    int sc, m;
    k_scale_min(s, j, sc, m);
    float dl = d * float(sc), ml = dmin * float(m);
    const uint8_t* q = qs + 32 * (j / 2);
    int shift = 4 * (j % 2);
    for (int l = 0; l < 32; ++l) {
      int v = ((q[l] >> shift) & 15) | (((qh[l] >> j) & 1) << 4);
      y[32 * j + l] = dl * float(v) - ml;
    }
  }
}

// Q6_K, 256 in 210: 128 bytes ql | 64 bytes qh | 16 int8 scales | f16 d. Weight e = 128*h +
// 32*k + l (h < 2, k < 4, l < 32): low 4 bits from nibble k/2 of ql[64*h + 32*(k%2) + l], high
// 2 bits from bits 2k..2k+1 of qh[32*h + l]; w = (d * scale[e/16]) * (q - 32).
void ref_q6_k(const uint8_t* b, float* y) {
  const uint8_t* ql = b;
  const uint8_t* qh = b + 128;
  const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
  float d = half(b + 208);
  for (int h = 0; h < 2; ++h)
    for (int k = 0; k < 4; ++k)
      for (int l = 0; l < 32; ++l) {
        int e = 128 * h + 32 * k + l;
        int lo = (ql[64 * h + 32 * (k % 2) + l] >> (4 * (k / 2))) & 15;
        int hi = (qh[32 * h + l] >> (2 * k)) & 3;
        y[e] = (d * float(sc[e / 16])) * float((lo | hi << 4) - 32);
      }
}

using BlockFn = void (*)(const uint8_t*, float*);

BlockFn ref_block_fn(GgmlType t) {
  switch (t) {
    case GgmlType::Q4_0: return ref_q4_0;
    case GgmlType::Q4_1: return ref_q4_1;
    case GgmlType::Q5_0: return ref_q5_0;
    case GgmlType::Q5_1: return ref_q5_1;
    case GgmlType::Q8_0: return ref_q8_0;
    case GgmlType::Q4_K: return ref_q4_k;
    case GgmlType::Q5_K: return ref_q5_k;
    case GgmlType::Q6_K: return ref_q6_k;
    default: return nullptr;
  }
}

// Checks that t is computable and n a whole number of blocks; returns the traits.
GgmlTypeTraits check_row(GgmlType t, int64_t n, const char* what) {
  if (!ggml_type_computable(t))
    fail("{}: no compute support for ggml type {}", what, ggml_type_name(t));
  GgmlTypeTraits tr = *ggml_type_traits(uint32_t(t));
  if (n < 0 || n % tr.block_size != 0)
    fail("{}: row length {} is not a multiple of the {} block size {}", what, n, ggml_type_name(t),
         tr.block_size);
  return tr;
}

// Calls f(offset, floats, count) over the row, decoded a block (or 256 plain elements) at a time.
template <typename F>
void ref_for_each_chunk(GgmlType t, const void* src, int64_t n, F&& f) {
  const uint8_t* p = static_cast<const uint8_t*>(src);
  float buf[256];
  if (BlockFn fn = ref_block_fn(t)) {
    GgmlTypeTraits tr = *ggml_type_traits(uint32_t(t));
    for (int64_t i = 0; i < n; i += tr.block_size, p += tr.type_size) {
      fn(p, buf);
      f(i, buf, tr.block_size);
    }
    return;
  }
  for (int64_t i = 0; i < n; i += 256) {
    int64_t c = n - i < 256 ? n - i : 256;
    for (int64_t j = 0; j < c; ++j) {
      const uint8_t* e = p + (i + j) * int64_t(t == GgmlType::F32 ? 4 : 2);
      if (t == GgmlType::F32) {
        std::memcpy(&buf[j], e, 4);
      } else {
        uint16_t h;
        std::memcpy(&h, e, 2);
        buf[j] = t == GgmlType::F16 ? f16_to_f32(h) : bf16_to_f32(h);
      }
    }
    f(i, buf, c);
  }
}

SimdLevel detect_level() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
              __builtin_cpu_supports("f16c");
  bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                __builtin_cpu_supports("avx512vl");
  if (avx512) return SimdLevel::AVX512;
  if (avx2) return SimdLevel::AVX2;
#endif
  return SimdLevel::Scalar;
}

SimdLevel& current_level() {
  static SimdLevel level = simd_level_supported();
  return level;
}

detail::QuantKernels kernels_at(SimdLevel l, GgmlType t) {
  switch (l) {
    case SimdLevel::AVX512: return detail::avx512_kernels(t);
    case SimdLevel::AVX2: return detail::avx2_kernels(t);
    case SimdLevel::Scalar: break;
  }
  return {};
}

}  // namespace

std::optional<GgmlTypeTraits> ggml_type_traits(uint32_t type) {
  if (const TypeEntry* e = find_type(type)) return e->traits;
  return std::nullopt;
}

std::string ggml_type_name(GgmlType t) {
  if (const TypeEntry* e = find_type(uint32_t(t))) return e->name;
  return "type" + std::to_string(uint32_t(t));
}

size_t ggml_row_size(GgmlType t, int64_t n) {
  auto tr = ggml_type_traits(uint32_t(t));
  if (!tr) fail("unknown ggml type {}", uint32_t(t));
  if (n < 0 || n % tr->block_size != 0)
    fail("row length {} is not a multiple of the {} block size {}", n, ggml_type_name(t),
         tr->block_size);
  return size_t(n / tr->block_size) * tr->type_size;
}

bool ggml_type_computable(GgmlType t) {
  switch (t) {
    case GgmlType::F32:
    case GgmlType::F16:
    case GgmlType::BF16:
    case GgmlType::Q8_0:
    case GgmlType::Q4_0:
    case GgmlType::Q4_1:
    case GgmlType::Q5_0:
    case GgmlType::Q5_1:
    case GgmlType::Q4_K:
    case GgmlType::Q5_K:
    case GgmlType::Q6_K: return true;
    default: return false;
  }
}

void dequantize_row_ref(GgmlType t, const void* src, float* dst, int64_t n) {
  check_row(t, n, "dequantize_row_ref");
  ref_for_each_chunk(t, src, n, [&](int64_t i, const float* v, int64_t c) {
    std::memcpy(dst + i, v, size_t(c) * sizeof(float));
  });
}

float vec_dot_ref(GgmlType t, const void* row, const float* x, int64_t n) {
  check_row(t, n, "vec_dot_ref");
  double acc = 0;
  ref_for_each_chunk(t, row, n, [&](int64_t i, const float* v, int64_t c) {
    for (int64_t j = 0; j < c; ++j) acc += double(v[j]) * double(x[i + j]);
  });
  return float(acc);
}

void dequantize_row(GgmlType t, const void* src, float* dst, int64_t n) {
  check_row(t, n, "dequantize_row");
  if (auto k = kernels_at(current_level(), t); k.dequant) return k.dequant(src, dst, n);
  dequantize_row_ref(t, src, dst, n);
}

float vec_dot(GgmlType t, const void* row, const float* x, int64_t n) {
  check_row(t, n, "vec_dot");
  if (auto k = kernels_at(current_level(), t); k.dot) return k.dot(row, x, n);
  return vec_dot_ref(t, row, x, n);
}

const char* simd_level_name(SimdLevel l) {
  switch (l) {
    case SimdLevel::Scalar: return "scalar";
    case SimdLevel::AVX2: return "avx2";
    case SimdLevel::AVX512: return "avx512";
  }
  return "?";
}

SimdLevel simd_level_supported() {
  static const SimdLevel level = detect_level();
  return level;
}

SimdLevel simd_level() { return current_level(); }

void set_simd_level_for_testing(SimdLevel l) {
  if (int(l) > int(simd_level_supported()))
    fail("SIMD level {} requested, but this CPU supports at most {}", simd_level_name(l),
         simd_level_name(simd_level_supported()));
  current_level() = l;
}

}  // namespace bigmoe
