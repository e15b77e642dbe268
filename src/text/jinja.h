// Chat templates: a Jinja2 subset that renders HF chat templates byte for byte like
// transformers' apply_chat_template (jinja2 ImmutableSandboxedEnvironment with trim_blocks,
// lstrip_blocks, loopcontrols, HF's tojson, raise_exception and strftime_now).
//
// Pass the context as nlohmann::ordered_json: dict key order is observable (tojson, items(),
// loops over dicts) and must be the request's order, as Python dicts keep it. A plain
// nlohmann::json context works but its objects iterate in sorted key order.
#pragma once
#include <memory>
#include <nlohmann/json.hpp>
#include <string>

namespace bigmoe {

namespace jinja {
struct Template;
}

class ChatTemplate {
 public:
  // Throws bigmoe::Error "name:line:col: message" on a syntax error or an unknown filter/test.
  static ChatTemplate parse(std::string source, std::string name);

  // context: the template's variables, e.g. {"messages": [...], "tools": null,
  // "add_generation_prompt": true, ...}. Throws bigmoe::Error "name:line:col: message" on a
  // render error, including the template's own raise_exception(message).
  std::string render(const nlohmann::ordered_json& context) const;
  std::string render(const nlohmann::json& context) const;

  const std::string& name() const;

 private:
  std::shared_ptr<const jinja::Template> t_;
};

}  // namespace bigmoe
