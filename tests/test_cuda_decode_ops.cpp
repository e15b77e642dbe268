// Device-position ops of the graph-captured decode step (backend/cuda/decode_ops.h) against
// host loops on fresh random inputs, the position read from device memory; the cache writers on
// a paged pool (shuffled page table) against the same writes into a contiguous cache.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "backend/cpu/ref_ops.h"
#include "backend/cuda/decode_ops.h"
#include "cuda_test_util.h"
#include "util/error.h"

namespace bigmoe {
namespace {

using test::DeviceBuffer;

class CudaDecodeOps : public test::CudaTest {};

TEST_F(CudaDecodeOps, AppendRowsWritesAtDevicePosition) {
  const int N = 40, n = 24, stride = 32, T = 3, src_stride = 29;
  for (int pos : {0, 5, N - T})
    for (bool dev : {true, false}) {
      auto cache = randn(size_t(N) * stride), src = randn(size_t(T) * src_stride);
      DeviceBuffer<float> dc(cache.size()), ds(src.size());
      DeviceBuffer<int> dp(1);
      dc.upload(cache);
      ds.upload(src);
      dp.upload({dev ? pos : 1000});
      cuda::append_rows(dc.p, stride, dev ? 0 : pos, dev ? dp.p : nullptr, ds.p, src_stride, T, n);
      auto got = dc.download();
      for (int t = 0; t < T; ++t)
        for (int j = 0; j < n; ++j) cache[size_t(pos + t) * stride + j] = src[size_t(t) * src_stride + j];
      EXPECT_EQ(got, cache) << "pos " << pos << (dev ? " (device)" : " (host)");
    }
}

// A paged pool of n_pages pages of P rows of `width` floats, poisoned, and a page table of
// `entries` distinct pages drawn at random (so consecutive positions land in scattered pages).
struct PagedPool {
  int P, width;
  std::vector<int> table;
  DeviceBuffer<float> pool;
  DeviceBuffer<int> dtable;
  PagedPool(std::mt19937& rng, int P_, int width_, int entries, int n_pages)
      : P(P_), width(width_), pool(size_t(n_pages) * P_ * width_), dtable(size_t(entries)) {
    std::vector<int> all(static_cast<size_t>(n_pages));
    std::iota(all.begin(), all.end(), 0);
    std::shuffle(all.begin(), all.end(), rng);
    table.assign(all.begin(), all.begin() + entries);
    dtable.upload(table);
    pool.poison();
  }
  // A pool of rows of `width_` under the same table as `like` (latent and k_pe share one).
  PagedPool(const PagedPool& like, int width_, int n_pages)
      : P(like.P), width(width_), table(like.table), pool(size_t(n_pages) * like.P * width_), dtable(table.size()) {
    dtable.upload(table);
    pool.poison();
  }
  cuda::PageTable pages() const { return {dtable.p, P}; }
  // The pool seen as the contiguous cache [entries * P, width], and whether every row outside
  // the table's pages is still poisoned.
  std::vector<float> gather(bool* rest_poisoned) const {
    const auto h = pool.download();
    std::vector<float> out(table.size() * P * width);
    std::vector<bool> mapped(h.size() / (size_t(P) * width), false);
    for (size_t e = 0; e < table.size(); ++e) {
      mapped[size_t(table[e])] = true;
      std::copy_n(h.begin() + size_t(table[e]) * P * width, size_t(P) * width, out.begin() + e * P * width);
    }
    *rest_poisoned = true;
    for (size_t pg = 0; pg < mapped.size(); ++pg)
      for (size_t i = 0; !mapped[pg] && i < size_t(P) * width; ++i) {
        uint32_t bits;
        std::memcpy(&bits, &h[pg * P * width + i], 4);
        *rest_poisoned &= bits == 0xffffffffu;
      }
    return out;
  }
};

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * 4) == 0;
}

// The three cache writers through a shuffled page table (pages of 4 and 7 rows, so one step's
// rows cross pages) write the bytes they write into a contiguous cache, at host and device
// positions, and nothing outside the table's pages.
TEST_F(CudaDecodeOps, PagedWritersMatchContiguous) {
  const int N = 48, T = 9, kvr = 32, dim = 8, stride = kvr + dim + 3, n = 40, idim = 16;
  auto kv = randn(size_t(T) * stride), nw = randn(kvr), k = randn(size_t(T) * n), lw = randn(n), lb = randn(n);
  std::vector<float> inv_freq(dim / 2), iinv(idim / 2);
  for (int j = 0; j < dim / 2; ++j) inv_freq[size_t(j)] = std::pow(10000.f, -2.f * j / dim);
  for (int j = 0; j < idim / 2; ++j) iinv[size_t(j)] = std::pow(10000.f, -2.f * j / idim);
  DeviceBuffer<float> dkv(kv.size()), dnw(nw.size()), dk(k.size()), dlw(n), dlb(n), dif(inv_freq.size()), diif(iinv.size());
  dkv.upload(kv);
  dnw.upload(nw);
  dk.upload(k);
  dlw.upload(lw);
  dlb.upload(lb);
  dif.upload(inv_freq);
  diif.upload(iinv);
  for (int P : {4, 7})
    for (int pos : {0, 3, N - T})
      for (bool dev : {false, true}) {
        const int entries = (N + P - 1) / P, n_pages = entries + 5;
        DeviceBuffer<int> dp(1);
        dp.upload({pos});
        const int pos0 = dev ? 0 : pos;
        const int* pd = dev ? dp.p : nullptr;
        DeviceBuffer<float> lat(size_t(entries) * P * kvr), kpe(size_t(entries) * P * dim),
            idx(size_t(entries) * P * n), app(size_t(entries) * P * kvr);
        for (auto* b : {&lat, &kpe, &idx, &app}) b->poison();
        PagedPool plat(rng, P, kvr, entries, n_pages), pkpe(plat, dim, n_pages), pidx(rng, P, n, entries, n_pages),
            papp(rng, P, kvr, entries, n_pages);
        cuda::kv_to_cache(dkv.p, stride, T, kvr, dnw.p, 1e-6f, dim, dif.p, 1.f, true, lat.p, kpe.p, pos0, pd);
        cuda::index_key_to_cache(dk.p, T, n, dlw.p, dlb.p, 1e-6f, idim, diif.p, 1.f, false, idx.p, pos0, pd);
        cuda::append_rows(app.p, kvr, pos0, pd, dkv.p, stride, T, kvr);
        cuda::kv_to_cache(dkv.p, stride, T, kvr, dnw.p, 1e-6f, dim, dif.p, 1.f, true, plat.pool.p, pkpe.pool.p, pos0,
                          pd, nullptr, plat.pages());
        cuda::index_key_to_cache(dk.p, T, n, dlw.p, dlb.p, 1e-6f, idim, diif.p, 1.f, false, pidx.pool.p, pos0, pd,
                                 nullptr, pidx.pages());
        cuda::append_rows(papp.pool.p, kvr, pos0, pd, dkv.p, stride, T, kvr, nullptr, papp.pages());
        cuda::check(cudaDeviceSynchronize(), "sync");
        const std::string at = "P " + std::to_string(P) + " pos " + std::to_string(pos) + (dev ? " (device)" : " (host)");
        bool rest = false;
        EXPECT_TRUE(same_bits(plat.gather(&rest), lat.download())) << "latent, " << at;
        EXPECT_TRUE(rest) << "latent written outside its pages, " << at;
        EXPECT_TRUE(same_bits(pkpe.gather(&rest), kpe.download())) << "k_pe, " << at;
        EXPECT_TRUE(rest) << "k_pe written outside its pages, " << at;
        EXPECT_TRUE(same_bits(pidx.gather(&rest), idx.download())) << "indexer key, " << at;
        EXPECT_TRUE(rest) << "indexer key written outside its pages, " << at;
        EXPECT_TRUE(same_bits(papp.gather(&rest), app.download())) << "append_rows, " << at;
        EXPECT_TRUE(rest) << "append_rows written outside its pages, " << at;
      }
}

TEST_F(CudaDecodeOps, CausalSelectionAtDevicePosition) {
  const int T = 4, ncap = 64, pos = 37;
  DeviceBuffer<int> dp(1), dc(size_t(T) * ncap);
  dp.upload({pos});
  dc.poison();
  cuda::causal_selection(dc.p, T, ncap, dp.p);
  auto gc = dc.download();
  for (int t = 0; t < T; ++t)
    for (int s = 0; s < ncap; ++s) EXPECT_EQ(gc[size_t(t) * ncap + s], s <= pos + t ? s : -1);
}

// topk_select against cpu::topk (the reference's choice: ties to the lower position), as sets in
// ascending order, on fresh random rows: continuous scores, heavy ties (few distinct values,
// negative and zero), rows shorter than k, the position on the host and on the device.
TEST_F(CudaDecodeOps, TopkSelectMatchesCpuTopk) {
  struct Case {
    int T, N, pos0, k, levels;  // levels 0: continuous normal scores
  };
  for (const Case& c : {Case{1, 1024, 1023, 16, 0}, Case{5, 64, 59, 16, 0}, Case{37, 300, 263, 32, 7},
                        Case{3, 40000, 39997, 2048, 0}, Case{4, 4096, 4092, 2048, 3}, Case{9, 20, 11, 16, 2},
                        Case{16, 2048, 100, 2048, 0}, Case{2, 5000, 4998, 1, 5}}) {
    std::vector<float> sc = randn(size_t(c.T) * c.N);
    if (c.levels) {
      std::uniform_int_distribution<int> lv(-c.levels / 2, c.levels / 2);
      for (auto& v : sc) v = float(lv(rng)) * 0.5f;
    }
    for (bool dev : {false, true}) {
      DeviceBuffer<float> ds(sc.size());
      DeviceBuffer<int> dout(size_t(c.T) * c.k), dp(1);
      ds.upload(sc);
      dp.upload({c.pos0});
      dout.poison();
      cuda::topk_select(ds.p, c.T, c.N, dev ? 0 : c.pos0, c.k, dout.p, nullptr, dev ? dp.p : nullptr);
      auto got = dout.download();
      for (int t = 0; t < c.T; ++t) {
        const int n = std::min(c.pos0 + t + 1, c.N);
        std::vector<int> want;
        if (n <= c.k) {
          for (int i = 0; i < c.k; ++i) want.push_back(i < n ? i : -1);
        } else {
          want = cpu::topk(&sc[size_t(t) * c.N], n, c.k);
          std::sort(want.begin(), want.end());
        }
        std::vector<int> row(got.begin() + size_t(t) * c.k, got.begin() + size_t(t + 1) * c.k);
        ASSERT_EQ(row, want) << "T " << c.T << " N " << c.N << " k " << c.k << " row " << t << (dev ? " (device pos)" : "");
      }
    }
  }
}

TEST_F(CudaDecodeOps, RejectsBadShapes) {
  DeviceBuffer<float> a(16);
  DeviceBuffer<int> p(1);
  EXPECT_THROW(cuda::append_rows(a.p, 4, 0, p.p, a.p, 4, -1, 4), Error);
  EXPECT_THROW(cuda::append_rows(a.p, 2, 0, p.p, a.p, 4, 1, 4), Error);  // stride < n
  EXPECT_THROW(cuda::append_rows(a.p, 4, 0, p.p, a.p, 4, 1, 4, nullptr, {p.p, 0}), Error);  // 0 rows per page
  EXPECT_THROW(cuda::causal_selection(p.p, -1, 4, p.p), Error);
  DeviceBuffer<int> o(16);
  EXPECT_THROW(cuda::topk_select(a.p, 1, 16, 0, 0, o.p), Error);   // k 0
  EXPECT_THROW(cuda::topk_select(a.p, 2, 16, 15, 4, o.p), Error);  // row 1 at position 16 >= N
}

}  // namespace
}  // namespace bigmoe
