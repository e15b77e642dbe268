// Tokenizer against other implementations: ids from HF `tokenizers` (and llama.cpp when the
// fixture script had it) for a corpus, on the SmolLM2 tokenizer loaded both from tokenizer.json
// and from its GGUF vocabulary, and on a small GLM-5-format tokenizer with variants of its
// normalizer and pre-tokenizer. Then round trips, streaming decode, special-token parsing,
// invalid UTF-8, and errors that name the culprit. Fixtures: tools/make_tokenizer_fixtures.py.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "text/tokenizer.h"
#include "text/utf8.h"
#include "util/error.h"

namespace bigmoe {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;
using ::testing::HasSubstr;

const fs::path kDir = fs::path(BIGMOE_FIXTURES) / "tokenizer";

json read_json(const fs::path& p) {
  std::ifstream in(p);
  return json::parse(in);
}

const json& expected() {
  static const json j = read_json(kDir / "expected.json");
  return j;
}

std::vector<std::pair<std::string, std::string>> corpus() {
  std::vector<std::pair<std::string, std::string>> out;
  for (const json& e : expected().at("corpus")) out.emplace_back(e.at("name"), e.at("text"));
  return out;
}

TokenizerData gguf_vocab() {
  const json j = read_json(kDir / "smollm2" / "gguf_vocab.json");
  TokenizerData d;
  d.tokens = j.at("tokens").get<std::vector<std::string>>();
  d.merges = j.at("merges").get<std::vector<std::string>>();
  d.token_types = j.at("token_types").get<std::vector<int>>();
  d.pre = j.at("pre");
  d.bos = j.at("bos");
  d.eos = j.at("eos");
  d.eot = j.at("eot");
  d.pad = j.at("pad");
  d.add_bos = j.at("add_bos");
  return d;
}

const Tokenizer& smollm2_json() {
  static const Tokenizer t = Tokenizer::from_hf_json((kDir / "smollm2" / "tokenizer.json").string());
  return t;
}
const Tokenizer& smollm2_gguf() {
  static const Tokenizer t = Tokenizer::from_vocab(gguf_vocab());
  return t;
}
const Tokenizer& glm5() {
  static const Tokenizer t = Tokenizer::from_hf_json((kDir / "glm5" / "tokenizer.json").string());
  return t;
}

// A file in a fresh temporary directory, removed with it.
struct TempFile {
  fs::path dir, path;
  explicit TempFile(const std::string& name, const std::string& content) {
    dir = fs::temp_directory_path() / ("bigmoe_tok_" + std::to_string(::getpid()) + "_" + name);
    fs::create_directories(dir);
    path = dir / "tokenizer.json";
    std::ofstream(path, std::ios::binary) << content;
  }
  ~TempFile() { fs::remove_all(dir); }
};

template <typename F>
void expect_error(F&& f, std::initializer_list<std::string> parts) {
  try {
    f();
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    for (const auto& p : parts) EXPECT_THAT(e.what(), HasSubstr(p));
  }
}

// Every corpus entry encodes to the reference ids.
void expect_ids(const Tokenizer& tok, const json& want, bool parse_special) {
  const auto texts = corpus();
  ASSERT_EQ(want.size(), texts.size());
  for (size_t i = 0; i < texts.size(); ++i) {
    SCOPED_TRACE("corpus entry '" + texts[i].first + "'");
    EXPECT_EQ(tok.encode(texts[i].second, parse_special), want[i].get<std::vector<int>>());
  }
}

const json& ref(const char* tok, const char* key) { return expected().at("tokenizers").at(tok).at(key); }

TEST(TokenizerReference, Smollm2JsonMatchesTokenizers) {
  expect_ids(smollm2_json(), ref("smollm2", "hf"), true);
  expect_ids(smollm2_json(), ref("smollm2", "hf_no_special"), false);
}

TEST(TokenizerReference, Smollm2GgufMatchesTokenizers) {
  expect_ids(smollm2_gguf(), ref("smollm2", "hf"), true);
  expect_ids(smollm2_gguf(), ref("smollm2", "hf_no_special"), false);
}

TEST(TokenizerReference, Smollm2GgufMatchesLlamaCpp) {
  const json& s = expected().at("tokenizers").at("smollm2");
  if (!s.contains("llama_cpp")) GTEST_SKIP() << "fixtures were made without llama-cpp-python";
  expect_ids(smollm2_gguf(), s.at("llama_cpp"), true);
  expect_ids(smollm2_gguf(), s.at("llama_cpp_no_special"), false);
}

TEST(TokenizerReference, Glm5MatchesTokenizers) {
  expect_ids(glm5(), ref("glm5", "hf"), true);
  expect_ids(glm5(), ref("glm5", "hf_no_special"), false);
}

// The GLM-5 vocabulary as a GGUF converter would store it, for from_vocab.
TokenizerData glm5_vocab(const std::string& pre) {
  const json j = read_json(kDir / "glm5" / "tokenizer.json");
  TokenizerData d;
  d.pre = pre;
  const auto put = [&](int id, const std::string& text, int type) {
    if (static_cast<size_t>(id) >= d.tokens.size()) {
      d.tokens.resize(id + 1);
      d.token_types.resize(id + 1, 1);
    }
    d.tokens[id] = text;
    d.token_types[id] = type;
  };
  for (const auto& [text, id] : j.at("model").at("vocab").items()) put(id, text, 1);
  for (const json& a : j.at("added_tokens")) put(a.at("id"), a.at("content"), a.at("special") ? 3 : 4);
  for (const json& m : j.at("model").at("merges")) d.merges.push_back(m[0].get<std::string>() + " " + m[1].get<std::string>());
  return d;
}

// The GLM-5 tokenizer.json patched (JSON pointers) to other supported components: NFC,
// Digits, ByteLevel with prefix space and regex, every Split behavior and invert, added-token
// lstrip/rstrip, ignore_merges. A variant with gguf_pre is the HF spelling of what llama.cpp
// does for that tokenizer.ggml.pre name, so from_vocab(pre) must give the same ids.
TEST(TokenizerReference, Glm5VariantsMatchTokenizers) {
  const json base = read_json(kDir / "glm5" / "tokenizer.json");
  int with_pre = 0;
  for (const auto& [name, v] : expected().at("glm5_variants").items()) {
    SCOPED_TRACE("variant " + name);
    json j = base;
    for (const auto& [pointer, value] : v.at("patch").items()) j[json::json_pointer(pointer)] = value;
    TempFile f("variant_" + name, j.dump());
    expect_ids(Tokenizer::from_hf_json(f.path.string()), v.at("hf"), true);
    if (v.contains("gguf_pre")) {
      SCOPED_TRACE("from_vocab, pre " + v.at("gguf_pre").get<std::string>());
      expect_ids(Tokenizer::from_vocab(glm5_vocab(v.at("gguf_pre"))), v.at("hf"), true);
      ++with_pre;
    }
  }
  EXPECT_GE(with_pre, 6);  // glm4, gpt2, smollm, llama-bpe, qwen2, default
}

TEST(Tokenizer, JsonAndGgufLoadersAgree) {
  const Tokenizer& a = smollm2_json();
  const Tokenizer& b = smollm2_gguf();
  ASSERT_EQ(a.vocab_size(), b.vocab_size());
  for (int id = 0; id < a.vocab_size(); ++id) {
    ASSERT_EQ(a.token_text(id), b.token_text(id)) << "id " << id;
    ASSERT_EQ(a.decode({id}), b.decode({id})) << "id " << id;
    ASSERT_EQ(a.is_special(id), b.is_special(id)) << "id " << id;
  }
  for (const auto& [name, text] : corpus()) {
    SCOPED_TRACE(name);
    EXPECT_EQ(a.encode(text, true), b.encode(text, true));
    EXPECT_EQ(a.encode(text, false), b.encode(text, false));
  }
  EXPECT_EQ(b.bos(), 1);
  EXPECT_EQ(b.eos(), 2);
  EXPECT_FALSE(b.add_bos());
}

TEST(Tokenizer, DecodeInvertsEncode) {
  for (const Tokenizer* tok : {&smollm2_json(), &smollm2_gguf(), &glm5()}) {
    for (const auto& [name, text] : corpus()) {
      SCOPED_TRACE(name);
      EXPECT_EQ(tok->decode(tok->encode(text, true)), text);
      EXPECT_EQ(tok->decode(tok->encode(text, false)), text);
    }
  }
}

TEST(Tokenizer, StreamDecoderEmitsWholeCharacters) {
  for (const Tokenizer* tok : {&smollm2_json(), &glm5()}) {
    for (const auto& [name, text] : corpus()) {
      SCOPED_TRACE(name);
      const std::vector<int> ids = tok->encode(text);
      Tokenizer::StreamDecoder dec(*tok);
      std::string streamed;
      for (int id : ids) {
        const std::string chunk = dec.push(id);
        ASSERT_TRUE(utf8::is_valid(chunk)) << "token " << id;
        streamed += chunk;
      }
      const std::string tail = dec.flush();
      EXPECT_TRUE(utf8::is_valid(tail));
      EXPECT_EQ(streamed + tail, tok->decode(ids));
    }
  }
}

// The small GLM-5 vocabulary spells most CJK and emoji with single-byte tokens, so the stream
// decoder must hold partial characters back.
TEST(Tokenizer, StreamDecoderHoldsPartialCharacters) {
  const Tokenizer& tok = glm5();
  const std::vector<int> ids = tok.encode("🦀🦞");  // not in its training text
  ASSERT_GT(ids.size(), 2u);
  Tokenizer::StreamDecoder dec(tok);
  EXPECT_EQ(dec.push(ids[0]), "");  // 0xF0 alone is the start of a 4-byte character
  std::string rest;
  for (size_t i = 1; i < ids.size(); ++i) rest += dec.push(ids[i]);
  EXPECT_EQ(rest + dec.flush(), "🦀🦞");
}

TEST(Tokenizer, StreamDecoderReplacesInvalidBytes) {
  const Tokenizer& tok = glm5();
  const std::vector<int> ids = tok.encode("\xE4\xBD" "A\xF0\x9F");  // truncated 你, A, truncated emoji
  Tokenizer::StreamDecoder dec(tok);
  std::string out;
  for (int id : ids) out += dec.push(id);
  EXPECT_EQ(out, "\uFFFD" "A");  // "A" proves the first sequence can never complete
  EXPECT_EQ(dec.flush(), "\uFFFD");
  EXPECT_EQ(tok.decode(ids), "\uFFFD" "A\uFFFD");
}

TEST(Tokenizer, SpecialTokensParsedOnlyWhenAsked) {
  const Tokenizer& tok = glm5();
  const int user = tok.token_id("<|user|>"), think = tok.token_id("<think>");
  ASSERT_GE(user, 0);
  ASSERT_GE(think, 0);
  EXPECT_TRUE(tok.is_special(user));

  const std::vector<int> parsed = tok.encode("<|user|>hi<think>", true);
  EXPECT_EQ(parsed.front(), user);
  EXPECT_EQ(parsed.back(), think);

  const std::vector<int> plain = tok.encode("<|user|>hi<think>", false);
  for (int id : plain) EXPECT_FALSE(tok.is_special(id)) << "id " << id;
  EXPECT_EQ(tok.decode(plain), "<|user|>hi<think>");

  // An added token that is not special is matched either way.
  const int mid = tok.token_id("<|code_middle|>");
  ASSERT_GE(mid, 0);
  EXPECT_FALSE(tok.is_special(mid));
  EXPECT_EQ(tok.encode("a<|code_middle|>b", false)[1], mid);
  EXPECT_EQ(tok.encode("a<|code_middle|>b", true)[1], mid);

  for (const char* s : {"[gMASK]", "<sop>", "<|system|>", "<|assistant|>", "<|observation|>",
                        "</think>", "<tool_call>", "</tool_call>", "<arg_key>", "</arg_key>",
                        "<arg_value>", "</arg_value>", "<tool_response>", "</tool_response>",
                        "<|endoftext|>"}) {
    const int id = tok.token_id(s);
    ASSERT_GE(id, 0) << s;
    EXPECT_EQ(tok.encode(s), std::vector<int>{id}) << s;
    EXPECT_EQ(tok.token_text(id), s);
  }
}

TEST(Tokenizer, TokenLookup) {
  const Tokenizer& tok = smollm2_gguf();
  EXPECT_EQ(tok.vocab_size(), 49152);
  EXPECT_EQ(tok.token_id("<|im_start|>"), 1);
  EXPECT_EQ(tok.token_id("no such token"), -1);
  const int the = tok.token_id("Ġthe");
  ASSERT_GE(the, 0);
  EXPECT_EQ(tok.token_text(the), "Ġthe");
  EXPECT_EQ(tok.decode({the}), " the");
  EXPECT_THROW(tok.decode({tok.vocab_size()}), Error);
  EXPECT_THROW(tok.token_text(-1), Error);
}

// Bytes that are not UTF-8 still encode (byte-level BPE has a token per byte) and come back
// with each maximal invalid subpart replaced by U+FFFD.
TEST(Tokenizer, InvalidUtf8Input) {
  const std::string bad = "ok \xFF\xFE word\xE4\xBD" "\xC0\xAF end\xED\xA0\x80";
  const std::vector<int> ids = glm5().encode(bad);
  EXPECT_EQ(glm5().decode(ids), utf8::sanitize(bad));

  // SmolLM2 has no tokens for 0xFF, 0xFE, 0xC0 (never in UTF-8): its tokenizer.json names an
  // unknown token for them, its GGUF vocabulary does not.
  EXPECT_EQ(smollm2_json().decode(smollm2_json().encode(bad)),
            "ok <|endoftext|><|endoftext|> word\uFFFD<|endoftext|>\uFFFD end\uFFFD\uFFFD\uFFFD");
  expect_error([&] { smollm2_gguf().encode(bad); }, {"byte 0xFF", "no token"});
  const std::string bad_but_covered = "a\xE4\xBD" "b\xED\xA0\x80";
  EXPECT_EQ(smollm2_gguf().decode(smollm2_gguf().encode(bad_but_covered)), utf8::sanitize(bad_but_covered));
}

TEST(Tokenizer, LongRunsStayFast) {
  const std::string run(200000, 'a');
  const auto ids = glm5().encode(run);
  EXPECT_EQ(glm5().decode(ids), run);
  const std::string spaces = std::string(100000, ' ') + "x" + std::string(100000, '\n');
  EXPECT_EQ(smollm2_json().decode(smollm2_json().encode(spaces)), spaces);
  std::string mixed;
  for (int i = 0; i < 20000; ++i) mixed += i % 7 ? "-" : "🙂\t";
  EXPECT_EQ(glm5().decode(glm5().encode(mixed)), mixed);
}

TEST(Utf8, SanitizeReplacesMaximalSubparts) {
  // Expected strings from Python's bytes.decode("utf-8", "replace") (same policy as Rust).
  EXPECT_EQ(utf8::sanitize("\xF0\x9F\x98"), "\uFFFD");
  EXPECT_EQ(utf8::sanitize("\xED\xA0\x80"), "\uFFFD\uFFFD\uFFFD");
  EXPECT_EQ(utf8::sanitize("\xE0\x80\xAF"), "\uFFFD\uFFFD\uFFFD");
  EXPECT_EQ(utf8::sanitize("\xC0\xAF"), "\uFFFD\uFFFD");
  EXPECT_EQ(utf8::sanitize("a\xF4\x90\x80\x80" "b"), "a\uFFFD\uFFFD\uFFFD\uFFFD" "b");
  EXPECT_EQ(utf8::sanitize("\xE4\xBD\xE4\xBD\xA0"), "\uFFFD你");
  EXPECT_EQ(utf8::sanitize("h\xC3\xA9llo"), "h\xC3\xA9llo");
}

TEST(Utf8, AssemblerMatchesSanitizeWhateverTheChunking) {
  const std::string s = "a\xE4\xBD\xA0\xF0\x9F\x98\x80\xE4\xBD" "b\xFF\xC3";
  for (size_t cut = 0; cut <= s.size(); ++cut) {
    utf8::Assembler a;
    std::string out = a.push(s.substr(0, cut));
    out += a.push(s.substr(cut));
    out += a.flush();
    EXPECT_EQ(out, utf8::sanitize(s)) << "cut at " << cut;
  }
  utf8::Assembler byte_by_byte;
  std::string out;
  for (char c : s) out += byte_by_byte.push(std::string(1, c));
  EXPECT_EQ(out + byte_by_byte.flush(), utf8::sanitize(s));
}

// --- errors name the file and what is wrong ---------------------------------------------------

TEST(TokenizerErrors, MissingFile) {
  expect_error([] { Tokenizer::from_hf_json("/nonexistent/tokenizer.json"); },
               {"/nonexistent/tokenizer.json", "cannot open"});
}

TEST(TokenizerErrors, InvalidJson) {
  TempFile f("badjson", "{\"model\": {\"type\": \"BPE\",");
  expect_error([&] { Tokenizer::from_hf_json(f.path.string()); }, {f.path.string(), "not valid JSON"});
}

json glm5_json() { return read_json(kDir / "glm5" / "tokenizer.json"); }

void expect_json_error(const json& j, const std::string& name, std::initializer_list<std::string> parts) {
  TempFile f(name, j.dump());
  expect_error([&] { Tokenizer::from_hf_json(f.path.string()); }, parts);
}

TEST(TokenizerErrors, UnsupportedModelType) {
  json j = glm5_json();
  j["model"]["type"] = "Unigram";
  expect_json_error(j, "unigram", {"model.type", "Unigram", "BPE"});
}

TEST(TokenizerErrors, UnsupportedComponents) {
  json j = glm5_json();
  j["normalizer"] = {{"type", "NFKC"}};
  expect_json_error(j, "nfkc", {"normalizer", "NFKC"});

  j = glm5_json();
  j["pre_tokenizer"] = {{"type", "Metaspace"}, {"replacement", "▁"}};
  expect_json_error(j, "metaspace", {"pre_tokenizer", "Metaspace"});

  j = glm5_json();
  j["decoder"] = {{"type", "WordPiece"}};
  expect_json_error(j, "wordpiece", {"decoder", "WordPiece"});

  j = glm5_json();
  j["pre_tokenizer"]["pretokenizers"][0]["behavior"] = "Sideways";
  expect_json_error(j, "behavior", {"Split behavior", "Sideways"});

  j = glm5_json();
  j["pre_tokenizer"]["pretokenizers"][0]["pattern"] = {{"Regex", "(unclosed"}};
  expect_json_error(j, "regex", {"(unclosed", "PCRE2"});

  j = glm5_json();
  j["model"]["merges"].push_back(json::array({"no_such_left", "x"}));
  expect_json_error(j, "merge", {"merge #", "no_such_left"});

  j = glm5_json();
  j.erase("model");
  expect_json_error(j, "nomodel", {"no 'model'"});
}

TEST(TokenizerErrors, BadGgufVocabulary) {
  TokenizerData d = gguf_vocab();
  d.pre = "no-such-pre";
  expect_error([&] { Tokenizer::from_vocab(d); }, {"no-such-pre", "not supported"});

  d = gguf_vocab();
  d.merges.push_back("nospace");
  expect_error([&] { Tokenizer::from_vocab(d); }, {"merge #", "nospace"});

  d = gguf_vocab();
  d.bos = 1 << 20;
  expect_error([&] { Tokenizer::from_vocab(d); }, {"bos", "outside the vocabulary"});

  d = gguf_vocab();
  d.token_types.pop_back();
  expect_error([&] { Tokenizer::from_vocab(d); }, {"token types"});
}

}  // namespace
}  // namespace bigmoe
