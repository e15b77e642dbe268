#include "text/jinja_value.h"

#include <algorithm>
#include <charconv>
#include <cmath>

#include "text/jinja_unicode.h"

namespace bigmoe::jinja {

const Value* DictData::find(std::string_view key) const {
  for (const auto& [k, v] : items)
    if (k == key) return &v;
  return nullptr;
}

Value* DictData::find(std::string_view key) {
  for (auto& [k, v] : items)
    if (k == key) return &v;
  return nullptr;
}

void DictData::set(std::string key, Value v) {
  if (Value* slot = find(key))
    *slot = std::move(v);
  else
    items.emplace_back(std::move(key), std::move(v));
}

int64_t Value::as_int() const { return is_bool() ? int64_t{as_bool()} : get<int64_t>("int"); }

double Value::as_float() const {
  return is_float() ? std::get<double>(v_) : static_cast<double>(as_int());
}

void Value::wrong_type(const char* want) const {
  raise("expected {}, got '{}'", want, type_name(*this));
}

const void* Value::identity() const {
  switch (kind()) {
    case Kind::List:
      return std::get<std::shared_ptr<ListData>>(v_).get();
    case Kind::Dict:
      return std::get<std::shared_ptr<DictData>>(v_).get();
    case Kind::Callable:
      return std::get<std::shared_ptr<CallableData>>(v_).get();
    case Kind::Object:
      return std::get<std::shared_ptr<ObjectData>>(v_).get();
    default:
      return nullptr;
  }
}

std::string type_name(const Value& v) {
  switch (v.kind()) {
    case Value::Kind::Undefined:
      return "Undefined";
    case Value::Kind::None:
      return "NoneType";
    case Value::Kind::Bool:
      return "bool";
    case Value::Kind::Int:
      return "int";
    case Value::Kind::Float:
      return "float";
    case Value::Kind::String:
      return "str";
    case Value::Kind::List:
      return v.is_tuple() ? "tuple" : "list";
    case Value::Kind::Dict:
      return "dict";
    case Value::Kind::Callable:
      return "function";
    case Value::Kind::Object:
      return v.object().type_name;
  }
  return "?";
}

std::string object_desc(const Value& v) {
  if (v.is_none()) return "None";
  return type_name(v) + " object";
}

void raise_undefined(const Value& v) { throw RuntimeError(v.undefined_hint()); }

bool truthy(const Value& v) {
  switch (v.kind()) {
    case Value::Kind::Undefined:
    case Value::Kind::None:
      return false;
    case Value::Kind::Bool:
      return v.as_bool();
    case Value::Kind::Int:
      return v.as_int() != 0;
    case Value::Kind::Float:
      return v.as_float() != 0.0;
    case Value::Kind::String:
      return !v.str().empty();
    case Value::Kind::List:
      return !v.list().empty();
    case Value::Kind::Dict:
      return !v.dict().items.empty();
    default:
      return true;
  }
}

std::string float_repr(double d) {
  if (std::isnan(d)) return "nan";
  if (std::isinf(d)) return d < 0 ? "-inf" : "inf";
  char buf[64];
  auto r = std::to_chars(buf, buf + sizeof buf, d, std::chars_format::scientific);
  std::string_view s(buf, r.ptr - buf);  // shortest round trip: "-1.2345e+02"
  std::string sign;
  if (s.front() == '-') {
    sign = "-";
    s.remove_prefix(1);
  }
  size_t e = s.find('e');
  std::string digits;
  for (char c : s.substr(0, e))
    if (c != '.') digits += c;
  int exp = std::stoi(std::string(s.substr(e + 1)));
  int decpt = exp + 1;  // digits d1d2... mean 0.d1d2... * 10^decpt
  std::string out = sign;
  if (decpt <= -4 || decpt > 16) {  // CPython's 'r' format switches to exponent here
    out += digits[0];
    if (digits.size() > 1) out += "." + digits.substr(1);
    out += fmt::format("e{}{:02d}", exp < 0 ? '-' : '+', std::abs(exp));
  } else if (decpt <= 0) {
    out += "0." + std::string(-decpt, '0') + digits;
  } else if (decpt >= static_cast<int>(digits.size())) {
    out += digits + std::string(decpt - digits.size(), '0') + ".0";
  } else {
    out += digits.substr(0, decpt) + "." + digits.substr(decpt);
  }
  return out;
}

static bool printable(char32_t c) {
  if (c < 0x20 || c == 0x7f) return false;
  if (c < 0x7f) return true;
  return !((c >= 0x80 && c <= 0xa0) || c == 0xad || c == 0x1680 || (c >= 0x2000 && c <= 0x200f) ||
           (c >= 0x2028 && c <= 0x202f) || (c >= 0x205f && c <= 0x206f) || c == 0x3000 ||
           (c >= 0xd800 && c <= 0xf8ff) || c == 0xfeff || (c >= 0xfff9 && c <= 0xfffb));
}

static std::string repr_str(std::string_view s) {
  char quote = (s.find('\'') != s.npos && s.find('"') == s.npos) ? '"' : '\'';
  std::string out(1, quote);
  for (size_t i = 0; i < s.size();) {
    char32_t c = utf8::next(s, i);
    if (c == static_cast<char32_t>(quote) || c == '\\') {
      out += '\\';
      out += static_cast<char>(c);
    } else if (c == '\t') {
      out += "\\t";
    } else if (c == '\n') {
      out += "\\n";
    } else if (c == '\r') {
      out += "\\r";
    } else if (printable(c)) {
      utf8::append(out, c);
    } else if (c <= 0xff) {
      out += fmt::format("\\x{:02x}", static_cast<uint32_t>(c));
    } else if (c <= 0xffff) {
      out += fmt::format("\\u{:04x}", static_cast<uint32_t>(c));
    } else {
      out += fmt::format("\\U{:08x}", static_cast<uint32_t>(c));
    }
  }
  out += quote;
  return out;
}

std::string repr(const Value& v) {
  switch (v.kind()) {
    case Value::Kind::Undefined:
      return "Undefined";
    case Value::Kind::String:
      return repr_str(v.str());
    case Value::Kind::List: {
      std::string out = v.is_tuple() ? "(" : "[";
      const auto& items = v.list();
      for (size_t i = 0; i < items.size(); ++i) out += (i ? ", " : "") + repr(items[i]);
      if (v.is_tuple() && items.size() == 1) out += ",";
      return out + (v.is_tuple() ? ")" : "]");
    }
    case Value::Kind::Dict: {
      std::string out = "{";
      bool first = true;
      for (const auto& [k, x] : v.dict().items) {
        out += (first ? "" : ", ") + repr_str(k) + ": " + repr(x);
        first = false;
      }
      return out + "}";
    }
    case Value::Kind::Callable:
      return "<function " + v.callable().name + ">";
    case Value::Kind::Object: {
      Value attrs(std::make_shared<DictData>(v.object().attrs));
      return "<" + v.object().type_name + " " + repr(attrs) + ">";
    }
    default:
      return to_str(v);
  }
}

std::string to_str(const Value& v) {
  switch (v.kind()) {
    case Value::Kind::Undefined:
      return "";
    case Value::Kind::None:
      return "None";
    case Value::Kind::Bool:
      return v.as_bool() ? "True" : "False";
    case Value::Kind::Int:
      return std::to_string(v.as_int());
    case Value::Kind::Float:
      return float_repr(v.as_float());
    case Value::Kind::String:
      return v.str();
    default:
      return repr(v);
  }
}

bool equals(const Value& a, const Value& b) {
  using K = Value::Kind;
  if (a.is_number() && b.is_number()) {
    if (a.is_float() || b.is_float()) return a.as_float() == b.as_float();
    return a.as_int() == b.as_int();
  }
  if (a.kind() != b.kind()) return false;
  switch (a.kind()) {
    case K::Undefined:
    case K::None:
      return true;
    case K::String:
      return a.str() == b.str();
    case K::List: {
      if (a.is_tuple() != b.is_tuple() || a.list().size() != b.list().size()) return false;
      for (size_t i = 0; i < a.list().size(); ++i)
        if (!equals(a.list()[i], b.list()[i])) return false;
      return true;
    }
    case K::Dict: {
      if (a.dict().items.size() != b.dict().items.size()) return false;
      for (const auto& [k, x] : a.dict().items) {
        const Value* y = b.dict().find(k);
        if (!y || !equals(x, *y)) return false;
      }
      return true;
    }
    default:
      return a.identity() == b.identity();
  }
}

int compare(const Value& a, const Value& b, std::string_view op) {
  if (a.is_undefined()) raise_undefined(a);
  if (b.is_undefined()) raise_undefined(b);
  if (a.is_number() && b.is_number()) {
    if (a.is_float() || b.is_float()) {
      double x = a.as_float(), y = b.as_float();
      return x < y ? -1 : x > y ? 1 : 0;
    }
    int64_t x = a.as_int(), y = b.as_int();
    return x < y ? -1 : x > y ? 1 : 0;
  }
  if (a.is_string() && b.is_string()) {
    int c = a.str().compare(b.str());  // UTF-8 byte order is code point order
    return c < 0 ? -1 : c > 0 ? 1 : 0;
  }
  if (a.is_list() && b.is_list() && a.is_tuple() == b.is_tuple()) {
    const auto &x = a.list(), &y = b.list();
    for (size_t i = 0; i < x.size() && i < y.size(); ++i)
      if (!equals(x[i], y[i])) return compare(x[i], y[i], op);
    return x.size() < y.size() ? -1 : x.size() > y.size() ? 1 : 0;
  }
  raise("'{}' not supported between instances of '{}' and '{}'", op, type_name(a), type_name(b));
}

std::vector<Value> iterate(const Value& v) {
  switch (v.kind()) {
    case Value::Kind::Undefined:
      return {};
    case Value::Kind::List:
      return v.list();
    case Value::Kind::Dict: {
      std::vector<Value> keys;
      for (const auto& kv : v.dict().items) keys.emplace_back(kv.first);
      return keys;
    }
    case Value::Kind::String: {
      std::vector<Value> chars;
      const std::string& s = v.str();
      for (size_t i = 0; i < s.size();) {
        size_t start = i;
        utf8::next(s, i);
        chars.emplace_back(s.substr(start, i - start));
      }
      return chars;
    }
    default:
      raise("'{}' object is not iterable", type_name(v));
  }
}

void require_hashable(const Value& v) {
  if ((v.is_list() && !v.is_tuple()) || v.is_dict()) raise("unhashable type: '{}'", type_name(v));
  if (v.is_tuple())
    for (const Value& x : v.list()) require_hashable(x);
}

bool contains(const Value& c, const Value& x) {
  switch (c.kind()) {
    case Value::Kind::Undefined:
      return false;
    case Value::Kind::String:
      if (!x.is_string())
        raise("'in <string>' requires string as left operand, not {}", type_name(x));
      return c.str().find(x.str()) != std::string::npos;
    case Value::Kind::List:
      return std::any_of(c.list().begin(), c.list().end(),
                         [&](const Value& y) { return equals(x, y); });
    case Value::Kind::Dict:
      require_hashable(x);
      return x.is_string() && c.dict().find(x.str()) != nullptr;
    default:
      raise("argument of type '{}' is not iterable", type_name(c));
  }
}

namespace {

[[noreturn]] void bad_operands(std::string_view op, const Value& a, const Value& b) {
  raise("unsupported operand type(s) for {}: '{}' and '{}'", op, type_name(a), type_name(b));
}

template <typename Op>
Value checked(Op op, int64_t x, int64_t y) {
  int64_t r;
  if (op(x, y, &r)) raise("integer overflow");
  return Value(r);
}

Value repeat(const Value& seq, int64_t n) {
  if (seq.is_string()) {
    std::string out;
    for (int64_t i = 0; i < n; ++i) out += seq.str();
    return Value(std::move(out));
  }
  std::vector<Value> out;
  for (int64_t i = 0; i < n; ++i) out.insert(out.end(), seq.list().begin(), seq.list().end());
  return Value(std::move(out), seq.is_tuple());
}

Value float_pow(double x, double y) {
  if (x == 0.0 && y < 0) raise("0.0 cannot be raised to a negative power");
  if (x < 0 && y != std::floor(y)) raise("a negative number to a fractional power is complex");
  double r = std::pow(x, y);
  if (std::isinf(r) && std::isfinite(x) && std::isfinite(y))
    raise("(34, 'Numerical result out of range')");
  return Value(r);
}

Value int_pow(int64_t base, int64_t exp) {
  if (exp < 0) return float_pow(static_cast<double>(base), static_cast<double>(exp));
  int64_t r = 1;
  for (int64_t i = 0; i < exp; ++i)
    if (__builtin_mul_overflow(r, base, &r)) raise("integer overflow");
  return Value(r);
}

}  // namespace

Value arith(std::string_view op, const Value& a, const Value& b) {
  if (a.is_undefined()) raise_undefined(a);
  if (b.is_undefined()) raise_undefined(b);
  if (a.is_number() && b.is_number()) {
    if (op == "/") {
      if (b.as_float() == 0.0) raise("division by zero");
      return Value(a.as_float() / b.as_float());
    }
    if (!a.is_float() && !b.is_float()) {
      int64_t x = a.as_int(), y = b.as_int();
      auto add = [](int64_t p, int64_t q, int64_t* r) { return __builtin_add_overflow(p, q, r); };
      auto sub = [](int64_t p, int64_t q, int64_t* r) { return __builtin_sub_overflow(p, q, r); };
      auto mul = [](int64_t p, int64_t q, int64_t* r) { return __builtin_mul_overflow(p, q, r); };
      if (op == "+") return checked(add, x, y);
      if (op == "-") return checked(sub, x, y);
      if (op == "*") return checked(mul, x, y);
      if (op == "**") return int_pow(x, y);
      if (y == 0) raise("integer division or modulo by zero");
      int64_t q = x / y, m = x % y;
      if (m != 0 && ((m < 0) != (y < 0))) {  // Python floors toward negative infinity
        --q;
        m += y;
      }
      return Value(op == "//" ? q : m);
    }
    double x = a.as_float(), y = b.as_float();
    if (op == "+") return Value(x + y);
    if (op == "-") return Value(x - y);
    if (op == "*") return Value(x * y);
    if (op == "**") return float_pow(x, y);
    if (y == 0.0) raise("float {} by zero", op == "//" ? "floor division" : "modulo");
    double mod = std::fmod(x, y), div = (x - mod) / y;  // CPython's float_divmod
    if (mod != 0.0) {
      if ((y < 0) != (mod < 0)) {
        mod += y;
        div -= 1.0;
      }
    } else {
      mod = std::copysign(0.0, y);
    }
    if (op == "%") return Value(mod);
    if (div == 0.0) return Value(std::copysign(0.0, x / y));
    double floordiv = std::floor(div);
    return Value(div - floordiv > 0.5 ? floordiv + 1.0 : floordiv);
  }
  if (op == "+" && (a.is_string() || a.is_list())) {
    if (a.is_string() && b.is_string()) return Value(a.str() + b.str());
    if (a.is_list() && b.is_list() && a.is_tuple() == b.is_tuple()) {
      std::vector<Value> out = a.list();
      out.insert(out.end(), b.list().begin(), b.list().end());
      return Value(std::move(out), a.is_tuple());
    }
    raise("can only concatenate {} (not \"{}\") to {}", type_name(a), type_name(b), type_name(a));
  }
  if (op == "*") {
    if ((a.is_string() || a.is_list()) && (b.is_int() || b.is_bool())) return repeat(a, b.as_int());
    if ((b.is_string() || b.is_list()) && (a.is_int() || a.is_bool())) return repeat(b, a.as_int());
  }
  if (op == "%" && a.is_string()) raise("printf-style '%' string formatting is not supported");
  bad_operands(op, a, b);
}

namespace {

// Nesting is capped because everything downstream (repr, ==, json.dumps) recurses.
constexpr int kMaxJsonDepth = 256;

Value from_json(const nlohmann::ordered_json& j, int depth) {
  if (depth > kMaxJsonDepth) raise("context nested deeper than {} levels", kMaxJsonDepth);
  using T = nlohmann::ordered_json::value_t;
  switch (j.type()) {
    case T::null:
      return Value::none();
    case T::boolean:
      return Value(j.get<bool>());
    case T::number_integer:
      return Value(j.get<int64_t>());
    case T::number_unsigned: {
      uint64_t u = j.get<uint64_t>();
      if (u <= static_cast<uint64_t>(INT64_MAX)) return Value(static_cast<int64_t>(u));
      return Value(static_cast<double>(u));
    }
    case T::number_float:
      return Value(j.get<double>());
    case T::string:
      return Value(j.get<std::string>());
    case T::array: {
      std::vector<Value> items;
      items.reserve(j.size());
      for (const auto& x : j) items.push_back(from_json(x, depth + 1));
      return Value(std::move(items));
    }
    case T::object: {
      auto d = std::make_shared<DictData>();
      d->items.reserve(j.size());
      for (const auto& [k, x] : j.items()) d->items.emplace_back(k, from_json(x, depth + 1));
      return Value(std::move(d));
    }
    default:
      raise("cannot use a JSON {} value in a template", j.type_name());
  }
}

}  // namespace

Value from_json(const nlohmann::ordered_json& j) { return from_json(j, 0); }

static void dump_str(std::string& out, std::string_view s, bool ensure_ascii) {
  out += '"';
  for (size_t i = 0; i < s.size();) {
    size_t start = i;
    char32_t c = utf8::next(s, i);
    switch (c) {
      case '"':
        out += "\\\"";
        continue;
      case '\\':
        out += "\\\\";
        continue;
      case '\n':
        out += "\\n";
        continue;
      case '\r':
        out += "\\r";
        continue;
      case '\t':
        out += "\\t";
        continue;
      case '\b':
        out += "\\b";
        continue;
      case '\f':
        out += "\\f";
        continue;
      default:
        break;
    }
    if (c < 0x20 || (ensure_ascii && c >= 0x7f)) {
      if (c >= 0x10000) {
        char32_t v = c - 0x10000;
        out += fmt::format("\\u{:04x}\\u{:04x}", 0xd800 + (v >> 10), 0xdc00 + (v & 0x3ff));
      } else {
        out += fmt::format("\\u{:04x}", static_cast<uint32_t>(c));
      }
    } else {
      out.append(s.substr(start, i - start));
    }
  }
  out += '"';
}

static void dump(std::string& out, const Value& v, const DumpOptions& opt, int level) {
  auto newline = [&](int lvl) {
    out += '\n';
    for (int i = 0; i < lvl; ++i) out += *opt.indent;
  };
  switch (v.kind()) {
    case Value::Kind::None:
      out += "null";
      return;
    case Value::Kind::Bool:
      out += v.as_bool() ? "true" : "false";
      return;
    case Value::Kind::Int:
      out += std::to_string(v.as_int());
      return;
    case Value::Kind::Float: {
      double d = v.as_float();
      out += std::isnan(d)   ? "NaN"
             : std::isinf(d) ? (d < 0 ? "-Infinity" : "Infinity")
                             : float_repr(d);
      return;
    }
    case Value::Kind::String:
      dump_str(out, v.str(), opt.ensure_ascii);
      return;
    case Value::Kind::List: {
      const auto& items = v.list();
      if (items.empty()) {
        out += "[]";
        return;
      }
      out += '[';
      for (size_t i = 0; i < items.size(); ++i) {
        if (i) out += opt.item_sep;
        if (opt.indent) newline(level + 1);
        dump(out, items[i], opt, level + 1);
      }
      if (opt.indent) newline(level);
      out += ']';
      return;
    }
    case Value::Kind::Dict: {
      std::vector<const std::pair<std::string, Value>*> items;
      for (const auto& kv : v.dict().items) items.push_back(&kv);
      if (items.empty()) {
        out += "{}";
        return;
      }
      if (opt.sort_keys)
        std::stable_sort(items.begin(), items.end(),
                         [](auto* a, auto* b) { return a->first < b->first; });
      out += '{';
      for (size_t i = 0; i < items.size(); ++i) {
        if (i) out += opt.item_sep;
        if (opt.indent) newline(level + 1);
        dump_str(out, items[i]->first, opt.ensure_ascii);
        out += opt.key_sep;
        dump(out, items[i]->second, opt, level + 1);
      }
      if (opt.indent) newline(level);
      out += '}';
      return;
    }
    default:
      raise("Object of type {} is not JSON serializable", type_name(v));
  }
}

std::string json_dumps(const Value& v, const DumpOptions& opt) {
  std::string out;
  dump(out, v, opt, 0);
  return out;
}

}  // namespace bigmoe::jinja
