// Routing statistics on the GPU engine (backend/cuda/routing_count.h, GlmDsaCuda::
// set_routing_stats): the counting kernel against a host histogram, and GlmDsaCuda's per-layer,
// per-expert counts against the CPU model's RoutingStats on each fixture's prompt and greedy
// tokens, exactly. Covered: decode-sized steps replayed from captured CUDA graphs, a prefill
// step, experts on the host (the offload executor's path), counting switched off and on again,
// and `bigmoe profile --gpu` against `bigmoe profile`.
#include <fmt/format.h>
#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "backend/cuda/glm_dsa_cuda.h"
#include "backend/cuda/routing_count.h"
#include "cuda_test_util.h"
#include "engine/routing_stats.h"
#include "glm_test_util.h"
#include "model/glm_dsa.h"
#include "util/error.h"

namespace bigmoe {
namespace {

using test::fixture;
using test::load_reference;

class CudaRouting : public test::CudaTest {};

TEST_F(CudaRouting, CountRoutesMatchesHostHistogram) {
  // Decode-sized (one block, global atomics), prefill-sized (shared histograms), and more
  // experts than the shared histogram holds; ids outside 0..E-1 are skipped.
  for (auto [S, E] : std::vector<std::pair<int, int>>{{8, 16}, {128, 256}, {32768, 256}, {5000, 5000}}) {
    std::uniform_int_distribution<int> id(-1, E);
    std::vector<int> ids(static_cast<size_t>(S));
    for (int& v : ids) v = id(rng);
    test::DeviceBuffer<int> d_ids(static_cast<size_t>(S));
    d_ids.upload(ids);
    test::DeviceBuffer<unsigned long long> counts(static_cast<size_t>(E)), rows(1);
    cuda::check(cudaMemset(counts.p, 0, size_t(E) * 8), "memset");
    cuda::check(cudaMemset(rows.p, 0, 8), "memset");
    for (int rep = 0; rep < 2; ++rep) cuda::count_routes(d_ids.p, S, E, counts.p, 3, rows.p);
    cuda::check(cudaDeviceSynchronize(), "sync");
    std::vector<unsigned long long> want(size_t(E), 0);
    for (int v : ids)
      if (v >= 0 && v < E) want[size_t(v)] += 2;
    EXPECT_EQ(counts.download(), want) << S << " ids, " << E << " experts";
    EXPECT_EQ(rows.download()[0], 6ull);
  }
}

struct Case {
  const char* fixture;
  const char* ref;
  bool gguf;
  int max_rows;       // 16: the prompt as decode steps; 64: one prefill step
  const char* place;  // "gpu" | "stream" | "cpu"
};

class CudaRoutingModel : public test::CudaTest, public ::testing::WithParamInterface<Case> {};

// The CPU model's counts over prompt + greedy tokens against GlmDsaCuda's over the same tokens
// (the prompt in one call, then one token per step: graphs captured and replayed).
TEST_P(CudaRoutingModel, CountsEqualTheCpuModels) {
  const Case& k = GetParam();
  auto m = k.gguf ? GlmDsaModel::load_gguf(fixture(k.fixture) / "model.gguf") : GlmDsaModel::load(fixture(k.fixture));
  auto ref = load_reference(k.ref);
  const ModelConfig& c = m->config();
  const int E = c.n_routed_experts, K = c.num_experts_per_tok, L = c.num_hidden_layers;
  std::vector<int> all = ref.prompt;
  all.insert(all.end(), ref.greedy.begin(), ref.greedy.end());
  RoutingStats want(E, K);
  m->set_routing_stats(&want);
  KVCache cache = m->new_cache();
  m->forward(all, cache, AttnForm::Plain);
  m->set_routing_stats(nullptr);

  cuda::GlmDsaCudaOptions o;
  o.max_context = 128;
  o.max_sequences = 2;  // s, then s2 with counting off and on again
  o.max_rows = k.max_rows;
  o.exact_absorb = true;
  o.prefill_gemm = false;
  if (std::string(k.place) != "gpu") {
    o.experts.home.assign(size_t(L), {});
    o.experts.cpu_threads = 2;
    for (int l = 0; l < L; ++l)
      if (m->layers()[size_t(l)].ffn.moe)
        o.experts.home[size_t(l)].assign(size_t(E), std::string(k.place) == "cpu" ? cuda::ExpertHome::Cpu
                                                                                 : cuda::ExpertHome::Stream);
  }
  cuda::GlmDsaCuda g(*m, o);
  RoutingStats got(E, K);
  g.set_routing_stats(&got);
  auto s = g.new_sequence();
  g.forward({&s}, {ref.prompt}, true);
  for (int t : ref.greedy) g.forward({&s}, {{t}}, true);
  g.flush_routing_stats();
  EXPECT_EQ(got.tokens(), uint64_t(all.size()));
  ASSERT_EQ(got.layers().size(), want.layers().size());
  for (const auto& [layer, counts] : want.layers()) {
    ASSERT_TRUE(got.layers().count(layer)) << "layer " << layer;
    EXPECT_EQ(got.layers().at(layer), counts) << "layer " << layer;
  }

  // Off: steps count nothing (the graphs are captured again without the kernel) ...
  g.set_routing_stats(nullptr);
  auto s2 = g.new_sequence();
  g.forward({&s2}, {{ref.prompt[0]}}, true);
  for (int j = 1; j < 4; ++j) g.forward({&s2}, {{ref.prompt[size_t(j)]}}, true);
  EXPECT_EQ(got.tokens(), uint64_t(all.size()));
  // ... on again: every step counts, the first eagerly, the next captured, then replayed.
  RoutingStats again(E, K);
  g.set_routing_stats(&again);
  for (int j = 4; j < 9; ++j) g.forward({&s2}, {{ref.prompt[size_t(j)]}}, true);
  g.flush_routing_stats();
  EXPECT_EQ(again.tokens(), 5u);
  // They are the CPU's picks for positions 4..8 of the prompt: a 9-token run less its
  // 4-token prefix (causal, so the prefix routes alike in both).
  RoutingStats want9(E, K);
  m->set_routing_stats(&want9);
  KVCache c9 = m->new_cache();
  m->forward(std::vector<int>(ref.prompt.begin(), ref.prompt.begin() + 9), c9, AttnForm::Plain);
  m->set_routing_stats(nullptr);
  RoutingStats want4(E, K);
  m->set_routing_stats(&want4);
  KVCache c4 = m->new_cache();
  m->forward(std::vector<int>(ref.prompt.begin(), ref.prompt.begin() + 4), c4, AttnForm::Plain);
  m->set_routing_stats(nullptr);
  for (const auto& [layer, counts] : want9.layers()) {
    std::vector<uint64_t> d = counts;
    for (size_t e = 0; e < d.size(); ++e) d[e] -= want4.layers().at(layer)[e];
    EXPECT_EQ(again.layers().at(layer), d) << "layer " << layer;
  }
  g.set_routing_stats(nullptr);
}

INSTANTIATE_TEST_SUITE_P(Fixtures, CudaRoutingModel,
                         ::testing::Values(Case{"glm5_tiny", "glm5_tiny", false, 16, "gpu"},
                                           Case{"glm5_tiny", "glm5_tiny", false, 64, "gpu"},
                                           Case{"dsv3_tiny", "dsv3_tiny", false, 16, "gpu"},
                                           Case{"glm5_tiny_gguf", "glm5_tiny", true, 16, "gpu"},
                                           Case{"glm5_tiny", "glm5_tiny", false, 16, "stream"},
                                           Case{"glm5_tiny", "glm5_tiny", false, 64, "cpu"}),
                         [](const auto& info) {
                           return fmt::format("{}_rows{}_{}", info.param.fixture, info.param.max_rows,
                                              info.param.place);
                         });

// Stats of another shape are refused; the counts since the last flush reach the stats when the
// engine is destroyed.
TEST_F(CudaRouting, ShapeCheckAndFlushAtDestruction) {
  auto m = GlmDsaModel::load(fixture("glm5_tiny"));
  const ModelConfig& c = m->config();
  cuda::GlmDsaCudaOptions o;
  o.max_context = 64;
  o.max_sequences = 1;
  o.max_rows = 16;
  RoutingStats got(c.n_routed_experts, c.num_experts_per_tok);
  {
    cuda::GlmDsaCuda g(*m, o);
    RoutingStats bad(c.n_routed_experts + 1, c.num_experts_per_tok);
    try {
      g.set_routing_stats(&bad);
      FAIL() << "expected an error";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("set_routing_stats"), std::string::npos) << e.what();
    }
    g.set_routing_stats(&got);
    auto s = g.new_sequence();
    g.forward({&s}, {{1, 2, 3}}, true);
    EXPECT_EQ(got.tokens(), 0u);  // not flushed yet
  }
  EXPECT_EQ(got.tokens(), 3u);
  EXPECT_EQ(got.layers().size(), 3u);  // glm5_tiny: layers 2-4 are MoE
}

// The binary under test: $BIGMOE_BINARY when set (tests run from a copy of the tree), else the
// one built beside this test.
std::string run_cli(const std::string& args, int* rc) {
  const std::string out = (std::filesystem::temp_directory_path() / "bigmoe_profile_gpu_cli.txt").string();
  const char* env = std::getenv("BIGMOE_BINARY");
  const std::string bin = env && *env ? env : BIGMOE_BINARY;
  *rc = std::system((bin + " " + args + " > " + out + " 2>&1").c_str());
  std::ifstream in(out);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

// `bigmoe profile --gpu` writes the profile `bigmoe profile` writes (and --placement runs it
// with the experts on the host). The command runs the engine with its defaults (BF16 absorbed
// MLA, tensor-core prefill), not the float32 options of the exact test above, so a near-tie in
// the router may go the other way: the same tokens and layers, and counts within a few picks.
TEST_F(CudaRouting, ProfileCommandOnTheGpu) {
  auto dir = std::filesystem::temp_directory_path() / "bigmoe_profile_gpu_test";
  std::filesystem::create_directories(dir);
  auto ref = load_reference("glm5_tiny");
  {
    std::ofstream p(dir / "prompts.txt");
    for (size_t i = 0; i < 20; ++i) p << ref.prompt[i] << (i + 1 < 20 ? " " : "\n");
    p << "\n";
    for (size_t i = 20; i < 30; ++i) p << ref.prompt[i] << (i + 1 < 30 ? " " : "\n");
  }
  const std::string base = "profile -q -m " + fixture("glm5_tiny").string() + " --ids -p " + (dir / "prompts.txt").string() + " -n 4 -o ";
  int rc = 0;
  std::string log = run_cli(base + (dir / "cpu.json").string(), &rc);
  ASSERT_EQ(rc, 0) << log;
  log = run_cli(base + (dir / "gpu.json").string() + " --gpu", &rc);
  ASSERT_EQ(rc, 0) << log;
  log = run_cli(base + (dir / "host.json").string() + " --placement experts-streamed", &rc);
  ASSERT_EQ(rc, 0) << log;
  RoutingStats a = RoutingStats::load(dir / "cpu.json"), b = RoutingStats::load(dir / "gpu.json"),
               h = RoutingStats::load(dir / "host.json");
  EXPECT_EQ(a.tokens(), 38u);  // 20 + 10 prompt tokens + 2 × 4 generated
  for (const RoutingStats* r : {&b, &h}) {
    EXPECT_EQ(r->tokens(), a.tokens());
    ASSERT_EQ(r->layers().size(), a.layers().size());
    for (const auto& [layer, counts] : a.layers()) {
      ASSERT_TRUE(r->layers().count(layer)) << "layer " << layer;
      uint64_t diff = 0, picks = 0;
      for (size_t e = 0; e < counts.size(); ++e) {
        const uint64_t x = counts[e], y = r->layers().at(layer)[e];
        diff += x > y ? x - y : y - x;
        picks += x;
      }
      EXPECT_LE(diff, picks / 10) << "layer " << layer;  // each flipped pick moves 2
    }
  }
}

}  // namespace
}  // namespace bigmoe
