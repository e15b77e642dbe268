#include "model/synth.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "io/gguf_stream_writer.h"
#include "tensor/quant_act.h"
#include "util/error.h"

namespace bigmoe {

using namespace synth_detail;

uint64_t synth_detail::splitmix(uint64_t& s) {
  uint64_t z = (s += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

uint64_t synth_detail::tensor_seed(uint64_t seed, const std::string& name) {
  uint64_t h = 1469598103934665603ull;  // FNV-1a
  for (unsigned char c : name) h = (h ^ c) * 1099511628211ull;
  return seed * 0x9E3779B97F4A7C15ull ^ h;
}

void synth_detail::validate(const SynthOptions& o) {
  if (o.n_dense < 1) fail("synth: --dense must be >= 1 (layer 0 is dense in GLM-5; got {})", o.n_dense);
  if (o.n_moe < 0) fail("synth: --moe must be >= 0 (got {})", o.n_moe);
  if (o.n_experts < 1) fail("synth: --experts must be >= 1 (got {})", o.n_experts);
  if (o.vocab < 260) fail("synth: --vocab must be >= 260 (256 byte tokens, a merge, bos, eos; got {})", o.vocab);
  if (o.hidden < 256 || o.hidden % 256 != 0) fail("synth: --hidden must be a positive multiple of 256 (got {})", o.hidden);
  if (o.mtp && o.n_moe < 1) fail("synth: --mtp needs at least one MoE layer");
  if (o.format != SynthFormat::Gguf && o.format != SynthFormat::Fp8) fail("synth: unknown format {}", int(o.format));
  if (o.format == SynthFormat::Fp8 && o.shard_bytes < 1'000'000)
    fail("synth: the shard size must be at least 1 MB (got {} bytes)", o.shard_bytes);
}

void synth_detail::Progress::update(uint64_t n, const std::string& name, bool force) {
  done += n;
  if (!on) return;
  auto now = std::chrono::steady_clock::now();
  if (!force && now - last < std::chrono::milliseconds(200)) return;
  last = now;
  double frac = total ? double(done) / double(total) : 1.0;
  double secs = std::chrono::duration<double>(now - t0).count();
  int w = 30, fill = int(frac * w);
  std::string bar(size_t(fill), '#');
  bar.resize(size_t(w), ' ');
  std::fprintf(stderr, "\r[%s] %5.1f%% %7.2f/%.2f GB %6.1f MB/s %-36.36s", bar.c_str(), 100 * frac, done / 1e9,
               total / 1e9, secs > 0 ? done / 1e6 / secs : 0.0, name.c_str());
  if (force) std::fprintf(stderr, "\n");
  std::fflush(stderr);
}

SynthFormat parse_synth_format(const std::string& s) {
  if (s == "gguf") return SynthFormat::Gguf;
  if (s == "fp8") return SynthFormat::Fp8;
  fail("synth: --format must be gguf or fp8 (got '{}')", s);
}

namespace {

enum class Fill { Q8, Q4K, F32Const, F32Uniform };

struct Spec {
  std::string name;
  GgmlType type;
  std::vector<int64_t> ne;
  Fill fill;
  double gain = 1.0;  // Q8 / Q4K: target element std = gain / sqrt(fan_in); F32Const: value; F32Uniform: std
  double fan_in = 1.0;
};

// Uniform int in [-127, 127] has std sqrt((255^2 - 1) / 12).
constexpr double kQ8Std = 73.6111;
// Q4_K: sub-block scales sc uniform in [8, 31], mins m = sc and dmin = 7.5 d, so a weight is
// d * sc * (q - 7.5), q uniform in [0, 15]: std = d * rms(sc) * sqrt(255 / 12).
constexpr int kScLo = 8, kScHi = 31;

void fill_q8(uint8_t* out, size_t nblocks, uint64_t rng, float d) {
  uint16_t dh = f32_to_f16(d);
  for (size_t b = 0; b < nblocks; ++b) {
    uint8_t* p = out + b * 34;
    std::memcpy(p, &dh, 2);
    for (int k = 0; k < 32; k += 8) {
      uint64_t r = splitmix(rng);
      for (int j = 0; j < 8; ++j) {
        int8_t q = int8_t(uint8_t(r >> (8 * j)));
        if (q == -128) q = -127;
        p[2 + k + j] = uint8_t(q);
      }
    }
  }
}

void fill_q4k(uint8_t* out, size_t nblocks, uint64_t rng, float d) {
  uint16_t dh = f32_to_f16(d), mh = f32_to_f16(7.5f * d);
  for (size_t b = 0; b < nblocks; ++b) {
    uint8_t* p = out + b * 144;
    std::memcpy(p, &dh, 2);
    std::memcpy(p + 2, &mh, 2);
    uint64_t r = splitmix(rng);
    int sc[8];
    for (int j = 0; j < 8; ++j) sc[j] = kScLo + int(((r >> (8 * j)) & 0xFF) % (kScHi - kScLo + 1));
    uint8_t* s = p + 4;
    for (int j = 0; j < 4; ++j) {
      // mins equal the scales
      s[j] = uint8_t(sc[j] | ((sc[j + 4] >> 4) << 6));
      s[j + 4] = uint8_t(sc[j] | ((sc[j + 4] >> 4) << 6));
      s[j + 8] = uint8_t((sc[j + 4] & 15) | ((sc[j + 4] & 15) << 4));
    }
    for (int k = 0; k < 128; k += 8) {
      uint64_t q = splitmix(rng);
      std::memcpy(p + 16 + k, &q, 8);
    }
  }
}

double q4k_elem_std_per_d() {
  double s2 = 0;
  for (int s = kScLo; s <= kScHi; ++s) s2 += double(s) * s;
  s2 /= (kScHi - kScLo + 1);
  return std::sqrt(s2) * std::sqrt(255.0 / 12.0);
}

struct Plan {
  std::vector<Spec> specs;
  std::vector<bool> moe;  // per block
};

Plan make_plan(const SynthOptions& o) {
  const int d = o.hidden, V = o.vocab, E = o.n_experts;
  Plan P;
  auto q8 = [&](std::string n, std::vector<int64_t> ne, double gain = 1.0) {
    P.specs.push_back({std::move(n), GgmlType::Q8_0, ne, Fill::Q8, gain, double(ne[0])});
  };
  auto q4k = [&](std::string n, std::vector<int64_t> ne, double gain = 1.0) {
    P.specs.push_back({std::move(n), GgmlType::Q4_K, ne, Fill::Q4K, gain, double(ne[0])});
  };
  auto f32c = [&](std::string n, std::vector<int64_t> ne, double v) {
    P.specs.push_back({std::move(n), GgmlType::F32, ne, Fill::F32Const, v, 1.0});
  };
  auto f32u = [&](std::string n, std::vector<int64_t> ne, double std_) {
    P.specs.push_back({std::move(n), GgmlType::F32, ne, Fill::F32Uniform, std_, 1.0});
  };

  // Embedding rows of std ~1 (the first norm rescales anyway).
  P.specs.push_back({"token_embd.weight", GgmlType::Q8_0, {d, V}, Fill::Q8, 1.0, 1.0});
  const int L = o.n_dense + o.n_moe, nblk = L + (o.mtp ? 1 : 0);
  for (int i = 0; i < nblk; ++i) {
    const bool moe = i >= o.n_dense;
    P.moe.push_back(moe);
    std::string p = fmt::format("blk.{}.", i);
    f32c(p + "attn_norm.weight", {d}, 1.0);
    f32c(p + "ffn_norm.weight", {d}, 1.0);
    q8(p + "attn_q_a.weight", {d, kQLora});
    f32c(p + "attn_q_a_norm.weight", {kQLora}, 1.0);
    q8(p + "attn_q_b.weight", {kQLora, kHeads * (kNope + kRope)});
    q8(p + "attn_kv_a_mqa.weight", {d, kKvLora + kRope});
    f32c(p + "attn_kv_a_norm.weight", {kKvLora}, 1.0);
    // k_b element (i, r, h) multiplies latent r: fan-in kv_lora; v_b likewise.
    P.specs.push_back({p + "attn_k_b.weight", GgmlType::Q8_0, {kNope, kKvLora, kHeads}, Fill::Q8, 1.0, double(kKvLora)});
    q8(p + "attn_v_b.weight", {kKvLora, kV, kHeads});
    q8(p + "attn_output.weight", {kHeads * kV, d}, 0.5);
    q8(p + "indexer.attn_q_b.weight", {kQLora, kIdxHeads * kIdxDim});
    q8(p + "indexer.attn_k.weight", {d, kIdxDim});
    f32c(p + "indexer.k_norm.weight", {kIdxDim}, 1.0);
    f32c(p + "indexer.k_norm.bias", {kIdxDim}, 0.0);
    q8(p + "indexer.proj.weight", {d, kIdxHeads});
    if (!moe) {
      q8(p + "ffn_gate.weight", {d, kDenseWidth});
      q8(p + "ffn_up.weight", {d, kDenseWidth});
      q8(p + "ffn_down.weight", {kDenseWidth, d}, 0.5);
    } else {
      // Router: F32 as llama.cpp's converter keeps ffn_gate_inp.
      f32u(p + "ffn_gate_inp.weight", {d, E}, 1.0 / std::sqrt(double(d)));
      f32u(p + "exp_probs_b.bias", {E}, 0.01);
      q4k(p + "ffn_gate_exps.weight", {d, kExpertWidth, E});
      q4k(p + "ffn_up_exps.weight", {d, kExpertWidth, E});
      q4k(p + "ffn_down_exps.weight", {kExpertWidth, d, E}, 0.5);
      q8(p + "ffn_gate_shexp.weight", {d, kExpertWidth * kShared});
      q8(p + "ffn_up_shexp.weight", {d, kExpertWidth * kShared});
      q8(p + "ffn_down_shexp.weight", {kExpertWidth * kShared, d}, 0.5);
    }
    if (o.mtp && i == L) {
      q8(p + "nextn.eh_proj.weight", {2 * d, d});
      f32c(p + "nextn.enorm.weight", {d}, 1.0);
      f32c(p + "nextn.hnorm.weight", {d}, 1.0);
      f32c(p + "nextn.shared_head_norm.weight", {d}, 1.0);
    }
  }
  f32c("output_norm.weight", {d}, 1.0);
  q8("output.weight", {d, V});
  return P;
}

// GPT-2 byte-level alphabet: byte b -> one unicode code point, as UTF-8.
std::string byte_token(int b) {
  auto printable = [](int c) { return (c >= '!' && c <= '~') || (c >= 0xA1 && c <= 0xAC) || (c >= 0xAE && c <= 0xFF); };
  int cp = b;
  if (!printable(b)) {
    int n = 0;
    for (int c = 0; c < b; ++c) n += !printable(c);
    cp = 256 + n;
  }
  std::string s;
  if (cp < 0x80) {
    s += char(cp);
  } else {
    s += char(0xC0 | (cp >> 6));
    s += char(0x80 | (cp & 0x3F));
  }
  return s;
}

void add_metadata(GgufStreamWriter& w, const SynthOptions& o) {
  const std::string a = "glm-dsa.";
  const int L = o.n_dense + o.n_moe;
  w.add_str("general.architecture", "glm-dsa");
  w.add_str("general.name", fmt::format("bigmoe-synth-glm5.2-d{}-m{}-e{}{}", o.n_dense, o.n_moe, o.n_experts,
                                        o.mtp ? "-mtp" : ""));
  w.add_u32("general.file_type", 15);  // MOSTLY_Q4_K_M (experts Q4_K, rest Q8_0)
  w.add_u32("general.quantization_version", 2);
  w.add_u32(a + "block_count", uint32_t(L + (o.mtp ? 1 : 0)));
  w.add_u32(a + "context_length", kContext);
  w.add_u32(a + "embedding_length", uint32_t(o.hidden));
  w.add_u32(a + "feed_forward_length", kDenseWidth);
  w.add_u32(a + "attention.head_count", kHeads);
  w.add_u32(a + "attention.head_count_kv", 1);
  w.add_f32(a + "rope.freq_base", 1000000.0f);
  w.add_f32(a + "attention.layer_norm_rms_epsilon", 1e-5f);
  w.add_u32(a + "expert_count", uint32_t(o.n_experts));
  w.add_u32(a + "expert_used_count", uint32_t(std::min(kTopK, o.n_experts)));
  w.add_u32(a + "expert_group_count", 1);
  w.add_u32(a + "expert_group_used_count", 1);
  w.add_u32(a + "expert_gating_func", 2);
  w.add_u32(a + "leading_dense_block_count", uint32_t(o.n_dense));
  w.add_u32(a + "vocab_size", uint32_t(o.vocab));
  w.add_u32(a + "attention.q_lora_rank", kQLora);
  w.add_u32(a + "attention.kv_lora_rank", kKvLora);
  w.add_u32(a + "attention.key_length", kKvLora + kRope);
  w.add_u32(a + "attention.value_length", kKvLora);
  w.add_u32(a + "attention.key_length_mla", kNope + kRope);
  w.add_u32(a + "attention.value_length_mla", kV);
  w.add_u32(a + "expert_feed_forward_length", kExpertWidth);
  w.add_u32(a + "expert_shared_count", kShared);
  w.add_f32(a + "expert_weights_scale", 2.5f);
  w.add_bool(a + "expert_weights_norm", true);
  w.add_u32(a + "rope.dimension_count", kRope);
  w.add_u32(a + "nextn_predict_layers", o.mtp ? 1 : 0);
  w.add_u32(a + "attention.indexer.head_count", kIdxHeads);
  w.add_u32(a + "attention.indexer.key_length", kIdxDim);
  w.add_u32(a + "attention.indexer.top_k", kIdxTopK);
  w.add(a + "attention.indexer.types", GgufValue::make_bool_array(std::vector<bool>(size_t(L), true)));

  // Minimal byte-level gpt2 vocabulary: 256 byte tokens, "ĠĠ" (the one merge), fillers,
  // then bos and eos (control tokens).
  std::vector<std::string> toks;
  std::vector<int64_t> types;
  toks.reserve(size_t(o.vocab));
  for (int b = 0; b < 256; ++b) toks.push_back(byte_token(b)), types.push_back(1);
  const std::string G = byte_token(' ');
  toks.push_back(G + G), types.push_back(1);
  for (int i = 257; i < o.vocab - 2; ++i) toks.push_back(fmt::format("[syn{}]", i)), types.push_back(1);
  toks.push_back("<sop>"), types.push_back(3);
  toks.push_back("<|endoftext|>"), types.push_back(3);
  w.add_str("tokenizer.ggml.model", "gpt2");
  w.add_str("tokenizer.ggml.pre", "default");
  w.add("tokenizer.ggml.tokens", GgufValue::make_str_array(std::move(toks)));
  w.add("tokenizer.ggml.token_type", GgufValue::make_int_array(GgufType::INT32, types));
  w.add("tokenizer.ggml.merges", GgufValue::make_str_array({G + " " + G}));
  w.add_u32("tokenizer.ggml.bos_token_id", uint32_t(o.vocab - 2));
  w.add_u32("tokenizer.ggml.eos_token_id", uint32_t(o.vocab - 1));
  w.add_bool("tokenizer.ggml.add_bos_token", false);
}

void write_tensor(GgufStreamWriter& w, const Spec& s, uint64_t seed, size_t nbytes, Progress& prog) {
  const uint64_t tseed = tensor_seed(seed, s.name);
  if (s.type == GgmlType::F32) {
    size_t n = nbytes / 4;
    std::vector<float> v(n);
    uint64_t r = tseed;
    for (size_t k = 0; k < n; ++k) {
      if (s.fill == Fill::F32Const) {
        v[k] = float(s.gain);
      } else {  // uniform with the requested std
        double u = double(splitmix(r) >> 11) * (1.0 / 9007199254740992.0);
        v[k] = float((2 * u - 1) * std::sqrt(3.0) * s.gain);
      }
    }
    w.write(v.data(), nbytes);
    prog.update(nbytes, s.name);
    return;
  }
  const bool q4 = s.fill == Fill::Q4K;
  const size_t bsz = q4 ? 144 : 34;
  const size_t nblocks = nbytes / bsz;
  // Weight std = gain / sqrt(fan_in).
  const double target = s.gain / std::sqrt(s.fan_in);
  const float d = float(target / (q4 ? q4k_elem_std_per_d() : kQ8Std));
  constexpr size_t kChunkBlocks = 4096, kChunksPerBuf = 32;
  const size_t nchunks = (nblocks + kChunkBlocks - 1) / kChunkBlocks;
  std::vector<uint8_t> buf(kChunkBlocks * kChunksPerBuf * bsz);
  for (size_t c0 = 0; c0 < nchunks; c0 += kChunksPerBuf) {
    const size_t c1 = std::min(nchunks, c0 + kChunksPerBuf);
#pragma omp parallel for schedule(static)
    for (int64_t c = int64_t(c0); c < int64_t(c1); ++c) {
      size_t b0 = size_t(c) * kChunkBlocks, nb = std::min(kChunkBlocks, nblocks - b0);
      uint64_t r = tseed ^ (uint64_t(c) * 0xD1B54A32D192ED03ull);
      splitmix(r);
      uint8_t* out = buf.data() + (size_t(c) - c0) * kChunkBlocks * bsz;
      if (q4) fill_q4k(out, nb, r, d);
      else fill_q8(out, nb, r, d);
    }
    size_t bytes = (std::min(nblocks, c1 * kChunkBlocks) - c0 * kChunkBlocks) * bsz;
    w.write(buf.data(), bytes);
    prog.update(bytes, s.name);
  }
}

}  // namespace

uint64_t synth_data_bytes(const SynthOptions& o) {
  validate(o);
  if (o.format == SynthFormat::Fp8) return fp8_data_bytes(o);
  GgufStreamWriter w;
  for (const Spec& s : make_plan(o).specs) w.add_tensor(s.name, s.type, s.ne);
  return w.data_bytes();
}

void synth_glm_dsa(const SynthOptions& o, const std::filesystem::path& out) {
  validate(o);
  if (o.format == SynthFormat::Fp8) return write_fp8(o, out);
  if (std::filesystem::is_directory(out)) fail("synth: '{}' is a directory (--format gguf writes one file)", out.string());
  Plan P = make_plan(o);
  GgufStreamWriter w;
  add_metadata(w, o);
  std::vector<size_t> sizes;
  for (const Spec& s : P.specs) sizes.push_back(w.add_tensor(s.name, s.type, s.ne));
  Progress prog{o.progress, w.data_bytes()};
  w.begin(out);
  for (size_t i = 0; i < P.specs.size(); ++i) write_tensor(w, P.specs[i], o.seed, sizes[i], prog);
  w.finish();
  prog.done = prog.total;
  prog.update(0, "done", true);
}

}  // namespace bigmoe
