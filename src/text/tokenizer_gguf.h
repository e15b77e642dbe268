// A tokenizer from GGUF metadata (tokenizer.ggml.*).
#pragma once
#include "io/gguf.h"
#include "text/tokenizer.h"

namespace bigmoe {

// Throws bigmoe::Error naming the file when the vocabulary is missing or not byte-level BPE.
Tokenizer tokenizer_from_gguf(const GgufFile& f);

}  // namespace bigmoe
