// RMSNorm: one block per row; the sum of squares is reduced with CUB's block reduction.
#include <cub/block/block_reduce.cuh>
#include <cuda_runtime.h>

#include "backend/cuda/cuda_ops.h"

namespace bigmoe::cuda {

namespace {

constexpr int kThreads = 256;

__global__ void rms_norm_kernel(const float* __restrict__ x, const float* __restrict__ w, int n, float eps,
                                float* __restrict__ y) {
  using Reduce = cub::BlockReduce<float, kThreads>;
  __shared__ typename Reduce::TempStorage tmp;
  __shared__ float inv;
  const float* xr = x + size_t(blockIdx.x) * n;
  float* yr = y + size_t(blockIdx.x) * n;
  float ss = 0.f;
  for (int i = threadIdx.x; i < n; i += kThreads) ss += xr[i] * xr[i];
  float total = Reduce(tmp).Sum(ss);
  if (threadIdx.x == 0) inv = rsqrtf(total / n + eps);
  __syncthreads();
  for (int i = threadIdx.x; i < n; i += kThreads) yr[i] = w[i] * (xr[i] * inv);
}

}  // namespace

void rms_norm(const float* x, const float* w, int rows, int n, float eps, float* y) {
  if (rows == 0) return;
  rms_norm_kernel<<<rows, kThreads>>>(x, w, n, eps, y);
  check(cudaGetLastError(), "rms_norm kernel launch");
}

}  // namespace bigmoe::cuda
