// The GLM-DSA forward pass (spec/glm-dsa.md §3–§5), top to bottom: embedding, then per layer
// MLA attention with the DSA indexer and a dense or MoE FFN, then the final norm and lm_head.
#include "model/glm_dsa.h"

#include <algorithm>
#include <cmath>

#include "util/error.h"

namespace bigmoe {

using cpu::linear;
using cpu::rms_norm;


void KVCache::truncate(int n_keep) {
  if (n_keep < 0 || n_keep > n) fail("KVCache::truncate: {} outside 0..{}", n_keep, n);
  for (auto& l : layers) {
    auto cut = [&](std::vector<float>& v) {
      if (n > 0) v.resize(v.size() / n * n_keep);
    };
    cut(l.latent);
    cut(l.k_pe);
    cut(l.idx_k);
  }
  n = n_keep;
}

KVCache GlmDsaModel::make_cache(int n_layers) const {
  KVCache c;
  c.layers.resize(n_layers);
  return c;
}

void GlmDsaModel::check_tokens(const std::vector<int>& tokens) const {
  for (int t : tokens)
    if (t < 0 || t >= cfg_.vocab_size) fail("token id {} out of range (vocab_size {})", t, cfg_.vocab_size);
}

void GlmDsaModel::embed(int token, float* dst) const {
  if (!embed_) {
    embed_rows_.row(token, dst);
    return;
  }
  size_t d = size_t(cfg_.hidden_size), esz = dtype_size(embed_->dtype);
  to_f32(embed_->dtype, embed_->data + size_t(token) * d * esz, dst, d);
}

// DSA lightning indexer (spec §3.6): scores every causal position with ReLU-weighted head
// sums and keeps the top index_topk; positions with a prefix no longer than index_topk stay
// dense (selection left empty).
void GlmDsaModel::indexer_select(const MlaWeights& w, const float* h, const float* cq, int T, int pos0,
                                 LayerCache& lc, std::vector<std::vector<int>>& selection) const {
  const int Hi = cfg_.index_n_heads, Di = cfg_.index_head_dim;
  std::vector<float> qi(size_t(T) * Hi * Di), k(size_t(T) * Di), wts(size_t(T) * Hi);
  linear(w.idx_wq_b, cq, T, qi.data());
  linear(w.idx_wk, h, T, k.data());
  linear(w.idx_weights_proj, h, T, wts.data());
  for (int t = 0; t < T; ++t) {
    for (int hh = 0; hh < Hi; ++hh) idx_rope_.apply(&qi[(size_t(t) * Hi + hh) * Di], pos0 + t);
    float* kt = &k[size_t(t) * Di];
    cpu::layer_norm(kt, w.idx_k_norm_w.data(), w.idx_k_norm_b.data(), Di, kIndexerNormEps, kt);
    idx_rope_.apply(kt, pos0 + t);
  }
  lc.idx_k.insert(lc.idx_k.end(), k.begin(), k.end());

  const double head_scale = 1.0 / std::sqrt(double(Hi)), dot_scale = 1.0 / std::sqrt(double(Di));
  for (int t = 0; t < T; ++t) {
    int p = pos0 + t;
    selection[t].clear();
    if (p + 1 <= cfg_.index_topk) continue;  // every causal position is selected
    std::vector<float> score(p + 1);
    for (int s = 0; s <= p; ++s) {
      double acc = 0;
      for (int hh = 0; hh < Hi; ++hh) {
        double qk = cpu::dot(&qi[(size_t(t) * Hi + hh) * Di], &lc.idx_k[size_t(s) * Di], Di) * dot_scale;
        acc += double(wts[size_t(t) * Hi + hh]) * head_scale * std::max(qk, 0.0);
      }
      score[s] = float(acc);
    }
    selection[t] = cpu::topk(score.data(), p + 1, cfg_.index_topk);
    std::sort(selection[t].begin(), selection[t].end());
  }
}

// MLA attention (spec §3.2–3.7, §4). h [T, d] normed input; out [T, d].
void GlmDsaModel::attention(const BlockWeights& bw, const float* h, int T, int pos0, LayerCache& lc,
                            std::vector<std::vector<int>>& selection, AttnForm form, float* out) const {
  const MlaWeights& w = bw.attn;
  const int H = cfg_.num_attention_heads, kvr = cfg_.kv_lora_rank;
  const int nope = cfg_.qk_nope_head_dim, rope = cfg_.qk_rope_head_dim, vd = cfg_.v_head_dim;
  const int qkh = nope + rope, N = pos0 + T;

  // Query: q_b(RMSNorm(q_a h)) (or q_proj h), per head [nope | rope], rope on the rope part.
  std::vector<float> cq, q(size_t(T) * H * qkh);
  if (cfg_.q_lora_rank > 0) {
    cq.resize(size_t(T) * cfg_.q_lora_rank);
    linear(w.q_a, h, T, cq.data());
    for (int t = 0; t < T; ++t)
      rms_norm(&cq[size_t(t) * cfg_.q_lora_rank], w.q_a_norm.data(), cfg_.q_lora_rank, kLoraNormEps,
               &cq[size_t(t) * cfg_.q_lora_rank]);
    linear(w.q_b, cq.data(), T, q.data());
  } else {
    linear(w.q_proj, h, T, q.data());
  }
  for (int t = 0; t < T; ++t)
    for (int hh = 0; hh < H; ++hh) rope_.apply(&q[(size_t(t) * H + hh) * qkh + nope], pos0 + t);

  // KV: [c | k_pe] = kv_a h; c = RMSNorm(c); rope(k_pe). Cached per position.
  std::vector<float> kv(size_t(T) * (kvr + rope));
  linear(w.kv_a, h, T, kv.data());
  for (int t = 0; t < T; ++t) {
    float* c = &kv[size_t(t) * (kvr + rope)];
    rms_norm(c, w.kv_a_norm.data(), kvr, kLoraNormEps, c);
    rope_.apply(c + kvr, pos0 + t);
    lc.latent.insert(lc.latent.end(), c, c + kvr);
    lc.k_pe.insert(lc.k_pe.end(), c + kvr, c + kvr + rope);
  }

  if (bw.indexer_full) indexer_select(w, h, cq.data(), T, pos0, lc, selection);

  const double scale = cfg_.attn_scale();
  std::vector<float> o(size_t(T) * H * vd);
  if (form == AttnForm::Plain) {
    // Expand k_nope and v for every cached position through kv_b.
    std::vector<float> kvx(size_t(N) * H * (nope + vd));
    linear(w.kv_b, lc.latent.data(), N, kvx.data());
#pragma omp parallel for collapse(2) schedule(static)
    for (int t = 0; t < T; ++t)
      for (int hh = 0; hh < H; ++hh) {
        int p = pos0 + t;
        std::vector<int> keys = selection[t];
        if (keys.empty())
          for (int s = 0; s <= p; ++s) keys.push_back(s);
        const float* qh = &q[(size_t(t) * H + hh) * qkh];
        std::vector<double> sc(keys.size());
        double mx = -INFINITY;
        for (size_t j = 0; j < keys.size(); ++j) {
          int s = keys[j];
          const float* kn = &kvx[(size_t(s) * H + hh) * (nope + vd)];
          double v = cpu::dot(qh, kn, nope) + cpu::dot(qh + nope, &lc.k_pe[size_t(s) * rope], rope);
          sc[j] = v * scale;
          mx = std::max(mx, sc[j]);
        }
        double den = 0;
        for (auto& v : sc) den += (v = std::exp(v - mx));
        std::vector<double> acc(vd, 0.0);
        for (size_t j = 0; j < keys.size(); ++j) {
          const float* vv = &kvx[(size_t(keys[j]) * H + hh) * (nope + vd) + nope];
          for (int i = 0; i < vd; ++i) acc[i] += sc[j] * vv[i];
        }
        for (int i = 0; i < vd; ++i) o[(size_t(t) * H + hh) * vd + i] = float(acc[i] / den);
      }
  } else {
    // Absorbed: q̃_h = W_UK_hᵀ q_nope_h in latent space, attend over [c, k_pe] shared by all
    // heads, then o_h = W_UV_h ō_h.
    std::vector<float> qt(size_t(T) * H * kvr, 0.0f);
    {
      std::vector<float> row(kvr);
      for (int hh = 0; hh < H; ++hh)
        for (int i = 0; i < nope; ++i) {
          w.kv_b.row(hh * (nope + vd) + i, row.data());
          for (int t = 0; t < T; ++t) {
            float qn = q[(size_t(t) * H + hh) * qkh + i];
            float* dst = &qt[(size_t(t) * H + hh) * kvr];
            for (int c = 0; c < kvr; ++c) dst[c] += qn * row[c];
          }
        }
    }
    std::vector<float> lat_o(size_t(T) * H * kvr);
#pragma omp parallel for collapse(2) schedule(static)
    for (int t = 0; t < T; ++t)
      for (int hh = 0; hh < H; ++hh) {
        int p = pos0 + t;
        std::vector<int> keys = selection[t];
        if (keys.empty())
          for (int s = 0; s <= p; ++s) keys.push_back(s);
        const float* qh = &qt[(size_t(t) * H + hh) * kvr];
        const float* qpe = &q[(size_t(t) * H + hh) * qkh + nope];
        std::vector<double> sc(keys.size());
        double mx = -INFINITY;
        for (size_t j = 0; j < keys.size(); ++j) {
          int s = keys[j];
          double v = cpu::dot(qh, &lc.latent[size_t(s) * kvr], kvr) + cpu::dot(qpe, &lc.k_pe[size_t(s) * rope], rope);
          sc[j] = v * scale;
          mx = std::max(mx, sc[j]);
        }
        double den = 0;
        for (auto& v : sc) den += (v = std::exp(v - mx));
        std::vector<double> acc(kvr, 0.0);
        for (size_t j = 0; j < keys.size(); ++j) {
          const float* c = &lc.latent[size_t(keys[j]) * kvr];
          for (int i = 0; i < kvr; ++i) acc[i] += sc[j] * c[i];
        }
        for (int i = 0; i < kvr; ++i) lat_o[(size_t(t) * H + hh) * kvr + i] = float(acc[i] / den);
      }
    std::vector<float> oh(vd);
    for (int t = 0; t < T; ++t)
      for (int hh = 0; hh < H; ++hh) {
        cpu::linear_rows(w.kv_b, hh * (nope + vd) + nope, vd, &lat_o[(size_t(t) * H + hh) * kvr], 1, oh.data());
        std::copy(oh.begin(), oh.end(), &o[(size_t(t) * H + hh) * vd]);
      }
  }
  linear(w.o, o.data(), T, out);
}

// Dense MLP or MoE (spec §3.9). h [T, d] normed; out [T, d].
void GlmDsaModel::ffn(const FfnWeights& w, const float* h, int T, float* out, int layer) const {
  const int d = cfg_.hidden_size;
  auto mlp = [&](const Linear& g, const Linear& u, const Linear& dn, const float* x, float* y) {
    std::vector<float> a(g.out), b(u.out);
    linear(g, x, 1, a.data());
    linear(u, x, 1, b.data());
    for (int i = 0; i < g.out; ++i) a[i] = cpu::silu(a[i]) * b[i];
    linear(dn, a.data(), 1, y);
  };
  if (!w.moe) {
    for (int t = 0; t < T; ++t) mlp(w.gate, w.up, w.down, h + size_t(t) * d, out + size_t(t) * d);
    return;
  }
  const int E = cfg_.n_routed_experts, K = cfg_.num_experts_per_tok;
  const int G = cfg_.n_group, per = E / G;
  std::vector<float> logits(E), y(d);
  for (int t = 0; t < T; ++t) {
    const float* x = h + size_t(t) * d;
    float* o = out + size_t(t) * d;
    linear(w.router, x, 1, logits.data());
    std::vector<float> s(E), choice(E);
    for (int e = 0; e < E; ++e) {
      s[e] = float(1.0 / (1.0 + std::exp(-double(logits[e]))));
      choice[e] = s[e] + w.correction_bias[e];  // the bias only steers the choice
    }
    if (G > 1) {
      std::vector<float> gscore(G);
      for (int g = 0; g < G; ++g) {
        auto top2 = cpu::topk(&choice[g * per], per, 2);
        gscore[g] = choice[g * per + top2[0]] + choice[g * per + top2[1]];
      }
      auto keep = cpu::topk(gscore.data(), G, cfg_.topk_group);
      std::vector<bool> kept(G, false);
      for (int g : keep) kept[g] = true;
      for (int e = 0; e < E; ++e)
        if (!kept[e / per]) choice[e] = -INFINITY;
    }
    auto idx = cpu::topk(choice.data(), E, K);
    if (stats_) stats_->add(layer, idx.data(), K);
    std::vector<double> wt(K);
    double sum = 0;
    for (int k = 0; k < K; ++k) sum += (wt[k] = s[idx[k]]);
    for (int k = 0; k < K; ++k) {
      if (cfg_.norm_topk_prob) wt[k] /= (sum + 1e-20);
      wt[k] *= cfg_.routed_scaling_factor;
    }
    std::fill(o, o + d, 0.0f);
    for (int k = 0; k < K; ++k) {
      int e = idx[k];
      mlp(w.exp_gate[e], w.exp_up[e], w.exp_down[e], x, y.data());
      for (int i = 0; i < d; ++i) o[i] += float(wt[k]) * y[i];
    }
    if (w.sh_gate.present()) {
      mlp(w.sh_gate, w.sh_up, w.sh_down, x, y.data());
      for (int i = 0; i < d; ++i) o[i] += y[i];
    }
  }
}

void GlmDsaModel::block_forward(const BlockWeights& w, float* x, int T, int pos0, LayerCache& lc,
                                std::vector<std::vector<int>>& selection, AttnForm form, int layer) const {
  const int d = cfg_.hidden_size;
  std::vector<float> h(size_t(T) * d), y(size_t(T) * d);
  for (int t = 0; t < T; ++t)
    rms_norm(x + size_t(t) * d, w.input_norm.data(), d, cfg_.rms_norm_eps, &h[size_t(t) * d]);
  attention(w, h.data(), T, pos0, lc, selection, form, y.data());
  for (size_t i = 0; i < y.size(); ++i) x[i] += y[i];
  for (int t = 0; t < T; ++t)
    rms_norm(x + size_t(t) * d, w.post_norm.data(), d, cfg_.rms_norm_eps, &h[size_t(t) * d]);
  ffn(w.ffn, h.data(), T, y.data(), layer);
  for (size_t i = 0; i < y.size(); ++i) x[i] += y[i];
}

ForwardOut GlmDsaModel::forward(const std::vector<int>& tokens, KVCache& cache, AttnForm form) const {
  check_tokens(tokens);
  const int T = int(tokens.size()), d = cfg_.hidden_size, pos0 = cache.n;
  if (T == 0) return {};
  if (int(cache.layers.size()) != cfg_.num_hidden_layers) fail("forward: cache has the wrong number of layers");
  std::vector<float> x(size_t(T) * d);
  for (int t = 0; t < T; ++t) embed(tokens[t], &x[size_t(t) * d]);

  // Top-k selections flow from each "full" indexer layer to the "shared" layers after it.
  std::vector<std::vector<int>> selection(T);
  for (int i = 0; i < cfg_.num_hidden_layers; ++i)
    block_forward(layers_[i], x.data(), T, pos0, cache.layers[i], selection, form, i);
  cache.n += T;

  ForwardOut r;
  r.hidden.resize(size_t(T) * d);
  for (int t = 0; t < T; ++t) rms_norm(&x[size_t(t) * d], final_norm_.data(), d, cfg_.rms_norm_eps, &r.hidden[size_t(t) * d]);
  r.logits.resize(size_t(T) * cfg_.vocab_size);
  linear(lm_head_, r.hidden.data(), T, r.logits.data());
  return r;
}

ForwardOut GlmDsaModel::mtp_forward(const float* hidden, const std::vector<int>& next_tokens, KVCache& cache,
                                    AttnForm form) const {
  if (!mtp_) fail("this checkpoint has no MTP layer (model.layers.{}.*)", cfg_.num_hidden_layers);
  check_tokens(next_tokens);
  const int T = int(next_tokens.size()), d = cfg_.hidden_size, pos0 = cache.n;
  if (T == 0) return {};
  const MtpWeights& m = *mtp_;
  std::vector<float> u(size_t(T) * d), eg(2 * size_t(d));
  for (int t = 0; t < T; ++t) {
    // [e ; g]: embedding of the next token (zeroed at position 0), then the hidden state.
    if (pos0 + t == 0) std::fill(eg.begin(), eg.begin() + d, 0.0f);
    else {
      embed(next_tokens[t], eg.data());
      rms_norm(eg.data(), m.enorm.data(), d, cfg_.rms_norm_eps, eg.data());
    }
    rms_norm(hidden + size_t(t) * d, m.hnorm.data(), d, cfg_.rms_norm_eps, eg.data() + d);
    linear(m.eh_proj, eg.data(), 1, &u[size_t(t) * d]);
  }
  std::vector<std::vector<int>> selection(T);
  block_forward(m.block, u.data(), T, pos0, cache.layers[0], selection, form, cfg_.num_hidden_layers);
  cache.n += T;

  ForwardOut r;
  r.hidden = u;  // the block output z, which a further draft step pairs with its token
  std::vector<float> zn(size_t(T) * d);
  for (int t = 0; t < T; ++t) rms_norm(&u[size_t(t) * d], m.head_norm.data(), d, cfg_.rms_norm_eps, &zn[size_t(t) * d]);
  r.logits.resize(size_t(T) * cfg_.vocab_size);
  linear(m.head, zn.data(), T, r.logits.data());
  return r;
}

namespace {

class GlmDsaSession : public Session {
 public:
  explicit GlmDsaSession(const GlmDsaModel& m) : m_(m), cache_(m.new_cache()) {}
  std::vector<float> feed(const std::vector<int>& tokens) override {
    ForwardOut r = m_.forward(tokens, cache_, tokens.size() == 1 ? AttnForm::Absorbed : AttnForm::Plain);
    return std::vector<float>(r.logits.end() - m_.vocab_size(), r.logits.end());
  }
  std::vector<float> feed_all(const std::vector<int>& tokens) override {
    return m_.forward(tokens, cache_, tokens.size() == 1 ? AttnForm::Absorbed : AttnForm::Plain).logits;
  }
  int n_past() const override { return cache_.n; }
  void truncate(int n_keep) override { cache_.truncate(n_keep); }

 private:
  const GlmDsaModel& m_;
  KVCache cache_;
};

}  // namespace

std::unique_ptr<Session> GlmDsaModel::new_session() const { return std::make_unique<GlmDsaSession>(*this); }

}  // namespace bigmoe
