// Model configuration, parsed once from config.json and validated once (STYLE.md #9).
// Covers the GLM-DSA family: glm_moe_dsa (GLM-5.x), deepseek_v32 and deepseek_v3.
#pragma once
#include <filesystem>
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

namespace bigmoe {

enum class RopeType { Default, Yarn };

struct RopeConfig {
  RopeType type = RopeType::Default;
  double theta = 10000.0;
  // yarn only
  double factor = 1.0;
  double mscale = 1.0;
  double mscale_all_dim = 0.0;
  double original_max_position_embeddings = 0.0;
  double beta_fast = 32.0;
  double beta_slow = 1.0;
  bool truncate = true;
  // Rotation layout of the main attention's rope dims: interleaved pairs (2j, 2j+1) when true
  // (config rope_interleave, default true as in transformers), split halves (j, j+dim/2) when false.
  bool interleave = true;
  // The DSA indexer's layout: interleaved for glm_moe_dsa, split halves for deepseek_v32
  // (as transformers 5.17 implements them).
  bool indexer_interleave = true;
};

struct QuantConfig {
  std::string method;         // "" (none) or "fp8"
  int block_out = 128, block_in = 128;  // fp8 weight_block_size
};

struct ModelConfig {
  std::string model_type;     // glm_moe_dsa | deepseek_v32 | deepseek_v3
  int vocab_size = 0;
  int hidden_size = 0;                  // d
  int num_hidden_layers = 0;            // L (main layers; MTP layers are stored after them)
  int intermediate_size = 0;            // dense MLP width
  int moe_intermediate_size = 0;        // one routed/shared expert width
  int n_routed_experts = 0;
  int num_experts_per_tok = 0;
  int n_shared_experts = 0;
  int n_group = 1, topk_group = 1;
  double routed_scaling_factor = 1.0;
  bool norm_topk_prob = true;
  int num_attention_heads = 0;          // H
  int q_lora_rank = 0;                  // 0: plain q_proj
  int kv_lora_rank = 0;
  int qk_nope_head_dim = 0, qk_rope_head_dim = 0, v_head_dim = 0;
  bool has_indexer = false;             // DSA lightning indexer (glm_moe_dsa, deepseek_v32)
  int index_n_heads = 0, index_head_dim = 0, index_topk = 0;
  std::vector<bool> indexer_shared;     // per main layer: true = reuse previous layer's top-k
  std::vector<bool> layer_is_moe;       // per main layer (+ MTP layers, which are MoE)
  RopeConfig rope;
  double rms_norm_eps = 1e-6;
  int num_nextn_predict_layers = 0;
  int max_position_embeddings = 0;
  bool tie_word_embeddings = false;
  QuantConfig quant;

  int qk_head_dim() const { return qk_nope_head_dim + qk_rope_head_dim; }
  int n_layers_total() const { return num_hidden_layers + num_nextn_predict_layers; }
  // Softmax scale of the main attention, including yarn's mscale² factor.
  double attn_scale() const;

  static ModelConfig from_json(const nlohmann::json& j, const std::string& source);
  static ModelConfig load(const std::filesystem::path& config_json);
};

struct GenerationConfig {
  std::vector<int> eos_token_ids;
  int bos_token_id = -1;
  double temperature = 1.0, top_p = 1.0;
  int top_k = 0;
  bool do_sample = false;
  // Missing file gives the defaults.
  static GenerationConfig load(const std::filesystem::path& generation_config_json);
};

}  // namespace bigmoe
