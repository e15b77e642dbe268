#include "backend/cuda/probe.h"

#include <cuda_runtime.h>
#include <fmt/format.h>

#include <algorithm>
#include <cctype>
#include <fstream>

#include "backend/cuda/cuda_ops.h"

namespace bigmoe::cuda {

namespace {

// Best of 3 timed copies of `bytes` (cudaMemcpy kind), in seconds.
double best_copy_s(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind) {
  cudaEvent_t a, b;
  check(cudaEventCreate(&a), "cudaEventCreate");
  check(cudaEventCreate(&b), "cudaEventCreate");
  double best = 1e30;
  for (int i = 0; i < 4; ++i) {
    check(cudaEventRecord(a), "cudaEventRecord");
    check(cudaMemcpyAsync(dst, src, bytes, kind), "cudaMemcpyAsync");
    check(cudaEventRecord(b), "cudaEventRecord");
    check(cudaEventSynchronize(b), "cudaEventSynchronize");
    float ms = 0;
    check(cudaEventElapsedTime(&ms, a, b), "cudaEventElapsedTime");
    if (i > 0) best = std::min(best, ms * 1e-3);  // the first is a warm-up
  }
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  return best;
}

int numa_node_of(int dev) {
  char bus[32] = {0};
  if (cudaDeviceGetPCIBusId(bus, sizeof bus, dev) != cudaSuccess) return 0;
  std::string id(bus);
  std::transform(id.begin(), id.end(), id.begin(), [](unsigned char ch) { return char(std::tolower(ch)); });
  std::ifstream in("/sys/bus/pci/devices/" + id + "/numa_node");
  int node = 0;
  if (!(in >> node) || node < 0) node = 0;
  return node;
}

}  // namespace

std::vector<plan::GpuSpec> probe_gpus(std::vector<std::string>& notes) {
  std::vector<plan::GpuSpec> out;
  const int n = device_count();
  if (n == 0) {
    notes.push_back("no CUDA device found: the plan has no GPU");
    return out;
  }
  const size_t bytes = size_t(256) << 20;
  for (int d = 0; d < n; ++d) {
    check(cudaSetDevice(d), "cudaSetDevice");
    cudaDeviceProp p{};
    check(cudaGetDeviceProperties(&p, d), "cudaGetDeviceProperties");
    size_t free_b = 0, total_b = 0;
    check(cudaMemGetInfo(&free_b, &total_b), "cudaMemGetInfo");
    plan::GpuSpec g;
    g.name = p.name;
    g.memory_gib = double(total_b) / 1073741824.0;
    g.numa_node = numa_node_of(d);
    void *a = nullptr, *b = nullptr, *h = nullptr;
    if (cudaMalloc(&a, bytes) == cudaSuccess && cudaMalloc(&b, bytes) == cudaSuccess &&
        cudaMallocHost(&h, bytes) == cudaSuccess) {
      check(cudaMemset(a, 1, bytes), "cudaMemset");
      std::fill_n(static_cast<char*>(h), bytes, char(1));
      g.mem_gbps = 2.0 * double(bytes) / best_copy_s(b, a, bytes, cudaMemcpyDeviceToDevice) / 1e9;
      g.h2d_gbps = double(bytes) / best_copy_s(a, h, bytes, cudaMemcpyHostToDevice) / 1e9;
    } else {
      notes.push_back(fmt::format("gpu {}: too little free memory to measure bandwidths", d));
    }
    if (a) cudaFree(a);
    if (b) cudaFree(b);
    if (h) cudaFreeHost(h);
    // Dense BF16 tensor-core peak is about 4096 flops per SM per clock on Hopper; our GEMM
    // (bench_gemm) reaches about 30% of it.
    int clock_khz = 0;
    cudaDeviceGetAttribute(&clock_khz, cudaDevAttrClockRate, d);
    g.tflops = 0.3 * double(p.multiProcessorCount) * double(clock_khz) * 1e3 * 4096.0 / 1e12;
    notes.push_back(fmt::format("gpu {}: {} measured: copy {:.0f} GB/s, pinned host->device {:.1f} GB/s; "
                                "prefill TFLOP/s estimated from SMs x clock ({:.0f})",
                                d, g.name, g.mem_gbps, g.h2d_gbps, g.tflops));
    out.push_back(g);
  }
  return out;
}

}  // namespace bigmoe::cuda
