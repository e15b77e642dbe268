// The generation loop: prompt tokens in, streamed text out, with sampling, stop tokens and
// stop strings. Used by `bigmoe chat`, `bigmoe serve` and tests alike.
#pragma once
#include <functional>
#include <string>
#include <vector>

#include "engine/lm.h"
#include "engine/sampler.h"
#include "text/tokenizer.h"

namespace bigmoe {

struct GenerateRequest {
  std::vector<int> prompt;
  int max_tokens = 256;
  SamplerConfig sampler;
  std::vector<int> stop_ids;            // end-of-generation tokens (not emitted)
  std::vector<std::string> stop_strings;  // text stops (not emitted)
};

struct GenerateResult {
  std::string text;
  std::vector<int> tokens;
  std::string finish_reason;  // "stop" | "length"
  int prompt_tokens = 0;
  double prefill_s = 0, decode_s = 0;
};

// on_text receives text as it becomes final (never a partial UTF-8 sequence, never text that
// could still turn out to be the start of a stop string); return false to cancel.
GenerateResult generate(const LanguageModel& model, const Tokenizer& tok, const GenerateRequest& req,
                        const std::function<bool(const std::string&)>& on_text = {});

}  // namespace bigmoe
