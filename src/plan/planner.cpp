#include "plan/planner.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <numeric>

#include "io/gguf.h"
#include "io/safetensors.h"
#include "tensor/quant.h"
#include "util/error.h"

namespace bigmoe::plan {

using nlohmann::json;
namespace fs = std::filesystem;

namespace {
constexpr double kGiB = double(1ull << 30);
}

const char* place_name(Place p) {
  switch (p) {
    case Place::Gpu:
      return "gpu";
    case Place::Cpu:
      return "cpu";
    case Place::Stream:
      return "stream";
    case Place::Mixed:
      return "mixed";
  }
  return "?";
}

const char* tensor_class_name(TensorClass c) {
  switch (c) {
    case TensorClass::Embedding:
      return "embedding";
    case TensorClass::Head:
      return "head";
    case TensorClass::OutputNorm:
      return "output_norm";
    case TensorClass::Attention:
      return "attention";
    case TensorClass::Indexer:
      return "indexer";
    case TensorClass::DenseMlp:
      return "dense_mlp";
    case TensorClass::Router:
      return "router";
    case TensorClass::SharedExpert:
      return "shared_expert";
    case TensorClass::RoutedExpert:
      return "routed_expert";
    case TensorClass::Mtp:
      return "mtp";
    case TensorClass::Other:
      return "other";
  }
  return "?";
}

uint64_t PlanModel::total_bytes() const {
  uint64_t s = 0;
  for (auto& t : tensors) s += t.bytes;
  return s;
}

// ---------------------------------------------------------------------------------------------
// Model byte accounting

namespace {

// Storage of one weight format. HF formats follow model/inspect.cpp's accounting exactly
// (test_planner checks the totals against inspect_config); GGUF types store every matrix in
// the type (rows falling back to Q8_0, then F16, where the row length is not a multiple of the
// block, as llama.cpp does) and norms, biases and the router in F32.
struct Fmt {
  enum Kind { Fp8, Bf16, Int4, Gguf } kind = Fp8;
  GgmlType type = GgmlType::F32;

  uint64_t lin(uint64_t out, uint64_t in) const {
    uint64_t n = out * in;
    switch (kind) {
      case Fp8:
        return n + 4 * ((out + 127) / 128) * ((in + 127) / 128);
      case Bf16:
        return 2 * n;
      case Int4:
        return n / 2 + 2 * out * ((in + 127) / 128);
      case Gguf: {
        GgmlType t = type;
        auto bs = [](GgmlType x) { return ggml_type_traits(uint32_t(x))->block_size; };
        if (int64_t(in) % bs(t)) t = int64_t(in) % 32 == 0 ? GgmlType::Q8_0 : GgmlType::F16;
        return out * ggml_row_size(t, int64_t(in));
      }
    }
    return 0;
  }
  // Matrices the HF checkpoints keep in BF16 (embeddings, head, indexer weights_proj).
  uint64_t keep(uint64_t out, uint64_t in) const { return kind == Gguf ? lin(out, in) : 2 * out * in; }
  uint64_t router(uint64_t out, uint64_t in) const { return (kind == Gguf ? 4 : 2) * out * in; }
  uint64_t norm(uint64_t n) const { return (kind == Gguf ? 4 : 2) * n; }
};

Fmt parse_fmt(const std::string& s, const char* what) {
  if (s == "fp8") return {Fmt::Fp8};
  if (s == "bf16") return {Fmt::Bf16};
  if (s == "int4") return {Fmt::Int4};
  std::string up = s;
  for (auto& ch : up) ch = char(std::toupper((unsigned char)ch));
  for (uint32_t t = 0; t < 64; ++t) {
    auto tr = ggml_type_traits(t);
    if (!tr || ggml_type_name(GgmlType(t)) != up) continue;
    if (t >= uint32_t(GgmlType::I8) && t <= uint32_t(GgmlType::F64))
      fail("{} '{}': integer / F64 types are not weight formats", what, s);
    return {Fmt::Gguf, GgmlType(t)};
  }
  fail("{} '{}': unknown weight format (expected fp8, bf16, int4 or a GGUF type such as q4_k, q8_0)", what, s);
}

struct Emitter {
  PlanModel& m;
  Fmt f, fe;  // all weights / routed experts

  void add(std::string name, std::string alias, int layer, TensorClass cls, uint64_t bytes, uint64_t params,
           int n_experts = 0) {
    m.tensors.push_back({std::move(name), std::move(alias), layer, cls, bytes, params, n_experts});
  }
};

// The model-level fields of a plan, and which layers cache an indexer key (Di floats).
void fill_from_config(PlanModel& m, const ModelConfig& c) {
  m.n_layers = c.num_hidden_layers;
  m.n_mtp = c.num_nextn_predict_layers;
  m.hidden = c.hidden_size;
  m.vocab = c.vocab_size;
  m.n_experts = c.n_routed_experts;
  m.top_k = c.num_experts_per_tok;
  m.max_context = c.max_position_embeddings;
  m.kv_latent = c.kv_lora_rank + c.qk_rope_head_dim;
  m.index_topk = c.has_indexer ? c.index_topk : 0;
  m.kv_index.clear();
  for (int i = 0; i < c.n_layers_total(); ++i)
    m.kv_index.push_back(c.has_indexer && !c.indexer_shared[i] ? c.index_head_dim : 0);
}

}  // namespace

PlanModel plan_model_from_config(const ModelConfig& c, const WeightSpec& w, const std::string& source) {
  PlanModel m;
  Emitter E{m, parse_fmt(w.weights, "--weights"),
            parse_fmt(w.expert_weights.empty() ? w.weights : w.expert_weights, "--expert-weights")};
  m.source = source;
  m.format = w.expert_weights.empty() ? fmt::format("config ({})", w.weights)
                                      : fmt::format("config ({}, experts {})", w.weights, w.expert_weights);
  fill_from_config(m, c);

  const uint64_t d = c.hidden_size, V = c.vocab_size, H = c.num_attention_heads;
  const Fmt& f = E.f;
  E.add("token_embd.weight", "model.embed_tokens.weight", -1,
        c.tie_word_embeddings ? TensorClass::Head : TensorClass::Embedding, f.keep(V, d), V * d);
  if (!c.tie_word_embeddings) E.add("output.weight", "lm_head.weight", -1, TensorClass::Head, f.keep(V, d), V * d);
  E.add("output_norm.weight", "model.norm.weight", -1, TensorClass::OutputNorm, f.norm(d), d);

  for (int i = 0; i < c.n_layers_total(); ++i) {
    std::string p = fmt::format("blk.{}.", i), h = fmt::format("model.layers.{}.", i);
    auto lin = [&](const char* g, const char* hf, TensorClass cls, uint64_t out, uint64_t in) {
      E.add(p + g, h + hf, i, cls, f.lin(out, in), out * in);
    };
    auto norm = [&](const char* g, const char* hf, TensorClass cls, uint64_t n) {
      E.add(p + g, h + hf, i, cls, f.norm(n), n);
    };
    const TensorClass A = TensorClass::Attention;
    norm("attn_norm.weight", "input_layernorm.weight", A, d);
    norm("ffn_norm.weight", "post_attention_layernorm.weight", A, d);
    if (c.q_lora_rank > 0) {
      lin("attn_q_a.weight", "self_attn.q_a_proj.weight", A, c.q_lora_rank, d);
      norm("attn_q_a_norm.weight", "self_attn.q_a_layernorm.weight", A, c.q_lora_rank);
      lin("attn_q_b.weight", "self_attn.q_b_proj.weight", A, H * c.qk_head_dim(), c.q_lora_rank);
    } else {
      lin("attn_q.weight", "self_attn.q_proj.weight", A, H * c.qk_head_dim(), d);
    }
    lin("attn_kv_a_mqa.weight", "self_attn.kv_a_proj_with_mqa.weight", A, c.kv_lora_rank + c.qk_rope_head_dim, d);
    norm("attn_kv_a_norm.weight", "self_attn.kv_a_layernorm.weight", A, c.kv_lora_rank);
    lin("attn_kv_b.weight", "self_attn.kv_b_proj.weight", A, H * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank);
    lin("attn_output.weight", "self_attn.o_proj.weight", A, d, H * c.v_head_dim);
    if (m.kv_index[size_t(i)] > 0) {
      const TensorClass X = TensorClass::Indexer;
      const uint64_t Hi = c.index_n_heads, Di = c.index_head_dim;
      lin("indexer.attn_q_b.weight", "self_attn.indexer.wq_b.weight", X, Hi * Di, c.q_lora_rank);
      lin("indexer.attn_k.weight", "self_attn.indexer.wk.weight", X, Di, d);
      norm("indexer.k_norm.weight", "self_attn.indexer.k_norm.weight", X, Di);
      norm("indexer.k_norm.bias", "self_attn.indexer.k_norm.bias", X, Di);
      E.add(p + "indexer.proj.weight", h + "self_attn.indexer.weights_proj.weight", i, X, f.keep(Hi, d), Hi * d);
    }
    if (!c.layer_is_moe[i]) {
      const TensorClass D = TensorClass::DenseMlp;
      lin("ffn_gate.weight", "mlp.gate_proj.weight", D, c.intermediate_size, d);
      lin("ffn_up.weight", "mlp.up_proj.weight", D, c.intermediate_size, d);
      lin("ffn_down.weight", "mlp.down_proj.weight", D, d, c.intermediate_size);
    } else {
      const uint64_t Ex = c.n_routed_experts, I = c.moe_intermediate_size;
      E.add(p + "ffn_gate_inp.weight", h + "mlp.gate.weight", i, TensorClass::Router, f.router(Ex, d), Ex * d);
      E.add(p + "exp_probs_b.bias", h + "mlp.gate.e_score_correction_bias", i, TensorClass::Router, 4 * Ex, Ex);
      uint64_t Is = I * c.n_shared_experts;
      if (Is) {
        const TensorClass S = TensorClass::SharedExpert;
        lin("ffn_gate_shexp.weight", "mlp.shared_experts.gate_proj.weight", S, Is, d);
        lin("ffn_up_shexp.weight", "mlp.shared_experts.up_proj.weight", S, Is, d);
        lin("ffn_down_shexp.weight", "mlp.shared_experts.down_proj.weight", S, d, Is);
      }
      auto routed = [&](const char* g, const char* hf, uint64_t out, uint64_t in) {
        E.add(p + g, h + hf, i, TensorClass::RoutedExpert, Ex * E.fe.lin(out, in), Ex * out * in, int(Ex));
      };
      routed("ffn_gate_exps.weight", "mlp.experts.gate_proj", I, d);
      routed("ffn_up_exps.weight", "mlp.experts.up_proj", I, d);
      routed("ffn_down_exps.weight", "mlp.experts.down_proj", d, I);
    }
    if (i >= c.num_hidden_layers) {
      const TensorClass M = TensorClass::Mtp;
      norm("nextn.enorm.weight", "enorm.weight", M, d);
      norm("nextn.hnorm.weight", "hnorm.weight", M, d);
      norm("nextn.shared_head_norm.weight", "shared_head.norm.weight", M, d);
      lin("nextn.eh_proj.weight", "eh_proj.weight", M, d, 2 * d);
    }
  }
  return m;
}

namespace {

// HF checkpoint name -> GGUF-style name and class. `base` is the HF name without its
// ".weight"/".bias" (or scale) suffix; returns false for names it does not know.
struct HfMap {
  std::string name;
  TensorClass cls = TensorClass::Other;
  int layer = -1;
  int expert = -1;
};

bool starts(const std::string& s, const char* p) { return s.rfind(p, 0) == 0; }

bool map_hf(const std::string& base, const std::string& suffix, HfMap& r) {
  if (base == "model.embed_tokens") return r = {"token_embd" + suffix, TensorClass::Embedding}, true;
  if (base == "lm_head") return r = {"output" + suffix, TensorClass::Head}, true;
  if (base == "model.norm") return r = {"output_norm" + suffix, TensorClass::OutputNorm}, true;
  if (!starts(base, "model.layers.")) return false;
  size_t a = std::string("model.layers.").size(), b = base.find('.', a);
  if (b == std::string::npos || b == a) return false;
  int layer = 0;
  for (size_t i = a; i < b; ++i) {
    if (!std::isdigit((unsigned char)base[i])) return false;
    layer = layer * 10 + (base[i] - '0');
  }
  std::string rest = base.substr(b + 1), p = fmt::format("blk.{}.", layer);
  r.layer = layer;
  static const std::pair<const char*, const char*> attn[] = {{"input_layernorm", "attn_norm"},
                                                             {"post_attention_layernorm", "ffn_norm"},
                                                             {"self_attn.q_a_proj", "attn_q_a"},
                                                             {"self_attn.q_a_layernorm", "attn_q_a_norm"},
                                                             {"self_attn.q_b_proj", "attn_q_b"},
                                                             {"self_attn.q_proj", "attn_q"},
                                                             {"self_attn.kv_a_proj_with_mqa", "attn_kv_a_mqa"},
                                                             {"self_attn.kv_a_layernorm", "attn_kv_a_norm"},
                                                             {"self_attn.kv_b_proj", "attn_kv_b"},
                                                             {"self_attn.o_proj", "attn_output"}};
  static const std::pair<const char*, const char*> idx[] = {{"self_attn.indexer.wq_b", "indexer.attn_q_b"},
                                                            {"self_attn.indexer.wk", "indexer.attn_k"},
                                                            {"self_attn.indexer.k_norm", "indexer.k_norm"},
                                                            {"self_attn.indexer.weights_proj", "indexer.proj"}};
  static const std::pair<const char*, const char*> mtp[] = {{"eh_proj", "nextn.eh_proj"},
                                                            {"enorm", "nextn.enorm"},
                                                            {"hnorm", "nextn.hnorm"},
                                                            {"shared_head.norm", "nextn.shared_head_norm"},
                                                            {"shared_head.head", "nextn.shared_head_head"},
                                                            {"embed_tokens", "nextn.embed_tokens"}};
  for (auto& [hf, g] : attn)
    if (rest == hf) return r.name = p + g + suffix, r.cls = TensorClass::Attention, true;
  for (auto& [hf, g] : idx)
    if (rest == hf) return r.name = p + g + suffix, r.cls = TensorClass::Indexer, true;
  for (auto& [hf, g] : mtp)
    if (rest == hf) return r.name = p + g + suffix, r.cls = TensorClass::Mtp, true;
  if (rest == "mlp.gate") return r.name = p + "ffn_gate_inp" + suffix, r.cls = TensorClass::Router, true;
  if (rest == "mlp.gate.e_score_correction_bias")
    return r.name = p + "exp_probs_b.bias", r.cls = TensorClass::Router, true;
  static const char* projs[] = {"gate", "up", "down"};
  for (const char* pr : projs) {
    std::string proj = fmt::format("{}_proj", pr);
    if (rest == "mlp.shared_experts." + proj)
      return r.name = fmt::format("{}ffn_{}_shexp{}", p, pr, suffix), r.cls = TensorClass::SharedExpert, true;
    if (rest == "mlp." + proj)
      return r.name = fmt::format("{}ffn_{}{}", p, pr, suffix), r.cls = TensorClass::DenseMlp, true;
    if (starts(rest, "mlp.experts.") && rest.size() > proj.size() + 1 &&
        rest.compare(rest.size() - proj.size() - 1, std::string::npos, "." + proj) == 0) {
      std::string num = rest.substr(12, rest.size() - 12 - proj.size() - 1);
      if (num.empty() || !std::all_of(num.begin(), num.end(), ::isdigit)) return false;
      r.expert = std::stoi(num);
      return r.name = fmt::format("{}ffn_{}_exps{}", p, pr, suffix), r.cls = TensorClass::RoutedExpert, true;
    }
  }
  return false;
}


}  // namespace

PlanModel plan_model_from_checkpoint(const fs::path& dir) {
  ModelConfig c = ModelConfig::load(dir / "config.json");
  SafetensorsModel st = SafetensorsModel::open(dir);
  PlanModel m;
  m.source = dir.string();
  m.format = "safetensors";
  fill_from_config(m, c);
  std::map<std::string, size_t> index;
  std::map<size_t, std::vector<bool>> experts_seen;
  for (const std::string& n : st.names()) {
    const TensorView& t = st.get(n);
    // The stored tensor's role: the weight itself, or data that belongs to it (block scales,
    // compressed-tensors' packed int4 + scales + shape).
    std::string base = n, suffix;
    bool aux = false;
    uint64_t params = uint64_t(t.numel());
    static const std::pair<const char*, bool> suffixes[] = {
        {".weight_scale_inv", true}, {".weight_scale", true},   {".weight_shape", true}, {".weight_zero_point", true},
        {".input_scale", true},      {".weight_packed", false}, {".weight", false},      {".bias", false}};
    for (auto& [sfx, is_aux] : suffixes) {
      size_t L = std::strlen(sfx);
      if (n.size() > L && n.compare(n.size() - L, L, sfx) == 0) {
        base = n.substr(0, n.size() - L);
        suffix = std::string(sfx) == ".bias" ? ".bias" : ".weight";
        aux = is_aux;
        if (std::string(sfx) == ".weight_packed" && t.dtype == DType::I32) params *= 8;
        break;
      }
    }
    HfMap h;
    std::string alias;
    if (map_hf(base, suffix, h)) {
      alias = base + suffix;
    } else if (base == n) {
      // e_score_correction_bias and any other name without a known suffix
      if (!map_hf(n, "", h)) {
        h = {n, TensorClass::Other, -1, -1};
        if (starts(n, "model.layers.")) h.layer = std::atoi(n.c_str() + 13);
      }
      alias = n;
    } else {
      h = {base + suffix, TensorClass::Other, -1, -1};
      if (starts(n, "model.layers.")) h.layer = std::atoi(n.c_str() + 13);
    }
    if (h.cls == TensorClass::Embedding && c.tie_word_embeddings) h.cls = TensorClass::Head;
    if (h.cls == TensorClass::RoutedExpert) {
      // experts of a layer and projection pool into one tensor, like GGUF's ffn_*_exps
      size_t dot = alias.find(".experts.");
      size_t end = alias.find('.', dot + 9);
      alias = alias.substr(0, dot + 8) + alias.substr(end, alias.rfind('.') - end);
    }
    if (h.name == alias) alias.clear();
    auto it = index.find(h.name);
    if (it == index.end()) {
      it = index.emplace(h.name, m.tensors.size()).first;
      m.tensors.push_back(
          {h.name, alias, h.layer, h.cls, 0, 0, h.cls == TensorClass::RoutedExpert ? c.n_routed_experts : 0});
    }
    PlanTensor& pt = m.tensors[it->second];
    pt.bytes += t.nbytes;
    if (!aux) pt.params += params;
    if (h.cls == TensorClass::RoutedExpert && !aux) {
      if (h.expert >= c.n_routed_experts)
        fail("{}: tensor '{}' names expert {} but config.json has n_routed_experts = {}", dir.string(), n, h.expert,
             c.n_routed_experts);
      auto& seen = experts_seen[it->second];
      seen.resize(size_t(c.n_routed_experts));
      seen[size_t(h.expert)] = true;
    }
  }
  for (auto& [i, seen] : experts_seen)
    for (size_t e = 0; e < seen.size(); ++e)
      if (!seen[e]) fail("{}: expert {} of '{}' is missing from the checkpoint", dir.string(), e, m.tensors[i].name);
  return m;
}

PlanModel plan_model_from_gguf(const fs::path& file) {
  auto g = GgufFile::open(file);
  std::string arch = g->get_str("general.architecture");
  auto key = [&](const char* k) { return arch + "." + k; };
  PlanModel m;
  m.source = file.string();
  m.format = "gguf";
  int blocks = int(g->get_u32(key("block_count")));
  m.n_mtp = int(g->get_u32(key("nextn_predict_layers"), 0));
  if (m.n_mtp >= blocks)
    fail("{}: '{}' = {} must be below '{}' = {}", m.source, key("nextn_predict_layers"), m.n_mtp, key("block_count"),
         blocks);
  m.n_layers = blocks - m.n_mtp;
  m.hidden = int(g->get_u32(key("embedding_length")));
  m.n_experts = int(g->get_u32(key("expert_count"), 0));
  m.top_k = int(g->get_u32(key("expert_used_count"), 0));
  m.max_context = g->get_u32(key("context_length"), 0);
  int kv_lora = int(g->get_u32(key("attention.kv_lora_rank"), 0));
  if (kv_lora > 0) {
    m.kv_latent = kv_lora + int(g->get_u32(key("rope.dimension_count"), 0));
  } else {
    // plain attention: K and V of every KV head
    int heads = int(g->get_u32(key("attention.head_count")));
    int kv_heads = int(g->get_u32(key("attention.head_count_kv"), uint32_t(heads)));
    int kd = int(g->get_u32(key("attention.key_length"), uint32_t(m.hidden / std::max(1, heads))));
    int vd = int(g->get_u32(key("attention.value_length"), uint32_t(kd)));
    m.kv_latent = kv_heads * (kd + vd);
  }
  int Di = int(g->get_u32(key("attention.indexer.key_length"), 0));
  m.index_topk = int(g->get_u32(key("attention.indexer.top_k"), 0));
  for (int i = 0; i < blocks; ++i)
    m.kv_index.push_back(Di && g->tensor(fmt::format("blk.{}.indexer.attn_k.weight", i)) ? Di : 0);
  bool tied = !g->tensor("output.weight");
  for (const GgufTensorInfo& t : g->tensors()) {
    PlanTensor pt{t.name, "", -1, TensorClass::Other, t.nbytes, uint64_t(t.numel()), 0};
    const std::string& n = t.name;
    if (n == "token_embd.weight") {
      pt.cls = tied ? TensorClass::Head : TensorClass::Embedding;
      if (t.ne.size() == 2) m.vocab = int(t.ne[1]);
    } else if (n == "output.weight") {
      pt.cls = TensorClass::Head;
    } else if (starts(n, "output_norm.")) {
      pt.cls = TensorClass::OutputNorm;
    } else if (starts(n, "blk.")) {
      pt.layer = std::atoi(n.c_str() + 4);
      std::string rest = n.substr(n.find('.', 4) + 1);
      if (starts(rest, "indexer."))
        pt.cls = TensorClass::Indexer;
      else if (starts(rest, "nextn."))
        pt.cls = TensorClass::Mtp;
      else if (starts(rest, "attn_") || starts(rest, "ffn_norm"))
        pt.cls = TensorClass::Attention;
      else if (starts(rest, "ffn_gate_inp") || starts(rest, "exp_probs_b"))
        pt.cls = TensorClass::Router;
      else if (rest.find("_shexp") != std::string::npos)
        pt.cls = TensorClass::SharedExpert;
      else if (rest.find("_exps") != std::string::npos)
        pt.cls = TensorClass::RoutedExpert;
      else if (starts(rest, "ffn_"))
        pt.cls = TensorClass::DenseMlp;
      if (pt.cls == TensorClass::RoutedExpert) {
        if (t.ne.size() != 3 || t.ne[2] != m.n_experts)
          fail("{}: tensor '{}' should stack {} experts along its last dimension ('{}')", m.source, n, m.n_experts,
               key("expert_count"));
        pt.n_experts = m.n_experts;
      }
    }
    m.tensors.push_back(pt);
  }
  return m;
}

PlanModel load_plan_model(const std::string& path, const std::optional<WeightSpec>& w) {
  fs::path p(path);
  std::error_code ec;
  if (!fs::exists(p, ec)) fail("model '{}' does not exist", path);
  if (fs::is_directory(p)) {
    if (w) fail("--weights applies to a bare config.json; '{}' is a checkpoint whose tensors say their format", path);
    if (!fs::exists(p / "config.json")) fail("'{}' has no config.json", path);
    return plan_model_from_checkpoint(p);
  }
  std::string ext = p.extension().string();
  for (auto& ch : ext) ch = char(std::tolower((unsigned char)ch));
  if (ext == ".gguf") {
    if (w) fail("--weights applies to a bare config.json; '{}' is a GGUF file whose tensors say their types", path);
    return plan_model_from_gguf(p);
  }
  if (ext == ".json") {
    if (!w) fail("'{}' is a bare config: give --weights fp8|bf16|int4|<gguf type> to size its tensors", path);
    return plan_model_from_config(ModelConfig::load(p), *w, path);
  }
  fail("model '{}': expected a checkpoint directory, a .gguf file or a config .json", path);
}

// ---------------------------------------------------------------------------------------------
// Rules and routing profiles

namespace {

Place parse_target(const std::string& t, const std::string& rule, const char* opt) {
  if (t == "gpu") return Place::Gpu;
  if (t == "cpu") return Place::Cpu;
  if (t == "stream") return Place::Stream;
  fail("{} '{}': unknown target '{}' (expected gpu, cpu or stream)", opt, rule, t);
}

}  // namespace

TensorRule parse_tensor_rule(const std::string& s) {
  size_t eq = s.rfind('=');
  if (eq == std::string::npos) fail("--rule '{}': expected REGEX=gpu|cpu|stream", s);
  std::string pat = s.substr(0, eq);
  if (pat.empty()) fail("--rule '{}': empty regex", s);
  TensorRule r;
  r.text = s;
  r.target = parse_target(s.substr(eq + 1), s, "--rule");
  try {
    r.re = std::regex(pat, std::regex::ECMAScript);
  } catch (const std::regex_error& e) {
    fail("--rule '{}': bad regex '{}': {}", s, pat, e.what());
  }
  return r;
}

ExpertRule parse_expert_rule(const std::string& s) {
  size_t eq = s.rfind('=');
  if (eq == std::string::npos) fail("--expert-rule '{}': expected GLOB[LIST]=gpu|cpu|stream", s);
  std::string lhs = s.substr(0, eq);
  ExpertRule r;
  r.text = s;
  r.target = parse_target(s.substr(eq + 1), s, "--expert-rule");
  size_t lb = lhs.rfind('[');
  if (lb == std::string::npos || lhs.back() != ']')
    fail("--expert-rule '{}': expected a list of experts in brackets, e.g. blk.10.ffn_*_exps[17,203]", s);
  std::string glob = lhs.substr(0, lb), list = lhs.substr(lb + 1, lhs.size() - lb - 2);
  if (glob.empty()) fail("--expert-rule '{}': empty tensor pattern before '['", s);
  std::string re;
  for (char ch : glob) {
    if (ch == '*')
      re += ".*";
    else if (ch == '?')
      re += '.';
    else if (std::string("\\^$.|+()[]{}").find(ch) != std::string::npos)
      re += std::string("\\") + ch;
    else
      re += ch;
  }
  r.re = std::regex(re);
  if (list.empty()) fail("--expert-rule '{}': empty expert list", s);
  size_t i = 0;
  while (i <= list.size()) {
    size_t j = list.find(',', i);
    if (j == std::string::npos) j = list.size();
    std::string item = list.substr(i, j - i);
    size_t dash = item.find('-', 1);
    auto num = [&](const std::string& x) {
      if (x.empty() || x.size() > 9 || !std::all_of(x.begin(), x.end(), ::isdigit))
        fail("--expert-rule '{}': '{}' is not an expert number or range (e.g. 17 or 0-15)", s, item);
      return std::stoi(x);
    };
    int a = num(item.substr(0, dash)), b = dash == std::string::npos ? a : num(item.substr(dash + 1));
    if (b < a) fail("--expert-rule '{}': range '{}' runs backwards", s, item);
    for (int e = a; e <= b; ++e) r.experts.push_back(e);
    i = j + 1;
  }
  return r;
}

RoutingProfile routing_profile_from_json(const json& j, const std::string& source) {
  // The file `bigmoe profile` writes (engine/routing_stats.h): {"format": "bigmoe-routing-profile",
  // "version": 1, "model", "n_experts", "top_k", "tokens", "layers": [{"layer": L, "counts": [...]}]}
  RoutingProfile p;
  p.source = source;
  if (!j.is_object() || !j.contains("layers") || !j.at("layers").is_array())
    fail("{}: a routing profile is an object with \"layers\": [{{\"layer\": L, \"counts\": [...]}}, ...]", source);
  for (auto& [k, v] : j.items())
    if (k != "layers" && k != "format" && k != "version" && k != "model" && k != "n_experts" && k != "top_k" &&
        k != "tokens")
      fail("{}: unknown field '{}' (known: format, version, model, n_experts, top_k, tokens, layers)", source, k);
  if (j.contains("format") && j.at("format") != "bigmoe-routing-profile")
    fail("{}: 'format' is {}, expected \"bigmoe-routing-profile\"", source, j.at("format").dump());
  const json& layers = j.at("layers");
  for (size_t i = 0; i < layers.size(); ++i) {
    const json& e = layers[i];
    if (!e.is_object() || !e.contains("layer") || !e.at("layer").is_number_integer() || !e.contains("counts") ||
        !e.at("counts").is_array())
      fail("{}: layers[{}] must be {{\"layer\": <integer>, \"counts\": [...]}}", source, i);
    int layer = e.at("layer").get<int>();
    if (layer < 0) fail("{}: layers[{}].layer = {} is negative", source, i, layer);
    if (p.counts.count(layer)) fail("{}: layer {} appears twice", source, layer);
    std::vector<double> c;
    for (auto& x : e.at("counts")) {
      if (!x.is_number() || x.get<double>() < 0)
        fail("{}: layers[{}].counts has '{}', not a count >= 0", source, i, x.dump());
      c.push_back(x.get<double>());
    }
    p.counts[layer] = std::move(c);
  }
  return p;
}

RoutingProfile load_routing_profile(const fs::path& file) {
  std::ifstream in(file);
  if (!in) fail("routing profile '{}' cannot be opened", file.string());
  json j;
  try {
    j = json::parse(in);
  } catch (const json::exception& e) {
    fail("routing profile '{}' is not valid JSON: {}", file.string(), e.what());
  }
  return routing_profile_from_json(j, file.string());
}

KvDtype parse_kv_dtype(const std::string& s) {
  if (s == "f32") return KvDtype::F32;
  if (s == "bf16") return KvDtype::BF16;
  if (s == "fp8") return KvDtype::FP8;
  fail("--kv-dtype '{}': expected f32, bf16 or fp8", s);
}

const char* kv_dtype_name(KvDtype t) { return t == KvDtype::F32 ? "f32" : t == KvDtype::BF16 ? "bf16" : "fp8"; }

// ---------------------------------------------------------------------------------------------
// Layout evaluation

namespace {

enum class NodeMode { Local, Remote, Spread };

struct Spec {
  std::string name;
  bool all_gpu = false, cpu_only = false, hot = false;
  Place host = Place::Cpu;  // default place of host-resident routed experts
  NodeMode mode = NodeMode::Local;
};

// Everything the layouts share: the model's tensors by slot, rule decisions, selection
// probabilities, cache sizes, capacities. Slot 0 holds token_embd, slots 1..L the layers (main +
// MTP), slot L+1 the final norm, the head and any other global tensor.
struct Ctx {
  const PlanModel& m;
  const Machine& mc;
  const PlanOptions& o;
  int L = 0, S = 0, N = 0;
  std::vector<int> slot;                                  // per tensor; -1 = left out
  std::vector<std::optional<Place>> rule_t;               // per tensor
  std::vector<std::vector<std::optional<Place>>> rule_e;  // per tensor, per expert (routed only)
  std::vector<std::vector<double>> q;                     // per layer, per expert
  std::vector<double> kv_res;                             // per slot: resident cache bytes per token of context
  std::vector<double> kv_read;                            // per slot: cache bytes read per decoded token at ctx
  std::vector<bool> decoded;                              // per slot: read when decoding a token (MTP layers: no)
  std::vector<double> gpu_cap, host_cap;                  // bytes

  Ctx(const PlanModel& m_, const Machine& mc_, const PlanOptions& o_) : m(m_), mc(mc_), o(o_) {}

  int units(size_t t) const { return std::max(1, m.tensors[t].n_experts); }
  double qof(size_t t, int e) const {
    const PlanTensor& pt = m.tensors[t];
    return pt.layer >= 0 && pt.layer < L ? q[size_t(pt.layer)][size_t(e)] : 0.0;
  }
  // Share of a unit's bytes that B tokens read (routed: P(picked by any of B); embedding: B rows).
  double frac(size_t t, int e, double B) const {
    const PlanTensor& pt = m.tensors[t];
    if (pt.cls == TensorClass::RoutedExpert) return 1.0 - std::pow(1.0 - qof(t, e), B);
    if (pt.cls == TensorClass::Embedding) return std::min(1.0, B / std::max(1, m.vocab));
    return 1.0;
  }
  double node_share(int n) const {  // spread placement: in proportion to read bandwidth
    double s = 0;
    for (auto& x : mc.nodes) s += x.read_gbps;
    return mc.nodes[size_t(n)].read_gbps / s;
  }
};

struct Acc {  // bytes per step on each path of one slot
  double gpu = 0;
  std::vector<double> cpu, stream, mixed;
  explicit Acc(int N = 0) : cpu(size_t(N)), stream(size_t(N)), mixed(size_t(N)) {}
};

void assign_slots(const Ctx& c, const std::vector<double>& w, const std::vector<int>& gpus,
                  std::vector<int>& slot_gpu) {
  std::vector<double> cap;
  for (int g : gpus) cap.push_back(std::max(0.0, c.gpu_cap[size_t(g)]));
  double C = std::accumulate(cap.begin(), cap.end(), 0.0), W = std::accumulate(w.begin(), w.end(), 0.0);
  if (C <= 0) std::fill(cap.begin(), cap.end(), 1.0), C = double(cap.size());
  std::vector<double> bound;
  double run = 0;
  for (double x : cap) bound.push_back(W * (run += x) / C);
  double cum = 0;
  for (size_t s = 0; s < w.size(); ++s) {
    double mid = cum + w[s] / 2;
    size_t i = 0;
    while (i + 1 < bound.size() && mid > bound[i] * (1 + 1e-12)) ++i;
    slot_gpu[s] = gpus[i];
    cum += w[s];
  }
}

LayoutResult evaluate(const Ctx& c, const Spec& s, const std::vector<int>& gpus, Place miss) {
  const PlanModel& m = c.m;
  const Machine& mc = c.mc;
  const size_t T = m.tensors.size();
  const int N = c.N;
  const double ctx = double(c.o.ctx);
  LayoutResult r;
  r.name = s.name;
  r.gpus = gpus;
  if (s.hot) r.miss_path = place_name(miss);
  r.gpu_gib.assign(mc.gpus.size(), 0.0);
  r.host_gib.assign(size_t(N), 0.0);
  r.loc.resize(T);
  r.layer_gpu.assign(size_t(c.L), -1);
  const Place host_default = s.hot ? miss : s.host;

  // 1. What each tensor / expert wants: a rule's target, else the layout's default.
  std::vector<std::vector<bool>> pinned(T);
  for (size_t t = 0; t < T; ++t) {
    if (c.slot[t] < 0) continue;
    const PlanTensor& pt = m.tensors[t];
    int n = c.units(t);
    r.loc[t].assign(size_t(n), Loc{});
    pinned[t].assign(size_t(n), false);
    for (int e = 0; e < n; ++e) {
      std::optional<Place> p;
      if (!c.rule_e[t].empty()) p = c.rule_e[t][size_t(e)];
      if (!p) p = c.rule_t[t];
      pinned[t][size_t(e)] = p.has_value();
      if (!p) {
        if (s.cpu_only)
          p = Place::Cpu;
        else if (pt.cls == TensorClass::RoutedExpert && !s.all_gpu)
          p = host_default;
        else if (pt.cls == TensorClass::Embedding)
          p = Place::Cpu;  // a row per token: not worth GPU memory
        else
          p = Place::Gpu;
      }
      if (s.cpu_only && *p != Place::Cpu) {
        r.reason =
            fmt::format("tensor '{}' is pinned to {} by a rule; this layout uses no GPU", pt.name, place_name(*p));
        return r;
      }
      r.loc[t][size_t(e)].place = *p;
    }
  }
  if (!s.cpu_only && gpus.empty()) {
    r.reason = "the machine has no GPU";
    return r;
  }

  // 2. Slots to GPUs, contiguous, in proportion to GPU memory.
  std::vector<int> slot_gpu(size_t(c.S), -1);
  std::vector<double> gpu_w(size_t(c.S), 0.0);  // GPU-resident weight bytes per slot
  for (size_t t = 0; t < T; ++t) {
    if (c.slot[t] < 0) continue;
    double ub = double(m.tensors[t].bytes) / c.units(t);
    for (auto& l : r.loc[t])
      if (l.place == Place::Gpu) gpu_w[size_t(c.slot[t])] += ub;
  }
  if (!s.cpu_only) {
    std::vector<double> w(size_t(c.S));
    for (int sl = 0; sl < c.S; ++sl) w[size_t(sl)] = gpu_w[size_t(sl)] + c.kv_res[size_t(sl)] * ctx;
    assign_slots(c, w, gpus, slot_gpu);
  }
  for (int l = 0; l < c.L; ++l) r.layer_gpu[size_t(l)] = slot_gpu[size_t(l + 1)];

  // GPU bytes: weights, and weights + cache for ctx.
  std::vector<double> gw(mc.gpus.size(), 0.0), gkv(mc.gpus.size(), 0.0);
  if (!s.cpu_only)
    for (int sl = 0; sl < c.S; ++sl) {
      gw[size_t(slot_gpu[size_t(sl)])] += gpu_w[size_t(sl)];
      gkv[size_t(slot_gpu[size_t(sl)])] += c.kv_res[size_t(sl)];
    }

  // 3. Hot-expert cache: each GPU's free memory holds the experts routing picks most. Whole
  // experts (every projection of it), since the executor moves an expert, not a projection;
  // an expert a rule pins in any projection is left where the rules put it.
  if (s.hot) {
    struct Cand {
      double q = 0, bytes = 0;
      int layer = 0, expert = 0, gpu = 0;
      bool pinned = false;
      std::vector<size_t> ts;
    };
    std::map<std::pair<int, int>, Cand> by;  // (layer, expert)
    for (size_t t = 0; t < T; ++t) {
      const PlanTensor& pt = m.tensors[t];
      if (c.slot[t] < 0 || pt.cls != TensorClass::RoutedExpert || !c.decoded[size_t(c.slot[t])]) continue;
      for (int e = 0; e < c.units(t); ++e) {
        Cand& x = by[{pt.layer, e}];
        x.q = c.qof(t, e);
        x.layer = pt.layer;
        x.expert = e;
        x.gpu = slot_gpu[size_t(c.slot[t])];
        x.pinned |= pinned[t][size_t(e)] || r.loc[t][size_t(e)].place == Place::Gpu;
        x.bytes += double(m.tensors[t].bytes) / c.units(t);
        x.ts.push_back(t);
      }
    }
    std::vector<std::vector<const Cand*>> cand(mc.gpus.size());
    for (auto& [key, x] : by)
      if (!x.pinned) cand[size_t(x.gpu)].push_back(&x);
    for (int g : gpus) {
      auto& v = cand[size_t(g)];
      std::sort(v.begin(), v.end(), [](const Cand* a, const Cand* b) {
        if (a->q != b->q) return a->q > b->q;
        if (a->layer != b->layer) return a->layer < b->layer;
        return a->expert < b->expert;
      });
      double free = c.gpu_cap[size_t(g)] - gw[size_t(g)] - gkv[size_t(g)] * ctx;
      for (const Cand* x : v) {
        if (x->bytes > free) continue;
        free -= x->bytes;
        gw[size_t(g)] += x->bytes;
        r.cached_bytes += uint64_t(x->bytes);
        for (size_t t : x->ts) r.loc[t][size_t(x->expert)].place = Place::Gpu;
      }
    }
  }
  for (size_t t = 0; t < T; ++t)
    for (auto& l : r.loc[t])
      if (l.place == Place::Gpu) l.dev = slot_gpu[size_t(c.slot[t])];

  // 4. Host-resident bytes to NUMA nodes, a slot at a time (spread: over all nodes).
  std::vector<double> host(size_t(N), 0.0), slot_host(size_t(c.S), 0.0);
  for (size_t t = 0; t < T; ++t) {
    if (c.slot[t] < 0) continue;
    double ub = double(m.tensors[t].bytes) / c.units(t);
    for (auto& l : r.loc[t])
      if (l.place != Place::Gpu) slot_host[size_t(c.slot[t])] += ub;
  }
  const bool spread = s.cpu_only || s.mode == NodeMode::Spread;
  std::vector<int> slot_node(size_t(c.S), -1);
  for (int sl = 0; sl < c.S; ++sl) {
    double b = slot_host[size_t(sl)];
    if (spread) {
      for (int n = 0; n < N; ++n) host[size_t(n)] += b * c.node_share(n);
      continue;
    }
    int g = slot_gpu[size_t(sl)];
    int want = mc.gpus[size_t(g)].numa_node;
    if (s.mode == NodeMode::Remote && N > 1) want = (want + 1) % N;
    int n = want;
    if (b > 0 && host[size_t(n)] + b > c.host_cap[size_t(n)]) {  // spill to the node with most room
      for (int k = 0; k < N; ++k)
        if (c.host_cap[size_t(k)] - host[size_t(k)] > c.host_cap[size_t(n)] - host[size_t(n)]) n = k;
    }
    host[size_t(n)] += b;
    slot_node[size_t(sl)] = n;
  }
  for (size_t t = 0; t < T; ++t)
    for (auto& l : r.loc[t])
      if (l.place != Place::Gpu) l.dev = spread ? -1 : slot_node[size_t(c.slot[t])];
  if (s.cpu_only)  // the cache lives in host memory too
    for (int n = 0; n < N; ++n)
      for (int sl = 0; sl < c.S; ++sl) host[size_t(n)] += c.kv_res[size_t(sl)] * ctx * c.node_share(n);

  // 5. Bytes per step on each path, per slot, for B = 1, B = 4 and a prefill chunk.
  const double Bs[3] = {1, 4, double(c.o.chunk)};
  std::vector<std::array<Acc, 3>> acc(size_t(c.S), {Acc(N), Acc(N), Acc(N)});
  std::vector<double> active(size_t(c.S), 0.0);  // params per token, for prefill FLOPs
  double head_params = 0;
  for (size_t t = 0; t < T; ++t) {
    if (c.slot[t] < 0) continue;
    const PlanTensor& pt = m.tensors[t];
    const int sl = c.slot[t];
    const double ub = double(pt.bytes) / c.units(t), up = double(pt.params) / c.units(t);
    const bool dec = c.decoded[size_t(sl)];
    for (int e = 0; e < c.units(t); ++e) {
      const Loc& l = r.loc[t][size_t(e)];
      if (dec) {
        if (pt.cls == TensorClass::Head)
          head_params += up;
        else if (pt.cls != TensorClass::Embedding)
          active[size_t(sl)] += up * c.frac(t, e, 1);
      }
      for (int k = 0; k < 3; ++k) {
        if (!dec) continue;
        double b = ub * c.frac(t, e, Bs[k]);
        Acc& a = acc[size_t(sl)][size_t(k)];
        auto add = [&](std::vector<double>& v) {
          if (l.dev < 0)
            for (int n = 0; n < N; ++n) v[size_t(n)] += b * c.node_share(n);
          else
            v[size_t(l.dev)] += b;
        };
        if (l.place == Place::Gpu)
          a.gpu += b;
        else if (l.place == Place::Cpu)
          add(a.cpu);
        else if (l.place == Place::Stream)
          add(a.stream);
        else
          add(a.mixed);
      }
    }
  }

  // 6. Times. Decode: per slot, GPU reads + CPU work (nodes in parallel) + streamed bytes +
  // mixed bytes at the sum of the two bandwidths + activations of CPU work over the link.
  double dec_t[2] = {0, 0};
  PathBytes pb[2];
  double pre_t = 0;
  double cpu_tflops = 0, cpu_read = 0;
  for (auto& n : mc.nodes) cpu_tflops += n.tflops, cpu_read += n.read_gbps;
  for (int sl = 0; sl < c.S; ++sl) {
    const int g = slot_gpu[size_t(sl)];
    const GpuSpec* gs = g >= 0 ? &mc.gpus[size_t(g)] : nullptr;
    for (int k = 0; k < 2; ++k) {
      const Acc& a = acc[size_t(sl)][size_t(k)];
      const double B = Bs[k];
      double kvb = c.kv_read[size_t(sl)] * B, t = 0, cpu_max = 0;
      if (s.cpu_only) {
        double tot = kvb;
        for (int n = 0; n < N; ++n) tot += a.cpu[size_t(n)];
        t = tot / (cpu_read * 1e9);
        pb[k].cpu += tot;
      } else {
        t += (a.gpu + kvb) / (gs->mem_gbps * gs->decode_efficiency * 1e9);
        pb[k].gpu += a.gpu + kvb;
        for (int n = 0; n < N; ++n) {
          const double rd = mc.nodes[size_t(n)].read_gbps * 1e9, ln = mc.link_gbps(g, n) * 1e9;
          const double cb = a.cpu[size_t(n)], sb = a.stream[size_t(n)], mb = a.mixed[size_t(n)];
          cpu_max = std::max(cpu_max, cb / rd);
          // Mixed: both paths at once, unless host memory itself (read by the cores and by the
          // link's DMA) is the ceiling.
          const double mem = mc.nodes[size_t(n)].mem_gbps * 1e9;
          t += sb / ln + mb / (mem > 0 ? std::min(rd + ln, mem) : rd + ln);
          // CPU work on routed experts sends the hidden state over and the result back (bf16);
          // the embedding row is a lookup and sends nothing back
          double act = 0;
          if (sl > 0 && sl <= c.L && (cb > 0 || mb > 0)) act = 4.0 * m.hidden * B;
          t += act / ln;
          pb[k].cpu += cb + mb * rd / (rd + ln);
          pb[k].pcie += sb + mb * ln / (rd + ln) + act;
        }
        t += cpu_max;
      }
      dec_t[k] += t;
    }
    // Prefill of one chunk: compute on the GPU (CPU without one), and every host-resident byte
    // the chunk touches crosses the link once (the embedding rows are read by the CPU).
    const Acc& a = acc[size_t(sl)][2];
    const double C = Bs[2];
    if (s.cpu_only) {
      double tot = 0;
      for (int n = 0; n < N; ++n) tot += a.cpu[size_t(n)];
      pre_t += 2 * active[size_t(sl)] * C / (cpu_tflops * 1e12) + tot / (cpu_read * 1e9);
    } else {
      pre_t += 2 * active[size_t(sl)] * C / (gs->tflops * 1e12) + a.gpu / (gs->mem_gbps * 1e9);
      for (int n = 0; n < N; ++n) {
        double hb = a.stream[size_t(n)] + a.mixed[size_t(n)] + (sl == 0 ? 0.0 : a.cpu[size_t(n)]);
        pre_t += hb / (mc.link_gbps(g, n) * 1e9);
        if (sl == 0) pre_t += a.cpu[size_t(n)] / (mc.nodes[size_t(n)].read_gbps * 1e9);
      }
    }
  }
  {
    const int g = slot_gpu[size_t(c.S - 1)];
    pre_t += 2 * head_params / ((s.cpu_only ? cpu_tflops : mc.gpus[size_t(g)].tflops) * 1e12);
  }
  r.per_token = pb[0];
  r.per_step_b4 = pb[1];
  r.decode_tps_b1 = dec_t[0] > 0 ? 1.0 / dec_t[0] : 0;
  r.decode_tps_b4 = dec_t[1] > 0 ? 4.0 / dec_t[1] : 0;
  r.prefill_tps = pre_t > 0 ? Bs[2] / pre_t : 0;

  // Hit rate: routed bytes per token read from GPU memory over all routed bytes per token.
  if (s.hot) {
    double hit = 0, all = 0;
    for (size_t t = 0; t < T; ++t) {
      const PlanTensor& pt = m.tensors[t];
      if (c.slot[t] < 0 || pt.cls != TensorClass::RoutedExpert || !c.decoded[size_t(c.slot[t])]) continue;
      double ub = double(pt.bytes) / c.units(t);
      for (int e = 0; e < c.units(t); ++e) {
        double b = ub * c.qof(t, e);
        all += b;
        if (r.loc[t][size_t(e)].place == Place::Gpu) hit += b;
      }
    }
    r.hit_rate = all > 0 ? hit / all : 0;
  }

  // 7. Memory, fit, and the largest context.
  r.fits = true;
  int64_t maxctx = std::numeric_limits<int64_t>::max();
  if (s.cpu_only) {
    double free = 0, kv = 0;
    for (int n = 0; n < N; ++n) free += c.host_cap[size_t(n)];
    for (int sl = 0; sl < c.S; ++sl) kv += c.kv_res[size_t(sl)];
    for (double h : host) free -= h;
    free += kv * ctx;  // host[] already holds the cache for ctx
    if (kv > 0) maxctx = int64_t(std::floor(std::max(0.0, free) / kv));
  } else {
    for (int g : gpus) {
      double need = gw[size_t(g)] + gkv[size_t(g)] * ctx;
      r.gpu_gib[size_t(g)] = need / kGiB;
      if (need > c.gpu_cap[size_t(g)] && r.fits) {
        r.fits = false;
        r.reason =
            fmt::format("GPU {} needs {:.2f} GiB (weights {:.2f} + cache {:.2f}), {:.2f} GiB usable", g, need / kGiB,
                        gw[size_t(g)] / kGiB, gkv[size_t(g)] * ctx / kGiB, c.gpu_cap[size_t(g)] / kGiB);
      }
      if (gkv[size_t(g)] > 0)
        maxctx =
            std::min(maxctx, int64_t(std::floor(std::max(0.0, c.gpu_cap[size_t(g)] - gw[size_t(g)]) / gkv[size_t(g)])));
    }
  }
  for (int n = 0; n < N; ++n) {
    r.host_gib[size_t(n)] = host[size_t(n)] / kGiB;
    if (host[size_t(n)] > c.host_cap[size_t(n)] * (1 + 1e-12) && r.fits) {
      r.fits = false;
      r.reason = fmt::format("NUMA node {} needs {:.2f} GiB of host memory, {:.2f} GiB usable", n,
                             host[size_t(n)] / kGiB, c.host_cap[size_t(n)] / kGiB);
    }
  }
  if (m.max_context > 0) maxctx = std::min<int64_t>(maxctx, m.max_context);
  if (maxctx == std::numeric_limits<int64_t>::max()) maxctx = int64_t(1) << 31;
  r.max_context = maxctx;
  if (r.fits && maxctx < c.o.ctx) {
    r.fits = false;
    r.reason = fmt::format("only {} tokens of context fit", maxctx);
  }
  return r;
}

bool better(const LayoutResult& a, const LayoutResult& b) {  // a beats b
  if (a.fits != b.fits) return a.fits;
  if (a.decode_tps_b1 != b.decode_tps_b1) return a.decode_tps_b1 > b.decode_tps_b1;
  return a.prefill_tps > b.prefill_tps;
}

}  // namespace

Plan make_plan(const PlanModel& model, const Machine& machine, const PlanOptions& opt) {
  Plan p;
  p.model = model;
  p.machine = machine;
  p.options = opt;
  const PlanModel& m = p.model;
  BIGMOE_CHECK(opt.ctx >= 1, "--ctx must be at least 1 (got {})", opt.ctx);
  BIGMOE_CHECK(opt.chunk >= 1, "--chunk must be at least 1 (got {})", opt.chunk);
  if (m.max_context > 0 && opt.ctx > m.max_context)
    fail("--ctx {} exceeds the model's context of {} tokens", opt.ctx, m.max_context);
  BIGMOE_CHECK(!machine.nodes.empty(), "machine '{}' has no NUMA node", machine.name);

  Ctx c(p.model, p.machine, p.options);
  c.L = m.n_layers_total();
  c.S = c.L + 2;
  c.N = int(machine.nodes.size());
  const size_t T = m.tensors.size();
  BIGMOE_CHECK(int(m.kv_index.size()) == c.L, "model '{}': kv_index has {} entries for {} layers", m.source,
               m.kv_index.size(), c.L);

  // Slots; the MTP layers are left out with mtp = false.
  c.slot.assign(T, -1);
  for (size_t t = 0; t < T; ++t) {
    const PlanTensor& pt = m.tensors[t];
    if (pt.layer >= c.L) fail("model '{}': tensor '{}' is in block {} of {}", m.source, pt.name, pt.layer, c.L);
    if (pt.layer >= m.n_layers && !opt.mtp) continue;
    c.slot[t] = pt.layer >= 0 ? pt.layer + 1 : pt.cls == TensorClass::Embedding ? 0 : c.L + 1;
  }
  c.decoded.assign(size_t(c.S), true);
  for (int l = m.n_layers; l < c.L; ++l) c.decoded[size_t(l + 1)] = false;

  // Rules: first match wins; expert rules before tensor rules. Each must match something.
  c.rule_t.assign(T, std::nullopt);
  c.rule_e.assign(T, {});
  for (const TensorRule& r : opt.rules) {
    int hits = 0;
    for (size_t t = 0; t < T; ++t) {
      if (c.slot[t] < 0) continue;
      const PlanTensor& pt = m.tensors[t];
      if (!std::regex_search(pt.name, r.re) && (pt.alias.empty() || !std::regex_search(pt.alias, r.re))) continue;
      ++hits;
      if (!c.rule_t[t]) c.rule_t[t] = r.target;
    }
    if (!hits) fail("--rule '{}' matches no tensor of {}", r.text, m.source);
  }
  for (const ExpertRule& r : opt.expert_rules) {
    int hits = 0, other = 0;
    for (size_t t = 0; t < T; ++t) {
      if (c.slot[t] < 0) continue;
      const PlanTensor& pt = m.tensors[t];
      std::string stem = pt.name.size() > 7 && pt.name.compare(pt.name.size() - 7, 7, ".weight") == 0
                             ? pt.name.substr(0, pt.name.size() - 7)
                             : pt.name;
      bool match = std::regex_match(pt.name, r.re) || std::regex_match(stem, r.re) ||
                   (!pt.alias.empty() && std::regex_match(pt.alias, r.re));
      if (!match) continue;
      if (pt.cls != TensorClass::RoutedExpert) {
        ++other;
        continue;
      }
      ++hits;
      auto& v = c.rule_e[t];
      v.resize(size_t(pt.n_experts));
      for (int e : r.experts) {
        if (e >= pt.n_experts)
          fail("--expert-rule '{}': expert {} does not exist ('{}' holds {} experts)", r.text, e, pt.name,
               pt.n_experts);
        if (!v[size_t(e)]) v[size_t(e)] = r.target;
      }
    }
    if (!hits)
      fail("--expert-rule '{}' matches no routed-expert tensor of {}{}", r.text, m.source,
           other ? " (it matches other tensors: use --rule for those)" : "");
  }

  // Selection probability of every expert of every layer.
  c.q.assign(size_t(c.L), std::vector<double>(size_t(m.n_experts), m.n_experts ? double(m.top_k) / m.n_experts : 0));
  if (opt.profile) {
    for (auto& [layer, counts] : opt.profile->counts) {
      if (layer < 0 || layer >= c.L)
        fail("{}: layer {} does not exist (the model has {} layers)", opt.profile->source, layer, c.L);
      if (int(counts.size()) != m.n_experts)
        fail("{}: layer {} has {} counts, the model has {} experts", opt.profile->source, layer, counts.size(),
             m.n_experts);
      double sum = std::accumulate(counts.begin(), counts.end(), 0.0);
      if (!(sum > 0)) fail("{}: layer {} has no counts", opt.profile->source, layer);
      for (int e = 0; e < m.n_experts; ++e)
        c.q[size_t(layer)][size_t(e)] = std::min(1.0, m.top_k * counts[size_t(e)] / sum);
    }
  }

  // Cache per token.
  const double eb = opt.kv == KvDtype::F32 ? 4 : opt.kv == KvDtype::BF16 ? 2 : 1;
  c.kv_res.assign(size_t(c.S), 0.0);
  c.kv_read.assign(size_t(c.S), 0.0);
  for (int l = 0; l < c.L; ++l) {
    if (l >= m.n_layers && !opt.mtp) continue;
    c.kv_res[size_t(l + 1)] = eb * (m.kv_latent + m.kv_index[size_t(l)]);
    if (l < m.n_layers) {
      double ctx = double(opt.ctx), att = m.index_topk > 0 ? std::min<double>(ctx, m.index_topk) : ctx;
      c.kv_read[size_t(l + 1)] = eb * (att * m.kv_latent + ctx * m.kv_index[size_t(l)]);
    }
  }

  // Capacities.
  for (auto& g : machine.gpus) {
    double gib = opt.gpu_mem_gib > 0 ? std::min(g.memory_gib, opt.gpu_mem_gib) : g.memory_gib;
    c.gpu_cap.push_back((gib - opt.gpu_reserve_gib) * kGiB);
  }
  double hm = machine.host_memory_gib();
  for (auto& n : machine.nodes) c.host_cap.push_back((n.memory_gib - opt.host_reserve_gib * n.memory_gib / hm) * kGiB);

  // Candidate layouts.
  std::vector<Spec> specs;
  const bool multi = c.N > 1;
  auto nm = [&](const char* base, const char* suffix) {
    return multi ? fmt::format("{}/{}", base, suffix) : std::string(base);
  };
  specs.push_back({"all-gpu", true});
  specs.push_back({nm("experts-cpu", "local"), false, false, false, Place::Cpu, NodeMode::Local});
  if (multi) specs.push_back({"experts-cpu/spread", false, false, false, Place::Cpu, NodeMode::Spread});
  specs.push_back({nm("experts-streamed", "local"), false, false, false, Place::Stream, NodeMode::Local});
  if (multi) specs.push_back({"experts-streamed/remote", false, false, false, Place::Stream, NodeMode::Remote});
  specs.push_back({nm("mixed", "local"), false, false, false, Place::Mixed, NodeMode::Local});
  if (multi) specs.push_back({"mixed/remote", false, false, false, Place::Mixed, NodeMode::Remote});
  specs.push_back({nm("hot-cache", "local"), false, false, true, Place::Cpu, NodeMode::Local});
  specs.push_back({nm("hot-cache-mixed", "local"), false, false, true, Place::Mixed, NodeMode::Local});
  specs.push_back({"cpu-only", false, true});

  // GPU sets: all GPUs; and, where some GPU's host link is under half the best one's (a card
  // on a narrow PCIe link), the GPUs with a fast link.
  std::vector<std::vector<int>> sets;
  std::vector<int> all(machine.gpus.size());
  std::iota(all.begin(), all.end(), 0);
  sets.push_back(all);
  if (!machine.gpus.empty()) {
    double best = 0;
    for (auto& g : machine.gpus) best = std::max(best, g.h2d_gbps);
    std::vector<int> fast;
    for (int g : all)
      if (machine.gpus[size_t(g)].h2d_gbps >= 0.5 * best) fast.push_back(g);
    if (fast.size() != all.size()) sets.push_back(fast);
  }

  for (const Spec& s : specs) {
    std::optional<LayoutResult> best;
    auto consider = [&](LayoutResult r) {
      if (!best || better(r, *best)) best = std::move(r);
    };
    if (s.cpu_only) {
      consider(evaluate(c, s, {}, Place::Cpu));
    } else {
      for (auto& g : sets) {
        if (s.hot && s.host != Place::Mixed) {
          consider(evaluate(c, s, g, Place::Cpu));
          consider(evaluate(c, s, g, Place::Stream));
        } else {
          consider(evaluate(c, s, g, s.host));
        }
      }
    }
    p.layouts.push_back(std::move(*best));
  }
  for (size_t i = 0; i < p.layouts.size(); ++i)
    if (p.layouts[i].fits && (p.chosen < 0 || better(p.layouts[i], p.layouts[size_t(p.chosen)]))) p.chosen = int(i);
  return p;
}

// ---------------------------------------------------------------------------------------------
// Output

namespace {

using ojson = nlohmann::ordered_json;

ojson path_json(const PathBytes& b) { return {{"gpu", b.gpu}, {"cpu", b.cpu}, {"pcie", b.pcie}}; }

ojson layout_json(const LayoutResult& r) {
  ojson j;
  j["name"] = r.name;
  j["gpus"] = r.gpus;
  j["fits"] = r.fits;
  if (!r.reason.empty()) j["reason"] = r.reason;
  double g = 0, h = 0;
  for (double x : r.gpu_gib) g += x;
  for (double x : r.host_gib) h += x;
  j["gpu_gib"] = g;
  j["gpu_gib_per_gpu"] = r.gpu_gib;
  j["host_gib"] = h;
  j["host_gib_per_node"] = r.host_gib;
  j["bytes_per_token"] = path_json(r.per_token);
  j["bytes_per_step_b4"] = path_json(r.per_step_b4);
  j["decode_tps_b1"] = r.decode_tps_b1;
  j["decode_tps_b4"] = r.decode_tps_b4;
  j["prefill_tps"] = r.prefill_tps;
  j["max_context"] = r.max_context;
  if (r.hit_rate >= 0) {
    j["hit_rate"] = r.hit_rate;
    j["cached_gib"] = double(r.cached_bytes) / kGiB;
  }
  if (!r.miss_path.empty()) j["miss_path"] = r.miss_path;
  return j;
}

ojson model_json(const Plan& p) {
  const PlanModel& m = p.model;
  return {{"source", m.source},          {"format", m.format},
          {"layers", m.n_layers},        {"mtp_layers", m.n_mtp},
          {"experts", m.n_experts},      {"top_k", m.top_k},
          {"hidden", m.hidden},          {"gib", double(m.total_bytes()) / kGiB},
          {"max_context", m.max_context}};
}

}  // namespace

std::string loc_string(const Loc& l) {
  if (l.place == Place::Gpu) return fmt::format("gpu:{}", l.dev);
  return l.dev < 0 ? fmt::format("{}:*", place_name(l.place)) : fmt::format("{}:{}", place_name(l.place), l.dev);
}

ojson plan_summary_json(const Plan& p) {
  ojson j;
  j["model"] = model_json(p);
  j["machine"] = {{"name", p.machine.name},
                  {"source", p.machine.source},
                  {"gpus", p.machine.gpus.size()},
                  {"numa_nodes", p.machine.nodes.size()}};
  j["ctx"] = p.options.ctx;
  j["layouts"] = ojson::array();
  for (auto& r : p.layouts) j["layouts"].push_back(layout_json(r));
  j["chosen"] = p.chosen >= 0 ? ojson(p.layouts[size_t(p.chosen)].name) : ojson(nullptr);
  return j;
}

ojson plan_file_json(const Plan& p, int layout) {
  if (layout < 0 && p.chosen < 0) fail("no layout fits: there is no plan to write");
  if (layout >= int(p.layouts.size())) fail("plan_file_json: layout {} of {}", layout, p.layouts.size());
  const LayoutResult& r = p.layouts[size_t(layout < 0 ? p.chosen : layout)];
  const PlanModel& m = p.model;
  ojson j;
  j["bigmoe_plan"] = 1;
  j["model"] = model_json(p);
  j["machine"] = machine_to_json(p.machine);
  j["machine"]["source"] = p.machine.source;
  std::vector<std::string> rules, erules;
  for (auto& x : p.options.rules) rules.push_back(x.text);
  for (auto& x : p.options.expert_rules) erules.push_back(x.text);
  j["options"] = {{"ctx", p.options.ctx},
                  {"kv_dtype", kv_dtype_name(p.options.kv)},
                  {"gpu_mem_gib", p.options.gpu_mem_gib},
                  {"gpu_reserve_gib", p.options.gpu_reserve_gib},
                  {"host_reserve_gib", p.options.host_reserve_gib},
                  {"chunk", p.options.chunk},
                  {"mtp", p.options.mtp},
                  {"rules", rules},
                  {"expert_rules", erules},
                  {"profile", p.options.profile ? ojson(p.options.profile->source) : ojson(nullptr)}};
  j["layout"] = r.name;
  j["prediction"] = layout_json(r);
  j["gpus"] = r.gpus;
  j["layer_gpu"] = r.layer_gpu;
  double kv = 0;
  const double eb = p.options.kv == KvDtype::F32 ? 4 : p.options.kv == KvDtype::BF16 ? 2 : 1;
  for (int l = 0; l < m.n_layers_total(); ++l)
    if (l < m.n_layers || p.options.mtp) kv += eb * (m.kv_latent + m.kv_index[size_t(l)]);
  j["kv_cache"] = {{"dtype", kv_dtype_name(p.options.kv)}, {"context", p.options.ctx}, {"bytes_per_token", kv}};
  // Mixed: the share of a step's host-resident expert bytes the CPU takes, per GPU and node.
  ojson mix = ojson::array();
  for (size_t g = 0; g < p.machine.gpus.size(); ++g) {
    ojson row = ojson::array();
    for (size_t n = 0; n < p.machine.nodes.size(); ++n) {
      double rd = p.machine.nodes[n].read_gbps, ln = p.machine.link_gbps(int(g), int(n));
      row.push_back(rd / (rd + ln));
    }
    mix.push_back(row);
  }
  j["mixed_cpu_fraction"] = mix;
  j["tensors"] = ojson::array();
  j["experts"] = ojson::array();
  for (size_t t = 0; t < m.tensors.size(); ++t) {
    if (r.loc[t].empty()) continue;
    const PlanTensor& pt = m.tensors[t];
    ojson e = {{"name", pt.name}};
    if (!pt.alias.empty()) e["alias"] = pt.alias;
    if (pt.cls == TensorClass::RoutedExpert) {
      e["layer"] = pt.layer;
      std::vector<std::string> places;
      for (auto& l : r.loc[t]) places.push_back(loc_string(l));
      e["places"] = places;
      j["experts"].push_back(e);
    } else {
      e["place"] = loc_string(r.loc[t][0]);
      j["tensors"].push_back(e);
    }
  }
  return j;
}

std::string format_plan_table(const Plan& p) {
  const PlanModel& m = p.model;
  const Machine& mc = p.machine;
  std::string s;
  double kv = 0;
  const double eb = p.options.kv == KvDtype::F32 ? 4 : p.options.kv == KvDtype::BF16 ? 2 : 1;
  for (int l = 0; l < m.n_layers_total(); ++l)
    if (l < m.n_layers || p.options.mtp) kv += eb * (m.kv_latent + m.kv_index[size_t(l)]);
  s += fmt::format("model    {} ({}): {} layers + {} MTP, {} experts top-{}, {:.2f} GiB of weights\n", m.source,
                   m.format, m.n_layers, m.n_mtp, m.n_experts, m.top_k, double(m.total_bytes()) / kGiB);
  s += fmt::format("machine  {} ({}): {} GPU(s), {} NUMA node(s), {:.0f} GiB host memory\n", mc.name, mc.source,
                   mc.gpus.size(), mc.nodes.size(), mc.host_memory_gib());
  for (size_t g = 0; g < mc.gpus.size(); ++g) {
    const GpuSpec& x = mc.gpus[g];
    s += fmt::format("  gpu {}  {}: {:.1f} GiB, {:.0f} GB/s, host link {:.1f} GB/s from node {}, {:.0f} TFLOP/s\n", g,
                     x.name, x.memory_gib, x.mem_gbps, x.h2d_gbps, x.numa_node, x.tflops);
  }
  for (size_t n = 0; n < mc.nodes.size(); ++n)
    s += fmt::format("  node {}  {:.0f} GiB, read {:.0f} GB/s, {} cores\n", n, mc.nodes[n].memory_gib,
                     mc.nodes[n].read_gbps, mc.nodes[n].cores);
  if (mc.nodes.size() > 1) s += fmt::format("  remote host->GPU {:.0f} GB/s\n", mc.remote_h2d_gbps);
  for (auto& n : mc.notes) s += fmt::format("  note: {}\n", n);
  s += fmt::format(
      "context  {} tokens, cache {} ({:.1f} KiB per token); prefill chunk {}{}\n", p.options.ctx,
      kv_dtype_name(p.options.kv), kv / 1024, p.options.chunk,
      p.options.gpu_mem_gib > 0 ? fmt::format("; GPU memory capped at {:.1f} GiB", p.options.gpu_mem_gib) : "");
  s += fmt::format("\n{:<24} {:>6} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>9} {:>8} {:>4}\n", "layout", "GPUs",
                   "GPU GiB", "host GiB", "GB/tok", "GB/tok", "GB/tok", "tok/s", "tok/s", "prefill", "max ctx", "fits");
  s += fmt::format("{:<24} {:>6} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>9} {:>8} {:>4}\n", "", "", "", "", "gpu",
                   "cpu", "pcie", "B=1", "B=4", "tok/s", "", "");
  for (size_t i = 0; i < p.layouts.size(); ++i) {
    const LayoutResult& r = p.layouts[i];
    double g = 0, h = 0;
    for (double x : r.gpu_gib) g += x;
    for (double x : r.host_gib) h += x;
    std::string gpus = r.gpus.empty() ? "-" : fmt::format("{}", fmt::join(r.gpus, ","));
    if (r.decode_tps_b1 <= 0 && !r.fits) {
      s += fmt::format("{:<24} {:>6} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>9} {:>8} {:>4}\n", r.name, gpus, "-",
                       "-", "-", "-", "-", "-", "-", "-", "-", "no");
      continue;
    }
    s += fmt::format(
        "{:<24} {:>6} {:>8.1f} {:>8.1f} {:>8.2f} {:>8.2f} {:>8.2f} {:>8.2f} {:>8.2f} {:>9.0f} {:>8} {:>4}\n", r.name,
        gpus, g, h, r.per_token.gpu / 1e9, r.per_token.cpu / 1e9, r.per_token.pcie / 1e9, r.decode_tps_b1,
        r.decode_tps_b4, r.prefill_tps, r.max_context, r.fits ? (int(i) == p.chosen ? "yes*" : "yes") : "no");
  }
  s += "\n";
  for (auto& r : p.layouts) {
    if (r.hit_rate >= 0)
      s += fmt::format("{}: {:.1f} GiB of experts cached on the GPU, hit rate {:.1f}%{}, misses go to the {}\n", r.name,
                       double(r.cached_bytes) / kGiB, 100 * r.hit_rate,
                       p.options.profile ? " (routing profile)" : " (uniform routing)",
                       r.miss_path == "mixed" ? "CPU and the link in proportion"
                       : r.miss_path == "cpu" ? "CPU"
                                              : "link");
    if (!r.fits) s += fmt::format("{}: does not fit: {}\n", r.name, r.reason);
  }
  if (p.chosen >= 0) {
    const LayoutResult& c = p.layouts[size_t(p.chosen)];
    s += fmt::format(
        "\nchosen: {} ({:.2f} tok/s at batch 1, {:.2f} at batch 4, prefill {:.0f} tok/s, up to {} tokens)\n", c.name,
        c.decode_tps_b1, c.decode_tps_b4, c.prefill_tps, c.max_context);
  } else {
    s += "\nchosen: none — no layout fits (see the reasons above)\n";
  }
  return s;
}

}  // namespace bigmoe::plan
