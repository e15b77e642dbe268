#include "text/jinja_eval.h"

#include "text/jinja_builtins.h"
#include "util/error.h"

namespace bigmoe::jinja {
namespace {

struct Scope {
  std::shared_ptr<Scope> parent;
  std::vector<std::pair<std::string, Value>> vars;

  const Value* find(std::string_view name) const {
    for (const Scope* s = this; s; s = s->parent.get())
      for (const auto& [k, v] : s->vars)
        if (k == name) return &v;
    return nullptr;
  }
  void set(const std::string& name, Value v) {
    for (auto& [k, x] : vars)
      if (k == name) {
        x = std::move(v);
        return;
      }
    vars.emplace_back(name, std::move(v));
  }
};
using ScopePtr = std::shared_ptr<Scope>;

ScopePtr child(const ScopePtr& parent) {
  auto s = std::make_shared<Scope>();
  s->parent = parent;
  return s;
}

// A macro or call-block body with the scope it was defined in.
struct Closure {
  const MacroSig* sig;
  const Body* body;
  ScopePtr scope;
};

enum class Flow { Normal, Break, Continue };

constexpr int kMaxCallDepth = 200;

class Evaluator {
 public:
  explicit Evaluator(const Template& t) : t_(t) {}
  // Macro values stored in a scope hold that scope: break the cycles.
  ~Evaluator() {
    for (auto& c : closures_) c->scope.reset();
  }

  std::string run(const Value& context) {
    auto globals = std::make_shared<Scope>();
    DictData g;
    add_globals(g);
    globals->vars = std::move(g.items);
    ScopePtr root = child(globals);
    if (context.is_dict()) root->vars = context.dict().items;
    std::string out;
    exec_body(t_.body, root, out);
    return out;
  }

 private:
  [[noreturn]] void error_at(Pos p, const std::string& msg) const {
    fail("{}:{}:{}: {}", t_.name, p.line, p.col, msg);
  }

  // ---- statements ---------------------------------------------------------------------------
  Flow exec_body(const Body& body, const ScopePtr& s, std::string& out) {
    for (const StmtPtr& st : body) {
      Flow f = exec(*st, s, out);
      if (f != Flow::Normal) return f;
    }
    return Flow::Normal;
  }

  Flow exec(const Stmt& st, const ScopePtr& s, std::string& out) {
    try {
      return exec_inner(st, s, out);
    } catch (const RuntimeError& e) {
      error_at(st.pos, e.what());
    }
  }

  Flow exec_inner(const Stmt& st, const ScopePtr& s, std::string& out) {
    switch (st.kind) {
      case Stmt::Kind::Text:
        out += st.text;
        break;
      case Stmt::Kind::Print:
        out += to_str(eval(*st.expr, s));
        break;
      case Stmt::Kind::If:
        return exec_body(truthy(eval(*st.expr, s)) ? st.body : st.else_body, s, out);
      case Stmt::Kind::For:
        return exec_for(st, s, out);
      case Stmt::Kind::Set:
        assign(st.target, eval(*st.expr, s), *s);
        break;
      case Stmt::Kind::SetBlock: {
        std::string buf;
        exec_body(st.body, s, buf);
        Value v(std::move(buf));
        assign(st.target, st.filter ? eval_filter(*st.filter, s, &v) : v, *s);
        break;
      }
      case Stmt::Kind::Macro:
        s->set(st.sig.name, make_macro(st.sig, st.body, s));
        break;
      case Stmt::Kind::CallBlock: {
        const Expr& call = *st.expr;
        Value fn = eval(*call.a, s);
        CallArgs args = eval_args(call, s);
        args.kw.emplace_back("caller", make_macro(st.sig, st.body, s));
        out += to_str(invoke(fn, args));
        break;
      }
      case Stmt::Kind::FilterBlock: {
        std::string buf;
        exec_body(st.body, child(s), buf);
        Value v(std::move(buf));
        out += to_str(eval_filter(*st.filter, s, &v));
        break;
      }
      case Stmt::Kind::With: {
        ScopePtr inner = child(s);
        for (size_t i = 0; i < st.targets.size(); ++i)
          assign(st.targets[i], eval(*st.values[i], s), *inner);
        return exec_body(st.body, inner, out);
      }
      case Stmt::Kind::Break:
        return Flow::Break;
      case Stmt::Kind::Continue:
        return Flow::Continue;
      case Stmt::Kind::Scope:
        exec_body(st.body, child(s), out);
        break;
    }
    return Flow::Normal;
  }

  Flow exec_for(const Stmt& st, const ScopePtr& s, std::string& out) {
    std::vector<Value> items = iterate(eval(*st.expr, s));
    if (st.cond) {  // the loop filter runs before the loop, so loop.length counts kept items
      std::vector<Value> kept;
      for (Value& item : items) {
        ScopePtr fs = child(s);
        assign(st.target, item, *fs);
        if (truthy(eval(*st.cond, fs))) kept.push_back(std::move(item));
      }
      items = std::move(kept);
    }
    if (items.empty()) return exec_body(st.else_body, child(s), out);
    const int64_t n = static_cast<int64_t>(items.size());
    for (int64_t i = 0; i < n; ++i) {
      ScopePtr it = child(s);
      assign(st.target, items[i], *it);
      auto loop = std::make_shared<ObjectData>();
      loop->type_name = "LoopContext";
      DictData& a = loop->attrs;
      a.items = {{"index0", Value(i)},
                 {"index", Value(i + 1)},
                 {"revindex0", Value(n - i - 1)},
                 {"revindex", Value(n - i)},
                 {"first", Value(i == 0)},
                 {"last", Value(i == n - 1)},
                 {"length", Value(n)},
                 {"depth0", Value(0)},
                 {"depth", Value(1)},
                 {"previtem", i > 0 ? items[i - 1] : Value::undefined("there is no previous item")},
                 {"nextitem", i + 1 < n ? items[i + 1] : Value::undefined("there is no next item")},
                 {"cycle", Value::function("cycle", [i](CallArgs& args) {
                    if (args.pos.empty()) raise("no items for cycling given");
                    return args.pos[i % static_cast<int64_t>(args.pos.size())];
                  })}};
      it->set("loop", Value(std::move(loop)));
      if (exec_body(st.body, it, out) == Flow::Break) break;
    }
    return Flow::Normal;
  }

  void assign(const Target& t, const Value& v, Scope& s) {
    switch (t.kind) {
      case Target::Kind::Name:
        s.set(t.name, v);
        return;
      case Target::Kind::NSRef: {
        const Value* ns = s.find(t.name);
        if (!ns || !ns->is_object() || ns->object().type_name != "Namespace")
          raise("cannot assign attribute on non-namespace object ('{}' is {})", t.name,
                ns ? type_name(*ns) : "undefined");
        ns->object().attrs.set(t.attr, v);
        return;
      }
      case Target::Kind::Tuple: {
        if (!(v.is_list() || v.is_string() || v.is_dict()))
          raise("cannot unpack non-iterable {} object", type_name(v));
        std::vector<Value> items = iterate(v);
        if (items.size() > t.items.size())
          raise("too many values to unpack (expected {})", t.items.size());
        if (items.size() < t.items.size())
          raise("not enough values to unpack (expected {}, got {})", t.items.size(), items.size());
        for (size_t i = 0; i < items.size(); ++i) assign(t.items[i], items[i], s);
        return;
      }
    }
  }

  // ---- macros -------------------------------------------------------------------------------
  Value make_macro(const MacroSig& sig, const Body& body, const ScopePtr& scope) {
    auto c = std::make_shared<Closure>(Closure{&sig, &body, scope});
    closures_.push_back(c);
    return Value::function(sig.name, [this, c](CallArgs& args) { return call_macro(*c, args); });
  }

  Value call_macro(const Closure& c, CallArgs& args) {
    const MacroSig& sig = *c.sig;
    if (depth_ >= kMaxCallDepth) raise("maximum macro call depth ({}) exceeded", kMaxCallDepth);
    ScopePtr s = child(c.scope);
    const size_t np = sig.params.size();
    if (args.pos.size() > np && !sig.uses_varargs)
      raise("macro '{}' takes not more than {} argument(s)", sig.name, np);
    std::vector<bool> bound(np, false);
    for (size_t i = 0; i < np && i < args.pos.size(); ++i) {
      s->set(sig.params[i], args.pos[i]);
      bound[i] = true;
    }
    auto kwargs = std::make_shared<DictData>();
    Value caller = Value::undefined("No caller defined");
    for (auto& [k, v] : args.kw) {
      auto it = std::find(sig.params.begin(), sig.params.end(), k);
      if (it != sig.params.end()) {
        size_t i = it - sig.params.begin();
        if (bound[i]) raise("macro '{}' got multiple values for argument '{}'", sig.name, k);
        s->set(k, v);
        bound[i] = true;
      } else if (k == "caller" && sig.uses_caller) {
        caller = v;
      } else if (sig.uses_kwargs) {
        kwargs->set(k, v);
      } else {
        raise("macro '{}' takes no keyword argument '{}'", sig.name, k);
      }
    }
    const size_t first_default = np - sig.defaults.size();
    for (size_t i = 0; i < np; ++i) {
      if (bound[i]) continue;
      s->set(sig.params[i],
             i >= first_default
                 ? eval(*sig.defaults[i - first_default], s)
                 : Value::undefined(fmt::format("parameter '{}' was not provided", sig.params[i])));
    }
    if (sig.uses_varargs) {
      std::vector<Value> extra;
      for (size_t i = np; i < args.pos.size(); ++i) extra.push_back(args.pos[i]);
      s->set("varargs", Value(std::move(extra), true));
    }
    if (sig.uses_kwargs) s->set("kwargs", Value(std::move(kwargs)));
    if (sig.uses_caller) s->set("caller", caller);
    std::string out;
    ++depth_;
    struct Leave {
      int& d;
      ~Leave() { --d; }
    } leave{depth_};
    exec_body(*c.body, s, out);
    return Value(std::move(out));
  }

  Value invoke(const Value& fn, CallArgs& args) {
    if (fn.is_undefined()) raise_undefined(fn);
    if (!fn.is_callable()) raise("'{}' object is not callable", type_name(fn));
    return fn.callable().fn(args);
  }

  // ---- expressions --------------------------------------------------------------------------
  Value eval(const Expr& e, const ScopePtr& s) {
    try {
      return eval_inner(e, s);
    } catch (const RuntimeError& err) {
      error_at(e.pos, err.what());
    }
  }

  CallArgs eval_args(const Expr& e, const ScopePtr& s) {
    CallArgs args;
    for (const ExprPtr& x : e.items) args.pos.push_back(eval(*x, s));
    if (e.dyn_args)
      for (Value& x : iterate(eval(*e.dyn_args, s))) args.pos.push_back(std::move(x));
    for (const auto& [k, x] : e.kwargs) args.kw.emplace_back(k, eval(*x, s));
    if (e.dyn_kwargs) {
      Value d = eval(*e.dyn_kwargs, s);
      if (!d.is_dict()) raise("argument after ** must be a mapping, not {}", type_name(d));
      for (const auto& [k, x] : d.dict().items) args.kw.emplace_back(k, x);
    }
    return args;
  }

  // block_input feeds the innermost filter of a {% filter %} / {% set x | f %} chain.
  Value eval_filter(const Expr& e, const ScopePtr& s, const Value* block_input) {
    Value input = !e.a ? *block_input
                  : (block_input && e.a->kind == Expr::Kind::Filter)
                      ? eval_filter(*e.a, s, block_input)
                      : eval(*e.a, s);
    CallArgs args = eval_args(e, s);
    try {
      return apply_filter(e.name, input, args);
    } catch (const RuntimeError& err) {
      error_at(e.pos, err.what());
    }
  }

  static bool compare_op(const std::string& op, const Value& l, const Value& r) {
    if (op == "==") return equals(l, r);
    if (op == "!=") return !equals(l, r);
    if (op == "in") return contains(r, l);
    if (op == "notin") return !contains(r, l);
    int c = compare(l, r, op);
    if (op == "<") return c < 0;
    if (op == "<=") return c <= 0;
    if (op == ">") return c > 0;
    return c >= 0;
  }

  Value negate(const Value& v, bool neg) {
    if (v.is_undefined()) raise_undefined(v);
    if (v.is_float()) return Value(neg ? -v.as_float() : v.as_float());
    if (v.is_int() || v.is_bool()) {
      if (neg && v.as_int() == INT64_MIN) raise("integer overflow");
      return Value(neg ? -v.as_int() : v.as_int());
    }
    raise("bad operand type for unary {}: '{}'", neg ? '-' : '+', type_name(v));
  }

  Value eval_inner(const Expr& e, const ScopePtr& s) {
    using K = Expr::Kind;
    switch (e.kind) {
      case K::Const:
        return e.value;
      case K::Name: {
        if (const Value* v = s->find(e.name)) return *v;
        return Value::undefined(fmt::format("'{}' is undefined", e.name));
      }
      case K::Getattr:
        return get_attr(eval(*e.a, s), e.name);
      case K::Getitem: {
        Value obj = eval(*e.a, s);
        if (e.b->kind != K::Slice) return get_item(obj, eval(*e.b, s));
        const Expr& sl = *e.b;
        Value parts[3];
        const Expr* exprs[3] = {sl.a.get(), sl.b.get(), sl.c.get()};
        for (int i = 0; i < 3; ++i)
          if (exprs[i]) parts[i] = eval(*exprs[i], s);
        return get_slice(obj, exprs[0] ? &parts[0] : nullptr, exprs[1] ? &parts[1] : nullptr,
                         exprs[2] ? &parts[2] : nullptr);
      }
      case K::Slice:
        raise("a slice is only allowed inside []");
      case K::Call: {
        Value fn = eval(*e.a, s);
        CallArgs args = eval_args(e, s);
        return invoke(fn, args);
      }
      case K::Filter:
        return eval_filter(e, s, nullptr);
      case K::Test: {
        Value v = eval(*e.a, s);
        CallArgs args = eval_args(e, s);
        return Value(apply_test(e.name, v, args));
      }
      case K::Neg:
        return negate(eval(*e.a, s), true);
      case K::Pos:
        return negate(eval(*e.a, s), false);
      case K::Not:
        return Value(!truthy(eval(*e.a, s)));
      case K::Binary: {
        Value l = eval(*e.a, s);
        return arith(e.name, l, eval(*e.b, s));
      }
      case K::And: {
        Value l = eval(*e.a, s);
        return truthy(l) ? eval(*e.b, s) : l;
      }
      case K::Or: {
        Value l = eval(*e.a, s);
        return truthy(l) ? l : eval(*e.b, s);
      }
      case K::Compare: {
        Value l = eval(*e.a, s);
        for (size_t i = 0; i < e.ops.size(); ++i) {
          Value r = eval(*e.items[i], s);
          if (!compare_op(e.ops[i], l, r)) return Value(false);
          l = std::move(r);
        }
        return Value(true);
      }
      case K::Concat: {
        std::string out;
        for (const ExprPtr& x : e.items) out += to_str(eval(*x, s));
        return Value(std::move(out));
      }
      case K::Cond:
        if (truthy(eval(*e.b, s))) return eval(*e.a, s);
        if (e.c) return eval(*e.c, s);
        return Value::undefined(fmt::format(
            "the inline if-expression on line {} evaluated to false and no else section was "
            "defined.",
            e.pos.line));
      case K::List:
      case K::Tuple: {
        std::vector<Value> items;
        for (const ExprPtr& x : e.items) items.push_back(eval(*x, s));
        return Value(std::move(items), e.kind == K::Tuple);
      }
      case K::Dict: {
        auto d = std::make_shared<DictData>();
        for (size_t i = 0; i + 1 < e.items.size(); i += 2) {
          Value k = eval(*e.items[i], s);
          if (!k.is_string()) raise("dict keys must be strings here, got '{}'", type_name(k));
          d->set(k.str(), eval(*e.items[i + 1], s));
        }
        return Value(std::move(d));
      }
    }
    raise("internal error: unknown expression kind");
  }

  const Template& t_;
  std::vector<std::shared_ptr<Closure>> closures_;
  int depth_ = 0;
};

}  // namespace

std::string render(const Template& t, const Value& context) { return Evaluator(t).run(context); }

}  // namespace bigmoe::jinja
