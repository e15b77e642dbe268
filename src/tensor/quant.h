// ggml tensor types (as stored in GGUF files): the type table, and dequantization / dot
// products for the types we compute with.
//
// Block layouts follow the `gguf` Python package's numpy dequantizers (gguf/quants.py), which
// are the test reference. A quantized row of n weights is n / block_size consecutive blocks of
// type_size bytes; within a block, weight i of the row is block i / block_size.
//
// Every function comes in a scalar reference (`*_ref`) and a public version that dispatches at
// run time to the widest SIMD level this CPU has (AVX-512 F/BW/VL, AVX2+FMA+F16C, or scalar).
// The SIMD code is compiled per function with target attributes, so the binary runs on any
// x86-64.
#pragma once
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>

namespace bigmoe {

// ggml's numbering (ggml.h enum ggml_type). Gaps are types ggml has removed.
enum class GgmlType : uint32_t {
  F32 = 0,
  F16 = 1,
  Q4_0 = 2,
  Q4_1 = 3,
  Q5_0 = 6,
  Q5_1 = 7,
  Q8_0 = 8,
  Q8_1 = 9,
  Q2_K = 10,
  Q3_K = 11,
  Q4_K = 12,
  Q5_K = 13,
  Q6_K = 14,
  Q8_K = 15,
  IQ2_XXS = 16,
  IQ2_XS = 17,
  IQ3_XXS = 18,
  IQ1_S = 19,
  IQ4_NL = 20,
  IQ3_S = 21,
  IQ2_S = 22,
  IQ4_XS = 23,
  I8 = 24,
  I16 = 25,
  I32 = 26,
  I64 = 27,
  F64 = 28,
  IQ1_M = 29,
  BF16 = 30,
  TQ1_0 = 34,
  TQ2_0 = 35,
  MXFP4 = 39,
  NVFP4 = 40,
  Q1_0 = 41,
};

struct GgmlTypeTraits {
  int64_t block_size;  // weights per block (1 for plain types)
  size_t type_size;    // bytes per block
};

// Traits of a known type number; nullopt for numbers ggml does not define (or has removed).
std::optional<GgmlTypeTraits> ggml_type_traits(uint32_t type);
// "Q4_K", "F32", ...; "type<N>" for an unknown number.
std::string ggml_type_name(GgmlType t);
// Bytes of a row of n weights; throws bigmoe::Error for unknown types or n not a multiple of
// the block size.
size_t ggml_row_size(GgmlType t, int64_t n);

// Types dequantize_row / vec_dot accept: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K,
// Q5_K, Q6_K.
bool ggml_type_computable(GgmlType t);

// Scalar references. src: (n / block_size) blocks; dst/x: (n,) floats. n must be a multiple
// of the block size. The values equal gguf.quants.dequantize bit for bit. vec_dot_ref sums
// w[i] * x[i] in double and rounds once.
void dequantize_row_ref(GgmlType t, const void* src, float* dst, int64_t n);
float vec_dot_ref(GgmlType t, const void* row, const float* x, int64_t n);

// Fast versions at the current SIMD level. dequantize_row gives the same bits as the
// reference; vec_dot sums in float with FMA, within ~1e-6 of sum |w[i] * x[i]|.
// Both throw bigmoe::Error for a type without compute support or a bad n.
void dequantize_row(GgmlType t, const void* src, float* dst, int64_t n);
float vec_dot(GgmlType t, const void* row, const float* x, int64_t n);

enum class SimdLevel { Scalar, AVX2, AVX512 };
const char* simd_level_name(SimdLevel l);
// The best level this CPU supports (AVX2 needs AVX2+FMA+F16C; AVX512 needs F/BW/VL too).
SimdLevel simd_level_supported();
// The level dequantize_row / vec_dot use now (the supported one unless overridden).
SimdLevel simd_level();
// Tests force a level with this; throws bigmoe::Error if the CPU lacks it. Not thread-safe
// with concurrent dequantize_row / vec_dot calls.
void set_simd_level_for_testing(SimdLevel l);

}  // namespace bigmoe
