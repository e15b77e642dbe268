// CPU kernels for routed experts held in host memory: for the rows (tokens) a MoE layer routes
// to an expert, y += weight · down(silu(gate x) ⊙ up x), with the weights in the formats of
// GGUF and of the official FP8 checkpoint (Q4_K, Q8_0, FP8 e4m3 with block scales, BF16).
//
// Weights are repacked ONCE at load (PackedMatrix::pack) into tiles of R consecutive rows whose
// bytes interleave the rows, so that one activation load serves R rows and every byte is read
// once, sequentially. Layouts (k = input index; per tile the pieces below repeat along k):
//
//  Q4_K (R = 8, one 1152-byte piece per 256 k = 8 × the 144-byte ggml block, same bytes):
//    d[8] f16 | dmin[8] f16 | 64 B: (sc & 15) | (m & 15) << 4 for sub-block j, row r at 8j + r |
//    32 B: (sc >> 4) | (m >> 4) << 2 of (j, r) in nibble j / 4 of byte 8(j % 4) + r |
//    1024 B: 32 groups of 8 k; byte i of group g holds k = 8g + i % 8 of row {0,1,4,5}[i / 8]
//    (low nibble) and of row {2,3,6,7}[i / 8] (high nibble).
//  Q8_0 (R = 8, 272 bytes per 32 k): d[8] f16 | 4 groups of 8 k × 64 B; byte i of group g is
//    k = 8g + i % 8 of row {0,1,4,5,2,3,6,7}[i / 8], int8.
//  FP8 e4m3 (R = 4, 64 bytes per 16 k): the 16 bytes of rows 0..3 in turn. The block scales
//    (weight_scale_inv, [ceil(out/bo), ceil(in/bi)]) are kept as float32 beside the tiles;
//    bo % 4 == 0 and bi % 16 == 0 so a tile's 16-k chunk has one scale.
//  BF16 (R = 4, 128 bytes per 16 k): the 16 elements of rows 0..3 in turn.
// Rows past `out` in the last tile are zero. The byte order inside a group of 8 k (int formats)
// is what the SIMD dots need: a 32-byte AVX2 vector is 4 rows × 8 k, maddubs + madd leave each
// row's sums in two adjacent int32 lanes, and one hadd of the two halves of a group yields rows
// 0..7 in order; AVX-512 reads two groups (Q4_K) or one group (Q8_0) per 64-byte vector.
//
// Dot products (chosen at run time, CpuIsa):
//  * Q4_K · Q8_K-like activations (per row and 256 k: float d = amax/127, int8 q = round(x/d),
//    int16 sums per 32): unsigned nibbles × int8 with maddubs into int16 per 32-k sub-block,
//    madd with the 6-bit scales (AVX-512: vpdpwssd) into int32 per super-block, the mins from
//    the activation sums; float only once per 256 k.
//  * Q8_0 · Q8_0 activations (per 32 k, exactly tensor/quant_act.h's quantize_act): AVX2
//    maddubs(|w|, sign(a, w)) + madd; AVX-512 VNNI vpdpbusd on (w + 128) with the offset taken
//    back through the activation sums.
//  * FP8 / BF16 · float activations: the weights are decoded to float (FP8 through its exact
//    f16 bit pattern and F16C, times 256 · scale: the same float as the reference's fp8 · scale;
//    the NaN codes 0x7f / 0xff, which checkpoints do not hold, read as ±480) and multiplied with
//    FMA (AVX2 / AVX-512F).
//  * A scalar path on the same layouts, accumulating in double, is the reference the SIMD
//    kernels are tested against (and is what runs on CPUs without AVX2).
// Activations are quantized per row, once per matrix input.
//
// AMX (CpuIsa::AMX: AVX512 plus AMX-TILE / AMX-INT8, granted by Linux through arch_prctl): a
// Q4_K or Q8_0 job of at least amx_min_rows rows (tokens routed to one expert) runs 16-row
// chunks of each matrix through tile products, C[16 tokens][16 rows] += A · B, A the int8
// activations as quantized above (read in place, the token stride K; buffers are padded to a
// multiple of 16 tokens), B built from the repacked tiles above when the chunk is computed (no
// second copy of the weights), once per chunk whatever the token count, into L1-sized staging:
//  Q8_0: per 32 k, B = 8 rows × 64 bytes: row i = k quad i, dword n = row n's 4 int8 weights of
//    quad i (VNNI-4); one TDPBSSD (A 16 × 32 bytes) gives each (token, row)'s block dot, and the
//    epilogue is q80_avx2's: acc = fma(d_w · d_a, float(dot), acc).
//  Q4_K: the 6-bit sub-block scale is folded into the nibbles, split so that each part fits a
//    byte: sc = 8·sh + sl, and per 64 k two B tiles of 16 rows × 64 bytes (row i = k quad i,
//    dword n = row n's 4 products) hold sh·q and sl·q (<= 105). 8·(A·Bh) + A·Bl over the four
//    64-k steps of a super-block is Σ_j sc_j Σ q·a, the integer the VNNI and AVX2 kernels form;
//    the mins term and the float epilogue are q4k_finish's.
// So AMX gives the AVX2 kernels' results bit for bit (Q4_K also those of AVX512; AVX512's
// Q8_0 rounds its two half-row partial sums separately). Fewer rows, and the float formats, run
// the AVX512 kernels. The tile kernels live in expert_kernels_amx.{h,inc,cpp}, the only code
// built for AMX; expert_kernels_amx_emu.cpp runs the same source on any CPU for the tests.
//
// Threads: ExpertRunner::run_experts computes all the experts of one MoE layer in one parallel
// region of a ThreadPool: quantize inputs | gate and up in 16-row chunks (silu·mul at once) |
// quantize h | down in 16-row chunks of the output, each chunk across all jobs in job order, so
// no two threads write the same output element and the result does not depend on the thread
// count.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "backend/cpu/thread_pool.h"
#include "model/weights.h"

namespace bigmoe::cpu {

enum class ExpertFormat { Q4_K, Q8_0, FP8, BF16 };
const char* expert_format_name(ExpertFormat f);

// Instruction sets of the kernels, each a superset of the one before. AVX2 needs AVX2 + FMA +
// F16C; AVX512 needs AVX-512 F/BW/VL/VNNI (Cascade Lake, Ice Lake, Sapphire Rapids, Zen 4 and
// later); AMX needs AVX512 plus AMX-TILE and AMX-INT8 (Sapphire Rapids and later) and a Linux
// that grants the tile state (5.16+; cpu_isa_best asks once per process).
enum class CpuIsa { Scalar, AVX2, AVX512, AMX };
const char* cpu_isa_name(CpuIsa isa);
CpuIsa cpu_isa_best();
bool cpu_isa_supported(CpuIsa isa);

// Rows (tokens routed to one expert) from which CpuIsa::AMX computes a Q4_K / Q8_0 job with tiles;
// below, with the AVX512 kernels. One tile holds 16 tokens; bench_cpu_experts --amx measures
// both paths per row count (where the tiles start to pay).
constexpr int kAmxMinRows = 16;

// One weight matrix [out, in] in the kernels' layout (see the top of this file).
class PackedMatrix {
 public:
  PackedMatrix() = default;
  ~PackedMatrix();
  PackedMatrix(PackedMatrix&& o) noexcept;
  PackedMatrix& operator=(PackedMatrix&& o) noexcept;

  // Repacks W: GGUF Q4_K, Q8_0 or BF16 rows, or a checkpoint BF16 or FP8 e4m3 (with
  // weight_scale_inv) tensor. numa_node >= 0 places the tiles on that node. Throws bigmoe::Error
  // for other formats, `in` not a multiple of the format's block (256, 32, 16, 16) or FP8 block
  // sizes the layout cannot hold.
  static PackedMatrix pack(const Linear& W, int numa_node = -1);
  // A copy in new memory (benchmarks use it to exceed the caches).
  PackedMatrix clone(int numa_node = -1) const;

  ExpertFormat format() const { return fmt_; }
  int out() const { return out_; }
  int in() const { return in_; }
  int tile_rows() const { return tile_rows_; }
  // Bytes a full pass streams: the tiles plus the FP8 scales.
  size_t bytes() const { return tile_bytes_ * size_t(n_tiles_) + scales_.size() * sizeof(float); }

  // Row o in the source's encoding (ggml blocks, or fp8 / bf16 elements): the round trip.
  std::vector<uint8_t> source_row(int o) const;
  // Row o as float32, the same values Linear::row gives for the source.
  void dequantize_row(int o, float* dst) const;

  // Internal to the kernels.
  const uint8_t* tile(int t) const { return data_ + size_t(t) * tile_bytes_; }
  const float* scale_row(int row) const { return scales_.data() + size_t(row / bo_) * size_t(sc_cols_); }
  int n_tiles() const { return n_tiles_; }
  int block_in() const { return bi_; }

 private:
  void allocate(int numa_node);
  void release();

  ExpertFormat fmt_ = ExpertFormat::BF16;
  int out_ = 0, in_ = 0, tile_rows_ = 0, n_tiles_ = 0;
  size_t tile_bytes_ = 0;
  uint8_t* data_ = nullptr;  // n_tiles_ * tile_bytes_, page-aligned (mmap)
  size_t alloc_bytes_ = 0;
  std::vector<float> scales_;  // FP8: [ceil(out/bo), ceil(in/bi)]
  int bo_ = 1, bi_ = 1, sc_cols_ = 0;
};

// y[t, :] = W x[t, :] for t < T (x [T, in], y [T, out]), rows split across the pool's workers.
// amx_min_rows: see kAmxMinRows (only read with CpuIsa::AMX).
void packed_linear(const PackedMatrix& W, const float* x, int T, float* y, ThreadPool& pool,
                   CpuIsa isa = cpu_isa_best(), int amx_min_rows = kAmxMinRows);

// gate, up [d_ff, d_model] and down [d_model, d_ff] of one expert. Formats may differ.
struct PackedExpert {
  PackedMatrix gate, up, down;
  static PackedExpert pack(const Linear& gate, const Linear& up, const Linear& down, int numa_node = -1);
  int d_model() const { return gate.in(); }
  int d_ff() const { return gate.out(); }
  size_t bytes() const { return gate.bytes() + up.bytes() + down.bytes(); }
};

// The rows of one batch routed to one expert: for i < rows.size(),
//   y[rows[i], :] += weights[i] * down(silu(gate x[rows[i], :]) ⊙ up x[rows[i], :])
// with x and y row-major [*, d_model] (y may alias x: inputs are read before any output is
// written). Several jobs may share y (the experts a token was routed to).
struct ExpertJob {
  const PackedExpert* expert = nullptr;
  const float* x = nullptr;
  float* y = nullptr;
  std::vector<int> rows;
  std::vector<float> weights;
};

class ExpertRunner {
 public:
  // Throws bigmoe::Error if this CPU cannot run `isa`. amx_min_rows: see kAmxMinRows (only
  // read with CpuIsa::AMX; >= 1).
  explicit ExpertRunner(ThreadPool& pool, CpuIsa isa = cpu_isa_best(), int amx_min_rows = kAmxMinRows);
  ~ExpertRunner();
  ExpertRunner(const ExpertRunner&) = delete;
  ExpertRunner& operator=(const ExpertRunner&) = delete;

  CpuIsa isa() const { return isa_; }
  int amx_min_rows() const { return amx_min_rows_; }
  ThreadPool& pool() { return pool_; }
  // All jobs in one parallel region. Every job's expert must have the same d_model. Jobs with
  // no rows are skipped. Throws bigmoe::Error on a null expert or pointer, rows / weights of
  // different lengths, or a negative row.
  void run_experts(const std::vector<ExpertJob>& jobs);

 private:
  struct Scratch;
  ThreadPool& pool_;
  CpuIsa isa_;
  int amx_min_rows_;
  std::unique_ptr<Scratch> s_;
};

// Test hook: the int8 activation row the kernels dot with a weight format (Q4_K: 256-k blocks,
// float d; Q8_0: 32-k blocks, d rounded to f16 as quantize_act). Empty for the float formats.
struct QuantizedRow {
  std::vector<int8_t> q;
  std::vector<float> d;      // per block
  std::vector<int16_t> sum;  // Σ q per 32 k
};
QuantizedRow quantize_activation_row(ExpertFormat f, const float* x, int n, CpuIsa isa);

}  // namespace bigmoe::cpu
