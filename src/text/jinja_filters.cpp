// jinja2's filters (jinja2/filters.py), with HF's tojson override:
// json.dumps(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False).
// Filters that return generators in jinja2 (map, select, selectattr, ...) return lists here.
#include <algorithm>
#include <charconv>
#include <cmath>
#include <map>

#include "text/jinja_builtins.h"
#include "text/jinja_unicode.h"

namespace bigmoe::jinja {
namespace {

using FilterFn = Value (*)(const Value&, CallArgs&);

const Value kNone = Value::none();

// Python's int(str, base): whitespace, sign, '_' between digits, optional 0x/0o/0b prefix.
std::optional<int64_t> parse_int(std::string_view s, int base) {
  s = utf8::strip(s, true, true);
  bool neg = false;
  if (!s.empty() && (s[0] == '+' || s[0] == '-')) {
    neg = s[0] == '-';
    s.remove_prefix(1);
  }
  if (s.size() > 2 && s[0] == '0') {
    char p = static_cast<char>(std::tolower(static_cast<unsigned char>(s[1])));
    if ((p == 'x' && base == 16) || (p == 'o' && base == 8) || (p == 'b' && base == 2)) {
      s.remove_prefix(2);
      if (!s.empty() && s[0] == '_') s.remove_prefix(1);
    }
  }
  std::string digits;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '_' && i > 0 && i + 1 < s.size() && s[i - 1] != '_' && s[i + 1] != '_') continue;
    digits += s[i];
  }
  int64_t v = 0;
  auto r = std::from_chars(digits.data(), digits.data() + digits.size(), v, base);
  if (digits.empty() || r.ec != std::errc() || r.ptr != digits.data() + digits.size())
    return std::nullopt;
  return neg ? -v : v;
}

// Python's float(str).
std::optional<double> parse_float(std::string_view s) {
  s = utf8::strip(s, true, true);
  bool neg = false;
  if (!s.empty() && (s[0] == '+' || s[0] == '-')) {
    neg = s[0] == '-';
    s.remove_prefix(1);
  }
  std::string t;
  for (size_t i = 0; i < s.size(); ++i) {
    bool between = i > 0 && i + 1 < s.size() &&
                   std::isdigit(static_cast<unsigned char>(s[i - 1])) &&
                   std::isdigit(static_cast<unsigned char>(s[i + 1]));
    if (s[i] == '_' && between) continue;
    t += s[i];
  }
  double v = 0;
  auto r = std::from_chars(t.data(), t.data() + t.size(), v);
  if (t.empty() || t[0] == '-' || t[0] == '+' || r.ec != std::errc() ||
      r.ptr != t.data() + t.size())
    return std::nullopt;
  return neg ? -v : v;
}

std::optional<double> to_float(const Value& v) {
  if (v.is_undefined()) raise_undefined(v);
  if (v.is_number()) return v.as_float();
  if (v.is_string()) return parse_float(v.str());
  return std::nullopt;
}

Value len(const Value& v) {
  switch (v.kind()) {
    case Value::Kind::Undefined:
      return Value(0);
    case Value::Kind::String:
      return Value(static_cast<int64_t>(utf8::length(v.str())));
    case Value::Kind::List:
      return Value(static_cast<int64_t>(v.list().size()));
    case Value::Kind::Dict:
      return Value(static_cast<int64_t>(v.dict().items.size()));
    default:
      raise("object of type '{}' has no len()", type_name(v));
  }
}

// Python str.splitlines().
std::vector<std::string> splitlines(const std::string& s) {
  std::vector<std::string> out;
  size_t b = 0;
  for (size_t i = 0; i < s.size();) {
    size_t start = i;
    char32_t c = utf8::next(s, i);
    bool brk = c == '\n' || c == '\r' || c == 0x0b || c == 0x0c || (c >= 0x1c && c <= 0x1e) ||
               c == 0x85 || c == 0x2028 || c == 0x2029;
    if (!brk) continue;
    out.push_back(s.substr(b, start - b));
    if (c == '\r' && i < s.size() && s[i] == '\n') ++i;
    b = i;
  }
  if (b < s.size()) out.push_back(s.substr(b));
  return out;
}

// Sort/unique/min/max key: an attribute path, lowercased strings unless case_sensitive.
Value sort_key(const Value& item, const Value& attribute, bool case_sensitive) {
  Value k = attribute.is_none() ? item : get_attr_path(item, to_str(attribute));
  if (!case_sensitive && k.is_string()) return Value(utf8::lower(k.str()));
  return k;
}

std::vector<Value> sorted(std::vector<Value> items, const Value& attribute, bool case_sensitive,
                          bool reverse) {
  std::vector<std::pair<Value, Value>> keyed;
  for (Value& x : items) keyed.emplace_back(sort_key(x, attribute, case_sensitive), std::move(x));
  std::stable_sort(keyed.begin(), keyed.end(), [&](const auto& a, const auto& b) {
    return reverse ? compare(b.first, a.first, "<") < 0 : compare(a.first, b.first, "<") < 0;
  });
  std::vector<Value> out;
  for (auto& kv : keyed) out.push_back(std::move(kv.second));
  return out;
}

Value min_max(const Value& v, CallArgs& a, bool want_max) {
  auto p = bind_args(want_max ? "max" : "min", a,
                     {{"case_sensitive", Value(false)}, {"attribute", kNone}});
  std::vector<Value> items = iterate(v);
  if (items.empty()) return Value::undefined("No aggregated item, sequence was empty.");
  size_t best = 0;
  Value best_key = sort_key(items[0], p[1], truthy(p[0]));
  for (size_t i = 1; i < items.size(); ++i) {
    Value k = sort_key(items[i], p[1], truthy(p[0]));
    if (want_max ? compare(k, best_key, ">") > 0 : compare(k, best_key, "<") < 0) {
      best = i;
      best_key = k;
    }
  }
  return items[best];
}

// select/reject/selectattr/rejectattr: [attr,] [test name, test args...].
Value select(const Value& v, CallArgs& a, bool want, bool by_attr) {
  std::vector<Value> out;
  if (!truthy(v)) return Value(std::move(out));
  size_t off = by_attr ? 1 : 0;
  if (by_attr && a.pos.empty()) raise("Missing parameter for attribute name");
  std::string test = a.pos.size() > off ? to_str(a.pos[off]) : "";
  if (!test.empty() && !has_test(test)) raise("No test named '{}'", test);
  for (const Value& item : iterate(v)) {
    Value x = by_attr ? get_attr_path(item, to_str(a.pos[0])) : item;
    bool ok;
    if (test.empty()) {
      ok = truthy(x);
    } else {
      CallArgs targs;
      targs.pos.assign(a.pos.begin() + off + 1, a.pos.end());
      targs.kw = a.kw;
      ok = apply_test(test, x, targs);
    }
    if (ok == want) out.push_back(item);
  }
  return Value(std::move(out));
}

Value f_map(const Value& v, CallArgs& a) {
  std::vector<Value> out;
  if (!truthy(v)) return Value(std::move(out));
  auto attr =
      std::find_if(a.kw.begin(), a.kw.end(), [](auto& kv) { return kv.first == "attribute"; });
  if (a.pos.empty() && attr != a.kw.end()) {
    Value def = kNone;
    for (auto& [k, x] : a.kw) {
      if (k == "default")
        def = x;
      else if (k != "attribute")
        raise("Unexpected keyword argument '{}'", k);
    }
    for (const Value& item : iterate(v)) {
      Value x = get_attr_path(item, to_str(attr->second));
      out.push_back(x.is_undefined() && !def.is_none() ? def : x);
    }
    return Value(std::move(out));
  }
  if (a.pos.empty()) raise("map requires a filter argument");
  std::string name = to_str(a.pos[0]);
  if (!has_filter(name)) raise("No filter named '{}'", name);
  for (const Value& item : iterate(v)) {
    CallArgs fargs;
    fargs.pos.assign(a.pos.begin() + 1, a.pos.end());
    fargs.kw = a.kw;
    out.push_back(apply_filter(name, item, fargs));
  }
  return Value(std::move(out));
}

Value f_tojson(const Value& v, CallArgs& a) {
  auto p = bind_args("tojson", a,
                     {{"ensure_ascii", Value(false)},
                      {"indent", kNone},
                      {"separators", kNone},
                      {"sort_keys", Value(false)}});
  DumpOptions opt;
  opt.ensure_ascii = truthy(p[0]);
  if (p[1].is_string()) {
    opt.indent = p[1].str();
  } else if (p[1].is_int()) {
    opt.indent = std::string(std::max<int64_t>(0, p[1].as_int()), ' ');
  } else if (!p[1].is_none()) {
    raise("tojson: indent must be an int, a str or None, not '{}'", type_name(p[1]));
  }
  if (!p[2].is_none()) {
    if (!p[2].is_list() || p[2].list().size() != 2 || !p[2].list()[0].is_string() ||
        !p[2].list()[1].is_string())
      raise("tojson: separators must be a (item_separator, key_separator) pair of strings");
    opt.item_sep = p[2].list()[0].str();
    opt.key_sep = p[2].list()[1].str();
  } else if (opt.indent) {
    opt.item_sep.resize(1);  // ", " -> ","; assigning "," trips a GCC 12 -Wrestrict false positive
  }
  opt.sort_keys = truthy(p[3]);
  return Value(json_dumps(v, opt));
}

Value f_int(const Value& v, CallArgs& a) {
  auto p = bind_args("int", a, {{"default", Value(0)}, {"base", Value(10)}});
  if (v.is_undefined()) raise_undefined(v);
  if (v.is_int() || v.is_bool()) return Value(v.as_int());
  if (v.is_string()) {
    if (auto i = parse_int(v.str(), static_cast<int>(p[1].as_int()))) return Value(*i);
  }
  std::optional<double> f = to_float(v);
  if (f && std::isfinite(*f)) return Value(static_cast<int64_t>(std::trunc(*f)));
  return p[0];
}

std::string need_string(const Value& v) {
  if (!v.is_string()) raise("expected a string, got '{}'", type_name(v));
  return v.str();
}

// jinja2's title filter: upper-case after "-", whitespace, "(", "{", "[" or "<", lower elsewhere.
Value f_title(const Value& v, CallArgs& a) {
  bind_args("title", a, {});
  std::string s = to_str(v), out;
  bool boundary = true;
  for (size_t i = 0; i < s.size();) {
    char32_t c = utf8::next(s, i);
    bool delim = utf8::is_space(c) || c == '-' || c == '(' || c == '{' || c == '[' || c == '<';
    utf8::append(out, delim ? c : boundary ? utf8::to_upper(c) : utf8::to_lower(c));
    boundary = delim;
  }
  return Value(std::move(out));
}

Value f_default(const Value& v, CallArgs& a) {
  auto p = bind_args("default", a, {{"default_value", Value("")}, {"boolean", Value(false)}});
  return (v.is_undefined() || (truthy(p[1]) && !truthy(v))) ? p[0] : v;
}

Value f_capitalize(const Value& v, CallArgs& a) {
  bind_args("capitalize", a, {});
  return Value(utf8::capitalize(to_str(v)));
}

Value f_lower(const Value& v, CallArgs& a) {
  bind_args("lower", a, {});
  return Value(utf8::lower(to_str(v)));
}

Value f_upper(const Value& v, CallArgs& a) {
  bind_args("upper", a, {});
  return Value(utf8::upper(to_str(v)));
}

Value f_replace(const Value& v, CallArgs& a) {
  auto p = bind_args("replace", a, {{"old", Value()}, {"new", Value()}, {"count", kNone}});
  CallArgs m{{Value(to_str(p[0])), Value(to_str(p[1]))}, {}};
  if (!p[2].is_none()) m.pos.push_back(p[2]);
  return get_attr(Value(to_str(v)), "replace").callable().fn(m);
}

Value f_trim(const Value& v, CallArgs& a) {
  auto p = bind_args("trim", a, {{"chars", kNone}});
  CallArgs m{{p[0]}, {}};
  return get_attr(Value(to_str(v)), "strip").callable().fn(m);
}

Value f_length(const Value& v, CallArgs& a) {
  bind_args("length", a, {});
  return len(v);
}

Value f_first(const Value& v, CallArgs& a) {
  bind_args("first", a, {});
  std::vector<Value> items = iterate(v);
  return items.empty() ? Value::undefined("No first item, sequence was empty.") : items.front();
}

Value f_last(const Value& v, CallArgs& a) {
  bind_args("last", a, {});
  std::vector<Value> items = iterate(v);
  return items.empty() ? Value::undefined("No last item, sequence was empty.") : items.back();
}

Value f_join(const Value& v, CallArgs& a) {
  auto p = bind_args("join", a, {{"d", Value("")}, {"attribute", kNone}});
  std::string out, sep = to_str(p[0]);
  bool first = true;
  for (const Value& x : iterate(v)) {
    if (!first) out += sep;
    first = false;
    out += to_str(p[1].is_none() ? x : get_attr_path(x, to_str(p[1])));
  }
  return Value(std::move(out));
}

// string, and safe: without autoescape Markup(x) is just str(x).
Value f_string(const Value& v, CallArgs& a) {
  bind_args("string", a, {});
  return Value(to_str(v));
}

Value f_float(const Value& v, CallArgs& a) {
  auto p = bind_args("float", a, {{"default", Value(0.0)}});
  std::optional<double> f = to_float(v);
  return f ? Value(*f) : p[0];
}

Value f_abs(const Value& v, CallArgs& a) {
  bind_args("abs", a, {});
  if (v.is_float()) return Value(std::fabs(v.as_float()));
  if (v.is_int() || v.is_bool()) return Value(static_cast<int64_t>(std::llabs(v.as_int())));
  raise("bad operand type for abs(): '{}'", type_name(v));
}

Value f_list(const Value& v, CallArgs& a) {
  bind_args("list", a, {});
  return Value(iterate(v));
}

Value pair(const std::string& k, const Value& v) {
  return Value(std::vector<Value>{Value(k), v}, true);
}

Value f_items(const Value& v, CallArgs& a) {
  bind_args("items", a, {});
  std::vector<Value> out;
  if (v.is_undefined()) return Value(std::move(out));
  if (!v.is_dict()) raise("Can only get item pairs from a mapping.");
  for (const auto& [k, x] : v.dict().items) out.push_back(pair(k, x));
  return Value(std::move(out));
}

Value f_dictsort(const Value& v, CallArgs& a) {
  auto p = bind_args(
      "dictsort", a,
      {{"case_sensitive", Value(false)}, {"by", Value("key")}, {"reverse", Value(false)}});
  if (!v.is_dict()) raise("dictsort: expected a mapping, got '{}'", type_name(v));
  std::string by = to_str(p[1]);
  if (by != "key" && by != "value") raise("You can only sort by either 'key' or 'value'");
  std::vector<Value> pairs;
  for (const auto& [k, x] : v.dict().items) pairs.push_back(pair(k, x));
  return Value(
      sorted(std::move(pairs), Value(by == "key" ? "0" : "1"), truthy(p[0]), truthy(p[2])));
}

Value f_sort(const Value& v, CallArgs& a) {
  auto p = bind_args(
      "sort", a,
      {{"reverse", Value(false)}, {"case_sensitive", Value(false)}, {"attribute", kNone}});
  return Value(sorted(iterate(v), p[2], truthy(p[1]), truthy(p[0])));
}

Value f_unique(const Value& v, CallArgs& a) {
  auto p = bind_args("unique", a, {{"case_sensitive", Value(false)}, {"attribute", kNone}});
  std::vector<Value> out, seen;
  for (const Value& x : iterate(v)) {
    Value k = sort_key(x, p[1], truthy(p[0]));
    require_hashable(k);
    if (std::any_of(seen.begin(), seen.end(), [&](const Value& s) { return equals(s, k); }))
      continue;
    seen.push_back(k);
    out.push_back(x);
  }
  return Value(std::move(out));
}

Value f_reverse(const Value& v, CallArgs& a) {
  bind_args("reverse", a, {});
  if (v.is_string()) {
    std::u32string s = utf8::decode(v.str());
    std::reverse(s.begin(), s.end());
    return Value(utf8::encode(s));
  }
  std::vector<Value> items = iterate(v);
  std::reverse(items.begin(), items.end());
  return Value(std::move(items));
}

Value f_min(const Value& v, CallArgs& a) { return min_max(v, a, false); }
Value f_max(const Value& v, CallArgs& a) { return min_max(v, a, true); }

Value f_sum(const Value& v, CallArgs& a) {
  auto p = bind_args("sum", a, {{"attribute", kNone}, {"start", Value(0)}});
  Value total = p[1];
  for (const Value& x : iterate(v))
    total = arith("+", total, p[0].is_none() ? x : get_attr_path(x, to_str(p[0])));
  return total;
}

Value f_indent(const Value& v, CallArgs& a) {
  auto p = bind_args("indent", a,
                     {{"width", Value(4)}, {"first", Value(false)}, {"blank", Value(false)}});
  std::string ind =
      p[0].is_string() ? p[0].str() : std::string(std::max<int64_t>(0, p[0].as_int()), ' ');
  std::vector<std::string> lines = splitlines(need_string(v) + "\n");
  std::string rv;
  for (size_t i = 0; i < lines.size(); ++i) {
    if (i) rv += "\n";
    if (i && (truthy(p[2]) || !lines[i].empty())) rv += ind;
    rv += lines[i];
  }
  return Value(truthy(p[1]) ? ind + rv : rv);
}

Value f_select(const Value& v, CallArgs& a) { return select(v, a, true, false); }
Value f_reject(const Value& v, CallArgs& a) { return select(v, a, false, false); }
Value f_selectattr(const Value& v, CallArgs& a) { return select(v, a, true, true); }
Value f_rejectattr(const Value& v, CallArgs& a) { return select(v, a, false, true); }

const std::map<std::string_view, FilterFn>& filters() {
  static const std::map<std::string_view, FilterFn> m = {
      {"abs", f_abs},
      {"capitalize", f_capitalize},
      {"count", f_length},
      {"d", f_default},
      {"default", f_default},
      {"dictsort", f_dictsort},
      {"first", f_first},
      {"float", f_float},
      {"indent", f_indent},
      {"int", f_int},
      {"items", f_items},
      {"join", f_join},
      {"last", f_last},
      {"length", f_length},
      {"list", f_list},
      {"lower", f_lower},
      {"map", f_map},
      {"max", f_max},
      {"min", f_min},
      {"reject", f_reject},
      {"rejectattr", f_rejectattr},
      {"replace", f_replace},
      {"reverse", f_reverse},
      {"safe", f_string},
      {"select", f_select},
      {"selectattr", f_selectattr},
      {"sort", f_sort},
      {"string", f_string},
      {"sum", f_sum},
      {"title", f_title},
      {"tojson", f_tojson},
      {"trim", f_trim},
      {"unique", f_unique},
      {"upper", f_upper},
  };
  return m;
}

}  // namespace

bool has_filter(std::string_view name) { return filters().count(name) != 0; }

Value apply_filter(std::string_view name, const Value& input, CallArgs& args) {
  auto it = filters().find(name);
  if (it == filters().end()) raise("No filter named '{}'", name);
  return it->second(input, args);
}

}  // namespace bigmoe::jinja
