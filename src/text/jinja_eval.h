// Renders a parsed template against a context dict. Scoping follows jinja2: each for-loop
// iteration, macro call and with-block gets a fresh scope (a `set` inside does not leak out;
// namespace() objects are how templates carry state across iterations), if-blocks do not.
// Macros close over the scope they were defined in and see its later assignments.
#pragma once
#include <string>

#include "text/jinja_ast.h"

namespace bigmoe::jinja {

// Throws bigmoe::Error "name:line:col: message" at the node that failed.
std::string render(const Template& t, const Value& context);

}  // namespace bigmoe::jinja
