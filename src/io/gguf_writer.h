// Writes GGUF v3 files: metadata key-values of any type and tensors given as raw bytes. Used by
// tests to make fixtures (well-formed and, by patching the output, malformed) and by
// `bigmoe synth` to write small models.
#pragma once
#include <cstring>
#include <cstdint>
#include <filesystem>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "io/gguf.h"
#include "tensor/quant.h"

namespace bigmoe {

class GgufWriter {
 public:
  // Adds a key-value pair; throws bigmoe::Error on a duplicate key. Adding
  // "general.alignment" (UINT32, a power of two) sets the data alignment, as set_alignment.
  void add(const std::string& key, GgufValue v);

  void add_u8(const std::string& key, uint8_t v) {
    add(key, GgufValue::make_uint(GgufType::UINT8, v));
  }
  void add_i8(const std::string& key, int8_t v) {
    add(key, GgufValue::make_int(GgufType::INT8, v));
  }
  void add_u16(const std::string& key, uint16_t v) {
    add(key, GgufValue::make_uint(GgufType::UINT16, v));
  }
  void add_i16(const std::string& key, int16_t v) {
    add(key, GgufValue::make_int(GgufType::INT16, v));
  }
  void add_u32(const std::string& key, uint32_t v) {
    add(key, GgufValue::make_uint(GgufType::UINT32, v));
  }
  void add_i32(const std::string& key, int32_t v) {
    add(key, GgufValue::make_int(GgufType::INT32, v));
  }
  void add_u64(const std::string& key, uint64_t v) {
    add(key, GgufValue::make_uint(GgufType::UINT64, v));
  }
  void add_i64(const std::string& key, int64_t v) {
    add(key, GgufValue::make_int(GgufType::INT64, v));
  }
  void add_f32(const std::string& key, float v) {
    add(key, GgufValue::make_float(GgufType::FLOAT32, v));
  }
  void add_f64(const std::string& key, double v) {
    add(key, GgufValue::make_float(GgufType::FLOAT64, v));
  }
  void add_bool(const std::string& key, bool v) { add(key, GgufValue::make_bool(v)); }
  void add_str(const std::string& key, std::string v) {
    add(key, GgufValue::make_str(std::move(v)));
  }
  void add_arr_str(const std::string& key, std::vector<std::string> v) {
    add(key, GgufValue::make_str_array(std::move(v)));
  }
  void add_arr_i32(const std::string& key, const std::vector<int32_t>& v) {
    add(key, GgufValue::make_int_array(GgufType::INT32, std::vector<int64_t>(v.begin(), v.end())));
  }
  void add_arr_f32(const std::string& key, const std::vector<float>& v) {
    add(key,
        GgufValue::make_float_array(GgufType::FLOAT32, std::vector<double>(v.begin(), v.end())));
  }

  // Data alignment (default 32); writes "general.alignment".
  void set_alignment(uint32_t a) { add_u32("general.alignment", a); }

  // Adds a tensor of shape ne (ne[0] innermost) whose nbytes bytes at data are copied. Throws
  // on a duplicate name, an unknown type, or nbytes that do not match type and ne.
  void add_tensor(const std::string& name, GgmlType type, std::vector<int64_t> ne, const void* data,
                  size_t nbytes);

  // Writes the file: header, key-values, tensor infos, then each tensor's data at the next
  // multiple of the alignment. Throws naming the path on I/O errors.
  void write(const std::filesystem::path& path) const;

 private:
  struct Tensor {
    std::string name;
    GgmlType type;
    std::vector<int64_t> ne;
    std::vector<uint8_t> data;
  };

  uint32_t alignment_ = 32;
  std::vector<std::pair<std::string, GgufValue>> kvs_;
  std::set<std::string> keys_;
  std::vector<Tensor> tensors_;
  std::set<std::string> names_;
};

// Byte-level serialization shared by GgufWriter and GgufStreamWriter.
namespace gguf_detail {
template <typename T>
void put(std::vector<uint8_t>& out, T v) {
  uint8_t b[sizeof(T)];
  std::memcpy(b, &v, sizeof(T));
  out.insert(out.end(), b, b + sizeof(T));
}
void put_str(std::vector<uint8_t>& out, const std::string& s);
// Value bytes without the leading type tag (arrays carry their element type and count).
void put_value(std::vector<uint8_t>& out, const GgufValue& v);
inline uint64_t align_up(uint64_t x, uint64_t a) { return (x + a - 1) / a * a; }
}  // namespace gguf_detail

}  // namespace bigmoe
