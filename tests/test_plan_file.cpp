// Plan files read back by the engine (src/plan/plan_file.h): the planner's placement survives
// plan_file_json -> plan_file_from_json for every layout, expert pins show up, the hot cache
// holds whole experts, every malformed or unsupported plan is refused naming the field, a plan
// for another model is refused, and the CLI writes a named layout (`plan --layout`) and reads
// a plan (`complete --plan`, `--placement`). Deterministic: no probing, no GPU.
#include <fmt/format.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdlib>
#include <fstream>
#include <nlohmann/json.hpp>

#include "glm_test_util.h"
#include "model/config.h"
#include "plan/machine.h"
#include "plan/plan_file.h"
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

template <typename F>
void expect_error(F&& f, std::initializer_list<const char*> parts) {
  try {
    f();
    ADD_FAILURE() << "no error thrown; expected one containing '" << *parts.begin() << "'";
  } catch (const Error& e) {
    for (const char* p : parts) EXPECT_THAT(e.what(), HasSubstr(p));
  }
}

// One GPU (1 GiB unless capped), one node of 1 GiB: every layout of the tiny fixtures fits.
json tiny_machine_json() {
  return {{"name", "tiny"},
          {"gpus", {{{"name", "g"}, {"memory_gib", 1}, {"mem_gbps", 100}, {"h2d_gbps", 5}, {"tflops", 1}}}},
          {"numa_nodes", {{{"memory_gib", 1}, {"read_gbps", 10}, {"cores", 4}, {"tflops", 0.2}}}}};
}
Machine tiny_machine() { return machine_from_json(tiny_machine_json(), "tiny.json"); }

PlanOptions tiny_options() {
  PlanOptions o;
  o.ctx = 256;
  o.gpu_reserve_gib = 0;
  o.host_reserve_gib = 0;
  o.chunk = 64;
  return o;
}

ModelConfig glm5_tiny() { return ModelConfig::load(fixture("glm5_tiny") / "config.json"); }

Plan glm5_tiny_plan(const PlanOptions& o = tiny_options(), const Machine& mc = tiny_machine()) {
  return make_plan(plan_model_from_checkpoint(fixture("glm5_tiny")), mc, o);
}

int layout_index(const Plan& p, const std::string& name) {
  for (size_t i = 0; i < p.layouts.size(); ++i)
    if (p.layouts[i].name == name) return int(i);
  throw Error("no layout " + name);
}

// The file as `plan --out` writes it and reads it back (through text, as the engine does).
EnginePlan round_trip(const Plan& p, int layout, const std::string& source = "plan.json") {
  return plan_file_from_json(json::parse(plan_file_json(p, layout).dump()), source);
}

bool same(const Loc& a, const Loc& b) { return a.place == b.place && a.dev == b.dev; }

// Every routed expert's and every tensor's place in `e` is the layout's.
void expect_same_places(const Plan& p, int layout, const EnginePlan& e) {
  const LayoutResult& r = p.layouts[size_t(layout)];
  const PlanModel& m = p.model;
  EXPECT_EQ(e.layout, r.name);
  EXPECT_EQ(e.gpus, r.gpus);
  EXPECT_EQ(e.layer_gpu, r.layer_gpu);
  size_t k = 0;
  for (size_t t = 0; t < m.tensors.size(); ++t) {
    if (r.loc[t].empty()) continue;
    const PlanTensor& pt = m.tensors[t];
    if (pt.cls == TensorClass::RoutedExpert) {
      ASSERT_EQ(e.experts[size_t(pt.layer)].size(), r.loc[t].size()) << pt.name;
      for (size_t x = 0; x < r.loc[t].size(); ++x)
        EXPECT_TRUE(same(e.experts[size_t(pt.layer)][x], r.loc[t][x]))
            << r.name << " " << pt.name << " expert " << x << ": " << loc_string(e.experts[size_t(pt.layer)][x])
            << " vs " << loc_string(r.loc[t][x]);
    } else {
      ASSERT_LT(k, e.tensors.size());
      EXPECT_EQ(e.tensors[k].name, pt.name);
      EXPECT_TRUE(same(e.tensors[k].loc, r.loc[t][0])) << r.name << " " << pt.name;
      ++k;
    }
  }
  EXPECT_EQ(k, e.tensors.size());
}

// ---- round trip -----------------------------------------------------------------------------

TEST(PlanFile, RoundTripEveryLayoutOfTheTinyFixtures) {
  for (const char* name : {"glm5_tiny", "dsv3_tiny"}) {
    SCOPED_TRACE(name);
    Plan p = make_plan(plan_model_from_checkpoint(fixture(name)), tiny_machine(), tiny_options());
    ModelConfig c = ModelConfig::load(fixture(name) / "config.json");
    for (size_t i = 0; i < p.layouts.size(); ++i) {
      SCOPED_TRACE(p.layouts[i].name);
      EnginePlan e = round_trip(p, int(i));
      expect_same_places(p, int(i), e);
      EXPECT_EQ(e.ctx, 256);
      EXPECT_EQ(e.kv_dtype, "f32");
      EXPECT_EQ(e.decode_tps_b1, p.layouts[i].decode_tps_b1);
      EXPECT_EQ(e.bytes_per_token.pcie, p.layouts[i].per_token.pcie);
      if (p.layouts[i].name == "cpu-only")
        expect_error([&] { check_plan_against(e, c); }, {"plan.json", "cpu-only", "uses no GPU"});
      else
        EXPECT_NO_THROW(check_plan_against(e, c));
    }
  }
  // The dense layers hold no experts, the MoE ones (2, 3, 4 and the MTP layer 5) all 16.
  Plan p = glm5_tiny_plan();
  EnginePlan e = round_trip(p, layout_index(p, "experts-streamed"));
  ASSERT_EQ(e.experts.size(), 6u);
  EXPECT_TRUE(e.experts[0].empty());
  EXPECT_TRUE(e.experts[1].empty());
  for (int l = 2; l < 6; ++l) EXPECT_EQ(e.experts[size_t(l)].size(), 16u);
  EXPECT_EQ(e.count(Place::Stream), 48);  // main layers only
  EXPECT_EQ(e.count(Place::Gpu), 0);
  EXPECT_THAT(e.summary(), HasSubstr("layout experts-streamed (plan.json)"));
  EXPECT_THAT(e.summary(), HasSubstr("0 gpu, 0 cpu, 48 stream, 0 mixed"));
}

// The GGUF version of glm5_tiny carries the same names: its plan fits the checkpoint's config.
TEST(PlanFile, GgufPlanMatchesTheConfig) {
  Plan p = make_plan(plan_model_from_gguf(fixture("glm5_tiny_gguf") / "model.gguf"), tiny_machine(), tiny_options());
  EnginePlan e = round_trip(p, layout_index(p, "mixed"));
  expect_same_places(p, layout_index(p, "mixed"), e);
  EXPECT_NO_THROW(check_plan_against(e, glm5_tiny()));
  EXPECT_EQ(e.count(Place::Mixed), 48);
}

TEST(PlanFile, GlmFiveOnDualGh200RoundTrips) {
  ModelConfig c = ModelConfig::load(fixture("glm5_config") / "config.json");
  Plan p = make_plan(plan_model_from_config(c, {"fp8", ""}, "glm5"), load_machine(machines_dir() / "dual-gh200.json"),
                     PlanOptions{});
  for (size_t i = 0; i < p.layouts.size(); ++i) {
    SCOPED_TRACE(p.layouts[i].name);
    EnginePlan e = round_trip(p, int(i));
    expect_same_places(p, int(i), e);
    if (e.gpus.size() == 2)
      expect_error([&] { check_plan_against(e, c); }, {"plan.json", "plan uses GPUs 0,1; this engine runs one GPU"});
  }
}

TEST(PlanFile, ExpertRulePinsShowUp) {
  PlanOptions o = tiny_options();
  o.expert_rules.push_back(parse_expert_rule("blk.3.ffn_*_exps[5,7-8]=gpu"));
  o.expert_rules.push_back(parse_expert_rule("blk.4.ffn_*_exps[0]=stream"));
  Plan p = glm5_tiny_plan(o);
  EnginePlan e = round_trip(p, layout_index(p, "experts-cpu"));
  expect_same_places(p, layout_index(p, "experts-cpu"), e);
  for (int x = 0; x < 16; ++x) {
    Place want = x == 5 || x == 7 || x == 8 ? Place::Gpu : Place::Cpu;
    EXPECT_EQ(e.experts[3][size_t(x)].place, want) << x;
    EXPECT_EQ(e.experts[4][size_t(x)].place, x == 0 ? Place::Stream : Place::Cpu) << x;
    EXPECT_EQ(e.experts[2][size_t(x)].place, Place::Cpu) << x;
  }
  EXPECT_EQ(e.experts[3][5].dev, 0);
  EXPECT_EQ(e.count(Place::Gpu), 3);
  EXPECT_EQ(e.count(Place::Stream), 1);
  EXPECT_NO_THROW(check_plan_against(e, glm5_tiny()));

  // A pin on one projection only splits an expert: the plan is refused, naming the expert.
  PlanOptions o2 = tiny_options();
  o2.expert_rules.push_back(parse_expert_rule("blk.3.ffn_gate_exps[9]=gpu"));
  Plan q = glm5_tiny_plan(o2);
  expect_error([&] { round_trip(q, layout_index(q, "experts-streamed")); },
               {"plan.json", "expert 9 of layer 3", "gpu:0", "stream:0", "blk.3.ffn_gate_exps.weight",
                "blk.3.ffn_down_exps.weight", "whole experts"});
}

// The hot cache admits whole experts: with room for 2.5 experts it caches 2, all three
// projections of each, and the plan file loads.
TEST(PlanFile, HotCacheHoldsWholeExperts) {
  Plan base = glm5_tiny_plan();
  const LayoutResult& st = base.layouts[size_t(layout_index(base, "experts-streamed"))];
  const double expert = 3.0 * 32 * 64 * 2;  // gate, up, down: 32 x 64 BF16 each
  PlanOptions o = tiny_options();
  o.gpu_mem_gib = st.gpu_gib[0] + 2.5 * expert / kGiB;
  Plan p = glm5_tiny_plan(o);
  for (const char* name : {"hot-cache", "hot-cache-mixed"}) {
    SCOPED_TRACE(name);
    const int i = layout_index(p, name);
    EXPECT_EQ(p.layouts[size_t(i)].cached_bytes, uint64_t(2 * expert));
    EnginePlan e = round_trip(p, i);
    expect_same_places(p, i, e);
    EXPECT_EQ(e.count(Place::Gpu), 2);
    // Uniform routing: ties go to the earlier layer and the lower expert.
    EXPECT_EQ(e.experts[2][0].place, Place::Gpu);
    EXPECT_EQ(e.experts[2][1].place, Place::Gpu);
    EXPECT_NE(e.experts[2][2].place, Place::Gpu);
    EXPECT_NO_THROW(check_plan_against(e, glm5_tiny()));
  }
}

// The mixed split for the GPU the plan runs: the entry of the node its mixed experts live on.
TEST(PlanFile, MixedFractionOfTheGpuAndNode) {
  json mj = {{"name", "one-gpu-two-nodes"},
             {"gpus", {{{"memory_gib", 1}, {"mem_gbps", 100}, {"h2d_gbps", 30}, {"numa_node", 0}, {"tflops", 1}}}},
             {"numa_nodes",
              {{{"memory_gib", 1}, {"read_gbps", 90}, {"cores", 4}}, {{"memory_gib", 1}, {"read_gbps", 60}, {"cores", 4}}}},
             {"remote_h2d_gbps", 20}};
  Plan p = glm5_tiny_plan(tiny_options(), machine_from_json(mj, "m.json"));
  EnginePlan local = round_trip(p, layout_index(p, "mixed/local"));
  EXPECT_DOUBLE_EQ(local.mixed_fraction(), 90.0 / (90 + 30));
  EnginePlan remote = round_trip(p, layout_index(p, "mixed/remote"));
  EXPECT_DOUBLE_EQ(remote.mixed_fraction(), 60.0 / (60 + 20));
  ASSERT_EQ(remote.mixed_cpu_fraction.size(), 1u);
  EXPECT_EQ(remote.mixed_cpu_fraction[0].size(), 2u);
  EXPECT_EQ(round_trip(p, layout_index(p, "experts-cpu/local")).mixed_fraction(), -1);  // no mixed expert
}

// ---- errors ---------------------------------------------------------------------------------

json tiny_file(const std::string& layout = "experts-streamed") {
  Plan p = glm5_tiny_plan();
  return json::parse(plan_file_json(p, layout_index(p, layout)).dump());
}

// The index of a routed-expert tensor's entry in a plan file.
size_t entry(const json& j, const std::string& name) {
  for (size_t i = 0; i < j.at("experts").size(); ++i)
    if (j.at("experts")[i].at("name") == name) return i;
  throw Error("no entry " + name);
}

TEST(PlanFile, SchemaErrorsNameTheField) {
  auto parse = [](const json& j) { return plan_file_from_json(j, "plan.json"); };
  json j = tiny_file();
  EXPECT_NO_THROW(parse(j));

  json v = j;
  v["bigmoe_plan"] = 2;
  expect_error([&] { parse(v); }, {"plan.json", "bigmoe_plan = 2", "version 1"});
  v = j;
  v.erase("bigmoe_plan");
  expect_error([&] { parse(v); }, {"plan.json", "not a plan file"});
  expect_error([&] { parse(json::array()); }, {"plan.json", "not a plan file"});

  const size_t gate2 = entry(j, "blk.2.ffn_gate_exps.weight"), down2 = entry(j, "blk.2.ffn_down_exps.weight"),
               up3 = entry(j, "blk.3.ffn_up_exps.weight");
  const std::string gate2_s = fmt::format("experts[{}] (blk.2.ffn_gate_exps.weight)", gate2);
  v = j;
  v["experts"][gate2]["places"][1] = "disk:0";
  expect_error([&] { parse(v); }, {"plan.json", (gate2_s + ".places[1]").c_str(), "\"disk:0\"", "unknown place"});
  for (const char* bad : {"gpu:*", "cpu", "stream:", "mixed:x", "gpu:-1"}) {
    v = j;
    v["experts"][1]["places"][0] = bad;
    expect_error([&] { parse(v); }, {"plan.json", "experts[1]", "places[0]", bad, "unknown place"});
  }
  v = j;
  v["tensors"][2]["place"] = "vram:0";
  expect_error([&] { parse(v); }, {"plan.json", "tensors[2]", ".place", "vram:0"});

  v = j;
  v["experts"][gate2]["places"][4] = "gpu:0";  // expert 4 of layer 2: gate apart from up and down
  expect_error([&] { parse(v); }, {"plan.json", "expert 4 of layer 2", "stream:0", "gpu:0", gate2_s.c_str(),
                                   fmt::format("experts[{}] (blk.2.ffn_down_exps.weight)", down2).c_str()});

  v = j;
  v["experts"][up3]["places"].erase(v["experts"][up3]["places"].size() - 1);
  expect_error([&] { parse(v); }, {"plan.json", fmt::format("experts[{}] (blk.3.ffn_up_exps.weight): 15 places", up3).c_str(),
                                   "model.experts is 16"});

  v = j;
  v["experts"][gate2]["layer"] = 3;
  expect_error([&] { parse(v); }, {"plan.json", (gate2_s + ".layer = 3").c_str(), "block 2"});
  v = j;
  v["experts"][0]["layer"] = 9;
  expect_error([&] { parse(v); }, {"plan.json", ".layer = 9", "layers 0..5"});

  v = j;
  v.erase("layout");
  expect_error([&] { parse(v); }, {"plan.json", "missing field 'layout'"});
  v = j;
  v["kv_cache"].erase("context");
  expect_error([&] { parse(v); }, {"plan.json", "missing field 'kv_cache.context'"});
  v = j;
  v["model"]["experts"] = "16";
  expect_error([&] { parse(v); }, {"plan.json", "'model.experts'", "expected an integer"});
  v = j;
  v["layer_gpu"].erase(0);
  expect_error([&] { parse(v); }, {"plan.json", "layer_gpu has 5 entries", "6 layers"});
  v = j;
  v["mixed_cpu_fraction"][0][0] = 1.5;
  expect_error([&] { parse(v); }, {"plan.json", "mixed_cpu_fraction[0][0] = 1.5"});

  const fs::path bad = fs::temp_directory_path() / ("bigmoe_plan_file_bad_" + std::to_string(::getpid()) + ".json");
  std::ofstream(bad) << "{\"bigmoe_plan\": 1,";
  expect_error([&] { load_plan_file(bad); }, {bad.string().c_str(), "not valid JSON"});
  fs::remove(bad);
  expect_error([&] { load_plan_file("/nonexistent/plan.json"); }, {"/nonexistent/plan.json", "cannot be opened"});
}

// The optional expert_cache block: read when present, absent keys stay unset, every mistake
// names the field.
TEST(PlanFile, ExpertCacheBlock) {
  auto parse = [](const json& j) { return plan_file_from_json(j, "plan.json"); };
  json j = tiny_file();
  EnginePlan p = parse(j);
  EXPECT_FALSE(p.cache_slots);
  EXPECT_FALSE(p.cache_policy);
  EXPECT_FALSE(p.prefetch);
  EXPECT_THAT(p.summary(), ::testing::Not(HasSubstr("expert cache")));

  j["expert_cache"] = {{"slots", 8}, {"policy", "lfu"}, {"prefetch", false}};
  p = parse(j);
  ASSERT_TRUE(p.cache_slots && p.cache_policy && p.prefetch);
  EXPECT_EQ(*p.cache_slots, 8);
  EXPECT_EQ(*p.cache_policy, "lfu");
  EXPECT_FALSE(*p.prefetch);
  EXPECT_THAT(p.summary(), HasSubstr("48 stream, 0 mixed; expert cache: 8 slots, lfu, prefetch off"));
  j["expert_cache"] = {{"prefetch", true}};
  p = parse(j);
  EXPECT_FALSE(p.cache_slots);
  EXPECT_FALSE(p.cache_policy);
  ASSERT_TRUE(p.prefetch);
  EXPECT_TRUE(*p.prefetch);
  EXPECT_THAT(p.summary(), HasSubstr("; expert cache: prefetch on"));
  j["expert_cache"] = json::object();
  EXPECT_FALSE(parse(j).prefetch);

  json v = j;
  v["expert_cache"] = 3;
  expect_error([&] { parse(v); }, {"plan.json", "'expert_cache' is number, expected an object"});
  v["expert_cache"] = {{"prefetch", "yes"}};
  expect_error([&] { parse(v); }, {"plan.json", "'expert_cache.prefetch' is \"yes\", expected true or false"});
  v["expert_cache"] = {{"prefetch", 1}};
  expect_error([&] { parse(v); }, {"plan.json", "'expert_cache.prefetch' is 1, expected true or false"});
  v["expert_cache"] = {{"slots", -1}};
  expect_error([&] { parse(v); }, {"plan.json", "expert_cache.slots = -1", "slot count >= 0"});
  v["expert_cache"] = {{"slots", 2.5}};
  expect_error([&] { parse(v); }, {"plan.json", "'expert_cache.slots'", "expected an integer"});
  v["expert_cache"] = {{"policy", "mru"}};
  expect_error([&] { parse(v); }, {"plan.json", "expert_cache.policy = \"mru\"", "unknown policy"});
  v["expert_cache"] = {{"prefech", true}};
  expect_error([&] { parse(v); }, {"plan.json", "'expert_cache.prefech': unknown field"});
}

TEST(PlanFile, UnsupportedPlansAreRefused) {
  const ModelConfig c = glm5_tiny();
  auto check = [&](const json& j) { check_plan_against(plan_file_from_json(j, "plan.json"), c); };
  json j = tiny_file();
  EXPECT_NO_THROW(check(j));

  json v = j;
  v["gpus"] = {0, 1};
  expect_error([&] { check(v); }, {"plan.json", "gpus = [0,1]", "plan uses GPUs 0,1; this engine runs one GPU"});

  v = tiny_file("cpu-only");
  expect_error([&] { check(v); }, {"plan.json", "layout 'cpu-only' uses no GPU"});

  v = j;
  v["kv_cache"]["dtype"] = "bf16";
  expect_error([&] { check(v); }, {"plan.json", "kv_cache.dtype = bf16", "f32 cache", "--kv-dtype f32"});

  v = j;
  v["layer_gpu"][1] = 1;
  expect_error([&] { check(v); }, {"plan.json", "layer_gpu[1] = 1", "GPU 0"});

  v = j;
  v["experts"][1]["places"][3] = "gpu:1";
  v["experts"][0]["places"][3] = "gpu:1";
  v["experts"][2]["places"][3] = "gpu:1";
  expect_error([&] { check(v); }, {"plan.json", "expert 3 of layer 2 is on gpu:1", "GPU 0"});

  // A --rule moving a non-expert tensor off the GPU; the token embedding may stay on the host.
  PlanOptions o = tiny_options();
  o.rules.push_back(parse_tensor_rule("blk\\.3\\.attn_output=cpu"));
  Plan p = glm5_tiny_plan(o);
  EnginePlan e = round_trip(p, layout_index(p, "all-gpu"));
  expect_error([&] { check_plan_against(e, c); },
               {"plan.json", "(blk.3.attn_output.weight) is on cpu:0", "token embedding", "tensors["});
  bool embd_on_host = false;
  for (auto& t : round_trip(p, layout_index(p, "experts-cpu")).tensors)
    embd_on_host |= t.name == "token_embd.weight" && t.loc.place == Place::Cpu;
  EXPECT_TRUE(embd_on_host);
  v = j;
  for (auto& t : v["tensors"])
    if (t["name"] == "token_embd.weight") t["place"] = "stream:0";
  EXPECT_NO_THROW(check(v));
}

TEST(PlanFile, PlanForAnotherModelIsRefused) {
  // dsv3_tiny's plan against glm5_tiny: 4 main layers, not 5.
  Plan ds = make_plan(plan_model_from_checkpoint(fixture("dsv3_tiny")), tiny_machine(), tiny_options());
  EnginePlan e = round_trip(ds, layout_index(ds, "experts-streamed"), "ds.json");
  expect_error([&] { check_plan_against(e, glm5_tiny()); }, {"ds.json", "model.layers = 4, the model has 5 main layers"});
  EXPECT_NO_THROW(check_plan_against(e, ModelConfig::load(fixture("dsv3_tiny") / "config.json")));

  // GLM-5.2's plan against glm5_tiny.
  ModelConfig big = ModelConfig::load(fixture("glm5_config") / "config.json");
  json mj = tiny_machine_json();
  mj["gpus"][0]["memory_gib"] = 2000;
  mj["numa_nodes"][0]["memory_gib"] = 2000;
  PlanOptions o;
  o.ctx = 1024;
  Plan g = make_plan(plan_model_from_config(big, {"fp8", ""}, "glm5"), machine_from_json(mj, "m.json"), o);
  expect_error([&] { check_plan_against(round_trip(g, layout_index(g, "experts-cpu")), glm5_tiny()); },
               {"plan.json", "model.layers = 78, the model has 5 main layers"});

  // Same shape, other details: experts per layer, routing, hidden size, which layers are MoE.
  json j = tiny_file();
  auto with = [&](const char* key, const json& val) {
    json v = j;
    v["model"][key] = val;
    return plan_file_from_json(v, "plan.json");
  };
  ModelConfig c = glm5_tiny();
  expect_error([&] { check_plan_against(with("top_k", 8), c); }, {"plan.json", "model.top_k = 8", "top-4"});
  expect_error([&] { check_plan_against(with("hidden", 128), c); }, {"plan.json", "model.hidden = 128", "hidden size 64"});
  expect_error([&] { check_plan_against(with("mtp_layers", 0), c); }, {"plan.json", "layer_gpu has 6 entries"});
  ModelConfig c32 = c;
  c32.n_routed_experts = 32;
  expect_error([&] { check_plan_against(plan_file_from_json(j, "plan.json"), c32); },
               {"plan.json", "model.experts = 16, the model has 32 routed experts"});
  ModelConfig dense2 = c;
  dense2.layer_is_moe[2] = false;
  expect_error([&] { check_plan_against(plan_file_from_json(j, "plan.json"), dense2); },
               {"plan.json", "layer 2 holds routed experts in the plan", "dense"});
  ModelConfig moe1 = c;
  moe1.layer_is_moe[1] = true;
  expect_error([&] { check_plan_against(plan_file_from_json(j, "plan.json"), moe1); },
               {"plan.json", "no entry for layer 1"});
}

// --placement without a plan file.
TEST(PlanFile, PlacementPlans) {
  const ModelConfig c = glm5_tiny();
  for (const char* name : kPlacementLayouts) {
    SCOPED_TRACE(name);
    EnginePlan e = placement_plan(c, name);
    EXPECT_NO_THROW(check_plan_against(e, c));
    EXPECT_EQ(e.layout, name);
    EXPECT_EQ(e.ctx, 0);
    EXPECT_TRUE(e.experts[0].empty());
    EXPECT_EQ(e.experts[5].size(), 16u);  // the MTP layer
    EXPECT_EQ(e.mixed_fraction(), -1);
    EXPECT_THAT(e.summary(), HasSubstr("no prediction"));
  }
  EXPECT_EQ(placement_plan(c, "all-gpu").count(Place::Gpu), 48);
  EXPECT_EQ(placement_plan(c, "experts-cpu").count(Place::Cpu), 48);
  EXPECT_EQ(placement_plan(c, "experts-streamed").count(Place::Stream), 48);
  EXPECT_EQ(placement_plan(c, "mixed").count(Place::Mixed), 48);
  expect_error([&] { placement_plan(c, "hot-cache"); }, {"--placement 'hot-cache'", "experts-streamed"});
}

// ---- the command line -----------------------------------------------------------------------

struct Scratch {
  fs::path dir;
  Scratch() {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    dir = fs::temp_directory_path() / ("bigmoe_test_plan_file_" + std::to_string(::getpid()) + "_" + info->name());
    fs::remove_all(dir);
    fs::create_directories(dir);
    std::ofstream(dir / "machine.json") << tiny_machine_json().dump();
  }
  ~Scratch() { fs::remove_all(dir); }
  // Runs `bigmoe ARGS`; returns stdout and stderr together.
  std::string run(const std::string& args, int* rc) const {
    const fs::path out = dir / "out.txt";
    int st = std::system((std::string(BIGMOE_BINARY) + " " + args + " > " + out.string() + " 2>&1").c_str());
    *rc = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
    std::ifstream in(out);
    return std::string(std::istreambuf_iterator<char>(in), {});
  }
  std::string plan_args(const std::string& model) const {
    return "plan -m " + fixture(model).string() + " --machine " + (dir / "machine.json").string() +
           " --ctx 256 --gpu-reserve 0 --host-reserve 0";
  }
};

TEST(PlanFileCli, PlanLayoutWritesThatLayout) {
  Scratch s;
  int rc = 0;
  const std::string f = (s.dir / "streamed.json").string();
  std::string out = s.run(s.plan_args("glm5_tiny") + " --layout experts-streamed --out " + f, &rc);
  ASSERT_EQ(rc, 0) << out;
  EXPECT_THAT(out, HasSubstr("plan written to " + f + " (layout experts-streamed)"));
  EnginePlan e = load_plan_file(f);
  EXPECT_EQ(e.layout, "experts-streamed");
  EXPECT_EQ(e.count(Place::Stream), 48);
  EXPECT_NO_THROW(check_plan_against(e, glm5_tiny()));
  // Without --layout the chosen one (all-gpu fits on 1 GiB) is written.
  out = s.run(s.plan_args("glm5_tiny") + " --out " + f, &rc);
  ASSERT_EQ(rc, 0) << out;
  EXPECT_EQ(load_plan_file(f).layout, "all-gpu");

  out = s.run(s.plan_args("glm5_tiny") + " --layout hot-cash --out " + f, &rc);
  EXPECT_EQ(rc, 1) << out;
  EXPECT_THAT(out, HasSubstr("--layout 'hot-cash': no such layout"));
  EXPECT_THAT(out, HasSubstr("all-gpu, experts-cpu, experts-streamed, mixed, hot-cache, hot-cache-mixed, cpu-only"));

  // A layout that does not fit is written only with --force.
  const std::string g = (s.dir / "forced.json").string();
  out = s.run(s.plan_args("glm5_tiny") + " --gpu-mem 0.0001 --layout all-gpu --out " + g, &rc);
  EXPECT_EQ(rc, 1) << out;
  EXPECT_THAT(out, HasSubstr("--layout 'all-gpu' does not fit: GPU 0 needs"));
  EXPECT_THAT(out, HasSubstr("--force"));
  EXPECT_FALSE(fs::exists(g));
  out = s.run(s.plan_args("glm5_tiny") + " --gpu-mem 0.0001 --layout all-gpu --force --out " + g, &rc);
  EXPECT_EQ(rc, 0) << out;
  EnginePlan forced = load_plan_file(g);
  EXPECT_FALSE(forced.fits);
  EXPECT_THAT(forced.summary(), HasSubstr("does not fit: GPU 0 needs"));

  out = s.run(s.plan_args("glm5_tiny") + " --layout all-gpu", &rc);
  EXPECT_NE(rc, 0) << out;
  EXPECT_THAT(out, HasSubstr("--out"));
}

// `complete --plan`: the plan is read and checked against the model before anything else; the
// load line names the layout, the prediction and the experts per place. glm5_tiny has no
// tokenizer, so each run then stops there (exit 1): no GPU is needed.
TEST(PlanFileCli, TextCommandsReadThePlan) {
  Scratch s;
  int rc = 0;
  const std::string f = (s.dir / "mixed.json").string(), ds = (s.dir / "ds.json").string();
  ASSERT_EQ((s.run(s.plan_args("glm5_tiny") + " --layout mixed --out " + f, &rc), rc), 0);
  ASSERT_EQ((s.run(s.plan_args("dsv3_tiny") + " --layout mixed --out " + ds, &rc), rc), 0);
  const std::string complete = "complete -p hi -m " + fixture("glm5_tiny").string();
  // Runs the CLI with args; it must exit with want_rc (-1: any failure) and print `want`.
  auto expect_run = [&](const std::string& args, int want_rc, const std::string& want) {
    const std::string o = s.run(args, &rc);
    if (want_rc < 0) EXPECT_NE(rc, 0) << args << "\n" << o;
    else EXPECT_EQ(rc, want_rc) << args << "\n" << o;
    EXPECT_THAT(o, HasSubstr(want)) << args;
  };

  std::string out = s.run(complete + " --plan " + f, &rc);
  EXPECT_EQ(rc, 1) << out;
  EXPECT_THAT(out, HasSubstr("plan: layout mixed (" + f + "): "));
  EXPECT_THAT(out, HasSubstr("tok/s predicted at batch 1; experts: 0 gpu, 0 cpu, 0 stream, 48 mixed"));
  EXPECT_THAT(out, HasSubstr("no tokenizer"));

  out = s.run(complete + " --plan " + ds, &rc);
  EXPECT_EQ(rc, 1) << out;
  EXPECT_THAT(out, HasSubstr("error: " + ds + ": model.layers = 4, the model has 5 main layers"));
  EXPECT_THAT(out, ::testing::Not(HasSubstr("plan: layout")));

  expect_run(complete + " --placement experts-cpu --expert-cache-slots 4 --cache-policy lfu --cpu-threads 2", 1,
             "plan: layout experts-cpu (--placement experts-cpu): no prediction; experts: 0 gpu, 48 cpu");

  out = s.run(complete + " --plan /nonexistent/plan.json", &rc);
  EXPECT_EQ(rc, 1) << out;
  EXPECT_THAT(out, HasSubstr("/nonexistent/plan.json"));
  EXPECT_THAT(out, ::testing::Not(HasSubstr("loading")));  // before the model

  expect_run(complete + " --expert-cache-slots 4", 1, "--expert-cache-slots applies to the GPU engine");
  expect_run(complete + " --expert-prefetch off", 1, "--expert-prefetch applies to the GPU engine");
  expect_run(complete + " --placement experts-streamed --expert-cache-slots 4 --expert-prefetch off", 1, "no tokenizer");
  expect_run(complete + " --gpu --expert-prefetch maybe", -1, "maybe");
  // A plan's expert_cache shows in the load line.
  {
    json j;
    std::ifstream(f) >> j;
    j["expert_cache"] = {{"slots", 4}, {"prefetch", false}};
    const std::string fc = (s.dir / "cached.json").string();
    std::ofstream(fc) << j.dump();
    expect_run(complete + " --plan " + fc, 1, "48 mixed; expert cache: 4 slots, prefetch off");
  }

  expect_run(complete + " --plan " + f + " --placement mixed", -1, "excludes");
  expect_run(complete + " --placement hot-cache", -1, "hot-cache");
  expect_run(complete + " --gpu --cache-policy fifo", -1, "fifo");
}

}  // namespace
}  // namespace bigmoe::plan
