"""`bigmoe chat`, `bigmoe complete` and `bigmoe perplexity` on SmolLM2, driven as a user would
(stdin / arguments), checked against llama.cpp's results in tests/fixtures/smollm2."""
import json
import os
import subprocess

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
FIX = os.path.join(HERE, "..", "fixtures", "smollm2")
REF = json.load(open(os.path.join(FIX, "reference.json"), encoding="utf-8"))


def run(*args, stdin=None, timeout=600):
    binary, gguf = os.environ["BIGMOE_BINARY"], os.environ["BIGMOE_SMOLLM2_GGUF"]
    return subprocess.run([binary, args[0], "-m", gguf, *args[1:]], input=stdin, capture_output=True, text=True,
                          timeout=timeout)


def chat_case(content):
    for c in REF["greedy"]:
        if c.get("messages") == [{"role": "user", "content": content}]:
            return c
    raise KeyError(content)


def test_chat_streams_greedy_answer():
    c = chat_case("What is 12 times 12?")
    r = run("chat", "--temp", "0", "-n", "40", stdin="What is 12 times 12?\n\n")
    assert r.returncode == 0, r.stderr
    # The answer follows the "> " prompt; llama.cpp's agreed continuation ends with <|im_end|>.
    answer = r.stdout.split("> ", 1)[1].split("\n> ", 1)[0].rstrip("\n")
    assert answer == c["greedy_text"]


def test_complete_prints_prompt_and_continuation():
    c = next(c for c in REF["greedy"] if c.get("text") == "The quick brown fox")
    n = 8
    r = run("complete", "-p", "The quick brown fox", "-n", str(n), "--temp", "0")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("The quick brown fox")
    assert c["greedy_text"].startswith(r.stdout[len("The quick brown fox"):].rstrip("\n")[:20])
    assert "tok/s" in r.stderr


def test_perplexity_within_1_percent_of_llama_cpp():
    p = REF["perplexity"]
    r = run("perplexity", "-f", os.path.join(FIX, p["file"]))
    assert r.returncode == 0, r.stderr
    ours = float(r.stdout.split("perplexity")[-1].split()[0])
    assert abs(ours - p["perplexity"]) <= 0.01 * p["perplexity"], (ours, p["perplexity"])


def test_missing_model_file_is_a_clear_error():
    binary = os.environ["BIGMOE_BINARY"]
    r = subprocess.run([binary, "chat", "-m", "/nonexistent/model.gguf"], capture_output=True, text=True, timeout=60,
                       input="")
    assert r.returncode != 0 and "/nonexistent/model.gguf" in r.stderr


def test_not_a_gguf_is_a_clear_error(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"NOTGGUF" + b"\0" * 100)
    binary = os.environ["BIGMOE_BINARY"]
    r = subprocess.run([binary, "serve", "-m", str(bad), "--port", "0"], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "model.gguf" in r.stderr and "magic" in r.stderr.lower()
