// CUDA backend ops. Each op has a CPU reference in backend/cpu/ref_ops.h and a test that
// compares the two on fresh random inputs (tests/test_cuda_ops.cpp, ctest label gpu).
#pragma once
#include <cstddef>
#include <string>

namespace bigmoe::cuda {

// Throws bigmoe::Error naming the CUDA call and the error when a CUDA API call fails.
void check(int err, const char* what);

int device_count();
std::string device_name(int device);

// y[r, :] = w ⊙ x[r, :] / sqrt(mean(x[r, :]²) + eps) for r < rows (device pointers, float32).
void rms_norm(const float* x, const float* w, int rows, int n, float eps, float* y);

}  // namespace bigmoe::cuda
