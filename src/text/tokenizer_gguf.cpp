#include "text/tokenizer_gguf.h"

#include "util/error.h"

namespace bigmoe {

Tokenizer tokenizer_from_gguf(const GgufFile& f) {
  const std::string file = f.path().string();
  std::string model = f.get_str("tokenizer.ggml.model", "");
  if (model.empty()) fail("{}: no tokenizer (tokenizer.ggml.model is missing)", file);
  if (model != "gpt2")
    fail("{}: tokenizer.ggml.model '{}' is not supported (supported: gpt2, i.e. byte-level BPE)", file, model);
  TokenizerData d;
  d.tokens = f.get_arr_str("tokenizer.ggml.tokens");
  d.merges = f.get_arr_str("tokenizer.ggml.merges");
  if (f.find("tokenizer.ggml.token_type")) d.token_types = f.get_arr_i32("tokenizer.ggml.token_type");
  d.pre = f.get_str("tokenizer.ggml.pre", "default");
  d.bos = int(f.get_i64("tokenizer.ggml.bos_token_id", -1));
  d.eos = int(f.get_i64("tokenizer.ggml.eos_token_id", -1));
  d.eot = int(f.get_i64("tokenizer.ggml.eot_token_id", -1));
  d.pad = int(f.get_i64("tokenizer.ggml.padding_token_id", -1));
  d.add_bos = f.get_bool("tokenizer.ggml.add_bos_token", false);
  if (!d.token_types.empty() && d.token_types.size() != d.tokens.size())
    fail("{}: tokenizer.ggml.token_type has {} entries for {} tokens", file, d.token_types.size(), d.tokens.size());
  try {
    return Tokenizer::from_vocab(d);
  } catch (const Error& e) {
    fail("{}: {}", file, e.what());
  }
}

}  // namespace bigmoe
