// Prefill GEMM throughput (GPU machine): cuda::gemm_bf16 on GLM-5 shapes for T in {512, 4096},
// median of 20 timed launches (CUDA events per launch, after 3 warm-up launches), reported as
// TFLOP/s = 2·T·out·in / time. Then cuda::dequant_bf16 of a 6144 x 6144 weight in every
// format: bytes read + BF16 bytes written per time.
// Usage: bench_gemm [--quick] [--configs] (--quick: T = 512 only, 5 reps; --configs: also
// every tile configuration gemm_bf16 can pick, forced through BIGMOE_GEMM_CFG).
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "backend/cuda/model_ops.h"
#include "bench_timing.h"

using namespace bigmoe;
using cuda::WeightFormat;

#define CK(call) cuda::check(call, #call)

namespace {

__device__ uint32_t dhash(size_t i, uint32_t seed) {
  uint32_t h = uint32_t(i) * 2654435761u ^ seed;
  h ^= h >> 15;
  h *= 2246822519u;
  h ^= h >> 13;
  return h;
}
// Floats in [-0.5, 0.5) * mag.
__global__ void fill_float(float* p, size_t n, uint32_t seed, float mag) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x)
    p[i] = (float(dhash(i, seed) & 0xffff) / 65536.f - 0.5f) * mag;
}
// BF16 weights in [-0.5, 0.5) * 0.05 (truncated from float).
__global__ void fill_bf16(uint16_t* p, size_t n, uint32_t seed) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    const float f = (float(dhash(i, seed) & 0xffff) / 65536.f - 0.5f) * 0.05f;
    p[i] = uint16_t(__float_as_uint(f) >> 16);
  }
}
// Random bytes with small magnitudes: finite f16 / fp8 everywhere (scale fields included).
__global__ void fill_bytes(uint8_t* p, size_t n, uint32_t seed) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x)
    p[i] = uint8_t(dhash(i, seed)) & 0x3f;
}

size_t weight_bytes(WeightFormat f, int out, int in) {
  switch (f) {
    case WeightFormat::BF16: return size_t(out) * in * 2;
    case WeightFormat::F32: return size_t(out) * in * 4;
    case WeightFormat::FP8_E4M3: return size_t(out) * in;
    case WeightFormat::Q8_0: return size_t(out) * (in / 32) * 34;
    case WeightFormat::Q4_K: return size_t(out) * (in / 256) * 144;
    case WeightFormat::Q6_K: return size_t(out) * (in / 256) * 210;
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  bool quick = false, configs = false;
  for (int i = 1; i < argc; ++i) {
    quick |= std::strcmp(argv[i], "--quick") == 0;
    configs |= std::strcmp(argv[i], "--configs") == 0;
  }
  cudaDeviceProp prop{};
  CK(cudaGetDeviceProperties(&prop, 0));
  std::printf("device: %s, %d SMs, L2 %d MB\n\n", prop.name, prop.multiProcessorCount, prop.l2CacheSize >> 20);
  cudaEvent_t e0, e1;
  CK(cudaEventCreate(&e0));
  CK(cudaEventCreate(&e1));
  const int reps = quick ? 5 : 20;

  struct Shape {
    const char* name;
    int out, in;
  };
  const Shape shapes[] = {{"o_proj-like", 6144, 6144}, {"exp_gate/up", 2048, 6144}, {"exp_down", 6144, 2048}};
  // "auto" is gemm_bf16's own choice; --configs also times every forced tile configuration.
  std::vector<const char*> cfgs = {"auto"};
  if (configs) cfgs.insert(cfgs.end(), {"64x128_2x2", "64x128_2x2s2", "128x128_2x2", "128x128_2x2s2"});
  std::printf("| shape | [out x in] | T | tiles | us | TFLOP/s |\n|---|---|---|---|---|---|\n");
  for (const auto& sh : shapes) {
    for (int T : {512, 4096}) {
      if (quick && T != 512) continue;
      uint16_t* w;
      float *x, *y;
      CK(cudaMalloc(&w, size_t(sh.out) * sh.in * 2));
      CK(cudaMalloc(&x, size_t(T) * sh.in * 4));
      CK(cudaMalloc(&y, size_t(T) * sh.out * 4));
      fill_bf16<<<1024, 256>>>(w, size_t(sh.out) * sh.in, 11);
      fill_float<<<1024, 256>>>(x, size_t(T) * sh.in, 12, 2.f);
      CK(cudaGetLastError());
      for (const char* cfg : cfgs) {
        if (std::strcmp(cfg, "auto") == 0) unsetenv("BIGMOE_GEMM_CFG");
        else setenv("BIGMOE_GEMM_CFG", cfg, 1);
        for (int r = 0; r < 3; ++r) cuda::gemm_bf16(w, sh.out, sh.in, x, T, y);  // warm-up
        CK(cudaDeviceSynchronize());
        const double t = bigmoe::bench::median_launch_seconds(reps, e0, e1,
                                                              [&](int) { cuda::gemm_bf16(w, sh.out, sh.in, x, T, y); });
        const double tflops = 2.0 * T * sh.out * sh.in / t / 1e12;
        std::printf("| %s | %d x %d | %d | %s | %.1f | %.1f |\n", sh.name, sh.out, sh.in, T, cfg, t * 1e6, tflops);
        std::fflush(stdout);
      }
      unsetenv("BIGMOE_GEMM_CFG");
      CK(cudaFree(w));
      CK(cudaFree(x));
      CK(cudaFree(y));
    }
  }

  // dequant_bf16 of one 6144 x 6144 weight.
  const int out = 6144, in = 6144;
  std::printf("\n| dequant_bf16 %d x %d | format | us | GB/s (read + write) |\n|---|---|---|---|\n", out, in);
  const WeightFormat fmts[] = {WeightFormat::BF16, WeightFormat::F32, WeightFormat::FP8_E4M3,
                               WeightFormat::Q8_0, WeightFormat::Q4_K, WeightFormat::Q6_K};
  const char* names[] = {"BF16", "F32", "FP8", "Q8_0", "Q4_K", "Q6_K"};
  void* dst;
  CK(cudaMalloc(&dst, size_t(out) * in * 2));
  float* scale;
  const size_t nscale = size_t((out + 127) / 128) * ((in + 127) / 128);
  CK(cudaMalloc(&scale, nscale * 4));
  fill_float<<<64, 256>>>(scale, nscale, 5, 0.01f);
  for (int fi = 0; fi < 6; ++fi) {
    const WeightFormat f = fmts[fi];
    const size_t wb = weight_bytes(f, out, in);
    void* w;
    CK(cudaMalloc(&w, wb));
    fill_bytes<<<1024, 256>>>(static_cast<uint8_t*>(w), wb, 21);
    CK(cudaGetLastError());
    for (int r = 0; r < 3; ++r) cuda::dequant_bf16(f, w, scale, 128, 128, out, in, dst);
    CK(cudaDeviceSynchronize());
    const double t = bigmoe::bench::median_launch_seconds(
        reps, e0, e1, [&](int) { cuda::dequant_bf16(f, w, scale, 128, 128, out, in, dst); });
    std::printf("| | %s | %.1f | %.0f |\n", names[fi], t * 1e6,
                (wb + size_t(out) * in * 2) / t / 1e9);
    std::fflush(stdout);
    CK(cudaFree(w));
  }
  CK(cudaFree(dst));
  CK(cudaFree(scale));
  return 0;
}
