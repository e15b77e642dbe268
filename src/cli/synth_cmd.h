// The `synth` subcommand: writes a synthetic GLM-5.2-shaped checkpoint, a GGUF file or an FP8
// safetensors directory (src/model/synth.h).
#pragma once
#include <CLI/CLI.hpp>

#include <memory>

namespace bigmoe::cli {

class SynthCommand {
 public:
  explicit SynthCommand(CLI::App& app);
  ~SynthCommand();
  bool selected() const;
  int run();  // throws bigmoe::Error on failure

 private:
  struct Opts;
  std::unique_ptr<Opts> o_;
};

}  // namespace bigmoe::cli
