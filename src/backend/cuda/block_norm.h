// Row statistics computed by one thread block, shared by the kernels that normalize a row
// (layer_norm in model_ops.cu, index_key_to_cache in decode_ops.cu) so both use the same
// arithmetic: mean, then the biased variance Σ(x - mean)² / n (torch LayerNorm), two CUB block
// reductions. Every thread of the block must call it; all get the same mean and 1/sqrt(var + eps).
#pragma once
#include <cub/block/block_reduce.cuh>
#include <cuda_runtime.h>

namespace bigmoe::cuda {

template <int THREADS>
__device__ __forceinline__ void block_layer_norm_stats(const float* xr, int n, float eps, float& mean, float& inv) {
  using Reduce = cub::BlockReduce<float, THREADS>;
  __shared__ typename Reduce::TempStorage tmp;
  __shared__ float mean_s, inv_s;
  float sum = 0.f;
  for (int i = threadIdx.x; i < n; i += THREADS) sum += xr[i];
  const float total = Reduce(tmp).Sum(sum);
  if (threadIdx.x == 0) mean_s = total / n;
  __syncthreads();  // also lets tmp be reused
  mean = mean_s;
  float ss = 0.f;
  for (int i = threadIdx.x; i < n; i += THREADS) {
    const float d = xr[i] - mean;
    ss += d * d;
  }
  const float var = Reduce(tmp).Sum(ss);
  if (threadIdx.x == 0) inv_s = rsqrtf(var / n + eps);
  __syncthreads();
  inv = inv_s;
}

}  // namespace bigmoe::cuda
