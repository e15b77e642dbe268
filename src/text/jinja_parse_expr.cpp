// Expressions, from the conditional expression down to literals, filters and tests.
#include <algorithm>

#include "text/jinja_builtins.h"
#include "text/jinja_parser.h"

namespace bigmoe::jinja {

bool Parser::is_tuple_end(const Tags& extra_end) const {
  if (cur().type == Tok::VarEnd || cur().type == Tok::BlockEnd || is_op(")")) return true;
  return cur().type == Tok::Name &&
         std::find(extra_end.begin(), extra_end.end(), cur().text) != extra_end.end();
}

ExprPtr Parser::parse_tuple(bool simplified, bool with_condexpr, const Tags& extra_end,
                            bool explicit_parens) {
  Pos pos = cur().pos;
  std::vector<ExprPtr> items;
  bool is_tuple = false;
  while (true) {
    if (!items.empty()) expect_op(",");
    if (is_tuple_end(extra_end)) break;
    items.push_back(simplified ? parse_primary() : parse_expression(with_condexpr));
    if (!is_op(",")) break;
    is_tuple = true;
  }
  if (!is_tuple) {
    if (!items.empty()) return std::move(items[0]);
    if (!explicit_parens) unexpected("an expression");
  }
  auto e = make_expr(Expr::Kind::Tuple, pos);
  e->items = std::move(items);
  return e;
}

ExprPtr Parser::parse_expression(bool with_condexpr) {
  return with_condexpr ? parse_condexpr() : parse_or();
}

ExprPtr Parser::parse_condexpr() {
  ExprPtr expr = parse_or();
  while (is_name("if")) {
    auto e = make_expr(Expr::Kind::Cond, advance().pos);
    e->b = parse_or();
    if (skip_name("else")) e->c = parse_condexpr();
    e->a = std::move(expr);
    expr = std::move(e);
  }
  return expr;
}

ExprPtr Parser::binary(Expr::Kind kind, Pos pos, ExprPtr a, ExprPtr b, std::string op) {
  auto e = make_expr(kind, pos);
  e->a = std::move(a);
  e->b = std::move(b);
  e->name = std::move(op);
  return e;
}

ExprPtr Parser::parse_or() {
  ExprPtr left = parse_and();
  while (is_name("or")) {
    Pos p = advance().pos;
    left = binary(Expr::Kind::Or, p, std::move(left), parse_and());
  }
  return left;
}

ExprPtr Parser::parse_and() {
  ExprPtr left = parse_not();
  while (is_name("and")) {
    Pos p = advance().pos;
    left = binary(Expr::Kind::And, p, std::move(left), parse_not());
  }
  return left;
}

ExprPtr Parser::parse_not() {
  if (is_name("not")) {
    auto e = make_expr(Expr::Kind::Not, advance().pos);
    e->a = parse_not();
    return e;
  }
  return parse_compare();
}

ExprPtr Parser::parse_compare() {
  Pos pos = cur().pos;
  ExprPtr expr = parse_math1();
  auto e = make_expr(Expr::Kind::Compare, pos);
  while (true) {
    static const char* kOps[] = {"==", "!=", "<", "<=", ">", ">="};
    std::string op;
    for (const char* o : kOps)
      if (is_op(o)) op = o;
    if (!op.empty()) {
      e->pos = advance().pos;
    } else if (is_name("in")) {
      e->pos = advance().pos;
      op = "in";
    } else if (is_name("not") && look().type == Tok::Name && look().text == "in") {
      e->pos = advance().pos;
      advance();
      op = "notin";
    } else {
      break;
    }
    e->ops.push_back(op);
    e->items.push_back(parse_math1());
  }
  if (e->ops.empty()) return expr;
  e->a = std::move(expr);
  return e;
}

ExprPtr Parser::parse_math1() {
  ExprPtr left = parse_concat();
  while (is_op("+") || is_op("-")) {
    const Token& t = advance();
    left = binary(Expr::Kind::Binary, t.pos, std::move(left), parse_concat(), t.text);
  }
  return left;
}

ExprPtr Parser::parse_concat() {
  Pos pos = cur().pos;
  ExprPtr first = parse_math2();
  if (!is_op("~")) return first;
  auto e = make_expr(Expr::Kind::Concat, pos);
  e->items.push_back(std::move(first));
  while (skip_op("~")) e->items.push_back(parse_math2());
  return e;
}

ExprPtr Parser::parse_math2() {
  ExprPtr left = parse_pow();
  while (is_op("*") || is_op("/") || is_op("//") || is_op("%")) {
    const Token& t = advance();
    left = binary(Expr::Kind::Binary, t.pos, std::move(left), parse_pow(), t.text);
  }
  return left;
}

ExprPtr Parser::parse_pow() {
  ExprPtr left = parse_unary();
  while (is_op("**")) {
    const Token& t = advance();
    left = binary(Expr::Kind::Binary, t.pos, std::move(left), parse_unary(), t.text);
  }
  return left;
}

ExprPtr Parser::parse_unary(bool with_filter) {
  ExprPtr node;
  if (is_op("-") || is_op("+")) {
    const Token& t = advance();
    node = make_expr(t.text == "-" ? Expr::Kind::Neg : Expr::Kind::Pos, t.pos);
    node->a = parse_unary(false);
  } else {
    node = parse_primary();
  }
  node = parse_postfix(std::move(node));
  if (with_filter) node = parse_filter_expr(std::move(node));
  return node;
}

ExprPtr Parser::constant(Pos pos, Value v) {
  auto e = make_expr(Expr::Kind::Const, pos);
  e->value = std::move(v);
  return e;
}

ExprPtr Parser::parse_primary() {
  const Token& t = cur();
  switch (t.type) {
    case Tok::Name: {
      advance();
      if (t.text == "true" || t.text == "True") return constant(t.pos, Value(true));
      if (t.text == "false" || t.text == "False") return constant(t.pos, Value(false));
      if (t.text == "none" || t.text == "None") return constant(t.pos, Value::none());
      for (MacroSig* sig : macro_stack_) {
        sig->uses_caller |= t.text == "caller";
        sig->uses_varargs |= t.text == "varargs";
        sig->uses_kwargs |= t.text == "kwargs";
      }
      auto e = make_expr(Expr::Kind::Name, t.pos);
      e->name = t.text;
      return e;
    }
    case Tok::String: {
      std::string s;
      Pos pos = t.pos;
      while (cur().type == Tok::String) s += advance().text;  // adjacent literals concatenate
      return constant(pos, Value(std::move(s)));
    }
    case Tok::Int:
      advance();
      return constant(t.pos, Value(t.ival));
    case Tok::Float:
      advance();
      return constant(t.pos, Value(t.fval));
    case Tok::Op:
      if (t.text == "(") {
        advance();
        ExprPtr e = parse_tuple(false, true, {}, true);
        expect_op(")");
        return e;
      }
      if (t.text == "[") return parse_list();
      if (t.text == "{") return parse_dict();
      break;
    default:
      break;
  }
  unexpected("an expression");
}

ExprPtr Parser::parse_list() {
  auto e = make_expr(Expr::Kind::List, expect_op("[").pos);
  while (!is_op("]")) {
    if (!e->items.empty()) expect_op(",");
    if (is_op("]")) break;
    e->items.push_back(parse_expression());
  }
  expect_op("]");
  return e;
}

ExprPtr Parser::parse_dict() {
  auto e = make_expr(Expr::Kind::Dict, expect_op("{").pos);
  while (!is_op("}")) {
    if (!e->items.empty()) expect_op(",");
    if (is_op("}")) break;
    e->items.push_back(parse_expression());
    expect_op(":");
    e->items.push_back(parse_expression());
  }
  expect_op("}");
  return e;
}

ExprPtr Parser::parse_postfix(ExprPtr node) {
  while (true) {
    if (is_op(".") || is_op("["))
      node = parse_subscript(std::move(node));
    else if (is_op("("))
      node = parse_call(std::move(node));
    else
      return node;
  }
}

ExprPtr Parser::parse_filter_expr(ExprPtr node) {
  while (true) {
    if (is_op("|"))
      node = parse_filter(std::move(node));
    else if (is_name("is"))
      node = parse_test(std::move(node));
    else if (is_op("("))
      node = parse_call(std::move(node));
    else
      return node;
  }
}

ExprPtr Parser::parse_subscript(ExprPtr node) {
  const Token& t = advance();
  if (t.text == ".") {
    const Token& attr = advance();
    if (attr.type == Tok::Name) {
      auto e = make_expr(Expr::Kind::Getattr, t.pos);
      e->a = std::move(node);
      e->name = attr.text;
      return e;
    }
    if (attr.type != Tok::Int)
      error(attr.pos, fmt::format("expected a name or number after '.', got {}", describe(attr)));
    auto e = make_expr(Expr::Kind::Getitem, t.pos);
    e->a = std::move(node);
    e->b = constant(attr.pos, Value(attr.ival));
    return e;
  }
  std::vector<ExprPtr> args;
  while (!is_op("]")) {
    if (!args.empty()) expect_op(",");
    args.push_back(parse_subscribed());
  }
  expect_op("]");
  auto e = make_expr(Expr::Kind::Getitem, t.pos);
  e->a = std::move(node);
  if (args.size() == 1) {
    e->b = std::move(args[0]);
  } else {
    e->b = make_expr(Expr::Kind::Tuple, t.pos);
    e->b->items = std::move(args);
  }
  return e;
}

ExprPtr Parser::parse_subscribed() {
  auto slice = make_expr(Expr::Kind::Slice, cur().pos);
  if (!skip_op(":")) {
    ExprPtr node = parse_expression();
    if (!skip_op(":")) return node;
    slice->a = std::move(node);
  }
  if (!is_op(":") && !is_op("]") && !is_op(",")) slice->b = parse_expression();
  if (skip_op(":") && !is_op("]") && !is_op(",")) slice->c = parse_expression();
  return slice;
}

void Parser::parse_call_args(Expr& e) {
  Pos open = expect_op("(").pos;
  bool require_comma = false;
  while (!is_op(")")) {
    if (require_comma) {
      expect_op(",");
      if (is_op(")")) break;
    }
    if (skip_op("*")) {
      if (e.dyn_args || e.dyn_kwargs) error(open, "invalid syntax for function call");
      e.dyn_args = parse_expression();
    } else if (skip_op("**")) {
      if (e.dyn_kwargs) error(open, "invalid syntax for function call");
      e.dyn_kwargs = parse_expression();
    } else if (cur().type == Tok::Name && look().type == Tok::Op && look().text == "=") {
      if (e.dyn_kwargs) error(open, "invalid syntax for function call");
      std::string key = advance().text;
      advance();
      e.kwargs.emplace_back(std::move(key), parse_expression());
    } else {
      if (e.dyn_args || e.dyn_kwargs || !e.kwargs.empty())
        error(cur().pos, "positional argument follows keyword argument");
      e.items.push_back(parse_expression());
    }
    require_comma = true;
  }
  expect_op(")");
}

ExprPtr Parser::parse_call(ExprPtr node) {
  auto e = make_expr(Expr::Kind::Call, cur().pos);
  parse_call_args(*e);
  e->a = std::move(node);
  return e;
}

std::string Parser::dotted_name(const Token& first) {
  std::string name = first.text;
  while (skip_op(".")) name += "." + expect_name().text;
  return name;
}

ExprPtr Parser::parse_filter(ExprPtr node, bool start_inline) {
  while (is_op("|") || start_inline) {
    if (!start_inline) advance();
    start_inline = false;
    const Token& t = expect_name("a filter name");
    auto e = make_expr(Expr::Kind::Filter, t.pos);
    e->name = dotted_name(t);
    if (!has_filter(e->name)) error(t.pos, fmt::format("unknown filter '{}'", e->name));
    if (is_op("(")) parse_call_args(*e);
    e->a = std::move(node);
    node = std::move(e);
  }
  return node;
}

ExprPtr Parser::parse_test(ExprPtr node) {
  Pos pos = advance().pos;
  bool negated = skip_name("not");
  const Token& t = expect_name("a test name");
  auto e = make_expr(Expr::Kind::Test, pos);
  e->name = dotted_name(t);
  if (!has_test(e->name)) error(t.pos, fmt::format("unknown test '{}'", e->name));
  if (is_op("(")) {
    parse_call_args(*e);
  } else if ((cur().type == Tok::Name || cur().type == Tok::String || cur().type == Tok::Int ||
              cur().type == Tok::Float || is_op("[") || is_op("{")) &&
             !is_name("else") && !is_name("or") && !is_name("and")) {
    if (is_name("is")) error(cur().pos, "cannot chain multiple tests with 'is'");
    e->items.push_back(parse_postfix(parse_primary()));
  }
  e->a = std::move(node);
  if (!negated) return e;
  auto n = make_expr(Expr::Kind::Not, pos);
  n->a = std::move(e);
  return n;
}

}  // namespace bigmoe::jinja
