// The GLM-DSA forward pass on one CUDA device, every weight resident in GPU memory except the
// routed experts that GlmDsaCudaOptions::experts places on the host (docs/offload.md): the same
// math as GlmDsaModel (src/model/glm_dsa.cpp), op by op, through the kernels of cuda_ops.h and
// model_ops.h. Decode (T <= 16 rows in a step) runs the matvec kernels and the grouped expert
// kernel, which reads the router's choice from device memory; prefill (more rows) runs the
// tensor-core GEMM on weights dequantized to BF16, grouping the tokens of each expert.
// Attention is the absorbed MLA over a float32 latent cache with the DSA indexer and top-k on
// the device. The cache is paged: per layer, pools of pages of page_rows positions (latent, k_pe
// and the indexer key) shared by every sequence, a page table per sequence (engine/page_pool.h
// keeps the books, the kernels read the table from device memory). Several sequences can share a
// step (batched decode): their rows go through the matrix products together and through
// attention one sequence at a time.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "backend/cuda/cuda_ops.h"
#include "engine/expert_schedule.h"
#include "engine/lm.h"
#include "model/glm_dsa.h"

namespace bigmoe::cuda {

// Where each routed expert lives (issue 5; the plan file's "experts" places, src/plan/plan_file.h).
//  Gpu: resident in GPU memory. Cpu: host memory, computed by the CPU (only activations cross
//  the link). Stream: host memory, copied into a GPU slot when routing picks it. Mixed: host
//  memory; each step splits its mixed experts between the CPU and streaming so that both paths
//  finish together (mixed_cpu_fraction of the bytes to the CPU). Declared with the per-step
//  scheduler (engine/expert_schedule.h); docs/offload.md describes the executor.
using bigmoe::ExpertHome;
using bigmoe::expert_home_name;

struct ExpertPlacement {
  // home[layer][expert] for the main layers; an empty vector (or an empty layer entry, or a
  // dense layer) means every expert of it on the GPU.
  std::vector<std::vector<ExpertHome>> home;
  // node[layer][expert], parallel to home: the NUMA node that holds a host expert (its packed
  // CPU copy and its pinned placed bytes) and whose threads compute it (Cpu / Mixed); -1 = any:
  // spread round-robin by expert id over the nodes with CPUs (the plan's "cpu:*"). An empty
  // vector or layer entry means -1 for all; ignored for Gpu experts. A node >= the machine's
  // (cpu::numa_node_count()) is an error at load naming the layer, expert and node.
  std::vector<std::vector<int>> node;
  double mixed_cpu_fraction = 0.66;  // share of a step's Mixed expert bytes the CPU computes
  // GPU slots per MoE layer that keep streamed experts after use under a runtime policy
  // (engine/expert_cache.h: "lru" | "lfu"); 0: every streamed expert is copied on each use.
  int cache_slots = 0;
  std::string cache_policy = "lru";
  // Decode steps of a host layer predict the next host layer's choice (its router on the current
  // residual) and copy the predicted experts into that layer's cache slots ahead of time, on a
  // copy stream beside the kernels (docs/offload.md, "Prefetch"). Takes effect where the next
  // host layer has cache slots under lru / lfu. The logits are bitwise those without it, except
  // that where a layer has Mixed experts the cache (and so prefetch) decides which of them the
  // CPU computes. Off by default: on the synthetic GLM-5.2 benchmark (random routing, so 70% of
  // guesses used) the PCIe link is the bottleneck and the wasted guesses cost more than the
  // overlap gains (experts-streamed + 64 LRU slots, H100: 89.4 tok/s off, 78.7 on; bench/RESULTS.md).
  bool prefetch = false;
  // Threads of the CPU expert kernels over all nodes that compute experts, split among them in
  // proportion to their cores (0: every core of each such node).
  int cpu_threads = 0;
  bool any_host() const;
};

struct GlmDsaCudaOptions {
  int max_context = 4096;  // cache positions per sequence
  int max_sequences = 4;   // sequences that can exist at once
  int page_rows = 64;      // positions per cache page
  // Pages in the cache pool, shared by all sequences (every layer's pools hold this many pages of
  // page_rows positions, plus one spare). 0: max_sequences * ceil(max_context / page_rows), room
  // for every sequence at full context. Fewer: a step that needs a page when none is free throws,
  // naming the sequence and position, before any work.
  int cache_pages = 0;
  int max_rows = 4096;     // rows (tokens over all sequences) per forward step; longer prompts are chunked
  int device = 0;
  bool progress = false;   // progress bar on stderr while uploading
  // The absorbed-MLA matrices (kv_b split per head) are BF16; set to keep them float32 where
  // BF16 would round them (FP8 / quantized kv_b; 2x the bytes of BF16).
  bool exact_absorb = false;
  // Steps of more than 16 rows (prefill) run their products on tensor cores (activations rounded
  // to BF16); off: as matvecs over 16-row chunks, float32 throughout (tests, exactness).
  bool prefill_gemm = true;
  ExpertPlacement experts;  // default: every expert on the GPU
};

// What the expert executor did since construction or reset_offload_stats(), over the MoE layers
// with host experts (all zero when every expert is on the GPU). Counts are distinct experts per
// layer step, not (token, k) slots.
struct OffloadStats {
  uint64_t steps = 0;         // layer steps through the executor (decode and prefill)
  uint64_t gpu_hits = 0;      // resident experts used
  uint64_t cache_hits = 0;    // streamed experts found in a cache slot (no copy)
  uint64_t cache_misses = 0;  // streamed experts not in a cache slot (each copied: = streamed)
  uint64_t cache_fills = 0;   // misses that took a cache slot (decode only)
  uint64_t streamed = 0;      // experts copied host -> GPU
  uint64_t cpu_experts = 0;   // experts computed by the CPU
  uint64_t prefetches = 0;    // experts copied host -> GPU ahead of their step (not in streamed)
  uint64_t prefetch_hits = 0;  // cache hits that were a prefetched expert's first use (<= prefetches)
  double streamed_bytes = 0;  // bytes copied host -> GPU on demand (placed format)
  double cpu_bytes = 0;       // expert bytes the CPU read (packed)
  double prefetch_bytes = 0;  // bytes copied host -> GPU by prefetches
  double host_ms = 0;         // host wall time from each step's router sync to its CPU result enqueued
  double cpu_ms = 0;          // of which in the CPU expert kernels
  std::vector<double> layer_cache_hit_rate;  // [num_hidden_layers]; 0 where nothing streams
  double cache_hit_rate() const {
    return cache_hits + cache_misses ? double(cache_hits) / double(cache_hits + cache_misses) : 0.0;
  }
  // The hit rate with a prefetched expert's first use counted as a miss: the hits the cache kept.
  double demand_hit_rate() const {
    return cache_hits + cache_misses ? double(cache_hits - prefetch_hits) / double(cache_hits + cache_misses) : 0.0;
  }
  // Prefetched experts that their step used.
  double prefetch_accuracy() const { return prefetches ? double(prefetch_hits) / double(prefetches) : 0.0; }
};

// A handle on one sequence's device cache.
struct CudaSequence {
  int id = -1;
  int n = 0;  // positions cached
};

class GlmDsaCuda {
 public:
  // Uploads every weight of `model` (which must outlive this object), routed experts as
  // opt.experts places them. Throws bigmoe::Error when the device has too little memory, a
  // tensor's format cannot be placed, or the placement does not fit the model, naming the
  // culprit. Any expert off the GPU turns the decode CUDA graphs off (steps then sync per MoE
  // layer that has host experts).
  GlmDsaCuda(const GlmDsaModel& model, const GlmDsaCudaOptions& opt);
  ~GlmDsaCuda();
  GlmDsaCuda(const GlmDsaCuda&) = delete;
  GlmDsaCuda& operator=(const GlmDsaCuda&) = delete;

  const ModelConfig& config() const { return cfg_; }
  CudaSequence new_sequence();
  void free_sequence(CudaSequence& s);  // its pages go back to the pool
  void truncate(CudaSequence& s, int n_keep);  // frees the pages past position n_keep - 1
  // The pool pages of s in position order (page i holds positions [i P, (i + 1) P)), and the
  // pool's free pages.
  std::vector<int> cache_pages(const CudaSequence& s) const;
  int free_cache_pages() const;

  // One step: tokens[i] are appended to seqs[i] at positions seqs[i]->n ...; returns the logits
  // of every row, [Σ tokens[i].size(), V], in order (or only each sequence's last row when
  // last_only). Sequences over max_context, bad token ids, or new positions that find no free
  // cache page throw before any work.
  std::vector<float> forward(const std::vector<CudaSequence*>& seqs, const std::vector<std::vector<int>>& tokens,
                             bool last_only = false);

  // Per-layer device time of the last forward (ms, index num_hidden_layers = final norm +
  // lm_head), recorded when profiling is on (events between layers; adds no sync otherwise).
  void set_profiling(bool on) { profiling_ = on; }
  // Decode steps replay captured CUDA graphs (on by default; off: every kernel launched anew).
  void set_graphs(bool on) { graphs_ = on; }
  const std::vector<float>& layer_ms() const { return layer_ms_; }

  // Weight bytes a decode step of `rows` rows reads at most from GPU memory: every non-expert
  // weight, the shared experts, min(E, rows * top_k) routed experts per MoE layer and the
  // lm_head (rows 1: one token's bytes). With experts on the host, a layer's routed bytes count
  // only the share of its experts resident on the GPU (n_gpu / E of them, as under uniform
  // routing); the host share is decode_host_bytes_*: bytes that cross the link (streamed) or
  // that the CPU reads. And what the device holds in total.
  size_t decode_bytes_per_token(int rows = 1) const;
  size_t decode_bytes_layer(int layer, int rows = 1) const;  // layer num_hidden_layers: norm + lm_head
  size_t decode_host_bytes_per_token(int rows = 1) const;
  size_t decode_host_bytes_layer(int layer, int rows = 1) const;  // placed bytes of host experts
  size_t resident_bytes() const { return resident_bytes_; }
  // Host memory of the experts off the GPU: pinned placed bytes (Stream, Mixed) and packed CPU
  // layouts (Cpu, Mixed; Mixed experts are kept both ways), plus the per-step pinned buffers.
  size_t host_pinned_bytes() const;
  size_t host_packed_bytes() const;

  // Routing statistics (`bigmoe profile --gpu`), as GlmDsaModel::set_routing_stats records them
  // on the CPU: while set, every MoE layer's choice for each row of each step is counted on the
  // device (routing_count.h: a kernel after the router, inside the captured decode graphs, so
  // every replay counts). The counts reach `stats` at flush_routing_stats(), when another stats
  // (or null) is set, and at destruction. stats must have the model's n_experts and top_k, and
  // must outlive its use here. Turning counting on or off drops the captured decode graphs: the
  // next steps capture them again, with or without the kernel (so counting costs nothing while
  // off). The MTP layer is not run, so it has no counts.
  void set_routing_stats(RoutingStats* stats);
  void flush_routing_stats();

  OffloadStats offload_stats() const;
  void reset_offload_stats();  // counts only: the cache keeps its experts
  double cache_hit_rate(int layer) const;  // streamed experts of `layer` found in its cache slots

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
  ModelConfig cfg_;
  bool profiling_ = false;
  bool graphs_ = true;
  std::vector<float> layer_ms_;
  size_t resident_bytes_ = 0;
};

// GlmDsaCuda as a LanguageModel (one sequence per session), for `bigmoe run/serve --device cuda`.
std::unique_ptr<LanguageModel> make_cuda_language_model(std::unique_ptr<GlmDsaModel> model,
                                                        const GlmDsaCudaOptions& opt);

}  // namespace bigmoe::cuda
