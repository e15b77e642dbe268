#include "plan/machine.h"

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <regex>
#include <sstream>
#include <thread>

#include "util/error.h"

namespace bigmoe::plan {

using nlohmann::json;
namespace fs = std::filesystem;

double Machine::link_gbps(int g, int n) const {
  const GpuSpec& s = gpus.at(size_t(g));
  return s.numa_node == n ? s.h2d_gbps : remote_h2d_gbps;
}

double Machine::host_memory_gib() const {
  double s = 0;
  for (auto& n : nodes) s += n.memory_gib;
  return s;
}

namespace {

// Typed access to one JSON object of the file; `where` is the path of the object in the file
// ("gpus[1]") so every message names the field exactly.
struct Obj {
  const json& j;
  std::string src, where;

  std::string field(const std::string& k) const { return where.empty() ? k : where + "." + k; }
  void only(std::initializer_list<const char*> known) const {
    if (!j.is_object()) fail("{}: '{}' must be an object", src, where.empty() ? "(top level)" : where);
    for (auto& [k, v] : j.items()) {
      bool ok = false;
      for (const char* n : known) ok |= k == n;
      if (!ok) {
        std::vector<std::string> names(known.begin(), known.end());
        fail("{}: unknown field '{}' (known here: {})", src, field(k), fmt::join(names, ", "));
      }
    }
  }
  bool has(const char* k) const { return j.contains(k) && !j.at(k).is_null(); }
  double num(const char* k, bool required, double def = 0, bool positive = true) const {
    if (!has(k)) {
      if (required) fail("{}: missing required field '{}'", src, field(k));
      return def;
    }
    const json& v = j.at(k);
    if (!v.is_number()) fail("{}: field '{}' must be a number, found {}", src, field(k), v.dump());
    double x = v.get<double>();
    if (positive ? !(x > 0) : !(x >= 0))
      fail("{}: field '{}' = {} must be {}", src, field(k), x, positive ? "> 0" : ">= 0");
    return x;
  }
  int integer(const char* k, bool required, int def, int lo) const {
    if (!has(k)) {
      if (required) fail("{}: missing required field '{}'", src, field(k));
      return def;
    }
    const json& v = j.at(k);
    if (!v.is_number_integer()) fail("{}: field '{}' must be an integer, found {}", src, field(k), v.dump());
    int64_t x = v.get<int64_t>();
    if (x < lo || x > (1 << 20)) fail("{}: field '{}' = {} is out of range", src, field(k), x);
    return int(x);
  }
  std::string str(const char* k, const std::string& def) const {
    if (!has(k)) return def;
    const json& v = j.at(k);
    if (!v.is_string()) fail("{}: field '{}' must be a string, found {}", src, field(k), v.dump());
    return v.get<std::string>();
  }
  const json& arr(const char* k, bool required) const {
    static const json empty = json::array();
    if (!has(k)) {
      if (required) fail("{}: missing required field '{}'", src, field(k));
      return empty;
    }
    const json& v = j.at(k);
    if (!v.is_array()) fail("{}: field '{}' must be a list", src, field(k));
    return v;
  }
};

}  // namespace

Machine machine_from_json(const json& j, const std::string& source) {
  Obj top{j, source, ""};
  top.only({"name", "notes", "gpus", "numa_nodes", "remote_h2d_gbps", "p2p_gbps"});
  Machine m;
  m.source = source;
  m.name = top.str("name", fs::path(source).stem().string());
  if (top.has("notes")) {
    const json& n = j.at("notes");
    if (n.is_string()) {
      m.notes.push_back(n.get<std::string>());
    } else if (n.is_array()) {
      for (auto& s : n) {
        if (!s.is_string()) fail("{}: field 'notes' must be a string or a list of strings", source);
        m.notes.push_back(s.get<std::string>());
      }
    } else {
      fail("{}: field 'notes' must be a string or a list of strings", source);
    }
  }
  const json& nodes = top.arr("numa_nodes", true);
  if (nodes.empty()) fail("{}: 'numa_nodes' must list at least one node", source);
  for (size_t i = 0; i < nodes.size(); ++i) {
    Obj o{nodes[i], source, fmt::format("numa_nodes[{}]", i)};
    o.only({"memory_gib", "read_gbps", "cores", "tflops", "mem_gbps"});
    NumaNode n;
    n.memory_gib = o.num("memory_gib", true);
    n.read_gbps = o.num("read_gbps", true);
    n.cores = o.integer("cores", true, 0, 1);
    n.tflops = o.num("tflops", false, 0.05 * n.cores);
    n.mem_gbps = o.num("mem_gbps", false, 0.0);
    m.nodes.push_back(n);
  }
  const json& gpus = top.arr("gpus", false);
  for (size_t i = 0; i < gpus.size(); ++i) {
    Obj o{gpus[i], source, fmt::format("gpus[{}]", i)};
    o.only({"name", "memory_gib", "mem_gbps", "h2d_gbps", "numa_node", "tflops", "decode_efficiency"});
    GpuSpec g;
    g.name = o.str("name", fmt::format("gpu{}", i));
    g.memory_gib = o.num("memory_gib", true);
    g.mem_gbps = o.num("mem_gbps", true);
    g.h2d_gbps = o.num("h2d_gbps", true);
    g.tflops = o.num("tflops", true);
    g.numa_node = o.integer("numa_node", false, 0, 0);
    g.decode_efficiency = o.num("decode_efficiency", false, 1.0);
    if (!(g.decode_efficiency > 0 && g.decode_efficiency <= 1))
      fail("{}: field '{}' = {} must be in (0, 1]", source, o.field("decode_efficiency"), g.decode_efficiency);
    if (g.numa_node >= int(m.nodes.size()))
      fail("{}: field '{}' = {} but the file lists {} NUMA node(s)", source, o.field("numa_node"), g.numa_node,
           m.nodes.size());
    m.gpus.push_back(g);
  }
  bool remote_needed = m.nodes.size() > 1 && !m.gpus.empty();
  m.remote_h2d_gbps = top.num("remote_h2d_gbps", remote_needed, 0, remote_needed);
  m.p2p_gbps = top.num("p2p_gbps", false, 0, false);
  return m;
}

Machine load_machine(const fs::path& file) {
  std::ifstream in(file);
  if (!in) fail("machine file '{}' cannot be opened", file.string());
  json j;
  try {
    j = json::parse(in);
  } catch (const json::exception& e) {
    fail("machine file '{}' is not valid JSON: {}", file.string(), e.what());
  }
  return machine_from_json(j, file.string());
}

json machine_to_json(const Machine& m) {
  json j;
  j["name"] = m.name;
  if (!m.notes.empty()) j["notes"] = m.notes;
  j["gpus"] = json::array();
  for (auto& g : m.gpus)
    j["gpus"].push_back({{"name", g.name},
                         {"memory_gib", g.memory_gib},
                         {"mem_gbps", g.mem_gbps},
                         {"h2d_gbps", g.h2d_gbps},
                         {"numa_node", g.numa_node},
                         {"tflops", g.tflops},
                         {"decode_efficiency", g.decode_efficiency}});
  j["numa_nodes"] = json::array();
  for (auto& n : m.nodes) {
    j["numa_nodes"].push_back(
        {{"memory_gib", n.memory_gib}, {"read_gbps", n.read_gbps}, {"cores", n.cores}, {"tflops", n.tflops}});
    if (n.mem_gbps > 0) j["numa_nodes"].back()["mem_gbps"] = n.mem_gbps;
  }
  j["remote_h2d_gbps"] = m.remote_h2d_gbps;
  j["p2p_gbps"] = m.p2p_gbps;
  return j;
}

// ---- probing ----

namespace {
GpuProbe& gpu_probe() {
  static GpuProbe p;
  return p;
}

std::string read_text(const fs::path& p) {
  std::ifstream in(p);
  if (!in) return {};
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}
}  // namespace

void set_gpu_probe(GpuProbe probe) { gpu_probe() = std::move(probe); }

std::vector<int> parse_cpulist(const std::string& s) {
  std::vector<int> out;
  std::stringstream ss(s);
  std::string part;
  while (std::getline(ss, part, ',')) {
    part.erase(std::remove_if(part.begin(), part.end(), ::isspace), part.end());
    if (part.empty()) continue;
    size_t dash = part.find('-');
    try {
      int a = std::stoi(part.substr(0, dash));
      int b = dash == std::string::npos ? a : std::stoi(part.substr(dash + 1));
      if (a < 0 || b < a) throw std::invalid_argument(part);
      for (int c = a; c <= b; ++c) out.push_back(c);
    } catch (const std::exception&) {
      fail("cpu list '{}': bad entry '{}'", s, part);
    }
  }
  return out;
}

int64_t parse_meminfo_kb(const std::string& text, const std::string& key) {
  std::regex re("(^|\\n)[^\\n]*\\b" + key + ":\\s*(\\d+)\\s*kB");
  std::smatch m;
  if (!std::regex_search(text, m, re)) return -1;
  return std::stoll(m[2]);
}

double measure_host_read_gbps(int threads, uint64_t bytes, int passes) {
  size_t n = size_t(bytes / sizeof(uint64_t));
  BIGMOE_CHECK(n >= 1024, "host read probe: buffer of {} bytes is too small", bytes);
  std::unique_ptr<uint64_t[]> buf(new uint64_t[n]);
  // First touch from the same threads that read, so pages land on their nodes.
#pragma omp parallel for num_threads(threads) schedule(static)
  for (size_t i = 0; i < n; ++i) buf[i] = i;
  double best = 0;
  volatile uint64_t sink = 0;
  for (int p = 0; p < std::max(1, passes); ++p) {
    auto t0 = std::chrono::steady_clock::now();
    uint64_t s = 0;
#pragma omp parallel for num_threads(threads) schedule(static) reduction(+ : s)
    for (size_t i = 0; i < n; ++i) s += buf[i];
    double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    sink = sink + s;
    best = std::max(best, double(n * sizeof(uint64_t)) / dt / 1e9);
  }
  (void)sink;
  return best;
}

Machine probe_machine(const ProbeOptions& o) {
  Machine m;
  m.name = "probed";
  m.source = "probed";
  std::string meminfo = read_text("/proc/meminfo");
  int64_t avail_kb = parse_meminfo_kb(meminfo, "MemAvailable");
  // NUMA nodes from sysfs; one node from /proc/meminfo when sysfs has none.
  std::vector<int> node_ids;
  std::error_code ec;
  for (auto& e : fs::directory_iterator("/sys/devices/system/node", ec)) {
    std::string n = e.path().filename().string();
    if (n.size() > 4 && n.rfind("node", 0) == 0 && std::all_of(n.begin() + 4, n.end(), ::isdigit))
      node_ids.push_back(std::stoi(n.substr(4)));
  }
  std::sort(node_ids.begin(), node_ids.end());
  int total_cores = 0;
  for (int id : node_ids) {
    fs::path d = fmt::format("/sys/devices/system/node/node{}", id);
    NumaNode n;
    n.memory_gib = double(parse_meminfo_kb(read_text(d / "meminfo"), "MemTotal")) / (1 << 20);
    std::string cl = read_text(d / "cpulist");
    n.cores = cl.empty() ? 0 : int(parse_cpulist(cl).size());
    if (n.memory_gib <= 0 || n.cores == 0) continue;  // memory-only or CPU-less nodes
    total_cores += n.cores;
    m.nodes.push_back(n);
  }
  if (m.nodes.empty()) {
    NumaNode n;
    int64_t kb = parse_meminfo_kb(meminfo, "MemTotal");
    BIGMOE_CHECK(kb > 0, "probe: cannot read MemTotal from /proc/meminfo; pass --machine FILE");
    n.memory_gib = double(kb) / (1 << 20);
    n.cores = int(std::max(1u, std::thread::hardware_concurrency()));
    total_cores = n.cores;
    m.nodes.push_back(n);
    m.notes.push_back("no NUMA information in /sys/devices/system/node: one node assumed");
  }
  int threads = o.threads > 0 ? o.threads : total_cores;
  uint64_t buf = o.buffer_bytes;
  if (!buf) {
    buf = 1ull << 30;
    if (avail_kb > 0) buf = std::min<uint64_t>(buf, uint64_t(avail_kb) * 1024 / 8);
  }
  double gbps = measure_host_read_gbps(threads, buf, o.passes);
  // One machine-wide measurement, shared among the nodes by cores (binding threads to each
  // node needs libnuma; a machine file gives per-node figures).
  for (auto& n : m.nodes) {
    n.read_gbps = gbps * n.cores / total_cores;
    n.tflops = 0.05 * n.cores;
  }
  m.notes.push_back(fmt::format("host read {:.1f} GB/s measured with {} threads over {:.0f} MiB{}", gbps, threads,
                                double(buf) / (1 << 20), m.nodes.size() > 1 ? " (split among nodes by cores)" : ""));
  m.notes.push_back("CPU TFLOP/s assumed: 0.05 per core");
  if (gpu_probe()) {
    m.gpus = gpu_probe()(m.notes);
    for (auto& g : m.gpus)
      if (g.numa_node >= int(m.nodes.size())) g.numa_node = 0;
  } else {
    m.notes.push_back("this build has no GPU probe (CPU-only build): no GPU; pass --machine FILE to plan for one");
  }
  if (m.nodes.size() > 1 && !m.gpus.empty()) {
    double lo = m.gpus[0].h2d_gbps;
    for (auto& g : m.gpus) lo = std::min(lo, g.h2d_gbps);
    m.remote_h2d_gbps = lo / 2;
    m.notes.push_back("remote host->GPU bandwidth not measured: assumed half the local figure");
  }
  return m;
}

}  // namespace bigmoe::plan
