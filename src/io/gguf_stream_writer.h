// Streams a GGUF v3 file whose tensor data is too large to hold in memory: declare the
// key-values and tensor infos first, then begin() writes the header and each tensor's bytes are
// appended in declaration order (any chunking); padding to the alignment is inserted between
// tensors automatically. Used by `bigmoe synth` for multi-GB synthetic checkpoints.
#pragma once
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "io/gguf.h"
#include "tensor/quant.h"

namespace bigmoe {

class GgufStreamWriter {
 public:
  explicit GgufStreamWriter(uint32_t alignment = 32);
  ~GgufStreamWriter();
  GgufStreamWriter(const GgufStreamWriter&) = delete;
  GgufStreamWriter& operator=(const GgufStreamWriter&) = delete;

  // Metadata and tensor declarations; only before begin(). Throw on duplicates, bad shapes.
  void add(const std::string& key, GgufValue v);
  void add_u32(const std::string& key, uint32_t v) { add(key, GgufValue::make_uint(GgufType::UINT32, v)); }
  void add_i32(const std::string& key, int32_t v) { add(key, GgufValue::make_int(GgufType::INT32, v)); }
  void add_f32(const std::string& key, float v) { add(key, GgufValue::make_float(GgufType::FLOAT32, v)); }
  void add_bool(const std::string& key, bool v) { add(key, GgufValue::make_bool(v)); }
  void add_str(const std::string& key, std::string v) { add(key, GgufValue::make_str(std::move(v))); }
  // Returns the tensor's data size in bytes.
  size_t add_tensor(const std::string& name, GgmlType type, std::vector<int64_t> ne);

  size_t tensor_count() const { return tensors_.size(); }
  uint64_t data_bytes() const { return data_bytes_; }  // data section size, padding included

  // Creates the file and writes header, key-values and tensor infos.
  void begin(const std::filesystem::path& path);
  // Appends bytes of the current tensor (declaration order). A chunk may not cross a tensor's end.
  void write(const void* data, size_t n);
  // Checks that every tensor was fully written and closes the file.
  void finish();

 private:
  struct Tensor {
    std::string name;
    GgmlType type;
    std::vector<int64_t> ne;
    size_t nbytes;
    uint64_t offset;
  };
  void pad_to(uint64_t pos);

  uint32_t alignment_;
  std::vector<std::pair<std::string, GgufValue>> kvs_;
  std::set<std::string> keys_, names_;
  std::vector<Tensor> tensors_;
  uint64_t data_bytes_ = 0;
  std::filesystem::path path_;
  std::FILE* f_ = nullptr;
  size_t cur_ = 0;         // index of the tensor being written
  uint64_t cur_done_ = 0;  // bytes of it written
  uint64_t data_pos_ = 0;  // position within the data section
};

}  // namespace bigmoe
