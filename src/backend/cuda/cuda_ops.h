// CUDA backend ops. Each op has a CPU reference in backend/cpu/ref_ops.h and a test that
// compares the two on fresh random inputs (tests/test_cuda_ops.cpp, ctest label gpu).
#pragma once
#include <cstddef>
#include <string>

struct CUstream_st;  // cudaStream_t is CUstream_st*

namespace bigmoe::cuda {

// Throws bigmoe::Error naming the CUDA call and the error when a CUDA API call fails.
void check(int err, const char* what);

int device_count();
std::string device_name(int device);

// y[r, :] = w ⊙ x[r, :] / sqrt(mean(x[r, :]²) + eps) for r < rows (device pointers, float32).
void rms_norm(const float* x, const float* w, int rows, int n, float eps, float* y);

// Weight formats of matvec. BF16 / FP8_E4M3: row-major [out, in]; FP8 comes with float32 block
// scales weight_scale_inv [ceil(out/128), ceil(in/128)] (W = fp8 * scale per 128x128 block).
// Q8_0 / Q4_K / Q6_K: ggml rows (as backend quant.h decodes them), row o at o * ggml_row_size.
enum class WeightFormat { BF16, FP8_E4M3, Q8_0, Q4_K, Q6_K };
const char* weight_format_name(WeightFormat f);
// Bytes of an [out, in] weight matrix in format f (without FP8 scales).
size_t matvec_weight_bytes(WeightFormat f, int out, int in);

// Decode matrix product y[b, o] = sum_i W[o, i] * x[b, i] for b < B (1 <= B <= 16), float32
// accumulation. Device pointers: w (16-byte aligned), scale (FP8 only, else may be null),
// x float32 [B, in], y float32 [B, out]. Quant formats need in % 32 (Q8_0) / % 256 (K-quants)
// == 0 and 16-byte aligned w and x. Asynchronous on `stream`; throws on bad arguments or a
// failed launch.
void matvec(WeightFormat fmt, const void* w, const float* scale, int out, int in, const float* x, int B, float* y,
            CUstream_st* stream = nullptr);

}  // namespace bigmoe::cuda
