// The llama forward (GGUF arch "llama"), top to bottom like calm's infer.c: embedding, then
// per layer RMSNorm → q/k/v → rope → causal GQA attention → o, RMSNorm → SwiGLU, then the
// final norm and the head.
#include "model/llama.h"

#include <cmath>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "tensor/dtype.h"
#include "tensor/quant_act.h"
#include "util/error.h"

namespace bigmoe {

namespace {
inline float round_f16(float x) { return f16_to_f32(f32_to_f16(x)); }
}  // namespace

using cpu::linear;
using cpu::rms_norm;

std::unique_ptr<LlamaModel> LlamaModel::load(const std::filesystem::path& path) {
  std::unique_ptr<LlamaModel> m(new LlamaModel());
  m->file_ = GgufFile::open(path);
  const GgufFile& f = *m->file_;
  const std::string file = path.string();
  std::string arch = f.get_str("general.architecture");
  if (arch != "llama") fail("{}: general.architecture is '{}', expected 'llama'", file, arch);
  LlamaConfig& c = m->cfg_;
  c.hidden_size = int(f.get_u32("llama.embedding_length"));
  c.n_layers = int(f.get_u32("llama.block_count"));
  c.intermediate_size = int(f.get_u32("llama.feed_forward_length"));
  c.n_heads = int(f.get_u32("llama.attention.head_count"));
  c.n_kv_heads = int(f.get_u32("llama.attention.head_count_kv", uint32_t(c.n_heads)));
  c.context_length = int(f.get_u32("llama.context_length"));
  c.rms_norm_eps = f.get_f32("llama.attention.layer_norm_rms_epsilon", 1e-5f);
  c.rope_theta = f.get_f32("llama.rope.freq_base", 10000.0f);
  if (c.n_heads <= 0 || c.hidden_size % c.n_heads) fail("{}: embedding_length {} not divisible by head_count {}", file, c.hidden_size, c.n_heads);
  if (c.n_kv_heads <= 0 || c.n_heads % c.n_kv_heads) fail("{}: head_count {} not divisible by head_count_kv {}", file, c.n_heads, c.n_kv_heads);
  c.head_dim = c.hidden_size / c.n_heads;
  int rope_dim = int(f.get_u32("llama.rope.dimension_count", uint32_t(c.head_dim)));
  if (rope_dim != c.head_dim) fail("{}: partial rope (dimension_count {} of head dim {}) is not supported", file, rope_dim, c.head_dim);

  auto tensor = [&](const std::string& name, std::vector<int64_t> ne) -> const GgufTensorInfo& {
    const GgufTensorInfo* t = f.tensor(name);
    if (!t) fail("{}: tensor '{}' not found", file, name);
    if (t->ne != ne)
      fail("{}: tensor '{}' has shape [{}], expected [{}]", file, name, fmt::join(t->ne, ", "), fmt::join(ne, ", "));
    return *t;
  };
  auto vec = [&](const std::string& name, int n) {
    const GgufTensorInfo& t = tensor(name, {n});
    std::vector<float> v(n);
    dequantize_row(t.type, t.data, v.data(), n);
    return v;
  };
  const int d = c.hidden_size, hd = c.head_dim, kvd = c.n_kv_heads * hd, ff = c.intermediate_size;
  const GgufTensorInfo* emb = f.tensor("token_embd.weight");
  if (!emb) fail("{}: tensor 'token_embd.weight' not found", file);
  if (emb->ne.size() != 2 || emb->ne[0] != d) fail("{}: token_embd.weight has the wrong shape", file);
  c.vocab_size = int(emb->ne[1]);
  m->embed_ = Linear::from_gguf(*emb, file);
  for (int i = 0; i < c.n_layers; ++i) {
    std::string p = fmt::format("blk.{}.", i);
    LlamaLayer L;
    L.attn_norm = vec(p + "attn_norm.weight", d);
    L.ffn_norm = vec(p + "ffn_norm.weight", d);
    L.q = Linear::from_gguf(tensor(p + "attn_q.weight", {d, c.n_heads * hd}), file);
    L.k = Linear::from_gguf(tensor(p + "attn_k.weight", {d, kvd}), file);
    L.v = Linear::from_gguf(tensor(p + "attn_v.weight", {d, kvd}), file);
    L.o = Linear::from_gguf(tensor(p + "attn_output.weight", {c.n_heads * hd, d}), file);
    L.gate = Linear::from_gguf(tensor(p + "ffn_gate.weight", {d, ff}), file);
    L.up = Linear::from_gguf(tensor(p + "ffn_up.weight", {d, ff}), file);
    L.down = Linear::from_gguf(tensor(p + "ffn_down.weight", {ff, d}), file);
    m->layers_.push_back(std::move(L));
  }
  m->out_norm_ = vec("output_norm.weight", d);
  const GgufTensorInfo* out = f.tensor("output.weight");
  m->head_ = out ? Linear::from_gguf(tensor("output.weight", {d, c.vocab_size}), file) : m->embed_;  // tied

  // GGUF llama q/k rows are permuted by the converter so that rope rotates adjacent pairs.
  m->rope_.dim = hd;
  m->rope_.interleave = true;
  m->rope_.inv_freq.resize(hd / 2);
  for (int j = 0; j < hd / 2; ++j) m->rope_.inv_freq[j] = float(1.0 / std::pow(double(c.rope_theta), 2.0 * j / hd));
  return m;
}

std::vector<float> LlamaModel::forward(const std::vector<int>& tokens, Cache& cache, bool all_logits) const {
  const LlamaConfig& c = cfg_;
  const int T = int(tokens.size()), d = c.hidden_size, hd = c.head_dim, H = c.n_heads, Hkv = c.n_kv_heads;
  const int kvd = Hkv * hd, pos0 = cache.n, N = pos0 + T;
  for (int t : tokens)
    if (t < 0 || t >= c.vocab_size) fail("token id {} out of range (vocab_size {})", t, c.vocab_size);
  if (N > c.context_length) fail("{} tokens exceed the context length {}", N, c.context_length);
  if (cache.k.empty()) {
    cache.k.resize(c.n_layers);
    cache.v.resize(c.n_layers);
  }
  std::vector<float> x(size_t(T) * d), h(size_t(T) * d), q(size_t(T) * H * hd), k(size_t(T) * kvd),
      v(size_t(T) * kvd), att(size_t(T) * H * hd), tmp(size_t(T) * d);
  for (int t = 0; t < T; ++t) embed_.row(tokens[t], &x[size_t(t) * d]);

  const float scale = 1.0f / std::sqrt(float(hd));
  for (int l = 0; l < c.n_layers; ++l) {
    const LlamaLayer& L = layers_[l];
    for (int t = 0; t < T; ++t) rms_norm(&x[size_t(t) * d], L.attn_norm.data(), d, c.rms_norm_eps, &h[size_t(t) * d]);
    linear(L.q, h.data(), T, q.data());
    linear(L.k, h.data(), T, k.data());
    linear(L.v, h.data(), T, v.data());
    for (int t = 0; t < T; ++t) {
      for (int hh = 0; hh < H; ++hh) rope_.apply(&q[(size_t(t) * H + hh) * hd], pos0 + t);
      for (int hh = 0; hh < Hkv; ++hh) rope_.apply(&k[(size_t(t) * Hkv + hh) * hd], pos0 + t);
    }
    // The cache holds K and V in f16 and the products read q and the probabilities in f16,
    // as llama.cpp's CPU backend does (half the cache memory; same numbers as llama.cpp).
    for (float& e : k) e = round_f16(e);
    for (float& e : v) e = round_f16(e);
    for (float& e : q) e = round_f16(e);
    cache.k[l].insert(cache.k[l].end(), k.begin(), k.end());
    cache.v[l].insert(cache.v[l].end(), v.begin(), v.end());
    const float* K = cache.k[l].data();
    const float* Vc = cache.v[l].data();
#pragma omp parallel for collapse(2) schedule(dynamic)
    for (int t = 0; t < T; ++t)
      for (int hh = 0; hh < H; ++hh) {
        const int kh = hh / (H / Hkv), p = pos0 + t;
        const float* qh = &q[(size_t(t) * H + hh) * hd];
        std::vector<float> sc(p + 1);
        float mx = -INFINITY;
        for (int s = 0; s <= p; ++s) {
          const float* ks = K + (size_t(s) * Hkv + kh) * hd;
          float dot = 0;
          for (int i = 0; i < hd; ++i) dot += qh[i] * ks[i];
          sc[s] = dot * scale;
          mx = std::max(mx, sc[s]);
        }
        float den = 0;
        for (auto& e : sc) den += (e = std::exp(e - mx));
        float* o = &att[(size_t(t) * H + hh) * hd];
        std::fill(o, o + hd, 0.0f);
        for (int s = 0; s <= p; ++s) {
          const float* vs = Vc + (size_t(s) * Hkv + kh) * hd;
          float w = round_f16(sc[s] / den);
          for (int i = 0; i < hd; ++i) o[i] += w * vs[i];
        }
      }
    linear(L.o, att.data(), T, tmp.data());
    for (size_t i = 0; i < x.size(); ++i) x[i] += tmp[i];

    for (int t = 0; t < T; ++t) rms_norm(&x[size_t(t) * d], L.ffn_norm.data(), d, c.rms_norm_eps, &h[size_t(t) * d]);
    std::vector<float> g(size_t(T) * c.intermediate_size), u(size_t(T) * c.intermediate_size);
    linear(L.gate, h.data(), T, g.data());
    linear(L.up, h.data(), T, u.data());
    for (size_t i = 0; i < g.size(); ++i) g[i] = cpu::silu(g[i]) * u[i];
    linear(L.down, g.data(), T, tmp.data());
    for (size_t i = 0; i < x.size(); ++i) x[i] += tmp[i];
  }
  cache.n = N;
  const int first = all_logits ? 0 : T - 1, rows = T - first;
  for (int t = first; t < T; ++t) rms_norm(&x[size_t(t) * d], out_norm_.data(), d, c.rms_norm_eps, &h[size_t(t) * d]);
  std::vector<float> logits(size_t(rows) * c.vocab_size);
  linear(head_, &h[size_t(first) * d], rows, logits.data());
  return logits;
}

namespace {

class LlamaSession : public Session {
 public:
  explicit LlamaSession(const LlamaModel& m) : m_(m) {}
  std::vector<float> feed(const std::vector<int>& tokens) override { return m_.forward(tokens, cache_, false); }
  std::vector<float> feed_all(const std::vector<int>& tokens) override { return m_.forward(tokens, cache_, true); }
  int n_past() const override { return cache_.n; }
  void truncate(int n_keep) override {
    if (n_keep < 0 || n_keep > cache_.n) fail("truncate: {} outside 0..{}", n_keep, cache_.n);
    if (cache_.n == 0) return;
    for (auto* kv : {&cache_.k, &cache_.v})
      for (auto& layer : *kv) layer.resize(layer.size() / cache_.n * n_keep);
    cache_.n = n_keep;
  }

 private:
  const LlamaModel& m_;
  LlamaModel::Cache cache_;
};

}  // namespace

std::unique_ptr<Session> LlamaModel::new_session() const { return std::make_unique<LlamaSession>(*this); }

}  // namespace bigmoe
