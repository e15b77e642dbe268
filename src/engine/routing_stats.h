// Routing statistics: how often the router of each MoE layer picks each expert. Recorded by the
// model while it runs (GlmDsaModel::set_routing_stats), written by `bigmoe profile` as a routing
// profile, and read back to place the hottest experts in a GPU cache and to predict its hit
// rate (the planner's --profile).
//
// Profile file (JSON): {"format": "bigmoe-routing-profile", "version": 1, "model": NAME,
//   "n_experts": E, "top_k": K, "tokens": N, "layers": [{"layer": L, "counts": [E integers]}, ...]}
// with one entry per MoE layer (the MTP layer, if run, under its layer index).
#pragma once
#include <cstdint>
#include <filesystem>
#include <map>
#include <string>
#include <vector>

namespace bigmoe {

class RoutingStats {
 public:
  RoutingStats() = default;
  RoutingStats(int n_experts, int top_k) : n_experts_(n_experts), top_k_(top_k) {}

  int n_experts() const { return n_experts_; }
  int top_k() const { return top_k_; }
  // Tokens routed through the first MoE layer seen (each token counts once per layer).
  uint64_t tokens() const { return tokens_; }
  void set_tokens(uint64_t n) { tokens_ = n; }
  std::string model;

  // One token's choice at `layer`: top_k expert ids (each < n_experts).
  void add(int layer, const int* ids, int k);
  // Many tokens' choices at `layer` at once (the GPU engine's counts, GlmDsaCuda::
  // flush_routing_stats): counts [n_experts] are added to the layer's, and `tokens` count
  // toward tokens() as add() counts them (at the first layer seen). Throws naming the layer when
  // counts has another length or does not sum to tokens · top_k.
  void add_counts(int layer, const std::vector<uint64_t>& counts, uint64_t tokens);
  const std::map<int, std::vector<uint64_t>>& layers() const { return counts_; }

  // The n most picked experts of a layer, most picked first (ties: lower id).
  std::vector<int> hottest(int layer, int n) const;
  // Fraction of expert picks at `layer` that fall in `cached` (1 when the layer has no picks).
  double hit_rate(int layer, const std::vector<int>& cached) const;
  // Over all layers, with the n hottest experts of every layer cached.
  double hit_rate_top(int n) const;

  std::string to_json() const;
  // Throws bigmoe::Error naming the file and the field at fault.
  static RoutingStats from_json(const std::string& text, const std::string& source);
  static RoutingStats load(const std::filesystem::path& file);
  void save(const std::filesystem::path& file) const;

 private:
  int n_experts_ = 0, top_k_ = 0;
  uint64_t tokens_ = 0;
  int first_layer_ = -1;
  std::map<int, std::vector<uint64_t>> counts_;
};

}  // namespace bigmoe
