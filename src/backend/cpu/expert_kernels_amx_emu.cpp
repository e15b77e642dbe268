// The AMX tile kernels (expert_kernels_amx.inc) over scalar stand-ins of the intrinsics they
// use, so that a build without AMX hardware still runs and tests them, and an AMX machine can
// check the hardware against them bit for bit. Each stand-in follows the pseudocode of Intel's
// intrinsics guide; the tile instructions check their configuration as the hardware does
// (where it would fault, this throws). Floats: one IEEE operation per intrinsic (this file is
// built with -ffp-contract=off), FMA through std::fma, conversions round to nearest even as
// with the default MXCSR.
//
// This file must not include <immintrin.h>: the names below stand in for its own.
#include <cmath>
#include <cstdint>
#include <cstring>

#include "backend/cpu/expert_kernels_amx.h"
#include "tensor/dtype.h"
#include "util/error.h"

namespace bigmoe::cpu::amx {
namespace {

// ---- vectors ----

struct __m128i {
  alignas(16) uint8_t b[16];
};
struct __m256i {
  alignas(32) uint8_t b[32];
};
struct __m512i {
  alignas(64) uint8_t b[64];
};
struct __m512 {
  alignas(64) uint8_t b[64];
};
using __mmask8 = uint8_t;

template <class T, class V>
T lane(const V& v, int i) {
  T x;
  std::memcpy(&x, v.b + size_t(i) * sizeof(T), sizeof(T));
  return x;
}
template <class T, class V>
void set_lane(V& v, int i, T x) {
  std::memcpy(v.b + size_t(i) * sizeof(T), &x, sizeof(T));
}
template <class V>
V load(const void* p) {
  V v;
  std::memcpy(v.b, p, sizeof(v.b));
  return v;
}
template <class V>
V zero() {
  V v;
  std::memset(v.b, 0, sizeof(v.b));
  return v;
}
template <class T, class V, class F>
V map2(const V& a, const V& b, F f) {
  V r;
  for (int i = 0; i < int(sizeof(V::b) / sizeof(T)); ++i) set_lane<T>(r, i, T(f(lane<T>(a, i), lane<T>(b, i))));
  return r;
}

__m128i _mm_loadu_si128(const __m128i* p) { return load<__m128i>(p); }
__m128i _mm_loadl_epi64(const __m128i* p) {
  __m128i r = zero<__m128i>();
  std::memcpy(r.b, p, 8);
  return r;
}
__m128i _mm_unpacklo_epi64(__m128i a, __m128i b) {
  __m128i r;
  std::memcpy(r.b, a.b, 8);
  std::memcpy(r.b + 8, b.b, 8);
  return r;
}
__m256i _mm256_loadu_si256(const __m256i* p) { return load<__m256i>(p); }
__m256i _mm256_set_m128i(__m128i hi, __m128i lo) {
  __m256i r;
  std::memcpy(r.b, lo.b, 16);
  std::memcpy(r.b + 16, hi.b, 16);
  return r;
}

// The aligned forms fault on an address that is not a multiple of 64, as the hardware does.
const void* aligned64(const void* p, const char* op) {
  if (reinterpret_cast<uintptr_t>(p) % 64) fail("AMX emulation: {} at {}, not 64-byte aligned", op, p);
  return p;
}
__m512i _mm512_loadu_si512(const void* p) { return load<__m512i>(p); }
__m512i _mm512_load_si512(const void* p) { return load<__m512i>(aligned64(p, "_mm512_load_si512")); }
void _mm512_store_si512(void* p, __m512i v) { std::memcpy(const_cast<void*>(aligned64(p, "_mm512_store_si512")), v.b, 64); }
__m512 _mm512_loadu_ps(const void* p) { return load<__m512>(p); }
__m512 _mm512_load_ps(const void* p) { return load<__m512>(aligned64(p, "_mm512_load_ps")); }
void _mm512_store_ps(void* p, __m512 v) { std::memcpy(const_cast<void*>(aligned64(p, "_mm512_store_ps")), v.b, 64); }
void _mm512_storeu_ps(void* p, __m512 v) { std::memcpy(p, v.b, 64); }

__m512 _mm512_setzero_ps() { return zero<__m512>(); }
__m512i _mm512_setzero_si512() { return zero<__m512i>(); }
template <class T, class V>
V splat(T x) {
  V r;
  for (int i = 0; i < int(sizeof(V::b) / sizeof(T)); ++i) set_lane<T>(r, i, x);
  return r;
}
__m512 _mm512_set1_ps(float x) { return splat<float, __m512>(x); }
__m512i _mm512_set1_epi8(char x) { return splat<int8_t, __m512i>(int8_t(x)); }
__m512i _mm512_set1_epi16(short x) { return splat<int16_t, __m512i>(x); }
__m512i _mm512_set1_epi32(int x) { return splat<int32_t, __m512i>(x); }

__m512i _mm512_and_si512(__m512i a, __m512i b) { return map2<uint8_t>(a, b, [](uint8_t x, uint8_t y) { return x & y; }); }
__m512i _mm512_or_si512(__m512i a, __m512i b) { return map2<uint8_t>(a, b, [](uint8_t x, uint8_t y) { return x | y; }); }
template <class T>
__m512i shift(__m512i a, unsigned n, bool left) {
  __m512i r;
  for (int i = 0; i < int(64 / sizeof(T)); ++i)
    set_lane<T>(r, i, n >= 8 * sizeof(T) ? T(0) : left ? T(lane<T>(a, i) << n) : T(lane<T>(a, i) >> n));
  return r;
}
__m512i _mm512_srli_epi16(__m512i a, unsigned n) { return shift<uint16_t>(a, n, false); }
__m512i _mm512_slli_epi16(__m512i a, unsigned n) { return shift<uint16_t>(a, n, true); }
__m512i _mm512_slli_epi32(__m512i a, unsigned n) { return shift<uint32_t>(a, n, true); }
__m512i _mm512_add_epi32(__m512i a, __m512i b) {
  return map2<uint32_t>(a, b, [](uint32_t x, uint32_t y) { return x + y; });  // wraps, as the hardware
}
__m512i _mm512_mullo_epi16(__m512i a, __m512i b) {
  return map2<uint16_t>(a, b, [](uint16_t x, uint16_t y) { return uint16_t(uint32_t(x) * y); });
}
// dst.dword[i] += a.word[2i]·b.word[2i] + a.word[2i+1]·b.word[2i+1] (signed; wraps).
__m512i _mm512_dpwssd_epi32(__m512i src, __m512i a, __m512i b) {
  __m512i r;
  for (int i = 0; i < 16; ++i) {
    const int32_t p0 = int32_t(lane<int16_t>(a, 2 * i)) * lane<int16_t>(b, 2 * i);
    const int32_t p1 = int32_t(lane<int16_t>(a, 2 * i + 1)) * lane<int16_t>(b, 2 * i + 1);
    set_lane<uint32_t>(r, i, lane<uint32_t>(src, i) + uint32_t(p0) + uint32_t(p1));
  }
  return r;
}
// dst.dword[i] = (idx bit 4 ? b : a).dword[idx & 15].
__m512i _mm512_permutex2var_epi32(__m512i a, __m512i idx, __m512i b) {
  __m512i r;
  for (int i = 0; i < 16; ++i) {
    const uint32_t k = lane<uint32_t>(idx, i);
    set_lane<uint32_t>(r, i, lane<uint32_t>(k & 16 ? b : a, int(k & 15)));
  }
  return r;
}
// 128-bit lanes 0, 1 of dst from a, 2, 3 from b, each chosen by two bits of imm.
__m512i _mm512_shuffle_i64x2(__m512i a, __m512i b, int imm) {
  __m512i r;
  for (int i = 0; i < 4; ++i) std::memcpy(r.b + 16 * i, (i < 2 ? a : b).b + 16 * ((imm >> (2 * i)) & 3), 16);
  return r;
}
__m512i _mm512_mask_blend_epi64(__mmask8 k, __m512i a, __m512i b) {
  __m512i r;
  for (int i = 0; i < 8; ++i) set_lane<uint64_t>(r, i, lane<uint64_t>((k >> i) & 1 ? b : a, i));
  return r;
}
__m512i _mm512_broadcast_i64x4(__m256i a) {
  __m512i r;
  std::memcpy(r.b, a.b, 32);
  std::memcpy(r.b + 32, a.b, 32);
  return r;
}
__m512i _mm512_cvtepu8_epi32(__m128i a) {
  __m512i r;
  for (int i = 0; i < 16; ++i) set_lane<uint32_t>(r, i, a.b[i]);
  return r;
}
__m512 _mm512_cvtph_ps(__m256i a) {
  __m512 r;
  for (int i = 0; i < 16; ++i) set_lane<float>(r, i, f16_to_f32(lane<uint16_t>(a, i)));
  return r;
}
__m512 _mm512_cvtepi32_ps(__m512i a) {
  __m512 r;
  for (int i = 0; i < 16; ++i) set_lane<float>(r, i, float(lane<int32_t>(a, i)));
  return r;
}
__m512 _mm512_mul_ps(__m512 a, __m512 b) { return map2<float>(a, b, [](float x, float y) { return x * y; }); }
__m512 _mm512_fmadd_ps(__m512 a, __m512 b, __m512 c) {
  __m512 r;
  for (int i = 0; i < 16; ++i) set_lane<float>(r, i, std::fma(lane<float>(a, i), lane<float>(b, i), lane<float>(c, i)));
  return r;
}
__m512 _mm512_fnmadd_ps(__m512 a, __m512 b, __m512 c) {
  __m512 r;
  for (int i = 0; i < 16; ++i) set_lane<float>(r, i, std::fma(-lane<float>(a, i), lane<float>(b, i), lane<float>(c, i)));
  return r;
}

// ---- tiles (palette 1: 8 tiles of at most 16 rows × 64 bytes; per thread, as registers) ----

struct Tiles {
  bool configured = false;
  int rows[8] = {}, colsb[8] = {};
  uint8_t t[8][16][64] = {};
};
thread_local Tiles tiles;

void check_tile(int t, const char* op) {
  if (!tiles.configured) fail("AMX emulation: {} before _tile_loadconfig", op);
  if (t < 0 || t >= 8 || !tiles.rows[t]) fail("AMX emulation: {} of tile {}, which is not configured", op, t);
}

void _tile_loadconfig(const void* p) {
  const uint8_t* c = static_cast<const uint8_t*>(p);
  if (c[0] != 1) fail("AMX emulation: palette {} (1 expected)", c[0]);
  for (int i = 1; i < 16; ++i)
    if (c[i]) fail("AMX emulation: config byte {} must be 0", i);
  for (int i = 32; i < 48; ++i)
    if (c[i]) fail("AMX emulation: config byte {} must be 0", i);
  for (int i = 56; i < 64; ++i)
    if (c[i]) fail("AMX emulation: config byte {} must be 0", i);
  for (int t = 0; t < 8; ++t) {
    uint16_t colsb;
    std::memcpy(&colsb, c + 16 + 2 * t, 2);
    const int rows = c[48 + t];
    if (colsb > 64 || rows > 16 || (!colsb) != (!rows))
      fail("AMX emulation: tile {} configured as {} rows × {} bytes", t, rows, colsb);
    tiles.rows[t] = rows;
    tiles.colsb[t] = colsb;
  }
  std::memset(tiles.t, 0, sizeof tiles.t);
  tiles.configured = true;
}

void _tile_release() {
  tiles = Tiles{};
}

void _tile_zero(int t) {
  check_tile(t, "_tile_zero");
  std::memset(tiles.t[t], 0, sizeof tiles.t[t]);
}

// Rows and bytes past the configured shape read as zero.
void _tile_loadd(int t, const void* base, long stride) {
  check_tile(t, "_tile_loadd");
  std::memset(tiles.t[t], 0, sizeof tiles.t[t]);
  for (int r = 0; r < tiles.rows[t]; ++r)
    std::memcpy(tiles.t[t][r], static_cast<const uint8_t*>(base) + r * stride, size_t(tiles.colsb[t]));
}

void _tile_stored(int t, void* base, long stride) {
  check_tile(t, "_tile_stored");
  for (int r = 0; r < tiles.rows[t]; ++r)
    std::memcpy(static_cast<uint8_t*>(base) + r * stride, tiles.t[t][r], size_t(tiles.colsb[t]));
}

// C.row[m].dword[n] += Σ_k Σ_{i<4} A.row[m].byte[4k + i] · B.row[k].byte[4n + i], signed bytes,
// for m < C.rows, n < C.colsb / 4, k < A.colsb / 4; the shapes must agree as the hardware
// requires.
void _tile_dpbssd(int c, int a, int b) {
  check_tile(c, "_tile_dpbssd");
  check_tile(a, "_tile_dpbssd");
  check_tile(b, "_tile_dpbssd");
  const int M = tiles.rows[c], N = tiles.colsb[c] / 4, K4 = tiles.colsb[a] / 4;
  if (tiles.rows[a] != M || tiles.colsb[b] != tiles.colsb[c] || tiles.rows[b] != K4 || tiles.colsb[a] % 4 ||
      tiles.colsb[c] % 4)
    fail("AMX emulation: _tile_dpbssd({}, {}, {}) on shapes C {}x{}, A {}x{}, B {}x{} (bytes)", c, a, b, M,
         tiles.colsb[c], tiles.rows[a], tiles.colsb[a], tiles.rows[b], tiles.colsb[b]);
  for (int m = 0; m < M; ++m)
    for (int n = 0; n < N; ++n) {
      uint32_t acc;
      std::memcpy(&acc, tiles.t[c][m] + 4 * n, 4);
      for (int k = 0; k < K4; ++k)
        for (int i = 0; i < 4; ++i)
          acc += uint32_t(int32_t(int8_t(tiles.t[a][m][4 * k + i])) * int8_t(tiles.t[b][k][4 * n + i]));
      std::memcpy(tiles.t[c][m] + 4 * n, &acc, 4);
    }
}

#include "backend/cpu/expert_kernels_amx.inc"

}  // namespace

void q4k_chunk_emu(const Chunk& c) { q4k_chunk(c); }
void q80_chunk_emu(const Chunk& c) { q80_chunk(c); }

}  // namespace bigmoe::cpu::amx
