// The GLM-DSA CPU reference against HF transformers (fixtures from tools/make_glm_dsa_fixtures.py)
// and its two attention forms and cache paths against each other.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "engine/sampler.h"
#include "glm_test_util.h"
#include "model/glm_dsa.h"
#include "util/error.h"

namespace bigmoe {
namespace {

using test::fixture;
using test::max_row_rel_err;

class GlmDsaFixture : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    model = GlmDsaModel::load(fixture(GetParam()));
    ref = test::load_reference(GetParam());
    V = model->config().vocab_size;
  }
  std::unique_ptr<GlmDsaModel> model;
  test::Reference ref;
  int V = 0;
};

// Prefill over prompt + the reference's greedy tokens reproduces transformers' logits.
TEST_P(GlmDsaFixture, PrefillLogitsMatchTransformers) {
  std::vector<int> ids = ref.prompt;
  ids.insert(ids.end(), ref.greedy.begin(), ref.greedy.end());
  ASSERT_EQ(ref.logits.shape, (std::vector<int64_t>{int64_t(ids.size()), V}));
  KVCache cache = model->new_cache();
  ForwardOut out = model->forward(ids, cache, AttnForm::Plain);
  EXPECT_LE(max_row_rel_err(out.logits.data(), ref.logits.data.data(), ids.size(), V), 1e-4);
}

// Prefill the prompt, then decode greedily one token at a time in the absorbed form over the
// latent cache: same tokens and same logits as transformers' full recompute.
TEST_P(GlmDsaFixture, GreedyDecodeWithCacheMatchesTransformers) {
  const size_t T = ref.prompt.size(), N = ref.greedy.size();
  KVCache cache = model->new_cache();
  ForwardOut pre = model->forward(ref.prompt, cache, AttnForm::Plain);
  std::vector<float> rows = pre.logits;
  std::vector<int> greedy;
  for (size_t i = 0; i < N; ++i) {
    int next = argmax(&rows[rows.size() - V], V);
    greedy.push_back(next);
    ForwardOut step = model->forward({next}, cache, AttnForm::Absorbed);
    rows.insert(rows.end(), step.logits.begin(), step.logits.end());
  }
  EXPECT_EQ(greedy, ref.greedy);
  EXPECT_EQ(cache.n, int(T + N));
  EXPECT_LE(max_row_rel_err(rows.data(), ref.logits.data.data(), T + N, V), 1e-4);
}

// The absorbed form over the cache computes the same function as the plain form.
TEST_P(GlmDsaFixture, AbsorbedDecodeMatchesFullRecompute) {
  std::vector<int> ids = ref.prompt;
  ids.insert(ids.end(), ref.greedy.begin(), ref.greedy.end());
  KVCache full_cache = model->new_cache();
  ForwardOut full = model->forward(ids, full_cache, AttnForm::Plain);

  KVCache cache = model->new_cache();
  const size_t split = 20;  // decode spans the point where DSA's top-k starts to bite
  std::vector<int> head(ids.begin(), ids.begin() + split);
  ForwardOut a = model->forward(head, cache, AttnForm::Absorbed);
  std::vector<float> rows = a.logits;
  for (size_t i = split; i < ids.size(); ++i) {
    ForwardOut s = model->forward({ids[i]}, cache, AttnForm::Absorbed);
    rows.insert(rows.end(), s.logits.begin(), s.logits.end());
  }
  EXPECT_LE(max_row_rel_err(rows.data(), full.logits.data(), ids.size(), V), 1e-5);
  // Hidden states as well (MTP's input).
  KVCache c2 = model->new_cache();
  ForwardOut b = model->forward(ids, c2, AttnForm::Absorbed);
  const int d = model->config().hidden_size;
  EXPECT_LE(max_row_rel_err(b.hidden.data(), full.hidden.data(), ids.size(), d), 1e-5);
}

// Rolling the cache back (as speculative decoding does after a rejection) and decoding again
// gives the same logits as the first time.
TEST_P(GlmDsaFixture, CacheTruncateRollsBack) {
  KVCache cache = model->new_cache();
  model->forward(ref.prompt, cache, AttnForm::Plain);
  ForwardOut first = model->forward({ref.greedy[0]}, cache, AttnForm::Absorbed);
  model->forward({ref.greedy[1], ref.greedy[2]}, cache, AttnForm::Absorbed);
  cache.truncate(int(ref.prompt.size()));
  ForwardOut again = model->forward({ref.greedy[0]}, cache, AttnForm::Absorbed);
  EXPECT_EQ(first.logits, again.logits);
  EXPECT_THROW(cache.truncate(cache.n + 1), Error);
}

// MTP logits over the prompt's entries (h_t, x_{t+1}) match the independent torch MTP.
TEST_P(GlmDsaFixture, MtpLogitsMatchReference) {
  ASSERT_TRUE(model->has_mtp());
  const size_t T = ref.prompt.size();
  ASSERT_EQ(ref.mtp_logits.shape, (std::vector<int64_t>{int64_t(T - 1), V}));
  KVCache cache = model->new_cache();
  ForwardOut main = model->forward(ref.prompt, cache, AttnForm::Plain);
  std::vector<int> next(ref.prompt.begin() + 1, ref.prompt.end());
  KVCache mc = model->new_mtp_cache();
  ForwardOut m = model->mtp_forward(main.hidden.data(), next, mc, AttnForm::Plain);
  EXPECT_LE(max_row_rel_err(m.logits.data(), ref.mtp_logits.data.data(), T - 1, V), 1e-4);

  // Incrementally, one entry at a time in the absorbed form: the same rows.
  const int d = model->config().hidden_size;
  KVCache mc2 = model->new_mtp_cache();
  std::vector<float> rows;
  for (size_t t = 0; t + 1 < T; ++t) {
    ForwardOut s = model->mtp_forward(&main.hidden[t * d], {next[t]}, mc2, AttnForm::Absorbed);
    rows.insert(rows.end(), s.logits.begin(), s.logits.end());
  }
  EXPECT_LE(max_row_rel_err(rows.data(), ref.mtp_logits.data.data(), T - 1, V), 1e-4);
}

TEST_P(GlmDsaFixture, RejectsOutOfRangeTokens) {
  KVCache cache = model->new_cache();
  EXPECT_THAT([&] { model->forward({1, V}, cache, AttnForm::Plain); },
              ::testing::ThrowsMessage<Error>(::testing::HasSubstr("out of range")));
  EXPECT_THROW(model->forward({-1}, cache, AttnForm::Plain), Error);
  EXPECT_EQ(cache.n, 0);
}

INSTANTIATE_TEST_SUITE_P(Fixtures, GlmDsaFixture, ::testing::Values("glm5_tiny", "dsv3_tiny"));

}  // namespace
}  // namespace bigmoe
