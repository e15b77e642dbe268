// Weight handles for the CPU reference: views into mmapped checkpoint files (any stored dtype,
// optionally FP8 with 128x128 block scales) plus small vectors (norms, biases) held in float32.
#pragma once
#include <memory>
#include <string>
#include <vector>

#include "io/gguf.h"
#include "io/safetensors.h"

namespace bigmoe {

// A linear layer y = W x with W [out, in] as stored. For FP8 block-quantized checkpoints
// `scale` is weight_scale_inv [ceil(out/bo), ceil(in/bi)] and W ≈ fp8 × scale per block.
// From GGUF, `g` is set instead: rows of ggml blocks (any computable ggml type), row o at
// g->data + g_offset + o * row_bytes.
struct Linear {
  const TensorView* w = nullptr;
  const TensorView* scale = nullptr;
  const GgufTensorInfo* g = nullptr;
  size_t row_bytes = 0;  // GGUF only
  size_t g_offset = 0;   // GGUF only: byte offset of row 0 (one expert's slice of a 3-D tensor)
  // Owned float32 rows [out, in] (e.g. kv_b rebuilt from GGUF attn_k_b / attn_v_b).
  std::shared_ptr<const std::vector<float>> owned;
  int out = 0, in = 0;
  int bo = 0, bi = 0;  // block sizes when scale != nullptr
  bool present() const { return w != nullptr || g != nullptr || owned != nullptr; }
  static Linear from_gguf(const GgufTensorInfo& t, const std::string& file);
  // Expert e of a merged 3-D GGUF tensor ne [in, out, n_expert].
  static Linear from_gguf_expert(const GgufTensorInfo& t, int e, const std::string& file);
  static Linear from_floats(std::vector<float> w, int out, int in);
  // Row o of W converted to float32 (dst has `in` elements).
  void row(int o, float* dst) const;
  size_t nbytes() const;  // weight bytes read for one full pass (incl. scales)
};

// Resolves checkpoint tensor names and checks their shapes, naming the tensor and the
// checkpoint on any mismatch.
class WeightLoader {
 public:
  WeightLoader(const SafetensorsModel& st, int fp8_bo, int fp8_bi) : st_(st), bo_(fp8_bo), bi_(fp8_bi) {}
  bool has(const std::string& name) const { return st_.has(name); }
  Linear linear(const std::string& prefix, int out, int in) const;  // prefix + ".weight"
  std::vector<float> vec(const std::string& name, int n) const;      // 1-D float vector
  const TensorView& tensor(const std::string& name, std::vector<int64_t> shape) const;

 private:
  const SafetensorsModel& st_;
  int bo_, bi_;
};

}  // namespace bigmoe
