// EnginePlan -> cuda::ExpertPlacement, for the commands that drive the GPU engine (serve /
// chat / complete / perplexity --plan, bench_model). CUDA builds only (BIGMOE_WITH_CUDA): it
// includes the CUDA backend's header; plan_file.h itself stays CPU-only.
#pragma once
#include "backend/cuda/glm_dsa_cuda.h"
#include "plan/plan_file.h"

namespace bigmoe::plan {

inline cuda::ExpertHome expert_home(Place p) {
  switch (p) {
    case Place::Gpu:
      return cuda::ExpertHome::Gpu;
    case Place::Cpu:
      return cuda::ExpertHome::Cpu;
    case Place::Stream:
      return cuda::ExpertHome::Stream;
    case Place::Mixed:
      return cuda::ExpertHome::Mixed;
  }
  return cuda::ExpertHome::Gpu;
}

// Homes of the main layers' experts (the MTP layer is not run per token), their NUMA nodes (a
// host place's node, -1 for "cpu:*" spread and for GPU experts), the plan's mixed split, and
// the runtime cache its expert_cache block gives (cache_slots, cache_policy, prefetch; the
// defaults where it gives none). cpu_threads and any command-line cache flag are the caller's
// to set. `p` must have passed check_plan_against.
inline cuda::ExpertPlacement expert_placement(const EnginePlan& p) {
  cuda::ExpertPlacement x;
  x.home.resize(size_t(p.n_layers));
  x.node.resize(size_t(p.n_layers));
  for (int l = 0; l < p.n_layers; ++l)
    for (const Loc& e : p.experts[size_t(l)]) {
      x.home[size_t(l)].push_back(expert_home(e.place));
      x.node[size_t(l)].push_back(e.place == Place::Gpu ? -1 : e.dev);
    }
  if (double f = p.mixed_fraction(); f >= 0) x.mixed_cpu_fraction = f;
  if (p.cache_slots) x.cache_slots = *p.cache_slots;
  if (p.cache_policy) x.cache_policy = *p.cache_policy;
  if (p.prefetch) x.prefetch = *p.prefetch;
  return x;
}

}  // namespace bigmoe::plan
