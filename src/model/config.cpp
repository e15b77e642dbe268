#include "model/config.h"

#include <cmath>
#include <fstream>
#include <optional>

#include <nlohmann/json.hpp>

#include "util/error.h"

namespace bigmoe {

using nlohmann::json;

namespace {

// Typed field access that names the file and the field when something is off.
struct Fields {
  const json& j;
  const std::string& src;

  bool has(const char* k) const { return j.contains(k) && !j.at(k).is_null(); }

  int64_t integer(const char* k, std::optional<int64_t> def = std::nullopt) const {
    if (!has(k)) {
      if (def) return *def;
      fail("{}: missing required field '{}'", src, k);
    }
    const json& v = j.at(k);
    if (!v.is_number_integer()) fail("{}: field '{}' must be an integer, found {}", src, k, v.dump());
    return v.get<int64_t>();
  }
  int pos_int(const char* k, std::optional<int64_t> def = std::nullopt) const {
    int64_t v = integer(k, def);
    if (v < 0 || v > (1 << 30)) fail("{}: field '{}' = {} is out of range", src, k, v);
    return int(v);
  }
  double number(const char* k, double def) const {
    if (!has(k)) return def;
    const json& v = j.at(k);
    if (!v.is_number()) fail("{}: field '{}' must be a number, found {}", src, k, v.dump());
    return v.get<double>();
  }
  bool boolean(const char* k, bool def) const {
    if (!has(k)) return def;
    const json& v = j.at(k);
    if (!v.is_boolean()) fail("{}: field '{}' must be true or false, found {}", src, k, v.dump());
    return v.get<bool>();
  }
  std::string str(const char* k, std::optional<std::string> def = std::nullopt) const {
    if (!has(k)) {
      if (def) return *def;
      fail("{}: missing required field '{}'", src, k);
    }
    const json& v = j.at(k);
    if (!v.is_string()) fail("{}: field '{}' must be a string, found {}", src, k, v.dump());
    return v.get<std::string>();
  }
  std::vector<std::string> strings(const char* k) const {
    const json& v = j.at(k);
    if (!v.is_array()) fail("{}: field '{}' must be a list of strings", src, k);
    std::vector<std::string> out;
    for (auto& e : v) {
      if (!e.is_string()) fail("{}: field '{}' must be a list of strings, found {}", src, k, e.dump());
      out.push_back(e.get<std::string>());
    }
    return out;
  }
};

RopeConfig parse_rope(const json& j, const std::string& src) {
  // transformers >= 5 writes rope_parameters {rope_theta, rope_type, ...}; older configs (and the
  // released DeepSeek/GLM checkpoints) write rope_theta at top level and rope_scaling {type, ...}.
  RopeConfig r;
  Fields top{j, src};
  r.theta = top.number("rope_theta", 10000.0);
  r.interleave = top.boolean("rope_interleave", true);
  const json* p = nullptr;
  if (top.has("rope_parameters")) p = &j.at("rope_parameters");
  else if (top.has("rope_scaling")) p = &j.at("rope_scaling");
  if (!p) return r;
  if (!p->is_object()) fail("{}: rope parameters must be an object", src);
  Fields f{*p, src};
  r.theta = f.number("rope_theta", r.theta);
  std::string type = f.has("rope_type") ? f.str("rope_type") : f.str("type", "default");
  if (type == "default") {
    r.type = RopeType::Default;
  } else if (type == "yarn") {
    r.type = RopeType::Yarn;
    r.factor = f.number("factor", 1.0);
    r.mscale = f.number("mscale", 1.0);
    r.mscale_all_dim = f.number("mscale_all_dim", 0.0);
    r.original_max_position_embeddings = f.number("original_max_position_embeddings", 0.0);
    r.beta_fast = f.number("beta_fast", 32.0);
    r.beta_slow = f.number("beta_slow", 1.0);
    r.truncate = f.boolean("truncate", true);
    if (r.factor < 1.0) fail("{}: yarn rope factor {} must be >= 1", src, r.factor);
    if (r.original_max_position_embeddings <= 0)
      fail("{}: yarn rope needs original_max_position_embeddings", src);
  } else {
    fail("{}: unsupported rope type '{}' (supported: default, yarn)", src, type);
  }
  return r;
}

}  // namespace

double yarn_get_mscale(double scale, double mscale) {
  return scale <= 1.0 ? 1.0 : 0.1 * mscale * std::log(scale) + 1.0;
}

double ModelConfig::attn_scale() const {
  double s = 1.0 / std::sqrt(double(qk_head_dim()));
  if (rope.type == RopeType::Yarn && rope.mscale_all_dim != 0.0) {
    double m = yarn_get_mscale(rope.factor, rope.mscale_all_dim);
    s *= m * m;
  }
  return s;
}

ModelConfig ModelConfig::from_json(const json& j, const std::string& src) {
  if (!j.is_object()) fail("{}: config must be a JSON object", src);
  Fields f{j, src};
  ModelConfig c;
  c.model_type = f.str("model_type");
  if (c.model_type != "glm_moe_dsa" && c.model_type != "deepseek_v32" && c.model_type != "deepseek_v3")
    fail("{}: unsupported model_type '{}' (supported: glm_moe_dsa, deepseek_v32, deepseek_v3)", src,
         c.model_type);

  c.vocab_size = f.pos_int("vocab_size");
  c.hidden_size = f.pos_int("hidden_size");
  c.num_hidden_layers = f.pos_int("num_hidden_layers");
  c.intermediate_size = f.pos_int("intermediate_size");
  c.moe_intermediate_size = f.pos_int("moe_intermediate_size");
  c.n_routed_experts = f.pos_int("n_routed_experts");
  c.num_experts_per_tok = f.pos_int("num_experts_per_tok");
  c.n_shared_experts = f.pos_int("n_shared_experts", 0);
  c.n_group = f.pos_int("n_group", 1);
  c.topk_group = f.pos_int("topk_group", 1);
  c.routed_scaling_factor = f.number("routed_scaling_factor", 1.0);
  c.norm_topk_prob = f.boolean("norm_topk_prob", true);
  c.num_attention_heads = f.pos_int("num_attention_heads");
  c.q_lora_rank = f.pos_int("q_lora_rank", 0);  // null: plain q_proj
  c.kv_lora_rank = f.pos_int("kv_lora_rank");
  c.qk_nope_head_dim = f.pos_int("qk_nope_head_dim");
  c.qk_rope_head_dim = f.pos_int("qk_rope_head_dim");
  c.v_head_dim = f.pos_int("v_head_dim");
  c.rms_norm_eps = f.number("rms_norm_eps", 1e-6);
  c.num_nextn_predict_layers = f.pos_int("num_nextn_predict_layers", 0);
  c.max_position_embeddings = f.pos_int("max_position_embeddings", 4096);
  c.tie_word_embeddings = f.boolean("tie_word_embeddings", false);
  c.rope = parse_rope(j, src);
  c.rope.indexer_interleave = c.model_type == "glm_moe_dsa";

  if (c.hidden_size == 0 || c.num_attention_heads == 0 || c.vocab_size == 0)
    fail("{}: hidden_size, num_attention_heads and vocab_size must be positive", src);
  if (c.qk_rope_head_dim % 2) fail("{}: qk_rope_head_dim {} must be even", src, c.qk_rope_head_dim);
  if (c.n_routed_experts > 0) {
    if (c.num_experts_per_tok == 0 || c.num_experts_per_tok > c.n_routed_experts)
      fail("{}: num_experts_per_tok {} must be in 1..n_routed_experts ({})", src,
           c.num_experts_per_tok, c.n_routed_experts);
    if (c.n_group == 0 || c.n_routed_experts % c.n_group)
      fail("{}: n_routed_experts {} must be divisible by n_group {}", src, c.n_routed_experts, c.n_group);
    if (c.topk_group == 0 || c.topk_group > c.n_group)
      fail("{}: topk_group {} must be in 1..n_group ({})", src, c.topk_group, c.n_group);
    if (c.n_group > 1 && c.n_routed_experts / c.n_group < 2)
      fail("{}: group-limited routing needs at least 2 experts per group", src);
    if (c.num_experts_per_tok > c.topk_group * (c.n_routed_experts / c.n_group))
      fail("{}: num_experts_per_tok {} exceeds the experts in topk_group groups", src, c.num_experts_per_tok);
  }

  // Dense vs MoE per layer: mlp_layer_types (transformers 5) or first_k_dense_replace + moe_layer_freq.
  int L = c.num_hidden_layers;
  if (f.has("mlp_layer_types")) {
    auto t = f.strings("mlp_layer_types");
    if (int(t.size()) != L)
      fail("{}: mlp_layer_types has {} entries, expected num_hidden_layers = {}", src, t.size(), L);
    for (auto& s : t) {
      if (s != "dense" && s != "sparse") fail("{}: mlp_layer_types entry '{}' (expected dense|sparse)", src, s);
      c.layer_is_moe.push_back(s == "sparse");
    }
  } else {
    int k = f.pos_int("first_k_dense_replace", 3);
    int freq = std::max(1, f.pos_int("moe_layer_freq", 1));
    for (int i = 0; i < L; ++i) c.layer_is_moe.push_back(i >= k && i % freq == 0);
  }
  for (int i = 0; i < c.num_nextn_predict_layers; ++i) c.layer_is_moe.push_back(true);
  bool any_moe = false;
  for (bool m : c.layer_is_moe) any_moe |= m;
  if (any_moe && c.n_routed_experts == 0) fail("{}: MoE layers present but n_routed_experts is 0", src);

  c.has_indexer = c.model_type != "deepseek_v3";
  if (c.has_indexer) {
    c.index_n_heads = f.pos_int("index_n_heads");
    c.index_head_dim = f.pos_int("index_head_dim");
    c.index_topk = f.pos_int("index_topk");
    if (c.index_topk == 0) fail("{}: index_topk must be positive", src);
    if (c.index_head_dim < c.qk_rope_head_dim)
      fail("{}: index_head_dim {} smaller than qk_rope_head_dim {}", src, c.index_head_dim, c.qk_rope_head_dim);
    if (f.has("indexer_types")) {
      auto t = f.strings("indexer_types");
      if (int(t.size()) != L)
        fail("{}: indexer_types has {} entries, expected num_hidden_layers = {}", src, t.size(), L);
      for (auto& s : t) {
        if (s != "full" && s != "shared") fail("{}: indexer_types entry '{}' (expected full|shared)", src, s);
        c.indexer_shared.push_back(s == "shared");
      }
    } else {
      // Same schedule transformers derives: recompute at layers offset-1, then every freq layers.
      int freq = std::max(1, f.pos_int("index_topk_freq", 1));
      int offset = f.pos_int("index_skip_topk_offset", 2);
      for (int i = 0; i < L; ++i) c.indexer_shared.push_back(std::max(i - offset + 1, 0) % freq != 0);
    }
    if (L > 0 && c.indexer_shared[0]) fail("{}: layer 0 cannot share the previous layer's top-k", src);
    for (int i = 0; i < c.num_nextn_predict_layers; ++i) c.indexer_shared.push_back(false);
  }

  if (f.has("quantization_config")) {
    const json& q = j.at("quantization_config");
    if (!q.is_object()) fail("{}: quantization_config must be an object, found {}", src, q.dump());
    Fields qf{q, src};
    c.quant.method = qf.str("quant_method", "");
    if (c.quant.method == "fp8") {
      if (qf.has("weight_block_size")) {
        auto& b = q.at("weight_block_size");
        if (!b.is_array() || b.size() != 2 || !b[0].is_number_integer() || !b[1].is_number_integer() ||
            b[0].get<int>() <= 0 || b[1].get<int>() <= 0)
          fail("{}: quantization_config.weight_block_size must be two positive integers", src);
        c.quant.block_out = b[0].get<int>();
        c.quant.block_in = b[1].get<int>();
      }
    } else {
      fail("{}: unsupported quantization_config.quant_method '{}' (supported: fp8)", src, c.quant.method);
    }
  }
  return c;
}

static json read_json_file(const std::filesystem::path& p) {
  std::ifstream in(p);
  if (!in) fail("{}: cannot open", p.string());
  try {
    return json::parse(in);
  } catch (const json::parse_error& e) {
    fail("{}: not valid JSON: {}", p.string(), e.what());
  }
}

ModelConfig ModelConfig::load(const std::filesystem::path& p) {
  json j = read_json_file(p);
  try {
    return from_json(j, p.string());
  } catch (const json::exception& e) {  // e.g. a string where a number belongs
    fail("{}: {}", p.string(), e.what());
  }
}

GenerationConfig GenerationConfig::load(const std::filesystem::path& p) {
  GenerationConfig g;
  if (!std::filesystem::exists(p)) return g;
  json j = read_json_file(p);
  std::string src = p.string();
  Fields f{j, src};
  if (f.has("eos_token_id")) {
    const json& e = j.at("eos_token_id");
    if (e.is_number_integer()) g.eos_token_ids.push_back(e.get<int>());
    else if (e.is_array())
      for (auto& x : e) {
        if (!x.is_number_integer()) fail("{}: eos_token_id entries must be integers", src);
        g.eos_token_ids.push_back(x.get<int>());
      }
    else fail("{}: eos_token_id must be an integer or a list", src);
  }
  g.bos_token_id = int(f.integer("bos_token_id", -1));
  g.temperature = f.number("temperature", 1.0);
  g.top_p = f.number("top_p", 1.0);
  g.top_k = int(f.integer("top_k", 0));
  g.do_sample = f.boolean("do_sample", false);
  return g;
}

}  // namespace bigmoe
