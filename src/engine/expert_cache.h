// Slot bookkeeping of the hot-expert cache: which (layer, expert) occupies each of a fixed
// number of GPU slots. Experts pinned from a routing profile (`bigmoe profile`) never leave;
// the other slots follow a runtime policy: LRU, or LFU with exponentially decayed counts (a
// frequency that forgets, so a shifting topic moves the cache). Static leaves unpinned slots
// empty and serves misses from host memory. Counts hits and misses per layer. Pure
// bookkeeping: the executor copies the weights into the slot it is given.
//
// Prefetch (docs/offload.md, "Prefetch"): before a step, the executor may place the experts it
// predicts the step will pick (begin_prefetch, prefetch). A prefetch counts no hit or miss and
// bumps no LFU count; the step's first use of a prefetched expert is a hit flagged
// `prefetched`. Predicted experts the step did not use are demoted to the coldest
// (retire_prefetches), so a misprediction is the first to go.
#pragma once
#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "engine/routing_stats.h"

namespace bigmoe {

class ExpertCache {
 public:
  enum class Policy { Static, Lru, Lfu };
  static Policy parse_policy(const std::string& s);  // "static" | "lru" | "lfu"

  // decay: LFU's per-access multiplier of every count (0 < decay <= 1; 1 = plain LFU).
  ExpertCache(int n_slots, Policy policy, double decay = 0.999);

  // Pins experts into slots for good (in order, from slot 0). Throws when they do not fit or one
  // repeats.
  void pin(const std::vector<std::pair<int, int>>& layer_expert);
  // A cache whose pinned part holds the n_pinned most picked experts of the profile (over all
  // layers; ties: lower layer, then lower expert), n_pinned <= n_slots.
  static ExpertCache from_profile(const RoutingStats& profile, int n_slots, int n_pinned, Policy rest,
                                  double decay = 0.999);

  struct Access {
    int slot = -1;        // where the expert is (or now goes); -1: served from host memory
    bool hit = false;     // it was already there
    int evicted_layer = -1, evicted_expert = -1;  // what the slot held before (on a fill), else -1
    bool prefetched = false;  // a hit on a prefetched expert's first use since its prefetch
  };
  // One use of (layer, expert) in a step. A miss claims a slot under LRU / LFU (a free one, else
  // the coldest unpinned one); under Static, or when every slot is pinned, it stays on the host.
  Access access(int layer, int expert);
  int find(int layer, int expert) const;  // slot, or -1
  // Starts a step (and ends any prefetch batch): until the next begin_step() or
  // begin_prefetch(), a slot accessed in this step is never evicted (the executor is about to
  // read it), so a miss that finds no other victim stays on the host. Without begin_step()
  // every unpinned slot may be evicted.
  void begin_step() {
    step_start_ = clock_ + 1;
    batch_ = 0;
  }

  // Starts a prefetch batch. It ends the protection of the last step, which must be over (the
  // executor gives each layer its own cache and prefetches for a layer between its steps). Until
  // the next begin_step() or begin_prefetch(), a slot the batch prefetched or found is never
  // evicted by the batch.
  void begin_prefetch() {
    step_start_ = UINT64_MAX;
    batch_ = ++batches_;
  }
  // Places (layer, expert) ahead of its use, in a batch (begin_prefetch). Found: {slot, hit},
  // held for the batch, its recency and count untouched. Else a slot as a miss would claim one
  // (a free one, else the coldest unpinned one the batch does not hold; under LFU only when the
  // expert's count is at least the victim's), flagged prefetched; or slot -1 (Static, LFU not
  // admitting, or every slot pinned or held). Counts no hit or miss.
  Access prefetch(int layer, int expert);
  // Prefetched experts not used since their prefetch become the coldest (LRU: least recent;
  // LFU: the least recent of equal counts) and lose the flag. Returns how many. The scheduler
  // calls it in a step after its hits and before its fills.
  int retire_prefetches();

  int n_slots() const { return int(slots_.size()); }
  uint64_t hits() const { return hits_; }
  uint64_t misses() const { return misses_; }
  double hit_rate() const { return hits_ + misses_ ? double(hits_) / double(hits_ + misses_) : 0.0; }
  // Per layer: {hits, misses}.
  const std::map<int, std::pair<uint64_t, uint64_t>>& per_layer() const { return per_layer_; }

 private:
  struct Slot {
    int layer = -1, expert = -1;
    bool pinned = false;
    bool prefetched = false;  // placed by prefetch(), not used since
    uint64_t last_use = 0;    // LRU clock
    uint64_t held = 0;        // the prefetch batch that holds it (0: none)
    double freq = 0;          // LFU count, stored scaled by 1 / scale_
  };
  int victim() const;
  Access claim(int layer, int expert, double f, bool prefetched);
  Policy policy_;
  double decay_, scale_ = 1.0;  // LFU: counts decay by multiplying the increment instead
  std::vector<Slot> slots_;
  std::map<std::pair<int, int>, int> where_;
  std::map<std::pair<int, int>, double> freq_;  // LFU counts of experts not in a slot too
  uint64_t clock_ = 0, hits_ = 0, misses_ = 0;
  uint64_t step_start_ = UINT64_MAX;  // slots with last_use >= this are in use this step
  uint64_t batch_ = 0, batches_ = 0;  // the open prefetch batch (0: none), batches so far
  std::map<int, std::pair<uint64_t, uint64_t>> per_layer_;
};

}  // namespace bigmoe
