#include "engine/model_loader.h"

#include <algorithm>
#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>

#include "model/config.h"
#include "model/glm_dsa.h"
#include "model/llama.h"
#include "text/tokenizer_gguf.h"
#include "util/error.h"

namespace bigmoe {

namespace fs = std::filesystem;

namespace {

void add_stop(std::vector<int>& v, int id) {
  if (id >= 0 && std::find(v.begin(), v.end(), id) == v.end()) v.push_back(id);
}

std::string read_text(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

}  // namespace

LoadedModel load_model(const fs::path& path) {
  LoadedModel m;
  if (!fs::exists(path)) fail("{}: no such file or directory", path.string());
  if (fs::is_regular_file(path)) {
    std::string arch = GgufFile::open(path)->get_str("general.architecture", "");
    if (arch == "glm-dsa" || arch == "deepseek2") {
      auto glm = GlmDsaModel::load_gguf(path);
      const GgufFile& f = *glm->gguf();
      m.name = path.stem().string();
      if (f.find("tokenizer.ggml.model")) {
        m.tokenizer = tokenizer_from_gguf(f);
        add_stop(m.stop_ids, m.tokenizer->eos());
        add_stop(m.stop_ids, m.tokenizer->eot());
      }
      if (f.find("tokenizer.chat_template"))
        m.chat_template = ChatTemplate::parse(f.get_str("tokenizer.chat_template"), path.filename().string() + ":chat_template");
      m.lm = std::move(glm);
      return m;
    }
    auto llama = LlamaModel::load(path);
    const GgufFile& f = llama->gguf();
    m.name = path.stem().string();
    m.tokenizer = tokenizer_from_gguf(f);
    if (f.find("tokenizer.chat_template"))
      m.chat_template = ChatTemplate::parse(f.get_str("tokenizer.chat_template"), path.filename().string() + ":chat_template");
    add_stop(m.stop_ids, m.tokenizer->eos());
    add_stop(m.stop_ids, m.tokenizer->eot());
    m.lm = std::move(llama);
    return m;
  }
  // A checkpoint directory.
  auto glm = GlmDsaModel::load(path);
  m.name = path.filename().empty() ? path.parent_path().filename().string() : path.filename().string();
  for (int id : GenerationConfig::load(path / "generation_config.json").eos_token_ids) add_stop(m.stop_ids, id);
  if (fs::exists(path / "tokenizer.json")) {
    m.tokenizer = Tokenizer::from_hf_json((path / "tokenizer.json").string());
    add_stop(m.stop_ids, m.tokenizer->eos());
  }
  if (fs::exists(path / "chat_template.jinja")) {
    m.chat_template = ChatTemplate::parse(read_text(path / "chat_template.jinja"), "chat_template.jinja");
  } else if (fs::exists(path / "tokenizer_config.json")) {
    std::ifstream in(path / "tokenizer_config.json");
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(in);
    } catch (const std::exception& e) {
      fail("{}: not valid JSON: {}", (path / "tokenizer_config.json").string(), e.what());
    }
    if (j.contains("chat_template") && j["chat_template"].is_string())
      m.chat_template = ChatTemplate::parse(j["chat_template"].get<std::string>(), "tokenizer_config.json:chat_template");
  }
  m.lm = std::move(glm);
  return m;
}

}  // namespace bigmoe
