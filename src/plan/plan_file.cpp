#include "plan/plan_file.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <cctype>
#include <cstdint>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>

#include "util/error.h"

namespace bigmoe::plan {

using nlohmann::json;

namespace {

// A field of the document, by path: fails naming the file and the path when it is missing or
// of the wrong type.
struct Reader {
  const std::string& src;

  const json& at(const json& j, const std::string& path, const char* key) const {
    if (!j.is_object() || !j.contains(key)) fail("{}: missing field '{}{}'", src, path.empty() ? "" : path + ".", key);
    return j.at(key);
  }
  std::string str(const json& v, const std::string& path) const {
    if (!v.is_string()) fail("{}: '{}' is {}, expected a string", src, path, v.dump());
    return v.get<std::string>();
  }
  int64_t integer(const json& v, const std::string& path) const {
    if (!v.is_number_integer()) fail("{}: '{}' is {}, expected an integer", src, path, v.dump());
    return v.get<int64_t>();
  }
  double number(const json& v, const std::string& path) const {
    if (!v.is_number()) fail("{}: '{}' is {}, expected a number", src, path, v.dump());
    return v.get<double>();
  }
  const json& array(const json& v, const std::string& path) const {
    if (!v.is_array()) fail("{}: '{}' is {}, expected a list", src, path, v.type_name());
    return v;
  }
};

// "gpu:G", "cpu:N", "stream:N", "mixed:N", or a host place on "*" (spread over all nodes).
std::optional<Loc> parse_loc(const std::string& s) {
  size_t colon = s.find(':');
  if (colon == std::string::npos) return std::nullopt;
  std::string what = s.substr(0, colon), dev = s.substr(colon + 1);
  Loc l;
  if (what == "gpu")
    l.place = Place::Gpu;
  else if (what == "cpu")
    l.place = Place::Cpu;
  else if (what == "stream")
    l.place = Place::Stream;
  else if (what == "mixed")
    l.place = Place::Mixed;
  else
    return std::nullopt;
  if (dev == "*" && l.place != Place::Gpu) {
    l.dev = -1;
    return l;
  }
  if (dev.empty() || dev.size() > 6 || !std::all_of(dev.begin(), dev.end(), [](unsigned char ch) { return std::isdigit(ch); })) return std::nullopt;
  l.dev = std::stoi(dev);
  return l;
}

Loc place_at(const Reader& r, const json& v, const std::string& path) {
  std::string s = r.str(v, path);
  auto l = parse_loc(s);
  if (!l) fail("{}: '{}' = \"{}\": unknown place (expected gpu:G, cpu:N, stream:N, mixed:N or cpu:*)", r.src, path, s);
  return *l;
}

bool same(const Loc& a, const Loc& b) { return a.place == b.place && a.dev == b.dev; }

// "blk.12.ffn_gate_exps.weight" -> 12; -1 for a name without a block.
int block_of(const std::string& name) {
  if (name.rfind("blk.", 0) != 0) return -1;
  size_t i = 4;
  int n = 0;
  while (i < name.size() && std::isdigit((unsigned char)name[i])) n = n * 10 + (name[i++] - '0');
  return i > 4 && i < name.size() && name[i] == '.' ? n : -1;
}

}  // namespace

EnginePlan plan_file_from_json(const json& j, const std::string& source) {
  Reader r{source};
  EnginePlan p;
  p.source = source;
  if (!j.is_object() || !j.contains("bigmoe_plan"))
    fail("{}: not a plan file (no \"bigmoe_plan\" field; `bigmoe plan --out FILE` writes one)", source);
  if (j.at("bigmoe_plan") != 1)
    fail("{}: bigmoe_plan = {}: this engine reads version 1 (plan again with this bigmoe)", source,
         j.at("bigmoe_plan").dump());

  const json& m = r.at(j, "", "model");
  p.model_source = m.contains("source") && m.at("source").is_string() ? m.at("source").get<std::string>() : "";
  p.n_layers = int(r.integer(r.at(m, "model", "layers"), "model.layers"));
  p.n_mtp = int(r.integer(r.at(m, "model", "mtp_layers"), "model.mtp_layers"));
  p.n_experts = int(r.integer(r.at(m, "model", "experts"), "model.experts"));
  p.top_k = int(r.integer(r.at(m, "model", "top_k"), "model.top_k"));
  p.hidden = int(r.integer(r.at(m, "model", "hidden"), "model.hidden"));
  if (p.n_layers < 1 || p.n_mtp < 0 || p.n_experts < 0)
    fail("{}: model.layers = {}, model.mtp_layers = {}, model.experts = {}: not a model", source, p.n_layers, p.n_mtp,
         p.n_experts);
  const int L = p.n_layers + p.n_mtp;
  if (j.contains("machine") && j.at("machine").is_object() && j.at("machine").contains("name") &&
      j.at("machine").at("name").is_string())
    p.machine = j.at("machine").at("name").get<std::string>();

  p.layout = r.str(r.at(j, "", "layout"), "layout");
  const json& gpus = r.array(r.at(j, "", "gpus"), "gpus");
  for (size_t i = 0; i < gpus.size(); ++i) p.gpus.push_back(int(r.integer(gpus[i], fmt::format("gpus[{}]", i))));
  const json& lg = r.array(r.at(j, "", "layer_gpu"), "layer_gpu");
  if (int(lg.size()) != L)
    fail("{}: layer_gpu has {} entries, the plan's model has {} layers ({} + {} MTP)", source, lg.size(), L,
         p.n_layers, p.n_mtp);
  for (size_t i = 0; i < lg.size(); ++i)
    p.layer_gpu.push_back(int(r.integer(lg[i], fmt::format("layer_gpu[{}]", i))));

  const json& kv = r.at(j, "", "kv_cache");
  p.kv_dtype = r.str(r.at(kv, "kv_cache", "dtype"), "kv_cache.dtype");
  p.ctx = r.integer(r.at(kv, "kv_cache", "context"), "kv_cache.context");
  if (p.ctx < 1) fail("{}: kv_cache.context = {}: must be at least 1", source, p.ctx);

  const json& mix = r.array(r.at(j, "", "mixed_cpu_fraction"), "mixed_cpu_fraction");
  for (size_t g = 0; g < mix.size(); ++g) {
    std::string path = fmt::format("mixed_cpu_fraction[{}]", g);
    std::vector<double> row;
    for (size_t n = 0; n < r.array(mix[g], path).size(); ++n) {
      double f = r.number(mix[g][n], fmt::format("{}[{}]", path, n));
      if (f < 0 || f > 1) fail("{}: {}[{}] = {}: a share, expected 0..1", source, path, n, f);
      row.push_back(f);
    }
    p.mixed_cpu_fraction.push_back(std::move(row));
  }

  const json& pr = r.at(j, "", "prediction");
  p.decode_tps_b1 = r.number(r.at(pr, "prediction", "decode_tps_b1"), "prediction.decode_tps_b1");
  p.decode_tps_b4 = r.number(r.at(pr, "prediction", "decode_tps_b4"), "prediction.decode_tps_b4");
  p.prefill_tps = r.number(r.at(pr, "prediction", "prefill_tps"), "prediction.prefill_tps");
  p.max_context = r.integer(r.at(pr, "prediction", "max_context"), "prediction.max_context");
  const json& bpt = r.at(pr, "prediction", "bytes_per_token");
  p.bytes_per_token.gpu = r.number(r.at(bpt, "prediction.bytes_per_token", "gpu"), "prediction.bytes_per_token.gpu");
  p.bytes_per_token.cpu = r.number(r.at(bpt, "prediction.bytes_per_token", "cpu"), "prediction.bytes_per_token.cpu");
  p.bytes_per_token.pcie = r.number(r.at(bpt, "prediction.bytes_per_token", "pcie"), "prediction.bytes_per_token.pcie");
  if (pr.contains("fits") && pr.at("fits").is_boolean()) p.fits = pr.at("fits").get<bool>();
  if (pr.contains("reason") && pr.at("reason").is_string()) p.reason = pr.at("reason").get<std::string>();

  const json& ts = r.array(r.at(j, "", "tensors"), "tensors");
  for (size_t i = 0; i < ts.size(); ++i) {
    std::string path = fmt::format("tensors[{}]", i);
    EnginePlan::Tensor t;
    t.name = r.str(r.at(ts[i], path, "name"), path + ".name");
    if (ts[i].contains("alias")) t.alias = r.str(ts[i].at("alias"), path + ".alias");
    t.loc = place_at(r, r.at(ts[i], path, "place"), fmt::format("{} ({}).place", path, t.name));
    p.tensors.push_back(std::move(t));
  }

  // Routed experts: one entry per layer and projection; the projections of a layer must agree
  // on every expert's place, because the executor moves (and computes) whole experts.
  const json& es = r.array(r.at(j, "", "experts"), "experts");
  p.experts.assign(size_t(L), {});
  std::vector<size_t> first_entry(size_t(L), 0);  // the entry that set a layer's places
  for (size_t i = 0; i < es.size(); ++i) {
    std::string path = fmt::format("experts[{}]", i);
    std::string name = r.str(r.at(es[i], path, "name"), path + ".name");
    std::string what = fmt::format("{} ({})", path, name);
    int64_t layer = r.integer(r.at(es[i], path, "layer"), what + ".layer");
    if (layer < 0 || layer >= L)
      fail("{}: {}.layer = {}: the plan's model has layers 0..{}", source, what, layer, L - 1);
    if (block_of(name) >= 0 && block_of(name) != layer)
      fail("{}: {}.layer = {}, but the name says block {}", source, what, layer, block_of(name));
    const json& places = r.array(r.at(es[i], path, "places"), what + ".places");
    if (int(places.size()) != p.n_experts)
      fail("{}: {}: {} places, model.experts is {}", source, what, places.size(), p.n_experts);
    std::vector<Loc> locs;
    for (size_t e = 0; e < places.size(); ++e)
      locs.push_back(place_at(r, places[e], fmt::format("{}.places[{}]", what, e)));
    auto& have = p.experts[size_t(layer)];
    if (have.empty()) {
      have = std::move(locs);
      first_entry[size_t(layer)] = i;
    } else {
      for (size_t e = 0; e < locs.size(); ++e)
        if (!same(locs[e], have[e]))
          fail("{}: expert {} of layer {} is on {} in experts[{}] ({}) but on {} in {}: the engine moves whole "
               "experts, so the gate, up and down projections of an expert must share a place",
               source, e, layer, loc_string(have[e]), first_entry[size_t(layer)],
               p.expert_tensors[first_entry[size_t(layer)]], loc_string(locs[e]), what);
    }
    p.expert_tensors.push_back(name);
  }

  // The runtime cache (optional): a misspelt key is an error rather than a silent default.
  if (j.contains("expert_cache")) {
    const json& ec = j.at("expert_cache");
    if (!ec.is_object()) fail("{}: 'expert_cache' is {}, expected an object", source, ec.type_name());
    for (const auto& [key, v] : ec.items()) {
      const std::string path = "expert_cache." + key;
      if (key == "slots") {
        const int64_t n = r.integer(v, path);
        if (n < 0 || n > INT32_MAX) fail("{}: {} = {}: expected a slot count >= 0", source, path, n);
        p.cache_slots = int(n);
      } else if (key == "policy") {
        std::string pol = r.str(v, path);
        if (pol != "lru" && pol != "lfu" && pol != "static")
          fail("{}: {} = \"{}\": unknown policy (expected lru, lfu or static)", source, path, pol);
        p.cache_policy = std::move(pol);
      } else if (key == "prefetch") {
        if (!v.is_boolean()) fail("{}: '{}' is {}, expected true or false", source, path, v.dump());
        p.prefetch = v.get<bool>();
      } else {
        fail("{}: '{}': unknown field (expert_cache takes slots, policy and prefetch)", source, path);
      }
    }
  }
  return p;
}

EnginePlan load_plan_file(const std::filesystem::path& file) {
  std::ifstream in(file);
  if (!in) fail("plan file '{}' cannot be opened", file.string());
  json j;
  try {
    j = json::parse(in);
  } catch (const json::exception& e) {
    fail("plan file '{}' is not valid JSON: {}", file.string(), e.what());
  }
  return plan_file_from_json(j, file.string());
}

void check_plan_against(const EnginePlan& p, const ModelConfig& c) {
  const std::string& s = p.source;
  // The model: a plan for another model places tensors that do not exist.
  auto expect = [&](const char* field, int plan, int model, const std::string& has) {
    if (plan != model) fail("{}: {} = {}, the model has {}", s, field, plan, has);
  };
  expect("model.layers", p.n_layers, c.num_hidden_layers, fmt::format("{} main layers", c.num_hidden_layers));
  expect("model.mtp_layers", p.n_mtp, c.num_nextn_predict_layers,
         fmt::format("{} MTP layers", c.num_nextn_predict_layers));
  expect("model.experts", p.n_experts, c.n_routed_experts, fmt::format("{} routed experts", c.n_routed_experts));
  expect("model.top_k", p.top_k, c.num_experts_per_tok, fmt::format("top-{} routing", c.num_experts_per_tok));
  expect("model.hidden", p.hidden, c.hidden_size, fmt::format("hidden size {}", c.hidden_size));
  // (The layers of the expert entries were checked against their names when parsed.)
  for (size_t i = 0; i < p.expert_tensors.size(); ++i) {
    const std::string& n = p.expert_tensors[i];
    if (block_of(n) < 0 || n.find("_exps") == std::string::npos)
      fail("{}: experts[{}] ({}) is not a routed-expert tensor name (blk.N.ffn_*_exps.weight)", s, i, n);
  }
  for (int l = 0; l < c.n_layers_total(); ++l) {
    const bool moe = c.layer_is_moe[size_t(l)], planned = !p.experts[size_t(l)].empty();
    if (planned && !moe) fail("{}: experts: layer {} holds routed experts in the plan, the model's layer {} is dense", s, l, l);
    // An MTP layer may be left out (plan --no-mtp); a main MoE layer may not.
    if (!planned && moe && l < c.num_hidden_layers)
      fail("{}: experts: no entry for layer {}, a MoE layer of the model", s, l);
  }
  for (size_t i = 0; i < p.tensors.size(); ++i) {
    int b = block_of(p.tensors[i].name);
    if (b >= c.n_layers_total())
      fail("{}: tensors[{}] ({}): the model has blocks 0..{}", s, i, p.tensors[i].name, c.n_layers_total() - 1);
  }

  // What this engine runs.
  if (p.gpus.empty() || p.layout == "cpu-only")
    fail("{}: layout '{}' uses no GPU; --plan drives the GPU engine (without --gpu / --plan the model runs on the "
         "CPU)",
         s, p.layout);
  if (p.gpus.size() > 1)
    fail("{}: gpus = [{}]: the plan uses GPUs {}; this engine runs one GPU (plan with a machine file that lists "
         "one)",
         s, fmt::join(p.gpus, ","), fmt::join(p.gpus, ","));
  const int g = p.gpus[0];
  for (size_t l = 0; l < p.layer_gpu.size(); ++l)
    if (p.layer_gpu[l] != g)
      fail("{}: layer_gpu[{}] = {}, the plan runs on GPU {}", s, l, p.layer_gpu[l], g);
  for (size_t i = 0; i < p.tensors.size(); ++i) {
    const auto& t = p.tensors[i];
    if (t.name == "token_embd.weight") continue;  // the engine keeps the embedding on the host anyway
    if (t.loc.place != Place::Gpu)
      fail("{}: tensors[{}] ({}) is on {}: this engine keeps every tensor but the routed experts and the token "
           "embedding on the GPU (a --rule moved it)",
           s, i, t.name, loc_string(t.loc));
    if (t.loc.dev != g) fail("{}: tensors[{}] ({}) is on {}, the plan runs on GPU {}", s, i, t.name, loc_string(t.loc), g);
  }
  for (size_t l = 0; l < p.experts.size(); ++l)
    for (size_t e = 0; e < p.experts[l].size(); ++e) {
      const Loc& x = p.experts[l][e];
      if (x.place == Place::Gpu && x.dev != g)
        fail("{}: expert {} of layer {} is on {}, the plan runs on GPU {}", s, e, l, loc_string(x), g);
    }
  // An error, not a warning: the plan sized the cache (and so what fits beside it) for this
  // dtype, and the engine's cache is f32, 2x or 4x the bytes; the upload would run out of
  // memory, or the plan's context would not be what it says.
  if (p.kv_dtype != "f32")
    fail("{}: kv_cache.dtype = {}: this engine keeps an f32 cache, and the plan's memory and context figures assume "
         "{} (plan again with --kv-dtype f32)",
         s, p.kv_dtype, p.kv_dtype);
}

int EnginePlan::count(Place pl) const {
  int k = 0;
  for (int l = 0; l < n_layers && l < int(experts.size()); ++l)
    for (const Loc& x : experts[size_t(l)]) k += x.place == pl;
  return k;
}

double EnginePlan::mixed_fraction() const {
  if (gpus.empty() || gpus[0] < 0 || size_t(gpus[0]) >= mixed_cpu_fraction.size()) return -1;
  const std::vector<double>& row = mixed_cpu_fraction[size_t(gpus[0])];
  if (row.empty()) return -1;
  double sum = 0;
  int n = 0;
  for (int l = 0; l < n_layers && l < int(experts.size()); ++l)
    for (const Loc& x : experts[size_t(l)]) {
      if (x.place != Place::Mixed) continue;
      double f = 0;
      if (x.dev >= 0 && size_t(x.dev) < row.size()) {
        f = row[size_t(x.dev)];
      } else {  // spread over all nodes
        for (double v : row) f += v;
        f /= double(row.size());
      }
      sum += f;
      ++n;
    }
  return n ? sum / n : -1;
}

std::string EnginePlan::summary() const {
  std::string pred = decode_tps_b1 >= 0 ? fmt::format("{:.2f} tok/s predicted at batch 1", decode_tps_b1)
                                        : std::string("no prediction");
  std::string fit = fits ? "" : fmt::format(" (does not fit: {})", reason);
  std::string cache;
  if (cache_slots) cache += fmt::format(", {} slots", *cache_slots);
  if (cache_policy) cache += ", " + *cache_policy;
  if (prefetch) cache += *prefetch ? ", prefetch on" : ", prefetch off";
  if (!cache.empty()) cache = "; expert cache: " + cache.substr(2);
  return fmt::format("layout {} ({}): {}{}; experts: {} gpu, {} cpu, {} stream, {} mixed{}", layout, source, pred, fit,
                     count(Place::Gpu), count(Place::Cpu), count(Place::Stream), count(Place::Mixed), cache);
}

EnginePlan placement_plan(const ModelConfig& c, const std::string& layout) {
  Loc where;
  if (layout == "all-gpu")
    where = {Place::Gpu, 0};
  else if (layout == "experts-cpu")
    where = {Place::Cpu, 0};
  else if (layout == "experts-streamed")
    where = {Place::Stream, 0};
  else if (layout == "mixed")
    where = {Place::Mixed, 0};
  else
    fail("--placement '{}': unknown (expected {})", layout, fmt::join(kPlacementLayouts, ", "));
  EnginePlan p;
  p.source = "--placement " + layout;
  p.layout = layout;
  p.n_layers = c.num_hidden_layers;
  p.n_mtp = c.num_nextn_predict_layers;
  p.n_experts = c.n_routed_experts;
  p.top_k = c.num_experts_per_tok;
  p.hidden = c.hidden_size;
  p.gpus = {0};
  p.layer_gpu.assign(size_t(c.n_layers_total()), 0);
  p.experts.assign(size_t(c.n_layers_total()), {});
  for (int l = 0; l < c.n_layers_total(); ++l) {
    if (!c.layer_is_moe[size_t(l)]) continue;
    p.experts[size_t(l)].assign(size_t(c.n_routed_experts), where);
    for (const char* proj : {"gate", "up", "down"}) p.expert_tensors.push_back(fmt::format("blk.{}.ffn_{}_exps.weight", l, proj));
  }
  p.kv_dtype = "f32";
  return p;
}

}  // namespace bigmoe::plan
