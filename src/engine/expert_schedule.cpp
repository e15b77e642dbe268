#include "engine/expert_schedule.h"

#include <algorithm>

#include "util/error.h"

namespace bigmoe {

const char* expert_home_name(ExpertHome h) {
  switch (h) {
    case ExpertHome::Gpu: return "gpu";
    case ExpertHome::Cpu: return "cpu";
    case ExpertHome::Stream: return "stream";
    case ExpertHome::Mixed: return "mixed";
  }
  return "?";
}

const char* expert_path_name(ExpertPath p) {
  switch (p) {
    case ExpertPath::Resident: return "resident";
    case ExpertPath::CacheHit: return "cache-hit";
    case ExpertPath::CacheFill: return "cache-fill";
    case ExpertPath::Transient: return "transient";
    case ExpertPath::Cpu: return "cpu";
  }
  return "?";
}

std::vector<int> expert_nodes(int layer, const std::vector<ExpertHome>& home, const std::vector<int>& node,
                              const std::vector<int>& node_cpus) {
  const int E = int(home.size()), N = int(node_cpus.size());
  if (!node.empty() && int(node.size()) != E)
    fail("expert placement: layer {} gives NUMA nodes for {} experts, the layer has {}", layer, node.size(), E);
  std::vector<int> usable;
  for (int n = 0; n < N; ++n)
    if (node_cpus[size_t(n)] > 0) usable.push_back(n);
  std::vector<int> out(size_t(E), -1);
  for (int e = 0; e < E; ++e) {
    const ExpertHome h = home[size_t(e)];
    if (h == ExpertHome::Gpu) continue;
    const int n = node.empty() ? -1 : node[size_t(e)];
    const bool computes = h == ExpertHome::Cpu || h == ExpertHome::Mixed;
    if (n < -1 || n >= N)
      fail("expert placement: layer {} expert {} ('{}') is placed on NUMA node {}, but this machine has {} node(s) "
           "(0..{})",
           layer, e, expert_home_name(h), n, N, N - 1);
    if (n >= 0) {
      if (computes && node_cpus[size_t(n)] == 0)
        fail("expert placement: layer {} expert {} ('{}') is placed on NUMA node {}, which has no CPU this process "
             "may use to compute it",
             layer, e, expert_home_name(h), n);
      out[size_t(e)] = n;
      continue;
    }
    if (usable.empty())
      fail("expert placement: layer {} expert {} ('{}'): no NUMA node has a CPU this process may use", layer, e,
           expert_home_name(h));
    out[size_t(e)] = usable[size_t(e) % usable.size()];
  }
  return out;
}

ExpertScheduler::ExpertScheduler(ExpertScheduleOptions o)
    : o_(std::move(o)), cache_(std::max(0, o_.cache_slots), o_.cache_policy) {
  const int E = n_experts(), L = o_.layer;
  if (E == 0) fail("expert schedule: layer {} has no experts to place", L);
  if (o_.expert_bytes == 0) fail("expert schedule: layer {}: experts of 0 bytes", L);
  if (!(o_.mixed_cpu_fraction >= 0 && o_.mixed_cpu_fraction <= 1))
    fail("expert schedule: layer {}: mixed_cpu_fraction {} outside [0, 1]", L, o_.mixed_cpu_fraction);
  if (o_.cache_slots < 0 || o_.n_transient < 0)
    fail("expert schedule: layer {}: {} cache slots, {} transient slots", L, o_.cache_slots, o_.n_transient);
  resident_slot_.assign(size_t(E), -1);
  bool streams = false;
  for (int e = 0; e < E; ++e) {
    if (o_.home[size_t(e)] == ExpertHome::Gpu) resident_slot_[size_t(e)] = n_resident_++;
    streams |= o_.home[size_t(e)] == ExpertHome::Stream || o_.home[size_t(e)] == ExpertHome::Mixed;
  }
  if (streams && o_.n_transient == 0) fail("expert schedule: layer {} streams experts but has no transient slot", L);
  if (o_.n_transient > 0 && o_.transient_base < n_resident_ + o_.cache_slots)
    fail("expert schedule: layer {}: transient slots from {} overlap the {} resident and {} cache slots", L,
         o_.transient_base, n_resident_, o_.cache_slots);
}

std::vector<int> ExpertScheduler::count_ids(const int* ids, int S) const {
  const int E = n_experts();
  std::vector<int> count(size_t(E), 0);
  for (int s = 0; s < S; ++s) {
    if (ids[s] >= E) fail("expert schedule: layer {}: routed to expert {} of {}", o_.layer, ids[s], E);
    if (ids[s] >= 0) ++count[size_t(ids[s])];
  }
  return count;
}

ExpertScheduler::Step ExpertScheduler::plan(const int* ids, int S, bool fill) {
  const int E = n_experts();
  Step st;
  st.slot_ids.assign(size_t(std::max(S, 0)), -1);
  const std::vector<int> count = count_ids(ids, S);
  if (fill) cache_.begin_step();
  ++stats_.steps;

  // Mixed experts that must move bytes: the CPU takes the lightest until its share is reached.
  std::vector<int> mixed;
  for (int e = 0; e < E; ++e)
    if (count[size_t(e)] && o_.home[size_t(e)] == ExpertHome::Mixed && cache_.find(o_.layer, e) < 0)
      mixed.push_back(e);
  std::stable_sort(mixed.begin(), mixed.end(), [&](int a, int b) { return count[size_t(a)] < count[size_t(b)]; });
  std::vector<bool> to_cpu(size_t(E), false);
  {
    const double total = double(mixed.size()) * double(o_.expert_bytes), target = o_.mixed_cpu_fraction * total;
    double cpu = 0;
    for (int e : mixed) {
      if (cpu >= target) break;
      to_cpu[size_t(e)] = true;
      cpu += double(o_.expert_bytes);
    }
  }

  // Cached experts are touched first, so that no fill of this step evicts one of them.
  std::vector<Use> use(static_cast<size_t>(E));
  std::vector<int> streamed_hot, streamed_cold;
  for (int e = 0; e < E; ++e) {
    if (!count[size_t(e)]) continue;
    Use& u = use[size_t(e)];
    u.expert = e;
    u.tokens = count[size_t(e)];
    const ExpertHome h = o_.home[size_t(e)];
    if (h == ExpertHome::Gpu) {
      u.path = ExpertPath::Resident;
      u.slot = resident_slot_[size_t(e)];
      ++stats_.gpu_hits;
    } else if (h == ExpertHome::Cpu || to_cpu[size_t(e)]) {
      u.path = ExpertPath::Cpu;
      u.slot = -1;
      ++st.n_cpu;
      ++stats_.cpu_experts;
      stats_.cpu_bytes += double(o_.cpu_expert_bytes);
    } else {
      (cache_.find(o_.layer, e) >= 0 ? streamed_hot : streamed_cold).push_back(e);
    }
  }
  int n_trans = 0;
  for (const std::vector<int>* list : {&streamed_hot, &streamed_cold}) {
    // After the hits, predicted experts this step did not use become the first to be evicted.
    if (fill && list == &streamed_cold) cache_.retire_prefetches();
    for (int e : *list) {
      Use& u = use[size_t(e)];
      int c = -1;
      bool hit = false;
      if (fill) {
        ExpertCache::Access a = cache_.access(o_.layer, e);
        c = a.slot;
        hit = a.hit;
        stats_.prefetch_hits += a.prefetched;
      } else {
        c = cache_.find(o_.layer, e);
        hit = c >= 0;
      }
      if (hit) {
        u.path = ExpertPath::CacheHit;
        u.slot = n_resident_ + c;
        ++stats_.cache_hits;
        continue;
      }
      ++stats_.cache_misses;
      ++stats_.streamed;
      stats_.streamed_bytes += double(o_.expert_bytes);
      ++st.n_copies;
      if (c >= 0) {
        u.path = ExpertPath::CacheFill;
        u.slot = n_resident_ + c;
        ++stats_.cache_fills;
        continue;
      }
      u.path = ExpertPath::Transient;
      const int t = fill ? n_trans : n_trans % o_.n_transient;
      if (fill && t >= o_.n_transient)
        fail("expert schedule: layer {}: a step streams more than the {} transient slots", o_.layer, o_.n_transient);
      ++n_trans;
      u.slot = o_.transient_base + t;
    }
  }
  for (int e = 0; e < E; ++e)
    if (count[size_t(e)]) st.uses.push_back(use[size_t(e)]);

  // (row, k) -> slot
  for (int s = 0; s < S; ++s)
    if (ids[s] >= 0) st.slot_ids[size_t(s)] = use[size_t(ids[s])].slot;
  return st;
}

std::vector<ExpertScheduler::Prefetch> ExpertScheduler::prefetch(const int* ids, int S) {
  const int E = n_experts();
  const std::vector<int> count = count_ids(ids, S);
  std::vector<Prefetch> out;
  if (o_.cache_slots == 0) return out;
  cache_.begin_prefetch();
  std::vector<int> cold;
  for (int e = 0; e < E; ++e) {
    const ExpertHome h = o_.home[size_t(e)];
    if (!count[size_t(e)] || (h != ExpertHome::Stream && h != ExpertHome::Mixed)) continue;
    if (cache_.find(o_.layer, e) >= 0)
      cache_.prefetch(o_.layer, e);  // held: no prefetch of this batch evicts it
    else
      cold.push_back(e);
  }
  std::stable_sort(cold.begin(), cold.end(), [&](int a, int b) { return count[size_t(a)] > count[size_t(b)]; });
  for (int e : cold) {
    const ExpertCache::Access a = cache_.prefetch(o_.layer, e);
    if (a.slot < 0) continue;
    out.push_back({e, n_resident_ + a.slot});
    ++stats_.prefetches;
    stats_.prefetch_bytes += double(o_.expert_bytes);
  }
  return out;
}

}  // namespace bigmoe
