// The `bigmoe` command: thin wrappers over the library; all logic lives where tests reach it.
#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <chrono>
#include <filesystem>
#include <iostream>

#include "cli/text_cmds.h"
#include "cli/profile_cmd.h"
#include "cli/synth_cmd.h"
#include "cli/plan_cmd.h"
#ifdef BIGMOE_WITH_CUDA
#include "backend/cuda/probe.h"
#endif
#include "engine/sampler.h"
#include "model/glm_dsa.h"
#include "model/inspect.h"
#include "util/error.h"
#include "util/npy.h"

namespace fs = std::filesystem;
using namespace bigmoe;

namespace {

std::vector<int> parse_ids(const std::string& s) {
  std::vector<int> ids;
  size_t i = 0;
  while (i < s.size()) {
    size_t j = s.find(',', i);
    if (j == std::string::npos) j = s.size();
    std::string tok = s.substr(i, j - i);
    try {
      size_t used = 0;
      long v = std::stol(tok, &used);
      if (used != tok.size() || v < 0 || v > INT32_MAX) throw std::invalid_argument(tok);
      ids.push_back(int(v));
    } catch (const std::exception&) {
      fail("--prompt-ids: '{}' is not a token id (expected comma-separated non-negative integers)", tok);
    }
    i = j + 1;
  }
  if (ids.empty()) fail("--prompt-ids: no token ids given");
  return ids;
}

void check_context(const GlmDsaModel& m, size_t n) {
  int maxp = m.config().max_position_embeddings;
  if (maxp > 0 && n > size_t(maxp))
    fail("{} tokens exceed the model's context (max_position_embeddings = {})", n, maxp);
}

int cmd_logits(const std::string& dir, const std::string& ids_s, int gen, const std::string& out,
               const std::string& mtp_out) {
  auto ids = parse_ids(ids_s);
  auto model = GlmDsaModel::load(dir);
  const int V = model->config().vocab_size, T = int(ids.size());
  check_context(*model, ids.size() + gen);
  if (!mtp_out.empty() && !model->has_mtp()) fail("{}: --mtp-out given but the checkpoint has no MTP layer", dir);
  if (!mtp_out.empty() && T < 2) fail("--mtp-out needs a prompt of at least 2 tokens");

  KVCache cache = model->new_cache();
  ForwardOut pre = model->forward(ids, cache, AttnForm::Plain);
  std::vector<float> rows = pre.logits;
  std::vector<int> greedy;
  for (int i = 0; i < gen; ++i) {
    int next = argmax(&rows[rows.size() - V], V);
    greedy.push_back(next);
    ForwardOut step = model->forward({next}, cache, AttnForm::Absorbed);
    rows.insert(rows.end(), step.logits.begin(), step.logits.end());
  }
  write_npy_f32(out, rows.data(), {T + gen, V});
  fmt::print("greedy: {}\n", fmt::join(greedy, ","));
  if (!mtp_out.empty()) {
    KVCache mc = model->new_mtp_cache();
    std::vector<int> next(ids.begin() + 1, ids.end());
    ForwardOut m = model->mtp_forward(pre.hidden.data(), next, mc, AttnForm::Plain);
    write_npy_f32(mtp_out, m.logits.data(), {T - 1, V});
  }
  return 0;
}

int cmd_run(const std::string& dir, const std::string& ids_s, int n, const SamplerConfig& sc, bool ignore_eos) {
  auto ids = parse_ids(ids_s);
  auto model = GlmDsaModel::load(dir);
  auto gcfg = GenerationConfig::load(fs::path(dir) / "generation_config.json");
  check_context(*model, ids.size() + n);
  const int V = model->config().vocab_size;
  Sampler sampler(sc);
  KVCache cache = model->new_cache();
  auto t0 = std::chrono::steady_clock::now();
  ForwardOut r = model->forward(ids, cache, AttnForm::Plain);
  auto t1 = std::chrono::steady_clock::now();
  std::vector<int> out;
  const float* last = &r.logits[r.logits.size() - V];
  for (int i = 0; i < n; ++i) {
    int tok = sampler.sample(last, V);
    out.push_back(tok);
    fmt::print("{}{}", i ? "," : "", tok);
    std::fflush(stdout);
    if (!ignore_eos && std::find(gcfg.eos_token_ids.begin(), gcfg.eos_token_ids.end(), tok) != gcfg.eos_token_ids.end())
      break;
    if (i + 1 == n) break;
    r = model->forward({tok}, cache, AttnForm::Absorbed);
    last = r.logits.data();
  }
  auto t2 = std::chrono::steady_clock::now();
  double pre_s = std::chrono::duration<double>(t1 - t0).count(), dec_s = std::chrono::duration<double>(t2 - t1).count();
  fmt::print("\n");
  fmt::print(stderr, "prefill {} tokens in {:.3f} s, decode {} tokens in {:.3f} s\n", ids.size(), pre_s, out.size(), dec_s);
  return 0;
}

int cmd_inspect(const std::string& dir, const std::string& config_only, const std::string& weights) {
  if (!config_only.empty()) {
    ModelConfig c = ModelConfig::load(config_only);
    fmt::print("{} (predicted from config, weights {})\n", config_only, weights);
    fmt::print("{}", format_report(inspect_config(c, parse_weight_format(weights)), c));
    return 0;
  }
  if (dir.empty()) fail("inspect: give a model directory or --config-only config.json");
  ModelConfig c = ModelConfig::load(fs::path(dir) / "config.json");
  SafetensorsModel st = SafetensorsModel::open(dir);
  fmt::print("{} ({} tensors)\n", dir, st.names().size());
  fmt::print("{}", format_report(inspect_checkpoint(st, c), c));
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"bigmoe: serve giant sparse MoE models (GLM-5.x, DeepSeek-V3.x) on one machine"};
  app.require_subcommand(1);

  std::string model, ids, out, mtp_out;
  int gen = 0;
  auto* lg = app.add_subcommand("logits", "write float32 logits of a prompt (+ greedy steps) as .npy");
  lg->add_option("-m,--model", model, "model directory (config.json + safetensors)")->required();
  lg->add_option("--prompt-ids", ids, "comma-separated prompt token ids, e.g. 5,17,42")->required();
  lg->add_option("--gen", gen, "greedy steps after the prompt, computed incrementally with the cache")
      ->check(CLI::Range(0, 1 << 20));
  lg->add_option("--out", out, "output .npy, shape [T+N, vocab]")->required();
  lg->add_option("--mtp-out", mtp_out, "also write the MTP layer's logits over the prompt, shape [T-1, vocab]");

  std::string dir, config_only, weights = "fp8";
  auto* in = app.add_subcommand("inspect", "print the config and weight bytes per category and dtype");
  in->add_option("dir", dir, "model directory");
  in->add_option("--config-only", config_only, "predict sizes from this config.json alone");
  in->add_option("--weights", weights, "storage format for --config-only: fp8 | bf16 | int4")
      ->check(CLI::IsMember({"fp8", "bf16", "int4"}));

  int n = 32;
  SamplerConfig sc;
  bool ignore_eos = false;
  auto* run = app.add_subcommand("run", "generate token ids from prompt ids");
  run->add_option("-m,--model", model, "model directory")->required();
  run->add_option("--prompt-ids", ids, "comma-separated prompt token ids")->required();
  run->add_option("-n,--n-predict", n, "tokens to generate")->check(CLI::Range(1, 1 << 20));
  run->add_option("--temp", sc.temperature, "sampling temperature (0 = greedy)")->check(CLI::Range(0.0, 100.0));
  run->add_option("--top-k", sc.top_k, "keep the k most likely tokens (0 = off)")->check(CLI::NonNegativeNumber);
  run->add_option("--top-p", sc.top_p, "nucleus sampling mass (1 = off)")->check(CLI::Range(0.0, 1.0));
  run->add_option("--seed", sc.seed, "random seed");
  run->add_flag("--ignore-eos", ignore_eos, "keep generating after an end-of-sequence token");

  cli::TextCommands text(app);
  cli::SynthCommand synth(app);
  cli::PlanCommand plan(app);
#ifdef BIGMOE_WITH_CUDA
  plan::set_gpu_probe(cuda::probe_gpus);  // `bigmoe plan` without --machine measures the GPUs
#endif
  cli::ProfileCommand profile(app);

  // CLI11 reports a mistyped subcommand only as "A subcommand is required"; name it instead.
  std::vector<std::string> names;
  bool known = false;
  for (auto* s : app.get_subcommands({})) {
    names.push_back(s->get_name());
    known |= argc > 1 && s->check_name(argv[1]);
  }
  if (argc > 1 && argv[1][0] != '-' && !known) {
    fmt::print(stderr, "error: unknown subcommand '{}' (expected one of: {}; see --help)\n", argv[1], fmt::join(names, ", "));
    return 1;
  }
  CLI11_PARSE(app, argc, argv);
  try {
    if (text.selected()) return text.run();
    if (synth.selected()) return synth.run();
    if (plan.selected()) return plan.run();
    if (profile.selected()) return profile.run();
    if (*lg) return cmd_logits(model, ids, gen, out, mtp_out);
    if (*in) return cmd_inspect(dir, config_only, weights);
    if (*run) return cmd_run(model, ids, n, sc, ignore_eos);
  } catch (const std::exception& e) {
    fmt::print(stderr, "error: {}\n", e.what());
    return 1;
  }
  return 0;
}
