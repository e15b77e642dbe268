#include "io/gguf_stream_writer.h"

#include "io/gguf_writer.h"

#include <algorithm>
#include <cstring>

#include "util/error.h"

namespace bigmoe {

using gguf_detail::align_up;
using gguf_detail::put;
using gguf_detail::put_str;
using gguf_detail::put_value;

GgufStreamWriter::GgufStreamWriter(uint32_t alignment) : alignment_(alignment) {
  if (alignment == 0 || (alignment & (alignment - 1)) != 0) fail("gguf stream writer: alignment must be a power of two");
  if (alignment != 32) add_u32("general.alignment", alignment);
}

GgufStreamWriter::~GgufStreamWriter() {
  if (f_) std::fclose(f_);
}

void GgufStreamWriter::add(const std::string& key, GgufValue v) {
  if (f_) fail("gguf stream writer: add('{}') after begin()", key);
  if (!keys_.insert(key).second) fail("gguf stream writer: duplicate key '{}'", key);
  kvs_.emplace_back(key, std::move(v));
}

size_t GgufStreamWriter::add_tensor(const std::string& name, GgmlType type, std::vector<int64_t> ne) {
  if (f_) fail("gguf stream writer: add_tensor('{}') after begin()", name);
  if (!names_.insert(name).second) fail("gguf stream writer: duplicate tensor name '{}'", name);
  if (ne.empty() || ne.size() > 4) fail("gguf stream writer: tensor '{}' has {} dims", name, ne.size());
  int64_t rows = 1;
  for (size_t d = 1; d < ne.size(); ++d) rows *= ne[d];
  size_t nbytes = ggml_row_size(type, ne[0]) * size_t(rows);
  tensors_.push_back({name, type, std::move(ne), nbytes, data_bytes_});
  data_bytes_ = align_up(data_bytes_ + nbytes, alignment_);
  return nbytes;
}

void GgufStreamWriter::begin(const std::filesystem::path& path) {
  if (f_) fail("gguf stream writer: begin() twice");
  std::vector<uint8_t> head = {'G', 'G', 'U', 'F'};
  put<uint32_t>(head, 3);
  put<uint64_t>(head, tensors_.size());
  put<uint64_t>(head, kvs_.size());
  for (const auto& [key, v] : kvs_) {
    put_str(head, key);
    put<uint32_t>(head, uint32_t(v.type));
    put_value(head, v);
  }
  for (const auto& t : tensors_) {
    put_str(head, t.name);
    put<uint32_t>(head, uint32_t(t.ne.size()));
    for (int64_t d : t.ne) put<uint64_t>(head, uint64_t(d));
    put<uint32_t>(head, uint32_t(t.type));
    put<uint64_t>(head, t.offset);
  }
  head.resize(align_up(head.size(), alignment_), 0);
  path_ = path;
  f_ = std::fopen(path.c_str(), "wb");
  if (!f_) fail("gguf stream writer: cannot create '{}'", path.string());
  std::setvbuf(f_, nullptr, _IOFBF, 1 << 22);
  if (std::fwrite(head.data(), 1, head.size(), f_) != head.size()) fail("gguf stream writer: error writing '{}'", path.string());
  cur_ = 0;
  cur_done_ = 0;
  data_pos_ = 0;
}

void GgufStreamWriter::pad_to(uint64_t pos) {
  static const char zeros[256] = {};
  while (data_pos_ < pos) {
    size_t k = size_t(std::min<uint64_t>(pos - data_pos_, sizeof(zeros)));
    if (std::fwrite(zeros, 1, k, f_) != k) fail("gguf stream writer: error writing '{}'", path_.string());
    data_pos_ += k;
  }
}

void GgufStreamWriter::write(const void* data, size_t n) {
  if (!f_) fail("gguf stream writer: write() before begin()");
  if (n == 0) return;
  if (cur_ >= tensors_.size()) fail("gguf stream writer: more data than the declared tensors hold");
  const Tensor& t = tensors_[cur_];
  if (cur_done_ + n > t.nbytes)
    fail("gguf stream writer: chunk of {} bytes crosses the end of tensor '{}'", n, t.name);
  if (cur_done_ == 0) pad_to(t.offset);
  if (std::fwrite(data, 1, n, f_) != n) fail("gguf stream writer: error writing '{}'", path_.string());
  cur_done_ += n;
  data_pos_ += n;
  if (cur_done_ == t.nbytes) {
    ++cur_;
    cur_done_ = 0;
  }
}

void GgufStreamWriter::finish() {
  if (!f_) fail("gguf stream writer: finish() before begin()");
  if (cur_ != tensors_.size())
    fail("gguf stream writer: tensor '{}' not fully written", tensors_[cur_].name);
  pad_to(data_bytes_);
  bool ok = std::fflush(f_) == 0;
  ok &= std::fclose(f_) == 0;
  f_ = nullptr;
  if (!ok) fail("gguf stream writer: error writing '{}'", path_.string());
}

}  // namespace bigmoe
