#include "text/jinja_unicode.h"

namespace bigmoe::jinja::utf8 {

char32_t next(std::string_view s, size_t& i) {
  auto byte = [&](size_t k) { return static_cast<unsigned char>(s[k]); };
  unsigned char c = byte(i);
  int n = c < 0x80             ? 0
          : (c & 0xe0) == 0xc0 ? 1
          : (c & 0xf0) == 0xe0 ? 2
          : (c & 0xf8) == 0xf0 ? 3
                               : -1;
  if (n <= 0 || i + n > s.size() - 1) {  // ASCII, or a malformed/truncated lead byte
    ++i;
    return c;
  }
  char32_t cp = c & (0x3f >> n);
  for (int k = 1; k <= n; ++k) {
    if ((byte(i + k) & 0xc0) != 0x80) {
      ++i;
      return c;
    }
    cp = (cp << 6) | (byte(i + k) & 0x3f);
  }
  i += n + 1;
  return cp;
}

void append(std::string& out, char32_t cp) {
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xc0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3f));
  } else if (cp < 0x10000) {
    out += static_cast<char>(0xe0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3f));
    out += static_cast<char>(0x80 | (cp & 0x3f));
  } else {
    out += static_cast<char>(0xf0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3f));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3f));
    out += static_cast<char>(0x80 | (cp & 0x3f));
  }
}

std::u32string decode(std::string_view s) {
  std::u32string out;
  out.reserve(s.size());
  for (size_t i = 0; i < s.size();) out += next(s, i);
  return out;
}

std::string encode(std::u32string_view s) {
  std::string out;
  out.reserve(s.size());
  for (char32_t c : s) append(out, c);
  return out;
}

size_t length(std::string_view s) {
  size_t n = 0;
  for (size_t i = 0; i < s.size();) {
    next(s, i);
    ++n;
  }
  return n;
}

bool is_space(char32_t c) {
  return (c >= 0x09 && c <= 0x0d) || (c >= 0x1c && c <= 0x20) || c == 0x85 || c == 0xa0 ||
         c == 0x1680 || (c >= 0x2000 && c <= 0x200a) || c == 0x2028 || c == 0x2029 || c == 0x202f ||
         c == 0x205f || c == 0x3000;
}

size_t space_at(std::string_view s, size_t i) {
  if (i >= s.size()) return 0;
  size_t j = i;
  return is_space(next(s, j)) ? j - i : 0;
}

size_t space_before(std::string_view s, size_t end) {
  if (end == 0) return 0;
  size_t start = end - 1;  // back up to the lead byte
  while (start > 0 && end - start < 4 && (static_cast<unsigned char>(s[start]) & 0xc0) == 0x80)
    --start;
  size_t j = start;
  char32_t c = next(s, j);
  return (j == end && is_space(c)) ? end - start : 0;
}

std::string_view strip(std::string_view s, bool left, bool right) {
  size_t b = 0, e = s.size();
  if (left)
    while (size_t n = space_at(s, b)) b += n;
  if (right)
    while (e > b) {
      size_t n = space_before(s, e);
      if (!n) break;
      e -= n;
    }
  return s.substr(b, e - b);
}

std::string_view strip_chars(std::string_view s, std::string_view chars, bool left, bool right) {
  std::u32string set = decode(chars);
  auto in_set = [&](char32_t c) { return set.find(c) != std::u32string::npos; };
  size_t b = 0, e = s.size();
  if (left)
    while (b < e) {
      size_t j = b;
      if (!in_set(next(s, j))) break;
      b = j;
    }
  if (right)
    while (e > b) {
      size_t start = e - 1;
      while (start > b && (static_cast<unsigned char>(s[start]) & 0xc0) == 0x80) --start;
      size_t j = start;
      if (!in_set(next(s, j))) break;
      e = start;
    }
  return s.substr(b, e - b);
}

char32_t to_lower(char32_t c) {
  if (c < 0x80) return (c >= 'A' && c <= 'Z') ? c + 32 : c;
  if (c >= 0xc0 && c <= 0xde && c != 0xd7) return c + 32;
  if ((c >= 0x100 && c <= 0x137 && c != 0x130) || (c >= 0x14a && c <= 0x177))
    return (c % 2 == 0) ? c + 1 : c;
  if ((c >= 0x139 && c <= 0x148) || (c >= 0x179 && c <= 0x17e)) return (c % 2 == 1) ? c + 1 : c;
  if (c == 0x178) return 0xff;
  if (c >= 0x391 && c <= 0x3a9 && c != 0x3a2) return c + 32;
  if (c == 0x386) return 0x3ac;
  if (c >= 0x388 && c <= 0x38a) return c + 37;
  if (c == 0x38c) return 0x3cc;
  if (c == 0x38e || c == 0x38f) return c + 63;
  if (c >= 0x410 && c <= 0x42f) return c + 32;
  if (c >= 0x400 && c <= 0x40f) return c + 80;
  return c;
}

char32_t to_upper(char32_t c) {
  if (c < 0x80) return (c >= 'a' && c <= 'z') ? c - 32 : c;
  if (c >= 0xe0 && c <= 0xfe && c != 0xf7) return c - 32;
  if (c == 0xff) return 0x178;
  if (c == 0xb5) return 0x39c;
  if (c == 0x131) return 'I';
  if (c == 0x17f) return 'S';
  if ((c >= 0x101 && c <= 0x137 && c != 0x131) || (c >= 0x14b && c <= 0x177))
    return (c % 2 == 1) ? c - 1 : c;
  if ((c >= 0x13a && c <= 0x148) || (c >= 0x17a && c <= 0x17e)) return (c % 2 == 0) ? c - 1 : c;
  if (c >= 0x3b1 && c <= 0x3c9) return c == 0x3c2 ? 0x3a3 : c - 32;
  if (c == 0x3ac) return 0x386;
  if (c >= 0x3ad && c <= 0x3af) return c - 37;
  if (c == 0x3cc) return 0x38c;
  if (c == 0x3cd || c == 0x3ce) return c - 63;
  if (c >= 0x430 && c <= 0x44f) return c - 32;
  if (c >= 0x450 && c <= 0x45f) return c - 80;
  return c;
}

bool is_cased(char32_t c) { return c == 0xdf || to_upper(c) != c || to_lower(c) != c; }

template <typename F>
static std::string map_cp(std::string_view s, F f) {
  std::string out;
  out.reserve(s.size());
  for (size_t i = 0; i < s.size();) append(out, f(next(s, i)));
  return out;
}

std::string upper(std::string_view s) { return map_cp(s, to_upper); }
std::string lower(std::string_view s) { return map_cp(s, to_lower); }

std::string capitalize(std::string_view s) {
  bool first = true;
  return map_cp(s, [&](char32_t c) {
    char32_t r = first ? to_upper(c) : to_lower(c);
    first = false;
    return r;
  });
}

std::string title(std::string_view s) {
  bool prev_cased = false;
  return map_cp(s, [&](char32_t c) {
    char32_t r = prev_cased ? to_lower(c) : to_upper(c);
    prev_cased = is_cased(r);
    return r;
  });
}

}  // namespace bigmoe::jinja::utf8
