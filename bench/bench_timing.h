// Timing helpers of the kernel benchmarks (bench_matvec, bench_gemm): each launch timed alone
// with CUDA events on the default stream, the median reported.
#pragma once
#include <cuda_runtime.h>

#include <algorithm>
#include <vector>

#include "backend/cuda/cuda_ops.h"

namespace bigmoe::bench {

inline float median(std::vector<float> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// Median seconds of `reps` calls of launch(r) (r = 0 .. reps - 1), each between two events.
template <class F>
double median_launch_seconds(int reps, cudaEvent_t e0, cudaEvent_t e1, F&& launch) {
  std::vector<float> ts;
  for (int r = 0; r < reps; ++r) {
    cuda::check(cudaEventRecord(e0), "cudaEventRecord");
    launch(r);
    cuda::check(cudaEventRecord(e1), "cudaEventRecord");
    cuda::check(cudaEventSynchronize(e1), "cudaEventSynchronize");
    float ms;
    cuda::check(cudaEventElapsedTime(&ms, e0, e1), "cudaEventElapsedTime");
    ts.push_back(ms);
  }
  return median(ts) * 1e-3;
}

}  // namespace bigmoe::bench
