// Helpers shared by the model tests: fixture paths, reference loading, row-wise comparison,
// the message of an expected error.
#pragma once
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "util/error.h"
#include "util/npy.h"

namespace bigmoe::test {

// The fixtures folder: $BIGMOE_FIXTURES when set (tests run from a copy of the tree, e.g. on
// the GPU machine), else the source tree's.
inline std::filesystem::path fixture(const std::string& name) {
  const char* env = std::getenv("BIGMOE_FIXTURES");
  return std::filesystem::path(env && *env ? env : BIGMOE_FIXTURES) / name;
}

struct Reference {
  std::vector<int> prompt, greedy;
  NpyArray logits, mtp_logits;
};

inline Reference load_reference(const std::string& name) {
  Reference r;
  std::ifstream in(fixture(name) / "ref.json");
  auto j = nlohmann::json::parse(in);
  r.prompt = j.at("prompt_ids").get<std::vector<int>>();
  r.greedy = j.at("greedy_ids").get<std::vector<int>>();
  r.logits = read_npy(fixture(name) / "logits.npy");
  r.mtp_logits = read_npy(fixture(name) / "mtp_logits.npy");
  return r;
}

// Largest per-row relative error: max|a - b| / max|b| over each row of width n.
inline double max_row_rel_err(const float* a, const float* b, size_t rows, size_t n) {
  double worst = 0;
  for (size_t r = 0; r < rows; ++r) {
    double num = 0, den = 0;
    for (size_t i = 0; i < n; ++i) {
      num = std::max(num, std::abs(double(a[r * n + i]) - double(b[r * n + i])));
      den = std::max(den, std::abs(double(b[r * n + i])));
    }
    worst = std::max(worst, num / std::max(den, 1e-30));
  }
  return worst;
}

// The message of the bigmoe::Error f() throws, or "" when it throws none.
template <typename F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

}  // namespace bigmoe::test
