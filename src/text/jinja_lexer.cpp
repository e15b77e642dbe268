#include "text/jinja_lexer.h"

#include <algorithm>
#include <cctype>

#include "text/jinja_unicode.h"
#include "util/error.h"

namespace bigmoe::jinja {
namespace {

bool is_digit(char c) { return c >= '0' && c <= '9'; }
bool is_name_start(char c) { return std::isalpha(static_cast<unsigned char>(c)) || c == '_'; }
bool is_name_char(char c) { return std::isalnum(static_cast<unsigned char>(c)) || c == '_'; }

// jinja2 splits on \r\n, \r and \n, joins with \n and drops one trailing newline.
std::string normalize_newlines(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '\r') {
      out += '\n';
      if (i + 1 < s.size() && s[i + 1] == '\n') ++i;
    } else {
      out += s[i];
    }
  }
  if (!out.empty() && out.back() == '\n') out.pop_back();
  return out;
}

class Lexer {
 public:
  Lexer(std::string_view source, const std::string& name)
      : src_(normalize_newlines(source)), name_(name) {
    line_starts_.push_back(0);
    for (size_t i = 0; i < src_.size(); ++i)
      if (src_[i] == '\n') line_starts_.push_back(i + 1);
  }

  std::vector<Token> run() {
    while (pos_ < src_.size()) lex_root();
    emit(Tok::Eof, "", src_.size());
    return std::move(out_);
  }

 private:
  Pos at(size_t offset) const {
    auto it = std::upper_bound(line_starts_.begin(), line_starts_.end(), offset) - 1;
    size_t start = *it;
    return {
        static_cast<int>(it - line_starts_.begin()) + 1,
        static_cast<int>(utf8::length(std::string_view(src_).substr(start, offset - start))) + 1};
  }

  [[noreturn]] void error(size_t offset, const std::string& msg) const {
    Pos p = at(offset);
    fail("{}:{}:{}: {}", name_, p.line, p.col, msg);
  }

  Token& emit(Tok type, std::string text, size_t offset) {
    out_.push_back(Token{type, std::move(text), 0, 0.0, at(offset)});
    return out_.back();
  }

  bool starts(size_t i, std::string_view s) const { return src_.compare(i, s.size(), s) == 0; }

  size_t skip_space(size_t i) const {
    while (size_t n = utf8::space_at(src_, i)) i += n;
    return i;
  }

  // The data before a tag, with "-" (strip all trailing whitespace) or lstrip_blocks applied.
  void emit_data(size_t begin, size_t end, char sign, bool is_variable) {
    std::string_view text = std::string_view(src_).substr(begin, end - begin);
    if (sign == '-') {
      text = utf8::strip(text, false, true);
    } else if (sign != '+' && !is_variable) {
      size_t l_pos = text.rfind('\n');
      l_pos = l_pos == text.npos ? 0 : l_pos + 1;
      if ((l_pos > 0 || line_starting_) && l_pos < text.size() &&
          utf8::strip(text.substr(l_pos), true, false).empty())
        text = text.substr(0, l_pos);
    }
    if (!text.empty()) emit(Tok::Data, std::string(text), begin);
  }

  // After "%}" or "#}" (at i, with the sign char before it): trim_blocks eats one newline,
  // "-" eats all whitespace. Returns the position after the tag end.
  size_t finish_block_end(size_t i, char sign) {
    if (sign == '-')
      i = skip_space(i);
    else if (sign != '+' && i < src_.size() && src_[i] == '\n')
      ++i;
    line_starting_ = i > 0 && src_[i - 1] == '\n';
    return i;
  }

  // {%(-|+|)\s*raw\s*(-%}\s*|%}) at i: returns the end of the match or npos.
  size_t match_raw_begin(size_t i) const {
    i += 2;
    if (i < src_.size() && (src_[i] == '-' || src_[i] == '+')) ++i;
    i = skip_space(i);
    if (!starts(i, "raw")) return std::string::npos;
    i = skip_space(i + 3);
    if (starts(i, "-%}")) return skip_space(i + 3);
    if (starts(i, "%}")) return i + 2;
    return std::string::npos;
  }

  void lex_root() {
    size_t p = pos_;
    while (true) {
      p = src_.find('{', p);
      if (p == std::string::npos || p + 1 >= src_.size()) {
        emit(Tok::Data, src_.substr(pos_), pos_);
        pos_ = src_.size();
        return;
      }
      char k = src_[p + 1];
      if (k == '{' || k == '%' || k == '#') break;
      ++p;
    }
    char kind = src_[p + 1];
    char sign =
        (p + 2 < src_.size() && (src_[p + 2] == '-' || src_[p + 2] == '+')) ? src_[p + 2] : 0;
    emit_data(pos_, p, sign, kind == '{');
    size_t q = p + 2 + (sign ? 1 : 0);
    if (kind == '%') {
      if (size_t r = match_raw_begin(p); r != std::string::npos) {
        line_starting_ = src_[r - 1] == '\n';
        return lex_raw(p, r);
      }
    }
    if (kind == '#') return lex_comment(p, q);
    emit(kind == '%' ? Tok::BlockBegin : Tok::VarBegin, "", p);
    line_starting_ = false;
    lex_tag(q, kind == '%');
  }

  void lex_comment(size_t open, size_t q) {
    size_t e = src_.find("#}", q);
    if (e == std::string::npos) error(open, "missing end of comment tag '#}'");
    char sign = (e > q && (src_[e - 1] == '-' || src_[e - 1] == '+')) ? src_[e - 1] : 0;
    pos_ = finish_block_end(e + 2, sign);
  }

  void lex_raw(size_t open, size_t body) {
    for (size_t p = src_.find("{%", body); p != std::string::npos; p = src_.find("{%", p + 1)) {
      size_t i = p + 2;
      char sign = (i < src_.size() && (src_[i] == '-' || src_[i] == '+')) ? src_[i] : 0;
      if (sign) ++i;
      i = skip_space(i);
      if (!starts(i, "endraw")) continue;
      i = skip_space(i + 6);
      char end_sign = (starts(i, "-%}") || starts(i, "+%}")) ? src_[i] : 0;
      if (!starts(i + (end_sign ? 1 : 0), "%}")) continue;
      emit_data(body, p, sign, false);
      pos_ = finish_block_end(i + (end_sign ? 3 : 2), end_sign);
      return;
    }
    error(open, "missing end of raw directive '{% endraw %}'");
  }

  // Expression tokens up to the matching "%}" / "}}" (only when brackets are balanced).
  void lex_tag(size_t i, bool block) {
    std::string balance;  // expected closing brackets
    while (true) {
      i = skip_space(i);
      if (i >= src_.size()) {  // the parser reports the missing tag end
        pos_ = i;
        return;
      }
      if (balance.empty()) {
        if (block) {
          char sign = (starts(i, "-%}") || starts(i, "+%}")) ? src_[i] : 0;
          if (starts(i + (sign ? 1 : 0), "%}")) {
            emit(Tok::BlockEnd, "", i);
            pos_ = finish_block_end(i + (sign ? 3 : 2), sign);
            return;
          }
        } else if (starts(i, "-}}") || starts(i, "}}")) {
          emit(Tok::VarEnd, "", i);
          bool strip = src_[i] == '-';
          i += strip ? 3 : 2;
          if (strip) i = skip_space(i);
          line_starting_ = src_[i - 1] == '\n';
          pos_ = i;
          return;
        }
      }
      if (size_t n = match_float(i)) {
        std::string t;
        for (char c : src_.substr(i, n))
          if (c != '_') t += c;
        emit(Tok::Float, t, i).fval = std::stod(t);
        i += n;
      } else if (size_t n = match_int(i)) {
        lex_int(i, n);
        i += n;
      } else if (is_name_start(src_[i])) {
        size_t j = i;
        while (j < src_.size() && is_name_char(src_[j])) ++j;
        emit(Tok::Name, src_.substr(i, j - i), i);
        i = j;
      } else if (src_[i] == '\'' || src_[i] == '"') {
        i = lex_string(i);
      } else {
        i = lex_operator(i, balance);
      }
    }
  }

  // (?<!\.)(\d+_)*\d+((\.(\d+_)*\d+)?e[+\-]?(\d+_)*\d+|\.(\d+_)*\d+)
  size_t match_float(size_t i) const {
    if (i > 0 && src_[i - 1] == '.') return 0;
    auto digits = [&](size_t j) {  // (\d+_)*\d+ : returns end or npos
      if (j >= src_.size() || !is_digit(src_[j])) return std::string::npos;
      while (j < src_.size()) {
        if (is_digit(src_[j])) {
          ++j;
        } else if (src_[j] == '_' && j + 1 < src_.size() && is_digit(src_[j + 1])) {
          ++j;
        } else {
          break;
        }
      }
      return j;
    };
    size_t j = digits(i);
    if (j == std::string::npos) return 0;
    size_t frac = std::string::npos;
    if (j < src_.size() && src_[j] == '.') frac = digits(j + 1);
    size_t k = frac != std::string::npos ? frac : j;
    if (k < src_.size() && (src_[k] == 'e' || src_[k] == 'E')) {
      size_t m = k + 1;
      if (m < src_.size() && (src_[m] == '+' || src_[m] == '-')) ++m;
      size_t e = digits(m);
      if (e != std::string::npos) return e - i;
    }
    return frac != std::string::npos ? frac - i : 0;
  }

  // 0b.., 0o.., 0x.., [1-9](_?\d)*, 0(_?0)*
  size_t match_int(size_t i) const {
    if (!is_digit(src_[i])) return 0;
    auto run = [&](size_t j, auto ok) {
      size_t start = j;
      while (j < src_.size()) {
        if (ok(src_[j])) {
          ++j;
        } else if (src_[j] == '_' && j + 1 < src_.size() && ok(src_[j + 1])) {
          ++j;
        } else {
          break;
        }
      }
      return j - start;
    };
    if (src_[i] == '0' && i + 1 < src_.size()) {
      char b = static_cast<char>(std::tolower(static_cast<unsigned char>(src_[i + 1])));
      auto prefixed = [&](auto ok) {
        size_t j = i + 2;
        if (j < src_.size() && src_[j] == '_') ++j;  // (_?[digits])+
        size_t n = run(j, ok);
        return n ? j + n - i : 0;
      };
      if (b == 'b') return prefixed([](char c) { return c == '0' || c == '1'; });
      if (b == 'o') return prefixed([](char c) { return c >= '0' && c <= '7'; });
      if (b == 'x') return prefixed([](char c) { return std::isxdigit((unsigned char)c) != 0; });
    }
    if (src_[i] == '0') return 1 + run(i + 1, [](char c) { return c == '0'; });
    return run(i, [](char c) { return is_digit(c); });
  }

  void lex_int(size_t i, size_t n) {
    std::string t;
    for (char c : src_.substr(i, n))
      if (c != '_') t += c;
    int base = 10;
    size_t skip = 0;
    if (t.size() > 1 && t[0] == '0' && std::isalpha(static_cast<unsigned char>(t[1]))) {
      char b = static_cast<char>(std::tolower(static_cast<unsigned char>(t[1])));
      base = b == 'b' ? 2 : b == 'o' ? 8 : 16;
      skip = 2;
    }
    try {
      emit(Tok::Int, t, i).ival = std::stoll(t.substr(skip), nullptr, base);
    } catch (const std::out_of_range&) {
      error(i, "integer literal " + t + " does not fit in 64 bits");
    }
  }

  size_t lex_string(size_t i) {
    char quote = src_[i];
    size_t j = i + 1;
    while (j < src_.size() && src_[j] != quote) j += src_[j] == '\\' ? 2 : 1;
    if (j >= src_.size()) error(i, "unterminated string literal");
    emit(Tok::String, unescape(i + 1, j), i);
    return j + 1;
  }

  // Python's unicode-escape decoding, as jinja2 applies it to string literals.
  std::string unescape(size_t b, size_t e) const {
    std::string out;
    auto hex = [&](size_t& k, int n) {
      char32_t v = 0;
      for (int d = 0; d < n; ++d, ++k) {
        if (k >= e || !std::isxdigit(static_cast<unsigned char>(src_[k])))
          error(b, fmt::format("truncated escape in string literal: expected {} hex digits", n));
        v = v * 16 + static_cast<char32_t>(std::stoi(std::string(1, src_[k]), nullptr, 16));
      }
      return v;
    };
    for (size_t k = b; k < e;) {
      if (src_[k] != '\\' || k + 1 >= e) {
        out += src_[k++];
        continue;
      }
      char c = src_[k + 1];
      k += 2;
      switch (c) {
        case '\n':
          break;
        case '\\':
          out += '\\';
          break;
        case '\'':
          out += '\'';
          break;
        case '"':
          out += '"';
          break;
        case 'a':
          out += '\a';
          break;
        case 'b':
          out += '\b';
          break;
        case 'f':
          out += '\f';
          break;
        case 'n':
          out += '\n';
          break;
        case 'r':
          out += '\r';
          break;
        case 't':
          out += '\t';
          break;
        case 'v':
          out += '\v';
          break;
        case 'x':
          utf8::append(out, hex(k, 2));
          break;
        case 'u':
          utf8::append(out, hex(k, 4));
          break;
        case 'U':
          utf8::append(out, hex(k, 8));
          break;
        default:
          if (c >= '0' && c <= '7') {
            char32_t v = c - '0';
            for (int d = 0; d < 2 && k < e && src_[k] >= '0' && src_[k] <= '7'; ++d, ++k)
              v = v * 8 + (src_[k] - '0');
            utf8::append(out, v);
          } else {
            out += '\\';
            out += c;
          }
      }
    }
    return out;
  }

  size_t lex_operator(size_t i, std::string& balance) {
    static constexpr std::string_view kOps[] = {"**", "//", "==", "!=", ">=", "<=", "+", "-", "/",
                                                "*",  "%",  "~",  "[",  "]",  "(",  ")", "{", "}",
                                                ">",  "<",  "=",  ".",  ":",  "|",  ",", ";"};
    for (std::string_view op : kOps) {
      if (!starts(i, op)) continue;
      char c = op[0];
      if (op.size() == 1 && (c == '(' || c == '[' || c == '{')) {
        balance += c == '(' ? ')' : c == '[' ? ']' : '}';
      } else if (op.size() == 1 && (c == ')' || c == ']' || c == '}')) {
        if (balance.empty()) error(i, fmt::format("unexpected '{}'", c));
        if (balance.back() != c)
          error(i, fmt::format("unexpected '{}', expected '{}'", c, balance.back()));
        balance.pop_back();
      }
      emit(Tok::Op, std::string(op), i);
      return i + op.size();
    }
    size_t j = i;
    char32_t c = utf8::next(src_, j);
    std::string ch;
    utf8::append(ch, c);
    error(i, fmt::format("unexpected character '{}'", ch));
  }

  std::string src_;
  const std::string& name_;
  std::vector<size_t> line_starts_;
  std::vector<Token> out_;
  size_t pos_ = 0;
  bool line_starting_ = true;
};

}  // namespace

std::vector<Token> tokenize(std::string_view source, const std::string& name) {
  return Lexer(source, name).run();
}

std::string describe(const Token& t) {
  switch (t.type) {
    case Tok::Data:
      return "template data";
    case Tok::VarBegin:
      return "'{{'";
    case Tok::VarEnd:
      return "'}}'";
    case Tok::BlockBegin:
      return "'{%'";
    case Tok::BlockEnd:
      return "'%}'";
    case Tok::Name:
      return "'" + t.text + "'";
    case Tok::String:
      return "string literal";
    case Tok::Int:
    case Tok::Float:
      return "number " + t.text;
    case Tok::Op:
      return "'" + t.text + "'";
    case Tok::Eof:
      return "end of template";
  }
  return "?";
}

}  // namespace bigmoe::jinja
