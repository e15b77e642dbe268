// Values of the Jinja evaluator, with Python's semantics for the operations templates use:
// truthiness, str()/repr(), ==, ordering and json.dumps. Lists and dicts are shared by
// reference like Python objects; HF renders in an ImmutableSandboxedEnvironment, so the only
// mutation is `set ns.attr`, which lands on a namespace object.
#pragma once
#include <fmt/format.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <variant>
#include <vector>

namespace bigmoe::jinja {

// An evaluation error not yet tied to a template position; the evaluator catches it at the
// node being evaluated and rethrows it as bigmoe::Error with name:line:col.
class RuntimeError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

template <typename... Args>
[[noreturn]] void raise(fmt::format_string<Args...> f, Args&&... args) {
  throw RuntimeError(fmt::format(f, std::forward<Args>(args)...));
}

class Value;
struct CallArgs;

struct ListData {
  std::vector<Value> items;
  bool tuple = false;  // only changes repr(): (a, b) instead of [a, b]
};

// A Python dict with string keys: insertion order, linear lookup (template dicts are small).
struct DictData {
  std::vector<std::pair<std::string, Value>> items;
  const Value* find(std::string_view key) const;
  Value* find(std::string_view key);
  void set(std::string key, Value v);
};

using NativeFn = std::function<Value(CallArgs&)>;
struct CallableData {
  std::string name;  // for repr and error messages
  NativeFn fn;
};

// Attribute bags that are not mappings: namespace() objects and the loop variable.
struct ObjectData {
  std::string type_name;  // "Namespace", "LoopContext"
  DictData attrs;
};

struct Undefined {
  std::string hint;  // jinja2's message: "'x' is undefined", "'dict object' has no attribute 'y'"
};

class Value {
 public:
  enum class Kind { Undefined, None, Bool, Int, Float, String, List, Dict, Callable, Object };

  Value() : v_(Undefined{}) {}
  static Value undefined(std::string hint) { return Value(Undefined{std::move(hint)}); }
  static Value none() { return Value(nullptr); }
  Value(bool b) : v_(b) {}
  Value(int64_t i) : v_(i) {}
  Value(int i) : v_(int64_t{i}) {}
  Value(double d) : v_(d) {}
  Value(std::string s) : v_(std::move(s)) {}
  Value(std::string_view s) : v_(std::string(s)) {}
  Value(const char* s) : v_(std::string(s)) {}
  Value(std::vector<Value> items, bool tuple = false)
      : v_(std::make_shared<ListData>(ListData{std::move(items), tuple})) {}
  Value(std::shared_ptr<ListData> l) : v_(std::move(l)) {}
  Value(std::shared_ptr<DictData> d) : v_(std::move(d)) {}
  Value(std::shared_ptr<CallableData> c) : v_(std::move(c)) {}
  Value(std::shared_ptr<ObjectData> o) : v_(std::move(o)) {}
  static Value function(std::string name, NativeFn fn) {
    return Value(std::make_shared<CallableData>(CallableData{std::move(name), std::move(fn)}));
  }

  Kind kind() const { return static_cast<Kind>(v_.index()); }
  bool is_undefined() const { return kind() == Kind::Undefined; }
  bool is_none() const { return kind() == Kind::None; }
  bool is_bool() const { return kind() == Kind::Bool; }
  bool is_int() const { return kind() == Kind::Int; }
  bool is_float() const { return kind() == Kind::Float; }
  bool is_number() const { return is_int() || is_float() || is_bool(); }  // bool is an int
  bool is_string() const { return kind() == Kind::String; }
  bool is_list() const { return kind() == Kind::List; }  // list or tuple
  bool is_dict() const { return kind() == Kind::Dict; }
  bool is_callable() const { return kind() == Kind::Callable; }
  bool is_object() const { return kind() == Kind::Object; }

  // Typed access; the wrong type raises RuntimeError ("expected int, got 'str'").
  const std::string& undefined_hint() const { return get<Undefined>("Undefined").hint; }
  bool as_bool() const { return get<bool>("bool"); }
  int64_t as_int() const;   // int or bool
  double as_float() const;  // int, bool or float
  const std::string& str() const { return get<std::string>("str"); }
  const std::vector<Value>& list() const { return get<std::shared_ptr<ListData>>("list")->items; }
  bool is_tuple() const { return is_list() && std::get<std::shared_ptr<ListData>>(v_)->tuple; }
  const DictData& dict() const { return *get<std::shared_ptr<DictData>>("dict"); }
  const CallableData& callable() const { return *get<std::shared_ptr<CallableData>>("callable"); }
  ObjectData& object() const { return *get<std::shared_ptr<ObjectData>>("object"); }
  // Identity for `is sameas` on shared containers.
  const void* identity() const;

 private:
  explicit Value(Undefined u) : v_(std::move(u)) {}
  explicit Value(std::nullptr_t) : v_(nullptr) {}
  template <typename T>
  const T& get(const char* want) const {
    if (const T* p = std::get_if<T>(&v_)) return *p;
    wrong_type(want);
  }
  [[noreturn]] void wrong_type(const char* want) const;
  std::variant<Undefined, std::nullptr_t, bool, int64_t, double, std::string,
               std::shared_ptr<ListData>, std::shared_ptr<DictData>, std::shared_ptr<CallableData>,
               std::shared_ptr<ObjectData>>
      v_;
};

struct CallArgs {
  std::vector<Value> pos;
  std::vector<std::pair<std::string, Value>> kw;
};

// Python-style names for error messages: 'str', 'int', 'NoneType', 'dict', ...
std::string type_name(const Value& v);
// jinja2's object_type_repr: "dict object", "str object", "None".
std::string object_desc(const Value& v);
[[noreturn]] void raise_undefined(const Value& v);  // the Undefined's own message

bool truthy(const Value& v);
std::string to_str(const Value& v);  // Python str(); Undefined prints as ""
std::string repr(const Value& v);    // Python repr()
std::string float_repr(double d);    // Python repr(float)
bool equals(const Value& a, const Value& b);
// <0, 0, >0 for a < b, a == b, a > b with Python ordering; raises for unorderable types.
int compare(const Value& a, const Value& b, std::string_view op);
// Raises Python's "unhashable type" for a list, a dict, or a tuple holding one.
void require_hashable(const Value& v);
// Python's `x in c` for str (substring), list/tuple, dict (key); Undefined is empty.
bool contains(const Value& c, const Value& x);
// Python's + - * / // % ** on int, float, bool, str and list, with its errors.
Value arith(std::string_view op, const Value& a, const Value& b);
// Elements of an iterable as Python iterates them: list items, dict keys, string code points.
std::vector<Value> iterate(const Value& v);

Value from_json(const nlohmann::ordered_json& j);

// json.dumps(x, ensure_ascii, indent, separators, sort_keys), byte for byte.
struct DumpOptions {
  bool ensure_ascii = false;
  std::optional<std::string> indent;  // None, or the per-level indent string
  std::string item_sep = ", ";
  std::string key_sep = ": ";
  bool sort_keys = false;
};
std::string json_dumps(const Value& v, const DumpOptions& opt);

}  // namespace bigmoe::jinja
