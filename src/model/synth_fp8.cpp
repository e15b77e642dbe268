// `bigmoe synth --format fp8`: a GLM-5.2-shaped checkpoint directory laid out as the official
// FP8 release (synth.h has the dtypes and magnitudes). The writing streams:
//   1. plan the tensor list in HF names (exactly those GlmDsaModel::load reads), each with its
//      dtype, shape and how its bytes are drawn;
//   2. pack it into shards in order, a weight and its weight_scale_inv always together;
//   3. per shard: the JSON header, with data_offsets computed from the shapes, then each
//      tensor's bytes, generated 1 MiB chunk by chunk (OpenMP over 32 chunks at a time, each
//      chunk its own random stream, so the bytes depend on neither buffering nor thread count);
//   4. model.safetensors.index.json and config.json last, so a run cut short leaves no
//      loadable checkpoint behind.
// FP8 elements are drawn from a 256-entry table of e4m3 codes, the quantiles of a normal with
// std 448/3 (so the extremes sit near e4m3's max of 448, as a real block-quantized weight);
// each 128x128 block's weight_scale_inv is base × U[0.75, 1.25), base chosen so that the weight's
// std is gain / sqrt(fan_in) exactly in expectation.
#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <set>
#include <string>
#include <vector>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "model/synth.h"
#include "tensor/dtype.h"
#include "util/error.h"

namespace bigmoe {

using namespace synth_detail;
namespace fs = std::filesystem;
using ojson = nlohmann::ordered_json;

namespace {

constexpr int kBlock = 128;                    // weight_block_size [128, 128]
constexpr size_t kChunk = size_t(1) << 20;     // bytes per random stream (a multiple of 8)
constexpr size_t kChunksPerBuf = 32;
constexpr double kScaleMeanSq = 49.0 / 48.0;   // E[f²] for f ~ U[0.75, 1.25)

enum class Fill { Fp8, Scale, Bf16Const, Bf16Uniform, F32Uniform };

struct Tensor {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
  Fill fill;
  double value = 0;        // Scale: base block scale; Bf16Const: the value; *Uniform: std
  bool with_prev = false;  // a weight_scale_inv: kept in its weight's shard
  uint64_t nbytes() const {
    uint64_t n = dtype_size(dtype);
    for (int64_t d : shape) n *= uint64_t(d);
    return n;
  }
};

struct Fp8Table {
  uint8_t code[256];
  double rms;  // of the decoded table values
};

const Fp8Table& fp8_table() {
  static const Fp8Table t = [] {
    Fp8Table t{};
    std::vector<std::pair<float, uint8_t>> codes;
    for (int c = 0; c < 256; ++c)
      if ((c & 0x7F) != 0x7F) codes.push_back({f8e4m3_to_f32(uint8_t(c)), uint8_t(c)});  // skip NaNs
    double s2 = 0;
    for (int k = 0; k < 256; ++k) {
      // z = Φ⁻¹((k + 0.5) / 256) by bisection.
      double u = (k + 0.5) / 256, lo = -10, hi = 10;
      for (int it = 0; it < 100; ++it) {
        double mid = 0.5 * (lo + hi);
        (0.5 * std::erfc(-mid / std::sqrt(2.0)) < u ? lo : hi) = mid;
      }
      double x = 0.5 * (lo + hi) * (448.0 / 3.0);
      auto best = codes.front();
      for (auto& c : codes)
        if (std::abs(c.first - x) < std::abs(best.first - x)) best = c;
      t.code[k] = best.second;
      s2 += double(best.first) * best.first;
    }
    t.rms = std::sqrt(s2 / 256);
    return t;
  }();
  return t;
}

double uniform01(uint64_t& r) { return double(splitmix(r) >> 11) * (1.0 / 9007199254740992.0); }

// Bytes [chunk * kChunk, chunk * kChunk + n) of tensor t.
void fill_chunk(const Tensor& t, uint64_t tseed, uint64_t chunk, uint8_t* out, size_t n) {
  uint64_t r = tseed ^ (chunk * 0xD1B54A32D192ED03ull);
  splitmix(r);
  switch (t.fill) {
    case Fill::Fp8: {
      const uint8_t* code = fp8_table().code;
      for (size_t k = 0; k < n; k += 8) {
        uint64_t x = splitmix(r);
        size_t m = std::min<size_t>(8, n - k);
        for (size_t j = 0; j < m; ++j) out[k + j] = code[(x >> (8 * j)) & 0xFF];
      }
      break;
    }
    case Fill::Scale: case Fill::F32Uniform:
      for (size_t k = 0; k < n; k += 4) {
        double u = uniform01(r);
        float v = float(t.fill == Fill::Scale ? t.value * (0.75 + 0.5 * u) : (2 * u - 1) * std::sqrt(3.0) * t.value);
        std::memcpy(out + k, &v, 4);
      }
      break;
    case Fill::Bf16Const: case Fill::Bf16Uniform:
      for (size_t k = 0; k < n; k += 2) {
        float v = float(t.fill == Fill::Bf16Const ? t.value : (2 * uniform01(r) - 1) * std::sqrt(3.0) * t.value);
        uint16_t h = f32_to_bf16(v);
        std::memcpy(out + k, &h, 2);
      }
      break;
  }
}

// Which layers run their own DSA indexer: GLM-5.2's schedule (index_topk_freq 4,
// index_skip_topk_offset 3), as transformers derives indexer_types from it.
constexpr int kIdxFreq = 4, kIdxOffset = 3;
bool indexer_full(int i) { return std::max(i - kIdxOffset + 1, 0) % kIdxFreq == 0; }

std::vector<Tensor> make_plan(const SynthOptions& o) {
  const int d = o.hidden, V = o.vocab, E = o.n_experts, L = o.n_dense + o.n_moe;
  std::vector<Tensor> T;
  auto linear = [&](const std::string& p, int out, int in, double gain = 1.0) {
    T.push_back({p + ".weight", DType::F8_E4M3, {out, in}, Fill::Fp8});
    double base = gain / std::sqrt(double(in)) / (fp8_table().rms * std::sqrt(kScaleMeanSq));
    T.push_back({p + ".weight_scale_inv", DType::F32, {(out + kBlock - 1) / kBlock, (in + kBlock - 1) / kBlock},
                 Fill::Scale, base, true});
  };
  auto norm = [&](const std::string& n, int len, double v = 1.0) {
    T.push_back({n, DType::BF16, {len}, Fill::Bf16Const, v});
  };

  T.push_back({"model.embed_tokens.weight", DType::BF16, {V, d}, Fill::Bf16Uniform, 1.0});
  for (int i = 0; i < L + (o.mtp ? 1 : 0); ++i) {
    const std::string p = fmt::format("model.layers.{}.", i), a = p + "self_attn.", m = p + "mlp.";
    const bool mtp = i == L;
    if (mtp) {
      linear(p + "eh_proj", d, 2 * d);
      norm(p + "enorm.weight", d);
      norm(p + "hnorm.weight", d);
      norm(p + "shared_head.norm.weight", d);
    }
    norm(p + "input_layernorm.weight", d);
    norm(p + "post_attention_layernorm.weight", d);
    linear(a + "q_a_proj", kQLora, d);
    norm(a + "q_a_layernorm.weight", kQLora);
    linear(a + "q_b_proj", kHeads * (kNope + kRope), kQLora);
    linear(a + "kv_a_proj_with_mqa", kKvLora + kRope, d);
    norm(a + "kv_a_layernorm.weight", kKvLora);
    linear(a + "kv_b_proj", kHeads * (kNope + kV), kKvLora);
    linear(a + "o_proj", d, kHeads * kV, 0.5);
    if (mtp || indexer_full(i)) {  // shared layers have no indexer (transformers' GlmMoeDsaAttention)
      const std::string x = a + "indexer.";
      linear(x + "wq_b", kIdxHeads * kIdxDim, kQLora);
      linear(x + "wk", kIdxDim, d);
      norm(x + "k_norm.weight", kIdxDim);
      norm(x + "k_norm.bias", kIdxDim, 0.0);
      linear(x + "weights_proj", kIdxHeads, d);
    }
    if (i < o.n_dense) {
      linear(m + "gate_proj", kDenseWidth, d);
      linear(m + "up_proj", kDenseWidth, d);
      linear(m + "down_proj", d, kDenseWidth, 0.5);
      continue;
    }
    T.push_back({m + "gate.weight", DType::BF16, {E, d}, Fill::Bf16Uniform, 1.0 / std::sqrt(double(d))});
    T.push_back({m + "gate.e_score_correction_bias", DType::F32, {E}, Fill::F32Uniform, 0.01});
    for (int e = 0; e < E; ++e) {
      const std::string x = fmt::format("{}experts.{}.", m, e);
      linear(x + "gate_proj", kExpertWidth, d);
      linear(x + "up_proj", kExpertWidth, d);
      linear(x + "down_proj", d, kExpertWidth, 0.5);
    }
    linear(m + "shared_experts.gate_proj", kExpertWidth * kShared, d);
    linear(m + "shared_experts.up_proj", kExpertWidth * kShared, d);
    linear(m + "shared_experts.down_proj", d, kExpertWidth * kShared, 0.5);
  }
  norm("model.norm.weight", d);
  T.push_back({"lm_head.weight", DType::BF16, {V, d}, Fill::Bf16Uniform, 1.0 / std::sqrt(double(d))});
  return T;
}

struct Shard {
  std::string file;
  size_t begin = 0, end = 0;  // tensor index range
  uint64_t bytes = 0;
};

std::vector<Shard> pack(const std::vector<Tensor>& T, uint64_t max_bytes) {
  std::vector<Shard> S;
  for (size_t i = 0; i < T.size();) {
    size_t j = i + 1;
    uint64_t g = T[i].nbytes();
    for (; j < T.size() && T[j].with_prev; ++j) g += T[j].nbytes();
    if (S.empty() || (S.back().bytes > 0 && S.back().bytes + g > max_bytes)) S.push_back({"", i, i, 0});
    S.back().end = j;
    S.back().bytes += g;
    i = j;
  }
  for (size_t k = 0; k < S.size(); ++k) S[k].file = fmt::format("model-{:05d}-of-{:05d}.safetensors", k + 1, S.size());
  return S;
}

// The shard's header JSON, padded with spaces to a multiple of 8 bytes (as safetensors does).
std::string shard_header(const std::vector<Tensor>& T, const Shard& s) {
  ojson h;
  h["__metadata__"] = ojson{{"format", "pt"}};
  uint64_t off = 0;
  for (size_t i = s.begin; i < s.end; ++i) {
    ojson e;
    e["dtype"] = dtype_name(T[i].dtype);
    e["shape"] = T[i].shape;
    e["data_offsets"] = ojson::array({off, off + T[i].nbytes()});
    h[T[i].name] = std::move(e);
    off += T[i].nbytes();
  }
  std::string j = h.dump();
  j.resize((j.size() + 7) / 8 * 8, ' ');
  return j;
}

ojson make_config(const SynthOptions& o) {
  const int L = o.n_dense + o.n_moe;
  std::vector<std::string> mlp, idx;
  for (int i = 0; i < L; ++i) {
    mlp.push_back(i < o.n_dense ? "dense" : "sparse");
    idx.push_back(indexer_full(i) ? "full" : "shared");
  }
  ojson c;
  c["architectures"] = ojson::array({"GlmMoeDsaForCausalLM"});
  c["model_type"] = "glm_moe_dsa";
  c["vocab_size"] = o.vocab;
  c["hidden_size"] = o.hidden;
  c["num_hidden_layers"] = L;
  c["first_k_dense_replace"] = o.n_dense;
  c["mlp_layer_types"] = mlp;
  c["intermediate_size"] = kDenseWidth;
  c["moe_intermediate_size"] = kExpertWidth;
  c["n_routed_experts"] = o.n_experts;
  c["num_experts_per_tok"] = std::min(kTopK, o.n_experts);
  c["n_shared_experts"] = kShared;
  c["n_group"] = 1;
  c["topk_group"] = 1;
  c["routed_scaling_factor"] = 2.5;
  c["norm_topk_prob"] = true;
  c["num_attention_heads"] = kHeads;
  c["num_key_value_heads"] = kHeads;
  c["q_lora_rank"] = kQLora;
  c["kv_lora_rank"] = kKvLora;
  c["qk_nope_head_dim"] = kNope;
  c["qk_rope_head_dim"] = kRope;
  c["v_head_dim"] = kV;
  c["index_n_heads"] = kIdxHeads;
  c["index_head_dim"] = kIdxDim;
  c["index_topk"] = kIdxTopK;
  c["index_topk_freq"] = kIdxFreq;
  c["index_skip_topk_offset"] = kIdxOffset;
  c["indexer_types"] = idx;
  c["hidden_act"] = "silu";
  c["attention_bias"] = false;
  c["rope_theta"] = 1000000.0;
  c["rms_norm_eps"] = 1e-5;
  c["num_nextn_predict_layers"] = o.mtp ? 1 : 0;
  c["max_position_embeddings"] = kContext;
  c["tie_word_embeddings"] = false;
  c["torch_dtype"] = "bfloat16";
  c["quantization_config"] = ojson{{"quant_method", "fp8"},
                                   {"fmt", "e4m3"},
                                   {"activation_scheme", "dynamic"},
                                   {"weight_block_size", {kBlock, kBlock}}};
  return c;
}

class File {
 public:
  explicit File(fs::path p) : path_(std::move(p)), f_(std::fopen(path_.c_str(), "wb")) {
    if (!f_) fail("synth: cannot create '{}': {}", path_.string(), std::strerror(errno));
  }
  ~File() {
    if (f_) std::fclose(f_);
  }
  File(const File&) = delete;
  File& operator=(const File&) = delete;
  void write(const void* p, size_t n) {
    if (n && std::fwrite(p, 1, n, f_) != n) fail("synth: writing '{}': {}", path_.string(), std::strerror(errno));
  }
  void close() {
    std::FILE* f = f_;
    f_ = nullptr;
    if (std::fclose(f) != 0) fail("synth: writing '{}': {}", path_.string(), std::strerror(errno));
  }

 private:
  fs::path path_;
  std::FILE* f_;
};

void write_text(const fs::path& p, const std::string& s) {
  File f(p);
  f.write(s.data(), s.size());
  f.close();
}

void write_tensor(File& f, const Tensor& t, uint64_t seed, std::vector<uint8_t>& buf, Progress& prog) {
  const uint64_t tseed = tensor_seed(seed, t.name), n = t.nbytes();
  const uint64_t nchunks = (n + kChunk - 1) / kChunk;
  for (uint64_t c0 = 0; c0 < nchunks; c0 += kChunksPerBuf) {
    const uint64_t c1 = std::min<uint64_t>(nchunks, c0 + kChunksPerBuf);
#pragma omp parallel for schedule(static)
    for (int64_t c = int64_t(c0); c < int64_t(c1); ++c) {
      uint64_t b0 = uint64_t(c) * kChunk;
      fill_chunk(t, tseed, uint64_t(c), buf.data() + (b0 - c0 * kChunk), size_t(std::min<uint64_t>(kChunk, n - b0)));
    }
    size_t bytes = size_t(std::min(n, c1 * kChunk) - c0 * kChunk);
    f.write(buf.data(), bytes);
    prog.update(bytes, t.name);
  }
}

}  // namespace

uint64_t synth_detail::fp8_data_bytes(const SynthOptions& o) {
  uint64_t n = 0;
  for (const Tensor& t : make_plan(o)) n += t.nbytes();
  return n;
}

void synth_detail::write_fp8(const SynthOptions& o, const fs::path& dir) {
  const std::vector<Tensor> T = make_plan(o);
  const std::vector<Shard> S = pack(T, o.shard_bytes);

  std::error_code ec;
  if (fs::exists(dir, ec) && !fs::is_directory(dir, ec))
    fail("synth: '{}' exists and is not a directory (--format fp8 writes a checkpoint directory)", dir.string());
  fs::create_directories(dir, ec);
  if (ec) fail("synth: cannot create directory '{}': {}", dir.string(), ec.message());
  // Another checkpoint's shards would be mixed with ours (a directory without the index is read
  // as all its *.safetensors): refuse rather than delete files we did not write.
  std::set<std::string> ours;
  for (const Shard& s : S) ours.insert(s.file);
  for (const auto& e : fs::directory_iterator(dir))
    if (e.path().extension() == ".safetensors" && !ours.count(e.path().filename().string()))
      fail("synth: '{}' already holds '{}', which this checkpoint would not overwrite; remove it or choose another "
           "directory", dir.string(), e.path().filename().string());
  fs::remove(dir / "model.safetensors.index.json", ec);
  fs::remove(dir / "config.json", ec);

  uint64_t total = 0;
  for (const Shard& s : S) total += s.bytes;
  Progress prog{o.progress, total};
  std::vector<uint8_t> buf(kChunk * kChunksPerBuf);
  ojson weight_map = ojson::object();
  for (const Shard& s : S) {
    File f(dir / s.file);
    const std::string h = shard_header(T, s);
    uint8_t len[8];
    for (int k = 0; k < 8; ++k) len[k] = uint8_t(uint64_t(h.size()) >> (8 * k));
    f.write(len, 8);
    f.write(h.data(), h.size());
    for (size_t i = s.begin; i < s.end; ++i) {
      write_tensor(f, T[i], o.seed, buf, prog);
      weight_map[T[i].name] = s.file;
    }
    f.close();
  }

  ojson index;
  index["metadata"] = ojson{{"total_size", total}};
  index["weight_map"] = std::move(weight_map);
  write_text(dir / "model.safetensors.index.json", index.dump(2) + "\n");
  write_text(dir / "config.json", make_config(o).dump(2) + "\n");
  prog.done = prog.total;
  prog.update(0, "done", true);
}

}  // namespace bigmoe
