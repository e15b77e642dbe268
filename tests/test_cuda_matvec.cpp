// cuda::matvec / matvec_fp8 / matvec_grouped against a float64 CPU reference built from the
// scalar dequantization, on fresh random weights and inputs (ctest label gpu; runs on the GPU
// machine). Outputs are poisoned with NaN before each run so a kernel that skips elements cannot
// pass; grouped runs pad the experts' weights and scales with NaN so a wrong offset cannot pass.
#include <gtest/gtest.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <tuple>
#include <cmath>
#include <cstring>
#include <memory>
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

  // Random weights of format f; fills `deq` with the dequantized [out, in] matrix (float). FP8
  // scales use bo x bi blocks: scale [ceil(out/bo), ceil(in/bi)].
  std::vector<uint8_t> random_weights(WeightFormat f, int out, int in, std::vector<float>& scale,
                                      std::vector<float>& deq, int bo = 128, int bi = 128) {
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
        const int so = (out + bo - 1) / bo, si = (in + bi - 1) / bi;
        scale = randn(size_t(so) * si, 0.01f);
        for (size_t i = 0; i < w.size(); ++i) {
          while ((w[i] & 0x7f) == 0x7f) w[i] = uint8_t(byte(rng));  // no NaN codes
          const int o = int(i / in), c = int(i % in);
          deq[i] = f8e4m3_to_f32(w[i]) * scale[size_t(o / bo) * si + c / bi];
        }
        break;
      }
      case WeightFormat::F32: {
        deq = randn(size_t(out) * in, 0.5f);
        std::memcpy(w.data(), deq.data(), w.size());
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

  // matvec for B in {1, 2, 4, 7, 16}; bo > 0 (FP8 only) calls matvec_fp8 with bo x bi blocks.
  void check(WeightFormat f, int out, int in, double tol = 1e-4, int bo = 0, int bi = 0) {
    std::vector<float> scale, deq;
    auto w = bo > 0 ? random_weights(f, out, in, scale, deq, bo, bi) : random_weights(f, out, in, scale, deq);
    DeviceBuffer<uint8_t> dw(w.size());
    dw.upload(w);
    DeviceBuffer<float> ds(scale.size());
    if (!scale.empty()) ds.upload(scale);
    for (int B : {1, 2, 4, 7, 16}) {
      auto x = randn(size_t(B) * in);
      DeviceBuffer<float> dx(x.size()), dy(size_t(B) * out);
      dx.upload(x);
      dy.poison();
      if (bo > 0) cuda::matvec_fp8(dw.p, ds.p, bo, bi, out, in, dx.p, B, dy.p);
      else cuda::matvec(f, dw.p, scale.empty() ? nullptr : ds.p, out, in, dx.p, B, dy.p);
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
          if (!(std::abs(got - ref) <= tol * mag + 1e-30) && bad++ < 5)
            ADD_FAILURE() << cuda::weight_format_name(f) << " [" << out << " x " << in << "] B=" << B << " b=" << b
                          << " o=" << o << " blocks " << bo << "x" << bi << ": got " << got << " want " << ref
                          << " (sum|wx| " << mag << ")";
        }
      ASSERT_EQ(bad, 0) << cuda::weight_format_name(f) << " [" << out << " x " << in << "] B=" << B;
    }
  }

  // One grouped problem: E experts stored w_stride bytes apart (scales scale_stride floats apart),
  // the gaps filled with NaN / 0xff bytes.
  struct Experts {
    WeightFormat f;
    int out, in, E, bo, bi;
    size_t w_stride = 0, scale_stride = 0;
    std::vector<uint8_t> w;
    std::vector<float> scale;
    std::vector<std::vector<float>> deq;  // per expert [out, in]
  };
  // pad: put 16 bytes (and 3 scale floats) of NaN between experts; without it the experts are
  // packed (stride = matrix bytes, for dense formats this may break 16-byte alignment).
  Experts make_experts(WeightFormat f, int out, int in, int E, int bo = 128, int bi = 128, bool pad = true) {
    Experts ex{f, out, in, E, bo, bi};
    const size_t bytes = cuda::matvec_weight_bytes(f, out, in);
    ex.w_stride = pad ? (bytes + 15) / 16 * 16 + 16 : bytes;
    ex.w.assign(ex.w_stride * E, 0xff);
    ex.deq.resize(E);
    for (int e = 0; e < E; ++e) {
      std::vector<float> sc;
      auto we = random_weights(f, out, in, sc, ex.deq[e], bo, bi);
      std::memcpy(&ex.w[e * ex.w_stride], we.data(), bytes);
      if (f == WeightFormat::FP8_E4M3) {
        if (e == 0) {
          ex.scale_stride = sc.size() + (pad ? 3 : 0);
          ex.scale.assign(ex.scale_stride * E, std::nanf(""));
        }
        std::copy(sc.begin(), sc.end(), ex.scale.begin() + e * ex.scale_stride);
      }
    }
    return ex;
  }

  // Runs matvec_grouped for these ids (device copies made here) and compares every slot with
  // the reference; x has ceil(S / x_div) rows.
  // silu: with the SwiGLU epilogue (a random gate g [S, out]: y = silu(g) * W x).
  void run_grouped(const Experts& ex, const std::vector<int>& ids, int x_div, double tol, bool silu = false) {
    const int S = int(ids.size()), T = (S + x_div - 1) / x_div;
    DeviceBuffer<uint8_t> dw(ex.w.size());
    dw.upload(ex.w);
    DeviceBuffer<float> ds(ex.scale.size());
    if (!ex.scale.empty()) ds.upload(ex.scale);
    DeviceBuffer<int> dids(ids.size());
    dids.upload(ids);
    auto x = randn(size_t(T) * ex.in);
    DeviceBuffer<float> dx(x.size()), dy(size_t(S) * ex.out);
    dx.upload(x);
    dy.poison();
    cuda::ExpertWeights ew{ex.f, dw.p, ex.w_stride};
    if (!ex.scale.empty()) ew.scale = ds.p, ew.scale_stride = ex.scale_stride, ew.bo = ex.bo, ew.bi = ex.bi;
    std::vector<float> gate;
    DeviceBuffer<float> dg(silu ? size_t(S) * ex.out : 1);
    if (silu) {
      gate = randn(size_t(S) * ex.out);
      for (auto& v : gate) v *= 3.0f;  // both tails of silu
      dg.upload(gate);
    }
    cuda::matvec_grouped(ew, ex.out, ex.in, dids.p, S, dx.p, x_div, dy.p, nullptr, silu ? dg.p : nullptr);
    cuda::check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
    expect_grouped(ex, ids, x_div, x, dy.download(), tol, gate);
  }

  // gate (non-empty): the reference is silu(gate) * W x, silu in double.
  void expect_grouped(const Experts& ex, const std::vector<int>& ids, int x_div, const std::vector<float>& x,
                      const std::vector<float>& y, double tol, const std::vector<float>& gate = {}) {
    const int S = int(ids.size());
    int bad = 0;
    for (int s = 0; s < S; ++s)
      for (int o = 0; o < ex.out; ++o) {
        const float got = y[size_t(s) * ex.out + o];
        double ref = 0, mag = 0;
        if (ids[s] >= 0) {
          const float* wr = &ex.deq[ids[s]][size_t(o) * ex.in];
          const float* xr = &x[size_t(s / x_div) * ex.in];
          for (int i = 0; i < ex.in; ++i) {
            ref += double(wr[i]) * xr[i];
            mag += std::abs(double(wr[i]) * xr[i]);
          }
          if (!gate.empty()) {
            const double g = gate[size_t(s) * ex.out + o], sg = g / (1.0 + std::exp(-g));
            ref *= sg, mag *= std::abs(sg);
          }
        }
        if (!(std::abs(got - ref) <= tol * mag + 1e-30) && bad++ < 5)
          ADD_FAILURE() << cuda::weight_format_name(ex.f) << " [" << ex.out << " x " << ex.in << "] E=" << ex.E
                        << " S=" << S << " x_div=" << x_div << " slot " << s << " (expert " << ids[s] << ") o=" << o
                        << ": got " << got << " want " << ref << " (sum|wx| " << mag << ")";
      }
    ASSERT_EQ(bad, 0) << cuda::weight_format_name(ex.f) << " [" << ex.out << " x " << ex.in << "] S=" << S;
  }

  // S random expert ids in [0, E) with ids[1] = -1 and ids[S - 1] = ids[0] (a repeat).
  std::vector<int> random_ids(int E, int S) {
    std::uniform_int_distribution<int> d(0, E - 1);
    std::vector<int> ids(S);
    for (auto& i : ids) i = d(rng);
    if (S > 2) ids[1] = -1, ids[S - 1] = ids[0];
    return ids;
  }

  // The MoE shape: T = 3 tokens, top-4 of E = 6 experts (S = 12, x_div = 4); then smaller cases:
  // S not a multiple of x_div, and one x row per slot.
  void check_grouped(WeightFormat f, int out, int in, double tol, int bo = 128, int bi = 128, bool pad = true) {
    const auto ex = make_experts(f, out, in, 6, bo, bi, pad);
    run_grouped(ex, random_ids(6, 12), 4, tol);
    run_grouped(ex, random_ids(6, 10), 4, tol);
    run_grouped(ex, random_ids(6, 5), 1, tol);
    run_grouped(ex, {-1}, 1, tol);
    run_grouped(ex, {5, 5, 5}, 2, tol);
  }
};

double tol_of(WeightFormat f) {  // float32 accumulation of exact weights; quant decode tricks lose a little more
  return f == WeightFormat::Q8_0 || f == WeightFormat::Q4_K || f == WeightFormat::Q6_K ? 1e-4 : 1e-5;
}

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

TEST_F(CudaMatvec, F32) {
  // 16-byte-aligned rows (vector path), odd in (scalar path), the MoE expert shapes.
  for (auto [out, in] : {std::pair{1, 4}, {37, 1000}, {129, 1104}, {2048, 6144}, {6144, 2048}, {7, 333}, {300, 4097},
                         {5, 1}})
    check(WeightFormat::F32, out, in, 1e-5);
}

TEST_F(CudaMatvec, FP8Blocks) {
  // matvec_fp8 with other scale blocks: vector kernel (bi % 16 == 0, in % 16 == 0), scalar kernel
  // (odd in or bi % 16 != 0), and 128x128 through matvec_fp8 (matvec's fast path).
  struct Case {
    int bo, bi, out, in;
  };
  for (auto c : {Case{32, 32, 2048, 6144}, Case{32, 32, 6144, 2048}, Case{32, 32, 37, 1104}, Case{32, 32, 7, 333},
                 Case{64, 128, 2048, 6144}, Case{64, 128, 129, 1000}, Case{64, 128, 200, 4097}, Case{64, 128, 1, 16},
                 Case{1, 48, 33, 480}, Case{7, 24, 50, 96}, Case{128, 128, 257, 2048}, Case{128, 128, 7, 333},
                 Case{256, 16, 300, 512}})
    check(WeightFormat::FP8_E4M3, c.out, c.in, 1e-5, c.bo, c.bi);
}

TEST_F(CudaMatvec, LargeRowCounts) {
  // Many rows: exercises the K-split choice (few rows) vs one warp per row (many rows).
  for (auto f : {WeightFormat::BF16, WeightFormat::FP8_E4M3, WeightFormat::Q8_0, WeightFormat::Q4_K, WeightFormat::Q6_K,
                 WeightFormat::F32})
    check(f, 6145, 512);
}

TEST_F(CudaMatvec, MultiOutput) {
  // matvec_multi: matrices stacked by rows, one launch, each part to its own output. Every part
  // against the reference; each output buffer has a NaN tail that must stay NaN (no part writes
  // past its rows or into another's).
  struct Case {
    WeightFormat f;
    std::vector<int> outs;
    int in;
  };
  const std::vector<Case> cases = {
      {WeightFormat::Q8_0, {2048, 576, 128, 32}, 6144},  // GLM-5.2: q_a, kv_a, indexer wk, weights_proj
      {WeightFormat::Q8_0, {16384, 4096}, 2048},         // q_b, indexer wq_b
      {WeightFormat::Q4_K, {37, 64, 5}, 512},
      {WeightFormat::BF16, {96, 40}, 1104},
      {WeightFormat::F32, {3, 9, 1}, 64},
      {WeightFormat::FP8_E4M3, {256, 128, 37}, 1000},  // every part but the last whole 128-row blocks
  };
  for (const auto& c : cases) {
    int total = 0;
    for (int o : c.outs) total += o;
    std::vector<float> scale, deq;
    auto w = random_weights(c.f, total, c.in, scale, deq);
    DeviceBuffer<uint8_t> dw(w.size());
    dw.upload(w);
    DeviceBuffer<float> ds(scale.size());
    if (!scale.empty()) ds.upload(scale);
    for (int B : {1, 3, 16}) {
      auto x = randn(size_t(B) * c.in);
      DeviceBuffer<float> dx(x.size());
      dx.upload(x);
      std::vector<std::unique_ptr<DeviceBuffer<float>>> dy;
      std::vector<float*> ys;
      for (int o : c.outs) {
        dy.push_back(std::make_unique<DeviceBuffer<float>>(size_t(B) * o + 64));
        dy.back()->poison();
        ys.push_back(dy.back()->p);
      }
      cuda::matvec_multi(c.f, dw.p, scale.empty() ? nullptr : ds.p, 128, 128, c.outs.data(), ys.data(),
                         int(c.outs.size()), c.in, dx.p, B);
      cuda::check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
      int row0 = 0, bad = 0;
      for (size_t p = 0; p < c.outs.size(); ++p) {
        const int n = c.outs[p];
        auto y = dy[p]->download();
        for (size_t i = size_t(B) * n; i < y.size(); ++i)
          if (!std::isnan(y[i]) && bad++ < 5) ADD_FAILURE() << "part " << p << " written past its end at " << i;
        for (int b = 0; b < B; ++b)
          for (int o = 0; o < n; ++o) {
            double ref = 0, mag = 0;
            const float* wr = &deq[size_t(row0 + o) * c.in];
            for (int i = 0; i < c.in; ++i) {
              ref += double(wr[i]) * x[size_t(b) * c.in + i];
              mag += std::abs(double(wr[i]) * x[size_t(b) * c.in + i]);
            }
            const float got = y[size_t(b) * n + o];
            if (!(std::abs(got - ref) <= tol_of(c.f) * mag + 1e-30) && bad++ < 5)
              ADD_FAILURE() << cuda::weight_format_name(c.f) << " part " << p << " B=" << B << " b=" << b << " o=" << o
                            << ": got " << got << " want " << ref;
          }
        row0 += n;
      }
      ASSERT_EQ(bad, 0) << cuda::weight_format_name(c.f) << " B=" << B;
    }
  }
  // FP8 parts must line up with the scale blocks, except the last.
  std::vector<float> scale, deq;
  auto w = random_weights(WeightFormat::FP8_E4M3, 200, 256, scale, deq);
  DeviceBuffer<uint8_t> dw(w.size());
  dw.upload(w);
  DeviceBuffer<float> ds(scale.size()), dx(256), dy(400);
  ds.upload(scale);
  const int outs[2] = {100, 100};
  float* ys[2] = {dy.p, dy.p + 200};
  EXPECT_THROW(cuda::matvec_multi(WeightFormat::FP8_E4M3, dw.p, ds.p, 128, 128, outs, ys, 2, 256, dx.p, 1), Error);
  EXPECT_THROW(cuda::matvec_multi(WeightFormat::Q8_0, dw.p, nullptr, 128, 128, outs, ys, 5, 256, dx.p, 1), Error);
}

TEST_F(CudaMatvec, GroupedDense) {
  for (auto f : {WeightFormat::BF16, WeightFormat::FP8_E4M3, WeightFormat::F32}) {
    for (auto [out, in] : {std::pair{2048, 6144}, {6144, 2048}, {37, 512}, {1, 16}}) check_grouped(f, out, in, tol_of(f));
    check_grouped(f, 7, 333, tol_of(f));                   // odd in: scalar kernel
    check_grouped(f, 129, 1000, tol_of(f), 128, 128, false);  // packed experts: stride not a multiple of 16
  }
}

TEST_F(CudaMatvec, GroupedFP8Blocks) {
  check_grouped(WeightFormat::FP8_E4M3, 2048, 6144, 1e-5, 32, 32);
  check_grouped(WeightFormat::FP8_E4M3, 6144, 2048, 1e-5, 64, 128);
  check_grouped(WeightFormat::FP8_E4M3, 37, 333, 1e-5, 32, 32);   // scalar kernel
  check_grouped(WeightFormat::FP8_E4M3, 50, 96, 1e-5, 7, 24);     // bi % 16 != 0: scalar kernel
}

TEST_F(CudaMatvec, GroupedQuant) {
  check_grouped(WeightFormat::Q8_0, 37, 96, tol_of(WeightFormat::Q8_0));
  for (auto f : {WeightFormat::Q8_0, WeightFormat::Q4_K, WeightFormat::Q6_K})
    for (auto [out, in] : {std::pair{2048, 6144}, {6144, 2048}, {37, 512}, {1, 256}}) check_grouped(f, out, in, tol_of(f));
}

// The SwiGLU epilogue (silu_gate): every kernel family that runs grouped launches, zero slots
// included (ids[1] = -1: zeros whatever the gate).
TEST_F(CudaMatvec, GroupedSiluEpilogue) {
  for (auto f : {WeightFormat::Q8_0, WeightFormat::Q4_K, WeightFormat::Q6_K, WeightFormat::BF16, WeightFormat::FP8_E4M3,
                 WeightFormat::F32}) {
    const auto ex = make_experts(f, 2048, 6144, 6);
    run_grouped(ex, random_ids(6, 12), 4, tol_of(f), true);
    const bool quant = f == WeightFormat::Q8_0 || f == WeightFormat::Q4_K || f == WeightFormat::Q6_K;
    const auto odd = make_experts(f, 37, f == WeightFormat::Q8_0 ? 96 : 512, 6, 128, 128, quant);  // split K, odd rows
    run_grouped(odd, random_ids(6, 5), 1, tol_of(f), true);
  }
  const auto scalar = make_experts(WeightFormat::BF16, 7, 333, 6);  // scalar kernel
  run_grouped(scalar, random_ids(6, 8), 4, tol_of(WeightFormat::BF16), true);
}

// Fused gate + up (matvec_grouped_glu) against silu(G x) * (U x) from the dequantized experts:
// one launch for the quant formats (split K, odd rows, zero slots), two for the dense ones.
TEST_F(CudaMatvec, GroupedGlu) {
  for (auto f : {WeightFormat::Q8_0, WeightFormat::Q4_K, WeightFormat::Q6_K, WeightFormat::BF16, WeightFormat::FP8_E4M3}) {
    for (auto [out, in, S, x_div] : {std::tuple{2048, 6144, 12, 4}, {37, 512, 5, 1}, {1, 256, 3, 3}}) {
      const auto g = make_experts(f, out, in, 6), u = make_experts(f, out, in, 6);
      const auto ids = random_ids(6, S);
      const int T = (S + x_div - 1) / x_div;
      DeviceBuffer<uint8_t> dg(g.w.size()), du(u.w.size());
      dg.upload(g.w);
      du.upload(u.w);
      DeviceBuffer<float> dgs(std::max<size_t>(1, g.scale.size())), dus(std::max<size_t>(1, u.scale.size()));
      cuda::ExpertWeights eg{f, dg.p, g.w_stride}, eu{f, du.p, u.w_stride};
      if (!g.scale.empty()) {
        dgs.upload(g.scale);
        dus.upload(u.scale);
        eg.scale = dgs.p, eg.scale_stride = g.scale_stride;
        eu.scale = dus.p, eu.scale_stride = u.scale_stride;
      }
      DeviceBuffer<int> dids(ids.size());
      dids.upload(ids);
      auto x = randn(size_t(T) * in);
      DeviceBuffer<float> dx(x.size()), dy(size_t(S) * out), scratch(size_t(S) * out);
      dx.upload(x);
      dy.poison();
      cuda::matvec_grouped_glu(eg, eu, out, in, dids.p, S, dx.p, x_div, dy.p, scratch.p);
      cuda::check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
      const auto y = dy.download();
      int bad = 0;
      for (int s = 0; s < S; ++s)
        for (int o = 0; o < out; ++o) {
          double rg = 0, ru = 0, mg = 0, mu = 0;
          if (ids[s] >= 0) {
            const float* xr = &x[size_t(s / x_div) * in];
            const float *wg = &g.deq[ids[s]][size_t(o) * in], *wu = &u.deq[ids[s]][size_t(o) * in];
            for (int i = 0; i < in; ++i) {
              rg += double(wg[i]) * xr[i], mg += std::abs(double(wg[i]) * xr[i]);
              ru += double(wu[i]) * xr[i], mu += std::abs(double(wu[i]) * xr[i]);
            }
          }
          const double sg = rg / (1.0 + std::exp(-rg)), want = sg * ru;
          // |d silu| <= 1.1: the gate's error enters times |u|, the up's times |silu(g)|.
          const double tol = tol_of(f) * (1.1 * mg * std::abs(ru) + std::abs(sg) * mu) + 1e-30;
          const float got = y[size_t(s) * out + o];
          if (!(std::abs(got - want) <= tol) && bad++ < 5)
            ADD_FAILURE() << cuda::weight_format_name(f) << " [" << out << " x " << in << "] slot " << s << " (expert "
                          << ids[s] << ") o=" << o << ": got " << got << " want " << want;
        }
      ASSERT_EQ(bad, 0) << cuda::weight_format_name(f) << " [" << out << " x " << in << "]";
    }
  }
  // Gate and up of different layouts are refused.
  const auto a = make_experts(WeightFormat::Q4_K, 256, 256, 2), b = make_experts(WeightFormat::Q8_0, 256, 256, 2);
  DeviceBuffer<uint8_t> da(a.w.size()), db(b.w.size());
  DeviceBuffer<int> dids(2);
  DeviceBuffer<float> dx(256), dy(512);
  EXPECT_THROW(cuda::matvec_grouped_glu({a.f, da.p, a.w_stride}, {b.f, db.p, b.w_stride}, 256, 256, dids.p, 2, dx.p, 1,
                                        dy.p, nullptr),
               Error);
}

TEST_F(CudaMatvec, GroupedInCudaGraph) {
  // Captured once, replayed with other ids written to the same device array: the kernel must read
  // ids on the device.
  const auto ex = make_experts(WeightFormat::Q4_K, 2048, 6144, 6);
  const int S = 12, x_div = 4;
  DeviceBuffer<uint8_t> dw(ex.w.size());
  dw.upload(ex.w);
  DeviceBuffer<int> dids(S);
  auto x = randn(size_t(S / x_div) * ex.in);
  DeviceBuffer<float> dx(x.size()), dy(size_t(S) * ex.out);
  dx.upload(x);
  cudaStream_t st;
  cuda::check(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking), "cudaStreamCreate");
  cuda::check(cudaStreamBeginCapture(st, cudaStreamCaptureModeGlobal), "cudaStreamBeginCapture");
  cuda::matvec_grouped({ex.f, dw.p, ex.w_stride}, ex.out, ex.in, dids.p, S, dx.p, x_div, dy.p, st);
  cudaGraph_t graph;
  cuda::check(cudaStreamEndCapture(st, &graph), "cudaStreamEndCapture");
  cudaGraphExec_t exec;
  cuda::check(cudaGraphInstantiate(&exec, graph, 0), "cudaGraphInstantiate");
  for (int rep = 0; rep < 3; ++rep) {
    const auto ids = random_ids(6, S);
    dids.upload(ids);
    dy.poison();
    cuda::check(cudaGraphLaunch(exec, st), "cudaGraphLaunch");
    cuda::check(cudaStreamSynchronize(st), "cudaStreamSynchronize");
    expect_grouped(ex, ids, x_div, x, dy.download(), tol_of(ex.f));
  }
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  cudaStreamDestroy(st);
}

TEST_F(CudaMatvec, RejectsBadArguments) {
  DeviceBuffer<float> buf(1 << 16);
  EXPECT_THROW(cuda::matvec(WeightFormat::Q4_K, buf.p, nullptr, 4, 100, buf.p, 1, buf.p), Error);
  EXPECT_THROW(cuda::matvec(WeightFormat::BF16, buf.p, nullptr, 4, 64, buf.p, 17, buf.p), Error);
  EXPECT_THROW(cuda::matvec(WeightFormat::FP8_E4M3, buf.p, nullptr, 4, 64, buf.p, 1, buf.p), Error);
  EXPECT_THROW(cuda::matvec(WeightFormat(17), buf.p, nullptr, 4, 64, buf.p, 1, buf.p), Error);
  EXPECT_THROW(cuda::matvec(WeightFormat::F32, reinterpret_cast<const uint8_t*>(buf.p) + 2, nullptr, 4, 64, buf.p, 1,
                            buf.p),
               Error);
  EXPECT_THROW(cuda::matvec(WeightFormat::F32, buf.p, nullptr, 0, 64, buf.p, 1, buf.p), Error);
  // matvec_fp8: scales and positive block sizes.
  EXPECT_THROW(cuda::matvec_fp8(buf.p, nullptr, 32, 32, 4, 64, buf.p, 1, buf.p), Error);
  EXPECT_THROW(cuda::matvec_fp8(buf.p, buf.p, 0, 32, 4, 64, buf.p, 1, buf.p), Error);
  EXPECT_THROW(cuda::matvec_fp8(buf.p, buf.p, 32, -1, 4, 64, buf.p, 1, buf.p), Error);
  EXPECT_THROW(cuda::matvec_fp8(buf.p, buf.p, 32, 32, 4, 64, buf.p, 0, buf.p), Error);
  // matvec_grouped.
  DeviceBuffer<int> ids(16);
  ids.poison();  // -1: no expert
  const cuda::ExpertWeights q4{WeightFormat::Q4_K, buf.p, 144 * 4};
  EXPECT_NO_THROW(cuda::matvec_grouped(q4, 4, 256, ids.p, 1, buf.p, 1, buf.p));  // (ids unset: only the checks)
  cuda::check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
  EXPECT_THROW(cuda::matvec_grouped(q4, 4, 256, nullptr, 1, buf.p, 1, buf.p), Error);   // no ids
  EXPECT_THROW(cuda::matvec_grouped(q4, 4, 256, ids.p, 0, buf.p, 1, buf.p), Error);     // S = 0
  EXPECT_THROW(cuda::matvec_grouped(q4, 4, 256, ids.p, 65536, buf.p, 1, buf.p), Error); // S too large
  EXPECT_THROW(cuda::matvec_grouped(q4, 4, 256, ids.p, 4, buf.p, 0, buf.p), Error);     // x_div = 0
  EXPECT_THROW(cuda::matvec_grouped(q4, 4, 100, ids.p, 4, buf.p, 1, buf.p), Error);     // in % 256
  EXPECT_THROW(cuda::matvec_grouped({WeightFormat::Q4_K, buf.p, 144 * 4 + 8}, 4, 256, ids.p, 4, buf.p, 1, buf.p),
               Error);  // w_stride % 16
  EXPECT_THROW(cuda::matvec_grouped({WeightFormat::Q8_0, reinterpret_cast<const uint8_t*>(buf.p) + 4, 1024}, 4, 256,
                                    ids.p, 4, buf.p, 1, buf.p),
               Error);  // misaligned w
  EXPECT_THROW(cuda::matvec_grouped({WeightFormat::BF16, buf.p, 1001}, 4, 64, ids.p, 4, buf.p, 1, buf.p),
               Error);  // BF16 stride not whole elements
  EXPECT_THROW(cuda::matvec_grouped({WeightFormat::F32, buf.p, 1026}, 4, 64, ids.p, 4, buf.p, 1, buf.p), Error);
  EXPECT_THROW(cuda::matvec_grouped({WeightFormat::FP8_E4M3, buf.p, 256}, 4, 64, ids.p, 4, buf.p, 1, buf.p),
               Error);  // FP8 without scales
  cuda::ExpertWeights f8{WeightFormat::FP8_E4M3, buf.p, 256, buf.p, 1};
  f8.bo = 0;
  EXPECT_THROW(cuda::matvec_grouped(f8, 4, 64, ids.p, 4, buf.p, 1, buf.p), Error);  // bad block
}

}  // namespace
}  // namespace bigmoe
