// CPU reference ops: simple float32 code that is the executable specification every faster
// path is tested against. Dot products accumulate in double so the reference is as exact as
// float32 storage allows.
#pragma once
#include <cmath>
#include <vector>

#include "model/weights.h"

namespace bigmoe::cpu {

// y[t, :] = W x[t, :] for t < T.  x [T, W.in], y [T, W.out].
void linear(const Linear& W, const float* x, int T, float* y);
// Rows [r0, r0+n) of W only: y[t, :n] = W[r0:r0+n] x[t].
void linear_rows(const Linear& W, int r0, int n, const float* x, int T, float* y);

// y = w ⊙ x / sqrt(mean(x²) + eps) over n elements (y may alias x).
void rms_norm(const float* x, const float* w, int n, double eps, float* y);
// y = (x - mean) / sqrt(var + eps) ⊙ w + b (biased variance, as torch.nn.LayerNorm).
void layer_norm(const float* x, const float* w, const float* b, int n, double eps, float* y);

double dot(const float* a, const float* b, int n);
inline float silu(float x) { return x / (1.0f + std::exp(-x)); }

// Rotary embedding tables for one model: inverse frequencies and the cos/sin scale
// (yarn's attention factor), computed as transformers computes them.
struct Rope {
  int dim = 0;                   // rotated dims
  bool interleave = false;       // pairs (2j, 2j+1) instead of halves (j, j + dim/2)
  std::vector<float> inv_freq;   // [dim/2]
  float attention_factor = 1.0f;
  // Rotates x[0:dim] in place for position pos.
  void apply(float* x, int pos) const;
};

// Indices of the k largest values of v[0:n] (k <= n), in descending value order.
std::vector<int> topk(const float* v, int n, int k);

}  // namespace bigmoe::cpu
