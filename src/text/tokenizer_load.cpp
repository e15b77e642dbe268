// The two ways a Tokenizer is made: from HF tokenizer.json, and from the vocabulary a GGUF
// file carries (tokenizer.ggml.*), whose pre-tokenizer is only a name.
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>

#include "text/tokenizer.h"
#include "util/error.h"

namespace bigmoe {

namespace {

using nlohmann::json;

json read_json(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) fail("tokenizer: cannot open '{}': {}", path, std::strerror(errno));
  std::stringstream ss;
  ss << f.rdbuf();
  try {
    return json::parse(ss.str());
  } catch (const json::parse_error& e) {
    fail("tokenizer: '{}' is not valid JSON: {}", path, e.what());
  }
}

// "a b" -> {a, b}. Like llama.cpp, the separator is the first space after the first byte, so
// a merge whose left side is " " itself still parses.
std::pair<std::string, std::string> split_merge(const std::string& m, size_t index, std::string_view origin) {
  const size_t sp = m.size() > 1 ? m.find(' ', 1) : std::string::npos;
  if (sp == std::string::npos || sp + 1 >= m.size()) {
    fail("tokenizer: {}: merge #{} '{}' is not of the form 'left right'", origin, index, m);
  }
  return {m.substr(0, sp), m.substr(sp + 1)};
}

// Pre-tokenizer regexes llama.cpp uses for each tokenizer.ggml.pre name (llama-vocab.cpp);
// every list is applied as a sequence of isolating splits.
constexpr std::string_view kLlama3Regex =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
constexpr std::string_view kQwen2Regex =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";

struct PreSpec {
  std::vector<std::string_view> regexes;
  bool ignore_merges = false;
};

PreSpec pre_spec(const std::string& pre) {
  const auto is = [&](std::initializer_list<std::string_view> names) {
    return std::find(names.begin(), names.end(), pre) != names.end();
  };
  if (is({"gpt2", "gpt-2", "phi-2", "mpt", "olmo", "jais", "exaone4", "roberta-bpe"})) {
    return {{kGpt2Regex}};
  }
  if (is({"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"})) {
    return {{R"(\p{N})", kGpt2Regex}};
  }
  if (is({"llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2"})) {
    return {{kLlama3Regex}, /*ignore_merges=*/true};
  }
  if (is({"dbrx", "smaug-bpe"})) return {{kLlama3Regex}};
  if (is({"glm4", "chatglm-bpe"})) return {{kLlama3Regex}};  // GLM-4 and GLM-5
  if (is({"qwen2", "deepseek-r1-qwen", "stablelm2", "megrez", "hunyuan"})) return {{kQwen2Regex}};
  if (is({"default"})) {
    return {{R"([\p{P}\$\+<=>\^~\|]+)", kGpt2Regex, R"(\p{N}+)", "[0-9][0-9][0-9]"}};
  }
  fail("tokenizer: GGUF pre-tokenizer '{}' is not supported (supported: gpt2, smollm, "
       "llama-bpe, glm4, qwen2, default and their aliases)", pre);
}

// --- tokenizer.json pieces -----------------------------------------------------------------

std::string type_of(const json& j) { return j.is_object() ? j.value("type", std::string()) : ""; }

// Fills pre from an HF pre_tokenizer node; returns whether it holds a ByteLevel.
bool add_pre_tokenizer(const json& node, PreTokenizer& pre, const std::string& path) {
  const std::string type = type_of(node);
  if (type == "Sequence") {
    bool byte_level = false;
    for (const json& sub : node.at("pretokenizers")) byte_level |= add_pre_tokenizer(sub, pre, path);
    return byte_level;
  }
  if (type == "Split") {
    const json& pat = node.at("pattern");
    const bool literal = pat.contains("String");
    if (!literal && !pat.contains("Regex")) {
      fail("tokenizer: '{}': Split pattern {} has neither Regex nor String", path, pat.dump());
    }
    const std::string p = pat.at(literal ? "String" : "Regex").get<std::string>();
    auto re = std::make_shared<SplitRegex>(p, literal, "pre_tokenizer Split");
    pre.add_split(std::move(re), parse_split_behavior(node.at("behavior").get<std::string>()),
                  node.value("invert", false));
    return false;
  }
  if (type == "ByteLevel") {
    if (node.value("add_prefix_space", false)) pre.add_prefix_space();
    if (node.value("use_regex", true)) {
      static const auto gpt2 = std::make_shared<SplitRegex>(kGpt2Regex, false, "ByteLevel");
      pre.add_split(gpt2, SplitBehavior::kIsolated, false);
    }
    return true;
  }
  if (type == "Digits") {
    const bool individual = node.value("individual_digits", false);
    pre.add_split(std::make_shared<SplitRegex>(individual ? R"(\p{N})" : R"(\p{N}+)", false, "Digits"),
                  SplitBehavior::kIsolated, false);
    return false;
  }
  fail("tokenizer: '{}': pre_tokenizer type '{}' is not supported (supported: Sequence, Split, "
       "ByteLevel, Digits)", path, type.empty() ? node.dump() : type);
}

// Returns whether NFC is asked for.
bool parse_normalizer(const json& node, const std::string& path) {
  if (node.is_null()) return false;
  const std::string type = type_of(node);
  if (type == "NFC") return true;
  if (type == "Sequence") {
    bool any = false;
    for (const json& sub : node.at("normalizers")) any |= parse_normalizer(sub, path);
    return any;
  }
  fail("tokenizer: '{}': normalizer type '{}' is not supported (supported: null, NFC)", path,
       type.empty() ? node.dump() : type);
}

// tokenizer_config.json names special tokens by text: a string or {"content": ...}.
std::string token_name(const json& j) {
  if (j.is_string()) return j.get<std::string>();
  if (j.is_object() && j.contains("content")) return j.at("content").get<std::string>();
  return {};
}

}  // namespace

Tokenizer Tokenizer::from_hf_json(const std::string& path) {
  const json root = read_json(path);
  Tokenizer tok;
  try {
    if (!root.is_object() || !root.contains("model")) {
      fail("tokenizer: '{}' has no 'model' object; is it a tokenizer.json?", path);
    }
    const json& model = root.at("model");
    const std::string mtype = model.value("type", std::string("BPE"));
    if (mtype != "BPE") {
      fail("tokenizer: '{}': model.type is '{}'; only byte-level BPE is supported", path, mtype);
    }
    if (model.value("byte_fallback", false)) {
      fail("tokenizer: '{}': model.byte_fallback is set (sentencepiece-style BPE); only byte-level "
           "BPE is supported", path);
    }
    for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"}) {
      if (model.contains(key) && !model[key].is_null() && !model[key].get<std::string>().empty()) {
        fail("tokenizer: '{}': model.{} is set; not supported", path, key);
      }
    }
    if (model.contains("dropout") && !model["dropout"].is_null() && model["dropout"].get<double>() != 0) {
      fail("tokenizer: '{}': model.dropout is set; BPE dropout is not supported", path);
    }
    tok.ignore_merges_ = model.value("ignore_merges", false);

    for (const auto& [text, id] : model.at("vocab").items()) {
      tok.add_token(id.get<int>(), text, false, false, path);
    }
    for (const json& a : root.value("added_tokens", json::array())) {
      const int id = a.at("id").get<int>();
      const std::string content = a.at("content").get<std::string>();
      if (a.value("single_word", false)) {
        fail("tokenizer: '{}': added token '{}' has single_word set; not supported", path, content);
      }
      tok.add_token(id, content, true, a.value("special", false), path);
      tok.tokens_[id].lstrip = a.value("lstrip", false);
      tok.tokens_[id].rstrip = a.value("rstrip", false);
    }

    std::vector<std::pair<std::string, std::string>> merges;
    const json& jm = model.at("merges");
    merges.reserve(jm.size());
    for (size_t i = 0; i < jm.size(); ++i) {
      if (jm[i].is_string()) {
        merges.push_back(split_merge(jm[i].get<std::string>(), i, path));
      } else if (jm[i].is_array() && jm[i].size() == 2) {
        merges.emplace_back(jm[i][0].get<std::string>(), jm[i][1].get<std::string>());
      } else {
        fail("tokenizer: '{}': merge #{} is {}; expected \"a b\" or [\"a\", \"b\"]", path, i, jm[i].dump());
      }
    }

    tok.nfc_ = parse_normalizer(root.value("normalizer", json()), path);
    const json pre = root.value("pre_tokenizer", json());
    if (pre.is_null() || !add_pre_tokenizer(pre, tok.pre_, path)) {
      fail("tokenizer: '{}': pre_tokenizer has no ByteLevel step; only byte-level BPE is supported", path);
    }
    const std::string dtype = type_of(root.value("decoder", json()));
    if (dtype != "ByteLevel") {
      fail("tokenizer: '{}': decoder is '{}'; only ByteLevel is supported", path,
           dtype.empty() ? root.value("decoder", json()).dump() : dtype);
    }
    tok.build(merges, path);

    const std::string unk = model.contains("unk_token") && model["unk_token"].is_string()
                                ? model["unk_token"].get<std::string>() : "";
    if (!unk.empty()) tok.unk_ = tok.token_id(unk);
  } catch (const json::exception& e) {
    fail("tokenizer: '{}': unexpected structure: {}", path, e.what());
  }

  // bos/eos live in tokenizer_config.json, not tokenizer.json.
  const auto cfg_path = std::filesystem::path(path).parent_path() / "tokenizer_config.json";
  if (std::filesystem::exists(cfg_path)) {
    const json cfg = read_json(cfg_path.string());
    const auto id_of = [&](const char* key) {
      if (!cfg.contains(key)) return -1;
      const std::string name = token_name(cfg[key]);
      if (name.empty()) return -1;
      const int id = tok.token_id(name);
      if (id < 0) fail("tokenizer: '{}': {} '{}' is not in the vocabulary", cfg_path.string(), key, name);
      return id;
    };
    tok.bos_ = id_of("bos_token");
    tok.eos_ = id_of("eos_token");
    tok.pad_ = id_of("pad_token");
    tok.add_bos_ = cfg.value("add_bos_token", false) && tok.bos_ >= 0;
  }
  return tok;
}

Tokenizer Tokenizer::from_vocab(const TokenizerData& data) {
  constexpr std::string_view origin = "GGUF vocabulary";
  const size_t n = data.tokens.size();
  if (!data.token_types.empty() && data.token_types.size() != n) {
    fail("tokenizer: {}: {} token types for {} tokens", origin, data.token_types.size(), n);
  }
  Tokenizer tok;
  for (size_t i = 0; i < n; ++i) {
    const int type = data.token_types.empty() ? 1 : data.token_types[i];
    // Like llama.cpp: control and unknown tokens are matched in text only when parsing
    // special tokens, user-defined ones always.
    const bool special = type == 3 || type == 2;
    const bool added = special || type == 4;
    tok.add_token(static_cast<int>(i), data.tokens[i], added, special, origin);
    if (type == 2) tok.unk_ = static_cast<int>(i);
  }
  std::vector<std::pair<std::string, std::string>> merges;
  merges.reserve(data.merges.size());
  for (size_t i = 0; i < data.merges.size(); ++i) merges.push_back(split_merge(data.merges[i], i, origin));

  const PreSpec spec = pre_spec(data.pre);
  for (std::string_view re : spec.regexes) {
    tok.pre_.add_split(std::make_shared<SplitRegex>(re, false, fmt::format("GGUF pre-tokenizer '{}'", data.pre)),
                       SplitBehavior::kIsolated, false);
  }
  tok.ignore_merges_ = spec.ignore_merges;
  tok.build(merges, origin);

  const auto check = [&](int id, const char* what) {
    if (id < -1 || id >= static_cast<int>(n)) {
      fail("tokenizer: {}: {} id {} is outside the vocabulary (size {})", origin, what, id, n);
    }
    return id;
  };
  tok.bos_ = check(data.bos, "bos");
  tok.eos_ = check(data.eos, "eos");
  tok.eot_ = check(data.eot, "eot");
  tok.pad_ = check(data.pad, "pad");
  tok.add_bos_ = data.add_bos && tok.bos_ >= 0;
  return tok;
}

}  // namespace bigmoe
