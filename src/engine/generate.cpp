#include "engine/generate.h"

#include <algorithm>
#include <chrono>

#include "util/error.h"

namespace bigmoe {

namespace {

// Length of the longest suffix of s that is a proper prefix of some stop string: that much
// text must be held back until the next token decides it.
size_t held_back(const std::string& s, const std::vector<std::string>& stops) {
  size_t hold = 0;
  for (const auto& st : stops)
    for (size_t k = std::min(st.size() - 1, s.size()); k > hold; --k)
      if (s.compare(s.size() - k, k, st, 0, k) == 0) {
        hold = k;
        break;
      }
  return hold;
}

}  // namespace

GenerateResult generate(const LanguageModel& model, const Tokenizer& tok, const GenerateRequest& req,
                        const std::function<bool(const std::string&)>& on_text) {
  if (req.prompt.empty()) fail("generate: empty prompt");
  if (int(req.prompt.size()) >= model.context_length())
    fail("prompt of {} tokens does not fit the context of {} tokens", req.prompt.size(), model.context_length());
  for (const auto& s : req.stop_strings)
    if (s.empty()) fail("generate: empty stop string");
  GenerateResult r;
  r.prompt_tokens = int(req.prompt.size());
  auto session = model.new_session();
  Sampler sampler(req.sampler);
  Tokenizer::StreamDecoder dec(tok);

  auto t0 = std::chrono::steady_clock::now();
  std::vector<float> logits = session->feed(req.prompt);
  auto t1 = std::chrono::steady_clock::now();
  r.prefill_s = std::chrono::duration<double>(t1 - t0).count();

  std::string pending;  // decoded text not yet emitted
  size_t emitted = 0;   // bytes of r.text already passed to on_text
  bool cancelled = false;
  auto emit = [&](size_t upto) {
    if (upto > emitted && on_text && !cancelled) cancelled = !on_text(r.text.substr(emitted, upto - emitted));
    emitted = std::max(emitted, upto);
  };
  r.finish_reason = "length";
  bool cut_at_stop_string = false;
  int budget = std::min(req.max_tokens, model.context_length() - int(req.prompt.size()));
  for (int i = 0; i < budget && !cancelled; ++i) {
    int id = sampler.sample(logits.data(), model.vocab_size());
    if (std::find(req.stop_ids.begin(), req.stop_ids.end(), id) != req.stop_ids.end()) {
      r.finish_reason = "stop";
      break;
    }
    r.tokens.push_back(id);
    r.text += dec.push(id);
    // A stop string ends generation; the text before it is the answer.
    size_t cut = std::string::npos;
    for (const auto& st : req.stop_strings) {
      size_t p = r.text.find(st, emitted > st.size() ? emitted - st.size() : 0);
      if (p != std::string::npos) cut = std::min(cut, p);
    }
    if (cut != std::string::npos) {
      r.text.resize(cut);
      r.finish_reason = "stop";
      cut_at_stop_string = true;
      break;
    }
    emit(r.text.size() - held_back(r.text, req.stop_strings));
    if (i + 1 < budget) logits = session->feed({id});
  }
  if (!cut_at_stop_string) r.text += dec.flush();  // bytes of an unfinished UTF-8 sequence
  emit(r.text.size());
  r.decode_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t1).count();
  return r;
}

}  // namespace bigmoe
