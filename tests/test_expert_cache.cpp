// Hot-expert cache bookkeeping (engine/expert_cache.h): LRU and decayed-LFU eviction worked by
// hand, pins that never leave, the static policy, placement from a routing profile, hit rates
// on a skewed routing stream against what uniform routing would give, and prefetch batches
// (no counts, holds within a batch, first use flagged, mispredictions retired first).
#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "engine/expert_cache.h"
#include "util/error.h"

namespace bigmoe {
namespace {

using Policy = ExpertCache::Policy;

TEST(ExpertCache, LruEvictsLeastRecentlyUsed) {
  ExpertCache c(2, Policy::Lru);
  auto a = c.access(0, 1);
  EXPECT_FALSE(a.hit);
  EXPECT_EQ(a.slot, 0);
  EXPECT_EQ(c.access(0, 2).slot, 1);
  EXPECT_TRUE(c.access(0, 1).hit);  // 1 is now the most recent
  auto b = c.access(0, 3);          // evicts 2
  EXPECT_EQ(b.slot, 1);
  EXPECT_EQ(b.evicted_layer, 0);
  EXPECT_EQ(b.evicted_expert, 2);
  EXPECT_EQ(c.find(0, 2), -1);
  EXPECT_EQ(c.find(0, 1), 0);
  EXPECT_EQ(c.hits(), 1u);
  EXPECT_EQ(c.misses(), 3u);
  EXPECT_EQ(c.per_layer().at(0), std::make_pair(uint64_t(1), uint64_t(3)));
}

TEST(ExpertCache, LfuKeepsFrequentAndAdmitsOnlyAsHot) {
  ExpertCache c(1, Policy::Lfu, 1.0);  // plain LFU
  for (int i = 0; i < 3; ++i) c.access(1, 7);
  auto a = c.access(1, 8);  // count 1 < 3: not admitted, served from host
  EXPECT_EQ(a.slot, -1);
  EXPECT_EQ(c.find(1, 7), 0);
  c.access(1, 8);
  c.access(1, 8);  // count 3 == 3: admitted (ties go to the newcomer)
  EXPECT_EQ(c.find(1, 8), 0);
  EXPECT_EQ(c.find(1, 7), -1);
}

TEST(ExpertCache, LfuDecayForgetsOldHeat) {
  // With decay 0.8 the i-th access weighs 1.25^i: ten old uses of A sum to 41.6; fresh uses of B
  // weigh 11.6, 14.6, 18.2 (sums 11.6, 26.1, 44.3), so the third one takes A's slot. Plain LFU
  // would need eleven.
  ExpertCache c(1, Policy::Lfu, 0.8);
  for (int i = 0; i < 10; ++i) c.access(0, 0);
  c.access(0, 1);
  c.access(0, 1);
  EXPECT_EQ(c.find(0, 0), 0);
  c.access(0, 1);
  EXPECT_EQ(c.find(0, 1), 0);
}

TEST(ExpertCache, PinsNeverLeaveAndStaticServesMissesFromHost) {
  ExpertCache c(3, Policy::Lru);
  c.pin({{0, 5}, {2, 9}});
  for (int e = 0; e < 20; ++e) c.access(1, e);
  EXPECT_EQ(c.find(0, 5), 0);
  EXPECT_EQ(c.find(2, 9), 1);
  EXPECT_EQ(c.find(1, 19), 2);  // the one free slot cycles
  EXPECT_TRUE(c.access(2, 9).hit);

  ExpertCache s(2, Policy::Static);
  s.pin({{0, 1}});
  EXPECT_EQ(s.access(0, 2).slot, -1);
  EXPECT_EQ(s.find(0, 2), -1);
  EXPECT_TRUE(s.access(0, 1).hit);

  ExpertCache full(1, Policy::Lru);
  full.pin({{0, 0}});
  EXPECT_EQ(full.access(0, 1).slot, -1);  // every slot pinned
}

TEST(ExpertCache, FromProfilePinsHottest) {
  RoutingStats p(4, 1);
  const int picks[][2] = {{0, 3}, {0, 3}, {0, 3}, {1, 2}, {1, 2}, {0, 1}, {1, 0}};
  for (auto& [layer, e] : picks) p.add(layer, &e, 1);
  ExpertCache c = ExpertCache::from_profile(p, 3, 2, Policy::Lru);
  EXPECT_EQ(c.find(0, 3), 0);
  EXPECT_EQ(c.find(1, 2), 1);
  EXPECT_EQ(c.find(0, 1), -1);
  EXPECT_THROW(ExpertCache::from_profile(p, 1, 2, Policy::Lru), Error);
}

// A skewed (Zipf s = 1.1) stream over 256 experts, 8 per token, 32 slots: LFU and LRU beat the
// 12.5% that caching 32 of 256 gives under uniform routing, and LFU beats LRU on a stationary
// stream. Deterministic seed.
TEST(ExpertCache, HitRatesOnSkewedRouting) {
  const int E = 256, K = 8, slots = 32;
  std::vector<double> w(E);
  for (int e = 0; e < E; ++e) w[size_t(e)] = 1.0 / std::pow(e + 1, 1.1);
  std::discrete_distribution<int> zipf(w.begin(), w.end());
  double rate[2];
  for (int p = 0; p < 2; ++p) {
    ExpertCache c(slots, p ? Policy::Lfu : Policy::Lru);
    std::mt19937 rng(7);
    for (int t = 0; t < 4000; ++t)
      for (int k = 0; k < K; ++k) c.access(0, zipf(rng));
    rate[p] = c.hit_rate();
  }
  EXPECT_GT(rate[0], 0.3);
  EXPECT_GT(rate[1], rate[0]);
}

// Within a step (begin_step) a slot read by the step is not evicted: the executor is about to
// read it. The next step may evict it again.
TEST(ExpertCache, StepProtectsItsSlots) {
  for (Policy p : {Policy::Lru, Policy::Lfu}) {
    ExpertCache c(2, p, 1.0);
    c.access(0, 1);
    c.access(0, 2);
    c.begin_step();
    EXPECT_TRUE(c.access(0, 2).hit);
    EXPECT_TRUE(c.access(0, 1).hit);
    auto a = c.access(0, 3);  // both slots read this step
    EXPECT_EQ(a.slot, -1);
    EXPECT_FALSE(a.hit);
    EXPECT_EQ(c.find(0, 1), 0);
    EXPECT_EQ(c.find(0, 2), 1);
    c.begin_step();
    c.access(0, 3);
    c.access(0, 3);  // LFU: as hot as the others now
    EXPECT_GE(c.find(0, 3), 0) << (p == Policy::Lru ? "lru" : "lfu");
  }
  ExpertCache d(2, Policy::Lru);  // without begin_step: plain LRU within the "step"
  d.access(0, 1);
  d.access(0, 2);
  EXPECT_EQ(d.access(0, 3).slot, 0);
}

// A prefetch places an expert without counting a hit or a miss; the step's first use of it is a
// hit flagged prefetched, later uses are plain hits.
TEST(ExpertCache, PrefetchCountsNothingAndFlagsTheFirstUse) {
  ExpertCache c(2, Policy::Lru);
  c.begin_prefetch();
  auto p = c.prefetch(0, 5);
  EXPECT_EQ(p.slot, 0);
  EXPECT_FALSE(p.hit);
  auto q = c.prefetch(0, 5);  // already there
  EXPECT_TRUE(q.hit);
  EXPECT_EQ(q.slot, 0);
  EXPECT_EQ(c.hits() + c.misses(), 0u);
  EXPECT_TRUE(c.per_layer().empty());
  c.begin_step();
  auto a = c.access(0, 5);
  EXPECT_TRUE(a.hit);
  EXPECT_TRUE(a.prefetched);
  auto b = c.access(0, 5);
  EXPECT_TRUE(b.hit);
  EXPECT_FALSE(b.prefetched);
  EXPECT_EQ(c.hits(), 2u);
  EXPECT_EQ(c.misses(), 0u);
  EXPECT_EQ(c.retire_prefetches(), 0);  // used: nothing to retire
}

// A batch never evicts what it prefetched or found (held), nor a pinned expert; a step ends the
// holds, and retire_prefetches makes the unused prediction the first victim.
TEST(ExpertCache, PrefetchBatchHoldsItsExpertsAndRetiresMispredictions) {
  ExpertCache c(2, Policy::Lru);
  c.access(0, 1);
  c.access(0, 2);  // 1 is the least recent
  c.begin_prefetch();
  EXPECT_TRUE(c.prefetch(0, 1).hit);  // held by the batch
  auto a = c.prefetch(0, 3);          // evicts 2, not the older but held 1
  EXPECT_EQ(a.slot, 1);
  EXPECT_EQ(a.evicted_layer, 0);
  EXPECT_EQ(a.evicted_expert, 2);
  EXPECT_EQ(c.prefetch(0, 4).slot, -1);  // 1 and 3 held
  EXPECT_EQ(c.find(0, 1), 0);
  EXPECT_EQ(c.find(0, 3), 1);
  EXPECT_EQ(c.find(0, 4), -1);
  // The step uses 1, not 3: 3 is retired, so 4 takes 3's slot although 3 came in last.
  c.begin_step();
  EXPECT_TRUE(c.access(0, 1).hit);
  EXPECT_EQ(c.retire_prefetches(), 1);
  auto d = c.access(0, 4);
  EXPECT_EQ(d.slot, 1);
  EXPECT_EQ(d.evicted_expert, 3);
  EXPECT_EQ(c.retire_prefetches(), 0);

  // A prefetch after a step may evict what the step read: the step is over.
  ExpertCache e(1, Policy::Lru);
  e.begin_step();
  e.access(0, 1);
  e.begin_prefetch();
  auto f = e.prefetch(0, 2);
  EXPECT_EQ(f.slot, 0);
  EXPECT_EQ(f.evicted_expert, 1);

  // Pinned experts never leave; Static prefetches nothing.
  ExpertCache g(2, Policy::Lru);
  g.pin({{0, 7}});
  g.begin_prefetch();
  EXPECT_EQ(g.prefetch(0, 1).slot, 1);
  EXPECT_EQ(g.prefetch(0, 2).slot, -1);
  EXPECT_EQ(g.find(0, 7), 0);
  ExpertCache s(2, Policy::Static);
  s.pin({{0, 1}});
  s.begin_prefetch();
  EXPECT_EQ(s.prefetch(0, 2).slot, -1);
  EXPECT_TRUE(s.prefetch(0, 1).hit);
}

// LFU: a prefetch is admitted only as hot as its victim, and bumps no count.
TEST(ExpertCache, LfuPrefetchAdmitsByCountWithoutCounting) {
  ExpertCache c(1, Policy::Lfu, 1.0);
  c.access(0, 1);
  c.access(0, 1);  // count 2
  c.access(0, 2);  // count 1: not admitted
  c.begin_prefetch();
  EXPECT_EQ(c.prefetch(0, 2).slot, -1);
  EXPECT_EQ(c.prefetch(0, 2).slot, -1);  // still 1: the prefetches did not count
  c.begin_step();
  EXPECT_EQ(c.access(0, 2).slot, 0);  // count 2 == 2: admitted
  EXPECT_EQ(c.find(0, 1), -1);
  EXPECT_THROW(c.prefetch(-1, 0), Error);
}

TEST(ExpertCache, RejectsBadInput) {
  EXPECT_THROW(ExpertCache(-1, Policy::Lru), Error);
  EXPECT_THROW(ExpertCache(2, Policy::Lfu, 0.0), Error);
  EXPECT_THROW(ExpertCache(2, Policy::Lfu, 1.5), Error);
  ExpertCache c(1, Policy::Lru);
  EXPECT_THROW(c.pin({{0, 1}, {0, 2}}), Error);
  ExpertCache d(2, Policy::Lru);
  EXPECT_THROW(d.pin({{0, 1}, {0, 1}}), Error);
  EXPECT_THROW(d.access(-1, 0), Error);
  EXPECT_THROW(ExpertCache::parse_policy("mru"), Error);
  EXPECT_EQ(ExpertCache::parse_policy("lfu"), Policy::Lfu);
}

}  // namespace
}  // namespace bigmoe
