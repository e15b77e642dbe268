// Loading a GLM-DSA checkpoint: resolve every tensor by its HF name, check its shape, and
// keep views into the mapped files (norm vectors are converted to float32 once).
#include <algorithm>
#include <cmath>

#include <fmt/format.h>

#include "model/glm_dsa.h"
#include "util/error.h"

namespace bigmoe {

namespace {

cpu::Rope make_rope(const ModelConfig& c, bool interleave) {
  cpu::Rope r;
  r.dim = c.qk_rope_head_dim;
  r.interleave = interleave;
  int half = r.dim / 2;
  r.inv_freq.resize(half);
  const RopeConfig& p = c.rope;
  std::vector<float> pos_freq(half);
  for (int j = 0; j < half; ++j) {
    // torch: base ** (arange(0, dim, 2).float() / dim), in float32.
    pos_freq[j] = float(std::pow(p.theta, double(float(2 * j) / float(r.dim))));
    r.inv_freq[j] = 1.0f / pos_freq[j];
  }
  if (p.type == RopeType::Yarn) {
    // transformers' _compute_yarn_parameters: blend interpolated and extrapolated frequencies
    // with a linear ramp between the correction dims, and scale cos/sin by the attention factor.
    auto get_mscale = [](double scale, double m) { return scale <= 1 ? 1.0 : 0.1 * m * std::log(scale) + 1.0; };
    double af = (p.mscale != 0 && p.mscale_all_dim != 0)
                    ? get_mscale(p.factor, p.mscale) / get_mscale(p.factor, p.mscale_all_dim)
                    : get_mscale(p.factor, 1.0);
    r.attention_factor = float(af);
    auto corr_dim = [&](double rot) {
      return (r.dim * std::log(p.original_max_position_embeddings / (rot * 2 * M_PI))) / (2 * std::log(p.theta));
    };
    double low = corr_dim(p.beta_fast), high = corr_dim(p.beta_slow);
    if (p.truncate) { low = std::floor(low); high = std::ceil(high); }
    low = std::max(low, 0.0);
    high = std::min(high, double(r.dim - 1));
    if (low == high) high += 0.001;
    for (int j = 0; j < half; ++j) {
      float extra = 1.0f / pos_freq[j], inter = 1.0f / (float(p.factor) * pos_freq[j]);
      float ramp = std::clamp(float((float(j) - low) / (high - low)), 0.0f, 1.0f);
      float extra_factor = 1.0f - ramp;
      r.inv_freq[j] = inter * (1 - extra_factor) + extra * extra_factor;
    }
  }
  return r;
}

BlockWeights load_block(const WeightLoader& L, const ModelConfig& c, int i, bool indexer_full) {
  std::string p = fmt::format("model.layers.{}.", i);
  int d = c.hidden_size, H = c.num_attention_heads, kv = c.kv_lora_rank, rope = c.qk_rope_head_dim;
  BlockWeights b;
  b.input_norm = L.vec(p + "input_layernorm.weight", d);
  b.post_norm = L.vec(p + "post_attention_layernorm.weight", d);
  MlaWeights& a = b.attn;
  std::string s = p + "self_attn.";
  if (c.q_lora_rank > 0) {
    a.q_a = L.linear(s + "q_a_proj", c.q_lora_rank, d);
    a.q_a_norm = L.vec(s + "q_a_layernorm.weight", c.q_lora_rank);
    a.q_b = L.linear(s + "q_b_proj", H * c.qk_head_dim(), c.q_lora_rank);
  } else {
    a.q_proj = L.linear(s + "q_proj", H * c.qk_head_dim(), d);
  }
  a.kv_a = L.linear(s + "kv_a_proj_with_mqa", kv + rope, d);
  a.kv_a_norm = L.vec(s + "kv_a_layernorm.weight", kv);
  a.kv_b = L.linear(s + "kv_b_proj", H * (c.qk_nope_head_dim + c.v_head_dim), kv);
  a.o = L.linear(s + "o_proj", d, H * c.v_head_dim);
  b.indexer_full = indexer_full;
  if (indexer_full) {
    if (c.q_lora_rank == 0) fail("layer {}: the DSA indexer needs q_lora_rank > 0", i);
    int Hi = c.index_n_heads, Di = c.index_head_dim;
    std::string x = s + "indexer.";
    a.idx_wq_b = L.linear(x + "wq_b", Hi * Di, c.q_lora_rank);
    a.idx_wk = L.linear(x + "wk", Di, d);
    a.idx_k_norm_w = L.vec(x + "k_norm.weight", Di);
    a.idx_k_norm_b = L.vec(x + "k_norm.bias", Di);
    a.idx_weights_proj = L.linear(x + "weights_proj", Hi, d);
  }
  FfnWeights& f = b.ffn;
  std::string m = p + "mlp.";
  f.moe = c.layer_is_moe[i];
  if (!f.moe) {
    f.gate = L.linear(m + "gate_proj", c.intermediate_size, d);
    f.up = L.linear(m + "up_proj", c.intermediate_size, d);
    f.down = L.linear(m + "down_proj", d, c.intermediate_size);
    return b;
  }
  int E = c.n_routed_experts, I = c.moe_intermediate_size;
  f.router = L.linear(m + "gate", E, d);
  f.correction_bias = L.has(m + "gate.e_score_correction_bias")
                          ? L.vec(m + "gate.e_score_correction_bias", E)
                          : std::vector<float>(E, 0.0f);
  for (int e = 0; e < E; ++e) {
    std::string x = fmt::format("{}experts.{}.", m, e);
    f.exp_gate.push_back(L.linear(x + "gate_proj", I, d));
    f.exp_up.push_back(L.linear(x + "up_proj", I, d));
    f.exp_down.push_back(L.linear(x + "down_proj", d, I));
  }
  if (c.n_shared_experts > 0) {
    int Is = I * c.n_shared_experts;
    f.sh_gate = L.linear(m + "shared_experts.gate_proj", Is, d);
    f.sh_up = L.linear(m + "shared_experts.up_proj", Is, d);
    f.sh_down = L.linear(m + "shared_experts.down_proj", d, Is);
  }
  return b;
}

}  // namespace

cpu::Rope glm_dsa_make_rope(const ModelConfig& c, bool interleave) { return make_rope(c, interleave); }

std::unique_ptr<GlmDsaModel> GlmDsaModel::load(const std::filesystem::path& dir) {
  std::unique_ptr<GlmDsaModel> m(new GlmDsaModel());
  if (!std::filesystem::is_directory(dir)) fail("{}: not a model directory", dir.string());
  m->cfg_ = ModelConfig::load(dir / "config.json");
  m->st_ = SafetensorsModel::open(dir);
  const ModelConfig& c = m->cfg_;
  WeightLoader L(m->st_, c.quant.block_out, c.quant.block_in);
  int d = c.hidden_size, V = c.vocab_size;

  m->embed_ = &L.tensor("model.embed_tokens.weight", {V, d});
  m->final_norm_ = L.vec("model.norm.weight", d);
  if (L.has("lm_head.weight")) m->lm_head_ = L.linear("lm_head", V, d);
  else if (c.tie_word_embeddings) m->lm_head_ = L.linear("model.embed_tokens", V, d);
  else fail("{}: tensor 'lm_head.weight' not found (and tie_word_embeddings is false)", dir.string());

  for (int i = 0; i < c.num_hidden_layers; ++i) {
    bool full = c.has_indexer && !c.indexer_shared[i];
    m->layers_.push_back(load_block(L, c, i, full));
  }

  // The MTP layer is stored as layer L. Checkpoints without it (e.g. community INT4 quants)
  // still load; has_mtp() then reports false.
  int Lm = c.num_hidden_layers;
  std::string p = fmt::format("model.layers.{}.", Lm);
  if (c.num_nextn_predict_layers > 0 && L.has(p + "eh_proj.weight")) {
    auto t = std::make_unique<MtpWeights>();
    t->enorm = L.vec(p + "enorm.weight", d);
    t->hnorm = L.vec(p + "hnorm.weight", d);
    t->eh_proj = L.linear(p + "eh_proj", d, 2 * d);
    t->block = load_block(L, c, Lm, c.has_indexer);
    t->head_norm = L.vec(p + "shared_head.norm.weight", d);
    t->head = L.has(p + "shared_head.head.weight") ? L.linear(p + "shared_head.head", V, d) : m->lm_head_;
    m->mtp_ = std::move(t);
  }

  m->rope_ = make_rope(c, c.rope.interleave);
  m->idx_rope_ = make_rope(c, c.rope.indexer_interleave);
  return m;
}

}  // namespace bigmoe
