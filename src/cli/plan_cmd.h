// The `plan` subcommand: prints the placement planner's table of layouts for a model on a
// machine (probed, or described by a machine file) and the chosen one; --json prints it as JSON
// and --out writes the plan file (the chosen layout, or --layout's) that serve / chat / complete /
// perplexity --plan and bench_model read (src/plan/plan_file.h).
#pragma once
#include <CLI/CLI.hpp>
#include <memory>

namespace bigmoe::cli {

class PlanCommand {
 public:
  explicit PlanCommand(CLI::App& app);
  ~PlanCommand();
  bool selected() const;
  int run();  // throws bigmoe::Error on failure

 private:
  struct Opts;
  std::unique_ptr<Opts> o_;
};

}  // namespace bigmoe::cli
