// Byte accounting of a GLM-DSA checkpoint by category and dtype, from its files or predicted
// from config.json alone for a chosen storage format.
#pragma once
#include <array>
#include <cstdint>
#include <map>
#include <string>

#include "io/safetensors.h"
#include "model/config.h"

namespace bigmoe {

enum class Category { EmbedHead, Attention, Indexer, DenseMlp, RouterShared, RoutedExperts, Mtp, Other, kCount };
const char* category_name(Category c);

// Which category a checkpoint tensor belongs to. Routed experts of the MTP layer count as
// routed experts (they are streamed like the others); the rest of layer L counts as MTP.
Category classify_tensor(const std::string& name, const ModelConfig& cfg);

struct ByteReport {
  std::array<uint64_t, size_t(Category::kCount)> bytes{};   // by category
  std::array<uint64_t, size_t(Category::kCount)> params{};  // weights (elements, scales excluded)
  std::map<std::string, uint64_t> by_dtype;
  uint64_t total() const;
  // Weight bytes one decoded token reads: all dense parts, k of E routed experts per MoE
  // layer, without the MTP layer.
  uint64_t active_per_token = 0;
  uint64_t head_bytes = 0;  // lm_head
};

ByteReport inspect_checkpoint(const SafetensorsModel& st, const ModelConfig& cfg);

// Storage formats for --config-only: fp8 = official block-FP8 checkpoints (linear weights 1 B
// + an fp32 scale per 128×128 block; embeddings, head, norms, router, indexer weights_proj
// bf16); bf16 = everything 2 B; int4 = compressed-tensors pack-quantized linear weights (4 bit
// + a bf16 scale per group of 128 inputs), the rest bf16. Correction biases are fp32 always.
enum class WeightFormat { FP8, BF16, INT4 };
WeightFormat parse_weight_format(const std::string& s);
ByteReport inspect_config(const ModelConfig& cfg, WeightFormat fmt);

std::string format_report(const ByteReport& r, const ModelConfig& cfg);

}  // namespace bigmoe
