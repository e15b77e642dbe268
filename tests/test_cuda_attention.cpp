// cuda::mla_decode_attention, cuda::dsa_indexer_scores and cuda::topk_per_row against float64
// CPU references written here from spec §3 (steps 5–7) and §4, on fresh random inputs (ctest
// label gpu; runs on the GPU machine). Outputs are poisoned before each run so a kernel that
// skips elements cannot pass. Head dims: GLM-5.2's kv_lora 512 / rope 64 (the tuned kernel)
// and the smaller ones of the tiny test models (the generic kernel), decode and prefill T, and
// long key lists (32768 dense, top-2048 sparse) that the attention splits over many blocks. The
// paged cache: the same calls through a shuffled page table over a pool whose other rows are NaN
// give the contiguous cache's bits.
#include <gtest/gtest.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "backend/cuda/cuda_ops.h"
#include "cuda_test_util.h"
#include "util/error.h"

namespace bigmoe {
namespace {

using test::DeviceBuffer;

constexpr int kLatent = 512, kRope = 64, kNope = 128;  // GLM-5.2

class CudaAttention : public test::CudaTest {
 public:
};

// A page table for N positions in pages of P rows: ceil(N / P) distinct pages drawn at random
// from a pool of that + 3 pages.
std::vector<int> shuffled_pages(std::mt19937& rng, int N, int P) {
  const int entries = (N + P - 1) / P;
  std::vector<int> pages(size_t(entries + 3));
  std::iota(pages.begin(), pages.end(), 0);
  std::shuffle(pages.begin(), pages.end(), rng);
  pages.resize(size_t(entries));
  return pages;
}

// The rows [N, width] of a contiguous cache scattered into a pool of pages of P rows through the
// page table `pages` (from shuffled_pages), NaN everywhere else so that a read through a wrong
// row shows; the pool and the table on the device.
struct PagedCopy {
  DeviceBuffer<float> pool;
  DeviceBuffer<int> table;
  PagedCopy(const std::vector<float>& rows, int N, int width, int P, const std::vector<int>& pages)
      : pool((pages.size() + 3) * P * std::max(width, 1)), table(pages.size()) {
    std::vector<float> h(pool.n, std::numeric_limits<float>::quiet_NaN());
    for (int r = 0; r < N; ++r)
      std::copy_n(rows.begin() + size_t(r) * width, width,
                  h.begin() + (size_t(pages[size_t(r / P)]) * P + r % P) * width);
    pool.upload(h);
    table.upload(pages);
  }
};

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * 4) == 0;
}

double dot(const float* a, const float* b, int n) {
  double s = 0;
  for (int i = 0; i < n; ++i) s += double(a[i]) * b[i];
  return s;
}

// Spec §4: ō_h = Σ_{s in keys} softmax(scale · (q̃_h·c(s) + q_pe_h·k_pe(s))) c(s), head dims L / R;
// no key gives zeros.
void ref_attention(const std::vector<float>& ql, const std::vector<float>& qp, const std::vector<float>& lat,
                   const std::vector<float>& kpe, int L, int R, int t, int h, int H, const std::vector<int>& keys,
                   double scale, std::vector<double>& out) {
  const float* q = &ql[(size_t(t) * H + h) * L];
  const float* p = R > 0 ? &qp[(size_t(t) * H + h) * R] : nullptr;
  std::vector<double> sc(keys.size());
  double mx = -INFINITY;
  for (size_t j = 0; j < keys.size(); ++j) {
    int s = keys[j];
    sc[j] = scale * (dot(q, &lat[size_t(s) * L], L) + (R > 0 ? dot(p, &kpe[size_t(s) * R], R) : 0.0));
    mx = std::max(mx, sc[j]);
  }
  double den = 0;
  for (auto& v : sc) den += (v = std::exp(v - mx));
  out.assign(L, 0.0);
  for (size_t j = 0; j < keys.size(); ++j)
    for (int i = 0; i < L; ++i) out[i] += sc[j] * lat[size_t(keys[j]) * L + i];
  if (den > 0)
    for (auto& v : out) v /= den;
}

struct AttnCase {
  int L = kLatent, R = kRope;  // kv_lora, rope
  int N = 1, H = 4, T = 1, pos0 = 0;
  int topk = 0;            // 0: dense causal
  bool empty_row = false;  // sparse: one row is all -1 padding (zero output)
  bool prefix = false;     // sparse: the keys in the first slots, in order, then -1 (a causal
                           // selection as the engine builds it for dense attention in a graph)
};

// topk == 0: dense causal; else a random subset of min(topk, pos+1) causal positions per row,
// placed at random slots, -1 padding interleaved (prefix: positions 0.. in the first slots).
// page_rows > 0: the same call over a paged copy of the cache gives the same bits.
void run_attention_case(CudaAttention& f, std::mt19937& rng, const AttnCase& c, int page_rows = 0) {
  const int L = c.L, R = c.R, N = c.N, H = c.H, T = c.T, pos0 = c.pos0, topk = c.topk;
  ASSERT_LE(pos0 + T, N);
  const double scale = 1.0 / std::sqrt(double(kNope + R));
  auto ql = f.randn(size_t(T) * H * L, 1.5f), qp = f.randn(size_t(T) * H * R, 1.f);
  auto lat = f.randn(size_t(N) * L, 1.f), kpe = f.randn(size_t(N) * R, 1.f);
  std::vector<std::vector<int>> keys(T);
  std::vector<int> sel;
  if (topk > 0) sel.assign(size_t(T) * topk, -1);
  const int empty_t = c.empty_row ? int(rng() % T) : -1;
  for (int t = 0; t < T; ++t) {
    int p = pos0 + t;
    std::vector<int> all(p + 1);
    std::iota(all.begin(), all.end(), 0);
    if (topk == 0) {
      keys[t] = all;
      continue;
    }
    if (t == empty_t) continue;
    if (!c.prefix) std::shuffle(all.begin(), all.end(), rng);
    int m = std::min(topk, p + 1);
    keys[t].assign(all.begin(), all.begin() + m);
    std::vector<int> slots(topk);
    std::iota(slots.begin(), slots.end(), 0);
    if (!c.prefix) std::shuffle(slots.begin(), slots.end(), rng);
    for (int j = 0; j < m; ++j) sel[size_t(t) * topk + slots[j]] = keys[t][j];
  }
  const size_t n_out = size_t(T) * H * L, guard = 64;  // poisoned tail catches writes past out
  DeviceBuffer<float> dql(ql.size()), dqp(qp.size()), dlat(lat.size()), dkpe(kpe.size()), dout(n_out + guard);
  DeviceBuffer<int> dsel(sel.size());
  dql.upload(ql);
  if (R > 0) dqp.upload(qp);
  dlat.upload(lat);
  if (R > 0) dkpe.upload(kpe);
  if (topk > 0) dsel.upload(sel);
  dout.poison();
  cuda::mla_decode_attention(dql.p, dqp.p, dlat.p, dkpe.p, T, H, L, R, pos0, topk > 0 ? dsel.p : nullptr, topk,
                             float(scale), dout.p);
  cuda::check(cudaDeviceSynchronize(), "sync");
  auto out = dout.download();
  for (size_t i = n_out; i < out.size(); ++i) {
    uint32_t bits;
    std::memcpy(&bits, &out[i], 4);
    ASSERT_EQ(bits, 0xffffffffu) << "write past out at " << i - n_out << ", L=" << L << " R=" << R << " T=" << T;
  }
  if (page_rows > 0) {
    const std::vector<int> pages = shuffled_pages(rng, N, page_rows);  // one table for latent and k_pe
    PagedCopy plat(lat, N, L, page_rows, pages), pkpe(kpe, N, R, page_rows, pages);
    dout.poison();
    cuda::mla_decode_attention(dql.p, dqp.p, plat.pool.p, pkpe.pool.p, T, H, L, R, pos0, topk > 0 ? dsel.p : nullptr,
                               topk, float(scale), dout.p, nullptr, {plat.table.p, page_rows});
    cuda::check(cudaDeviceSynchronize(), "sync");
    ASSERT_TRUE(same_bits(dout.download(), out)) << "paged (" << page_rows << " rows per page) differs: L=" << L
                                                 << " R=" << R << " N=" << N << " H=" << H << " T=" << T
                                                 << " pos0=" << pos0 << " topk=" << topk;
  }
  std::vector<std::vector<double>> ref(size_t(T) * H);
  double max_ref = 0;
  for (int t = 0; t < T; ++t)
    for (int h = 0; h < H; ++h) {
      ref_attention(ql, qp, lat, kpe, L, R, t, h, H, keys[t], scale, ref[size_t(t) * H + h]);
      for (double v : ref[size_t(t) * H + h]) max_ref = std::max(max_ref, std::abs(v));
    }
  const double tol = 1e-4 * max_ref;
  double max_err = 0;
  for (int t = 0; t < T; ++t)
    for (int h = 0; h < H; ++h)
      for (int i = 0; i < L; ++i) {
        double g = out[(size_t(t) * H + h) * L + i], r = ref[size_t(t) * H + h][i];
        ASSERT_TRUE(std::isfinite(g)) << "L=" << L << " R=" << R << " N=" << N << " H=" << H << " T=" << T
                                      << " pos0=" << pos0 << " topk=" << topk << " t=" << t << " h=" << h << " i=" << i;
        max_err = std::max(max_err, std::abs(g - r));
        ASSERT_LE(std::abs(g - r), tol) << "L=" << L << " R=" << R << " N=" << N << " H=" << H << " T=" << T
                                        << " pos0=" << pos0 << " topk=" << topk << " t=" << t << " h=" << h
                                        << " i=" << i << " gpu " << g << " ref " << r;
      }
  std::printf("  attention L=%-3d R=%-2d N=%-5d H=%-3d T=%-3d pos0=%-5d topk=%-5d%s max|ref| %.3f max err %.2e (%.2e)%s\n",
              L, R, N, H, T, pos0, topk, empty_t >= 0 ? " (empty row)" : c.prefix ? " (prefix)" : "", max_ref, max_err,
              max_err / max_ref, page_rows > 0 ? (" paged: same bits, P=" + std::to_string(page_rows)).c_str() : "");
}

TEST_F(CudaAttention, MlaDecodeMatchesReference) {
  for (int N : {1, 17, 300, 2500})
    for (int H : {4, 64})
      for (int topk : {0, 16, 2048}) {
        int T = N == 1 ? 1 : 16;
        if (N == 17 && H == 4) T = 5;
        run_attention_case(*this, rng, {.N = N, .H = H, .T = T, .pos0 = N - T, .topk = topk});
        if (HasFatalFailure()) return;
      }
}

// Prefill-sized T (more query tokens than one decode step) at GLM-5.2's dims, pos0 > 0.
TEST_F(CudaAttention, MlaPrefillMatchesReference) {
  for (int topk : {0, 16, 64}) {
    run_attention_case(*this, rng, {.N = 140, .H = 20, .T = 37, .pos0 = 90, .topk = topk, .empty_row = topk == 16});
    if (HasFatalFailure()) return;
  }
}

// Head dims below GLM-5.2's (generic kernel): the tiny test models' kv_lora 32 / rope 8 and
// others, T = 1 (decode), 5 and 37 (prefill) at pos0 > 0, dense and sparse with -1 padding.
TEST_F(CudaAttention, MlaSmallDimsMatchReference) {
  struct Dims {
    int L, R, H;
  };
  for (Dims d : {Dims{32, 8, 4}, Dims{256, 32, 4}, Dims{64, 0, 3}, Dims{480, 56, 20}, Dims{512, 8, 17}, Dims{96, 64, 16}})
    for (int T : {1, 5, 37})
      for (int topk : {0, 16, 64}) {
        const int pos0 = T == 37 ? 11 : 40, N = pos0 + T + 7;  // cache longer than the causal prefix
        run_attention_case(*this, rng,
                           {.L = d.L, .R = d.R, .N = N, .H = d.H, .T = T, .pos0 = pos0, .topk = topk,
                            .empty_row = topk == 16 && T > 1});
        if (HasFatalFailure()) return;
      }
  // a longer cache than one key tile per row, tiny dims
  run_attention_case(*this, rng, {.L = 32, .R = 8, .N = 600, .H = 4, .T = 16, .pos0 = 584, .topk = 0});
}

// Long key lists, split over many blocks and merged: GLM-5.2 decode shapes (H = 64) over a 32768
// cache, dense and top-2048, T = 1 and a few MTP rows; a causal selection of width N whose keys
// come first (the engine's dense path under graphs); rows of different lengths and splits that
// get no key (short rows next to long ones, an all-padding row); the generic kernel.
TEST_F(CudaAttention, MlaLongKeysMatchReference) {
  const int N = 32768;
  run_attention_case(*this, rng, {.N = N, .H = 64, .T = 1, .pos0 = N - 1, .topk = 0});
  if (HasFatalFailure()) return;
  run_attention_case(*this, rng, {.N = N, .H = 64, .T = 1, .pos0 = N - 1, .topk = 2048});
  if (HasFatalFailure()) return;
  run_attention_case(*this, rng, {.N = N, .H = 64, .T = 4, .pos0 = N - 4, .topk = 2048, .empty_row = true});
  if (HasFatalFailure()) return;
  run_attention_case(*this, rng, {.N = N, .H = 64, .T = 2, .pos0 = 3000, .topk = N, .prefix = true});
  if (HasFatalFailure()) return;
  run_attention_case(*this, rng, {.N = 5000, .H = 20, .T = 3, .pos0 = 4100, .topk = 0});
  if (HasFatalFailure()) return;
  run_attention_case(*this, rng, {.N = 2100, .H = 64, .T = 16, .pos0 = 40, .topk = 2048});
  if (HasFatalFailure()) return;
  run_attention_case(*this, rng, {.N = 3000, .H = 64, .T = 2, .pos0 = 2990, .topk = 0});
  if (HasFatalFailure()) return;
  run_attention_case(*this, rng, {.L = 480, .R = 56, .N = 9000, .H = 17, .T = 2, .pos0 = 8990, .topk = 0});
  if (HasFatalFailure()) return;
  run_attention_case(*this, rng, {.L = 32, .R = 8, .N = 20000, .H = 4, .T = 1, .pos0 = 19999, .topk = 2048});
  if (HasFatalFailure()) return;
  run_attention_case(*this, rng, {.L = 96, .R = 0, .N = 12000, .H = 3, .T = 5, .pos0 = 11990, .topk = 0});
}

// The paged cache: pages of 64 rows (the engine's default), 16, and 1 and 7 (a key tile and a
// step's rows cross pages, page size no power of two), over the tuned and the generic kernel,
// dense and sparse, decode and prefill rows, and key lists long enough to split: the bits of the
// contiguous cache. Pool rows outside the table are NaN.
TEST_F(CudaAttention, MlaPagedMatchesContiguous) {
  for (int P : {64, 16, 7, 1}) {
    for (int topk : {0, 16, 2048}) {
      run_attention_case(*this, rng, {.N = 300, .H = 64, .T = 16, .pos0 = 284, .topk = topk}, P);
      if (HasFatalFailure()) return;
      run_attention_case(*this, rng, {.L = 32, .R = 8, .N = 90, .H = 4, .T = 5, .pos0 = 70, .topk = topk}, P);
      if (HasFatalFailure()) return;
    }
    run_attention_case(*this, rng, {.N = 140, .H = 20, .T = 37, .pos0 = 90, .topk = 16, .empty_row = true}, P);
    if (HasFatalFailure()) return;
    run_attention_case(*this, rng, {.N = 3000, .H = 64, .T = 2, .pos0 = 2990, .topk = 0}, P);
    if (HasFatalFailure()) return;
    run_attention_case(*this, rng, {.N = 2100, .H = 64, .T = 4, .pos0 = 2000, .topk = 2100, .prefix = true}, P);
    if (HasFatalFailure()) return;
    run_attention_case(*this, rng, {.L = 64, .R = 0, .N = 200, .H = 3, .T = 1, .pos0 = 150, .topk = 0}, P);
    if (HasFatalFailure()) return;
  }
}

TEST_F(CudaAttention, MlaRejectsBadArguments) {
  const int T = 2, H = 4, N = 8;
  DeviceBuffer<float> q(size_t(T) * H * 512 + 4), qp(size_t(T) * H * 64), lat(size_t(N) * 512 + 4), kpe(size_t(N) * 64),
      out(size_t(T) * H * 512);
  DeviceBuffer<int> sel(size_t(T) * 16);
  auto call = [&](int L, int R, int t = 2, int pos0 = 0, const int* s = nullptr, int topk = 0,
                  const float* latent = nullptr) {
    cuda::mla_decode_attention(q.p, qp.p, latent ? latent : lat.p, kpe.p, t, H, L, R, pos0, s, topk, 0.1f, out.p);
  };
  EXPECT_THROW(call(48, 8), Error);    // kv_lora not a multiple of 32
  EXPECT_THROW(call(544, 64), Error);  // kv_lora > 512
  EXPECT_THROW(call(0, 8), Error);
  EXPECT_THROW(call(-32, 8), Error);
  EXPECT_THROW(call(32, 12), Error);   // rope not a multiple of 8
  EXPECT_THROW(call(512, 72), Error);  // rope > 64
  EXPECT_THROW(call(32, -8), Error);
  EXPECT_THROW(call(32, 8, -1), Error);                // T < 0
  EXPECT_THROW(call(32, 8, T, -1), Error);             // pos0 < 0
  EXPECT_THROW(call(32, 8, T, 0, sel.p, 0), Error);    // selection without topk
  EXPECT_THROW(call(512, 64, T, 0, nullptr, 0, lat.p + 1), Error);  // latent not 16-byte aligned
  EXPECT_THROW(cuda::mla_decode_attention(q.p, qp.p, lat.p, kpe.p, T, H, 32, 8, 0, nullptr, 0, 0.1f, out.p, nullptr,
                                          {sel.p, 0}),
               Error);  // a page table with 0 rows per page
  cuda::check(cudaDeviceSynchronize(), "sync");
  EXPECT_NO_THROW(call(32, 8, 0));  // T = 0: nothing to do
}

// Spec §3 step 6: I(t, s) = Σ_h w_scale·w[t,h] · ReLU(qi[t,h]·ki(s) / sqrt(Di)), s <= pos; then
// top-k of each row's causal prefix. page_rows > 0: the scores over a paged copy of the keys
// have the same bits.
void run_indexer_case(CudaAttention& f, int Hi, int Di, int N, int T, int pos0, int topk, int page_rows = 0) {
  const double w_scale = 1.0 / std::sqrt(double(Hi)), dot_scale = 1.0 / std::sqrt(double(Di));
  auto qi = f.randn(size_t(T) * Hi * Di), ki = f.randn(size_t(N) * Di), w = f.randn(size_t(T) * Hi);
  DeviceBuffer<float> dqi(qi.size()), dki(ki.size()), dw(w.size()), dsc(size_t(T) * N);
  DeviceBuffer<int> dsel(size_t(T) * topk);
  size_t ws_bytes = cuda::topk_per_row_workspace_bytes(T, N);
  DeviceBuffer<char> dws(ws_bytes);
  dqi.upload(qi);
  dki.upload(ki);
  dw.upload(w);
  dsc.poison();
  cuda::check(cudaMemset(dsel.p, 0x7f, dsel.n * sizeof(int)), "memset");
  cuda::dsa_indexer_scores(dqi.p, dki.p, dw.p, T, Hi, Di, N, pos0, float(w_scale), dsc.p);
  cuda::topk_per_row(dsc.p, T, N, pos0, topk, dws.p, ws_bytes, dsel.p);
  cuda::check(cudaDeviceSynchronize(), "sync");
  auto sc = dsc.download();
  auto sel = dsel.download();
  if (page_rows > 0) {
    PagedCopy pki(ki, N, Di, page_rows, shuffled_pages(f.rng, N, page_rows));
    dsc.poison();
    cuda::dsa_indexer_scores(dqi.p, pki.pool.p, dw.p, T, Hi, Di, N, pos0, float(w_scale), dsc.p, nullptr,
                             {pki.table.p, page_rows});
    cuda::check(cudaDeviceSynchronize(), "sync");
    ASSERT_TRUE(same_bits(dsc.download(), sc)) << "paged (" << page_rows << " rows per page) differs: Hi=" << Hi
                                                << " Di=" << Di << " N=" << N << " T=" << T << " pos0=" << pos0;
  }

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
      ASSERT_LE(std::abs(g - r), 1e-4 * max_ref) << "Hi=" << Hi << " Di=" << Di << " N=" << N << " T=" << T
                                                 << " t=" << t << " s=" << s << " gpu " << g << " ref " << r;
    }

  int rows_checked = 0, rows_tied = 0;
  for (int t = 0; t < T; ++t) {
    const int n = pos0 + t + 1;
    const int* row = &sel[size_t(t) * topk];
    if (n <= topk) {  // dense: all causal positions in order, then -1
      for (int j = 0; j < topk; ++j)
        ASSERT_EQ(row[j], j < n ? j : -1) << "N=" << N << " T=" << T << " topk=" << topk << " t=" << t << " j=" << j;
      ++rows_checked;
      continue;
    }
    std::vector<int> order(n);
    std::iota(order.begin(), order.end(), 0);
    const double* r = &ref[size_t(t) * N];
    std::sort(order.begin(), order.end(), [&](int a, int b) { return r[a] > r[b]; });
    double kth = r[order[topk - 1]], next = r[order[topk]];
    if (std::abs(kth - next) <= 1e-5 * std::max(std::abs(kth), std::abs(next))) {
      ++rows_tied;  // ReLU zeros tie often at small Hi; the set is not unique
      for (int j = 0; j < topk; ++j) ASSERT_TRUE(row[j] >= 0 && row[j] < n) << "t=" << t << " j=" << j;
      continue;
    }
    std::set<int> want(order.begin(), order.begin() + topk), got(row, row + topk);
    ASSERT_EQ(got.size(), size_t(topk)) << "duplicate positions, N=" << N << " T=" << T << " t=" << t;
    ASSERT_TRUE(want == got) << "top-k set differs, N=" << N << " T=" << T << " topk=" << topk << " t=" << t;
    ++rows_checked;
  }
  std::printf("  indexer Hi=%-2d Di=%-3d N=%-5d T=%-4d pos0=%-5d topk=%-5d max|ref| %.3f max err %.2e; top-k rows "
              "checked %d, tied %d\n",
              Hi, Di, N, T, pos0, topk, max_ref, max_err, rows_checked, rows_tied);
}

TEST_F(CudaAttention, IndexerScoresAndTopkMatchReference) {
  for (int N : {1, 17, 300, 2500})
    for (int topk : {16, 2048}) {
      const int T = std::min(N, 16);
      run_indexer_case(*this, 32, 128, N, T, N - T, topk);
      if (HasFatalFailure()) return;
    }
}

// The tiny test models' indexer (Hi 8, Di 32, topk 16, cache up to 64), decode and prefill.
TEST_F(CudaAttention, IndexerSmallDimsMatchReference) {
  for (int N : {1, 9, 16, 17, 40, 64})
    for (int T : {1, 5, 37, 64}) {
      if (T > N) continue;
      for (int pos0 : {0, N - T}) {
        run_indexer_case(*this, 8, 32, N, T, pos0, 16);
        if (HasFatalFailure()) return;
      }
    }
}

// The keys through a shuffled page table: pages of 64 (a block's keys always in one page), 16,
// 5 and 1 (blocks across pages); decode and prefill rows; the tuned dims and the tiny models'.
TEST_F(CudaAttention, IndexerPagedMatchesContiguous) {
  for (int P : {64, 16, 5, 1})
    for (int N : {17, 300, 2500}) {
      const int T = std::min(N, 16);
      run_indexer_case(*this, 32, 128, N, T, N - T, 2048, P);
      if (HasFatalFailure()) return;
      run_indexer_case(*this, 8, 32, N, std::min(N, 37), 0, 16, P);
      if (HasFatalFailure()) return;
    }
}

// Prefill of up to 4096 query tokens in one call (rows past 16 and the workspace for T x N).
TEST_F(CudaAttention, IndexerPrefillMatchesReference) {
  run_indexer_case(*this, 8, 32, 4096, 4096, 0, 16);
  if (HasFatalFailure()) return;
  run_indexer_case(*this, 8, 32, 3000, 1000, 2000, 16);
  if (HasFatalFailure()) return;
  run_indexer_case(*this, 32, 128, 2600, 600, 2000, 2048);
}

// Indexer -> top-k -> sparse attention on the device equals dense attention restricted to the
// CPU-chosen set (end-to-end wiring of the selection format).
void run_selection_case(CudaAttention& f, int L, int R, int H, int Hi, int Di, int N, int T, int topk) {
  const int pos0 = N - T;
  const double scale = 1.0 / std::sqrt(double(kNope + R));
  auto qi = f.randn(size_t(T) * Hi * Di), ki = f.randn(size_t(N) * Di), w = f.randn(size_t(T) * Hi);
  auto ql = f.randn(size_t(T) * H * L, 1.5f), qp = f.randn(size_t(T) * H * R);
  auto lat = f.randn(size_t(N) * L), kpe = f.randn(size_t(N) * R);
  DeviceBuffer<float> dqi(qi.size()), dki(ki.size()), dw(w.size()), dsc(size_t(T) * N);
  DeviceBuffer<float> dql(ql.size()), dqp(qp.size()), dlat(lat.size()), dkpe(kpe.size()), dout(size_t(T) * H * L);
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
  cuda::mla_decode_attention(dql.p, dqp.p, dlat.p, dkpe.p, T, H, L, R, pos0, dsel.p, topk, float(scale), dout.p);
  cuda::check(cudaDeviceSynchronize(), "sync");
  auto sel = dsel.download();
  auto out = dout.download();
  for (int t = 0; t < T; ++t) {
    std::vector<int> keys;
    for (int j = 0; j < topk; ++j) {
      int s = sel[size_t(t) * topk + j];
      if (s < 0) continue;  // padding of a short causal prefix
      ASSERT_LE(s, pos0 + t) << "t=" << t << " j=" << j;
      keys.push_back(s);
    }
    ASSERT_EQ(keys.size(), size_t(std::min(topk, pos0 + t + 1))) << "t=" << t;
    double max_ref = 0;
    std::vector<std::vector<double>> refs(H);
    for (int h = 0; h < H; ++h) {
      ref_attention(ql, qp, lat, kpe, L, R, t, h, H, keys, scale, refs[h]);
      for (double v : refs[h]) max_ref = std::max(max_ref, std::abs(v));
    }
    for (int h = 0; h < H; ++h)
      for (int i = 0; i < L; ++i)
        ASSERT_NEAR(out[(size_t(t) * H + h) * L + i], refs[h][i], 1e-4 * max_ref)
            << "L=" << L << " R=" << R << " T=" << T << " t=" << t << " h=" << h << " i=" << i;
  }
}

TEST_F(CudaAttention, SelectionFeedsAttention) {
  run_selection_case(*this, kLatent, kRope, 16, 32, 128, 700, 4, 64);
  if (HasFatalFailure()) return;
  // tiny model dims, a whole prompt as prefill (pos0 0: the first rows are -1 padded)
  run_selection_case(*this, 32, 8, 4, 8, 32, 64, 64, 16);
  if (HasFatalFailure()) return;
  run_selection_case(*this, 32, 8, 4, 8, 32, 4096, 4096, 16);
}

// Rough timings (informational, no assertion): H = 64, kv_lora 512, N = 32768 cached positions.
// Attention: top-2048 sparse, dense causal, dense as a causal selection of width N (the engine's
// path under graphs) and a 4096-token context in the same width-N selection (most of it padding).
// TFLOP/s counts 2 H (2 kv_lora + rope) flops per (query, key). Paged: the same caches read as
// pages of 64 rows through a shuffled page table (what the engine runs).
TEST_F(CudaAttention, TimingInfo) {
  const int N = 32768, H = 64, Hi = 32, Di = 128, topk = 2048, kMaxT = 16, short_ctx = 4096;
  auto fill = [&](DeviceBuffer<float>& b) { b.upload(randn(b.n)); };
  DeviceBuffer<float> dql(kMaxT * H * kLatent), dqp(kMaxT * H * kRope), dlat(size_t(N) * kLatent),
      dkpe(size_t(N) * kRope), dout(kMaxT * H * kLatent), dqi(kMaxT * Hi * Di), dki(size_t(N) * Di), dw(kMaxT * Hi),
      dsc(kMaxT * size_t(N));
  for (auto* b : {&dql, &dqp, &dlat, &dkpe, &dqi, &dki, &dw}) fill(*b);
  DeviceBuffer<int> dsel(kMaxT * topk), dwide(kMaxT * size_t(N)), dshort(kMaxT * size_t(N));
  size_t ws_bytes = cuda::topk_per_row_workspace_bytes(kMaxT, N);
  DeviceBuffer<char> dws(ws_bytes);
  const int P = 64;
  std::vector<int> perm(N / P);
  std::iota(perm.begin(), perm.end(), 0);
  std::shuffle(perm.begin(), perm.end(), rng);
  DeviceBuffer<int> dpages(perm.size());
  dpages.upload(perm);
  const cuda::PageTable pt{dpages.p, P};
  cudaEvent_t e0, e1;
  cudaEventCreate(&e0);
  cudaEventCreate(&e1);
  auto time_us = [&](auto&& fn) {
    fn();  // warm-up (also grows the attention workspace)
    cudaEventRecord(e0);
    const int reps = 20;
    for (int i = 0; i < reps; ++i) fn();
    cudaEventRecord(e1);
    cudaEventSynchronize(e1);
    float ms = 0;
    cudaEventElapsedTime(&ms, e0, e1);
    return 1000.0 * ms / reps;
  };
  auto tflops = [&](int T, double keys_per_row, double us) {
    return 2.0 * T * H * keys_per_row * (2 * kLatent + kRope) / (us * 1e6);
  };
  for (int T : {1, 2, 4, 16}) {
    const int pos0 = N - T, spos0 = short_ctx - T;
    {  // causal selections of width N: rows 0..pos0+t (wide) and 0..spos0+t (short), then -1
      std::vector<int> wide(size_t(kMaxT) * N, -1), shrt(size_t(kMaxT) * N, -1);
      for (int t = 0; t < T; ++t) {
        for (int s = 0; s <= pos0 + t; ++s) wide[size_t(t) * N + s] = s;
        for (int s = 0; s <= spos0 + t; ++s) shrt[size_t(t) * N + s] = s;
      }
      dwide.upload(wide);
      dshort.upload(shrt);
    }
    double idx = time_us([&] { cuda::dsa_indexer_scores(dqi.p, dki.p, dw.p, T, Hi, Di, N, pos0, 0.17f, dsc.p); });
    double tk = time_us([&] { cuda::topk_per_row(dsc.p, T, N, pos0, topk, dws.p, ws_bytes, dsel.p); });
    double sparse = time_us([&] {
      cuda::mla_decode_attention(dql.p, dqp.p, dlat.p, dkpe.p, T, H, kLatent, kRope, pos0, dsel.p, topk, 0.07f, dout.p);
    });
    double dense = time_us([&] {
      cuda::mla_decode_attention(dql.p, dqp.p, dlat.p, dkpe.p, T, H, kLatent, kRope, pos0, nullptr, 0, 0.07f, dout.p);
    });
    double wide = time_us([&] {
      cuda::mla_decode_attention(dql.p, dqp.p, dlat.p, dkpe.p, T, H, kLatent, kRope, pos0, dwide.p, N, 0.07f, dout.p);
    });
    double shrt = time_us([&] {
      cuda::mla_decode_attention(dql.p, dqp.p, dlat.p, dkpe.p, T, H, kLatent, kRope, spos0, dshort.p, N, 0.07f,
                                 dout.p);
    });
    // the generic kernel at the same dims (kv_lora 480 / rope 64): what the tuned instantiation saves
    double generic = time_us([&] {
      cuda::mla_decode_attention(dql.p, dqp.p, dlat.p, dkpe.p, T, H, 480, kRope, pos0, dsel.p, topk, 0.07f, dout.p);
    });
    double idx_paged = time_us(
        [&] { cuda::dsa_indexer_scores(dqi.p, dki.p, dw.p, T, Hi, Di, N, pos0, 0.17f, dsc.p, nullptr, pt); });
    double sparse_paged = time_us([&] {
      cuda::mla_decode_attention(dql.p, dqp.p, dlat.p, dkpe.p, T, H, kLatent, kRope, pos0, dsel.p, topk, 0.07f, dout.p,
                                 nullptr, pt);
    });
    double dense_paged = time_us([&] {
      cuda::mla_decode_attention(dql.p, dqp.p, dlat.p, dkpe.p, T, H, kLatent, kRope, pos0, nullptr, 0, 0.07f, dout.p,
                                 nullptr, pt);
    });
    cuda::check(cudaDeviceSynchronize(), "sync");
    std::printf("  timing N=%d H=%d T=%-2d: indexer %.1f us, top-%d %.1f us\n", N, H, T, idx, topk, tk);
    std::printf("    paged (%d-row pages): indexer %.1f us, sparse top-%d %.1f us, dense %.1f us\n", P, idx_paged, topk,
                sparse_paged, dense_paged);
    std::printf("    attention: sparse top-%d %.1f us (%.1f TFLOP/s; generic 480/64 %.1f us), dense %.1f us (%.1f "
                "TFLOP/s), dense as width-N selection %.1f us, %d-token context in a width-N selection %.1f us\n",
                topk, sparse, tflops(T, topk, sparse), generic, dense, tflops(T, N - T / 2.0, dense), wide, short_ctx,
                shrt);
  }
  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
}

}  // namespace
}  // namespace bigmoe
