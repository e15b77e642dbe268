// Whole-model GPU benchmark (GPU machine): a GLM-DSA checkpoint (GGUF file or safetensors dir,
// e.g. from `bigmoe synth`) uploaded whole by GlmDsaCuda, then
//   * the device bandwidth: 4 GiB device-to-device cudaMemcpy, (read + written) / time, median of 5;
//   * prefill tokens/s for each --prefill length (one sequence, one step per max_rows chunk);
//   * decode tokens/s at each --batch (that many sequences, each after a 512-token prompt, one
//     token per sequence per step; median step time over --steps steps after 3 warm-up steps);
//   * per-layer decode time (CUDA events between layers, batch 1);
//   * weight bytes read per decode step, the roofline (bytes / bandwidth) and the fraction of it
//     reached; and the extrapolation to a model of --layers layers (--dense of them dense) from
//     the measured dense / MoE layer times and bytes.
// Usage: bench_model MODEL [--prefill 512,4096] [--batch 1,4] [--steps 32] [--layers 78 --dense 3]
//                    [--synth gguf|fp8]   (writes MODEL first as `bigmoe synth` does if it is missing)
//                    [--profile-step]      (one eager batch-1 decode step between cudaProfilerStart / Stop,
//                                           for `ncu --profile-from-start off`)
// Offload (issue 5): the routed experts placed as a plan says, and the measured decode speed beside
// the planner's prediction for that layout:
//   --plan FILE                       a plan file (`bigmoe plan --out`), or
//   --machine FILE --layout NAME      plan here: the planner on this model and machine file, that layout
//     [--gpu-mem GiB]                 (its GPU memory cap; the layout must fit unless it is all-gpu)
//   --cache-slots N --cache-policy lru|lfu --prefetch on|off --cpu-threads N
//                                     the executor's runtime knobs (the cache ones default to the
//                                     plan file's expert_cache, else 0 slots, lru, prefetch off)
#include <cuda_profiler_api.h>
#include <cuda_runtime.h>
#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "backend/cuda/glm_dsa_cuda.h"
#include <nlohmann/json.hpp>

#include "plan/expert_placement.h"
#include "plan/machine.h"
#include "plan/plan_file.h"
#include "plan/planner.h"
#include "model/synth.h"
#include "util/error.h"

using namespace bigmoe;

namespace {

std::vector<int> parse_list(const char* s) {
  std::vector<int> v;
  for (const char* p = s; *p;) {
    v.push_back(std::atoi(p));
    while (*p && *p != ',') ++p;
    if (*p == ',') ++p;
  }
  return v;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

double copy_bandwidth() {
  const size_t n = size_t(4) << 30;
  void *a = nullptr, *b = nullptr;
  cuda::check(cudaMalloc(&a, n), "cudaMalloc");
  cuda::check(cudaMalloc(&b, n), "cudaMalloc");
  cuda::check(cudaMemset(a, 1, n), "cudaMemset");
  cudaEvent_t e0, e1;
  cudaEventCreate(&e0);
  cudaEventCreate(&e1);
  std::vector<double> t;
  for (int i = 0; i < 6; ++i) {
    cudaEventRecord(e0);
    cudaMemcpy(b, a, n, cudaMemcpyDeviceToDevice);
    cudaEventRecord(e1);
    cudaEventSynchronize(e1);
    float ms = 0;
    cudaEventElapsedTime(&ms, e0, e1);
    if (i > 0) t.push_back(ms / 1e3);
  }
  cudaFree(a);
  cudaFree(b);
  return 2.0 * double(n) / median(t);
}

}  // namespace

int main(int argc, char** argv) try {
  if (argc < 2) {
    std::fprintf(stderr, "usage: bench_model MODEL [--prefill 512,4096] [--batch 1,4] [--steps 32] [--layers 78 --dense 3]\n");
    return 2;
  }
  std::filesystem::path path = argv[1];
  std::vector<int> prefill = {512, 4096}, batches = {1, 4};
  int steps = 32, ext_layers = 78, ext_dense = 3, ctx_prompt = 512;
  bool profile_step = false;
  std::string plan_path, machine_path, layout, cache_policy, prefetch;  // "": the plan's or the default
  double gpu_mem = 0;
  int cache_slots = -1, cpu_threads = 0;  // slots -1: the plan's or the default
  std::string synth;
  for (int i = 2; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--profile-step") {
      profile_step = true;
      continue;
    }
    if (i + 1 >= argc) fail("option {} needs a value", a);
    const char* v = argv[++i];
    if (a == "--prefill") prefill = parse_list(v);
    else if (a == "--batch") batches = parse_list(v);
    else if (a == "--steps") steps = std::atoi(v);
    else if (a == "--layers") ext_layers = std::atoi(v);
    else if (a == "--dense") ext_dense = std::atoi(v);
    else if (a == "--prompt") ctx_prompt = std::atoi(v);
    else if (a == "--synth") synth = v;
    else if (a == "--plan") plan_path = v;
    else if (a == "--machine") machine_path = v;
    else if (a == "--layout") layout = v;
    else if (a == "--gpu-mem") gpu_mem = std::atof(v);
    else if (a == "--cache-slots") cache_slots = std::atoi(v);
    else if (a == "--cache-policy") cache_policy = v;
    else if (a == "--prefetch") prefetch = v;
    else if (a == "--cpu-threads") cpu_threads = std::atoi(v);
    else fail("unknown option {}", a);
  }
  if (cache_slots < -1) fail("--cache-slots {}: expected a count >= 0", cache_slots);
  if (!prefetch.empty() && prefetch != "on" && prefetch != "off") fail("--prefetch {}: expected on or off", prefetch);
  cudaDeviceProp prop{};
  cuda::check(cudaGetDeviceProperties(&prop, 0), "cudaGetDeviceProperties");
  std::printf("device: %s, %.1f GiB\n", prop.name, prop.totalGlobalMem / 1073741824.0);
  const double bw = copy_bandwidth();
  std::printf("copy bandwidth: %.0f GB/s\n", bw / 1e9);

  double t0 = now_s();
  if (!synth.empty() && !std::filesystem::exists(path)) {
    SynthOptions so;
    so.format = parse_synth_format(synth);
    so.progress = true;
    synth_glm_dsa(so, path);
    std::printf("synthesized %s in %.0f s\n", path.c_str(), now_s() - t0);
    t0 = now_s();
  }
  std::unique_ptr<GlmDsaModel> m =
      std::filesystem::is_directory(path) ? GlmDsaModel::load(path) : GlmDsaModel::load_gguf(path);
  const ModelConfig& c = m->config();
  int max_prefill = 0;
  for (int p : prefill) max_prefill = std::max(max_prefill, p);
  int max_batch = 1;
  for (int b : batches) max_batch = std::max(max_batch, b);
  cuda::GlmDsaCudaOptions o;
  o.max_context = std::max(max_prefill, ctx_prompt + steps + 3 + 9 + 1) + 8;  // prompt, timed + profiled steps
  o.max_sequences = max_batch;
  o.max_rows = std::max({max_prefill, ctx_prompt, 16});
  o.progress = true;
  // Offload: the placement from a plan file or from the planner run here.
  std::optional<plan::EnginePlan> ep;
  if (!plan_path.empty()) {
    ep = plan::load_plan_file(plan_path);
  } else if (!layout.empty()) {
    if (machine_path.empty()) fail("--layout needs --machine FILE");
    plan::PlanOptions po;
    po.ctx = o.max_context;
    po.gpu_mem_gib = gpu_mem;
    const plan::Plan pl = plan::make_plan(plan::load_plan_model(path.string(), std::nullopt),
                                          plan::load_machine(machine_path), po);
    int idx = -1;
    for (size_t i = 0; i < pl.layouts.size(); ++i)
      if (pl.layouts[i].name == layout) idx = int(i);
    if (idx < 0) fail("--layout {}: no such layout for this model and machine", layout);
    std::printf("planner (%s, gpu-mem %.1f GiB):\n%s\n", machine_path.c_str(), gpu_mem, plan::format_plan_table(pl).c_str());
    ep = plan::plan_file_from_json(plan::plan_file_json(pl, idx), "bench_model --layout " + layout);
  }
  if (ep) {
    plan::check_plan_against(*ep, c);
    o.experts = plan::expert_placement(*ep);
    if (cache_slots >= 0) o.experts.cache_slots = cache_slots;
    if (!cache_policy.empty()) o.experts.cache_policy = cache_policy;
    if (!prefetch.empty()) o.experts.prefetch = prefetch == "on";
    o.experts.cpu_threads = cpu_threads;
    std::printf("placement: %s\n", ep->summary().c_str());
  }
  cuda::GlmDsaCuda g(*m, o);
  std::printf("model: %s, %d layers (%d MoE), %d experts top-%d, d %d, vocab %d; %.2f GiB on the device, "
              "loaded in %.0f s\n",
              path.filename().c_str(), c.num_hidden_layers, int(std::count(c.layer_is_moe.begin(), c.layer_is_moe.begin() + c.num_hidden_layers, true)),
              c.n_routed_experts, c.num_experts_per_tok, c.hidden_size, c.vocab_size, g.resident_bytes() / 1073741824.0,
              now_s() - t0);

  std::mt19937 rng(1);
  std::uniform_int_distribution<int> tok(0, c.vocab_size - 1);
  auto random_tokens = [&](int n) {
    std::vector<int> v(n);
    for (auto& t : v) t = tok(rng);
    return v;
  };

  // Prefill.
  std::printf("\n| prefill tokens | time s | tokens/s |\n|---|---|---|\n");
  for (int P : prefill) {
    auto s = g.new_sequence();
    auto toks = random_tokens(P);
    g.forward({&s}, {std::vector<int>(toks.begin(), toks.begin() + std::min(P, 16))}, true);  // warm-up
    g.truncate(s, 0);
    double a = now_s();
    g.forward({&s}, {toks}, true);
    double dt = now_s() - a;
    std::printf("| %d | %.3f | %.0f |\n", P, dt, P / dt);
    g.free_sequence(s);
  }

  // Decode.
  const size_t bytes = g.decode_bytes_per_token();
  std::printf("\nweight bytes per decode row: %.3f GB (roofline at batch 1: %.1f tokens/s)\n", bytes / 1e9,
              bw / double(bytes));
  std::printf("\n| batch | step ms | tokens/s | weight GB per step (<=) | roofline tok/s | fraction |\n|---|---|---|---|---|---|\n");
  std::vector<float> layer_ms;
  std::vector<std::string> offload_lines;
  for (int B : batches) {
    std::vector<cuda::CudaSequence> seqs(B);
    std::vector<cuda::CudaSequence*> ptr;
    for (auto& s : seqs) {
      s = g.new_sequence();
      g.forward({&s}, {random_tokens(ctx_prompt)}, true);
      ptr.push_back(&s);
    }
    std::vector<double> t;
    for (int i = 0; i < steps + 3; ++i) {
      if (i == 3) g.reset_offload_stats();
      std::vector<std::vector<int>> toks(B);
      for (auto& v : toks) v = {tok(rng)};
      double a = now_s();
      g.forward(ptr, toks, true);
      if (i >= 3) t.push_back(now_s() - a);
    }
    const double st = median(t);
    if (ep) {
      const cuda::OffloadStats os = g.offload_stats();
      const double n = double(steps);
      offload_lines.push_back(fmt::format(
          "| {} | {:.3f} | {:.1f} | {:.1f} | {:.2f} | {:.1f} | {:.1f} | {:.1f} | {:.2f} | {:.2f} | {:.1f} | {:.1f} | {:.2f} "
          "| {:.2f} | {:.2f} |",
          B, st * 1e3, B / st, B == 1 ? ep->decode_tps_b1 : B == 4 ? ep->decode_tps_b4 : 0.0,
          B == 1 ? (B / st) / ep->decode_tps_b1 : B == 4 ? (B / st) / ep->decode_tps_b4 : 0.0, os.streamed / n,
          os.streamed_bytes / n / 1e6, os.cpu_bytes / n / 1e6, os.cache_hit_rate(), os.demand_hit_rate(),
          os.prefetches / n, os.prefetch_hits / n, os.prefetch_bytes / n / 1e6, os.host_ms / n, os.cpu_ms / n));
    }
    // Rows share the non-expert weights; their experts are counted as distinct (an upper bound).
    const double sb = double(g.decode_bytes_per_token(B));
    std::printf("| %d | %.3f | %.1f | %.3f | %.1f | %.2f |\n", B, st * 1e3, B / st, sb / 1e9, B * bw / sb,
                (sb / bw) / st);
    if (B == 1) {
      g.set_profiling(true);
      std::vector<std::vector<float>> runs;
      for (int i = 0; i < 9; ++i) {
        g.forward(ptr, {{tok(rng)}}, true);
        runs.push_back(g.layer_ms());
      }
      g.set_profiling(false);
      if (profile_step) {
        g.set_graphs(false);
        cuda::check(cudaProfilerStart(), "cudaProfilerStart");
        g.forward(ptr, {{tok(rng)}}, true);
        cuda::check(cudaProfilerStop(), "cudaProfilerStop");
        g.set_graphs(true);
      }
      layer_ms.assign(runs[0].size(), 0.f);
      for (size_t l = 0; l < layer_ms.size(); ++l) {
        std::vector<double> v;
        for (auto& r : runs) v.push_back(r[l]);
        layer_ms[l] = float(median(v));
      }
    }
    for (auto& s : seqs) g.free_sequence(s);
  }

  if (ep) {
    std::printf("\nhost bytes per decode row: %.3f GB (routed experts off the GPU)\n",
                g.decode_host_bytes_per_token() / 1e9);
    std::printf("\noffload, layout %s: measured decode beside the planner's prediction (its bytes per path over the "
                "machine file's bandwidths); per decode step: experts streamed on demand, MB streamed, MB the CPU "
                "read, cache hit rate, the same without prefetched experts' first uses, experts prefetched, "
                "of which used, MB prefetched, host ms (router sync to CPU result), of which CPU kernels "
                "(cache %d slots, %s, prefetch %s)\n\n",
                ep->layout.c_str(), o.experts.cache_slots, o.experts.cache_policy.c_str(),
                o.experts.prefetch ? "on" : "off");
    std::printf("| batch | step ms | tok/s | predicted tok/s | measured / predicted | streamed | MB streamed | MB CPU "
                "| cache hits | w/o prefetch | prefetched | used | MB prefetched | host ms | CPU ms |\n"
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    for (auto& l : offload_lines) std::printf("%s\n", l.c_str());
  }
  if (!layer_ms.empty()) {
    std::printf("\n| layer | kind | decode ms (batch 1) | weight MB read | GB/s | %% of copy |\n|---|---|---|---|---|---|\n");
    double dense = 0, moe = 0, dense_b = 0, moe_b = 0;
    int nd = 0, nm = 0;
    for (int l = 0; l <= c.num_hidden_layers; ++l) {
      const bool head = l == c.num_hidden_layers, is_moe = !head && c.layer_is_moe[l];
      const double lb = double(g.decode_bytes_layer(l)), gbs = lb / (layer_ms[l] * 1e-3) / 1e9;
      std::printf("| %s | %s | %.3f | %.1f | %.0f | %.0f%% |\n", head ? "head" : std::to_string(l).c_str(),
                  head ? "norm + lm_head" : is_moe ? "MoE" : "dense", layer_ms[l], lb / 1e6, gbs, 100 * gbs * 1e9 / bw);
      if (head) break;
      (is_moe ? moe : dense) += layer_ms[l];
      (is_moe ? moe_b : dense_b) += lb;
      (is_moe ? nm : nd) += 1;
    }
    if (nd && nm) {
      dense /= nd;
      moe /= nm;
      dense_b /= nd;
      moe_b /= nm;
      const double head_b = double(g.decode_bytes_layer(c.num_hidden_layers));
      const double ms = ext_dense * dense + (ext_layers - ext_dense) * moe + layer_ms[c.num_hidden_layers];
      const double eb = ext_dense * dense_b + (ext_layers - ext_dense) * moe_b + head_b;
      std::printf("\nextrapolated %d-layer model (%d dense): %.2f ms per token = %.1f tokens/s at batch 1 "
                  "(dense layer %.3f ms, MoE layer %.3f ms); %.2f GB read per token, roofline %.1f tokens/s, "
                  "fraction %.2f\n",
                  ext_layers, ext_dense, ms, 1e3 / ms, dense, moe, eb / 1e9, bw / eb, (eb / bw) / (ms * 1e-3));
    }
  }
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "error: %s\n", e.what());
  return 1;
}
