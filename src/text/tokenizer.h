// Byte-level BPE tokenizer (GPT-2 family: SmolLM2, Llama 3, Qwen 2, GLM-4/5).
//
// encode: cut the text at added tokens (special ones only when parse_special), NFC-normalize
// the rest if the tokenizer asks for it, pre-tokenize it into words with regexes, and run BPE
// on each word's bytes. BPE works on raw bytes: the GPT-2 byte<->unicode mapping of the
// vocabulary is undone once at load time, so no text is ever remapped while encoding.
// decode: concatenate token bytes; invalid UTF-8 becomes U+FFFD per maximal subpart, exactly
// as HF tokenizers' decode does.
#pragma once
#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "text/pretokenizer.h"
#include "text/utf8.h"

namespace bigmoe {

// A vocabulary as GGUF stores it (tokenizer.ggml.*), for the GGUF loader.
struct TokenizerData {
  std::vector<std::string> tokens;  // (n_vocab) token strings, byte-level encoded
  std::vector<std::string> merges;  // "a b", highest priority first
  std::vector<int> token_types;     // (n_vocab) or empty: 1 normal, 2 unknown, 3 control,
                                    // 4 user-defined, 5 unused, 6 byte
  std::string pre;                  // tokenizer.ggml.pre: "gpt2", "smollm", "llama-bpe", "glm4", ...
  int bos = -1, eos = -1, eot = -1, pad = -1;
  bool add_bos = false;
};

class Tokenizer {
 public:
  // HF tokenizer.json. bos/eos come from a tokenizer_config.json beside it, if there is one.
  static Tokenizer from_hf_json(const std::string& path);
  // Pre-tokenizer chosen by data.pre, with the regexes llama.cpp uses for that name.
  static Tokenizer from_vocab(const TokenizerData& data);

  // Never adds BOS; callers that want it check add_bos().
  std::vector<int> encode(std::string_view text, bool parse_special = true) const;
  std::string decode(const std::vector<int>& ids) const;

  // The vocabulary entry of id (byte-level form for ordinary tokens, e.g. "Ġthe"), and back.
  const std::string& token_text(int id) const;
  int token_id(std::string_view text) const;  // -1 if none
  // Added tokens marked special (HF "special": true, GGUF control): matched only when
  // encode's parse_special is set.
  bool is_special(int id) const;

  int vocab_size() const { return static_cast<int>(tokens_.size()); }
  int bos() const { return bos_; }
  int eos() const { return eos_; }
  int eot() const { return eot_; }
  int pad() const { return pad_; }
  bool add_bos() const { return add_bos_; }

  // Decodes token by token, never emitting part of a UTF-8 character: the concatenation of
  // every push() and flush() equals decode() of all the ids.
  class StreamDecoder {
   public:
    explicit StreamDecoder(const Tokenizer& tok) : tok_(&tok) {}
    std::string push(int id);
    std::string flush();

   private:
    const Tokenizer* tok_;
    utf8::Assembler asm_;
  };

 private:
  struct Token {
    std::string text;   // vocabulary entry
    std::string bytes;  // what it decodes to
    bool added = false, special = false;
    bool lstrip = false, rstrip = false;  // added tokens: swallow white space beside them
    bool present = false;  // false for holes in the id range
  };
  struct Merge {
    int rank, result;
  };

  Tokenizer() = default;
  // Shared by both loaders, once tokens_ and the merge strings are filled.
  void build(const std::vector<std::pair<std::string, std::string>>& merges, std::string_view origin);
  void add_token(int id, std::string text, bool added, bool special, std::string_view origin);
  void encode_fragment(std::string_view text, std::vector<int>& out) const;
  void bpe(std::string_view word, std::vector<int>& out) const;
  const Token& token(int id) const;

  std::vector<Token> tokens_;                               // (n_vocab)
  std::unordered_map<std::string, int> text_to_id_;         // vocabulary entry -> id
  std::unordered_map<uint64_t, Merge> merges_;              // (left id << 32 | right id) -> merge
  int byte_token_[256];                                     // single-byte token of each byte, or -1
  std::vector<std::vector<int>> added_by_first_byte_;       // (256) added ids, longest first
  PreTokenizer pre_;
  bool nfc_ = false;
  bool ignore_merges_ = false;  // a word that is itself a token is not split (Llama 3)
  int unk_ = -1;
  int bos_ = -1, eos_ = -1, eot_ = -1, pad_ = -1;
  bool add_bos_ = false;
};

}  // namespace bigmoe
