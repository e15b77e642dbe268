// CPU expert kernels benchmark (any x86-64 machine): GB/s of expert weight bytes streamed by
// ExpertRunner::run_experts for GLM-5.2-shaped experts (gate, up [2048, 6144], down [6144, 2048]),
// one expert and 8 experts per call, at batch 1 and 4 (every row routed to every expert of the
// call), for each weight format and each instruction set this CPU runs; beside it the host read
// bandwidth measured with the same pinned threads (each thread sums its slice of a buffer of
// --mem-mib; also with software prefetch, as the kernels use) and the fraction of the plain
// sum's bandwidth the kernels reach.
//
// The experts are copies of one random expert, enough of them that one pass over all copies
// streams at least --mem-mib (and at least 16 experts), and successive calls take the next ones,
// so the weights come from memory, not from the caches. Time per call: median over --seconds.
// rows/s counts (token, expert) rows: experts × batch per call.
//
// AMX: --isa amx runs Q4_K / Q8_0 jobs of at least --amx-min-rows rows (default kAmxMinRows)
// on the tile kernels and the rest on AVX-512 VNNI. --amx is the comparison that places that
// threshold: Q4_K and Q8_0, avx512vnni against amx with every job on tiles (--amx-min-rows 1),
// at 1, 16, 64 and 256 rows per expert (later flags override these).
//
// Usage: bench_cpu_experts [--threads N] [--numa-node N] [--formats q4_k,q8_0,fp8,bf16]
//                          [--isa avx2,avx512vnni,amx,scalar] [--batch 1,4] [--experts 1,8]
//                          [--amx-min-rows N] [--amx] [--mem-mib 1024] [--seconds 1]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include <sys/mman.h>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "backend/cpu/expert_kernels.h"
#include "backend/cpu/thread_pool.h"
#include "tensor/dtype.h"
#include "tensor/quant_act.h"
#include "util/error.h"

using namespace bigmoe;
using namespace bigmoe::cpu;

namespace {

constexpr int kDModel = 6144, kDFf = 2048;

std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> v;
  size_t a = 0;
  while (a <= s.size()) {
    size_t b = s.find(',', a);
    if (b == std::string::npos) b = s.size();
    if (b > a) v.push_back(s.substr(a, b - a));
    a = b + 1;
  }
  return v;
}

double now_s() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

#if defined(__x86_64__)
template <bool kPrefetch>
__attribute__((target("avx2"))) uint64_t sum_avx2(const uint64_t* p, size_t n) {
  __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
  size_t i = 0;
  for (; i + 16 <= n; i += 16) {
    if constexpr (kPrefetch) {
      _mm_prefetch(reinterpret_cast<const char*>(p + i + 256), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(p + i + 264), _MM_HINT_T0);
    }
    a0 = _mm256_add_epi64(a0, _mm256_load_si256(reinterpret_cast<const __m256i*>(p + i)));
    a1 = _mm256_add_epi64(a1, _mm256_load_si256(reinterpret_cast<const __m256i*>(p + i + 4)));
    a2 = _mm256_add_epi64(a2, _mm256_load_si256(reinterpret_cast<const __m256i*>(p + i + 8)));
    a3 = _mm256_add_epi64(a3, _mm256_load_si256(reinterpret_cast<const __m256i*>(p + i + 12)));
  }
  alignas(32) uint64_t t[4];
  _mm256_store_si256(reinterpret_cast<__m256i*>(t), _mm256_add_epi64(_mm256_add_epi64(a0, a1), _mm256_add_epi64(a2, a3)));
  uint64_t s = t[0] + t[1] + t[2] + t[3];
  for (; i < n; ++i) s += p[i];
  return s;
}
#endif

template <bool kPrefetch>
uint64_t sum_plain(const uint64_t* p, size_t n) {
#if defined(__x86_64__)
  if (__builtin_cpu_supports("avx2")) return sum_avx2<kPrefetch>(p, n);
#endif
  uint64_t s = 0;
  for (size_t i = 0; i < n; ++i) s += p[i];
  return s;
}

// Host read bandwidth with the pool's threads: each sums its own contiguous slice (first
// touched by that thread, so on its node). Best of 5 passes. kPrefetch adds software prefetch
// 2 KiB ahead, as the kernels do.
template <bool kPrefetch>
double read_bandwidth(ThreadPool& pool, size_t bytes) {
  const size_t n = bytes / 8, per = (n / size_t(pool.size())) & ~size_t(15);
  // Mapped like the packed weights: 2 MiB-aligned, transparent huge pages where the kernel
  // gives them.
  const size_t huge = size_t(2) << 20, span = n * 8 + huge;
  void* mem = mmap(nullptr, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (mem == MAP_FAILED) fail("cannot map {} bytes", span);
  uint64_t* buf = reinterpret_cast<uint64_t*>((reinterpret_cast<uintptr_t>(mem) + huge - 1) / huge * huge);
#ifdef MADV_HUGEPAGE
  madvise(buf, n * 8, MADV_HUGEPAGE);
#endif
  pool.run([&](int w) {
    for (size_t i = per * size_t(w); i < per * size_t(w + 1); ++i) buf[i] = i;
  });
  std::vector<uint64_t> sink(size_t(pool.size()));
  double best = 0;
  for (int rep = 0; rep < 5; ++rep) {
    const double t0 = now_s();
    pool.run([&](int w) { sink[size_t(w)] += sum_plain<kPrefetch>(buf + per * size_t(w), per); });
    best = std::max(best, double(per * size_t(pool.size()) * 8) / (now_s() - t0));
  }
  uint64_t total = 0;
  for (uint64_t s : sink) total += s;
  munmap(mem, span);
  if (total == 42) std::printf(" ");  // keep the sums
  return best;
}

// Source bytes of one random matrix and the views a Linear needs.
struct Src {
  std::vector<uint8_t> data, sdata;
  GgufTensorInfo g;
  TensorView w, s;
  Linear lin;
};

std::unique_ptr<Src> make_src(ExpertFormat f, int out, int in, std::mt19937& rng) {
  auto m = std::make_unique<Src>();
  std::uniform_int_distribution<int> byte(0, 255);
  auto gguf = [&](GgmlType t) {
    m->g.name = "bench";
    m->g.type = t;
    m->g.ne = {in, out};
    m->g.data = m->data.data();
    m->g.nbytes = m->data.size();
    m->lin = Linear::from_gguf(m->g, "bench.gguf");
  };
  auto put_half = [](uint8_t* p, float v) {
    uint16_t h = f32_to_f16(v);
    std::memcpy(p, &h, 2);
  };
  switch (f) {
    case ExpertFormat::Q4_K:
      m->data.resize(size_t(out) * (in / 256) * 144);
      for (auto& b : m->data) b = uint8_t(byte(rng));
      for (size_t b = 0; b < m->data.size(); b += 144) put_half(&m->data[b], 1e-4f), put_half(&m->data[b + 2], 1e-4f);
      gguf(GgmlType::Q4_K);
      break;
    case ExpertFormat::Q8_0:
      m->data.resize(size_t(out) * (in / 32) * 34);
      for (auto& b : m->data) b = uint8_t(byte(rng));
      for (size_t b = 0; b < m->data.size(); b += 34) put_half(&m->data[b], 1e-4f);
      gguf(GgmlType::Q8_0);
      break;
    case ExpertFormat::BF16:
      m->data.resize(size_t(out) * in * 2);
      for (size_t i = 0; i < m->data.size(); i += 2) m->data[i] = uint8_t(byte(rng)), m->data[i + 1] = uint8_t(0x3c);
      m->w = TensorView{"bench", DType::BF16, {out, in}, m->data.data(), m->data.size(), "bench"};
      m->lin.w = &m->w, m->lin.out = out, m->lin.in = in;
      break;
    case ExpertFormat::FP8: {
      m->data.resize(size_t(out) * in);
      for (auto& b : m->data) b = uint8_t(byte(rng) & 0x77);
      const int sr = (out + 127) / 128, sc = (in + 127) / 128;
      m->sdata.resize(size_t(sr) * sc * 4);
      for (size_t i = 0; i < size_t(sr) * sc; ++i) {
        float v = 1e-3f;
        std::memcpy(&m->sdata[i * 4], &v, 4);
      }
      m->w = TensorView{"bench", DType::F8_E4M3, {out, in}, m->data.data(), m->data.size(), "bench"};
      m->s = TensorView{"bench_scale", DType::F32, {sr, sc}, m->sdata.data(), m->sdata.size(), "bench"};
      m->lin.w = &m->w, m->lin.scale = &m->s, m->lin.out = out, m->lin.in = in, m->lin.bo = 128, m->lin.bi = 128;
      break;
    }
  }
  return m;
}

// Identical copies may share physical memory (a hypervisor's same-page merging), and then the
// caches: change one even byte of every 64-byte line, at an offset and by a value that depend on
// the copy. Even bytes are low (mantissa) bytes of f16 / bf16 values or plain quant bits in every
// layout, and the low two bits change, so every value stays finite and normal.
void make_distinct(PackedMatrix& m, int copy) {
  uint8_t* p = const_cast<uint8_t*>(m.tile(0));
  const size_t n = size_t(m.n_tiles()) * size_t(m.tile(1) - m.tile(0)), off = (2 * size_t(copy)) % 64;
  for (size_t i = off; i < n; i += 64) p[i] ^= uint8_t(1 + (copy / 32) % 3);
}

ExpertFormat parse_format(const std::string& s) {
  for (ExpertFormat f : {ExpertFormat::Q4_K, ExpertFormat::Q8_0, ExpertFormat::FP8, ExpertFormat::BF16}) {
    std::string n = expert_format_name(f);
    std::string l = n;
    for (auto& c : l) c = char(std::tolower(c));
    if (s == n || s == l) return f;
  }
  fail("unknown format '{}' (q4_k, q8_0, fp8, bf16)", s);
}

CpuIsa parse_isa(const std::string& s) {
  for (CpuIsa i : {CpuIsa::Scalar, CpuIsa::AVX2, CpuIsa::AVX512, CpuIsa::AMX})
    if (s == cpu_isa_name(i) || (i == CpuIsa::AVX512 && s == "avx512")) return i;
  fail("unknown ISA '{}' (scalar, avx2, avx512vnni, amx)", s);
}

}  // namespace

int main(int argc, char** argv) try {
  int threads = 0, numa_node = -1, amx_min_rows = kAmxMinRows;
  double seconds = 1.0;
  size_t mem = size_t(1024) << 20;
  std::vector<std::string> formats = {"q4_k", "q8_0", "fp8", "bf16"}, isas;
  std::vector<int> batches = {1, 4}, n_experts = {1, 8};
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto val = [&]() -> std::string {
      if (i + 1 >= argc) fail("{} needs a value", a);
      return argv[++i];
    };
    auto ints = [&]() {
      std::vector<int> v;
      for (auto& s : split(val())) v.push_back(std::atoi(s.c_str()));
      return v;
    };
    if (a == "--threads") threads = std::atoi(val().c_str());
    else if (a == "--amx") {
      formats = {"q4_k", "q8_0"};
      isas = {"avx512vnni", "amx"};
      batches = {1, 16, 64, 256};
      amx_min_rows = 1;
    } else if (a == "--amx-min-rows") amx_min_rows = std::atoi(val().c_str());
    else if (a == "--numa-node") numa_node = std::atoi(val().c_str());
    else if (a == "--formats") formats = split(val());
    else if (a == "--isa") isas = split(val());
    else if (a == "--batch") batches = ints();
    else if (a == "--experts") n_experts = ints();
    else if (a == "--mem-mib") mem = size_t(std::atoll(val().c_str())) << 20;
    else if (a == "--seconds") seconds = std::atof(val().c_str());
    else if (a == "-h" || a == "--help") {
      std::printf("usage: bench_cpu_experts [--threads N] [--numa-node N] [--formats q4_k,q8_0,fp8,bf16]\n"
                  "                         [--isa avx2,avx512vnni,amx,scalar] [--batch 1,4] [--experts 1,8]\n"
                  "                         [--amx-min-rows N] [--amx] [--mem-mib 1024] [--seconds 1]\n"
                  "  --amx: q4_k,q8_0 on avx512vnni,amx at batch 1,16,64,256 with --amx-min-rows 1\n");
      return 0;
    } else fail("unknown argument '{}' (--help)", a);
  }
  std::vector<CpuIsa> isa_list;
  if (isas.empty()) {
    for (CpuIsa i : {CpuIsa::AVX2, CpuIsa::AVX512, CpuIsa::AMX})
      if (cpu_isa_supported(i)) isa_list.push_back(i);
    if (isa_list.empty()) isa_list.push_back(CpuIsa::Scalar);
  } else {
    for (auto& s : isas) isa_list.push_back(parse_isa(s));
  }
  for (CpuIsa i : isa_list)
    if (!cpu_isa_supported(i)) fail("this CPU cannot run {} (best: {})", cpu_isa_name(i), cpu_isa_name(cpu_isa_best()));
  if (amx_min_rows < 1) fail("--amx-min-rows {} (>= 1 expected)", amx_min_rows);

  ThreadPool pool(threads, numa_node);
  pool.pin_caller();  // this thread is worker 0
  std::string cpus;
  for (int c : pool.cpus()) cpus += (cpus.empty() ? "" : ",") + std::to_string(c);
  std::printf("threads %d (cpus %s)%s, best ISA %s, NUMA nodes %d\n", pool.size(), cpus.c_str(),
              numa_node >= 0 ? (" on node " + std::to_string(numa_node)).c_str() : "", cpu_isa_name(cpu_isa_best()),
              numa_node_count());
  const double bw = read_bandwidth<false>(pool, mem), bw_pf = read_bandwidth<true>(pool, mem);
  std::printf("host read bandwidth (%d threads, sum over %zu MiB): %.1f GB/s (with software prefetch: %.1f GB/s)\n",
              pool.size(), mem >> 20, bw / 1e9, bw_pf / 1e9);
  std::printf("amx: Q4_K / Q8_0 jobs of >= %d rows on tiles\n\n", amx_min_rows);
  std::printf("| format | ISA | experts | batch | MiB/call | ms/call | rows/s | GB/s | of read bw |\n");
  std::printf("|---|---|---|---|---|---|---|---|---|\n");

  std::mt19937 rng(1);
  for (const std::string& fs : formats) {
    const ExpertFormat fmt = parse_format(fs);
    auto g = make_src(fmt, kDFf, kDModel, rng), u = make_src(fmt, kDFf, kDModel, rng), d = make_src(fmt, kDModel, kDFf, rng);
    PackedExpert base = PackedExpert::pack(g->lin, u->lin, d->lin, numa_node);
    const size_t eb = base.bytes();
    const int max_ne = *std::max_element(n_experts.begin(), n_experts.end());
    const int copies = std::max<int>(2 * max_ne, int((mem + eb - 1) / eb));
    std::vector<PackedExpert> experts;
    experts.reserve(size_t(copies));
    for (int c = 0; c < copies; ++c) {
      PackedExpert e;
      e.gate = base.gate.clone(numa_node);
      e.up = base.up.clone(numa_node);
      e.down = base.down.clone(numa_node);
      for (PackedMatrix* m : {&e.gate, &e.up, &e.down}) make_distinct(*m, c);
      experts.push_back(std::move(e));
    }
    const int max_b = *std::max_element(batches.begin(), batches.end());
    std::vector<float> x(size_t(max_b) * kDModel), y(size_t(max_b) * kDModel);
    std::normal_distribution<float> nd;
    for (auto& v : x) v = nd(rng);
    for (CpuIsa isa : isa_list) {
      ExpertRunner runner(pool, isa, amx_min_rows);
      for (int ne : n_experts)
        for (int b : batches) {
          std::vector<ExpertJob> jobs(static_cast<size_t>(ne));
          int next = 0;
          auto call = [&]() {
            for (int j = 0; j < ne; ++j) {
              ExpertJob& job = jobs[size_t(j)];
              job.expert = &experts[size_t(next)];
              next = (next + 1) % copies;
              job.x = x.data();
              job.y = y.data();
              job.rows.resize(size_t(b));
              job.weights.assign(size_t(b), 1.0f / float(ne));
              for (int r = 0; r < b; ++r) job.rows[size_t(r)] = r;
            }
            const double t0 = now_s();
            runner.run_experts(jobs);
            return now_s() - t0;
          };
          for (int w = 0; w < 2; ++w) call();
          std::vector<double> t;
          const double start = now_s();
          while (t.size() < 5 || (now_s() - start < seconds && t.size() < 100000)) t.push_back(call());
          const double tm = median(t), bytes = double(eb) * ne;
          std::printf("| %s | %s | %d | %d | %.1f | %.3f | %.0f | %.1f | %.2f |\n", expert_format_name(fmt),
                      cpu_isa_name(isa), ne, b, bytes / (1 << 20), tm * 1e3, double(ne) * b / tm, bytes / tm / 1e9,
                      bytes / tm / bw);
          std::fflush(stdout);
        }
    }
  }
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "bench_cpu_experts: %s\n", e.what());
  return 1;
}
