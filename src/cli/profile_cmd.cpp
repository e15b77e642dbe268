#include "cli/profile_cmd.h"

#include <fmt/format.h>

#include <algorithm>
#include <fstream>
#include <functional>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#ifdef BIGMOE_WITH_CUDA
#include "backend/cuda/glm_dsa_cuda.h"
#include "plan/expert_placement.h"
#endif
#include "engine/model_loader.h"
#include "engine/routing_stats.h"
#include "model/glm_dsa.h"
#include "plan/plan_file.h"
#include "util/error.h"

namespace bigmoe::cli {

struct ProfileCommand::Opts {
  CLI::App* cmd = nullptr;
  std::string model, prompts, out = "routing-profile.json";
  int n = 32;
  bool ids = false, quiet = false;
  bool gpu = false;  // the GPU engine (GlmDsaCuda) routes instead of the CPU model
  std::string plan, placement;
  int cpu_threads = 0;
};

ProfileCommand::ProfileCommand(CLI::App& app) : o_(std::make_unique<Opts>()) {
  Opts& o = *o_;
  o.cmd = app.add_subcommand("profile", "run prompts through a GLM-DSA model and write its routing profile "
                                        "(per-layer expert pick counts) for the hot-expert cache and the planner");
  o.cmd->add_option("-m,--model", o.model, "a GLM-DSA checkpoint directory or GGUF file")->required();
  o.cmd->add_option("-p,--prompts", o.prompts, "text file, one prompt per line (blank lines skipped)")
      ->required()
      ->check(CLI::ExistingFile);
  o.cmd->add_flag("--ids", o.ids, "the prompt lines are space-separated token ids (models without a tokenizer)");
  o.cmd->add_option("-n,--n-predict", o.n, "greedy tokens generated after each prompt")
      ->capture_default_str()
      ->check(CLI::Range(0, 1 << 20));
  o.cmd->add_option("-o,--out", o.out, "profile file to write (JSON)")->capture_default_str();
  o.cmd->add_flag("-q,--quiet", o.quiet, "no per-prompt progress");
  o.cmd->add_flag("--gpu", o.gpu, "run the prompts on the CUDA device (GlmDsaCuda) instead of the CPU model");
  auto* plan = o.cmd->add_option("--plan", o.plan, "with the GPU: a plan file (`bigmoe plan --out`) placing the routed "
                                 "experts, for models larger than GPU memory; implies --gpu");
  o.cmd->add_option("--placement", o.placement, "without a plan file, every routed expert in one place; implies --gpu")
      ->check(CLI::IsMember({"all-gpu", "experts-cpu", "experts-streamed", "mixed"}))
      ->excludes(plan);
  o.cmd->add_option("--cpu-threads", o.cpu_threads, "with --plan / --placement: threads of the CPU expert kernels "
                    "(0: all cores)")
      ->check(CLI::NonNegativeNumber);
}

ProfileCommand::~ProfileCommand() = default;

bool ProfileCommand::selected() const { return o_->cmd->parsed(); }

namespace {

std::vector<int> parse_ids(const std::string& line, const std::string& file, int lineno) {
  std::vector<int> v;
  std::istringstream in(line);
  std::string tok;
  while (in >> tok) {
    size_t used = 0;
    long x = 0;
    try {
      x = std::stol(tok, &used);
    } catch (...) {
      used = 0;
    }
    if (used != tok.size() || x < 0 || x > (1L << 30)) fail("{}:{}: '{}' is not a token id", file, lineno, tok);
    v.push_back(int(x));
  }
  return v;
}

// Each prompt and then n greedy tokens through `step` (tokens -> logits of the last row); `done`
// after each prompt.
void profile_prompts(const std::vector<std::vector<int>>& prompts, int n, int V, bool quiet, const RoutingStats& stats,
                     const std::function<std::vector<float>(const std::vector<int>&)>& step,
                     const std::function<void()>& done) {
  for (size_t i = 0; i < prompts.size(); ++i) {
    std::vector<float> l = step(prompts[i]);
    for (int k = 0; k < n; ++k) {
      int next = int(std::max_element(l.begin(), l.begin() + V) - l.begin());
      l = step({next});
    }
    done();
    if (!quiet) fmt::print(stderr, "\rprofile: prompt {}/{} ({} tokens routed)", i + 1, prompts.size(), stats.tokens());
  }
}

}  // namespace

int ProfileCommand::run() {
  Opts& o = *o_;
  const bool gpu = o.gpu || !o.plan.empty() || !o.placement.empty();
  std::optional<plan::EnginePlan> ep;
  if (!o.plan.empty()) ep = plan::load_plan_file(o.plan);  // its mistakes before a long load
  LoadedModel m = load_model(o.model);
  auto* glm = dynamic_cast<GlmDsaModel*>(m.lm.get());
  if (!glm) fail("profile: '{}' is not a GLM-DSA (MoE) checkpoint", m.name);
  const ModelConfig& c = glm->config();
  if (c.n_routed_experts <= 0) fail("profile: '{}' has no routed experts", m.name);
  if (!o.ids && !m.tokenizer) fail("profile: '{}' has no tokenizer; give token ids with --ids", m.name);

  std::ifstream in(o.prompts);
  if (!in) fail("{}: cannot open", o.prompts);
  std::vector<std::vector<int>> prompts;
  std::string line;
  for (int lineno = 1; std::getline(in, line); ++lineno) {
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    std::vector<int> ids = o.ids ? parse_ids(line, o.prompts, lineno) : m.tokenizer->encode(line, true);
    if (ids.empty()) continue;
    for (int t : ids)
      if (t >= c.vocab_size) fail("{}:{}: token id {} out of range (vocab_size {})", o.prompts, lineno, t, c.vocab_size);
    if (int(ids.size()) + o.n > glm->context_length())
      fail("{}:{}: {} prompt tokens + {} generated exceed the context of {}", o.prompts, lineno, ids.size(), o.n,
           glm->context_length());
    prompts.push_back(std::move(ids));
  }
  if (prompts.empty()) fail("{}: no prompts", o.prompts);

  RoutingStats stats(c.n_routed_experts, c.num_experts_per_tok);
  stats.model = m.name;
  const int V = c.vocab_size;
  if (gpu) {
#ifdef BIGMOE_WITH_CUDA
    if (!o.placement.empty()) ep = plan::placement_plan(c, o.placement);
    cuda::GlmDsaCudaOptions go;
    int ctx = 16;
    for (const auto& p : prompts) ctx = std::max(ctx, int(p.size()) + o.n);
    go.max_context = ctx;
    go.max_sequences = 1;
    go.max_rows = 512;  // longer prompts run as chunks of 512 rows
    go.progress = !o.quiet;
    if (ep) {
      plan::check_plan_against(*ep, c);
      if (!o.quiet) fmt::print(stderr, "plan: {}\n", ep->summary());
      go.experts = plan::expert_placement(*ep);
      go.device = ep->gpus[0];
    }
    go.experts.cpu_threads = o.cpu_threads;
    cuda::GlmDsaCuda g(*glm, go);
    g.set_routing_stats(&stats);
    cuda::CudaSequence s;
    profile_prompts(
        prompts, o.n, V, o.quiet, stats,
        [&](const std::vector<int>& tokens) {
          if (s.id < 0) s = g.new_sequence();
          return g.forward({&s}, {tokens}, true);
        },
        [&] {
          g.free_sequence(s);
          g.flush_routing_stats();  // so that the progress line counts this prompt
        });
    g.set_routing_stats(nullptr);
#else
    fail("profile --gpu: this build of bigmoe has no CUDA backend (nvcc was not found at configure time)");
#endif
  } else {
    if (o.cpu_threads) fail("profile: --cpu-threads applies to the GPU engine: add --plan or --placement");
    glm->set_routing_stats(&stats);
    std::unique_ptr<Session> session;
    profile_prompts(
        prompts, o.n, V, o.quiet, stats,
        [&](const std::vector<int>& tokens) {
          if (!session) session = glm->new_session();
          return session->feed(tokens);
        },
        [&] { session.reset(); });
    glm->set_routing_stats(nullptr);
  }
  if (!o.quiet) fmt::print(stderr, "\n");
  stats.save(o.out);

  const int E = c.n_routed_experts;
  fmt::print("{} tokens through {} MoE layers; wrote {}\n", stats.tokens(), stats.layers().size(), o.out);
  fmt::print("hit rate with the hottest experts of every layer cached:\n");
  for (int pct : {5, 10, 25, 50}) {
    int n = std::max(1, E * pct / 100);
    fmt::print("  {:>3}% ({:>4} experts/layer): {:.1f}% (uniform routing: {:.1f}%)\n", pct, n,
               100 * stats.hit_rate_top(n), 100.0 * n / E);
  }
  return 0;
}

}  // namespace bigmoe::cli
