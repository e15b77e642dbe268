// Quantized activations: a float row is quantized once to 8 bits per 32-element block (the
// ggml block_q8_0 / block_q8_1 formats) and dotted with weight rows in integer arithmetic, as
// llama.cpp's CPU backend computes Q4/Q5/Q8 matrix products. This moves 4x fewer activation
// bytes than float and lets the weights stay packed; it is also what makes our greedy output
// match llama.cpp's token for token. The float path (quant.h vec_dot) is its reference.
#pragma once
#include <cstdint>
#include <vector>

#include "tensor/quant.h"

namespace bigmoe {

uint16_t f32_to_f16(float f);  // round to nearest even, as F16C's vcvtps2ph

// The activation format a weight type is dotted with (Q8_0 for Q4_0/Q5_0/Q8_0, Q8_1 for
// Q4_1/Q5_1), or F32 when the type has no integer path here (then use vec_dot).
GgmlType act_type_for(GgmlType weight);

// Quantizes n floats (n a multiple of 32) to act_type (Q8_0 or Q8_1): per block d = amax/127
// stored as f16, q = round-to-even(x * 127/amax), and for Q8_1 s = d * Σq stored as f16.
void quantize_act(GgmlType act_type, const float* x, void* dst, int64_t n);
size_t act_row_size(GgmlType act_type, int64_t n);

// Dot of one weight row with a quantized activation row (from quantize_act with
// act_type_for(weight)). Dispatches to AVX2 when available.
float vec_dot_act(GgmlType weight, const void* row, const void* act, int64_t n);
float vec_dot_act_ref(GgmlType weight, const void* row, const void* act, int64_t n);

}  // namespace bigmoe
