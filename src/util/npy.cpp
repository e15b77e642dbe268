#include "util/npy.h"

#include <bit>
#include <cctype>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <optional>
#include <string_view>

#include "util/error.h"
#include "util/mmap.h"

namespace bigmoe {

namespace {

constexpr char kMagic[] = "\x93NUMPY";
constexpr size_t kMagicLen = 6;

// .npy '<' data is little endian; we write and read host order.
static_assert(std::endian::native == std::endian::little, "npy I/O assumes a little-endian host");

// prod(shape), or nullopt if a dimension is negative or the product overflows int64.
std::optional<int64_t> checked_numel(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) {
    if (d < 0) return std::nullopt;
    if (d != 0 && n > INT64_MAX / d) return std::nullopt;
    n *= d;
  }
  return n;
}

// Parser for the header, a Python dict literal such as
//   {'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }
// Only the three keys numpy writes are understood; the values are a string, a bool and a
// tuple of non-negative ints.
class HeaderParser {
 public:
  HeaderParser(std::string_view s, const std::filesystem::path& file) : s_(s), file_(file) {}

  void parse(std::string& descr, bool& fortran, std::vector<int64_t>& shape) {
    bool have_descr = false, have_fortran = false, have_shape = false;
    expect('{');
    while (true) {
      skip_ws();
      if (peek() == '}') { ++i_; break; }
      std::string key = parse_string();
      expect(':');
      if (key == "descr") {
        descr = parse_string();
        have_descr = true;
      } else if (key == "fortran_order") {
        fortran = parse_bool();
        have_fortran = true;
      } else if (key == "shape") {
        shape = parse_tuple();
        have_shape = true;
      } else {
        bad(fmt::format("unexpected key '{}'", key));
      }
      skip_ws();
      if (peek() == ',') { ++i_; continue; }
      expect('}');
      break;
    }
    if (!have_descr || !have_fortran || !have_shape)
      bad("header lacks one of 'descr', 'fortran_order', 'shape'");
  }

 private:
  [[noreturn]] void bad(const std::string& what) const {
    fail("npy '{}': bad header ({}) in: {}", file_.string(), what, s_);
  }
  void skip_ws() {
    while (i_ < s_.size() && std::isspace(static_cast<unsigned char>(s_[i_]))) ++i_;
  }
  char peek() const { return i_ < s_.size() ? s_[i_] : '\0'; }
  void expect(char c) {
    skip_ws();
    if (peek() != c) bad(fmt::format("expected '{}' at offset {}", c, i_));
    ++i_;
  }
  std::string parse_string() {
    skip_ws();
    char q = peek();
    if (q != '\'' && q != '"') bad(fmt::format("expected a string at offset {}", i_));
    size_t end = s_.find(q, i_ + 1);
    if (end == std::string_view::npos) bad("unterminated string");
    std::string r(s_.substr(i_ + 1, end - i_ - 1));
    i_ = end + 1;
    return r;
  }
  bool parse_bool() {
    skip_ws();
    if (s_.substr(i_, 4) == "True") { i_ += 4; return true; }
    if (s_.substr(i_, 5) == "False") { i_ += 5; return false; }
    bad(fmt::format("expected True or False at offset {}", i_));
  }
  std::vector<int64_t> parse_tuple() {
    std::vector<int64_t> r;
    expect('(');
    while (true) {
      skip_ws();
      if (peek() == ')') { ++i_; break; }
      if (!std::isdigit(static_cast<unsigned char>(peek())))
        bad(fmt::format("expected a dimension at offset {}", i_));
      int64_t v = 0;
      while (std::isdigit(static_cast<unsigned char>(peek()))) {
        int d = s_[i_++] - '0';
        if (v > (INT64_MAX - d) / 10) bad("dimension overflows int64");
        v = v * 10 + d;
      }
      r.push_back(v);
      skip_ws();
      if (peek() == ',') { ++i_; continue; }
      expect(')');
      break;
    }
    return r;
  }

  std::string_view s_;
  const std::filesystem::path& file_;
  size_t i_ = 0;
};

std::string shape_tuple(const std::vector<int64_t>& shape) {
  if (shape.size() == 1) return fmt::format("({},)", shape[0]);  // Python's 1-tuple spelling
  std::string r = "(";
  for (size_t i = 0; i < shape.size(); ++i) r += fmt::format("{}{}", i ? ", " : "", shape[i]);
  return r + ")";
}

}  // namespace

void write_npy_f32(const std::filesystem::path& path, const float* data,
                   const std::vector<int64_t>& shape) {
  auto numel = checked_numel(shape);
  if (!numel) fail("write_npy_f32 '{}': bad shape {}", path.string(), shape_tuple(shape));

  std::string header = fmt::format("{{'descr': '<f4', 'fortran_order': False, 'shape': {}, }}",
                                   shape_tuple(shape));
  // Version 1.0 layout: magic(6) + version(2) + u16 header length + header. The header is
  // padded with spaces and ends in '\n' so the data starts on a 64-byte boundary.
  size_t prefix = kMagicLen + 2 + 2;
  size_t total = prefix + header.size() + 1;
  total = (total + 63) / 64 * 64;
  header.append(total - prefix - header.size() - 1, ' ');
  header.push_back('\n');
  if (header.size() > 0xffff) fail("write_npy_f32 '{}': header too long", path.string());

  std::FILE* f = std::fopen(path.c_str(), "wb");
  if (!f) fail("write_npy_f32: cannot create '{}': {}", path.string(), std::strerror(errno));
  uint8_t pre[10];
  std::memcpy(pre, kMagic, kMagicLen);
  pre[6] = 1;
  pre[7] = 0;
  pre[8] = uint8_t(header.size() & 0xff);
  pre[9] = uint8_t(header.size() >> 8);
  size_t n = size_t(*numel);
  bool ok = std::fwrite(pre, 1, sizeof pre, f) == sizeof pre &&
            std::fwrite(header.data(), 1, header.size(), f) == header.size() &&
            (n == 0 || std::fwrite(data, sizeof(float), n, f) == n);
  ok = (std::fclose(f) == 0) && ok;
  if (!ok) fail("write_npy_f32: write to '{}' failed", path.string());
}

NpyArray read_npy(const std::filesystem::path& path) {
  MappedFile m = MappedFile::open(path);
  const uint8_t* p = m.data();
  size_t size = m.size();
  std::string name = path.string();

  if (size < 10 || std::memcmp(p, kMagic, kMagicLen) != 0)
    fail("npy '{}': not a .npy file (bad magic)", name);
  int major = p[6];
  size_t hlen, hstart;
  if (major == 1) {
    hlen = size_t(p[8]) | size_t(p[9]) << 8;
    hstart = 10;
  } else if (major == 2 || major == 3) {
    if (size < 12) fail("npy '{}': truncated preamble", name);
    hlen = size_t(p[8]) | size_t(p[9]) << 8 | size_t(p[10]) << 16 | size_t(p[11]) << 24;
    hstart = 12;
  } else {
    fail("npy '{}': unsupported format version {}.{}", name, major, int(p[7]));
  }
  if (hlen > size - hstart)
    fail("npy '{}': header length {} exceeds file size {}", name, hlen, size);

  NpyArray a;
  bool fortran = false;
  std::string_view hdr(reinterpret_cast<const char*>(p + hstart), hlen);
  HeaderParser(hdr, path).parse(a.dtype, fortran, a.shape);
  if (fortran) fail("npy '{}': fortran_order True is not supported (need C order)", name);

  size_t item;
  if (a.dtype == "<f4" || a.dtype == "<i4") item = 4;
  else if (a.dtype == "<i8") item = 8;
  else fail("npy '{}': unsupported dtype '{}' (need '<f4', '<i4' or '<i8')", name, a.dtype);

  auto numel = checked_numel(a.shape);
  size_t avail = size - hstart - hlen;
  if (!numel || uint64_t(*numel) > avail / item)
    fail("npy '{}': shape {} needs more data than the {} bytes present", name,
         shape_tuple(a.shape), avail);
  size_t n = size_t(*numel);
  if (n * item != avail)
    fail("npy '{}': expected {} data bytes for shape {}, found {}", name, n * item,
         shape_tuple(a.shape), avail);

  // Data may be unaligned (a foreign writer's header length), so copy through memcpy.
  const uint8_t* d = p + hstart + hlen;
  a.data.resize(n);
  if (a.dtype == "<f4") {
    if (n) std::memcpy(a.data.data(), d, n * 4);
  } else if (a.dtype == "<i4") {
    for (size_t i = 0; i < n; ++i) {
      int32_t v;
      std::memcpy(&v, d + 4 * i, 4);
      a.data[i] = float(v);
    }
  } else {
    for (size_t i = 0; i < n; ++i) {
      int64_t v;
      std::memcpy(&v, d + 8 * i, 8);
      a.data[i] = float(v);
    }
  }
  return a;
}

}  // namespace bigmoe
