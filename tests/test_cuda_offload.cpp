// GlmDsaCuda with routed experts off the GPU (the offload executor, docs/offload.md) against
// the CPU reference GlmDsaModel and transformers' greedy tokens, on every fixture and under
// every placement: all on the GPU, all computed by the CPU, all streamed (no cache), streamed
// through a small LRU cache, Mixed (CPU / stream split, LFU cache), and a per-expert mixture of
// the four homes with an all-GPU layer beside host layers, and that mixture with NUMA nodes
// (node 0, -1 spread, and node 1 where the machine has one). Decode-sized steps (the grouped
// kernel on slot ids), a prefill step (per-expert products), and two sequences in one step,
// all float32 (exact_absorb, no tensor-core prefill), so the tolerance is the all-GPU test's
// 1e-4. Where a fixture's expert format has no CPU kernel (glm5_tiny_gguf holds F32 experts),
// a placement that needs one must fail at load, naming the layer, expert and tensor. Prefetch
// is on by default, so every placement with cache slots runs it; CudaPrefetch checks that it
// changes no bit of the logits (every expert streamed through LRU / LFU slots, one and two
// sequences) and that its counts are sane.
#include <fmt/format.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include "backend/cpu/thread_pool.h"
#include "backend/cuda/glm_dsa_cuda.h"
#include "cuda_test_util.h"
#include "glm_test_util.h"
#include "model/glm_dsa.h"
#include "util/error.h"

namespace bigmoe {
namespace {

using cuda::ExpertHome;
using test::fixture;
using test::load_reference;
using test::max_row_rel_err;

struct Fixture {
  const char* name;
  const char* ref;  // fixture holding ref.json / logits.npy
  bool gguf;
};

const Fixture kFixtures[] = {{"glm5_tiny", "glm5_tiny", false},
                             {"dsv3_tiny", "dsv3_tiny", false},
                             {"glm5_tiny_gguf", "glm5_tiny", true}};
const char* const kPlacements[] = {"all_gpu", "cpu", "stream", "stream_lru", "mixed", "mixture", "numa"};

int argmax(const float* v, int n) { return int(std::max_element(v, v + n) - v); }

bool needs_cpu_kernels(const std::string& p) { return p == "cpu" || p == "mixed" || p == "mixture" || p == "numa"; }

cuda::ExpertPlacement make_placement(const std::string& kind, const GlmDsaModel& m) {
  const ModelConfig& c = m.config();
  const int L = c.num_hidden_layers, E = c.n_routed_experts;
  cuda::ExpertPlacement p;
  p.cpu_threads = 4;
  if (kind == "all_gpu") return p;
  int last_moe = -1;
  for (int i = 0; i < L; ++i)
    if (m.layers()[size_t(i)].ffn.moe) last_moe = i;
  p.home.resize(size_t(L));
  // numa: nodes 0, -1 (spread) and, on a machine with two or more, 1 in turn.
  const int node1 = cpu::numa_node_count() > 1 ? 1 : 0;
  if (kind == "numa") p.node.resize(size_t(L));
  for (int i = 0; i < L; ++i) {
    if (!m.layers()[size_t(i)].ffn.moe) continue;
    auto& h = p.home[size_t(i)];
    h.resize(size_t(E));
    for (int e = 0; e < E; ++e) {
      if (kind == "cpu") h[size_t(e)] = ExpertHome::Cpu;
      else if (kind == "stream" || kind == "stream_lru") h[size_t(e)] = ExpertHome::Stream;
      else if (kind == "mixed") h[size_t(e)] = ExpertHome::Mixed;
      else if (kind == "mixture" || kind == "numa") h[size_t(e)] = i == last_moe ? ExpertHome::Gpu : ExpertHome((e + i) % 4);
      else ADD_FAILURE() << "unknown placement " << kind;
      if (kind == "numa") p.node[size_t(i)].push_back(e % 3 == 0 ? 0 : e % 3 == 1 ? -1 : node1);
    }
  }
  if (kind == "stream_lru") {
    p.cache_slots = 3;
    p.cache_policy = "lru";
    p.prefetch = true;  // off by default
  } else if (kind == "mixed") {
    p.mixed_cpu_fraction = 0.5;
    p.cache_slots = 2;
    p.cache_policy = "lfu";
    p.prefetch = true;
  } else if (kind == "mixture" || kind == "numa") {
    p.mixed_cpu_fraction = 0.5;
    p.cache_slots = 2;
    p.cache_policy = "lru";
  }
  return p;
}

// A fixture's model, its reference and the CPU reference's logits over prompt + greedy (rows
// T..T+N-1 are the decode steps' logits), and the engine options every test here shares.
class OffloadCase : public test::CudaTest {
 protected:
  void load(const Fixture& f) {
    m = f.gguf ? GlmDsaModel::load_gguf(fixture(f.name) / "model.gguf") : GlmDsaModel::load(fixture(f.name));
    ref = load_reference(f.ref);
    std::vector<int> all = ref.prompt;
    all.insert(all.end(), ref.greedy.begin(), ref.greedy.end());
    KVCache cache = m->new_cache();
    cpu_logits = m->forward(all, cache, AttnForm::Plain).logits;
  }
  cuda::GlmDsaCudaOptions engine_options(int sequences, int rows, const std::string& placement_kind) const {
    cuda::GlmDsaCudaOptions o;
    o.max_context = 128;
    o.max_sequences = sequences;
    o.max_rows = rows;
    o.exact_absorb = true;  // float32 throughout: the all-GPU test's 1e-4 applies
    o.prefill_gemm = false;
    o.experts = make_placement(placement_kind, *m);
    return o;
  }
  std::unique_ptr<GlmDsaModel> m;
  test::Reference ref;
  std::vector<float> cpu_logits;  // [T + N, V]
};

class CudaOffload : public OffloadCase, public ::testing::WithParamInterface<std::tuple<Fixture, const char*>> {
 public:
  void SetUp() override {
    test::CudaTest::SetUp();
    if (IsSkipped()) return;
    const Fixture& f = std::get<0>(GetParam());
    placement = std::get<1>(GetParam());
    load(f);
    expect_error = f.gguf && needs_cpu_kernels(placement);
  }
  cuda::GlmDsaCudaOptions options(int sequences, int rows) const { return engine_options(sequences, rows, placement); }
  // Constructs the engine, or checks the clear error of a placement the fixture cannot take.
  std::unique_ptr<cuda::GlmDsaCuda> make(const cuda::GlmDsaCudaOptions& o) {
    if (!expect_error) return std::make_unique<cuda::GlmDsaCuda>(*m, o);
    try {
      cuda::GlmDsaCuda g(*m, o);
      ADD_FAILURE() << placement << ": expected an error (F32 experts have no CPU kernel)";
    } catch (const Error& e) {
      const std::string msg = e.what();
      EXPECT_NE(msg.find("layer "), std::string::npos) << msg;
      EXPECT_NE(msg.find("expert "), std::string::npos) << msg;
      EXPECT_NE(msg.find("CPU expert kernels"), std::string::npos) << msg;
      EXPECT_NE(msg.find("F32"), std::string::npos) << msg;
    }
    return nullptr;
  }
  // Decode steps feeding transformers' greedy tokens: logits of rows T.. within tol of the CPU
  // reference, and each step's argmax is the next greedy token.
  void decode_and_check(cuda::GlmDsaCuda& g, cuda::CudaSequence& s, const std::string& what) {
    const int V = m->vocab_size(), T = int(ref.prompt.size()), N = int(ref.greedy.size());
    for (int j = 0; j < N; ++j) {
      std::vector<float> l = g.forward({&s}, {{ref.greedy[size_t(j)]}}, true);
      ASSERT_EQ(l.size(), size_t(V));
      EXPECT_LT(max_row_rel_err(l.data(), cpu_logits.data() + size_t(T + j) * V, 1, V), 1e-4)
          << what << ": decode step " << j;
      if (j + 1 < N) {
        EXPECT_EQ(argmax(l.data(), V), ref.greedy[size_t(j + 1)]) << what << ": decode step " << j;
      }
    }
  }

  std::string placement;
  bool expect_error = false;
};

// max_rows 16: the prompt runs as decode steps of 16 rows (grouped kernel on slot ids, host
// sync per layer with host experts), then one token per step. Also checks the executor's counts
// against what the placement allows.
TEST_P(CudaOffload, DecodeStepsMatchReference) {
  auto g = make(options(1, 16));
  if (!g) return;
  const int V = m->vocab_size(), T = int(ref.prompt.size());
  auto s = g->new_sequence();
  std::vector<float> got = g->forward({&s}, {ref.prompt});
  ASSERT_EQ(got.size(), size_t(T) * V);
  EXPECT_LT(max_row_rel_err(got.data(), cpu_logits.data(), T, V), 1e-4) << placement << " vs CPU reference";
  EXPECT_LT(max_row_rel_err(got.data(), ref.logits.data.data(), T, V), 1e-4) << placement << " vs transformers";
  EXPECT_EQ(argmax(got.data() + size_t(T - 1) * V, V), ref.greedy[0]);
  decode_and_check(*g, s, placement);

  const cuda::OffloadStats st = g->offload_stats();
  EXPECT_EQ(st.layer_cache_hit_rate.size(), size_t(m->config().num_hidden_layers));
  EXPECT_EQ(st.streamed, st.cache_misses);
  EXPECT_LE(st.prefetch_hits, st.prefetches);
  EXPECT_LE(st.prefetch_hits, st.cache_hits);
  if (placement == "all_gpu") {
    EXPECT_EQ(st.steps, 0u);
  } else {
    EXPECT_GT(st.steps, 0u);
    EXPECT_GT(st.host_ms, 0.0);
  }
  if (placement == "cpu") {
    EXPECT_GT(st.cpu_experts, 0u);
    EXPECT_GT(st.cpu_bytes, 0.0);
    EXPECT_EQ(st.streamed + st.gpu_hits + st.cache_hits, 0u);
    EXPECT_GT(g->host_packed_bytes(), 0u);
  }
  if (placement == "stream" || placement == "stream_lru") {
    EXPECT_GT(st.streamed, 0u);
    EXPECT_GT(st.streamed_bytes, 0.0);
    EXPECT_EQ(st.cpu_experts + st.gpu_hits, 0u);
    EXPECT_EQ(g->host_packed_bytes(), 0u);
    EXPECT_GT(g->host_pinned_bytes(), 0u);
  }
  if (placement == "stream") {
    EXPECT_EQ(st.cache_hits + st.cache_fills + st.prefetches, 0u);  // no slots: no prefetch
  }
  if (placement == "stream_lru") {
    EXPECT_GT(st.cache_hits, 0u);
    EXPECT_GT(st.cache_fills, 0u);
    EXPECT_GT(st.cache_hit_rate(), 0.0);
    EXPECT_GT(st.prefetches, 0u);
    EXPECT_GT(st.prefetch_bytes, 0.0);
  }
  if (placement == "mixed" || placement == "mixture" || placement == "numa") {
    EXPECT_GT(st.cpu_experts, 0u);
    EXPECT_GT(st.streamed, 0u);
  }
  if (placement == "mixture" || placement == "numa") {
    EXPECT_GT(st.gpu_hits, 0u);
  }
  g->reset_offload_stats();
  EXPECT_EQ(g->offload_stats().steps, 0u);
}

// max_rows 64: the 48-row prompt is one prefill step (router's choice on the host, per-expert
// products: resident, streamed through transient / cache slots, CPU jobs), then decode.
TEST_P(CudaOffload, PrefillStepMatchesReference) {
  auto g = make(options(1, 64));
  if (!g) return;
  const int V = m->vocab_size(), T = int(ref.prompt.size());
  auto s = g->new_sequence();
  std::vector<float> got = g->forward({&s}, {ref.prompt});
  ASSERT_EQ(got.size(), size_t(T) * V);
  EXPECT_LT(max_row_rel_err(got.data(), cpu_logits.data(), T, V), 1e-4) << placement;
  EXPECT_EQ(argmax(got.data() + size_t(T - 1) * V, V), ref.greedy[0]);
  decode_and_check(*g, s, placement + " after prefill");
  // A second prefill on another sequence now finds decode's cache contents.
  g->free_sequence(s);
  auto s2 = g->new_sequence();
  got = g->forward({&s2}, {ref.prompt});
  EXPECT_LT(max_row_rel_err(got.data(), cpu_logits.data(), T, V), 1e-4) << placement << " second prefill";
}

// Two sequences per step: both prompts in one prefill step (68 rows), then decode steps of two
// rows (a continues with the greedy tokens, b with the prompt's next tokens, so every position
// is one whose DSA selection the fixture keeps away from ties). Each row against the CPU
// reference of its own sequence.
TEST_P(CudaOffload, TwoSequencesMatchReference) {
  auto g = make(options(2, 128));
  if (!g) return;
  const int V = m->vocab_size(), T = int(ref.prompt.size()), Tb = 20;
  auto a = g->new_sequence(), b = g->new_sequence();
  std::vector<int> pb(ref.prompt.begin(), ref.prompt.begin() + Tb);
  std::vector<float> got = g->forward({&a, &b}, {ref.prompt, pb});
  ASSERT_EQ(got.size(), size_t(T + Tb) * V);
  EXPECT_LT(max_row_rel_err(got.data(), cpu_logits.data(), T, V), 1e-4) << placement << " prefill, sequence a";
  EXPECT_LT(max_row_rel_err(got.data() + size_t(T) * V, cpu_logits.data(), Tb, V), 1e-4)
      << placement << " prefill, sequence b";
  for (int j = 0; j < 6; ++j) {
    auto l = g->forward({&a, &b}, {{ref.greedy[size_t(j)]}, {ref.prompt[size_t(Tb + j)]}}, true);
    ASSERT_EQ(l.size(), size_t(2) * V);
    EXPECT_LT(max_row_rel_err(l.data(), cpu_logits.data() + size_t(T + j) * V, 1, V), 1e-4)
        << placement << " step " << j << ", sequence a";
    EXPECT_LT(max_row_rel_err(l.data() + V, cpu_logits.data() + size_t(Tb + j) * V, 1, V), 1e-4)
        << placement << " step " << j << ", sequence b";
    EXPECT_EQ(argmax(l.data(), V), ref.greedy[size_t(j + 1)]) << placement << " step " << j;
  }
}

// Decode bytes: a host layer's routed bytes move from the GPU count to the host count.
TEST_P(CudaOffload, DecodeBytesSplitByHome) {
  if (placement != "stream" && placement != "all_gpu") GTEST_SKIP() << "checked on stream and all_gpu";
  auto o = options(1, 16);
  cuda::GlmDsaCuda g(*m, o);
  o.experts = cuda::ExpertPlacement{};
  cuda::GlmDsaCuda all(*m, o);
  const int L = m->config().num_hidden_layers;
  for (int l = 0; l <= L; ++l)
    for (int rows : {1, 4})
      EXPECT_EQ(g.decode_bytes_layer(l, rows) + g.decode_host_bytes_layer(l, rows), all.decode_bytes_layer(l, rows))
          << "layer " << l;
  if (placement == "stream") {
    EXPECT_LT(g.decode_bytes_per_token(), all.decode_bytes_per_token());
    EXPECT_GT(g.decode_host_bytes_per_token(), 0u);
  } else {
    EXPECT_EQ(g.decode_host_bytes_per_token(), 0u);
  }
  EXPECT_EQ(all.decode_host_bytes_per_token(), 0u);
}

INSTANTIATE_TEST_SUITE_P(Placements, CudaOffload,
                         ::testing::Combine(::testing::ValuesIn(kFixtures), ::testing::ValuesIn(kPlacements)),
                         [](const auto& info) {
                           return std::string(std::get<0>(info.param).name) + "_" + std::get<1>(info.param);
                         });

// Prefetch on against off: every routed expert streamed through 3 cache slots per layer (LRU or
// LFU), max_rows 16, so the prompt too runs as decode steps (the steps that predict and
// prefetch). The logits must be bitwise those without prefetch (it moves only when bytes arrive,
// and which slot holds an expert, never what a kernel computes) and within the all-GPU test's
// 1e-4 of the CPU reference, one sequence and two per step.
class CudaPrefetch : public OffloadCase, public ::testing::WithParamInterface<std::tuple<Fixture, const char*>> {
 public:
  void SetUp() override {
    test::CudaTest::SetUp();
    if (IsSkipped()) return;
    policy = std::get<1>(GetParam());
    load(std::get<0>(GetParam()));
  }
  cuda::GlmDsaCudaOptions options(int sequences, bool prefetch) const {
    cuda::GlmDsaCudaOptions o = engine_options(sequences, 16, "stream_lru");  // 3 slots
    o.experts.cache_policy = policy;
    o.experts.prefetch = prefetch;
    return o;
  }
  // Elements whose bits differ (sizes must match).
  static size_t bit_diffs(const std::vector<float>& a, const std::vector<float>& b) {
    EXPECT_EQ(a.size(), b.size());
    size_t n = 0;
    for (size_t i = 0; i < std::min(a.size(), b.size()); ++i) n += std::memcmp(&a[i], &b[i], sizeof(float)) != 0;
    return n;
  }
  void check_stats(const cuda::GlmDsaCuda& on, const cuda::GlmDsaCuda& off) const {
    const cuda::OffloadStats a = on.offload_stats(), b = off.offload_stats();
    if (policy == "lru") {
      EXPECT_GT(a.prefetches, 0u);
      EXPECT_GT(a.prefetch_bytes, 0.0);
    }
    EXPECT_LE(a.prefetch_hits, a.prefetches);
    EXPECT_LE(a.prefetch_hits, a.cache_hits);
    EXPECT_LE(a.demand_hit_rate(), a.cache_hit_rate());
    EXPECT_GE(a.demand_hit_rate(), 0.0);
    EXPECT_EQ(a.streamed, a.cache_misses);
    EXPECT_EQ(a.steps, b.steps);
    EXPECT_EQ(b.prefetches + b.prefetch_hits, 0u);
    EXPECT_EQ(b.prefetch_bytes, 0.0);
    EXPECT_DOUBLE_EQ(b.demand_hit_rate(), b.cache_hit_rate());
  }

  std::string policy;
};

TEST_P(CudaPrefetch, OneSequenceBitwiseAsWithout) {
  cuda::GlmDsaCuda on(*m, options(1, true)), off(*m, options(1, false));
  const int V = m->vocab_size(), T = int(ref.prompt.size()), N = int(ref.greedy.size());
  auto so = on.new_sequence(), sf = off.new_sequence();
  std::vector<float> a = on.forward({&so}, {ref.prompt}), b = off.forward({&sf}, {ref.prompt});
  ASSERT_EQ(a.size(), size_t(T) * V);
  EXPECT_EQ(bit_diffs(a, b), 0u) << policy << ": prompt (16-row steps)";
  EXPECT_LT(max_row_rel_err(a.data(), cpu_logits.data(), T, V), 1e-4) << policy << ": prompt";
  for (int j = 0; j < N; ++j) {
    a = on.forward({&so}, {{ref.greedy[size_t(j)]}}, true);
    b = off.forward({&sf}, {{ref.greedy[size_t(j)]}}, true);
    ASSERT_EQ(a.size(), size_t(V));
    EXPECT_EQ(bit_diffs(a, b), 0u) << policy << ": decode step " << j;
    EXPECT_LT(max_row_rel_err(a.data(), cpu_logits.data() + size_t(T + j) * V, 1, V), 1e-4)
        << policy << ": decode step " << j;
  }
  check_stats(on, off);
}

// Two sequences: the prompts as 16-row steps of one sequence each, then decode steps of two
// rows (a continues with the greedy tokens, b with its prompt's next tokens).
TEST_P(CudaPrefetch, TwoSequencesBitwiseAsWithout) {
  cuda::GlmDsaCuda on(*m, options(2, true)), off(*m, options(2, false));
  const int V = m->vocab_size(), T = int(ref.prompt.size()), Tb = 20;
  auto ao = on.new_sequence(), bo = on.new_sequence(), af = off.new_sequence(), bf = off.new_sequence();
  const std::vector<int> pb(ref.prompt.begin(), ref.prompt.begin() + Tb);
  std::vector<float> x = on.forward({&ao, &bo}, {ref.prompt, pb}), y = off.forward({&af, &bf}, {ref.prompt, pb});
  ASSERT_EQ(x.size(), size_t(T + Tb) * V);
  EXPECT_EQ(bit_diffs(x, y), 0u) << policy << ": prompts";
  EXPECT_LT(max_row_rel_err(x.data(), cpu_logits.data(), T, V), 1e-4) << policy << ": prompt a";
  EXPECT_LT(max_row_rel_err(x.data() + size_t(T) * V, cpu_logits.data(), Tb, V), 1e-4) << policy << ": prompt b";
  for (int j = 0; j < 6; ++j) {
    const std::vector<std::vector<int>> toks{{ref.greedy[size_t(j)]}, {ref.prompt[size_t(Tb + j)]}};
    x = on.forward({&ao, &bo}, toks, true);
    y = off.forward({&af, &bf}, toks, true);
    ASSERT_EQ(x.size(), size_t(2) * V);
    EXPECT_EQ(bit_diffs(x, y), 0u) << policy << ": step " << j;
    EXPECT_LT(max_row_rel_err(x.data(), cpu_logits.data() + size_t(T + j) * V, 1, V), 1e-4)
        << policy << ": step " << j << ", sequence a";
    EXPECT_LT(max_row_rel_err(x.data() + V, cpu_logits.data() + size_t(Tb + j) * V, 1, V), 1e-4)
        << policy << ": step " << j << ", sequence b";
  }
  check_stats(on, off);
}

INSTANTIATE_TEST_SUITE_P(Policies, CudaPrefetch,
                         ::testing::Combine(::testing::ValuesIn(kFixtures), ::testing::Values("lru", "lfu")),
                         [](const auto& info) {
                           return std::string(std::get<0>(info.param).name) + "_" + std::get<1>(info.param);
                         });

// Placements that do not fit the model fail at load, naming what is wrong.
class CudaOffloadErrors : public test::CudaTest {};

TEST_F(CudaOffloadErrors, RejectsBadPlacements) {
  auto m = GlmDsaModel::load(fixture("glm5_tiny"));
  const ModelConfig& c = m->config();
  const int L = c.num_hidden_layers, E = c.n_routed_experts;
  auto base = [&] {
    cuda::GlmDsaCudaOptions o;
    o.max_context = 64;
    o.max_sequences = 1;
    o.max_rows = 16;
    o.experts.home.assign(size_t(L), {});
    o.experts.home[2].assign(size_t(E), ExpertHome::Stream);  // layer 2 is the first MoE layer
    return o;
  };
  auto expect_error = [&](const cuda::GlmDsaCudaOptions& o, const std::string& needle) {
    try {
      cuda::GlmDsaCuda g(*m, o);
      ADD_FAILURE() << "expected an error mentioning '" << needle << "'";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  ASSERT_FALSE(m->layers()[0].ffn.moe);
  ASSERT_TRUE(m->layers()[2].ffn.moe);
  EXPECT_NO_THROW(cuda::GlmDsaCuda(*m, base()));
  auto o = base();
  o.experts.home.resize(size_t(L - 1));
  expect_error(o, fmt::format("{} main layers", L));
  o = base();
  o.experts.home[3].assign(size_t(E - 1), ExpertHome::Cpu);
  expect_error(o, "layer 3 places");
  o = base();
  o.experts.home[0].assign(4, ExpertHome::Cpu);
  expect_error(o, "layer 0 is dense");
  o = base();
  o.experts.home[0].assign(4, ExpertHome::Gpu);  // harmless
  EXPECT_NO_THROW(cuda::GlmDsaCuda(*m, o));
  o = base();
  o.experts.mixed_cpu_fraction = 1.5;
  expect_error(o, "mixed_cpu_fraction");
  o = base();
  o.experts.cache_slots = -1;
  expect_error(o, "cache slots");
  o = base();
  o.experts.cache_policy = "mru";
  expect_error(o, "mru");
  // NUMA nodes: one the machine does not have names the layer, the expert and the node.
  const int nodes = cpu::numa_node_count();
  o = base();
  o.experts.node.assign(size_t(L), {});
  o.experts.node[2].assign(size_t(E), 0);
  o.experts.node[2][6] = nodes;
  expect_error(o, fmt::format("layer 2 expert 6 ('stream') is placed on NUMA node {}", nodes));
  o = base();
  o.experts.node.assign(size_t(L), {});
  o.experts.node[2].assign(size_t(E), -1);
  EXPECT_NO_THROW(cuda::GlmDsaCuda(*m, o));  // spread
  o.experts.node[2].resize(size_t(E - 1));
  expect_error(o, "layer 2 gives NUMA nodes");
  o.experts.node.resize(size_t(L - 1));
  expect_error(o, "NUMA nodes for");
  // A GGUF of F32 experts on the CPU: the error names the layer, the expert and the tensor.
  auto mg = GlmDsaModel::load_gguf(fixture("glm5_tiny_gguf") / "model.gguf");
  o = base();
  o.experts.home[3].assign(size_t(E), ExpertHome::Gpu);
  o.experts.home[3][5] = ExpertHome::Cpu;
  try {
    cuda::GlmDsaCuda g(*mg, o);
    ADD_FAILURE() << "expected an error";
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("layer 3"), std::string::npos) << msg;
    EXPECT_NE(msg.find("expert 5"), std::string::npos) << msg;
    EXPECT_NE(msg.find("blk.3.ffn_gate_exps"), std::string::npos) << msg;
  }
}

// An explicit all-GPU placement is today's engine: graphs on, the same logits.
TEST_F(CudaOffloadErrors, ExplicitAllGpuPlacementIsTheDefault) {
  auto m = GlmDsaModel::load(fixture("glm5_tiny"));
  const ModelConfig& c = m->config();
  cuda::GlmDsaCudaOptions o;
  o.max_context = 128;
  o.max_sequences = 1;
  o.max_rows = 16;
  cuda::GlmDsaCuda a(*m, o);
  o.experts.home.assign(size_t(c.num_hidden_layers), std::vector<ExpertHome>(size_t(c.n_routed_experts)));
  cuda::GlmDsaCuda b(*m, o);
  EXPECT_EQ(a.resident_bytes(), b.resident_bytes());
  auto ra = load_reference("glm5_tiny");
  auto sa = a.new_sequence(), sb = b.new_sequence();
  auto la = a.forward({&sa}, {ra.prompt}), lb = b.forward({&sb}, {ra.prompt});
  EXPECT_EQ(la, lb);
  EXPECT_EQ(b.offload_stats().steps, 0u);
}

}  // namespace
}  // namespace bigmoe
