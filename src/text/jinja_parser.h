// The Jinja parser: its state and one method per rule of jinja2/parser.py. Statements and
// assignment targets are in jinja_parser.cpp, expressions in jinja_parse_expr.cpp. Precedence,
// loosest first: x if c else y, or, and, not, comparisons/in, + -, ~, * / // %, **,
// unary - +, then postfix . [] () with filters | and tests `is`.
#pragma once
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "text/jinja_ast.h"
#include "util/error.h"

namespace bigmoe::jinja {

using Tags = std::vector<std::string_view>;

inline ExprPtr make_expr(Expr::Kind kind, Pos pos) {
  auto e = std::make_unique<Expr>();
  e->kind = kind;
  e->pos = pos;
  return e;
}

class Parser {
 public:
  Parser(std::vector<Token> toks, std::string name) : t_(std::move(toks)), name_(std::move(name)) {}

  Body parse() { return subparse({}); }

 private:
  // ---- token stream -------------------------------------------------------------------------
  const Token& cur() const { return t_[i_]; }
  const Token& look() const { return t_[std::min(i_ + 1, t_.size() - 1)]; }
  const Token& advance() {
    const Token& t = t_[i_];
    if (i_ + 1 < t_.size()) ++i_;
    return t;
  }
  bool is_op(std::string_view op) const { return cur().type == Tok::Op && cur().text == op; }
  bool is_name(std::string_view n) const { return cur().type == Tok::Name && cur().text == n; }
  bool skip_op(std::string_view op) { return is_op(op) ? (advance(), true) : false; }
  bool skip_name(std::string_view n) { return is_name(n) ? (advance(), true) : false; }

  [[noreturn]] void error(Pos p, const std::string& msg) const {
    fail("{}:{}:{}: {}", name_, p.line, p.col, msg);
  }
  [[noreturn]] void unexpected(const std::string& expected) const {
    error(cur().pos, fmt::format("expected {}, got {}", expected, describe(cur())));
  }
  const Token& expect_op(std::string_view op) {
    if (!is_op(op)) unexpected("'" + std::string(op) + "'");
    return advance();
  }
  const Token& expect_name(const char* what = "a name") {
    if (cur().type != Tok::Name) unexpected(what);
    return advance();
  }
  void expect(Tok type, const char* what) {
    if (cur().type != type) unexpected(what);
    advance();
  }

  // ---- statements (jinja_parser.cpp) --------------------------------------------------------
  Body subparse(const Tags& end_tags);
  // Body up to one of end_tags; leaves the end tag's name as the current token unless
  // drop_needle.
  Body parse_statements(const Tags& end_tags, bool drop_needle = false);
  void parse_statement(Body& body);
  // Reported at the "{%" of the unknown tag.
  [[noreturn]] void unknown_tag(const Token& t) const;
  StmtPtr parse_for();
  StmtPtr parse_if();
  StmtPtr parse_set();
  void parse_signature(MacroSig& sig);
  // A macro body is its own function: loop controls do not reach out of it.
  Body parse_macro_body(MacroSig& sig, const char* end_tag);
  StmtPtr parse_macro();
  StmtPtr parse_call_block();
  StmtPtr parse_with();
  Target parse_target_primary(bool with_namespace);
  Target parse_assign_target(bool with_tuple = true, bool with_namespace = false,
                             const Tags& extra_end = {});

  // ---- expressions (jinja_parse_expr.cpp) ---------------------------------------------------
  bool is_tuple_end(const Tags& extra_end) const;
  ExprPtr parse_tuple(bool simplified = false, bool with_condexpr = true,
                      const Tags& extra_end = {}, bool explicit_parens = false);
  ExprPtr parse_expression(bool with_condexpr = true);
  ExprPtr parse_condexpr();
  ExprPtr binary(Expr::Kind kind, Pos pos, ExprPtr a, ExprPtr b, std::string op = {});
  ExprPtr parse_or();
  ExprPtr parse_and();
  ExprPtr parse_not();
  ExprPtr parse_compare();
  ExprPtr parse_math1();
  ExprPtr parse_concat();
  ExprPtr parse_math2();
  ExprPtr parse_pow();
  ExprPtr parse_unary(bool with_filter = true);
  ExprPtr constant(Pos pos, Value v);
  ExprPtr parse_primary();
  ExprPtr parse_list();
  ExprPtr parse_dict();
  ExprPtr parse_postfix(ExprPtr node);
  ExprPtr parse_filter_expr(ExprPtr node);
  ExprPtr parse_subscript(ExprPtr node);
  ExprPtr parse_subscribed();
  void parse_call_args(Expr& e);
  ExprPtr parse_call(ExprPtr node);
  std::string dotted_name(const Token& first);
  ExprPtr parse_filter(ExprPtr node, bool start_inline = false);
  ExprPtr parse_test(ExprPtr node);

  std::vector<Token> t_;
  size_t i_ = 0;
  std::string name_;
  int loop_depth_ = 0;
  std::vector<MacroSig*> macro_stack_;
  std::vector<std::pair<std::string, Pos>> tag_stack_;
  std::vector<Tags> end_stack_;
  Pos block_pos_;  // of the "{%" that opened the statement being parsed
};

}  // namespace bigmoe::jinja
