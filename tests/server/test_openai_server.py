"""`bigmoe serve` with SmolLM2-135M-Instruct, exercised through the official openai client
(streaming and not) and raw HTTP for the error cases. Expected texts are llama.cpp's greedy
continuations (tests/fixtures/smollm2/reference.json, made by tools/make_llama_fixtures.py).
Needs $BIGMOE_BINARY and $BIGMOE_SMOLLM2_GGUF (scripts/test.sh sets both)."""
import json
import os
import re
import subprocess
import threading
import time
import urllib.error
import urllib.request

import openai
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REF = json.load(open(os.path.join(HERE, "..", "fixtures", "smollm2", "reference.json"), encoding="utf-8"))
MAX_TOKENS = 12
# Cases whose llama.cpp continuation is determined for at least MAX_TOKENS tokens (see the
# fixture script: shorter agreed prefixes mean llama.cpp itself is undecided there).
CHAT = [i for i, c in enumerate(REF["greedy"]) if "messages" in c and len(c["greedy_ids"]) >= MAX_TOKENS]
RAW = [i for i, c in enumerate(REF["greedy"]) if "messages" not in c and len(c["greedy_ids"]) >= MAX_TOKENS]
EOS_CASES = [i for i, c in enumerate(REF["greedy"]) if "messages" in c and c["greedy_ids"] and c["greedy_ids"][-1] == 2]


@pytest.fixture(scope="module")
def server():
    binary, gguf = os.environ.get("BIGMOE_BINARY"), os.environ.get("BIGMOE_SMOLLM2_GGUF")
    if not binary or not gguf:
        pytest.fail("set BIGMOE_BINARY and BIGMOE_SMOLLM2_GGUF (scripts/test.sh does)")
    env = dict(os.environ, OMP_NUM_THREADS="2")
    p = subprocess.Popen([binary, "serve", "-m", gguf, "--port", "0"], stderr=subprocess.PIPE, text=True, env=env)
    url, deadline, log = None, time.time() + 180, []
    while time.time() < deadline:
        line = p.stderr.readline()
        if not line:
            break
        log.append(line)
        m = re.search(r"serving '([^']+)' on (http://[^ ]+/v1)", line)
        if m:
            name, url = m.group(1), m.group(2)
            break
    if not url:
        p.kill()
        pytest.fail("server did not start:\n" + "".join(log))
    threading.Thread(target=lambda: [None for _ in p.stderr], daemon=True).start()  # keep draining
    yield {"url": url, "model": name}
    p.terminate()
    p.wait(timeout=30)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server["url"], api_key="none", max_retries=0, timeout=300)


def case(i):
    return REF["greedy"][i]


def expected_text(i):
    """llama.cpp's greedy text (its agreed prefix): what our greedy output must begin with."""
    return case(i)["greedy_text"]


def raw(server, path, body=None, method="POST"):
    url = server["url"][: -len("/v1")] + path
    data = body.encode() if isinstance(body, str) else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_health_and_models(server, client):
    assert raw(server, "/health", method="GET") == (200, {"status": "ok"})
    ids = [m.id for m in client.models.list().data]
    assert ids == [server["model"]]


def test_fixture_has_enough_cases():
    assert len(CHAT) >= 2 and RAW and EOS_CASES


def test_chat_greedy_matches_llama_cpp(server, client):
    i = CHAT[0]
    r = client.chat.completions.create(model=server["model"], messages=case(i)["messages"], max_tokens=MAX_TOKENS,
                                       temperature=0)
    text = r.choices[0].message.content
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == "length"
    assert expected_text(i).startswith(text) and len(text) > 10
    assert r.usage.prompt_tokens == len(case(i)["prompt_ids"])
    assert r.usage.completion_tokens == MAX_TOKENS
    assert r.usage.total_tokens == r.usage.prompt_tokens + MAX_TOKENS


def test_chat_stream_equals_non_stream(server, client):
    kw = dict(model=server["model"], messages=case(CHAT[1])["messages"], max_tokens=MAX_TOKENS, temperature=0)
    full = client.chat.completions.create(**kw).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == MAX_TOKENS
    assert len({c.id for c in chunks}) == 1


def test_completions_stream_and_not(server, client):
    i = RAW[0]
    prompt = case(i)["text"]
    r = client.completions.create(model=server["model"], prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
    assert expected_text(i).startswith(r.choices[0].text) and len(r.choices[0].text) > 10
    assert r.usage.prompt_tokens == len(case(i)["prompt_ids"])
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=server["model"], prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, stream=True) if c.choices)
    assert streamed == r.choices[0].text


def test_stop_string_and_eos(server, client):
    i = CHAT[0]
    full = expected_text(i)
    stop = full[len(full) // 2: len(full) // 2 + 3]
    r = client.chat.completions.create(model=server["model"], messages=case(i)["messages"], max_tokens=40,
                                       temperature=0, stop=[stop])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content == full[: full.index(stop)]
    # A case whose agreed continuation ends with <|im_end|> (eos): finish_reason stop, eos not shown.
    j = EOS_CASES[0]
    r = client.chat.completions.create(model=server["model"], messages=case(j)["messages"], max_tokens=60, temperature=0)
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content == expected_text(j)
    assert r.usage.completion_tokens == len(case(j)["greedy_ids"]) - 1


def test_sampling_is_seeded(server, client):
    kw = dict(model=server["model"], messages=case(2)["messages"], max_tokens=8, temperature=0.9, top_p=0.95,
              seed=1234)
    a = client.chat.completions.create(**kw).choices[0].message.content
    b = client.chat.completions.create(**kw).choices[0].message.content
    assert a == b


def test_requests_queue_not_reject(server, client):
    results = [None, None]

    def go(i):
        results[i] = client.chat.completions.create(model=server["model"], messages=case(0)["messages"],
                                                    max_tokens=4, temperature=0).choices[0].message.content
    threads = [threading.Thread(target=go, args=(i,)) for i in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert results[0] == results[1] and results[0]


@pytest.mark.parametrize("body,status,param", [
    ('{"model": "x", "messages": [', 400, None),                       # malformed JSON
    ('[1, 2]', 400, None),                                              # not an object
    ({"messages": [{"role": "user", "content": "hi"}]}, 400, "model"),  # missing model
    ({"model": "M"}, 400, "messages"),                                  # missing messages
    ({"model": "M", "messages": []}, 400, "messages"),
    ({"model": "M", "messages": [{"content": "hi"}]}, 400, "messages[0].role"),
    ({"model": "M", "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role"),
    ({"model": "M", "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400, "temperature"),
    ({"model": "M", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "M", "messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "n"),
    ({"model": "M", "messages": [{"role": "user", "content": "hi"}], "stop": [1]}, 400, "stop"),
])
def test_bad_requests(server, body, status, param):
    if isinstance(body, dict) and body.get("model") == "M":
        body["model"] = server["model"]
    code, j = raw(server, "/v1/chat/completions", body)
    assert code == status, j
    assert j["error"]["type"] == "invalid_request_error" and j["error"]["message"]
    assert j["error"]["param"] == param


def test_unknown_model(server, client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["code"] == "model_not_found"


def test_prompt_longer_than_context(server, client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=server["model"], prompt="hello " * 9000, max_tokens=4)
    assert e.value.body["code"] == "context_length_exceeded"
    assert "8192" in e.value.body["message"]


def test_unknown_endpoint(server):
    code, j = raw(server, "/v1/nothing", {"a": 1})
    assert code == 404 and j["error"]["message"]
