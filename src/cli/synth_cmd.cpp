#include "cli/synth_cmd.h"

#include <fmt/format.h>

#include <cmath>
#include <filesystem>
#include <string>

#include "model/synth.h"
#include "util/error.h"

namespace bigmoe::cli {

struct SynthCommand::Opts {
  CLI::App* cmd = nullptr;
  SynthOptions s;
  std::string out;
  std::string format = "gguf";
  double shard_gb = 5.0;
  bool quiet = false;
};

SynthCommand::SynthCommand(CLI::App& app) : o_(std::make_unique<Opts>()) {
  Opts& o = *o_;
  o.cmd = app.add_subcommand("synth", "write a random GLM-5.2-shaped checkpoint: GGUF (Q4_K experts, Q8_0 elsewhere) "
                                      "or an FP8 safetensors directory like the official release");
  o.cmd->add_option("-o,--out", o.out, "output: a .gguf file, or with --format fp8 a checkpoint directory")->required();
  o.cmd->add_option("--format", o.format, "gguf (one file) or fp8 (config.json + sharded e4m3 safetensors)")
      ->capture_default_str();
  o.cmd->add_option("--shard-gb", o.shard_gb, "fp8: most GB of tensor data per safetensors shard")->capture_default_str();
  o.cmd->add_option("--dense", o.s.n_dense, "leading dense-MLP layers")->capture_default_str()->check(CLI::Range(1, 1000));
  o.cmd->add_option("--moe", o.s.n_moe, "MoE layers")->capture_default_str()->check(CLI::Range(0, 1000));
  o.cmd->add_option("--experts", o.s.n_experts, "routed experts per MoE layer (shrink for tests)")
      ->capture_default_str()->check(CLI::Range(1, 4096));
  o.cmd->add_option("--vocab", o.s.vocab, "vocabulary size (shrink for tests)")->capture_default_str()->check(CLI::Range(260, 1 << 24));
  o.cmd->add_option("--hidden", o.s.hidden, "hidden size d (tests only; a multiple of 256; real: 6144)")
      ->capture_default_str();
  o.cmd->add_flag("--mtp", o.s.mtp, "add the nextn (MTP) block");
  o.cmd->add_option("--seed", o.s.seed, "random seed")->capture_default_str();
  o.cmd->add_flag("-q,--quiet", o.quiet, "no progress bar");
}

SynthCommand::~SynthCommand() = default;

bool SynthCommand::selected() const { return o_->cmd->parsed(); }

int SynthCommand::run() {
  Opts& o = *o_;
  o.s.progress = !o.quiet;
  o.s.format = parse_synth_format(o.format);
  if (o.cmd->count("--shard-gb") && o.s.format != SynthFormat::Fp8)
    fail("synth: --shard-gb applies only to --format fp8");
  if (!(o.shard_gb >= 0.001 && o.shard_gb <= 1e6)) fail("synth: --shard-gb must be in [0.001, 1e6] (got {})", o.shard_gb);
  o.s.shard_bytes = uint64_t(std::llround(o.shard_gb * 1e9));
  uint64_t bytes = synth_data_bytes(o.s);
  std::filesystem::path out(o.out);
  // Free space where the bytes will land: the nearest existing directory (the fp8 output
  // directory itself when it exists).
  std::filesystem::path dir = o.s.format == SynthFormat::Fp8 ? out : out.parent_path();
  std::error_code ec;
  while (!dir.empty() && !std::filesystem::is_directory(dir, ec) && dir != dir.parent_path()) dir = dir.parent_path();
  if (dir.empty()) dir = ".";
  auto sp = std::filesystem::space(dir, ec);
  if (!ec && sp.available < bytes + (64u << 20))
    fail("synth: '{}' needs {:.2f} GB but only {:.2f} GB are free", o.out, bytes / 1e9, sp.available / 1e9);
  if (!o.quiet) fmt::print(stderr, "writing {} ({:.2f} GB)\n", o.out, bytes / 1e9);
  synth_glm_dsa(o.s, out);
  return 0;
}

}  // namespace bigmoe::cli
