#include <cuda_runtime.h>

#include "backend/cuda/cuda_ops.h"
#include "util/error.h"

namespace bigmoe::cuda {

void check(int err, const char* what) {
  if (err != cudaSuccess) fail("CUDA: {} failed: {}", what, cudaGetErrorString(cudaError_t(err)));
}

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) return 0;
  return n;
}

std::string device_name(int device) {
  cudaDeviceProp p{};
  check(cudaGetDeviceProperties(&p, device), "cudaGetDeviceProperties");
  return p.name;
}

}  // namespace bigmoe::cuda
