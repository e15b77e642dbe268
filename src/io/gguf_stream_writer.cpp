#include "io/gguf_stream_writer.h"

#include <algorithm>
#include <cstring>

#include "util/error.h"

namespace bigmoe {

namespace {

template <typename T>
void put(std::vector<uint8_t>& out, T v) {
  uint8_t b[sizeof(T)];
  std::memcpy(b, &v, sizeof(T));
  out.insert(out.end(), b, b + sizeof(T));
}

void put_str(std::vector<uint8_t>& out, const std::string& s) {
  put<uint64_t>(out, s.size());
  out.insert(out.end(), s.begin(), s.end());
}

void put_value(std::vector<uint8_t>& out, const GgufValue& v) {
  switch (v.type) {
    case GgufType::UINT8:
    case GgufType::BOOL: put<uint8_t>(out, uint8_t(v.u)); return;
    case GgufType::INT8: put<int8_t>(out, int8_t(v.i)); return;
    case GgufType::UINT16: put<uint16_t>(out, uint16_t(v.u)); return;
    case GgufType::INT16: put<int16_t>(out, int16_t(v.i)); return;
    case GgufType::UINT32: put<uint32_t>(out, uint32_t(v.u)); return;
    case GgufType::INT32: put<int32_t>(out, int32_t(v.i)); return;
    case GgufType::UINT64: put<uint64_t>(out, v.u); return;
    case GgufType::INT64: put<int64_t>(out, v.i); return;
    case GgufType::FLOAT32: put<float>(out, float(v.f)); return;
    case GgufType::FLOAT64: put<double>(out, v.f); return;
    case GgufType::STRING: put_str(out, v.s); return;
    case GgufType::ARRAY: break;
  }
  put<uint32_t>(out, uint32_t(v.elem_type));
  put<uint64_t>(out, v.count);
  if (v.elem_type == GgufType::STRING) {
    if (v.strs.size() != v.count) fail("gguf stream writer: STRING array count mismatch");
    for (const auto& s : v.strs) put_str(out, s);
  } else if (v.elem_type == GgufType::ARRAY) {
    if (v.items.size() != v.count) fail("gguf stream writer: nested array count mismatch");
    for (const auto& item : v.items) put_value(out, item);
  } else {
    if (v.raw.size() != v.count * gguf_type_size(v.elem_type))
      fail("gguf stream writer: {} array size mismatch", gguf_type_name(v.elem_type));
    out.insert(out.end(), v.raw.begin(), v.raw.end());
  }
}

uint64_t align_up(uint64_t x, uint64_t a) { return (x + a - 1) / a * a; }

}  // namespace

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
