#include "server/openai.h"

namespace bigmoe::openai {

ojson ApiError::body() const {
  ojson e = {{"message", message}, {"type", type}, {"param", param.empty() ? ojson(nullptr) : ojson(param)},
             {"code", code.empty() ? ojson(nullptr) : ojson(code)}};
  return ojson{{"error", e}};
}

namespace {

[[noreturn]] void bad(const std::string& param, const std::string& msg, const std::string& code = "") {
  ApiError e;
  e.status = 400;
  e.param = param;
  e.message = msg;
  e.code = code;
  throw e;
}

double number(const ojson& j, const char* k, double lo, double hi, double def) {
  if (!j.contains(k) || j[k].is_null()) return def;
  if (!j[k].is_number()) bad(k, std::string("'") + k + "' must be a number");
  double v = j[k].get<double>();
  if (v < lo || v > hi) bad(k, std::string("'") + k + "' must be between " + std::to_string(lo) + " and " + std::to_string(hi));
  return v;
}

std::optional<long long> integer(const ojson& j, const char* k, long long lo, long long hi) {
  if (!j.contains(k) || j[k].is_null()) return std::nullopt;
  if (!j[k].is_number_integer()) bad(k, std::string("'") + k + "' must be an integer");
  long long v = j[k].get<long long>();
  if (v < lo || v > hi) bad(k, std::string("'") + k + "' must be between " + std::to_string(lo) + " and " + std::to_string(hi));
  return v;
}

void check_messages(const ojson& msgs) {
  if (!msgs.is_array()) bad("messages", "'messages' must be an array");
  if (msgs.empty()) bad("messages", "'messages' must contain at least one message");
  for (size_t i = 0; i < msgs.size(); ++i) {
    const ojson& m = msgs[i];
    std::string p = "messages[" + std::to_string(i) + "]";
    if (!m.is_object()) bad(p, p + " must be an object");
    if (!m.contains("role") || !m["role"].is_string()) bad(p + ".role", p + " is missing 'role'");
    std::string role = m["role"];
    if (role != "system" && role != "user" && role != "assistant" && role != "tool" && role != "developer")
      bad(p + ".role", "unknown role '" + role + "' in " + p);
    bool has_calls = m.contains("tool_calls") && !m["tool_calls"].is_null();
    if (!m.contains("content") && !(role == "assistant" && has_calls)) bad(p + ".content", p + " is missing 'content'");
    if (m.contains("content") && !m["content"].is_string() && !m["content"].is_array() && !m["content"].is_null())
      bad(p + ".content", p + ".content must be a string or an array of content parts");
  }
}

}  // namespace

CompletionRequest parse_request(const std::string& body, bool chat) {
  ojson j;
  try {
    j = ojson::parse(body);
  } catch (const std::exception& e) {
    bad("", std::string("could not parse the request body as JSON: ") + e.what());
  }
  if (!j.is_object()) bad("", "the request body must be a JSON object");
  CompletionRequest r;
  r.chat = chat;
  if (!j.contains("model") || !j["model"].is_string()) bad("model", "you must provide a model parameter");
  r.model = j["model"];
  if (chat) {
    if (!j.contains("messages")) bad("messages", "missing required parameter: 'messages'");
    check_messages(j["messages"]);
    r.messages = j["messages"];
    if (j.contains("tools") && !j["tools"].is_null()) {
      if (!j["tools"].is_array()) bad("tools", "'tools' must be an array");
      r.tools = j["tools"];
    }
    if (j.contains("chat_template_kwargs") && !j["chat_template_kwargs"].is_null()) {
      if (!j["chat_template_kwargs"].is_object()) bad("chat_template_kwargs", "'chat_template_kwargs' must be an object");
      r.template_kwargs = j["chat_template_kwargs"];
    }
  } else {
    if (!j.contains("prompt")) bad("prompt", "missing required parameter: 'prompt'");
    const ojson& p = j["prompt"];
    if (p.is_string()) r.prompt = p;
    else if (p.is_array() && p.size() == 1 && p[0].is_string()) r.prompt = p[0];
    else bad("prompt", "'prompt' must be a string (batched prompts are not supported)");
  }
  if (j.contains("stream") && !j["stream"].is_null()) {
    if (!j["stream"].is_boolean()) bad("stream", "'stream' must be a boolean");
    r.stream = j["stream"];
  }
  if (j.contains("stream_options") && j["stream_options"].is_object())
    r.include_usage = j["stream_options"].value("include_usage", false);
  auto mt = integer(j, "max_completion_tokens", 1, 1 << 24);
  if (!mt) mt = integer(j, "max_tokens", 1, 1 << 24);
  if (mt) r.max_tokens = int(*mt);
  r.sampler.temperature = number(j, "temperature", 0.0, 2.0, 1.0);
  r.sampler.top_p = number(j, "top_p", 0.0, 1.0, 1.0);
  if (r.sampler.top_p == 0.0) bad("top_p", "'top_p' must be greater than 0");
  if (auto k = integer(j, "top_k", -1, 1 << 20)) r.sampler.top_k = int(std::max<long long>(*k, 0));
  if (auto s = integer(j, "seed", INT64_MIN, INT64_MAX)) {
    r.sampler.seed = uint64_t(*s);
    r.seed_given = true;
  }
  if (auto n = integer(j, "n", 1, 128); n && *n != 1) bad("n", "only n = 1 is supported");
  if (j.contains("stop") && !j["stop"].is_null()) {
    const ojson& s = j["stop"];
    if (s.is_string()) r.stop.push_back(s);
    else if (s.is_array()) {
      if (s.size() > 4) bad("stop", "'stop' may hold at most 4 sequences");
      for (auto& x : s) {
        if (!x.is_string()) bad("stop", "'stop' must be a string or an array of strings");
        r.stop.push_back(x);
      }
    } else bad("stop", "'stop' must be a string or an array of strings");
    for (auto& x : r.stop)
      if (x.empty()) bad("stop", "stop sequences must not be empty");
  }
  return r;
}

ojson Usage::json() const {
  return {{"prompt_tokens", prompt_tokens}, {"completion_tokens", completion_tokens},
          {"total_tokens", prompt_tokens + completion_tokens}};
}

ojson completion_response(const CompletionRequest& req, const std::string& id, long created, const std::string& text,
                          const std::string& finish_reason, const Usage& usage) {
  ojson choice;
  if (req.chat) {
    choice = {{"index", 0}, {"message", {{"role", "assistant"}, {"content", text}}}, {"logprobs", nullptr},
              {"finish_reason", finish_reason}};
  } else {
    choice = {{"index", 0}, {"text", text}, {"logprobs", nullptr}, {"finish_reason", finish_reason}};
  }
  return {{"id", id}, {"object", req.chat ? "chat.completion" : "text_completion"}, {"created", created},
          {"model", req.model}, {"choices", ojson::array({choice})}, {"usage", usage.json()}};
}

std::string stream_chunk(const CompletionRequest& req, const std::string& id, long created, const std::string* role,
                         const std::string& text, const std::string* finish_reason) {
  ojson choice;
  if (req.chat) {
    ojson delta = ojson::object();
    if (role) delta["role"] = *role;
    if (!text.empty() || (role && !finish_reason)) delta["content"] = text;
    choice = {{"index", 0}, {"delta", delta}, {"logprobs", nullptr},
              {"finish_reason", finish_reason ? ojson(*finish_reason) : ojson(nullptr)}};
  } else {
    choice = {{"index", 0}, {"text", text}, {"logprobs", nullptr},
              {"finish_reason", finish_reason ? ojson(*finish_reason) : ojson(nullptr)}};
  }
  ojson c = {{"id", id}, {"object", req.chat ? "chat.completion.chunk" : "text_completion"}, {"created", created},
             {"model", req.model}, {"choices", ojson::array({choice})}};
  return "data: " + c.dump() + "\n\n";
}

std::string stream_usage_chunk(const CompletionRequest& req, const std::string& id, long created, const Usage& u) {
  ojson c = {{"id", id}, {"object", req.chat ? "chat.completion.chunk" : "text_completion"}, {"created", created},
             {"model", req.model}, {"choices", ojson::array()}, {"usage", u.json()}};
  return "data: " + c.dump() + "\n\n";
}

}  // namespace bigmoe::openai
