// The placement planner (src/plan): byte accounting of a tiny config computed by hand, the
// predicted times of each layout against hand-written formulas, feasibility against --gpu-mem,
// rules and per-expert rules, routing profiles, JSON shapes, machine-file errors, and the
// published dual-GH200 estimate for GLM-5.2 FP8. Deterministic: no probing.
#include <fmt/format.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <fstream>
#include <nlohmann/json.hpp>

#include "glm_test_util.h"
#include "io/gguf.h"
#include "io/safetensors.h"
#include "model/config.h"
#include "model/inspect.h"
#include "plan/machine.h"
#include "plan/planner.h"
#include "util/error.h"

namespace bigmoe::plan {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;
using test::fixture;
using ::testing::HasSubstr;

constexpr double kGiB = double(1ull << 30);

fs::path machines_dir() { return fixture("..") / ".." / "machines"; }

// Runs f, expects a bigmoe::Error whose message contains every piece of `parts`.
template <typename F>
void expect_error(F&& f, std::initializer_list<const char*> parts) {
  try {
    f();
    ADD_FAILURE() << "no error thrown; expected one containing '" << *parts.begin() << "'";
  } catch (const Error& e) {
    for (const char* p : parts) EXPECT_THAT(e.what(), HasSubstr(p));
  }
}

// ---- a tiny model whose every byte is counted by hand -------------------------------------
//
// deepseek_v3 (no indexer), vocab 1000, d 64, 2 layers (layer 0 dense, layer 1 MoE), plain
// q_proj (q_lora 0), H 2, kv_lora 16, nope 8, rope 8, v 8, dense width 128, 4 experts of width
// 32, top-2, 1 shared expert; BF16 (2 bytes a weight), the correction bias F32.
//
//   token_embd, output        1000 x 64            = 64000 params = 128000 B each
//   output_norm               64                   =   128 B
//   per layer attention:  2 norms 2 x 128 B, attn_q 32 x 64 (4096 B), kv_a 24 x 64 (3072 B),
//                         kv_a_norm 16 (32 B), kv_b 32 x 16 (1024 B), o 64 x 16 (2048 B) = 10528 B
//   layer 0 dense MLP     3 x 128 x 64         = 24576 params = 49152 B
//   layer 1 router 4 x 64 (512 B) + bias 4 x F32 (16 B); shared 3 x 32 x 64 = 12288 B;
//           routed: 3 tensors x 4 experts x 32 x 64 = 16384 B per tensor, 4096 B per (tensor, expert)
//   total = 2 x 128000 + 128 + 2 x 10528 + 49152 + 528 + 12288 + 49152 = 388304 B
//   cache: (16 + 8) elements x 4 B (f32) = 96 B per token per layer
ModelConfig tiny_config() {
  json j = {{"model_type", "deepseek_v3"},
            {"vocab_size", 1000},
            {"hidden_size", 64},
            {"num_hidden_layers", 2},
            {"first_k_dense_replace", 1},
            {"intermediate_size", 128},
            {"moe_intermediate_size", 32},
            {"n_routed_experts", 4},
            {"num_experts_per_tok", 2},
            {"n_shared_experts", 1},
            {"num_attention_heads", 2},
            {"q_lora_rank", nullptr},
            {"kv_lora_rank", 16},
            {"qk_nope_head_dim", 8},
            {"qk_rope_head_dim", 8},
            {"v_head_dim", 8},
            {"max_position_embeddings", 4096}};
  return ModelConfig::from_json(j, "tiny");
}

PlanModel tiny_model() { return plan_model_from_config(tiny_config(), {"bf16", ""}, "tiny"); }

// One GPU of `gpu_bytes` (100 GB/s, 1 TFLOP/s, link 5 GB/s), one node of 1 GiB read at 10 GB/s.
Machine tiny_machine(double gpu_bytes) {
  json j = {
      {"name", "tiny"},
      {"gpus", {{{"name", "g"}, {"memory_gib", gpu_bytes / kGiB}, {"mem_gbps", 100}, {"h2d_gbps", 5}, {"tflops", 1}}}},
      {"numa_nodes", {{{"memory_gib", 1}, {"read_gbps", 10}, {"cores", 4}, {"tflops", 0.2}}}}};
  return machine_from_json(j, "tiny.json");
}

PlanOptions tiny_options() {
  PlanOptions o;
  o.ctx = 1000;
  o.gpu_reserve_gib = 0;
  o.host_reserve_gib = 0;
  o.chunk = 100;
  return o;
}

const LayoutResult& layout(const Plan& p, const std::string& name) {
  for (auto& r : p.layouts)
    if (r.name == name) return r;
  throw Error("no layout " + name);
}

const PlanTensor& tensor(const PlanModel& m, const std::string& name, size_t* index = nullptr) {
  for (size_t i = 0; i < m.tensors.size(); ++i)
    if (m.tensors[i].name == name) {
      if (index) *index = i;
      return m.tensors[i];
    }
  throw Error("no tensor " + name);
}

void expect_rel(double got, double want, double rel = 1e-12) {
  EXPECT_NEAR(got / want, 1.0, rel) << got << " vs " << want;
}

TEST(PlannerModel, TinyConfigBytesByHand) {
  PlanModel m = tiny_model();
  EXPECT_EQ(m.total_bytes(), 388304u);
  EXPECT_EQ(tensor(m, "token_embd.weight").bytes, 128000u);
  EXPECT_EQ(tensor(m, "output.weight").bytes, 128000u);
  EXPECT_EQ(tensor(m, "output.weight").alias, "lm_head.weight");
  EXPECT_EQ(tensor(m, "blk.0.attn_q.weight").bytes, 4096u);
  EXPECT_EQ(tensor(m, "blk.0.attn_kv_b.weight").bytes, 1024u);
  EXPECT_EQ(tensor(m, "blk.0.ffn_down.weight").bytes, 16384u);
  EXPECT_EQ(tensor(m, "blk.1.exp_probs_b.bias").bytes, 16u);
  const PlanTensor& g = tensor(m, "blk.1.ffn_gate_exps.weight");
  EXPECT_EQ(g.bytes, 16384u);
  EXPECT_EQ(g.n_experts, 4);
  EXPECT_EQ(g.cls, TensorClass::RoutedExpert);
  EXPECT_EQ(g.alias, "model.layers.1.mlp.experts.gate_proj");
  uint64_t attn = 0;
  for (auto& t : m.tensors)
    if (t.layer == 0 && t.cls == TensorClass::Attention) attn += t.bytes;
  EXPECT_EQ(attn, 10528u);
  EXPECT_EQ(m.kv_latent, 24);
  EXPECT_EQ(m.index_topk, 0);
}

// The config accounting is inspect_config's (total and routed pool for every format).
TEST(PlannerModel, ConfigAccountingMatchesInspect) {
  ModelConfig c = ModelConfig::load(fixture("glm5_config") / "config.json");
  for (const char* f : {"fp8", "bf16", "int4"}) {
    PlanModel m = plan_model_from_config(c, {f, ""}, "glm5");
    ByteReport r = inspect_config(c, parse_weight_format(f));
    EXPECT_EQ(m.total_bytes(), r.total()) << f;
    uint64_t routed = 0;
    for (auto& t : m.tensors)
      if (t.cls == TensorClass::RoutedExpert) routed += t.bytes;
    EXPECT_EQ(routed, r.bytes[size_t(Category::RoutedExperts)]) << f;
  }
  // GGUF types: Q4_K rows of 6144 weights are 24 blocks of 144 bytes.
  PlanModel q = plan_model_from_config(c, {"q8_0", "q4_k"}, "glm5");
  EXPECT_EQ(tensor(q, "blk.3.ffn_up_exps.weight").bytes, 256ull * 2048 * 24 * 144);
  EXPECT_EQ(tensor(q, "blk.3.ffn_down_exps.weight").bytes, 256ull * 6144 * 8 * 144);
  EXPECT_EQ(tensor(q, "blk.3.attn_q_a.weight").bytes, 2048ull * 192 * 34);     // Q8_0: 32 weights in 34 B
  EXPECT_EQ(tensor(q, "blk.3.ffn_gate_inp.weight").bytes, 4ull * 256 * 6144);  // router F32
  expect_error([&] { plan_model_from_config(c, {"q4_q", ""}, "x"); }, {"--weights 'q4_q'", "unknown weight format"});
}

// Checkpoints: every tensor maps to a known class; the bytes are the files'; GGUF and safetensors
// versions of the same tiny model agree on experts and the cache.
TEST(PlannerModel, CheckpointAndGgufAgree) {
  PlanModel st = plan_model_from_checkpoint(fixture("glm5_tiny"));
  SafetensorsModel files = SafetensorsModel::open(fixture("glm5_tiny"));
  EXPECT_EQ(st.total_bytes(), files.total_bytes());
  for (auto& t : st.tensors) EXPECT_NE(t.cls, TensorClass::Other) << t.name;
  PlanModel gg = plan_model_from_gguf(fixture("glm5_tiny_gguf") / "model.gguf");
  auto g = GgufFile::open(fixture("glm5_tiny_gguf") / "model.gguf");
  uint64_t sum = 0;
  for (auto& t : g->tensors()) sum += t.nbytes;
  EXPECT_EQ(gg.total_bytes(), sum);
  EXPECT_EQ(st.n_layers, gg.n_layers);
  EXPECT_EQ(st.n_mtp, gg.n_mtp);
  EXPECT_EQ(st.n_experts, gg.n_experts);
  EXPECT_EQ(st.kv_latent, gg.kv_latent);
  EXPECT_EQ(st.kv_index, gg.kv_index);
  EXPECT_EQ(st.kv_index, (std::vector<int>{32, 32, 0, 32, 0, 32}));  // full/full/shared/full/shared + MTP
  for (auto& t : gg.tensors) {
    if (t.cls != TensorClass::RoutedExpert) continue;
    const PlanTensor& s = tensor(st, t.name);
    EXPECT_EQ(s.params, t.params) << t.name;
    EXPECT_EQ(s.n_experts, t.n_experts) << t.name;
    EXPECT_EQ(
        s.alias,
        fmt::format("model.layers.{}.mlp.experts.{}", t.layer,
                    t.name.substr(t.name.find("ffn_") + 4, t.name.find("_exps") - t.name.find("ffn_") - 4) + "_proj"));
  }
  // FP8 checkpoint: block scales count with their weight.
  PlanModel ds = plan_model_from_checkpoint(fixture("dsv3_tiny"));
  EXPECT_EQ(ds.total_bytes(), SafetensorsModel::open(fixture("dsv3_tiny")).total_bytes());
  for (auto& t : ds.tensors) EXPECT_NE(t.cls, TensorClass::Other) << t.name;
}

// ---- predicted times against the formulas of docs/planner.md, by hand -----------------------

TEST(Planner, TinyLayoutsByHand) {
  Plan p = make_plan(tiny_model(), tiny_machine(10 * kGiB), tiny_options());
  const double G = 100e9, R = 10e9, P = 5e9;
  // Per decoded token: GPU-resident non-expert weights 211152 B (head 128000 + norm 128 +
  // attention 2 x 10528 + dense 49152 + router 528 + shared 12288), cache reads 2 layers x 1000
  // positions x 96 B = 192000 B; routed: 2 of 4 experts x 12288 B = 24576 B; embedding row 128 B
  // (host, read by the CPU); CPU work on layer 1 sends 4 x d = 256 B of activations over the link.
  const double nonexp = 211152, kv = 192000, routed = 24576, row = 128, act = 256;
  {
    const LayoutResult& r = layout(p, "experts-cpu");
    EXPECT_TRUE(r.fits);
    expect_rel(r.per_token.gpu, nonexp + kv);
    expect_rel(r.per_token.cpu, routed + row);
    expect_rel(r.per_token.pcie, act);
    expect_rel(r.decode_tps_b1, 1 / ((nonexp + kv) / G + (routed + row) / R + act / P));
    // Batch 4: each expert is picked by one of 4 tokens with 1 - (1 - 1/2)^4 = 0.9375.
    const double r4 = 49152 * 0.9375;
    expect_rel(r.per_step_b4.cpu, r4 + 4 * row);
    expect_rel(r.decode_tps_b4, 4 / ((nonexp + 4 * kv) / G + (r4 + 4 * row) / R + 4 * act / P));
    // Prefill of 100 tokens: 2 x active params x tokens at 1 TFLOP/s (layer 0: 5264 + 24576,
    // layer 1: 5264 + 260 + 6144 + half of 24576, output_norm 64) + the head once (64000), GPU
    // weights read once, every expert the chunk touches over the link, 100 embedding rows by the CPU.
    const double active = 29840 + 23956 + 64, C = 100;
    const double touched = 49152 * (1 - std::pow(0.5, 100));
    expect_rel(r.prefill_tps, C / (2 * active * C / 1e12 + 2 * 64000 / 1e12 + nonexp / G + touched / P + 12800 / R));
    EXPECT_DOUBLE_EQ(r.gpu_gib[0], (nonexp + kv) / kGiB);
    EXPECT_DOUBLE_EQ(r.host_gib[0], (49152 + 128000) / kGiB);
  }
  {
    const LayoutResult& r = layout(p, "experts-streamed");
    expect_rel(r.per_token.pcie, routed);
    expect_rel(r.per_token.cpu, row);
    expect_rel(r.decode_tps_b1, 1 / ((nonexp + kv) / G + row / R + routed / P));
  }
  {
    // mixed: the routed bytes move at 10 + 5 GB/s; the CPU takes 2/3 of them
    const LayoutResult& r = layout(p, "mixed");
    expect_rel(r.per_token.cpu, row + routed * 2 / 3);
    expect_rel(r.per_token.pcie, routed / 3 + act);
    expect_rel(r.decode_tps_b1, 1 / ((nonexp + kv) / G + row / R + routed / (R + P) + act / P));
  }
  {
    const LayoutResult& r = layout(p, "all-gpu");
    EXPECT_TRUE(r.fits);
    expect_rel(r.per_token.gpu, nonexp + kv + routed);
    expect_rel(r.decode_tps_b1, 1 / ((nonexp + kv + routed) / G + row / R));
    EXPECT_EQ(r.max_context, 4096);  // the model's limit
  }
  {
    const LayoutResult& r = layout(p, "cpu-only");
    expect_rel(r.per_token.cpu, nonexp + kv + routed + row);
    expect_rel(r.decode_tps_b1, R / (nonexp + kv + routed + row));
  }
  EXPECT_EQ(p.layouts[size_t(p.chosen)].name, "all-gpu");
}

// Feasibility and the largest context follow --gpu-mem; the hot cache fills what is left.
TEST(Planner, FeasibilityFollowsGpuMem) {
  PlanOptions o = tiny_options();
  o.gpu_mem_gib = 420000 / kGiB;  // caps the 10 GiB card at 420000 B
  Plan p = make_plan(tiny_model(), tiny_machine(10 * kGiB), o);
  const LayoutResult& all = layout(p, "all-gpu");
  // all-gpu needs 260304 B of weights + 192000 B of cache
  EXPECT_FALSE(all.fits);
  EXPECT_THAT(all.reason, HasSubstr("GPU 0 needs"));
  EXPECT_EQ(all.max_context, (420000 - 260304) / 192);
  const LayoutResult& cpu = layout(p, "experts-cpu");
  EXPECT_TRUE(cpu.fits);
  EXPECT_EQ(cpu.max_context, (420000 - 211152) / 192);  // 1087
  // hot cache: 420000 - 211152 - 192000 = 16848 B free = expert 0 (3 x 4096); expert 1 does not
  // fit whole, and the cache holds whole experts; hit rate 1/4 of the routed bytes per token.
  const LayoutResult& hot = layout(p, "hot-cache");
  EXPECT_TRUE(hot.fits);
  EXPECT_EQ(hot.cached_bytes, 12288u);
  EXPECT_DOUBLE_EQ(hot.hit_rate, 1.0 / 4);
  EXPECT_EQ(hot.miss_path, "cpu");  // 18432 B at 10 GB/s beats 5 GB/s
  const double G = 100e9, R = 10e9, P = 5e9;
  expect_rel(hot.decode_tps_b1, 1 / ((211152 + 192000 + 6144) / G + (18432 + 128) / R + 256 / P));
  size_t gi = 0, ui = 0;
  tensor(p.model, "blk.1.ffn_gate_exps.weight", &gi);
  tensor(p.model, "blk.1.ffn_up_exps.weight", &ui);
  EXPECT_EQ(hot.loc[gi][0].place, Place::Gpu);
  EXPECT_EQ(hot.loc[ui][0].place, Place::Gpu);
  EXPECT_EQ(hot.loc[gi][1].place, Place::Cpu);
  EXPECT_EQ(hot.loc[ui][1].place, Place::Cpu);
  EXPECT_EQ(hot.loc[gi][2].place, Place::Cpu);
  // Fastest that fits: the cache with misses split between CPU and link.
  EXPECT_EQ(p.layouts[size_t(p.chosen)].name, "hot-cache-mixed");

  // A cap below the non-expert weights + cache: only the CPU fits.
  o.gpu_mem_gib = 300000 / kGiB;
  Plan q = make_plan(tiny_model(), tiny_machine(10 * kGiB), o);
  for (auto& r : q.layouts) EXPECT_EQ(r.fits, r.name == "cpu-only") << r.name;
  EXPECT_EQ(q.layouts[size_t(q.chosen)].name, "cpu-only");
  // A context beyond the model's refuses to plan.
  o.ctx = 5000;
  expect_error([&] { make_plan(tiny_model(), tiny_machine(10 * kGiB), o); }, {"--ctx 5000", "4096"});
}

// Rules: expert rules before tensor rules, first match wins within each; aliases match too.
TEST(Planner, RulesFirstMatchWins) {
  PlanOptions o = tiny_options();
  o.rules = {parse_tensor_rule(R"(ffn_.*_exps=gpu)"), parse_tensor_rule(R"(blk\.1\.ffn_gate_exps=cpu)"),
             parse_tensor_rule(R"(mlp\.shared_experts=stream)"), parse_tensor_rule(R"(^output\.weight$=cpu)")};
  o.expert_rules = {parse_expert_rule("blk.1.ffn_*_exps[3]=stream"), parse_expert_rule("blk.1.ffn_up_exps[3,0]=cpu")};
  Plan p = make_plan(tiny_model(), tiny_machine(10 * kGiB), o);
  const LayoutResult& r = layout(p, "experts-cpu");
  size_t g = 0, u = 0, d = 0, sh = 0, out = 0;
  tensor(p.model, "blk.1.ffn_gate_exps.weight", &g);
  tensor(p.model, "blk.1.ffn_up_exps.weight", &u);
  tensor(p.model, "blk.1.ffn_down_exps.weight", &d);
  tensor(p.model, "blk.1.ffn_up_shexp.weight", &sh);
  tensor(p.model, "output.weight", &out);
  for (int e = 0; e < 3; ++e) EXPECT_EQ(r.loc[g][size_t(e)].place, Place::Gpu) << e;  // first tensor rule
  EXPECT_EQ(r.loc[g][3].place, Place::Stream);                                        // expert rule beats tensor rules
  EXPECT_EQ(r.loc[u][3].place, Place::Stream);                                        // the first expert rule wins
  EXPECT_EQ(r.loc[u][0].place, Place::Cpu);  // the second where the first does not reach
  EXPECT_EQ(r.loc[d][3].place, Place::Stream);
  EXPECT_EQ(r.loc[d][1].place, Place::Gpu);
  EXPECT_EQ(r.loc[sh][0].place, Place::Stream);  // matched through the HF alias
  EXPECT_EQ(r.loc[out][0].place, Place::Cpu);
  // Bytes per token: routed q = 1/2 per expert and 4096 B per (tensor, expert): 8 units on the
  // GPU, 3 streamed, 1 on the CPU; shared experts (12288 B) streamed; head (128000 B) on the CPU.
  expect_rel(r.per_token.gpu, 211152 - 12288 - 128000 + 192000 + 8 * 2048);
  expect_rel(r.per_token.cpu, 128 + 2048 + 128000);
  expect_rel(r.per_token.pcie, 3 * 2048 + 12288 + 256);
  // Rules apply in every layout, all-gpu included.
  EXPECT_EQ(layout(p, "all-gpu").loc[g][3].place, Place::Stream);
  // A rule that pins to the GPU cannot be honoured without one.
  EXPECT_FALSE(layout(p, "cpu-only").fits);
  EXPECT_THAT(layout(p, "cpu-only").reason, HasSubstr("by a rule; this layout uses no GPU"));
}

TEST(Planner, RuleErrorsNameTheRule) {
  expect_error([] { parse_tensor_rule("blk.[0-9=gpu"); }, {"--rule 'blk.[0-9=gpu'", "bad regex"});
  expect_error([] { parse_tensor_rule("blk.1=tpu"); }, {"--rule 'blk.1=tpu'", "unknown target 'tpu'"});
  expect_error([] { parse_tensor_rule("blk.1"); }, {"--rule 'blk.1'", "REGEX=gpu|cpu|stream"});
  expect_error([] { parse_tensor_rule("=gpu"); }, {"empty regex"});
  expect_error([] { parse_expert_rule("blk.1.ffn_*_exps[1-x]=gpu"); }, {"'1-x' is not an expert number"});
  expect_error([] { parse_expert_rule("blk.1.ffn_*_exps[3-1]=gpu"); }, {"range '3-1' runs backwards"});
  expect_error([] { parse_expert_rule("blk.1.ffn_*_exps[]=gpu"); }, {"empty expert list"});
  expect_error([] { parse_expert_rule("blk.1.ffn_*_exps=gpu"); }, {"list of experts in brackets"});
  expect_error([] { parse_expert_rule("blk.1.ffn_*_exps[1]=disk"); }, {"unknown target 'disk'"});
  PlanOptions o = tiny_options();
  o.expert_rules = {parse_expert_rule("blk.1.ffn_*_exps[2,9]=gpu")};
  expect_error([&] { make_plan(tiny_model(), tiny_machine(kGiB), o); },
               {"'blk.1.ffn_*_exps[2,9]=gpu'", "expert 9 does not exist", "holds 4 experts"});
  o.expert_rules = {parse_expert_rule("blk.1.attn_q[0]=gpu")};
  expect_error([&] { make_plan(tiny_model(), tiny_machine(kGiB), o); },
               {"matches no routed-expert tensor", "use --rule"});
  o.expert_rules.clear();
  o.rules = {parse_tensor_rule("blk\\.7\\.=cpu")};
  expect_error([&] { make_plan(tiny_model(), tiny_machine(kGiB), o); }, {"--rule 'blk\\.7\\.=cpu' matches no tensor"});
}

// A routing profile decides which experts the cache holds and the hit rate; batch 4 uses each
// expert's own probability.
TEST(Planner, RoutingProfileDrivesTheCache) {
  PlanOptions o = tiny_options();
  o.gpu_mem_gib = 420000 / kGiB;
  // 50 tokens, top-2: q = 0.1, 0.3, 0.7, 0.9 for experts 0..3
  o.profile = routing_profile_from_json(
      json::parse(R"({"format": "bigmoe-routing-profile", "version": 1, "n_experts": 4, "top_k": 2, "tokens": 50,
                      "layers": [{"layer": 1, "counts": [5, 15, 35, 45]}]})"),
      "profile.json");
  Plan p = make_plan(tiny_model(), tiny_machine(10 * kGiB), o);
  const LayoutResult& hot = layout(p, "hot-cache");
  size_t g = 0;
  tensor(p.model, "blk.1.ffn_gate_exps.weight", &g);
  EXPECT_EQ(hot.loc[g][3].place, Place::Gpu);  // the hottest; the next does not fit whole
  EXPECT_EQ(hot.loc[g][2].place, Place::Cpu);
  EXPECT_EQ(hot.loc[g][0].place, Place::Cpu);
  EXPECT_NEAR(hot.hit_rate, 3 * 0.9 / (3 * 2.0), 1e-12);
  const LayoutResult& cpu = layout(p, "experts-cpu");
  double b4 = 0;
  for (double q : {0.1, 0.3, 0.7, 0.9}) b4 += 3 * 4096 * (1 - std::pow(1 - q, 4));
  expect_rel(cpu.per_step_b4.cpu, b4 + 4 * 128);
  expect_rel(cpu.per_token.cpu, 3 * 4096 * 2.0 + 128);

  auto bad = [&](const char* text, std::initializer_list<const char*> parts) {
    PlanOptions x = tiny_options();
    expect_error(
        [&] {
          x.profile = routing_profile_from_json(json::parse(text), "prof.json");
          make_plan(tiny_model(), tiny_machine(kGiB), x);
        },
        parts);
  };
  bad(R"({"layers": [{"layer": 1, "counts": [1, 2, 3]}]})", {"prof.json", "layer 1 has 3 counts", "4 experts"});
  bad(R"({"layers": [{"layer": 9, "counts": [1, 2, 3, 4]}]})", {"prof.json", "layer 9 does not exist"});
  bad(R"({"layers": [{"layer": 1, "counts": [1, -2, 3, 4]}]})", {"prof.json", "not a count"});
  bad(R"({"layers": {"1": [1, 2, 3, 4]}})", {"prof.json", "\"layers\""});
  bad(R"({"layres": [], "layers": []})", {"prof.json", "unknown field 'layres'"});
}

TEST(Planner, JsonShapes) {
  Plan p = make_plan(tiny_model(), tiny_machine(10 * kGiB), tiny_options());
  json j = plan_summary_json(p);
  ASSERT_TRUE(j.at("layouts").is_array());
  EXPECT_EQ(j.at("layouts").size(), p.layouts.size());
  for (auto& l : j.at("layouts")) {
    EXPECT_TRUE(l.at("name").is_string());
    for (const char* k : {"gpu", "cpu", "pcie"}) EXPECT_TRUE(l.at("bytes_per_token").at(k).is_number()) << k;
    EXPECT_TRUE(l.at("decode_tps_b1").is_number());
    EXPECT_TRUE(l.at("decode_tps_b4").is_number());
    EXPECT_TRUE(l.at("prefill_tps").is_number());
    EXPECT_TRUE(l.at("max_context").is_number_integer());
    EXPECT_TRUE(l.at("fits").is_boolean());
  }
  EXPECT_EQ(j.at("chosen"), "all-gpu");
  EXPECT_EQ(j.at("layouts")[1].at("name"), "experts-cpu");
  EXPECT_NEAR(j.at("layouts")[1].at("bytes_per_token").at("cpu").get<double>(), 24576.0 + 128, 1e-9);

  json f = plan_file_json(p);
  EXPECT_EQ(f.at("bigmoe_plan"), 1);
  EXPECT_EQ(f.at("layout"), "all-gpu");
  EXPECT_EQ(f.at("kv_cache").at("bytes_per_token"), 192.0);
  EXPECT_EQ(f.at("layer_gpu"), json::array({0, 0}));
  bool saw_embd = false;
  for (auto& t : f.at("tensors")) {
    if (t.at("name") == "token_embd.weight") {
      saw_embd = true;
      EXPECT_EQ(t.at("place"), "cpu:0");
    } else {
      EXPECT_EQ(t.at("place"), "gpu:0") << t.at("name");
    }
  }
  EXPECT_TRUE(saw_embd);
  ASSERT_EQ(f.at("experts").size(), 3u);
  EXPECT_EQ(f.at("experts")[0].at("places"), json::array({"gpu:0", "gpu:0", "gpu:0", "gpu:0"}));
  EXPECT_EQ(f.at("experts")[0].at("alias"), "model.layers.1.mlp.experts.gate_proj");

  // No fitting layout: the summary says null and there is no plan file.
  PlanOptions o = tiny_options();
  o.gpu_mem_gib = 1000 / kGiB;
  Machine m = tiny_machine(10 * kGiB);
  m.nodes[0].memory_gib = 1000 / kGiB;
  Plan none = make_plan(tiny_model(), m, o);
  EXPECT_TRUE(plan_summary_json(none).at("chosen").is_null());
  expect_error([&] { plan_file_json(none); }, {"no layout fits"});
  EXPECT_THAT(format_plan_table(none), HasSubstr("chosen: none"));
}

TEST(Planner, TableListsEveryLayout) {
  Plan p = make_plan(tiny_model(), tiny_machine(10 * kGiB), tiny_options());
  std::string t = format_plan_table(p);
  for (auto& r : p.layouts) EXPECT_THAT(t, HasSubstr(r.name));
  EXPECT_THAT(t, HasSubstr("chosen: all-gpu"));
  EXPECT_THAT(t, HasSubstr("GB/tok"));
}

// ---- machine files -------------------------------------------------------------------------

TEST(PlannerMachine, ShippedFilesLoad) {
  for (const char* f : {"h100-test", "dual-gh200", "2x-rtx-pro-6000", "4x-rtx-3090"}) {
    Machine m = load_machine(machines_dir() / (std::string(f) + ".json"));
    EXPECT_EQ(m.name, f);
    EXPECT_FALSE(m.gpus.empty()) << f;
  }
  Machine gh = load_machine(machines_dir() / "dual-gh200.json");
  ASSERT_EQ(gh.gpus.size(), 2u);
  ASSERT_EQ(gh.nodes.size(), 2u);
  EXPECT_EQ(gh.link_gbps(0, 0), 380);
  EXPECT_EQ(gh.link_gbps(0, 1), 133);
  EXPECT_EQ(gh.link_gbps(1, 1), 380);
  Machine r = load_machine(machines_dir() / "4x-rtx-3090.json");
  EXPECT_EQ(r.gpus[3].h2d_gbps, 0.8);
}

TEST(PlannerMachine, FileErrorsNameTheField) {
  json good = {{"gpus", {{{"memory_gib", 1}, {"mem_gbps", 1}, {"h2d_gbps", 1}, {"tflops", 1}}}},
               {"numa_nodes", {{{"memory_gib", 1}, {"read_gbps", 1}, {"cores", 1}}}}};
  EXPECT_NO_THROW(machine_from_json(good, "m.json"));
  auto bad = [&](auto edit, std::initializer_list<const char*> parts) {
    json j = good;
    edit(j);
    expect_error([&] { machine_from_json(j, "m.json"); }, parts);
  };
  bad([](json& j) { j["gpus"][0]["memroy_gib"] = 2; }, {"m.json", "unknown field 'gpus[0].memroy_gib'"});
  bad([](json& j) { j["gpu"] = json::array(); }, {"unknown field 'gpu'"});
  bad([](json& j) { j["numa_nodes"][0].erase("read_gbps"); }, {"missing required field 'numa_nodes[0].read_gbps'"});
  bad([](json& j) { j["gpus"][0]["mem_gbps"] = "fast"; }, {"'gpus[0].mem_gbps' must be a number"});
  bad([](json& j) { j["gpus"][0]["memory_gib"] = -1; }, {"'gpus[0].memory_gib' = -1 must be > 0"});
  bad([](json& j) { j["gpus"][0]["numa_node"] = 1; }, {"'gpus[0].numa_node' = 1", "1 NUMA node"});
  bad([](json& j) { j["numa_nodes"] = json::array(); }, {"at least one node"});
  bad([](json& j) { j["numa_nodes"].push_back(j["numa_nodes"][0]); }, {"missing required field 'remote_h2d_gbps'"});
  expect_error([] { load_machine("/nonexistent/machine.json"); }, {"'/nonexistent/machine.json' cannot be opened"});
  fs::path tmp = fs::temp_directory_path() / "bigmoe_test_planner_bad_machine.json";
  std::ofstream(tmp) << "{\"gpus\": [";
  expect_error([&] { load_machine(tmp); }, {tmp.string().c_str(), "not valid JSON"});
  fs::remove(tmp);
}

TEST(PlannerMachine, ProbeHelpers) {
  EXPECT_EQ(parse_cpulist("0-3,8,10-11\n"), (std::vector<int>{0, 1, 2, 3, 8, 10, 11}));
  EXPECT_TRUE(parse_cpulist("").empty());
  expect_error([] { parse_cpulist("0-x"); }, {"bad entry '0-x'"});
  EXPECT_EQ(parse_meminfo_kb("MemTotal:       131621876 kB\nMemFree: 5 kB\n", "MemTotal"), 131621876);
  EXPECT_EQ(parse_meminfo_kb("Node 1 MemTotal:  4096 kB\nNode 1 MemFree: 1 kB\n", "MemTotal"), 4096);
  EXPECT_EQ(parse_meminfo_kb("MemFree: 5 kB\n", "MemTotal"), -1);
}

// ---- the published dual-GH200 estimate for GLM-5.2 FP8 --------------------------------------
//
// 8 of 256 experts in each of 75 MoE layers, 3 x 2048 x 6144 FP8 weights + 3 x 3072 B of block
// scales each: 75 x 8 x 37757952 B = 22.65 GB = 21.10 GiB per token (with the MTP layer's 8
// experts, as when it drafts every token: 76 x 8 x 37757952 B = 21.38 GiB). Over the GPU's own
// Grace memory at 380 GB/s that is 16.8 tok/s for the experts alone, over the other module's at
// 133 GB/s 5.9 tok/s; the planner adds the non-expert weights (HBM at 4 TB/s).
TEST(Planner, DualGh200PublishedEstimate) {
  ModelConfig c = ModelConfig::load(fixture("glm5_config") / "config.json");
  PlanModel m = plan_model_from_config(c, {"fp8", ""}, "glm5");
  Plan p = make_plan(m, load_machine(machines_dir() / "dual-gh200.json"), PlanOptions{});
  const double per_token = 75.0 * 8 * 37757952;
  EXPECT_NEAR(per_token / kGiB, 21.4, 0.015 * 21.4);
  EXPECT_NEAR(76.0 * 8 * 37757952 / kGiB, 21.4, 0.005 * 21.4);
  EXPECT_GE(380e9 / per_token, 15);
  EXPECT_LE(377e9 / per_token, 18);
  EXPECT_NEAR(133e9 / per_token, 6, 0.2);

  const LayoutResult& local = layout(p, "experts-streamed/local");
  const LayoutResult& remote = layout(p, "experts-streamed/remote");
  EXPECT_TRUE(local.fits);
  EXPECT_TRUE(remote.fits);
  EXPECT_EQ(local.per_token.pcie, per_token);
  EXPECT_EQ(remote.per_token.pcie, per_token);
  EXPECT_EQ(local.gpus, (std::vector<int>{0, 1}));
  EXPECT_GE(local.decode_tps_b1, 15);
  EXPECT_LE(local.decode_tps_b1, 18);
  EXPECT_GE(remote.decode_tps_b1, 5.5);
  EXPECT_LE(remote.decode_tps_b1, 6.5);
  // Non-expert bytes at 4 TB/s + experts over the link: the times add (+ the embedding row,
  // 12288 B read by the CPU at 450 GB/s).
  const double rest = 1 / local.decode_tps_b1 - local.per_token.gpu / 4000e9 - per_token / 380e9;
  EXPECT_NEAR(rest, 12288 / 450e9, 1e-12);
  EXPECT_NEAR(1 / remote.decode_tps_b1 - remote.per_token.gpu / 4000e9 - per_token / 133e9, 12288 / 450e9, 1e-12);
  // local: each GPU's layers keep their experts on its own node (about half each: GPU 1 also
  // holds the head, so it takes a layer or two fewer); remote: swapped.
  EXPECT_NEAR(local.host_gib[0], local.host_gib[1], 3.0 * 256 * 37757952 / kGiB);  // 3 layers of experts
  size_t t10 = 0;
  tensor(p.model, "blk.10.ffn_up_exps.weight", &t10);
  int g10 = local.layer_gpu[10];
  EXPECT_EQ(local.loc[t10][0].dev, g10);
  EXPECT_EQ(remote.loc[t10][0].dev, 1 - remote.layer_gpu[10]);
  // The best layout uses the hot cache and beats streaming alone.
  ASSERT_GE(p.chosen, 0);
  EXPECT_GT(p.layouts[size_t(p.chosen)].decode_tps_b1, local.decode_tps_b1);
  EXPECT_FALSE(layout(p, "all-gpu").fits);
}

// The H100 test machine: GLM-5.2 FP8 (704 GiB) cannot fit in 125 GiB of RAM; a synthetic model
// with fewer MoE layers can, and the planner then streams / computes the experts.
TEST(Planner, H100TestMachine) {
  Machine h = load_machine(machines_dir() / "h100-test.json");
  ModelConfig c = ModelConfig::load(fixture("glm5_config") / "config.json");
  Plan big = make_plan(plan_model_from_config(c, {"fp8", ""}, "glm5"), h, PlanOptions{});
  EXPECT_EQ(big.chosen, -1);
  // 1 dense + 12 MoE layers at GLM-5.2 width: 108 GiB of experts fit the 117 GiB of RAM left.
  json j = json::parse(std::ifstream(fixture("glm5_config") / "config.json"));
  j["num_hidden_layers"] = 13;
  j["first_k_dense_replace"] = 1;
  j["num_nextn_predict_layers"] = 0;
  j.erase("index_topk_freq");
  j.erase("index_skip_topk_offset");
  ModelConfig s = ModelConfig::from_json(j, "synth");
  Plan p = make_plan(plan_model_from_config(s, {"fp8", ""}, "synth"), h, PlanOptions{});
  ASSERT_GE(p.chosen, 0);
  const LayoutResult& st = layout(p, "experts-streamed");
  const LayoutResult& cpu = layout(p, "experts-cpu");
  const LayoutResult& mix = layout(p, "mixed");
  // Experts per token: 12 layers x 8 x 37757952 B; mixed moves them at min(108 + 55, 110) GB/s
  // (host memory shared by the cores and the DMA), GPU-resident bytes at 3000 x 0.47 GB/s.
  const double e = 12.0 * 8 * 37757952;
  EXPECT_TRUE(st.fits);
  EXPECT_TRUE(cpu.fits);
  EXPECT_TRUE(mix.fits);
  EXPECT_FALSE(layout(p, "all-gpu").fits);
  EXPECT_EQ(st.per_token.pcie, e);
  expect_rel(cpu.per_token.cpu - 2 * 6144, e);  // + the embedding row
  const double g = st.per_token.gpu / (3000e9 * 0.47);
  EXPECT_NEAR(1 / st.decode_tps_b1, g + e / 55e9, 1e-6);
  EXPECT_NEAR(1 / mix.decode_tps_b1, g + e / 110e9, 1e-5);
  EXPECT_GT(mix.decode_tps_b1, cpu.decode_tps_b1);
  // Without the shared-memory ceiling mixed moves at the sum, and the GPU term at the roofline.
  Machine free = h;
  free.nodes[0].mem_gbps = 0;
  free.gpus[0].decode_efficiency = 1;
  Plan q = make_plan(plan_model_from_config(s, {"fp8", ""}, "synth"), free, PlanOptions{});
  EXPECT_NEAR(1 / layout(q, "mixed").decode_tps_b1, st.per_token.gpu / 3000e9 + e / 163e9, 1e-5);
  EXPECT_GT(cpu.decode_tps_b1, st.decode_tps_b1);
}

// The command itself: --json on a shipped machine file parses and names its choice; bad input
// exits non-zero naming the culprit.
std::string run_plan(const std::string& args, int* rc) {
  const fs::path out = fs::temp_directory_path() / "bigmoe_plan_cli.txt";
  *rc = std::system((std::string(BIGMOE_BINARY) + " plan " + args + " > " + out.string() + " 2>&1").c_str());
  std::ifstream in(out);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

TEST(PlanCommand, JsonOnShippedMachineAndErrors) {
  const std::string cfg = (fixture("glm5_config") / "config.json").string();
  int rc = 0;
  std::string out = run_plan("-m " + cfg + " --weights fp8 --machine " + (machines_dir() / "dual-gh200.json").string() +
                                 " --json",
                             &rc);
  ASSERT_EQ(rc, 0) << out;
  nlohmann::json j = nlohmann::json::parse(out.substr(out.find('{')));
  ASSERT_TRUE(j.contains("layouts") && j["layouts"].is_array() && !j["layouts"].empty()) << out;
  ASSERT_TRUE(j.contains("chosen")) << out;
  bool found = false;
  for (const auto& l : j["layouts"]) {
    EXPECT_TRUE(l.contains("decode_tps_b1") && l.contains("decode_tps_b4") && l.contains("fits")) << l.dump();
    if (l["name"] == "experts-streamed/local") {
      found = true;
      EXPECT_NEAR(l["decode_tps_b1"].get<double>(), 15.5, 0.5);
    }
  }
  EXPECT_TRUE(found) << out;
  out = run_plan("-m " + cfg + " --weights fp9 --machine " + (machines_dir() / "dual-gh200.json").string(), &rc);
  EXPECT_NE(rc, 0);
  EXPECT_THAT(out, ::testing::HasSubstr("fp9"));
  out = run_plan("-m " + cfg + " --weights fp8 --machine /nonexistent/machine.json", &rc);
  EXPECT_NE(rc, 0);
  EXPECT_THAT(out, ::testing::HasSubstr("/nonexistent/machine.json"));
}

}  // namespace
}  // namespace bigmoe::plan
