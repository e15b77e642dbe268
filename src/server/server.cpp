#include "server/server.h"

#include <httplib.h>
#include <fmt/format.h>

#include <atomic>
#include <chrono>
#include <random>

#include "engine/generate.h"
#include "util/error.h"

namespace bigmoe {

using openai::ApiError;
using openai::ojson;

namespace {

long now_s() {
  return long(std::chrono::duration_cast<std::chrono::seconds>(std::chrono::system_clock::now().time_since_epoch()).count());
}

std::string new_id(const char* prefix) {
  static std::atomic<uint64_t> counter{0};
  static const uint64_t salt = std::random_device{}();
  return fmt::format("{}-{:016x}{:04x}", prefix, salt, counter++ & 0xffff);
}

void send_error(httplib::Response& res, const ApiError& e) {
  res.status = e.status;
  res.set_content(e.body().dump(), "application/json");
}

ApiError api_error(int status, const std::string& msg, const std::string& type, const std::string& param = "",
                   const std::string& code = "") {
  ApiError e;
  e.status = status;
  e.message = msg;
  e.type = type;
  e.param = param;
  e.code = code;
  return e;
}

}  // namespace

Server::Server(ServedModel model, ServerOptions opt) : m_(std::move(model)), opt_(std::move(opt)) {
  http_ = std::make_unique<httplib::Server>();
}

Server::~Server() = default;

void Server::stop() { http_->stop(); }

std::vector<int> Server::prompt_tokens(const openai::CompletionRequest& req) const {
  std::string text;
  if (req.chat) {
    ojson ctx = req.template_kwargs;
    ctx["messages"] = req.messages;
    if (!req.tools.is_null()) ctx["tools"] = req.tools;
    ctx["add_generation_prompt"] = true;
    ctx["bos_token"] = m_.tok->bos() >= 0 ? m_.tok->token_text(m_.tok->bos()) : "";
    ctx["eos_token"] = m_.tok->eos() >= 0 ? m_.tok->token_text(m_.tok->eos()) : "";
    try {
      text = m_.chat_template->render(ctx);
    } catch (const Error& e) {
      throw api_error(400, std::string("the chat template failed on these messages: ") + e.what(),
                      "invalid_request_error", "messages");
    }
  } else {
    text = req.prompt;
  }
  std::vector<int> ids = m_.tok->encode(text, /*parse_special=*/req.chat);
  if (m_.tok->add_bos() && m_.tok->bos() >= 0 && (ids.empty() || ids[0] != m_.tok->bos()))
    ids.insert(ids.begin(), m_.tok->bos());
  if (ids.empty()) throw api_error(400, "the prompt is empty", "invalid_request_error", "prompt");
  return ids;
}

bool Server::run() {
  auto& s = *http_;
  s.set_payload_max_length(64 << 20);

  s.Get("/health", [](const httplib::Request&, httplib::Response& res) {
    res.set_content(R"({"status":"ok"})", "application/json");
  });
  s.Get("/v1/models", [this](const httplib::Request&, httplib::Response& res) {
    ojson m = {{"id", m_.name}, {"object", "model"}, {"created", 0}, {"owned_by", "bigmoe"},
               {"context_length", m_.lm->context_length()}};
    res.set_content(ojson{{"object", "list"}, {"data", ojson::array({m})}}.dump(), "application/json");
  });

  auto handle = [this](bool chat) {
    return [this, chat](const httplib::Request& http_req, httplib::Response& res) {
      openai::CompletionRequest req;
      std::vector<int> prompt;
      try {
        req = openai::parse_request(http_req.body, chat);
        if (req.model != m_.name)
          throw api_error(404, fmt::format("The model '{}' does not exist (this server serves '{}')", req.model, m_.name),
                          "invalid_request_error", "model", "model_not_found");
        prompt = prompt_tokens(req);
        if (int(prompt.size()) >= m_.lm->context_length())
          throw api_error(400,
                          fmt::format("This model's maximum context length is {} tokens; the prompt has {} tokens.",
                                      m_.lm->context_length(), prompt.size()),
                          "invalid_request_error", chat ? "messages" : "prompt", "context_length_exceeded");
      } catch (const ApiError& e) {
        return send_error(res, e);
      } catch (const std::exception& e) {
        return send_error(res, api_error(400, e.what(), "invalid_request_error"));
      }

      GenerateRequest g;
      g.prompt = std::move(prompt);
      g.max_tokens = req.max_tokens.value_or(m_.default_max_tokens);
      g.sampler = req.sampler;
      if (!req.seed_given) g.sampler.seed = std::random_device{}();
      g.stop_ids = m_.stop_ids;
      g.stop_strings = req.stop;
      std::string id = new_id(chat ? "chatcmpl" : "cmpl");
      long created = now_s();

      if (!req.stream) {
        std::lock_guard<std::mutex> lock(gen_mutex_);
        try {
          GenerateResult r = generate(*m_.lm, *m_.tok, g);
          openai::Usage u{r.prompt_tokens, int(r.tokens.size())};
          res.set_content(openai::completion_response(req, id, created, r.text, r.finish_reason, u).dump(),
                          "application/json");
        } catch (const std::exception& e) {
          send_error(res, api_error(500, e.what(), "server_error"));
        }
        return;
      }
      res.set_header("Cache-Control", "no-cache");
      res.set_chunked_content_provider(
          "text/event-stream", [this, req, g, id, created](size_t, httplib::DataSink& sink) {
            std::lock_guard<std::mutex> lock(gen_mutex_);
            const std::string role = "assistant";
            auto write = [&](const std::string& s) { return sink.write(s.data(), s.size()); };
            bool ok = write(openai::stream_chunk(req, id, created, req.chat ? &role : nullptr, "", nullptr));
            GenerateResult r;
            try {
              r = generate(*m_.lm, *m_.tok, g, [&](const std::string& text) {
                return ok = ok && write(openai::stream_chunk(req, id, created, nullptr, text, nullptr));
              });
            } catch (const std::exception& e) {
              ApiError err = api_error(500, e.what(), "server_error");
              write("data: " + err.body().dump() + "\n\n");
              sink.done();
              return false;
            }
            if (ok) ok = write(openai::stream_chunk(req, id, created, nullptr, "", &r.finish_reason));
            if (ok && req.include_usage)
              ok = write(openai::stream_usage_chunk(req, id, created, {r.prompt_tokens, int(r.tokens.size())}));
            if (ok) write(openai::stream_done());
            sink.done();
            return true;
          });
    };
  };
  s.Post("/v1/chat/completions", handle(true));
  s.Post("/v1/completions", handle(false));
  s.set_error_handler([](const httplib::Request& req, httplib::Response& res) {
    if (!res.body.empty()) return;
    ApiError e = api_error(res.status, fmt::format("{} {}: {}", req.method, req.path,
                                                   res.status == 404 ? "no such endpoint" : "request failed"),
                           res.status == 404 ? "not_found_error" : "invalid_request_error");
    res.set_content(e.body().dump(), "application/json");
  });

  port_ = opt_.port;
  if (port_ == 0) port_ = s.bind_to_any_port(opt_.host);
  else if (!s.bind_to_port(opt_.host, port_)) port_ = -1;
  if (port_ < 0) {
    fmt::print(stderr, "error: cannot listen on {}:{} (in use, or not an address of this machine)\n", opt_.host, opt_.port);
    return false;
  }
  fmt::print(stderr, "bigmoe: serving '{}' on http://{}:{}/v1 (one request at a time)\n", m_.name, opt_.host, port_);
  return s.listen_after_bind();
}

}  // namespace bigmoe
