#include "io/gguf.h"

#include <algorithm>
#include <cstring>
#include <limits>

#include "util/error.h"

namespace bigmoe {

namespace fs = std::filesystem;

// ---- value types ----

const char* gguf_type_name(GgufType t) {
  switch (t) {
    case GgufType::UINT8: return "UINT8";
    case GgufType::INT8: return "INT8";
    case GgufType::UINT16: return "UINT16";
    case GgufType::INT16: return "INT16";
    case GgufType::UINT32: return "UINT32";
    case GgufType::INT32: return "INT32";
    case GgufType::FLOAT32: return "FLOAT32";
    case GgufType::BOOL: return "BOOL";
    case GgufType::STRING: return "STRING";
    case GgufType::ARRAY: return "ARRAY";
    case GgufType::UINT64: return "UINT64";
    case GgufType::INT64: return "INT64";
    case GgufType::FLOAT64: return "FLOAT64";
  }
  return "?";
}

bool gguf_type_valid(uint32_t t) { return t <= uint32_t(GgufType::FLOAT64); }

bool gguf_type_is_int(GgufType t) {
  switch (t) {
    case GgufType::UINT8:
    case GgufType::INT8:
    case GgufType::UINT16:
    case GgufType::INT16:
    case GgufType::UINT32:
    case GgufType::INT32:
    case GgufType::UINT64:
    case GgufType::INT64: return true;
    default: return false;
  }
}

size_t gguf_type_size(GgufType t) {
  switch (t) {
    case GgufType::UINT8:
    case GgufType::INT8:
    case GgufType::BOOL: return 1;
    case GgufType::UINT16:
    case GgufType::INT16: return 2;
    case GgufType::UINT32:
    case GgufType::INT32:
    case GgufType::FLOAT32: return 4;
    case GgufType::UINT64:
    case GgufType::INT64:
    case GgufType::FLOAT64: return 8;
    case GgufType::STRING:
    case GgufType::ARRAY: return 0;
  }
  return 0;
}

namespace {

bool is_signed(GgufType t) {
  return t == GgufType::INT8 || t == GgufType::INT16 || t == GgufType::INT32 ||
         t == GgufType::INT64;
}

bool is_float(GgufType t) { return t == GgufType::FLOAT32 || t == GgufType::FLOAT64; }

// Sets the scalar field of v that its type selects from n little-endian bytes at p.
void decode_scalar(GgufValue& v, const uint8_t* p) {
  size_t n = gguf_type_size(v.type);
  if (v.type == GgufType::FLOAT32) {
    float f;
    std::memcpy(&f, p, 4);
    v.f = f;
  } else if (v.type == GgufType::FLOAT64) {
    std::memcpy(&v.f, p, 8);
  } else if (is_signed(v.type)) {
    uint64_t u = 0;
    std::memcpy(&u, p, n);
    int shift = int(64 - 8 * n);
    v.i = int64_t(u << shift) >> shift;  // sign-extend
  } else {
    v.u = 0;
    std::memcpy(&v.u, p, n);
  }
}

// Appends the little-endian bytes of scalar v (of its own type) to out.
void encode_scalar(const GgufValue& v, std::vector<uint8_t>& out) {
  uint8_t b[8];
  if (v.type == GgufType::FLOAT32) {
    float f = float(v.f);
    std::memcpy(b, &f, 4);
  } else if (v.type == GgufType::FLOAT64) {
    std::memcpy(b, &v.f, 8);
  } else if (is_signed(v.type)) {
    std::memcpy(b, &v.i, 8);
  } else {
    std::memcpy(b, &v.u, 8);
  }
  out.insert(out.end(), b, b + gguf_type_size(v.type));
}

GgufValue element(const GgufValue& a, uint64_t k) {
  if (a.type != GgufType::ARRAY || gguf_type_size(a.elem_type) == 0 || k >= a.count)
    fail("GgufValue: element {} of a non-numeric array or out of range", k);
  GgufValue e;
  e.type = a.elem_type;
  decode_scalar(e, a.raw.data() + k * gguf_type_size(a.elem_type));
  return e;
}

std::string type_desc(const GgufValue& v) {
  if (v.type != GgufType::ARRAY) return gguf_type_name(v.type);
  return fmt::format("ARRAY of {}", gguf_type_name(v.elem_type));
}

}  // namespace

GgufValue GgufValue::make_uint(GgufType t, uint64_t v) {
  if (!gguf_type_is_int(t) || is_signed(t))
    fail("make_uint: {} is not unsigned", gguf_type_name(t));
  size_t n = gguf_type_size(t);
  if (n < 8 && v >> (8 * n)) fail("make_uint: {} does not fit {}", v, gguf_type_name(t));
  GgufValue r;
  r.type = t;
  r.u = v;
  return r;
}

GgufValue GgufValue::make_int(GgufType t, int64_t v) {
  if (!is_signed(t)) fail("make_int: {} is not a signed type", gguf_type_name(t));
  size_t n = gguf_type_size(t);
  if (n < 8 && (v < -(int64_t(1) << (8 * n - 1)) || v >= (int64_t(1) << (8 * n - 1))))
    fail("make_int: {} does not fit {}", v, gguf_type_name(t));
  GgufValue r;
  r.type = t;
  r.i = v;
  return r;
}

GgufValue GgufValue::make_float(GgufType t, double v) {
  if (!is_float(t)) fail("make_float: {} is not a float type", gguf_type_name(t));
  GgufValue r;
  r.type = t;
  r.f = t == GgufType::FLOAT32 ? double(float(v)) : v;
  return r;
}

GgufValue GgufValue::make_bool(bool v) {
  GgufValue r;
  r.type = GgufType::BOOL;
  r.u = v;
  return r;
}

GgufValue GgufValue::make_str(std::string v) {
  GgufValue r;
  r.type = GgufType::STRING;
  r.s = std::move(v);
  return r;
}

GgufValue GgufValue::make_int_array(GgufType elem, const std::vector<int64_t>& v) {
  if (!gguf_type_is_int(elem))
    fail("make_int_array: {} is not an integer type", gguf_type_name(elem));
  GgufValue a;
  a.type = GgufType::ARRAY;
  a.elem_type = elem;
  a.count = v.size();
  for (int64_t x : v) {
    if (!is_signed(elem) && x < 0)
      fail("make_int_array: {} does not fit {}", x, gguf_type_name(elem));
    encode_scalar(is_signed(elem) ? make_int(elem, x) : make_uint(elem, uint64_t(x)), a.raw);
  }
  return a;
}

GgufValue GgufValue::make_float_array(GgufType elem, const std::vector<double>& v) {
  GgufValue a;
  a.type = GgufType::ARRAY;
  a.elem_type = elem;
  a.count = v.size();
  for (double x : v) encode_scalar(make_float(elem, x), a.raw);
  return a;
}

GgufValue GgufValue::make_bool_array(const std::vector<bool>& v) {
  GgufValue a;
  a.type = GgufType::ARRAY;
  a.elem_type = GgufType::BOOL;
  a.count = v.size();
  for (bool x : v) a.raw.push_back(x ? 1 : 0);
  return a;
}

GgufValue GgufValue::make_str_array(std::vector<std::string> v) {
  GgufValue a;
  a.type = GgufType::ARRAY;
  a.elem_type = GgufType::STRING;
  a.count = v.size();
  a.strs = std::move(v);
  return a;
}

GgufValue GgufValue::make_nested_array(std::vector<GgufValue> v) {
  for (const auto& e : v)
    if (e.type != GgufType::ARRAY)
      fail("make_nested_array: element of type {} is not an array", gguf_type_name(e.type));
  GgufValue a;
  a.type = GgufType::ARRAY;
  a.elem_type = GgufType::ARRAY;
  a.count = v.size();
  a.items = std::move(v);
  return a;
}

int64_t GgufValue::int_at(uint64_t k) const {
  GgufValue e = element(*this, k);
  return is_signed(e.type) ? e.i : int64_t(e.u);
}

uint64_t GgufValue::uint_at(uint64_t k) const {
  GgufValue e = element(*this, k);
  return is_signed(e.type) ? uint64_t(e.i) : e.u;
}

double GgufValue::float_at(uint64_t k) const {
  GgufValue e = element(*this, k);
  if (is_float(e.type)) return e.f;
  return is_signed(e.type) ? double(e.i) : double(e.u);
}

int64_t GgufTensorInfo::numel() const {
  int64_t n = 1;
  for (int64_t d : ne) n *= d;  // validated at open not to overflow
  return n;
}

// ---- parsing ----

namespace {

constexpr uint32_t kMaxDims = 4;             // GGML_MAX_DIMS
constexpr int kMaxArrayDepth = 8;            // nesting beyond this is corruption, not metadata
constexpr uint64_t kMinKvBytes = 8 + 4 + 1;  // empty key, type, 1-byte value
constexpr uint64_t kMinTensorInfoBytes = 8 + 4 + 4 + 8;  // empty name, n_dims, type, offset

// Bounds-checked little-endian cursor over the mapped header. Every read checks the bytes
// remain before touching them, and every count is checked against the bytes left before
// anything is allocated for it, so no input can crash, hang or exhaust memory.
class Cursor {
 public:
  Cursor(const uint8_t* p, size_t n, const std::string& file) : p_(p), n_(n), file_(file) {}

  size_t pos() const { return pos_; }
  uint64_t left() const { return n_ - pos_; }

  void need(uint64_t k, const std::string& what) const {
    if (k > left())
      fail("gguf '{}': truncated: {} needs {} bytes at offset {}, but the file has {} bytes", file_,
           what, k, pos_, n_);
  }
  const uint8_t* take(uint64_t k, const std::string& what) {
    need(k, what);
    const uint8_t* r = p_ + pos_;
    pos_ += size_t(k);
    return r;
  }
  template <typename T>
  T read(const std::string& what) {
    T v;
    std::memcpy(&v, take(sizeof(T), what), sizeof(T));
    return v;
  }
  std::string str(const std::string& what) {
    uint64_t len = read<uint64_t>(what);
    if (len > left())
      fail(
          "gguf '{}': truncated: {} is a string of {} bytes at offset {}, but only {} bytes "
          "remain",
          file_, what, len, pos_, left());
    const uint8_t* s = take(len, what);
    return std::string(reinterpret_cast<const char*>(s), size_t(len));
  }

 private:
  const uint8_t* p_;
  size_t n_;
  size_t pos_ = 0;
  const std::string& file_;
};

// Reads a value of type `type` (already read) at the cursor. `what` names it in messages.
void read_value(Cursor& c, GgufType type, GgufValue& v, int depth, const std::string& file,
                const std::string& what) {
  v.type = type;
  if (type == GgufType::STRING) {
    v.s = c.str(what);
    return;
  }
  if (type != GgufType::ARRAY) {
    decode_scalar(v, c.take(gguf_type_size(type), what));
    if (type == GgufType::BOOL && v.u > 1)
      fail("gguf '{}': {}: BOOL value {} is neither 0 nor 1", file, what, v.u);
    return;
  }

  if (depth >= kMaxArrayDepth)
    fail("gguf '{}': {}: arrays nested deeper than {}", file, what, kMaxArrayDepth);
  uint32_t et = c.read<uint32_t>(what);
  if (!gguf_type_valid(et)) fail("gguf '{}': {}: unknown array element type {}", file, what, et);
  v.elem_type = GgufType(et);
  v.count = c.read<uint64_t>(what);
  size_t esize = gguf_type_size(v.elem_type);
  uint64_t min_elem = esize ? esize : v.elem_type == GgufType::STRING ? 8 : 12;
  if (v.count > c.left() / min_elem)
    fail("gguf '{}': truncated: {} is an array of {} {} elements, but only {} bytes remain", file,
         what, v.count, gguf_type_name(v.elem_type), c.left());

  if (esize) {
    const uint8_t* p = c.take(v.count * esize, what);
    v.raw.assign(p, p + v.count * esize);
    if (v.elem_type == GgufType::BOOL)
      for (uint64_t k = 0; k < v.count; ++k)
        if (p[k] > 1)
          fail("gguf '{}': {}: BOOL element {} is {}, neither 0 nor 1", file, what, k, p[k]);
  } else if (v.elem_type == GgufType::STRING) {
    v.strs.reserve(size_t(v.count));
    for (uint64_t k = 0; k < v.count; ++k) v.strs.push_back(c.str(what));
  } else {
    for (uint64_t k = 0; k < v.count; ++k) {
      GgufValue item;
      read_value(c, GgufType::ARRAY, item, depth + 1, file, what);
      v.items.push_back(std::move(item));
    }
  }
}

}  // namespace

std::shared_ptr<GgufFile> GgufFile::open(const fs::path& path) {
  auto g = std::make_shared<GgufFile>();
  g->map_ = MappedFile::open(path);
  const std::string file = path.string();
  const uint8_t* base = g->map_.data();
  const size_t size = g->map_.size();
  Cursor c(base, size, file);

  if (size < 4 || std::memcmp(base, "GGUF", 4) != 0) {
    std::string found;
    for (size_t k = 0; k < std::min<size_t>(size, 4); ++k) found += fmt::format("{:02x}", base[k]);
    fail("gguf '{}': bad magic: expected \"GGUF\" (47475546), found {} ({} bytes in file)", file,
         found.empty() ? "nothing" : found, size);
  }
  c.take(4, "magic");
  g->version_ = c.read<uint32_t>("the version");
  if (g->version_ != 2 && g->version_ != 3)
    fail("gguf '{}': unsupported version {} (supported: 2, 3){}", file, g->version_,
         (g->version_ & 0xffff) == 0 ? "; a big-endian file?" : "");

  uint64_t n_tensors = c.read<uint64_t>("tensor_count");
  uint64_t n_kv = c.read<uint64_t>("kv_count");
  if (n_kv > c.left() / kMinKvBytes)
    fail("gguf '{}': truncated or corrupt: kv_count {} is too large for the {} bytes left", file,
         n_kv, c.left());
  if (n_tensors > (c.left() - n_kv * kMinKvBytes) / kMinTensorInfoBytes)
    fail("gguf '{}': truncated or corrupt: tensor_count {} is too large for the {} bytes left",
         file, n_tensors, c.left());

  g->kvs_.reserve(size_t(n_kv));
  for (uint64_t k = 0; k < n_kv; ++k) {
    std::string key = c.str(fmt::format("key #{}", k));
    std::string what = fmt::format("key '{}'", key);
    uint32_t t = c.read<uint32_t>(what);
    if (!gguf_type_valid(t)) fail("gguf '{}': {}: unknown value type {}", file, what, t);
    GgufValue v;
    read_value(c, GgufType(t), v, 0, file, what);
    if (!g->kv_index_.emplace(key, g->kvs_.size()).second)
      fail("gguf '{}': duplicate key '{}'", file, key);
    g->kvs_.emplace_back(std::move(key), std::move(v));
  }

  if (const GgufValue* a = g->find("general.alignment")) {
    if (a->type != GgufType::UINT32)
      fail("gguf '{}': key 'general.alignment' has type {}, expected UINT32", file, type_desc(*a));
    if (a->u == 0 || (a->u & (a->u - 1)) != 0)
      fail("gguf '{}': key 'general.alignment' is {}, expected a power of two", file, a->u);
    g->alignment_ = uint32_t(a->u);
  }

  g->tensors_.reserve(size_t(n_tensors));
  for (uint64_t k = 0; k < n_tensors; ++k) {
    GgufTensorInfo ti;
    ti.name = c.str(fmt::format("tensor #{} name", k));
    std::string what = fmt::format("tensor '{}'", ti.name);
    auto bad = [&](const std::string& msg) { fail("gguf '{}': {}: {}", file, what, msg); };
    uint32_t n_dims = c.read<uint32_t>(what);
    if (n_dims > kMaxDims)
      bad(fmt::format("n_dims {} exceeds the maximum of {}", n_dims, kMaxDims));
    uint64_t numel = 1;
    for (uint32_t d = 0; d < n_dims; ++d) {
      uint64_t v = c.read<uint64_t>(what);
      if (v > uint64_t(INT64_MAX)) bad(fmt::format("ne[{}] = {} is negative as int64", d, v));
      if (v != 0 && numel > uint64_t(INT64_MAX) / v)
        bad(fmt::format("element count overflows at ne[{}] = {}", d, v));
      numel *= v;
      ti.ne.push_back(int64_t(v));
    }
    uint32_t type = c.read<uint32_t>(what);
    auto tr = ggml_type_traits(type);
    if (!tr) bad(fmt::format("unknown ggml type {}", type));
    ti.type = GgmlType(type);
    int64_t row = n_dims ? ti.ne[0] : 1;
    if (row % tr->block_size != 0)
      bad(fmt::format("{} elements per row (ne[0]), not a multiple of block size {} of {}", row,
                      tr->block_size, ggml_type_name(ti.type)));
    uint64_t blocks = numel / uint64_t(tr->block_size);
    if (blocks > std::numeric_limits<size_t>::max() / tr->type_size) bad("byte size overflows");
    ti.nbytes = size_t(blocks * tr->type_size);
    ti.offset = c.read<uint64_t>(what);
    if (ti.offset % g->alignment_ != 0)
      bad(fmt::format("offset {} is not a multiple of the alignment {}", ti.offset, g->alignment_));
    if (!g->tensor_index_.emplace(ti.name, g->tensors_.size()).second)
      fail("gguf '{}': duplicate tensor name '{}'", file, ti.name);
    g->tensors_.push_back(std::move(ti));
  }

  // The data section starts at the next multiple of the alignment (a file of metadata only may
  // end before it).
  uint64_t a = g->alignment_;
  g->data_offset_ = (uint64_t(c.pos()) + a - 1) / a * a;
  uint64_t data_size = size > g->data_offset_ ? size - g->data_offset_ : 0;
  for (auto& ti : g->tensors_) {
    if (ti.offset > data_size || ti.nbytes > data_size - ti.offset)
      fail(
          "gguf '{}': tensor '{}': data [{}, {}) out of range of the {}-byte data section "
          "(file truncated?)",
          file, ti.name, ti.offset, ti.offset + ti.nbytes, data_size);
    ti.data = base + g->data_offset_ + ti.offset;
  }

  std::vector<const GgufTensorInfo*> by_offset;
  for (const auto& ti : g->tensors_)
    if (ti.nbytes) by_offset.push_back(&ti);
  std::sort(by_offset.begin(), by_offset.end(),
            [](auto* x, auto* y) { return x->offset < y->offset; });
  for (size_t k = 1; k < by_offset.size(); ++k) {
    const auto *p = by_offset[k - 1], *q = by_offset[k];
    if (p->offset + p->nbytes > q->offset)
      fail("gguf '{}': tensor '{}' data [{}, {}) overlaps tensor '{}' data [{}, {})", file, q->name,
           q->offset, q->offset + q->nbytes, p->name, p->offset, p->offset + p->nbytes);
  }
  return g;
}

// ---- lookups ----

const GgufValue* GgufFile::find(const std::string& key) const {
  auto it = kv_index_.find(key);
  return it == kv_index_.end() ? nullptr : &kvs_[it->second].second;
}

const GgufTensorInfo* GgufFile::tensor(const std::string& name) const {
  auto it = tensor_index_.find(name);
  return it == tensor_index_.end() ? nullptr : &tensors_[it->second];
}

const GgufValue& GgufFile::require(const std::string& key) const {
  const GgufValue* v = find(key);
  if (!v) fail("gguf '{}': key '{}' not found", path().string(), key);
  return *v;
}

namespace {

// Integer value of v checked to lie in [lo, hi]; `want` names the getter's type.
int64_t int_in_range(const GgufValue& v, int64_t lo, int64_t hi, const char* want,
                     const std::string& file, const std::string& key) {
  if (!gguf_type_is_int(v.type))
    fail("gguf '{}': key '{}' has type {}, expected an integer ({})", file, key, type_desc(v),
         want);
  bool fits = is_signed(v.type) ? v.i >= lo && v.i <= hi : v.u <= uint64_t(hi);
  if (!fits)
    fail("gguf '{}': key '{}' = {} does not fit {}", file, key,
         is_signed(v.type) ? fmt::format("{}", v.i) : fmt::format("{}", v.u), want);
  return is_signed(v.type) ? v.i : int64_t(v.u);
}

void expect_type(const GgufValue& v, GgufType t, const std::string& file, const std::string& key) {
  if (v.type != t)
    fail("gguf '{}': key '{}' has type {}, expected {}", file, key, type_desc(v),
         gguf_type_name(t));
}

void expect_array(const GgufValue& v, bool ok, const char* want, const std::string& file,
                  const std::string& key) {
  if (v.type != GgufType::ARRAY || !ok)
    fail("gguf '{}': key '{}' has type {}, expected ARRAY of {}", file, key, type_desc(v), want);
}

}  // namespace

uint32_t GgufFile::get_u32(const std::string& key) const {
  return uint32_t(int_in_range(require(key), 0, UINT32_MAX, "u32", path().string(), key));
}
uint32_t GgufFile::get_u32(const std::string& key, uint32_t def) const {
  return find(key) ? get_u32(key) : def;
}

int64_t GgufFile::get_i64(const std::string& key) const {
  return int_in_range(require(key), INT64_MIN, INT64_MAX, "i64", path().string(), key);
}
int64_t GgufFile::get_i64(const std::string& key, int64_t def) const {
  return find(key) ? get_i64(key) : def;
}

float GgufFile::get_f32(const std::string& key) const {
  const GgufValue& v = require(key);
  if (!is_float(v.type))
    fail("gguf '{}': key '{}' has type {}, expected FLOAT32 or FLOAT64", path().string(), key,
         type_desc(v));
  return float(v.f);
}
float GgufFile::get_f32(const std::string& key, float def) const {
  return find(key) ? get_f32(key) : def;
}

bool GgufFile::get_bool(const std::string& key) const {
  const GgufValue& v = require(key);
  expect_type(v, GgufType::BOOL, path().string(), key);
  return v.u != 0;
}
bool GgufFile::get_bool(const std::string& key, bool def) const {
  return find(key) ? get_bool(key) : def;
}

std::string GgufFile::get_str(const std::string& key) const {
  const GgufValue& v = require(key);
  expect_type(v, GgufType::STRING, path().string(), key);
  return v.s;
}
std::string GgufFile::get_str(const std::string& key, const std::string& def) const {
  return find(key) ? get_str(key) : def;
}

std::vector<std::string> GgufFile::get_arr_str(const std::string& key) const {
  const GgufValue& v = require(key);
  expect_array(v, v.elem_type == GgufType::STRING, "STRING", path().string(), key);
  return v.strs;
}

std::vector<int32_t> GgufFile::get_arr_i32(const std::string& key) const {
  const GgufValue& v = require(key);
  expect_array(v, gguf_type_is_int(v.elem_type), "an integer type", path().string(), key);
  std::vector<int32_t> r(size_t(v.count));
  for (uint64_t k = 0; k < v.count; ++k) {
    bool neg = is_signed(v.elem_type) && v.int_at(k) < 0;
    if (neg ? v.int_at(k) < INT32_MIN : v.uint_at(k) > uint64_t(INT32_MAX))
      fail("gguf '{}': key '{}': element {} = {} does not fit i32", path().string(), key, k,
           neg ? fmt::format("{}", v.int_at(k)) : fmt::format("{}", v.uint_at(k)));
    r[k] = int32_t(v.int_at(k));
  }
  return r;
}

std::vector<float> GgufFile::get_arr_f32(const std::string& key) const {
  const GgufValue& v = require(key);
  expect_array(v, is_float(v.elem_type), "FLOAT32 or FLOAT64", path().string(), key);
  std::vector<float> r(size_t(v.count));
  for (uint64_t k = 0; k < v.count; ++k) r[k] = float(v.float_at(k));
  return r;
}

}  // namespace bigmoe
