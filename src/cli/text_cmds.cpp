#include "cli/text_cmds.h"

#include <fmt/format.h>

#include <cmath>
#include <csignal>
#include <fstream>
#include <iostream>
#include <optional>
#include <sstream>

#ifdef BIGMOE_WITH_CUDA
#include "backend/cuda/glm_dsa_cuda.h"
#include "plan/expert_placement.h"
#endif
#include "engine/generate.h"
#include "engine/model_loader.h"
#include "model/glm_dsa.h"
#include "plan/plan_file.h"
#include "server/server.h"
#include "util/error.h"

namespace bigmoe::cli {

struct TextCommands::Opts {
  CLI::App *serve = nullptr, *chat = nullptr, *complete = nullptr, *ppl = nullptr;
  std::string model, host = "127.0.0.1", prompt, file, system;
  int port = 8080, n = 256, ctx = 0;
  bool gpu = false;
  int gpu_ctx = 0;  // 0: the plan's context, else 8192
  std::string plan, placement;
  int cache_slots = 0, cpu_threads = 0;
  std::string cache_policy = "lru", prefetch = "on";
  std::vector<CLI::Option*> engine_opts;  // meaningful only with the GPU engine (every subcommand's)
  // Whether the subcommand run got engine option `name` (the runtime cache flags, when given,
  // win over the plan file's expert_cache).
  bool given(const std::string& name) const {
    for (const CLI::Option* opt : engine_opts)
      if (opt->get_name() == name && opt->count()) return true;
    return false;
  }
  SamplerConfig sampler;
};

namespace {

Server* g_server = nullptr;
void on_signal(int) {
  if (g_server) g_server->stop();
}

const Tokenizer& need_tokenizer(const LoadedModel& m) {
  if (!m.tokenizer) fail("model '{}' has no tokenizer (tokenizer.json or GGUF tokenizer metadata)", m.name);
  return *m.tokenizer;
}

}  // namespace

TextCommands::TextCommands(CLI::App& app) : o_(std::make_unique<Opts>()) {
  Opts& o = *o_;
  auto model_opt = [&](CLI::App* a) {
    a->add_option("-m,--model", o.model, "a GGUF file (llama) or a checkpoint directory (GLM-DSA family)")->required();
    a->add_flag("--gpu", o.gpu, "run a GLM-DSA model on the CUDA device (every weight in GPU memory unless --plan or "
                "--placement says otherwise)");
    a->add_option("--gpu-ctx", o.gpu_ctx, "with --gpu: cache positions per sequence (default: the plan's context, else 8192)")
        ->check(CLI::Range(16, 1 << 20));
    auto* plan = a->add_option("--plan", o.plan,
                               "a plan file (`bigmoe plan --out`): where every routed expert lives; implies --gpu");
    a->add_option("--placement", o.placement,
                  "without a plan file, every routed expert in one place; implies --gpu")
        ->check(CLI::IsMember({"all-gpu", "experts-cpu", "experts-streamed", "mixed"}))
        ->excludes(plan);
    o.engine_opts.push_back(a->add_option("--expert-cache-slots", o.cache_slots,
                                          "GPU slots per MoE layer that keep streamed experts after use (0: copy on "
                                          "every use; default: the plan's expert_cache.slots, else 0)")
                                ->check(CLI::NonNegativeNumber));
    o.engine_opts.push_back(a->add_option("--cache-policy", o.cache_policy,
                                          "which streamed experts the slots keep: lru | lfu (default: the plan's, "
                                          "else lru)")
                                ->check(CLI::IsMember({"lru", "lfu"})));
    o.engine_opts.push_back(a->add_option("--expert-prefetch", o.prefetch,
                                          "copy the experts the next layer is predicted to pick into its cache slots "
                                          "ahead of time: on | off (default: the plan's, else off; needs cache slots)")
                                ->check(CLI::IsMember({"on", "off"})));
    o.engine_opts.push_back(a->add_option("--cpu-threads", o.cpu_threads,
                                          "threads of the CPU expert kernels (0: all cores)")
                                ->check(CLI::NonNegativeNumber));
  };
  auto sampling = [&](CLI::App* a) {
    a->add_option("--temp", o.sampler.temperature, "sampling temperature (0 = greedy)")->check(CLI::Range(0.0, 100.0));
    a->add_option("--top-k", o.sampler.top_k, "keep the k most likely tokens (0 = off)")->check(CLI::NonNegativeNumber);
    a->add_option("--top-p", o.sampler.top_p, "nucleus sampling mass (1 = off)")->check(CLI::Range(0.0, 1.0));
    a->add_option("--seed", o.sampler.seed, "random seed");
  };
  o.serve = app.add_subcommand("serve", "OpenAI-compatible HTTP server (/v1/chat/completions, /v1/completions, /v1/models, /health)");
  model_opt(o.serve);
  o.serve->add_option("--host", o.host, "address to bind (default 127.0.0.1: this machine only)");
  o.serve->add_option("--port", o.port, "port (0 picks a free one)")->check(CLI::Range(0, 65535));
  o.serve->add_option("-n,--max-tokens", o.n, "default max_tokens when a request gives none")->check(CLI::Range(1, 1 << 24));

  o.chat = app.add_subcommand("chat", "interactive chat in the terminal, streaming the answer");
  model_opt(o.chat);
  o.chat->add_option("--system", o.system, "system prompt");
  o.chat->add_option("-n,--max-tokens", o.n, "max tokens per answer")->check(CLI::Range(1, 1 << 24));
  sampling(o.chat);
  o.sampler.temperature = 0.7;

  o.complete = app.add_subcommand("complete", "continue a text prompt, streaming to stdout");
  model_opt(o.complete);
  o.complete->add_option("-p,--prompt", o.prompt, "prompt text")->required();
  o.complete->add_option("-n,--n-predict", o.n, "tokens to generate")->check(CLI::Range(1, 1 << 24));
  sampling(o.complete);

  o.ppl = app.add_subcommand("perplexity", "perplexity of a text file: exp(mean negative log-likelihood)");
  model_opt(o.ppl);
  o.ppl->add_option("-f,--file", o.file, "text file")->required()->check(CLI::ExistingFile);
  o.ppl->add_option("-c,--ctx", o.ctx, "window size in tokens (0 = the whole text, up to the model's context)")
      ->check(CLI::NonNegativeNumber);
}

TextCommands::~TextCommands() = default;

bool TextCommands::selected() const { return o_->serve->parsed() || o_->chat->parsed() || o_->complete->parsed() || o_->ppl->parsed(); }

int TextCommands::run() {
  Opts& o = *o_;
  const char* engine = !o.plan.empty() ? "--plan" : !o.placement.empty() ? "--placement" : o.gpu ? "--gpu" : nullptr;
  for (CLI::Option* opt : o.engine_opts)
    if (opt->count() && !engine) fail("{} applies to the GPU engine: add --gpu, --plan or --placement", opt->get_name());
  // A plan file is read before the model, so that its mistakes show before a long load.
  std::optional<plan::EnginePlan> ep;
  if (!o.plan.empty()) ep = plan::load_plan_file(o.plan);
  fmt::print(stderr, "loading {} ...\n", o.model);
  LoadedModel m = load_model(o.model);
  std::unique_ptr<GlmDsaModel> glm;
  if (engine) {
    if (!dynamic_cast<GlmDsaModel*>(m.lm.get()))
      fail("{}: '{}' is not a GLM-DSA checkpoint; only the GLM-DSA family runs on the GPU", engine, m.name);
    glm.reset(static_cast<GlmDsaModel*>(m.lm.release()));
    if (!o.placement.empty()) ep = plan::placement_plan(glm->config(), o.placement);
    if (ep) {
      plan::check_plan_against(*ep, glm->config());
      fmt::print(stderr, "plan: {}\n", ep->summary());
    }
  }
  const Tokenizer& tok = need_tokenizer(m);
  if (engine) {
#ifdef BIGMOE_WITH_CUDA
    cuda::GlmDsaCudaOptions go;
    int ctx = o.gpu_ctx > 0 ? o.gpu_ctx : ep && ep->ctx > 0 ? int(std::min<int64_t>(ep->ctx, 1 << 20)) : 8192;
    go.max_context = std::min(ctx, glm->context_length());
    go.max_sequences = 2;  // the server's live session and the one that replaces it
    go.max_rows = 512;
    go.progress = true;
    if (ep) {
      go.experts = plan::expert_placement(*ep);
      go.device = ep->gpus[0];
    }
    if (o.given("--expert-cache-slots")) go.experts.cache_slots = o.cache_slots;
    if (o.given("--cache-policy")) go.experts.cache_policy = o.cache_policy;
    if (o.given("--expert-prefetch")) go.experts.prefetch = o.prefetch == "on";
    go.experts.cpu_threads = o.cpu_threads;
    m.lm = cuda::make_cuda_language_model(std::move(glm), go);
#else
    fail("{}: this build of bigmoe has no CUDA backend (nvcc was not found at configure time)", engine);
#endif
  }

  if (o.serve->parsed()) {
    if (!m.chat_template) fail("model '{}' has no chat template; /v1/chat/completions needs one", m.name);
    ServedModel sm{m.name, m.lm.get(), &tok, &*m.chat_template, m.stop_ids, o.n};
    Server server(sm, ServerOptions{o.host, o.port});
    g_server = &server;
    std::signal(SIGINT, on_signal);
    std::signal(SIGTERM, on_signal);
    fmt::print(stderr,
               "try: curl http://{}:{}/v1/chat/completions -H 'Content-Type: application/json' "
               "-d '{{\"model\": \"{}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello!\"}}]}}'\n",
               o.host, o.port, m.name);
    bool ok = server.run();
    g_server = nullptr;
    return ok ? 0 : 1;
  }

  if (o.complete->parsed()) {
    GenerateRequest g;
    g.prompt = tok.encode(o.prompt, false);
    if (tok.add_bos() && tok.bos() >= 0) g.prompt.insert(g.prompt.begin(), tok.bos());
    g.max_tokens = o.n;
    g.sampler = o.sampler;
    g.stop_ids = m.stop_ids;
    fmt::print("{}", o.prompt);
    GenerateResult r = generate(*m.lm, tok, g, [](const std::string& s) {
      fmt::print("{}", s);
      std::fflush(stdout);
      return true;
    });
    fmt::print("\n");
    fmt::print(stderr, "prompt {} tokens in {:.2f} s ({:.1f} tok/s), generated {} tokens in {:.2f} s ({:.1f} tok/s)\n",
               r.prompt_tokens, r.prefill_s, r.prompt_tokens / std::max(r.prefill_s, 1e-9), r.tokens.size(),
               r.decode_s, r.tokens.size() / std::max(r.decode_s, 1e-9));
    return 0;
  }

  if (o.chat->parsed()) {
    if (!m.chat_template) fail("model '{}' has no chat template", m.name);
    nlohmann::ordered_json messages = nlohmann::ordered_json::array();
    if (!o.system.empty()) messages.push_back({{"role", "system"}, {"content", o.system}});
    fmt::print(stderr, "chatting with {} (empty line or Ctrl-D to quit)\n", m.name);
    std::string line;
    while (true) {
      fmt::print("> ");
      std::fflush(stdout);
      if (!std::getline(std::cin, line) || line.empty()) break;
      messages.push_back({{"role", "user"}, {"content", line}});
      nlohmann::ordered_json ctx = {{"messages", messages}, {"add_generation_prompt", true},
                                    {"bos_token", tok.bos() >= 0 ? tok.token_text(tok.bos()) : ""},
                                    {"eos_token", tok.eos() >= 0 ? tok.token_text(tok.eos()) : ""}};
      GenerateRequest g;
      g.prompt = tok.encode(m.chat_template->render(ctx), true);
      if (tok.add_bos() && tok.bos() >= 0 && (g.prompt.empty() || g.prompt[0] != tok.bos()))
        g.prompt.insert(g.prompt.begin(), tok.bos());
      if (int(g.prompt.size()) >= m.lm->context_length()) {
        fmt::print(stderr, "the conversation no longer fits the context ({} tokens); start a new chat\n",
                   m.lm->context_length());
        break;
      }
      g.max_tokens = o.n;
      g.sampler = o.sampler;
      g.sampler.seed = o.sampler.seed + messages.size();
      g.stop_ids = m.stop_ids;
      GenerateResult r = generate(*m.lm, tok, g, [](const std::string& s) {
        fmt::print("{}", s);
        std::fflush(stdout);
        return true;
      });
      fmt::print("\n");
      messages.push_back({{"role", "assistant"}, {"content", r.text}});
    }
    return 0;
  }

  // perplexity
  std::ifstream in(o.file, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  std::vector<int> ids = tok.encode(ss.str(), false);
  if (tok.add_bos() && tok.bos() >= 0) ids.insert(ids.begin(), tok.bos());
  int window = o.ctx > 0 ? o.ctx : m.lm->context_length();
  window = std::min(window, m.lm->context_length());
  if (ids.size() < 2) fail("{}: fewer than 2 tokens of text", o.file);
  double nll = 0;
  size_t count = 0;
  // Non-overlapping windows; every token but each window's first is scored.
  for (size_t start = 0; start + 1 < ids.size(); start += window) {
    size_t end = std::min(ids.size(), start + size_t(window));
    auto session = m.lm->new_session();
    const int V = m.lm->vocab_size();
    std::vector<int> chunk(ids.begin() + start, ids.begin() + end - 1);
    std::vector<float> logits = session->feed_all(chunk);
    for (size_t t = 0; t < chunk.size(); ++t) {
      const float* row = &logits[t * V];
      double mx = -INFINITY, z = 0;
      for (int i = 0; i < V; ++i) mx = std::max(mx, double(row[i]));
      for (int i = 0; i < V; ++i) z += std::exp(double(row[i]) - mx);
      nll += -(double(row[ids[start + t + 1]]) - mx - std::log(z));
      ++count;
    }
  }
  double ppl = std::exp(nll / double(count));
  fmt::print("tokens {}  scored {}  window {}  mean nll {:.6f}  perplexity {:.4f}\n", ids.size(), count, window,
             nll / double(count), ppl);
  return 0;
}

}  // namespace bigmoe::cli
