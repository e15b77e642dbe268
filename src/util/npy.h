// NumPy .npy files: the exchange format for reference activations dumped by transformers
// and for our own debug dumps. Only what we need: little-endian float32 out, and float32 /
// int32 / int64 in (converted to float32), C order.
#pragma once
#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

namespace bigmoe {

// Writes a version 1.0 .npy file with dtype '<f4', C order. data holds prod(shape) floats.
// An empty shape writes a 0-d array (one element).
void write_npy_f32(const std::filesystem::path& path, const float* data,
                   const std::vector<int64_t>& shape);

struct NpyArray {
  std::vector<int64_t> shape;
  std::vector<float> data;  // (prod(shape),) in C order, converted to float32
  std::string dtype;        // the file's descr: "<f4", "<i4" or "<i8"
};

// Reads a version 1.x, 2.x or 3.x .npy file with descr '<f4', '<i4' or '<i8' and
// fortran_order False. Anything else throws bigmoe::Error naming the file.
NpyArray read_npy(const std::filesystem::path& path);

}  // namespace bigmoe
