#!/usr/bin/env python3
"""Convert the glm5_tiny safetensors fixture into a GGUF file laid out the way llama.cpp's
converter (GlmMoeDsaModel, a DeepseekV2Model subclass) writes arch `glm-dsa`; see
docs/gguf-glm-dsa.md for the convention.

  - kv_b_proj [H*(nope+v), kv_lora] is split per head into attn_k_b (transposed: numpy
    [H, kv_lora, nope], GGUF ne [nope, kv_lora, H]) and attn_v_b (numpy [H, v, kv_lora],
    GGUF ne [kv_lora, v, H]); no unsplit attn_kv_b is written.
  - routed experts are stacked into ffn_{gate,up,down}_exps (numpy [E, out, in]).
  - the MTP layer keeps its index (blk.L) with nextn.* tensors beside its block tensors.
  - no rope row permutation (deepseek2 / glm-dsa use interleaved "NORM" rope as HF does).
  - tokenizer: a minimal byte-level "gpt2" vocabulary of vocab_size tokens so llama.cpp can
    build a vocab (tokens 0..255 are the GPT-2 byte characters, 256 is one merge, the rest are <tok_N>).

Usage: python tools/make_glm_gguf_fixture.py [--src tests/fixtures/glm5_tiny]
           [--out tests/fixtures/glm5_tiny_gguf/model.gguf] [--type f32|f16]
"""
import argparse
import json
import os

import gguf
import numpy as np
from safetensors import safe_open

ARCH = "glm-dsa"


def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def load_tensors(src):
    idx = json.load(open(os.path.join(src, "model.safetensors.index.json")))["weight_map"]
    out = {}
    for f in sorted(set(idx.values())):
        with safe_open(os.path.join(src, f), framework="pt") as st:
            for k in st.keys():
                out[k] = st.get_tensor(k).float().numpy()
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--src", default="tests/fixtures/glm5_tiny")
    ap.add_argument("--out", default="tests/fixtures/glm5_tiny_gguf/model.gguf")
    ap.add_argument("--type", default="f32", choices=["f32", "f16"])
    args = ap.parse_args()

    c = json.load(open(os.path.join(args.src, "config.json")))
    T = load_tensors(args.src)
    L, nextn = c["num_hidden_layers"], c.get("num_nextn_predict_layers", 0)
    H, nope, vd, kvr = c["num_attention_heads"], c["qk_nope_head_dim"], c["v_head_dim"], c["kv_lora_rank"]
    E = c["n_routed_experts"]
    wtype = np.float16 if args.type == "f16" else np.float32

    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    w = gguf.GGUFWriter(args.out, ARCH)
    w.add_name("glm5_tiny")
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if args.type == "f16" else gguf.LlamaFileType.ALL_F32)
    # TextModel.set_gguf_parameters
    w.add_block_count(L + nextn)
    w.add_context_length(c["max_position_embeddings"])
    w.add_embedding_length(c["hidden_size"])
    w.add_feed_forward_length(c["intermediate_size"])
    w.add_head_count(H)
    w.add_head_count_kv(1)  # MLA written as MQA
    w.add_rope_freq_base(c["rope_parameters"]["rope_theta"])
    w.add_layer_norm_rms_eps(c["rms_norm_eps"])
    w.add_expert_count(E)
    w.add_expert_used_count(c["num_experts_per_tok"])
    w.add_expert_group_count(c.get("n_group", 1))
    w.add_expert_group_used_count(c.get("topk_group", 1))
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    # DeepseekV2Model.set_gguf_parameters
    # llama.cpp writes first_k_dense_replace; the fixture's config says 3 but its mlp_layer_types
    # (what transformers runs) has 2 leading dense layers, so count those when present.
    lead = c["first_k_dense_replace"]
    if c.get("mlp_layer_types"):
        lead = next((i for i, t in enumerate(c["mlp_layer_types"]) if t != "dense"), L)
    w.add_leading_dense_block_count(lead)
    w.add_vocab_size(c["vocab_size"])
    w.add_q_lora_rank(c["q_lora_rank"])
    w.add_kv_lora_rank(kvr)
    w.add_key_length(kvr + c["qk_rope_head_dim"])
    w.add_value_length(kvr)
    w.add_key_length_mla(nope + c["qk_rope_head_dim"])
    w.add_value_length_mla(vd)
    w.add_expert_feed_forward_length(c["moe_intermediate_size"])
    w.add_expert_shared_count(c["n_shared_experts"])
    w.add_expert_weights_scale(c["routed_scaling_factor"])
    if c.get("norm_topk_prob"):
        w.add_expert_weights_norm(True)
    w.add_rope_dimension_count(c["qk_rope_head_dim"])
    # GlmMoeDsaModel.set_gguf_parameters
    w.add_nextn_predict_layers(nextn)
    w.add_uint32(f"{ARCH}.attention.indexer.head_count", c["index_n_heads"])
    w.add_uint32(f"{ARCH}.attention.indexer.key_length", c["index_head_dim"])
    w.add_uint32(f"{ARCH}.attention.indexer.top_k", c["index_topk"])
    if c.get("indexer_types") is not None:
        w.add_array(f"{ARCH}.attention.indexer.types", [t == "full" for t in c["indexer_types"]])

    # Minimal byte-level BPE vocabulary.
    b2u = bytes_to_unicode()
    toks = [b2u[b] for b in range(256)] + ["\u0120\u0120"] + [f"<tok_{i}>" for i in range(257, c["vocab_size"])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(toks)
    w.add_token_types([gguf.TokenType.NORMAL] * 257 + [gguf.TokenType.CONTROL] * (c["vocab_size"] - 257))
    w.add_token_merges(["\u0120 \u0120"])  # llama.cpp requires a non-empty merges list
    w.add_bos_token_id(c.get("bos_token_id", 0))
    eos = c.get("eos_token_id", 1)
    w.add_eos_token_id(eos[0] if isinstance(eos, list) else eos)

    def put(name, a):
        a = np.ascontiguousarray(a)
        # 1-D tensors (norms, biases) stay F32 as llama.cpp's converter keeps them.
        w.add_tensor(name, a.astype(np.float32 if a.ndim == 1 else wtype))

    put("token_embd.weight", T["model.embed_tokens.weight"])
    put("output_norm.weight", T["model.norm.weight"])
    put("output.weight", T["lm_head.weight"])
    simple = {
        "input_layernorm.weight": "attn_norm.weight",
        "post_attention_layernorm.weight": "ffn_norm.weight",
        "self_attn.q_a_proj.weight": "attn_q_a.weight",
        "self_attn.q_a_layernorm.weight": "attn_q_a_norm.weight",
        "self_attn.q_b_proj.weight": "attn_q_b.weight",
        "self_attn.q_proj.weight": "attn_q.weight",
        "self_attn.kv_a_proj_with_mqa.weight": "attn_kv_a_mqa.weight",
        "self_attn.kv_a_layernorm.weight": "attn_kv_a_norm.weight",
        "self_attn.o_proj.weight": "attn_output.weight",
        "self_attn.indexer.wq_b.weight": "indexer.attn_q_b.weight",
        "self_attn.indexer.wk.weight": "indexer.attn_k.weight",
        "self_attn.indexer.k_norm.weight": "indexer.k_norm.weight",
        "self_attn.indexer.k_norm.bias": "indexer.k_norm.bias",
        "self_attn.indexer.weights_proj.weight": "indexer.proj.weight",
        "mlp.gate_proj.weight": "ffn_gate.weight",
        "mlp.up_proj.weight": "ffn_up.weight",
        "mlp.down_proj.weight": "ffn_down.weight",
        "mlp.gate.weight": "ffn_gate_inp.weight",
        "mlp.gate.e_score_correction_bias": "exp_probs_b.bias",
        "mlp.shared_experts.gate_proj.weight": "ffn_gate_shexp.weight",
        "mlp.shared_experts.up_proj.weight": "ffn_up_shexp.weight",
        "mlp.shared_experts.down_proj.weight": "ffn_down_shexp.weight",
        "eh_proj.weight": "nextn.eh_proj.weight",
        "enorm.weight": "nextn.enorm.weight",
        "hnorm.weight": "nextn.hnorm.weight",
        "shared_head.norm.weight": "nextn.shared_head_norm.weight",
        "shared_head.head.weight": "nextn.shared_head_head.weight",
        "embed_tokens.weight": "nextn.embed_tokens.weight",
    }
    for i in range(L + nextn):
        p = f"model.layers.{i}."
        for hf, gg in simple.items():
            if p + hf in T:
                put(f"blk.{i}.{gg}", T[p + hf])
        kvb = T[p + "self_attn.kv_b_proj.weight"].reshape(H, nope + vd, kvr)
        put(f"blk.{i}.attn_k_b.weight", kvb[:, :nope, :].transpose(0, 2, 1))  # [H, kv_lora, nope]
        put(f"blk.{i}.attn_v_b.weight", kvb[:, nope:, :])                       # [H, v, kv_lora]
        if p + "mlp.experts.0.gate_proj.weight" in T:
            for hf, gg in (("gate_proj", "ffn_gate_exps"), ("up_proj", "ffn_up_exps"), ("down_proj", "ffn_down_exps")):
                put(f"blk.{i}.{gg}.weight", np.stack([T[f"{p}mlp.experts.{e}.{hf}.weight"] for e in range(E)]))

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(f"wrote {args.out} ({os.path.getsize(args.out)} bytes)")


if __name__ == "__main__":
    main()
