// Quantized-activation dots (tensor/quant_act.h): the AVX2 kernels against the scalar
// reference on fresh random blocks, the reference against the float dot of the dequantized
// operands, and f32_to_f16 against the compiler's own conversion.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "tensor/dtype.h"
#include "tensor/quant.h"
#include "tensor/quant_act.h"
#include "util/error.h"

namespace bigmoe {
namespace {

std::vector<uint8_t> random_row(GgmlType t, int64_t n, std::mt19937& rng) {
  std::vector<uint8_t> row(ggml_row_size(t, n));
  std::uniform_int_distribution<int> byte(0, 255);
  for (auto& b : row) b = uint8_t(byte(rng));
  // Scale fields: finite f16 of moderate size (d, and m for the _1 types), at each block start.
  size_t bs = ggml_row_size(t, 32);
  std::uniform_real_distribution<float> mag(0.001f, 0.1f);
  int nscale = (t == GgmlType::Q4_1 || t == GgmlType::Q5_1) ? 2 : 1;
  for (size_t b = 0; b < row.size() / bs; ++b)
    for (int k = 0; k < nscale; ++k) {
      uint16_t h = f32_to_f16(mag(rng) * (byte(rng) & 1 ? 1.f : -1.f));
      std::memcpy(&row[b * bs + 2 * k], &h, 2);
    }
  return row;
}

TEST(QuantAct, F16RoundingMatchesCompiler) {
  std::mt19937 rng(1);
  std::uniform_int_distribution<uint32_t> bits;
  for (int i = 0; i < 200000; ++i) {
    uint32_t u = bits(rng);
    float f;
    std::memcpy(&f, &u, 4);
    if (std::isnan(f)) continue;
    _Float16 h = static_cast<_Float16>(f);
    uint16_t want;
    std::memcpy(&want, &h, 2);
    ASSERT_EQ(f32_to_f16(f), want) << f;
  }
  EXPECT_EQ(f32_to_f16(65520.f), 0x7c00);  // rounds to infinity
  EXPECT_EQ(f32_to_f16(65519.f), 0x7bff);
  EXPECT_EQ(f32_to_f16(5.9604645e-08f), 0x0001);  // smallest subnormal
}

class QuantActTypes : public ::testing::TestWithParam<GgmlType> {};

TEST_P(QuantActTypes, FastMatchesReferenceAndFloat) {
  const GgmlType w = GetParam(), a = act_type_for(w);
  ASSERT_NE(a, GgmlType::F32);
  std::mt19937 rng(std::random_device{}());
  std::normal_distribution<float> nd(0.f, 1.f);
  for (int64_t n : {32, 96, 576, 1536}) {
    auto row = random_row(w, n, rng);
    std::vector<float> x(n), wf(n);
    for (auto& v : x) v = nd(rng) * (nd(rng) > 2.f ? 20.f : 1.f);  // a few outliers
    std::vector<uint8_t> xq(act_row_size(a, n));
    quantize_act(a, x.data(), xq.data(), n);
    float ref = vec_dot_act_ref(w, row.data(), xq.data(), n);
    float fast = vec_dot_act(w, row.data(), xq.data(), n);
    dequantize_row_ref(w, row.data(), wf.data(), n);
    double exact = 0, mag = 0, bound = 0;
    const size_t wbs = ggml_row_size(w, 32);
    for (int64_t b = 0; b < n / 32; ++b) {
      double amax = 0, sum_absx = 0;
      for (int j = 0; j < 32; ++j) {
        amax = std::max(amax, std::abs(double(x[b * 32 + j])));
        sum_absx += std::abs(double(x[b * 32 + j]));
      }
      // Round-to-nearest 8-bit activations: each x_i is off by at most d/2 (d = amax/127),
      // plus 127 ulps of d's f16 rounding (2^-11 relative): ≤ 0.57·d, bound with 0.6·d.
      const double d = amax / 127.0;
      for (int j = 0; j < 32; ++j) {
        const int64_t i = b * 32 + j;
        exact += double(wf[i]) * x[i];
        mag += std::abs(double(wf[i]) * x[i]);
        bound += std::abs(double(wf[i])) * 0.6 * d;
      }
      // The _1 types add m·s with s = d·Σq rounded to f16: |m|·|s|·2^-11 more.
      if (w == GgmlType::Q4_1 || w == GgmlType::Q5_1) {
        uint16_t mh;
        std::memcpy(&mh, &row[b * wbs + 2], 2);
        bound += std::abs(double(f16_to_f32(mh))) * (sum_absx + 32 * 0.6 * d) * std::ldexp(1.0, -10);
      }
    }
    EXPECT_NEAR(fast, ref, 1e-5 * mag) << ggml_type_name(w) << " n=" << n;
    // The reference's only error against the float dot is the activation rounding above
    // (plus float accumulation, 1e-5 of Σ|w·x|).
    EXPECT_NEAR(ref, exact, bound + 1e-5 * mag) << ggml_type_name(w) << " n=" << n;
  }
}

INSTANTIATE_TEST_SUITE_P(Types, QuantActTypes,
                         ::testing::Values(GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q5_0, GgmlType::Q5_1, GgmlType::Q8_0),
                         [](const auto& info) { return ggml_type_name(info.param); });

TEST(QuantAct, RejectsBadInput) {
  std::vector<float> x(33);
  std::vector<uint8_t> q(64);
  EXPECT_THROW(quantize_act(GgmlType::Q8_0, x.data(), q.data(), 33), Error);
  EXPECT_THROW(quantize_act(GgmlType::Q4_0, x.data(), q.data(), 32), Error);
}

}  // namespace
}  // namespace bigmoe
