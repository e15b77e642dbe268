// The GLM-DSA family (GLM-5.x, DeepSeek-V3.2, DeepSeek-V3) on the CPU reference backend:
// float32 math over any stored dtype, written to read like spec/glm-dsa.md §3–§5.
#pragma once
#include <filesystem>
#include <memory>
#include <vector>

#include "backend/cpu/ref_ops.h"
#include "engine/lm.h"
#include "engine/routing_stats.h"
#include "io/gguf.h"
#include "io/safetensors.h"
#include "model/config.h"
#include "model/weights.h"

namespace bigmoe {

// q_a_layernorm / kv_a_layernorm and the indexer's k LayerNorm use the module default eps in
// transformers, not rms_norm_eps.
inline constexpr double kLoraNormEps = 1e-6;
inline constexpr double kIndexerNormEps = 1e-6;

struct MlaWeights {
  Linear q_proj;                        // [H*qk_head, d] when q_lora_rank == 0
  Linear q_a;                           // [q_lora, d]
  std::vector<float> q_a_norm;          // [q_lora]
  Linear q_b;                           // [H*qk_head, q_lora]
  Linear kv_a;                          // [kv_lora + rope, d]
  std::vector<float> kv_a_norm;         // [kv_lora]
  Linear kv_b;                          // [H*(nope + v), kv_lora]
  Linear o;                             // [d, H*v]
  // DSA indexer ("full" layers only)
  Linear idx_wq_b;                      // [Hi*Di, q_lora]
  Linear idx_wk;                        // [Di, d]
  std::vector<float> idx_k_norm_w, idx_k_norm_b;  // [Di]
  Linear idx_weights_proj;              // [Hi, d]
};

struct FfnWeights {
  bool moe = false;
  Linear gate, up, down;                // dense MLP: [inter, d], [inter, d], [d, inter]
  Linear router;                        // [E, d]
  std::vector<float> correction_bias;   // [E]
  std::vector<Linear> exp_gate, exp_up, exp_down;  // E × [moe_inter, d] / [d, moe_inter]
  Linear sh_gate, sh_up, sh_down;       // shared expert, width moe_inter × n_shared
};

struct BlockWeights {
  std::vector<float> input_norm, post_norm;  // [d]
  MlaWeights attn;
  bool indexer_full = false;            // computes its own top-k (else reuses the previous layer's)
  FfnWeights ffn;
};

struct MtpWeights {
  std::vector<float> enorm, hnorm;      // [d]
  Linear eh_proj;                       // [d, 2d]: input is [embedding ; hidden]
  BlockWeights block;
  std::vector<float> head_norm;         // shared_head.norm [d]
  Linear head;                          // shared_head.head or the main lm_head [V, d]
};

// Per-sequence cache of one layer: what the absorbed MLA and the indexer read.
struct LayerCache {
  std::vector<float> latent;  // [n, kv_lora]  c after kv_a_layernorm
  std::vector<float> k_pe;    // [n, rope]     after rope
  std::vector<float> idx_k;   // [n, Di]       indexer key after LayerNorm and rope ("full" layers)
};

struct KVCache {
  std::vector<LayerCache> layers;
  int n = 0;                  // positions cached
  void truncate(int n_keep);
};

// Plain: expand k_nope/v per head through kv_b (prefill form). Absorbed: attend in the latent
// space with q̃ = W_UKᵀ q_nope and expand only the output (decode form). Same math.
enum class AttnForm { Plain, Absorbed };

struct ForwardOut {
  std::vector<float> hidden;  // [T, d] after the final norm (what lm_head reads; MTP's input)
  std::vector<float> logits;  // [T, V]
};

// Rope tables for the main attention / indexer (defined in glm_dsa_load.cpp).
cpu::Rope glm_dsa_make_rope(const ModelConfig& c, bool interleave);

class GlmDsaModel : public LanguageModel {
 public:
  // dir holds config.json, (generation_config.json) and safetensors weights.
  static std::unique_ptr<GlmDsaModel> load(const std::filesystem::path& dir);
  // A GGUF file as llama.cpp / ik_llama.cpp write arch `glm-dsa` (or `deepseek2`); see
  // docs/gguf-glm-dsa.md. Errors name the file and the metadata key or tensor at fault.
  static std::unique_ptr<GlmDsaModel> load_gguf(const std::filesystem::path& file);

  const ModelConfig& config() const { return cfg_; }
  bool has_mtp() const { return mtp_ != nullptr; }
  const GgufFile* gguf() const { return gguf_.get(); }  // null unless loaded by load_gguf

  int vocab_size() const override { return cfg_.vocab_size; }
  int context_length() const override { return cfg_.max_position_embeddings; }
  // Sessions prefill in the plain form and decode single tokens in the absorbed form.
  std::unique_ptr<Session> new_session() const override;

  KVCache new_cache() const { return make_cache(cfg_.num_hidden_layers); }
  KVCache new_mtp_cache() const { return make_cache(1); }

  // Runs tokens at positions cache.n .. cache.n+T-1, appending them to the cache.
  ForwardOut forward(const std::vector<int>& tokens, KVCache& cache, AttnForm form) const;

  // MTP layer over entries (hidden[t], next_tokens[t]) at positions cache.n + t (spec §5):
  // hidden [T, d] are main-model states after the final norm; the entry at position 0 has its
  // embedding zeroed. Returns the MTP logits [T, V] (predictions two tokens ahead).
  ForwardOut mtp_forward(const float* hidden, const std::vector<int>& next_tokens, KVCache& cache,
                         AttnForm form) const;

  // Records every token's expert choice per MoE layer into `stats` (null: off). The MTP layer
  // counts under layer index num_hidden_layers. Not thread-safe: one forward at a time.
  void set_routing_stats(RoutingStats* stats) const { stats_ = stats; }

  // Read access for other backends (the CUDA executor uploads these).
  const std::vector<BlockWeights>& layers() const { return layers_; }
  const std::vector<float>& final_norm() const { return final_norm_; }
  const Linear& lm_head() const { return lm_head_; }
  const cpu::Rope& rope() const { return rope_; }
  const cpu::Rope& indexer_rope() const { return idx_rope_; }
  // The embedding row of `token` as float32 (dst has hidden_size elements).
  void embed(int token, float* dst) const;
  // Throws naming the first id outside the vocabulary.
  void check_tokens(const std::vector<int>& tokens) const;

 private:
  GlmDsaModel() = default;
  KVCache make_cache(int n_layers) const;
  void block_forward(const BlockWeights& w, float* x, int T, int pos0, LayerCache& lc,
                     std::vector<std::vector<int>>& selection, AttnForm form, int layer) const;
  void attention(const BlockWeights& w, const float* h, int T, int pos0, LayerCache& lc,
                 std::vector<std::vector<int>>& selection, AttnForm form, float* out) const;
  void indexer_select(const MlaWeights& w, const float* h, const float* cq, int T, int pos0,
                      LayerCache& lc, std::vector<std::vector<int>>& selection) const;
  void ffn(const FfnWeights& w, const float* h, int T, float* out, int layer) const;

  ModelConfig cfg_;
  SafetensorsModel st_;
  std::shared_ptr<GgufFile> gguf_;      // set when loaded from GGUF
  std::vector<BlockWeights> layers_;
  std::unique_ptr<MtpWeights> mtp_;
  const TensorView* embed_ = nullptr;   // [V, d] (safetensors)
  Linear embed_rows_;                   // [V, d] (GGUF token_embd; used when embed_ is null)
  std::vector<float> final_norm_;       // [d]
  Linear lm_head_;                      // [V, d]
  cpu::Rope rope_, idx_rope_;
  mutable RoutingStats* stats_ = nullptr;
};

}  // namespace bigmoe
