#include "engine/expert_cache.h"

#include <algorithm>
#include <cmath>
#include <tuple>

#include "util/error.h"

namespace bigmoe {

ExpertCache::Policy ExpertCache::parse_policy(const std::string& s) {
  if (s == "static") return Policy::Static;
  if (s == "lru") return Policy::Lru;
  if (s == "lfu") return Policy::Lfu;
  fail("unknown expert cache policy '{}' (expected static, lru or lfu)", s);
}

ExpertCache::ExpertCache(int n_slots, Policy policy, double decay) : policy_(policy), decay_(decay) {
  if (n_slots < 0) fail("expert cache: {} slots", n_slots);
  if (!(decay > 0 && decay <= 1)) fail("expert cache: decay {} outside (0, 1]", decay);
  slots_.resize(size_t(n_slots));
}

void ExpertCache::pin(const std::vector<std::pair<int, int>>& le) {
  int used = 0;
  for (const Slot& s : slots_) used += s.layer >= 0;
  if (used + int(le.size()) > n_slots())
    fail("expert cache: {} pinned experts do not fit in {} slots ({} in use)", le.size(), n_slots(), used);
  for (const auto& [layer, expert] : le) {
    if (layer < 0 || expert < 0) fail("expert cache: bad expert (layer {}, expert {})", layer, expert);
    if (where_.count({layer, expert})) fail("expert cache: layer {} expert {} is pinned twice", layer, expert);
    int s = 0;
    while (slots_[size_t(s)].layer >= 0) ++s;
    Slot& x = slots_[size_t(s)];
    x = Slot{};
    x.layer = layer;
    x.expert = expert;
    x.pinned = true;
    where_[{layer, expert}] = s;
  }
}

ExpertCache ExpertCache::from_profile(const RoutingStats& p, int n_slots, int n_pinned, Policy rest, double decay) {
  if (n_pinned < 0 || n_pinned > n_slots) fail("expert cache: {} pinned of {} slots", n_pinned, n_slots);
  std::vector<std::tuple<uint64_t, int, int>> all;  // (count, layer, expert)
  for (const auto& [layer, counts] : p.layers())
    for (size_t e = 0; e < counts.size(); ++e) all.emplace_back(counts[e], layer, int(e));
  std::stable_sort(all.begin(), all.end(), [](const auto& a, const auto& b) { return std::get<0>(a) > std::get<0>(b); });
  std::vector<std::pair<int, int>> pins;
  for (size_t i = 0; i < all.size() && int(pins.size()) < n_pinned; ++i)
    pins.emplace_back(std::get<1>(all[i]), std::get<2>(all[i]));
  ExpertCache c(n_slots, rest, decay);
  c.pin(pins);
  return c;
}

int ExpertCache::find(int layer, int expert) const {
  auto it = where_.find({layer, expert});
  return it == where_.end() ? -1 : it->second;
}

int ExpertCache::victim() const {
  int best = -1;
  for (int s = 0; s < n_slots(); ++s) {
    const Slot& x = slots_[size_t(s)];
    if (x.pinned) continue;
    if (x.layer < 0) return s;  // a free slot first
    if (x.last_use >= step_start_) continue;  // read by this step
    if (batch_ && x.held == batch_) continue;  // prefetched or found by this batch
    if (best < 0) {
      best = s;
      continue;
    }
    const Slot& b = slots_[size_t(best)];
    bool colder = policy_ == Policy::Lru ? x.last_use < b.last_use
                                         : (x.freq < b.freq || (x.freq == b.freq && x.last_use < b.last_use));
    if (colder) best = s;
  }
  return best;
}

ExpertCache::Access ExpertCache::access(int layer, int expert) {
  if (layer < 0 || expert < 0) fail("expert cache: bad expert (layer {}, expert {})", layer, expert);
  ++clock_;
  const std::pair<int, int> key{layer, expert};
  // LFU with decay: instead of multiplying every count by `decay` per access, grow the increment
  // by 1/decay (same order of counts), renormalizing before it overflows.
  double f = 0;
  if (policy_ == Policy::Lfu) {
    scale_ /= decay_;
    if (scale_ > 1e200) {
      for (auto& [k, v] : freq_) v /= scale_;
      for (Slot& s : slots_) s.freq /= scale_;
      scale_ = 1.0;
    }
    f = (freq_[key] += scale_);
  }
  Access a;
  auto& pl = per_layer_[layer];
  const int s = find(layer, expert);
  if (s >= 0) {
    Slot& x = slots_[size_t(s)];
    a.slot = s;
    a.hit = true;
    a.prefetched = x.prefetched;
    ++hits_;
    ++pl.first;
    x.last_use = clock_;
    x.freq = f;
    x.prefetched = false;
    return a;
  }
  ++misses_;
  ++pl.second;
  return claim(layer, expert, f, false);
}

// A slot for (layer, expert), not in the cache: the victim under the policy, or none.
ExpertCache::Access ExpertCache::claim(int layer, int expert, double f, bool prefetched) {
  Access a;
  if (policy_ == Policy::Static) return a;
  const int v = victim();
  if (v < 0) return a;  // every slot pinned, read by this step or held by this batch
  Slot& x = slots_[size_t(v)];
  // LFU admits a newcomer only when it is at least as hot as what it would replace.
  if (policy_ == Policy::Lfu && x.layer >= 0 && f < x.freq) return a;
  if (x.layer >= 0) {
    a.evicted_layer = x.layer;
    a.evicted_expert = x.expert;
    where_.erase({x.layer, x.expert});
  }
  x = Slot{};
  x.layer = layer;
  x.expert = expert;
  x.prefetched = prefetched;
  x.last_use = clock_;
  x.held = prefetched ? batch_ : 0;
  x.freq = f;
  where_[{layer, expert}] = v;
  a.slot = v;
  return a;
}

ExpertCache::Access ExpertCache::prefetch(int layer, int expert) {
  if (layer < 0 || expert < 0) fail("expert cache: bad expert (layer {}, expert {})", layer, expert);
  const int s = find(layer, expert);
  if (s >= 0) {
    slots_[size_t(s)].held = batch_;
    Access a;
    a.slot = s;
    a.hit = true;
    return a;
  }
  double f = 0;
  if (policy_ == Policy::Lfu) {
    auto it = freq_.find({layer, expert});
    if (it != freq_.end()) f = it->second;
  }
  return claim(layer, expert, f, true);
}

int ExpertCache::retire_prefetches() {
  int n = 0;
  for (Slot& x : slots_) {
    if (!x.prefetched) continue;
    x.prefetched = false;
    x.last_use = 0;
    ++n;
  }
  return n;
}

}  // namespace bigmoe
