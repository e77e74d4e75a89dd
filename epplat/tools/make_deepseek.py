"""The DeepSeek-V2/V3 part of ``epplat make-model``: config.json and tensor names of a checkpoint.

``deepseek_v2`` is shaped like DeepSeek-V2-Lite (plain q projection, softmax routing,
greedy top-k, two shared experts); ``deepseek_v3`` like DeepSeek-V3 (q through
q_lora_rank, sigmoid scores with e_score_correction_bias, grouped top-k, one shared
expert, routed_scaling_factor 2.5). Both use YaRN rotary scaling with DeepSeek's mscale.
``mtp_layers`` appends DeepSeek-V3's multi-token-prediction layer(s) after the last one
(enorm, hnorm, eh_proj, a whole decoder layer, shared_head), as the V3 checkpoint has.
"""

from __future__ import annotations

DEFAULTS = {
    "deepseek_v2": dict(q_lora_rank=None, n_group=1, topk_group=1, shared_experts=2, first_dense=1, mtp_layers=0),
    "deepseek_v3": dict(q_lora_rank=None, n_group=4, topk_group=2, shared_experts=1, first_dense=1, mtp_layers=0),
}
OPTIONS = ("q_lora_rank", "kv_lora_rank", "rope_head_dim", "n_group", "topk_group", "shared_experts",
           "first_dense", "mtp_layers")


def config(arch: str, *, layers, hidden, experts, top_k, heads, kv_heads, head_dim, moe_inter, inter, vocab, max_position,
           dtype, ids, opts: dict) -> dict:
    del kv_heads                  # MLA has no KV heads
    o = {**DEFAULTS[arch], **{k: v for k, v in opts.items() if v is not None}}
    if "q_lora_rank" not in opts and arch == "deepseek_v3":
        o["q_lora_rank"] = hidden // 2
    o["q_lora_rank"] = o["q_lora_rank"] or None        # 0: a plain q projection
    kv_rank = o.get("kv_lora_rank") or hidden // 2
    rope_dim = o.get("rope_head_dim") or max(2, head_dim // 2)
    if rope_dim % 2:
        raise ValueError("the rotary head dim must be even")
    if experts % o["n_group"] or o["topk_group"] > o["n_group"] or top_k > o["topk_group"] * (experts // o["n_group"]):
        raise ValueError(f"{experts} experts, n_group {o['n_group']}, topk_group {o['topk_group']}, top-{top_k} "
                         "do not fit together")
    if o["first_dense"] > layers:
        raise ValueError("more dense layers than layers")
    v3 = arch == "deepseek_v3"
    mscale = 1.0 if v3 else 0.707
    c = dict(
        architectures=["DeepseekV3ForCausalLM" if v3 else "DeepseekV2ForCausalLM"], model_type=arch,
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, moe_intermediate_size=moe_inter,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
        n_shared_experts=o["shared_experts"], n_routed_experts=experts, num_experts_per_tok=top_k,
        routed_scaling_factor=2.5 if v3 else 1.0, kv_lora_rank=kv_rank, q_lora_rank=o["q_lora_rank"],
        qk_rope_head_dim=rope_dim, qk_nope_head_dim=head_dim, v_head_dim=head_dim,
        topk_method="noaux_tc" if v3 else ("group_limited_greedy" if o["n_group"] > 1 else "greedy"),
        n_group=o["n_group"], topk_group=o["topk_group"], first_k_dense_replace=o["first_dense"], moe_layer_freq=1,
        norm_topk_prob=v3, scoring_func="sigmoid" if v3 else "softmax", hidden_act="silu",
        max_position_embeddings=max_position, initializer_range=0.02, rms_norm_eps=1e-6, rope_theta=10000.0,
        rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": max(1, max_position // 4),
                      "beta_fast": 32, "beta_slow": 1, "mscale": mscale, "mscale_all_dim": mscale},
        attention_bias=False, attention_dropout=0.0, tie_word_embeddings=False, use_cache=True,
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], torch_dtype=dtype, dtype=dtype)
    if v3:
        c.update(num_nextn_predict_layers=o["mtp_layers"], rope_interleave=True)
    return c


def _layer_specs(c: dict, p: str, moe: bool) -> list:
    h, heads = c["hidden_size"], c["num_attention_heads"]
    qk = c["qk_nope_head_dim"] + c["qk_rope_head_dim"]
    r, dr, dv = c["kv_lora_rank"], c["qk_rope_head_dim"], c["v_head_dim"]
    s = [(p + "input_layernorm.weight", (h,), "norm"), (p + "post_attention_layernorm.weight", (h,), "norm")]
    a = p + "self_attn."
    if c["q_lora_rank"]:
        qr = c["q_lora_rank"]
        s += [(a + "q_a_proj.weight", (qr, h), "linear"), (a + "q_a_layernorm.weight", (qr,), "norm"),
              (a + "q_b_proj.weight", (heads * qk, qr), "linear")]
    else:
        s.append((a + "q_proj.weight", (heads * qk, h), "linear"))
    s += [(a + "kv_a_proj_with_mqa.weight", (r + dr, h), "linear"), (a + "kv_a_layernorm.weight", (r,), "norm"),
          (a + "kv_b_proj.weight", (heads * (c["qk_nope_head_dim"] + dv), r), "linear"),
          (a + "o_proj.weight", (h, heads * dv), "linear")]

    def mlp(q, inter):
        return [(q + "gate_proj.weight", (inter, h), "linear"), (q + "up_proj.weight", (inter, h), "linear"),
                (q + "down_proj.weight", (h, inter), "linear")]

    if not moe:
        return s + mlp(p + "mlp.", c["intermediate_size"])
    e, inter = c["n_routed_experts"], c["moe_intermediate_size"]
    s.append((p + "mlp.gate.weight", (e, h), "linear"))
    if c["topk_method"] == "noaux_tc":
        s.append((p + "mlp.gate.e_score_correction_bias", (e,), "bias"))
    for i in range(e):
        s += mlp(f"{p}mlp.experts.{i}.", inter)
    if c["n_shared_experts"]:
        s += mlp(p + "mlp.shared_experts.", inter * c["n_shared_experts"])
    return s


def tensor_specs(c: dict) -> list:
    h, v, n = c["hidden_size"], c["vocab_size"], c["num_hidden_layers"]
    specs = [("model.embed_tokens.weight", (v, h), "embed")]
    for i in range(n):
        specs += _layer_specs(c, f"model.layers.{i}.", i >= c["first_k_dense_replace"])
    for i in range(n, n + c.get("num_nextn_predict_layers", 0)):
        p = f"model.layers.{i}."
        specs += [(p + "embed_tokens.weight", (v, h), "embed"), (p + "enorm.weight", (h,), "norm"),
                  (p + "hnorm.weight", (h,), "norm"), (p + "eh_proj.weight", (h, 2 * h), "linear")]
        specs += _layer_specs(c, p, n >= c["first_k_dense_replace"])
        specs += [(p + "shared_head.norm.weight", (h,), "norm"), (p + "shared_head.head.weight", (v, h), "linear")]
    return specs + [("model.norm.weight", (h,), "norm"), ("lm_head.weight", (v, h), "linear")]
