#include "backend/cpu/ref_ops.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "tensor/quant_act.h"

namespace bigmoe::cpu {

double dot(const float* a, const float* b, int n) {
  double s = 0;
  for (int i = 0; i < n; ++i) s += double(a[i]) * double(b[i]);
  return s;
}

void linear_rows(const Linear& W, int r0, int n, const float* x, int T, float* y) {
  if (W.g) {
    const GgmlType act = act_type_for(W.g->type);
    if (act != GgmlType::F32) {
      // Q4/Q5/Q8 weights: quantize each activation row once to 8 bits per block and use
      // integer dots, as llama.cpp's CPU backend does (quant_act.h).
      const size_t arow = act_row_size(act, W.in);
      std::vector<uint8_t> xq(size_t(T) * arow);
      for (int t = 0; t < T; ++t) quantize_act(act, x + size_t(t) * W.in, &xq[size_t(t) * arow], W.in);
#pragma omp parallel for schedule(static)
      for (int o = 0; o < n; ++o) {
        const uint8_t* row = W.g->data + W.g_offset + size_t(r0 + o) * W.row_bytes;
        for (int t = 0; t < T; ++t) y[size_t(t) * n + o] = vec_dot_act(W.g->type, row, &xq[size_t(t) * arow], W.in);
      }
      return;
    }
    // Other GGUF types: the tested SIMD dot of one quantized row with float activations.
#pragma omp parallel for schedule(static)
    for (int o = 0; o < n; ++o) {
      const uint8_t* row = W.g->data + W.g_offset + size_t(r0 + o) * W.row_bytes;
      for (int t = 0; t < T; ++t) y[size_t(t) * n + o] = vec_dot(W.g->type, row, x + size_t(t) * W.in, W.in);
    }
    return;
  }
#pragma omp parallel
  {
    std::vector<float> row(W.in);
#pragma omp for schedule(static)
    for (int o = 0; o < n; ++o) {
      W.row(r0 + o, row.data());
      for (int t = 0; t < T; ++t) y[size_t(t) * n + o] = float(dot(row.data(), x + size_t(t) * W.in, W.in));
    }
  }
}

void linear(const Linear& W, const float* x, int T, float* y) { linear_rows(W, 0, W.out, x, T, y); }

void rms_norm(const float* x, const float* w, int n, double eps, float* y) {
  double ss = 0;
  for (int i = 0; i < n; ++i) ss += double(x[i]) * x[i];
  float r = float(1.0 / std::sqrt(ss / n + eps));
  for (int i = 0; i < n; ++i) y[i] = w[i] * (x[i] * r);
}

void layer_norm(const float* x, const float* w, const float* b, int n, double eps, float* y) {
  double mean = 0, var = 0;
  for (int i = 0; i < n; ++i) mean += x[i];
  mean /= n;
  for (int i = 0; i < n; ++i) var += (x[i] - mean) * (x[i] - mean);
  var /= n;
  double r = 1.0 / std::sqrt(var + eps);
  for (int i = 0; i < n; ++i) y[i] = float((x[i] - mean) * r) * w[i] + b[i];
}

void Rope::apply(float* x, int pos) const {
  int half = dim / 2;
  for (int j = 0; j < half; ++j) {
    // transformers computes the angle in float32: freqs = inv_freq * position.
    float ang = inv_freq[j] * float(pos);
    float c = float(std::cos(double(ang))) * attention_factor;
    float s = float(std::sin(double(ang))) * attention_factor;
    int a = interleave ? 2 * j : j, b = interleave ? 2 * j + 1 : j + half;
    float x0 = x[a], x1 = x[b];
    x[a] = x0 * c - x1 * s;
    x[b] = x1 * c + x0 * s;
  }
}

std::vector<int> topk(const float* v, int n, int k) {
  std::vector<int> idx(n);
  std::iota(idx.begin(), idx.end(), 0);
  // Ties broken by lower index, so the choice is deterministic.
  std::partial_sort(idx.begin(), idx.begin() + k, idx.end(),
                    [&](int a, int b) { return v[a] > v[b] || (v[a] == v[b] && a < b); });
  idx.resize(k);
  return idx;
}

}  // namespace bigmoe::cpu
