// `bigmoe synth`: a small GLM-5.2-shaped GGUF (real head / latent / expert dims, hidden size and
// expert count shrunk) must carry every tensor as docs/gguf-glm-dsa.md says llama.cpp writes it,
// load with GlmDsaModel::load_gguf, and give finite, spread-out logits; same seed, same bytes.
// The FP8 safetensors form (--format fp8) likewise: config.json with GLM-5.2's dims, sharded
// files with the HF names, dtypes and shapes GlmDsaModel::load reads, weights of the intended
// magnitude, finite logits, the same bytes for the same seed (library and CLI alike).
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <cstdio>
#include <fstream>
#include <iterator>
#include <map>
#include <regex>
#include <set>

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <gmock/gmock.h>
#include <nlohmann/json.hpp>
#include <sys/wait.h>
#include <unistd.h>

#include "glm_test_util.h"
#include "io/gguf.h"
#include "io/safetensors.h"
#include "model/glm_dsa.h"
#include "model/synth.h"
#include "model/weights.h"
#include "util/error.h"

namespace bigmoe {
namespace {

namespace fs = std::filesystem;

fs::path tmp_dir() {
  fs::path d = fs::temp_directory_path() / fmt::format("bigmoe_synth_{}", ::getpid());
  fs::create_directories(d);
  return d;
}

SynthOptions small() {
  SynthOptions o;
  o.n_dense = 1;
  o.n_moe = 1;
  o.n_experts = 8;
  o.vocab = 1024;
  o.hidden = 512;  // test-only override: real d (6144) makes an ~1.3 GB file (~270 MB here)
  o.mtp = true;
  o.seed = 7;
  return o;
}

class SynthTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    path_ = tmp_dir() / "small.gguf";
    synth_glm_dsa(small(), path_);
  }
  static void TearDownTestSuite() { fs::remove_all(path_.parent_path()); }
  static fs::path path_;
};
fs::path SynthTest::path_;

TEST_F(SynthTest, TensorsAsDocumented) {
  auto f = GgufFile::open(path_);
  const int64_t d = 512, V = 1024, E = 8, H = 64, ql = 2048, kv = 512, nope = 192, rope = 64, v = 256, Ie = 2048,
                I = 12288, Hi = 32, Di = 128;
  using T = GgmlType;
  std::map<std::string, std::pair<T, std::vector<int64_t>>> want = {
      {"token_embd.weight", {T::Q8_0, {d, V}}},
      {"output_norm.weight", {T::F32, {d}}},
      {"output.weight", {T::Q8_0, {d, V}}},
  };
  for (int i = 0; i < 3; ++i) {
    std::string p = fmt::format("blk.{}.", i);
    want[p + "attn_norm.weight"] = {T::F32, {d}};
    want[p + "ffn_norm.weight"] = {T::F32, {d}};
    want[p + "attn_q_a.weight"] = {T::Q8_0, {d, ql}};
    want[p + "attn_q_a_norm.weight"] = {T::F32, {ql}};
    want[p + "attn_q_b.weight"] = {T::Q8_0, {ql, H * (nope + rope)}};
    want[p + "attn_kv_a_mqa.weight"] = {T::Q8_0, {d, kv + rope}};
    want[p + "attn_kv_a_norm.weight"] = {T::F32, {kv}};
    want[p + "attn_k_b.weight"] = {T::Q8_0, {nope, kv, H}};
    want[p + "attn_v_b.weight"] = {T::Q8_0, {kv, v, H}};
    want[p + "attn_output.weight"] = {T::Q8_0, {H * v, d}};
    want[p + "indexer.attn_q_b.weight"] = {T::Q8_0, {ql, Hi * Di}};
    want[p + "indexer.attn_k.weight"] = {T::Q8_0, {d, Di}};
    want[p + "indexer.k_norm.weight"] = {T::F32, {Di}};
    want[p + "indexer.k_norm.bias"] = {T::F32, {Di}};
    want[p + "indexer.proj.weight"] = {T::Q8_0, {d, Hi}};
    if (i == 0) {
      want[p + "ffn_gate.weight"] = {T::Q8_0, {d, I}};
      want[p + "ffn_up.weight"] = {T::Q8_0, {d, I}};
      want[p + "ffn_down.weight"] = {T::Q8_0, {I, d}};
    } else {
      want[p + "ffn_gate_inp.weight"] = {T::F32, {d, E}};
      want[p + "exp_probs_b.bias"] = {T::F32, {E}};
      want[p + "ffn_gate_exps.weight"] = {T::Q4_K, {d, Ie, E}};
      want[p + "ffn_up_exps.weight"] = {T::Q4_K, {d, Ie, E}};
      want[p + "ffn_down_exps.weight"] = {T::Q4_K, {Ie, d, E}};
      want[p + "ffn_gate_shexp.weight"] = {T::Q8_0, {d, Ie}};
      want[p + "ffn_up_shexp.weight"] = {T::Q8_0, {d, Ie}};
      want[p + "ffn_down_shexp.weight"] = {T::Q8_0, {Ie, d}};
    }
  }
  want["blk.2.nextn.eh_proj.weight"] = {T::Q8_0, {2 * d, d}};
  for (const char* n : {"enorm", "hnorm", "shared_head_norm"}) want[fmt::format("blk.2.nextn.{}.weight", n)] = {T::F32, {d}};

  EXPECT_EQ(f->tensors().size(), want.size());
  for (const auto& [name, tw] : want) {
    const GgufTensorInfo* t = f->tensor(name);
    ASSERT_NE(t, nullptr) << name;
    EXPECT_EQ(t->type, tw.first) << name;
    EXPECT_EQ(t->ne, tw.second) << name << ": [" << fmt::format("{}", fmt::join(t->ne, ", ")) << "]";
  }

  const std::string a = "glm-dsa.";
  EXPECT_EQ(f->get_str("general.architecture"), "glm-dsa");
  EXPECT_EQ(f->get_u32(a + "block_count"), 3u);
  EXPECT_EQ(f->get_u32(a + "nextn_predict_layers"), 1u);
  EXPECT_EQ(f->get_u32(a + "leading_dense_block_count"), 1u);
  EXPECT_EQ(f->get_u32(a + "embedding_length"), uint32_t(d));
  EXPECT_EQ(f->get_u32(a + "attention.key_length"), uint32_t(kv + rope));
  EXPECT_EQ(f->get_u32(a + "attention.value_length"), uint32_t(kv));
  EXPECT_EQ(f->get_u32(a + "attention.key_length_mla"), uint32_t(nope + rope));
  EXPECT_EQ(f->get_u32(a + "attention.value_length_mla"), uint32_t(v));
  EXPECT_EQ(f->get_u32(a + "attention.head_count_kv"), 1u);
  EXPECT_EQ(f->get_u32(a + "attention.indexer.key_length"), uint32_t(Di));
  EXPECT_EQ(f->get_u32(a + "attention.indexer.top_k"), 2048u);
  EXPECT_EQ(f->get_u32(a + "expert_used_count"), 8u);
  EXPECT_EQ(f->get_str("tokenizer.ggml.model"), "gpt2");
  EXPECT_EQ(f->get_arr_str("tokenizer.ggml.tokens").size(), size_t(V));
  EXPECT_EQ(f->get_arr_i32("tokenizer.ggml.token_type").size(), size_t(V));
  EXPECT_GE(f->get_arr_str("tokenizer.ggml.merges").size(), 1u);
  EXPECT_EQ(f->get_u32("tokenizer.ggml.eos_token_id"), uint32_t(V - 1));
}

TEST_F(SynthTest, LoadsAndRunsFinite) {
  auto m = GlmDsaModel::load_gguf(path_);
  const ModelConfig& c = m->config();
  EXPECT_EQ(c.hidden_size, 512);
  EXPECT_EQ(c.num_hidden_layers, 2);
  EXPECT_EQ(c.qk_nope_head_dim, 192);
  EXPECT_EQ(c.index_head_dim, 128);
  EXPECT_TRUE(m->has_mtp());
  KVCache cache = m->new_cache();
  std::vector<int> ids = {5, 300, 17, 1000};
  ForwardOut out = m->forward(ids, cache, AttnForm::Plain);
  ASSERT_EQ(out.logits.size(), ids.size() * 1024);
  for (size_t t = 0; t < ids.size(); ++t) {
    const float* row = &out.logits[t * 1024];
    double s = 0, s2 = 0;
    float lo = row[0], hi = row[0];
    for (int k = 0; k < 1024; ++k) {
      ASSERT_TRUE(std::isfinite(row[k])) << "token " << t << " logit " << k;
      s += row[k], s2 += double(row[k]) * row[k];
      lo = std::min(lo, row[k]), hi = std::max(hi, row[k]);
    }
    double mean = s / 1024, sd = std::sqrt(std::max(0.0, s2 / 1024 - mean * mean));
    fmt::print("token {}: logits mean {:.3f} std {:.3f} range [{:.3f}, {:.3f}]\n", t, mean, sd, lo, hi);
    EXPECT_LT(lo, hi) << "token " << t;
    EXPECT_GT(sd, 0.1) << "token " << t;
    EXPECT_LT(sd, 100.0) << "token " << t;
  }
  // The MTP head runs on the same hidden states.
  KVCache mc = m->new_mtp_cache();
  ForwardOut mo = m->mtp_forward(out.hidden.data(), {300, 17, 1000}, mc, AttnForm::Plain);
  ASSERT_EQ(mo.logits.size(), 3u * 1024);
  for (float x : mo.logits) ASSERT_TRUE(std::isfinite(x));
}

TEST_F(SynthTest, SameSeedSameBytes) {
  SynthOptions o = small();
  o.mtp = false;
  o.n_moe = 1;
  fs::path p2 = path_.parent_path() / "again.gguf";
  synth_glm_dsa(o, p2);
  auto a = GgufFile::open(path_), b = GgufFile::open(p2);
  // Tensor bytes depend only on (seed, name, shape): same across the two layer layouts.
  for (const char* n : {"blk.1.ffn_gate_exps.weight", "blk.0.attn_k_b.weight", "token_embd.weight", "blk.1.exp_probs_b.bias"}) {
    const GgufTensorInfo *ta = a->tensor(n), *tb = b->tensor(n);
    ASSERT_TRUE(ta && tb) << n;
    ASSERT_EQ(ta->nbytes, tb->nbytes) << n;
    EXPECT_EQ(std::memcmp(ta->data, tb->data, ta->nbytes), 0) << n;
  }
  // A different seed changes them (a smaller file: same attention shapes).
  o.seed = 8;
  o.n_experts = 1;
  o.vocab = 260;
  fs::path p3 = path_.parent_path() / "other.gguf";
  synth_glm_dsa(o, p3);
  auto c = GgufFile::open(p3);
  const GgufTensorInfo *ta = a->tensor("blk.0.attn_k_b.weight"), *tc = c->tensor("blk.0.attn_k_b.weight");
  ASSERT_EQ(ta->nbytes, tc->nbytes);
  EXPECT_NE(std::memcmp(ta->data, tc->data, ta->nbytes), 0);
  fs::remove(p2);
  fs::remove(p3);
}

TEST(Synth, RejectsBadOptions) {
  SynthOptions o = small();
  o.hidden = 1000;
  EXPECT_THROW(synth_data_bytes(o), std::exception);
  o = small();
  o.vocab = 100;
  EXPECT_THROW(synth_data_bytes(o), std::exception);
  o = small();
  o.n_dense = 0;
  EXPECT_THROW(synth_data_bytes(o), std::exception);
}

TEST(Synth, FullModelSize) {
  SynthOptions o;  // defaults: 1 dense + 4 MoE layers of GLM-5.2, 256 experts, full vocab
  double gb = synth_data_bytes(o) / 1e9;
  EXPECT_GT(gb, 20.0);
  EXPECT_LT(gb, 30.0);
}

// ---------------------------------------------------------------------------------------
// --format fp8

using ::testing::HasSubstr;
using nlohmann::json;
using test::error_of;

json read_json(const fs::path& p) {
  std::ifstream in(p);
  return json::parse(in);
}

std::string read_bytes(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

SynthOptions small_fp8() {
  SynthOptions o = small();
  o.format = SynthFormat::Fp8;
  o.n_moe = 3;  // 4 layers: layer 3 shares layer 2's DSA top-k (GLM-5.2's schedule), so has no indexer
  o.shard_bytes = 64'000'000;  // several shards (~0.43 GB in all)
  return o;
}

class SynthFp8Test : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = tmp_dir() / "fp8";
    synth_glm_dsa(small_fp8(), dir_);
  }
  static void TearDownTestSuite() { fs::remove_all(dir_.parent_path()); }
  static fs::path dir_;
};
fs::path SynthFp8Test::dir_;

TEST_F(SynthFp8Test, ConfigHasGlm52Dims) {
  json c = read_json(dir_ / "config.json");
  // Every field of GLM-5.2's own config that synth does not choose is GLM-5.2's.
  json real = read_json(test::fixture("glm5_config") / "config.json");
  const std::set<std::string> chosen = {"vocab_size", "hidden_size", "num_hidden_layers", "first_k_dense_replace",
                                        "n_routed_experts", "num_experts_per_tok", "num_nextn_predict_layers"};
  for (auto it = real.begin(); it != real.end(); ++it) {
    if (chosen.count(it.key())) continue;
    ASSERT_TRUE(c.contains(it.key())) << it.key();
    EXPECT_EQ(c[it.key()], it.value()) << it.key();
  }
  EXPECT_EQ(c["model_type"], "glm_moe_dsa");
  EXPECT_EQ(c["vocab_size"], 1024);
  EXPECT_EQ(c["hidden_size"], 512);
  EXPECT_EQ(c["num_hidden_layers"], 4);
  EXPECT_EQ(c["first_k_dense_replace"], 1);
  EXPECT_EQ(c["mlp_layer_types"], json({"dense", "sparse", "sparse", "sparse"}));
  EXPECT_EQ(c["indexer_types"], json({"full", "full", "full", "shared"}));
  EXPECT_EQ(c["n_routed_experts"], 8);
  EXPECT_EQ(c["num_experts_per_tok"], 8);
  EXPECT_EQ(c["num_nextn_predict_layers"], 1);
  EXPECT_EQ(c["quantization_config"], json::parse(R"({"quant_method": "fp8", "fmt": "e4m3",
      "activation_scheme": "dynamic", "weight_block_size": [128, 128]})"));

  ModelConfig mc = ModelConfig::load(dir_ / "config.json");
  EXPECT_EQ(mc.quant.method, "fp8");
  EXPECT_EQ(mc.quant.block_out, 128);
  EXPECT_EQ(mc.quant.block_in, 128);
  EXPECT_EQ(mc.layer_is_moe, std::vector<bool>({false, true, true, true, true}));  // + the MTP layer
  EXPECT_EQ(mc.indexer_shared, std::vector<bool>({false, false, false, true, false}));

  // Fewer experts than top-8: top-E.
  SynthOptions o = small_fp8();
  o.n_experts = 3;
  o.n_moe = 1;
  o.mtp = false;
  o.vocab = 260;
  o.hidden = 256;
  fs::path d = dir_.parent_path() / "fp8_e3";
  synth_glm_dsa(o, d);
  json c3 = read_json(d / "config.json");
  EXPECT_EQ(c3["n_routed_experts"], 3);
  EXPECT_EQ(c3["num_experts_per_tok"], 3);
  EXPECT_EQ(c3["num_nextn_predict_layers"], 0);
  EXPECT_NO_THROW(GlmDsaModel::load(d));
  fs::remove_all(d);
}

TEST_F(SynthFp8Test, TensorsAndShards) {
  const int64_t d = 512, V = 1024, E = 8, H = 64, ql = 2048, kv = 512, nope = 192, rope = 64, v = 256, Ie = 2048,
                I = 12288, Hi = 32, Di = 128;
  using D = DType;
  std::map<std::string, std::pair<D, std::vector<int64_t>>> want = {
      {"model.embed_tokens.weight", {D::BF16, {V, d}}},
      {"model.norm.weight", {D::BF16, {d}}},
      {"lm_head.weight", {D::BF16, {V, d}}},
  };
  auto lin = [&](const std::string& p, int64_t out, int64_t in) {
    want[p + ".weight"] = {D::F8_E4M3, {out, in}};
    want[p + ".weight_scale_inv"] = {D::F32, {(out + 127) / 128, (in + 127) / 128}};
  };
  for (int i = 0; i < 5; ++i) {  // 4 layers + MTP
    std::string p = fmt::format("model.layers.{}.", i), a = p + "self_attn.", m = p + "mlp.";
    want[p + "input_layernorm.weight"] = {D::BF16, {d}};
    want[p + "post_attention_layernorm.weight"] = {D::BF16, {d}};
    lin(a + "q_a_proj", ql, d);
    want[a + "q_a_layernorm.weight"] = {D::BF16, {ql}};
    lin(a + "q_b_proj", H * (nope + rope), ql);
    lin(a + "kv_a_proj_with_mqa", kv + rope, d);
    want[a + "kv_a_layernorm.weight"] = {D::BF16, {kv}};
    lin(a + "kv_b_proj", H * (nope + v), kv);
    lin(a + "o_proj", d, H * v);
    if (i != 3) {
      lin(a + "indexer.wq_b", Hi * Di, ql);
      lin(a + "indexer.wk", Di, d);
      want[a + "indexer.k_norm.weight"] = {D::BF16, {Di}};
      want[a + "indexer.k_norm.bias"] = {D::BF16, {Di}};
      lin(a + "indexer.weights_proj", Hi, d);
    }
    if (i == 0) {
      lin(m + "gate_proj", I, d);
      lin(m + "up_proj", I, d);
      lin(m + "down_proj", d, I);
      continue;
    }
    want[m + "gate.weight"] = {D::BF16, {E, d}};
    want[m + "gate.e_score_correction_bias"] = {D::F32, {E}};
    for (int e = 0; e < E; ++e) {
      std::string x = fmt::format("{}experts.{}.", m, e);
      lin(x + "gate_proj", Ie, d);
      lin(x + "up_proj", Ie, d);
      lin(x + "down_proj", d, Ie);
    }
    lin(m + "shared_experts.gate_proj", Ie, d);
    lin(m + "shared_experts.up_proj", Ie, d);
    lin(m + "shared_experts.down_proj", d, Ie);
  }
  lin("model.layers.4.eh_proj", d, 2 * d);
  for (const char* n : {"enorm", "hnorm", "shared_head.norm"})
    want[fmt::format("model.layers.4.{}.weight", n)] = {D::BF16, {d}};

  SafetensorsModel st = SafetensorsModel::open(dir_);
  EXPECT_EQ(st.names().size(), want.size());
  for (const auto& [name, tw] : want) {
    const TensorView* t = st.find(name);
    ASSERT_NE(t, nullptr) << name;
    EXPECT_EQ(t->dtype, tw.first) << name << ": " << dtype_name(t->dtype);
    EXPECT_EQ(t->shape, tw.second) << name << ": [" << fmt::format("{}", fmt::join(t->shape, ", ")) << "]";
  }
  for (const std::string& n : st.names()) EXPECT_TRUE(want.count(n)) << "unexpected tensor " << n;

  // Shards: model-0000i-of-0000n, each within the shard size, a weight with its scale, every
  // tensor in the index, total_size the bytes synth_data_bytes promised.
  json index = read_json(dir_ / "model.safetensors.index.json");
  const json& wm = index["weight_map"];
  EXPECT_EQ(wm.size(), want.size());
  std::set<std::string> shards;
  for (auto it = wm.begin(); it != wm.end(); ++it) shards.insert(it.value().get<std::string>());
  ASSERT_GE(shards.size(), 4u);
  std::set<std::string> files;
  for (const auto& e : fs::directory_iterator(dir_))
    if (e.path().extension() == ".safetensors") files.insert(e.path().filename().string());
  EXPECT_EQ(files, shards);
  const std::regex pat(fmt::format(R"(model-000(\d\d)-of-000{:02d}\.safetensors)", shards.size()));
  for (const std::string& f : shards) EXPECT_TRUE(std::regex_match(f, pat)) << f;
  uint64_t total = 0;
  for (const auto& f : st.files()) {
    uint64_t bytes = 0;
    for (const auto& [name, t] : f->tensors()) bytes += t.nbytes;
    EXPECT_LE(bytes, 64'000'000u) << f->path();
    EXPECT_EQ(f->metadata().at("format"), "pt");
    total += bytes;
  }
  EXPECT_EQ(index["metadata"]["total_size"].get<uint64_t>(), total);
  EXPECT_EQ(synth_data_bytes(small_fp8()), total);
  for (auto it = wm.begin(); it != wm.end(); ++it) {
    const std::string& n = it.key();
    if (n.size() > 17 && n.ends_with(".weight_scale_inv")) {
      EXPECT_EQ(it.value(), wm[n.substr(0, n.size() - 17) + ".weight"]) << n;
    }
  }
}

// Element std of a weight (through the loader's own FP8 × block-scale dequantization).
double weight_std(const SafetensorsModel& st, const std::string& prefix, int out, int in) {
  WeightLoader L(st, 128, 128);
  Linear l = L.linear(prefix, out, in);
  std::vector<float> row(size_t(in), 0.0f);
  double s2 = 0;
  for (int o = 0; o < out; ++o) {
    l.row(o, row.data());
    for (float x : row) {
      EXPECT_TRUE(std::isfinite(x)) << prefix;
      s2 += double(x) * x;
    }
  }
  return std::sqrt(s2 / (double(out) * in));
}

double raw_std(const TensorView& t) {
  std::vector<float> v(size_t(t.numel()));
  to_f32(t.dtype, t.data, v.data(), v.size());
  double s2 = 0;
  for (float x : v) s2 += double(x) * x;
  return std::sqrt(s2 / double(v.size()));
}

TEST_F(SynthFp8Test, WeightMagnitudes) {
  SafetensorsModel st = SafetensorsModel::open(dir_);
  // std = gain / sqrt(fan_in): gain 0.5 into the residual stream, 1 elsewhere. Block scales vary
  // by ±25%, so a tensor of few 128x128 blocks is off by a few percent; many together are exact.
  struct Case { std::string name; int out, in; double want; };
  for (const Case& c : std::vector<Case>{
           {"model.layers.1.mlp.experts.3.gate_proj", 2048, 512, 1 / std::sqrt(512.0)},
           {"model.layers.1.mlp.experts.3.down_proj", 512, 2048, 0.5 / std::sqrt(2048.0)},
           {"model.layers.0.self_attn.kv_a_proj_with_mqa", 576, 512, 1 / std::sqrt(512.0)},
           {"model.layers.0.self_attn.o_proj", 512, 16384, 0.5 / std::sqrt(16384.0)},
           {"model.layers.0.mlp.down_proj", 512, 12288, 0.5 / std::sqrt(12288.0)}}) {
    double s = weight_std(st, c.name, c.out, c.in);
    EXPECT_NEAR(s / c.want, 1.0, 0.1) << c.name << ": std " << s << ", want " << c.want;
  }
  double s2 = 0;
  for (int e = 0; e < 8; ++e)
    for (const char* p : {"gate_proj", "up_proj"}) {
      double s = weight_std(st, fmt::format("model.layers.2.mlp.experts.{}.{}", e, p), 2048, 512);
      s2 += s * s / 16;
    }
  EXPECT_NEAR(std::sqrt(s2 * 512), 1.0, 0.02);  // 1024 blocks
  EXPECT_NEAR(raw_std(st.get("model.embed_tokens.weight")), 1.0, 0.02);
  EXPECT_NEAR(raw_std(st.get("lm_head.weight")) * std::sqrt(512.0), 1.0, 0.02);
  EXPECT_NEAR(raw_std(st.get("model.layers.1.mlp.gate.weight")) * std::sqrt(512.0), 1.0, 0.05);
  EXPECT_EQ(raw_std(st.get("model.layers.0.self_attn.indexer.k_norm.bias")), 0.0);
  // FP8 codes use e4m3's range (the block scale does the rest), never NaN.
  const TensorView& w = st.get("model.layers.2.mlp.experts.0.up_proj.weight");
  float mx = 0;
  for (size_t k = 0; k < w.nbytes; ++k) {
    float x = f8e4m3_to_f32(w.data[k]);
    ASSERT_TRUE(std::isfinite(x)) << k;
    mx = std::max(mx, std::abs(x));
  }
  EXPECT_GT(mx, 256.0f);
  EXPECT_LE(mx, 448.0f);
}

TEST_F(SynthFp8Test, LoadsAndRunsFinite) {
  auto m = GlmDsaModel::load(dir_);
  const ModelConfig& c = m->config();
  EXPECT_EQ(c.hidden_size, 512);
  EXPECT_EQ(c.num_hidden_layers, 4);
  EXPECT_EQ(c.n_routed_experts, 8);
  EXPECT_TRUE(m->has_mtp());
  KVCache cache = m->new_cache();
  std::vector<int> ids = {5, 300, 17, 1000};
  ForwardOut out = m->forward(ids, cache, AttnForm::Plain);
  ASSERT_EQ(out.logits.size(), ids.size() * 1024);
  for (size_t t = 0; t < ids.size(); ++t) {
    const float* row = &out.logits[t * 1024];
    double s = 0, s2 = 0;
    for (int k = 0; k < 1024; ++k) {
      ASSERT_TRUE(std::isfinite(row[k])) << "token " << t << " logit " << k;
      s += row[k], s2 += double(row[k]) * row[k];
    }
    double mean = s / 1024, sd = std::sqrt(std::max(0.0, s2 / 1024 - mean * mean));
    fmt::print("token {}: logits mean {:.3f} std {:.3f}\n", t, mean, sd);
    EXPECT_GT(sd, 0.1) << "token " << t;
    EXPECT_LT(sd, 100.0) << "token " << t;
    EXPECT_LT(std::abs(mean), 10.0) << "token " << t;
  }
  KVCache mc = m->new_mtp_cache();
  ForwardOut mo = m->mtp_forward(out.hidden.data(), {300, 17, 1000}, mc, AttnForm::Plain);
  ASSERT_EQ(mo.logits.size(), 3u * 1024);
  for (float x : mo.logits) ASSERT_TRUE(std::isfinite(x));
}

struct CliRun {
  int code = -1;
  std::string out;  // stdout and stderr
};

CliRun run_cli(const std::string& args) {
  CliRun r;
  std::FILE* p = ::popen((std::string(BIGMOE_BINARY) + " " + args + " 2>&1").c_str(), "r");
  if (!p) return r;
  char buf[4096];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, p)) > 0) r.out.append(buf, n);
  int st = ::pclose(p);
  r.code = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
  return r;
}

TEST_F(SynthFp8Test, SameSeedSameBytes) {
  SynthOptions o = small_fp8();
  o.n_moe = 0;
  o.mtp = false;
  o.vocab = 260;
  o.hidden = 256;
  o.shard_bytes = 32'000'000;
  const fs::path a = dir_.parent_path() / "det_a", b = dir_.parent_path() / "det_b", c = dir_.parent_path() / "det_c";
  synth_glm_dsa(o, a);
  // The CLI with the same options writes the same files, byte for byte.
  CliRun r = run_cli(fmt::format("synth --format fp8 -o {} --dense 1 --moe 0 --experts 8 --vocab 260 --hidden 256 --seed 7 "
                              "--shard-gb 0.032 -q", b.string()));
  ASSERT_EQ(r.code, 0) << r.out;
  std::set<std::string> fa, fb;
  for (const auto& e : fs::directory_iterator(a)) fa.insert(e.path().filename().string());
  for (const auto& e : fs::directory_iterator(b)) fb.insert(e.path().filename().string());
  EXPECT_EQ(fa, fb);
  EXPECT_GE(fa.size(), 4u);  // config, index, 2+ shards
  for (const std::string& f : fa) EXPECT_TRUE(read_bytes(a / f) == read_bytes(b / f)) << f;

  // A tensor's bytes depend only on (seed, name, shape): kv_b has the same shape at any hidden size.
  SafetensorsModel sa = SafetensorsModel::open(a), big = SafetensorsModel::open(dir_);
  for (const char* n : {"model.layers.0.self_attn.kv_b_proj.weight", "model.layers.0.self_attn.kv_b_proj.weight_scale_inv",
                        "model.layers.0.self_attn.q_b_proj.weight"}) {
    const TensorView &x = sa.get(n), &y = big.get(n);
    ASSERT_EQ(x.nbytes, y.nbytes) << n;
    EXPECT_EQ(std::memcmp(x.data, y.data, x.nbytes), 0) << n;
  }
  // Another seed, other bytes.
  o.seed = 8;
  synth_glm_dsa(o, c);
  SafetensorsModel sc = SafetensorsModel::open(c);
  for (const char* n : {"model.layers.0.self_attn.kv_b_proj.weight", "model.layers.0.self_attn.kv_b_proj.weight_scale_inv",
                        "model.embed_tokens.weight"}) {
    const TensorView &x = sa.get(n), &y = sc.get(n);
    ASSERT_EQ(x.nbytes, y.nbytes) << n;
    EXPECT_NE(std::memcmp(x.data, y.data, x.nbytes), 0) << n;
  }
  // Writing again over an existing checkpoint directory is allowed and gives the same bytes.
  o.seed = 7;
  synth_glm_dsa(o, b);
  for (const std::string& f : fa) EXPECT_TRUE(read_bytes(a / f) == read_bytes(b / f)) << f;
  fs::remove_all(a);
  fs::remove_all(b);
  fs::remove_all(c);
}

TEST(SynthFp8, RejectsBadOptions) {
  EXPECT_EQ(parse_synth_format("gguf"), SynthFormat::Gguf);
  EXPECT_EQ(parse_synth_format("fp8"), SynthFormat::Fp8);
  EXPECT_THAT(error_of([] { parse_synth_format("fp16"); }), HasSubstr("--format must be gguf or fp8 (got 'fp16')"));

  SynthOptions o = small_fp8();
  o.shard_bytes = 1000;
  EXPECT_THAT(error_of([&] { synth_data_bytes(o); }), HasSubstr("shard size must be at least 1 MB"));
  o = small_fp8();
  o.hidden = 1000;
  EXPECT_THAT(error_of([&] { synth_data_bytes(o); }), HasSubstr("--hidden must be a positive multiple of 256"));
  o = small_fp8();
  o.n_moe = 0;  // --mtp needs an MoE layer
  EXPECT_THAT(error_of([&] { synth_data_bytes(o); }), HasSubstr("--mtp needs at least one MoE layer"));

  fs::path d = tmp_dir() / "bad_fp8";
  fs::remove_all(d);
  fs::create_directories(d);
  o = small_fp8();
  // The output exists as a file.
  std::ofstream(d / "file") << "x";
  EXPECT_THAT(error_of([&] { synth_glm_dsa(o, d / "file"); }), HasSubstr("is not a directory"));
  // Another checkpoint's weights in the directory: refused before anything is written, and kept.
  fs::create_directories(d / "ckpt");
  std::ofstream(d / "ckpt" / "model.safetensors") << "x";
  EXPECT_THAT(error_of([&] { synth_glm_dsa(o, d / "ckpt"); }), HasSubstr("model.safetensors"));
  EXPECT_TRUE(fs::exists(d / "ckpt" / "model.safetensors"));
  EXPECT_FALSE(fs::exists(d / "ckpt" / "config.json"));
  // GGUF into a directory.
  o.format = SynthFormat::Gguf;
  EXPECT_THAT(error_of([&] { synth_glm_dsa(o, d); }), HasSubstr("is a directory"));

  // The CLI names the mistake and exits 1.
  CliRun r = run_cli(fmt::format("synth --format fp16 -o {}", (d / "x").string()));
  EXPECT_EQ(r.code, 1);
  EXPECT_THAT(r.out, HasSubstr("--format must be gguf or fp8 (got 'fp16')"));
  r = run_cli(fmt::format("synth --shard-gb 2 -o {}", (d / "x.gguf").string()));
  EXPECT_EQ(r.code, 1);
  EXPECT_THAT(r.out, HasSubstr("--shard-gb applies only to --format fp8"));
  r = run_cli(fmt::format("synth --format fp8 --shard-gb 0 -o {}", (d / "x").string()));
  EXPECT_EQ(r.code, 1);
  EXPECT_THAT(r.out, HasSubstr("--shard-gb must be in"));
  EXPECT_FALSE(fs::exists(d / "x"));
  fs::remove_all(d);
}

TEST(SynthFp8, FullModelSize) {
  SynthOptions o;  // defaults: 1 dense + 4 MoE layers of GLM-5.2, 256 experts, full vocab
  o.format = SynthFormat::Fp8;
  double gb = synth_data_bytes(o) / 1e9;
  // 4 × 256 × 3 FP8 experts of 2048 × 6144 (38.7 GB) + attention, dense MLP, BF16 embedding and head.
  EXPECT_GT(gb, 40.0);
  EXPECT_LT(gb, 48.0);
}

}  // namespace
}  // namespace bigmoe
