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

namespace bigmoe {
namespace {

template <typename T>
struct DeviceBuffer {
  T* p = nullptr;
  size_t n = 0;
  explicit DeviceBuffer(size_t n_) : n(n_) { cuda::check(cudaMalloc(&p, n * sizeof(T)), "cudaMalloc"); }
  ~DeviceBuffer() { cudaFree(p); }
  void upload(const std::vector<T>& v) { cuda::check(cudaMemcpy(p, v.data(), n * sizeof(T), cudaMemcpyHostToDevice), "upload"); }
  std::vector<T> download() const {
    std::vector<T> v(n);
    cuda::check(cudaMemcpy(v.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost), "download");
    return v;
  }
  void poison() { cuda::check(cudaMemset(p, 0xff, n * sizeof(T)), "memset"); }  // NaN for float
};

class CudaOps : public ::testing::Test {
 protected:
  void SetUp() override {
    if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  }
  std::mt19937 rng{std::random_device{}()};
  std::vector<float> randn(size_t n, float scale = 1.f) {
    std::normal_distribution<float> d(0.f, scale);
    std::vector<float> v(n);
    for (auto& x : v) x = d(rng);
    return v;
  }
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
