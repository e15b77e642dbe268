// The pool row of a cache position under a PageTable (cuda_ops.h), for the kernels that read or
// write the paged cache (mla_attention.cu, decode_ops.cu). One table load per row; a null table
// is the contiguous cache.
#pragma once
#include <cuda_runtime.h>

#include "backend/cuda/cuda_ops.h"

namespace bigmoe::cuda {

__device__ __forceinline__ int pool_row(const PageTable& pt, int r) {
  return pt.table ? __ldg(pt.table + r / pt.page_rows) * pt.page_rows + r % pt.page_rows : r;
}

}  // namespace bigmoe::cuda
