// Statements and assignment targets: {% for %}, {% if %}, {% set %}, {% macro %}, {% call %},
// {% filter %}, {% with %}, {% break %}/{% continue %} (loopcontrols), {% generation %} (HF).
#include "text/jinja_parser.h"

#include <algorithm>

namespace bigmoe::jinja {
namespace {

std::string join_tags(const Tags& tags) {
  std::string out;
  for (size_t i = 0; i < tags.size(); ++i) out += (i ? " or '" : "'") + std::string(tags[i]) + "'";
  return out;
}

StmtPtr make_stmt(Stmt::Kind kind, Pos pos) {
  auto s = std::make_unique<Stmt>();
  s->kind = kind;
  s->pos = pos;
  return s;
}

}  // namespace

Body Parser::subparse(const Tags& end_tags) {
  Body body;
  end_stack_.push_back(end_tags);
  while (cur().type != Tok::Eof) {
    const Token& t = cur();
    if (t.type == Tok::Data) {
      auto s = make_stmt(Stmt::Kind::Text, t.pos);
      s->text = t.text;
      body.push_back(std::move(s));
      advance();
    } else if (t.type == Tok::VarBegin) {
      advance();
      auto s = make_stmt(Stmt::Kind::Print, cur().pos);
      s->expr = parse_tuple();
      body.push_back(std::move(s));
      expect(Tok::VarEnd, "'}}'");
    } else if (t.type == Tok::BlockBegin) {
      block_pos_ = advance().pos;
      if (cur().type == Tok::Name &&
          std::find(end_tags.begin(), end_tags.end(), cur().text) != end_tags.end())
        break;
      parse_statement(body);
      expect(Tok::BlockEnd, "'%}'");
    } else {
      unexpected("template data, '{{' or '{%'");
    }
  }
  end_stack_.pop_back();
  return body;
}

// Body up to one of end_tags; leaves the end tag's name as the current token unless
// drop_needle.
Body Parser::parse_statements(const Tags& end_tags, bool drop_needle) {
  skip_op(":");
  expect(Tok::BlockEnd, "'%}'");
  Body body = subparse(end_tags);
  if (cur().type == Tok::Eof) {
    auto [tag, pos] = tag_stack_.back();
    error(pos,
          fmt::format("unclosed '{}': expected {}, got end of template", tag, join_tags(end_tags)));
  }
  if (drop_needle) advance();
  return body;
}

void Parser::parse_statement(Body& body) {
  const Token& t = cur();
  if (t.type != Tok::Name) unexpected("a tag name");
  tag_stack_.emplace_back(t.text, block_pos_);
  const std::string& n = t.text;
  if (n == "for") {
    body.push_back(parse_for());
  } else if (n == "if") {
    body.push_back(parse_if());
  } else if (n == "set") {
    body.push_back(parse_set());
  } else if (n == "macro") {
    body.push_back(parse_macro());
  } else if (n == "call") {
    body.push_back(parse_call_block());
  } else if (n == "filter") {
    auto s = make_stmt(Stmt::Kind::FilterBlock, advance().pos);
    s->filter = parse_filter(nullptr, true);
    s->body = parse_statements({"endfilter"}, true);
    body.push_back(std::move(s));
  } else if (n == "with") {
    body.push_back(parse_with());
  } else if (n == "break" || n == "continue") {
    if (loop_depth_ == 0) error(t.pos, fmt::format("'{}' outside of a for loop", n));
    body.push_back(
        make_stmt(n == "break" ? Stmt::Kind::Break : Stmt::Kind::Continue, advance().pos));
  } else if (n == "generation") {
    auto s = make_stmt(Stmt::Kind::Scope, advance().pos);
    s->body = parse_macro_body(s->sig, "endgeneration");
    body.push_back(std::move(s));
  } else if (n == "print") {
    advance();
    for (bool first = true; cur().type != Tok::BlockEnd; first = false) {
      if (!first) expect_op(",");
      auto s = make_stmt(Stmt::Kind::Print, cur().pos);
      s->expr = parse_expression();
      body.push_back(std::move(s));
    }
  } else if (n == "block" || n == "extends" || n == "include" || n == "import" || n == "from" ||
             n == "autoescape" || n == "do") {
    error(t.pos, fmt::format("tag '{}' is not supported by this Jinja subset", n));
  } else {
    tag_stack_.pop_back();
    unknown_tag(t);
  }
  tag_stack_.pop_back();
}

// Reported at the "{%" of the unknown tag.
void Parser::unknown_tag(const Token& t) const {
  if (tag_stack_.empty() || end_stack_.back().empty())
    error(block_pos_, fmt::format("unknown tag '{}'", t.text));
  auto [tag, pos] = tag_stack_.back();
  error(block_pos_, fmt::format("unexpected tag '{}', expected {} to close '{}' at {}:{}", t.text,
                                join_tags(end_stack_.back()), tag, pos.line, pos.col));
}

StmtPtr Parser::parse_for() {
  auto s = make_stmt(Stmt::Kind::For, advance().pos);
  s->target = parse_assign_target(true, false, {"in"});
  if (!skip_name("in")) unexpected("'in'");
  s->expr = parse_tuple(false, false, {"recursive"});
  if (skip_name("if")) s->cond = parse_expression();
  if (is_name("recursive")) error(cur().pos, "recursive for loops are not supported");
  ++loop_depth_;
  s->body = parse_statements({"endfor", "else"});
  --loop_depth_;
  if (advance().text == "else") s->else_body = parse_statements({"endfor"}, true);
  return s;
}

StmtPtr Parser::parse_if() {
  auto root = make_stmt(Stmt::Kind::If, advance().pos);
  Stmt* node = root.get();
  while (true) {
    node->expr = parse_tuple(false, false);
    node->body = parse_statements({"elif", "else", "endif"});
    const Token& t = advance();
    if (t.text == "elif") {
      node->else_body.push_back(make_stmt(Stmt::Kind::If, t.pos));
      node = node->else_body.back().get();
      continue;
    }
    if (t.text == "else") node->else_body = parse_statements({"endif"}, true);
    break;
  }
  return root;
}

StmtPtr Parser::parse_set() {
  Pos pos = advance().pos;
  Target target = parse_assign_target(true, true);
  if (skip_op("=")) {
    auto s = make_stmt(Stmt::Kind::Set, pos);
    s->target = std::move(target);
    s->expr = parse_tuple();
    return s;
  }
  auto s = make_stmt(Stmt::Kind::SetBlock, pos);
  s->target = std::move(target);
  if (is_op("|")) s->filter = parse_filter(nullptr);
  s->body = parse_statements({"endset"}, true);
  return s;
}

void Parser::parse_signature(MacroSig& sig) {
  expect_op("(");
  while (!is_op(")")) {
    if (!sig.params.empty()) expect_op(",");
    const Token& p = expect_name("a parameter name");
    if (skip_op("=")) {
      sig.defaults.push_back(parse_expression());
    } else if (!sig.defaults.empty()) {
      error(p.pos, "non-default argument follows default argument");
    }
    sig.params.push_back(p.text);
  }
  expect_op(")");
}

// A macro body is its own function: loop controls do not reach out of it.
Body Parser::parse_macro_body(MacroSig& sig, const char* end_tag) {
  int saved = loop_depth_;
  loop_depth_ = 0;
  macro_stack_.push_back(&sig);
  Body body = parse_statements({end_tag}, true);
  macro_stack_.pop_back();
  loop_depth_ = saved;
  return body;
}

StmtPtr Parser::parse_macro() {
  auto s = make_stmt(Stmt::Kind::Macro, advance().pos);
  s->sig.name = expect_name("a macro name").text;
  parse_signature(s->sig);
  s->body = parse_macro_body(s->sig, "endmacro");
  return s;
}

StmtPtr Parser::parse_call_block() {
  auto s = make_stmt(Stmt::Kind::CallBlock, advance().pos);
  s->sig.name = "caller";
  if (is_op("(")) parse_signature(s->sig);
  Pos p = cur().pos;
  s->expr = parse_expression();
  if (s->expr->kind != Expr::Kind::Call) error(p, "expected a call after 'call'");
  s->body = parse_macro_body(s->sig, "endcall");
  return s;
}

StmtPtr Parser::parse_with() {
  auto s = make_stmt(Stmt::Kind::With, advance().pos);
  while (cur().type != Tok::BlockEnd) {
    if (!s->targets.empty()) expect_op(",");
    s->targets.push_back(parse_assign_target());
    expect_op("=");
    s->values.push_back(parse_expression());
  }
  s->body = parse_statements({"endwith"}, true);
  return s;
}

Target Parser::parse_target_primary(bool with_namespace) {
  const Token& t = cur();
  Target target;
  target.pos = t.pos;
  if (t.type == Tok::Name) {
    advance();
    static const char* kConsts[] = {"true", "false", "True", "False", "none", "None"};
    for (const char* c : kConsts)
      if (t.text == c) error(t.pos, fmt::format("cannot assign to constant '{}'", t.text));
    target.name = t.text;
    if (with_namespace && skip_op(".")) {
      target.kind = Target::Kind::NSRef;
      target.attr = expect_name("an attribute name").text;
    }
    return target;
  }
  if (skip_op("(")) {
    target = parse_assign_target(true, false, {});
    expect_op(")");
    return target;
  }
  unexpected("a name to assign to");
}

Target Parser::parse_assign_target(bool with_tuple, bool with_namespace, const Tags& extra_end) {
  if (!with_tuple) return parse_target_primary(with_namespace);
  Target tuple;
  tuple.kind = Target::Kind::Tuple;
  tuple.pos = cur().pos;
  bool is_tuple = false;
  while (true) {
    if (!tuple.items.empty()) expect_op(",");
    if (is_tuple_end(extra_end)) break;
    tuple.items.push_back(parse_target_primary(with_namespace));
    if (!is_op(",")) break;
    is_tuple = true;
  }
  if (!is_tuple) {
    if (tuple.items.empty()) unexpected("a name to assign to");
    return std::move(tuple.items[0]);
  }
  return tuple;
}

Template parse_template(std::string_view source, std::string name) {
  std::vector<Token> toks = tokenize(source, name);
  Parser parser(std::move(toks), name);
  Template t;
  t.body = parser.parse();
  t.name = std::move(name);
  return t;
}

}  // namespace bigmoe::jinja
