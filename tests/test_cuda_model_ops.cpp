// The small CUDA model ops (backend/cuda/model_ops.h: rope, layer_norm, silu_mul, add_inplace,
// moe_route, moe_combine, gather/scatter_rows, head_matvec) and rms_norm_strided against CPU
// references (backend/cpu/ref_ops.h, or written here after GlmDsaModel::ffn for the routing) on
// fresh random inputs (ctest label gpu; runs on the GPU machine). Outputs are poisoned with NaN
// (ints with -1) before each run so a kernel that skips elements cannot pass.
#include <gtest/gtest.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <random>
#include <vector>

#include "backend/cpu/ref_ops.h"
#include "backend/cuda/cuda_ops.h"
#include "backend/cuda/model_ops.h"
#include "cuda_test_util.h"
#include "tensor/dtype.h"
#include "util/error.h"

namespace bigmoe {
namespace {

using cuda::WeightFormat;
using test::DeviceBuffer;

class CudaModelOps : public test::CudaTest {
 protected:
  void sync() { cuda::check(cudaDeviceSynchronize(), "cudaDeviceSynchronize"); }
  std::vector<float> uniform(size_t n, float lo, float hi) {
    std::uniform_real_distribution<float> d(lo, hi);
    std::vector<float> v(n);
    for (auto& x : v) x = d(rng);
    return v;
  }
};

// ---- rms_norm_strided ----

TEST_F(CudaModelOps, RmsNormStridedMatchesReference) {
  for (int n : {1, 64, 576, 7168}) {
    const int rows = 5, xs = n + 3, ys = n + 17;
    auto x = randn(size_t(rows) * xs, 2.f), w = randn(n), canary = randn(size_t(rows) * ys);
    DeviceBuffer<float> dx(x.size()), dw(n), dy(canary.size());
    dx.upload(x);
    dw.upload(w);
    dy.upload(canary);  // the gaps between rows must keep these
    cudaStream_t s;
    cuda::check(cudaStreamCreate(&s), "cudaStreamCreate");
    cuda::rms_norm_strided(dx.p, xs, dw.p, rows, n, 1e-6f, dy.p, ys, s);
    cuda::check(cudaStreamSynchronize(s), "cudaStreamSynchronize");
    cuda::check(cudaStreamDestroy(s), "cudaStreamDestroy");
    auto y = dy.download();
    std::vector<float> ref(n);
    for (int r = 0; r < rows; ++r) {
      cpu::rms_norm(&x[size_t(r) * xs], w.data(), n, 1e-6, ref.data());
      for (int i = 0; i < n; ++i)
        ASSERT_NEAR(y[size_t(r) * ys + i], ref[i], 1e-5f * (1.f + std::abs(ref[i]))) << "n=" << n << " r=" << r << " i=" << i;
      for (int i = n; i < ys; ++i) ASSERT_EQ(y[size_t(r) * ys + i], canary[size_t(r) * ys + i]) << "gap n=" << n;
    }
    // In place (y == x, one stride), and the contiguous rms_norm with a stream.
    cuda::rms_norm_strided(dx.p, xs, dw.p, rows, n, 1e-6f, dx.p, xs);
    auto xi = dx.download();
    for (int r = 0; r < rows; ++r) {
      cpu::rms_norm(&x[size_t(r) * xs], w.data(), n, 1e-6, ref.data());
      for (int i = 0; i < n; ++i) ASSERT_NEAR(xi[size_t(r) * xs + i], ref[i], 1e-5f * (1.f + std::abs(ref[i])));
      for (int i = n; i < xs; ++i) ASSERT_EQ(xi[size_t(r) * xs + i], x[size_t(r) * xs + i]);
    }
  }
}

TEST_F(CudaModelOps, RmsNormBadArguments) {
  DeviceBuffer<float> b(64);
  EXPECT_THROW(cuda::rms_norm_strided(b.p, 7, b.p, 2, 8, 1e-6f, b.p, 8), Error);   // x_stride < n
  EXPECT_THROW(cuda::rms_norm_strided(b.p, 8, b.p, 2, 8, 1e-6f, b.p, 4), Error);   // y_stride < n
  EXPECT_THROW(cuda::rms_norm_strided(b.p, 8, b.p, -1, 8, 1e-6f, b.p, 8), Error);  // rows < 0
  EXPECT_THROW(cuda::rms_norm(b.p, b.p, 2, 0, 1e-6f, b.p), Error);                 // n == 0
  EXPECT_NO_THROW(cuda::rms_norm_strided(b.p, 8, b.p, 0, 8, 1e-6f, b.p, 8));       // no rows
}

// ---- rope ----

cpu::Rope make_rope(int dim, bool interleave, float factor) {
  cpu::Rope r;
  r.dim = dim;
  r.interleave = interleave;
  r.attention_factor = factor;
  for (int j = 0; j < dim / 2; ++j) r.inv_freq.push_back(float(1.0 / std::pow(10000.0, 2.0 * j / dim)));
  return r;
}

TEST_F(CudaModelOps, RopeMatchesReference) {
  struct Case {
    int rows, stride, offset, dim, rows_per_pos, pos0;
  };
  // q_pe of [T, H, 256] rows (nope 192 + rope 64), k_pe [T, 64], a short layout with a tail,
  // and large / odd start positions.
  const Case cases[] = {{3 * 64, 256, 192, 64, 64, 0},  {5 * 8, 256, 192, 64, 8, 7},   {16, 64, 0, 64, 1, 1},
                        {7, 40, 4, 32, 1, 100001},      {4 * 3, 20, 2, 16, 3, 12345}, {1, 8, 0, 8, 1, 3}};
  for (const Case& c : cases)
    for (bool interleave : {false, true})
      for (float factor : {1.0f, 1.2079f}) {
        const cpu::Rope rope = make_rope(c.dim, interleave, factor);
        const size_t n = size_t(c.rows - 1) * c.stride + c.offset + c.dim;
        auto x = randn(n);
        DeviceBuffer<float> dx(n), df(rope.inv_freq.size());
        dx.upload(x);
        df.upload(rope.inv_freq);
        cuda::rope(dx.p, c.rows, c.stride, c.offset, c.dim, c.rows_per_pos, c.pos0, df.p, factor, interleave);
        auto y = dx.download();
        std::vector<float> ref = x;
        std::vector<bool> rotated(n, false);
        for (int r = 0; r < c.rows; ++r) {
          const size_t o = size_t(r) * c.stride + c.offset;
          rope.apply(&ref[o], c.pos0 + r / c.rows_per_pos);
          for (int i = 0; i < c.dim; ++i) rotated[o + i] = true;
        }
        for (size_t i = 0; i < n; ++i) {
          if (!rotated[i]) {
            ASSERT_EQ(y[i], x[i]) << "untouched element " << i << " changed";
            continue;
          }
          // Magnitude of the terms: the pair's inputs times the factor.
          const size_t r0 = (i / c.stride) * c.stride + c.offset;  // rows never straddle (stride >= offset + dim)
          const int j = int(i - r0);
          const int half = c.dim / 2;
          const int partner = interleave ? (j ^ 1) : (j < half ? j + half : j - half);
          const float mag = factor * (std::abs(x[i]) + std::abs(x[r0 + partner]));
          ASSERT_NEAR(y[i], ref[i], 1e-5f * mag + 1e-30f)
              << "rows=" << c.rows << " pos0=" << c.pos0 << " interleave=" << interleave << " i=" << i;
        }
      }
}

// pos_dev (graph-captured decode): the position comes from device memory, pos0 is ignored.
TEST_F(CudaModelOps, RopeDevicePosition) {
  for (bool interleave : {false, true}) {
    const int H = 8, stride = 256, offset = 192, dim = 64, T = 3, pos = 4097;
    const cpu::Rope rope = make_rope(dim, interleave, 1.2079f);
    auto x = randn(size_t(T) * H * stride);
    DeviceBuffer<float> dx(x.size()), df(rope.inv_freq.size());
    DeviceBuffer<int> dp(1);
    dx.upload(x);
    df.upload(rope.inv_freq);
    dp.upload({pos});
    cuda::rope(dx.p, T * H, stride, offset, dim, H, 0, df.p, rope.attention_factor, interleave, nullptr, dp.p);
    auto y = dx.download();
    std::vector<float> ref = x;
    for (int r = 0; r < T * H; ++r) rope.apply(&ref[size_t(r) * stride + offset], pos + r / H);
    for (size_t i = 0; i < x.size(); ++i)
      ASSERT_NEAR(y[i], ref[i], 1e-5f * 1.3f * (std::abs(x[i]) + 4.f)) << "interleave=" << interleave << " i=" << i;
  }
}

TEST_F(CudaModelOps, RopeBadArguments) {
  DeviceBuffer<float> b(256), f(32);
  EXPECT_THROW(cuda::rope(b.p, 2, 64, 0, 63, 1, 0, f.p, 1.f, false), Error);   // odd dim
  EXPECT_THROW(cuda::rope(b.p, 2, 64, 0, 0, 1, 0, f.p, 1.f, false), Error);    // dim 0
  EXPECT_THROW(cuda::rope(b.p, 2, 64, 0, 64, 0, 0, f.p, 1.f, false), Error);   // rows_per_pos 0
  EXPECT_THROW(cuda::rope(b.p, 2, 64, 0, 64, 1, -1, f.p, 1.f, false), Error);  // pos0 < 0
  EXPECT_THROW(cuda::rope(b.p, 2, 64, 8, 64, 1, 0, f.p, 1.f, false), Error);   // rows overlap
  EXPECT_THROW(cuda::rope(b.p, -1, 64, 0, 64, 1, 0, f.p, 1.f, false), Error);  // rows < 0
}

// ---- layer_norm ----

TEST_F(CudaModelOps, LayerNormMatchesReference) {
  for (int n : {1, 128, 576, 7168}) {
    const int rows = 5;
    auto x = randn(size_t(rows) * n, 2.f), w = randn(n), b = randn(n);
    for (auto& v : x) v += 3.f;  // a mean well away from zero
    DeviceBuffer<float> dx(x.size()), dw(n), db(n), dy(x.size());
    dx.upload(x);
    dw.upload(w);
    db.upload(b);
    dy.poison();
    cuda::layer_norm(dx.p, dw.p, db.p, rows, n, 1e-6f, dy.p);
    auto y = dy.download();
    std::vector<float> ref(n);
    for (int pass = 0; pass < 2; ++pass) {
      for (int r = 0; r < rows; ++r) {
        const float* xr = &x[size_t(r) * n];
        cpu::layer_norm(xr, w.data(), b.data(), n, 1e-6, ref.data());
        double mean = 0, var = 0;
        for (int i = 0; i < n; ++i) mean += xr[i];
        mean /= n;
        for (int i = 0; i < n; ++i) var += (xr[i] - mean) * (xr[i] - mean);
        const double inv = 1.0 / std::sqrt(var / n + 1e-6);
        for (int i = 0; i < n; ++i) {
          // Terms: |x| and |mean| scaled by 1/σ, times |w|; plus |b|.
          const double mag = (std::abs(xr[i]) + std::abs(mean)) * inv * std::abs(w[i]) + std::abs(b[i]);
          ASSERT_NEAR(y[size_t(r) * n + i], ref[i], 1e-5 * mag + 1e-30) << "n=" << n << " r=" << r << " i=" << i;
        }
      }
      // Second pass: in place.
      cuda::layer_norm(dx.p, dw.p, db.p, rows, n, 1e-6f, dx.p);
      y = dx.download();
    }
  }
}

TEST_F(CudaModelOps, LayerNormBadArguments) {
  DeviceBuffer<float> b(64);
  EXPECT_THROW(cuda::layer_norm(b.p, b.p, b.p, 2, 0, 1e-6f, b.p), Error);
  EXPECT_THROW(cuda::layer_norm(b.p, b.p, b.p, -1, 8, 1e-6f, b.p), Error);
  EXPECT_THROW(cuda::layer_norm(b.p, b.p, nullptr, 2, 8, 1e-6f, b.p), Error);
}

// ---- silu_mul / add_inplace ----

TEST_F(CudaModelOps, SiluMulMatchesReference) {
  for (size_t n : {size_t(1), size_t(1000), size_t(1) << 20 | 3}) {
    auto g = randn(n, 4.f), u = randn(n);
    DeviceBuffer<float> dg(n), du(n), dout(n);
    dg.upload(g);
    du.upload(u);
    dout.poison();
    cuda::silu_mul(dg.p, du.p, n, dout.p);
    auto out = dout.download();
    for (size_t i = 0; i < n; ++i) {
      const float ref = cpu::silu(g[i]) * u[i];
      ASSERT_NEAR(out[i], ref, 1e-5f * std::abs(ref) + 1e-30f) << "n=" << n << " i=" << i;
    }
    cuda::silu_mul(dg.p, du.p, n, dg.p);  // out aliases g
    auto alias = dg.download();
    for (size_t i = 0; i < n; ++i) ASSERT_EQ(alias[i], out[i]);
  }
  EXPECT_NO_THROW(cuda::silu_mul(nullptr, nullptr, 0, nullptr));
  EXPECT_THROW(cuda::silu_mul(nullptr, nullptr, 4, nullptr), Error);
}

TEST_F(CudaModelOps, AddInplaceMatchesReference) {
  for (size_t n : {size_t(1), size_t(777), size_t(1) << 20 | 5}) {
    auto x = randn(n), y = randn(n);
    DeviceBuffer<float> dx(n), dy(n);
    dx.upload(x);
    dy.upload(y);
    cuda::add_inplace(dx.p, dy.p, n);
    auto out = dx.download();
    for (size_t i = 0; i < n; ++i) ASSERT_EQ(out[i], x[i] + y[i]) << "n=" << n << " i=" << i;
  }
  EXPECT_NO_THROW(cuda::add_inplace(nullptr, nullptr, 0));
  EXPECT_THROW(cuda::add_inplace(nullptr, nullptr, 4), Error);
}

// ---- moe_route ----

// The routing of GlmDsaModel::ffn for one token: ids [K] in descending choice order, weights [K].
void route_ref(const float* logits, const float* bias, int E, int G, int topk_group, int K, bool norm_topk,
               float scaling, int* ids, float* weights) {
  const int per = E / G;
  std::vector<float> s(E), choice(E);
  for (int e = 0; e < E; ++e) {
    s[e] = float(1.0 / (1.0 + std::exp(-double(logits[e]))));
    choice[e] = s[e] + (bias ? bias[e] : 0.f);
  }
  if (G > 1) {
    std::vector<float> gscore(G);
    for (int g = 0; g < G; ++g) {
      auto top2 = cpu::topk(&choice[g * per], per, 2);
      gscore[g] = choice[g * per + top2[0]] + choice[g * per + top2[1]];
    }
    auto keep = cpu::topk(gscore.data(), G, topk_group);
    std::vector<bool> kept(G, false);
    for (int g : keep) kept[g] = true;
    for (int e = 0; e < E; ++e)
      if (!kept[e / per]) choice[e] = -INFINITY;
  }
  auto idx = cpu::topk(choice.data(), E, K);
  std::vector<double> wt(K);
  double sum = 0;
  for (int k = 0; k < K; ++k) sum += (wt[k] = s[idx[k]]);
  for (int k = 0; k < K; ++k) {
    if (norm_topk) wt[k] /= (sum + 1e-20);
    wt[k] *= double(scaling);
    ids[k] = idx[k];
    weights[k] = float(wt[k]);
  }
}

struct RouteCase {
  int T, E, G, topk_group, K;
  bool norm_topk;
  float scaling;
};

class CudaMoeRoute : public CudaModelOps {
 protected:
  // ties: logits and bias from a small set of values, so equal choices (and equal group
  // scores) are common and the lower-index rule decides.
  void check_case(const RouteCase& c, bool ties, bool with_bias) {
    std::vector<float> logits, bias;
    if (ties) {
      std::uniform_int_distribution<int> q(-4, 4), qb(0, 2);
      logits.resize(size_t(c.T) * c.E);
      bias.resize(c.E);
      for (auto& v : logits) v = 0.5f * float(q(rng));
      for (auto& v : bias) v = 0.25f * float(qb(rng));
    } else {
      logits = randn(size_t(c.T) * c.E, 2.f);
      bias = randn(c.E, 0.1f);
    }
    DeviceBuffer<float> dl(logits.size()), db(bias.size()), dw(size_t(c.T) * c.K);
    DeviceBuffer<int> di(size_t(c.T) * c.K);
    dl.upload(logits);
    db.upload(bias);
    dw.poison();
    di.poison();
    cuda::moe_route(dl.p, with_bias ? db.p : nullptr, c.T, c.E, c.G, c.topk_group, c.K, c.norm_topk, c.scaling, di.p,
                    dw.p);
    auto ids = di.download();
    auto w = dw.download();
    std::vector<int> rid(c.K);
    std::vector<float> rw(c.K);
    for (int t = 0; t < c.T; ++t) {
      route_ref(&logits[size_t(t) * c.E], with_bias ? bias.data() : nullptr, c.E, c.G, c.topk_group, c.K,
                c.norm_topk, c.scaling, rid.data(), rw.data());
      for (int k = 0; k < c.K; ++k) {
        const size_t o = size_t(t) * c.K + k;
        ASSERT_EQ(ids[o], rid[k]) << "E=" << c.E << " G=" << c.G << " K=" << c.K << " ties=" << ties << " t=" << t
                                  << " k=" << k;
        ASSERT_NEAR(w[o], rw[k], 1e-6f * std::abs(rw[k])) << "E=" << c.E << " t=" << t << " k=" << k;
      }
    }
  }
};

TEST_F(CudaMoeRoute, MatchesReference) {
  const RouteCase cases[] = {
      {1, 256, 1, 1, 8, true, 2.5f},     // GLM-5: one group, top-8 of 256
      {16, 256, 1, 1, 8, true, 1.0f},
      {5, 256, 8, 4, 8, true, 2.5f},     // DeepSeek-V3 style: 8 groups, keep 4
      {3, 64, 8, 3, 6, true, 1.5f},
      {4, 160, 1, 1, 6, false, 1.0f},    // no normalization
      {2, 1024, 16, 5, 32, true, 1.0f},  // the limits
      {3, 32, 4, 4, 4, true, 1.0f},      // every group kept
      {2, 32, 8, 1, 6, true, 1.0f},      // K > experts of the kept groups: masked ones fill in
      {2, 2, 1, 1, 2, true, 1.0f},
      {3, 100, 50, 7, 5, true, 1.0f},    // groups of 2
  };
  for (const RouteCase& c : cases)
    for (bool ties : {false, true}) check_case(c, ties, true);
  check_case({4, 256, 1, 1, 8, true, 2.5f}, false, false);  // no correction bias
  check_case({4, 256, 8, 4, 8, true, 2.5f}, true, false);
}

TEST_F(CudaMoeRoute, BadArguments) {
  DeviceBuffer<float> f(4096);
  DeviceBuffer<int> i(64);
  EXPECT_THROW(cuda::moe_route(f.p, f.p, 1, 2048, 1, 1, 8, true, 1.f, i.p, f.p), Error);  // E > 1024
  EXPECT_THROW(cuda::moe_route(f.p, f.p, 1, 256, 1, 1, 33, true, 1.f, i.p, f.p), Error);  // K > 32
  EXPECT_THROW(cuda::moe_route(f.p, f.p, 1, 4, 1, 1, 5, true, 1.f, i.p, f.p), Error);     // K > E
  EXPECT_THROW(cuda::moe_route(f.p, f.p, 1, 256, 1, 1, 0, true, 1.f, i.p, f.p), Error);   // K 0
  EXPECT_THROW(cuda::moe_route(f.p, f.p, 1, 100, 8, 4, 8, true, 1.f, i.p, f.p), Error);   // E % groups
  EXPECT_THROW(cuda::moe_route(f.p, f.p, 1, 256, 8, 9, 8, true, 1.f, i.p, f.p), Error);   // topk_group > groups
  EXPECT_THROW(cuda::moe_route(f.p, f.p, 1, 256, 8, 0, 8, true, 1.f, i.p, f.p), Error);   // topk_group 0
  EXPECT_THROW(cuda::moe_route(f.p, f.p, 1, 8, 8, 4, 2, true, 1.f, i.p, f.p), Error);     // groups of 1
  EXPECT_THROW(cuda::moe_route(f.p, f.p, -1, 256, 1, 1, 8, true, 1.f, i.p, f.p), Error);  // T < 0
  EXPECT_NO_THROW(cuda::moe_route(f.p, f.p, 0, 256, 1, 1, 8, true, 1.f, i.p, f.p));
}

// ---- moe_combine ----

TEST_F(CudaModelOps, MoeCombineMatchesReference) {
  for (int d : {1, 300, 6144})
    for (int T : {1, 5})
      for (bool with_shared : {false, true}) {
        const int K = 8;
        auto y = randn(size_t(T) * K * d), w = randn(size_t(T) * K, 0.3f), x = randn(size_t(T) * d);
        auto sh = randn(size_t(T) * d);
        DeviceBuffer<float> dy(y.size()), dw(w.size()), dx(x.size()), ds(sh.size());
        dy.upload(y);
        dw.upload(w);
        dx.upload(x);
        ds.upload(sh);
        cuda::moe_combine(dy.p, dw.p, T, K, d, with_shared ? ds.p : nullptr, dx.p);
        auto out = dx.download();
        for (int t = 0; t < T; ++t)
          for (int i = 0; i < d; ++i) {
            double ref = 0, mag = 0;
            for (int k = 0; k < K; ++k) {
              const double term = double(w[size_t(t) * K + k]) * y[(size_t(t) * K + k) * d + i];
              ref += term;
              mag += std::abs(term);
            }
            const size_t o = size_t(t) * d + i;
            if (with_shared) ref += sh[o], mag += std::abs(sh[o]);
            ref += x[o];
            mag += std::abs(x[o]);
            ASSERT_NEAR(out[o], ref, 1e-5 * mag + 1e-30) << "d=" << d << " T=" << T << " t=" << t << " i=" << i;
          }
      }
  DeviceBuffer<float> b(16);
  EXPECT_THROW(cuda::moe_combine(b.p, b.p, 1, 1, 0, nullptr, b.p), Error);
  EXPECT_THROW(cuda::moe_combine(b.p, b.p, -1, 1, 4, nullptr, b.p), Error);
  EXPECT_THROW(cuda::moe_combine(nullptr, b.p, 1, 1, 4, nullptr, b.p), Error);
}

// ---- gather_rows / scatter_rows ----

TEST_F(CudaModelOps, GatherScatterRows) {
  for (int d : {7, 6144}) {
    const int N = 40, n = 25;
    auto x = randn(size_t(N) * d);
    // Gather: repeated rows allowed; -1 gives a zero row.
    std::uniform_int_distribution<int> pick(0, N - 1);
    std::vector<int> rows(n);
    for (auto& r : rows) r = pick(rng);
    rows[3] = -1;
    DeviceBuffer<float> dx(x.size()), dout(size_t(n) * d);
    DeviceBuffer<int> dr(n);
    dx.upload(x);
    dr.upload(rows);
    dout.poison();
    cuda::gather_rows(dx.p, dr.p, n, d, dout.p);
    auto out = dout.download();
    for (int i = 0; i < n; ++i)
      for (int c = 0; c < d; ++c)
        ASSERT_EQ(out[size_t(i) * d + c], rows[i] < 0 ? 0.f : x[size_t(rows[i]) * d + c]) << "gather i=" << i;
    // Scatter: distinct target rows; rows not named (and -1 entries) leave y as it was.
    std::vector<int> perm(N);
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), rng);
    perm.resize(n);
    perm[5] = -1;
    auto src = randn(size_t(n) * d), y0 = randn(size_t(N) * d);
    DeviceBuffer<float> ds(src.size()), dy(y0.size());
    ds.upload(src);
    dy.upload(y0);
    dr.upload(perm);
    cuda::scatter_rows(ds.p, dr.p, n, d, dy.p);
    auto y = dy.download();
    std::vector<float> ref = y0;
    for (int i = 0; i < n; ++i)
      if (perm[i] >= 0) std::copy(&src[size_t(i) * d], &src[size_t(i + 1) * d], &ref[size_t(perm[i]) * d]);
    for (size_t i = 0; i < ref.size(); ++i) ASSERT_EQ(y[i], ref[i]) << "scatter d=" << d << " at " << i;
  }
  DeviceBuffer<float> b(16);
  DeviceBuffer<int> r(4);
  EXPECT_NO_THROW(cuda::gather_rows(b.p, r.p, 0, 4, b.p));
  EXPECT_THROW(cuda::gather_rows(b.p, r.p, -1, 4, b.p), Error);
  EXPECT_THROW(cuda::gather_rows(b.p, r.p, 2, 0, b.p), Error);
  EXPECT_THROW(cuda::scatter_rows(b.p, r.p, -1, 4, b.p), Error);
  EXPECT_THROW(cuda::scatter_rows(b.p, nullptr, 2, 4, b.p), Error);
}

// ---- head_matvec ----

struct HeadCase {
  int H, rows, cols, x_stride_h, T;
  int w_offset;  // elements into the weight buffer (1: misaligned, the scalar path)
  int x_pad;     // x_stride_t = H * x_stride_h + x_pad (not a multiple of 4: the scalar path)
};

TEST_F(CudaModelOps, HeadMatvecMatchesReference) {
  const HeadCase cases[] = {
      // q̃ = W_UKᵀ q_nope: W [64, 512, 192], x rows of q [T, 64, 256] (nope first).
      {64, 512, 192, 256, 1, 0, 0}, {64, 512, 192, 256, 3, 0, 0}, {64, 512, 192, 256, 16, 0, 0},
      {64, 512, 192, 256, 2, 0, 3},
      // o = W_UV ō: W [64, 256, 512], x [T, 64, 512].
      {64, 256, 512, 512, 1, 0, 0}, {64, 256, 512, 512, 5, 0, 0}, {64, 256, 512, 512, 16, 0, 0},
      {64, 256, 512, 512, 17, 0, 0}, {64, 256, 512, 512, 18, 0, 4},
      // Tiny synthetic-model shapes, odd rows / cols, misaligned weights or x, long rows.
      {4, 32, 16, 16, 1, 0, 0}, {4, 24, 32, 40, 3, 0, 0}, {4, 24, 32, 32, 2, 1, 0}, {4, 24, 32, 32, 9, 0, 1},
      {3, 37, 7, 9, 4, 0, 0}, {2, 5, 33, 33, 6, 0, 0}, {2, 8, 4000, 4000, 7, 0, 0}, {1, 1, 1, 1, 1, 0, 0}};
  for (const HeadCase& c : cases)
    for (WeightFormat fmt : {WeightFormat::BF16, WeightFormat::F32}) {
      const size_t nw = size_t(c.H) * c.rows * c.cols;
      auto wf = randn(nw, 0.5f);
      std::vector<uint16_t> wb(nw + c.w_offset);
      for (size_t i = 0; i < nw; ++i) {
        wb[c.w_offset + i] = f32_to_bf16(wf[i]);
        if (fmt == WeightFormat::BF16) wf[i] = bf16_to_f32(wb[c.w_offset + i]);
      }
      std::vector<float> wpad(nw + c.w_offset);
      std::copy(wf.begin(), wf.end(), wpad.begin() + c.w_offset);
      const int x_stride_t = c.H * c.x_stride_h + c.x_pad;
      auto x = randn(size_t(c.T) * x_stride_t);
      DeviceBuffer<uint16_t> dwb(wb.size());
      DeviceBuffer<float> dwf(wpad.size()), dx(x.size()), dy(size_t(c.T) * c.H * c.rows);
      dwb.upload(wb);
      dwf.upload(wpad);
      dx.upload(x);
      dy.poison();
      const void* w = fmt == WeightFormat::BF16 ? static_cast<const void*>(dwb.p + c.w_offset)
                                                : static_cast<const void*>(dwf.p + c.w_offset);
      cuda::head_matvec(fmt, w, c.H, c.rows, c.cols, dx.p, x_stride_t, c.x_stride_h, c.T, dy.p);
      auto y = dy.download();
      for (int t = 0; t < c.T; ++t)
        for (int h = 0; h < c.H; ++h) {
          const float* xr = &x[size_t(t) * x_stride_t + size_t(h) * c.x_stride_h];
          for (int r = 0; r < c.rows; ++r) {
            const float* wr = &wf[(size_t(h) * c.rows + r) * c.cols];
            double ref = 0, mag = 0;
            for (int i = 0; i < c.cols; ++i) {
              ref += double(wr[i]) * xr[i];
              mag += std::abs(double(wr[i]) * xr[i]);
            }
            ASSERT_NEAR(y[(size_t(t) * c.H + h) * c.rows + r], ref, 1e-5 * mag + 1e-30)
                << cuda::weight_format_name(fmt) << " H=" << c.H << " rows=" << c.rows << " cols=" << c.cols
                << " T=" << c.T << " t=" << t << " h=" << h << " r=" << r;
          }
        }
    }
}

TEST_F(CudaModelOps, HeadMatvecBadArguments) {
  DeviceBuffer<float> b(1024);
  EXPECT_THROW(cuda::head_matvec(WeightFormat::Q4_K, b.p, 2, 4, 8, b.p, 16, 8, 1, b.p), Error);
  EXPECT_THROW(cuda::head_matvec(WeightFormat::FP8_E4M3, b.p, 2, 4, 8, b.p, 16, 8, 1, b.p), Error);
  EXPECT_THROW(cuda::head_matvec(WeightFormat::BF16, b.p, 0, 4, 8, b.p, 16, 8, 1, b.p), Error);
  EXPECT_THROW(cuda::head_matvec(WeightFormat::BF16, b.p, 2, 0, 8, b.p, 16, 8, 1, b.p), Error);
  EXPECT_THROW(cuda::head_matvec(WeightFormat::BF16, b.p, 2, 4, 0, b.p, 16, 8, 1, b.p), Error);
  EXPECT_THROW(cuda::head_matvec(WeightFormat::BF16, b.p, 2, 4, 8, b.p, 16, 8, -1, b.p), Error);
  EXPECT_THROW(cuda::head_matvec(WeightFormat::BF16, b.p, 2, 4, 8, b.p, -16, 8, 1, b.p), Error);
  EXPECT_THROW(cuda::head_matvec(WeightFormat::F32, nullptr, 2, 4, 8, b.p, 16, 8, 1, b.p), Error);
  EXPECT_NO_THROW(cuda::head_matvec(WeightFormat::F32, b.p, 2, 4, 8, b.p, 16, 8, 0, b.p));
}

}  // namespace
}  // namespace bigmoe
