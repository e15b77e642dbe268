// Opens whatever a user points -m at: a GGUF file (llama architecture), or a directory with
// config.json + safetensors (GLM-DSA family), with its tokenizer and chat template.
#pragma once
#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "engine/lm.h"
#include "text/jinja.h"
#include "text/tokenizer.h"

namespace bigmoe {

struct LoadedModel {
  std::string name;                        // file or directory stem: the id the server reports
  std::unique_ptr<LanguageModel> lm;
  std::optional<Tokenizer> tokenizer;      // absent for checkpoints without tokenizer files
  std::optional<ChatTemplate> chat_template;
  std::vector<int> stop_ids;               // eos / eot
};

LoadedModel load_model(const std::filesystem::path& path);

}  // namespace bigmoe
