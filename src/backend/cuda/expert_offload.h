// The expert executor of GlmDsaCuda for MoE layers with experts in host memory (issue 5;
// docs/offload.md). Internal to the CUDA backend: GlmDsaCuda owns one when its ExpertPlacement
// puts any expert on the host, and calls it from the routed-expert part of ffn().
//
// Memory. Layers whose three projections have the same layout (format, shape, bytes) form a
// group; each group has one device allocation per projection, at the grouped kernel's uniform
// stride: every layer's resident experts and cache slots, then transient slots the group's
// layers share (a layer's step uses them only between its copies and its kernels, which the
// stream orders before the next layer's copies). Host experts that may stream (Stream, Mixed)
// are kept in pinned host memory in their placed format (the bytes place_experts would upload);
// experts the CPU may compute (Cpu, Mixed) as cpu::PackedExpert; Mixed ones both ways.
//
// NUMA. Every host expert has a node (ExpertPlacement::node, -1 spread round-robin by id:
// expert_nodes in engine/expert_schedule.h). Its packed copy is allocated on that node, its
// pinned placed bytes sit in a per-(layer, projection, node) store bound to the node, and its
// CPU work runs on that node's pool (cpu::NodeRunner: one pool per node with CPU experts, the
// nodes of a step at once, results summed in node order).
//
// A decode step of a host layer (GlmDsaCuda::ffn, <= 16 rows):
//   moe_route -> decode_begin: ids, route weights (and h when the layer has CPU experts) to
//   pinned host buffers, sync; ExpertScheduler::plan; H2D copies of the streamed experts into
//   their slots; slot ids uploaded (-1 for CPU experts: the grouped kernel writes zeros there)
//   -> grouped gate / up / silu / down on the pool, shared expert, moe_combine (the GPU works)
//   -> finish: the CPU experts into pinned y_cpu [R, d] (weighted), H2D, x += y_cpu.
// Prefill (> 16 rows): prefill_begin does the same fetch and plan (the cache is looked up, not
// filled); GlmDsaCuda's per-expert loop asks prefill_stage for each expert's slot, which
// enqueues the copy of a streamed one first; finish as above.
//
// Prefetch (decode, ExpertPlacement::prefetch, layers with cache slots): GlmDsaCuda applies the
// router of the next host layer (prefetch_target) to the current layer's residual and hands the
// predicted ids to decode_begin, which brings them to the host with the same sync. After the
// step's own copies, the predicted experts the next layer has not cached are copied into its
// cache slots on a copy stream of their own. Ordering (docs/offload.md, "Prefetch"): the copy
// stream waits for the current step's copies (they go first on the link) and for the target
// layer's last reads (finish records them); each prefetched slot's copy records an event, and a
// step (decode or prefill) that reads or refills that slot waits on it before its own copies
// and kernels.
#pragma once
#include <array>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "backend/cpu/expert_kernels.h"
#include "backend/cpu/node_runner.h"
#include "backend/cuda/cuda_ops.h"
#include "backend/cuda/glm_dsa_cuda.h"
#include "engine/expert_schedule.h"
#include "model/glm_dsa.h"

struct CUevent_st;  // cudaEvent_t is CUevent_st*

namespace bigmoe::cuda {

// E experts of one projection, at a uniform stride.
struct DevExperts {
  ExpertWeights ew{};
  int out = 0, in = 0, n = 0;
  size_t bytes_per_expert = 0;
};

// One projection's experts as the grouped kernel reads them.
struct ExpertLayout {
  WeightFormat fmt = WeightFormat::F32;
  int out = 0, in = 0, bo = 128, bi = 128;
  size_t wbytes = 0;  // placed weight bytes of one expert
  size_t scales = 0;  // FP8: float32 block scales of one expert (else 0)
  size_t stride() const { return (wbytes + 255) / 256 * 256; }
  size_t bytes() const { return wbytes + scales * 4; }
  bool operator==(const ExpertLayout&) const = default;
};

class ExpertOffload {
 public:
  // Device memory for the pools (GlmDsaCuda::Impl::alloc: counted as resident, freed with it).
  using Alloc = std::function<void*(size_t bytes, const std::string& what)>;
  // The placed bytes of one matrix (GlmDsaCuda's placed_data): weights to w, FP8 scales to s.
  using Write = std::function<void(const Linear& l, WeightFormat f, uint8_t* w, float* s)>;

  // Throws bigmoe::Error naming the culprit when the placement does not fit the model: a layer
  // count other than the main layers', an expert count other than the layer's, a host home on
  // a dense layer, a fraction outside [0, 1], negative cache slots or threads, an unknown policy,
  // or a NUMA node this machine does not have (naming the layer, the expert and the node).
  static void validate(const ModelConfig& c, const std::vector<BlockWeights>& layers, const ExpertPlacement& p);
  // Whether layer `layer` has an expert off the GPU under p.
  static bool host_layer(const ExpertPlacement& p, int layer);

  ExpertOffload(const ModelConfig& c, const ExpertPlacement& p, int max_rows, CUstream_st* stream, Alloc alloc,
                Write write);
  ~ExpertOffload();
  ExpertOffload(const ExpertOffload&) = delete;
  ExpertOffload& operator=(const ExpertOffload&) = delete;

  // Load, in two phases: every host layer with its projections' layouts, then place() allocates
  // the pools, uploads the resident experts, fills the pinned stores and packs the CPU experts
  // (throws naming the layer, expert and tensor when the CPU kernels cannot take one).
  void add_layer(int layer, const FfnWeights& f, const std::array<ExpertLayout, 3>& lay, const std::string& prefix);
  void place(bool progress);
  // Views of a host layer's pool (gate, up, down), slot 0 at the layer's first resident expert.
  const DevExperts& experts(int layer, int proj) const;
  int n_gpu(int layer) const;  // experts resident on the GPU

  // The host layer after `layer` (the next one with host experts) when decode steps of `layer`
  // prefetch for it: prefetch is on and that layer has cache slots under lru / lfu. Else -1.
  int prefetch_target(int layer) const;

  // Decode (R <= 16 rows): after moe_route wrote ids / route_w [R, top_k] and with h [R, d] the
  // normed input (device). Returns the device slot ids [R * top_k] for matvec_grouped on
  // experts(layer, *). next_ids [R, top_k] (device; null: no prefetch): the choice predicted for
  // prefetch_target(layer), whose missing experts are then prefetched into its cache slots.
  const int* decode_begin(int layer, const int* ids, const float* route_w, const float* h, int R,
                          const int* next_ids = nullptr);
  // Prefill: the same fetch and plan; returns the router's ids on the host (pinned, [R * top_k]).
  const int* prefill_begin(int layer, const int* ids, const float* route_w, const float* h, int R);
  // Prefill, for each expert with tokens in turn: its slot in experts(layer, *) after the copy
  // of a streamed one is enqueued, or -1 when the CPU computes it.
  int prefill_stage(int layer, int expert);
  // Pinned scratch of 2 * max_rows * top_k ints for the prefill's row lists (free to overwrite
  // after the next begin).
  int* pinned_rows() { return host_rows_; }
  // After moe_combine: computes the step's CPU experts on the host while the GPU works, then
  // uploads their weighted sum and adds it to x [R, d] (device). Ends the layer's step.
  void finish(int layer, float* x, int R);

  OffloadStats stats() const;
  void reset_stats();
  double cache_hit_rate(int layer) const;  // 0 for a layer that streams nothing
  size_t pinned_bytes() const { return pinned_bytes_; }
  size_t packed_bytes() const { return packed_bytes_; }

 private:
  struct Layer {
    int layer = -1;
    const FfnWeights* f = nullptr;
    std::string prefix;
    std::array<ExpertLayout, 3> lay;
    std::vector<ExpertHome> home;
    std::vector<int> node;  // [E]: NUMA node of each host expert (expert_nodes), -1 for Gpu
    int group = -1, slot0 = 0, n_res = 0, n_cache = 0, n_transient = 0, n_stream = 0, n_cpu = 0;
    std::unique_ptr<ExpertScheduler> sched;
    std::array<DevExperts, 3> dev;
    // Pinned placed bytes of the streamable experts, one store per node they live on.
    struct Store {
      int node = -1;
      std::array<uint8_t*, 3> w{};  // [n, stride] per projection
      std::array<float*, 3> s{};    // FP8: [n, scales]
    };
    std::vector<Store> stores;
    std::vector<int> host_store;  // [E]: index into stores, -1
    std::vector<int> host_index;  // [E]: row of its store, -1
    std::vector<int> cpu_index;  // [E]: index into packed, -1
    std::vector<cpu::PackedExpert> packed;
    ExpertScheduler::Step step;  // the current step
    std::vector<int> use_of;     // [E]: index into step.uses, -1
    std::vector<cpu::ExpertJob> jobs;
    std::vector<int> job_node;  // [jobs]: the node that computes each
    // Prefetch: the layer this one's decode steps prefetch for (index into layers_, -1); and, as
    // a target, per cache slot the event of its last prefetch copy and whether a step has yet to
    // wait on it, plus the event after this layer's last reads of its pool (finish).
    int prefetch_to = -1;
    std::vector<CUevent_st*> ready;
    std::vector<char> pending;
    CUevent_st* read_done = nullptr;
  };
  struct Group {
    std::array<ExpertLayout, 3> lay;
    std::array<uint8_t*, 3> w{};
    std::array<float*, 3> s{};
    int slots = 0, transient0 = 0, n_transient = 0;
  };
  Layer& get(int layer);
  const Layer& get(int layer) const;
  void* pinned(size_t bytes, const std::string& what);
  void* pinned_on_node(size_t bytes, int node, const std::string& what);
  void fetch(Layer& L, const int* ids, const float* route_w, const float* h, int R, const int* next_ids);
  void plan(Layer& L, int R, bool fill);
  void wait_prefetched(Layer& L);
  void prefetch(Layer& T, int R);
  void copy(const Layer& L, int expert, int slot, CUstream_st* stream);

  const ModelConfig& c_;
  ExpertPlacement p_;
  int max_rows_;
  CUstream_st* stream_;
  CUstream_st* copy_stream_ = nullptr;  // prefetch copies (null: no layer prefetches)
  CUevent_st* demand_done_ = nullptr;   // on stream_, after a step's own copies
  Alloc alloc_;
  Write write_;
  std::vector<Layer> layers_;
  std::vector<int> layer_index_;  // [num_hidden_layers]: index into layers_, -1
  std::vector<Group> groups_;
  struct Pinned {
    void* p = nullptr;
    size_t bytes = 0;  // mapped bytes (pinned_on_node), 0 for cudaHostAlloc
  };
  std::vector<Pinned> pinned_;
  std::vector<int> node_cpus_;  // [numa nodes]: CPUs this process may use on each
  size_t pinned_bytes_ = 0, packed_bytes_ = 0;
  bool any_cpu_ = false;

  // Per-step buffers, reused by every layer: a layer's begin synchronizes the stream before the
  // host writes any of them, so no copy from the previous layer is still reading them.
  int* host_ids_ = nullptr;    // pinned [max_rows * K]
  float* host_rw_ = nullptr;   // pinned [max_rows * K]
  int* host_slot_ = nullptr;   // pinned [max_rows * K] (decode: slot ids)
  int* host_rows_ = nullptr;   // pinned [2 * max_rows * K] (prefill: row lists)
  int* host_pred_ = nullptr;   // pinned [max_rows * K] (decode: predicted ids of the next layer)
  float* host_h_ = nullptr;    // pinned [max_rows * d] (CPU experts only)
  float* host_y_ = nullptr;    // pinned [max_rows * d]
  int* dev_slot_ = nullptr;    // device [max_rows * K]
  float* dev_y_ = nullptr;     // device [max_rows * d]
  std::unique_ptr<cpu::NodeRunner> runner_;  // a pool per node with CPU experts

  std::chrono::steady_clock::time_point t0_;
  double host_ms_ = 0, cpu_ms_ = 0;
};

}  // namespace bigmoe::cuda
