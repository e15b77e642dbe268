// `bigmoe synth`: a GLM-5.2-shaped checkpoint with random weights, in one of two formats.
//   gguf: one file (arch glm-dsa, llama.cpp's convention as in docs/gguf-glm-dsa.md) written
//         directly as quant blocks: routed experts Q4_K, other 2-D / 3-D weights Q8_0, the router
//         (ffn_gate_inp, as llama.cpp's converter keeps it) and 1-D norms / biases F32.
//   fp8:  a directory laid out as the official FP8 release (synth_fp8.cpp): config.json
//         (glm_moe_dsa, quantization_config fp8 e4m3 128x128), model-0000i-of-0000n.safetensors
//         shards and model.safetensors.index.json, HF tensor names as GlmDsaModel::load reads
//         them. Linear weights F8_E4M3 with float32 weight_scale_inv per 128x128 block;
//         embed_tokens, lm_head, norms and the router weight BF16; e_score_correction_bias F32.
// Real per-layer dimensions (spec §1); layer counts, expert count and vocabulary are chosen.
// Scales keep activations O(1) through the layers: every weight has std gain / sqrt(fan_in)
// (gain 0.5 on the projections back into the residual, 1 elsewhere), the embedding std 1.
// Deterministic: every tensor's bytes depend only on (seed, tensor name, shape).
#pragma once
#include <chrono>
#include <cstdint>
#include <filesystem>
#include <string>

namespace bigmoe {

enum class SynthFormat { Gguf, Fp8 };

// "gguf" | "fp8"; anything else throws bigmoe::Error naming the value.
SynthFormat parse_synth_format(const std::string& s);

struct SynthOptions {
  int n_dense = 1;        // leading dense-MLP layers
  int n_moe = 4;          // MoE layers after them
  int n_experts = 256;    // routed experts per MoE layer (top-min(8, E) of them)
  int vocab = 154880;     // >= 260 (256 byte tokens, one merge, bos, eos)
  int hidden = 6144;      // d; override for tests only (a multiple of 256)
  bool mtp = false;       // add the nextn (MTP) block as layer L
  uint64_t seed = 0;
  bool progress = false;  // progress bar on stderr
  SynthFormat format = SynthFormat::Gguf;
  // fp8: most tensor bytes per shard (>= 1 MB); a weight larger than this gets a shard of its own.
  uint64_t shard_bytes = 5'000'000'000;
};

// Bytes of tensor data that will be written (gguf: the data section; fp8: all shards' tensors,
// headers excluded): lets callers check disk space first. Validates the options.
uint64_t synth_data_bytes(const SynthOptions& o);

// Writes the checkpoint (gguf: the file `out`; fp8: the directory `out`, created if missing; it
// may exist but must hold no *.safetensors other than the shards being written). Throws
// bigmoe::Error on bad options or I/O errors.
void synth_glm_dsa(const SynthOptions& o, const std::filesystem::path& out);

// Shared by the two writers (synth.cpp, synth_fp8.cpp); not for other callers.
namespace synth_detail {

// GLM-5.2 per-layer dimensions (spec §1).
inline constexpr int kHeads = 64, kQLora = 2048, kKvLora = 512, kNope = 192, kRope = 64, kV = 256;
inline constexpr int kExpertWidth = 2048, kDenseWidth = 12288, kTopK = 8, kShared = 1;
inline constexpr int kIdxHeads = 32, kIdxDim = 128, kIdxTopK = 2048;
inline constexpr int kContext = 202752;

void validate(const SynthOptions& o);
uint64_t splitmix(uint64_t& s);
// Seed of one tensor's random stream: depends only on (seed, name).
uint64_t tensor_seed(uint64_t seed, const std::string& name);

// "[#####     ]  42.0%  1.23/4.56 GB  300.0 MB/s name" on stderr, at most every 200 ms.
struct Progress {
  bool on;
  uint64_t total, done = 0;
  std::chrono::steady_clock::time_point t0 = std::chrono::steady_clock::now(), last{};
  void update(uint64_t n, const std::string& name, bool force = false);
};

uint64_t fp8_data_bytes(const SynthOptions& o);
void write_fp8(const SynthOptions& o, const std::filesystem::path& dir);

}  // namespace synth_detail

}  // namespace bigmoe
