// GlmDsaCuda: upload of a GlmDsaModel's weights and the forward pass on the device. The order
// of operations follows GlmDsaModel::forward / attention / ffn (src/model/glm_dsa.cpp) so the
// two read side by side; the comments name where the GPU differs in form (never in math).
#include "backend/cuda/glm_dsa_cuda.h"

#include <cuda_runtime.h>
#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <map>

#include "backend/cuda/decode_ops.h"
#include "backend/cuda/expert_offload.h"
#include "backend/cuda/model_ops.h"
#include "backend/cuda/routing_count.h"
#include "engine/page_pool.h"
#include "tensor/dtype.h"
#include "tensor/quant.h"
#include "util/error.h"

namespace bigmoe::cuda {

bool ExpertPlacement::any_host() const {
  for (const auto& l : home)
    for (ExpertHome h : l)
      if (h != ExpertHome::Gpu) return true;
  return false;
}

namespace {

constexpr int kDecodeRows = 16;  // matvec's largest batch; more rows take the GEMM path

size_t align_up(size_t n, size_t a) { return (n + a - 1) / a * a; }

// One weight matrix on the device in a matvec format.
struct DevLinear {
  WeightFormat fmt = WeightFormat::F32;
  const void* w = nullptr;
  const float* scale = nullptr;
  int bo = 128, bi = 128;
  int out = 0, in = 0;
  size_t bytes = 0;  // weight + scale bytes (what one pass reads)
  bool present() const { return w != nullptr; }
};

// Matrices that read the same input, stacked by rows in one allocation so that a decode step
// reads them in one launch (matvec_multi). The parts stay usable alone: their DevLinears point
// into the stack (prefill, accounting). `parts` / `solo` are indices into the caller's list.
struct DevFused {
  DevLinear all;           // the stack; present only when >= 2 parts were fused
  std::vector<int> parts;  // fused, in stacking order
  std::vector<int> solo;   // present but launched alone (another format or shape)
};

struct DevBlock {
  const float* input_norm = nullptr;
  const float* post_norm = nullptr;
  DevLinear q_proj, q_a, q_b, kv_a, o;
  const float* q_a_norm = nullptr;
  const float* kv_a_norm = nullptr;
  const void* wuk_t = nullptr;  // [H, kv_lora, nope]: q̃_h = W_UK_hᵀ q_nope_h
  const void* wuv = nullptr;    // [H, v, kv_lora]:   o_h = W_UV_h ō_h
  WeightFormat kvb_fmt = WeightFormat::F32;
  size_t kvb_bytes = 0;
  bool indexer_full = false;
  DevLinear idx_wq_b, idx_wk, idx_weights_proj;
  const float* idx_k_norm_w = nullptr;
  const float* idx_k_norm_b = nullptr;
  bool moe = false;
  DevLinear gate, up, down, router;
  const float* correction_bias = nullptr;
  DevExperts exp_gate, exp_up, exp_down;
  DevLinear sh_gate, sh_up, sh_down;
  // Fused decode launches: on h {q_a | q_proj, kv_a, indexer wk, indexer weights_proj}, on the
  // normed q_a output {q_b, indexer wq_b}, and {gate, up} of the dense MLP / shared expert.
  DevFused f_h, f_cq, f_gu, f_sh;
  int offload_layer = -1;  // this layer's index when some of its experts live on the host (ExpertOffload)
};

// One layer's cache pools, shared by every sequence: what the absorbed attention and the indexer
// read. Pool row p * P + i is row i of page p (P = page_rows); a sequence's page table maps its
// positions to pages, the same page index in every pool of every layer. Page cache_pages, the
// spare, is zeros and never written (PagePool::null_page).
struct DevLayerCache {
  float* latent = nullptr;  // [(cache_pages + 1) * P, kv_lora]
  float* k_pe = nullptr;    // [(cache_pages + 1) * P, rope]
  float* idx_k = nullptr;   // [(cache_pages + 1) * P, Di] (indexer "full" layers)
};

}  // namespace

struct GlmDsaCuda::Impl {
  const GlmDsaModel& model;
  const ModelConfig& c;
  GlmDsaCudaOptions opt;
  cudaStream_t stream = nullptr;
  // Decode steps run the shared expert on `side`, beside the router and the routed experts
  // (forked and joined by events; captured into the graph the same way).
  cudaStream_t side = nullptr;
  cudaEvent_t ev_fork = nullptr, ev_join = nullptr;
  float *sh_g = nullptr, *sh_u = nullptr;  // the shared expert's own activations
  std::vector<void*> allocations;
  size_t resident = 0;

  std::vector<DevBlock> blocks;
  const float* final_norm = nullptr;
  DevLinear lm_head;
  const float *rope_freq = nullptr, *idx_rope_freq = nullptr;

  // Paged cache: pools per layer, the books on the host (pages), and the page tables on the
  // device, sequence s's at page_table + s * table_size: a fixed address, so captured graphs keep
  // reading it as the host adds pages (changed entries uploaded before each step: upload_table).
  std::vector<DevLayerCache> caches;  // [layer]
  std::unique_ptr<PagePool> pages;
  int* page_table = nullptr;  // device [max_sequences][table_size]
  int table_size = 0;         // ceil(max_context / page_rows)
  std::vector<bool> seq_used;

  // Activations and scratch, sized for opt.max_rows rows.
  float *x = nullptr, *h = nullptr, *y = nullptr, *cq = nullptr, *q = nullptr, *kv = nullptr, *qpe = nullptr;
  float *qt = nullptr, *lat_o = nullptr, *o = nullptr, *qi = nullptr, *wts = nullptr, *scores = nullptr;
  float *ffn_g = nullptr, *ffn_u = nullptr, *ye = nullptr, *ys = nullptr, *logits = nullptr, *route_w = nullptr;
  float *xe = nullptr, *ge = nullptr, *ue = nullptr, *yexp = nullptr;
  // Prefetch's prediction of the next host layer's choice (decode rows): its post-attention norm
  // of x [16, d], its router logits [16, E], ids and weights [16, K].
  float *pred_h = nullptr, *pred_logits = nullptr, *pred_w = nullptr;
  int* pred_ids = nullptr;
  float* kbuf = nullptr;
  int* pos_dev = nullptr;
  int* pos_host = nullptr;
  int *sel = nullptr, *ids = nullptr, *slot_rows = nullptr, *slot_tokens = nullptr;
  void* dq = nullptr;  // BF16 dequantized weight for the prefill GEMM
  float* host_x = nullptr;  // pinned staging of embeddings
  float* host_logits = nullptr;
  size_t logits_rows = 0;

  struct Graph {
    cudaGraphExec_t exec = nullptr;
  };
  std::map<std::string, Graph> graphs;  // captured decode steps
  std::vector<cudaEvent_t> events;      // profiling
  std::unique_ptr<ExpertOffload> offload;  // experts on the host (null: all on the GPU)
  std::unique_ptr<RoutingCounter> routing;  // routing statistics (null: off)
  RoutingStats* routing_stats = nullptr;

  Impl(const GlmDsaModel& m, const GlmDsaCudaOptions& o) : model(m), c(m.config()), opt(o) {}
  void enqueue_layers(const std::vector<CudaSequence*>& seqs, const std::vector<int>& rows0,
                      const std::vector<int>& nrows, int R, bool dev, int ncap, bool last_only,
                      std::vector<float>* prof);
  void finish_profile(std::vector<float>& ms);
  // Sequence s's page-table entries changed since its last upload, to its device table, ordered
  // on the stream before the kernels (or the graph) that read them. From pageable memory: the
  // call returns once the entries are staged, so the host books may change right after.
  void upload_table(int s) {
    const auto [lo, hi] = pages->take_dirty(s);
    if (lo == hi) return;
    check(cudaMemcpyAsync(page_table + size_t(s) * table_size + lo, pages->table(s) + lo, size_t(hi - lo) * 4,
                          cudaMemcpyHostToDevice, stream),
          "cudaMemcpyAsync (page table)");
  }
  ~Impl() {
    offload.reset();  // first: it waits for its copies into the pools freed below
    for (void* p : allocations) cudaFree(p);
    if (host_x) cudaFreeHost(host_x);
    if (host_logits) cudaFreeHost(host_logits);
    if (pos_host) cudaFreeHost(pos_host);
    for (auto& g : graphs)
      if (g.second.exec) cudaGraphExecDestroy(g.second.exec);
    for (auto& e : events) cudaEventDestroy(e);
    if (ev_fork) cudaEventDestroy(ev_fork);
    if (ev_join) cudaEventDestroy(ev_join);
    if (side) cudaStreamDestroy(side);
    if (stream) cudaStreamDestroy(stream);
  }

  template <typename T = void>
  T* alloc(size_t bytes, const std::string& what) {
    void* p = nullptr;
    bytes = std::max<size_t>(bytes, 16);
    cudaError_t e = cudaMalloc(&p, bytes);
    if (e != cudaSuccess) {
      size_t fr = 0, tot = 0;
      cudaMemGetInfo(&fr, &tot);
      fail("CUDA: cannot allocate {:.1f} MiB for {} ({} MiB free of {} MiB, {:.1f} MiB already placed): {}",
           bytes / 1048576.0, what, fr >> 20, tot >> 20, resident / 1048576.0, cudaGetErrorString(e));
    }
    allocations.push_back(p);
    resident += bytes;
    return static_cast<T*>(p);
  }

  template <typename T>
  T* upload(const T* src, size_t n, const std::string& what) {
    T* d = alloc<T>(n * sizeof(T), what);
    check(cudaMemcpy(d, src, n * sizeof(T), cudaMemcpyHostToDevice), "cudaMemcpy (weights)");
    return d;
  }
  const float* upload_vec(const std::vector<float>& v, const std::string& what) {
    return v.empty() ? nullptr : upload(v.data(), v.size(), what);
  }

  // ---- weight placement ----

  // The device format a host Linear is placed in: its own bytes when a matvec kernel reads
  // them (BF16, FP8 + block scales, GGUF Q8_0 / Q4_K / Q6_K / F32 / BF16), else float32 rows
  // decoded exactly (F16, other ggml types, owned rows).
  static WeightFormat placed_format(const Linear& l) {
    if (l.g) {
      switch (l.g->type) {
        case GgmlType::Q8_0: return l.in % 32 == 0 ? WeightFormat::Q8_0 : WeightFormat::F32;
        case GgmlType::Q4_K: return l.in % 256 == 0 ? WeightFormat::Q4_K : WeightFormat::F32;
        case GgmlType::Q6_K: return l.in % 256 == 0 ? WeightFormat::Q6_K : WeightFormat::F32;
        case GgmlType::BF16: return WeightFormat::BF16;
        default: return WeightFormat::F32;
      }
    }
    if (l.w) {
      if (l.w->dtype == DType::BF16) return WeightFormat::BF16;
      if (l.w->dtype == DType::F8_E4M3 && l.scale) return WeightFormat::FP8_E4M3;
    }
    return WeightFormat::F32;
  }

  // Bytes of one matrix in its placed format (rows contiguous).
  static size_t placed_bytes(const Linear& l, WeightFormat f) {
    if (l.g && f != WeightFormat::F32) return size_t(l.out) * l.row_bytes;
    switch (f) {
      case WeightFormat::BF16: return size_t(l.out) * l.in * 2;
      case WeightFormat::FP8_E4M3: return size_t(l.out) * l.in;
      default: return size_t(l.out) * l.in * 4;
    }
  }

  // Writes the placed bytes of l to dst (host) and its FP8 scales to sdst (float32).
  static void placed_data(const Linear& l, WeightFormat f, uint8_t* dst, float* sdst) {
    if (l.g && f != WeightFormat::F32) {
      std::memcpy(dst, l.g->data + l.g_offset, size_t(l.out) * l.row_bytes);
      return;
    }
    if (f == WeightFormat::BF16 || f == WeightFormat::FP8_E4M3) {
      std::memcpy(dst, l.w->data, l.w->nbytes);
      if (f == WeightFormat::FP8_E4M3) to_f32(l.scale->dtype, l.scale->data, sdst, size_t(l.scale->numel()));
      return;
    }
    float* fd = reinterpret_cast<float*>(dst);
#pragma omp parallel for schedule(static)
    for (int o = 0; o < l.out; ++o) l.row(o, fd + size_t(o) * l.in);
  }

  static size_t scale_count(const Linear& l) { return l.scale ? size_t(l.scale->numel()) : 0; }

  DevLinear place(const Linear& l, const std::string& what) {
    DevLinear d;
    if (!l.present()) return d;
    d.fmt = placed_format(l);
    d.out = l.out;
    d.in = l.in;
    size_t wb = placed_bytes(l, d.fmt), sc = d.fmt == WeightFormat::FP8_E4M3 ? scale_count(l) : 0;
    std::vector<uint8_t> host(wb);
    std::vector<float> shost(sc);
    placed_data(l, d.fmt, host.data(), shost.data());
    d.w = upload(host.data(), wb, what);
    if (sc) {
      d.scale = upload(shost.data(), sc, what + " scales");
      d.bo = l.bo;
      d.bi = l.bi;
    }
    d.bytes = wb + sc * 4;
    return d;
  }

  // Places the present Linears of `ls` (into `ds`), stacking those that share the first one's
  // placed format, input width (and FP8 scale blocks) into one allocation when at least two do.
  // FP8: every stacked part but the last must be a whole number of scale-block rows, so the stack's
  // scale rows line up; a part whose bytes are not a multiple of 16 is not stacked (each part's
  // view must stay 16-byte aligned for the kernels).
  DevFused place_group(const std::vector<const Linear*>& ls, const std::vector<DevLinear*>& ds, const std::string& what) {
    DevFused f;
    std::vector<int> cand;
    WeightFormat fmt = WeightFormat::F32;
    const Linear* first = nullptr;
    for (size_t i = 0; i < ls.size(); ++i) {
      const Linear& l = *ls[i];
      if (!l.present()) continue;
      const WeightFormat pf = placed_format(l);
      if (!first) first = &l, fmt = pf;
      const bool same = pf == fmt && l.in == first->in && (pf != WeightFormat::FP8_E4M3 || (l.bo == first->bo && l.bi == first->bi));
      if (same && placed_bytes(l, pf) % 16 == 0) cand.push_back(int(i));
      else f.solo.push_back(int(i));
    }
    if (fmt == WeightFormat::FP8_E4M3 && !cand.empty()) {
      std::stable_partition(cand.begin(), cand.end(), [&](int i) { return ls[i]->out % ls[i]->bo == 0; });
      while (cand.size() >= 2 && ls[cand[cand.size() - 2]]->out % ls[cand[cand.size() - 2]]->bo != 0) {
        f.solo.push_back(cand[cand.size() - 2]);
        cand.erase(cand.end() - 2);
      }
    }
    if (cand.size() < 2) {
      for (int i : cand) f.solo.push_back(i);
      cand.clear();
    }
    for (int i : f.solo) *ds[i] = place(*ls[i], what);
    if (cand.empty()) return f;
    size_t wb = 0, sc = 0;
    int out = 0;
    for (int i : cand) {
      wb += placed_bytes(*ls[i], fmt);
      sc += fmt == WeightFormat::FP8_E4M3 ? scale_count(*ls[i]) : 0;
      out += ls[i]->out;
    }
    std::vector<uint8_t> host(wb);
    std::vector<float> shost(sc);
    size_t wo = 0, so = 0;
    for (int i : cand) {
      placed_data(*ls[i], fmt, host.data() + wo, shost.data() + so);
      wo += placed_bytes(*ls[i], fmt);
      so += fmt == WeightFormat::FP8_E4M3 ? scale_count(*ls[i]) : 0;
    }
    uint8_t* dw = upload(host.data(), wb, what);
    float* dsc = sc ? upload(shost.data(), sc, what + " scales") : nullptr;
    f.all = DevLinear{fmt, dw, dsc, first->bo ? first->bo : 128, first->bi ? first->bi : 128, out, first->in, wb + sc * 4};
    wo = so = 0;
    for (int i : cand) {
      const Linear& l = *ls[i];
      const size_t b = placed_bytes(l, fmt), c = fmt == WeightFormat::FP8_E4M3 ? scale_count(l) : 0;
      *ds[i] = DevLinear{fmt, dw + wo, c ? dsc + so : nullptr, f.all.bo, f.all.bi, l.out, l.in, b + c * 4};
      wo += b;
      so += c;
    }
    f.parts = cand;
    return f;
  }

  // All experts of one projection in one allocation, expert e at e * stride.
  DevExperts place_experts(const std::vector<Linear>& ls, const std::string& what) {
    DevExperts d;
    if (ls.empty()) return d;
    const Linear& l0 = ls[0];
    WeightFormat f = placed_format(l0);
    for (const Linear& l : ls)
      if (placed_format(l) != f || l.out != l0.out || l.in != l0.in)
        fail("{}: experts differ in format or shape; the grouped kernel needs them uniform", what);
    size_t wb = placed_bytes(l0, f), stride = align_up(wb, 256), sc = f == WeightFormat::FP8_E4M3 ? scale_count(l0) : 0;
    const size_t E = ls.size();
    uint8_t* dw = alloc<uint8_t>(stride * E, what);
    float* ds = sc ? alloc<float>(sc * E * 4, what + " scales") : nullptr;
    std::vector<uint8_t> host(wb);
    std::vector<float> shost(sc);
    for (size_t e = 0; e < E; ++e) {
      placed_data(ls[e], f, host.data(), shost.data());
      check(cudaMemcpy(dw + e * stride, host.data(), wb, cudaMemcpyHostToDevice), "cudaMemcpy (experts)");
      if (sc) check(cudaMemcpy(ds + e * sc, shost.data(), sc * 4, cudaMemcpyHostToDevice), "cudaMemcpy (scales)");
    }
    d.ew.fmt = f;
    d.ew.w = dw;
    d.ew.w_stride = stride;
    d.ew.scale = ds;
    d.ew.scale_stride = sc;
    d.ew.bo = l0.bo ? l0.bo : 128;
    d.ew.bi = l0.bi ? l0.bi : 128;
    d.out = l0.out;
    d.in = l0.in;
    d.n = int(E);
    d.bytes_per_expert = wb + sc * 4;
    return d;
  }

  // The layout place_experts would give ls, for a layer whose experts ExpertOffload places.
  static ExpertLayout expert_layout(const std::vector<Linear>& ls, const std::string& what) {
    const Linear& l0 = ls.at(0);
    const WeightFormat f = placed_format(l0);
    for (const Linear& l : ls)
      if (placed_format(l) != f || l.out != l0.out || l.in != l0.in)
        fail("{}: experts differ in format or shape; the grouped kernel needs them uniform", what);
    ExpertLayout x;
    x.fmt = f;
    x.out = l0.out;
    x.in = l0.in;
    x.bo = l0.bo ? l0.bo : 128;
    x.bi = l0.bi ? l0.bi : 128;
    x.wbytes = placed_bytes(l0, f);
    x.scales = f == WeightFormat::FP8_E4M3 ? scale_count(l0) : 0;
    return x;
  }

  // kv_b split per head into the two absorbed-MLA matrices: W_UKᵀ [H, kv_lora, nope] and W_UV
  // [H, v, kv_lora], in BF16 (exact for BF16 checkpoints; for FP8 / quantized kv_b a rounding of
  // 2^-9 relative) unless opt.exact_absorb keeps them float32 when BF16 would round them.
  void place_kv_b(const Linear& kvb, DevBlock& b, const std::string& what) {
    const int H = c.num_attention_heads, kvr = c.kv_lora_rank, nope = c.qk_nope_head_dim, vd = c.v_head_dim;
    std::vector<float> uk(size_t(H) * kvr * nope), uv(size_t(H) * vd * kvr), row(kvr);
    for (int hh = 0; hh < H; ++hh) {
      for (int i = 0; i < nope; ++i) {
        kvb.row(hh * (nope + vd) + i, row.data());
        for (int k = 0; k < kvr; ++k) uk[(size_t(hh) * kvr + k) * nope + i] = row[k];
      }
      for (int j = 0; j < vd; ++j) kvb.row(hh * (nope + vd) + nope + j, &uv[(size_t(hh) * vd + j) * kvr]);
    }
    auto to_bf16 = [](const std::vector<float>& v) {
      std::vector<uint16_t> r(v.size());
      for (size_t i = 0; i < v.size(); ++i) r[i] = f32_to_bf16(v[i]);
      return r;
    };
    auto exact = [](const std::vector<float>& v, const std::vector<uint16_t>& h) {
      for (size_t i = 0; i < v.size(); ++i)
        if (bf16_to_f32(h[i]) != v[i]) return false;
      return true;
    };
    std::vector<uint16_t> a = to_bf16(uk), v = to_bf16(uv);
    const bool bf16 = !opt.exact_absorb || (exact(uk, a) && exact(uv, v));
    b.kvb_fmt = bf16 ? WeightFormat::BF16 : WeightFormat::F32;
    if (bf16) {
      b.wuk_t = upload(a.data(), a.size(), what + " W_UK");
      b.wuv = upload(v.data(), v.size(), what + " W_UV");
      b.kvb_bytes = (a.size() + v.size()) * 2;
    } else {
      b.wuk_t = upload(uk.data(), uk.size(), what + " W_UK");
      b.wuv = upload(uv.data(), uv.size(), what + " W_UV");
      b.kvb_bytes = (uk.size() + uv.size()) * 4;
    }
  }

  DevBlock place_block(const BlockWeights& w, int layer, const std::string& p) {
    DevBlock b;
    b.input_norm = upload_vec(w.input_norm, p + "input_norm");
    b.post_norm = upload_vec(w.post_norm, p + "post_norm");
    const MlaWeights& a = w.attn;
    const Linear none;
    b.indexer_full = w.indexer_full;
    const bool ix = w.indexer_full;
    const bool ql = a.q_a.present();
    b.f_h = place_group({ql ? &a.q_a : &a.q_proj, &a.kv_a, ix ? &a.idx_wk : &none, ix ? &a.idx_weights_proj : &none},
                        {ql ? &b.q_a : &b.q_proj, &b.kv_a, &b.idx_wk, &b.idx_weights_proj},
                        p + "q_a / kv_a / indexer wk, weights_proj");
    b.q_a_norm = upload_vec(a.q_a_norm, p + "q_a_norm");
    b.f_cq = place_group({&a.q_b, ix ? &a.idx_wq_b : &none}, {&b.q_b, &b.idx_wq_b}, p + "q_b / indexer wq_b");
    b.kv_a_norm = upload_vec(a.kv_a_norm, p + "kv_a_norm");
    place_kv_b(a.kv_b, b, p + "kv_b");
    b.o = place(a.o, p + "o_proj");
    if (ix) {
      b.idx_k_norm_w = upload_vec(a.idx_k_norm_w, p + "indexer.k_norm");
      b.idx_k_norm_b = upload_vec(a.idx_k_norm_b, p + "indexer.k_norm bias");
    }
    const FfnWeights& f = w.ffn;
    b.moe = f.moe;
    if (!f.moe) {
      b.f_gu = place_group({&f.gate, &f.up}, {&b.gate, &b.up}, p + "mlp.gate_proj / up_proj");
      b.down = place(f.down, p + "mlp.down_proj");
    } else {
      b.router = place(f.router, p + "mlp.gate");
      b.correction_bias = upload_vec(f.correction_bias, p + "e_score_correction_bias");
      if (offload && ExpertOffload::host_layer(opt.experts, layer)) {
        // Placed by the offload executor once every layer is known (their pools are shared).
        b.offload_layer = layer;
        offload->add_layer(layer, f,
                           {expert_layout(f.exp_gate, p + "experts.gate_proj"),
                            expert_layout(f.exp_up, p + "experts.up_proj"),
                            expert_layout(f.exp_down, p + "experts.down_proj")},
                           p);
      } else {
        b.exp_gate = place_experts(f.exp_gate, p + "experts.gate_proj");
        b.exp_up = place_experts(f.exp_up, p + "experts.up_proj");
        b.exp_down = place_experts(f.exp_down, p + "experts.down_proj");
      }
      b.f_sh = place_group({&f.sh_gate, &f.sh_up}, {&b.sh_gate, &b.sh_up}, p + "shared_experts.gate_proj / up_proj");
      b.sh_down = place(f.sh_down, p + "shared_experts.down_proj");
    }
    return b;
  }

  void allocate_work() {
    const size_t R = size_t(opt.max_rows), d = size_t(c.hidden_size);
    const int H = c.num_attention_heads, kvr = c.kv_lora_rank, rope = c.qk_rope_head_dim;
    const int qkh = c.qk_nope_head_dim + rope, vd = c.v_head_dim;
    const int K = std::max(1, c.num_experts_per_tok);
    const size_t inter = size_t(std::max({c.intermediate_size, c.moe_intermediate_size * std::max(1, c.n_shared_experts),
                                          c.moe_intermediate_size}));
    x = alloc<float>(R * d * 4, "activations");
    h = alloc<float>(R * d * 4, "activations");
    y = alloc<float>(R * d * 4, "activations");
    cq = alloc<float>(R * std::max(1, c.q_lora_rank) * 4, "activations");
    q = alloc<float>(R * H * qkh * 4, "activations");
    kv = alloc<float>(R * (kvr + rope) * 4, "activations");
    qpe = alloc<float>(R * H * rope * 4, "activations");
    qt = alloc<float>(R * H * kvr * 4, "activations");
    lat_o = alloc<float>(R * H * kvr * 4, "activations");
    o = alloc<float>(R * H * vd * 4, "activations");
    if (c.has_indexer) {
      qi = alloc<float>(R * c.index_n_heads * c.index_head_dim * 4, "indexer activations");
      wts = alloc<float>(R * c.index_n_heads * 4, "indexer activations");
      scores = alloc<float>(R * size_t(opt.max_context) * 4, "indexer scores");
      kbuf = alloc<float>(R * c.index_head_dim * 4, "indexer keys");
    }
    // Selections: the indexer's top-k per row, or in a decode step the dense causal range.
    sel = alloc<int>(std::max(R * std::max(c.index_topk, 1), size_t(kDecodeRows) * std::max(c.index_topk, opt.max_context)) * 4,
                     "attention selection");
    pos_dev = alloc<int>(size_t(opt.max_sequences) * 4, "positions");
    check(cudaMallocHost(&pos_host, size_t(opt.max_sequences) * 4), "cudaMallocHost");
    ffn_g = alloc<float>(R * std::max<size_t>(inter, size_t(K) * c.moe_intermediate_size) * 4, "ffn activations");
    ffn_u = alloc<float>(R * std::max<size_t>(inter, size_t(K) * c.moe_intermediate_size) * 4, "ffn activations");
    if (c.n_routed_experts > 0) {
      logits = alloc<float>(R * c.n_routed_experts * 4, "router logits");
      ids = alloc<int>(R * K * 4, "router ids");
      route_w = alloc<float>(R * K * 4, "router weights");
      ye = alloc<float>(R * K * d * 4, "expert outputs");
      ys = alloc<float>(R * d * 4, "shared expert output");
      const size_t sh = size_t(std::min(R, size_t(kDecodeRows))) * c.moe_intermediate_size * std::max(1, c.n_shared_experts);
      sh_g = alloc<float>(sh * 4, "shared expert activations");
      sh_u = alloc<float>(sh * 4, "shared expert activations");
      slot_rows = alloc<int>(R * K * 4, "expert slots");
      slot_tokens = alloc<int>(R * K * 4, "expert slots");
      xe = alloc<float>(R * d * 4, "expert inputs");
      ge = alloc<float>(R * c.moe_intermediate_size * 4, "expert activations");
      ue = alloc<float>(R * c.moe_intermediate_size * 4, "expert activations");
      yexp = alloc<float>(R * d * 4, "expert outputs");
      if (offload && offload_prefetches()) {
        const size_t Rd = std::min(R, size_t(kDecodeRows));
        pred_h = alloc<float>(Rd * d * 4, "prefetch prediction");
        pred_logits = alloc<float>(Rd * c.n_routed_experts * 4, "prefetch prediction");
        pred_ids = alloc<int>(Rd * K * 4, "prefetch prediction");
        pred_w = alloc<float>(Rd * K * 4, "prefetch prediction");
      }
    }
    // The largest matrix the prefill GEMM dequantizes.
    size_t mx = size_t(lm_head.out) * lm_head.in;
    auto upd = [&](const DevLinear& l) { mx = std::max(mx, size_t(l.out) * l.in); };
    for (auto& b : blocks)
      for (const DevLinear* l : {&b.q_proj, &b.q_a, &b.q_b, &b.kv_a, &b.o, &b.idx_wq_b, &b.idx_wk, &b.idx_weights_proj,
                                 &b.gate, &b.up, &b.down, &b.router, &b.sh_gate, &b.sh_up, &b.sh_down})
        upd(*l);
    mx = std::max(mx, size_t(c.moe_intermediate_size) * c.hidden_size);
    if (opt.max_rows > kDecodeRows && opt.prefill_gemm) {
      dq = alloc(mx * 2, "prefill BF16 weight scratch");
    }
    check(cudaMallocHost(&host_x, R * d * 4), "cudaMallocHost");
    logits_rows = std::min<size_t>(R, 256);
    check(cudaMallocHost(&host_logits, logits_rows * size_t(c.vocab_size) * 4), "cudaMallocHost");
    y_logits = alloc<float>(logits_rows * size_t(c.vocab_size) * 4, "logits");
  }
  float* y_logits = nullptr;

  bool offload_prefetches() const {
    for (const DevBlock& b : blocks)
      if (b.offload_layer >= 0 && offload->prefetch_target(b.offload_layer) >= 0) return true;
    return false;
  }

  // ---- ops ----

  // y [T, out] = W x [T, in]: matvec for decode-sized batches, else BF16 tensor-core GEMM.
  void linear(const DevLinear& l, const float* xin, int T, float* yout) {
    product(l.fmt, l.w, l.scale, l.bo, l.bi, l.out, l.in, xin, T, yout);
  }
  // The products of one DevFused group: lin[i] x -> outs[i] for every present part, one launch
  // for the stacked parts in a decode step.
  void linear_group(const DevFused& f, const std::vector<const DevLinear*>& lin, const std::vector<float*>& outs,
                    const float* xin, int T) {
    if (f.all.present() && T <= kDecodeRows) {
      int o[4];
      float* ys[4];
      for (size_t i = 0; i < f.parts.size(); ++i) o[i] = lin[f.parts[i]]->out, ys[i] = outs[f.parts[i]];
      matvec_multi(f.all.fmt, f.all.w, f.all.scale, f.all.bo, f.all.bi, o, ys, int(f.parts.size()), f.all.in, xin, T,
                   stream);
    } else {
      for (int i : f.parts) linear(*lin[i], xin, T, outs[i]);
    }
    for (int i : f.solo) linear(*lin[i], xin, T, outs[i]);
  }
  // Decode-sized batches: matvec; more rows: BF16 tensor cores, or (opt.prefill_gemm off)
  // matvec over chunks of 16 rows, float32 throughout.
  void product(WeightFormat f, const void* w, const float* scale, int bo, int bi, int out, int in, const float* xin,
               int T, float* yout) {
    if (T > kDecodeRows && opt.prefill_gemm) {
      dequant_bf16(f, w, scale, bo, bi, out, in, dq, stream);
      gemm_bf16(dq, out, in, xin, T, yout, stream);
      return;
    }
    for (int t0 = 0; t0 < T; t0 += kDecodeRows)
      matvec_any(f, w, scale, bo, bi, out, in, xin + size_t(t0) * in, std::min(kDecodeRows, T - t0),
                 yout + size_t(t0) * out);
  }
  void matvec_any(WeightFormat f, const void* w, const float* scale, int bo, int bi, int out, int in, const float* xin,
                  int B, float* yout) {
    if (f == WeightFormat::FP8_E4M3) matvec_fp8(w, scale, bo, bi, out, in, xin, B, yout, stream);
    else matvec(f, w, scale, out, in, xin, B, yout, stream);
  }

  void attention(const DevBlock& b, int layer, const std::vector<CudaSequence*>& seqs, const std::vector<int>& rows0,
                 const std::vector<int>& nrows, int R, bool dev, int ncap, std::vector<int>& seq_sel_k) {
    const int H = c.num_attention_heads, kvr = c.kv_lora_rank, nope = c.qk_nope_head_dim, rope = c.qk_rope_head_dim;
    const int qkh = nope + rope, vd = c.v_head_dim, ql = c.q_lora_rank;
    const cpu::Rope& mr = model.rope();
    // Query: q_b(RMSNorm(q_a h)) or q_proj h.
    // The products of h (fused in a decode step): the query's first projection, kv_a, and the
    // indexer's key and head-weight projections (its keys for every row, into kbuf).
    linear_group(b.f_h, {ql > 0 ? &b.q_a : &b.q_proj, &b.kv_a, &b.idx_wk, &b.idx_weights_proj},
                 {ql > 0 ? cq : q, kv, kbuf, wts}, h, R);
    if (ql > 0) {
      rms_norm(cq, b.q_a_norm, R, ql, float(kLoraNormEps), cq, stream);
      linear_group(b.f_cq, {&b.q_b, &b.idx_wq_b}, {q, qi}, cq, R);
    }
    // Absorb: q̃ = W_UKᵀ q_nope for every row, and q_pe gathered contiguous (roped below).
    head_matvec(b.kvb_fmt, b.wuk_t, H, kvr, nope, q, H * qkh, qkh, R, qt, stream);
    const int Hi = c.index_n_heads, Di = c.index_head_dim;
    // Per sequence: rope at its positions, its cache, its indexer top-k, attention over it. In a
    // decode step (dev) positions come from pos_dev (graph-capturable) and the key range is the
    // capacity ncap: keys past a sequence's position are masked on the device. The cache is the
    // layer's pools seen through the sequence's page table (its pages are in place: forward).
    const DevLayerCache& lc = caches[layer];
    for (size_t si = 0; si < seqs.size(); ++si) {
      const int r0 = rows0[si], T = nrows[si], pos0 = seqs[si]->n;
      const int* pd = dev ? pos_dev + si : nullptr;
      const PageTable pt{page_table + size_t(seqs[si]->id) * table_size, opt.page_rows};
      float* qs = q + size_t(r0) * H * qkh;
      float* kvs = kv + size_t(r0) * (kvr + rope);
      if (mr.dim == rope) {
        // q_pe roped into its gathered copy; c = RMSNorm(c) and rope(k_pe) straight into the cache.
        rope_to(qs, T * H, qkh, nope, rope, H, pos0, rope_freq, mr.attention_factor, mr.interleave,
                qpe + size_t(r0) * H * rope, rope, stream, pd);
        kv_to_cache(kvs, kvr + rope, T, kvr, b.kv_a_norm, float(kLoraNormEps), rope, rope_freq, mr.attention_factor,
                    mr.interleave, lc.latent, lc.k_pe, pos0, pd, stream, pt);
      } else {  // rope over part of q_pe / k_pe: the same steps one op at a time
        cuda::rope(qs, T * H, qkh, nope, mr.dim, H, pos0, rope_freq, mr.attention_factor, mr.interleave, stream, pd);
        check(cudaMemcpy2DAsync(qpe + size_t(r0) * H * rope, rope * 4, qs + nope, qkh * 4, rope * 4, size_t(T) * H,
                                cudaMemcpyDeviceToDevice, stream),
              "cudaMemcpy2DAsync (q_pe)");
        rms_norm_strided(kvs, kvr + rope, b.kv_a_norm, T, kvr, float(kLoraNormEps), kvs, kvr + rope, stream);
        cuda::rope(kvs, T, kvr + rope, kvr, mr.dim, 1, pos0, rope_freq, mr.attention_factor, mr.interleave, stream, pd);
        append_rows(lc.latent, kvr, pos0, pd, kvs, kvr + rope, T, kvr, stream, pt);
        append_rows(lc.k_pe, rope, pos0, pd, kvs + kvr, kvr + rope, T, rope, stream, pt);
      }
      const int N = dev ? ncap : pos0 + T, p0 = dev ? ncap - T : pos0;  // key range, and its last row's start
      const int sw = dev ? std::max(c.index_topk, opt.max_context) : c.index_topk;  // selection row width
      int* sel_s = sel + size_t(r0) * sw;
      if (b.indexer_full) {
        const cpu::Rope& ir = model.indexer_rope();
        float* qis = qi + size_t(r0) * Hi * Di;
        cuda::rope(qis, T * Hi, Di, 0, ir.dim, Hi, pos0, idx_rope_freq, ir.attention_factor, ir.interleave, stream, pd);
        // The key: LayerNorm, rope over its first ir.dim values, into the indexer cache.
        index_key_to_cache(kbuf + size_t(r0) * Di, T, Di, b.idx_k_norm_w, b.idx_k_norm_b, float(kIndexerNormEps),
                           ir.dim, idx_rope_freq, ir.attention_factor, ir.interleave, lc.idx_k, pos0, pd, stream, pt);
        // In a decode step rows up to ncap - 1 are scored: past the sequence's pages the table
        // points at the spare page (zeros), and topk_select never reads those scores.
        dsa_indexer_scores(qis, lc.idx_k, wts + size_t(r0) * Hi, T, Hi, Di, N, p0, float(1.0 / std::sqrt(double(Hi))),
                           scores, stream, pt);
        // Keys past each row's position (not yet written in a decode step) are never read.
        topk_select(scores, T, N, dev ? 0 : pos0, c.index_topk, sel_s, stream, pd);
        seq_sel_k[si] = c.index_topk;
      } else if (seq_sel_k[si] == 0 && dev) {
        // No selection yet (a model without indexer): dense causal attention as a selection.
        causal_selection(sel_s, T, N, pd, stream);
        seq_sel_k[si] = -N;  // dense; recomputed per layer as the cache is the same
      }
      const int k = seq_sel_k[si];
      mla_decode_attention(qt + size_t(r0) * H * kvr, qpe + size_t(r0) * H * rope, lc.latent, lc.k_pe, T, H, kvr, rope,
                           p0, k != 0 ? sel_s : nullptr, k > 0 ? k : -k, float(c.attn_scale()),
                           lat_o + size_t(r0) * H * kvr, stream, pt);
    }
    head_matvec(b.kvb_fmt, b.wuv, H, vd, kvr, lat_o, H * kvr, kvr, R, o, stream);
    linear(b.o, o, R, y);
  }

  void ffn(const DevBlock& b, int R) {
    const int d = c.hidden_size;
    if (!b.moe) {
      linear_group(b.f_gu, {&b.gate, &b.up}, {ffn_g, ffn_u}, h, R);
      silu_mul(ffn_g, ffn_u, size_t(R) * b.gate.out, ffn_g, stream);
      linear(b.down, ffn_g, R, y);
      add_inplace(x, y, size_t(R) * d, stream);
      return;
    }
    const int E = c.n_routed_experts, K = c.num_experts_per_tok, mi = c.moe_intermediate_size;
    // The shared expert: in a decode step on the side stream, concurrent with the routed path
    // (it reads only h and writes only its own buffers; prefill products share the BF16 scratch,
    // so they stay in order).
    auto shared_expert = [&](float* g, float* u) {
      linear_group(b.f_sh, {&b.sh_gate, &b.sh_up}, {g, u}, h, R);
      silu_mul(g, u, size_t(R) * b.sh_gate.out, g, stream);
      linear(b.sh_down, g, R, ys);
    };
    const bool has_shared = b.sh_gate.present(), par = has_shared && R <= kDecodeRows;
    if (par) {
      check(cudaEventRecord(ev_fork, stream), "cudaEventRecord");
      check(cudaStreamWaitEvent(side, ev_fork, 0), "cudaStreamWaitEvent");
      std::swap(stream, side);  // the ops below enqueue on `stream`
      try {
        shared_expert(sh_g, sh_u);
      } catch (...) {
        std::swap(stream, side);
        throw;
      }
      std::swap(stream, side);
      check(cudaEventRecord(ev_join, side), "cudaEventRecord");
    }
    linear(b.router, h, R, logits);
    moe_route(logits, b.correction_bias, R, E, c.n_group, c.topk_group, K, c.norm_topk_prob,
              float(c.routed_scaling_factor), ids, route_w, stream);
    if (routing) routing->record(int(&b - blocks.data()), ids, R, K, stream);
    const int S = R * K;
    if (R <= kDecodeRows) {
      // Decode: the grouped kernel reads the chosen experts from `ids` on the device; with host
      // experts, from their slots in the layer's pool once the streamed ones are copied in (-1
      // for the CPU's: zeros, their result is added by offload->finish). With prefetch, the next
      // host layer's choice is predicted here, so that it reaches the host with this one.
      const int* sid = ids;
      if (b.offload_layer >= 0) {
        const int next = offload->prefetch_target(b.offload_layer);
        const int* next_ids = next >= 0 ? predict_route(blocks[size_t(next)], R) : nullptr;
        sid = offload->decode_begin(b.offload_layer, ids, route_w, h, R, next_ids);
      }
      matvec_grouped_glu(b.exp_gate.ew, b.exp_up.ew, mi, d, sid, S, h, K, ffn_u, ffn_g, stream);  // silu(gate) * up
      matvec_grouped(b.exp_down.ew, d, mi, sid, S, ffn_u, 1, ye, stream);
    } else {
      prefill_experts(b, R);
    }
    const float* shared = nullptr;
    if (par) {
      check(cudaStreamWaitEvent(stream, ev_join, 0), "cudaStreamWaitEvent");
      shared = ys;
    } else if (has_shared) {
      shared_expert(ffn_g, ffn_u);
      shared = ys;
    }
    moe_combine(ye, route_w, R, K, d, shared, x, stream);
    if (b.offload_layer >= 0) offload->finish(b.offload_layer, x, R);  // CPU experts, while the GPU works
  }

  // Prefetch's guess at layer n's choice: n's post-attention norm and router on this layer's
  // residual x (the attention output added, the MoE output not yet), routed as moe_route routes
  // n's own input. Writes only the pred_* buffers. Returns the ids [R, K] (device).
  const int* predict_route(const DevBlock& n, int R) {
    rms_norm(x, n.post_norm, R, c.hidden_size, float(c.rms_norm_eps), pred_h, stream);
    linear(n.router, pred_h, R, pred_logits);
    moe_route(pred_logits, n.correction_bias, R, c.n_routed_experts, c.n_group, c.topk_group, c.num_experts_per_tok,
              c.norm_topk_prob, float(c.routed_scaling_factor), pred_ids, pred_w, stream);
    return pred_ids;
  }

  // Prefill: the router's choice comes to the host, each expert's tokens are gathered and run
  // as one product (matvec for up to 16 tokens, else dequantize + GEMM), then scattered to
  // their slots. With host experts the offload executor says where each expert runs: a slot of
  // the layer's pool (a streamed one is copied in first) or the CPU (its slots stay zero here;
  // offload->finish adds its result).
  void prefill_experts(const DevBlock& b, int R) {
    const int d = c.hidden_size, K = c.num_experts_per_tok, mi = c.moe_intermediate_size, E = c.n_routed_experts;
    const int S = R * K, ol = b.offload_layer;
    std::vector<int> hid(S);
    if (ol >= 0) {
      const int* hi = offload->prefill_begin(ol, ids, route_w, h, R);
      std::copy(hi, hi + S, hid.begin());
    } else {
      check(cudaMemcpyAsync(hid.data(), ids, size_t(S) * 4, cudaMemcpyDeviceToHost, stream), "cudaMemcpyAsync (ids)");
      check(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
    }
    std::vector<int> count(E + 1, 0), start(E + 1, 0);
    for (int s = 0; s < S; ++s)
      if (hid[s] >= 0 && hid[s] < E) ++count[hid[s]];
    for (int e = 0; e < E; ++e) start[e + 1] = start[e] + count[e];
    std::vector<int> slots(S), toks(S), fill(start.begin(), start.end() - 1);
    for (int s = 0; s < S; ++s)
      if (hid[s] >= 0 && hid[s] < E) {
        int at = fill[hid[s]]++;
        slots[at] = s;
        toks[at] = s / K;
      }
    const int *up_slots = slots.data(), *up_toks = toks.data();
    if (ol >= 0) {
      // From pinned memory: no sync at the end, so the GPU's experts overlap the CPU's.
      int* pin = offload->pinned_rows();
      std::copy(slots.begin(), slots.end(), pin);
      std::copy(toks.begin(), toks.end(), pin + S);
      up_slots = pin;
      up_toks = pin + S;
    }
    check(cudaMemcpyAsync(slot_rows, up_slots, size_t(S) * 4, cudaMemcpyHostToDevice, stream), "cudaMemcpyAsync");
    check(cudaMemcpyAsync(slot_tokens, up_toks, size_t(S) * 4, cudaMemcpyHostToDevice, stream), "cudaMemcpyAsync");
    check(cudaMemsetAsync(ye, 0, size_t(S) * d * 4, stream), "cudaMemsetAsync");
    for (int e = 0; e < E; ++e) {
      const int n = count[e];
      if (n == 0) continue;
      int slot = e;
      if (ol >= 0 && (slot = offload->prefill_stage(ol, e)) < 0) continue;  // the CPU's
      gather_rows(h, slot_tokens + start[e], n, d, xe, stream);
      expert_linear(b.exp_gate, slot, xe, n, ge);
      expert_linear(b.exp_up, slot, xe, n, ue);
      silu_mul(ge, ue, size_t(n) * mi, ge, stream);
      expert_linear(b.exp_down, slot, ge, n, yexp);
      scatter_rows(yexp, slot_rows + start[e], n, d, ye, stream);
    }
    // The uploads read pageable host vectors; they finish before this function returns.
    if (ol < 0) check(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
  }

  void expert_linear(const DevExperts& x_, int e, const float* xin, int n, float* yout) {
    const ExpertWeights& ew = x_.ew;
    const void* w = static_cast<const uint8_t*>(ew.w) + size_t(e) * ew.w_stride;
    const float* sc = ew.scale ? ew.scale + size_t(e) * ew.scale_stride : nullptr;
    product(ew.fmt, w, sc, ew.bo, ew.bi, x_.out, x_.in, xin, n, yout);
  }
};

GlmDsaCuda::GlmDsaCuda(const GlmDsaModel& model, const GlmDsaCudaOptions& opt) : cfg_(model.config()) {
  BIGMOE_CHECK(opt.max_context >= 1 && opt.max_sequences >= 1 && opt.max_rows >= 1 && opt.page_rows >= 1 &&
                   opt.cache_pages >= 0,
               "GlmDsaCuda: bad options (max_context {}, max_sequences {}, max_rows {}, page_rows {}, cache_pages {})",
               opt.max_context, opt.max_sequences, opt.max_rows, opt.page_rows, opt.cache_pages);
  if (device_count() == 0) fail("no CUDA device");
  check(cudaSetDevice(opt.device), "cudaSetDevice");
  impl_ = std::make_unique<Impl>(model, opt);
  Impl& I = *impl_;
  const ModelConfig& c = cfg_;
  if (c.hidden_size % 4 != 0) fail("GlmDsaCuda: hidden_size {} is not a multiple of 4", c.hidden_size);
  check(cudaStreamCreateWithFlags(&I.stream, cudaStreamNonBlocking), "cudaStreamCreate");
  check(cudaStreamCreateWithFlags(&I.side, cudaStreamNonBlocking), "cudaStreamCreate");
  check(cudaEventCreateWithFlags(&I.ev_fork, cudaEventDisableTiming), "cudaEventCreate");
  check(cudaEventCreateWithFlags(&I.ev_join, cudaEventDisableTiming), "cudaEventCreate");
  const int L = c.num_hidden_layers;
  ExpertOffload::validate(c, model.layers(), opt.experts);
  if (opt.experts.any_host())
    I.offload = std::make_unique<ExpertOffload>(
        c, opt.experts, opt.max_rows, I.stream,
        [&I](size_t n, const std::string& what) { return I.alloc<void>(n, what); }, &Impl::placed_data);
  for (int i = 0; i < L; ++i) {
    if (opt.progress) std::fprintf(stderr, "\rupload: layer %d/%d", i + 1, L);
    I.blocks.push_back(I.place_block(model.layers()[i], i, fmt::format("layer {} ", i)));
  }
  if (I.offload) {
    I.offload->place(opt.progress);
    for (DevBlock& b : I.blocks)
      if (b.offload_layer >= 0) {
        b.exp_gate = I.offload->experts(b.offload_layer, 0);
        b.exp_up = I.offload->experts(b.offload_layer, 1);
        b.exp_down = I.offload->experts(b.offload_layer, 2);
      }
  }
  if (opt.progress) std::fprintf(stderr, "\rupload: lm_head            ");
  I.final_norm = I.upload_vec(model.final_norm(), "final norm");
  I.lm_head = I.place(model.lm_head(), "lm_head");
  I.rope_freq = I.upload_vec(model.rope().inv_freq, "rope");
  I.idx_rope_freq = I.upload_vec(model.indexer_rope().inv_freq, "indexer rope");
  I.allocate_work();
  // The paged cache: cache_pages pages per pool (default: every sequence at full context), one
  // more for the spare page that unused table entries point at, zeroed.
  I.seq_used.assign(opt.max_sequences, false);
  const int P = opt.page_rows;
  I.table_size = PagePool::pages_for(opt.max_context, P);
  const int64_t n_pages = opt.cache_pages > 0 ? opt.cache_pages : int64_t(opt.max_sequences) * I.table_size;
  if ((n_pages + 1) * P > INT32_MAX)
    fail("GlmDsaCuda: a cache pool of {} pages of {} positions exceeds 2^31 rows (lower cache_pages or max_context)",
         n_pages + 1, P);
  I.pages = std::make_unique<PagePool>(int(n_pages), P, opt.max_sequences, I.table_size);
  I.page_table = I.alloc<int>(size_t(opt.max_sequences) * I.table_size * 4, "cache page tables");
  {
    const std::vector<int> null_tables(size_t(opt.max_sequences) * I.table_size, I.pages->null_page());
    check(cudaMemcpy(I.page_table, null_tables.data(), null_tables.size() * 4, cudaMemcpyHostToDevice),
          "cudaMemcpy (page tables)");
  }
  const size_t pool_rows = size_t(n_pages + 1) * P, spare = size_t(n_pages) * P;
  I.caches.resize(L);
  for (int i = 0; i < L; ++i) {
    DevLayerCache& lc = I.caches[i];
    auto pool = [&](int width, const char* what) {
      float* p = I.alloc<float>(pool_rows * width * 4, fmt::format("layer {} {} cache ({} pages of {} positions)", i,
                                                                   what, n_pages, P));
      check(cudaMemset(p + spare * width, 0, size_t(P) * width * 4), "cudaMemset (spare cache page)");
      return p;
    };
    lc.latent = pool(c.kv_lora_rank, "latent");
    lc.k_pe = pool(c.qk_rope_head_dim, "k_pe");
    if (I.blocks[i].indexer_full) lc.idx_k = pool(c.index_head_dim, "indexer");
  }
  if (opt.progress) std::fprintf(stderr, "\rupload: %.2f GiB on the device\n", I.resident / 1073741824.0);
  resident_bytes_ = I.resident;
}

GlmDsaCuda::~GlmDsaCuda() {
  try {
    flush_routing_stats();
  } catch (const Error&) {  // a destructor cannot throw; the counts since the last flush are lost
  }
}

CudaSequence GlmDsaCuda::new_sequence() {
  for (size_t s = 0; s < impl_->seq_used.size(); ++s)
    if (!impl_->seq_used[s]) {
      impl_->seq_used[s] = true;
      return CudaSequence{int(s), 0};
    }
  fail("GlmDsaCuda: all {} sequences are in use (raise max_sequences)", impl_->seq_used.size());
}

void GlmDsaCuda::free_sequence(CudaSequence& s) {
  if (s.id >= 0 && s.id < int(impl_->seq_used.size()) && impl_->seq_used[s.id]) {
    impl_->seq_used[s.id] = false;
    impl_->pages->shrink(s.id, 0);
  }
  s.id = -1;
  s.n = 0;
}

void GlmDsaCuda::truncate(CudaSequence& s, int n_keep) {
  if (n_keep < 0 || n_keep > s.n) fail("truncate: {} outside 0..{}", n_keep, s.n);
  if (s.id < 0 || s.id >= int(impl_->seq_used.size()) || !impl_->seq_used[s.id])
    fail("truncate: sequence {} is not live", s.id);
  // Whole pages past n_keep go back to the pool; positions n_keep.. of the last kept page are
  // overwritten as the sequence grows again.
  impl_->pages->shrink(s.id, n_keep);
  s.n = n_keep;
}

std::vector<int> GlmDsaCuda::cache_pages(const CudaSequence& s) const {
  if (s.id < 0 || s.id >= int(impl_->seq_used.size()) || !impl_->seq_used[s.id])
    fail("cache_pages: sequence {} is not live", s.id);
  return impl_->pages->pages(s.id);
}

int GlmDsaCuda::free_cache_pages() const { return impl_->pages->free_pages(); }

size_t GlmDsaCuda::decode_bytes_layer(int layer, int rows) const {
  const Impl& I = *impl_;
  if (layer == cfg_.num_hidden_layers) return I.lm_head.bytes;
  BIGMOE_CHECK(layer >= 0 && layer < cfg_.num_hidden_layers, "decode_bytes_layer: no layer {}", layer);
  const DevBlock& k = I.blocks[layer];
  size_t b = k.kvb_bytes;
  for (const DevLinear* l : {&k.q_proj, &k.q_a, &k.q_b, &k.kv_a, &k.o, &k.idx_wq_b, &k.idx_wk, &k.idx_weights_proj,
                             &k.gate, &k.up, &k.down, &k.router, &k.sh_gate, &k.sh_up, &k.sh_down})
    b += l->bytes;
  if (k.moe) {
    const size_t E = size_t(cfg_.n_routed_experts), n_gpu = k.offload_layer >= 0 ? I.offload->n_gpu(layer) : E;
    b += size_t(std::min(cfg_.n_routed_experts, rows * cfg_.num_experts_per_tok)) *
         (k.exp_gate.bytes_per_expert + k.exp_up.bytes_per_expert + k.exp_down.bytes_per_expert) * n_gpu / E;
  }
  return b;
}

size_t GlmDsaCuda::decode_bytes_per_token(int rows) const {
  size_t b = 0;
  for (int l = 0; l <= cfg_.num_hidden_layers; ++l) b += decode_bytes_layer(l, rows);
  return b;
}

size_t GlmDsaCuda::decode_host_bytes_layer(int layer, int rows) const {
  const Impl& I = *impl_;
  BIGMOE_CHECK(layer >= 0 && layer <= cfg_.num_hidden_layers, "decode_host_bytes_layer: no layer {}", layer);
  if (layer == cfg_.num_hidden_layers) return 0;
  const DevBlock& k = I.blocks[layer];
  if (k.offload_layer < 0) return 0;
  const size_t E = size_t(cfg_.n_routed_experts), n_host = E - size_t(I.offload->n_gpu(layer));
  return size_t(std::min(cfg_.n_routed_experts, rows * cfg_.num_experts_per_tok)) *
         (k.exp_gate.bytes_per_expert + k.exp_up.bytes_per_expert + k.exp_down.bytes_per_expert) * n_host / E;
}

size_t GlmDsaCuda::decode_host_bytes_per_token(int rows) const {
  size_t b = 0;
  for (int l = 0; l < cfg_.num_hidden_layers; ++l) b += decode_host_bytes_layer(l, rows);
  return b;
}

size_t GlmDsaCuda::host_pinned_bytes() const { return impl_->offload ? impl_->offload->pinned_bytes() : 0; }
size_t GlmDsaCuda::host_packed_bytes() const { return impl_->offload ? impl_->offload->packed_bytes() : 0; }

void GlmDsaCuda::set_routing_stats(RoutingStats* stats) {
  Impl& I = *impl_;
  if (stats && (stats->n_experts() != cfg_.n_routed_experts || stats->top_k() != cfg_.num_experts_per_tok))
    fail("set_routing_stats: the stats count {} experts of top-{}, the model routes to {} of {}", stats->n_experts(),
         stats->top_k(), cfg_.num_experts_per_tok, cfg_.n_routed_experts);
  flush_routing_stats();
  if (bool(stats) != bool(I.routing)) {
    // The captured decode graphs hold the counting kernel or not: capture them again.
    for (auto& g : I.graphs)
      if (g.second.exec) cudaGraphExecDestroy(g.second.exec);
    I.graphs.clear();
    I.routing = stats ? std::make_unique<RoutingCounter>(cfg_.num_hidden_layers, cfg_.n_routed_experts, I.stream)
                      : nullptr;
  }
  I.routing_stats = stats;
}

void GlmDsaCuda::flush_routing_stats() {
  Impl& I = *impl_;
  if (I.routing && I.routing_stats) I.routing->flush(*I.routing_stats, I.stream);
}

OffloadStats GlmDsaCuda::offload_stats() const {
  if (impl_->offload) return impl_->offload->stats();
  OffloadStats s;
  s.layer_cache_hit_rate.assign(size_t(cfg_.num_hidden_layers), 0.0);
  return s;
}

void GlmDsaCuda::reset_offload_stats() {
  if (impl_->offload) impl_->offload->reset_stats();
}

double GlmDsaCuda::cache_hit_rate(int layer) const {
  BIGMOE_CHECK(layer >= 0 && layer < cfg_.num_hidden_layers, "cache_hit_rate: no layer {}", layer);
  const DevBlock& k = impl_->blocks[layer];
  return k.offload_layer >= 0 ? impl_->offload->cache_hit_rate(layer) : 0.0;
}

std::vector<float> GlmDsaCuda::forward(const std::vector<CudaSequence*>& seqs,
                                       const std::vector<std::vector<int>>& tokens, bool last_only) {
  Impl& I = *impl_;
  const ModelConfig& c = cfg_;
  if (seqs.size() != tokens.size()) fail("forward: {} sequences but {} token lists", seqs.size(), tokens.size());
  int total = 0;
  for (size_t i = 0; i < seqs.size(); ++i) {
    if (!seqs[i] || seqs[i]->id < 0 || seqs[i]->id >= int(I.seq_used.size()) || !I.seq_used[seqs[i]->id])
      fail("forward: sequence {} is not live", i);
    for (size_t j = 0; j < i; ++j)
      if (seqs[j]->id == seqs[i]->id) fail("forward: sequence {} appears twice in one step", seqs[i]->id);
    I.model.check_tokens(tokens[i]);
    if (seqs[i]->n + int(tokens[i].size()) > I.opt.max_context)
      fail("forward: sequence at {} positions + {} tokens exceeds the context of {} positions", seqs[i]->n,
           tokens[i].size(), I.opt.max_context);
    total += int(tokens[i].size());
  }
  const int V = c.vocab_size, d = c.hidden_size;
  std::vector<float> out;
  if (total == 0) return out;

  for (size_t i = 0; i < seqs.size(); ++i)
    if (tokens[i].empty()) fail("forward: sequence {} of the step has no tokens", i);

  // Cache pages for every position this call writes (all or none: the error names the sequence
  // and position), then their page-table entries to the device ahead of the step. A captured
  // graph reads the tables from there, so growing into a new page needs no re-capture.
  {
    std::vector<std::pair<int, int>> rows;
    for (size_t i = 0; i < seqs.size(); ++i) rows.emplace_back(seqs[i]->id, seqs[i]->n + int(tokens[i].size()));
    I.pages->reserve(rows);
    for (const CudaSequence* sq : seqs) I.upload_table(sq->id);
  }

  // Chunk: at most max_rows rows per step (and no more than the logits buffer holds when every
  // row's logits are wanted); a long prompt runs as consecutive steps of its rows.
  const int step_rows = last_only ? I.opt.max_rows : std::min(I.opt.max_rows, int(I.logits_rows));
  if (total > step_rows) {
    std::vector<float> all;
    for (size_t i = 0; i < seqs.size(); ++i)
      for (size_t t0 = 0; t0 < tokens[i].size(); t0 += size_t(step_rows)) {
        size_t t1 = std::min(tokens[i].size(), t0 + size_t(step_rows));
        std::vector<int> part(tokens[i].begin() + t0, tokens[i].begin() + t1);
        auto r = forward({seqs[i]}, {part}, last_only);
        if (!last_only || t1 == tokens[i].size()) all.insert(all.end(), r.begin(), r.end());
      }
    return all;
  }

  std::vector<int> rows0(seqs.size()), nrows(seqs.size());
  int R = 0, need = 0;
  for (size_t i = 0; i < seqs.size(); ++i) {
    rows0[i] = R;
    nrows[i] = int(tokens[i].size());
    for (int t : tokens[i]) I.model.embed(t, I.host_x + size_t(R++) * d);
    I.pos_host[i] = seqs[i]->n;
    need = std::max(need, seqs[i]->n + nrows[i]);
  }
  // A decode step (<= 16 rows) reads positions from the device and attends over a key capacity
  // (a power of two >= every sequence's length): its kernels' arguments do not change from step
  // to step, so it is captured once per (sequences, rows, capacity) as a CUDA graph and replayed.
  const bool dev = R <= kDecodeRows;
  int ncap = 0;
  if (dev) {
    ncap = 64;
    while (ncap < need) ncap *= 2;
    ncap = std::min(ncap, I.opt.max_context);
  }
  const int nout = last_only ? int(seqs.size()) : R;
  auto enqueue = [&] {
    check(cudaMemcpyAsync(I.x, I.host_x, size_t(R) * d * 4, cudaMemcpyHostToDevice, I.stream), "cudaMemcpyAsync (x)");
    if (dev)
      check(cudaMemcpyAsync(I.pos_dev, I.pos_host, seqs.size() * 4, cudaMemcpyHostToDevice, I.stream),
            "cudaMemcpyAsync (positions)");
    I.enqueue_layers(seqs, rows0, nrows, R, dev, ncap, last_only, profiling_ ? &layer_ms_ : nullptr);
    check(cudaMemcpyAsync(I.host_logits, I.y_logits, size_t(nout) * V * 4, cudaMemcpyDeviceToHost, I.stream),
          "cudaMemcpyAsync (logits)");
  };
  if (dev && graphs_ && !profiling_ && !I.offload) {
    std::string key = fmt::format("{}", ncap);
    for (size_t i = 0; i < seqs.size(); ++i) key += fmt::format(",{}:{}", seqs[i]->id, nrows[i]);
    key += last_only ? "L" : "A";
    auto it = I.graphs.find(key);
    if (it == I.graphs.end()) {
      // First use runs eagerly (workspaces grow outside any capture); the next one captures.
      enqueue();
      if (I.graphs.size() >= 64) {
        for (auto& g : I.graphs)
          if (g.second.exec) cudaGraphExecDestroy(g.second.exec);
        I.graphs.clear();
      }
      I.graphs[key] = Impl::Graph{};
    } else {
      if (!it->second.exec) {
        cudaGraph_t graph = nullptr;
        check(cudaStreamBeginCapture(I.stream, cudaStreamCaptureModeThreadLocal), "cudaStreamBeginCapture");
        try {
          enqueue();
        } catch (...) {
          cudaStreamEndCapture(I.stream, &graph);
          if (graph) cudaGraphDestroy(graph);
          throw;
        }
        check(cudaStreamEndCapture(I.stream, &graph), "cudaStreamEndCapture");
        cudaError_t e = cudaGraphInstantiate(&it->second.exec, graph, 0);
        cudaGraphDestroy(graph);
        check(e, "cudaGraphInstantiate");
      }
      check(cudaGraphLaunch(it->second.exec, I.stream), "cudaGraphLaunch");
    }
  } else {
    enqueue();
  }
  check(cudaStreamSynchronize(I.stream), "forward");
  if (profiling_) I.finish_profile(layer_ms_);
  for (size_t i = 0; i < seqs.size(); ++i) seqs[i]->n += nrows[i];
  out.assign(I.host_logits, I.host_logits + size_t(nout) * V);
  return out;
}

void GlmDsaCuda::Impl::enqueue_layers(const std::vector<CudaSequence*>& seqs, const std::vector<int>& rows0,
                                      const std::vector<int>& nrows, int R, bool dev, int ncap, bool last_only,
                                      std::vector<float>* prof) {
  const int L = c.num_hidden_layers, d = c.hidden_size;
  if (prof) {
    if (events.empty()) {
      events.resize(L + 2);
      for (auto& e : events) check(cudaEventCreate(&e), "cudaEventCreate");
    }
    check(cudaEventRecord(events[0], stream), "cudaEventRecord");
  }
  // Per sequence: the width of its current selection (a "full" indexer layer's top-k, reused by
  // the "shared" layers after it); 0 = none yet, negative = dense causal selection.
  std::vector<int> seq_sel_k(seqs.size(), 0);
  for (int i = 0; i < L; ++i) {
    const DevBlock& b = blocks[i];
    rms_norm(x, b.input_norm, R, d, float(c.rms_norm_eps), h, stream);
    attention(b, i, seqs, rows0, nrows, R, dev, ncap, seq_sel_k);
    add_inplace(x, y, size_t(R) * d, stream);
    rms_norm(x, b.post_norm, R, d, float(c.rms_norm_eps), h, stream);
    ffn(b, R);
    if (prof) check(cudaEventRecord(events[i + 1], stream), "cudaEventRecord");
  }
  // Final norm and lm_head over the rows whose logits are wanted.
  rms_norm(x, final_norm, R, d, float(c.rms_norm_eps), h, stream);
  int nout = R;
  const float* hin = h;
  if (last_only) {
    nout = int(seqs.size());
    for (size_t i = 0; i < seqs.size(); ++i)
      check(cudaMemcpyAsync(y + i * d, h + size_t(rows0[i] + nrows[i] - 1) * d, size_t(d) * 4,
                            cudaMemcpyDeviceToDevice, stream),
            "cudaMemcpyAsync (last rows)");
    hin = y;
  }
  linear(lm_head, hin, nout, y_logits);
  if (prof) check(cudaEventRecord(events[L + 1], stream), "cudaEventRecord");
}

void GlmDsaCuda::Impl::finish_profile(std::vector<float>& ms) {
  const int L = c.num_hidden_layers;
  ms.assign(L + 1, 0.f);
  for (int i = 0; i <= L; ++i) check(cudaEventElapsedTime(&ms[i], events[i], events[i + 1]), "cudaEventElapsedTime");
}

namespace {

class CudaLm;

class CudaSession : public Session {
 public:
  CudaSession(GlmDsaCuda& g) : g_(g), s_(g.new_sequence()) {}
  ~CudaSession() override { g_.free_sequence(s_); }
  std::vector<float> feed(const std::vector<int>& tokens) override { return g_.forward({&s_}, {tokens}, true); }
  std::vector<float> feed_all(const std::vector<int>& tokens) override { return g_.forward({&s_}, {tokens}, false); }
  int n_past() const override { return s_.n; }
  void truncate(int n_keep) override { g_.truncate(s_, n_keep); }

 private:
  GlmDsaCuda& g_;
  CudaSequence s_;
};

class CudaLm : public LanguageModel {
 public:
  CudaLm(std::unique_ptr<GlmDsaModel> m, const GlmDsaCudaOptions& o)
      : m_(std::move(m)), g_(std::make_unique<GlmDsaCuda>(*m_, o)), ctx_(o.max_context) {}
  int vocab_size() const override { return m_->vocab_size(); }
  int context_length() const override { return std::min(ctx_, m_->context_length()); }
  std::unique_ptr<Session> new_session() const override { return std::make_unique<CudaSession>(*g_); }

 private:
  std::unique_ptr<GlmDsaModel> m_;
  std::unique_ptr<GlmDsaCuda> g_;
  int ctx_;
};

}  // namespace

std::unique_ptr<LanguageModel> make_cuda_language_model(std::unique_ptr<GlmDsaModel> model,
                                                        const GlmDsaCudaOptions& opt) {
  return std::make_unique<CudaLm>(std::move(model), opt);
}

}  // namespace bigmoe::cuda
