#include "io/gguf_writer.h"

#include <cstring>
#include <fstream>

#include "util/error.h"

namespace bigmoe {

namespace gguf_detail {

void put_str(std::vector<uint8_t>& out, const std::string& s) {
  put<uint64_t>(out, s.size());
  out.insert(out.end(), s.begin(), s.end());
}

// Value bytes without the leading type tag (arrays carry their element type and count).
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
    if (v.strs.size() != v.count)
      fail("gguf writer: STRING array count {} != {} strings", v.count, v.strs.size());
    for (const auto& s : v.strs) put_str(out, s);
  } else if (v.elem_type == GgufType::ARRAY) {
    if (v.items.size() != v.count)
      fail("gguf writer: nested array count {} != {} items", v.count, v.items.size());
    for (const auto& item : v.items) put_value(out, item);
  } else {
    if (v.raw.size() != v.count * gguf_type_size(v.elem_type))
      fail("gguf writer: {} array of {} elements holds {} bytes", gguf_type_name(v.elem_type),
           v.count, v.raw.size());
    out.insert(out.end(), v.raw.begin(), v.raw.end());
  }
}

}  // namespace gguf_detail

using gguf_detail::align_up;
using gguf_detail::put;
using gguf_detail::put_str;
using gguf_detail::put_value;

void GgufWriter::add(const std::string& key, GgufValue v) {
  if (keys_.count(key)) fail("gguf writer: duplicate key '{}'", key);
  if (key == "general.alignment") {
    if (v.type != GgufType::UINT32 || v.u == 0 || (v.u & (v.u - 1)) != 0)
      fail("gguf writer: general.alignment must be a UINT32 power of two");
    if (!tensors_.empty()) fail("gguf writer: set the alignment before adding tensors");
    alignment_ = uint32_t(v.u);
  }
  keys_.insert(key);
  kvs_.emplace_back(key, std::move(v));
}

void GgufWriter::add_tensor(const std::string& name, GgmlType type, std::vector<int64_t> ne,
                            const void* data, size_t nbytes) {
  if (names_.count(name)) fail("gguf writer: duplicate tensor name '{}'", name);
  if (ne.size() > 4) fail("gguf writer: tensor '{}' has {} dims, at most 4", name, ne.size());
  int64_t rows = 1;
  for (size_t d = 1; d < ne.size(); ++d) rows *= ne[d];
  size_t expected = ggml_row_size(type, ne.empty() ? 1 : ne[0]) * size_t(rows);
  if (nbytes != expected)
    fail("gguf writer: tensor '{}' of type {}: {} bytes given, shape needs {}", name,
         ggml_type_name(type), nbytes, expected);
  const uint8_t* p = static_cast<const uint8_t*>(data);
  names_.insert(name);
  tensors_.push_back({name, type, std::move(ne), std::vector<uint8_t>(p, p + nbytes)});
}

void GgufWriter::write(const std::filesystem::path& path) const {
  std::vector<uint8_t> head = {'G', 'G', 'U', 'F'};
  put<uint32_t>(head, 3);
  put<uint64_t>(head, tensors_.size());
  put<uint64_t>(head, kvs_.size());
  for (const auto& [key, v] : kvs_) {
    put_str(head, key);
    put<uint32_t>(head, uint32_t(v.type));
    put_value(head, v);
  }
  uint64_t offset = 0;
  for (const auto& t : tensors_) {
    put_str(head, t.name);
    put<uint32_t>(head, uint32_t(t.ne.size()));
    for (int64_t d : t.ne) put<uint64_t>(head, uint64_t(d));
    put<uint32_t>(head, uint32_t(t.type));
    put<uint64_t>(head, offset);
    offset = align_up(offset + t.data.size(), alignment_);
  }
  head.resize(align_up(head.size(), alignment_), 0);

  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  if (!f) fail("gguf writer: cannot create '{}'", path.string());
  f.write(reinterpret_cast<const char*>(head.data()), std::streamsize(head.size()));
  static const char zeros[256] = {};
  for (const auto& t : tensors_) {
    f.write(reinterpret_cast<const char*>(t.data.data()), std::streamsize(t.data.size()));
    uint64_t pad = align_up(t.data.size(), alignment_) - t.data.size();
    while (pad) {
      uint64_t k = pad < sizeof(zeros) ? pad : sizeof(zeros);
      f.write(zeros, std::streamsize(k));
      pad -= k;
    }
  }
  f.flush();
  if (!f) fail("gguf writer: error writing '{}'", path.string());
}

}  // namespace bigmoe
