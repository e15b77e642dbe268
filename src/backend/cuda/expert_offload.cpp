#include "backend/cuda/expert_offload.h"

#include <cuda_runtime.h>
#include <fmt/format.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>

#include "backend/cuda/model_ops.h"
#include "util/error.h"

namespace bigmoe::cuda {

namespace {

constexpr int kDecodeRows = 16;  // GlmDsaCuda's decode steps (the grouped kernel's batches)
const char* const kProj[3] = {"gate_proj", "up_proj", "down_proj"};

double ms_since(std::chrono::steady_clock::time_point t) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t).count();
}

// CPUs this process may use on each NUMA node (nodes 0 .. numa_node_count() - 1).
std::vector<int> node_cpu_counts() {
  std::vector<int> c(static_cast<size_t>(cpu::numa_node_count()));
  for (size_t n = 0; n < c.size(); ++n) c[n] = int(cpu::numa_node_cpus(int(n)).size());
  return c;
}

}  // namespace

bool ExpertOffload::host_layer(const ExpertPlacement& p, int layer) {
  if (layer < 0 || size_t(layer) >= p.home.size()) return false;
  for (ExpertHome h : p.home[size_t(layer)])
    if (h != ExpertHome::Gpu) return true;
  return false;
}

void ExpertOffload::validate(const ModelConfig& c, const std::vector<BlockWeights>& layers,
                             const ExpertPlacement& p) {
  const int L = c.num_hidden_layers;
  if (!p.home.empty() && int(p.home.size()) != L)
    fail("expert placement: {} layers placed, the model has {} main layers", p.home.size(), L);
  for (size_t i = 0; i < p.home.size(); ++i) {
    const auto& h = p.home[i];
    if (h.empty()) continue;
    const FfnWeights& f = layers[i].ffn;
    if (!f.moe) {
      for (size_t e = 0; e < h.size(); ++e)
        if (h[e] != ExpertHome::Gpu)
          fail("expert placement: layer {} is dense (no routed experts), but expert {} is placed '{}'", i, e,
               expert_home_name(h[e]));
      continue;
    }
    if (h.size() != f.exp_gate.size())
      fail("expert placement: layer {} places {} experts, the layer has {}", i, h.size(), f.exp_gate.size());
    for (size_t e = 0; e < h.size(); ++e)
      if (uint8_t(h[e]) > uint8_t(ExpertHome::Mixed))
        fail("expert placement: layer {} expert {} has no valid home ({})", i, e, int(h[e]));
  }
  if (!p.node.empty() && int(p.node.size()) != L)
    fail("expert placement: NUMA nodes for {} layers, the model has {} main layers", p.node.size(), L);
  const std::vector<int> cpus = node_cpu_counts();
  for (size_t i = 0; i < p.home.size(); ++i)
    if (host_layer(p, int(i))) expert_nodes(int(i), p.home[i], i < p.node.size() ? p.node[i] : std::vector<int>{}, cpus);
  if (!(p.mixed_cpu_fraction >= 0 && p.mixed_cpu_fraction <= 1))
    fail("expert placement: mixed_cpu_fraction {} outside [0, 1]", p.mixed_cpu_fraction);
  if (p.cache_slots < 0) fail("expert placement: {} cache slots", p.cache_slots);
  if (p.cpu_threads < 0) fail("expert placement: {} CPU threads", p.cpu_threads);
  ExpertCache::parse_policy(p.cache_policy);
}

ExpertOffload::ExpertOffload(const ModelConfig& c, const ExpertPlacement& p, int max_rows, CUstream_st* stream,
                             Alloc alloc, Write write)
    : c_(c), p_(p), max_rows_(max_rows), stream_(stream), alloc_(std::move(alloc)), write_(std::move(write)) {
  layer_index_.assign(size_t(c.num_hidden_layers), -1);
  node_cpus_ = node_cpu_counts();
}

ExpertOffload::~ExpertOffload() {
  runner_.reset();
  if (copy_stream_) {
    // Mispredicted prefetches nobody waited on may still be copying (into the pools GlmDsaCuda
    // frees after this).
    cudaStreamSynchronize(copy_stream_);
    for (Layer& L : layers_) {
      for (cudaEvent_t e : L.ready) cudaEventDestroy(e);
      if (L.read_done) cudaEventDestroy(L.read_done);
    }
    if (demand_done_) cudaEventDestroy(demand_done_);
    cudaStreamDestroy(copy_stream_);
  }
  for (const Pinned& q : pinned_) {
    if (!q.bytes) {
      cudaFreeHost(q.p);
      continue;
    }
    cudaHostUnregister(q.p);
    munmap(q.p, q.bytes);
  }
}

ExpertOffload::Layer& ExpertOffload::get(int layer) {
  const int i = layer >= 0 && layer < int(layer_index_.size()) ? layer_index_[size_t(layer)] : -1;
  if (i < 0) fail("expert offload: layer {} has no host experts", layer);
  return layers_[size_t(i)];
}

const ExpertOffload::Layer& ExpertOffload::get(int layer) const {
  return const_cast<ExpertOffload*>(this)->get(layer);
}

void* ExpertOffload::pinned(size_t bytes, const std::string& what) {
  void* q = nullptr;
  cudaError_t e = cudaHostAlloc(&q, std::max<size_t>(bytes, 16), cudaHostAllocDefault);
  if (e != cudaSuccess)
    fail("CUDA: cannot pin {:.1f} MiB of host memory for {} ({:.1f} MiB pinned already): {}", bytes / 1048576.0, what,
         pinned_bytes_ / 1048576.0, cudaGetErrorString(e));
  pinned_.push_back({q, 0});
  pinned_bytes_ += bytes;
  return q;
}

// cudaHostAlloc faults its pages in itself, wherever the allocating thread's policy puts them,
// before they could be bound. So the range is mapped here, bound to the node (mbind,
// MPOL_PREFERRED) while untouched, and then page-locked with cudaHostRegister, whose faults
// follow the range's policy. Where the kernel has no NUMA support the bind fails silently and
// the pages go where the kernel puts them (as with cudaHostAlloc).
void* ExpertOffload::pinned_on_node(size_t bytes, int node, const std::string& what) {
  const size_t page = size_t(sysconf(_SC_PAGESIZE)), n = (std::max<size_t>(bytes, 16) + page - 1) / page * page;
  void* q = mmap(nullptr, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (q == MAP_FAILED)
    fail("cannot map {:.1f} MiB of host memory on NUMA node {} for {}", bytes / 1048576.0, node, what);
  if (node >= 0) cpu::bind_memory_to_node(q, n, node);
  cudaError_t e = cudaHostRegister(q, n, cudaHostRegisterDefault);
  if (e != cudaSuccess) {
    munmap(q, n);
    fail("CUDA: cannot pin {:.1f} MiB of host memory on NUMA node {} for {} ({:.1f} MiB pinned already): {}",
         bytes / 1048576.0, node, what, pinned_bytes_ / 1048576.0, cudaGetErrorString(e));
  }
  pinned_.push_back({q, n});
  pinned_bytes_ += bytes;
  return q;
}

void ExpertOffload::add_layer(int layer, const FfnWeights& f, const std::array<ExpertLayout, 3>& lay,
                              const std::string& prefix) {
  Layer L;
  L.layer = layer;
  L.f = &f;
  L.prefix = prefix;
  L.lay = lay;
  L.home = p_.home[size_t(layer)];
  L.node = expert_nodes(layer, L.home, size_t(layer) < p_.node.size() ? p_.node[size_t(layer)] : std::vector<int>{},
                        node_cpus_);
  for (ExpertHome h : L.home) {
    L.n_res += h == ExpertHome::Gpu;
    L.n_stream += h == ExpertHome::Stream || h == ExpertHome::Mixed;
    L.n_cpu += h == ExpertHome::Cpu || h == ExpertHome::Mixed;
  }
  // Slots a decode step can need beyond the cache: one per distinct streamed expert of the step.
  const int K = c_.num_experts_per_tok;
  L.n_cache = std::min(p_.cache_slots, L.n_stream);
  L.n_transient = L.n_stream ? std::min(std::min(max_rows_, kDecodeRows) * K, L.n_stream) : 0;
  any_cpu_ |= L.n_cpu > 0;
  layer_index_[size_t(layer)] = int(layers_.size());
  layers_.push_back(std::move(L));
}

void ExpertOffload::place(bool progress) {
  const int K = c_.num_experts_per_tok, d = c_.hidden_size;
  // Groups of layers with one layout; slots: each layer's resident + cache, then shared transients.
  for (Layer& L : layers_) {
    auto it = std::find_if(groups_.begin(), groups_.end(), [&](const Group& g) { return g.lay == L.lay; });
    if (it == groups_.end()) {
      groups_.push_back(Group{});
      groups_.back().lay = L.lay;
      it = groups_.end() - 1;
    }
    L.group = int(it - groups_.begin());
    L.slot0 = it->slots;
    it->slots += L.n_res + L.n_cache;
    it->n_transient = std::max(it->n_transient, L.n_transient);
  }
  for (size_t gi = 0; gi < groups_.size(); ++gi) {
    Group& g = groups_[gi];
    g.transient0 = g.slots;
    const size_t total = size_t(g.slots + g.n_transient);
    for (int p = 0; p < 3; ++p) {
      const ExpertLayout& l = g.lay[size_t(p)];
      g.w[size_t(p)] = static_cast<uint8_t*>(alloc_(l.stride() * total, fmt::format("expert pool {} {}", gi, kProj[p])));
      if (l.scales)
        g.s[size_t(p)] = static_cast<float*>(alloc_(l.scales * total * 4, fmt::format("expert pool {} {} scales", gi, kProj[p])));
    }
  }

  for (Layer& L : layers_) {
    if (progress) std::fprintf(stderr, "\rupload: host experts of layer %d        ", L.layer);
    const Group& g = groups_[size_t(L.group)];
    const int E = int(L.home.size());
    const std::vector<Linear>* ls[3] = {&L.f->exp_gate, &L.f->exp_up, &L.f->exp_down};
    for (int p = 0; p < 3; ++p) {
      const ExpertLayout& l = L.lay[size_t(p)];
      DevExperts& dv = L.dev[size_t(p)];
      dv.ew.fmt = l.fmt;
      dv.ew.w = g.w[size_t(p)] + size_t(L.slot0) * l.stride();
      dv.ew.w_stride = l.stride();
      dv.ew.scale = l.scales ? g.s[size_t(p)] + size_t(L.slot0) * l.scales : nullptr;
      dv.ew.scale_stride = l.scales;
      dv.ew.bo = l.bo;
      dv.ew.bi = l.bi;
      dv.out = l.out;
      dv.in = l.in;
      dv.n = L.n_res + L.n_cache;
      dv.bytes_per_expert = l.bytes();
    }
    // Resident experts: slots 0.. in expert order (as ExpertScheduler numbers them).
    std::vector<uint8_t> w;
    std::vector<float> s;
    for (int e = 0, slot = 0; e < E; ++e) {
      if (L.home[size_t(e)] != ExpertHome::Gpu) continue;
      for (int p = 0; p < 3; ++p) {
        const ExpertLayout& l = L.lay[size_t(p)];
        w.resize(l.wbytes);
        s.resize(l.scales);
        write_((*ls[p])[size_t(e)], l.fmt, w.data(), s.data());
        check(cudaMemcpy(g.w[size_t(p)] + size_t(L.slot0 + slot) * l.stride(), w.data(), l.wbytes,
                         cudaMemcpyHostToDevice),
              "cudaMemcpy (experts)");
        if (l.scales)
          check(cudaMemcpy(g.s[size_t(p)] + size_t(L.slot0 + slot) * l.scales, s.data(), l.scales * 4,
                           cudaMemcpyHostToDevice),
                "cudaMemcpy (scales)");
      }
      ++slot;
    }
    // Experts that may stream: their placed bytes, pinned, one store per node (ascending).
    auto streams = [&](int e) { return L.home[size_t(e)] == ExpertHome::Stream || L.home[size_t(e)] == ExpertHome::Mixed; };
    std::vector<int> nodes;
    for (int e = 0; e < E; ++e)
      if (streams(e)) nodes.push_back(L.node[size_t(e)]);
    std::sort(nodes.begin(), nodes.end());
    nodes.erase(std::unique(nodes.begin(), nodes.end()), nodes.end());
    L.stores.resize(nodes.size());
    std::vector<int> rows_of(nodes.size(), 0);
    L.host_store.assign(size_t(E), -1);
    L.host_index.assign(size_t(E), -1);
    for (int e = 0; e < E; ++e) {
      if (!streams(e)) continue;
      const int si = int(std::lower_bound(nodes.begin(), nodes.end(), L.node[size_t(e)]) - nodes.begin());
      L.stores[size_t(si)].node = nodes[size_t(si)];
      L.host_store[size_t(e)] = si;
      L.host_index[size_t(e)] = rows_of[size_t(si)]++;
    }
    for (size_t si = 0; si < L.stores.size(); ++si) {
      Layer::Store& st = L.stores[si];
      const size_t n = size_t(rows_of[si]);
      for (int p = 0; p < 3; ++p) {
        const ExpertLayout& l = L.lay[size_t(p)];
        const std::string what = fmt::format("{}experts.{} (host)", L.prefix, kProj[p]);
        st.w[size_t(p)] = static_cast<uint8_t*>(pinned_on_node(l.stride() * n, st.node, what));
        if (l.scales) st.s[size_t(p)] = static_cast<float*>(pinned_on_node(l.scales * 4 * n, st.node, what + " scales"));
      }
    }
    for (int e = 0; e < E; ++e) {
      if (L.host_store[size_t(e)] < 0) continue;
      const Layer::Store& st = L.stores[size_t(L.host_store[size_t(e)])];
      const size_t i = size_t(L.host_index[size_t(e)]);
      for (int p = 0; p < 3; ++p) {
        const ExpertLayout& l = L.lay[size_t(p)];
        write_((*ls[p])[size_t(e)], l.fmt, st.w[size_t(p)] + i * l.stride(),
               l.scales ? st.s[size_t(p)] + i * l.scales : nullptr);
      }
    }
    // Experts the CPU may compute: packed for the CPU kernels, on their node.
    L.cpu_index.assign(size_t(E), -1);
    for (int e = 0; e < E; ++e) {
      const ExpertHome h = L.home[size_t(e)];
      if (h != ExpertHome::Cpu && h != ExpertHome::Mixed) continue;
      try {
        L.packed.push_back(cpu::PackedExpert::pack((*ls[0])[size_t(e)], (*ls[1])[size_t(e)], (*ls[2])[size_t(e)],
                                                   L.node[size_t(e)]));
      } catch (const Error& x) {
        fail("{}experts: expert {} is placed '{}', but the CPU expert kernels cannot take it: {}", L.prefix, e,
             expert_home_name(h), x.what());
      }
      L.cpu_index[size_t(e)] = int(L.packed.size()) - 1;
      packed_bytes_ += L.packed.back().bytes();
    }

    ExpertScheduleOptions so;
    so.layer = L.layer;
    so.home = L.home;
    so.expert_bytes = L.lay[0].bytes() + L.lay[1].bytes() + L.lay[2].bytes();
    so.cpu_expert_bytes = L.packed.empty() ? so.expert_bytes : L.packed[0].bytes();
    so.mixed_cpu_fraction = p_.mixed_cpu_fraction;
    so.cache_slots = L.n_cache;
    so.cache_policy = ExpertCache::parse_policy(p_.cache_policy);
    so.transient_base = g.transient0 - L.slot0;
    so.n_transient = L.n_transient;
    L.sched = std::make_unique<ExpertScheduler>(std::move(so));
    L.use_of.assign(size_t(E), -1);
  }

  // Prefetch: each host layer's decode steps predict the next host layer's choice and copy its
  // missing experts in ahead, where that layer has cache slots a policy fills (not static).
  const bool fills = ExpertCache::parse_policy(p_.cache_policy) != ExpertCache::Policy::Static;
  for (size_t i = 0; i + 1 < layers_.size(); ++i) {
    Layer& T = layers_[i + 1];
    if (!p_.prefetch || !fills || T.n_cache == 0) continue;
    layers_[i].prefetch_to = int(i + 1);
    if (!copy_stream_) {
      check(cudaStreamCreateWithFlags(&copy_stream_, cudaStreamNonBlocking), "cudaStreamCreate (prefetch)");
      check(cudaEventCreateWithFlags(&demand_done_, cudaEventDisableTiming), "cudaEventCreate (prefetch)");
    }
    T.ready.assign(size_t(T.n_cache), nullptr);
    T.pending.assign(size_t(T.n_cache), 0);
    for (cudaEvent_t& e : T.ready)
      check(cudaEventCreateWithFlags(&e, cudaEventDisableTiming), "cudaEventCreate (prefetch)");
    check(cudaEventCreateWithFlags(&T.read_done, cudaEventDisableTiming), "cudaEventCreate (prefetch)");
  }

  const size_t S = size_t(max_rows_) * size_t(K), D = size_t(max_rows_) * size_t(d);
  host_ids_ = static_cast<int*>(pinned(S * 4, "router ids (host)"));
  host_rw_ = static_cast<float*>(pinned(S * 4, "router weights (host)"));
  host_slot_ = static_cast<int*>(pinned(S * 4, "expert slot ids (host)"));
  host_rows_ = static_cast<int*>(pinned(2 * S * 4, "expert rows (host)"));
  if (copy_stream_) host_pred_ = static_cast<int*>(pinned(S * 4, "predicted router ids (host)"));
  dev_slot_ = static_cast<int*>(alloc_(S * 4, "expert slot ids"));
  if (any_cpu_) {
    host_h_ = static_cast<float*>(pinned(D * 4, "expert inputs (host)"));
    host_y_ = static_cast<float*>(pinned(D * 4, "CPU expert outputs (host)"));
    dev_y_ = static_cast<float*>(alloc_(D * 4, "CPU expert outputs"));
    // A pool per node that computes experts, cpu_threads split by the nodes' cores.
    std::vector<bool> need(node_cpus_.size(), false);
    for (const Layer& L : layers_)
      for (size_t e = 0; e < L.home.size(); ++e)
        if (L.home[e] == ExpertHome::Cpu || L.home[e] == ExpertHome::Mixed) need[size_t(L.node[e])] = true;
    runner_ = std::make_unique<cpu::NodeRunner>(cpu::split_threads(p_.cpu_threads, node_cpus_, need));
  }
}

const DevExperts& ExpertOffload::experts(int layer, int proj) const { return get(layer).dev[size_t(proj)]; }

int ExpertOffload::n_gpu(int layer) const { return get(layer).n_res; }

int ExpertOffload::prefetch_target(int layer) const {
  const Layer& L = get(layer);
  return L.prefetch_to >= 0 ? layers_[size_t(L.prefetch_to)].layer : -1;
}

// The router's choice (and the CPU experts' input, and the next layer's predicted choice) to the
// host. The sync also guarantees that every earlier copy out of the per-step host buffers has
// finished before they are rewritten, and every kernel enqueued before it, of any layer, too.
void ExpertOffload::fetch(Layer& L, const int* ids, const float* route_w, const float* h, int R,
                          const int* next_ids) {
  BIGMOE_CHECK(R >= 1 && R <= max_rows_, "expert offload: {} rows (max {})", R, max_rows_);
  t0_ = std::chrono::steady_clock::now();
  const size_t S = size_t(R) * size_t(c_.num_experts_per_tok);
  check(cudaMemcpyAsync(host_ids_, ids, S * 4, cudaMemcpyDeviceToHost, stream_), "cudaMemcpyAsync (ids)");
  check(cudaMemcpyAsync(host_rw_, route_w, S * 4, cudaMemcpyDeviceToHost, stream_), "cudaMemcpyAsync (route weights)");
  if (L.n_cpu)
    check(cudaMemcpyAsync(host_h_, h, size_t(R) * c_.hidden_size * 4, cudaMemcpyDeviceToHost, stream_),
          "cudaMemcpyAsync (expert inputs)");
  if (next_ids)
    check(cudaMemcpyAsync(host_pred_, next_ids, S * 4, cudaMemcpyDeviceToHost, stream_),
          "cudaMemcpyAsync (predicted ids)");
  check(cudaStreamSynchronize(stream_), "cudaStreamSynchronize (router)");
}

// The step's plan and its CPU jobs (rows are tokens; y_cpu accumulates weight · expert(h)).
void ExpertOffload::plan(Layer& L, int R, bool fill) {
  const int K = c_.num_experts_per_tok, S = R * K;
  L.step = L.sched->plan(host_ids_, S, fill);
  std::fill(L.use_of.begin(), L.use_of.end(), -1);
  for (size_t i = 0; i < L.step.uses.size(); ++i) L.use_of[size_t(L.step.uses[i].expert)] = int(i);
  L.jobs.clear();
  L.job_node.clear();
  if (!L.step.n_cpu) return;
  std::vector<int> job_of(L.home.size(), -1);
  for (int s = 0; s < S; ++s) {
    const int e = host_ids_[s];
    if (e < 0 || L.step.slot_ids[size_t(s)] >= 0) continue;
    if (job_of[size_t(e)] < 0) {
      job_of[size_t(e)] = int(L.jobs.size());
      cpu::ExpertJob j;
      j.expert = &L.packed[size_t(L.cpu_index[size_t(e)])];
      j.x = host_h_;
      L.jobs.push_back(std::move(j));
      L.job_node.push_back(L.node[size_t(e)]);
    }
    cpu::ExpertJob& j = L.jobs[size_t(job_of[size_t(e)])];
    j.rows.push_back(s / K);
    j.weights.push_back(host_rw_[s]);
  }
}

// Expert `expert`'s placed bytes from the pinned store into slot `slot` (relative to the
// layer's slot 0), on `stream`. On stream_ it is ordered after every kernel that read the slot
// before; on copy_stream_ prefetch() orders it.
void ExpertOffload::copy(const Layer& L, int expert, int slot, CUstream_st* stream) {
  const Group& g = groups_[size_t(L.group)];
  const int i = L.host_index[size_t(expert)];
  BIGMOE_CHECK(i >= 0, "expert offload: layer {} expert {} has no host copy to stream", L.layer, expert);
  const Layer::Store& st = L.stores[size_t(L.host_store[size_t(expert)])];
  const size_t at = size_t(L.slot0 + slot);
  for (int p = 0; p < 3; ++p) {
    const ExpertLayout& l = L.lay[size_t(p)];
    check(cudaMemcpyAsync(g.w[size_t(p)] + at * l.stride(), st.w[size_t(p)] + size_t(i) * l.stride(), l.wbytes,
                          cudaMemcpyHostToDevice, stream),
          "cudaMemcpyAsync (streamed expert)");
    if (l.scales)
      check(cudaMemcpyAsync(g.s[size_t(p)] + at * l.scales, st.s[size_t(p)] + size_t(i) * l.scales, l.scales * 4,
                            cudaMemcpyHostToDevice, stream),
            "cudaMemcpyAsync (streamed expert scales)");
  }
}

// Before a step's copies and kernels touch its cache slots: the stream waits for the prefetch
// copies into the slots it reads (hits) or refills (fills, possibly evicting a mispredicted
// prefetch whose copy may still run). Slots it does not touch keep their pending copies.
void ExpertOffload::wait_prefetched(Layer& L) {
  if (L.pending.empty()) return;
  for (const ExpertScheduler::Use& u : L.step.uses) {
    if (u.path != ExpertPath::CacheHit && u.path != ExpertPath::CacheFill) continue;
    const size_t c = size_t(u.slot - L.n_res);
    if (!L.pending[c]) continue;
    check(cudaStreamWaitEvent(stream_, L.ready[c], 0), "cudaStreamWaitEvent (prefetched expert)");
    L.pending[c] = 0;
  }
}

// The predicted choice of target layer T (host_pred_, R rows) -> its missing experts copied into
// its cache slots on copy_stream_. Enqueued after the current step's own copies on stream_: the
// link serves the step first, and the prefetch overlaps its kernels and T's attention. T's
// slots are last read by T's previous step, whose kernels finished before this step's sync;
// the wait on T.read_done keeps that order explicit.
void ExpertOffload::prefetch(Layer& T, int R) {
  const std::vector<ExpertScheduler::Prefetch> list = T.sched->prefetch(host_pred_, R * c_.num_experts_per_tok);
  if (list.empty()) return;
  check(cudaEventRecord(demand_done_, stream_), "cudaEventRecord (prefetch)");
  check(cudaStreamWaitEvent(copy_stream_, demand_done_, 0), "cudaStreamWaitEvent (prefetch)");
  check(cudaStreamWaitEvent(copy_stream_, T.read_done, 0), "cudaStreamWaitEvent (prefetch)");
  for (const ExpertScheduler::Prefetch& x : list) {
    copy(T, x.expert, x.slot, copy_stream_);
    const size_t c = size_t(x.slot - T.n_res);
    check(cudaEventRecord(T.ready[c], copy_stream_), "cudaEventRecord (prefetch)");
    T.pending[c] = 1;
  }
}

const int* ExpertOffload::decode_begin(int layer, const int* ids, const float* route_w, const float* h, int R,
                                       const int* next_ids) {
  Layer& L = get(layer);
  BIGMOE_CHECK(R <= kDecodeRows, "expert offload: a decode step of {} rows", R);
  BIGMOE_CHECK(!next_ids || L.prefetch_to >= 0, "expert offload: layer {} prefetches for no layer", layer);
  fetch(L, ids, route_w, h, R, next_ids);
  plan(L, R, /*fill=*/true);
  wait_prefetched(L);
  for (const ExpertScheduler::Use& u : L.step.uses)
    if (u.path == ExpertPath::CacheFill || u.path == ExpertPath::Transient) copy(L, u.expert, u.slot, stream_);
  const size_t S = size_t(R) * size_t(c_.num_experts_per_tok);
  std::memcpy(host_slot_, L.step.slot_ids.data(), S * 4);
  check(cudaMemcpyAsync(dev_slot_, host_slot_, S * 4, cudaMemcpyHostToDevice, stream_), "cudaMemcpyAsync (slot ids)");
  if (next_ids) prefetch(layers_[size_t(L.prefetch_to)], R);
  return dev_slot_;
}

const int* ExpertOffload::prefill_begin(int layer, const int* ids, const float* route_w, const float* h, int R) {
  Layer& L = get(layer);
  fetch(L, ids, route_w, h, R, nullptr);
  plan(L, R, /*fill=*/false);
  wait_prefetched(L);
  return host_ids_;
}

int ExpertOffload::prefill_stage(int layer, int expert) {
  Layer& L = get(layer);
  const int i = expert >= 0 && expert < int(L.use_of.size()) ? L.use_of[size_t(expert)] : -1;
  BIGMOE_CHECK(i >= 0, "expert offload: layer {} expert {} is not in this step", layer, expert);
  const ExpertScheduler::Use& u = L.step.uses[size_t(i)];
  if (u.path == ExpertPath::Cpu) return -1;
  if (u.path == ExpertPath::CacheFill || u.path == ExpertPath::Transient) copy(L, u.expert, u.slot, stream_);
  return u.slot;
}

void ExpertOffload::finish(int layer, float* x, int R) {
  Layer& L = get(layer);
  // The layer's kernels that read its pool are enqueued: prefetches into it wait for them.
  if (L.read_done) check(cudaEventRecord(L.read_done, stream_), "cudaEventRecord (expert reads)");
  if (!L.jobs.empty()) {
    // The GPU runs the layer's routed and shared experts meanwhile; the previous upload from
    // host_y_ finished before this layer's fetch returned.
    const auto t = std::chrono::steady_clock::now();
    const size_t n = size_t(R) * size_t(c_.hidden_size);
    runner_->run(L.jobs, L.job_node, host_y_, R, c_.hidden_size);  // each node its own experts, at once
    cpu_ms_ += ms_since(t);
    check(cudaMemcpyAsync(dev_y_, host_y_, n * 4, cudaMemcpyHostToDevice, stream_), "cudaMemcpyAsync (CPU experts)");
    add_inplace(x, dev_y_, n, stream_);
    L.jobs.clear();
    L.job_node.clear();
  }
  host_ms_ += ms_since(t0_);
}

OffloadStats ExpertOffload::stats() const {
  OffloadStats s;
  s.layer_cache_hit_rate.assign(size_t(c_.num_hidden_layers), 0.0);
  for (const Layer& L : layers_) {
    const ExpertScheduleStats& x = L.sched->stats();
    s.steps += x.steps;
    s.gpu_hits += x.gpu_hits;
    s.cache_hits += x.cache_hits;
    s.cache_misses += x.cache_misses;
    s.cache_fills += x.cache_fills;
    s.streamed += x.streamed;
    s.cpu_experts += x.cpu_experts;
    s.prefetches += x.prefetches;
    s.prefetch_hits += x.prefetch_hits;
    s.streamed_bytes += x.streamed_bytes;
    s.cpu_bytes += x.cpu_bytes;
    s.prefetch_bytes += x.prefetch_bytes;
    s.layer_cache_hit_rate[size_t(L.layer)] = x.cache_hit_rate();
  }
  s.host_ms = host_ms_;
  s.cpu_ms = cpu_ms_;
  return s;
}

void ExpertOffload::reset_stats() {
  for (Layer& L : layers_) L.sched->reset_stats();
  host_ms_ = cpu_ms_ = 0;
}

double ExpertOffload::cache_hit_rate(int layer) const { return get(layer).sched->stats().cache_hit_rate(); }

}  // namespace bigmoe::cuda
