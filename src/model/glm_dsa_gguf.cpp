// Loading a GLM-DSA model from a GGUF file as llama.cpp / ik_llama.cpp write it (arch
// `glm-dsa`; `deepseek2` is accepted too). The convention is in docs/gguf-glm-dsa.md: the config
// comes from `<arch>.*` metadata, weights are views into the mapped file (merged 3-D expert
// tensors become one view per expert), and kv_b is rebuilt in float32 from the split
// attn_k_b / attn_v_b (or taken from a legacy unsplit attn_kv_b).
#include <algorithm>
#include <cmath>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "model/glm_dsa.h"
#include "util/error.h"

namespace bigmoe {

namespace {

struct GgufSource {
  const GgufFile& f;
  std::string file;
  std::string arch;

  std::string key(const std::string& k) const { return arch + "." + k; }
  bool has_kv(const std::string& k) const { return f.find(key(k)) != nullptr; }
  int u32(const std::string& k) const { return int(f.get_u32(key(k))); }
  int u32(const std::string& k, int def) const { return int(f.get_u32(key(k), uint32_t(def))); }
  float f32(const std::string& k, float def) const { return f.get_f32(key(k), def); }
  float f32(const std::string& k) const { return f.get_f32(key(k)); }
  int pos(const std::string& k) const {
    int v = u32(k);
    if (v <= 0) fail("{}: metadata key '{}' must be positive, found {}", file, key(k), v);
    return v;
  }

  bool has(const std::string& name) const { return f.tensor(name) != nullptr; }
  const GgufTensorInfo& tensor(const std::string& name, std::vector<int64_t> ne) const {
    const GgufTensorInfo* t = f.tensor(name);
    if (!t) fail("{}: tensor '{}' not found", file, name);
    if (t->ne != ne)
      fail("{}: tensor '{}' has shape [{}], expected [{}] (GGUF ne order)", file, name, fmt::join(t->ne, ", "),
           fmt::join(ne, ", "));
    return *t;
  }
  // A 2-D weight of HF shape [out, in] (GGUF ne [in, out]).
  Linear linear(const std::string& name, int out, int in) const {
    return Linear::from_gguf(tensor(name, {in, out}), file);
  }
  std::vector<float> vec(const std::string& name, int n) const {
    const GgufTensorInfo& t = tensor(name, {n});
    std::vector<float> v(n);
    if (!ggml_type_computable(t.type))
      fail("{}: tensor '{}' has type {}, which bigmoe cannot compute yet", file, name, ggml_type_name(t.type));
    dequantize_row(t.type, t.data, v.data(), n);
    return v;
  }
  // Full float32 contents of a tensor (rows of ne[0] elements).
  std::vector<float> floats(const GgufTensorInfo& t) const {
    if (!ggml_type_computable(t.type))
      fail("{}: tensor '{}' has type {}, which bigmoe cannot compute yet", file, t.name, ggml_type_name(t.type));
    size_t rows = size_t(t.numel() / t.ne[0]), rb = ggml_row_size(t.type, t.ne[0]);
    std::vector<float> v(size_t(t.numel()));
    for (size_t r = 0; r < rows; ++r) dequantize_row(t.type, t.data + r * rb, &v[r * t.ne[0]], int(t.ne[0]));
    return v;
  }
};

ModelConfig config_from_gguf(const GgufSource& S) {
  ModelConfig c;
  const bool glm = S.arch == "glm-dsa";
  c.model_type = glm ? "glm_moe_dsa" : "deepseek_v3";
  int n_blocks = S.pos("block_count");
  c.num_nextn_predict_layers = S.u32("nextn_predict_layers", 0);
  if (c.num_nextn_predict_layers >= n_blocks)
    fail("{}: '{}' = {} must be smaller than '{}' = {}", S.file, S.key("nextn_predict_layers"),
         c.num_nextn_predict_layers, S.key("block_count"), n_blocks);
  c.num_hidden_layers = n_blocks - c.num_nextn_predict_layers;
  const int L = c.num_hidden_layers;
  c.hidden_size = S.pos("embedding_length");
  c.max_position_embeddings = S.pos("context_length");
  c.intermediate_size = S.u32("feed_forward_length", 0);
  c.num_attention_heads = S.pos("attention.head_count");
  c.q_lora_rank = S.u32("attention.q_lora_rank", 0);
  c.kv_lora_rank = S.pos("attention.kv_lora_rank");
  c.qk_rope_head_dim = S.pos("rope.dimension_count");
  int k_mla = S.pos("attention.key_length_mla");
  c.v_head_dim = S.pos("attention.value_length_mla");
  if (k_mla <= c.qk_rope_head_dim)
    fail("{}: '{}' = {} must exceed '{}' = {}", S.file, S.key("attention.key_length_mla"), k_mla,
         S.key("rope.dimension_count"), c.qk_rope_head_dim);
  c.qk_nope_head_dim = k_mla - c.qk_rope_head_dim;
  c.rms_norm_eps = S.f32("attention.layer_norm_rms_epsilon");
  c.rope.theta = S.f32("rope.freq_base", 10000.0f);
  // glm-dsa and deepseek2 run ggml's NORM rope: rotation of adjacent pairs, as HF's
  // rope_interleave = true (and the GLM indexer) do; no rows are permuted at conversion.
  c.rope.interleave = true;
  c.rope.indexer_interleave = true;
  std::string scaling = S.f.get_str(S.key("rope.scaling.type"), "none");
  if (scaling == "yarn") {
    c.rope.type = RopeType::Yarn;
    c.rope.factor = S.f32("rope.scaling.factor");
    c.rope.original_max_position_embeddings = S.pos("rope.scaling.original_context_length");
    // llama.cpp stores 0.1 * mscale_all_dim as yarn_log_multiplier (deepseek2 convention).
    double m = S.f32("rope.scaling.yarn_log_multiplier", 0.1f) / 0.1;
    c.rope.mscale = c.rope.mscale_all_dim = m;
    c.rope.beta_fast = S.f32("rope.scaling.yarn_beta_fast", 32.0f);
    c.rope.beta_slow = S.f32("rope.scaling.yarn_beta_slow", 1.0f);
  } else if (scaling != "none") {
    fail("{}: '{}' = '{}' is not supported (none or yarn)", S.file, S.key("rope.scaling.type"), scaling);
  }

  // MoE
  c.n_routed_experts = S.pos("expert_count");
  c.num_experts_per_tok = S.pos("expert_used_count");
  c.n_shared_experts = S.u32("expert_shared_count");
  c.moe_intermediate_size = S.pos("expert_feed_forward_length");
  c.n_group = S.u32("expert_group_count", 1);
  c.topk_group = S.u32("expert_group_used_count", 1);
  if (c.n_group <= 0 || c.n_routed_experts % c.n_group != 0)
    fail("{}: '{}' = {} does not divide '{}' = {}", S.file, S.key("expert_group_count"), c.n_group,
         S.key("expert_count"), c.n_routed_experts);
  c.routed_scaling_factor = S.f32("expert_weights_scale", 1.0f);
  c.norm_topk_prob = S.f.get_bool(S.key("expert_weights_norm"), false);
  // llama.cpp: 1 = softmax, 2 = sigmoid; glm-dsa defaults to sigmoid. The reference forward
  // implements the sigmoid router (with the selection bias) only.
  int gating = S.u32("expert_gating_func", glm ? 2 : 1);
  if (gating != 2)
    fail("{}: '{}' = {} (softmax gating) is not supported; expected 2 (sigmoid)", S.file,
         S.key("expert_gating_func"), gating);
  int lead = S.u32("leading_dense_block_count", 0);
  for (int i = 0; i < L; ++i) c.layer_is_moe.push_back(i >= lead);
  for (int i = 0; i < c.num_nextn_predict_layers; ++i) c.layer_is_moe.push_back(true);
  if (lead > 0 && c.intermediate_size <= 0)
    fail("{}: dense layers present but '{}' is missing or 0", S.file, S.key("feed_forward_length"));

  // DSA indexer
  c.has_indexer = glm || S.has_kv("attention.indexer.head_count");
  if (c.has_indexer) {
    c.index_n_heads = S.pos("attention.indexer.head_count");
    c.index_head_dim = S.pos("attention.indexer.key_length");
    c.index_topk = S.pos("attention.indexer.top_k");
    if (c.index_head_dim < c.qk_rope_head_dim)
      fail("{}: '{}' = {} smaller than '{}' = {}", S.file, S.key("attention.indexer.key_length"), c.index_head_dim,
           S.key("rope.dimension_count"), c.qk_rope_head_dim);
    const GgufValue* types = S.f.find(S.key("attention.indexer.types"));
    if (types) {
      if (types->type != GgufType::ARRAY || (types->elem_type != GgufType::BOOL && !gguf_type_is_int(types->elem_type)))
        fail("{}: metadata key '{}' must be an array of bool or integers", S.file, S.key("attention.indexer.types"));
      if (int(types->count) != L)
        fail("{}: metadata key '{}' has {} entries, expected {} (main layers)", S.file,
             S.key("attention.indexer.types"), types->count, L);
      for (int i = 0; i < L; ++i) {
        bool full = types->elem_type == GgufType::BOOL ? types->raw[i] != 0 : types->int_at(i) != 0;
        c.indexer_shared.push_back(!full);
      }
    } else {
      // Older GGUFs (GLM-5 / 5.1) carry no types: a layer computes its own top-k when it has
      // indexer tensors.
      for (int i = 0; i < L; ++i) c.indexer_shared.push_back(!S.has(fmt::format("blk.{}.indexer.proj.weight", i)));
    }
    if (L > 0 && c.indexer_shared[0])
      fail("{}: layer 0 cannot share the previous layer's top-k ('{}')", S.file, S.key("attention.indexer.types"));
    for (int i = 0; i < c.num_nextn_predict_layers; ++i) c.indexer_shared.push_back(false);
  }

  const GgufTensorInfo* emb = S.f.tensor("token_embd.weight");
  if (!emb) fail("{}: tensor 'token_embd.weight' not found", S.file);
  if (emb->ne.size() != 2) fail("{}: tensor 'token_embd.weight' must be 2-D", S.file);
  c.vocab_size = S.u32("vocab_size", int(emb->ne[1]));
  c.tie_word_embeddings = !S.has("output.weight");
  return c;
}

BlockWeights load_block(const GgufSource& S, const ModelConfig& c, int i, bool indexer_full) {
  std::string p = fmt::format("blk.{}.", i);
  int d = c.hidden_size, H = c.num_attention_heads, kv = c.kv_lora_rank, rope = c.qk_rope_head_dim;
  int nope = c.qk_nope_head_dim, vd = c.v_head_dim;
  BlockWeights b;
  b.input_norm = S.vec(p + "attn_norm.weight", d);
  b.post_norm = S.vec(p + "ffn_norm.weight", d);
  MlaWeights& a = b.attn;
  if (c.q_lora_rank > 0) {
    a.q_a = S.linear(p + "attn_q_a.weight", c.q_lora_rank, d);
    a.q_a_norm = S.vec(p + "attn_q_a_norm.weight", c.q_lora_rank);
    a.q_b = S.linear(p + "attn_q_b.weight", H * c.qk_head_dim(), c.q_lora_rank);
  } else {
    a.q_proj = S.linear(p + "attn_q.weight", H * c.qk_head_dim(), d);
  }
  a.kv_a = S.linear(p + "attn_kv_a_mqa.weight", kv + rope, d);
  a.kv_a_norm = S.vec(p + "attn_kv_a_norm.weight", kv);
  if (S.has(p + "attn_kv_b.weight")) {
    a.kv_b = S.linear(p + "attn_kv_b.weight", H * (nope + vd), kv);  // legacy unsplit form
  } else {
    // attn_k_b: ne [nope, kv, H] = per head W_UK_hᵀ; attn_v_b: ne [kv, v, H] = per head W_UV_h.
    // kv_b row h*(nope+v)+i is W_UK_h row i (k_b column i), row h*(nope+v)+nope+j is W_UV_h row j.
    std::vector<float> kb = S.floats(S.tensor(p + "attn_k_b.weight", {nope, kv, H}));
    std::vector<float> vb = S.floats(S.tensor(p + "attn_v_b.weight", {kv, vd, H}));
    std::vector<float> w(size_t(H) * (nope + vd) * kv);
    for (int h = 0; h < H; ++h) {
      float* head = &w[size_t(h) * (nope + vd) * kv];
      for (int r = 0; r < kv; ++r)
        for (int i2 = 0; i2 < nope; ++i2) head[size_t(i2) * kv + r] = kb[(size_t(h) * kv + r) * nope + i2];
      std::copy_n(&vb[size_t(h) * vd * kv], size_t(vd) * kv, head + size_t(nope) * kv);
    }
    a.kv_b = Linear::from_floats(std::move(w), H * (nope + vd), kv);
  }
  a.o = S.linear(p + "attn_output.weight", d, H * vd);
  b.indexer_full = indexer_full;
  if (indexer_full) {
    if (c.q_lora_rank == 0) fail("{}: layer {}: the DSA indexer needs q_lora_rank > 0", S.file, i);
    int Hi = c.index_n_heads, Di = c.index_head_dim;
    a.idx_wq_b = S.linear(p + "indexer.attn_q_b.weight", Hi * Di, c.q_lora_rank);
    a.idx_wk = S.linear(p + "indexer.attn_k.weight", Di, d);
    a.idx_k_norm_w = S.vec(p + "indexer.k_norm.weight", Di);
    a.idx_k_norm_b = S.vec(p + "indexer.k_norm.bias", Di);
    a.idx_weights_proj = S.linear(p + "indexer.proj.weight", Hi, d);
  }
  FfnWeights& f = b.ffn;
  f.moe = c.layer_is_moe[i];
  if (!f.moe) {
    f.gate = S.linear(p + "ffn_gate.weight", c.intermediate_size, d);
    f.up = S.linear(p + "ffn_up.weight", c.intermediate_size, d);
    f.down = S.linear(p + "ffn_down.weight", d, c.intermediate_size);
    return b;
  }
  int E = c.n_routed_experts, I = c.moe_intermediate_size;
  f.router = S.linear(p + "ffn_gate_inp.weight", E, d);
  f.correction_bias = S.has(p + "exp_probs_b.bias") ? S.vec(p + "exp_probs_b.bias", E) : std::vector<float>(E, 0.0f);
  const GgufTensorInfo& g = S.tensor(p + "ffn_gate_exps.weight", {d, I, E});
  const GgufTensorInfo& u = S.tensor(p + "ffn_up_exps.weight", {d, I, E});
  const GgufTensorInfo& dn = S.tensor(p + "ffn_down_exps.weight", {I, d, E});
  for (int e = 0; e < E; ++e) {
    f.exp_gate.push_back(Linear::from_gguf_expert(g, e, S.file));
    f.exp_up.push_back(Linear::from_gguf_expert(u, e, S.file));
    f.exp_down.push_back(Linear::from_gguf_expert(dn, e, S.file));
  }
  if (c.n_shared_experts > 0) {
    int Is = I * c.n_shared_experts;
    f.sh_gate = S.linear(p + "ffn_gate_shexp.weight", Is, d);
    f.sh_up = S.linear(p + "ffn_up_shexp.weight", Is, d);
    f.sh_down = S.linear(p + "ffn_down_shexp.weight", d, Is);
  }
  return b;
}

}  // namespace

std::unique_ptr<GlmDsaModel> GlmDsaModel::load_gguf(const std::filesystem::path& file) {
  std::unique_ptr<GlmDsaModel> m(new GlmDsaModel());
  m->gguf_ = GgufFile::open(file);
  const GgufFile& f = *m->gguf_;
  GgufSource S{f, file.string(), f.get_str("general.architecture")};
  if (S.arch != "glm-dsa" && S.arch != "deepseek2")
    fail("{}: general.architecture is '{}', expected glm-dsa or deepseek2", S.file, S.arch);
  m->cfg_ = config_from_gguf(S);
  const ModelConfig& c = m->cfg_;
  int d = c.hidden_size, V = c.vocab_size;

  m->embed_rows_ = S.linear("token_embd.weight", V, d);
  m->final_norm_ = S.vec("output_norm.weight", d);
  m->lm_head_ = c.tie_word_embeddings ? m->embed_rows_ : S.linear("output.weight", V, d);

  for (int i = 0; i < c.num_hidden_layers; ++i) {
    bool full = c.has_indexer && !c.indexer_shared[i];
    m->layers_.push_back(load_block(S, c, i, full));
  }

  // The MTP (nextn) block is blk.L; files converted without it still load (has_mtp() false).
  int Lm = c.num_hidden_layers;
  std::string p = fmt::format("blk.{}.", Lm);
  if (c.num_nextn_predict_layers > 0 && S.has(p + "nextn.eh_proj.weight")) {
    auto t = std::make_unique<MtpWeights>();
    t->enorm = S.vec(p + "nextn.enorm.weight", d);
    t->hnorm = S.vec(p + "nextn.hnorm.weight", d);
    t->eh_proj = S.linear(p + "nextn.eh_proj.weight", d, 2 * d);
    t->block = load_block(S, c, Lm, c.has_indexer && S.has(p + "indexer.proj.weight"));
    t->head_norm = S.vec(p + "nextn.shared_head_norm.weight", d);
    t->head = S.has(p + "nextn.shared_head_head.weight") ? S.linear(p + "nextn.shared_head_head.weight", V, d)
                                                          : m->lm_head_;
    m->mtp_ = std::move(t);
  }

  m->rope_ = glm_dsa_make_rope(c, c.rope.interleave);
  m->idx_rope_ = glm_dsa_make_rope(c, c.rope.indexer_interleave);
  return m;
}

}  // namespace bigmoe
