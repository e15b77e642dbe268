// Syntax tree of a parsed Jinja template, and the parser that builds it (jinja_parser.cpp).
// Node shapes follow jinja2/nodes.py; an elif chain becomes nested If nodes in else_body.
#pragma once
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "text/jinja_lexer.h"
#include "text/jinja_value.h"

namespace bigmoe::jinja {

struct Expr;
using ExprPtr = std::unique_ptr<Expr>;
using Kwargs = std::vector<std::pair<std::string, ExprPtr>>;

struct Expr {
  enum class Kind {
    Const,    // value
    Name,     // name
    Getattr,  // a.name
    Getitem,  // a[b]
    Slice,    // a:b:c inside [], null parts are None
    Call,     // a(items..., kwargs..., *dyn_args, **dyn_kwargs)
    Filter,   // a | name(items..., kwargs...); a is null in {% filter %} / {% set x | f %}
    Test,     // a is name(items..., kwargs...)
    Neg,      // -a
    Pos,      // +a
    Not,      // not a
    Binary,   // a name b, name one of + - * / // % **
    And,      // a and b
    Or,       // a or b
    Compare,  // a ops[0] items[0] ops[1] items[1] ...; ops: == != < <= > >= in notin
    Concat,   // items[0] ~ items[1] ~ ...
    Cond,     // a if b else c (c may be null: undefined)
    List,     // [items]
    Tuple,    // (items)
    Dict,     // {items[0]: items[1], ...}
  };
  Kind kind;
  Pos pos;
  Value value;
  std::string name;
  ExprPtr a, b, c;
  std::vector<ExprPtr> items;
  Kwargs kwargs;
  std::vector<std::string> ops;
  ExprPtr dyn_args, dyn_kwargs;
};

// Assignment target: a name, a tuple of targets (for k, v in ...), or ns.attr.
struct Target {
  enum class Kind { Name, Tuple, NSRef };
  Kind kind = Kind::Name;
  std::string name;
  std::string attr;  // NSRef
  std::vector<Target> items;
  Pos pos;
};

struct Stmt;
using StmtPtr = std::unique_ptr<Stmt>;
using Body = std::vector<StmtPtr>;

// Signature of a macro or {% call(args) %} block.
struct MacroSig {
  std::string name;
  std::vector<std::string> params;
  std::vector<ExprPtr> defaults;  // for the last defaults.size() params
  bool uses_caller = false, uses_varargs = false, uses_kwargs = false;
};

struct Stmt {
  enum class Kind {
    Text,         // text
    Print,        // {{ expr }}
    If,           // if expr: body else else_body
    For,          // for target in expr [if cond]: body else else_body
    Set,          // set target = expr
    SetBlock,     // set target [| filter]: body endset
    Macro,        // macro sig: body
    CallBlock,    // call[(sig)] expr: body
    FilterBlock,  // filter filter: body
    With,         // with targets = values: body
    Break,
    Continue,
    Scope,  // {% generation %} body (HF's assistant-mask extension renders it inline)
  };
  Kind kind;
  Pos pos;
  std::string text;
  ExprPtr expr;
  ExprPtr cond;    // For's "if" filter
  ExprPtr filter;  // SetBlock / FilterBlock: a Filter chain with null innermost target
  Target target;
  std::vector<Target> targets;  // With
  std::vector<ExprPtr> values;  // With
  MacroSig sig;
  Body body, else_body;
};

struct Template {
  std::string name;
  Body body;
};

// Throws bigmoe::Error "name:line:col: message" naming what was expected.
Template parse_template(std::string_view source, std::string name);

}  // namespace bigmoe::jinja
