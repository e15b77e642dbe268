#include "cli/plan_cmd.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <fstream>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "plan/machine.h"
#include "plan/planner.h"
#include "util/error.h"

namespace bigmoe::cli {

struct PlanCommand::Opts {
  CLI::App* cmd = nullptr;
  std::string model, machine, weights, expert_weights, profile, out, layout, kv = "f32";
  std::vector<std::string> rules, expert_rules;
  plan::PlanOptions p;
  bool json = false, no_mtp = false, force = false;
  int threads = 0;
};

PlanCommand::PlanCommand(CLI::App& app) : o_(std::make_unique<Opts>()) {
  Opts& o = *o_;
  o.cmd = app.add_subcommand("plan",
                             "predict decode/prefill speed of each weight layout on a machine and pick the best "
                             "that fits (docs/planner.md)");
  o.cmd->add_option("-m,--model", o.model, "checkpoint directory, .gguf file, or a bare config.json (with --weights)")
      ->required();
  o.cmd->add_option("--machine", o.machine, "machine file (machines/*.json); default: probe this machine");
  o.cmd->add_option("--ctx", o.p.ctx, "context (tokens) to reserve cache for")
      ->capture_default_str()
      ->check(CLI::Range(int64_t(1), int64_t(1) << 30));
  o.cmd->add_option("--gpu-mem", o.p.gpu_mem_gib, "cap each GPU's memory at this many GiB")->check(CLI::PositiveNumber);
  o.cmd->add_option("--gpu-reserve", o.p.gpu_reserve_gib, "GiB per GPU kept free for context, activations, workspaces")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  o.cmd->add_option("--host-reserve", o.p.host_reserve_gib, "GiB of host memory kept free (OS, process)")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  o.cmd->add_option("--weights", o.weights,
                    "format of a bare config.json: fp8 | bf16 | int4 | a GGUF type (q4_k, q8_0...)");
  o.cmd->add_option("--expert-weights", o.expert_weights, "format of the routed experts alone (bare config.json)");
  o.cmd->add_option("--kv-dtype", o.kv, "cache element type: f32 (today's engine) | bf16 | fp8")->capture_default_str();
  o.cmd->add_option("--chunk", o.p.chunk, "prefill chunk (tokens)")
      ->capture_default_str()
      ->check(CLI::Range(1, 1 << 20));
  o.cmd->add_option("--profile", o.profile, "routing profile (JSON: per layer, counts per expert) for the hot cache");
  o.cmd->add_option("--rule", o.rules, "REGEX=gpu|cpu|stream on tensor names; ordered, first match wins (repeatable)");
  o.cmd->add_option("--expert-rule", o.expert_rules,
                    "GLOB[LIST]=gpu|cpu|stream pins experts, e.g. 'blk.10.ffn_*_exps[17,203]=gpu' (repeatable; "
                    "before --rule)");
  o.cmd->add_flag("--no-mtp", o.no_mtp, "leave the MTP layer's weights out");
  o.cmd->add_flag("--json", o.json, "print the table as JSON");
  auto* out = o.cmd->add_option("--out", o.out,
                                "write the chosen plan (every tensor's and expert's place) to this JSON file");
  auto* layout = o.cmd->add_option("--layout", o.layout, "write this layout to --out instead of the chosen one")
                     ->needs(out);
  o.cmd->add_flag("--force", o.force, "with --layout: write it even if it does not fit")->needs(layout);
  o.cmd->add_option("--threads", o.threads, "probe: threads for the host read measurement (default: all cores)")
      ->check(CLI::Range(1, 4096));
}

PlanCommand::~PlanCommand() = default;

bool PlanCommand::selected() const { return o_->cmd->parsed(); }

int PlanCommand::run() {
  Opts& o = *o_;
  // Rules first: a bad rule is reported before anything is read or measured.
  for (auto& r : o.rules) o.p.rules.push_back(plan::parse_tensor_rule(r));
  for (auto& r : o.expert_rules) o.p.expert_rules.push_back(plan::parse_expert_rule(r));
  o.p.kv = plan::parse_kv_dtype(o.kv);
  o.p.mtp = !o.no_mtp;
  if (!o.expert_weights.empty() && o.weights.empty()) fail("plan: --expert-weights needs --weights");
  std::optional<plan::WeightSpec> w;
  if (!o.weights.empty()) w = plan::WeightSpec{o.weights, o.expert_weights};
  plan::PlanModel model = plan::load_plan_model(o.model, w);
  if (!o.profile.empty()) o.p.profile = plan::load_routing_profile(o.profile);
  plan::Machine machine;
  if (!o.machine.empty()) {
    machine = plan::load_machine(o.machine);
  } else {
    if (!o.json) fmt::print(stderr, "probing this machine (pass --machine FILE to plan for another)...\n");
    plan::ProbeOptions po;
    po.threads = o.threads;
    machine = plan::probe_machine(po);
  }
  plan::Plan p = plan::make_plan(model, machine, o.p);
  if (o.json)
    fmt::print("{}\n", plan::plan_summary_json(p).dump(2));
  else
    fmt::print("{}", plan::format_plan_table(p));
  int which = -1;  // the chosen layout
  if (!o.layout.empty()) {
    std::vector<std::string> names;
    for (size_t i = 0; i < p.layouts.size(); ++i) {
      names.push_back(p.layouts[i].name);
      if (p.layouts[i].name == o.layout) which = int(i);
    }
    if (which < 0) fail("plan --layout '{}': no such layout (on this machine: {})", o.layout, fmt::join(names, ", "));
    const plan::LayoutResult& r = p.layouts[size_t(which)];
    if (!r.fits && !o.force) fail("plan --layout '{}' does not fit: {} (--force writes it anyway)", o.layout, r.reason);
  }
  if (!o.out.empty()) {
    nlohmann::json j = plan::plan_file_json(p, which);
    std::ofstream f(o.out);
    if (!f) fail("plan: cannot write '{}'", o.out);
    f << j.dump(1) << "\n";
    if (!f) fail("plan: writing '{}' failed", o.out);
    if (!o.json) fmt::print("plan written to {} (layout {})\n", o.out, j.at("layout").get<std::string>());
  }
  // A layout named with --layout was written as asked; otherwise 2 says nothing fits.
  return p.chosen >= 0 || which >= 0 ? 0 : 2;
}

}  // namespace bigmoe::cli
