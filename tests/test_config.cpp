// config.json / generation_config.json parsing: the fixture configs field by field, the
// indexer schedule derived from GLM-5.2's index_topk_freq / index_skip_topk_offset, and every
// malformed config giving a bigmoe::Error that names the field and the file.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>

#include "glm_test_util.h"
#include "model/config.h"
#include "util/error.h"

namespace bigmoe {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;
using test::fixture;
using ::testing::HasSubstr;

json read_json(const fs::path& p) {
  std::ifstream in(p);
  return json::parse(in);
}

// A small valid glm_moe_dsa config, written out here so the error cases do not depend on the
// fixtures: 4 layers, dense first, indexer full/shared alternating.
json minimal_glm() {
  return json::parse(R"({
    "model_type": "glm_moe_dsa", "vocab_size": 100, "hidden_size": 32, "num_hidden_layers": 4,
    "intermediate_size": 64, "moe_intermediate_size": 16, "n_routed_experts": 8,
    "num_experts_per_tok": 2, "n_shared_experts": 1, "n_group": 1, "topk_group": 1,
    "num_attention_heads": 2, "q_lora_rank": 24, "kv_lora_rank": 16, "qk_nope_head_dim": 8,
    "qk_rope_head_dim": 4, "v_head_dim": 8, "index_n_heads": 2, "index_head_dim": 8,
    "index_topk": 4, "mlp_layer_types": ["dense", "sparse", "sparse", "sparse"],
    "indexer_types": ["full", "shared", "full", "shared"],
    "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
    "num_nextn_predict_layers": 1, "max_position_embeddings": 128
  })");
}

// from_json(j) throws bigmoe::Error whose message contains every one of `parts`.
void expect_config_error(const json& j, std::initializer_list<std::string> parts) {
  try {
    ModelConfig::from_json(j, "test/config.json");
    ADD_FAILURE() << "no error for config " << j.dump();
  } catch (const Error& e) {
    for (const auto& p : parts) EXPECT_THAT(e.what(), HasSubstr(p));
  } catch (const std::exception& e) {
    ADD_FAILURE() << "not a bigmoe::Error: " << e.what();
  }
}

std::vector<bool> bools(std::initializer_list<int> v) { return std::vector<bool>(v.begin(), v.end()); }

// A scratch directory unique to this process and test, removed afterwards.
struct TempDir {
  fs::path path;
  TempDir() {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    path = fs::temp_directory_path() /
           fmt::format("bigmoe_test_config_{}_{}_{}", ::getpid(), info->test_suite_name(), info->name());
    fs::remove_all(path);
    fs::create_directories(path);
  }
  ~TempDir() { fs::remove_all(path); }
  fs::path write(const std::string& name, const std::string& text) const {
    std::ofstream(path / name) << text;
    return path / name;
  }
};

TEST(Config, Glm5Tiny) {
  ModelConfig c = ModelConfig::load(fixture("glm5_tiny") / "config.json");
  EXPECT_EQ(c.model_type, "glm_moe_dsa");
  EXPECT_EQ(c.vocab_size, 320);
  EXPECT_EQ(c.hidden_size, 64);
  EXPECT_EQ(c.num_hidden_layers, 5);
  EXPECT_EQ(c.num_nextn_predict_layers, 1);
  EXPECT_EQ(c.n_layers_total(), 6);
  EXPECT_EQ(c.intermediate_size, 96);
  EXPECT_EQ(c.moe_intermediate_size, 32);
  EXPECT_EQ(c.n_routed_experts, 16);
  EXPECT_EQ(c.num_experts_per_tok, 4);
  EXPECT_EQ(c.n_shared_experts, 1);
  EXPECT_EQ(c.n_group, 1);
  EXPECT_EQ(c.topk_group, 1);
  EXPECT_DOUBLE_EQ(c.routed_scaling_factor, 2.5);
  EXPECT_TRUE(c.norm_topk_prob);
  EXPECT_EQ(c.num_attention_heads, 4);
  EXPECT_EQ(c.q_lora_rank, 48);
  EXPECT_EQ(c.kv_lora_rank, 32);
  EXPECT_EQ(c.qk_nope_head_dim, 16);
  EXPECT_EQ(c.qk_rope_head_dim, 8);
  EXPECT_EQ(c.qk_head_dim(), 24);
  EXPECT_EQ(c.v_head_dim, 24);
  EXPECT_TRUE(c.has_indexer);
  EXPECT_EQ(c.index_n_heads, 8);
  EXPECT_EQ(c.index_head_dim, 32);
  EXPECT_EQ(c.index_topk, 16);
  // indexer_types full, full, shared, full, shared; the MTP layer computes its own top-k.
  EXPECT_EQ(c.indexer_shared, bools({0, 0, 1, 0, 1, 0}));
  // mlp_layer_types dense, dense, sparse, sparse, sparse; the MTP layer is MoE.
  EXPECT_EQ(c.layer_is_moe, bools({0, 0, 1, 1, 1, 1}));
  EXPECT_EQ(c.rope.type, RopeType::Default);
  EXPECT_DOUBLE_EQ(c.rope.theta, 10000.0);
  EXPECT_TRUE(c.rope.interleave);
  EXPECT_TRUE(c.rope.indexer_interleave);
  EXPECT_DOUBLE_EQ(c.rms_norm_eps, 1e-5);
  EXPECT_EQ(c.max_position_embeddings, 256);
  EXPECT_FALSE(c.tie_word_embeddings);
  EXPECT_EQ(c.quant.method, "");
  EXPECT_DOUBLE_EQ(c.attn_scale(), 1.0 / std::sqrt(24.0));
}

TEST(Config, Dsv3TinyYarnAndFp8) {
  const fs::path p = fixture("dsv3_tiny") / "config.json";
  ModelConfig c = ModelConfig::load(p);
  json j = read_json(p);
  EXPECT_EQ(c.model_type, "deepseek_v3");
  EXPECT_EQ(c.num_hidden_layers, 4);
  EXPECT_EQ(c.n_group, 4);
  EXPECT_EQ(c.topk_group, 2);
  EXPECT_EQ(c.n_shared_experts, 2);
  EXPECT_EQ(c.q_lora_rank, 0);  // null: plain q_proj
  EXPECT_FALSE(c.has_indexer);
  EXPECT_TRUE(c.indexer_shared.empty());
  // first_k_dense_replace 2, then MoE, plus the MTP layer.
  EXPECT_EQ(c.layer_is_moe, bools({0, 0, 1, 1, 1}));
  EXPECT_FALSE(c.rope.indexer_interleave);
  EXPECT_TRUE(c.rope.interleave);

  const json& rp = j.at("rope_parameters");
  EXPECT_EQ(c.rope.type, RopeType::Yarn);
  EXPECT_DOUBLE_EQ(c.rope.theta, rp.at("rope_theta").get<double>());
  EXPECT_DOUBLE_EQ(c.rope.factor, rp.at("factor").get<double>());
  EXPECT_DOUBLE_EQ(c.rope.mscale, rp.at("mscale").get<double>());
  EXPECT_DOUBLE_EQ(c.rope.mscale_all_dim, rp.at("mscale_all_dim").get<double>());
  EXPECT_DOUBLE_EQ(c.rope.original_max_position_embeddings,
                   rp.at("original_max_position_embeddings").get<double>());
  EXPECT_DOUBLE_EQ(c.rope.beta_fast, rp.at("beta_fast").get<double>());
  EXPECT_DOUBLE_EQ(c.rope.beta_slow, rp.at("beta_slow").get<double>());

  EXPECT_EQ(c.quant.method, "fp8");
  EXPECT_EQ(c.quant.block_out, 32);
  EXPECT_EQ(c.quant.block_in, 32);

  // softmax scale = qk_head_dim^-0.5 · (0.1 · mscale_all_dim · ln(factor) + 1)²
  const double qk = j.at("qk_nope_head_dim").get<double>() + j.at("qk_rope_head_dim").get<double>();
  const double m = 0.1 * rp.at("mscale_all_dim").get<double>() * std::log(rp.at("factor").get<double>()) + 1.0;
  EXPECT_NEAR(c.attn_scale(), m * m / std::sqrt(qk), 1e-12);
  EXPECT_GT(c.attn_scale(), 1.0 / std::sqrt(qk));
}

// GLM-5.2 carries index_topk_freq 4 / index_skip_topk_offset 3 instead of indexer_types.
TEST(Config, Glm52IndexerScheduleFromFreqAndOffset) {
  ModelConfig c = ModelConfig::load(fixture("glm5_config") / "config.json");
  ASSERT_EQ(c.num_hidden_layers, 78);
  ASSERT_EQ(c.n_layers_total(), 79);
  const std::vector<int> full = {0,  1,  2,  6,  10, 14, 18, 22, 26, 30, 34,
                                 38, 42, 46, 50, 54, 58, 62, 66, 70, 74};
  std::vector<int> got;
  for (int i = 0; i < c.num_hidden_layers; ++i)
    if (!c.indexer_shared[i]) got.push_back(i);
  EXPECT_EQ(got, full);
  ASSERT_EQ(c.indexer_shared.size(), 79u);
  EXPECT_FALSE(c.indexer_shared[78]);  // MTP layer

  ASSERT_EQ(c.layer_is_moe.size(), 79u);
  for (int i = 0; i < 79; ++i) EXPECT_EQ(c.layer_is_moe[i], i >= 3) << "layer " << i;
  EXPECT_EQ(c.quant.method, "fp8");
  EXPECT_EQ(c.quant.block_out, 128);
  EXPECT_EQ(c.quant.block_in, 128);
  EXPECT_DOUBLE_EQ(c.rope.theta, 1e6);  // top-level rope_theta, no rope_parameters
  EXPECT_EQ(c.rope.type, RopeType::Default);

  // Without either key every layer computes its own top-k.
  json j = read_json(fixture("glm5_config") / "config.json");
  j.erase("index_topk_freq");
  j.erase("index_skip_topk_offset");
  ModelConfig all = ModelConfig::from_json(j, "variant");
  for (int i = 0; i < all.n_layers_total(); ++i) EXPECT_FALSE(all.indexer_shared[i]) << "layer " << i;
}

TEST(Config, MinimalIsValid) {
  ModelConfig c = ModelConfig::from_json(minimal_glm(), "test/config.json");
  EXPECT_EQ(c.indexer_shared, bools({0, 1, 0, 1, 0}));
  EXPECT_EQ(c.layer_is_moe, bools({0, 1, 1, 1, 1}));
}

TEST(Config, MissingRequiredField) {
  for (const char* k : {"vocab_size", "hidden_size", "num_hidden_layers", "kv_lora_rank", "index_topk",
                        "model_type"}) {
    json j = minimal_glm();
    j.erase(k);
    expect_config_error(j, {k, "test/config.json", "missing"});
  }
}

TEST(Config, WrongFieldType) {
  json j = minimal_glm();
  j["hidden_size"] = "32";
  expect_config_error(j, {"hidden_size", "test/config.json", "integer"});
  j = minimal_glm();
  j["hidden_size"] = 32.5;
  expect_config_error(j, {"hidden_size"});
  j = minimal_glm();
  j["model_type"] = 7;
  expect_config_error(j, {"model_type", "string"});
  j = minimal_glm();
  j["norm_topk_prob"] = "yes";
  expect_config_error(j, {"norm_topk_prob"});
  j = minimal_glm();
  j["rope_parameters"]["rope_type"] = 3;
  expect_config_error(j, {"rope_type", "string"});
  j = minimal_glm();
  j["mlp_layer_types"] = "dense";
  expect_config_error(j, {"mlp_layer_types"});
  j = minimal_glm();
  j["quantization_config"] = "fp8";
  expect_config_error(j, {"quantization_config"});
  j = minimal_glm();
  j["quantization_config"] = {{"quant_method", 8}};
  expect_config_error(j, {"quant_method"});
  j = minimal_glm();
  j["num_attention_heads"] = -2;
  expect_config_error(j, {"num_attention_heads", "out of range"});
  expect_config_error(json::array({1, 2}), {"test/config.json", "object"});
}

TEST(Config, UnsupportedModelType) {
  json j = minimal_glm();
  j["model_type"] = "llama";
  expect_config_error(j, {"model_type", "'llama'", "test/config.json"});
}

TEST(Config, UnsupportedRopeType) {
  json j = minimal_glm();
  j["rope_parameters"]["rope_type"] = "longrope";
  expect_config_error(j, {"'longrope'", "rope"});
  // Older configs spell it rope_scaling {type}.
  j = minimal_glm();
  j.erase("rope_parameters");
  j["rope_scaling"] = {{"type", "dynamic"}, {"factor", 2.0}};
  expect_config_error(j, {"'dynamic'"});
  // yarn without original_max_position_embeddings
  j = minimal_glm();
  j["rope_parameters"] = {{"rope_type", "yarn"}, {"factor", 4.0}};
  expect_config_error(j, {"original_max_position_embeddings"});
}

TEST(Config, LayerTypeLists) {
  json j = minimal_glm();
  j["mlp_layer_types"] = {"dense", "sparse", "sparse"};
  expect_config_error(j, {"mlp_layer_types", "3 entries", "4"});
  j = minimal_glm();
  j["mlp_layer_types"] = {"dense", "sparse", "moe", "sparse"};
  expect_config_error(j, {"mlp_layer_types", "'moe'"});
  j = minimal_glm();
  j["indexer_types"] = {"full", "shared", "sparse", "shared"};
  expect_config_error(j, {"indexer_types", "'sparse'"});
  j = minimal_glm();
  j["indexer_types"] = {"full", "shared", "full", "shared", "full"};
  expect_config_error(j, {"indexer_types", "5 entries"});
  j = minimal_glm();
  j["indexer_types"] = {"full", "shared", 3, "shared"};
  expect_config_error(j, {"indexer_types"});
  // Layer 0 has no previous layer to share with.
  j = minimal_glm();
  j["indexer_types"] = {"shared", "full", "full", "shared"};
  expect_config_error(j, {"layer 0", "test/config.json"});
}

TEST(Config, RoutingConsistency) {
  json j = minimal_glm();
  j["num_experts_per_tok"] = 9;
  expect_config_error(j, {"num_experts_per_tok", "9", "8"});
  j = minimal_glm();
  j["n_group"] = 3;
  expect_config_error(j, {"n_routed_experts", "n_group", "divisible"});
  j = minimal_glm();
  j["n_group"] = 4;
  j["topk_group"] = 5;
  expect_config_error(j, {"topk_group"});
  j = minimal_glm();
  j["n_routed_experts"] = 0;
  j["num_experts_per_tok"] = 0;
  expect_config_error(j, {"n_routed_experts"});
}

TEST(Config, Quantization) {
  json j = minimal_glm();
  j["quantization_config"] = {{"quant_method", "gptq"}};
  expect_config_error(j, {"quant_method", "'gptq'"});
  j["quantization_config"] = {{"quant_method", "compressed-tensors"}};
  expect_config_error(j, {"'compressed-tensors'"});
  for (json bad : {json::array({128}), json::array({128, 0}), json::array({128, "128"}), json("128"),
                   json::array({128, 128, 128}), json::array({-128, 128})}) {
    j["quantization_config"] = {{"quant_method", "fp8"}, {"weight_block_size", bad}};
    expect_config_error(j, {"weight_block_size"});
  }
  j["quantization_config"] = {{"quant_method", "fp8"}, {"weight_block_size", {64, 32}}};
  ModelConfig c = ModelConfig::from_json(j, "ok");
  EXPECT_EQ(c.quant.block_out, 64);
  EXPECT_EQ(c.quant.block_in, 32);
}

TEST(Config, FileErrors) {
  TempDir t;
  fs::path bad = t.write("config.json", R"({"model_type": "glm_moe_dsa", "vocab_size": )");
  try {
    ModelConfig::load(bad);
    ADD_FAILURE() << "no error for invalid JSON";
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), HasSubstr(bad.string()));
    EXPECT_THAT(e.what(), HasSubstr("JSON"));
  }
  fs::path missing = t.path / "nope" / "config.json";
  try {
    ModelConfig::load(missing);
    ADD_FAILURE() << "no error for a missing file";
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), HasSubstr(missing.string()));
  }
  // A valid file with a bad field: the error names the file.
  json j = minimal_glm();
  j["hidden_size"] = "32";
  fs::path typed = t.write("typed.json", j.dump());
  try {
    ModelConfig::load(typed);
    ADD_FAILURE() << "no error for string hidden_size";
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), HasSubstr(typed.string()));
    EXPECT_THAT(e.what(), HasSubstr("hidden_size"));
  }
}

TEST(GenerationConfig, Fixtures) {
  GenerationConfig g = GenerationConfig::load(fixture("glm5_tiny") / "generation_config.json");
  EXPECT_EQ(g.eos_token_ids, (std::vector<int>{1, 2}));  // a list
  EXPECT_EQ(g.bos_token_id, 0);
  GenerationConfig d = GenerationConfig::load(fixture("dsv3_tiny") / "generation_config.json");
  EXPECT_EQ(d.eos_token_ids, (std::vector<int>{1}));  // a single int
  EXPECT_EQ(d.bos_token_id, 0);
}

TEST(GenerationConfig, ValuesAndErrors) {
  TempDir t;
  GenerationConfig g = GenerationConfig::load(
      t.write("g.json", R"({"eos_token_id": 7, "temperature": 0.6, "top_p": 0.95, "top_k": 40, "do_sample": true})"));
  EXPECT_EQ(g.eos_token_ids, (std::vector<int>{7}));
  EXPECT_EQ(g.bos_token_id, -1);
  EXPECT_DOUBLE_EQ(g.temperature, 0.6);
  EXPECT_DOUBLE_EQ(g.top_p, 0.95);
  EXPECT_EQ(g.top_k, 40);
  EXPECT_TRUE(g.do_sample);

  fs::path bad = t.write("bad.json", R"({"eos_token_id": "1"})");
  EXPECT_THROW(GenerationConfig::load(bad), Error);
  fs::path bad_list = t.write("bad_list.json", R"({"eos_token_id": [1, "2"]})");
  EXPECT_THROW(GenerationConfig::load(bad_list), Error);
  fs::path not_json = t.write("nj.json", "{");
  try {
    GenerationConfig::load(not_json);
    ADD_FAILURE() << "no error for invalid JSON";
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), HasSubstr(not_json.string()));
  }
}

TEST(GenerationConfig, MissingFileGivesDefaults) {
  GenerationConfig g = GenerationConfig::load(fs::temp_directory_path() / "bigmoe_no_such_dir" / "gen.json");
  EXPECT_TRUE(g.eos_token_ids.empty());
  EXPECT_EQ(g.bos_token_id, -1);
  EXPECT_DOUBLE_EQ(g.temperature, 1.0);
  EXPECT_DOUBLE_EQ(g.top_p, 1.0);
  EXPECT_EQ(g.top_k, 0);
  EXPECT_FALSE(g.do_sample);
}

}  // namespace
}  // namespace bigmoe
