// The CPU expert kernels over several NUMA nodes (backend/cpu/node_runner.h): the thread split
// and the runner's grouping, concurrency and determinism. CI machines have one node, so the
// nodes are faked: unpinned pools, one per "node", which exercises the same grouping, driver
// threads and ordered sum as a real multi-node machine (only the pinning differs).
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "backend/cpu/expert_kernels.h"
#include "backend/cpu/node_runner.h"
#include "backend/cpu/thread_pool.h"
#include "tensor/dtype.h"
#include "util/error.h"

namespace bigmoe::cpu {
namespace {

TEST(NodeRunnerThreads, SplitsByCoresAmongNodesThatComputeExperts) {
  EXPECT_EQ(split_threads(0, {8, 4}, {true, true}), (std::vector<int>{8, 4}));  // 0: every core
  EXPECT_EQ(split_threads(0, {8, 4}, {false, true}), (std::vector<int>{0, 4}));
  EXPECT_EQ(split_threads(6, {8, 4}, {true, true}), (std::vector<int>{4, 2}));
  // 5 · 8/12 = 3.33, 5 · 4/12 = 1.67: the larger remainder takes the fifth thread.
  EXPECT_EQ(split_threads(5, {8, 4}, {true, true}), (std::vector<int>{3, 2}));
  // Equal remainders: the lower node.
  EXPECT_EQ(split_threads(3, {4, 4}, {true, true}), (std::vector<int>{2, 1}));
  // At least one thread per node that computes experts (the sum then exceeds the request).
  EXPECT_EQ(split_threads(1, {8, 4}, {true, true}), (std::vector<int>{1, 1}));
  EXPECT_EQ(split_threads(10, {8, 4, 4}, {false, true, true}), (std::vector<int>{0, 5, 5}));
  EXPECT_EQ(split_threads(7, {8, 4, 4}, {false, false, false}), (std::vector<int>{0, 0, 0}));
  EXPECT_EQ(split_threads(4, {8}, {true}), (std::vector<int>{4}));  // one node: as asked
  for (int t = 1; t <= 40; ++t) {
    auto s = split_threads(t, {12, 7, 5}, {true, true, true});
    EXPECT_EQ(s[0] + s[1] + s[2], std::max(t, 3)) << t;
    EXPECT_GE(s[0], s[1]) << t;
    EXPECT_GE(s[1], s[2]) << t;
  }
}

// BF16 experts [d_ff, d] / [d, d_ff] with random weights.
struct Experts {
  int d = 64, ff = 48;
  std::vector<std::vector<uint8_t>> data;
  std::vector<TensorView> views;
  std::vector<PackedExpert> packed;
  explicit Experts(int n) {
    std::mt19937 rng(7);
    std::normal_distribution<float> nd(0.f, 0.1f);
    data.resize(size_t(3 * n));
    views.resize(size_t(3 * n));
    for (int i = 0; i < 3 * n; ++i) {
      const int out = i % 3 == 2 ? d : ff, in = i % 3 == 2 ? ff : d;
      auto& b = data[size_t(i)];
      b.resize(size_t(out) * in * 2);
      for (size_t k = 0; k < b.size(); k += 2) {
        uint16_t h = f32_to_bf16(nd(rng));
        std::memcpy(&b[k], &h, 2);
      }
      views[size_t(i)] = TensorView{"w", DType::BF16, {out, in}, b.data(), b.size(), "test.safetensors"};
    }
    for (int e = 0; e < n; ++e) {
      Linear l[3];
      for (int p = 0; p < 3; ++p) {
        l[p].w = &views[size_t(3 * e + p)];
        l[p].out = int(views[size_t(3 * e + p)].shape[0]);
        l[p].in = int(views[size_t(3 * e + p)].shape[1]);
      }
      packed.push_back(PackedExpert::pack(l[0], l[1], l[2]));
    }
  }
};

// A step of `rows` tokens routed to k experts each: one job per expert that has rows, in
// expert order (as the executor builds them).
std::vector<ExpertJob> make_jobs(const Experts& ex, const std::vector<float>& x, int rows, int k, uint32_t seed) {
  std::mt19937 rng(seed);
  const int n = int(ex.packed.size());
  std::vector<ExpertJob> jobs(static_cast<size_t>(n));
  std::uniform_real_distribution<float> uw(0.1f, 1.5f);
  for (int r = 0; r < rows; ++r) {
    std::vector<int> e(static_cast<size_t>(n));
    for (int i = 0; i < n; ++i) e[size_t(i)] = i;
    std::shuffle(e.begin(), e.end(), rng);
    for (int i = 0; i < k; ++i) {
      ExpertJob& j = jobs[size_t(e[size_t(i)])];
      j.rows.push_back(r);
      j.weights.push_back(uw(rng));
    }
  }
  for (int i = 0; i < n; ++i) {
    jobs[size_t(i)].expert = &ex.packed[size_t(i)];
    jobs[size_t(i)].x = x.data();
  }
  return jobs;
}

// The reference: these jobs on one pool of `threads`, their weighted sum into n zeros.
std::vector<float> one_pool_sum(std::vector<ExpertJob> jobs, size_t n, int threads) {
  std::vector<float> y(n, 0.f);
  ThreadPool pool(threads, -1, false);
  ExpertRunner r(pool);
  for (auto& j : jobs) j.y = y.data();
  r.run_experts(jobs);
  return y;
}

TEST(NodeRunner, NodesRunTheirGroupsAndSumInNodeOrder) {
  const int n = 9, rows = 6, k = 4;
  Experts ex(n);
  std::vector<float> x(size_t(rows) * ex.d);
  std::mt19937 rng(3);
  std::normal_distribution<float> nd(0.f, 1.f);
  for (float& v : x) v = nd(rng);

  // Reference: every job on one pool.
  const std::vector<float> want = one_pool_sum(make_jobs(ex, x, rows, k, 11), x.size(), 2);
  // One node: exactly ExpertRunner (the one-node machine's path).
  {
    NodeRunner one({3}, false);
    EXPECT_EQ(one.n_nodes(), 1);
    EXPECT_EQ(one.threads(0), 3);
    auto jobs = make_jobs(ex, x, rows, k, 11);
    std::vector<float> y(x.size(), 123.f);  // overwritten, not accumulated into
    one.run(jobs, std::vector<int>(jobs.size(), 0), y.data(), rows, ex.d);
    EXPECT_EQ(y, want);
  }
  // Three faked nodes (experts round-robin, as expert_nodes spreads them), two thread splits:
  // the same bits every time; within float reassociation of the one-pool result.
  std::vector<int> node(static_cast<size_t>(n));
  for (int e = 0; e < n; ++e) node[size_t(e)] = e % 3;
  NodeRunner a({1, 2, 2}, false), b({3, 1, 1}, false);
  EXPECT_EQ(a.threads(1), 2);
  std::vector<float> first;
  for (int rep = 0; rep < 6; ++rep) {
    NodeRunner& runner = rep % 2 ? b : a;
    auto jobs = make_jobs(ex, x, rows, k, 11);
    std::vector<float> y(x.size(), -7.f);
    runner.run(jobs, node, y.data(), rows, ex.d);
    if (rep == 0) {
      first = y;
      double worst = 0;
      for (size_t i = 0; i < y.size(); ++i) worst = std::max(worst, std::abs(double(y[i]) - want[i]));
      double mag = 0;
      for (float v : want) mag = std::max(mag, double(std::abs(v)));
      EXPECT_LT(worst, 1e-5 * mag + 1e-7);
    } else {
      EXPECT_EQ(y, first) << "run " << rep;
    }
  }
  // A step whose CPU experts all sit on one later node: node 0's share of y is zeros.
  {
    auto jobs = make_jobs(ex, x, rows, k, 11);
    std::vector<ExpertJob> only;
    std::vector<int> on;
    for (size_t e = 0; e < jobs.size(); ++e)
      if (node[e] == 2) {
        only.push_back(jobs[e]);
        on.push_back(2);
      }
    std::vector<float> y(x.size(), 5.f);
    a.run(only, on, y.data(), rows, ex.d);
    auto again = make_jobs(ex, x, rows, k, 11);
    std::vector<ExpertJob> ref;
    for (size_t e = 0; e < again.size(); ++e)
      if (node[e] == 2) ref.push_back(again[e]);
    EXPECT_EQ(y, one_pool_sum(ref, x.size(), 1));
  }
}

// The real topology, pinned (one node on CI; every node with CPUs where there are more): the
// same result as one unpinned pool within reassociation, and bit for bit on repeat.
TEST(NodeRunner, PinnedOnThisMachinesNodes) {
  const int n = 6, rows = 5, k = 3;
  Experts ex(n);
  std::vector<float> x(size_t(rows) * ex.d, 0.25f);
  for (size_t i = 0; i < x.size(); ++i) x[i] = float(int(i % 13) - 6) * 0.1f;
  std::vector<int> cpus(static_cast<size_t>(numa_node_count()));
  for (size_t i = 0; i < cpus.size(); ++i) cpus[i] = int(numa_node_cpus(int(i)).size());
  std::vector<bool> need(cpus.size());
  for (size_t i = 0; i < cpus.size(); ++i) need[i] = cpus[i] > 0;
  NodeRunner r(split_threads(2, cpus, need));
  std::vector<int> usable, node;
  for (size_t i = 0; i < cpus.size(); ++i)
    if (cpus[i] > 0) usable.push_back(int(i));
  for (int e = 0; e < n; ++e) node.push_back(usable[size_t(e) % usable.size()]);
  const std::vector<float> want = one_pool_sum(make_jobs(ex, x, rows, k, 5), x.size(), 1);
  std::vector<float> first;
  for (int rep = 0; rep < 3; ++rep) {
    auto jobs = make_jobs(ex, x, rows, k, 5);
    std::vector<float> y(x.size());
    r.run(jobs, node, y.data(), rows, ex.d);
    if (rep == 0) first = y;
    EXPECT_EQ(y, first);
  }
  for (size_t i = 0; i < want.size(); ++i) EXPECT_NEAR(first[i], want[i], 1e-5 * (1 + std::abs(want[i]))) << i;
}

TEST(NodeRunner, Errors) {
  Experts ex(3);
  const int rows = 2;
  std::vector<float> x(size_t(rows) * ex.d, 0.5f), y(x.size());
  EXPECT_THROW(NodeRunner({0, 0}, false), Error);  // no node has threads
  NodeRunner r({1, 0, 1}, false);
  EXPECT_FALSE(r.has_node(1));
  EXPECT_EQ(r.threads(1), 0);
  auto jobs = make_jobs(ex, x, rows, 2, 1);
  try {
    r.run(jobs, {0, 1, 2}, y.data(), rows, ex.d);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("NUMA node 1"), std::string::npos) << e.what();
  }
  jobs = make_jobs(ex, x, rows, 2, 1);
  EXPECT_THROW(r.run(jobs, {0, 2, 2}, y.data(), 1, ex.d), Error);  // rows up to 1, not 2
  // An error inside one node's group reaches the caller; the other groups finish, and the
  // runner stays usable.
  jobs = make_jobs(ex, x, rows, 2, 1);
  jobs[2].weights.push_back(1.f);  // rows and weights of different lengths
  EXPECT_THROW(r.run(jobs, {0, 2, 2}, y.data(), rows, ex.d), Error);
  jobs = make_jobs(ex, x, rows, 2, 1);
  EXPECT_NO_THROW(r.run(jobs, {0, 2, 2}, y.data(), rows, ex.d));
}

}  // namespace
}  // namespace bigmoe::cpu
