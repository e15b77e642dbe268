// count_routes: a histogram of the step's expert ids. Decode steps have R * K <= 16 * 8 ids:
// one block, a global atomic per id. Prefill chunks have up to max_rows * K (32k for 4096 rows
// of top-8): each block first counts its ids in shared memory (E counters), then adds the
// non-zero ones to the global counters, so the global atomics are E per block, not one per id.
#include <cuda_runtime.h>

#include <algorithm>

#include "backend/cuda/pdl.h"
#include "backend/cuda/routing_count.h"
#include "util/error.h"

namespace bigmoe::cuda {

namespace {

constexpr int kThreads = 256;
constexpr int kMaxSharedExperts = 4096;  // shared histogram up to 16 KiB

__global__ void __launch_bounds__(kThreads) count_routes_kernel(const int* __restrict__ ids, int S, int E,
                                                                 unsigned long long* __restrict__ counts, int R,
                                                                 unsigned long long* __restrict__ rows, bool shared) {
  // The grouped expert kernel after this one waits (pdl_wait) before it reads the ids, which
  // moe_route wrote before this kernel started: it may be scheduled at once.
  pdl_trigger();
  extern __shared__ unsigned int hist[];
  if (blockIdx.x == 0 && threadIdx.x == 0) *rows += (unsigned long long)R;  // the only writer of rows
  const int stride = gridDim.x * blockDim.x;
  if (!shared) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < S; i += stride) {
      const int e = ids[i];
      if (e >= 0 && e < E) atomicAdd(&counts[e], 1ull);
    }
    return;
  }
  for (int e = threadIdx.x; e < E; e += blockDim.x) hist[e] = 0;
  __syncthreads();
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < S; i += stride) {
    const int e = ids[i];
    if (e >= 0 && e < E) atomicAdd(&hist[e], 1u);
  }
  __syncthreads();
  for (int e = threadIdx.x; e < E; e += blockDim.x)
    if (hist[e]) atomicAdd(&counts[e], (unsigned long long)hist[e]);
}

}  // namespace

void count_routes(const int* ids, int S, int E, unsigned long long* counts, int R, unsigned long long* rows,
                  CUstream_st* stream) {
  BIGMOE_CHECK(S >= 0 && E >= 1 && R >= 0, "count_routes: {} ids, {} experts, {} rows", S, E, R);
  BIGMOE_CHECK(counts && rows && (ids || S == 0), "count_routes: null pointer");
  const bool shared = S > kThreads && E <= kMaxSharedExperts;
  const int blocks = std::clamp((S + kThreads - 1) / kThreads, 1, 64);
  count_routes_kernel<<<blocks, kThreads, shared ? size_t(E) * 4 : 0, stream>>>(ids, S, E, counts, R, rows, shared);
  check(cudaGetLastError(), "count_routes kernel launch");
}

RoutingCounter::RoutingCounter(int n_layers, int n_experts, CUstream_st* stream)
    : n_layers_(n_layers), n_experts_(n_experts) {
  BIGMOE_CHECK(n_layers >= 1 && n_experts >= 1, "RoutingCounter: {} layers of {} experts", n_layers, n_experts);
  const size_t n = size_t(n_layers) * size_t(n_experts);
  check(cudaMalloc(&counts_, n * 8), "cudaMalloc (routing counts)");
  if (cudaMalloc(&rows_, size_t(n_layers) * 8) != cudaSuccess) {
    cudaFree(counts_);
    fail("CUDA: cannot allocate the routing row counts ({} layers)", n_layers);
  }
  // On the stream that records (a plain cudaMemset is not ordered before a non-blocking stream).
  check(cudaMemsetAsync(counts_, 0, n * 8, stream), "cudaMemsetAsync (routing counts)");
  check(cudaMemsetAsync(rows_, 0, size_t(n_layers) * 8, stream), "cudaMemsetAsync (routing rows)");
}

RoutingCounter::~RoutingCounter() {
  cudaFree(counts_);
  cudaFree(rows_);
}

void RoutingCounter::record(int layer, const int* ids, int R, int K, CUstream_st* stream) {
  BIGMOE_CHECK(layer >= 0 && layer < n_layers_, "RoutingCounter: layer {} of {}", layer, n_layers_);
  count_routes(ids, R * K, n_experts_, counts_ + size_t(layer) * size_t(n_experts_), R, rows_ + layer, stream);
}

void RoutingCounter::flush(RoutingStats& stats, CUstream_st* stream) {
  const size_t n = size_t(n_layers_) * size_t(n_experts_);
  std::vector<unsigned long long> counts(n), rows(static_cast<size_t>(n_layers_));
  check(cudaMemcpyAsync(counts.data(), counts_, n * 8, cudaMemcpyDeviceToHost, stream), "cudaMemcpyAsync (routing counts)");
  check(cudaMemcpyAsync(rows.data(), rows_, size_t(n_layers_) * 8, cudaMemcpyDeviceToHost, stream),
        "cudaMemcpyAsync (routing rows)");
  check(cudaMemsetAsync(counts_, 0, n * 8, stream), "cudaMemsetAsync (routing counts)");
  check(cudaMemsetAsync(rows_, 0, size_t(n_layers_) * 8, stream), "cudaMemsetAsync (routing rows)");
  check(cudaStreamSynchronize(stream), "cudaStreamSynchronize (routing counts)");
  for (int l = 0; l < n_layers_; ++l) {
    if (!rows[size_t(l)]) continue;
    const unsigned long long* c = counts.data() + size_t(l) * size_t(n_experts_);
    stats.add_counts(l, std::vector<uint64_t>(c, c + n_experts_), rows[size_t(l)]);
  }
}

}  // namespace bigmoe::cuda
