// Chat templates against real jinja2: every case in fixtures/templates/cases.json (rendered by
// tools/make_template_fixtures.py through transformers' own apply_chat_template environment)
// must render byte-identical here: GLM-5.2 and SmolLM2 chats, and snippets of expressions,
// filters, tests, statements and whitespace control. Cases where jinja2 fails must fail here
// too, with a bigmoe::Error "name:line:col: message"; syntax errors name what was expected.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <fstream>
#include <regex>
#include <sstream>

#include "text/jinja.h"
#include "util/error.h"

namespace bigmoe {
namespace {

using nlohmann::ordered_json;
using ::testing::HasSubstr;

const std::string kDir = std::string(BIGMOE_FIXTURES) + "/templates/";

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot open " + path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

const ordered_json& cases() {
  static const ordered_json j = ordered_json::parse(read_file(kDir + "cases.json"));
  return j;
}

// "template" is a file name under fixtures/templates/ or inline template source.
std::string source_of(const ordered_json& c) {
  std::string t = c.at("template").get<std::string>();
  return t.ends_with(".jinja") ? read_file(kDir + t) : t;
}

struct Case {
  std::string group;
  size_t index;
  const ordered_json& json() const { return cases().at(group).at(index); }
  std::string name() const { return json().at("name").get<std::string>(); }
};

std::vector<Case> load(const std::string& group) {
  std::vector<Case> out;
  for (size_t i = 0; i < cases().at(group).size(); ++i) out.push_back({group, i});
  return out;
}

std::string case_name(const ::testing::TestParamInfo<Case>& info) { return info.param.name(); }

// ---- renders like jinja2 ----------------------------------------------------------------------

class RendersLikeJinja2 : public ::testing::TestWithParam<Case> {};

TEST_P(RendersLikeJinja2, ByteIdentical) {
  const ordered_json& c = GetParam().json();
  ChatTemplate t = ChatTemplate::parse(source_of(c), c.at("template").get<std::string>());
  EXPECT_EQ(t.render(c.at("context")), c.at("expected").get<std::string>());
}

INSTANTIATE_TEST_SUITE_P(Chat, RendersLikeJinja2, ::testing::ValuesIn(load("chat")), case_name);
INSTANTIATE_TEST_SUITE_P(Snippets, RendersLikeJinja2, ::testing::ValuesIn(load("snippets")),
                         case_name);

// ---- fails where jinja2 fails -----------------------------------------------------------------

class FailsLikeJinja2 : public ::testing::TestWithParam<Case> {};

TEST_P(FailsLikeJinja2, ErrorWithPosition) {
  const ordered_json& c = GetParam().json();
  const std::string name = GetParam().name();
  const std::string jinja_error = c.at("error").get<std::string>();
  try {
    ChatTemplate t = ChatTemplate::parse(source_of(c), name);
    std::string out = t.render(c.at("context"));
    FAIL() << "rendered " << out << " where jinja2 failed with " << jinja_error;
  } catch (const Error& e) {
    std::string msg = e.what();
    std::smatch m;
    ASSERT_TRUE(std::regex_match(msg, m, std::regex(name + R"(:(\d+):(\d+): .+)"))) << msg;
    if (c.at("phase") == "render") {
      // Same message as jinja2's, after its exception type ("TypeError: ...").
      EXPECT_THAT(msg, HasSubstr(jinja_error.substr(jinja_error.find(": ") + 2)));
    } else if (!c.at("lineno").is_null() && !jinja_error.starts_with("SyntaxError") &&
               msg.find("unclosed") == std::string::npos) {
      // jinja2 puts an unclosed block at the end of the template, we at its opening tag; a
      // SyntaxError's line is in jinja2's generated Python.
      EXPECT_EQ(std::stoi(m[1]), c.at("lineno").get<int>()) << msg << "\njinja2: " << jinja_error;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Errors, FailsLikeJinja2, ::testing::ValuesIn(load("errors")), case_name);

// ---- error messages, exactly ------------------------------------------------------------------

std::string error_of(const std::string& source,
                     const ordered_json& context = ordered_json::object()) {
  try {
    ChatTemplate::parse(source, "chat.jinja").render(context);
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

TEST(JinjaErrors, UnclosedBlockNamesOpeningTagAndExpectedEnd) {
  EXPECT_EQ(error_of("a\n  {% if x %}\n{% for i in y %}{% endfor %}"),
            "chat.jinja:2:3: unclosed 'if': expected 'elif' or 'else' or 'endif', got end of "
            "template");
  EXPECT_EQ(error_of("{% for i in y %}{% if x %}{% endfor %}"),
            "chat.jinja:1:27: unexpected tag 'endfor', expected 'elif' or 'else' or 'endif' to "
            "close 'if' at 1:17");
  EXPECT_EQ(error_of("{% macro m() %}\nbody"),
            "chat.jinja:1:1: unclosed 'macro': expected 'endmacro', got end of template");
}

TEST(JinjaErrors, UnknownFilterAndTestAtParseTime) {
  EXPECT_EQ(error_of("x\n{{ 'a' | upper | shout }}"), "chat.jinja:2:18: unknown filter 'shout'");
  EXPECT_EQ(error_of("{% if x is tall %}{% endif %}"), "chat.jinja:1:12: unknown test 'tall'");
}

TEST(JinjaErrors, BadSyntaxSaysWhatWasExpected) {
  EXPECT_EQ(error_of("{{ 1 + }}"), "chat.jinja:1:8: expected an expression, got '}}'");
  EXPECT_EQ(error_of("{{ f(a, }}"), "chat.jinja:1:9: unexpected '}', expected ')'");
  EXPECT_EQ(error_of("{% for in x %}{% endfor %}"),
            "chat.jinja:1:8: expected a name to assign to, got 'in'");
  EXPECT_EQ(error_of("{% set x = 1 %}\n{{ x "),
            "chat.jinja:2:6: expected '}}', got end of template");
  EXPECT_EQ(error_of("{% if x %}{% else %}{% else %}{% endif %}"),
            "chat.jinja:1:21: unexpected tag 'else', expected 'endif' to close 'if' at 1:1");
  EXPECT_EQ(error_of("{{ 'é' ? }}"), "chat.jinja:1:8: unexpected character '?'");
  EXPECT_EQ(error_of("ok {# no end"), "chat.jinja:1:4: missing end of comment tag '#}'");
}

TEST(JinjaErrors, RenderErrorsPointAtTheFailingNode) {
  ordered_json ctx = {{"messages", ordered_json::array({{{"role", "user"}}})}};
  EXPECT_EQ(error_of("{% for m in messages %}\n  {{ m.content.strip() }}\n{% endfor %}", ctx),
            "chat.jinja:2:15: 'dict object' has no attribute 'content'");
  EXPECT_EQ(error_of("{{ raise_exception('roles must alternate user/assistant') }}", ctx),
            "chat.jinja:1:19: roles must alternate user/assistant");
  EXPECT_EQ(error_of("{{ messages | tojson(indent=[]) }}", ctx),
            "chat.jinja:1:15: tojson: indent must be an int, a str or None, not 'list'");
}

// ---- API --------------------------------------------------------------------------------------

TEST(ChatTemplateApi, OrderedJsonKeepsKeyOrderPlainJsonSorts) {
  ChatTemplate t = ChatTemplate::parse("{{ d | tojson }}|{% for k in d %}{{ k }}{% endfor %}", "t");
  EXPECT_EQ(t.render(ordered_json::parse(R"({"d": {"b": 1, "a": "é"}})")),
            R"({"b": 1, "a": "é"}|ba)");
  EXPECT_EQ(t.render(nlohmann::json::parse(R"({"d": {"b": 1, "a": "é"}})")),
            R"({"a": "é", "b": 1}|ab)");
}

TEST(ChatTemplateApi, RendersRepeatedlyWithoutLeakingState) {
  ChatTemplate t = ChatTemplate::parse(
      "{% set ns = namespace(n=0) %}{% macro m() %}{{ caller() }}{% endmacro %}"
      "{% for i in xs %}{% set ns.n = ns.n + i %}{% endfor %}{% call m() %}{{ ns.n }}{% endcall %}",
      "t");
  ordered_json ctx = {{"xs", {1, 2, 3}}};
  EXPECT_EQ(t.render(ctx), "6");
  EXPECT_EQ(t.render(ctx), "6");
  EXPECT_EQ(t.name(), "t");
}

TEST(ChatTemplateApi, ContextMustBeAnObject) {
  ChatTemplate t = ChatTemplate::parse("x", "ctx.jinja");
  EXPECT_THROW(t.render(ordered_json::array()), Error);
}

}  // namespace
}  // namespace bigmoe
