// Internal to src/tensor: the SIMD kernel tables that quant.cpp dispatches to.
#pragma once
#include <cstdint>

#include "tensor/quant.h"

namespace bigmoe::detail {

using DequantFn = void (*)(const void* src, float* dst, int64_t n);
using DotFn = float (*)(const void* row, const float* x, int64_t n);

struct QuantKernels {
  DequantFn dequant = nullptr;
  DotFn dot = nullptr;
};

// Kernels for a type at one level; both null where the level has none for that type. Only call
// the returned functions on a CPU that supports the level.
QuantKernels avx2_kernels(GgmlType t);
QuantKernels avx512_kernels(GgmlType t);

}  // namespace bigmoe::detail
