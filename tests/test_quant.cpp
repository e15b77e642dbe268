// ggml quant types: the reference dequantizers against gguf.quants (fixtures from
// tools/make_quant_fixtures.py), every SIMD level against the fixtures bit for bit, and every
// SIMD vec_dot against the reference on fresh random blocks. Levels this CPU lacks are skipped.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "tensor/quant.h"
#include "util/error.h"

namespace fs = std::filesystem;
using bigmoe::GgmlType;
using bigmoe::SimdLevel;

namespace {

const fs::path kDir = fs::path(BIGMOE_FIXTURES) / "quant";

const GgmlType kComputable[] = {GgmlType::F32,  GgmlType::F16,  GgmlType::BF16, GgmlType::Q8_0,
                                GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q5_0, GgmlType::Q5_1,
                                GgmlType::Q4_K, GgmlType::Q5_K, GgmlType::Q6_K};
const SimdLevel kLevels[] = {SimdLevel::Scalar, SimdLevel::AVX2, SimdLevel::AVX512};

std::vector<uint8_t> read_file(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  EXPECT_TRUE(f) << "cannot open " << p;
  return std::vector<uint8_t>(std::istreambuf_iterator<char>(f), {});
}

std::vector<float> read_f32(const fs::path& p) {
  std::vector<uint8_t> b = read_file(p);
  std::vector<float> v(b.size() / 4);
  std::memcpy(v.data(), b.data(), v.size() * 4);
  return v;
}

uint32_t bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

// First index where got and want differ in bits (or -1).
int64_t first_mismatch(const float* got, const std::vector<float>& want, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    if (bits(got[i]) != bits(want[i])) return i;
  return -1;
}

// Byte offsets of the fp16 scale / min fields in one block (as in make_quant_fixtures.py).
std::vector<int> half_fields(GgmlType t) {
  switch (t) {
    case GgmlType::Q4_0:
    case GgmlType::Q5_0:
    case GgmlType::Q8_0: return {0};
    case GgmlType::Q4_1:
    case GgmlType::Q5_1:
    case GgmlType::Q4_K:
    case GgmlType::Q5_K: return {0, 2};
    case GgmlType::Q6_K: return {208};
    default: return {};
  }
}

// n weights of type t: random bytes; fp16 fields finite with |v| in [2^-10, 1); plain types
// random finite values.
std::vector<uint8_t> random_row(GgmlType t, int64_t n, std::mt19937& rng) {
  auto tr = *bigmoe::ggml_type_traits(uint32_t(t));
  std::vector<uint8_t> row(bigmoe::ggml_row_size(t, n));
  std::uniform_int_distribution<int> byte(0, 255);
  for (auto& b : row) b = uint8_t(byte(rng));
  auto random_half = [&]() {
    uint16_t exp = uint16_t(std::uniform_int_distribution<int>(5, 14)(rng));
    uint16_t man = uint16_t(std::uniform_int_distribution<int>(0, 1023)(rng));
    return uint16_t((byte(rng) & 1) << 15 | exp << 10 | man);
  };
  if (t == GgmlType::F32) {
    std::normal_distribution<float> nd;
    for (int64_t i = 0; i < n; ++i) {
      float v = nd(rng);
      std::memcpy(&row[4 * i], &v, 4);
    }
  } else if (t == GgmlType::F16 || t == GgmlType::BF16) {
    for (int64_t i = 0; i < n; ++i) {
      uint16_t h;
      if (t == GgmlType::F16) {
        h = random_half();
      } else {  // bf16 of |v| in about [2^-10, 2^10): biased exponent 117..136
        h = uint16_t((byte(rng) & 1) << 15 |
                     std::uniform_int_distribution<int>(117, 136)(rng) << 7 | (byte(rng) & 127));
      }
      std::memcpy(&row[2 * i], &h, 2);
    }
  } else {
    for (int64_t b = 0; b < n / tr.block_size; ++b)
      for (int off : half_fields(t)) {
        uint16_t h = random_half();
        std::memcpy(&row[b * tr.type_size + off], &h, 2);
      }
  }
  return row;
}

// Forces a SIMD level for the test's duration; skips the test if the CPU lacks it.
class LevelGuard {
 public:
  explicit LevelGuard(SimdLevel l) : saved_(bigmoe::simd_level()) {
    if (int(l) <= int(bigmoe::simd_level_supported())) {
      bigmoe::set_simd_level_for_testing(l);
      ok_ = true;
    }
  }
  ~LevelGuard() { bigmoe::set_simd_level_for_testing(saved_); }
  bool ok() const { return ok_; }

 private:
  SimdLevel saved_;
  bool ok_ = false;
};

struct Case {
  GgmlType type;
  SimdLevel level;
};

std::string case_name(const ::testing::TestParamInfo<Case>& i) {
  return bigmoe::ggml_type_name(i.param.type) + "_" + bigmoe::simd_level_name(i.param.level);
}

std::vector<Case> all_cases() {
  std::vector<Case> cs;
  for (GgmlType t : kComputable)
    for (SimdLevel l : kLevels) cs.push_back({t, l});
  return cs;
}

}  // namespace

// ---------------------------------------------------------------------------------------
// Type table

TEST(QuantTypes, TableMatchesGgml) {
  struct Want {
    GgmlType t;
    const char* name;
    int64_t block;
    size_t size;
  };
  const Want ws[] = {{GgmlType::F32, "F32", 1, 4},       {GgmlType::F16, "F16", 1, 2},
                     {GgmlType::Q4_0, "Q4_0", 32, 18},   {GgmlType::Q4_1, "Q4_1", 32, 20},
                     {GgmlType::Q5_0, "Q5_0", 32, 22},   {GgmlType::Q5_1, "Q5_1", 32, 24},
                     {GgmlType::Q8_0, "Q8_0", 32, 34},   {GgmlType::Q2_K, "Q2_K", 256, 84},
                     {GgmlType::Q3_K, "Q3_K", 256, 110}, {GgmlType::Q4_K, "Q4_K", 256, 144},
                     {GgmlType::Q5_K, "Q5_K", 256, 176}, {GgmlType::Q6_K, "Q6_K", 256, 210},
                     {GgmlType::Q8_K, "Q8_K", 256, 292}, {GgmlType::IQ4_XS, "IQ4_XS", 256, 136},
                     {GgmlType::BF16, "BF16", 1, 2},     {GgmlType::MXFP4, "MXFP4", 32, 17}};
  for (const auto& w : ws) {
    auto tr = bigmoe::ggml_type_traits(uint32_t(w.t));
    ASSERT_TRUE(tr) << w.name;
    EXPECT_EQ(bigmoe::ggml_type_name(w.t), w.name);
    EXPECT_EQ(tr->block_size, w.block) << w.name;
    EXPECT_EQ(tr->type_size, w.size) << w.name;
  }
  EXPECT_EQ(uint32_t(GgmlType::BF16), 30u);
  EXPECT_EQ(uint32_t(GgmlType::Q6_K), 14u);
  for (uint32_t removed : {4u, 5u, 31u, 32u, 33u, 36u, 37u, 38u, 1000u}) {
    EXPECT_FALSE(bigmoe::ggml_type_traits(removed)) << removed;
    EXPECT_EQ(bigmoe::ggml_type_name(GgmlType(removed)), "type" + std::to_string(removed));
  }
  EXPECT_EQ(bigmoe::ggml_row_size(GgmlType::Q4_K, 512), 288u);
  EXPECT_EQ(bigmoe::ggml_row_size(GgmlType::BF16, 7), 14u);
  EXPECT_THROW(bigmoe::ggml_row_size(GgmlType::Q8_0, 33), bigmoe::Error);
}

TEST(QuantTypes, RejectsUnsupportedTypeAndBadLength) {
  std::vector<uint8_t> blk(256);
  std::vector<float> out(256), x(256);
  try {
    bigmoe::dequantize_row(GgmlType::Q2_K, blk.data(), out.data(), 256);
    ADD_FAILURE() << "no throw";
  } catch (const bigmoe::Error& e) {
    EXPECT_NE(std::string(e.what()).find("no compute support for ggml type Q2_K"),
              std::string::npos)
        << e.what();
  }
  try {
    bigmoe::vec_dot(GgmlType::Q4_0, blk.data(), x.data(), 48);
    ADD_FAILURE() << "no throw";
  } catch (const bigmoe::Error& e) {
    EXPECT_NE(std::string(e.what()).find("48 is not a multiple of the Q4_0 block size 32"),
              std::string::npos)
        << e.what();
  }
  EXPECT_THROW(bigmoe::vec_dot_ref(GgmlType::IQ2_XXS, blk.data(), x.data(), 256), bigmoe::Error);
}

TEST(QuantTypes, SimdLevels) {
  SimdLevel sup = bigmoe::simd_level_supported();
  std::printf("[          ] this CPU: %s (AVX2 %s, AVX-512 %s)\n", bigmoe::simd_level_name(sup),
              int(sup) >= int(SimdLevel::AVX2) ? "run" : "skipped",
              sup == SimdLevel::AVX512 ? "run" : "skipped");
  EXPECT_EQ(bigmoe::simd_level(), sup);
  if (sup != SimdLevel::AVX512) {
    EXPECT_THROW(bigmoe::set_simd_level_for_testing(SimdLevel::AVX512), bigmoe::Error);
    EXPECT_EQ(bigmoe::simd_level(), sup);
  }
  {
    LevelGuard g(SimdLevel::Scalar);
    EXPECT_EQ(bigmoe::simd_level(), SimdLevel::Scalar);
  }
  EXPECT_EQ(bigmoe::simd_level(), sup);
}

// ---------------------------------------------------------------------------------------
// Dequantization against gguf.quants, bit for bit

class QuantFixture : public ::testing::TestWithParam<Case> {};

TEST_P(QuantFixture, DequantMatchesGgufPackage) {
  const Case c = GetParam();
  LevelGuard g(c.level);
  if (!g.ok()) GTEST_SKIP() << bigmoe::simd_level_name(c.level) << " not supported by this CPU";
  const std::string name = bigmoe::ggml_type_name(c.type);
  std::vector<uint8_t> raw = read_file(kDir / (name + ".bin"));
  std::vector<float> want = read_f32(kDir / (name + ".f32"));
  auto tr = *bigmoe::ggml_type_traits(uint32_t(c.type));
  const int64_t n = int64_t(want.size());
  ASSERT_GT(n, 0);
  ASSERT_EQ(raw.size(), bigmoe::ggml_row_size(c.type, n));

  auto dequant = [&](const void* src, float* dst, int64_t k) {
    if (c.level == SimdLevel::Scalar)
      bigmoe::dequantize_row_ref(c.type, src, dst, k);
    else
      bigmoe::dequantize_row(c.type, src, dst, k);
  };
  std::vector<float> got(n + 1, -7.f);
  dequant(raw.data(), got.data(), n);
  int64_t bad = first_mismatch(got.data(), want, n);
  EXPECT_EQ(bad, -1) << name << " element " << bad << " (block " << bad / tr.block_size << "): got "
                     << got[bad] << ", gguf.quants " << want[bad];
  EXPECT_EQ(got[n], -7.f) << "wrote past the end of the row";

  // Same data, one block in, written to a destination 4 bytes off alignment: unaligned loads
  // and stores, and a length that is not a round number of SIMD vectors.
  std::vector<float> want1(want.begin() + tr.block_size, want.end());
  dequant(raw.data() + tr.type_size, got.data() + 1, n - tr.block_size);
  bad = first_mismatch(got.data() + 1, want1, n - tr.block_size);
  EXPECT_EQ(bad, -1) << name << " (offset by one block) element " << bad;
}

class QuantRef : public ::testing::TestWithParam<GgmlType> {};

TEST_P(QuantRef, VecDotRefMatchesFixtureValues) {
  const Case c = {GetParam(), SimdLevel::Scalar};
  const std::string name = bigmoe::ggml_type_name(c.type);
  std::vector<uint8_t> raw = read_file(kDir / (name + ".bin"));
  std::vector<float> want = read_f32(kDir / (name + ".f32"));
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  std::vector<float> x(want.size());
  for (auto& v : x) v = u(rng);
  double dot = 0, mag = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    dot += double(want[i]) * double(x[i]);
    mag += std::fabs(double(want[i]) * double(x[i]));
  }
  float got = bigmoe::vec_dot_ref(c.type, raw.data(), x.data(), int64_t(want.size()));
  EXPECT_LE(std::fabs(double(got) - dot), 1e-6 * mag) << name;
}

// ---------------------------------------------------------------------------------------
// vec_dot at each SIMD level against the reference, on fresh random data

TEST_P(QuantFixture, VecDotMatchesReference) {
  const Case c = GetParam();
  LevelGuard g(c.level);
  if (!g.ok()) GTEST_SKIP() << bigmoe::simd_level_name(c.level) << " not supported by this CPU";
  auto tr = *bigmoe::ggml_type_traits(uint32_t(c.type));
  std::mt19937 rng(1000 + uint32_t(c.type));
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  // Plain types: lengths around the 8/16/32/64-lane steps; quant types: 1 to 17 blocks.
  std::vector<int64_t> lengths;
  if (tr.block_size == 1)
    lengths = {1, 7, 8, 15, 16, 17, 31, 33, 63, 64, 65, 100, 1027};
  else
    lengths = {tr.block_size, 3 * tr.block_size, 7 * tr.block_size, 17 * tr.block_size};
  for (int64_t n : lengths) {
    for (int rep = 0; rep < 5; ++rep) {
      std::vector<uint8_t> row = random_row(c.type, n, rng);
      std::vector<float> x(n), w(n);
      for (auto& v : x) v = u(rng);
      bigmoe::dequantize_row_ref(c.type, row.data(), w.data(), n);
      double mag = 0;
      for (int64_t i = 0; i < n; ++i) mag += std::fabs(double(w[i]) * double(x[i]));
      ASSERT_TRUE(std::isfinite(mag));
      float ref = bigmoe::vec_dot_ref(c.type, row.data(), x.data(), n);
      float got = bigmoe::vec_dot(c.type, row.data(), x.data(), n);
      EXPECT_LE(std::fabs(double(got) - double(ref)), 1e-5 * mag)
          << bigmoe::ggml_type_name(c.type) << " n=" << n << " rep " << rep << ": got " << got
          << ", reference " << ref << ", sum|w*x| " << mag;

      // The fast dequantization agrees with the reference on this data too.
      std::vector<float> fast(n);
      bigmoe::dequantize_row(c.type, row.data(), fast.data(), n);
      std::vector<float> wv(w.begin(), w.end());
      int64_t bad = first_mismatch(fast.data(), wv, n);
      EXPECT_EQ(bad, -1) << bigmoe::ggml_type_name(c.type) << " n=" << n << " element " << bad;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(AllTypes, QuantFixture, ::testing::ValuesIn(all_cases()), case_name);
INSTANTIATE_TEST_SUITE_P(AllTypes, QuantRef, ::testing::ValuesIn(kComputable),
                         [](const auto& i) { return bigmoe::ggml_type_name(i.param); });
