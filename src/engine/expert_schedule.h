// Where each routed expert of one MoE layer is computed in one step, when some experts live in
// host memory (issue 5; the executor is GlmDsaCuda, src/backend/cuda/expert_offload.h). Pure
// bookkeeping on the host, no device code, so it is tested on any machine
// (tests/test_expert_schedule.cpp).
//
// A layer's device pool (per projection, uniform stride) is numbered in slots:
//   [0, n_resident)                       the layer's GPU-resident experts, in ascending expert id
//   [n_resident, n_resident + cache)      cache slots: streamed experts kept under a policy
//   [transient_base, + n_transient)       transient slots: streamed experts used once
// The transient slots may lie anywhere after the layer's own (layers of one shape share them,
// so transient_base is relative to the layer's slot 0).
//
// One step (the router's choice ids [S] = rows x top_k, on the host):
//  * Gpu experts: their resident slot.
//  * Stream experts: a cache hit is read in place; a miss is copied into a cache slot the
//    ExpertCache gives (decode only: `fill`; never a slot another expert of this step reads),
//    else into a transient slot.
//  * Cpu experts: computed on the CPU (slot -1: the grouped kernel writes zeros there and the
//    CPU's result is added afterwards).
//  * Mixed experts: a cache hit is read in place (no bytes move); the rest are split, ordered
//    by (tokens ascending, expert ascending), and given to the CPU one by one while the CPU's
//    share of their bytes is below mixed_cpu_fraction; the others stream as above. The CPU
//    gets the experts with the fewest tokens: its cost grows with tokens, a copy's does not.
// Distinct experts are visited in ascending id, so a step's plan depends only on the ids and
// the cache state.
//
// Prefetch (decode; docs/offload.md, "Prefetch"): before a step, prefetch() takes the router's
// predicted choice and places the predicted Stream / Mixed experts in cache slots ahead of
// time, most-picked first; the executor copies them in. The step then finds them as hits.
// Predicted experts it does not use are the first its fills evict.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "engine/expert_cache.h"

namespace bigmoe {

// Where a routed expert lives (the plan file's places: gpu, cpu, stream, mixed).
//  Gpu: resident in GPU memory. Cpu: host memory, computed by the CPU (only activations cross
//  the link). Stream: host memory, copied into a GPU slot when routing picks it. Mixed: host
//  memory; each step splits its mixed experts between the CPU and streaming.
enum class ExpertHome : uint8_t { Gpu, Cpu, Stream, Mixed };
const char* expert_home_name(ExpertHome h);

// The NUMA node that holds each host expert of one layer and, for Cpu / Mixed experts, whose
// threads compute it (docs/offload.md, "NUMA"). node [E] is the placement's (empty: every
// expert -1); node_cpus [nodes] the CPUs this process may use on each node (cpu::numa_node_cpus,
// nodes numbered 0 .. cpu::numa_node_count() - 1). A node >= 0 is kept; -1 (any: the plan's
// "cpu:*" spread) is assigned round-robin by expert id over the nodes that have CPUs: expert e
// goes to the (e mod n)-th of those n nodes. Gpu experts get -1. Pure, so that tests can fake
// any number of nodes. Throws naming the layer, the expert and the node: a node list whose
// length is not E, a node < -1 or >= node_cpus.size(), a Cpu / Mixed expert on a node without
// usable CPUs.
std::vector<int> expert_nodes(int layer, const std::vector<ExpertHome>& home, const std::vector<int>& node,
                              const std::vector<int>& node_cpus);

// How one step serves one expert.
enum class ExpertPath : uint8_t { Resident, CacheHit, CacheFill, Transient, Cpu };
const char* expert_path_name(ExpertPath p);

struct ExpertScheduleOptions {
  int layer = 0;                   // for messages and the cache's per-layer counts
  std::vector<ExpertHome> home;    // [E]
  size_t expert_bytes = 0;         // bytes one streamed expert moves (gate + up + down, placed)
  size_t cpu_expert_bytes = 0;     // bytes the CPU reads for one expert (packed); stats only
  double mixed_cpu_fraction = 0.66;
  int cache_slots = 0;             // 0: no cache
  ExpertCache::Policy cache_policy = ExpertCache::Policy::Lru;
  int transient_base = 0;          // slot of the first transient slot, relative to slot 0
  int n_transient = 0;
};

// Counts over steps (distinct experts per step, not (row, k) slots).
struct ExpertScheduleStats {
  uint64_t steps = 0;
  uint64_t gpu_hits = 0;       // resident experts used
  uint64_t cache_hits = 0;     // streamed experts found in a cache slot (no copy)
  uint64_t cache_misses = 0;   // streamed experts not in a cache slot (each is copied: = streamed)
  uint64_t cache_fills = 0;    // misses that took a cache slot
  uint64_t streamed = 0;       // experts copied host -> GPU
  uint64_t cpu_experts = 0;    // experts computed by the CPU
  uint64_t prefetches = 0;     // experts copied host -> GPU ahead of their step (not in streamed)
  uint64_t prefetch_hits = 0;  // cache hits that were a prefetched expert's first use (useful)
  double streamed_bytes = 0, cpu_bytes = 0, prefetch_bytes = 0;
  double cache_hit_rate() const {
    return cache_hits + cache_misses ? double(cache_hits) / double(cache_hits + cache_misses) : 0.0;
  }
  // The hit rate with a prefetched expert's first use counted as a miss: the hits the cache
  // kept from earlier steps.
  double demand_hit_rate() const {
    return cache_hits + cache_misses ? double(cache_hits - prefetch_hits) / double(cache_hits + cache_misses) : 0.0;
  }
};

class ExpertScheduler {
 public:
  // Throws bigmoe::Error naming the layer on an empty placement, a zero expert size, a fraction
  // outside [0, 1], negative slot counts, transient slots that overlap the layer's own, or no
  // transient slot for a layer that streams.
  explicit ExpertScheduler(ExpertScheduleOptions o);

  struct Use {
    int expert = -1;
    ExpertPath path = ExpertPath::Resident;
    int slot = -1;   // device slot (relative to the layer's slot 0); -1: the CPU computes it
    int tokens = 0;  // (row, k) slots that chose it
  };
  struct Step {
    std::vector<Use> uses;      // distinct experts of the step, ascending id
    std::vector<int> slot_ids;  // [S]: device slot of each (row, k); -1 for CPU or no expert
    int n_cpu = 0, n_copies = 0;
  };
  // ids [S] (negative: no expert). fill = true (decode): misses may claim cache slots and the
  // cache's policy sees every hit; each transient expert gets its own transient slot (the
  // step's copies all happen before its kernels), so they must fit n_transient. fill = false
  // (prefill): the cache is only looked up (a chunk touches nearly every expert: filling would
  // flush what decode keeps); transient experts take the transient slots in turn (so slot_ids
  // may repeat), the executor copying and computing one expert at a time on one stream.
  // Cached experts are visited before the others, so no fill evicts an expert of the step.
  // Throws on an id >= E.
  Step plan(const int* ids, int S, bool fill);

  struct Prefetch {
    int expert = -1;
    int slot = -1;  // cache slot (relative to the layer's slot 0) the executor copies it into
  };
  // Before a decode step: ids [S] the predicted choice (negative: no expert). Its Stream and
  // Mixed experts, already cached ones held first, then the others by predicted tokens
  // (descending, then ascending id), claim cache slots as a miss would, without evicting one
  // another or a pinned expert; Gpu and Cpu experts are skipped. Returns the experts to copy,
  // in that order (none without cache slots, under Static, or when all are cached). The next
  // plan(fill) counts each one's first use as a hit and a prefetch hit. Throws on an id >= E.
  std::vector<Prefetch> prefetch(const int* ids, int S);

  int n_experts() const { return int(o_.home.size()); }
  int n_resident() const { return n_resident_; }
  int cache_slots() const { return o_.cache_slots; }
  int resident_slot(int e) const { return resident_slot_[size_t(e)]; }  // -1 unless Gpu
  ExpertHome home(int e) const { return o_.home[size_t(e)]; }
  const ExpertScheduleOptions& options() const { return o_; }
  const ExpertScheduleStats& stats() const { return stats_; }
  void reset_stats() { stats_ = ExpertScheduleStats{}; }
  const ExpertCache& cache() const { return cache_; }

 private:
  std::vector<int> count_ids(const int* ids, int S) const;  // [E]: (row, k) slots per expert
  ExpertScheduleOptions o_;
  std::vector<int> resident_slot_;
  int n_resident_ = 0;
  ExpertCache cache_;
  ExpertScheduleStats stats_;
};

}  // namespace bigmoe
