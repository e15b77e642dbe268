// jinja2's tests (jinja2/tests.py): `x is defined`, `x is string`, `x is eq 1`, ...
#include <map>

#include "text/jinja_builtins.h"
#include "text/jinja_unicode.h"

namespace bigmoe::jinja {
namespace {

using TestFn = bool (*)(const Value&, CallArgs&);

bool is_lower_or_upper(const Value& v, bool want_lower) {  // str.islower() / str.isupper()
  std::string s = to_str(v);
  bool cased = false;
  for (size_t i = 0; i < s.size();) {
    char32_t c = utf8::next(s, i);
    if (!utf8::is_cased(c)) continue;
    bool is_lower = utf8::to_upper(c) != c || c == 0xdf;
    if (is_lower != want_lower) return false;
    cased = true;
  }
  return cased;
}

Value one_arg(const char* name, CallArgs& a) { return bind_args(name, a, {{"other", Value()}})[0]; }

bool t_defined(const Value& v, CallArgs& a) {
  bind_args("defined", a, {});
  return !v.is_undefined();
}
bool t_undefined(const Value& v, CallArgs& a) {
  bind_args("undefined", a, {});
  return v.is_undefined();
}
bool t_none(const Value& v, CallArgs& a) {
  bind_args("none", a, {});
  return v.is_none();
}
bool t_boolean(const Value& v, CallArgs& a) {
  bind_args("boolean", a, {});
  return v.is_bool();
}
bool t_true(const Value& v, CallArgs& a) {
  bind_args("true", a, {});
  return v.is_bool() && v.as_bool();
}
bool t_false(const Value& v, CallArgs& a) {
  bind_args("false", a, {});
  return v.is_bool() && !v.as_bool();
}
bool t_integer(const Value& v, CallArgs& a) {
  bind_args("integer", a, {});
  return v.is_int();
}
bool t_float(const Value& v, CallArgs& a) {
  bind_args("float", a, {});
  return v.is_float();
}
bool t_number(const Value& v, CallArgs& a) {
  bind_args("number", a, {});
  return v.is_number();
}
bool t_string(const Value& v, CallArgs& a) {
  bind_args("string", a, {});
  return v.is_string();
}
bool t_mapping(const Value& v, CallArgs& a) {
  bind_args("mapping", a, {});
  return v.is_dict();
}
// Undefined defines __call__ (to raise), so Python's callable() says yes.
bool t_callable(const Value& v, CallArgs& a) {
  bind_args("callable", a, {});
  return v.is_callable() || v.is_undefined();
}
bool t_escaped(const Value& v, CallArgs& a) {
  bind_args("escaped", a, {});
  return false;
}
bool t_lower(const Value& v, CallArgs& a) {
  bind_args("lower", a, {});
  return is_lower_or_upper(v, true);
}
bool t_upper(const Value& v, CallArgs& a) {
  bind_args("upper", a, {});
  return is_lower_or_upper(v, false);
}

// Undefined has __len__, __getitem__ and __iter__, so it counts as a sequence and iterable.
bool t_iterable(const Value& v, CallArgs& a) {
  bind_args("iterable", a, {});
  return v.is_undefined() || v.is_string() || v.is_list() || v.is_dict();
}
bool t_sequence(const Value& v, CallArgs& a) {
  bind_args("sequence", a, {});
  return v.is_undefined() || v.is_string() || v.is_list() || v.is_dict();
}

bool t_odd(const Value& v, CallArgs& a) {
  bind_args("odd", a, {});
  return equals(arith("%", v, Value(2)), Value(1));
}
bool t_even(const Value& v, CallArgs& a) {
  bind_args("even", a, {});
  return equals(arith("%", v, Value(2)), Value(0));
}
bool t_divisibleby(const Value& v, CallArgs& a) {
  Value n = bind_args("divisibleby", a, {{"num", Value()}})[0];
  return equals(arith("%", v, n), Value(0));
}

bool t_sameas(const Value& v, CallArgs& a) {
  Value o = one_arg("sameas", a);
  if (v.identity() || o.identity()) return v.identity() == o.identity();
  return v.kind() == o.kind() && equals(v, o);
}

bool t_in(const Value& v, CallArgs& a) {
  Value seq = bind_args("in", a, {{"seq", Value()}})[0];
  return contains(seq, v);
}

bool t_eq(const Value& v, CallArgs& a) { return equals(v, one_arg("eq", a)); }
bool t_ne(const Value& v, CallArgs& a) { return !equals(v, one_arg("ne", a)); }
bool t_lt(const Value& v, CallArgs& a) { return compare(v, one_arg("lt", a), "<") < 0; }
bool t_le(const Value& v, CallArgs& a) { return compare(v, one_arg("le", a), "<=") <= 0; }
bool t_gt(const Value& v, CallArgs& a) { return compare(v, one_arg("gt", a), ">") > 0; }
bool t_ge(const Value& v, CallArgs& a) { return compare(v, one_arg("ge", a), ">=") >= 0; }

bool t_filter(const Value& v, CallArgs& a) {
  bind_args("filter", a, {});
  return v.is_string() && has_filter(v.str());
}
bool t_test(const Value& v, CallArgs& a) {
  bind_args("test", a, {});
  return v.is_string() && has_test(v.str());
}

const std::map<std::string_view, TestFn>& tests() {
  static const std::map<std::string_view, TestFn> m = {
      {"boolean", t_boolean},
      {"callable", t_callable},
      {"defined", t_defined},
      {"divisibleby", t_divisibleby},
      {"escaped", t_escaped},
      {"even", t_even},
      {"false", t_false},
      {"filter", t_filter},
      {"float", t_float},
      {"in", t_in},
      {"integer", t_integer},
      {"iterable", t_iterable},
      {"lower", t_lower},
      {"mapping", t_mapping},
      {"none", t_none},
      {"number", t_number},
      {"odd", t_odd},
      {"sameas", t_sameas},
      {"sequence", t_sequence},
      {"string", t_string},
      {"test", t_test},
      {"true", t_true},
      {"undefined", t_undefined},
      {"upper", t_upper},
      {"==", t_eq},
      {"eq", t_eq},
      {"equalto", t_eq},
      {"!=", t_ne},
      {"ne", t_ne},
      {"<", t_lt},
      {"lt", t_lt},
      {"lessthan", t_lt},
      {"<=", t_le},
      {"le", t_le},
      {">", t_gt},
      {"gt", t_gt},
      {"greaterthan", t_gt},
      {">=", t_ge},
      {"ge", t_ge},
  };
  return m;
}

}  // namespace

bool has_test(std::string_view name) { return tests().count(name) != 0; }

bool apply_test(std::string_view name, const Value& input, CallArgs& args) {
  auto it = tests().find(name);
  if (it == tests().end()) raise("No test named '{}'", name);
  return it->second(input, args);
}

}  // namespace bigmoe::jinja
