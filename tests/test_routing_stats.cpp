// Routing statistics (engine/routing_stats.h): counting, hottest experts, hit rates, the profile
// file and its errors; the CPU model recording its router's choices; `bigmoe profile`.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <numeric>

#include "engine/routing_stats.h"
#include "glm_test_util.h"
#include "model/glm_dsa.h"
#include "util/error.h"

namespace bigmoe {
namespace {

using ::testing::HasSubstr;
using test::fixture;

TEST(RoutingStats, CountsHottestAndHitRates) {
  RoutingStats s(6, 2);
  const int picks[][2] = {{0, 1}, {1, 2}, {1, 5}, {5, 0}};
  for (auto& p : picks) s.add(3, p, 2);
  int one[2] = {4, 2};
  s.add(7, one, 2);
  EXPECT_EQ(s.tokens(), 4u);  // counted at the first layer seen
  EXPECT_EQ(s.layers().at(3), (std::vector<uint64_t>{2, 3, 1, 0, 0, 2}));
  EXPECT_EQ(s.hottest(3, 3), (std::vector<int>{1, 0, 5}));  // ties (0 and 5: 2 each) to the lower id
  EXPECT_DOUBLE_EQ(s.hit_rate(3, {1, 0}), 5.0 / 8.0);
  EXPECT_DOUBLE_EQ(s.hit_rate(3, {}), 0.0);
  EXPECT_DOUBLE_EQ(s.hit_rate(9, {}), 1.0);  // a layer never seen
  // Top-1 of each layer: layer 3 expert 1 (3 of 8), layer 7 expert 2 (1 of 2; ties to lower id).
  EXPECT_DOUBLE_EQ(s.hit_rate_top(1), 4.0 / 10.0);
  EXPECT_DOUBLE_EQ(s.hit_rate_top(6), 1.0);
  int bad[2] = {0, 6};
  EXPECT_THROW(s.add(3, bad, 2), Error);
  EXPECT_THROW(s.add(3, bad, 1), Error);
}

// Bulk counts (the GPU engine's flush) count as the same picks one token at a time would.
TEST(RoutingStats, AddCountsEqualsAddPerToken) {
  RoutingStats a(4, 2), b(4, 2);
  const int picks[][2] = {{0, 1}, {1, 3}, {3, 0}};
  for (auto& p : picks) a.add(5, p, 2);
  int q[2] = {2, 1};
  a.add(6, q, 2);
  for (auto& p : picks) a.add(5, p, 2);
  b.add_counts(5, {2, 2, 0, 2}, 3);
  b.add_counts(6, {0, 1, 1, 0}, 1);
  b.add_counts(5, {2, 2, 0, 2}, 3);
  EXPECT_EQ(b.layers(), a.layers());
  EXPECT_EQ(b.tokens(), a.tokens());  // 6: counted at layer 5, the first seen
  EXPECT_EQ(b.tokens(), 6u);
  try {
    b.add_counts(6, {1, 1, 1}, 1);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), HasSubstr("layer 6: 3 counts"));
  }
  try {
    b.add_counts(6, {1, 1, 1, 0}, 1);  // 3 picks for one token of top-2
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), HasSubstr("layer 6: 3 picks for 1 tokens"));
  }
}

TEST(RoutingStats, JsonRoundTripAndErrors) {
  RoutingStats s(4, 2);
  s.model = "m";
  int p[2] = {3, 1};
  s.add(2, p, 2);
  s.add(2, p, 2);
  RoutingStats r = RoutingStats::from_json(s.to_json(), "x.json");
  EXPECT_EQ(r.layers(), s.layers());
  EXPECT_EQ(r.tokens(), 2u);
  EXPECT_EQ(r.n_experts(), 4);
  EXPECT_EQ(r.top_k(), 2);
  EXPECT_EQ(r.model, "m");
  auto err = [](const std::string& text) {
    try {
      RoutingStats::from_json(text, "p.json");
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  const std::string head = R"({"format":"bigmoe-routing-profile","version":1,"n_experts":4,"top_k":2,"tokens":2,)";
  EXPECT_THAT(err("{"), HasSubstr("p.json: not JSON"));
  EXPECT_THAT(err(R"({"format":"x"})"), HasSubstr("'format'"));
  EXPECT_THAT(err(R"({"format":"bigmoe-routing-profile","version":2})"), HasSubstr("unsupported version"));
  EXPECT_THAT(err(head + R"("layers":[{"layer":1,"counts":[1,2,3]}]})"), HasSubstr("'counts' in layers[0]"));
  EXPECT_THAT(err(head + R"("layers":[{"counts":[1,2,3,4]}]})"), HasSubstr("missing field 'layer' in layers[0]"));
  EXPECT_THAT(err(head + R"("layers":[{"layer":1,"counts":[1,2,-3,4]}]})"), HasSubstr("'counts' in layers[0][2]"));
  EXPECT_THAT(err(head + R"("layers":[{"layer":1,"counts":[1,2,3,4]},{"layer":1,"counts":[1,2,3,4]}]})"),
              HasSubstr("layer 1 appears twice"));
  EXPECT_THAT(err(R"({"format":"bigmoe-routing-profile","version":1,"n_experts":4,"top_k":5,"tokens":1,"layers":[]})"),
              HasSubstr("'top_k'"));
  EXPECT_THROW(RoutingStats::load("/nonexistent/profile.json"), Error);
}

// The CPU model records top_k picks per token for each MoE layer (glm5_tiny: layers 2–4 MoE,
// 16 experts top-4), and the MTP layer under index num_hidden_layers.
TEST(RoutingStats, ModelRecordsEveryMoeLayer) {
  auto m = GlmDsaModel::load(fixture("glm5_tiny"));
  auto ref = test::load_reference("glm5_tiny");
  const ModelConfig& c = m->config();
  RoutingStats s(c.n_routed_experts, c.num_experts_per_tok);
  m->set_routing_stats(&s);
  KVCache cache = m->new_cache();
  ForwardOut out = m->forward(ref.prompt, cache, AttnForm::Plain);
  const int T = int(ref.prompt.size());
  EXPECT_EQ(s.tokens(), uint64_t(T));
  std::vector<int> moe_layers;
  for (const auto& [layer, counts] : s.layers()) {
    moe_layers.push_back(layer);
    EXPECT_EQ(std::accumulate(counts.begin(), counts.end(), uint64_t(0)), uint64_t(T) * c.num_experts_per_tok);
  }
  EXPECT_EQ(moe_layers, (std::vector<int>{2, 3, 4}));
  KVCache mc = m->new_mtp_cache();
  std::vector<int> next(ref.prompt.begin() + 1, ref.prompt.end());
  next.push_back(ref.greedy[0]);
  m->mtp_forward(out.hidden.data(), next, mc, AttnForm::Plain);
  ASSERT_TRUE(s.layers().count(c.num_hidden_layers));
  const auto& mtp = s.layers().at(c.num_hidden_layers);
  EXPECT_EQ(std::accumulate(mtp.begin(), mtp.end(), uint64_t(0)), uint64_t(T) * c.num_experts_per_tok);
  m->set_routing_stats(nullptr);
}

std::string run_cli(const std::string& args, int* rc) {
  const std::string out = (std::filesystem::temp_directory_path() / "bigmoe_profile_cli.txt").string();
  *rc = std::system((std::string(BIGMOE_BINARY) + " " + args + " > " + out + " 2>&1").c_str());
  std::ifstream in(out);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

TEST(RoutingStats, ProfileCommandWritesProfile) {
  auto dir = std::filesystem::temp_directory_path() / "bigmoe_profile_test";
  std::filesystem::create_directories(dir);
  {
    std::ofstream p(dir / "prompts.txt");
    p << "1 2 3 4 5 6 7 8\n\n10 20 30\n";
  }
  int rc = 0;
  std::string log = run_cli("profile -q -m " + fixture("glm5_tiny").string() + " --ids -p " + (dir / "prompts.txt").string() +
                                " -n 4 -o " + (dir / "prof.json").string(),
                            &rc);
  ASSERT_EQ(rc, 0) << log;
  EXPECT_THAT(log, HasSubstr("19 tokens through 3 MoE layers"));  // 8 + 3 prompt tokens + 2 × 4 generated
  RoutingStats s = RoutingStats::load(dir / "prof.json");
  EXPECT_EQ(s.tokens(), 19u);
  EXPECT_EQ(s.layers().size(), 3u);

  // Errors name the culprit.
  {
    std::ofstream p(dir / "bad.txt");
    p << "1 2 x3\n";
  }
  log = run_cli("profile -q -m " + fixture("glm5_tiny").string() + " --ids -p " + (dir / "bad.txt").string(), &rc);
  EXPECT_NE(rc, 0);
  EXPECT_THAT(log, HasSubstr("bad.txt:1: 'x3' is not a token id"));
  // --cpu-threads is for the GPU engine's host experts.
  log = run_cli("profile -q -m " + fixture("glm5_tiny").string() + " --ids -p " + (dir / "prompts.txt").string() +
                    " --cpu-threads 2",
                &rc);
  EXPECT_NE(rc, 0);
  EXPECT_THAT(log, HasSubstr("--cpu-threads applies to the GPU engine"));
  {
    std::ofstream p(dir / "big.txt");
    p << "1 99999\n";
  }
  log = run_cli("profile -q -m " + fixture("glm5_tiny").string() + " --ids -p " + (dir / "big.txt").string(), &rc);
  EXPECT_NE(rc, 0);
  EXPECT_THAT(log, HasSubstr("token id 99999 out of range"));
  log = run_cli("profile -q -m " + fixture("glm5_tiny").string() + " -p " + (dir / "prompts.txt").string(), &rc);
  EXPECT_NE(rc, 0);
  EXPECT_THAT(log, HasSubstr("no tokenizer"));
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace bigmoe
