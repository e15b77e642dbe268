// cuda::dequant_bf16 and cuda::gemm_bf16 (model_ops.h) against CPU references on fresh random
// inputs (ctest label gpu; runs on the GPU machine).
//  * dequant_bf16: every format on random blocks (random bytes, sane f16 scale fields) must give
//    exactly f32_to_bf16 of the CPU decode (dequantize_row_ref, f8e4m3_to_f32 * block scale).
//  * gemm_bf16: against a float64 product of the bf16-rounded operands, within 1e-3 of Σ|w·x|,
//    on shapes with ragged edges in T, out and K.
// Outputs are poisoned before each run, with a poisoned guard past the end that must survive.
#include <gtest/gtest.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <iterator>
#include <random>
#include <vector>

#include "backend/cuda/model_ops.h"
#include "cuda_test_util.h"
#include "tensor/dtype.h"
#include "tensor/quant.h"
#include "tensor/quant_act.h"  // f32_to_f16
#include "util/error.h"

namespace bigmoe {
namespace {

using cuda::WeightFormat;
using test::DeviceBuffer;

constexpr size_t kGuard = 64;  // poisoned elements after each output

class CudaGemm : public test::CudaTest {
 protected:
  void put_f16(uint8_t* p, float lo, float hi) {
    float v = std::uniform_real_distribution<float>(lo, hi)(rng);
    if (std::uniform_int_distribution<int>(0, 1)(rng)) v = -v;
    uint16_t h = f32_to_f16(v);
    std::memcpy(p, &h, 2);
  }

  // Random weights of format f (bytes as dequant_bf16 takes them) and their CPU decode [out, in].
  std::vector<uint8_t> random_weights(WeightFormat f, int out, int in, int bo, int bi, std::vector<float>& scale,
                                      std::vector<float>& ref) {
    std::uniform_int_distribution<int> byte(0, 255);
    ref.assign(size_t(out) * in, 0.f);
    std::vector<uint8_t> w;
    switch (f) {
      case WeightFormat::BF16: {
        w.resize(ref.size() * 2);
        auto v = randn(ref.size(), 0.5f);
        for (size_t i = 0; i < v.size(); ++i) {
          const uint16_t h = f32_to_bf16(v[i]);
          std::memcpy(&w[2 * i], &h, 2);
          ref[i] = bf16_to_f32(h);
        }
        break;
      }
      case WeightFormat::F32: {
        auto v = randn(ref.size(), 2.f);
        // A few exact ties of the bf16 rounding (even down, odd up) and large / tiny values.
        const uint32_t special[] = {0x3f808000u, 0x3f818000u, 0xbf808000u, 0x7f7fffffu, 0x00000001u, 0x80400000u};
        for (size_t k = 0; k < std::size(special) && k < v.size(); ++k) std::memcpy(&v[k * 7 % v.size()], &special[k], 4);
        w.resize(v.size() * 4);
        std::memcpy(w.data(), v.data(), w.size());
        ref = v;
        break;
      }
      case WeightFormat::FP8_E4M3: {
        const int so = (out + bo - 1) / bo, si = (in + bi - 1) / bi;
        scale = randn(size_t(so) * si, 0.01f);
        w.resize(ref.size());
        for (size_t i = 0; i < w.size(); ++i) {
          do w[i] = uint8_t(byte(rng));
          while ((w[i] & 0x7f) == 0x7f);  // no NaN codes
          const int o = int(i / in), c = int(i % in);
          ref[i] = f8e4m3_to_f32(w[i]) * scale[size_t(o / bo) * si + c / bi];
        }
        break;
      }
      case WeightFormat::Q8_0:
      case WeightFormat::Q4_K:
      case WeightFormat::Q6_K: {
        const GgmlType t = f == WeightFormat::Q8_0 ? GgmlType::Q8_0 : f == WeightFormat::Q4_K ? GgmlType::Q4_K : GgmlType::Q6_K;
        const size_t bs = f == WeightFormat::Q8_0 ? 34 : f == WeightFormat::Q4_K ? 144 : 210;
        const size_t row = ggml_row_size(t, in);
        w.resize(row * out);
        for (auto& b : w) b = uint8_t(byte(rng));
        for (size_t b = 0; b < w.size() / bs; ++b) {  // finite, moderate scale fields
          uint8_t* p = &w[b * bs];
          if (f == WeightFormat::Q8_0) put_f16(p, 0.001f, 0.1f);
          if (f == WeightFormat::Q4_K) put_f16(p, 0.f, 0.01f), put_f16(p + 2, 0.f, 0.02f);
          if (f == WeightFormat::Q6_K) put_f16(p + 208, 0.f, 0.01f);
        }
        for (int o = 0; o < out; ++o) dequantize_row_ref(t, &w[size_t(o) * row], &ref[size_t(o) * in], in);
        break;
      }
    }
    return w;
  }

  // dequant_bf16 must give exactly f32_to_bf16 of the reference. w_offset shifts the device
  // copy of w by that many bytes (to reach the unaligned load paths).
  void check_dequant(WeightFormat f, int out, int in, int bo = 128, int bi = 128, size_t w_offset = 0) {
    SCOPED_TRACE(testing::Message() << cuda::weight_format_name(f) << " [" << out << " x " << in << "] blocks "
                                    << bo << "x" << bi << " offset " << w_offset);
    std::vector<float> scale, ref;
    auto w = random_weights(f, out, in, bo, bi, scale, ref);
    std::vector<uint8_t> wpad(w_offset, 0);
    wpad.insert(wpad.end(), w.begin(), w.end());
    DeviceBuffer<uint8_t> dw(wpad.size());
    dw.upload(wpad);
    DeviceBuffer<float> ds(std::max<size_t>(scale.size(), 1));
    if (!scale.empty()) ds.upload(scale);
    const size_t n = size_t(out) * in;
    DeviceBuffer<uint16_t> dst(n + kGuard);
    dst.poison();
    cuda::dequant_bf16(f, dw.p + w_offset, f == WeightFormat::FP8_E4M3 ? ds.p : nullptr, bo, bi, out, in, dst.p);
    cuda::check(cudaDeviceSynchronize(), "sync");
    auto got = dst.download();
    size_t bad = 0;
    for (size_t i = 0; i < n; ++i) {
      const uint16_t want = f32_to_bf16(ref[i]);
      if (got[i] != want && ++bad <= 5)
        ADD_FAILURE() << "element (" << i / in << ", " << i % in << "): got 0x" << std::hex << got[i] << " want 0x"
                      << want << std::dec << " (ref " << ref[i] << ")";
    }
    EXPECT_EQ(bad, 0u);
    for (size_t i = n; i < n + kGuard; ++i) ASSERT_EQ(got[i], 0xffff) << "write past the end at " << i - n;
  }

  // gemm_bf16 against a float64 product of the bf16-rounded operands.
  void check_gemm(int T, int out, int in) {
    SCOPED_TRACE(testing::Message() << "T=" << T << " out=" << out << " in=" << in);
    auto wf = randn(size_t(out) * in, 0.5f);
    std::vector<uint16_t> wb(wf.size());
    for (size_t i = 0; i < wf.size(); ++i) wb[i] = f32_to_bf16(wf[i]), wf[i] = bf16_to_f32(wb[i]);
    auto x = randn(size_t(T) * in);
    std::vector<float> xr(x.size());
    for (size_t i = 0; i < x.size(); ++i) xr[i] = bf16_to_f32(f32_to_bf16(x[i]));
    DeviceBuffer<uint16_t> dw(wb.size());
    dw.upload(wb);
    DeviceBuffer<float> dx(x.size());
    dx.upload(x);
    const size_t n = size_t(T) * out;
    DeviceBuffer<float> dy(n + kGuard);
    dy.poison();
    cuda::gemm_bf16(dw.p, out, in, dx.p, T, dy.p);
    cuda::check(cudaDeviceSynchronize(), "sync");
    auto y = dy.download();
    size_t bad = 0;
    for (int t = 0; t < T; ++t)
      for (int o = 0; o < out; ++o) {
        const float* wr = &wf[size_t(o) * in];
        const float* xt = &xr[size_t(t) * in];
        double s = 0, mag = 0;
        for (int i = 0; i < in; ++i) {
          const double p = double(wr[i]) * xt[i];
          s += p;
          mag += std::abs(p);
        }
        const float g = y[size_t(t) * out + o];
        if (!(std::abs(g - s) <= 1e-3 * mag + 1e-30) && ++bad <= 5)
          ADD_FAILURE() << "y[" << t << ", " << o << "] = " << g << ", want " << s << " (Σ|w·x| " << mag << ")";
      }
    EXPECT_EQ(bad, 0u);
    for (size_t i = n; i < n + kGuard; ++i) {
      uint32_t u;
      std::memcpy(&u, &y[i], 4);
      ASSERT_EQ(u, 0xffffffffu) << "write past the end at " << i - n;
    }
  }
};

TEST_F(CudaGemm, DequantBF16) {
  for (auto [out, in] : {std::pair{1, 8}, {37, 100}, {129, 264}}) check_dequant(WeightFormat::BF16, out, in);
}

TEST_F(CudaGemm, DequantF32) {
  // Flat 8-element chunks cross rows when in % 8 != 0; offset 4 takes the unaligned loads.
  for (auto [out, in] : {std::pair{1, 8}, {37, 100}, {129, 264}, {3, 7}}) {
    check_dequant(WeightFormat::F32, out, in);
    check_dequant(WeightFormat::F32, out, in, 128, 128, 4);
  }
}

TEST_F(CudaGemm, DequantFP8) {
  for (auto [out, in] : {std::pair{1, 16}, {37, 100}, {129, 300}, {257, 1000}, {3, 7}}) {
    check_dequant(WeightFormat::FP8_E4M3, out, in);
    check_dequant(WeightFormat::FP8_E4M3, out, in, 64, 32);
    check_dequant(WeightFormat::FP8_E4M3, out, in, 5, 24, 3);
  }
}

TEST_F(CudaGemm, DequantQ8_0) {
  for (auto [out, in] : {std::pair{1, 32}, {37, 96}, {129, 1056}, {3, 6144}}) check_dequant(WeightFormat::Q8_0, out, in);
}

TEST_F(CudaGemm, DequantQ4_K) {
  for (auto [out, in] : {std::pair{1, 256}, {37, 768}, {129, 2048}, {3, 6144}}) check_dequant(WeightFormat::Q4_K, out, in);
}

TEST_F(CudaGemm, DequantQ6_K) {
  for (auto [out, in] : {std::pair{1, 256}, {37, 768}, {129, 2048}, {3, 6144}}) check_dequant(WeightFormat::Q6_K, out, in);
}

TEST_F(CudaGemm, RaggedShapes) {
  for (int T : {1, 17, 200})
    for (int out : {37, 300})
      for (int in : {40, 264}) check_gemm(T, out, in);
}

TEST_F(CudaGemm, TileEdgesAndDeepK) {
  check_gemm(64, 128, 256);   // whole tiles
  check_gemm(130, 129, 8);    // one K chunk
  check_gemm(65, 257, 2056);  // 65 K steps, the last partial
  check_gemm(1100, 200, 64);  // more row tiles than one block-numbering group
}

TEST_F(CudaGemm, ManyTiles) {
  // Enough blocks for the 128-row tiles (on H100/H200), with ragged T, out and K.
  check_gemm(1100, 4000, 64);
  check_gemm(300, 12000, 264);
}

TEST_F(CudaGemm, AllTileConfigs) {
  // Every tile configuration gemm_bf16 can pick (forced through its tuning knob
  // BIGMOE_GEMM_CFG), including the two-way K split, on ragged shapes.
  for (const char* cfg : {"64x128_2x2", "64x128_2x2s2", "128x128_2x2", "128x128_2x2s2"}) {
    SCOPED_TRACE(cfg);
    setenv("BIGMOE_GEMM_CFG", cfg, 1);
    check_gemm(17, 37, 40);
    check_gemm(200, 300, 264);
    check_gemm(300, 600, 1032);
  }
  unsetenv("BIGMOE_GEMM_CFG");
}

TEST_F(CudaGemm, DequantThenGemm) {
  // The prefill path: a Q4_K weight decoded to BF16 on the device, then multiplied.
  const int T = 33, out = 100, in = 512;
  std::vector<float> scale, ref;
  auto w = random_weights(WeightFormat::Q4_K, out, in, 128, 128, scale, ref);
  DeviceBuffer<uint8_t> dw(w.size());
  dw.upload(w);
  DeviceBuffer<uint16_t> wb(size_t(out) * in);
  wb.poison();
  cuda::dequant_bf16(WeightFormat::Q4_K, dw.p, nullptr, 128, 128, out, in, wb.p);
  auto x = randn(size_t(T) * in);
  DeviceBuffer<float> dx(x.size());
  dx.upload(x);
  DeviceBuffer<float> dy(size_t(T) * out);
  dy.poison();
  cuda::gemm_bf16(wb.p, out, in, dx.p, T, dy.p);
  auto y = dy.download();
  for (int t = 0; t < T; ++t)
    for (int o = 0; o < out; ++o) {
      double s = 0, mag = 0;
      for (int i = 0; i < in; ++i) {
        const double p = double(bf16_to_f32(f32_to_bf16(ref[size_t(o) * in + i]))) *
                         bf16_to_f32(f32_to_bf16(x[size_t(t) * in + i]));
        s += p;
        mag += std::abs(p);
      }
      ASSERT_NEAR(y[size_t(t) * out + o], s, 1e-3 * mag + 1e-30) << "t=" << t << " o=" << o;
    }
}

TEST_F(CudaGemm, RejectsBadArguments) {
  DeviceBuffer<float> buf(1 << 16);
  void* p = buf.p;
  // gemm_bf16
  EXPECT_THROW(cuda::gemm_bf16(p, 16, 36, buf.p, 4, buf.p), Error);        // in % 8 != 0
  EXPECT_THROW(cuda::gemm_bf16(p, 0, 64, buf.p, 4, buf.p), Error);         // out = 0
  EXPECT_THROW(cuda::gemm_bf16(p, 16, 0, buf.p, 4, buf.p), Error);         // in = 0
  EXPECT_THROW(cuda::gemm_bf16(p, 16, 64, buf.p, -1, buf.p), Error);       // T < 0
  EXPECT_THROW(cuda::gemm_bf16(p, 16, 64, nullptr, 4, buf.p), Error);      // null x
  EXPECT_THROW(cuda::gemm_bf16(nullptr, 16, 64, buf.p, 4, buf.p), Error);  // null w
  EXPECT_THROW(cuda::gemm_bf16(p, 16, 64, buf.p + 1, 4, buf.p), Error);    // x not 16-byte aligned
  // dequant_bf16
  EXPECT_THROW(cuda::dequant_bf16(WeightFormat::Q8_0, p, nullptr, 128, 128, 4, 48, buf.p), Error);
  EXPECT_THROW(cuda::dequant_bf16(WeightFormat::Q4_K, p, nullptr, 128, 128, 4, 128, buf.p), Error);
  EXPECT_THROW(cuda::dequant_bf16(WeightFormat::Q6_K, p, nullptr, 128, 128, 4, 300, buf.p), Error);
  EXPECT_THROW(cuda::dequant_bf16(WeightFormat::FP8_E4M3, p, nullptr, 128, 128, 4, 64, buf.p), Error);
  EXPECT_THROW(cuda::dequant_bf16(WeightFormat::FP8_E4M3, p, buf.p, 0, 128, 4, 64, buf.p), Error);
  EXPECT_THROW(cuda::dequant_bf16(WeightFormat::BF16, p, nullptr, 128, 128, 0, 64, buf.p), Error);
  EXPECT_THROW(cuda::dequant_bf16(WeightFormat::BF16, p, nullptr, 128, 128, 4, 64, buf.p + 1), Error);  // dst
}

}  // namespace
}  // namespace bigmoe
