// Device-position ops of the graph-captured decode step (backend/cuda/decode_ops.h) against
// host loops on fresh random inputs, the position read from device memory.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
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
  for (int pos : {0, 5, N - T}) {
    auto cache = randn(size_t(N) * stride), src = randn(size_t(T) * src_stride);
    DeviceBuffer<float> dc(cache.size()), ds(src.size());
    DeviceBuffer<int> dp(1);
    dc.upload(cache);
    ds.upload(src);
    dp.upload({pos});
    cuda::append_rows(dc.p, stride, dp.p, ds.p, src_stride, T, n);
    auto got = dc.download();
    for (int t = 0; t < T; ++t)
      for (int j = 0; j < n; ++j) cache[size_t(pos + t) * stride + j] = src[size_t(t) * src_stride + j];
    EXPECT_EQ(got, cache) << "pos " << pos;
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
  EXPECT_THROW(cuda::append_rows(a.p, 4, p.p, a.p, 4, -1, 4), Error);
  EXPECT_THROW(cuda::append_rows(a.p, 2, p.p, a.p, 4, 1, 4), Error);  // stride < n
  EXPECT_THROW(cuda::causal_selection(p.p, -1, 4, p.p), Error);
  DeviceBuffer<int> o(16);
  EXPECT_THROW(cuda::topk_select(a.p, 1, 16, 0, 0, o.p), Error);   // k 0
  EXPECT_THROW(cuda::topk_select(a.p, 2, 16, 15, 4, o.p), Error);  // row 1 at position 16 >= N
}

}  // namespace
}  // namespace bigmoe
