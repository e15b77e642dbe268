// The offload executor's per-step plan (engine/expert_schedule.h), worked by hand: resident
// experts, cache hits / fills / evictions, the static policy, transient slots in decode and in
// prefill, CPU experts, the Mixed split by bytes, determinism, and bad placements; and the NUMA
// node of each host expert (expert_nodes) on faked multi-node machines.
#include <gtest/gtest.h>

#include <random>
#include <string>
#include <vector>

#include "engine/expert_schedule.h"
#include "util/error.h"

namespace bigmoe {
namespace {

using H = ExpertHome;
using P = ExpertPath;
using Policy = ExpertCache::Policy;

ExpertScheduleOptions opts(std::vector<H> home, int cache = 0, int transient_base = 0, int n_transient = 0) {
  ExpertScheduleOptions o;
  o.layer = 3;
  o.home = std::move(home);
  o.expert_bytes = 1000;
  o.cpu_expert_bytes = 900;
  o.cache_slots = cache;
  o.transient_base = transient_base;
  o.n_transient = n_transient;
  return o;
}

// (expert, path, slot, tokens) of each use, for compact expectations.
struct U {
  int e;
  P p;
  int slot, tokens;
};
void expect_uses(const ExpertScheduler::Step& st, const std::vector<U>& want) {
  ASSERT_EQ(st.uses.size(), want.size());
  for (size_t i = 0; i < want.size(); ++i) {
    EXPECT_EQ(st.uses[i].expert, want[i].e) << "use " << i;
    EXPECT_EQ(st.uses[i].path, want[i].p) << "expert " << want[i].e << ": " << expert_path_name(st.uses[i].path);
    EXPECT_EQ(st.uses[i].slot, want[i].slot) << "expert " << want[i].e;
    EXPECT_EQ(st.uses[i].tokens, want[i].tokens) << "expert " << want[i].e;
  }
}

TEST(ExpertSchedule, ResidentExpertsKeepTheirSlots) {
  // Gpu experts 0, 2, 5 take slots 0, 1, 2 in expert order.
  ExpertScheduler s(opts({H::Gpu, H::Cpu, H::Gpu, H::Cpu, H::Cpu, H::Gpu}));
  EXPECT_EQ(s.n_resident(), 3);
  EXPECT_EQ(s.resident_slot(5), 2);
  EXPECT_EQ(s.resident_slot(1), -1);
  const std::vector<int> ids{5, 0, 2, 5, -1, 0};  // two rows of top-3; -1: no expert
  auto st = s.plan(ids.data(), 6, true);
  expect_uses(st, {{0, P::Resident, 0, 2}, {2, P::Resident, 1, 1}, {5, P::Resident, 2, 2}});
  EXPECT_EQ(st.slot_ids, (std::vector<int>{2, 0, 1, 2, -1, 0}));
  EXPECT_EQ(st.n_cpu, 0);
  EXPECT_EQ(st.n_copies, 0);
  EXPECT_EQ(s.stats().gpu_hits, 3u);
  EXPECT_EQ(s.stats().steps, 1u);
}

TEST(ExpertSchedule, CpuExpertsGetNoSlot) {
  ExpertScheduler s(opts({H::Gpu, H::Cpu, H::Cpu, H::Gpu}));
  const std::vector<int> ids{1, 3, 2, 1};
  auto st = s.plan(ids.data(), 4, true);
  expect_uses(st, {{1, P::Cpu, -1, 2}, {2, P::Cpu, -1, 1}, {3, P::Resident, 1, 1}});
  EXPECT_EQ(st.slot_ids, (std::vector<int>{-1, 1, -1, -1}));
  EXPECT_EQ(st.n_cpu, 2);
  EXPECT_EQ(s.stats().cpu_experts, 2u);
  EXPECT_DOUBLE_EQ(s.stats().cpu_bytes, 1800.0);
  EXPECT_DOUBLE_EQ(s.stats().streamed_bytes, 0.0);
}

TEST(ExpertSchedule, LruCacheHitsFillsAndEvicts) {
  // One resident expert (slot 0), two cache slots (1, 2), transient slots from 10.
  ExpertScheduler s(opts({H::Gpu, H::Stream, H::Stream, H::Stream, H::Stream, H::Stream}, 2, 10, 4));
  std::vector<int> a{1, 2};
  expect_uses(s.plan(a.data(), 2, true), {{1, P::CacheFill, 1, 1}, {2, P::CacheFill, 2, 1}});
  std::vector<int> b{1, 0};
  auto st = s.plan(b.data(), 2, true);
  expect_uses(st, {{0, P::Resident, 0, 1}, {1, P::CacheHit, 1, 1}});
  EXPECT_EQ(st.n_copies, 0);
  // 2 is now the least recently used: 3 takes its slot.
  std::vector<int> c{3};
  expect_uses(s.plan(c.data(), 1, true), {{3, P::CacheFill, 2, 1}});
  EXPECT_EQ(s.cache().find(3, 2), -1);
  // 4 misses while 1 and 3 (both cached) are read in the same step: neither may be evicted, so
  // 4 goes to a transient slot; 2 as well.
  std::vector<int> d{4, 1, 3, 2};
  st = s.plan(d.data(), 4, true);
  expect_uses(st, {{1, P::CacheHit, 1, 1}, {2, P::Transient, 10, 1}, {3, P::CacheHit, 2, 1}, {4, P::Transient, 11, 1}});
  EXPECT_EQ(st.slot_ids, (std::vector<int>{11, 1, 2, 10}));
  EXPECT_EQ(st.n_copies, 2);
  const auto& x = s.stats();
  EXPECT_EQ(x.gpu_hits, 1u);
  EXPECT_EQ(x.cache_hits, 3u);
  EXPECT_EQ(x.cache_misses, 5u);
  EXPECT_EQ(x.cache_fills, 3u);
  EXPECT_EQ(x.streamed, 5u);
  EXPECT_DOUBLE_EQ(x.streamed_bytes, 5000.0);
  EXPECT_DOUBLE_EQ(x.cache_hit_rate(), 3.0 / 8.0);
  s.reset_stats();
  EXPECT_EQ(s.stats().cache_hits, 0u);
  EXPECT_EQ(s.cache().find(3, 1), 0);  // the cache itself is kept
}

TEST(ExpertSchedule, FillNeverEvictsAnExpertOfTheSameStep) {
  // Cache of 1: expert 2 (cached) is read in the step where 1 misses; 1 must not take 2's slot,
  // although 1 comes first in expert order.
  ExpertScheduler s(opts({H::Stream, H::Stream, H::Stream}, 1, 1, 3));
  std::vector<int> a{2};
  s.plan(a.data(), 1, true);
  std::vector<int> b{1, 2};
  expect_uses(s.plan(b.data(), 2, true), {{1, P::Transient, 1, 1}, {2, P::CacheHit, 0, 1}});
  std::vector<int> c{1};  // next step: 2 is evictable again
  expect_uses(s.plan(c.data(), 1, true), {{1, P::CacheFill, 0, 1}});
}

TEST(ExpertSchedule, LfuKeepsTheFrequentExpert) {
  ExpertScheduleOptions o = opts({H::Stream, H::Stream, H::Stream}, 1, 1, 3);
  o.cache_policy = Policy::Lfu;
  ExpertScheduler s(o);
  std::vector<int> a{0};
  for (int i = 0; i < 3; ++i) s.plan(a.data(), 1, true);
  std::vector<int> b{1};
  expect_uses(s.plan(b.data(), 1, true), {{1, P::Transient, 1, 1}});  // colder than 0: not admitted
  expect_uses(s.plan(a.data(), 1, true), {{0, P::CacheHit, 0, 1}});
}

// Prefetch: predicted Stream / Mixed experts take cache slots most-picked first (Gpu and Cpu ones
// are skipped); the step finds them as hits (one prefetch hit each), and its fills evict the
// mispredicted ones first.
TEST(ExpertSchedule, PrefetchFillsTheNextStepsHits) {
  // Expert 0 resident (slot 0), 1..4 Stream, 5 Cpu, 6 Mixed; cache slots 1, 2; transients from 10.
  ExpertScheduler s(opts({H::Gpu, H::Stream, H::Stream, H::Stream, H::Stream, H::Cpu, H::Mixed}, 2, 10, 8));
  const std::vector<int> pred{0, 3, 5, 2, 3, -1};
  const auto pf = s.prefetch(pred.data(), 6);
  ASSERT_EQ(pf.size(), 2u);
  EXPECT_EQ(pf[0].expert, 3);  // two tokens: first
  EXPECT_EQ(pf[0].slot, 1);
  EXPECT_EQ(pf[1].expert, 2);
  EXPECT_EQ(pf[1].slot, 2);
  EXPECT_EQ(s.stats().prefetches, 2u);
  EXPECT_DOUBLE_EQ(s.stats().prefetch_bytes, 2000.0);
  EXPECT_EQ(s.stats().streamed + s.stats().cache_hits + s.stats().cache_misses + s.stats().steps, 0u);
  // The step picks 3 (predicted) and 4 (not): 4's fill evicts the mispredicted 2.
  const std::vector<int> a{4, 3};
  auto st = s.plan(a.data(), 2, true);
  expect_uses(st, {{3, P::CacheHit, 1, 1}, {4, P::CacheFill, 2, 1}});
  EXPECT_EQ(st.n_copies, 1);
  EXPECT_EQ(s.cache().find(3, 2), -1);
  EXPECT_EQ(s.stats().prefetch_hits, 1u);
  EXPECT_DOUBLE_EQ(s.stats().cache_hit_rate(), 0.5);
  EXPECT_DOUBLE_EQ(s.stats().demand_hit_rate(), 0.0);
  // 3 again: a plain hit.
  const std::vector<int> b{3};
  expect_uses(s.plan(b.data(), 1, true), {{3, P::CacheHit, 1, 1}});
  EXPECT_EQ(s.stats().prefetch_hits, 1u);
  EXPECT_DOUBLE_EQ(s.stats().demand_hit_rate(), 1.0 / 3.0);
  EXPECT_EQ(s.stats().streamed, s.stats().cache_misses);
}

TEST(ExpertSchedule, PrefetchKeepsCachedPredictionsAndNeedsSlots) {
  // One cache slot holding 2: predicted again, it is held, so 1 (picked more) gets no slot.
  ExpertScheduler s(opts({H::Stream, H::Stream, H::Stream}, 1, 1, 3));
  const std::vector<int> a{2};
  s.plan(a.data(), 1, true);
  const std::vector<int> pred{1, 2, 1};
  EXPECT_TRUE(s.prefetch(pred.data(), 3).empty());
  EXPECT_EQ(s.cache().find(3, 2), 0);
  EXPECT_EQ(s.stats().prefetches, 0u);
  const std::vector<int> bad{1, 3};
  try {
    s.prefetch(bad.data(), 2);
    ADD_FAILURE() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("layer 3: routed to expert 3 of 3"), std::string::npos) << e.what();
  }

  // A prefetched Mixed expert is read in place, not given to the CPU.
  ExpertScheduler m(opts({H::Mixed, H::Stream}, 1, 1, 2));
  const std::vector<int> zero{0};
  const auto pf = m.prefetch(zero.data(), 1);
  ASSERT_EQ(pf.size(), 1u);
  EXPECT_EQ(pf[0].slot, 0);
  expect_uses(m.plan(zero.data(), 1, true), {{0, P::CacheHit, 0, 1}});
  EXPECT_EQ(m.stats().cpu_experts, 0u);
  EXPECT_EQ(m.stats().prefetch_hits, 1u);

  // Without cache slots, or under Static, nothing is prefetched.
  ExpertScheduler n(opts({H::Stream, H::Stream}, 0, 0, 2));
  EXPECT_TRUE(n.prefetch(zero.data(), 1).empty());
  ExpertScheduleOptions o = opts({H::Stream, H::Stream}, 1, 1, 2);
  o.cache_policy = Policy::Static;
  ExpertScheduler t(o);
  EXPECT_TRUE(t.prefetch(zero.data(), 1).empty());
  EXPECT_EQ(t.stats().prefetches, 0u);
}

// Prefetch then step, over a random stream (guesses right about half the time), both policies:
// a batch's slots are distinct cache slots that then hold its experts; a guessed expert the
// step picks is a hit; no two experts of a step share a slot; the counts add up.
TEST(ExpertSchedule, PrefetchAndStepsStayConsistent) {
  for (Policy pol : {Policy::Lru, Policy::Lfu}) {
    std::vector<H> home(16, H::Stream);
    home[0] = H::Gpu;
    home[5] = H::Mixed;
    home[9] = H::Cpu;
    ExpertScheduleOptions o = opts(home, 5, 6, 16);
    o.cache_policy = pol;
    ExpertScheduler s(o);
    std::mt19937 rng(3);
    std::discrete_distribution<int> pick({8, 6, 5, 4, 3, 3, 2, 2, 2, 1, 1, 1, 1, 1, 1, 1});
    uint64_t guessed_used = 0;
    for (int t = 0; t < 300; ++t) {
      const int R = 1 + t % 4, S = R * 4;
      std::vector<int> ids(static_cast<size_t>(S)), guess(static_cast<size_t>(S));
      for (int i = 0; i < S; ++i) {
        ids[size_t(i)] = pick(rng);
        guess[size_t(i)] = rng() % 2 ? ids[size_t(i)] : pick(rng);
      }
      const auto pf = s.prefetch(guess.data(), S);
      std::vector<bool> taken(16, false);
      for (const auto& x : pf) {
        ASSERT_GE(x.slot, 1);
        ASSERT_LT(x.slot, 6);
        EXPECT_FALSE(taken[size_t(x.slot)]) << "step " << t;
        taken[size_t(x.slot)] = true;
        EXPECT_EQ(s.cache().find(3, x.expert), x.slot - 1) << "step " << t;
        EXPECT_TRUE(home[size_t(x.expert)] == H::Stream || home[size_t(x.expert)] == H::Mixed);
      }
      const auto st = s.plan(ids.data(), S, true);
      std::vector<int> slot_of(16, -1);
      std::vector<bool> used(32, false);
      for (const auto& u : st.uses) {
        slot_of[size_t(u.expert)] = u.slot;
        if (u.slot < 0) continue;
        EXPECT_FALSE(used[size_t(u.slot)]) << "step " << t << ": slot " << u.slot << " twice";
        used[size_t(u.slot)] = true;
      }
      for (const auto& x : pf)
        for (const auto& u : st.uses)
          if (u.expert == x.expert) {
            EXPECT_EQ(u.path, P::CacheHit) << "step " << t << ": guessed expert " << x.expert;
            EXPECT_EQ(u.slot, x.slot);
            ++guessed_used;
          }
      for (int i = 0; i < S; ++i) EXPECT_EQ(st.slot_ids[size_t(i)], slot_of[size_t(ids[size_t(i)])]);
    }
    const auto& x = s.stats();
    EXPECT_EQ(x.prefetch_hits, guessed_used);
    EXPECT_LE(x.prefetch_hits, x.prefetches);
    EXPECT_GT(x.prefetches, 0u);
    EXPECT_EQ(x.streamed, x.cache_misses);
    EXPECT_LE(x.demand_hit_rate(), x.cache_hit_rate());
  }
}

TEST(ExpertSchedule, StaticPolicyStreamsEveryMiss) {
  ExpertScheduleOptions o = opts({H::Stream, H::Stream, H::Stream}, 2, 2, 3);
  o.cache_policy = Policy::Static;
  ExpertScheduler s(o);
  std::vector<int> a{2, 0};
  for (int i = 0; i < 2; ++i) expect_uses(s.plan(a.data(), 2, true), {{0, P::Transient, 2, 1}, {2, P::Transient, 3, 1}});
  EXPECT_EQ(s.stats().cache_fills, 0u);
  EXPECT_EQ(s.stats().streamed, 4u);
}

TEST(ExpertSchedule, DecodeTransientSlotsAreDistinctAndBounded) {
  ExpertScheduler s(opts({H::Stream, H::Gpu, H::Stream, H::Stream, H::Stream, H::Stream}, 0, 1, 3));
  std::vector<int> a{5, 3, 5, 0};
  auto st = s.plan(a.data(), 4, true);
  expect_uses(st, {{0, P::Transient, 1, 1}, {3, P::Transient, 2, 1}, {5, P::Transient, 3, 2}});
  EXPECT_EQ(st.slot_ids, (std::vector<int>{3, 2, 3, 1}));
  std::vector<int> b{0, 2, 3, 4};  // four transients, three slots
  EXPECT_THROW(s.plan(b.data(), 4, true), Error);
}

TEST(ExpertSchedule, PrefillLooksUpTheCacheAndReusesTransientSlots) {
  ExpertScheduler s(opts({H::Stream, H::Stream, H::Stream, H::Stream, H::Stream}, 1, 1, 2));
  std::vector<int> a{4};
  s.plan(a.data(), 1, true);  // decode: 4 fills the cache slot
  std::vector<int> b{0, 1, 2, 3, 4, 0};
  auto st = s.plan(b.data(), 6, false);
  expect_uses(st, {{0, P::Transient, 1, 2}, {1, P::Transient, 2, 1}, {2, P::Transient, 1, 1}, {3, P::Transient, 2, 1},
                   {4, P::CacheHit, 0, 1}});
  EXPECT_EQ(s.cache().hits(), 0u);  // prefill does not touch the policy
  EXPECT_EQ(s.cache().find(3, 4), 0);
  EXPECT_EQ(s.stats().cache_hits, 1u);
  EXPECT_EQ(s.stats().cache_fills, 1u);
}

TEST(ExpertSchedule, MixedSplitsByBytesGivingTheCpuTheLightest) {
  // Experts 1 (3 tokens), 4 (1 token), 6 (2 tokens), all Mixed. Order for the CPU: 4, 6, 1.
  std::vector<H> home(8, H::Mixed);
  const std::vector<int> ids{1, 6, 1, 4, 6, 1};
  auto run = [&](double f) {
    ExpertScheduleOptions o = opts(home, 0, 0, 8);
    o.mixed_cpu_fraction = f;
    ExpertScheduler s(o);
    return s.plan(ids.data(), 6, true);
  };
  // 0.5: 4 (share 0 < 0.5), 6 (1/3 < 0.5), then 2/3 >= 0.5 stops.
  expect_uses(run(0.5), {{1, P::Transient, 0, 3}, {4, P::Cpu, -1, 1}, {6, P::Cpu, -1, 2}});
  expect_uses(run(0.3), {{1, P::Transient, 0, 3}, {4, P::Cpu, -1, 1}, {6, P::Transient, 1, 2}});
  expect_uses(run(0.0), {{1, P::Transient, 0, 3}, {4, P::Transient, 1, 1}, {6, P::Transient, 2, 2}});
  expect_uses(run(1.0), {{1, P::Cpu, -1, 3}, {4, P::Cpu, -1, 1}, {6, P::Cpu, -1, 2}});
  // Ties in tokens: lower expert first.
  const std::vector<int> tie{5, 2, 7};
  ExpertScheduleOptions o = opts(home, 0, 0, 8);
  o.mixed_cpu_fraction = 0.5;
  ExpertScheduler s(o);
  expect_uses(s.plan(tie.data(), 3, true), {{2, P::Cpu, -1, 1}, {5, P::Cpu, -1, 1}, {7, P::Transient, 0, 1}});
}

TEST(ExpertSchedule, CachedMixedExpertsAreReadInPlace) {
  ExpertScheduleOptions o = opts({H::Mixed, H::Mixed, H::Mixed, H::Mixed}, 1, 1, 4);
  o.mixed_cpu_fraction = 0.5;
  ExpertScheduler s(o);
  // 1 and 2 (a token each): the CPU takes 1 (share 0 < 0.5), 2 streams into the cache slot.
  std::vector<int> a{2, 1};
  expect_uses(s.plan(a.data(), 2, true), {{1, P::Cpu, -1, 1}, {2, P::CacheFill, 0, 1}});
  // 2 is cached: read in place and left out of the split, which then runs over 1 and 3 alone:
  // 1 to the CPU, 3 streams (into a transient slot: the cache slot holds 2, read this step).
  std::vector<int> b{3, 2, 1};
  expect_uses(s.plan(b.data(), 3, true), {{1, P::Cpu, -1, 1}, {2, P::CacheHit, 0, 1}, {3, P::Transient, 1, 1}});
}

TEST(ExpertSchedule, PlansAreDeterministic) {
  std::vector<H> home;
  for (int e = 0; e < 32; ++e) home.push_back(H(e % 4));
  ExpertScheduleOptions o = opts(home, 3, 8 + 3, 16);
  ExpertScheduler a(o), b(o);
  uint32_t r = 12345;
  for (int step = 0; step < 50; ++step) {
    std::vector<int> ids(8), rev;
    for (int& x : ids) x = int((r = r * 1664525u + 1013904223u) >> 27);  // 0..31
    rev.assign(ids.rbegin(), ids.rend());
    auto pa = a.plan(ids.data(), 8, step % 5 != 0);
    auto pb = b.plan(rev.data(), 8, step % 5 != 0);  // same experts and counts, other order
    ASSERT_EQ(pa.uses.size(), pb.uses.size());
    for (size_t i = 0; i < pa.uses.size(); ++i) {
      EXPECT_EQ(pa.uses[i].expert, pb.uses[i].expert);
      EXPECT_EQ(pa.uses[i].path, pb.uses[i].path);
      EXPECT_EQ(pa.uses[i].slot, pb.uses[i].slot);
    }
    for (size_t i = 0; i < ids.size(); ++i) EXPECT_EQ(pa.slot_ids[i], pb.slot_ids[7 - i]);
  }
  EXPECT_EQ(a.stats().cache_hits, b.stats().cache_hits);
  EXPECT_GT(a.stats().cache_hits, 0u);
}

TEST(ExpertSchedule, RejectsBadPlacements) {
  EXPECT_THROW(ExpertScheduler(opts({})), Error);
  ExpertScheduleOptions o = opts({H::Stream, H::Gpu}, 0, 1, 1);
  o.expert_bytes = 0;
  EXPECT_THROW(ExpertScheduler{o}, Error);
  o = opts({H::Mixed}, 0, 0, 1);
  o.mixed_cpu_fraction = 1.5;
  EXPECT_THROW(ExpertScheduler{o}, Error);
  o.mixed_cpu_fraction = -0.1;
  EXPECT_THROW(ExpertScheduler{o}, Error);
  EXPECT_THROW(ExpertScheduler(opts({H::Stream, H::Gpu}, -1, 1, 1)), Error);   // negative cache
  EXPECT_THROW(ExpertScheduler(opts({H::Stream, H::Gpu}, 0, 1, 0)), Error);    // streams, no transient slot
  EXPECT_THROW(ExpertScheduler(opts({H::Stream, H::Gpu}, 2, 2, 1)), Error);    // transient over the cache
  EXPECT_NO_THROW(ExpertScheduler(opts({H::Cpu, H::Gpu})));                    // no streaming: none needed
  try {
    ExpertScheduler(opts({H::Stream}, 0, 0, 0));
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("layer 3"), std::string::npos) << e.what();
  }
  ExpertScheduler s(opts({H::Gpu, H::Gpu}));
  std::vector<int> bad{0, 2};
  EXPECT_THROW(s.plan(bad.data(), 2, true), Error);
  EXPECT_STREQ(expert_home_name(H::Mixed), "mixed");
}

// NUMA nodes of a layer's host experts (expert_nodes), on faked machines: node_cpus lists the
// usable CPUs of each node, so any node count runs here.
TEST(ExpertNodes, KeepsGivenNodesAndSpreadsTheRestByExpertId) {
  const std::vector<H> home{H::Gpu, H::Cpu, H::Stream, H::Mixed, H::Cpu, H::Cpu, H::Stream, H::Gpu};
  // Three nodes: -1 goes to node e % 3; given nodes stay; Gpu experts get -1 whatever is given.
  EXPECT_EQ(expert_nodes(3, home, {}, {4, 4, 4}), (std::vector<int>{-1, 1, 2, 0, 1, 2, 0, -1}));
  EXPECT_EQ(expert_nodes(3, home, {2, 0, 0, -1, 2, -1, 1, 0}, {4, 4, 4}), (std::vector<int>{-1, 0, 0, 0, 2, 2, 1, -1}));
  // One node (what CI has): everything on node 0.
  EXPECT_EQ(expert_nodes(3, home, {}, {8}), (std::vector<int>{-1, 0, 0, 0, 0, 0, 0, -1}));
  // A node without usable CPUs (taskset, memory-only node) is skipped by the spread; a
  // streamed expert may still live there (only its memory is on the node).
  EXPECT_EQ(expert_nodes(3, home, {}, {4, 0, 2}), (std::vector<int>{-1, 2, 0, 2, 0, 2, 0, -1}));
  EXPECT_EQ(expert_nodes(3, home, {-1, -1, 1, -1, -1, -1, -1, -1}, {4, 0, 2})[2], 1);
  // Deterministic: a pure function of its arguments.
  EXPECT_EQ(expert_nodes(3, home, {}, {4, 4, 4}), expert_nodes(3, home, {}, {4, 4, 4}));
}

TEST(ExpertNodes, ErrorsNameLayerExpertAndNode) {
  const std::vector<H> home{H::Cpu, H::Stream, H::Mixed};
  auto err = [&](const std::vector<int>& node, const std::vector<int>& cpus) {
    try {
      expert_nodes(7, home, node, cpus);
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  std::string m = err({0, 2, 0}, {4, 4});  // node 2 on a 2-node machine
  EXPECT_NE(m.find("layer 7 expert 1"), std::string::npos) << m;
  EXPECT_NE(m.find("NUMA node 2"), std::string::npos) << m;
  EXPECT_NE(m.find("2 node(s)"), std::string::npos) << m;
  m = err({0, 0, 1}, {4});  // node 1 on a 1-node machine (the GPU test's case)
  EXPECT_NE(m.find("layer 7 expert 2"), std::string::npos) << m;
  EXPECT_NE(m.find("NUMA node 1"), std::string::npos) << m;
  m = err({-2, 0, 0}, {4});
  EXPECT_NE(m.find("layer 7 expert 0"), std::string::npos) << m;
  m = err({1, 1, 0}, {4, 0});  // a CPU expert on a node without usable CPUs
  EXPECT_NE(m.find("layer 7 expert 0"), std::string::npos) << m;
  EXPECT_NE(m.find("no CPU"), std::string::npos) << m;
  EXPECT_EQ(err({0, 1, 0}, {4, 0}), "no error");  // the streamed one may live there
  m = err({0, 0}, {4});
  EXPECT_NE(m.find("layer 7"), std::string::npos) << m;
  EXPECT_NE(m.find("2 experts"), std::string::npos) << m;
  EXPECT_NE(err({}, {0, 0}).find("no NUMA node"), std::string::npos);
}

}  // namespace
}  // namespace bigmoe
