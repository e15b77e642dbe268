// The OpenAI API schema: request parsing with the errors OpenAI gives (status, type, param),
// and response / stream-chunk formatting. Pure functions: no sockets, no model.
#pragma once
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "engine/sampler.h"

namespace bigmoe::openai {

using ojson = nlohmann::ordered_json;

// An error as OpenAI reports it: HTTP status and {"error": {message, type, param, code}}.
struct ApiError {
  int status = 400;
  std::string message, type = "invalid_request_error", param, code;
  ojson body() const;
};

struct CompletionRequest {
  bool chat = true;
  std::string model;
  ojson messages;           // chat: the messages array as given (passed to the template)
  ojson tools;              // chat: tools array or null
  std::string prompt;       // completions
  bool stream = false;
  bool include_usage = false;  // stream_options.include_usage
  std::optional<int> max_tokens;
  SamplerConfig sampler;
  bool seed_given = false;
  std::vector<std::string> stop;
  ojson template_kwargs = ojson::object();  // chat_template_kwargs (e.g. enable_thinking)
};

// Parses and validates a request body. Throws ApiError.
CompletionRequest parse_request(const std::string& body, bool chat);

struct Usage {
  int prompt_tokens = 0, completion_tokens = 0;
  ojson json() const;
};

ojson completion_response(const CompletionRequest& req, const std::string& id, long created, const std::string& text,
                          const std::string& finish_reason, const Usage& usage);
// One SSE event for a streamed chunk: "data: {...}\n\n". For chat, role is sent in the first
// chunk; finish_reason (when set) closes the choice.
std::string stream_chunk(const CompletionRequest& req, const std::string& id, long created, const std::string* role,
                         const std::string& text, const std::string* finish_reason);
std::string stream_usage_chunk(const CompletionRequest& req, const std::string& id, long created, const Usage& u);
inline const char* stream_done() { return "data: [DONE]\n\n"; }

}  // namespace bigmoe::openai
