// GGUF files (llama.cpp's model format), versions 2 and 3, mmapped and validated at open.
//
// Layout (all little-endian):
//   "GGUF" | u32 version | u64 tensor_count | u64 kv_count
//   kv_count x { string key | u32 value_type | value }
//   tensor_count x { string name | u32 n_dims | u64 ne[n_dims] | u32 ggml_type | u64 offset }
//   padding to `general.alignment` (default 32) | data section
// A string is u64 length + bytes (no terminator). An array value is u32 element type, u64
// count, then the elements (arrays may nest). ne[0] is the innermost, contiguous dimension; a
// tensor's offset is relative to the data section and a multiple of the alignment.
#pragma once
#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "tensor/quant.h"
#include "util/mmap.h"

namespace bigmoe {

enum class GgufType : uint32_t {
  UINT8 = 0,
  INT8 = 1,
  UINT16 = 2,
  INT16 = 3,
  UINT32 = 4,
  INT32 = 5,
  FLOAT32 = 6,
  BOOL = 7,
  STRING = 8,
  ARRAY = 9,
  UINT64 = 10,
  INT64 = 11,
  FLOAT64 = 12,
};

const char* gguf_type_name(GgufType t);  // "UINT32", "STRING", ...
bool gguf_type_valid(uint32_t t);
bool gguf_type_is_int(GgufType t);  // UINT8..INT64 (not BOOL)
size_t gguf_type_size(GgufType t);  // bytes of a scalar value; 0 for STRING and ARRAY

// A metadata value. Scalars are widened into the field their type selects; arrays keep their
// element type and hold their elements in one of three forms.
struct GgufValue {
  GgufType type = GgufType::UINT8;

  uint64_t u = 0;  // UINT8, UINT16, UINT32, UINT64, BOOL (0 or 1)
  int64_t i = 0;   // INT8, INT16, INT32, INT64
  double f = 0;    // FLOAT32, FLOAT64
  std::string s;   // STRING

  // ARRAY
  GgufType elem_type = GgufType::UINT8;
  uint64_t count = 0;
  std::vector<uint8_t> raw;       // numeric / BOOL elements: count * size, little-endian
  std::vector<std::string> strs;  // STRING elements
  std::vector<GgufValue> items;   // ARRAY elements (nested arrays)

  // Makers for writers and tests; they throw bigmoe::Error if a value does not fit its type.
  static GgufValue make_uint(GgufType t, uint64_t v);  // UINT8..UINT64
  static GgufValue make_int(GgufType t, int64_t v);    // INT8..INT64
  static GgufValue make_float(GgufType t, double v);   // FLOAT32 / FLOAT64
  static GgufValue make_bool(bool v);
  static GgufValue make_str(std::string v);
  static GgufValue make_int_array(GgufType elem, const std::vector<int64_t>& v);  // any integer
  static GgufValue make_float_array(GgufType elem, const std::vector<double>& v);
  static GgufValue make_bool_array(const std::vector<bool>& v);
  static GgufValue make_str_array(std::vector<std::string> v);
  static GgufValue make_nested_array(std::vector<GgufValue> v);  // each an ARRAY

  // Element k of a numeric array, as int64 / uint64 / double (no range checks beyond k).
  int64_t int_at(uint64_t k) const;
  uint64_t uint_at(uint64_t k) const;
  double float_at(uint64_t k) const;
};

struct GgufTensorInfo {
  std::string name;
  GgmlType type = GgmlType::F32;
  std::vector<int64_t> ne;        // ne[0] innermost (GGUF order, reversed from numpy's shape)
  uint64_t offset = 0;            // from the start of the data section
  const uint8_t* data = nullptr;  // (nbytes,) in the mapped file
  size_t nbytes = 0;

  int64_t numel() const;
};

class GgufFile {
 public:
  // Maps and validates the whole header. Throws bigmoe::Error naming the file and the key or
  // tensor at fault (bad magic, unsupported version, truncation, unknown value or ggml type,
  // data out of range / misaligned / overlapping, duplicate names, bad block multiple).
  static std::shared_ptr<GgufFile> open(const std::filesystem::path& path);

  uint32_t version() const { return version_; }
  uint32_t alignment() const { return alignment_; }
  uint64_t data_offset() const { return data_offset_; }  // file offset of the data section
  const std::filesystem::path& path() const { return map_.path(); }

  // Key-value pairs in file order.
  const std::vector<std::pair<std::string, GgufValue>>& kvs() const { return kvs_; }
  const GgufValue* find(const std::string& key) const;  // nullptr if absent

  // Typed getters. Without a default, a missing key throws; with one, a missing key returns
  // it. A present key of the wrong type (or an integer out of range) always throws. Integer
  // getters accept any integer type whose value fits; get_f32 accepts FLOAT32 and FLOAT64.
  uint32_t get_u32(const std::string& key) const;
  uint32_t get_u32(const std::string& key, uint32_t def) const;
  int64_t get_i64(const std::string& key) const;
  int64_t get_i64(const std::string& key, int64_t def) const;
  float get_f32(const std::string& key) const;
  float get_f32(const std::string& key, float def) const;
  bool get_bool(const std::string& key) const;
  bool get_bool(const std::string& key, bool def) const;
  std::string get_str(const std::string& key) const;
  std::string get_str(const std::string& key, const std::string& def) const;
  std::vector<std::string> get_arr_str(const std::string& key) const;
  std::vector<int32_t> get_arr_i32(const std::string& key) const;
  std::vector<float> get_arr_f32(const std::string& key) const;

  const std::vector<GgufTensorInfo>& tensors() const { return tensors_; }  // file order
  const GgufTensorInfo* tensor(const std::string& name) const;             // nullptr if absent

 private:
  const GgufValue& require(const std::string& key) const;

  MappedFile map_;
  uint32_t version_ = 0;
  uint32_t alignment_ = 32;
  uint64_t data_offset_ = 0;
  std::vector<std::pair<std::string, GgufValue>> kvs_;
  std::map<std::string, size_t> kv_index_;
  std::vector<GgufTensorInfo> tensors_;
  std::map<std::string, size_t> tensor_index_;
};

}  // namespace bigmoe
