#include "text/tokenizer.h"

#include <algorithm>
#include <queue>

#include "util/error.h"

namespace bigmoe {

namespace {

// GPT-2's byte <-> unicode table: printable Latin-1 bytes stand for themselves, the other 68
// bytes are shifted to U+0100.. so every byte has a visible, non-space character.
struct ByteLevelTable {
  std::string byte_to_char[256];                   // UTF-8 of the character standing for a byte
  std::unordered_map<uint32_t, uint8_t> char_to_byte;
  ByteLevelTable() {
    uint32_t shifted = 256;
    for (uint32_t b = 0; b < 256; ++b) {
      const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE);
      const uint32_t cp = printable ? b : shifted++;
      utf8::append(byte_to_char[b], cp);
      char_to_byte[cp] = static_cast<uint8_t>(b);
    }
  }
};

const ByteLevelTable& byte_level() {
  static const ByteLevelTable t;
  return t;
}

uint32_t decode_cp(std::string_view s, size_t pos, size_t len) {
  const auto b = [&](size_t i) { return static_cast<uint32_t>(static_cast<uint8_t>(s[pos + i])); };
  switch (len) {
    case 1: return b(0);
    case 2: return ((b(0) & 0x1F) << 6) | (b(1) & 0x3F);
    case 3: return ((b(0) & 0x0F) << 12) | ((b(1) & 0x3F) << 6) | (b(2) & 0x3F);
    default: return ((b(0) & 0x07) << 18) | ((b(1) & 0x3F) << 12) | ((b(2) & 0x3F) << 6) | (b(3) & 0x3F);
  }
}

// HF ByteLevel decoder, per token: map every character back to its byte; a token holding a
// character outside the table (an added token such as "<think>" never does, "你好" does) is
// taken verbatim.
std::string byte_level_decode(std::string_view text) {
  const auto& t = byte_level();
  std::string out;
  for (size_t pos = 0; pos < text.size();) {
    const utf8::Scan sc = utf8::scan(text, pos);
    if (sc.kind != utf8::Scan::kChar) return std::string(text);
    auto it = t.char_to_byte.find(decode_cp(text, pos, sc.len));
    if (it == t.char_to_byte.end()) return std::string(text);
    out.push_back(static_cast<char>(it->second));
    pos += sc.len;
  }
  return out;
}

// Unicode White_Space (Rust's char::is_whitespace), for added tokens' lstrip/rstrip.
bool is_space(uint32_t cp) {
  return (cp >= 0x09 && cp <= 0x0D) || cp == 0x20 || cp == 0x85 || cp == 0xA0 || cp == 0x1680 ||
         (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 || cp == 0x2029 || cp == 0x202F ||
         cp == 0x205F || cp == 0x3000;
}

// Bytes of white space at the start (or end) of s.
size_t leading_space(std::string_view s) {
  size_t pos = 0;
  while (pos < s.size()) {
    const utf8::Scan sc = utf8::scan(s, pos);
    if (sc.kind != utf8::Scan::kChar || !is_space(decode_cp(s, pos, sc.len))) break;
    pos += sc.len;
  }
  return pos;
}

size_t trailing_space(std::string_view s) {
  size_t run_start = s.size(), pos = 0;
  bool in_run = false;
  while (pos < s.size()) {
    const utf8::Scan sc = utf8::scan(s, pos);
    const bool sp = sc.kind == utf8::Scan::kChar && is_space(decode_cp(s, pos, sc.len));
    if (sp && !in_run) run_start = pos;
    in_run = sp;
    pos += sc.len;
  }
  return in_run ? s.size() - run_start : 0;
}

uint64_t pair_key(int a, int b) { return (static_cast<uint64_t>(a) << 32) | static_cast<uint32_t>(b); }

}  // namespace

void Tokenizer::add_token(int id, std::string text, bool added, bool special, std::string_view origin) {
  if (id < 0) fail("tokenizer: {}: token '{}' has negative id {}", origin, text, id);
  if (static_cast<size_t>(id) >= tokens_.size()) tokens_.resize(id + 1);
  Token& t = tokens_[id];
  if (t.present && t.text != text) {
    fail("tokenizer: {}: id {} is both '{}' and '{}'", origin, id, t.text, text);
  }
  t.text = std::move(text);
  t.added = t.added || added;
  t.special = t.special || special;
  t.present = true;
}

void Tokenizer::build(const std::vector<std::pair<std::string, std::string>>& merges,
                      std::string_view origin) {
  if (tokens_.empty()) fail("tokenizer: {}: the vocabulary is empty", origin);
  // Ordinary tokens first, so that an added token's text maps to the added id.
  for (int pass = 0; pass < 2; ++pass) {
    for (size_t id = 0; id < tokens_.size(); ++id) {
      const Token& t = tokens_[id];
      if (t.present && t.added == (pass == 1)) text_to_id_[t.text] = static_cast<int>(id);
    }
  }
  for (Token& t : tokens_) {
    if (t.present) t.bytes = byte_level_decode(t.text);
  }

  const auto& bl = byte_level();
  for (int b = 0; b < 256; ++b) {
    auto it = text_to_id_.find(bl.byte_to_char[b]);
    byte_token_[b] = it != text_to_id_.end() && !tokens_[it->second].added ? it->second : -1;
  }

  merges_.reserve(merges.size());
  for (size_t rank = 0; rank < merges.size(); ++rank) {
    const auto& [a, b] = merges[rank];
    const auto find = [&](const std::string& s) {
      auto it = text_to_id_.find(s);
      if (it == text_to_id_.end()) {
        fail("tokenizer: {}: merge #{} '{} {}' needs '{}', which is not in the vocabulary", origin,
             rank, a, b, s);
      }
      return it->second;
    };
    const int ia = find(a), ib = find(b), ir = find(a + b);
    merges_.emplace(pair_key(ia, ib), Merge{static_cast<int>(rank), ir});  // first rank wins
  }

  added_by_first_byte_.assign(256, {});
  for (size_t id = 0; id < tokens_.size(); ++id) {
    const Token& t = tokens_[id];
    if (t.present && t.added && !t.text.empty()) {
      added_by_first_byte_[static_cast<uint8_t>(t.text[0])].push_back(static_cast<int>(id));
    }
  }
  for (auto& bucket : added_by_first_byte_) {
    std::stable_sort(bucket.begin(), bucket.end(), [&](int x, int y) {
      return tokens_[x].text.size() > tokens_[y].text.size();
    });
  }
}

const Tokenizer::Token& Tokenizer::token(int id) const {
  if (id < 0 || id >= vocab_size() || !tokens_[id].present) {
    fail("tokenizer: token id {} is not in the vocabulary (size {})", id, vocab_size());
  }
  return tokens_[id];
}

const std::string& Tokenizer::token_text(int id) const { return token(id).text; }

bool Tokenizer::is_special(int id) const { return token(id).special; }

int Tokenizer::token_id(std::string_view text) const {
  auto it = text_to_id_.find(std::string(text));
  return it == text_to_id_.end() ? -1 : it->second;
}

// BPE on one word's bytes: repeatedly merge the adjacent pair of lowest rank, leftmost first
// on ties (HF's Word::merge_all). A heap over a linked list keeps it O(n log n), so a
// 10k-character run of one letter costs no more than 10k ordinary characters.
void Tokenizer::bpe(std::string_view word, std::vector<int>& out) const {
  if (ignore_merges_) {
    const auto& bl = byte_level();
    std::string text;
    for (char c : word) text += bl.byte_to_char[static_cast<uint8_t>(c)];
    auto it = text_to_id_.find(text);
    if (it != text_to_id_.end()) {
      out.push_back(it->second);
      return;
    }
  }

  struct Sym {
    int id, prev, next;
  };
  std::vector<Sym> syms;
  syms.reserve(word.size());
  for (char c : word) {
    int id = byte_token_[static_cast<uint8_t>(c)];
    // Only bytes that never occur in UTF-8 (0xC0, 0xF5.., ...) lack a token in real
    // vocabularies. HF maps them to unk; without one, say so rather than drop them.
    if (id < 0) id = unk_;
    if (id < 0) {
      fail("tokenizer: byte 0x{:02X} of the input has no token in this vocabulary and there is no "
           "unknown token (is the input valid UTF-8?)", static_cast<uint8_t>(c));
    }
    const int i = static_cast<int>(syms.size());
    syms.push_back({id, i - 1, i + 1});
  }
  if (syms.empty()) return;
  syms.back().next = -1;

  struct Cand {
    int rank, left, result;
    bool operator>(const Cand& o) const { return rank != o.rank ? rank > o.rank : left > o.left; }
  };
  std::priority_queue<Cand, std::vector<Cand>, std::greater<>> heap;
  const auto consider = [&](int left) {
    if (left < 0 || syms[left].next < 0) return;
    auto it = merges_.find(pair_key(syms[left].id, syms[syms[left].next].id));
    if (it != merges_.end()) heap.push({it->second.rank, left, it->second.result});
  };
  for (int i = 0; i + 1 < static_cast<int>(syms.size()); ++i) consider(i);

  while (!heap.empty()) {
    const Cand c = heap.top();
    heap.pop();
    Sym& l = syms[c.left];
    if (l.id < 0 || l.next < 0) continue;
    // Stale if either side has merged since: the pair now there must still merge into result.
    auto it = merges_.find(pair_key(l.id, syms[l.next].id));
    if (it == merges_.end() || it->second.result != c.result) continue;
    Sym& r = syms[l.next];
    l.id = c.result;
    r.id = -1;
    l.next = r.next;
    if (r.next >= 0) syms[r.next].prev = c.left;
    consider(l.prev);
    consider(c.left);
  }
  for (int i = 0; i >= 0; i = syms[i].next) out.push_back(syms[i].id);
}

// Text between added tokens: valid UTF-8 runs are normalized and pre-tokenized; bytes that
// are not UTF-8 cannot go through the regexes, so each run of them is a word of its own
// (byte-level BPE still has a token for every byte).
void Tokenizer::encode_fragment(std::string_view text, std::vector<int>& out) const {
  size_t pos = 0;
  while (pos < text.size()) {
    const size_t valid = utf8::valid_prefix(text.substr(pos));
    if (valid > 0) {
      std::string_view run = text.substr(pos, valid);
      std::string normalized;
      if (nfc_) {
        normalized = nfc_normalize(run);
        run = normalized;
      }
      for (const std::string& word : pre_.split(run)) bpe(word, out);
      pos += valid;
      continue;
    }
    size_t end = pos;
    while (end < text.size() && utf8::scan(text, end).kind != utf8::Scan::kChar) {
      end += utf8::scan(text, end).len;
    }
    bpe(text.substr(pos, end - pos), out);
    pos = end;
  }
}

std::vector<int> Tokenizer::encode(std::string_view text, bool parse_special) const {
  std::vector<int> out;
  size_t frag_start = 0, pos = 0;
  while (pos < text.size()) {
    int hit = -1;
    for (int id : added_by_first_byte_[static_cast<uint8_t>(text[pos])]) {
      const Token& t = tokens_[id];
      if ((parse_special || !t.special) && text.substr(pos).starts_with(t.text)) {
        hit = id;
        break;
      }
    }
    if (hit < 0) {
      ++pos;
      continue;
    }
    const Token& t = tokens_[hit];
    std::string_view before = text.substr(frag_start, pos - frag_start);
    if (t.lstrip) before.remove_suffix(trailing_space(before));
    encode_fragment(before, out);
    out.push_back(hit);
    pos += t.text.size();
    if (t.rstrip) pos += leading_space(text.substr(pos));
    frag_start = pos;
  }
  encode_fragment(text.substr(frag_start), out);
  return out;
}

std::string Tokenizer::decode(const std::vector<int>& ids) const {
  std::string bytes;
  for (int id : ids) bytes += token(id).bytes;
  return utf8::sanitize(bytes);
}

std::string Tokenizer::StreamDecoder::push(int id) { return asm_.push(tok_->token(id).bytes); }

std::string Tokenizer::StreamDecoder::flush() { return asm_.flush(); }

}  // namespace bigmoe
