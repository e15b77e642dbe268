// RMSNorm: one block per row (rows may be strided); the sum of squares is reduced with CUB's
// block reduction, then every thread scales its own elements (so y may alias x: each thread
// reads the elements it writes, and all reads of the sum pass precede the barrier).
#include <cub/block/block_reduce.cuh>
#include <cuda_runtime.h>

#include <cstdint>

#include "backend/cuda/cuda_ops.h"
#include "backend/cuda/pdl.h"
#include "util/error.h"

namespace bigmoe::cuda {

namespace {

constexpr int kThreads = 256;

// VEC: n % 4 == 0 and 16-byte aligned rows and weight, read as float4. The loops are unrolled so
// that each thread's loads are in flight together (a 6144-wide row: 6 float4 per thread); a
// rolled loop waits on each load in turn.
template <bool VEC>
__global__ void rms_norm_kernel(const float* x, size_t x_stride, const float* __restrict__ w, int n, float eps,
                                float* y, size_t y_stride) {
  pdl_wait();  // launched with PDL: nothing is read or written before the kernel ahead finishes
  pdl_trigger();  // then the next kernel may start (after the wait: one kernel ahead at most)
  using Reduce = cub::BlockReduce<float, kThreads>;
  __shared__ typename Reduce::TempStorage tmp;
  __shared__ float inv;
  const float* xr = x + blockIdx.x * x_stride;
  float* yr = y + blockIdx.x * y_stride;
  float ss = 0.f;
  if constexpr (VEC) {
    const float4* x4 = reinterpret_cast<const float4*>(xr);
#pragma unroll 8
    for (int i = threadIdx.x; i < n / 4; i += kThreads) {
      const float4 v = x4[i];
      ss += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
    }
  } else {
#pragma unroll 8
    for (int i = threadIdx.x; i < n; i += kThreads) ss += xr[i] * xr[i];
  }
  float total = Reduce(tmp).Sum(ss);
  if (threadIdx.x == 0) inv = rsqrtf(total / n + eps);
  __syncthreads();
  const float r = inv;
  if constexpr (VEC) {
    const float4* x4 = reinterpret_cast<const float4*>(xr);
    const float4* w4 = reinterpret_cast<const float4*>(w);
    float4* y4 = reinterpret_cast<float4*>(yr);
#pragma unroll 8
    for (int i = threadIdx.x; i < n / 4; i += kThreads) {
      const float4 v = x4[i], g = w4[i];
      y4[i] = make_float4(g.x * (v.x * r), g.y * (v.y * r), g.z * (v.z * r), g.w * (v.w * r));
    }
  } else {
#pragma unroll 8
    for (int i = threadIdx.x; i < n; i += kThreads) yr[i] = w[i] * (xr[i] * r);
  }
}

}  // namespace

void rms_norm_strided(const float* x, int x_stride, const float* w, int rows, int n, float eps, float* y,
                      int y_stride, CUstream_st* stream) {
  BIGMOE_CHECK(rows >= 0 && n >= 1, "rms_norm: bad shape rows={} n={}", rows, n);
  BIGMOE_CHECK(x_stride >= n && y_stride >= n, "rms_norm: strides {} / {} shorter than a row of {}", x_stride,
               y_stride, n);
  if (rows == 0) return;
  BIGMOE_CHECK(x && w && y, "rms_norm: null pointer");
  auto a16 = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  if (n % 4 == 0 && x_stride % 4 == 0 && y_stride % 4 == 0 && a16(x) && a16(w) && a16(y))
    check(pdl_launch(rms_norm_kernel<true>, dim3(rows), dim3(kThreads), 0, stream, x, size_t(x_stride), w, n, eps, y,
                     size_t(y_stride)),
          "rms_norm_kernel launch");
  else
    check(pdl_launch(rms_norm_kernel<false>, dim3(rows), dim3(kThreads), 0, stream, x, size_t(x_stride), w, n, eps, y,
                     size_t(y_stride)),
          "rms_norm_kernel launch");
  check(cudaGetLastError(), "rms_norm kernel launch");
}

void rms_norm(const float* x, const float* w, int rows, int n, float eps, float* y, CUstream_st* stream) {
  rms_norm_strided(x, n, w, rows, n, eps, y, n, stream);
}

}  // namespace bigmoe::cuda
