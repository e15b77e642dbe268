// RMSNorm: one block per row (rows may be strided); the sum of squares is reduced with CUB's
// block reduction, then every thread scales its own elements (so y may alias x).
#include <cub/block/block_reduce.cuh>
#include <cuda_runtime.h>

#include "backend/cuda/cuda_ops.h"
#include "util/error.h"

namespace bigmoe::cuda {

namespace {

constexpr int kThreads = 256;

__global__ void rms_norm_kernel(const float* x, size_t x_stride, const float* __restrict__ w, int n, float eps,
                                float* y, size_t y_stride) {
  using Reduce = cub::BlockReduce<float, kThreads>;
  __shared__ typename Reduce::TempStorage tmp;
  __shared__ float inv;
  const float* xr = x + blockIdx.x * x_stride;
  float* yr = y + blockIdx.x * y_stride;
  float ss = 0.f;
  for (int i = threadIdx.x; i < n; i += kThreads) ss += xr[i] * xr[i];
  float total = Reduce(tmp).Sum(ss);
  if (threadIdx.x == 0) inv = rsqrtf(total / n + eps);
  __syncthreads();
  for (int i = threadIdx.x; i < n; i += kThreads) yr[i] = w[i] * (xr[i] * inv);
}

}  // namespace

void rms_norm_strided(const float* x, int x_stride, const float* w, int rows, int n, float eps, float* y,
                      int y_stride, CUstream_st* stream) {
  BIGMOE_CHECK(rows >= 0 && n >= 1, "rms_norm: bad shape rows={} n={}", rows, n);
  BIGMOE_CHECK(x_stride >= n && y_stride >= n, "rms_norm: strides {} / {} shorter than a row of {}", x_stride,
               y_stride, n);
  if (rows == 0) return;
  BIGMOE_CHECK(x && w && y, "rms_norm: null pointer");
  rms_norm_kernel<<<rows, kThreads, 0, stream>>>(x, size_t(x_stride), w, n, eps, y, size_t(y_stride));
  check(cudaGetLastError(), "rms_norm kernel launch");
}

void rms_norm(const float* x, const float* w, int rows, int n, float eps, float* y, CUstream_st* stream) {
  rms_norm_strided(x, n, w, rows, n, eps, y, n, stream);
}

}  // namespace bigmoe::cuda
