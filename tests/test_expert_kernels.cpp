// CPU expert kernels (backend/cpu/expert_kernels.h) and their thread pool.
//
// Every weight format runs on every instruction set this CPU has (the others are skipped, and
// the test log says which ran), against the float reference — the exact dot of the rows that
// Linear::row / dequantize_row_ref give with the float activations — on fresh random weights
// and inputs. The tolerance is derived, not picked: the int8 activations move each x_i by at
// most e_i = c·d_block (c from the rounding, see act_err), so the result moves by Σ|w_i|·e_i;
// float accumulation adds at most γ_n·Σ|w_i|·(|x_i| + e_i) (n = the longest chain of roundings
// in any kernel). SIMD kernels are also checked against the scalar kernel on the same packed
// layout, where only the float term remains. The whole expert FFN is checked with the same
// bounds carried through silu(g)·u and the down projection.
//
// The AMX tile kernels form the AVX2 kernels' integers and float operations, so they are held
// to those bit for bit; their emulation (expert_kernels_amx.h) runs everywhere, the hardware
// only on AMX machines, where it must also match the emulation bit for bit.
#include <gtest/gtest.h>
#include <sched.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "backend/cpu/expert_kernels.h"
#include "backend/cpu/expert_kernels_amx.h"
#include "backend/cpu/ref_ops.h"
#include "backend/cpu/thread_pool.h"
#include "tensor/dtype.h"
#include "tensor/quant.h"
#include "tensor/quant_act.h"
#include "util/error.h"

namespace bigmoe::cpu {

// Test names and failure messages print the enums by name (found by ADL, so outside the
// anonymous namespace).
void PrintTo(ExpertFormat f, std::ostream* os) { *os << expert_format_name(f); }
void PrintTo(CpuIsa i, std::ostream* os) { *os << cpu_isa_name(i); }

namespace {

constexpr double kU = 1.0 / (1 << 24);  // unit roundoff of float32

const CpuIsa kIsas[] = {CpuIsa::Scalar, CpuIsa::AVX2, CpuIsa::AVX512, CpuIsa::AMX};
const ExpertFormat kFormats[] = {ExpertFormat::Q4_K, ExpertFormat::Q8_0, ExpertFormat::FP8, ExpertFormat::BF16};

std::mt19937& rng() {
  static std::mt19937 r(std::random_device{}());
  return r;
}

// A random source matrix in one format, the storage its Linear points into, and its rows as the
// reference sees them. Not movable (the Linear points into it).
struct Src {
  ExpertFormat fmt{};
  int out = 0, in = 0;
  std::vector<uint8_t> data, sdata;
  GgufTensorInfo g;
  TensorView w, s;
  Linear lin;
  std::vector<float> rows;   // [out, in] from Linear::row
  std::vector<double> wmag;  // [out, in]: Σ of |terms| a kernel forms for each weight (see below)
  Src() = default;
  Src(const Src&) = delete;
};

struct SrcOpts {
  bool bf16_gguf = false;    // BF16 from a GGUF tensor instead of a checkpoint
  DType scale_dtype = DType::F32;
  int bo = 128, bi = 128;    // FP8 scale blocks
};

void put_half(uint8_t* p, float v) {
  uint16_t h = f32_to_f16(v);
  std::memcpy(p, &h, 2);
}

float rand_sign(float v) { return std::uniform_int_distribution<int>(0, 1)(rng()) ? v : -v; }

std::unique_ptr<Src> make_src(ExpertFormat fmt, int out, int in, const SrcOpts& o = {}) {
  auto m = std::make_unique<Src>();
  m->fmt = fmt;
  m->out = out;
  m->in = in;
  std::uniform_int_distribution<int> byte(0, 255);
  std::uniform_real_distribution<float> mag(0.25f, 1.0f);
  auto gguf = [&](GgmlType t) {
    m->g.name = "blk.0.ffn_test.weight";
    m->g.type = t;
    m->g.ne = {in, out};
    m->g.data = m->data.data();
    m->g.nbytes = m->data.size();
    m->lin = Linear::from_gguf(m->g, "test.gguf");
  };
  switch (fmt) {
    case ExpertFormat::Q4_K: {
      m->data.resize(size_t(out) * (in / 256) * 144);
      for (auto& b : m->data) b = uint8_t(byte(rng()));
      for (size_t b = 0; b < m->data.size(); b += 144) {
        put_half(&m->data[b], rand_sign(4e-4f * mag(rng())));
        put_half(&m->data[b + 2], rand_sign(4e-4f * mag(rng())));
      }
      gguf(GgmlType::Q4_K);
      break;
    }
    case ExpertFormat::Q8_0: {
      m->data.resize(size_t(out) * (in / 32) * 34);
      for (auto& b : m->data) b = uint8_t(byte(rng()));  // includes q = -128
      for (size_t b = 0; b < m->data.size(); b += 34) put_half(&m->data[b], rand_sign(4e-4f * mag(rng())));
      gguf(GgmlType::Q8_0);
      break;
    }
    case ExpertFormat::BF16: {
      m->data.resize(size_t(out) * in * 2);
      std::normal_distribution<float> nd(0.f, 0.05f);
      for (size_t i = 0; i < m->data.size(); i += 2) {
        uint16_t h = f32_to_bf16(nd(rng()));
        std::memcpy(&m->data[i], &h, 2);
      }
      if (o.bf16_gguf) {
        gguf(GgmlType::BF16);
      } else {
        m->w = TensorView{"w", DType::BF16, {out, in}, m->data.data(), m->data.size(), "test.safetensors"};
        m->lin.w = &m->w;
        m->lin.out = out;
        m->lin.in = in;
      }
      break;
    }
    case ExpertFormat::FP8: {
      m->data.resize(size_t(out) * in);
      for (auto& b : m->data) {
        do b = uint8_t(byte(rng()));
        while ((b & 0x7f) == 0x7f);  // no NaN encodings
      }
      const int sr = (out + o.bo - 1) / o.bo, sc = (in + o.bi - 1) / o.bi;
      const size_t es = dtype_size(o.scale_dtype);
      m->sdata.resize(size_t(sr) * sc * es);
      for (size_t i = 0; i < size_t(sr) * sc; ++i) {
        float v = 2e-4f * mag(rng());
        if (o.scale_dtype == DType::BF16) {
          uint16_t h = f32_to_bf16(v);
          std::memcpy(&m->sdata[i * 2], &h, 2);
        } else {
          std::memcpy(&m->sdata[i * 4], &v, 4);
        }
      }
      m->w = TensorView{"w", DType::F8_E4M3, {out, in}, m->data.data(), m->data.size(), "test.safetensors"};
      m->s = TensorView{"w_scale_inv", o.scale_dtype, {sr, sc}, m->sdata.data(), m->sdata.size(), "test.safetensors"};
      m->lin.w = &m->w;
      m->lin.scale = &m->s;
      m->lin.out = out;
      m->lin.in = in;
      m->lin.bo = o.bo;
      m->lin.bi = o.bi;
      break;
    }
  }
  m->rows.resize(size_t(out) * in);
  m->wmag.resize(size_t(out) * in);
  for (int r = 0; r < out; ++r) {
    float* row = &m->rows[size_t(r) * in];
    m->lin.row(r, row);
    for (int i = 0; i < in; ++i) m->wmag[size_t(r) * in + i] = std::abs(double(row[i]));
    if (fmt == ExpertFormat::Q4_K) {
      // The Q4_K kernels form d·sc·Σq·a and dmin·m·Σa separately: their float error scales
      // with |d·sc·q| + |dmin·m|, which can far exceed |w| when the two nearly cancel.
      const uint8_t* b = m->data.data() + size_t(r) * (in / 256) * 144;
      for (int i = 0; i < in; ++i) {
        const uint8_t* blk = b + (i / 256) * 144;
        const uint8_t* s = blk + 4;
        const int j = (i % 256) / 32;
        int sc, mn;
        if (j < 4) sc = s[j] & 63, mn = s[j + 4] & 63;
        else sc = (s[j + 4] & 15) | ((s[j - 4] >> 6) << 4), mn = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
        uint16_t hd, hm;
        std::memcpy(&hd, blk, 2);
        std::memcpy(&hm, blk + 2, 2);
        const int q = (blk[16 + 32 * (j / 2) + i % 32] >> (4 * (j % 2))) & 15;
        m->wmag[size_t(r) * in + i] = std::abs(double(f16_to_f32(hd)) * sc * q) + std::abs(double(f16_to_f32(hm)) * mn);
      }
    }
  }
  return m;
}

// Bound on |x̂_i − x_i| for the int8 activations of a block with largest |x| = amax.
//  Q8K (Q4_K): x̂ = q·d̃, d̃ = fl(amax/127), q = rne(fl(x·fl(127/amax))): |q − x·127/amax| ≤
//    0.5 + 127·2u, and |q|·|d̃ − d| ≤ 127·u·d, so e ≤ (0.5 + 381u)·d with d = amax/127.
//  Q8_0: d̃ is further rounded to f16 (2^-11 relative, or 2^-25 absolute below f16's normal
//    range): e ≤ (0.5 + 381u + 127·2^-11)·d + 127·2^-25.
double act_err(ExpertFormat f, double amax) {
  const double d = amax / 127.0;
  switch (f) {
    case ExpertFormat::Q4_K: return (0.5 + 381 * kU) * d;
    case ExpertFormat::Q8_0: return (0.5 + 381 * kU + 127 * std::ldexp(1.0, -11)) * d + 127 * std::ldexp(1.0, -25);
    default: return 0;
  }
}
int act_block(ExpertFormat f) { return f == ExpertFormat::Q4_K ? 256 : f == ExpertFormat::Q8_0 ? 32 : 1; }

// Longest chain of float roundings behind one output (over all ISAs): accumulation across
// blocks (Q4_K: two per 256-block; Q8_0: one per 32-block; float formats: in/8 per AVX2 lane),
// the final horizontal sums, int32 → float conversions and scale products.
double gamma_for(ExpertFormat f, int in) {
  double n = 0;
  switch (f) {
    case ExpertFormat::Q4_K: n = 2.0 * (in / 256) + 10; break;
    case ExpertFormat::Q8_0: n = in / 32 + 10; break;
    default: n = in / 8 + 10; break;
  }
  return n * kU / (1 - n * kU);
}

// Exact value and error bound of W[o]·x for activations with |x_i| <= xabs[i] (xabs = |x| for a
// known x; an upper bound when x itself carries error).
struct RowRef {
  double val = 0, act = 0, flt = 0;  // exact dot, activation-rounding bound, float bound
  double bound() const { return act + flt; }
};
RowRef row_ref(const Src& m, int o, const double* x, const double* xabs) {
  RowRef r;
  const int bs = act_block(m.fmt);
  double mag = 0;
  for (int b0 = 0; b0 < m.in; b0 += bs) {
    double amax = 0;
    for (int i = b0; i < b0 + bs; ++i) amax = std::max(amax, xabs[i]);
    const double e = act_err(m.fmt, amax);
    for (int i = b0; i < b0 + bs; ++i) {
      const double w = m.rows[size_t(o) * m.in + i];
      r.val += w * x[i];
      r.act += std::abs(w) * e;
      mag += m.wmag[size_t(o) * m.in + i] * (xabs[i] + e);
    }
  }
  // + 3u·mag: the reference's own float rounding of each weight (fl(fl(d·sc)·q) − fl(dmin·m)),
  // which the integer kernels do not share.
  r.flt = (gamma_for(m.fmt, m.in) + 3 * kU) * mag;
  return r;
}

std::vector<float> random_x(int T, int n, float scale = 1.0f) {
  std::normal_distribution<float> nd(0.f, 1.f);
  std::vector<float> x(size_t(T) * n);
  for (auto& v : x) v = scale * nd(rng()) * (nd(rng()) > 2.f ? 8.f : 1.f);  // a few outliers
  return x;
}

uint32_t bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

std::string param_name(ExpertFormat f, CpuIsa i) { return std::string(expert_format_name(f)) + "_" + cpu_isa_name(i); }

#define SKIP_IF_UNSUPPORTED(isa)                                                                          \
  do {                                                                                                    \
    if (!cpu_isa_supported(isa))                                                                          \
      GTEST_SKIP() << "this CPU lacks " << cpu_isa_name(isa) << " (best: " << cpu_isa_name(cpu_isa_best()) \
                   << ")";                                                                                \
  } while (0)

// ---- one matrix ----

class PackedLinear : public ::testing::TestWithParam<std::tuple<ExpertFormat, CpuIsa>> {};

struct Shape {
  int out, in;
  SrcOpts o;
};
std::vector<Shape> shapes_for(ExpertFormat f) {
  switch (f) {
    case ExpertFormat::Q4_K: return {{37, 256, {}}, {64, 512, {}}, {13, 768, {}}};
    case ExpertFormat::Q8_0: return {{37, 96, {}}, {29, 160, {}}, {8, 32, {}}};
    case ExpertFormat::FP8: {
      SrcOpts small;
      small.bo = 4, small.bi = 32, small.scale_dtype = DType::BF16;
      return {{37, 144, {}}, {130, 256, {}}, {23, 96, small}};
    }
    case ExpertFormat::BF16: {
      SrcOpts gg;
      gg.bf16_gguf = true;
      return {{37, 48, {}}, {19, 160, gg}, {4, 16, {}}};
    }
  }
  return {};
}

TEST_P(PackedLinear, MatchesReference) {
  const auto [fmt, isa] = GetParam();
  SKIP_IF_UNSUPPORTED(isa);
  RecordProperty("kernel", param_name(fmt, isa));
  ThreadPool pool1(1, -1, false);
  // Other worker counts (pinned and not; fewer and more than the CPUs) must give the same bits.
  std::set<int> counts = {2, 3, 5, 16, std::min(64, int(allowed_cpus().size()) + 1)};
  std::vector<std::unique_ptr<ThreadPool>> pools;
  for (int n : counts) pools.push_back(std::make_unique<ThreadPool>(n, -1, n % 2 == 0));
  for (const Shape& sh : shapes_for(fmt)) {
    auto src = make_src(fmt, sh.out, sh.in, sh.o);
    PackedMatrix W = PackedMatrix::pack(src->lin);
    for (int T : {1, 2, 3, 4, 5, 7, 16}) {
      SCOPED_TRACE(::testing::Message() << param_name(fmt, isa) << " [" << sh.out << ", " << sh.in << "] T=" << T);
      std::vector<float> x = random_x(T, sh.in);
      std::vector<float> y(size_t(T) * sh.out, NAN), ys(size_t(T) * sh.out, NAN);
      packed_linear(W, x.data(), T, y.data(), pool1, isa);
      packed_linear(W, x.data(), T, ys.data(), pool1, CpuIsa::Scalar);
      for (auto& p : pools) {
        std::vector<float> yn(y.size(), NAN);
        packed_linear(W, x.data(), T, yn.data(), *p, isa);
        for (size_t k = 0; k < y.size(); ++k)
          ASSERT_EQ(bits(y[k]), bits(yn[k])) << p->size() << " threads changed output " << k;
      }
      for (int t = 0; t < T; ++t) {
        std::vector<double> xd(x.begin() + size_t(t) * sh.in, x.begin() + size_t(t + 1) * sh.in), xa(xd);
        for (auto& v : xa) v = std::abs(v);
        for (int o = 0; o < sh.out; ++o) {
          const size_t k = size_t(t) * sh.out + o;
          const RowRef ref = row_ref(*src, o, xd.data(), xa.data());
          ASSERT_LE(std::abs(y[k] - ref.val), ref.bound()) << "row " << o << " token " << t << ": " << y[k] << " vs " << ref.val;
          // Same quantized activations: only float rounding separates the SIMD and scalar kernels.
          ASSERT_LE(std::abs(double(y[k]) - ys[k]), ref.flt) << "row " << o << " token " << t << " vs scalar";
        }
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(CpuExperts, PackedLinear, ::testing::Combine(::testing::ValuesIn(kFormats), ::testing::ValuesIn(kIsas)),
                         [](const auto& info) { return param_name(std::get<0>(info.param), std::get<1>(info.param)); });

// Q8_0 quantizes activations exactly as cpu::linear does (quant_act.h), so against the
// project's reference op only float rounding remains: both sum the same integer block dots in
// float, each within row_ref's float term.
TEST(PackedLinearQ8_0, MatchesCpuLinear) {
  auto src = make_src(ExpertFormat::Q8_0, 45, 192);
  PackedMatrix W = PackedMatrix::pack(src->lin);
  ThreadPool pool(2, -1, false);
  const int T = 6;
  std::vector<float> x = random_x(T, 192), want(size_t(T) * 45);
  linear(src->lin, x.data(), T, want.data());
  for (CpuIsa isa : kIsas) {
    if (!cpu_isa_supported(isa)) continue;
    std::vector<float> y(size_t(T) * 45, NAN);
    packed_linear(W, x.data(), T, y.data(), pool, isa);
    for (int t = 0; t < T; ++t) {
      std::vector<double> xd(x.begin() + size_t(t) * 192, x.begin() + size_t(t + 1) * 192), xa(xd);
      for (auto& v : xa) v = std::abs(v);
      for (int o = 0; o < 45; ++o)
        ASSERT_NEAR(y[size_t(t) * 45 + o], want[size_t(t) * 45 + o], 2 * row_ref(*src, o, xd.data(), xa.data()).flt)
            << cpu_isa_name(isa) << " row " << o << " token " << t;
    }
  }
}

// ---- repacking ----

class ExpertRepack : public ::testing::TestWithParam<ExpertFormat> {};

TEST_P(ExpertRepack, RoundTrips) {
  const ExpertFormat fmt = GetParam();
  for (const Shape& sh : shapes_for(fmt)) {
    auto src = make_src(fmt, sh.out, sh.in, sh.o);
    PackedMatrix W = PackedMatrix::pack(src->lin);
    PackedMatrix C = W.clone();
    EXPECT_EQ(W.format(), fmt);
    EXPECT_EQ(W.out(), sh.out);
    EXPECT_EQ(W.in(), sh.in);
    const size_t row_bytes = src->data.size() / size_t(sh.out);
    // Same bytes as the source (Q4_K / Q8_0 blocks keep their size), plus the FP8 scales.
    EXPECT_EQ(W.bytes(), size_t(W.n_tiles()) * W.tile_rows() * row_bytes +
                             (fmt == ExpertFormat::FP8 ? src->s.numel() * sizeof(float) : 0));
    std::vector<float> deq(size_t(sh.in));
    for (int o = 0; o < sh.out; ++o) {
      const std::vector<uint8_t> want(src->data.begin() + size_t(o) * row_bytes, src->data.begin() + size_t(o + 1) * row_bytes);
      ASSERT_EQ(W.source_row(o), want) << expert_format_name(fmt) << " row " << o;
      ASSERT_EQ(C.source_row(o), want) << "clone, row " << o;
      W.dequantize_row(o, deq.data());
      for (int i = 0; i < sh.in; ++i)
        ASSERT_EQ(bits(deq[size_t(i)]), bits(src->rows[size_t(o) * sh.in + i])) << "row " << o << " col " << i;
    }
    EXPECT_THROW(W.source_row(sh.out), Error);
  }
}

INSTANTIATE_TEST_SUITE_P(CpuExperts, ExpertRepack, ::testing::ValuesIn(kFormats),
                         [](const auto& info) { return std::string(expert_format_name(info.param)); });

// ---- activations ----

TEST(ExpertActivations, QuantizationAgreesAcrossIsasAndWithQuantAct) {
  for (CpuIsa isa : kIsas) {
    if (!cpu_isa_supported(isa)) continue;
    for (int rep = 0; rep < 20; ++rep) {
      std::vector<float> x = random_x(1, 512, rep % 2 ? 1e-3f : 3.0f);
      if (rep == 3) std::fill(x.begin(), x.begin() + 256, 0.0f);  // an all-zero block
      // Q8_0: bit for bit quant_act's quantize_act (f16 d, same q).
      QuantizedRow q8 = quantize_activation_row(ExpertFormat::Q8_0, x.data(), 512, isa);
      std::vector<uint8_t> qa(act_row_size(GgmlType::Q8_0, 512));
      quantize_act(GgmlType::Q8_0, x.data(), qa.data(), 512);
      for (int b = 0; b < 16; ++b) {
        uint16_t h;
        std::memcpy(&h, &qa[size_t(b) * 34], 2);
        ASSERT_EQ(bits(q8.d[size_t(b)]), bits(f16_to_f32(h))) << cpu_isa_name(isa) << " block " << b;
        int sum = 0;
        for (int j = 0; j < 32; ++j) {
          ASSERT_EQ(q8.q[size_t(b) * 32 + j], int8_t(qa[size_t(b) * 34 + 2 + j])) << cpu_isa_name(isa) << " block " << b;
          sum += q8.q[size_t(b) * 32 + j];
        }
        ASSERT_EQ(q8.sum[size_t(b)], sum);
      }
      // Q4_K's activations: the scalar and SIMD quantizers agree bit for bit, and each value is
      // within act_err of x.
      QuantizedRow k = quantize_activation_row(ExpertFormat::Q4_K, x.data(), 512, isa);
      QuantizedRow ks = quantize_activation_row(ExpertFormat::Q4_K, x.data(), 512, CpuIsa::Scalar);
      ASSERT_EQ(k.q, ks.q);
      ASSERT_EQ(k.sum, ks.sum);
      for (int b = 0; b < 2; ++b) {
        ASSERT_EQ(bits(k.d[size_t(b)]), bits(ks.d[size_t(b)]));
        double amax = 0;
        for (int i = 0; i < 256; ++i) amax = std::max(amax, std::abs(double(x[size_t(b) * 256 + i])));
        for (int i = 0; i < 256; ++i) {
          const size_t j = size_t(b) * 256 + i;
          ASSERT_LE(std::abs(double(k.q[j]) * k.d[size_t(b)] - x[j]), act_err(ExpertFormat::Q4_K, amax));
          ASSERT_LE(std::abs(int(k.q[j])), 127);
        }
      }
      int s0 = 0;
      for (int j = 0; j < 32; ++j) s0 += k.q[size_t(j)];
      ASSERT_EQ(k.sum[0], s0);
    }
  }
  EXPECT_TRUE(quantize_activation_row(ExpertFormat::BF16, nullptr, 16, CpuIsa::Scalar).q.empty());
  std::vector<float> x(100);
  EXPECT_THROW(quantize_activation_row(ExpertFormat::Q4_K, x.data(), 100, CpuIsa::Scalar), Error);
}

// ---- the expert FFN ----

struct SrcExpert {
  std::unique_ptr<Src> gate, up, down;
  PackedExpert packed;
};

SrcExpert make_expert(ExpertFormat fg, ExpertFormat fu, ExpertFormat fd, int d_model, int d_ff) {
  SrcExpert e;
  e.gate = make_src(fg, d_ff, d_model);
  e.up = make_src(fu, d_ff, d_model);
  e.down = make_src(fd, d_model, d_ff);
  e.packed = PackedExpert::pack(e.gate->lin, e.up->lin, e.down->lin);
  return e;
}

// One expert on one token, in double, with the bound on the kernels' error (see the top).
void expert_ref(const SrcExpert& e, const float* x, std::vector<double>& y, std::vector<double>& bound) {
  const int dm = e.gate->in, df = e.gate->out;
  std::vector<double> xd(x, x + dm), xa(static_cast<size_t>(dm)), h(static_cast<size_t>(df)), hb(static_cast<size_t>(df)),
      habs(static_cast<size_t>(df));
  for (int i = 0; i < dm; ++i) xa[size_t(i)] = std::abs(xd[size_t(i)]);
  for (int f = 0; f < df; ++f) {
    const RowRef g = row_ref(*e.gate, f, xd.data(), xa.data()), u = row_ref(*e.up, f, xd.data(), xa.data());
    const double s = g.val / (1 + std::exp(-g.val));
    h[size_t(f)] = s * u.val;
    // |silu'| <= 1.0998; silu and the product in float add at most 7u of |silu(g')·u'|.
    const double L = 1.1, bs = std::abs(s) + L * g.bound(), bu = std::abs(u.val) + u.bound();
    hb[size_t(f)] = L * g.bound() * bu + std::abs(s) * u.bound() + 7 * kU * bs * bu;
    habs[size_t(f)] = std::abs(h[size_t(f)]) + hb[size_t(f)];
  }
  y.assign(size_t(dm), 0);
  bound.assign(size_t(dm), 0);
  for (int o = 0; o < dm; ++o) {
    // Down reads the kernel's h' (|h'| <= habs), whose own activation rounding and float error
    // row_ref bounds; the difference h' − h adds Σ|Wd|·hb.
    const RowRef d = row_ref(*e.down, o, h.data(), habs.data());
    double prop = 0;
    for (int f = 0; f < df; ++f) prop += std::abs(double(e.down->rows[size_t(o) * df + f])) * hb[size_t(f)];
    y[size_t(o)] = d.val;
    bound[size_t(o)] = d.bound() + prop;
  }
}

class ExpertFfn : public ::testing::TestWithParam<std::tuple<ExpertFormat, CpuIsa>> {};

struct Dims {
  int d_model, d_ff;
};
Dims dims_for(ExpertFormat f) {
  switch (f) {
    case ExpertFormat::Q4_K: return {512, 256};
    case ExpertFormat::Q8_0: return {160, 96};
    case ExpertFormat::FP8: return {144, 80};
    case ExpertFormat::BF16: return {48, 80};
  }
  return {};
}

// Runs a batch of T tokens, each routed to 2 of the experts with random weights, into y0 and
// checks every output element against the reference within the summed bounds. Returns y.
std::vector<float> check_moe(const std::vector<SrcExpert*>& experts, int T, ThreadPool& pool, CpuIsa isa,
                             const std::vector<float>& x, const std::vector<float>& y0,
                             const std::vector<std::vector<int>>& route, const std::vector<std::vector<float>>& wts,
                             int amx_min_rows = kAmxMinRows) {
  const int dm = experts[0]->gate->in;
  std::vector<ExpertJob> jobs(experts.size());
  for (size_t j = 0; j < experts.size(); ++j) {
    jobs[j].expert = &experts[j]->packed;
    jobs[j].x = x.data();
    jobs[j].y = nullptr;
    jobs[j].rows = route[j];
    jobs[j].weights = wts[j];
  }
  std::vector<float> y = y0;
  for (auto& job : jobs) job.y = y.data();
  ExpertRunner runner(pool, isa, amx_min_rows);
  runner.run_experts(jobs);

  std::vector<double> want(y0.begin(), y0.end()), bound(size_t(T) * dm, 0.0), mag(size_t(T) * dm, 0.0);
  for (size_t i = 0; i < want.size(); ++i) mag[i] = std::abs(want[i]);
  std::vector<double> ye, be;
  for (size_t j = 0; j < experts.size(); ++j)
    for (size_t k = 0; k < route[j].size(); ++k) {
      const int t = route[j][k];
      expert_ref(*experts[j], x.data() + size_t(t) * dm, ye, be);
      const double w = wts[j][k];
      for (int o = 0; o < dm; ++o) {
        const size_t i = size_t(t) * dm + o;
        want[i] += w * ye[size_t(o)];
        bound[i] += std::abs(w) * be[size_t(o)];
        mag[i] += std::abs(w) * (std::abs(ye[size_t(o)]) + be[size_t(o)]);
      }
    }
  const double n_acc = double(experts.size()) + 2;  // y += w·y_j, once per expert of a token
  for (size_t i = 0; i < y.size(); ++i)
    EXPECT_LE(std::abs(y[i] - want[i]), bound[i] + n_acc * 2 * kU * mag[i])
        << "token " << i / size_t(dm) << " column " << i % size_t(dm) << ": " << y[i] << " vs " << want[i];
  return y;
}

void random_routes(int T, int n_exp, std::vector<std::vector<int>>& route, std::vector<std::vector<float>>& wts) {
  route.assign(size_t(n_exp), {});
  wts.assign(size_t(n_exp), {});
  std::uniform_real_distribution<float> uw(0.05f, 1.5f);
  for (int t = 0; t < T; ++t) {
    std::vector<int> e(static_cast<size_t>(n_exp));
    for (int i = 0; i < n_exp; ++i) e[size_t(i)] = i;
    std::shuffle(e.begin(), e.end(), rng());
    for (int k = 0; k < std::min(2, n_exp); ++k) {
      route[size_t(e[size_t(k)])].push_back(t);
      wts[size_t(e[size_t(k)])].push_back(uw(rng()));
    }
  }
}

TEST_P(ExpertFfn, MatchesReference) {
  const auto [fmt, isa] = GetParam();
  SKIP_IF_UNSUPPORTED(isa);
  RecordProperty("kernel", param_name(fmt, isa));
  const Dims dm = dims_for(fmt);
  std::vector<SrcExpert> store(3);
  std::vector<SrcExpert*> experts;
  for (auto& e : store) {
    e = make_expert(fmt, fmt, fmt, dm.d_model, dm.d_ff);
    experts.push_back(&e);
  }
  ThreadPool p1(1, -1, false), p2(2, -1, false), p4(4, -1, false);
  for (int T : {1, 3, 4, 16}) {
    SCOPED_TRACE(::testing::Message() << param_name(fmt, isa) << " T=" << T);
    std::vector<std::vector<int>> route;
    std::vector<std::vector<float>> wts;
    random_routes(T, 3, route, wts);
    std::vector<float> x = random_x(T, dm.d_model), y0 = random_x(T, dm.d_model, 0.1f);
    std::vector<float> a = check_moe(experts, T, p1, isa, x, y0, route, wts);
    std::vector<float> b = check_moe(experts, T, p2, isa, x, y0, route, wts);
    std::vector<float> c = check_moe(experts, T, p4, isa, x, y0, route, wts);
    for (size_t i = 0; i < a.size(); ++i) {
      ASSERT_EQ(bits(a[i]), bits(b[i])) << "2 threads differ at " << i;
      ASSERT_EQ(bits(a[i]), bits(c[i])) << "4 threads differ at " << i;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(CpuExperts, ExpertFfn, ::testing::Combine(::testing::ValuesIn(kFormats), ::testing::ValuesIn(kIsas)),
                         [](const auto& info) { return param_name(std::get<0>(info.param), std::get<1>(info.param)); });

// gate, up and down in three formats (gate and up then need two activation forms; down reads h
// as floats), and y aliasing x.
TEST(ExpertFfnMixed, FormatsPerMatrixAndInPlace) {
  SrcExpert e = make_expert(ExpertFormat::Q4_K, ExpertFormat::Q8_0, ExpertFormat::FP8, 256, 64);
  SrcExpert f = make_expert(ExpertFormat::Q4_K, ExpertFormat::Q4_K, ExpertFormat::Q8_0, 256, 64);
  ThreadPool pool(2, -1, false);
  for (CpuIsa isa : kIsas) {
    if (!cpu_isa_supported(isa)) continue;
    SCOPED_TRACE(cpu_isa_name(isa));
    const int T = 5;
    std::vector<std::vector<int>> route;
    std::vector<std::vector<float>> wts;
    random_routes(T, 2, route, wts);
    std::vector<float> x = random_x(T, 256);
    std::vector<float> y = check_moe({&e, &f}, T, pool, isa, x, x, route, wts);
    // In place (y aliases x) gives the same bits as into a copy of x.
    std::vector<float> xy = x;
    std::vector<ExpertJob> jobs(2);
    SrcExpert* ex[2] = {&e, &f};
    for (int j = 0; j < 2; ++j) jobs[size_t(j)] = {&ex[j]->packed, xy.data(), xy.data(), route[size_t(j)], wts[size_t(j)]};
    ExpertRunner runner(pool, isa);
    runner.run_experts(jobs);
    for (size_t i = 0; i < x.size(); ++i) ASSERT_EQ(bits(xy[i]), bits(y[i])) << i;
  }
}

// ---- AMX tiles ----

// The int8 activations of T tokens as the runner holds them (ActBuf: whole 16-token tiles).
struct TileActs {
  std::vector<int8_t> q;
  std::vector<float> d;
  std::vector<int16_t> s;
};
TileActs tile_acts(ExpertFormat f, const std::vector<float>& x, int T, int K) {
  const int Tp = (T + amx::kTileTokens - 1) / amx::kTileTokens * amx::kTileTokens, nb = K / act_block(f);
  TileActs a;
  a.q.assign(size_t(Tp) * K, 0);
  a.d.assign(size_t(Tp) * nb, 0.0f);
  a.s.assign(size_t(Tp) * (K / 32), 0);
  for (int t = 0; t < T; ++t) {
    const QuantizedRow r = quantize_activation_row(f, x.data() + size_t(t) * K, K, CpuIsa::Scalar);
    std::copy(r.q.begin(), r.q.end(), a.q.begin() + ptrdiff_t(t) * K);
    std::copy(r.d.begin(), r.d.end(), a.d.begin() + ptrdiff_t(t) * nb);
    std::copy(r.sum.begin(), r.sum.end(), a.s.begin() + ptrdiff_t(t) * (K / 32));
  }
  return a;
}

// y [T, out] from the tile kernel `fn`, called for the given 16-row chunks as the runner calls it
// (NaN in the other rows).
std::vector<float> run_tile_chunks(amx::ChunkFn fn, const PackedMatrix& W, const TileActs& a, int T,
                                   const std::vector<int>& chunks) {
  std::vector<float> y(size_t(T) * W.out(), NAN), yc(size_t(T) * 16);
  for (int ch : chunks) {
    amx::Chunk c;
    c.tile0 = W.tile(2 * ch);
    c.tile1 = 2 * ch + 1 < W.n_tiles() ? W.tile(2 * ch + 1) : c.tile0;
    c.K = W.in();
    c.q = a.q.data(), c.d = a.d.data(), c.s = a.s.data();
    c.nt = T;
    c.y = yc.data(), c.ldy = 16;
    std::fill(yc.begin(), yc.end(), NAN);
    fn(c);
    for (int t = 0; t < T; ++t)
      for (int n = 0; n < 16 && 16 * ch + n < W.out(); ++n)
        y[size_t(t) * W.out() + 16 * ch + n] = yc[size_t(t) * 16 + n];
  }
  return y;
}

// Odd row counts (a chunk of one 8-row tile, a partial tile), k over several staging slabs
// (Q4_K: 512 k, Q8_0: 1024 k) and GLM-5.2's expert matrices: gate / up [2048, 6144], down
// [6144, 2048].
std::vector<std::pair<int, int>> tile_shapes(ExpertFormat f) {
  if (f == ExpertFormat::Q4_K) return {{37, 256}, {8, 768}, {24, 2560}, {2048, 6144}, {6144, 2048}};
  return {{37, 96}, {8, 32}, {29, 1120}, {2048, 6144}, {6144, 2048}};
}
const int kTileRowCounts[] = {1, 7, 16, 33, 64};

// Every chunk of a small matrix; of a large one the first two, one in the middle and the last.
std::vector<int> chunks_to_check(int out) {
  const int n = (out + 15) / 16;
  std::vector<int> c;
  if (n <= 8)
    for (int i = 0; i < n; ++i) c.push_back(i);
  else
    c = {0, 1, n / 2, n - 1};
  return c;
}

// One case of the tile tests: a packed source matrix of a tile shape, the chunks to check, a
// row count and fresh activations.
struct TileCase {
  ExpertFormat fmt;
  int out, in, T;
  const Src& src;
  const PackedMatrix& W;
  const std::vector<int>& chunks;
  const std::vector<float>& x;
};
// f(TileCase) for Q4_K and Q8_0 at every tile shape and row count, until an assertion fails.
template <typename F>
void for_each_tile_case(F&& f) {
  for (ExpertFormat fmt : {ExpertFormat::Q4_K, ExpertFormat::Q8_0})
    for (auto [out, in] : tile_shapes(fmt)) {
      auto src = make_src(fmt, out, in);
      PackedMatrix W = PackedMatrix::pack(src->lin);
      const std::vector<int> chunks = chunks_to_check(out);
      for (int T : kTileRowCounts) {
        SCOPED_TRACE(::testing::Message() << expert_format_name(fmt) << " [" << out << ", " << in << "] T=" << T);
        const std::vector<float> x = random_x(T, in);
        f(TileCase{fmt, out, in, T, *src, W, chunks, x});
        if (::testing::Test::HasFatalFailure()) return;
      }
    }
}

amx::ChunkFn tile_kernel(ExpertFormat f, bool hw) {
  if (f == ExpertFormat::Q4_K) return hw ? amx::q4k_chunk_hw : amx::q4k_chunk_emu;
  return hw ? amx::q80_chunk_hw : amx::q80_chunk_emu;
}

// Over the rows of `chunks`: y equals `want` bit for bit and is within the reference's bound.
void expect_tile_rows(const Src& src, const std::vector<float>& x, int T, const std::vector<int>& chunks,
                      const std::vector<float>& y, const std::vector<float>& want, const char* what) {
  for (int t = 0; t < T; ++t) {
    std::vector<double> xd(x.begin() + ptrdiff_t(t) * src.in, x.begin() + ptrdiff_t(t + 1) * src.in), xa(xd);
    for (auto& v : xa) v = std::abs(v);
    for (int ch : chunks)
      for (int o = 16 * ch; o < std::min(16 * ch + 16, src.out); ++o) {
        const size_t k = size_t(t) * src.out + o;
        ASSERT_EQ(bits(y[k]), bits(want[k])) << "row " << o << " token " << t << ": " << y[k] << " vs " << what << " "
                                             << want[k];
        const RowRef ref = row_ref(src, o, xd.data(), xa.data());
        ASSERT_LE(std::abs(y[k] - ref.val), ref.bound()) << "row " << o << " token " << t << ": " << y[k] << " vs " << ref.val;
      }
  }
}

// The tile kernels' source on scalar stand-ins of the intrinsics (runs on any CPU): the AVX2
// kernels' results bit for bit, at every row count.
TEST(ExpertAmxTiles, EmulationMatchesAvx2AndReference) {
  SKIP_IF_UNSUPPORTED(CpuIsa::AVX2);
  ThreadPool pool(2, -1, false);
  for_each_tile_case([&](const TileCase& c) {
    std::vector<float> y2(size_t(c.T) * c.out, NAN);
    packed_linear(c.W, c.x.data(), c.T, y2.data(), pool, CpuIsa::AVX2);
    const std::vector<float> ye =
        run_tile_chunks(tile_kernel(c.fmt, false), c.W, tile_acts(c.fmt, c.x, c.T, c.in), c.T, c.chunks);
    expect_tile_rows(c.src, c.x, c.T, c.chunks, ye, y2, "avx2");
  });
}

// The hardware (AMX machines only), forced onto tiles at every row count: the emulation and the
// AVX2 kernels bit for bit, AVX512 bit for bit (Q4_K) or within both kernels' float bounds
// (Q8_0, whose AVX512 kernel rounds two half-row sums), the scalar kernel within the float
// bound, the same bits from any thread count.
TEST(ExpertAmxTiles, HardwareMatchesEmulationAvx2VnniAndScalar) {
  SKIP_IF_UNSUPPORTED(CpuIsa::AMX);
  ThreadPool pool(0, -1, false), pool3(3, -1, false);
  for_each_tile_case([&](const TileCase& c) {
    const ExpertFormat fmt = c.fmt;
    const int out = c.out, in = c.in, T = c.T;
    const Src& src = c.src;
    const PackedMatrix& W = c.W;
    const std::vector<int>& chunks = c.chunks;
    const std::vector<float>& x = c.x;
    const size_t n = size_t(T) * out;
    std::vector<float> y(n, NAN), y3(n, NAN), y2(n, NAN), y5(n, NAN), ys(n, NAN);
    packed_linear(W, x.data(), T, y.data(), pool, CpuIsa::AMX, 1);
    packed_linear(W, x.data(), T, y3.data(), pool3, CpuIsa::AMX, 1);
    packed_linear(W, x.data(), T, y2.data(), pool, CpuIsa::AVX2);
    packed_linear(W, x.data(), T, y5.data(), pool, CpuIsa::AVX512);
    packed_linear(W, x.data(), T, ys.data(), pool, CpuIsa::Scalar);
    for (size_t k = 0; k < n; ++k) {
      ASSERT_EQ(bits(y[k]), bits(y3[k])) << "3 threads changed output " << k;
      ASSERT_EQ(bits(y[k]), bits(y2[k])) << "output " << k << ": " << y[k] << " vs avx2 " << y2[k];
      if (fmt == ExpertFormat::Q4_K) {
        ASSERT_EQ(bits(y[k]), bits(y5[k])) << "output " << k << " vs avx512vnni";
      }
    }
    const TileActs a = tile_acts(fmt, x, T, in);
    const std::vector<float> yh = run_tile_chunks(tile_kernel(fmt, true), W, a, T, chunks);
    const std::vector<float> ye = run_tile_chunks(tile_kernel(fmt, false), W, a, T, chunks);
    expect_tile_rows(src, x, T, chunks, yh, ye, "emulation");
    expect_tile_rows(src, x, T, chunks, y, yh, "hardware chunks");
    for (int t = 0; t < T; ++t) {
      std::vector<double> xd(x.begin() + ptrdiff_t(t) * in, x.begin() + ptrdiff_t(t + 1) * in), xa(xd);
      for (auto& v : xa) v = std::abs(v);
      for (int ch : chunks)
        for (int o = 16 * ch; o < std::min(16 * ch + 16, out); ++o) {
          const size_t k = size_t(t) * out + o;
          const RowRef ref = row_ref(src, o, xd.data(), xa.data());
          ASSERT_LE(std::abs(double(y[k]) - ys[k]), ref.flt) << "row " << o << " token " << t << " vs scalar";
          ASSERT_LE(std::abs(double(y[k]) - y5[k]), 2 * ref.flt) << "row " << o << " token " << t << " vs avx512vnni";
        }
    }
  });
}

// Whole experts with every job on tiles (AMX machines only): within the reference's bounds, and
// the AVX2 runner's bits (the AVX512 runner's where the float down projection runs AVX512).
TEST(ExpertAmxTiles, ExpertFfnMatchesAvx2) {
  SKIP_IF_UNSUPPORTED(CpuIsa::AMX);
  ThreadPool p1(1, -1, false), p4(4, -1, false);
  struct Case {
    ExpertFormat g, u, d;
    CpuIsa same_as;
  };
  for (const Case& cs : {Case{ExpertFormat::Q4_K, ExpertFormat::Q4_K, ExpertFormat::Q4_K, CpuIsa::AVX2},
                         Case{ExpertFormat::Q8_0, ExpertFormat::Q8_0, ExpertFormat::Q8_0, CpuIsa::AVX2},
                         Case{ExpertFormat::Q4_K, ExpertFormat::Q4_K, ExpertFormat::BF16, CpuIsa::AVX512}}) {
    const Dims dm = dims_for(cs.g);
    std::vector<SrcExpert> store(3);
    std::vector<SrcExpert*> experts;
    for (auto& e : store) {
      e = make_expert(cs.g, cs.u, cs.d, dm.d_model, dm.d_ff);
      experts.push_back(&e);
    }
    for (int T : kTileRowCounts) {
      SCOPED_TRACE(::testing::Message() << expert_format_name(cs.g) << "/" << expert_format_name(cs.u) << "/"
                                        << expert_format_name(cs.d) << " T=" << T);
      std::vector<std::vector<int>> route;
      std::vector<std::vector<float>> wts;
      random_routes(T, 3, route, wts);
      std::vector<float> x = random_x(T, dm.d_model), y0 = random_x(T, dm.d_model, 0.1f);
      std::vector<float> a = check_moe(experts, T, p4, CpuIsa::AMX, x, y0, route, wts, 1);
      std::vector<float> b = check_moe(experts, T, p1, CpuIsa::AMX, x, y0, route, wts, 1);
      std::vector<float> c = check_moe(experts, T, p1, cs.same_as, x, y0, route, wts);
      for (size_t i = 0; i < a.size(); ++i) {
        ASSERT_EQ(bits(a[i]), bits(b[i])) << "1 thread differs at " << i;
        ASSERT_EQ(bits(a[i]), bits(c[i])) << cpu_isa_name(cs.same_as) << " differs at " << i;
      }
    }
  }
}

// ---- bad input ----

TEST(ExpertKernelsErrors, RejectsBadInput) {
  // Formats without a kernel.
  {
    std::vector<uint8_t> d(size_t(8) * 210);
    GgufTensorInfo g;
    g.name = "q6";
    g.type = GgmlType::Q6_K;
    g.ne = {256, 8};
    g.data = d.data();
    g.nbytes = d.size();
    EXPECT_THROW(PackedMatrix::pack(Linear::from_gguf(g, "t.gguf")), Error);
    EXPECT_THROW(PackedMatrix::pack(Linear::from_floats(std::vector<float>(64), 4, 16)), Error);
    std::vector<uint8_t> f(64 * 4);
    TensorView w{"w", DType::F32, {4, 64}, f.data(), f.size(), "t"};
    Linear l;
    l.w = &w, l.out = 4, l.in = 64;
    EXPECT_THROW(PackedMatrix::pack(l), Error);
    TensorView w8{"w", DType::F8_E4M3, {4, 64}, f.data(), 256, "t"};
    l.w = &w8;  // FP8 without scales
    EXPECT_THROW(PackedMatrix::pack(l), Error);
  }
  // `in` not a multiple of the block: Q4_K rows of 288 (a Linear made by hand), BF16 / FP8 of 40.
  {
    std::vector<uint8_t> d(size_t(8) * 2 * 144);
    GgufTensorInfo g;
    g.name = "q4";
    g.type = GgmlType::Q4_K;
    g.ne = {512, 8};
    g.data = d.data();
    g.nbytes = d.size();
    Linear l = Linear::from_gguf(g, "t.gguf");
    l.in = 288;
    EXPECT_THROW(PackedMatrix::pack(l), Error);
    l.in = 512;
    l.row_bytes = 100;  // row size that does not match the type
    EXPECT_THROW(PackedMatrix::pack(l), Error);
    std::vector<uint8_t> b(8 * 40 * 2);
    TensorView w{"w", DType::BF16, {8, 40}, b.data(), b.size(), "t"};
    Linear lb;
    lb.w = &w, lb.out = 8, lb.in = 40;
    EXPECT_THROW(PackedMatrix::pack(lb), Error);
  }
  // FP8 scale blocks the layout cannot hold (bo % 4, bi % 16) and a scale tensor of the wrong size.
  for (auto [bo, bi] : {std::pair{2, 128}, std::pair{128, 8}}) {
    auto src = make_src(ExpertFormat::FP8, 8, 128);
    Linear l = src->lin;
    l.bo = bo, l.bi = bi;
    EXPECT_THROW(PackedMatrix::pack(l), Error) << bo << "x" << bi;
  }
  {
    auto src = make_src(ExpertFormat::FP8, 8, 128);
    TensorView s2 = src->s;
    s2.shape = {1, 2};  // [ceil(8/128), ceil(128/128)] = [1, 1] expected
    Linear l = src->lin;
    l.scale = &s2;
    EXPECT_THROW(PackedMatrix::pack(l), Error);
  }
  // Shapes that do not form an expert.
  auto a = make_src(ExpertFormat::BF16, 32, 48), b = make_src(ExpertFormat::BF16, 32, 48), c = make_src(ExpertFormat::BF16, 48, 32);
  auto c2 = make_src(ExpertFormat::BF16, 48, 16), b2 = make_src(ExpertFormat::BF16, 16, 48);
  EXPECT_NO_THROW(PackedExpert::pack(a->lin, b->lin, c->lin));
  EXPECT_THROW(PackedExpert::pack(a->lin, b->lin, c2->lin), Error);
  EXPECT_THROW(PackedExpert::pack(a->lin, b2->lin, c->lin), Error);
  EXPECT_THROW(PackedExpert::pack(a->lin, b->lin, a->lin), Error);
  // Jobs.
  PackedExpert e = PackedExpert::pack(a->lin, b->lin, c->lin);
  auto d2 = make_src(ExpertFormat::BF16, 32, 64), u2 = make_src(ExpertFormat::BF16, 32, 64), o2 = make_src(ExpertFormat::BF16, 64, 32);
  PackedExpert e64 = PackedExpert::pack(d2->lin, u2->lin, o2->lin);
  ThreadPool pool(2, -1, false);
  ExpertRunner runner(pool);
  std::vector<float> x(4 * 64), y(4 * 64);
  auto run = [&](ExpertJob j1, ExpertJob j2 = {}) {
    std::vector<ExpertJob> jobs{j1};
    if (j2.expert) jobs.push_back(j2);
    runner.run_experts(jobs);
  };
  EXPECT_THROW(run({nullptr, x.data(), y.data(), {0}, {1.f}}), Error);
  EXPECT_THROW(run({&e, x.data(), y.data(), {0, 1}, {1.f}}), Error);
  EXPECT_THROW(run({&e, nullptr, y.data(), {0}, {1.f}}), Error);
  EXPECT_THROW(run({&e, x.data(), nullptr, {0}, {1.f}}), Error);
  EXPECT_THROW(run({&e, x.data(), y.data(), {-1}, {1.f}}), Error);
  EXPECT_THROW(run({&e, x.data(), y.data(), {0}, {1.f}}, {&e64, x.data(), y.data(), {1}, {1.f}}), Error);
  EXPECT_NO_THROW(run({&e, x.data(), y.data(), {}, {}}));                   // nothing routed
  EXPECT_NO_THROW(run({&e, nullptr, nullptr, {}, {}}));                     // ... pointers unused
  EXPECT_NO_THROW(runner.run_experts({}));
  // packed_linear.
  PackedMatrix W = PackedMatrix::pack(a->lin);
  EXPECT_THROW(packed_linear(W, x.data(), -1, y.data(), pool), Error);
  EXPECT_THROW(packed_linear(W, nullptr, 1, y.data(), pool), Error);
  EXPECT_NO_THROW(packed_linear(W, x.data(), 0, y.data(), pool));
  EXPECT_THROW(packed_linear(W, x.data(), 1, y.data(), pool, cpu_isa_best(), 0), Error);
  EXPECT_THROW(ExpertRunner(pool, cpu_isa_best(), 0), Error);
  // Instruction sets this CPU lacks.
  for (CpuIsa isa : kIsas)
    if (!cpu_isa_supported(isa)) {
      EXPECT_THROW(ExpertRunner(pool, isa), Error) << cpu_isa_name(isa);
      EXPECT_THROW(packed_linear(W, x.data(), 1, y.data(), pool, isa), Error) << cpu_isa_name(isa);
    }
}

TEST(ExpertKernelsInfo, ReportsIsas) {
  std::string ran;
  for (CpuIsa isa : kIsas) ran += std::string(cpu_isa_name(isa)) + (cpu_isa_supported(isa) ? " (runs here) " : " (skipped: not on this CPU) ");
  std::printf("CPU expert kernels: best ISA %s; %s\n", cpu_isa_name(cpu_isa_best()), ran.c_str());
  RecordProperty("isas", ran);
  EXPECT_TRUE(cpu_isa_supported(CpuIsa::Scalar));
}

// ---- thread pool ----

TEST(CpuThreadPool, RunsEveryWorkerOncePerRunAndBarriersOrderPhases) {
  for (int n : {1, 2, 3, 5}) {
    ThreadPool pool(n);
    ASSERT_EQ(pool.size(), n);
    std::vector<int> seen(size_t(n), 0);
    std::vector<int> phase1(size_t(n), 0);
    std::atomic<int> bad{0};
    for (int rep = 0; rep < 50; ++rep) {
      std::atomic<int64_t> ctr{0};
      std::vector<std::atomic<int>> hits(1000);
      pool.run([&](int w) {
        ++seen[size_t(w)];
        phase1[size_t(w)] = rep + 1;
        pool.barrier();
        for (int v : phase1)
          if (v != rep + 1) bad.fetch_add(1);
        for (int64_t i; (i = ThreadPool::next_task(ctr, 1000)) >= 0;) hits[size_t(i)].fetch_add(1);
        pool.barrier();
        pool.barrier();
      });
      for (auto& h : hits) ASSERT_EQ(h.load(), 1);
    }
    for (int v : seen) EXPECT_EQ(v, 50);
    EXPECT_EQ(bad.load(), 0) << n << " workers";
  }
}

TEST(CpuThreadPool, PinsToAllowedCpusAndRethrows) {
  const std::vector<int> allowed = allowed_cpus();
  ASSERT_FALSE(allowed.empty());
  ThreadPool pool;  // one per allowed CPU
  EXPECT_EQ(size_t(pool.size()), allowed.size());
  std::set<int> used;
  for (int c : pool.cpus()) {
    if (c >= 0) {
      EXPECT_TRUE(std::binary_search(allowed.begin(), allowed.end(), c)) << c;
    }
    used.insert(c);
  }
  EXPECT_EQ(used.size(), allowed.size());  // one worker per CPU
  std::vector<int> on(size_t(pool.size()), -1);
  std::thread caller([&] {  // worker 0 is the calling thread: pin a thread of our own
    EXPECT_TRUE(pool.pin_caller());
    pool.run([&](int w) { on[size_t(w)] = sched_getcpu(); });
  });
  caller.join();
  for (int w = 0; w < pool.size(); ++w)
    if (pool.cpus()[size_t(w)] >= 0) {
      EXPECT_EQ(on[size_t(w)], pool.cpus()[size_t(w)]) << "worker " << w;
    }
  EXPECT_THROW(pool.run([&](int w) {
                 if (w == 0) fail("worker {} failed", w);
               }),
               Error);
  int ran = 0;
  pool.run([&](int w) {
    if (w == 0) ++ran;
  });  // still usable
  EXPECT_EQ(ran, 1);

  EXPECT_GE(numa_node_count(), 1);
  const std::vector<int> n0 = numa_node_cpus(0);
  EXPECT_FALSE(n0.empty());
  for (int c : n0) EXPECT_TRUE(std::binary_search(allowed.begin(), allowed.end(), c));
  EXPECT_TRUE(numa_node_cpus(4096).empty());
  ThreadPool node0(0, 0);
  EXPECT_EQ(size_t(node0.size()), n0.size());
  EXPECT_THROW(ThreadPool(1, 4096), Error);
  // Packing onto a node works whether or not the kernel honours the binding.
  auto src = make_src(ExpertFormat::Q8_0, 16, 64);
  PackedMatrix W = PackedMatrix::pack(src->lin, 0);
  EXPECT_EQ(W.source_row(3), std::vector<uint8_t>(src->data.begin() + 3 * 68, src->data.begin() + 4 * 68));
}

}  // namespace
}  // namespace bigmoe::cpu
