// cuda::mla_decode_attention, cuda::dsa_indexer_scores and cuda::topk_per_row against float64
// CPU references written here from spec §3 (steps 5–7) and §4, on fresh random inputs (ctest
// label gpu; runs on the GPU machine). Outputs are poisoned before each run so a kernel that
// skips elements cannot pass.
#include <gtest/gtest.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <set>
#include <vector>

#include "backend/cuda/cuda_ops.h"
#include "cuda_test_util.h"

namespace bigmoe {
namespace {

using test::DeviceBuffer;

constexpr int kLatent = 512, kRope = 64, kNope = 128;

class CudaAttention : public test::CudaTest {
 public:
};

double dot(const float* a, const float* b, int n) {
  double s = 0;
  for (int i = 0; i < n; ++i) s += double(a[i]) * b[i];
  return s;
}

// Spec §4: ō_h = Σ_{s in keys} softmax(scale · (q̃_h·c(s) + q_pe_h·k_pe(s))) c(s).
void ref_attention(const std::vector<float>& ql, const std::vector<float>& qp, const std::vector<float>& lat,
                   const std::vector<float>& kpe, int t, int h, int H, const std::vector<int>& keys, double scale,
                   std::vector<double>& out) {
  const float* q = &ql[(size_t(t) * H + h) * kLatent];
  const float* p = &qp[(size_t(t) * H + h) * kRope];
  std::vector<double> sc(keys.size());
  double mx = -INFINITY;
  for (size_t j = 0; j < keys.size(); ++j) {
    int s = keys[j];
    sc[j] = scale * (dot(q, &lat[size_t(s) * kLatent], kLatent) + dot(p, &kpe[size_t(s) * kRope], kRope));
    mx = std::max(mx, sc[j]);
  }
  double den = 0;
  for (auto& v : sc) den += (v = std::exp(v - mx));
  out.assign(kLatent, 0.0);
  for (size_t j = 0; j < keys.size(); ++j)
    for (int i = 0; i < kLatent; ++i) out[i] += sc[j] * lat[size_t(keys[j]) * kLatent + i];
  for (auto& v : out) v /= den;
}

// mode 0: dense causal; else a random subset of min(topk, pos+1) causal positions per row,
// shuffled, -1 padding interleaved.
void run_attention_case(CudaAttention& f, std::mt19937& rng, int N, int H, int T, int topk) {
  const int pos0 = N - T;
  const double scale = 1.0 / std::sqrt(double(kNope + kRope));
  auto ql = f.randn(size_t(T) * H * kLatent, 1.5f), qp = f.randn(size_t(T) * H * kRope, 1.f);
  auto lat = f.randn(size_t(N) * kLatent, 1.f), kpe = f.randn(size_t(N) * kRope, 1.f);
  std::vector<std::vector<int>> keys(T);
  std::vector<int> sel;
  if (topk > 0) sel.assign(size_t(T) * topk, -1);
  for (int t = 0; t < T; ++t) {
    int p = pos0 + t;
    std::vector<int> all(p + 1);
    std::iota(all.begin(), all.end(), 0);
    if (topk == 0) {
      keys[t] = all;
      continue;
    }
    std::shuffle(all.begin(), all.end(), rng);
    int m = std::min(topk, p + 1);
    keys[t].assign(all.begin(), all.begin() + m);
    // place the m keys at random slots of the row, the rest stays -1
    std::vector<int> slots(topk);
    std::iota(slots.begin(), slots.end(), 0);
    std::shuffle(slots.begin(), slots.end(), rng);
    for (int j = 0; j < m; ++j) sel[size_t(t) * topk + slots[j]] = keys[t][j];
  }
  DeviceBuffer<float> dql(ql.size()), dqp(qp.size()), dlat(lat.size()), dkpe(kpe.size()), dout(size_t(T) * H * kLatent);
  DeviceBuffer<int> dsel(sel.size());
  dql.upload(ql);
  dqp.upload(qp);
  dlat.upload(lat);
  dkpe.upload(kpe);
  if (topk > 0) dsel.upload(sel);
  dout.poison();
  cuda::mla_decode_attention(dql.p, dqp.p, dlat.p, dkpe.p, T, H, kLatent, kRope, pos0, topk > 0 ? dsel.p : nullptr,
                             topk, float(scale), dout.p);
  cuda::check(cudaDeviceSynchronize(), "sync");
  auto out = dout.download();
  std::vector<std::vector<double>> ref(size_t(T) * H);
  double max_ref = 0;
  for (int t = 0; t < T; ++t)
    for (int h = 0; h < H; ++h) {
      ref_attention(ql, qp, lat, kpe, t, h, H, keys[t], scale, ref[size_t(t) * H + h]);
      for (double v : ref[size_t(t) * H + h]) max_ref = std::max(max_ref, std::abs(v));
    }
  const double tol = 1e-4 * max_ref;
  double max_err = 0;
  for (int t = 0; t < T; ++t)
    for (int h = 0; h < H; ++h)
      for (int i = 0; i < kLatent; ++i) {
        double g = out[(size_t(t) * H + h) * kLatent + i], r = ref[size_t(t) * H + h][i];
        ASSERT_TRUE(std::isfinite(g)) << "N=" << N << " H=" << H << " topk=" << topk << " t=" << t << " h=" << h << " i=" << i;
        max_err = std::max(max_err, std::abs(g - r));
        ASSERT_LE(std::abs(g - r), tol) << "N=" << N << " H=" << H << " topk=" << topk << " t=" << t << " h=" << h
                                        << " i=" << i << " gpu " << g << " ref " << r;
      }
  std::printf("  attention N=%-5d H=%-3d T=%-2d topk=%-5d max|ref| %.3f max err %.2e (%.2e of max)\n", N, H, T, topk,
              max_ref, max_err, max_err / max_ref);
}

TEST_F(CudaAttention, MlaDecodeMatchesReference) {
  for (int N : {1, 17, 300, 2500})
    for (int H : {4, 64})
      for (int topk : {0, 16, 2048}) {
        int T = N == 1 ? 1 : 16;
        if (N == 17 && H == 4) T = 5;
        run_attention_case(*this, rng, N, H, T, topk);
        if (HasFatalFailure()) return;
      }
}

// Spec §3 step 6: I(t, s) = Σ_h w_scale·w[t,h] · ReLU(qi[t,h]·ki(s) / sqrt(Di)), s <= pos.
TEST_F(CudaAttention, IndexerScoresAndTopkMatchReference) {
  const int Hi = 32, Di = 128;
  const double w_scale = 1.0 / std::sqrt(double(Hi)), dot_scale = 1.0 / std::sqrt(double(Di));
  for (int N : {1, 17, 300, 2500})
    for (int topk : {16, 2048}) {
      const int T = std::min(N, 16), pos0 = N - T;
      auto qi = randn(size_t(T) * Hi * Di), ki = randn(size_t(N) * Di), w = randn(size_t(T) * Hi);
      DeviceBuffer<float> dqi(qi.size()), dki(ki.size()), dw(w.size()), dsc(size_t(T) * N);
      DeviceBuffer<int> dsel(size_t(T) * topk);
      size_t ws_bytes = cuda::topk_per_row_workspace_bytes(T, N);
      DeviceBuffer<char> dws(ws_bytes);
      dqi.upload(qi);
      dki.upload(ki);
      dw.upload(w);
      dsc.poison();
      dsel.poison();
      cuda::check(cudaMemset(dsel.p, 0x7f, dsel.n * sizeof(int)), "memset");
      cuda::dsa_indexer_scores(dqi.p, dki.p, dw.p, T, Hi, Di, N, pos0, float(w_scale), dsc.p);
      cuda::topk_per_row(dsc.p, T, N, pos0, topk, dws.p, ws_bytes, dsel.p);
      cuda::check(cudaDeviceSynchronize(), "sync");
      auto sc = dsc.download();
      auto sel = dsel.download();

      std::vector<double> ref(size_t(T) * N);
      double max_ref = 0;
      for (int t = 0; t < T; ++t)
        for (int s = 0; s <= pos0 + t; ++s) {
          double acc = 0;
          for (int h = 0; h < Hi; ++h) {
            double qk = dot(&qi[(size_t(t) * Hi + h) * Di], &ki[size_t(s) * Di], Di) * dot_scale;
            acc += w_scale * w[size_t(t) * Hi + h] * std::max(qk, 0.0);
          }
          ref[size_t(t) * N + s] = acc;
          max_ref = std::max(max_ref, std::abs(acc));
        }
      double max_err = 0;
      for (int t = 0; t < T; ++t)
        for (int s = 0; s < N; ++s) {
          float g = sc[size_t(t) * N + s];
          if (s > pos0 + t) {
            ASSERT_TRUE(std::isinf(g) && g < 0) << "N=" << N << " t=" << t << " s=" << s << " got " << g;
            continue;
          }
          double r = ref[size_t(t) * N + s];
          max_err = std::max(max_err, std::abs(g - r));
          ASSERT_LE(std::abs(g - r), 1e-4 * max_ref) << "N=" << N << " t=" << t << " s=" << s << " gpu " << g << " ref " << r;
        }

      int rows_checked = 0, rows_tied = 0;
      for (int t = 0; t < T; ++t) {
        const int n = pos0 + t + 1;
        const int* row = &sel[size_t(t) * topk];
        if (n <= topk) {  // dense: all causal positions in order, then -1
          for (int j = 0; j < topk; ++j) ASSERT_EQ(row[j], j < n ? j : -1) << "N=" << N << " topk=" << topk << " t=" << t << " j=" << j;
          ++rows_checked;
          continue;
        }
        std::vector<int> order(n);
        std::iota(order.begin(), order.end(), 0);
        const double* r = &ref[size_t(t) * N];
        std::sort(order.begin(), order.end(), [&](int a, int b) { return r[a] > r[b]; });
        double kth = r[order[topk - 1]], next = r[order[topk]];
        if (std::abs(kth - next) <= 1e-5 * std::max(std::abs(kth), std::abs(next))) {
          ++rows_tied;
          continue;
        }
        std::set<int> want(order.begin(), order.begin() + topk), got(row, row + topk);
        ASSERT_EQ(got.size(), size_t(topk)) << "duplicate positions, N=" << N << " t=" << t;
        ASSERT_TRUE(want == got) << "top-k set differs, N=" << N << " topk=" << topk << " t=" << t;
        ++rows_checked;
      }
      std::printf("  indexer N=%-5d T=%-2d topk=%-5d max|ref| %.3f max err %.2e; top-k rows checked %d, tied %d\n", N,
                  T, topk, max_ref, max_err, rows_checked, rows_tied);
    }
}

// Indexer -> top-k -> sparse attention on the device equals dense attention restricted to the
// CPU-chosen set (end-to-end wiring of the selection format).
TEST_F(CudaAttention, SelectionFeedsAttention) {
  const int N = 700, T = 4, H = 16, Hi = 32, Di = 128, topk = 64, pos0 = N - T;
  const double scale = 1.0 / std::sqrt(double(kNope + kRope));
  auto qi = randn(size_t(T) * Hi * Di), ki = randn(size_t(N) * Di), w = randn(size_t(T) * Hi);
  auto ql = randn(size_t(T) * H * kLatent, 1.5f), qp = randn(size_t(T) * H * kRope);
  auto lat = randn(size_t(N) * kLatent), kpe = randn(size_t(N) * kRope);
  DeviceBuffer<float> dqi(qi.size()), dki(ki.size()), dw(w.size()), dsc(size_t(T) * N);
  DeviceBuffer<float> dql(ql.size()), dqp(qp.size()), dlat(lat.size()), dkpe(kpe.size()), dout(size_t(T) * H * kLatent);
  DeviceBuffer<int> dsel(size_t(T) * topk);
  size_t ws_bytes = cuda::topk_per_row_workspace_bytes(T, N);
  DeviceBuffer<char> dws(ws_bytes);
  dqi.upload(qi);
  dki.upload(ki);
  dw.upload(w);
  dql.upload(ql);
  dqp.upload(qp);
  dlat.upload(lat);
  dkpe.upload(kpe);
  dout.poison();
  cuda::dsa_indexer_scores(dqi.p, dki.p, dw.p, T, Hi, Di, N, pos0, float(1.0 / std::sqrt(double(Hi))), dsc.p);
  cuda::topk_per_row(dsc.p, T, N, pos0, topk, dws.p, ws_bytes, dsel.p);
  cuda::mla_decode_attention(dql.p, dqp.p, dlat.p, dkpe.p, T, H, kLatent, kRope, pos0, dsel.p, topk, float(scale), dout.p);
  cuda::check(cudaDeviceSynchronize(), "sync");
  auto sel = dsel.download();
  auto out = dout.download();
  std::vector<double> ref;
  for (int t = 0; t < T; ++t) {
    std::vector<int> keys(sel.begin() + size_t(t) * topk, sel.begin() + size_t(t + 1) * topk);
    for (int s : keys) ASSERT_TRUE(s >= 0 && s <= pos0 + t);
    double max_ref = 0;
    std::vector<std::vector<double>> refs(H);
    for (int h = 0; h < H; ++h) {
      ref_attention(ql, qp, lat, kpe, t, h, H, keys, scale, refs[h]);
      for (double v : refs[h]) max_ref = std::max(max_ref, std::abs(v));
    }
    for (int h = 0; h < H; ++h)
      for (int i = 0; i < kLatent; ++i)
        ASSERT_NEAR(out[(size_t(t) * H + h) * kLatent + i], refs[h][i], 1e-4 * max_ref) << "t=" << t << " h=" << h << " i=" << i;
  }
}

// Rough timings (informational, no assertion): H = 64, kv_lora 512, N = 32768 cached positions.
TEST_F(CudaAttention, TimingInfo) {
  const int N = 32768, H = 64, Hi = 32, Di = 128, topk = 2048;
  auto fill = [&](DeviceBuffer<float>& b) { b.upload(randn(b.n)); };
  DeviceBuffer<float> dql(16 * H * kLatent), dqp(16 * H * kRope), dlat(size_t(N) * kLatent), dkpe(size_t(N) * kRope),
      dout(16 * H * kLatent), dqi(16 * Hi * Di), dki(size_t(N) * Di), dw(16 * Hi), dsc(16 * size_t(N));
  for (auto* b : {&dql, &dqp, &dlat, &dkpe, &dqi, &dki, &dw}) fill(*b);
  DeviceBuffer<int> dsel(16 * topk);
  size_t ws_bytes = cuda::topk_per_row_workspace_bytes(16, N);
  DeviceBuffer<char> dws(ws_bytes);
  cudaEvent_t e0, e1;
  cudaEventCreate(&e0);
  cudaEventCreate(&e1);
  auto time_us = [&](auto&& fn) {
    fn();
    cudaEventRecord(e0);
    const int reps = 20;
    for (int i = 0; i < reps; ++i) fn();
    cudaEventRecord(e1);
    cudaEventSynchronize(e1);
    float ms = 0;
    cudaEventElapsedTime(&ms, e0, e1);
    return 1000.0 * ms / reps;
  };
  for (int T : {1, 4, 16}) {
    const int pos0 = N - T;
    double idx = time_us([&] { cuda::dsa_indexer_scores(dqi.p, dki.p, dw.p, T, Hi, Di, N, pos0, 0.17f, dsc.p); });
    double tk = time_us([&] { cuda::topk_per_row(dsc.p, T, N, pos0, topk, dws.p, ws_bytes, dsel.p); });
    double sparse = time_us([&] {
      cuda::mla_decode_attention(dql.p, dqp.p, dlat.p, dkpe.p, T, H, kLatent, kRope, pos0, dsel.p, topk, 0.07f, dout.p);
    });
    double dense = time_us([&] {
      cuda::mla_decode_attention(dql.p, dqp.p, dlat.p, dkpe.p, T, H, kLatent, kRope, pos0, nullptr, 0, 0.07f, dout.p);
    });
    cuda::check(cudaDeviceSynchronize(), "sync");
    std::printf("  timing N=%d H=%d T=%-2d: indexer %.1f us, top-%d %.1f us, sparse attn %.1f us, dense attn %.1f us\n", N,
                H, T, idx, topk, tk, sparse, dense);
  }
  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
}

}  // namespace
}  // namespace bigmoe
