// A fixed set of worker threads pinned to cores, for the CPU expert kernels (expert_kernels.h),
// and the bits of NUMA topology they need.
//
// run(fn) calls fn(w) on every worker w < size() at the same time and returns when all have
// returned. The calling thread is worker 0 (as in OpenMP): a pool of n has n - 1 threads of its
// own, so the caller never competes with a spinning worker for a core; pin_caller() binds the
// calling thread to worker 0's CPU. Inside fn, barrier() is a phase boundary (all workers meet)
// and work is handed out dynamically with an atomic counter (next_task), so one parallel region
// can hold several dependent phases (quantize activations | gate/up | down) without waking the
// threads again. Workers spin for about 100 microseconds after each region (MoE layers come back
// to back during decode), then sleep on a futex (std::atomic::wait); with more workers than
// CPUs they sleep at once.
//
// Pinning: worker w >= 1 is bound (pthread_setaffinity_np) to cpus()[w]; with a NUMA node given, the
// CPUs are that node's (read from /sys/devices/system/node, intersected with this process's
// affinity mask), so a node's experts can be computed by its own threads from its own memory
// (bind_memory_to_node, a raw mbind(2): no libnuma needed). More workers than CPUs wrap around.
#pragma once
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace bigmoe::cpu {

// CPUs this process may run on (sched_getaffinity), ascending.
std::vector<int> allowed_cpus();
// NUMA nodes that have CPUs (per /sys/devices/system/node); 1 where the kernel reports none.
int numa_node_count();
// CPUs of node `node` that this process may use; empty for an unknown node. Without NUMA
// information node 0 is every allowed CPU.
std::vector<int> numa_node_cpus(int node);
// Asks the kernel to place the pages of [p, p + n) on `node` (MPOL_PREFERRED, so allocation
// falls back elsewhere rather than failing). p must be page-aligned. Returns false where the
// kernel has no NUMA support or refuses; the memory stays usable either way.
bool bind_memory_to_node(void* p, size_t n, int node);

class ThreadPool {
 public:
  // n_threads <= 0: one worker per CPU (of `numa_node` if >= 0, else of the process).
  // pin = false leaves the workers unbound (tests on busy machines).
  explicit ThreadPool(int n_threads = 0, int numa_node = -1, bool pin = true);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return int(cpus_.size()); }
  int numa_node() const { return numa_node_; }
  // CPU of worker w (-1 where unpinned or the affinity call failed).
  const std::vector<int>& cpus() const { return cpus_; }

  // Calls fn(w) on each worker, fn(0) on the calling thread, and waits for all. The first
  // exception thrown by a worker is rethrown here (a worker that throws must not be needed at a
  // later barrier()). One run at a time: concurrent calls from several threads are serialized.
  void run(const std::function<void(int worker)>& fn);
  // Binds the calling thread to cpus()[0] (the thread that will call run()); false if unpinned
  // or the kernel refuses.
  bool pin_caller() const;
  // Only inside run(): returns once every worker has reached it.
  void barrier();
  // Only inside run(): hands out 0, 1, 2, ... across workers; returns -1 once `n` is reached.
  // `counter` must be zeroed before run().
  static int64_t next_task(std::atomic<int64_t>& counter, int64_t n) {
    int64_t i = counter.fetch_add(1, std::memory_order_relaxed);
    return i < n ? i : -1;
  }

 private:
  void worker_main(int w);
  void call(int w);  // fn_(w), recording the first exception

  std::vector<std::thread> threads_;
  std::vector<int> cpus_;
  int numa_node_ = -1;
  int spin_us_ = 0;
  std::mutex run_mutex_;
  const std::function<void(int)>* fn_ = nullptr;
  alignas(64) std::atomic<uint32_t> gen_{0};      // bumped to start a run
  alignas(64) std::atomic<uint32_t> pending_{0};  // workers still in the current run
  alignas(64) std::atomic<uint32_t> bar_count_{0};
  alignas(64) std::atomic<uint32_t> bar_gen_{0};
  std::atomic<bool> stop_{false};
  std::mutex err_mutex_;
  std::exception_ptr err_;
};

}  // namespace bigmoe::cpu
