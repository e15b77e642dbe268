// `bigmoe synth`: a small GLM-5.2-shaped GGUF (real head / latent / expert dims, hidden size and
// expert count shrunk) must carry every tensor as docs/gguf-glm-dsa.md says llama.cpp writes it,
// load with GlmDsaModel::load_gguf, and give finite, spread-out logits; same seed, same bytes.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <map>

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <unistd.h>

#include "io/gguf.h"
#include "model/glm_dsa.h"
#include "model/synth.h"

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

}  // namespace
}  // namespace bigmoe
