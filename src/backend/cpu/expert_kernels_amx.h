// AMX tile kernels for the int8 expert formats (Q4_K, Q8_0), internal to expert_kernels.cpp and
// its tests. The layouts, arithmetic and when they run are described at the top of
// expert_kernels.h ("AMX").
//
// One call computes one 16-row chunk of a weight matrix (two 8-row tiles of the repacked layout)
// for all the tokens of a job: y[t * ldy + n] = W[row n of the chunk] · a_t for n < 16 and
// t < nt. The activations are those of the other int8 kernels (ActView), padded to a multiple
// of 16 tokens so that every tile load stays inside them (the padding rows are computed and
// dropped).
//
// The kernel source (expert_kernels_amx.inc) is compiled twice: against the hardware intrinsics
// (expert_kernels_amx.cpp, built with -mamx-* where the compiler can) and against scalar
// stand-ins of the same intrinsics (expert_kernels_amx_emu.cpp), so that every build, AMX or not,
// tests the tile layout and the data flow, and an AMX machine can check the hardware against
// the emulation bit for bit.
//
// The AMX-built translation unit includes this header: keep it free of library headers, whose
// inline functions could be emitted there for AVX-512 and linked into code for any CPU.
#pragma once
#include <cstddef>
#include <cstdint>

namespace bigmoe::cpu::amx {

// Tokens per activation tile: ActBuf pads its rows to a multiple of this.
constexpr int kTileTokens = 16;

struct Chunk {
  const uint8_t* tile0 = nullptr;  // rows 0..7 of the chunk (repacked layout)
  const uint8_t* tile1 = nullptr;  // rows 8..15; == tile0 where the matrix ends first (ignored rows)
  int K = 0;                       // in
  const int8_t* q = nullptr;       // [round_up(nt, 16), K]
  const float* d = nullptr;        // [round_up(nt, 16), K / block] (block 256 for Q4_K, 32 for Q8_0)
  const int16_t* s = nullptr;      // [round_up(nt, 16), K / 32] (Q4_K only)
  int nt = 0;
  float* y = nullptr;  // y[t * ldy + n], n < 16
  size_t ldy = 0;
};
using ChunkFn = void (*)(const Chunk&);

// The hardware kernels (expert_kernels_amx.cpp): nullptr where the compiler could not build
// them; to be called only where cpu_isa_supported(CpuIsa::AMX).
extern const ChunkFn q4k_chunk_hw, q80_chunk_hw;
// The same kernels over scalar stand-ins of the intrinsics (expert_kernels_amx_emu.cpp): any
// CPU, slowly; tests compare them with the AVX2 kernels and with the hardware.
void q4k_chunk_emu(const Chunk& c);
void q80_chunk_emu(const Chunk& c);

}  // namespace bigmoe::cpu::amx
