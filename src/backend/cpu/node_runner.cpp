#include "backend/cpu/node_runner.h"

#include <algorithm>
#include <numeric>

#include "util/error.h"

namespace bigmoe::cpu {

std::vector<int> split_threads(int threads, const std::vector<int>& node_cpus, const std::vector<bool>& need) {
  const size_t N = node_cpus.size();
  std::vector<int> out(N, 0);
  std::vector<size_t> nodes;
  long cpus = 0;
  for (size_t n = 0; n < N; ++n)
    if (n < need.size() && need[n]) {
      nodes.push_back(n);
      cpus += std::max(node_cpus[n], 0);
    }
  if (nodes.empty()) return out;
  if (threads <= 0) {
    for (size_t n : nodes) out[n] = std::max(node_cpus[n], 1);
    return out;
  }
  // Largest remainder on the CPU shares (all equal when no node reports CPUs).
  std::vector<std::pair<long, size_t>> rem;  // (remainder numerator, node)
  int given = 0;
  for (size_t n : nodes) {
    const long w = cpus > 0 ? std::max(node_cpus[n], 0) : 1, total = cpus > 0 ? cpus : long(nodes.size());
    out[n] = int(long(threads) * w / total);
    given += out[n];
    rem.emplace_back(long(threads) * w % total, n);
  }
  std::stable_sort(rem.begin(), rem.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
  for (size_t i = 0; given < threads && i < rem.size(); ++i, ++given) ++out[rem[i].second];
  for (size_t n : nodes) out[n] = std::max(out[n], 1);
  return out;
}

NodeRunner::NodeRunner(const std::vector<int>& threads, bool pin, CpuIsa isa) {
  index_.assign(threads.size(), -1);
  for (size_t n = 0; n < threads.size(); ++n) {
    if (threads[n] <= 0) continue;
    index_[n] = int(pools_.size());
    node_of_.push_back(int(n));
    pools_.push_back(pin ? std::make_unique<ThreadPool>(threads[n], int(n)) : std::make_unique<ThreadPool>(threads[n], -1, false));
    runners_.push_back(std::make_unique<ExpertRunner>(*pools_.back(), isa));
  }
  if (pools_.empty()) fail("NodeRunner: no NUMA node has threads for the CPU expert kernels");
  const size_t P = pools_.size();
  part_.resize(P);
  group_.resize(P);
  err_.resize(P);
  if (P > 1) {
    drivers_ = std::make_unique<ThreadPool>(int(P), -1, false);
    // Driver w >= 1 takes the CPU of its pool's worker 0 (the caller's share of a run).
    drivers_->run([this](int w) {
      if (w > 0) pools_[size_t(w)]->pin_caller();
    });
  }
}

NodeRunner::~NodeRunner() {
  drivers_.reset();
  runners_.clear();
  pools_.clear();
}

void NodeRunner::run(std::vector<ExpertJob>& jobs, const std::vector<int>& node, float* y, int rows, int d) {
  BIGMOE_CHECK(node.size() == jobs.size(), "NodeRunner: {} jobs but {} nodes", jobs.size(), node.size());
  BIGMOE_CHECK(rows >= 0 && d > 0 && y, "NodeRunner: bad output ({} rows of {})", rows, d);
  const size_t P = pools_.size(), n = size_t(rows) * size_t(d);
  for (auto& g : group_) g.clear();
  for (size_t j = 0; j < jobs.size(); ++j) {
    if (!has_node(node[j]))
      fail("NodeRunner: job {} (expert at {}) is for NUMA node {}, which has no CPU expert threads", j,
           static_cast<const void*>(jobs[j].expert), node[j]);
    for (int r : jobs[j].rows)
      if (r < 0 || r >= rows) fail("NodeRunner: job {} routes row {} of {}", j, r, rows);
    group_[size_t(index_[size_t(node[j])])].push_back(std::move(jobs[j]));
  }
  if (P == 1) {
    std::fill(y, y + n, 0.0f);
    for (ExpertJob& j : group_[0]) j.y = y;
    runners_[0]->run_experts(group_[0]);
    return;
  }
  for (auto& e : err_) e = nullptr;
  drivers_->run([&](int w) {
    std::vector<ExpertJob>& g = group_[size_t(w)];
    try {
      float* out = y;
      if (w > 0 && !g.empty()) {
        // Allocated and zeroed by this driver, so its pages sit on the node that writes them.
        std::vector<float>& part = part_[size_t(w)];
        if (part.size() < n) part.resize(n);
        out = part.data();
      }
      if (w == 0 || !g.empty()) std::fill(out, out + n, 0.0f);
      for (ExpertJob& j : g) j.y = out;
      runners_[size_t(w)]->run_experts(g);
    } catch (...) {
      err_[size_t(w)] = std::current_exception();
    }
    drivers_->barrier();
    for (const auto& e : err_)
      if (e) return;
    // y += the later nodes' buffers, in node order; the drivers share the elements.
    const size_t chunk = (n + P * 16 - 1) / (P * 16) * 16, a = std::min(n, size_t(w) * chunk), b = std::min(n, a + chunk);
    for (size_t p = 1; p < P; ++p) {
      if (group_[p].empty()) continue;
      const float* src = part_[p].data();
      for (size_t i = a; i < b; ++i) y[i] += src[i];
    }
  });
  for (const auto& e : err_)
    if (e) std::rethrow_exception(e);
}

}  // namespace bigmoe::cpu
