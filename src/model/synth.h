// `bigmoe synth`: a GLM-5.2-shaped GGUF checkpoint (arch glm-dsa, llama.cpp's convention as in
// docs/gguf-glm-dsa.md) with random weights written directly as quant blocks: routed experts
// Q4_K, other 2-D / 3-D weights Q8_0, the router (ffn_gate_inp, as llama.cpp's converter
// keeps it) and 1-D norms / biases F32. Real per-layer dimensions (spec §1); layer counts,
// expert count and vocabulary are chosen. Scales keep activations O(1) through the layers.
// Deterministic: every tensor's bytes depend only on (seed, tensor name, shape).
#pragma once
#include <cstdint>
#include <filesystem>

namespace bigmoe {

struct SynthOptions {
  int n_dense = 1;        // leading dense-MLP layers
  int n_moe = 4;          // MoE layers after them
  int n_experts = 256;    // routed experts per MoE layer (top-min(8, E) of them)
  int vocab = 154880;     // >= 260 (256 byte tokens, one merge, bos, eos)
  int hidden = 6144;      // d; override for tests only (a multiple of 256)
  bool mtp = false;       // add the nextn (MTP) block as blk.L
  uint64_t seed = 0;
  bool progress = false;  // progress bar on stderr
};

// Bytes the file will have (header excluded): lets callers check disk space first.
uint64_t synth_data_bytes(const SynthOptions& o);

// Writes the checkpoint; throws bigmoe::Error on bad options or I/O errors.
void synth_glm_dsa(const SynthOptions& o, const std::filesystem::path& out);

}  // namespace bigmoe
