// Byte accounting: the config-only prediction for full-size GLM-5.2 against spec/glm-dsa.md §8's
// hand figures, and the prediction against the real tensors of the tiny checkpoints.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <fstream>
#include <nlohmann/json.hpp>

#include "glm_test_util.h"
#include "io/safetensors.h"
#include "model/config.h"
#include "model/inspect.h"
#include "util/error.h"

namespace bigmoe {
namespace {

namespace fs = std::filesystem;
using test::fixture;
using ::testing::HasSubstr;

constexpr double kGiB = double(1ull << 30);

size_t idx(Category c) { return size_t(c); }

ModelConfig glm52() { return ModelConfig::load(fixture("glm5_config") / "config.json"); }

// |got / want - 1| <= rel
void expect_rel(double got, double want, double rel, const std::string& what) {
  EXPECT_NEAR(got / want, 1.0, rel) << what << ": got " << got << ", want " << want;
}

TEST(Inspect, Glm52Fp8RoutedPool) {
  ModelConfig c = glm52();
  ByteReport r = inspect_config(c, WeightFormat::FP8);
  // 76 layers (75 MoE + MTP) × 256 experts × 37.75M weights at 1 byte ≈ 684 GiB (+ block scales).
  double routed_gib = double(r.bytes[idx(Category::RoutedExperts)]) / kGiB;
  EXPECT_GE(routed_gib, 683.5);
  EXPECT_LE(routed_gib, 685.0);
  EXPECT_EQ(r.params[idx(Category::RoutedExperts)], 76ull * 256 * 3 * 2048 * 6144);
}

// Parameters per category against the hand-computed table in spec §8.
TEST(Inspect, Glm52ParamsMatchSpecTable) {
  ModelConfig c = glm52();
  ByteReport r = inspect_config(c, WeightFormat::FP8);
  auto p = [&](Category x) { return double(r.params[idx(x)]); };
  expect_rel(p(Category::Attention), 78 * 165.0e6, 0.005, "attention");
  expect_rel(p(Category::DenseMlp), 3 * 226.5e6, 0.005, "dense MLP");
  expect_rel(p(Category::RouterShared), 75 * 39.3e6, 0.005, "router + shared");
  // embeddings + lm_head (+ the final norm): lm_head alone is 0.95G
  expect_rel(p(Category::EmbedHead) / 2, 0.95e9, 0.005, "lm_head");
  // head_bytes is lm_head in bf16
  expect_rel(double(r.head_bytes) / 2, 0.95e9, 0.005, "lm_head bytes");
  // GLM-5.2's schedule has 21 full indexer layers.
  expect_rel(p(Category::Indexer), 21 * 9.4e6, 0.005, "indexer (21 full layers)");

  // Without index_topk_freq / index_skip_topk_offset all 78 layers have their own indexer.
  nlohmann::json j;
  {
    std::ifstream in(fixture("glm5_config") / "config.json");
    j = nlohmann::json::parse(in);
  }
  j.erase("index_topk_freq");
  j.erase("index_skip_topk_offset");
  ByteReport all = inspect_config(ModelConfig::from_json(j, "variant"), WeightFormat::FP8);
  expect_rel(double(all.params[idx(Category::Indexer)]), 78 * 9.4e6, 0.005, "indexer (78 full layers)");
  // Every other category is unchanged.
  for (Category x : {Category::Attention, Category::DenseMlp, Category::RouterShared, Category::RoutedExperts,
                     Category::EmbedHead})
    EXPECT_EQ(all.params[idx(x)], r.params[idx(x)]) << category_name(x);

  // Per-token reads ≈ the "A40B": everything dense + 8/256 of the main layers' experts + head.
  double active_params = p(Category::Attention) + p(Category::Indexer) + p(Category::DenseMlp) +
                         p(Category::RouterShared) + 75.0 * 8 * 37.75e6 + 0.95e9;
  EXPECT_GT(double(r.active_per_token), active_params);          // bf16 parts and scales add
  EXPECT_LT(double(r.active_per_token), 1.15 * active_params);
  EXPECT_THAT(format_report(r, c), HasSubstr("total"));
}

TEST(Inspect, FormatsOrderedAndInt4Size) {
  ModelConfig c = glm52();
  ByteReport bf16 = inspect_config(c, WeightFormat::BF16);
  ByteReport fp8 = inspect_config(c, WeightFormat::FP8);
  ByteReport int4 = inspect_config(c, WeightFormat::INT4);
  EXPECT_GT(bf16.total(), fp8.total());
  EXPECT_GT(fp8.total(), int4.total());
  for (size_t i = 0; i < size_t(Category::kCount); ++i) {
    EXPECT_EQ(bf16.params[i], fp8.params[i]) << category_name(Category(i));
    EXPECT_EQ(fp8.params[i], int4.params[i]) << category_name(Category(i));
    EXPECT_GE(bf16.bytes[i], fp8.bytes[i]) << category_name(Category(i));
    EXPECT_GE(fp8.bytes[i], int4.bytes[i]) << category_name(Category(i));
  }
  EXPECT_GT(bf16.active_per_token, fp8.active_per_token);
  EXPECT_GT(fp8.active_per_token, int4.active_per_token);
  // bf16: exactly 2 bytes per weight, except the fp32 correction biases (75 + 1 MTP layers × 256).
  uint64_t params = 0;
  for (auto n : bf16.params) params += n;
  EXPECT_EQ(bf16.total(), 2 * params + 2 * 76 * 256);
  // int4: half a byte per weight plus a bf16 scale per 128 inputs.
  double routed_int4 = double(int4.bytes[idx(Category::RoutedExperts)]) / kGiB;
  expect_rel(routed_int4, 684.0 * (0.5 + 2.0 / 128), 0.001, "int4 routed GiB");
  double routed_bf16 = double(bf16.bytes[idx(Category::RoutedExperts)]) / kGiB;
  expect_rel(routed_bf16, 2 * 684.0, 0.001, "bf16 routed GiB");
}

TEST(Inspect, ParseWeightFormat) {
  EXPECT_EQ(parse_weight_format("fp8"), WeightFormat::FP8);
  EXPECT_EQ(parse_weight_format("bf16"), WeightFormat::BF16);
  EXPECT_EQ(parse_weight_format("int4"), WeightFormat::INT4);
  try {
    parse_weight_format("q4_k");
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), HasSubstr("q4_k"));
  }
}

TEST(Inspect, EveryFixtureTensorHasACategory) {
  for (const char* name : {"glm5_tiny", "dsv3_tiny"}) {
    ModelConfig c = ModelConfig::load(fixture(name) / "config.json");
    SafetensorsModel st = SafetensorsModel::open(fixture(name));
    ASSERT_FALSE(st.names().empty());
    for (const auto& n : st.names()) EXPECT_NE(classify_tensor(n, c), Category::Other) << name << ": " << n;
    ByteReport r = inspect_checkpoint(st, c);
    EXPECT_EQ(r.total(), st.total_bytes()) << name;
    uint64_t by_dtype = 0;
    for (auto& [k, v] : r.by_dtype) by_dtype += v;
    EXPECT_EQ(by_dtype, st.total_bytes()) << name;
  }
}

TEST(Inspect, ClassifyNames) {
  ModelConfig c = ModelConfig::load(fixture("glm5_tiny") / "config.json");  // 5 main layers, MTP = 5
  EXPECT_EQ(classify_tensor("model.embed_tokens.weight", c), Category::EmbedHead);
  EXPECT_EQ(classify_tensor("lm_head.weight", c), Category::EmbedHead);
  EXPECT_EQ(classify_tensor("model.norm.weight", c), Category::EmbedHead);
  EXPECT_EQ(classify_tensor("model.layers.3.self_attn.q_b_proj.weight", c), Category::Attention);
  EXPECT_EQ(classify_tensor("model.layers.3.input_layernorm.weight", c), Category::Attention);
  EXPECT_EQ(classify_tensor("model.layers.3.self_attn.indexer.wk.weight", c), Category::Indexer);
  EXPECT_EQ(classify_tensor("model.layers.0.mlp.gate_proj.weight", c), Category::DenseMlp);
  EXPECT_EQ(classify_tensor("model.layers.3.mlp.gate.weight", c), Category::RouterShared);
  EXPECT_EQ(classify_tensor("model.layers.3.mlp.gate.e_score_correction_bias", c), Category::RouterShared);
  EXPECT_EQ(classify_tensor("model.layers.3.mlp.shared_experts.up_proj.weight", c), Category::RouterShared);
  EXPECT_EQ(classify_tensor("model.layers.3.mlp.experts.7.down_proj.weight", c), Category::RoutedExperts);
  EXPECT_EQ(classify_tensor("model.layers.5.mlp.experts.7.down_proj.weight", c), Category::RoutedExperts);
  EXPECT_EQ(classify_tensor("model.layers.5.self_attn.o_proj.weight", c), Category::Mtp);
  EXPECT_EQ(classify_tensor("model.layers.5.eh_proj.weight", c), Category::Mtp);
  EXPECT_EQ(classify_tensor("model.layers.5.mlp.gate.weight", c), Category::Mtp);
  EXPECT_EQ(classify_tensor("model.rotary_emb.inv_freq", c), Category::Other);
}

// Two independent paths: the tensors actually stored in the bf16 fixture, and the formula
// from its config. They must agree byte for byte in every category.
TEST(Inspect, CheckpointAgreesWithConfigPrediction) {
  ModelConfig c = ModelConfig::load(fixture("glm5_tiny") / "config.json");
  SafetensorsModel st = SafetensorsModel::open(fixture("glm5_tiny"));
  ByteReport real = inspect_checkpoint(st, c);
  ByteReport pred = inspect_config(c, WeightFormat::BF16);
  for (size_t i = 0; i < size_t(Category::kCount); ++i) {
    EXPECT_EQ(real.bytes[i], pred.bytes[i]) << category_name(Category(i));
    EXPECT_EQ(real.params[i], pred.params[i]) << category_name(Category(i));
  }
  EXPECT_EQ(real.by_dtype, pred.by_dtype);
  EXPECT_EQ(real.head_bytes, pred.head_bytes);
  EXPECT_EQ(real.active_per_token, pred.active_per_token);
  EXPECT_EQ(pred.total(), st.total_bytes());
  EXPECT_GT(real.bytes[idx(Category::Indexer)], 0u);
  EXPECT_GT(real.bytes[idx(Category::Mtp)], 0u);
  EXPECT_EQ(real.bytes[idx(Category::Other)], 0u);
  std::string report = format_report(real, c);
  EXPECT_THAT(report, HasSubstr("routed experts"));
  EXPECT_THAT(report, HasSubstr("full layers 3/5"));
}

}  // namespace
}  // namespace bigmoe
