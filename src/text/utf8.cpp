#include "text/utf8.h"

namespace bigmoe::utf8 {

namespace {
constexpr std::string_view kReplacement = "\xEF\xBF\xBD";
}

Scan scan(std::string_view s, size_t pos) {
  const auto b0 = static_cast<uint8_t>(s[pos]);
  if (b0 < 0x80) return {Scan::kChar, 1};
  size_t need;
  uint8_t lo = 0x80, hi = 0xBF;  // allowed range of the second byte (Unicode Table 3-7)
  if (b0 >= 0xC2 && b0 <= 0xDF) {
    need = 2;
  } else if (b0 >= 0xE0 && b0 <= 0xEF) {
    need = 3;
    if (b0 == 0xE0) lo = 0xA0;   // no overlongs
    if (b0 == 0xED) hi = 0x9F;   // no surrogates
  } else if (b0 >= 0xF0 && b0 <= 0xF4) {
    need = 4;
    if (b0 == 0xF0) lo = 0x90;   // no overlongs
    if (b0 == 0xF4) hi = 0x8F;   // nothing above U+10FFFF
  } else {
    return {Scan::kInvalid, 1};
  }
  for (size_t i = 1; i < need; ++i) {
    if (pos + i >= s.size()) return {Scan::kTruncated, i};
    const auto b = static_cast<uint8_t>(s[pos + i]);
    const uint8_t l = i == 1 ? lo : 0x80, h = i == 1 ? hi : 0xBF;
    if (b < l || b > h) return {Scan::kInvalid, i};
  }
  return {Scan::kChar, need};
}

size_t valid_prefix(std::string_view s) {
  size_t pos = 0;
  while (pos < s.size()) {
    const Scan sc = scan(s, pos);
    if (sc.kind != Scan::kChar) break;
    pos += sc.len;
  }
  return pos;
}

bool is_valid(std::string_view s) { return valid_prefix(s) == s.size(); }

std::string sanitize(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  size_t pos = 0;
  while (pos < s.size()) {
    const Scan sc = scan(s, pos);
    if (sc.kind == Scan::kChar) {
      out.append(s.substr(pos, sc.len));
    } else {
      out.append(kReplacement);
    }
    pos += sc.len;
  }
  return out;
}

void append(std::string& out, uint32_t cp) {
  if (cp < 0x80) {
    out.push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out.push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out.push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out.push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

std::string Assembler::push(std::string_view bytes) {
  pending_.append(bytes);
  std::string out;
  size_t pos = 0;
  while (pos < pending_.size()) {
    const Scan sc = scan(pending_, pos);
    if (sc.kind == Scan::kTruncated) break;  // the next bytes decide what these are
    if (sc.kind == Scan::kChar) {
      out.append(pending_, pos, sc.len);
    } else {
      out.append(kReplacement);
    }
    pos += sc.len;
  }
  pending_.erase(0, pos);
  return out;
}

std::string Assembler::flush() {
  std::string out = pending_.empty() ? std::string() : std::string(kReplacement);
  pending_.clear();
  return out;
}

}  // namespace bigmoe::utf8
