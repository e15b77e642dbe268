// CUDA ops against the CPU reference on fresh random inputs (ctest label gpu; runs on the
// GPU machine). Outputs are poisoned with NaN before each run so a kernel that skips
// elements cannot pass.
#include <gtest/gtest.h>
#include <cuda_runtime.h>

#include <cmath>
#include <random>
#include <vector>

#include "backend/cpu/ref_ops.h"
#include "backend/cuda/cuda_ops.h"
#include "cuda_test_util.h"

namespace bigmoe {
namespace {

using test::DeviceBuffer;

class CudaOps : public test::CudaTest {
 protected:
};

TEST_F(CudaOps, RmsNormMatchesReference) {
  for (int n : {1, 64, 576, 6144, 7168}) {
    const int rows = 7;
    auto x = randn(size_t(rows) * n, 3.f), w = randn(n);
    DeviceBuffer<float> dx(x.size()), dw(w.size()), dy(x.size());
    dx.upload(x);
    dw.upload(w);
    dy.poison();
    cuda::rms_norm(dx.p, dw.p, rows, n, 1e-5f, dy.p);
    auto y = dy.download();
    std::vector<float> ref(n);
    for (int r = 0; r < rows; ++r) {
      cpu::rms_norm(&x[size_t(r) * n], w.data(), n, 1e-5, ref.data());
      for (int i = 0; i < n; ++i)
        ASSERT_NEAR(y[size_t(r) * n + i], ref[i], 1e-5f * (1.f + std::abs(ref[i]))) << "n=" << n << " row " << r << " i " << i;
    }
  }
}

}  // namespace
}  // namespace bigmoe
