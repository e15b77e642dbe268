#include "backend/cpu/thread_pool.h"

#include <pthread.h>
#include <sched.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <fstream>
#include <sstream>
#include <string>
#include <utility>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include "util/error.h"

namespace bigmoe::cpu {

namespace {

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#else
  std::this_thread::yield();
#endif
}

// Waits until a != old: spins for up to spin_us microseconds, then sleeps on the futex.
void wait_change(const std::atomic<uint32_t>& a, uint32_t old, int spin_us) {
  if (spin_us > 0) {
    const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(spin_us);
    for (int i = 1;; ++i) {
      if (a.load(std::memory_order_acquire) != old) return;
      cpu_relax();
      if (i % 32 == 0 && std::chrono::steady_clock::now() > until) break;
    }
  }
  while (a.load(std::memory_order_acquire) == old) a.wait(old, std::memory_order_acquire);
}

bool pin_thread(pthread_t t, int cpu) {
  if (cpu < 0) return false;
  cpu_set_t set;
  CPU_ZERO(&set);
  CPU_SET(cpu, &set);
  return pthread_setaffinity_np(t, sizeof(set), &set) == 0;
}

// "0-3,8,10-11" -> {0,1,2,3,8,10,11}
std::vector<int> parse_cpulist(const std::string& s) {
  std::vector<int> out;
  std::stringstream ss(s);
  std::string part;
  while (std::getline(ss, part, ',')) {
    if (part.empty() || part == "\n") continue;
    size_t dash = part.find('-');
    try {
      int a = std::stoi(part.substr(0, dash));
      int b = dash == std::string::npos ? a : std::stoi(part.substr(dash + 1));
      for (int c = a; c <= b; ++c) out.push_back(c);
    } catch (const std::exception&) {
      return {};
    }
  }
  return out;
}

std::string node_cpulist(int node) {
  std::ifstream f("/sys/devices/system/node/node" + std::to_string(node) + "/cpulist");
  std::string s;
  if (f) std::getline(f, s);
  return s;
}

}  // namespace

std::vector<int> allowed_cpus() {
  cpu_set_t set;
  CPU_ZERO(&set);
  std::vector<int> out;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) {
    for (int c = 0; c < CPU_SETSIZE; ++c)
      if (CPU_ISSET(c, &set)) out.push_back(c);
  }
  if (out.empty()) {
    unsigned n = std::max(1u, std::thread::hardware_concurrency());
    for (unsigned c = 0; c < n; ++c) out.push_back(int(c));
  }
  return out;
}

int numa_node_count() {
  int n = 0;
  for (int node = 0; node < 1024; ++node) {
    std::ifstream f("/sys/devices/system/node/node" + std::to_string(node) + "/cpulist");
    if (!f) {
      if (node > 64) break;  // node numbers may have gaps, but not huge ones
      continue;
    }
    std::string s;
    std::getline(f, s);
    if (!parse_cpulist(s).empty()) ++n;
  }
  return std::max(n, 1);
}

std::vector<int> numa_node_cpus(int node) {
  if (node < 0) return {};
  std::vector<int> allowed = allowed_cpus();
  std::ifstream probe("/sys/devices/system/node/node0/cpulist");
  if (!probe) return node == 0 ? allowed : std::vector<int>{};  // no NUMA information
  std::vector<int> cpus = parse_cpulist(node_cpulist(node)), out;
  for (int c : cpus)
    if (std::binary_search(allowed.begin(), allowed.end(), c)) out.push_back(c);
  return out;
}

bool bind_memory_to_node(void* p, size_t n, int node) {
#if defined(SYS_mbind)
  if (node < 0 || node >= 1024 || n == 0) return false;
  constexpr int kWords = 1024 / (8 * sizeof(unsigned long));
  unsigned long mask[kWords] = {};
  mask[node / (8 * sizeof(unsigned long))] |= 1ul << (node % (8 * sizeof(unsigned long)));
  constexpr int kMpolPreferred = 1;
  long r = syscall(SYS_mbind, p, n, kMpolPreferred, mask, (unsigned long)(1024 + 1), 0u);
  return r == 0;
#else
  (void)p, (void)n, (void)node;
  return false;
#endif
}

ThreadPool::ThreadPool(int n_threads, int numa_node, bool pin) : numa_node_(numa_node) {
  std::vector<int> avail = numa_node >= 0 ? numa_node_cpus(numa_node) : allowed_cpus();
  if (numa_node >= 0 && avail.empty())
    fail("ThreadPool: NUMA node {} has no CPUs this process may use ({} node(s) found)", numa_node,
         numa_node_count());
  if (n_threads <= 0) n_threads = int(avail.size());
  cpus_.assign(size_t(n_threads), -1);
  if (pin)
    for (int w = 0; w < n_threads; ++w) cpus_[size_t(w)] = avail[size_t(w) % avail.size()];
  // Spinning only pays while every worker has a CPU of its own.
  spin_us_ = n_threads <= int(allowed_cpus().size()) ? 100 : 0;
  threads_.reserve(size_t(n_threads - 1));
  for (int w = 1; w < n_threads; ++w) {
    threads_.emplace_back([this, w] { worker_main(w); });
    // Pinned from here, so cpus_ is final when the constructor returns.
    if (cpus_[size_t(w)] >= 0 && !pin_thread(threads_.back().native_handle(), cpus_[size_t(w)])) cpus_[size_t(w)] = -1;
  }
}

ThreadPool::~ThreadPool() {
  stop_.store(true, std::memory_order_release);
  gen_.fetch_add(1, std::memory_order_release);
  gen_.notify_all();
  for (auto& t : threads_) t.join();
}

bool ThreadPool::pin_caller() const { return pin_thread(pthread_self(), cpus_[0]); }

void ThreadPool::worker_main(int w) {
  uint32_t seen = 0;
  for (;;) {
    wait_change(gen_, seen, spin_us_);
    seen = gen_.load(std::memory_order_acquire);
    if (stop_.load(std::memory_order_acquire)) return;
    call(w);
    if (pending_.fetch_sub(1, std::memory_order_acq_rel) == 1) pending_.notify_all();
  }
}

void ThreadPool::call(int w) {
  try {
    (*fn_)(w);
  } catch (...) {
    std::lock_guard<std::mutex> lk(err_mutex_);
    if (!err_) err_ = std::current_exception();
  }
}

void ThreadPool::run(const std::function<void(int)>& fn) {
  std::lock_guard<std::mutex> lk(run_mutex_);
  fn_ = &fn;
  err_ = nullptr;
  pending_.store(uint32_t(size() - 1), std::memory_order_relaxed);
  if (size() > 1) {
    gen_.fetch_add(1, std::memory_order_release);
    gen_.notify_all();
  }
  call(0);
  for (uint32_t p; (p = pending_.load(std::memory_order_acquire)) != 0;) wait_change(pending_, p, spin_us_);
  fn_ = nullptr;
  if (err_) std::rethrow_exception(std::exchange(err_, nullptr));
}

void ThreadPool::barrier() {
  const uint32_t n = uint32_t(size());
  if (n <= 1) return;
  const uint32_t g = bar_gen_.load(std::memory_order_acquire);
  if (bar_count_.fetch_add(1, std::memory_order_acq_rel) + 1 == n) {
    bar_count_.store(0, std::memory_order_relaxed);
    bar_gen_.fetch_add(1, std::memory_order_release);
    bar_gen_.notify_all();
  } else {
    wait_change(bar_gen_, g, spin_us_ ? 1000 : 0);
  }
}

}  // namespace bigmoe::cpu
