#include "engine/routing_stats.h"

#include <algorithm>
#include <fstream>
#include <numeric>
#include <sstream>

#include <nlohmann/json.hpp>

#include "util/error.h"

namespace bigmoe {

void RoutingStats::add(int layer, const int* ids, int k) {
  if (k != top_k_) fail("routing stats: {} experts for one token, expected top_k {}", k, top_k_);
  auto& c = counts_[layer];
  if (c.empty()) c.assign(size_t(n_experts_), 0);
  for (int i = 0; i < k; ++i) {
    if (ids[i] < 0 || ids[i] >= n_experts_) fail("routing stats: expert id {} outside 0..{}", ids[i], n_experts_ - 1);
    ++c[size_t(ids[i])];
  }
  if (first_layer_ < 0) first_layer_ = layer;
  if (layer == first_layer_) ++tokens_;
}

void RoutingStats::add_counts(int layer, const std::vector<uint64_t>& counts, uint64_t tokens) {
  if (counts.size() != size_t(n_experts_))
    fail("routing stats: layer {}: {} counts, expected n_experts {}", layer, counts.size(), n_experts_);
  const uint64_t picks = std::accumulate(counts.begin(), counts.end(), uint64_t(0));
  if (picks != tokens * uint64_t(top_k_))
    fail("routing stats: layer {}: {} picks for {} tokens of top_k {}", layer, picks, tokens, top_k_);
  auto& c = counts_[layer];
  if (c.empty()) c.assign(size_t(n_experts_), 0);
  for (size_t e = 0; e < counts.size(); ++e) c[e] += counts[e];
  if (first_layer_ < 0) first_layer_ = layer;
  if (layer == first_layer_) tokens_ += tokens;
}

std::vector<int> RoutingStats::hottest(int layer, int n) const {
  std::vector<int> idx(static_cast<size_t>(n_experts_));
  std::iota(idx.begin(), idx.end(), 0);
  auto it = counts_.find(layer);
  if (it != counts_.end()) {
    const auto& c = it->second;
    std::stable_sort(idx.begin(), idx.end(), [&](int a, int b) { return c[size_t(a)] > c[size_t(b)]; });
  }
  idx.resize(size_t(std::clamp(n, 0, n_experts_)));
  return idx;
}

double RoutingStats::hit_rate(int layer, const std::vector<int>& cached) const {
  auto it = counts_.find(layer);
  if (it == counts_.end()) return 1.0;
  uint64_t total = 0, hit = 0;
  for (uint64_t v : it->second) total += v;
  std::vector<bool> in(size_t(n_experts_), false);
  for (int e : cached)
    if (e >= 0 && e < n_experts_) in[size_t(e)] = true;
  for (int e = 0; e < n_experts_; ++e)
    if (in[size_t(e)]) hit += it->second[size_t(e)];
  return total ? double(hit) / double(total) : 1.0;
}

double RoutingStats::hit_rate_top(int n) const {
  uint64_t total = 0, hit = 0;
  for (const auto& [layer, c] : counts_) {
    for (uint64_t v : c) total += v;
    for (int e : hottest(layer, n)) hit += c[size_t(e)];
  }
  return total ? double(hit) / double(total) : 1.0;
}

std::string RoutingStats::to_json() const {
  nlohmann::ordered_json j;
  j["format"] = "bigmoe-routing-profile";
  j["version"] = 1;
  j["model"] = model;
  j["n_experts"] = n_experts_;
  j["top_k"] = top_k_;
  j["tokens"] = tokens_;
  j["layers"] = nlohmann::ordered_json::array();
  for (const auto& [layer, c] : counts_) j["layers"].push_back({{"layer", layer}, {"counts", c}});
  return j.dump(1);
}

RoutingStats RoutingStats::from_json(const std::string& text, const std::string& source) {
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(text);
  } catch (const std::exception& e) {
    fail("{}: not JSON: {}", source, e.what());
  }
  auto need = [&](const nlohmann::json& o, const char* key, const std::string& where) -> const nlohmann::json& {
    if (!o.is_object() || !o.contains(key)) fail("{}: missing field '{}'{}", source, key, where);
    return o.at(key);
  };
  if (!j.is_object() || need(j, "format", "") != "bigmoe-routing-profile")
    fail("{}: field 'format' is not \"bigmoe-routing-profile\"", source);
  if (need(j, "version", "") != 1) fail("{}: unsupported version {}", source, j.at("version").dump());
  const auto& E = need(j, "n_experts", ""), &K = need(j, "top_k", ""), &N = need(j, "tokens", "");
  if (!E.is_number_integer() || E.get<int64_t>() < 1 || E.get<int64_t>() > 65536)
    fail("{}: field 'n_experts' must be an integer in 1..65536", source);
  if (!K.is_number_integer() || K.get<int64_t>() < 1 || K.get<int64_t>() > E.get<int64_t>())
    fail("{}: field 'top_k' must be an integer in 1..n_experts", source);
  if (!N.is_number_unsigned() && !(N.is_number_integer() && N.get<int64_t>() >= 0))
    fail("{}: field 'tokens' must be a non-negative integer", source);
  RoutingStats r(E.get<int>(), K.get<int>());
  r.tokens_ = N.get<uint64_t>();
  if (j.contains("model") && j["model"].is_string()) r.model = j["model"].get<std::string>();
  const auto& layers = need(j, "layers", "");
  if (!layers.is_array()) fail("{}: field 'layers' must be an array", source);
  for (size_t i = 0; i < layers.size(); ++i) {
    const std::string where = fmt::format(" in layers[{}]", i);
    const auto& L = need(layers[i], "layer", where);
    const auto& C = need(layers[i], "counts", where);
    if (!L.is_number_integer() || L.get<int64_t>() < 0) fail("{}: 'layer'{} must be a non-negative integer", source, where);
    if (!C.is_array() || C.size() != size_t(r.n_experts_))
      fail("{}: 'counts'{} must be an array of n_experts ({}) integers", source, where, r.n_experts_);
    std::vector<uint64_t> c(C.size());
    for (size_t e = 0; e < C.size(); ++e) {
      if (!C[e].is_number_integer() || C[e].get<int64_t>() < 0)
        fail("{}: 'counts'{}[{}] must be a non-negative integer", source, where, e);
      c[e] = C[e].get<uint64_t>();
    }
    const int layer = L.get<int>();
    if (r.counts_.count(layer)) fail("{}: layer {} appears twice", source, layer);
    r.counts_[layer] = std::move(c);
  }
  return r;
}

RoutingStats RoutingStats::load(const std::filesystem::path& file) {
  std::ifstream in(file, std::ios::binary);
  if (!in) fail("{}: cannot open", file.string());
  std::stringstream ss;
  ss << in.rdbuf();
  return from_json(ss.str(), file.string());
}

void RoutingStats::save(const std::filesystem::path& file) const {
  std::ofstream out(file, std::ios::binary);
  if (!out) fail("{}: cannot write", file.string());
  out << to_json() << "\n";
  if (!out) fail("{}: write failed", file.string());
}

}  // namespace bigmoe
