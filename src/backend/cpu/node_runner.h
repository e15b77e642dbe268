// The CPU expert kernels on several NUMA nodes at once (docs/offload.md, "NUMA"): one ThreadPool
// and ExpertRunner per node that computes experts, its workers pinned to that node's CPUs, so an
// expert packed on a node (PackedExpert::pack(..., node)) is read by that node's cores from its
// own memory.
//
// A step's jobs are grouped by node (job order kept within a node). The groups run at once: the
// calling thread drives the first node's pool, a persistent driver thread (pinned where that
// node's worker 0 would be) each other node's. Node n writes its own buffer [rows, d]; the first
// node with a pool writes y itself. After all groups are done, y += buffer of each later node,
// in ascending node order (the drivers share the rows). So y depends only on the jobs and their
// nodes: not on thread counts, on timing, or on which node finished first. With one node this
// is ExpertRunner::run_experts on y.
#pragma once
#include <exception>
#include <memory>
#include <vector>

#include "backend/cpu/expert_kernels.h"
#include "backend/cpu/thread_pool.h"

namespace bigmoe::cpu {

// Threads per node for the CPU expert kernels. node_cpus [nodes]: usable CPUs of each node;
// need [nodes]: whether the node computes experts. threads = 0: every usable CPU of each node
// that needs them. threads > 0: that many in all, split over the nodes that need them in
// proportion to their CPUs (largest remainder, ties to the lower node), at least one each (so
// the sum exceeds `threads` only when it is below the number of such nodes). Nodes without
// need get 0. Pure, for tests that fake nodes.
std::vector<int> split_threads(int threads, const std::vector<int>& node_cpus, const std::vector<bool>& need);

class NodeRunner {
 public:
  // threads [nodes]: workers of each node's pool; 0: the node computes nothing (no pool). pin:
  // bind each pool's workers to its node's CPUs (ThreadPool(n, node)); false: unbound pools, the
  // nodes only a grouping (tests that fake several nodes on a one-node machine). Throws
  // bigmoe::Error when no node has threads, or (pin) a node has no usable CPU.
  explicit NodeRunner(const std::vector<int>& threads, bool pin = true, CpuIsa isa = cpu_isa_best());
  ~NodeRunner();
  NodeRunner(const NodeRunner&) = delete;
  NodeRunner& operator=(const NodeRunner&) = delete;

  int n_nodes() const { return int(index_.size()); }
  bool has_node(int node) const { return node >= 0 && node < n_nodes() && index_[size_t(node)] >= 0; }
  int threads(int node) const { return has_node(node) ? pools_[size_t(index_[size_t(node)])]->size() : 0; }

  // y [rows, d] = Σ over jobs (y is overwritten): jobs[i] runs on node[i], which must have a
  // pool. Each job's x is read as given; its y is set here (y or the node's buffer), so the
  // caller's y pointers are ignored. The jobs are moved into the node groups (jobs is left
  // holding moved-from entries). Rows of the jobs must be < rows and every expert's d_model d.
  // Throws bigmoe::Error naming the job on a node without a pool, a row out of range, or any
  // error of ExpertRunner::run_experts.
  void run(std::vector<ExpertJob>& jobs, const std::vector<int>& node, float* y, int rows, int d);

 private:
  std::vector<int> index_;  // [nodes]: index into pools_, -1
  std::vector<int> node_of_;  // [pools]: its node
  std::vector<std::unique_ptr<ThreadPool>> pools_;
  std::vector<std::unique_ptr<ExpertRunner>> runners_;
  std::unique_ptr<ThreadPool> drivers_;  // one worker per pool (pools_.size() > 1 only)
  std::vector<std::vector<float>> part_;  // [pools]: partial y of pools 1.. ([rows, d])
  std::vector<std::vector<ExpertJob>> group_;  // [pools]: this step's jobs
  std::vector<std::exception_ptr> err_;   // [pools]
};

}  // namespace bigmoe::cpu
