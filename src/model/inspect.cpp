#include "model/inspect.h"

#include <fmt/format.h>

#include <functional>
#include <regex>

#include "util/error.h"

namespace bigmoe {

const char* category_name(Category c) {
  switch (c) {
    case Category::EmbedHead: return "embeddings/head";
    case Category::Attention: return "attention";
    case Category::Indexer: return "DSA indexer";
    case Category::DenseMlp: return "dense MLP";
    case Category::RouterShared: return "router + shared experts";
    case Category::RoutedExperts: return "routed experts (incl. MTP layer's)";
    case Category::Mtp: return "MTP layer (rest)";
    case Category::Other: return "other";
    case Category::kCount: break;
  }
  return "?";
}

Category classify_tensor(const std::string& name, const ModelConfig& cfg) {
  static const std::regex layer_re(R"(^model\.layers\.(\d+)\.(.*)$)");
  std::smatch m;
  if (!std::regex_match(name, m, layer_re)) {
    if (name.rfind("model.embed_tokens.", 0) == 0 || name.rfind("lm_head.", 0) == 0 || name.rfind("model.norm.", 0) == 0)
      return Category::EmbedHead;
    return Category::Other;
  }
  int layer = std::stoi(m[1]);
  std::string rest = m[2];
  if (rest.find("mlp.experts.") == 0) return Category::RoutedExperts;
  if (layer >= cfg.num_hidden_layers) return Category::Mtp;
  if (rest.find("self_attn.indexer.") == 0) return Category::Indexer;
  if (rest.find("self_attn.") == 0 || rest.find("input_layernorm") == 0 || rest.find("post_attention_layernorm") == 0)
    return Category::Attention;
  if (rest.find("mlp.shared_experts.") == 0 || rest.find("mlp.gate.") == 0) return Category::RouterShared;
  if (rest.find("mlp.") == 0) return Category::DenseMlp;
  return Category::Other;
}

uint64_t ByteReport::total() const {
  uint64_t s = 0;
  for (auto b : bytes) s += b;
  return s;
}

namespace {

bool is_scale(const std::string& n) { return n.size() > 10 && n.find("_scale") != std::string::npos; }

// Weight bytes one token reads: every dense part, k of E routed experts, the head; the
// embedding is a one-row lookup and is left out.
uint64_t active_bytes(const ByteReport& r, const ModelConfig& cfg, uint64_t routed_main_bytes) {
  auto b = [&](Category c) { return r.bytes[size_t(c)]; };
  double routed = cfg.n_routed_experts ? double(routed_main_bytes) * cfg.num_experts_per_tok / cfg.n_routed_experts : 0;
  return b(Category::Attention) + b(Category::Indexer) + b(Category::DenseMlp) + b(Category::RouterShared) +
         uint64_t(routed) + r.head_bytes;
}

}  // namespace

ByteReport inspect_checkpoint(const SafetensorsModel& st, const ModelConfig& cfg) {
  ByteReport r;
  uint64_t routed_main = 0;
  for (const auto& n : st.names()) {
    const TensorView& t = st.get(n);
    Category c = classify_tensor(n, cfg);
    r.bytes[size_t(c)] += t.nbytes;
    if (!is_scale(n)) r.params[size_t(c)] += uint64_t(t.numel());
    r.by_dtype[dtype_name(t.dtype)] += t.nbytes;
    if (n == "lm_head.weight" || (cfg.tie_word_embeddings && n == "model.embed_tokens.weight")) r.head_bytes += t.nbytes;
    if (c == Category::RoutedExperts) {
      int layer = std::stoi(n.substr(std::string("model.layers.").size()));
      if (layer < cfg.num_hidden_layers) routed_main += t.nbytes;
    }
  }
  r.active_per_token = active_bytes(r, cfg, routed_main);
  return r;
}

WeightFormat parse_weight_format(const std::string& s) {
  if (s == "fp8") return WeightFormat::FP8;
  if (s == "bf16") return WeightFormat::BF16;
  if (s == "int4") return WeightFormat::INT4;
  fail("unknown weight format '{}' (expected fp8, bf16 or int4)", s);
}

ByteReport inspect_config(const ModelConfig& c, WeightFormat fmt) {
  ByteReport r;
  uint64_t routed_main = 0;
  // kind: 0 = quantizable linear, 1 = kept bf16 (embeddings, head, router, weights_proj, norms), 2 = fp32
  auto add = [&](Category cat, uint64_t out, uint64_t in, int kind, bool main_routed = false) {
    uint64_t n = out * in, w = 0, sc = 0;
    if (kind == 2) {
      r.by_dtype["F32"] += (w = 4 * n);
    } else if (kind == 1 || fmt == WeightFormat::BF16) {
      r.by_dtype["BF16"] += (w = 2 * n);
    } else if (fmt == WeightFormat::FP8) {
      r.by_dtype["F8_E4M3"] += (w = n);
      r.by_dtype["F32 (block scales)"] += (sc = 4 * ((out + 127) / 128) * ((in + 127) / 128));
    } else {
      r.by_dtype["I32 (packed int4)"] += (w = n / 2);
      r.by_dtype["BF16 (group scales)"] += (sc = 2 * out * ((in + 127) / 128));
    }
    r.bytes[size_t(cat)] += w + sc;
    r.params[size_t(cat)] += n;
    if (main_routed) routed_main += w + sc;
  };
  const uint64_t d = c.hidden_size, V = c.vocab_size, H = c.num_attention_heads;
  add(Category::EmbedHead, V, d, 1);  // embed_tokens
  add(Category::EmbedHead, V, d, 1);  // lm_head
  add(Category::EmbedHead, 1, d, 1);  // final norm
  r.head_bytes = 2 * V * d;
  for (int i = 0; i < c.n_layers_total(); ++i) {
    bool mtp = i >= c.num_hidden_layers;
    auto cat = [&](Category x) { return mtp ? Category::Mtp : x; };
    add(cat(Category::Attention), 2, d, 1);  // input/post norms
    if (c.q_lora_rank > 0) {
      add(cat(Category::Attention), c.q_lora_rank, d, 0);
      add(cat(Category::Attention), 1, c.q_lora_rank, 1);
      add(cat(Category::Attention), H * c.qk_head_dim(), c.q_lora_rank, 0);
    } else {
      add(cat(Category::Attention), H * c.qk_head_dim(), d, 0);
    }
    add(cat(Category::Attention), c.kv_lora_rank + c.qk_rope_head_dim, d, 0);
    add(cat(Category::Attention), 1, c.kv_lora_rank, 1);
    add(cat(Category::Attention), H * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank, 0);
    add(cat(Category::Attention), d, H * c.v_head_dim, 0);
    if (c.has_indexer && !c.indexer_shared[i]) {
      add(cat(Category::Indexer), uint64_t(c.index_n_heads) * c.index_head_dim, c.q_lora_rank, 0);
      add(cat(Category::Indexer), c.index_head_dim, d, 0);
      add(cat(Category::Indexer), 2, c.index_head_dim, 1);
      add(cat(Category::Indexer), c.index_n_heads, d, 1);
    }
    if (!c.layer_is_moe[i]) {
      for (int k = 0; k < 3; ++k) add(cat(Category::DenseMlp), c.intermediate_size, d, 0);
      continue;
    }
    add(cat(Category::RouterShared), c.n_routed_experts, d, 1);
    add(cat(Category::RouterShared), 1, c.n_routed_experts, 2);
    uint64_t Is = uint64_t(c.moe_intermediate_size) * c.n_shared_experts;
    if (Is) {
      add(cat(Category::RouterShared), Is, d, 0);
      add(cat(Category::RouterShared), Is, d, 0);
      add(cat(Category::RouterShared), d, Is, 0);
    }
    for (int e = 0; e < c.n_routed_experts; ++e) {
      add(Category::RoutedExperts, c.moe_intermediate_size, d, 0, !mtp);
      add(Category::RoutedExperts, c.moe_intermediate_size, d, 0, !mtp);
      add(Category::RoutedExperts, d, c.moe_intermediate_size, 0, !mtp);
    }
    if (mtp) {
      add(Category::Mtp, 3, d, 1);      // enorm, hnorm, shared_head.norm
      add(Category::Mtp, d, 2 * d, 0);  // eh_proj
    }
  }
  r.active_per_token = active_bytes(r, c, routed_main);
  return r;
}

std::string format_report(const ByteReport& r, const ModelConfig& c) {
  auto gib = [](uint64_t b) { return double(b) / double(1ull << 30); };
  std::string s;
  s += fmt::format("model_type {}  layers {} (+{} MTP)  d {}  heads {}  vocab {}\n", c.model_type,
                   c.num_hidden_layers, c.num_nextn_predict_layers, c.hidden_size, c.num_attention_heads, c.vocab_size);
  s += fmt::format("MLA q_lora {} kv_lora {} nope {} rope {} v {}  rope {}{}\n", c.q_lora_rank, c.kv_lora_rank,
                   c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim,
                   c.rope.type == RopeType::Yarn ? "yarn" : "default", c.rope.interleave ? " (interleaved)" : "");
  int n_moe = 0;
  for (int i = 0; i < c.num_hidden_layers; ++i) n_moe += c.layer_is_moe[i];
  s += fmt::format("MoE layers {}/{}  experts {} top-{}  shared {}  groups {}/{}  expert width {}  dense width {}\n",
                   n_moe, c.num_hidden_layers, c.n_routed_experts, c.num_experts_per_tok, c.n_shared_experts,
                   c.topk_group, c.n_group, c.moe_intermediate_size, c.intermediate_size);
  if (c.has_indexer) {
    int full = 0;
    for (int i = 0; i < c.num_hidden_layers; ++i) full += !c.indexer_shared[i];
    s += fmt::format("DSA indexer heads {} dim {} top-k {}  full layers {}/{}\n", c.index_n_heads, c.index_head_dim,
                     c.index_topk, full, c.num_hidden_layers);
  }
  s += fmt::format("\n{:<36} {:>16} {:>12} {:>12}\n", "category", "params", "bytes", "GiB");
  for (size_t i = 0; i < size_t(Category::kCount); ++i) {
    if (!r.bytes[i] && !r.params[i]) continue;
    s += fmt::format("{:<36} {:>16} {:>12} {:>12.3f}\n", category_name(Category(i)), r.params[i], r.bytes[i], gib(r.bytes[i]));
  }
  s += fmt::format("{:<36} {:>16} {:>12} {:>12.3f}\n", "total", "", r.total(), gib(r.total()));
  s += "\nby dtype\n";
  for (auto& [k, v] : r.by_dtype) s += fmt::format("{:<36} {:>29} {:>12.3f}\n", k, v, gib(v));
  s += fmt::format("\nweight bytes read per decoded token (batch 1, no MTP): {:.2f} GiB\n", gib(r.active_per_token));
  return s;
}

}  // namespace bigmoe
