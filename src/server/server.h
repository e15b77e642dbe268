// `bigmoe serve`: an OpenAI-compatible HTTP server over one model. Requests are served one
// at a time in arrival order (others wait, they are not rejected).
#pragma once
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "engine/lm.h"
#include "server/openai.h"
#include "text/jinja.h"
#include "text/tokenizer.h"

namespace httplib { class Server; }

namespace bigmoe {

struct ServedModel {
  std::string name;                 // the id clients pass as "model"
  const LanguageModel* lm = nullptr;
  const Tokenizer* tok = nullptr;
  const ChatTemplate* chat_template = nullptr;
  std::vector<int> stop_ids;        // eos / eot ids ending generation
  int default_max_tokens = 1024;
};

struct ServerOptions {
  std::string host = "127.0.0.1";
  int port = 8080;
};

class Server {
 public:
  Server(ServedModel model, ServerOptions opt);
  ~Server();
  // Binds and serves until stop(); returns false (with a message on stderr) if it cannot bind.
  bool run();
  void stop();
  int port() const { return port_; }  // the bound port (useful with port 0)

 private:
  std::vector<int> prompt_tokens(const openai::CompletionRequest& req) const;
  ServedModel m_;
  ServerOptions opt_;
  int port_ = 0;
  std::unique_ptr<httplib::Server> http_;
  std::mutex gen_mutex_;  // one generation at a time
};

}  // namespace bigmoe
