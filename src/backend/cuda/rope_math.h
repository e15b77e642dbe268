// The rotary angle of rope_kernel (model_ops.cu) and the fused cache writers (decode_ops.cu),
// as cpu::Rope computes it: angle = inv_freq * float(pos) in float32, cos / sin in double, times
// the attention factor. Pair (a, b) of a rotated vector: interleave (2j, 2j + 1), else (j, j + dim/2).
#pragma once
#include <cuda_runtime.h>

namespace bigmoe::cuda {

__device__ __forceinline__ void rope_cos_sin(float inv_freq, int pos, float factor, float& c, float& s) {
  const float ang = inv_freq * float(pos);
  double sd, cd;
  sincos(double(ang), &sd, &cd);
  c = float(cd) * factor;
  s = float(sd) * factor;
}

__device__ __forceinline__ void rope_pair_index(int j, int dim, bool interleave, int& a, int& b) {
  a = interleave ? 2 * j : j;
  b = interleave ? 2 * j + 1 : j + dim / 2;
}

}  // namespace bigmoe::cuda
