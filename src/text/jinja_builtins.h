// jinja2's built-in filters (jinja_filters.cpp), tests (jinja_tests.cpp) and globals, the Python
// str/dict methods templates call, and attribute/item lookup with the sandboxed environment's
// getattr/getitem fallbacks (jinja_builtins.cpp). Filter and test names are checked at parse
// time, as jinja2 does when it compiles a template.
#pragma once
#include <string>
#include <string_view>

#include "text/jinja_value.h"

namespace bigmoe::jinja {

bool has_filter(std::string_view name);
bool has_test(std::string_view name);
Value apply_filter(std::string_view name, const Value& input, CallArgs& args);
bool apply_test(std::string_view name, const Value& input, CallArgs& args);

// obj.name: Python attribute (a bound str/dict method) first, then obj[name].
Value get_attr(const Value& obj, const std::string& name);
// obj[key]: item first, then a string key falls back to the attribute. Missing -> Undefined.
Value get_item(const Value& obj, const Value& key);
// obj[start:stop:step] on a list, tuple or str; null parts are None.
Value get_slice(const Value& obj, const Value* start, const Value* stop, const Value* step);
// "a.b.0" attribute paths of selectattr/map/sort/join.
Value get_attr_path(const Value& obj, std::string_view path);

// range, namespace, dict, raise_exception, strftime_now.
void add_globals(DictData& globals);

// Binds call arguments like a Python signature: positional, then keyword, then defaults.
// A default that is Undefined marks a required parameter.
struct Param {
  const char* name;
  Value def;
};
std::vector<Value> bind_args(std::string_view fname, CallArgs& args,
                             std::initializer_list<Param> params);

}  // namespace bigmoe::jinja
