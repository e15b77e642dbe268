// safetensors reader, mmap and .npy I/O. Every file here is written by the test itself so
// that malformed headers can be made on purpose; the well-formed ones follow the layout the
// Rust `safetensors` writer produces (header padded with spaces to a multiple of 8).
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "io/safetensors.h"
#include "util/error.h"
#include "util/mmap.h"
#include "util/npy.h"

namespace fs = std::filesystem;
using bigmoe::DType;
using bigmoe::SafetensorsFile;
using bigmoe::SafetensorsModel;
using json = nlohmann::json;

namespace {

// Runs f, expects a bigmoe::Error whose message contains every one of `parts`.
template <typename F>
void expect_error(F&& f, std::initializer_list<std::string> parts) {
  try {
    f();
    ADD_FAILURE() << "expected bigmoe::Error, nothing thrown";
  } catch (const bigmoe::Error& e) {
    std::string msg = e.what();
    for (const auto& p : parts)
      EXPECT_NE(msg.find(p), std::string::npos) << "message lacks \"" << p << "\": " << msg;
  }
}

template <typename T>
std::vector<uint8_t> bytes_of(std::initializer_list<T> v) {
  std::vector<uint8_t> b(v.size() * sizeof(T));
  std::memcpy(b.data(), std::data(v), b.size());
  return b;
}

// Writes u64 header length + header + data. hlen overrides the length field when given.
void write_raw(const fs::path& p, const std::string& header, const std::vector<uint8_t>& data = {},
               std::optional<uint64_t> hlen = std::nullopt) {
  std::ofstream f(p, std::ios::binary);
  uint64_t n = hlen.value_or(header.size());
  uint8_t le[8];
  for (int i = 0; i < 8; ++i) le[i] = uint8_t(n >> (8 * i));
  f.write(reinterpret_cast<const char*>(le), 8);
  f.write(header.data(), std::streamsize(header.size()));
  f.write(reinterpret_cast<const char*>(data.data()), std::streamsize(data.size()));
}

void write_bytes(const fs::path& p, const std::string& s) {
  std::ofstream f(p, std::ios::binary);
  f.write(s.data(), std::streamsize(s.size()));
}

struct Entry {
  std::string name;
  std::string dtype;
  std::vector<int64_t> shape;
  std::vector<uint8_t> bytes;
};

// Writes a well-formed file: tensors laid out back to back in the given order.
void write_st(const fs::path& p, const std::vector<Entry>& entries,
              const std::map<std::string, std::string>& metadata = {}) {
  json h = json::object();
  std::vector<uint8_t> data;
  for (const auto& e : entries) {
    h[e.name] = {{"dtype", e.dtype},
                 {"shape", e.shape},
                 {"data_offsets", {data.size(), data.size() + e.bytes.size()}}};
    data.insert(data.end(), e.bytes.begin(), e.bytes.end());
  }
  if (!metadata.empty()) h["__metadata__"] = metadata;
  std::string hs = h.dump();
  hs.append((8 - hs.size() % 8) % 8, ' ');
  write_raw(p, hs, data);
}

class TempDir : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    dir = fs::temp_directory_path() /
          (std::string("bigmoe_test_") + std::to_string(getpid()) + "_" + info->test_suite_name() +
           "_" + info->name());
    fs::remove_all(dir);
    fs::create_directories(dir);
  }
  void TearDown() override { fs::remove_all(dir); }
  fs::path dir;
};

// A one-tensor header with the given entry JSON, for the malformed-entry cases below.
// Data section is 16 bytes.
std::string one_entry(const std::string& entry) { return "{\"w\": " + entry + "}"; }
const std::vector<uint8_t> k16(16, 0);

}  // namespace

// ---------------------------------------------------------------------------------------
// Well-formed files

using Safetensors = TempDir;

TEST_F(Safetensors, ReadsAllDtypes) {
  std::vector<Entry> es = {
      {"f32", "F32", {2, 2}, bytes_of<float>({1.f, -2.5f, 0.f, 3e10f})},
      {"f16", "F16", {3}, bytes_of<uint16_t>({0x3c00, 0xc000, 0x7bff})},  // 1, -2, 65504
      {"bf16", "BF16", {1, 3}, bytes_of<uint16_t>({0x3f80, 0xc020, 0x4049})},
      {"f8", "F8_E4M3", {4}, bytes_of<uint8_t>({0x38, 0x7e, 0x01, 0xb8})},  // 1, 448, 2^-9, -1
      {"i64", "I64", {2}, bytes_of<int64_t>({-5, int64_t(1) << 40})},
      {"i32", "I32", {2, 1}, bytes_of<int32_t>({-7, 123456})},
      {"i16", "I16", {3}, bytes_of<int16_t>({-32768, 0, 32767})},
      {"i8", "I8", {2}, bytes_of<int8_t>({-128, 127})},
      {"u8", "U8", {2, 2}, bytes_of<uint8_t>({0, 1, 254, 255})},
      {"scalar", "F32", {}, bytes_of<float>({42.f})},
      {"empty", "F32", {0, 4}, {}},
  };
  fs::path p = dir / "all.safetensors";
  write_st(p, es, {{"format", "pt"}});

  auto f = SafetensorsFile::open(p);
  EXPECT_EQ(f->path(), p);
  EXPECT_EQ(f->metadata().at("format"), "pt");
  ASSERT_EQ(f->tensors().size(), es.size());
  const std::map<std::string, DType> want = {
      {"f32", DType::F32}, {"f16", DType::F16}, {"bf16", DType::BF16},
      {"f8", DType::F8_E4M3}, {"i64", DType::I64}, {"i32", DType::I32},
      {"i16", DType::I16}, {"i8", DType::I8}, {"u8", DType::U8},
      {"scalar", DType::F32}, {"empty", DType::F32}};
  for (const auto& e : es) {
    SCOPED_TRACE(e.name);
    const auto& t = f->tensors().at(e.name);
    EXPECT_EQ(t.name, e.name);
    EXPECT_EQ(t.dtype, want.at(e.name));
    EXPECT_EQ(t.shape, e.shape);
    EXPECT_EQ(t.nbytes, e.bytes.size());
    EXPECT_EQ(size_t(t.numel()) * bigmoe::dtype_size(t.dtype), t.nbytes);
    EXPECT_EQ(t.file, p.string());
    EXPECT_EQ(std::vector<uint8_t>(t.data, t.data + t.nbytes), e.bytes);
  }
  EXPECT_EQ(f->tensors().at("scalar").numel(), 1);
  EXPECT_EQ(f->tensors().at("empty").numel(), 0);

  // Values through to_f32, for the float formats.
  auto floats = [&](const char* name) {
    const auto& t = f->tensors().at(name);
    std::vector<float> v(size_t(t.numel()));
    bigmoe::to_f32(t.dtype, t.data, v.data(), v.size());
    return v;
  };
  EXPECT_EQ(floats("f16"), (std::vector<float>{1.f, -2.f, 65504.f}));
  EXPECT_EQ(floats("bf16"), (std::vector<float>{1.f, -2.5f, 3.140625f}));
  EXPECT_EQ(floats("f8"), (std::vector<float>{1.f, 448.f, 1.f / 512, -1.f}));
  EXPECT_EQ(floats("i64"), (std::vector<float>{-5.f, 1099511627776.f}));
}

TEST_F(Safetensors, ModelFromSingleFileAndFromDirectory) {
  write_st(dir / "model.safetensors",
           {{"b", "F32", {2}, bytes_of<float>({1, 2})}, {"a", "U8", {3}, {7, 8, 9}}});
  for (fs::path root : {dir / "model.safetensors", dir}) {
    SCOPED_TRACE(root.string());
    auto m = SafetensorsModel::open(root);
    EXPECT_EQ(m.root(), root);
    EXPECT_EQ(m.names(), (std::vector<std::string>{"a", "b"}));
    EXPECT_TRUE(m.has("a"));
    EXPECT_FALSE(m.has("c"));
    EXPECT_EQ(m.find("c"), nullptr);
    EXPECT_EQ(m.get("a").data[2], 9);
    EXPECT_EQ(m.total_bytes(), 11u);
    expect_error([&] { m.get("c"); }, {"tensor 'c' not found", root.string()});
  }
}

TEST_F(Safetensors, ModelOutlivesMoveAndCopy) {
  write_st(dir / "model.safetensors", {{"x", "I32", {1}, bytes_of<int32_t>({77})}});
  const bigmoe::TensorView* before;
  SafetensorsModel moved = [&] {
    auto m = SafetensorsModel::open(dir);
    before = &m.get("x");
    return m;
  }();
  SafetensorsModel copy = moved;
  EXPECT_EQ(&moved.get("x"), before);
  int32_t v;
  std::memcpy(&v, copy.get("x").data, 4);
  EXPECT_EQ(v, 77);
}

TEST_F(Safetensors, ShardedWithIndex) {
  write_st(dir / "model-00001-of-00002.safetensors",
           {{"layer.0.w", "BF16", {2, 2}, bytes_of<uint16_t>({1, 2, 3, 4})},
            {"embed", "F32", {1}, bytes_of<float>({5.f})}});
  write_st(dir / "model-00002-of-00002.safetensors",
           {{"layer.1.w", "BF16", {2, 2}, bytes_of<uint16_t>({5, 6, 7, 8})},
            {"extra_not_in_index", "U8", {1}, {42}}});
  // A stray file in the directory that the index does not name: must be ignored.
  write_st(dir / "consolidated.safetensors", {{"embed", "F32", {1}, bytes_of<float>({9.f})}});
  json idx = {{"metadata", {{"total_size", 20}}},
              {"weight_map",
               {{"layer.0.w", "model-00001-of-00002.safetensors"},
                {"embed", "model-00001-of-00002.safetensors"},
                {"layer.1.w", "model-00002-of-00002.safetensors"}}}};
  write_bytes(dir / "model.safetensors.index.json", idx.dump(2));

  auto m = SafetensorsModel::open(dir);
  EXPECT_EQ(m.names(),
            (std::vector<std::string>{"embed", "extra_not_in_index", "layer.0.w", "layer.1.w"}));
  EXPECT_EQ(m.files().size(), 2u);
  EXPECT_EQ(m.get("layer.1.w").file, (dir / "model-00002-of-00002.safetensors").string());
  uint16_t v[4];
  std::memcpy(v, m.get("layer.1.w").data, 8);
  EXPECT_EQ(v[3], 8);
  float e;
  std::memcpy(&e, m.get("embed").data, 4);
  EXPECT_EQ(e, 5.f);
  EXPECT_EQ(m.get("extra_not_in_index").data[0], 42);
  EXPECT_EQ(m.total_bytes(), 8u + 4 + 8 + 1);
}

TEST_F(Safetensors, DirectoryOfFilesWithoutIndex) {
  write_st(dir / "a.safetensors", {{"x", "U8", {1}, {1}}});
  write_st(dir / "b.safetensors", {{"y", "U8", {1}, {2}}});
  write_bytes(dir / "README.md", "not a checkpoint");
  auto m = SafetensorsModel::open(dir);
  EXPECT_EQ(m.names(), (std::vector<std::string>{"x", "y"}));
  EXPECT_EQ(m.get("y").data[0], 2);
}

TEST_F(Safetensors, SameTensorInTwoFiles) {
  write_st(dir / "a.safetensors", {{"x", "U8", {1}, {1}}});
  write_st(dir / "b.safetensors", {{"x", "U8", {1}, {2}}});
  expect_error([&] { SafetensorsModel::open(dir); },
               {"tensor 'x' appears in both", "a.safetensors", "b.safetensors"});
}

TEST_F(Safetensors, DirectoryWithoutCheckpoint) {
  write_bytes(dir / "config.json", "{}");
  expect_error([&] { SafetensorsModel::open(dir); }, {dir.string(), "model.safetensors"});
}

TEST_F(Safetensors, MissingPath) {
  expect_error([&] { SafetensorsModel::open(dir / "nope"); }, {"nope", "does not exist"});
}

TEST_F(Safetensors, EmptyHeaderObjectIsValid) {
  fs::path p = dir / "empty.safetensors";
  write_raw(p, "{}      ");
  EXPECT_TRUE(SafetensorsFile::open(p)->tensors().empty());
}

TEST_F(Safetensors, ZeroSizeTensorsShareOffsets) {
  fs::path p = dir / "z.safetensors";
  write_raw(p,
            R"({"a":{"dtype":"F32","shape":[0],"data_offsets":[4,4]},)"
            R"("b":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
            R"("c":{"dtype":"I8","shape":[2,0],"data_offsets":[4,4]}})",
            std::vector<uint8_t>(4, 0));
  EXPECT_EQ(SafetensorsFile::open(p)->tensors().size(), 3u);
}

// ---------------------------------------------------------------------------------------
// Malformed files: each names the file and the specific problem.

TEST_F(Safetensors, TooShortForHeaderLength) {
  fs::path p = dir / "short.safetensors";
  write_bytes(p, "abc");
  expect_error([&] { SafetensorsFile::open(p); }, {"too short for header length", p.string()});
}

TEST_F(Safetensors, EmptyFile) {
  fs::path p = dir / "zero.safetensors";
  write_bytes(p, "");
  expect_error([&] { SafetensorsFile::open(p); }, {"too short for header length", p.string()});
}

TEST_F(Safetensors, HeaderLengthExceedsFileSize) {
  fs::path p = dir / "hlen.safetensors";
  write_raw(p, "{}", {}, 3);
  expect_error([&] { SafetensorsFile::open(p); },
               {"header length 3 exceeds file size", p.string()});
  // A length near 2^64 must not wrap around in the bounds check.
  write_raw(p, "{}", {}, ~uint64_t(0));
  expect_error([&] { SafetensorsFile::open(p); }, {"exceeds file size", p.string()});
}

TEST_F(Safetensors, HeaderNotValidJson) {
  fs::path p = dir / "badjson.safetensors";
  write_raw(p, R"({"w": {"dtype": "F32",)");
  expect_error([&] { SafetensorsFile::open(p); }, {"header is not valid JSON", p.string()});
}

TEST_F(Safetensors, HeaderNotAnObject) {
  fs::path p = dir / "array.safetensors";
  write_raw(p, "[1, 2, 3]");
  expect_error([&] { SafetensorsFile::open(p); }, {"not a JSON object", p.string()});
}

TEST_F(Safetensors, MissingFieldDtype) {
  fs::path p = dir / "m.safetensors";
  write_raw(p, one_entry(R"({"shape":[4],"data_offsets":[0,16]})"), k16);
  expect_error([&] { SafetensorsFile::open(p); }, {"missing field 'dtype'", "'w'", p.string()});
}

TEST_F(Safetensors, MissingFieldShape) {
  fs::path p = dir / "m.safetensors";
  write_raw(p, one_entry(R"({"dtype":"F32","data_offsets":[0,16]})"), k16);
  expect_error([&] { SafetensorsFile::open(p); }, {"missing field 'shape'", "'w'", p.string()});
}

TEST_F(Safetensors, MissingFieldDataOffsets) {
  fs::path p = dir / "m.safetensors";
  write_raw(p, one_entry(R"({"dtype":"F32","shape":[4]})"), k16);
  expect_error([&] { SafetensorsFile::open(p); },
               {"missing field 'data_offsets'", "'w'", p.string()});
}

TEST_F(Safetensors, EntryNotAnObject) {
  fs::path p = dir / "m.safetensors";
  write_raw(p, one_entry("[1, 2]"), k16);
  expect_error([&] { SafetensorsFile::open(p); }, {"bad field", "'w'", p.string()});
}

TEST_F(Safetensors, BadFieldDtype) {
  fs::path p = dir / "m.safetensors";
  write_raw(p, one_entry(R"({"dtype":7,"shape":[4],"data_offsets":[0,16]})"), k16);
  expect_error([&] { SafetensorsFile::open(p); }, {"bad field 'dtype'", "'w'", p.string()});
}

TEST_F(Safetensors, BadFieldShape) {
  fs::path p = dir / "m.safetensors";
  for (const char* shape : {"\"4\"", "[4.0]", "[\"4\"]", "{}"}) {
    SCOPED_TRACE(shape);
    write_raw(p, one_entry(std::string(R"({"dtype":"F32","shape":)") + shape +
                           R"(,"data_offsets":[0,16]})"),
              k16);
    expect_error([&] { SafetensorsFile::open(p); }, {"bad field 'shape'", "'w'", p.string()});
  }
}

TEST_F(Safetensors, BadFieldDataOffsets) {
  fs::path p = dir / "m.safetensors";
  // Wrong arity, negative, fractional, string, and 2^64 (which JSON parsers read as a double).
  for (const char* offs : {"[0]", "[0,8,16]", "[-1,16]", "[0,16.0]", "[\"0\",16]",
                           "[0,18446744073709551616]", "16"}) {
    SCOPED_TRACE(offs);
    write_raw(p, one_entry(std::string(R"({"dtype":"F32","shape":[4],"data_offsets":)") + offs +
                           "}"),
              k16);
    expect_error([&] { SafetensorsFile::open(p); },
                 {"bad field 'data_offsets'", "'w'", p.string()});
  }
}

TEST_F(Safetensors, UnknownDtype) {
  fs::path p = dir / "m.safetensors";
  write_raw(p, one_entry(R"({"dtype":"XX","shape":[4],"data_offsets":[0,16]})"), k16);
  expect_error([&] { SafetensorsFile::open(p); }, {"unknown dtype 'XX'", "'w'", p.string()});
}

TEST_F(Safetensors, NegativeShape) {
  fs::path p = dir / "m.safetensors";
  write_raw(p, one_entry(R"({"dtype":"F32","shape":[-4],"data_offsets":[0,16]})"), k16);
  expect_error([&] { SafetensorsFile::open(p); }, {"bad shape", "'w'", p.string()});
}

TEST_F(Safetensors, ShapeProductOverflows) {
  fs::path p = dir / "m.safetensors";
  // 2^32 * 2^32 overflows int64; 2^62 F32 elements overflow a u64 byte count; a dimension of
  // 2^63 does not fit int64 at all.
  for (const char* shape : {"[4294967296,4294967296]", "[4611686018427387904]",
                            "[9223372036854775808]", "[0,18446744073709551615]"}) {
    SCOPED_TRACE(shape);
    write_raw(p, one_entry(std::string(R"({"dtype":"F32","shape":)") + shape +
                           R"(,"data_offsets":[0,16]})"),
              k16);
    expect_error([&] { SafetensorsFile::open(p); }, {"bad shape", "'w'", p.string()});
  }
}

TEST_F(Safetensors, OffsetsBeginAfterEnd) {
  fs::path p = dir / "m.safetensors";
  write_raw(p, one_entry(R"({"dtype":"F32","shape":[0],"data_offsets":[16,8]})"), k16);
  expect_error([&] { SafetensorsFile::open(p); }, {"out of bounds", "'w'", p.string()});
}

TEST_F(Safetensors, OffsetsBeyondData) {
  fs::path p = dir / "m.safetensors";
  write_raw(p, one_entry(R"({"dtype":"F32","shape":[5],"data_offsets":[0,20]})"), k16);
  expect_error([&] { SafetensorsFile::open(p); }, {"out of bounds", "'w'", p.string()});
  // Huge offsets whose difference looks right must still be caught.
  write_raw(p,
            one_entry(R"({"dtype":"U8","shape":[4],)"
                      R"("data_offsets":[18446744073709551610,18446744073709551614]})"),
            k16);
  expect_error([&] { SafetensorsFile::open(p); }, {"out of bounds", "'w'", p.string()});
}

TEST_F(Safetensors, Overlapping) {
  fs::path p = dir / "m.safetensors";
  write_raw(p,
            R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
            R"("b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
            k16);
  expect_error([&] { SafetensorsFile::open(p); }, {"overlaps", "'a'", "'b'", p.string()});
}

TEST_F(Safetensors, SizeMismatch) {
  fs::path p = dir / "m.safetensors";
  write_raw(p, one_entry(R"({"dtype":"BF16","shape":[2,3],"data_offsets":[0,16]})"), k16);
  expect_error([&] { SafetensorsFile::open(p); },
               {"size mismatch", "expected 12 bytes", "found 16", "'w'", p.string()});
}

TEST_F(Safetensors, BadMetadata) {
  fs::path p = dir / "m.safetensors";
  write_raw(p, R"({"__metadata__": {"format": 1}})");
  expect_error([&] { SafetensorsFile::open(p); }, {"bad field '__metadata__'", p.string()});
}

// ---------------------------------------------------------------------------------------
// Sharded checkpoints with a broken index.

TEST_F(Safetensors, IndexNotValidJson) {
  write_bytes(dir / "model.safetensors.index.json", "{\"weight_map\": ");
  expect_error([&] { SafetensorsModel::open(dir); },
               {"index", "not valid JSON", "model.safetensors.index.json"});
}

TEST_F(Safetensors, IndexWithoutWeightMap) {
  for (const char* text : {"{\"metadata\": {}}", "{\"weight_map\": []}", "[]", ""}) {
    SCOPED_TRACE(text);
    write_bytes(dir / "model.safetensors.index.json", text);
    expect_error([&] { SafetensorsModel::open(dir); },
                 {"index", "model.safetensors.index.json"});
  }
  write_bytes(dir / "model.safetensors.index.json", "{\"metadata\": {}}");
  expect_error([&] { SafetensorsModel::open(dir); }, {"weight_map"});
}

TEST_F(Safetensors, IndexNamesMissingShard) {
  write_st(dir / "s1.safetensors", {{"a", "U8", {1}, {1}}});
  write_bytes(dir / "model.safetensors.index.json",
              R"({"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}})");
  expect_error([&] { SafetensorsModel::open(dir); },
               {"shard 's2.safetensors'", "not found", "model.safetensors.index.json"});
}

TEST_F(Safetensors, IndexTensorMissingFromShard) {
  write_st(dir / "s1.safetensors", {{"a", "U8", {1}, {1}}});
  write_bytes(dir / "model.safetensors.index.json",
              R"({"weight_map": {"a": "s1.safetensors", "b": "s1.safetensors"}})");
  expect_error([&] { SafetensorsModel::open(dir); },
               {"tensor 'b' listed in index but missing from shard 's1.safetensors'"});
}

TEST_F(Safetensors, ShardErrorNamesShard) {
  write_raw(dir / "s1.safetensors", "{oops");
  write_bytes(dir / "model.safetensors.index.json", R"({"weight_map": {"a": "s1.safetensors"}})");
  expect_error([&] { SafetensorsModel::open(dir); },
               {"header is not valid JSON", "s1.safetensors"});
}

// ---------------------------------------------------------------------------------------
// MappedFile

using Mmap = TempDir;

TEST_F(Mmap, MissingFile) {
  expect_error([&] { bigmoe::MappedFile::open(dir / "missing.bin"); },
               {(dir / "missing.bin").string(), "No such file"});
}

TEST_F(Mmap, Directory) {
  expect_error([&] { bigmoe::MappedFile::open(dir); }, {dir.string(), "directory"});
}

TEST_F(Mmap, ZeroLengthFile) {
  write_bytes(dir / "empty", "");
  auto m = bigmoe::MappedFile::open(dir / "empty");
  EXPECT_EQ(m.size(), 0u);
  EXPECT_EQ(m.data(), nullptr);
}

TEST_F(Mmap, ContentsAndMove) {
  write_bytes(dir / "f", "hello");
  auto m = bigmoe::MappedFile::open(dir / "f");
  ASSERT_EQ(m.size(), 5u);
  EXPECT_EQ(std::string(reinterpret_cast<const char*>(m.data()), 5), "hello");
  bigmoe::MappedFile n = std::move(m);
  EXPECT_EQ(m.data(), nullptr);
  EXPECT_EQ(n.size(), 5u);
  EXPECT_EQ(n.path(), dir / "f");
  EXPECT_EQ(n.data()[4], 'o');
  m = std::move(n);
  EXPECT_EQ(m.data()[0], 'h');
}

// ---------------------------------------------------------------------------------------
// .npy

using Npy = TempDir;

TEST_F(Npy, RoundTrip) {
  for (std::vector<int64_t> shape : std::vector<std::vector<int64_t>>{
           {2, 3}, {5}, {}, {0, 7}, {1, 2, 3, 4}}) {
    SCOPED_TRACE(shape.size());
    int64_t n = 1;
    for (auto d : shape) n *= d;
    std::vector<float> v(static_cast<size_t>(n));
    for (size_t i = 0; i < v.size(); ++i) v[i] = float(i) * 0.25f - 1.f;
    fs::path p = dir / "a.npy";
    bigmoe::write_npy_f32(p, v.data(), shape);

    // Header per the v1.0 spec: data starts at a multiple of 64, header ends in '\n'.
    auto m = bigmoe::MappedFile::open(p);
    ASSERT_GE(m.size(), 10u);
    EXPECT_EQ(std::memcmp(m.data(), "\x93NUMPY\x01\x00", 8), 0);
    size_t hlen = m.data()[8] | size_t(m.data()[9]) << 8;
    EXPECT_EQ((10 + hlen) % 64, 0u);
    EXPECT_EQ(m.data()[10 + hlen - 1], '\n');
    EXPECT_EQ(m.size(), 10 + hlen + v.size() * 4);

    auto a = bigmoe::read_npy(p);
    EXPECT_EQ(a.shape, shape);
    EXPECT_EQ(a.dtype, "<f4");
    EXPECT_EQ(a.data, v);
  }
}

TEST_F(Npy, WritesNumpySpelling) {
  float x[3] = {1, 2, 3};
  bigmoe::write_npy_f32(dir / "a.npy", x, {3});
  auto m = bigmoe::MappedFile::open(dir / "a.npy");
  size_t hlen = m.data()[8] | size_t(m.data()[9]) << 8;
  EXPECT_EQ(hlen, 128u - 10);  // what numpy writes: this dict does not fit in 64 bytes
  std::string hdr(reinterpret_cast<const char*>(m.data()) + 10, hlen);
  // numpy writes exactly this dict for np.zeros(3, np.float32).
  EXPECT_EQ(hdr.rfind("{'descr': '<f4', 'fortran_order': False, 'shape': (3,), }", 0), 0u) << hdr;
}

// Builds a .npy by hand: version bytes, header text (unpadded, as any writer might) and data.
static std::string hand_npy(int major, const std::string& header, const std::string& data) {
  std::string s = "\x93NUMPY";
  s += char(major);
  s += char(0);
  uint32_t n = uint32_t(header.size());
  s += char(n & 0xff);
  s += char(n >> 8 & 0xff);
  if (major >= 2) {
    s += char(n >> 16 & 0xff);
    s += char(n >> 24 & 0xff);
  }
  return s + header + data;
}

TEST_F(Npy, ReadsHandWrittenV1AndV2) {
  float f[4] = {1.5f, -2.f, 0.f, 1e-3f};
  std::string fd(reinterpret_cast<const char*>(f), sizeof f);
  fs::path p = dir / "h.npy";

  write_bytes(p, hand_npy(1, "{'descr':'<f4','fortran_order':False,'shape':(2,2)}\n", fd));
  auto a = bigmoe::read_npy(p);
  EXPECT_EQ(a.shape, (std::vector<int64_t>{2, 2}));
  EXPECT_EQ(a.data, (std::vector<float>{1.5f, -2.f, 0.f, 1e-3f}));

  // Key order is free and the data is unaligned here (header length 61).
  write_bytes(p, hand_npy(2, "{\"shape\": (4,), \"fortran_order\": False, \"descr\": \"<f4\"}  \n",
                          fd));
  a = bigmoe::read_npy(p);
  EXPECT_EQ(a.shape, (std::vector<int64_t>{4}));
  EXPECT_EQ(a.data[3], 1e-3f);

  int32_t i4[3] = {-3, 0, 1 << 20};
  write_bytes(p, hand_npy(1, "{'descr': '<i4', 'fortran_order': False, 'shape': (3,), }\n",
                          std::string(reinterpret_cast<const char*>(i4), sizeof i4)));
  a = bigmoe::read_npy(p);
  EXPECT_EQ(a.dtype, "<i4");
  EXPECT_EQ(a.data, (std::vector<float>{-3.f, 0.f, 1048576.f}));

  int64_t i8[2] = {-(int64_t(1) << 40), 7};
  write_bytes(p, hand_npy(1, "{'descr': '<i8', 'fortran_order': False, 'shape': (1, 2), }\n",
                          std::string(reinterpret_cast<const char*>(i8), sizeof i8)));
  a = bigmoe::read_npy(p);
  EXPECT_EQ(a.dtype, "<i8");
  EXPECT_EQ(a.shape, (std::vector<int64_t>{1, 2}));
  EXPECT_EQ(a.data, (std::vector<float>{-1099511627776.f, 7.f}));
}

TEST_F(Npy, RejectsWhatItCannotRead) {
  fs::path p = dir / "bad.npy";
  std::string d8(8, '\0');
  struct Case { std::string file, phrase; };
  std::vector<Case> cases = {
      {hand_npy(1, "{'descr': '<f4', 'fortran_order': True, 'shape': (2,), }\n", d8),
       "fortran_order"},
      {hand_npy(1, "{'descr': '>f4', 'fortran_order': False, 'shape': (2,), }\n", d8),
       "unsupported dtype '>f4'"},
      {hand_npy(1, "{'descr': '<f8', 'fortran_order': False, 'shape': (1,), }\n", d8),
       "unsupported dtype '<f8'"},
      {hand_npy(1, "{'descr': '<f4', 'fortran_order': False, 'shape': (3,), }\n", d8),
       "needs more data"},
      {hand_npy(1, "{'descr': '<f4', 'fortran_order': False, 'shape': (1,), }\n", d8),
       "expected 4 data bytes"},
      {hand_npy(1, "{'descr': '<f4', 'fortran_order': False, 'shape': (-2,), }\n", d8),
       "bad header"},
      {hand_npy(1, "{'descr': '<f4', 'shape': (2,), }\n", d8), "bad header"},
      {hand_npy(1, "{'descr': '<f4', 'fortran_order': False, 'shape': (2,)\n", d8),
       "bad header"},
      {hand_npy(4, "{}", ""), "unsupported format version 4"},
      {"\x93NUMPX\x01\x00\x00\x00", "bad magic"},
      {"\x93NUM", "bad magic"},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.phrase);
    write_bytes(p, c.file);
    expect_error([&] { bigmoe::read_npy(p); }, {c.phrase, p.string()});
  }
  // Header length field larger than the file.
  std::string s = hand_npy(1, "{}", "");
  s[8] = char(0xff);
  write_bytes(p, s);
  expect_error([&] { bigmoe::read_npy(p); }, {"exceeds file size", p.string()});
}

TEST_F(Npy, ReadMissingFile) {
  expect_error([&] { bigmoe::read_npy(dir / "none.npy"); }, {"none.npy"});
}
