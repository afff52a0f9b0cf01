"""The Hugging Face tensor names and shapes of a DeepSeek-V3 checkpoint, written from semantics §3
and the published checkpoint layout (independent of dsv3's own counting code)."""


def hf_shapes(c, mtp=True):
    D, H = c.hidden_size, c.num_attention_heads
    dqk = c.qk_nope_head_dim + c.qk_rope_head_dim
    shapes = {"model.embed_tokens.weight": (c.vocab_size, D), "model.norm.weight": (D,)}
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, D)

    def block(p, i):
        shapes[p + "input_layernorm.weight"] = (D,)
        shapes[p + "post_attention_layernorm.weight"] = (D,)
        a = p + "self_attn."
        if c.attention_type == "mla":
            if c.q_lora_rank:
                shapes[a + "q_a_proj.weight"] = (c.q_lora_rank, D)
                shapes[a + "q_a_layernorm.weight"] = (c.q_lora_rank,)
                shapes[a + "q_b_proj.weight"] = (H * dqk, c.q_lora_rank)
            else:
                shapes[a + "q_proj.weight"] = (H * dqk, D)
            shapes[a + "kv_a_proj_with_mqa.weight"] = (c.kv_lora_rank + c.qk_rope_head_dim, D)
            shapes[a + "kv_a_layernorm.weight"] = (c.kv_lora_rank,)
            shapes[a + "kv_b_proj.weight"] = (H * (c.qk_nope_head_dim + c.v_head_dim),
                                              c.kv_lora_rank)
        else:
            kvh = H if c.attention_type == "mha" else c.num_key_value_heads
            shapes[a + "q_proj.weight"] = (H * dqk, D)
            shapes[a + "k_proj.weight"] = (kvh * dqk, D)
            shapes[a + "v_proj.weight"] = (kvh * c.v_head_dim, D)
        shapes[a + "o_proj.weight"] = (D, H * c.v_head_dim)
        m = p + "mlp."
        moe = c.n_routed_experts and i >= c.first_k_dense_replace and i % c.moe_layer_freq == 0
        if not moe:
            for n, s in (("gate_proj", (c.intermediate_size, D)),
                         ("up_proj", (c.intermediate_size, D)),
                         ("down_proj", (D, c.intermediate_size))):
                shapes[m + n + ".weight"] = s
            return
        F, S = c.moe_intermediate_size, c.moe_intermediate_size * c.n_shared_experts
        shapes[m + "gate.weight"] = (c.n_routed_experts, D)
        if c.topk_method == "noaux_tc":
            shapes[m + "gate.e_score_correction_bias"] = (c.n_routed_experts,)
        for j in range(c.n_routed_experts):
            shapes[f"{m}experts.{j}.gate_proj.weight"] = (F, D)
            shapes[f"{m}experts.{j}.up_proj.weight"] = (F, D)
            shapes[f"{m}experts.{j}.down_proj.weight"] = (D, F)
        if c.n_shared_experts:
            shapes[m + "shared_experts.gate_proj.weight"] = (S, D)
            shapes[m + "shared_experts.up_proj.weight"] = (S, D)
            shapes[m + "shared_experts.down_proj.weight"] = (D, S)

    for i in range(c.num_hidden_layers):
        block(f"model.layers.{i}.", i)
    if mtp:
        for k in range(c.num_nextn_predict_layers):
            i = c.num_hidden_layers + k
            p = f"model.layers.{i}."
            shapes[p + "enorm.weight"] = (D,)
            shapes[p + "hnorm.weight"] = (D,)
            shapes[p + "eh_proj.weight"] = (D, 2 * D)
            shapes[p + "shared_head.norm.weight"] = (D,)
            block(p, i)
    return shapes


def count(shapes):
    n = 0
    for s in shapes.values():
        k = 1
        for d in s:
            k *= d
        n += k
    return n
