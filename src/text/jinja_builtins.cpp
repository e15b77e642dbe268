// Argument binding, Python str/dict methods, attribute/item/slice lookup and the globals.
// Mutating methods (list.append, dict.update, ...) are absent: HF renders in jinja2's
// ImmutableSandboxedEnvironment, which refuses them.
#include "text/jinja_builtins.h"

#include <algorithm>
#include <ctime>

#include "text/jinja_unicode.h"

namespace bigmoe::jinja {

std::vector<Value> bind_args(std::string_view fname, CallArgs& args,
                             std::initializer_list<Param> params) {
  std::vector<Value> out;
  std::vector<bool> set(params.size(), false);
  for (const Param& p : params) out.push_back(p.def);
  if (args.pos.size() > params.size())
    raise("{}() takes at most {} argument(s) ({} given)", fname, params.size(), args.pos.size());
  for (size_t i = 0; i < args.pos.size(); ++i) {
    out[i] = std::move(args.pos[i]);
    set[i] = true;
  }
  for (auto& [key, v] : args.kw) {
    size_t i = 0;
    for (const Param& p : params) {
      if (key == p.name) break;
      ++i;
    }
    if (i == params.size()) raise("{}() got an unexpected keyword argument '{}'", fname, key);
    if (set[i]) raise("{}() got multiple values for argument '{}'", fname, key);
    out[i] = std::move(v);
    set[i] = true;
  }
  size_t i = 0;
  for (const Param& p : params) {
    if (!set[i] && p.def.is_undefined())
      raise("{}() missing required argument '{}'", fname, p.name);
    ++i;
  }
  return out;
}

namespace {

const Value kNone = Value::none();

int64_t to_index(const Value& v, const char* what) {
  if (v.is_int() || v.is_bool()) return v.as_int();
  raise("{} must be an integer, not '{}'", what, type_name(v));
}

const std::string& need_str(const Value& v, const char* what) {
  if (!v.is_string()) raise("{} must be str, not '{}'", what, type_name(v));
  return v.str();
}

Value tuple2(Value a, Value b) {
  return Value(std::vector<Value>{std::move(a), std::move(b)}, true);
}

// Byte offset -> code point index, for str.find results.
int64_t cp_index(std::string_view s, size_t byte) {
  return static_cast<int64_t>(utf8::length(s.substr(0, byte)));
}

std::string replace_all(const std::string& s, const std::string& old, const std::string& with,
                        int64_t count) {
  std::string out;
  if (old.empty()) {  // Python inserts `with` around every code point
    int64_t n = 0;
    size_t i = 0;
    if (count != 0) {
      out += with;
      ++n;
    }
    while (i < s.size()) {
      size_t start = i;
      utf8::next(s, i);
      out.append(s, start, i - start);
      if (count < 0 || n < count) {
        out += with;
        ++n;
      }
    }
    return out;
  }
  size_t pos = 0;
  for (int64_t n = 0; count < 0 || n < count; ++n) {
    size_t hit = s.find(old, pos);
    if (hit == std::string::npos) break;
    out.append(s, pos, hit - pos);
    out += with;
    pos = hit + old.size();
  }
  out.append(s, pos);
  return out;
}

// Python str.split / str.rsplit.
Value split(const std::string& s, const Value& sep, int64_t maxsplit, bool from_right) {
  std::vector<Value> parts;
  if (sep.is_none()) {
    std::vector<std::pair<size_t, size_t>> words;  // byte ranges of whitespace-separated words
    for (size_t i = 0; i < s.size();) {
      if (size_t n = utf8::space_at(s, i)) {
        i += n;
        continue;
      }
      size_t b = i;
      while (i < s.size() && !utf8::space_at(s, i)) utf8::next(s, i);
      words.emplace_back(b, i);
    }
    if (maxsplit < 0 || static_cast<size_t>(maxsplit) + 1 >= words.size()) {
      for (auto [b, e] : words) parts.emplace_back(s.substr(b, e - b));
    } else if (!from_right) {
      for (int64_t k = 0; k < maxsplit; ++k)
        parts.emplace_back(s.substr(words[k].first, words[k].second - words[k].first));
      parts.emplace_back(s.substr(words[maxsplit].first));
    } else {
      size_t first = words.size() - maxsplit;
      parts.emplace_back(s.substr(0, words[first - 1].second));
      for (size_t k = first; k < words.size(); ++k)
        parts.emplace_back(s.substr(words[k].first, words[k].second - words[k].first));
    }
    return Value(std::move(parts));
  }
  const std::string& d = need_str(sep, "separator");
  if (d.empty()) raise("empty separator");
  if (!from_right) {
    size_t pos = 0;
    for (int64_t n = 0; maxsplit < 0 || n < maxsplit; ++n) {
      size_t hit = s.find(d, pos);
      if (hit == std::string::npos) break;
      parts.emplace_back(s.substr(pos, hit - pos));
      pos = hit + d.size();
    }
    parts.emplace_back(s.substr(pos));
    return Value(std::move(parts));
  }
  size_t end = s.size();
  for (int64_t n = 0; maxsplit < 0 || n < maxsplit; ++n) {
    if (end < d.size()) break;
    size_t hit = s.rfind(d, end - d.size());
    if (hit == std::string::npos) break;
    parts.emplace_back(s.substr(hit + d.size(), end - hit - d.size()));
    end = hit;
  }
  parts.emplace_back(s.substr(0, end));
  std::reverse(parts.begin(), parts.end());
  return Value(std::move(parts));
}

bool affix_match(const std::string& s, const Value& affix, bool prefix) {
  auto one = [&](const Value& a) {
    const std::string& x = need_str(a, prefix ? "startswith arg" : "endswith arg");
    return prefix ? s.starts_with(x) : s.ends_with(x);
  };
  if (affix.is_list()) {
    for (const Value& a : affix.list())
      if (one(a)) return true;
    return false;
  }
  return one(affix);
}

Value str_method(const Value& obj, const std::string& name) {
  if (name == "strip" || name == "lstrip" || name == "rstrip") {
    bool left = name != "rstrip", right = name != "lstrip";
    return Value::function(name, [obj, name, left, right](CallArgs& a) {
      auto p = bind_args(name, a, {{"chars", kNone}});
      if (p[0].is_none()) return Value(utf8::strip(obj.str(), left, right));
      return Value(utf8::strip_chars(obj.str(), need_str(p[0], "chars"), left, right));
    });
  }
  if (name == "split" || name == "rsplit") {
    return Value::function(name, [obj, name](CallArgs& a) {
      auto p = bind_args(name, a, {{"sep", kNone}, {"maxsplit", Value(-1)}});
      return split(obj.str(), p[0], to_index(p[1], "maxsplit"), name == "rsplit");
    });
  }
  if (name == "startswith" || name == "endswith") {
    return Value::function(name, [obj, name](CallArgs& a) {
      auto p = bind_args(name, a, {{"prefix", Value()}});
      return Value(affix_match(obj.str(), p[0], name == "startswith"));
    });
  }
  using Map = std::string (*)(std::string_view);
  Map map = name == "upper"        ? utf8::upper
            : name == "lower"      ? utf8::lower
            : name == "title"      ? utf8::title
            : name == "capitalize" ? utf8::capitalize
                                   : nullptr;
  if (map) {
    return Value::function(name, [obj, name, map](CallArgs& a) {
      bind_args(name, a, {});
      return Value(map(obj.str()));
    });
  }
  if (name == "replace") {
    return Value::function(name, [obj](CallArgs& a) {
      auto p = bind_args("replace", a, {{"old", Value()}, {"new", Value()}, {"count", Value(-1)}});
      return Value(replace_all(obj.str(), need_str(p[0], "old"), need_str(p[1], "new"),
                               to_index(p[2], "count")));
    });
  }
  if (name == "find" || name == "rfind" || name == "count") {
    return Value::function(name, [obj, name](CallArgs& a) {
      auto p = bind_args(name, a, {{"sub", Value()}});
      const std::string &s = obj.str(), &sub = need_str(p[0], "sub");
      if (name == "count") {
        if (sub.empty()) return Value(static_cast<int64_t>(utf8::length(s)) + 1);
        int64_t n = 0;
        for (size_t pos = s.find(sub); pos != std::string::npos;
             pos = s.find(sub, pos + sub.size()))
          ++n;
        return Value(n);
      }
      size_t hit = name == "find" ? s.find(sub) : s.rfind(sub);
      return Value(hit == std::string::npos ? int64_t{-1} : cp_index(s, hit));
    });
  }
  if (name == "join") {
    return Value::function(name, [obj](CallArgs& a) {
      auto p = bind_args("join", a, {{"iterable", Value()}});
      std::string out;
      size_t i = 0;
      for (const Value& x : iterate(p[0])) {
        if (!x.is_string())
          raise("sequence item {}: expected str instance, {} found", i, type_name(x));
        if (i++) out += obj.str();
        out += x.str();
      }
      return Value(std::move(out));
    });
  }
  return Value::undefined(fmt::format("'str object' has no attribute '{}'", name));
}

Value dict_method(const Value& obj, const std::string& name) {
  if (name == "items" || name == "keys" || name == "values") {
    return Value::function(name, [obj, name](CallArgs& a) {
      bind_args(name, a, {});
      std::vector<Value> out;
      for (const auto& [k, v] : obj.dict().items)
        out.push_back(name == "items" ? tuple2(Value(k), v) : name == "keys" ? Value(k) : v);
      return Value(std::move(out));
    });
  }
  if (name == "get") {
    return Value::function(name, [obj](CallArgs& a) {
      auto p = bind_args("get", a, {{"key", Value()}, {"default", kNone}});
      if (!p[0].is_string()) return p[1];
      const Value* v = obj.dict().find(p[0].str());
      return v ? *v : p[1];
    });
  }
  return Value();
}

std::string attr_missing(const Value& obj, const std::string& name) {
  return fmt::format("'{}' has no attribute '{}'", object_desc(obj), name);
}

}  // namespace

Value get_attr(const Value& obj, const std::string& name) {
  switch (obj.kind()) {
    case Value::Kind::Undefined:
      raise_undefined(obj);
    case Value::Kind::String:
      return str_method(obj, name);
    case Value::Kind::Dict: {
      Value m = dict_method(obj, name);
      if (!m.is_undefined()) return m;
      if (const Value* v = obj.dict().find(name)) return *v;
      break;
    }
    case Value::Kind::Object:
      if (const Value* v = obj.object().attrs.find(name)) return *v;
      break;
    default:
      break;
  }
  return Value::undefined(attr_missing(obj, name));
}

Value get_item(const Value& obj, const Value& key) {
  switch (obj.kind()) {
    case Value::Kind::Undefined:
      raise_undefined(obj);
    case Value::Kind::List:
    case Value::Kind::String:
      if (key.is_int() || key.is_bool()) {
        int64_t i = key.as_int();
        if (obj.is_list()) {
          int64_t n = static_cast<int64_t>(obj.list().size());
          if (i < 0) i += n;
          if (i >= 0 && i < n) return obj.list()[i];
        } else {
          std::u32string s = utf8::decode(obj.str());
          int64_t n = static_cast<int64_t>(s.size());
          if (i < 0) i += n;
          if (i >= 0 && i < n) return Value(utf8::encode(s.substr(i, 1)));
        }
        return Value::undefined(fmt::format("{} has no element {}", object_desc(obj), repr(key)));
      }
      break;
    case Value::Kind::Dict:
      if (key.is_string()) {
        if (const Value* v = obj.dict().find(key.str())) return *v;
      } else {
        return Value::undefined(fmt::format("{} has no element {}", object_desc(obj), repr(key)));
      }
      break;
    default:
      break;
  }
  if (key.is_string()) return get_attr(obj, key.str());
  return Value::undefined(fmt::format("{} has no element {}", object_desc(obj), repr(key)));
}

Value get_slice(const Value& obj, const Value* start, const Value* stop, const Value* step) {
  if (obj.is_undefined()) raise_undefined(obj);
  auto opt = [](const Value* v, const char* what) -> std::optional<int64_t> {
    if (!v || v->is_none()) return std::nullopt;
    return to_index(*v, what);
  };
  std::optional<int64_t> b = opt(start, "slice start"), e = opt(stop, "slice stop"),
                         s = opt(step, "slice step");
  int64_t st = s.value_or(1);
  if (st == 0) raise("slice step cannot be zero");
  auto pick = [&](int64_t n, auto&& take) {  // Python's slice.indices()
    auto clamp = [&](std::optional<int64_t> v, int64_t dflt) {
      if (!v) return dflt;
      int64_t x = *v < 0 ? *v + n : *v;
      if (st > 0) return std::clamp<int64_t>(x, 0, n);
      return std::clamp<int64_t>(x, -1, n - 1);
    };
    int64_t lo = clamp(b, st > 0 ? 0 : n - 1), hi = clamp(e, st > 0 ? n : -1);
    for (int64_t i = lo; st > 0 ? i < hi : i > hi; i += st) take(i);
  };
  if (obj.is_list()) {
    std::vector<Value> out;
    const auto& items = obj.list();
    pick(static_cast<int64_t>(items.size()), [&](int64_t i) { out.push_back(items[i]); });
    return Value(std::move(out), obj.is_tuple());
  }
  if (obj.is_string()) {
    std::u32string cps = utf8::decode(obj.str()), out;
    pick(static_cast<int64_t>(cps.size()), [&](int64_t i) { out += cps[i]; });
    return Value(utf8::encode(out));
  }
  return Value::undefined(fmt::format("{} has no element slice", object_desc(obj)));
}

Value get_attr_path(const Value& obj, std::string_view path) {
  Value v = obj;
  size_t b = 0;
  while (true) {
    size_t e = path.find('.', b);
    std::string part(path.substr(b, e == path.npos ? path.npos : e - b));
    bool digits = !part.empty() && std::all_of(part.begin(), part.end(), ::isdigit);
    v = digits ? get_item(v, Value(static_cast<int64_t>(std::stoll(part))))
               : get_item(v, Value(part));
    if (e == path.npos) return v;
    b = e + 1;
  }
}

// ---- globals ----------------------------------------------------------------------------------

namespace {

void dict_update(DictData& d, CallArgs& a, const char* fname) {
  if (a.pos.size() > 1) raise("{} expected at most 1 positional argument", fname);
  if (!a.pos.empty()) {
    const Value& src = a.pos[0];
    if (src.is_dict()) {
      for (const auto& [k, v] : src.dict().items) d.set(k, v);
    } else {
      for (const Value& pair : iterate(src)) {
        std::vector<Value> kv = iterate(pair);
        if (kv.size() != 2 || !kv[0].is_string()) raise("{}: expected (str, value) pairs", fname);
        d.set(kv[0].str(), kv[1]);
      }
    }
  }
  for (auto& [k, v] : a.kw) d.set(k, v);
}

}  // namespace

void add_globals(DictData& g) {
  g.set("range", Value::function("range", [](CallArgs& a) {
          if (!a.kw.empty() || a.pos.empty() || a.pos.size() > 3)
            raise("range() expects 1 to 3 integer arguments");
          int64_t start = 0, stop, step = 1;
          if (a.pos.size() == 1) {
            stop = to_index(a.pos[0], "range() argument");
          } else {
            start = to_index(a.pos[0], "range() argument");
            stop = to_index(a.pos[1], "range() argument");
            if (a.pos.size() == 3) step = to_index(a.pos[2], "range() argument");
          }
          if (step == 0) raise("range() arg 3 must not be zero");
          std::vector<Value> out;
          for (int64_t i = start; step > 0 ? i < stop : i > stop; i += step) {
            if (out.size() >= 100000)  // jinja2's sandbox MAX_RANGE
              raise("Range too big. The sandbox blocks ranges larger than MAX_RANGE (100000).");
            out.emplace_back(i);
          }
          return Value(std::move(out));
        }));
  g.set("namespace", Value::function("namespace", [](CallArgs& a) {
          auto ns = std::make_shared<ObjectData>();
          ns->type_name = "Namespace";
          dict_update(ns->attrs, a, "namespace");
          return Value(std::move(ns));
        }));
  g.set("dict", Value::function("dict", [](CallArgs& a) {
          auto d = std::make_shared<DictData>();
          dict_update(*d, a, "dict");
          return Value(std::move(d));
        }));
  g.set("raise_exception", Value::function("raise_exception", [](CallArgs& a) -> Value {
          auto p = bind_args("raise_exception", a, {{"message", Value()}});
          throw RuntimeError(to_str(p[0]));
        }));
  g.set("strftime_now", Value::function("strftime_now", [](CallArgs& a) {
          auto p = bind_args("strftime_now", a, {{"format", Value()}});
          std::time_t now = std::time(nullptr);
          std::tm tm{};
          localtime_r(&now, &tm);
          char buf[256];
          size_t n = std::strftime(buf, sizeof buf, need_str(p[0], "format").c_str(), &tm);
          return Value(std::string(buf, n));
        }));
}

}  // namespace bigmoe::jinja
