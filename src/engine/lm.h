// What the engine needs from a model: sessions that take tokens and give next-token logits.
// Every architecture (GLM-DSA, llama) implements it; the generator and the server use only it.
#pragma once
#include <memory>
#include <string>
#include <vector>

namespace bigmoe {

// One sequence's state (its KV cache) in a model.
class Session {
 public:
  virtual ~Session() = default;
  // Appends tokens and returns the logits [vocab] after the last of them.
  virtual std::vector<float> feed(const std::vector<int>& tokens) = 0;
  // Appends tokens and returns the logits [T, vocab] after each of them.
  virtual std::vector<float> feed_all(const std::vector<int>& tokens) = 0;
  virtual int n_past() const = 0;
  // Drops the cache back to n_keep positions (prefix reuse, speculative rollback).
  virtual void truncate(int n_keep) = 0;
};

class LanguageModel {
 public:
  virtual ~LanguageModel() = default;
  virtual int vocab_size() const = 0;
  virtual int context_length() const = 0;
  virtual std::unique_ptr<Session> new_session() const = 0;
};

}  // namespace bigmoe
