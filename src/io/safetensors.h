// safetensors checkpoints: one file, a sharded directory with an index, or a directory of
// *.safetensors files. Files are mmapped and every header is fully validated at open, so
// later code can trust shapes, dtypes and byte ranges without re-checking.
//
// File layout: u64 little-endian header length N, N bytes of JSON header, then the data
// section. The header maps tensor name -> {"dtype", "shape", "data_offsets": [begin, end]}
// (offsets relative to the data section), plus an optional "__metadata__" string map.
#pragma once
#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "tensor/dtype.h"
#include "util/mmap.h"

namespace bigmoe {

// A tensor inside a mapped file; valid while the SafetensorsFile that holds it is alive.
// data is not necessarily aligned to the element size (it depends on the writer's header
// padding); read through memcpy or check alignment before casting.
struct TensorView {
  std::string name;
  DType dtype = DType::F32;
  std::vector<int64_t> shape;
  const uint8_t* data = nullptr;  // (nbytes,) raw little-endian elements, C order
  size_t nbytes = 0;
  std::string file;  // path of the file that holds it (for error messages)

  int64_t numel() const;
};

// One .safetensors file, mmapped and validated at open.
class SafetensorsFile {
 public:
  // Throws bigmoe::Error naming the file (and tensor) on any malformed header or range.
  static std::shared_ptr<SafetensorsFile> open(const std::filesystem::path& path);

  const std::map<std::string, TensorView>& tensors() const { return tensors_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }  // "__metadata__"
  const std::filesystem::path& path() const { return map_.path(); }

 private:
  MappedFile map_;
  std::map<std::string, TensorView> tensors_;
  std::map<std::string, std::string> metadata_;
};

// A whole checkpoint. open() accepts
//   - a .safetensors file;
//   - a directory with model.safetensors.index.json: its weight_map names the shards, every
//     shard must exist and hold the tensors listed for it;
//   - otherwise a directory with one or more *.safetensors files (e.g. model.safetensors),
//     all of which are opened.
// A tensor name found in two files is an error.
class SafetensorsModel {
 public:
  static SafetensorsModel open(const std::filesystem::path& dir_or_file);

  bool has(const std::string& name) const { return by_name_.count(name) != 0; }
  const TensorView& get(const std::string& name) const;  // throws "tensor 'X' not found in <root>"
  const TensorView* find(const std::string& name) const;  // nullptr if absent
  std::vector<std::string> names() const;                // sorted
  const std::filesystem::path& root() const { return root_; }
  size_t total_bytes() const;  // sum of all tensors' nbytes
  const std::vector<std::shared_ptr<SafetensorsFile>>& files() const { return files_; }

 private:
  void add_file(std::shared_ptr<SafetensorsFile> f);

  std::filesystem::path root_;
  std::vector<std::shared_ptr<SafetensorsFile>> files_;
  // Points into files_' tensor maps; std::map nodes never move, and the files are shared,
  // so the pointers survive moving or copying the model.
  std::map<std::string, const TensorView*> by_name_;
};

}  // namespace bigmoe
