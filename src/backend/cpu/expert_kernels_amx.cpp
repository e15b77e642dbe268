// The AMX tile kernels on the hardware: the only translation unit built with -mamx-tile
// -mamx-int8 and AVX-512 (CMakeLists.txt, where the compiler takes them); its code runs only
// once cpu_isa_best() has found the tiles and Linux has granted them. Without those flags the
// kernels are absent (nullptr).
#include "backend/cpu/expert_kernels_amx.h"

#if defined(__AMX_TILE__) && defined(__AMX_INT8__) && defined(__AVX512F__) && defined(__AVX512BW__) && \
    defined(__AVX512VL__) && defined(__AVX512VNNI__) && defined(__F16C__)
// GCC 12's AVX-512 intrinsics start from _mm512_undefined_*(), which -Wall reports as
// uninitialized once inlined (as in expert_kernels.cpp).
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

namespace bigmoe::cpu::amx {
namespace {
#include "backend/cpu/expert_kernels_amx.inc"
}  // namespace

const ChunkFn q4k_chunk_hw = q4k_chunk;
const ChunkFn q80_chunk_hw = q80_chunk;

}  // namespace bigmoe::cpu::amx

#else

namespace bigmoe::cpu::amx {
const ChunkFn q4k_chunk_hw = nullptr;
const ChunkFn q80_chunk_hw = nullptr;
}  // namespace bigmoe::cpu::amx

#endif
