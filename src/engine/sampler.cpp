#include "engine/sampler.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "util/error.h"

namespace bigmoe {

int argmax(const float* v, int n) {
  int best = 0;
  for (int i = 1; i < n; ++i)
    if (v[i] > v[best]) best = i;
  return best;
}

int Sampler::sample(const float* logits, int vocab) {
  if (cfg_.temperature <= 0.0) return argmax(logits, vocab);
  if (cfg_.top_p <= 0.0 || cfg_.top_p > 1.0) fail("top_p {} must be in (0, 1]", cfg_.top_p);
  std::vector<int> idx(vocab);
  std::iota(idx.begin(), idx.end(), 0);
  std::sort(idx.begin(), idx.end(), [&](int a, int b) { return logits[a] > logits[b]; });
  int n = cfg_.top_k > 0 ? std::min(cfg_.top_k, vocab) : vocab;
  std::vector<double> p(n);
  double mx = logits[idx[0]], sum = 0;
  for (int i = 0; i < n; ++i) sum += (p[i] = std::exp((logits[idx[i]] - mx) / cfg_.temperature));
  // top-p: keep the smallest prefix whose mass reaches top_p.
  double acc = 0;
  int keep = n;
  for (int i = 0; i < n; ++i) {
    acc += p[i] / sum;
    if (acc >= cfg_.top_p) { keep = i + 1; break; }
  }
  std::discrete_distribution<int> dist(p.begin(), p.begin() + keep);
  return idx[dist(rng_)];
}

}  // namespace bigmoe
