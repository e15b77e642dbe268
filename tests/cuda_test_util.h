// Shared by the GPU tests: a device buffer that checks every CUDA call, and a fixture that
// skips without a device and draws fresh random inputs.
#pragma once
#include <gtest/gtest.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <random>
#include <vector>

#include "backend/cuda/cuda_ops.h"

namespace bigmoe::test {

template <typename T>
struct DeviceBuffer {
  T* p = nullptr;
  size_t n = 0;
  explicit DeviceBuffer(size_t n_) : n(n_) { cuda::check(cudaMalloc(&p, std::max<size_t>(n, 1) * sizeof(T)), "cudaMalloc"); }
  ~DeviceBuffer() { cudaFree(p); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  void upload(const std::vector<T>& v) { cuda::check(cudaMemcpy(p, v.data(), n * sizeof(T), cudaMemcpyHostToDevice), "upload"); }
  std::vector<T> download() const {
    std::vector<T> v(n);
    cuda::check(cudaMemcpy(v.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost), "download");
    return v;
  }
  void poison() { cuda::check(cudaMemset(p, 0xff, n * sizeof(T)), "memset"); }  // NaN for float, -1 for int
};

class CudaTest : public ::testing::Test {
 public:
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

}  // namespace bigmoe::test
