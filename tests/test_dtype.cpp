// Conversions of stored element types to float32, checked exhaustively against references
// that are built differently from the implementation in src/tensor/dtype.cpp (which decodes
// with std::ldexp): here float32 bit patterns are assembled directly from the fields, and
// float16 is also compared with the compiler's own _Float16 where it exists.
#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>

#include "tensor/dtype.h"

using namespace bigmoe;

namespace {

uint32_t bits(float f) { return std::bit_cast<uint32_t>(f); }
float from_bits(uint32_t u) { return std::bit_cast<float>(u); }

// Equal as bit patterns (so -0 differs from +0), or both NaN.
::testing::AssertionResult same_float(float got, float want) {
  if ((std::isnan(got) && std::isnan(want)) || bits(got) == bits(want))
    return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "got " << got << " (0x" << std::hex << bits(got)
                                       << "), want " << want << " (0x" << bits(want) << ")";
}

// Re-biases a normal number's exponent and shifts its mantissa into a float32 bit pattern.
// Subnormal inputs are exact small multiples of a power of two, computed by division.
float ref_f8e4m3(uint8_t v) {
  uint32_t sign = v >> 7, exp = (v >> 3) & 0xf, man = v & 7;
  if (exp == 0xf && man == 7) return std::numeric_limits<float>::quiet_NaN();
  if (exp == 0) {
    float m = float(man) / 512.0f;  // man * 2^-3 * 2^-6
    return sign ? -m : m;
  }
  return from_bits(sign << 31 | (exp - 7 + 127) << 23 | man << 20);
}

float ref_f16(uint16_t h) {
  uint32_t sign = h >> 15, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
  if (exp == 0x1f) return from_bits(sign << 31 | 0xff << 23 | man << 13);  // inf / NaN
  if (exp == 0) {
    float m = float(double(man) / 16777216.0);  // man * 2^-24
    return sign ? -m : m;
  }
  return from_bits(sign << 31 | (exp - 15 + 127) << 23 | man << 13);
}

// bfloat16 value from its fields in double arithmetic: (1 + man/128) * 2^(exp-127).
float ref_bf16(uint16_t h) {
  int sign = h >> 15, exp = (h >> 7) & 0xff, man = h & 0x7f;
  double v;
  if (exp == 0xff) {
    v = man ? std::numeric_limits<double>::quiet_NaN() : std::numeric_limits<double>::infinity();
  } else {
    double scale = 1.0;
    int e = exp == 0 ? -126 : exp - 127;
    for (; e > 0; --e) scale *= 2.0;
    for (; e < 0; ++e) scale /= 2.0;
    v = (exp == 0 ? man / 128.0 : 1.0 + man / 128.0) * scale;
  }
  return float(sign ? -v : v);
}

// Nearest bfloat16 to a finite float, ties to the even mantissa, by comparing distances in
// double between the two bfloat16 neighbours (not by the add-and-truncate trick).
uint16_t ref_f32_to_bf16(float f) {
  uint32_t u = bits(f);
  uint16_t lo = uint16_t(u >> 16);  // truncation: toward zero in magnitude
  uint16_t hi = uint16_t(lo + 1);   // next magnitude up (may become inf, which is right)
  double dlo = std::fabs(double(f) - double(ref_bf16(lo)));
  double dhi = std::fabs(double(ref_bf16(hi)) - double(f));
  if ((hi & 0x7fff) == 0x7f80) {
    // Above the largest finite bf16 the neighbour is infinity; IEEE rounds to it when f is at
    // or past the midpoint to the next (unrepresentable) value 2^128.
    double next = std::ldexp(1.0, 128);
    dhi = next - std::fabs(double(f));
  }
  if (dlo < dhi) return lo;
  if (dhi < dlo) return hi;
  return (lo & 1) ? hi : lo;
}

}  // namespace

TEST(DType, SizesAndNames) {
  for (auto [t, size, name] : {std::tuple{DType::F32, 4, "F32"}, {DType::F16, 2, "F16"},
                               {DType::BF16, 2, "BF16"}, {DType::F8_E4M3, 1, "F8_E4M3"},
                               {DType::I64, 8, "I64"}, {DType::I32, 4, "I32"},
                               {DType::I16, 2, "I16"}, {DType::I8, 1, "I8"},
                               {DType::U8, 1, "U8"}}) {
    EXPECT_EQ(dtype_size(t), size_t(size));
    EXPECT_STREQ(dtype_name(t), name);
    EXPECT_EQ(parse_safetensors_dtype(name), t);
  }
  EXPECT_FALSE(parse_safetensors_dtype("F64"));
  EXPECT_FALSE(parse_safetensors_dtype("bf16"));
}

TEST(DType, F8E4M3AllCodes) {
  for (int c = 0; c < 256; ++c) {
    SCOPED_TRACE(c);
    EXPECT_TRUE(same_float(f8e4m3_to_f32(uint8_t(c)), ref_f8e4m3(uint8_t(c))));
  }
  // Known values of torch.float8_e4m3fn.
  EXPECT_EQ(f8e4m3_to_f32(0x7e), 448.f);  // largest finite
  EXPECT_EQ(f8e4m3_to_f32(0xfe), -448.f);
  EXPECT_EQ(f8e4m3_to_f32(0x01), std::ldexp(1.f, -9));  // smallest subnormal
  EXPECT_EQ(f8e4m3_to_f32(0x07), 7.f / 512);             // largest subnormal
  EXPECT_EQ(f8e4m3_to_f32(0x08), 1.f / 64);              // smallest normal
  EXPECT_EQ(f8e4m3_to_f32(0x38), 1.f);
  EXPECT_EQ(f8e4m3_to_f32(0x40), 2.f);
  EXPECT_EQ(f8e4m3_to_f32(0x3c), 1.5f);
  EXPECT_EQ(f8e4m3_to_f32(0x78), 256.f);  // exponent 15 is finite in e4m3fn (no infinities)
  EXPECT_TRUE(std::isnan(f8e4m3_to_f32(0x7f)));
  EXPECT_TRUE(std::isnan(f8e4m3_to_f32(0xff)));
  EXPECT_TRUE(same_float(f8e4m3_to_f32(0x80), -0.f));
  int nans = 0;
  for (int c = 0; c < 256; ++c) nans += std::isnan(f8e4m3_to_f32(uint8_t(c)));
  EXPECT_EQ(nans, 2);
}

TEST(DType, F16AllCodes) {
  for (uint32_t c = 0; c < 65536; ++c) {
    float got = f16_to_f32(uint16_t(c));
    ASSERT_TRUE(same_float(got, ref_f16(uint16_t(c)))) << "code 0x" << std::hex << c;
#ifdef __FLT16_MAX__
    _Float16 h;
    uint16_t cc = uint16_t(c);
    std::memcpy(&h, &cc, 2);
    ASSERT_TRUE(same_float(got, float(h))) << "code 0x" << std::hex << c << " vs _Float16";
#endif
  }
  EXPECT_EQ(f16_to_f32(0x3c00), 1.f);
  EXPECT_EQ(f16_to_f32(0x7bff), 65504.f);
  EXPECT_EQ(f16_to_f32(0x0001), std::ldexp(1.f, -24));
  EXPECT_EQ(f16_to_f32(0x0400), std::ldexp(1.f, -14));
  EXPECT_EQ(f16_to_f32(0x3555), 0.333251953125f);
  EXPECT_EQ(f16_to_f32(0x7c00), std::numeric_limits<float>::infinity());
  EXPECT_EQ(f16_to_f32(0xfc00), -std::numeric_limits<float>::infinity());
  EXPECT_TRUE(std::isnan(f16_to_f32(0x7e00)));
  EXPECT_TRUE(std::isnan(f16_to_f32(0x7c01)));
  EXPECT_TRUE(same_float(f16_to_f32(0x8000), -0.f));
}

TEST(DType, Bf16ToF32AllCodes) {
  for (uint32_t c = 0; c < 65536; ++c)
    ASSERT_TRUE(same_float(bf16_to_f32(uint16_t(c)), ref_bf16(uint16_t(c))))
        << "code 0x" << std::hex << c;
  EXPECT_EQ(bf16_to_f32(0x3f80), 1.f);
  EXPECT_EQ(bf16_to_f32(0xc020), -2.5f);
  EXPECT_EQ(bf16_to_f32(0x7f7f), 3.3895313892515355e38f);  // largest finite
  EXPECT_EQ(bf16_to_f32(0x0001), std::ldexp(1.f, -133));   // smallest subnormal
}

TEST(DType, F32ToBf16TiesToEven) {
  const float one = 1.f;
  // 1 + 2^-8 is halfway between 1 (0x3f80, even) and 1 + 2^-7 (0x3f81): rounds to even.
  EXPECT_EQ(f32_to_bf16(one + std::ldexp(1.f, -8)), 0x3f80);
  // 1 + 3*2^-8 is halfway between 0x3f81 (odd) and 0x3f82 (even).
  EXPECT_EQ(f32_to_bf16(one + 3 * std::ldexp(1.f, -8)), 0x3f82);
  // Just off the midpoint goes to the nearer neighbour.
  EXPECT_EQ(f32_to_bf16(one + std::ldexp(1.f, -8) + std::ldexp(1.f, -20)), 0x3f81);
  EXPECT_EQ(f32_to_bf16(one + std::ldexp(1.f, -8) - std::ldexp(1.f, -20)), 0x3f80);
  EXPECT_EQ(f32_to_bf16(-(one + 3 * std::ldexp(1.f, -8))), 0xbf82);
  // Exact values pass through; carries propagate into the exponent.
  EXPECT_EQ(f32_to_bf16(1.f), 0x3f80);
  EXPECT_EQ(f32_to_bf16(from_bits(0x3fffffff)), 0x4000);  // 1.999... -> 2
  EXPECT_EQ(f32_to_bf16(-0.f), 0x8000);
  EXPECT_EQ(f32_to_bf16(std::numeric_limits<float>::infinity()), 0x7f80);
  EXPECT_EQ(f32_to_bf16(std::numeric_limits<float>::max()), 0x7f80);  // overflows to inf
  EXPECT_EQ(f32_to_bf16(std::numeric_limits<float>::denorm_min()), 0x0000);
  // NaNs stay NaN, including signalling ones whose payload sits in the dropped bits.
  for (uint32_t nan : {0x7fc00000u, 0x7f800001u, 0xff800001u, 0x7fffffffu}) {
    uint16_t b = f32_to_bf16(from_bits(nan));
    EXPECT_TRUE(std::isnan(bf16_to_f32(b))) << std::hex << nan << " -> " << b;
    EXPECT_EQ(b >> 15, nan >> 31);
  }
}

TEST(DType, F32ToBf16MatchesNearestNeighbour) {
  // Every bf16 value exactly, each midpoint, and random floats across the whole range.
  std::vector<float> xs;
  for (uint32_t c = 0; c < 65536; ++c) {
    if ((c & 0x7f80) == 0x7f80) continue;  // inf/NaN handled above
    xs.push_back(from_bits(c << 16));
    xs.push_back(from_bits(c << 16 | 0x8000));  // exact tie
    xs.push_back(from_bits(c << 16 | 0x7fff));
    xs.push_back(from_bits(c << 16 | 0x8001));
  }
  std::mt19937 rng(1234);
  for (int i = 0; i < 1000000; ++i) {
    float f = from_bits(uint32_t(rng()));
    if (std::isfinite(f)) xs.push_back(f);
  }
  for (float f : xs)
    ASSERT_EQ(f32_to_bf16(f), ref_f32_to_bf16(f)) << std::hex << "f32 0x" << bits(f);
}

TEST(DType, ToF32AllTypes) {
  float out[3];
  const uint16_t bf[3] = {0x3f80, 0xc020, 0x0000};
  to_f32(DType::BF16, bf, out, 3);
  EXPECT_EQ(std::vector<float>(out, out + 3), (std::vector<float>{1.f, -2.5f, 0.f}));
  const uint16_t h[3] = {0x3c00, 0xc000, 0x7bff};
  to_f32(DType::F16, h, out, 3);
  EXPECT_EQ(std::vector<float>(out, out + 3), (std::vector<float>{1.f, -2.f, 65504.f}));
  const uint8_t f8[3] = {0x38, 0x7e, 0xb8};
  to_f32(DType::F8_E4M3, f8, out, 3);
  EXPECT_EQ(std::vector<float>(out, out + 3), (std::vector<float>{1.f, 448.f, -1.f}));
  const float f[3] = {1.5f, -0.f, 7.f};
  to_f32(DType::F32, f, out, 3);
  EXPECT_EQ(std::vector<float>(out, out + 3), (std::vector<float>{1.5f, 0.f, 7.f}));
  const int64_t i8[3] = {-3, 0, int64_t(1) << 33};
  to_f32(DType::I64, i8, out, 3);
  EXPECT_EQ(std::vector<float>(out, out + 3), (std::vector<float>{-3.f, 0.f, 8589934592.f}));
  const int32_t i4[3] = {-3, 0, 100000};
  to_f32(DType::I32, i4, out, 3);
  EXPECT_EQ(std::vector<float>(out, out + 3), (std::vector<float>{-3.f, 0.f, 100000.f}));
  const int16_t i2[3] = {-32768, 0, 32767};
  to_f32(DType::I16, i2, out, 3);
  EXPECT_EQ(std::vector<float>(out, out + 3), (std::vector<float>{-32768.f, 0.f, 32767.f}));
  const int8_t i1[3] = {-128, 0, 127};
  to_f32(DType::I8, i1, out, 3);
  EXPECT_EQ(std::vector<float>(out, out + 3), (std::vector<float>{-128.f, 0.f, 127.f}));
  const uint8_t u1[3] = {0, 128, 255};
  to_f32(DType::U8, u1, out, 3);
  EXPECT_EQ(std::vector<float>(out, out + 3), (std::vector<float>{0.f, 128.f, 255.f}));
}
