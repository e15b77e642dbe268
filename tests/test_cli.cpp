// The `bigmoe` binary end to end: outputs against the transformers fixtures, and every user
// mistake giving exit code 1 with a message naming the culprit (never a crash).
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "glm_test_util.h"
#include "util/npy.h"

namespace bigmoe {
namespace {

namespace fs = std::filesystem;
using test::fixture;
using test::max_row_rel_err;
using ::testing::HasSubstr;

std::string quote(const std::string& s) {
  std::string q = "'";
  for (char ch : s) q += ch == '\'' ? std::string("'\\''") : std::string(1, ch);
  return q + "'";
}

std::string join_ids(const std::vector<int>& ids) {
  std::string s;
  for (size_t i = 0; i < ids.size(); ++i) s += (i ? "," : "") + std::to_string(ids[i]);
  return s;
}

// A scratch directory unique to this process and test, removed afterwards.
struct TempDir {
  fs::path path;
  TempDir() {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    path = fs::temp_directory_path() /
           ("bigmoe_test_cli_" + std::to_string(::getpid()) + "_" + info->test_suite_name() + "_" + info->name());
    fs::remove_all(path);
    fs::create_directories(path);
  }
  ~TempDir() { fs::remove_all(path); }
  // A copy of a fixture checkpoint to damage.
  fs::path copy_of(const std::string& name) const {
    fs::path dst = path / name;
    fs::copy(fixture(name), dst, fs::copy_options::recursive);
    return dst;
  }
};

struct Result {
  bool exited = false;  // false: killed by a signal
  int code = -1;
  std::string out, err;
};

std::string slurp(const fs::path& p) {
  std::ifstream in(p);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// The binary under test: $BIGMOE_BINARY when set (tests run from a copy of the tree), else
// the one this test was built beside.
std::string binary() {
  const char* env = std::getenv("BIGMOE_BINARY");
  return env && *env ? env : BIGMOE_BINARY;
}

// Runs `bigmoe <args>`, capturing stdout and stderr separately.
Result bigmoe(const std::string& args) {
  static int counter = 0;
  fs::path err = fs::temp_directory_path() /
                 ("bigmoe_test_cli_" + std::to_string(::getpid()) + "_" + std::to_string(counter++) + ".err");
  // One OpenMP thread: the tiny fixtures gain nothing from more, and under `ctest -j` on a
  // small machine spinning thread teams make each run take seconds instead of milliseconds.
  std::string cmd = "OMP_NUM_THREADS=1 " + quote(binary()) + " " + args + " 2>" + quote(err.string());
  Result r;
  FILE* p = ::popen(cmd.c_str(), "r");
  if (!p) {
    ADD_FAILURE() << "popen failed: " << cmd;
    return r;
  }
  char buf[4096];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, p)) > 0) r.out.append(buf, n);
  int status = ::pclose(p);
  r.exited = WIFEXITED(status);
  r.code = r.exited ? WEXITSTATUS(status) : -WTERMSIG(status);
  r.err = slurp(err);
  fs::remove(err);
  return r;
}

// A user error: exit code 1 (not a signal, not 0) and stderr naming the problem.
void expect_user_error(const Result& r, std::initializer_list<std::string> parts) {
  EXPECT_TRUE(r.exited) << "killed by signal " << -r.code << "\nstderr: " << r.err;
  EXPECT_EQ(r.code, 1) << "stderr: " << r.err;
  EXPECT_THAT(r.err, HasSubstr("error"));
  for (const auto& p : parts) EXPECT_THAT(r.err, HasSubstr(p));
}

std::string model_arg(const fs::path& dir) { return "-m " + quote(dir.string()); }

class Cli : public ::testing::Test {
 protected:
  static void SetUpTestSuite() { ref = new test::Reference(test::load_reference("glm5_tiny")); }
  static void TearDownTestSuite() {
    delete ref;
    ref = nullptr;
  }
  static test::Reference* ref;
  const fs::path glm = fixture("glm5_tiny");
  std::string prompt() const { return "--prompt-ids " + join_ids(ref->prompt); }
};
test::Reference* Cli::ref = nullptr;

TEST_F(Cli, LogitsMatchTransformers) {
  TempDir t;
  fs::path out = t.path / "logits.npy", mtp = t.path / "mtp.npy";
  Result r = bigmoe("logits " + model_arg(glm) + " " + prompt() + " --gen 8 --out " + quote(out.string()) +
                    " --mtp-out " + quote(mtp.string()));
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_THAT(r.out, HasSubstr("greedy: " + join_ids(ref->greedy) + "\n"));

  NpyArray a = read_npy(out);
  ASSERT_EQ(a.shape, (std::vector<int64_t>{56, 320}));
  ASSERT_EQ(ref->logits.shape, a.shape);
  EXPECT_LE(max_row_rel_err(a.data.data(), ref->logits.data.data(), 56, 320), 1e-4);

  NpyArray m = read_npy(mtp);
  ASSERT_EQ(m.shape, (std::vector<int64_t>{47, 320}));
  ASSERT_EQ(ref->mtp_logits.shape, m.shape);
  EXPECT_LE(max_row_rel_err(m.data.data(), ref->mtp_logits.data.data(), 47, 320), 1e-4);
}

TEST_F(Cli, RunGreedyMatchesReference) {
  Result r = bigmoe("run " + model_arg(glm) + " " + prompt() + " -n 4 --ignore-eos");
  ASSERT_EQ(r.code, 0) << r.err;
  std::vector<int> first4(ref->greedy.begin(), ref->greedy.begin() + 4);
  EXPECT_EQ(r.out, join_ids(first4) + "\n");
}

TEST_F(Cli, RunSamplingIsDeterministicPerSeed) {
  std::string base = "run " + model_arg(glm) + " " + prompt() + " -n 8 --ignore-eos --temp 0.8";
  Result a = bigmoe(base + " --seed 1");
  Result b = bigmoe(base + " --seed 1");
  Result c = bigmoe(base + " --seed 2");
  ASSERT_EQ(a.code, 0) << a.err;
  ASSERT_EQ(b.code, 0) << b.err;
  ASSERT_EQ(c.code, 0) << c.err;
  EXPECT_EQ(a.out, b.out);
  // 8 comma-separated ids in the vocabulary; another seed may or may not differ.
  for (const Result* x : {&a, &c}) {
    std::vector<std::string> toks;
    std::stringstream ss(x->out.substr(0, x->out.find('\n')));
    for (std::string tok; std::getline(ss, tok, ',');) toks.push_back(tok);
    ASSERT_EQ(toks.size(), 8u) << x->out;
    for (auto& tok : toks) {
      int id = std::stoi(tok);
      EXPECT_GE(id, 0);
      EXPECT_LT(id, 320);
    }
  }
}

TEST_F(Cli, InspectCheckpoint) {
  Result r = bigmoe("inspect " + quote(glm.string()));
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_THAT(r.out, HasSubstr("routed experts"));
  EXPECT_THAT(r.out, HasSubstr("total"));
}

TEST_F(Cli, InspectConfigOnly) {
  std::string cfg = quote((fixture("glm5_config") / "config.json").string());
  Result r = bigmoe("inspect --config-only " + cfg + " --weights fp8");
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_THAT(r.out, HasSubstr("total"));
  EXPECT_THAT(r.out, HasSubstr("routed experts"));
  EXPECT_THAT(r.out, HasSubstr("684."));  // the routed pool in GiB (spec §8)
  Result bad = bigmoe("inspect --config-only " + cfg + " --weights q4");
  EXPECT_TRUE(bad.exited);
  EXPECT_NE(bad.code, 0);
  EXPECT_THAT(bad.err, HasSubstr("q4"));
}

TEST_F(Cli, BadPromptIds) {
  expect_user_error(bigmoe("run " + model_arg(glm) + " --prompt-ids 5,x -n 2"), {"--prompt-ids", "'x'"});
  expect_user_error(bigmoe("run " + model_arg(glm) + " --prompt-ids 5,-3 -n 2"), {"'-3'"});
  expect_user_error(bigmoe("logits " + model_arg(glm) + " --prompt-ids 5,,6 --out /dev/null"), {"--prompt-ids"});
}

TEST_F(Cli, TokenIdOutOfVocab) {
  expect_user_error(bigmoe("run " + model_arg(glm) + " --prompt-ids 5,320 -n 2"), {"320", "vocab"});
}

TEST_F(Cli, MissingModelDir) {
  TempDir t;
  fs::path none = t.path / "no_such_model";
  expect_user_error(bigmoe("run " + model_arg(none) + " --prompt-ids 5 -n 2"), {none.string()});
  expect_user_error(bigmoe("inspect " + quote(none.string())), {none.string()});
}

TEST_F(Cli, ModelDirWithoutConfig) {
  TempDir t;
  fs::path dir = t.copy_of("glm5_tiny");
  fs::remove(dir / "config.json");
  expect_user_error(bigmoe("run " + model_arg(dir) + " --prompt-ids 5 -n 2"), {(dir / "config.json").string()});
}

TEST_F(Cli, PromptLongerThanContext) {
  std::vector<int> ids(300, 5);  // max_position_embeddings is 256
  expect_user_error(bigmoe("run " + model_arg(glm) + " --prompt-ids " + join_ids(ids) + " -n 2"),
                    {"max_position_embeddings", "256"});
  // Prompt fits, prompt + generated tokens do not.
  std::vector<int> ids2(250, 5);
  expect_user_error(bigmoe("logits " + model_arg(glm) + " --prompt-ids " + join_ids(ids2) +
                           " --gen 10 --out /dev/null"),
                    {"max_position_embeddings"});
}

// config.json promises more layers than the weights hold. (num_hidden_layers 6 would be
// satisfied by the MTP layer's tensors, stored as layer 5, so ask for 7.)
TEST_F(Cli, ConfigWithMoreLayersThanWeights) {
  TempDir t;
  fs::path dir = t.copy_of("glm5_tiny");
  nlohmann::json j;
  {
    std::ifstream in(dir / "config.json");
    j = nlohmann::json::parse(in);
  }
  j["num_hidden_layers"] = 7;
  j["mlp_layer_types"].push_back("sparse");
  j["mlp_layer_types"].push_back("sparse");
  j["indexer_types"].push_back("full");
  j["indexer_types"].push_back("full");
  std::ofstream(dir / "config.json") << j.dump(2);
  expect_user_error(bigmoe("run " + model_arg(dir) + " --prompt-ids 5,6 -n 2"), {"model.layers.6."});
}

TEST_F(Cli, TruncatedShard) {
  TempDir t;
  fs::path dir = t.copy_of("glm5_tiny");
  fs::path shard = dir / "model-00002-of-00002.safetensors";
  fs::resize_file(shard, fs::file_size(shard) / 2);
  expect_user_error(bigmoe("run " + model_arg(dir) + " --prompt-ids 5,6 -n 2"), {shard.string()});
  expect_user_error(bigmoe("inspect " + quote(dir.string())), {shard.string()});
  fs::resize_file(shard, 4);  // not even a header length
  expect_user_error(bigmoe("run " + model_arg(dir) + " --prompt-ids 5,6 -n 2"), {shard.string()});
}

TEST_F(Cli, UnknownSubcommandOrMissingArgs) {
  expect_user_error(bigmoe("frobnicate"), {"unknown subcommand 'frobnicate'"});
  Result none = bigmoe("");
  EXPECT_TRUE(none.exited);
  EXPECT_NE(none.code, 0);
  Result no_model = bigmoe("run --prompt-ids 5");
  EXPECT_TRUE(no_model.exited);
  EXPECT_NE(no_model.code, 0);
  EXPECT_THAT(no_model.err, HasSubstr("--model"));
}

}  // namespace
}  // namespace bigmoe
