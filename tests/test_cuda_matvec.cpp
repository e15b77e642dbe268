// cuda::matvec against a float64 CPU reference built from the scalar dequantization, on fresh
// random weights and inputs (ctest label gpu; runs on the GPU machine). Outputs are poisoned
// with NaN before each run so a kernel that skips elements cannot pass.
#include <gtest/gtest.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "backend/cuda/cuda_ops.h"
#include "cuda_test_util.h"
#include "tensor/quant_act.h"
#include "tensor/dtype.h"
#include "tensor/quant.h"
#include "util/error.h"

namespace bigmoe {
namespace {

using cuda::WeightFormat;

using test::DeviceBuffer;


class CudaMatvec : public test::CudaTest {
 protected:
  void put_f16(uint8_t* p, float lo, float hi) {
    uint16_t h = f32_to_f16(std::uniform_real_distribution<float>(lo, hi)(rng));
    std::memcpy(p, &h, 2);
  }

  // Random weights of format f; fills `deq` with the dequantized [out, in] matrix (float).
  std::vector<uint8_t> random_weights(WeightFormat f, int out, int in, std::vector<float>& scale,
                                      std::vector<float>& deq) {
    const size_t bytes = cuda::matvec_weight_bytes(f, out, in);
    std::vector<uint8_t> w(bytes);
    std::uniform_int_distribution<int> byte(0, 255);
    for (auto& b : w) b = uint8_t(byte(rng));
    deq.assign(size_t(out) * in, 0.f);
    switch (f) {
      case WeightFormat::BF16: {
        // Random bf16 of moderate magnitude (random bits would give inf/NaN).
        auto v = randn(size_t(out) * in, 0.5f);
        for (size_t i = 0; i < v.size(); ++i) {
          uint16_t h = f32_to_bf16(v[i]);
          std::memcpy(&w[2 * i], &h, 2);
          deq[i] = bf16_to_f32(h);
        }
        break;
      }
      case WeightFormat::FP8_E4M3: {
        const int so = (out + 127) / 128, si = (in + 127) / 128;
        scale = randn(size_t(so) * si, 0.01f);
        for (size_t i = 0; i < w.size(); ++i) {
          while ((w[i] & 0x7f) == 0x7f) w[i] = uint8_t(byte(rng));  // no NaN codes
          const int o = int(i / in), c = int(i % in);
          deq[i] = f8e4m3_to_f32(w[i]) * scale[size_t(o / 128) * si + c / 128];
        }
        break;
      }
      case WeightFormat::Q8_0:
      case WeightFormat::Q4_K:
      case WeightFormat::Q6_K: {
        const GgmlType t = f == WeightFormat::Q8_0 ? GgmlType::Q8_0 : f == WeightFormat::Q4_K ? GgmlType::Q4_K : GgmlType::Q6_K;
        const int qk = f == WeightFormat::Q8_0 ? 32 : 256;
        const size_t bs = f == WeightFormat::Q8_0 ? 34 : f == WeightFormat::Q4_K ? 144 : 210;
        const size_t row = ggml_row_size(t, in);
        EXPECT_EQ(row, size_t(in / qk) * bs);
        for (size_t b = 0; b < w.size() / bs; ++b) {  // finite, moderate scale fields
          uint8_t* p = &w[b * bs];
          if (f == WeightFormat::Q8_0) put_f16(p, -0.02f, 0.02f);
          if (f == WeightFormat::Q4_K) put_f16(p, 0.f, 0.002f), put_f16(p + 2, 0.f, 0.004f);
          if (f == WeightFormat::Q6_K) put_f16(p + 208, -0.002f, 0.002f);
        }
        for (int o = 0; o < out; ++o) dequantize_row_ref(t, &w[size_t(o) * row], &deq[size_t(o) * in], in);
        break;
      }
    }
    return w;
  }

  void check(WeightFormat f, int out, int in) {
    std::vector<float> scale, deq;
    auto w = random_weights(f, out, in, scale, deq);
    DeviceBuffer<uint8_t> dw(w.size());
    dw.upload(w);
    DeviceBuffer<float> ds(scale.size());
    if (!scale.empty()) ds.upload(scale);
    for (int B : {1, 2, 4, 7, 16}) {
      auto x = randn(size_t(B) * in);
      DeviceBuffer<float> dx(x.size()), dy(size_t(B) * out);
      dx.upload(x);
      dy.poison();
      cuda::matvec(f, dw.p, scale.empty() ? nullptr : ds.p, out, in, dx.p, B, dy.p);
      cuda::check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
      auto y = dy.download();
      int bad = 0;
      for (int b = 0; b < B; ++b)
        for (int o = 0; o < out; ++o) {
          double ref = 0, mag = 0;
          const float* wr = &deq[size_t(o) * in];
          const float* xb = &x[size_t(b) * in];
          for (int i = 0; i < in; ++i) {
            ref += double(wr[i]) * xb[i];
            mag += std::abs(double(wr[i]) * xb[i]);
          }
          const float got = y[size_t(b) * out + o];
          if (!(std::abs(got - ref) <= 1e-4 * mag + 1e-30) && bad++ < 5)
            ADD_FAILURE() << cuda::weight_format_name(f) << " [" << out << " x " << in << "] B=" << B << " b=" << b
                          << " o=" << o << ": got " << got << " want " << ref << " (sum|wx| " << mag << ")";
        }
      ASSERT_EQ(bad, 0) << cuda::weight_format_name(f) << " [" << out << " x " << in << "] B=" << B;
    }
  }
};

TEST_F(CudaMatvec, BF16) {
  // 16-byte-aligned rows (vector path, incl. in not a multiple of 128) and odd in (scalar path).
  for (auto [out, in] : {std::pair{1, 8}, {37, 1000}, {129, 1104}, {513, 2048}, {1, 6144}, {7, 333}, {300, 4097}})
    check(WeightFormat::BF16, out, in);
}

TEST_F(CudaMatvec, FP8) {
  for (auto [out, in] : {std::pair{1, 16}, {37, 1104}, {129, 1000}, {257, 2048}, {3, 6144}, {7, 333}, {200, 4097}})
    check(WeightFormat::FP8_E4M3, out, in);
}

TEST_F(CudaMatvec, Q8_0) {
  for (auto [out, in] : {std::pair{1, 32}, {37, 96}, {129, 1056}, {513, 2048}, {3, 6144}, {31, 4096}})
    check(WeightFormat::Q8_0, out, in);
}

TEST_F(CudaMatvec, Q4_K) {
  for (auto [out, in] : {std::pair{1, 256}, {37, 768}, {129, 2048}, {3, 6144}, {65, 16384}})
    check(WeightFormat::Q4_K, out, in);
}

TEST_F(CudaMatvec, Q6_K) {
  for (auto [out, in] : {std::pair{1, 256}, {37, 768}, {129, 2048}, {3, 6144}, {65, 16384}})
    check(WeightFormat::Q6_K, out, in);
}

TEST_F(CudaMatvec, LargeRowCounts) {
  // Many rows: exercises the K-split choice (few rows) vs one warp per row (many rows).
  for (auto f : {WeightFormat::BF16, WeightFormat::FP8_E4M3, WeightFormat::Q8_0, WeightFormat::Q4_K, WeightFormat::Q6_K})
    check(f, 6145, 512);
}

TEST_F(CudaMatvec, RejectsBadArguments) {
  DeviceBuffer<float> buf(1 << 16);
  EXPECT_THROW(cuda::matvec(WeightFormat::Q4_K, buf.p, nullptr, 4, 100, buf.p, 1, buf.p), Error);
  EXPECT_THROW(cuda::matvec(WeightFormat::BF16, buf.p, nullptr, 4, 64, buf.p, 17, buf.p), Error);
  EXPECT_THROW(cuda::matvec(WeightFormat::FP8_E4M3, buf.p, nullptr, 4, 64, buf.p, 1, buf.p), Error);
}

}  // namespace
}  // namespace bigmoe
