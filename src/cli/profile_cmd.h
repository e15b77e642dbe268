// `bigmoe profile`: runs prompts through a GLM-DSA model and writes the routing profile (which
// experts each MoE layer picks, engine/routing_stats.h) that places the hot-expert cache.
#pragma once
#include <CLI/CLI.hpp>
#include <memory>

namespace bigmoe::cli {

class ProfileCommand {
 public:
  explicit ProfileCommand(CLI::App& app);
  ~ProfileCommand();
  bool selected() const;
  int run();  // throws bigmoe::Error on failure

 private:
  struct Opts;
  std::unique_ptr<Opts> o_;
};

}  // namespace bigmoe::cli
