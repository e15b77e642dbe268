// UTF-8 helpers for the tokenizer: validation by maximal subparts (the policy of Rust's
// String::from_utf8_lossy and WHATWG, so our replacement of invalid bytes matches HF decode),
// and a streaming decoder that never splits a character.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace bigmoe::utf8 {

// What the bytes at s[pos..] hold.
struct Scan {
  enum Kind { kChar, kInvalid, kTruncated } kind;
  size_t len;  // kChar: bytes of the character; kInvalid: bytes of the maximal invalid
               // subpart (one U+FFFD replaces them); kTruncated: bytes present of a sequence
               // that is valid so far but runs past the end of s
};
Scan scan(std::string_view s, size_t pos);

// Length of the valid UTF-8 prefix of s.
size_t valid_prefix(std::string_view s);
bool is_valid(std::string_view s);

// s with each maximal invalid subpart (including a truncated tail) replaced by U+FFFD.
std::string sanitize(std::string_view s);

// Appends the UTF-8 encoding of code point cp (cp < 0x110000) to out.
void append(std::string& out, uint32_t cp);

// Holds bytes until they form complete characters. push() returns the longest prefix whose
// decoding can no longer change; the concatenation of every push() and the final flush()
// equals sanitize() of the concatenated input.
class Assembler {
 public:
  std::string push(std::string_view bytes);
  std::string flush();

 private:
  std::string pending_;  // an incomplete, valid-so-far sequence (at most 3 bytes)
};

}  // namespace bigmoe::utf8
