#include "text/jinja.h"

#include "text/jinja_ast.h"
#include "text/jinja_eval.h"
#include "util/error.h"

namespace bigmoe {

ChatTemplate ChatTemplate::parse(std::string source, std::string name) {
  ChatTemplate ct;
  ct.t_ = std::make_shared<const jinja::Template>(jinja::parse_template(source, std::move(name)));
  return ct;
}

std::string ChatTemplate::render(const nlohmann::ordered_json& context) const {
  if (!context.is_object())
    fail("{}: the render context must be a JSON object, got {}", t_->name, context.type_name());
  try {
    return jinja::render(*t_, jinja::from_json(context));
  } catch (const jinja::RuntimeError& e) {  // only from_json raises outside a template node
    fail("{}: {}", t_->name, e.what());
  }
}

std::string ChatTemplate::render(const nlohmann::json& context) const {
  return render(nlohmann::ordered_json(context));
}

const std::string& ChatTemplate::name() const { return t_->name; }

}  // namespace bigmoe
