// Read-only memory map of a whole file. Checkpoints are mapped rather than read so that
// weights stay in the page cache and only the pages a run touches are ever loaded.
#pragma once
#include <cstddef>
#include <cstdint>
#include <filesystem>

namespace bigmoe {

class MappedFile {
 public:
  // Maps `path` read-only. Throws bigmoe::Error naming the file if it is missing, is not a
  // regular file, or cannot be mapped. A zero-length file gives data() == nullptr, size() == 0.
  static MappedFile open(const std::filesystem::path& path);

  MappedFile() = default;
  MappedFile(MappedFile&& o) noexcept;
  MappedFile& operator=(MappedFile&& o) noexcept;
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  ~MappedFile();

  const uint8_t* data() const { return data_; }
  size_t size() const { return size_; }
  const std::filesystem::path& path() const { return path_; }

 private:
  void reset();

  const uint8_t* data_ = nullptr;
  size_t size_ = 0;
  std::filesystem::path path_;
};

}  // namespace bigmoe
