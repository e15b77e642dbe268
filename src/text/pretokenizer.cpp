#include "text/pretokenizer.h"

#include <algorithm>

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <unicode/normalizer2.h>
#include <unicode/unistr.h>

#include "text/utf8.h"
#include "util/error.h"

namespace bigmoe {

struct SplitRegex::Code {
  pcre2_code* code = nullptr;
  ~Code() { pcre2_code_free(code); }
};

namespace {

std::string pcre2_message(int err) {
  PCRE2_UCHAR buf[256];
  pcre2_get_error_message(err, buf, sizeof buf);
  return reinterpret_cast<const char*>(buf);
}

struct MatchData {
  pcre2_match_data* md;
  explicit MatchData(const pcre2_code* code) : md(pcre2_match_data_create_from_pattern(code, nullptr)) {
    if (!md) fail("tokenizer: out of memory allocating PCRE2 match data");
  }
  ~MatchData() { pcre2_match_data_free(md); }
};

}  // namespace

SplitRegex::SplitRegex(std::string_view pattern, bool literal, std::string_view what) : what_(what) {
  // Oniguruma (HF tokenizers) and PCRE2 agree on everything these patterns use: \p{L},
  // \p{N}, (?i:...), lookahead, and with UCP \s is Unicode white space (U+0085 included).
  // PCRE2_LITERAL takes no UCP; a literal has nothing for it to change.
  const uint32_t opts = PCRE2_UTF | (literal ? PCRE2_LITERAL : PCRE2_UCP);
  int err = 0;
  PCRE2_SIZE at = 0;
  auto code = std::make_shared<Code>();
  code->code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(), opts,
                             &err, &at, nullptr);
  if (!code->code) {
    fail("tokenizer: {} pattern '{}' does not compile with PCRE2 at offset {}: {}", what, pattern,
         at, pcre2_message(err));
  }
  // JIT is only speed; a pattern it cannot take runs in the interpreter with the same result.
  pcre2_jit_compile(code->code, PCRE2_JIT_COMPLETE);
  code_ = std::move(code);
}

std::vector<std::pair<size_t, size_t>> SplitRegex::find_all(std::string_view s) const {
  std::vector<std::pair<size_t, size_t>> out;
  MatchData m(code_->code);
  const auto* subject = reinterpret_cast<PCRE2_SPTR>(s.data());
  size_t start = 0;
  while (start <= s.size()) {
    const int rc = pcre2_match(code_->code, subject, s.size(), start, PCRE2_NO_UTF_CHECK, m.md, nullptr);
    if (rc == PCRE2_ERROR_NOMATCH) break;
    if (rc < 0) {
      fail("tokenizer: {} pattern failed on a {}-byte piece of text: {}", what_, s.size(),
           pcre2_message(rc));
    }
    const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(m.md);
    out.emplace_back(ov[0], ov[1]);
    if (ov[1] > ov[0]) {
      start = ov[1];
    } else {
      if (ov[1] >= s.size()) break;
      start = ov[1] + utf8::scan(s, ov[1]).len;
    }
  }
  return out;
}

SplitBehavior parse_split_behavior(std::string_view name) {
  if (name == "Removed") return SplitBehavior::kRemoved;
  if (name == "Isolated") return SplitBehavior::kIsolated;
  if (name == "MergedWithPrevious") return SplitBehavior::kMergedWithPrevious;
  if (name == "MergedWithNext") return SplitBehavior::kMergedWithNext;
  if (name == "Contiguous") return SplitBehavior::kContiguous;
  fail("tokenizer: unknown Split behavior '{}' (expected Removed, Isolated, MergedWithPrevious, "
       "MergedWithNext or Contiguous)", name);
}

void PreTokenizer::add_split(std::shared_ptr<const SplitRegex> re, SplitBehavior behavior, bool invert) {
  steps_.push_back({std::move(re), behavior, invert});
}

void PreTokenizer::add_prefix_space() { steps_.push_back({nullptr, SplitBehavior::kIsolated, false}); }

namespace {

struct Segment {
  size_t start, end;
  bool match;
};

// HF tokenizers' Pattern::find_matches + NormalizedString::split, on one piece.
void split_piece(const std::string& piece, const SplitRegex& re, SplitBehavior behavior, bool invert,
                 std::vector<std::string>& out) {
  std::vector<Segment> segs;
  if (piece.empty()) {
    segs.push_back({0, 0, false});
  } else {
    size_t prev = 0;
    for (auto [s, e] : re.find_all(piece)) {
      if (s != prev) segs.push_back({prev, s, false});
      segs.push_back({s, e, true});
      prev = e;
    }
    if (prev != piece.size()) segs.push_back({prev, piece.size(), false});
  }
  if (invert) {
    for (auto& g : segs) g.match = !g.match;
  }

  std::vector<Segment> kept;
  switch (behavior) {
    case SplitBehavior::kIsolated:
      kept = segs;
      break;
    case SplitBehavior::kRemoved:
      for (const auto& g : segs) {
        if (!g.match) kept.push_back(g);
      }
      break;
    case SplitBehavior::kMergedWithPrevious: {
      bool prev_match = false;
      for (const auto& g : segs) {
        if (g.match && !prev_match && !kept.empty()) {
          kept.back().end = g.end;
        } else {
          kept.push_back(g);
        }
        prev_match = g.match;
      }
      break;
    }
    case SplitBehavior::kMergedWithNext: {
      bool prev_match = false;
      for (auto it = segs.rbegin(); it != segs.rend(); ++it) {
        if (it->match && !prev_match && !kept.empty()) {
          kept.back().start = it->start;
        } else {
          kept.push_back(*it);
        }
        prev_match = it->match;
      }
      std::reverse(kept.begin(), kept.end());
      break;
    }
    case SplitBehavior::kContiguous: {
      bool prev_match = false;
      for (const auto& g : segs) {
        if (g.match == prev_match && !kept.empty()) {
          kept.back().end = g.end;
        } else {
          kept.push_back(g);
        }
        prev_match = g.match;
      }
      break;
    }
  }
  for (const auto& g : kept) {
    if (g.end > g.start) out.push_back(piece.substr(g.start, g.end - g.start));
  }
}

}  // namespace

std::vector<std::string> PreTokenizer::split(std::string_view text) const {
  // Like HF's PreTokenizedString, empty pieces vanish at every step.
  std::vector<std::string> pieces;
  if (!text.empty()) pieces.emplace_back(text);
  for (const Step& step : steps_) {
    std::vector<std::string> next;
    next.reserve(pieces.size());
    for (auto& p : pieces) {
      if (!step.re) {
        if (p[0] != ' ') p.insert(p.begin(), ' ');
        next.push_back(std::move(p));
      } else {
        split_piece(p, *step.re, step.behavior, step.invert, next);
      }
    }
    pieces = std::move(next);
  }
  return pieces;
}

std::string nfc_normalize(std::string_view text) {
  UErrorCode status = U_ZERO_ERROR;
  const icu::Normalizer2* n = icu::Normalizer2::getNFCInstance(status);
  if (U_FAILURE(status)) fail("tokenizer: ICU NFC normalizer unavailable: {}", u_errorName(status));
  const auto in = icu::UnicodeString::fromUTF8(icu::StringPiece(text.data(), static_cast<int32_t>(text.size())));
  if (n->isNormalized(in, status) && U_SUCCESS(status)) return std::string(text);
  status = U_ZERO_ERROR;
  const icu::UnicodeString out = n->normalize(in, status);
  if (U_FAILURE(status)) fail("tokenizer: NFC normalization failed: {}", u_errorName(status));
  std::string res;
  out.toUTF8String(res);
  return res;
}

}  // namespace bigmoe
