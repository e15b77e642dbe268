// Device-position ops of the graph-captured decode step (backend/cuda/decode_ops.h) against
// host loops on fresh random inputs, the position read from device memory.
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

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

TEST_F(CudaDecodeOps, MasksFutureScoresAndSelections) {
  const int T = 4, ncap = 64, k = 16, pos = 37;
  auto sc = randn(size_t(T) * ncap);
  std::vector<int> sel(size_t(T) * k);
  std::uniform_int_distribution<int> pick(0, ncap - 1);
  for (auto& s : sel) s = pick(rng);
  DeviceBuffer<float> ds(sc.size());
  DeviceBuffer<int> dsel(sel.size()), dp(1), dc(size_t(T) * ncap);
  ds.upload(sc);
  dsel.upload(sel);
  dp.upload({pos});
  dc.poison();
  cuda::mask_future_scores(ds.p, T, ncap, dp.p);
  cuda::mask_future_selection(dsel.p, T, k, dp.p);
  cuda::causal_selection(dc.p, T, ncap, dp.p);
  auto gs = ds.download();
  auto gsel = dsel.download(), gc = dc.download();
  for (int t = 0; t < T; ++t) {
    for (int s = 0; s < ncap; ++s) {
      const size_t i = size_t(t) * ncap + s;
      if (s > pos + t) EXPECT_TRUE(std::isinf(gs[i]) && gs[i] < 0) << t << "," << s;
      else EXPECT_EQ(gs[i], sc[i]);
      EXPECT_EQ(gc[i], s <= pos + t ? s : -1);
    }
    for (int j = 0; j < k; ++j) {
      const size_t i = size_t(t) * k + j;
      EXPECT_EQ(gsel[i], sel[i] > pos + t ? -1 : sel[i]);
    }
  }
}

TEST_F(CudaDecodeOps, RejectsBadShapes) {
  DeviceBuffer<float> a(16);
  DeviceBuffer<int> p(1);
  EXPECT_THROW(cuda::append_rows(a.p, 4, p.p, a.p, 4, -1, 4), Error);
  EXPECT_THROW(cuda::append_rows(a.p, 2, p.p, a.p, 4, 1, 4), Error);  // stride < n
  EXPECT_THROW(cuda::mask_future_scores(a.p, -1, 4, p.p), Error);
}

}  // namespace
}  // namespace bigmoe
