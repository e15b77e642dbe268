// Pre-tokenization: the text between added tokens is cut into words by a sequence of regex
// splits (HF tokenizers' Split / ByteLevel / Digits pre-tokenizers, llama.cpp's regex lists),
// then each word goes to BPE on its own. Regexes are PCRE2 (UTF + UCP), compiled once.
#pragma once
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace bigmoe {

// The GPT-2 split, used by ByteLevel(use_regex=true).
inline constexpr std::string_view kGpt2Regex =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

// A compiled PCRE2 pattern (UTF, and UCP so that \s, \d, \w are Unicode-aware). Patterns in
// tokenizer.json are written for Oniguruma; PCRE2 reads the ones tokenizers use the same way.
class SplitRegex {
 public:
  // literal: pattern is a plain string, not a regex. `what` names the pattern in errors.
  SplitRegex(std::string_view pattern, bool literal, std::string_view what);
  // [start, end) byte offsets of the successive non-overlapping matches in s, which must be
  // valid UTF-8. An empty match is reported and the search resumes one character later.
  std::vector<std::pair<size_t, size_t>> find_all(std::string_view s) const;

 private:
  struct Code;
  std::shared_ptr<const Code> code_;
  std::string what_;
};

// How a Split keeps what the pattern matched (HF SplitDelimiterBehavior).
enum class SplitBehavior { kRemoved, kIsolated, kMergedWithPrevious, kMergedWithNext, kContiguous };
SplitBehavior parse_split_behavior(std::string_view name);  // "Isolated", "Removed", ...

class PreTokenizer {
 public:
  void add_split(std::shared_ptr<const SplitRegex> re, SplitBehavior behavior, bool invert);
  // ByteLevel(add_prefix_space): prefix every piece that does not start with ' ' with one.
  void add_prefix_space();

  // Splits valid UTF-8 text into non-empty words. No steps: the text is one word.
  std::vector<std::string> split(std::string_view text) const;

 private:
  struct Step {
    std::shared_ptr<const SplitRegex> re;  // null: the prefix-space step
    SplitBehavior behavior;
    bool invert;
  };
  std::vector<Step> steps_;
};

// Unicode NFC of valid UTF-8 text.
std::string nfc_normalize(std::string_view text);

}  // namespace bigmoe
