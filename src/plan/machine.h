// The machine a plan is made for: GPUs, NUMA nodes and the bandwidths between them, read from a
// machine file (docs/planner.md has the schema; machines/*.json are examples) or probed on the
// running machine. Probing reads /proc/meminfo and /sys/devices/system/node and times a parallel
// sum over a large buffer for the host read bandwidth; GPUs come from a hook that a CUDA build
// installs (set_gpu_probe). Without one the probe reports no GPU and says so in `notes`.
#pragma once
#include <cstdint>
#include <filesystem>
#include <functional>
#include <nlohmann/json_fwd.hpp>
#include <string>
#include <vector>

namespace bigmoe::plan {

struct GpuSpec {
  std::string name;
  double memory_gib = 0;  // device memory
  double mem_gbps = 0;    // device memory bandwidth (GB/s, 1e9 bytes)
  double h2d_gbps = 0;    // pinned host memory of `numa_node` -> this GPU
  int numa_node = 0;      // the NUMA node the GPU is attached to
  double tflops = 0;      // dense GEMM throughput for prefill (TFLOP/s)
  // Share of mem_gbps the engine's decode kernels reach on GPU-resident bytes (bench_model's
  // all-GPU "fraction"); 1 = the roofline. Optional, default 1.
  double decode_efficiency = 1.0;
};

struct NumaNode {
  double memory_gib = 0;
  double read_gbps = 0;  // host memory read bandwidth of this node, all its cores reading
  int cores = 0;
  double tflops = 0;  // CPU GEMM throughput (prefill without a GPU); 0 in a file = cores x 0.05
  // Host memory bandwidth the CPU's reads and the link's DMA reads share (GB/s); 0 = not a limit
  // (optional). Caps a mixed step: its bytes move at min(read + link, mem).
  double mem_gbps = 0;
};

struct Machine {
  std::string name;
  std::vector<std::string> notes;
  std::vector<GpuSpec> gpus;
  std::vector<NumaNode> nodes;
  double remote_h2d_gbps = 0;  // host memory of a node other than the GPU's -> GPU
  double p2p_gbps = 0;         // GPU <-> GPU
  std::string source;          // the file it came from, or "probed"

  // Host memory of node n -> GPU g.
  double link_gbps(int g, int n) const;
  double host_memory_gib() const;
};

// Parses and validates a machine description. Errors name `source` and the field at fault
// (unknown fields included, e.g. "gpus[1].memroy_gib").
Machine machine_from_json(const nlohmann::json& j, const std::string& source);
Machine load_machine(const std::filesystem::path& file);
nlohmann::json machine_to_json(const Machine& m);

// ---- probing ----

// GPUs of the running machine; appends a line to `notes` for anything it could not measure.
using GpuProbe = std::function<std::vector<GpuSpec>(std::vector<std::string>& notes)>;
void set_gpu_probe(GpuProbe probe);

struct ProbeOptions {
  int threads = 0;            // 0: all cores
  uint64_t buffer_bytes = 0;  // 0: min(1 GiB, available memory / 8)
  int passes = 5;             // best of
};
Machine probe_machine(const ProbeOptions& o = {});

// GB/s of a parallel sum over `bytes` (best of `passes`), with `threads` OpenMP threads.
double measure_host_read_gbps(int threads, uint64_t bytes, int passes);

// Helpers for the probe, exposed for tests.
std::vector<int> parse_cpulist(const std::string& s);  // "0-3,8,10-11" -> {0,1,2,3,8,10,11}
// The value in kB of `key` ("MemTotal") in /proc/meminfo or a node's meminfo text ("Node 0
// MemTotal:  123 kB"); -1 when absent.
int64_t parse_meminfo_kb(const std::string& text, const std::string& key);

}  // namespace bigmoe::plan
