// Token sampling: greedy, or temperature with top-k / top-p, from a seeded generator.
#pragma once
#include <cstdint>
#include <random>

namespace bigmoe {

struct SamplerConfig {
  double temperature = 0.0;  // <= 0: greedy
  int top_k = 0;             // 0: off
  double top_p = 1.0;        // 1: off
  uint64_t seed = 0;
};

class Sampler {
 public:
  explicit Sampler(const SamplerConfig& c) : cfg_(c), rng_(c.seed) {}
  int sample(const float* logits, int vocab);

 private:
  SamplerConfig cfg_;
  std::mt19937_64 rng_;
};

int argmax(const float* v, int n);

}  // namespace bigmoe
