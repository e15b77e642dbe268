// The llama architecture (RMSNorm, RoPE, grouped-query attention, SwiGLU, optionally tied
// embeddings) from a GGUF file, on the CPU: used for small real models (SmolLM2) end to end.
#pragma once
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "backend/cpu/ref_ops.h"
#include "engine/lm.h"
#include "io/gguf.h"
#include "model/weights.h"

namespace bigmoe {

struct LlamaConfig {
  int vocab_size = 0, hidden_size = 0, n_layers = 0, n_heads = 0, n_kv_heads = 0, head_dim = 0;
  int intermediate_size = 0, context_length = 0;
  float rms_norm_eps = 1e-5f;
  float rope_theta = 10000.0f;
};

struct LlamaLayer {
  std::vector<float> attn_norm, ffn_norm;  // [d]
  Linear q, k, v, o;                       // [H*hd, d], [Hkv*hd, d], [Hkv*hd, d], [d, H*hd]
  Linear gate, up, down;                   // [ff, d], [ff, d], [d, ff]
};

class LlamaModel : public LanguageModel {
 public:
  static std::unique_ptr<LlamaModel> load(const std::filesystem::path& gguf_path);
  const LlamaConfig& config() const { return cfg_; }
  const GgufFile& gguf() const { return *file_; }

  int vocab_size() const override { return cfg_.vocab_size; }
  int context_length() const override { return cfg_.context_length; }
  std::unique_ptr<Session> new_session() const override;

  // Per-sequence cache: k and v after rope, [n, Hkv*hd] per layer.
  struct Cache {
    std::vector<std::vector<float>> k, v;
    int n = 0;
  };
  // Runs tokens at positions cache.n.., appends to the cache; logits [T, V] (all rows when
  // all_logits, else only the last).
  std::vector<float> forward(const std::vector<int>& tokens, Cache& cache, bool all_logits) const;

 private:
  LlamaConfig cfg_;
  std::shared_ptr<GgufFile> file_;
  Linear embed_;  // [V, d], rows read one at a time
  std::vector<LlamaLayer> layers_;
  std::vector<float> out_norm_;
  Linear head_;   // [V, d]
  cpu::Rope rope_;
};

}  // namespace bigmoe
