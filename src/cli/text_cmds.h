// Subcommands that work on text: serve, chat, complete, perplexity.
#pragma once
#include <CLI/CLI.hpp>

#include <memory>

namespace bigmoe::cli {

class TextCommands {
 public:
  explicit TextCommands(CLI::App& app);
  ~TextCommands();
  bool selected() const;  // one of ours was given on the command line
  int run();              // throws bigmoe::Error on failure

 private:
  struct Opts;
  std::unique_ptr<Opts> o_;
};

}  // namespace bigmoe::cli
