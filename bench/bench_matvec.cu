// Decode matvec bandwidth on GLM-5 shapes (GPU machine). First the roofline: device-to-device
// cudaMemcpy of 4 GiB, (bytes read + written) / time, median of 10. Then for each shape, format
// and B in {1, 4, 16}: median of 30 timed launches (CUDA events per launch, after warm-up),
// rotating among enough weight buffers that the working set exceeds the L2 several times.
// Bytes moved = weights (+ FP8 scales) + x + y. Then grouped (MoE) launches of 8 experts out of
// 256. Usage: bench_matvec [--quick]
// (filters: BENCH_FMTS, BENCH_B1, BENCH_SHAPES below; BIGMOE_MATVEC_QROWS picks the quant rows per warp at B <= 2)
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "backend/cuda/cuda_ops.h"
#include "bench_timing.h"

using namespace bigmoe;
using cuda::WeightFormat;

#define CK(call) cuda::check(call, #call)

namespace {

// Random bytes; every 2-byte field is a finite half/bf16 with these bits so scales are sane:
// we only need non-zero, non-NaN-heavy data for timing.
__global__ void fill_random(uint8_t* p, size_t n, uint32_t seed) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    uint32_t h = uint32_t(i) * 2654435761u ^ seed;
    h ^= h >> 15;
    h *= 2246822519u;
    h ^= h >> 13;
    p[i] = uint8_t(h) & 0x3f;  // small magnitudes: finite bf16/f16/fp8 everywhere
  }
}
__global__ void fill_float(float* p, size_t n, uint32_t seed) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    uint32_t h = uint32_t(i) * 2654435761u ^ seed;
    h ^= h >> 16;
    p[i] = (float(h & 0xffff) / 65536.f - 0.5f) * 0.01f;
  }
}

}  // namespace

int main(int argc, char** argv) {
  const bool quick = argc > 1 && std::strcmp(argv[1], "--quick") == 0;
  // Optional filters (environment): BENCH_FMTS="Q4_K,Q6_K" (format names), BENCH_B1=1 (B = 1 only).
  const char* fmt_filter = std::getenv("BENCH_FMTS");
  const bool only_b1 = std::getenv("BENCH_B1") != nullptr;
  const char* shape_filter = std::getenv("BENCH_SHAPES");  // e.g. "q_b,o_proj" (plain shapes)
  cudaDeviceProp prop{};
  CK(cudaGetDeviceProperties(&prop, 0));
  std::printf("device: %s, %d SMs, L2 %d MB\n", prop.name, prop.multiProcessorCount, prop.l2CacheSize >> 20);
  cudaEvent_t e0, e1;
  CK(cudaEventCreate(&e0));
  CK(cudaEventCreate(&e1));

  // Roofline: 4 GiB device-to-device copy.
  double roof;
  {
    const size_t n = size_t(4) << 30;
    void *a, *b;
    CK(cudaMalloc(&a, n));
    CK(cudaMalloc(&b, n));
    fill_random<<<1024, 256>>>(static_cast<uint8_t*>(a), n, 1);
    CK(cudaGetLastError());
    CK(cudaMemcpy(b, a, n, cudaMemcpyDeviceToDevice));
    std::vector<float> ts;
    for (int r = 0; r < 10; ++r) {
      CK(cudaEventRecord(e0));
      CK(cudaMemcpy(b, a, n, cudaMemcpyDeviceToDevice));
      CK(cudaEventRecord(e1));
      CK(cudaEventSynchronize(e1));
      float ms;
      CK(cudaEventElapsedTime(&ms, e0, e1));
      ts.push_back(ms);
    }
    roof = 2.0 * n / (bench::median(ts) * 1e-3) / 1e9;
    std::printf("roofline: D2D cudaMemcpy 4 GiB, read+write: %.0f GB/s (median of 10)\n\n", roof);
    CK(cudaFree(a));
    CK(cudaFree(b));
  }

  struct Shape {
    const char* name;
    int out, in;
  };
  const Shape shapes[] = {{"q_a", 2048, 6144},         {"q_b", 16384, 2048},      {"kv_a", 576, 6144},
                          {"o_proj", 6144, 16384},     {"exp_gate/up", 2048, 6144}, {"exp_down", 6144, 2048},
                          {"lm_head", 154880, 6144}};
  const WeightFormat fmts[] = {WeightFormat::BF16, WeightFormat::FP8_E4M3, WeightFormat::Q8_0, WeightFormat::Q4_K,
                               WeightFormat::Q6_K};
  const size_t kWorkingSet = size_t(512) << 20;  // >> 50 MB L2
  const int reps = quick ? 10 : 30;

  std::printf("| shape | [out x in] | format | B | weight MB | us | GB/s | %% of copy |\n");
  std::printf("|---|---|---|---|---|---|---|---|\n");
  for (const auto& sh : shapes) {
    if (quick && std::strcmp(sh.name, "lm_head") == 0) continue;
    if (shape_filter && !std::strstr(shape_filter, sh.name)) continue;
    for (auto f : fmts) {
      if (fmt_filter && !std::strstr(fmt_filter, cuda::weight_format_name(f))) continue;
      const size_t wbytes = cuda::matvec_weight_bytes(f, sh.out, sh.in);
      const size_t sbytes =
          f == WeightFormat::FP8_E4M3 ? size_t((sh.out + 127) / 128) * ((sh.in + 127) / 128) * 4 : 0;
      const int nbuf = int(std::max<size_t>(2, std::min<size_t>(64, (kWorkingSet + wbytes - 1) / wbytes)));
      std::vector<void*> ws(nbuf);
      for (int k = 0; k < nbuf; ++k) {
        CK(cudaMalloc(&ws[k], wbytes));
        fill_random<<<1024, 256>>>(static_cast<uint8_t*>(ws[k]), wbytes, 1234u + k);
        CK(cudaGetLastError());
      }
      float* scale = nullptr;
      if (sbytes) {
        CK(cudaMalloc(&scale, sbytes));
        fill_float<<<64, 256>>>(scale, sbytes / 4, 7);
        CK(cudaGetLastError());
      }
      float *x, *y;
      CK(cudaMalloc(&x, size_t(16) * sh.in * 4));
      CK(cudaMalloc(&y, size_t(16) * sh.out * 4));
      fill_float<<<256, 256>>>(x, size_t(16) * sh.in, 99);
      CK(cudaGetLastError());
      for (int B : {1, 4, 16}) {
        if (only_b1 && B != 1) continue;
        for (int k = 0; k < std::max(nbuf, 3); ++k)
          cuda::matvec(f, ws[k % nbuf], scale, sh.out, sh.in, x, B, y);  // warm-up
        CK(cudaDeviceSynchronize());
        const double t = bench::median_launch_seconds(
            reps, e0, e1, [&](int r) { cuda::matvec(f, ws[r % nbuf], scale, sh.out, sh.in, x, B, y); });
        const double bytes = double(wbytes + sbytes) + 4.0 * B * (sh.in + sh.out);
        const double gbs = bytes / t / 1e9;
        std::printf("| %s | %d x %d | %s | %d | %.1f | %.1f | %.0f | %.0f%% |\n", sh.name, sh.out, sh.in,
                    cuda::weight_format_name(f), B, wbytes / 1e6, t * 1e6, gbs, 100.0 * gbs / roof);
        std::fflush(stdout);
      }
      for (void* p : ws) CK(cudaFree(p));
      if (scale) CK(cudaFree(scale));
      CK(cudaFree(x));
      CK(cudaFree(y));
    }
  }
  // Grouped (MoE) launches as a decode step makes them: 8 slots of one token over 256 experts
  // (random distinct ids per launch), the experts' weights at a uniform stride; bytes moved =
  // the 8 experts' weights + x + y.
  std::printf("\n| grouped | [out x in] x 8 of 256 | format | us | GB/s | %% of copy |\n|---|---|---|---|---|---|\n");
  const Shape gshapes[] = {{"exp_gate", 2048, 6144}, {"exp_down", 6144, 2048}};
  for (const auto& sh : gshapes) {
    for (auto f : {WeightFormat::Q4_K, WeightFormat::Q8_0, WeightFormat::FP8_E4M3}) {
      if (fmt_filter && !std::strstr(fmt_filter, cuda::weight_format_name(f))) continue;
      constexpr int E = 256, S = 8;
      const size_t wbytes = cuda::matvec_weight_bytes(f, sh.out, sh.in), stride = (wbytes + 255) / 256 * 256;
      const size_t sfl = f == WeightFormat::FP8_E4M3 ? size_t((sh.out + 127) / 128) * ((sh.in + 127) / 128) : 0;
      void* w;
      float *scale = nullptr, *x, *y;
      int* ids;
      CK(cudaMalloc(&w, stride * E));
      fill_random<<<1024, 256>>>(static_cast<uint8_t*>(w), stride * E, 4321u);
      CK(cudaGetLastError());
      if (sfl) {
        CK(cudaMalloc(&scale, sfl * E * 4));
        fill_float<<<64, 256>>>(scale, sfl * E, 7);
        CK(cudaGetLastError());
      }
      CK(cudaMalloc(&x, size_t(S) * sh.in * 4));
      CK(cudaMalloc(&y, size_t(S) * sh.out * 4));
      fill_float<<<256, 256>>>(x, size_t(S) * sh.in, 99);
      CK(cudaGetLastError());
      const int nsets = 64;
      std::vector<int> hid(size_t(nsets) * S);
      uint32_t h = 12345;
      for (int k = 0; k < nsets; ++k)
        for (int j = 0; j < S; ++j) {
          for (;;) {
            h = h * 1664525u + 1013904223u;
            const int e = int(h >> 8) % E;
            if (std::find(hid.begin() + size_t(k) * S, hid.begin() + size_t(k) * S + j, e) == hid.begin() + size_t(k) * S + j) {
              hid[size_t(k) * S + j] = e;
              break;
            }
          }
        }
      CK(cudaMalloc(&ids, hid.size() * 4));
      CK(cudaMemcpy(ids, hid.data(), hid.size() * 4, cudaMemcpyHostToDevice));
      const cuda::ExpertWeights ew{f, w, stride, scale, sfl};
      // gate / up: the 8 slots read one token (x_div 8); down: each slot its own row.
      const int x_div = sh.out == 2048 ? S : 1;
      for (int k = 0; k < 4; ++k) cuda::matvec_grouped(ew, sh.out, sh.in, ids + (k % nsets) * S, S, x, x_div, y);
      CK(cudaDeviceSynchronize());
      const double t = bench::median_launch_seconds(
          reps, e0, e1, [&](int r) { cuda::matvec_grouped(ew, sh.out, sh.in, ids + (r % nsets) * S, S, x, x_div, y); });
      const double bytes = double(S) * (wbytes + sfl * 4) + 4.0 * S * (sh.in + sh.out);
      const double gbs = bytes / t / 1e9;
      std::printf("| %s | %d x %d | %s | %.1f | %.0f | %.0f%% |\n", sh.name, sh.out, sh.in, cuda::weight_format_name(f),
                  t * 1e6, gbs, 100.0 * gbs / roof);
      std::fflush(stdout);
      CK(cudaFree(w));
      if (scale) CK(cudaFree(scale));
      CK(cudaFree(x));
      CK(cudaFree(y));
      CK(cudaFree(ids));
    }
  }
  return 0;
}
