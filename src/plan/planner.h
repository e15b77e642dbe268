// The placement planner (`bigmoe plan`): for a model (a checkpoint, a GGUF file, or a bare
// config.json with a weight format) and a machine (plan/machine.h), computes for each candidate
// layout where every tensor — and every routed expert — lives, the bytes one decoded token moves
// on each path (GPU memory, CPU reading host memory, the host->GPU link), the predicted decode
// speed at batch 1 and 4, the predicted prefill speed and the largest context that fits, and
// picks the fastest layout that fits. docs/planner.md has the formulas and the file schemas.
//
// Tensors carry GGUF-style names (blk.N.ffn_gate_exps.weight, one tensor per projection holding
// all experts of a layer) whatever the source, plus the checkpoint's own name as `alias`; user
// rules match either.
#pragma once
#include <cstdint>
#include <filesystem>
#include <map>
#include <nlohmann/json_fwd.hpp>
#include <optional>
#include <regex>
#include <string>
#include <vector>

#include "model/config.h"
#include "plan/machine.h"

namespace bigmoe::plan {

// Where a tensor (or one expert of it) lives and who reads it. Gpu: GPU memory. Cpu: host
// memory, computed by the CPU. Stream: host memory, copied to the GPU when used. Mixed: host
// memory, split per step between CPU and streaming in proportion to the two bandwidths.
enum class Place { Gpu, Cpu, Stream, Mixed };
const char* place_name(Place p);

enum class TensorClass {
  Embedding,
  Head,
  OutputNorm,
  Attention,
  Indexer,
  DenseMlp,
  Router,
  SharedExpert,
  RoutedExpert,
  Mtp,
  Other
};
const char* tensor_class_name(TensorClass c);

struct PlanTensor {
  std::string name;   // GGUF-style
  std::string alias;  // name in the checkpoint when it differs (HF); routed: model.layers.L.mlp.experts.P_proj
  int layer = -1;     // block index; -1 for token_embd / output / output_norm
  TensorClass cls = TensorClass::Other;
  uint64_t bytes = 0;   // everything stored for it (block scales included); routed: all experts
  uint64_t params = 0;  // weights
  int n_experts = 0;    // routed: experts held (bytes and params divide evenly among them)
};

struct PlanModel {
  std::string source, format;
  int n_layers = 0;  // main layers; the MTP layers follow them
  int n_mtp = 0;
  int hidden = 0, vocab = 0;
  int n_experts = 0, top_k = 0;
  int64_t max_context = 0;
  int kv_latent = 0;          // cache elements per token per layer: kv_lora + rope
  int index_topk = 0;         // DSA: positions attended per query (0: dense attention)
  std::vector<int> kv_index;  // per layer (main + MTP): indexer key elements per token (0: none)
  std::vector<PlanTensor> tensors;

  int n_layers_total() const { return n_layers + n_mtp; }
  uint64_t total_bytes() const;
};

// Storage format for a bare config.json: "fp8", "bf16", "int4" (as `bigmoe inspect
// --config-only` counts them) or a GGUF type ("q4_k", "q8_0", "bf16"...) for every matrix.
// expert_weights, when set, is the format of the routed experts alone.
struct WeightSpec {
  std::string weights = "fp8";
  std::string expert_weights;
};

PlanModel plan_model_from_config(const ModelConfig& c, const WeightSpec& w, const std::string& source);
PlanModel plan_model_from_checkpoint(const std::filesystem::path& dir);
PlanModel plan_model_from_gguf(const std::filesystem::path& file);
// A directory (config.json + safetensors), a .gguf file, or a config .json (then `w` is
// required; it is refused for the other two, whose formats are in the files).
PlanModel load_plan_model(const std::string& path, const std::optional<WeightSpec>& w);

// --rule 'REGEX=gpu|cpu|stream': std::regex (ECMAScript) searched in the name or the alias.
struct TensorRule {
  std::string text;
  std::regex re;
  Place target = Place::Gpu;
};
// --expert-rule 'GLOB[LIST]=gpu|cpu|stream': GLOB (* any run, ? one character) matches a
// routed-expert tensor's whole name, with or without ".weight"; LIST is experts and ranges
// ("17,203", "0-15,40").
struct ExpertRule {
  std::string text;
  std::regex re;
  std::vector<int> experts;
  Place target = Place::Gpu;
};
TensorRule parse_tensor_rule(const std::string& s);
ExpertRule parse_expert_rule(const std::string& s);

// Routing statistics as `bigmoe profile` writes them (engine/routing_stats.h): per layer, how
// often each expert was picked. A layer's selection probability per token is
// q_e = top_k * c_e / sum(c) (= c_e / tokens; clamped to 1); layers without counts are uniform
// (q = top_k / n_experts).
struct RoutingProfile {
  std::string source;
  std::map<int, std::vector<double>> counts;
};
RoutingProfile load_routing_profile(const std::filesystem::path& file);
RoutingProfile routing_profile_from_json(const nlohmann::json& j, const std::string& source);

enum class KvDtype { F32, BF16, FP8 };
KvDtype parse_kv_dtype(const std::string& s);
const char* kv_dtype_name(KvDtype t);

struct PlanOptions {
  int64_t ctx = 32768;          // context to reserve cache for
  KvDtype kv = KvDtype::F32;    // the GPU forward keeps a float32 cache today
  double gpu_mem_gib = 0;       // > 0: cap every GPU's memory (emulates smaller cards)
  double gpu_reserve_gib = 2;   // per GPU: CUDA context, activations, workspaces
  double host_reserve_gib = 8;  // whole machine (shared among nodes by size): OS, process
  int chunk = 2048;             // prefill chunk (tokens)
  bool mtp = true;              // place the MTP layer's weights (it is never read per token here)
  std::vector<TensorRule> rules;
  std::vector<ExpertRule> expert_rules;
  std::optional<RoutingProfile> profile;
};

struct PathBytes {
  double gpu = 0;   // GPU memory reads (weights + cache)
  double cpu = 0;   // host memory read by the CPU
  double pcie = 0;  // host -> GPU link (streamed weights + activations of CPU work)
};

struct Loc {
  Place place = Place::Gpu;
  int dev = 0;  // Gpu: GPU index; host places: NUMA node, -1 = spread over all nodes
};
// As the plan file writes it: "gpu:G", "cpu:N", "stream:N", "mixed:N"; "cpu:*" = spread.
std::string loc_string(const Loc& l);

struct LayoutResult {
  std::string name;
  std::string miss_path;  // hot-cache layouts: "cpu" or "stream"
  std::vector<int> gpus;  // GPUs used
  bool fits = false;
  std::string reason;            // why it does not fit
  std::vector<double> gpu_gib;   // per machine GPU: weights + cache for ctx
  std::vector<double> host_gib;  // per NUMA node
  PathBytes per_token;           // batch 1
  PathBytes per_step_b4;         // one step of 4 sequences
  double decode_tps_b1 = 0, decode_tps_b4 = 0, prefill_tps = 0;
  int64_t max_context = 0;
  double hit_rate = -1;  // hot-cache layouts: share of routed bytes per token served from GPU memory
  uint64_t cached_bytes = 0;
  // Placement: per tensor of the model, one Loc (routed tensors: one per expert); empty for
  // tensors left out (the MTP layer with mtp = false).
  std::vector<std::vector<Loc>> loc;
  std::vector<int> layer_gpu;  // per layer (main + MTP): the GPU that runs it (-1: CPU)
};

struct Plan {
  PlanModel model;
  Machine machine;
  PlanOptions options;
  std::vector<LayoutResult> layouts;
  int chosen = -1;  // index into layouts; -1 when none fits
};

// Validates the rules and the profile against the model (each rule must match something;
// expert indices must exist), then evaluates every layout. Deterministic.
Plan make_plan(const PlanModel& model, const Machine& machine, const PlanOptions& opt);

std::string format_plan_table(const Plan& p);
// {model, machine, layouts: [{name, gpus, bytes_per_token: {gpu, cpu, pcie}, decode_tps_b1,
// decode_tps_b4, prefill_tps, max_context, fits, ...}], chosen}
nlohmann::ordered_json plan_summary_json(const Plan& p);
// The plan file (--out) for --plan and bench_model (plan/plan_file.h reads it): a layout's placement of every tensor and
// expert (docs/planner.md, "Plan file"). `layout` indexes p.layouts; -1: the chosen one.
nlohmann::ordered_json plan_file_json(const Plan& p, int layout = -1);

}  // namespace bigmoe::plan
