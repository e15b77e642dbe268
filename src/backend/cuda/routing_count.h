// Routing statistics on the device (GlmDsaCuda::set_routing_stats, `bigmoe profile --gpu`): how
// often the router of each MoE layer picks each expert. A kernel right after moe_route adds the
// step's picks to device counters. It is an ordinary kernel on the stream, so a captured decode
// graph holds it and every replay counts. The host reads the counters only when asked (flush),
// so counting adds no sync and no copy to a step.
#pragma once
#include <cstdint>
#include <vector>

#include "backend/cuda/cuda_ops.h"
#include "engine/routing_stats.h"

namespace bigmoe::cuda {

// counts[ids[i]] += 1 for i < S with 0 <= ids[i] < E (others are skipped), and *rows += R.
// ids: device int [S]; counts: device uint64 [E]; rows: device uint64 [1]. Asynchronous on
// `stream`; throws bigmoe::Error on bad arguments or a failed launch.
void count_routes(const int* ids, int S, int E, unsigned long long* counts, int R, unsigned long long* rows,
                  CUstream_st* stream = nullptr);

class RoutingCounter {
 public:
  // Device counters for n_layers layers of n_experts experts (cudaMalloc; n_layers · (E + 1) · 8
  // bytes, not counted as the model's resident bytes), zeroed on `stream`, the stream that will
  // record.
  RoutingCounter(int n_layers, int n_experts, CUstream_st* stream);
  ~RoutingCounter();
  RoutingCounter(const RoutingCounter&) = delete;
  RoutingCounter& operator=(const RoutingCounter&) = delete;

  // Enqueues the count of one layer's step: the router's ids [R, K] (device) of the R rows of
  // the step (not the buffer's capacity).
  void record(int layer, const int* ids, int R, int K, CUstream_st* stream);
  // Adds the counts since the last flush into `stats` (the layers that saw rows, in ascending
  // order: RoutingStats::add_counts) and zeroes the counters, in order on `stream` (the one that
  // records), then waits for it.
  void flush(RoutingStats& stats, CUstream_st* stream);

 private:
  int n_layers_, n_experts_;
  unsigned long long* counts_ = nullptr;  // device [n_layers, E]
  unsigned long long* rows_ = nullptr;    // device [n_layers]
};

}  // namespace bigmoe::cuda
