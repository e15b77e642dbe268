// GLM-DSA from GGUF (llama.cpp's `glm-dsa` convention, fixture from
// tools/make_glm_gguf_fixture.py) against the same model from safetensors and against the
// transformers reference; plus errors for malformed metadata.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <filesystem>
#include <set>

#include <fmt/format.h>
#include <unistd.h>

#include "engine/sampler.h"
#include "glm_test_util.h"
#include "io/gguf_writer.h"
#include "model/glm_dsa.h"
#include "tensor/quant_act.h"
#include "util/error.h"

namespace bigmoe {
namespace {

namespace fs = std::filesystem;
using test::fixture;
using test::max_row_rel_err;

fs::path gguf_path() { return fixture("glm5_tiny_gguf") / "model.gguf"; }

fs::path tmp_path(const std::string& name) {
  fs::path d = fs::temp_directory_path() / fmt::format("bigmoe_glm_gguf_{}", ::getpid());
  fs::create_directories(d);
  return d / name;
}

// Rewrites the fixture: drops keys in `drop`, replaces those in `set`, and (f16) stores every
// 2-D / 3-D tensor as F16.
fs::path rewrite(const std::string& name, const std::set<std::string>& drop,
                 const std::vector<std::pair<std::string, GgufValue>>& set, bool f16) {
  auto src = GgufFile::open(gguf_path());
  GgufWriter w;
  for (const auto& [k, v] : src->kvs()) {
    if (drop.count(k)) continue;
    bool replaced = false;
    for (const auto& [sk, sv] : set)
      if (sk == k) { w.add(k, sv); replaced = true; }
    if (!replaced) w.add(k, v);
  }
  for (const auto& [sk, sv] : set)
    if (!src->find(sk)) w.add(sk, sv);
  for (const auto& t : src->tensors()) {
    if (f16 && t.ne.size() >= 2 && t.type == GgmlType::F32) {
      const float* x = reinterpret_cast<const float*>(t.data);
      std::vector<uint16_t> h(size_t(t.numel()));
      for (size_t i = 0; i < h.size(); ++i) h[i] = f32_to_f16(x[i]);
      w.add_tensor(t.name, GgmlType::F16, t.ne, h.data(), h.size() * 2);
    } else {
      w.add_tensor(t.name, t.type, t.ne, t.data, t.nbytes);
    }
  }
  fs::path out = tmp_path(name);
  w.write(out);
  return out;
}

class GlmDsaGguf : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    gg = GlmDsaModel::load_gguf(gguf_path()).release();
    st = GlmDsaModel::load(fixture("glm5_tiny")).release();
    ref = new test::Reference(test::load_reference("glm5_tiny"));
  }
  static void TearDownTestSuite() {
    delete gg;
    delete st;
    delete ref;
  }
  static std::vector<int> all_ids() {
    std::vector<int> ids = ref->prompt;
    ids.insert(ids.end(), ref->greedy.begin(), ref->greedy.end());
    return ids;
  }
  static GlmDsaModel* gg;
  static GlmDsaModel* st;
  static test::Reference* ref;
};
GlmDsaModel* GlmDsaGguf::gg = nullptr;
GlmDsaModel* GlmDsaGguf::st = nullptr;
test::Reference* GlmDsaGguf::ref = nullptr;

TEST_F(GlmDsaGguf, ConfigMatchesSafetensors) {
  const ModelConfig &a = gg->config(), &b = st->config();
  EXPECT_EQ(a.vocab_size, b.vocab_size);
  EXPECT_EQ(a.hidden_size, b.hidden_size);
  EXPECT_EQ(a.num_hidden_layers, b.num_hidden_layers);
  EXPECT_EQ(a.num_nextn_predict_layers, b.num_nextn_predict_layers);
  EXPECT_EQ(a.num_attention_heads, b.num_attention_heads);
  EXPECT_EQ(a.q_lora_rank, b.q_lora_rank);
  EXPECT_EQ(a.kv_lora_rank, b.kv_lora_rank);
  EXPECT_EQ(a.qk_nope_head_dim, b.qk_nope_head_dim);
  EXPECT_EQ(a.qk_rope_head_dim, b.qk_rope_head_dim);
  EXPECT_EQ(a.v_head_dim, b.v_head_dim);
  EXPECT_EQ(a.n_routed_experts, b.n_routed_experts);
  EXPECT_EQ(a.num_experts_per_tok, b.num_experts_per_tok);
  EXPECT_EQ(a.n_shared_experts, b.n_shared_experts);
  EXPECT_EQ(a.moe_intermediate_size, b.moe_intermediate_size);
  EXPECT_EQ(a.intermediate_size, b.intermediate_size);
  EXPECT_DOUBLE_EQ(a.routed_scaling_factor, b.routed_scaling_factor);
  EXPECT_EQ(a.norm_topk_prob, b.norm_topk_prob);
  EXPECT_EQ(a.index_n_heads, b.index_n_heads);
  EXPECT_EQ(a.index_head_dim, b.index_head_dim);
  EXPECT_EQ(a.index_topk, b.index_topk);
  EXPECT_EQ(a.indexer_shared, b.indexer_shared);
  EXPECT_EQ(a.layer_is_moe, b.layer_is_moe);
  EXPECT_EQ(a.rope.interleave, b.rope.interleave);
  EXPECT_EQ(a.rope.indexer_interleave, b.rope.indexer_interleave);
  EXPECT_TRUE(gg->has_mtp());
}

// Same prefill logits as the safetensors model (F32 GGUF of bf16 weights: exact up to
// float summation order) and as transformers.
TEST_F(GlmDsaGguf, PrefillMatchesSafetensorsAndTransformers) {
  std::vector<int> ids = all_ids();
  const int V = gg->vocab_size();
  KVCache c1 = gg->new_cache(), c2 = st->new_cache();
  ForwardOut a = gg->forward(ids, c1, AttnForm::Plain);
  ForwardOut b = st->forward(ids, c2, AttnForm::Plain);
  EXPECT_LE(max_row_rel_err(a.logits.data(), b.logits.data(), ids.size(), V), 1e-5);
  EXPECT_LE(max_row_rel_err(a.logits.data(), ref->logits.data.data(), ids.size(), V), 1e-4);
}

TEST_F(GlmDsaGguf, GreedyDecodeMatchesReference) {
  const int V = gg->vocab_size();
  KVCache cache = gg->new_cache();
  ForwardOut pre = gg->forward(ref->prompt, cache, AttnForm::Plain);
  std::vector<float> rows = pre.logits;
  std::vector<int> greedy;
  for (size_t i = 0; i < ref->greedy.size(); ++i) {
    int next = argmax(&rows[rows.size() - V], V);
    greedy.push_back(next);
    ForwardOut s = gg->forward({next}, cache, AttnForm::Absorbed);
    rows.insert(rows.end(), s.logits.begin(), s.logits.end());
  }
  EXPECT_EQ(greedy, ref->greedy);
  EXPECT_LE(max_row_rel_err(rows.data(), ref->logits.data.data(), rows.size() / V, V), 1e-4);
}

TEST_F(GlmDsaGguf, MtpLogitsMatchReference) {
  ASSERT_TRUE(gg->has_mtp());
  const int V = gg->vocab_size();
  const size_t T = ref->prompt.size();
  KVCache cache = gg->new_cache();
  ForwardOut main = gg->forward(ref->prompt, cache, AttnForm::Plain);
  std::vector<int> next(ref->prompt.begin() + 1, ref->prompt.end());
  KVCache mc = gg->new_mtp_cache();
  ForwardOut m = gg->mtp_forward(main.hidden.data(), next, mc, AttnForm::Plain);
  EXPECT_LE(max_row_rel_err(m.logits.data(), ref->mtp_logits.data.data(), T - 1, V), 1e-4);
}

TEST_F(GlmDsaGguf, F16ConversionMatchesWithinTolerance) {
  fs::path p = rewrite("f16.gguf", {}, {}, true);
  auto m = GlmDsaModel::load_gguf(p);
  std::vector<int> ids = all_ids();
  const int V = m->vocab_size();
  KVCache c1 = m->new_cache(), c2 = st->new_cache();
  ForwardOut a = m->forward(ids, c1, AttnForm::Plain);
  ForwardOut b = st->forward(ids, c2, AttnForm::Plain);
  EXPECT_LE(max_row_rel_err(a.logits.data(), b.logits.data(), ids.size(), V), 1e-3);
}

TEST_F(GlmDsaGguf, MissingKeyNamesKeyAndFile) {
  for (std::string key : {"glm-dsa.attention.kv_lora_rank", "glm-dsa.expert_count", "glm-dsa.block_count",
                          "glm-dsa.attention.indexer.top_k", "glm-dsa.attention.key_length_mla"}) {
    fs::path p = rewrite("missing.gguf", {key}, {}, false);
    EXPECT_THAT([&] { GlmDsaModel::load_gguf(p); },
                ::testing::ThrowsMessage<Error>(::testing::AllOf(::testing::HasSubstr(key),
                                                                 ::testing::HasSubstr(p.string()))))
        << key;
  }
}

TEST_F(GlmDsaGguf, MalformedKeyNamesKeyAndFile) {
  {  // wrong type
    fs::path p = rewrite("badtype.gguf", {}, {{"glm-dsa.attention.head_count", GgufValue::make_str("four")}}, false);
    EXPECT_THAT([&] { GlmDsaModel::load_gguf(p); },
                ::testing::ThrowsMessage<Error>(::testing::AllOf(::testing::HasSubstr("glm-dsa.attention.head_count"),
                                                                 ::testing::HasSubstr(p.string()))));
  }
  {  // indexer types of the wrong length
    fs::path p = rewrite("badtypes.gguf", {}, {{"glm-dsa.attention.indexer.types", GgufValue::make_bool_array({true, false})}},
                         false);
    EXPECT_THAT([&] { GlmDsaModel::load_gguf(p); },
                ::testing::ThrowsMessage<Error>(::testing::AllOf(
                    ::testing::HasSubstr("glm-dsa.attention.indexer.types"), ::testing::HasSubstr(p.string()))));
  }
  {  // softmax gating is not what this forward implements
    fs::path p = rewrite("softmax.gguf", {}, {{"glm-dsa.expert_gating_func", GgufValue::make_uint(GgufType::UINT32, 1)}},
                         false);
    EXPECT_THAT([&] { GlmDsaModel::load_gguf(p); },
                ::testing::ThrowsMessage<Error>(::testing::HasSubstr("glm-dsa.expert_gating_func")));
  }
  {  // another architecture
    fs::path p = rewrite("arch.gguf", {}, {{"general.architecture", GgufValue::make_str("llama")}}, false);
    EXPECT_THAT([&] { GlmDsaModel::load_gguf(p); },
                ::testing::ThrowsMessage<Error>(::testing::HasSubstr("general.architecture")));
  }
}

}  // namespace
}  // namespace bigmoe
