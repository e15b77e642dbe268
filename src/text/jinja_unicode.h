// UTF-8 helpers for the Jinja evaluator: Python's str works on code points, our strings are
// UTF-8 bytes, so indexing, slicing, len(), strip() and case mapping go through these.
#pragma once
#include <cstddef>
#include <string>
#include <string_view>
#include <vector>

namespace bigmoe::jinja::utf8 {

// Decodes one code point at s[i], advancing i. Malformed bytes decode as themselves (Latin-1),
// so nothing is lost; inputs come from nlohmann::json, which validates UTF-8 already.
char32_t next(std::string_view s, size_t& i);
void append(std::string& out, char32_t cp);
std::u32string decode(std::string_view s);
std::string encode(std::u32string_view s);
size_t length(std::string_view s);  // in code points, like Python len(str)

// Python's str.isspace() set, which is also what str.strip()/split() and regex \s use.
bool is_space(char32_t c);
// Byte length of the whitespace code point at s[i], 0 if none there.
size_t space_at(std::string_view s, size_t i);
// Byte length of the whitespace code point ending at s[end - 1], 0 if none.
size_t space_before(std::string_view s, size_t end);

std::string_view strip(std::string_view s, bool left, bool right);
// strip(chars): removes any code point in chars from the chosen ends.
std::string_view strip_chars(std::string_view s, std::string_view chars, bool left, bool right);

// Simple case mapping for ASCII, Latin-1, Latin Extended-A, Greek and Cyrillic; other code
// points are returned unchanged (Python maps more scripts, and ß -> "SS" is not done).
char32_t to_upper(char32_t c);
char32_t to_lower(char32_t c);
bool is_cased(char32_t c);  // has an upper or lower counterpart in the tables above
std::string upper(std::string_view s);
std::string lower(std::string_view s);
std::string capitalize(std::string_view s);  // Python str.capitalize
std::string title(std::string_view s);       // Python str.title

}  // namespace bigmoe::jinja::utf8
