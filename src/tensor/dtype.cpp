#include "tensor/dtype.h"

#include <cmath>

#include "util/error.h"

namespace bigmoe {

size_t dtype_size(DType t) {
  switch (t) {
    case DType::F32: case DType::I32: return 4;
    case DType::F16: case DType::BF16: case DType::I16: return 2;
    case DType::F8_E4M3: case DType::I8: case DType::U8: return 1;
    case DType::I64: return 8;
  }
  return 0;
}

const char* dtype_name(DType t) {
  switch (t) {
    case DType::F32: return "F32";
    case DType::F16: return "F16";
    case DType::BF16: return "BF16";
    case DType::F8_E4M3: return "F8_E4M3";
    case DType::I64: return "I64";
    case DType::I32: return "I32";
    case DType::I16: return "I16";
    case DType::I8: return "I8";
    case DType::U8: return "U8";
  }
  return "?";
}

std::optional<DType> parse_safetensors_dtype(std::string_view s) {
  static constexpr std::pair<std::string_view, DType> kNames[] = {
      {"F32", DType::F32}, {"F16", DType::F16}, {"BF16", DType::BF16},
      {"F8_E4M3", DType::F8_E4M3}, {"I64", DType::I64}, {"I32", DType::I32},
      {"I16", DType::I16}, {"I8", DType::I8}, {"U8", DType::U8}};
  for (auto& [n, t] : kNames)
    if (n == s) return t;
  return std::nullopt;
}

float f16_to_f32(uint16_t h) {
  uint32_t sign = (h >> 15) & 1, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
  float v;
  if (exp == 0) v = std::ldexp(float(man), -24);
  else if (exp == 31) v = man ? NAN : INFINITY;
  else v = std::ldexp(float(man | 0x400), int(exp) - 25);
  return sign ? -v : v;
}

float f8e4m3_to_f32(uint8_t x) {
  uint32_t sign = x >> 7, exp = (x >> 3) & 0xf, man = x & 7;
  float v;
  if (exp == 0xf && man == 7) v = NAN;
  else if (exp == 0) v = std::ldexp(float(man), -9);  // subnormal: man/8 * 2^-6
  else v = std::ldexp(float(man | 8), int(exp) - 10);  // (1+man/8) * 2^(exp-7)
  return sign ? -v : v;
}

void to_f32(DType t, const void* src, float* dst, size_t n) {
  switch (t) {
    case DType::F32: std::memcpy(dst, src, n * 4); return;
    case DType::BF16: {
      auto p = static_cast<const uint16_t*>(src);
      for (size_t i = 0; i < n; ++i) dst[i] = bf16_to_f32(p[i]);
      return;
    }
    case DType::F16: {
      auto p = static_cast<const uint16_t*>(src);
      for (size_t i = 0; i < n; ++i) dst[i] = f16_to_f32(p[i]);
      return;
    }
    case DType::F8_E4M3: {
      auto p = static_cast<const uint8_t*>(src);
      for (size_t i = 0; i < n; ++i) dst[i] = f8e4m3_to_f32(p[i]);
      return;
    }
    case DType::I64: { auto p = static_cast<const int64_t*>(src); for (size_t i = 0; i < n; ++i) dst[i] = float(p[i]); return; }
    case DType::I32: { auto p = static_cast<const int32_t*>(src); for (size_t i = 0; i < n; ++i) dst[i] = float(p[i]); return; }
    case DType::I16: { auto p = static_cast<const int16_t*>(src); for (size_t i = 0; i < n; ++i) dst[i] = float(p[i]); return; }
    case DType::I8:  { auto p = static_cast<const int8_t*>(src);  for (size_t i = 0; i < n; ++i) dst[i] = float(p[i]); return; }
    case DType::U8:  { auto p = static_cast<const uint8_t*>(src); for (size_t i = 0; i < n; ++i) dst[i] = float(p[i]); return; }
  }
  fail("to_f32: unknown dtype");
}

}  // namespace bigmoe
