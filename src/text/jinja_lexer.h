// Jinja tokenizer, configured like transformers' apply_chat_template environment:
// trim_blocks=True (one newline after %} or #} is dropped), lstrip_blocks=True (spaces before a
// {% or {# on its own line are dropped), keep_trailing_newline=False, "-"/"+" whitespace
// control on either side. Follows jinja2/lexer.py rule for rule.
#pragma once
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace bigmoe::jinja {

struct Pos {
  int line = 1;
  int col = 1;  // in code points, 1-based
};

enum class Tok { Data, VarBegin, VarEnd, BlockBegin, BlockEnd, Name, String, Int, Float, Op, Eof };

struct Token {
  Tok type;
  std::string text;  // data, name, decoded string literal, or operator spelling
  int64_t ival = 0;
  double fval = 0.0;
  Pos pos;
};

// Throws bigmoe::Error "name:line:col: message" on a lexical error.
std::vector<Token> tokenize(std::string_view source, const std::string& name);

// "end of template", "'endif'", "name 'foo'", "string" ... for "expected X, got Y" messages.
std::string describe(const Token& t);

}  // namespace bigmoe::jinja
