#include "io/safetensors.h"

#include <algorithm>
#include <limits>
#include <nlohmann/json.hpp>

#include "util/error.h"

namespace bigmoe {

using json = nlohmann::json;
namespace fs = std::filesystem;

int64_t TensorView::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;  // validated at open not to overflow
  return n;
}

namespace {

std::string shape_str(const std::vector<int64_t>& shape) {
  return fmt::format("[{}]", fmt::join(shape, ", "));
}

// Parses one tensor entry of the header into `t` (all but data/file). `file` and `name` are
// only for messages. Returns the entry's [begin, end) relative to the data section.
std::pair<uint64_t, uint64_t> parse_entry(const json& e, const std::string& file,
                                          const std::string& name, uint64_t data_size,
                                          TensorView& t) {
  auto bad = [&](const std::string& what) -> void {
    fail("safetensors '{}': tensor '{}': {}", file, name, what);
  };
  if (!e.is_object()) bad(fmt::format("bad field: entry is {}, expected an object", e.type_name()));
  for (const char* key : {"dtype", "shape", "data_offsets"})
    if (!e.contains(key)) bad(fmt::format("missing field '{}'", key));

  const json& jd = e["dtype"];
  if (!jd.is_string()) bad(fmt::format("bad field 'dtype': {} is not a string", jd.dump()));
  std::string ds = jd.get<std::string>();
  auto dt = parse_safetensors_dtype(ds);
  if (!dt) bad(fmt::format("unknown dtype '{}'", ds));
  t.dtype = *dt;

  const json& js = e["shape"];
  if (!js.is_array()) bad(fmt::format("bad field 'shape': {} is not an array", js.dump()));
  // numel must fit in int64 and nbytes in uint64; check each product before making it.
  uint64_t numel = 1;
  for (const json& d : js) {
    if (!d.is_number_integer())
      bad(fmt::format("bad field 'shape': {} is not an array of integers", js.dump()));
    if (d.is_number_unsigned() ? d.get<uint64_t>() > uint64_t(INT64_MAX) : d.get<int64_t>() < 0)
      bad(fmt::format("bad shape {}: dimensions must be in [0, 2^63)", js.dump()));
    uint64_t v = d.get<uint64_t>();
    if (v != 0 && numel > uint64_t(INT64_MAX) / v)
      bad(fmt::format("bad shape {}: element count overflows", js.dump()));
    numel *= v;
    t.shape.push_back(int64_t(v));
  }
  uint64_t esize = dtype_size(t.dtype);
  if (numel > std::numeric_limits<uint64_t>::max() / esize)
    bad(fmt::format("bad shape {}: byte size overflows", js.dump()));
  uint64_t expected = numel * esize;

  const json& jo = e["data_offsets"];
  if (!jo.is_array() || jo.size() != 2 || !jo[0].is_number_unsigned() ||
      !jo[1].is_number_unsigned())
    bad(fmt::format("bad field 'data_offsets': {} is not [begin, end] of non-negative integers",
                    jo.dump()));
  uint64_t begin = jo[0].get<uint64_t>(), end = jo[1].get<uint64_t>();
  if (begin > end || end > data_size)
    bad(fmt::format("data_offsets [{}, {}] out of bounds of the {}-byte data section", begin, end,
                    data_size));
  if (end - begin != expected)
    bad(fmt::format("size mismatch: {} {} expected {} bytes, found {} in data_offsets [{}, {}]",
                    ds, shape_str(t.shape), expected, end - begin, begin, end));
  t.nbytes = size_t(expected);
  return {begin, end};
}

}  // namespace

std::shared_ptr<SafetensorsFile> SafetensorsFile::open(const fs::path& path) {
  auto sf = std::make_shared<SafetensorsFile>();
  sf->map_ = MappedFile::open(path);
  const std::string file = path.string();
  const uint8_t* p = sf->map_.data();
  const uint64_t size = sf->map_.size();

  if (size < 8) fail("safetensors '{}': {} bytes is too short for header length", file, size);
  uint64_t hlen = 0;
  for (int i = 7; i >= 0; --i) hlen = hlen << 8 | p[i];  // little endian regardless of host
  if (hlen > size - 8)
    fail("safetensors '{}': header length {} exceeds file size {} (minus 8)", file, hlen, size);

  const char* hbegin = reinterpret_cast<const char*>(p + 8);
  json header;
  try {
    header = json::parse(hbegin, hbegin + hlen);
  } catch (const json::exception& e) {
    fail("safetensors '{}': header is not valid JSON ({})", file, e.what());
  }
  if (!header.is_object())
    fail("safetensors '{}': header is not a JSON object (got {})", file, header.type_name());

  const uint8_t* data = p + 8 + hlen;
  const uint64_t data_size = size - 8 - hlen;
  struct Range { uint64_t begin, end; const std::string* name; };
  std::vector<Range> ranges;

  for (auto it = header.begin(); it != header.end(); ++it) {
    const std::string& name = it.key();
    if (name == "__metadata__") {
      if (!it->is_object())
        fail("safetensors '{}': bad field '__metadata__': expected an object of strings", file);
      for (auto m = it->begin(); m != it->end(); ++m) {
        if (!m->is_string())
          fail("safetensors '{}': bad field '__metadata__': value of '{}' is not a string", file,
               m.key());
        sf->metadata_[m.key()] = m->get<std::string>();
      }
      continue;
    }
    TensorView t;
    t.name = name;
    t.file = file;
    auto [begin, end] = parse_entry(*it, file, name, data_size, t);
    t.data = data + begin;
    auto ins = sf->tensors_.emplace(name, std::move(t));
    ranges.push_back({begin, end, &ins.first->first});
  }

  // Byte ranges must be disjoint. Empty tensors occupy no bytes and overlap nothing.
  ranges.erase(std::remove_if(ranges.begin(), ranges.end(),
                              [](const Range& r) { return r.begin == r.end; }),
               ranges.end());
  std::sort(ranges.begin(), ranges.end(),
            [](const Range& a, const Range& b) { return a.begin < b.begin; });
  for (size_t i = 1; i < ranges.size(); ++i) {
    const Range &a = ranges[i - 1], &b = ranges[i];
    if (b.begin < a.end)
      fail("safetensors '{}': tensor '{}' bytes [{}, {}) overlaps tensor '{}' bytes [{}, {})",
           file, *b.name, b.begin, b.end, *a.name, a.begin, a.end);
  }
  return sf;
}

// ---------------------------------------------------------------------------------------

void SafetensorsModel::add_file(std::shared_ptr<SafetensorsFile> f) {
  for (const auto& [name, t] : f->tensors()) {
    auto [it, fresh] = by_name_.emplace(name, &t);
    if (!fresh)
      fail("tensor '{}' appears in both {} and {}", name, it->second->file, t.file);
  }
  files_.push_back(std::move(f));
}

SafetensorsModel SafetensorsModel::open(const fs::path& dir_or_file) {
  SafetensorsModel m;
  m.root_ = dir_or_file;
  std::error_code ec;
  auto st = fs::status(dir_or_file, ec);
  if (!fs::exists(st)) fail("checkpoint '{}' does not exist", dir_or_file.string());

  if (!fs::is_directory(st)) {
    m.add_file(SafetensorsFile::open(dir_or_file));
    return m;
  }

  const fs::path index_path = dir_or_file / "model.safetensors.index.json";
  if (fs::exists(index_path)) {
    const std::string index = index_path.string();
    MappedFile imap = MappedFile::open(index_path);
    const char* ib = reinterpret_cast<const char*>(imap.data());
    json j;
    try {
      j = json::parse(ib, ib + imap.size());
    } catch (const json::exception& e) {
      fail("index '{}' is not valid JSON ({})", index, e.what());
    }
    if (!j.is_object() || !j.contains("weight_map") || !j["weight_map"].is_object())
      fail("index '{}' has no weight_map object", index);
    const json& wm = j["weight_map"];

    // Open each shard once, in sorted order so errors and files() are deterministic.
    std::map<std::string, std::shared_ptr<SafetensorsFile>> shards;
    for (auto it = wm.begin(); it != wm.end(); ++it) {
      if (!it->is_string())
        fail("index '{}': weight_map value for tensor '{}' is not a string", index, it.key());
      shards.emplace(it->get<std::string>(), nullptr);
    }
    for (auto& [shard, f] : shards) {
      fs::path sp = dir_or_file / shard;
      if (!fs::is_regular_file(sp))
        fail("shard '{}' listed in index '{}' not found (looked for {})", shard, index,
             sp.string());
      f = SafetensorsFile::open(sp);
    }
    for (auto it = wm.begin(); it != wm.end(); ++it) {
      const std::string& shard = it->get_ref<const std::string&>();
      if (!shards.at(shard)->tensors().count(it.key()))
        fail("tensor '{}' listed in index but missing from shard '{}' (index '{}')", it.key(),
             shard, index);
    }
    for (auto& [shard, f] : shards) m.add_file(std::move(f));
    return m;
  }

  std::vector<fs::path> found;
  for (const auto& e : fs::directory_iterator(dir_or_file))
    if (e.path().extension() == ".safetensors" && e.is_regular_file()) found.push_back(e.path());
  if (found.empty())
    fail("checkpoint directory '{}' has neither model.safetensors, "
         "model.safetensors.index.json nor any *.safetensors file",
         dir_or_file.string());
  std::sort(found.begin(), found.end());
  for (const auto& p : found) m.add_file(SafetensorsFile::open(p));
  return m;
}

const TensorView* SafetensorsModel::find(const std::string& name) const {
  auto it = by_name_.find(name);
  return it == by_name_.end() ? nullptr : it->second;
}

const TensorView& SafetensorsModel::get(const std::string& name) const {
  const TensorView* t = find(name);
  if (!t) fail("tensor '{}' not found in {}", name, root_.string());
  return *t;
}

std::vector<std::string> SafetensorsModel::names() const {
  std::vector<std::string> r;
  r.reserve(by_name_.size());
  for (const auto& [name, t] : by_name_) r.push_back(name);
  return r;
}

size_t SafetensorsModel::total_bytes() const {
  size_t n = 0;
  for (const auto& [name, t] : by_name_) n += t->nbytes;
  return n;
}

}  // namespace bigmoe
