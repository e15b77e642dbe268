// Element types of stored tensors and their exact conversion to float32.
#pragma once
#include <cstdint>
#include <cstring>
#include <optional>
#include <string_view>

namespace bigmoe {

enum class DType { F32, F16, BF16, F8_E4M3, I64, I32, I16, I8, U8 };

size_t dtype_size(DType t);
const char* dtype_name(DType t);  // safetensors spelling: "F32", "BF16", "F8_E4M3", ...
std::optional<DType> parse_safetensors_dtype(std::string_view s);

inline float bf16_to_f32(uint16_t h) {
  uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Round-to-nearest-even, as torch does when casting float32 -> bfloat16.
inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);  // NaN stays NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

float f16_to_f32(uint16_t h);
// float8 e4m3fn (OCP FP8, no infinities, 0x7f/0xff are NaN), as torch.float8_e4m3fn.
float f8e4m3_to_f32(uint8_t v);

// Converts n elements of type t starting at src to float32.
void to_f32(DType t, const void* src, float* dst, size_t n);

}  // namespace bigmoe
