#!/usr/bin/env python3
"""Reference fixtures for the GLM-DSA family, made with HF transformers (tested with 5.17.0).

Builds tiny random models, runs them in float32 with eager attention, and writes for each:
  config.json, generation_config.json, safetensors weights (as a real checkpoint names them),
  ref.json (prompt ids, greedy ids), logits.npy [T+N, V], mtp_logits.npy [T-1, V].

  glm5_tiny  glm_moe_dsa: n_group 1, DSA indexer with index_topk 16 < prompt 48, "shared"
             indexer layers, MTP layer as model.layers.L.*, BF16 weights in two shards.
  dsv3_tiny  deepseek_v3: n_group 4 / topk_group 2, yarn rope with mscale, plain q_proj,
             FP8 e4m3 weights with 32x32 block scales (weight_scale_inv), MTP layer.

The MTP logits come from the torch code below, written from spec/glm-dsa.md §5 (as vLLM's
DeepSeek MTP runs it) around transformers' own decoder layer; nothing here uses bigmoe.

Usage: python tools/make_glm_dsa_fixtures.py --out tests/fixtures
"""
import argparse
import copy
import json
import os

import numpy as np
import torch
from safetensors.torch import save_file

PROMPT_LEN = 48
GEN = 8

GLM5 = dict(
    model_type="glm_moe_dsa", vocab_size=320, hidden_size=64, intermediate_size=96,
    moe_intermediate_size=32, num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=4,
    n_shared_experts=1, n_routed_experts=16, routed_scaling_factor=2.5, kv_lora_rank=32,
    q_lora_rank=48, qk_rope_head_dim=8, v_head_dim=24, qk_nope_head_dim=16, n_group=1, topk_group=1,
    num_experts_per_tok=4, norm_topk_prob=True, max_position_embeddings=256, rms_norm_eps=1e-5,
    rope_parameters={"rope_theta": 10000.0, "rope_type": "default"},
    mlp_layer_types=["dense", "dense", "sparse", "sparse", "sparse"],
    index_topk=16, index_head_dim=32, index_n_heads=8,
    indexer_types=["full", "full", "shared", "full", "shared"],
    tie_word_embeddings=False, bos_token_id=0, eos_token_id=[1, 2],
)

DSV3 = dict(
    model_type="deepseek_v3", vocab_size=320, hidden_size=64, intermediate_size=96,
    moe_intermediate_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
    n_shared_experts=2, n_routed_experts=16, routed_scaling_factor=2.5, kv_lora_rank=32,
    q_lora_rank=None, qk_rope_head_dim=8, v_head_dim=24, qk_nope_head_dim=16, n_group=4, topk_group=2,
    num_experts_per_tok=4, norm_topk_prob=True, max_position_embeddings=256, rms_norm_eps=1e-6,
    first_k_dense_replace=2, rope_interleave=True,
    rope_parameters={"rope_theta": 10000.0, "rope_type": "yarn", "factor": 4.0, "mscale": 1.0,
                     "mscale_all_dim": 0.8, "original_max_position_embeddings": 64,
                     "beta_fast": 32.0, "beta_slow": 1.0},
    tie_word_embeddings=False, bos_token_id=0, eos_token_id=1,
)


def make_config(spec, n_layers=None, extra_layer=False):
    from transformers import DeepseekV3Config, GlmMoeDsaConfig
    kw = {k: v for k, v in spec.items() if k != "model_type"}
    kw = copy.deepcopy(kw)
    if extra_layer:  # config for building the MTP block as layer L with the same classes
        kw["num_hidden_layers"] += 1
        if "mlp_layer_types" in kw:
            kw["mlp_layer_types"] = kw["mlp_layer_types"] + ["sparse"]
        if "indexer_types" in kw:
            kw["indexer_types"] = kw["indexer_types"] + ["full"]
    cls = GlmMoeDsaConfig if spec["model_type"] == "glm_moe_dsa" else DeepseekV3Config
    cfg = cls(**kw)
    cfg._attn_implementation = "eager"
    return cfg


def init_(name, t, g):
    """Weights at scales that keep activations O(1) and logits spread (not the 0.02 default)."""
    if name.endswith("e_score_correction_bias"):
        return torch.randn(t.shape, generator=g) * 0.3
    if name.endswith("k_norm.bias"):
        return torch.randn(t.shape, generator=g) * 0.1
    if t.dim() == 1:  # norm weights
        return 1.0 + 0.2 * torch.randn(t.shape, generator=g)
    if "embed_tokens" in name:
        return torch.randn(t.shape, generator=g)
    fan_in = t.shape[-1]
    std = 1.0 / fan_in ** 0.5
    if name.endswith("mlp.gate.weight"):
        std *= 3.0  # router: spread the sigmoid scores
    if "lm_head" in name or "shared_head.head" in name:
        std *= 2.0
    return torch.randn(t.shape, generator=g) * std


def fp8_block_quant(w, bo, bi):
    """W ≈ fp8 × scale_inv per (bo × bi) block, as the official FP8 checkpoints store it."""
    out, inn = w.shape
    nbo, nbi = -(-out // bo), -(-inn // bi)
    scale = torch.empty(nbo, nbi)
    q = torch.empty(out, inn, dtype=torch.float8_e4m3fn)
    for i in range(nbo):
        for j in range(nbi):
            blk = w[i * bo:(i + 1) * bo, j * bi:(j + 1) * bi]
            s = blk.abs().max().clamp(min=1e-12) / 448.0
            qb = (blk / s).to(torch.float8_e4m3fn)
            q[i * bo:(i + 1) * bo, j * bi:(j + 1) * bi] = qb
            scale[i, j] = s
    deq = q.to(torch.float32) * scale.repeat_interleave(bo, 0)[:out].repeat_interleave(bi, 1)[:, :inn]
    return q, scale, deq


def is_fp8_linear(name, t):
    return (t.dim() == 2 and name.endswith("_proj.weight") and "weights_proj" not in name
            and "embed" not in name and "eh_proj" not in name)


def checkpoint_tensors(sd):
    """transformers 5 fuses experts into gate_up_proj [E, 2I, d] / down_proj [E, d, I];
    checkpoints store mlp.experts.{e}.{gate,up,down}_proj.weight."""
    out = {}
    for name, t in sd.items():
        if name.endswith("mlp.experts.gate_up_proj"):
            base = name[: -len("gate_up_proj")]
            I = t.shape[1] // 2
            for e in range(t.shape[0]):
                out[f"{base}{e}.gate_proj.weight"] = t[e, :I].clone()
                out[f"{base}{e}.up_proj.weight"] = t[e, I:].clone()
        elif name.endswith("mlp.experts.down_proj"):
            base = name[: -len("down_proj")]
            for e in range(t.shape[0]):
                out[f"{base}{e}.down_proj.weight"] = t[e].clone()
        else:
            out[name] = t
    return out


def causal_mask(S):
    m = torch.full((S, S), torch.finfo(torch.float32).min).triu(1)
    return m[None, None]


class MTP(torch.nn.Module):
    """spec §5: u_t = eh_proj[enorm(embed(x_{t+1})) (zero at position 0) ; hnorm(h_t)], one
    decoder block (its own attention and indexer) at rope position t, then shared_head norm and
    the head."""

    def __init__(self, cfg_ext, L, block_cls, norm_cls, d, V):
        super().__init__()
        self.block = block_cls(cfg_ext, L)
        self.enorm = norm_cls(d, eps=cfg_ext.rms_norm_eps)
        self.hnorm = norm_cls(d, eps=cfg_ext.rms_norm_eps)
        self.eh_proj = torch.nn.Linear(2 * d, d, bias=False)
        self.head_norm = norm_cls(d, eps=cfg_ext.rms_norm_eps)

    def forward(self, hidden, next_ids, embed, lm_head, rotary):
        S = hidden.shape[1]
        e = embed(next_ids)
        e = self.enorm(e)
        e[:, 0] = 0.0  # entry at position 0: zeroed embedding (RMSNorm(0) = 0 as well)
        u = self.eh_proj(torch.cat([e, self.hnorm(hidden)], dim=-1))
        pos = torch.arange(S)[None]
        pe = rotary(u, pos)
        out = self.block(u, attention_mask=causal_mask(S), position_ids=pos, position_embeddings=pe)
        z = out[0] if isinstance(out, tuple) else out
        return lm_head(self.head_norm(z))


def index_scores(mod, hidden, q_resid, pe, mask):
    """DSA indexer scores as spec §3.6 defines them, recomputed from the indexer's inputs to
    measure the top-k boundary margin (exact ties make the selection arbitrary)."""
    B, S, _ = hidden.shape
    H, D, R = mod.n_heads, mod.head_dim, mod.qk_rope_head_dim
    import inspect
    rot = inspect.getmodule(type(mod)).apply_rotary_pos_emb_interleave
    q = mod.wq_b(q_resid).view(B, S, H, D)
    k = mod.k_norm(mod.wk(hidden)).unsqueeze(2)
    qr, kr = rot(q[..., :R], k[..., :R], pe[0], pe[1], unsqueeze_dim=2)
    q = torch.cat([qr, q[..., R:]], -1)
    k = torch.cat([kr, k[..., R:]], -1).squeeze(2)
    sc = torch.relu(torch.einsum("bshd,btd->bsht", q, k) * D ** -0.5)
    w = mod.weights_proj(hidden) * H ** -0.5
    return torch.einsum("bsht,bsh->bst", sc, w) + mask


def topk_margin_hook(margins, topk):
    def hook(mod, args, kwargs, out):
        hidden, q_resid, pe, mask = args[:4]
        if hidden.shape[1] != mask.shape[-1]:
            return  # a cached decode step (generate()); the uncached passes cover every position
        scores = index_scores(mod, hidden, q_resid, pe, mask)[0]
        S = scores.shape[0]
        T = scores.shape[1]
        for s in range(S):
            pos = T - S + s
            if pos + 1 <= topk:
                continue
            v = scores[s, : pos + 1].sort(descending=True).values
            scale = max(v.abs().max().item(), 1e-30)
            margins.append((v[topk - 1] - v[topk]).item() / scale)
    return hook


def build(name, spec, outdir, seed, storage, shards):
    """Tries seeds from `seed` on until the DSA top-k has no near-tie at its boundary."""
    for s in range(seed, seed + 50):
        if build_one(name, spec, outdir, s, storage, shards):
            return
    raise SystemExit(f"{name}: no seed without DSA top-k near-ties")


def build_one(name, spec, outdir, seed, storage, shards):
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    cfg = make_config(spec)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float().eval()
    L, d, V = cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size

    block_cls = type(model.model.layers[-1])
    norm_cls = type(model.model.norm)
    mtp = MTP(make_config(spec, extra_layer=True), L, block_cls, norm_cls, d, V).float().eval()

    # Draw every weight, then replace it by what the stored format represents exactly.
    stored = {}
    bo = bi = 32
    def assign(module, prefix, ckpt_prefix):
        sd = module.state_dict()
        new = {}
        for n, t in sd.items():
            if n.endswith("inv_freq") or "rotary" in n:
                new[n] = t
                continue
            new[n] = init_(ckpt_prefix + n, t, g).to(torch.float32)
        module.load_state_dict(new, strict=True)
        for cn, t in checkpoint_tensors({ckpt_prefix + n: v for n, v in new.items()
                                         if not (n.endswith("inv_freq") or "rotary" in n)}).items():
            if cn.endswith("e_score_correction_bias"):
                stored[cn] = t.float()
            elif storage == "fp8" and is_fp8_linear(cn, t):
                q, s, deq = fp8_block_quant(t.float(), bo, bi)
                stored[cn] = q
                stored[cn + "_scale_inv"] = s
                stored[cn] = q
            else:
                stored[cn] = t.to(torch.bfloat16)
        # load back the exact stored values
        back = {}
        for n, t in module.state_dict().items():
            back[n] = t
        return back

    assign(model, "", "")
    # MTP block and its extras under the checkpoint's layer-L names.
    pfx = f"model.layers.{L}."
    blk = {}
    for n, t in mtp.state_dict().items():
        if n.startswith("block."):
            blk[pfx + n[len("block."):]] = init_(pfx + n[len("block."):], t, g)
        elif n.startswith("head_norm."):
            blk[pfx + "shared_head.norm." + n[len("head_norm."):]] = init_("norm.weight", t, g)
        else:
            blk[pfx + n] = init_(pfx + n, t, g)
    for cn, t in checkpoint_tensors(blk).items():
        if cn.endswith("e_score_correction_bias"):
            stored[cn] = t.float()
        elif storage == "fp8" and is_fp8_linear(cn, t):
            q, s, _ = fp8_block_quant(t.float(), bo, bi)
            stored[cn] = q
            stored[cn + "_scale_inv"] = s
        else:
            stored[cn] = t.to(torch.bfloat16)

    # Dequantize the stored tensors and load them into both torch modules.
    def deq(cn):
        t = stored[cn]
        if t.dtype == torch.float8_e4m3fn:
            s = stored[cn + "_scale_inv"]
            out, inn = t.shape
            return t.float() * s.repeat_interleave(bo, 0)[:out].repeat_interleave(bi, 1)[:, :inn]
        return t.float()

    def fused(prefix_ckpt, kind, E):
        if kind == "gate_up":
            return torch.stack([torch.cat([deq(f"{prefix_ckpt}{e}.gate_proj.weight"),
                                           deq(f"{prefix_ckpt}{e}.up_proj.weight")], 0) for e in range(E)])
        return torch.stack([deq(f"{prefix_ckpt}{e}.down_proj.weight") for e in range(E)])

    def load_back(module, ckpt_of):
        sd = module.state_dict()
        new = {}
        for n, t in sd.items():
            cn = ckpt_of(n)
            if cn is None:
                new[n] = t
            elif n.endswith("mlp.experts.gate_up_proj"):
                new[n] = fused(cn[: -len("gate_up_proj")], "gate_up", t.shape[0])
            elif n.endswith("mlp.experts.down_proj"):
                new[n] = fused(cn[: -len("down_proj")], "down", t.shape[0])
            else:
                new[n] = deq(cn)
            assert new[n].shape == t.shape, (n, new[n].shape, t.shape)
        module.load_state_dict(new, strict=True)

    skip = lambda n: n.endswith("inv_freq") or "rotary" in n
    load_back(model, lambda n: None if skip(n) else n)

    def mtp_name(n):
        if skip(n):
            return None
        if n.startswith("block."):
            return pfx + n[len("block."):]
        if n.startswith("head_norm."):
            return pfx + "shared_head.norm." + n[len("head_norm."):]
        return pfx + n
    load_back(mtp, mtp_name)

    margins = []
    if spec.get("index_topk"):
        for mod in list(model.modules()) + list(mtp.modules()):
            if type(mod).__name__.endswith("Indexer"):
                mod.register_forward_hook(topk_margin_hook(margins, spec["index_topk"]), with_kwargs=True)

    # Reference run: greedy by full recompute, then one forward over prompt + generated.
    rng = np.random.default_rng(seed)
    prompt = [int(x) for x in rng.integers(3, V, PROMPT_LEN)]
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(GEN):
            lg = model(torch.tensor([ids]), use_cache=False).logits[0, -1]
            ids.append(int(lg.argmax()))
        out = model(torch.tensor([ids]), use_cache=False)
        logits = out.logits[0].float().numpy()
        # MTP over the prompt: entries (h_t, x_{t+1}), t = 0..T-2.
        h = model.model(torch.tensor([prompt]), use_cache=False).last_hidden_state
        mtp_logits = mtp(h[:, :-1], torch.tensor([prompt[1:]]), model.model.embed_tokens,
                         model.lm_head, model.model.rotary_emb)[0].float().numpy()
        # Also with KV cache (transformers' own incremental path), as a cross-check.
        cached = model.generate(torch.tensor([prompt]), max_new_tokens=GEN, do_sample=False,
                                eos_token_id=None, pad_token_id=0)[0].tolist()
    greedy = ids[PROMPT_LEN:]
    if margins and min(margins) < 2e-5:
        print(f"{name}: seed {seed}: DSA top-k boundary margin {min(margins):.2e} (near-tie), next seed")
        return False
    if margins:
        print(f"{name}: seed {seed}: smallest DSA top-k boundary margin {min(margins):.2e} over {len(margins)} selections")
    if cached[PROMPT_LEN:] != greedy:
        print(f"{name}: NOTE transformers generate() with its KV cache gives {cached[PROMPT_LEN:]}, full recompute {greedy}")

    os.makedirs(outdir, exist_ok=True)
    cj = json.loads(cfg.to_json_string())
    cj["model_type"] = spec["model_type"]
    cj["num_nextn_predict_layers"] = 1
    cj["torch_dtype"] = "bfloat16"
    cj.pop("_attn_implementation", None)
    if storage == "fp8":
        cj["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": [bo, bi]}
    with open(os.path.join(outdir, "config.json"), "w") as f:
        json.dump(cj, f, indent=2, sort_keys=True)
    with open(os.path.join(outdir, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": spec["bos_token_id"], "eos_token_id": spec["eos_token_id"]}, f, indent=2)

    names = sorted(stored)
    if shards == 1:
        save_file({n: stored[n].contiguous() for n in names}, os.path.join(outdir, "model.safetensors"),
                  metadata={"format": "pt"})
    else:
        cut = [n for n in names if n.startswith("model.layers.") and int(n.split(".")[2]) < 3 or
               n.startswith("model.embed")]
        parts = [sorted(cut), sorted(set(names) - set(cut))]
        wm = {}
        for i, part in enumerate(parts):
            fn = f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors"
            save_file({n: stored[n].contiguous() for n in part}, os.path.join(outdir, fn),
                      metadata={"format": "pt"})
            for n in part:
                wm[n] = fn
        total = sum(stored[n].numel() * stored[n].element_size() for n in names)
        with open(os.path.join(outdir, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": wm}, f, indent=2, sort_keys=True)

    np.save(os.path.join(outdir, "logits.npy"), logits.astype(np.float32))
    np.save(os.path.join(outdir, "mtp_logits.npy"), mtp_logits.astype(np.float32))
    with open(os.path.join(outdir, "ref.json"), "w") as f:
        json.dump({"prompt_ids": prompt, "greedy_ids": greedy, "made_by": "transformers " +
                   __import__("transformers").__version__ + ", torch " + torch.__version__}, f, indent=1)
    print(f"{name}: prompt {len(prompt)} tokens, greedy {greedy}, logits {logits.shape}, "
          f"logit std {logits.std():.2f}, mtp {mtp_logits.shape} std {mtp_logits.std():.2f}")
    return True


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="tests/fixtures")
    a = ap.parse_args()
    torch.set_num_threads(2)
    build("glm5_tiny", GLM5, os.path.join(a.out, "glm5_tiny"), 1234, "bf16", shards=2)
    build("dsv3_tiny", DSV3, os.path.join(a.out, "dsv3_tiny"), 4321, "fp8", shards=1)


if __name__ == "__main__":
    main()
