// The engine side of a plan file (`bigmoe plan --out`, docs/planner.md "Plan file"): parsed
// once into an EnginePlan, then checked against the model being loaded and against what this
// engine can run (one GPU; every non-expert tensor but the token embedding on it; an f32
// cache). serve / chat / complete / perplexity `--plan` and bench_model read it; the CUDA side
// turns it into cuda::ExpertPlacement (plan/expert_placement.h).
#pragma once
#include <cstdint>
#include <filesystem>
#include <nlohmann/json_fwd.hpp>
#include <optional>
#include <string>
#include <vector>

#include "model/config.h"
#include "plan/planner.h"

namespace bigmoe::plan {

struct EnginePlan {
  std::string source;  // the file (or "--placement NAME"): every error starts with it
  std::string layout;  // the planner's layout name ("hot-cache-mixed/local", ...)
  // The model the plan was made for (the file's "model" block).
  std::string model_source;
  int n_layers = 0, n_mtp = 0, n_experts = 0, top_k = 0, hidden = 0;
  std::string machine;   // the machine file's name ("" without one)
  std::vector<int> gpus;  // GPUs used (machine indices)
  std::vector<int> layer_gpu;  // [n_layers + n_mtp]: the GPU that runs each layer; -1 = CPU
  // [n_layers + n_mtp][n_experts]: where each routed expert lives (the three projections of an
  // expert share one place); an empty entry is a dense layer, or an MTP layer left out.
  std::vector<std::vector<Loc>> experts;
  struct Tensor {
    std::string name, alias;
    Loc loc;
  };
  std::vector<Tensor> tensors;         // every tensor but the routed experts ("tensors")
  std::vector<std::string> expert_tensors;  // the routed-expert tensors' names ("experts[i].name")
  // [machine GPU][NUMA node]: the CPU's share of a mixed step's bytes, read / (read + link).
  std::vector<std::vector<double>> mixed_cpu_fraction;
  int64_t ctx = 0;        // context the cache was sized for (kv_cache.context); 0: none
  std::string kv_dtype;   // kv_cache.dtype: f32 | bf16 | fp8
  // The planner's figures for this layout ("prediction"); decode_tps_b1 < 0 when there are none
  // (a plan made by placement_plan).
  double decode_tps_b1 = -1, decode_tps_b4 = -1, prefill_tps = -1;
  PathBytes bytes_per_token;
  int64_t max_context = 0;
  bool fits = true;
  std::string reason;  // why it does not fit (a layout written with `plan --layout --force`)
  // "expert_cache" (optional, every key optional): the executor's runtime cache for this plan
  // (cuda::ExpertPlacement cache_slots, cache_policy, prefetch). `bigmoe plan` does not write
  // it; a command-line flag wins over it, and a key left out keeps the engine's default.
  std::optional<int> cache_slots;           // expert_cache.slots: GPU slots per MoE layer, >= 0
  std::optional<std::string> cache_policy;  // expert_cache.policy: "lru" | "lfu" | "static"
  std::optional<bool> prefetch;             // expert_cache.prefetch: true | false

  // Routed experts of the main layers in each place (the MTP layer is not run per token).
  int count(Place p) const;
  // The CPU's share of mixed bytes for the GPU this plan runs on: the entry of the node its
  // mixed experts live on (their mean when they live on several); -1 when the file has none.
  double mixed_fraction() const;
  // "layout mixed (plan.json): 31.09 tok/s predicted at batch 1; experts: 24 gpu, 0 cpu, ..."
  // (+ "; expert cache: 64 slots, lru, prefetch on" for the keys the file gives)
  std::string summary() const;
};

// Parses a `bigmoe_plan: 1` document: the schema version, the fields the engine reads, every
// place string, that the three projections of each expert agree, and the optional
// expert_cache block (known keys only, each of its type and range). Errors name `source` and
// the field (`plan.json: experts[3].places[17] = "disk:0": unknown place ...`).
EnginePlan plan_file_from_json(const nlohmann::json& j, const std::string& source);
EnginePlan load_plan_file(const std::filesystem::path& file);

// Throws unless `p` was made for the model `c` describes (main and MTP layer counts, experts
// per layer, top-k, hidden size, which layers are MoE, the routed-expert tensor names) and this
// engine can run it: one GPU, the non-expert tensors on it (the token embedding may stay on
// the host), not cpu-only, an f32 cache.
void check_plan_against(const EnginePlan& p, const ModelConfig& c);

// Names `placement_plan` accepts.
inline constexpr const char* kPlacementLayouts[] = {"all-gpu", "experts-cpu", "experts-streamed", "mixed"};
// A plan without a plan file (--placement): every routed expert of `c` in one place (host
// places on node 0), everything else on GPU 0; no prediction, no context (ctx 0).
EnginePlan placement_plan(const ModelConfig& c, const std::string& layout);

}  // namespace bigmoe::plan
