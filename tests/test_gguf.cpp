// GGUF reader and writer. meta.gguf (written by the gguf Python package, see
// tests/fixtures/quant/README.md) must read back as meta.json says; malformed files, built here
// byte by byte, must each fail with a message naming the file and the fault; and no truncation
// or corruption of a valid file may crash: every open either succeeds or throws bigmoe::Error.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <vector>

#include "io/gguf.h"
#include "io/gguf_writer.h"
#include "tensor/quant.h"
#include "util/error.h"

namespace fs = std::filesystem;
using bigmoe::GgmlType;
using bigmoe::GgufFile;
using bigmoe::GgufType;
using bigmoe::GgufValue;
using bigmoe::GgufWriter;
using json = nlohmann::json;

namespace {

const fs::path kDir = fs::path(BIGMOE_FIXTURES) / "quant";

std::vector<uint8_t> read_file(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  return std::vector<uint8_t>(std::istreambuf_iterator<char>(f), {});
}

void write_file(const fs::path& p, const std::vector<uint8_t>& b) {
  std::ofstream f(p, std::ios::binary | std::ios::trunc);
  f.write(reinterpret_cast<const char*>(b.data()), std::streamsize(b.size()));
}

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

// Builds GGUF bytes by hand, so that any field can be made wrong.
struct Bytes {
  std::vector<uint8_t> b;
  template <typename T>
  Bytes& put(T v) {
    uint8_t x[sizeof(T)];
    std::memcpy(x, &v, sizeof(T));
    b.insert(b.end(), x, x + sizeof(T));
    return *this;
  }
  Bytes& str(const std::string& s) {
    put<uint64_t>(s.size());
    b.insert(b.end(), s.begin(), s.end());
    return *this;
  }
  Bytes& header(uint64_t n_tensors, uint64_t n_kv, uint32_t version = 3) {
    b.insert(b.end(), {'G', 'G', 'U', 'F'});
    return put<uint32_t>(version).put<uint64_t>(n_tensors).put<uint64_t>(n_kv);
  }
  Bytes& kv_u32(const std::string& key, uint32_t v) {
    return str(key).put<uint32_t>(uint32_t(GgufType::UINT32)).put<uint32_t>(v);
  }
  Bytes& tensor(const std::string& name, std::vector<uint64_t> ne, uint32_t type, uint64_t off) {
    str(name).put<uint32_t>(uint32_t(ne.size()));
    for (uint64_t d : ne) put<uint64_t>(d);
    return put<uint32_t>(type).put<uint64_t>(off);
  }
  Bytes& pad(size_t a = 32) {
    b.resize((b.size() + a - 1) / a * a, 0);
    return *this;
  }
  Bytes& zeros(size_t n) {
    b.resize(b.size() + n, 0);
    return *this;
  }
};

class TempDir : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    // The robustness tests write thousands of small files: prefer a RAM-backed directory.
    fs::path base = fs::is_directory("/dev/shm") ? fs::path("/dev/shm") : fs::temp_directory_path();
    dir = base / (std::string("bigmoe_gguf_") + std::to_string(getpid()) + "_" +
                  info->test_suite_name() + "_" + info->name());
    fs::remove_all(dir);
    fs::create_directories(dir);
  }
  void TearDown() override { fs::remove_all(dir); }

  // Writes bytes to dir/name and opens them, expecting an error with every part and the path.
  void expect_open_error(const std::string& name, const std::vector<uint8_t>& bytes,
                         std::initializer_list<std::string> parts) {
    fs::path p = dir / name;
    write_file(p, bytes);
    SCOPED_TRACE(name);
    expect_error([&] { GgufFile::open(p); }, parts);
    expect_error([&] { GgufFile::open(p); }, {p.string()});
  }

  fs::path dir;
};

// A valid file exercising every part of the format: scalars of each type, arrays of each
// element type, nested arrays, strings, and tensors of plain and block types.
void write_sample(const fs::path& p) {
  GgufWriter w;
  w.add_str("general.architecture", "sample");
  w.add_u8("s.u8", 7);
  w.add_i8("s.i8", -7);
  w.add_u16("s.u16", 700);
  w.add_i16("s.i16", -700);
  w.add_u32("s.u32", 70000);
  w.add_i32("s.i32", -70000);
  w.add_u64("s.u64", uint64_t(1) << 40);
  w.add_i64("s.i64", -(int64_t(1) << 40));
  w.add_f32("s.f32", 0.25f);
  w.add_f64("s.f64", -0.125);
  w.add_bool("s.bool", true);
  w.add_str("s.str", "abc");
  w.add_arr_str("a.str", {"x", "", "yz"});
  w.add_arr_i32("a.i32", {1, -2, 3});
  w.add_arr_f32("a.f32", {0.5f, 1.5f});
  w.add("a.u8", GgufValue::make_int_array(GgufType::UINT8, {1, 2, 3, 4, 5}));
  w.add("a.bool", GgufValue::make_bool_array({true, false}));
  w.add("a.nested", GgufValue::make_nested_array({GgufValue::make_int_array(GgufType::INT16, {1}),
                                                  GgufValue::make_str_array({"q", "r"})}));
  std::vector<uint8_t> q(2 * 18, 0x11), f(3 * 4 * 2, 0x3c), k(144, 0x22);
  w.add_tensor("t.q4_0", GgmlType::Q4_0, {64}, q.data(), q.size());
  w.add_tensor("t.f16", GgmlType::F16, {4, 3}, f.data(), f.size());
  w.add_tensor("t.q4_k", GgmlType::Q4_K, {256, 1}, k.data(), k.size());
  w.write(p);
}

}  // namespace

// ---------------------------------------------------------------------------------------
// The gguf package's file reads back as meta.json says

TEST(Gguf, ReadsGgufPackageFile) {
  json m = json::parse(std::ifstream(kDir / "meta.json"));
  auto g = GgufFile::open(kDir / "meta.gguf");
  EXPECT_EQ(g->version(), m["version"].get<uint32_t>());
  EXPECT_EQ(g->alignment(), m["alignment"].get<uint32_t>());

  const auto& kvs = g->kvs();
  ASSERT_EQ(kvs.size(), m["kv"].size());
  for (size_t k = 0; k < kvs.size(); ++k) {
    const json& e = m["kv"][k];
    const auto& [key, v] = kvs[k];
    SCOPED_TRACE(key);
    EXPECT_EQ(key, e["key"].get<std::string>());
    EXPECT_STREQ(bigmoe::gguf_type_name(v.type), e["type"].get<std::string>().c_str());
    EXPECT_EQ(g->find(key), &v);
    const json& want = e["value"];
    switch (v.type) {
      case GgufType::UINT8:
      case GgufType::UINT16:
      case GgufType::UINT32:
      case GgufType::UINT64: EXPECT_EQ(v.u, want.get<uint64_t>()); break;
      case GgufType::INT8:
      case GgufType::INT16:
      case GgufType::INT32:
      case GgufType::INT64: EXPECT_EQ(v.i, want.get<int64_t>()); break;
      case GgufType::FLOAT32:
      case GgufType::FLOAT64: EXPECT_EQ(v.f, want.get<double>()); break;
      case GgufType::BOOL: EXPECT_EQ(v.u != 0, want.get<bool>()); break;
      case GgufType::STRING: EXPECT_EQ(v.s, want.get<std::string>()); break;
      case GgufType::ARRAY: {
        EXPECT_STREQ(bigmoe::gguf_type_name(v.elem_type),
                     e["elem_type"].get<std::string>().c_str());
        ASSERT_EQ(v.count, want.size());
        for (uint64_t i = 0; i < v.count; ++i) {
          const json& w = want[i];
          if (v.elem_type == GgufType::STRING)
            EXPECT_EQ(v.strs[i], w.get<std::string>());
          else if (v.elem_type == GgufType::BOOL)
            EXPECT_EQ(v.uint_at(i) != 0, w.get<bool>());
          else if (v.elem_type == GgufType::FLOAT32 || v.elem_type == GgufType::FLOAT64)
            EXPECT_EQ(v.float_at(i), w.get<double>());
          else if (v.elem_type == GgufType::ARRAY) {
            const GgufValue& inner = v.items[i];
            EXPECT_STREQ(bigmoe::gguf_type_name(inner.elem_type),
                         e["inner_type"].get<std::string>().c_str());
            ASSERT_EQ(inner.count, w.size());
            for (uint64_t j = 0; j < inner.count; ++j) {
              if (inner.elem_type == GgufType::STRING)
                EXPECT_EQ(inner.strs[j], w[j].get<std::string>());
              else
                EXPECT_EQ(inner.int_at(j), w[j].get<int64_t>());
            }
          } else if (w.is_number_unsigned())
            EXPECT_EQ(v.uint_at(i), w.get<uint64_t>());
          else
            EXPECT_EQ(v.int_at(i), w.get<int64_t>());
        }
        break;
      }
    }
  }

  // Typed getters on the same file.
  EXPECT_EQ(g->get_str("general.architecture"), "bigmoe-test");
  EXPECT_EQ(g->get_u32("test.u8"), 200u);
  EXPECT_EQ(g->get_u32("test.u32"), 4000000000u);
  EXPECT_EQ(g->get_i64("test.i64"), -(int64_t(1) << 62) - 3);
  EXPECT_EQ(g->get_i64("test.i8"), -100);
  EXPECT_EQ(g->get_f32("test.f32"), 3.14159f);
  EXPECT_EQ(g->get_f32("test.f64"), float(2.718281828459045));
  EXPECT_TRUE(g->get_bool("test.bool_true"));
  EXPECT_FALSE(g->get_bool("test.bool_false"));
  EXPECT_EQ(g->get_arr_str("test.arr_str"),
            (std::vector<std::string>{"a", "bc", "", "\u00fc\u00df"}));
  EXPECT_EQ(g->get_arr_i32("test.arr_i32"), (std::vector<int32_t>{INT32_MIN, INT32_MAX, 0, 42}));
  EXPECT_EQ(g->get_arr_i32("test.arr_u8"), (std::vector<int32_t>{0, 1, 255}));
  EXPECT_EQ(g->get_arr_f32("test.arr_f32"), (std::vector<float>{0.5f, -1.25f, 1e-3f}));

  // Tensors: type, shape, size, position, and the values gguf.quants dequantizes them to.
  ASSERT_EQ(g->tensors().size(), m["tensors"].size());
  for (size_t k = 0; k < g->tensors().size(); ++k) {
    const json& e = m["tensors"][k];
    const auto& t = g->tensors()[k];
    SCOPED_TRACE(t.name);
    EXPECT_EQ(t.name, e["name"].get<std::string>());
    EXPECT_EQ(g->tensor(t.name), &t);
    EXPECT_EQ(uint32_t(t.type), e["type_id"].get<uint32_t>());
    EXPECT_EQ(bigmoe::ggml_type_name(t.type), e["type"].get<std::string>());
    EXPECT_EQ(t.ne, e["ne"].get<std::vector<int64_t>>());
    EXPECT_EQ(t.nbytes, e["nbytes"].get<size_t>());
    EXPECT_EQ(g->data_offset() + t.offset, e["file_offset"].get<uint64_t>());
    EXPECT_EQ(t.offset % g->alignment(), 0u);
    std::vector<float> vals(size_t(t.numel()));
    int64_t row = t.ne[0], rows = t.numel() / row;
    size_t row_bytes = bigmoe::ggml_row_size(t.type, row);
    for (int64_t r = 0; r < rows; ++r)
      bigmoe::dequantize_row(t.type, t.data + r * row_bytes, vals.data() + r * row, row);
    auto want = e["values"].get<std::vector<double>>();
    ASSERT_EQ(vals.size(), want.size());
    for (size_t i = 0; i < vals.size(); ++i) ASSERT_EQ(vals[i], float(want[i])) << "element " << i;
  }
  EXPECT_EQ(g->tensor("nope"), nullptr);
  EXPECT_EQ(g->find("nope"), nullptr);
}

// ---------------------------------------------------------------------------------------
// Writer round trip and getters

using GgufRoundTrip = TempDir;

TEST_F(GgufRoundTrip, WriterOutputReadsBack) {
  fs::path p = dir / "sample.gguf";
  write_sample(p);
  auto g = GgufFile::open(p);
  EXPECT_EQ(g->version(), 3u);
  EXPECT_EQ(g->alignment(), 32u);
  EXPECT_EQ(g->kvs().size(), 19u);
  EXPECT_EQ(g->get_u32("s.u8"), 7u);
  EXPECT_EQ(g->get_i64("s.i8"), -7);
  EXPECT_EQ(g->get_u32("s.u16"), 700u);
  EXPECT_EQ(g->get_i64("s.i16"), -700);
  EXPECT_EQ(g->get_u32("s.u32"), 70000u);
  EXPECT_EQ(g->get_i64("s.i32"), -70000);
  EXPECT_EQ(g->get_i64("s.u64"), int64_t(1) << 40);
  EXPECT_EQ(g->get_i64("s.i64"), -(int64_t(1) << 40));
  EXPECT_EQ(g->get_f32("s.f32"), 0.25f);
  EXPECT_EQ(g->find("s.f64")->f, -0.125);
  EXPECT_TRUE(g->get_bool("s.bool"));
  EXPECT_EQ(g->get_str("s.str"), "abc");
  EXPECT_EQ(g->get_arr_str("a.str"), (std::vector<std::string>{"x", "", "yz"}));
  EXPECT_EQ(g->get_arr_i32("a.i32"), (std::vector<int32_t>{1, -2, 3}));
  EXPECT_EQ(g->get_arr_f32("a.f32"), (std::vector<float>{0.5f, 1.5f}));
  EXPECT_EQ(g->get_arr_i32("a.u8"), (std::vector<int32_t>{1, 2, 3, 4, 5}));
  const GgufValue* b = g->find("a.bool");
  ASSERT_TRUE(b);
  EXPECT_EQ(b->uint_at(0), 1u);
  EXPECT_EQ(b->uint_at(1), 0u);
  const GgufValue* n = g->find("a.nested");
  ASSERT_TRUE(n);
  ASSERT_EQ(n->items.size(), 2u);
  EXPECT_EQ(n->items[0].elem_type, GgufType::INT16);
  EXPECT_EQ(n->items[0].int_at(0), 1);
  EXPECT_EQ(n->items[1].strs, (std::vector<std::string>{"q", "r"}));

  ASSERT_EQ(g->tensors().size(), 3u);
  const auto* q = g->tensor("t.q4_0");
  ASSERT_TRUE(q);
  EXPECT_EQ(q->type, GgmlType::Q4_0);
  EXPECT_EQ(q->ne, (std::vector<int64_t>{64}));
  EXPECT_EQ(q->nbytes, 36u);
  EXPECT_EQ(q->data[0], 0x11);
  const auto* f = g->tensor("t.f16");
  EXPECT_EQ(f->ne, (std::vector<int64_t>{4, 3}));
  EXPECT_EQ(f->numel(), 12);
  EXPECT_EQ(f->offset, 64u);  // 36 bytes padded to 32
  EXPECT_EQ(g->tensor("t.q4_k")->offset, 96u);
  EXPECT_EQ(g->data_offset() % 32, 0u);
  EXPECT_EQ(fs::file_size(p), g->data_offset() + 96 + 160);

  // Version 2 has the same layout.
  std::vector<uint8_t> bytes = read_file(p);
  bytes[4] = 2;
  write_file(dir / "v2.gguf", bytes);
  EXPECT_EQ(GgufFile::open(dir / "v2.gguf")->version(), 2u);
}

TEST_F(GgufRoundTrip, CustomAlignment) {
  GgufWriter w;
  w.set_alignment(256);
  std::vector<uint8_t> a(34, 1), b(34, 2);
  w.add_tensor("a", GgmlType::Q8_0, {32}, a.data(), a.size());
  w.add_tensor("b", GgmlType::Q8_0, {32}, b.data(), b.size());
  w.write(dir / "x.gguf");
  auto g = GgufFile::open(dir / "x.gguf");
  EXPECT_EQ(g->alignment(), 256u);
  EXPECT_EQ(g->data_offset() % 256, 0u);
  EXPECT_EQ(g->tensor("b")->offset, 256u);
  EXPECT_EQ(g->tensor("b")->data[33], 2);
}

TEST_F(GgufRoundTrip, WriterRejectsBadInput) {
  GgufWriter w;
  w.add_u32("k", 1);
  expect_error([&] { w.add_str("k", "again"); }, {"duplicate key 'k'"});
  std::vector<uint8_t> d(34);
  expect_error([&] { w.add_tensor("t", GgmlType::Q8_0, {32}, d.data(), 33); },
               {"tensor 't'", "33 bytes given, shape needs 34"});
  w.add_tensor("t", GgmlType::Q8_0, {32}, d.data(), 34);
  expect_error([&] { w.add_tensor("t", GgmlType::Q8_0, {32}, d.data(), 34); },
               {"duplicate tensor name 't'"});
  expect_error([&] { w.add_tensor("u", GgmlType::Q8_0, {33}, d.data(), 34); },
               {"not a multiple of the Q8_0 block size 32"});
  expect_error([&] { w.set_alignment(48); }, {"power of two"});
  expect_error([&] { w.set_alignment(64); }, {"set the alignment before adding tensors"});
  expect_error([&] { GgufValue::make_uint(GgufType::UINT8, 256); }, {"256 does not fit UINT8"});
  expect_error([&] { GgufValue::make_int(GgufType::INT16, -40000); }, {"does not fit INT16"});
}

TEST_F(GgufRoundTrip, GetterErrorsNameKeyAndFile) {
  fs::path p = dir / "sample.gguf";
  write_sample(p);
  auto g = GgufFile::open(p);
  const std::string f = p.string();
  expect_error([&] { g->get_u32("missing.key"); }, {"key 'missing.key' not found", f});
  expect_error([&] { g->get_str("missing.key"); }, {"missing.key", f});
  EXPECT_EQ(g->get_u32("missing.key", 5u), 5u);
  EXPECT_EQ(g->get_i64("missing.key", -5), -5);
  EXPECT_EQ(g->get_f32("missing.key", 1.5f), 1.5f);
  EXPECT_EQ(g->get_bool("missing.key", true), true);
  EXPECT_EQ(g->get_str("missing.key", "dflt"), "dflt");
  // A present key of the wrong type throws even when a default is given.
  expect_error([&] { g->get_u32("s.str", 5u); },
               {"key 's.str' has type STRING, expected an integer", f});
  expect_error([&] { g->get_u32("s.i8"); }, {"key 's.i8' = -7 does not fit u32", f});
  expect_error([&] { g->get_u32("s.u64"); }, {"does not fit u32"});
  expect_error([&] { g->get_f32("s.u32"); }, {"key 's.u32' has type UINT32, expected FLOAT32", f});
  expect_error([&] { g->get_bool("s.u8"); }, {"key 's.u8' has type UINT8, expected BOOL"});
  expect_error([&] { g->get_str("s.u8", "x"); }, {"expected STRING"});
  expect_error([&] { g->get_arr_str("a.i32"); },
               {"key 'a.i32' has type ARRAY of INT32, expected ARRAY of STRING", f});
  expect_error([&] { g->get_arr_i32("a.str"); },
               {"ARRAY of STRING, expected ARRAY of an integer type"});
  expect_error([&] { g->get_arr_f32("s.f32"); }, {"has type FLOAT32, expected ARRAY of FLOAT32"});
}

// ---------------------------------------------------------------------------------------
// Malformed files: each fault gets its own message, naming the file and the key or tensor

using GgufMalformed = TempDir;

TEST_F(GgufMalformed, Header) {
  expect_open_error("empty.gguf", {}, {"bad magic"});
  expect_open_error("short.gguf", {'G', 'G'}, {"bad magic"});
}

TEST_F(GgufMalformed, EachFault) {
  // A valid minimal file opens.
  {
    fs::path p = dir / "ok.gguf";
    write_file(p, Bytes().header(0, 1).kv_u32("a", 1).b);
    EXPECT_EQ(GgufFile::open(p)->get_u32("a"), 1u);
  }
  Bytes ggml_magic;
  ggml_magic.b = {'G', 'G', 'M', 'L'};
  ggml_magic.put<uint32_t>(3).zeros(16);
  expect_open_error("magic.gguf", ggml_magic.b, {"bad magic", "474d4c"});
  expect_open_error("v1.gguf", Bytes().header(0, 0, 1).b, {"unsupported version 1"});
  expect_open_error("v4.gguf", Bytes().header(0, 0, 4).b, {"unsupported version 4"});
  expect_open_error("be.gguf", Bytes().header(0, 0, 0x03000000).b,
                    {"unsupported version", "big-endian"});
  expect_open_error("trunc_header.gguf", std::vector<uint8_t>{'G', 'G', 'U', 'F', 3, 0, 0, 0, 1},
                    {"truncated", "tensor_count"});
  expect_open_error("kv_count.gguf", Bytes().header(0, uint64_t(1) << 60).b,
                    {"kv_count", "too large"});
  expect_open_error("tensor_count.gguf", Bytes().header(uint64_t(1) << 40, 0).zeros(64).b,
                    {"tensor_count", "too large"});
  // String length past the end of the file.
  expect_open_error("key_len.gguf", Bytes().header(0, 1).put<uint64_t>(1000).zeros(16).b,
                    {"truncated", "key #0", "string of 1000 bytes"});
  expect_open_error("str_val.gguf",
                    Bytes().header(0, 1).str("name").put<uint32_t>(8).put<uint64_t>(~uint64_t(0)).b,
                    {"truncated", "key 'name'"});
  expect_open_error("trunc_value.gguf",
                    Bytes().header(0, 1).str("v").put<uint32_t>(10).put<uint32_t>(1).b,
                    {"truncated", "key 'v'"});
  expect_open_error("value_type.gguf", Bytes().header(0, 1).str("k").put<uint32_t>(13).zeros(8).b,
                    {"key 'k'", "unknown value type 13"});
  expect_open_error(
      "elem_type.gguf",
      Bytes().header(0, 1).str("k").put<uint32_t>(9).put<uint32_t>(99).put<uint64_t>(1).zeros(8).b,
      {"key 'k'", "unknown array element type 99"});
  expect_open_error("array_count.gguf",
                    Bytes()
                        .header(0, 1)
                        .str("k")
                        .put<uint32_t>(9)
                        .put<uint32_t>(8)
                        .put<uint64_t>(uint64_t(1) << 61)
                        .zeros(8)
                        .b,
                    {"truncated", "key 'k'", "array of 2305843009213693952 STRING elements"});
  {
    Bytes deep;
    deep.header(0, 1).str("deep").put<uint32_t>(9);
    for (int i = 0; i < 20; ++i) deep.put<uint32_t>(9).put<uint64_t>(1);
    deep.zeros(64);
    expect_open_error("deep.gguf", deep.b, {"key 'deep'", "nested deeper than 8"});
  }
  expect_open_error("bool.gguf", Bytes().header(0, 1).str("b").put<uint32_t>(7).put<uint8_t>(2).b,
                    {"key 'b'", "neither 0 nor 1"});
  expect_open_error("dup_key.gguf", Bytes().header(0, 2).kv_u32("a", 1).kv_u32("a", 2).b,
                    {"duplicate key 'a'"});
  expect_open_error("align_pow2.gguf", Bytes().header(0, 1).kv_u32("general.alignment", 48).b,
                    {"general.alignment", "power of two"});
  expect_open_error("align_type.gguf",
                    Bytes().header(0, 1).str("general.alignment").put<uint32_t>(8).str("32").b,
                    {"general.alignment", "expected UINT32"});

  // Tensor infos.
  auto one_tensor = [](std::vector<uint64_t> ne, uint32_t type, uint64_t off, size_t data) {
    return Bytes().header(1, 0).tensor("blk.0.w", ne, type, off).pad().zeros(data).b;
  };
  EXPECT_NO_THROW({
    write_file(dir / "t_ok.gguf", one_tensor({32, 2}, 8, 0, 68));
    GgufFile::open(dir / "t_ok.gguf");
  });
  expect_open_error("ggml_type.gguf", one_tensor({32}, 4, 0, 64),
                    {"tensor 'blk.0.w'", "unknown ggml type 4"});
  expect_open_error("ggml_type2.gguf", one_tensor({32}, 1000, 0, 64),
                    {"tensor 'blk.0.w'", "unknown ggml type 1000"});
  expect_open_error(
      "block.gguf", one_tensor({48, 2}, 8, 0, 256),
      {"tensor 'blk.0.w'", "48 elements per row", "not a multiple of block size 32 of Q8_0"});
  expect_open_error("range.gguf", one_tensor({32, 2}, 8, 0, 67),
                    {"tensor 'blk.0.w'", "data [0, 68) out of range of the 67-byte data section"});
  expect_open_error("range_off.gguf", one_tensor({32}, 8, uint64_t(1) << 63, 64),
                    {"tensor 'blk.0.w'", "out of range"});
  expect_open_error("align.gguf", one_tensor({32}, 8, 16, 64),
                    {"tensor 'blk.0.w'", "offset 16 is not a multiple of the alignment 32"});
  expect_open_error("n_dims.gguf", one_tensor({1, 1, 1, 1, 1}, 0, 0, 64),
                    {"tensor 'blk.0.w'", "n_dims 5"});
  expect_open_error("ne_neg.gguf", one_tensor({~uint64_t(0)}, 0, 0, 64),
                    {"tensor 'blk.0.w'", "negative"});
  expect_open_error("ne_overflow.gguf",
                    one_tensor({uint64_t(1) << 40, uint64_t(1) << 40}, 0, 0, 64),
                    {"tensor 'blk.0.w'", "overflows"});
  expect_open_error("trunc_tensor.gguf",
                    Bytes().header(1, 0).str("blk.0.w").put<uint32_t>(2).put<uint64_t>(4).b,
                    {"truncated", "tensor 'blk.0.w'"});
  expect_open_error(
      "dup_tensor.gguf",
      Bytes().header(2, 0).tensor("w", {32}, 0, 0).tensor("w", {32}, 0, 128).pad().zeros(256).b,
      {"duplicate tensor name 'w'"});
  expect_open_error(
      "overlap.gguf",
      Bytes().header(2, 0).tensor("a", {32}, 0, 0).tensor("b", {32}, 0, 96).pad().zeros(256).b,
      {"tensor 'b' data [96, 224) overlaps tensor 'a' data [0, 128)"});
}

// ---------------------------------------------------------------------------------------
// Robustness: truncation at every byte, random corruption

namespace {

// Opens p; on success reads everything the file exposes, so a bad pointer would fault here.
// Returns true on success, false on bigmoe::Error; any other exception fails the test.
bool open_and_touch(const fs::path& p, const std::string& what) {
  try {
    auto g = GgufFile::open(p);
    uint64_t sum = 0;
    for (const auto& [k, v] : g->kvs()) {
      sum += k.size() + v.s.size() + v.raw.size() + v.strs.size() + v.items.size();
      for (const auto& s : v.strs) sum += s.size();
    }
    for (const auto& t : g->tensors())
      for (size_t i = 0; i < t.nbytes; ++i) sum += t.data[i];
    volatile uint64_t sink = sum;
    (void)sink;
    return true;
  } catch (const bigmoe::Error&) {
    return false;
  } catch (const std::exception& e) {
    ADD_FAILURE() << what << ": non-bigmoe exception: " << e.what();
    return false;
  }
}

}  // namespace

using GgufRobust = TempDir;

TEST_F(GgufRobust, TruncatedAtEveryByte) {
  fs::path full = dir / "full.gguf", cut = dir / "cut.gguf";
  write_sample(full);
  std::vector<uint8_t> bytes = read_file(full);
  ASSERT_TRUE(open_and_touch(full, "full"));
  auto g = GgufFile::open(full);
  const size_t data_end = g->data_offset() + g->tensor("t.q4_k")->offset + 144;
  int ok = 0;
  for (size_t n = 0; n < bytes.size(); ++n) {
    write_file(cut, std::vector<uint8_t>(bytes.begin(), bytes.begin() + n));
    bool opened = open_and_touch(cut, "truncated to " + std::to_string(n));
    // Only the padding after the last tensor's data may be cut off.
    EXPECT_EQ(opened, n >= data_end) << "truncated to " << n << " of " << bytes.size();
    ok += opened;
  }
  std::printf("[          ] %zu truncations, %d opened (cut in trailing padding)\n", bytes.size(),
              ok);
}

TEST_F(GgufRobust, RandomCorruption) {
  fs::path full = dir / "full.gguf", bad = dir / "bad.gguf";
  write_sample(full);
  const std::vector<uint8_t> bytes = read_file(full);
  auto g = GgufFile::open(full);
  const size_t header_end = size_t(g->data_offset());
  std::mt19937 rng(42);
  int opened = 0, trials = 2000;
  for (int t = 0; t < trials; ++t) {
    std::vector<uint8_t> b = bytes;
    int flips = 1 + int(rng() % 4);
    for (int f = 0; f < flips; ++f) {
      size_t at = rng() % header_end;  // corrupt the header; the data section is opaque
      if (rng() % 2)
        b[at] ^= uint8_t(1u << (rng() % 8));
      else
        b[at] = uint8_t(rng());
    }
    write_file(bad, b);
    opened += open_and_touch(bad, "trial " + std::to_string(t));
  }
  std::printf("[          ] %d corrupted files, %d still opened\n", trials, opened);
}
