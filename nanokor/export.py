"""Hugging Face export: nanokor's parameter names are Llama's, so exporting is a key rename."""

from nanokor.model import ModelConfig, Transformer


def hf_state_dict(model: Transformer) -> dict:
    """LlamaForCausalLM keys: everything but the LM head lives under `model.`. A tied head is omitted
    (transformers re-ties it from `tie_word_embeddings`)."""
    out = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":
            if not model.config.tie_embeddings:
                out[name] = tensor
        else:
            out["model." + name] = tensor
    return out


def hf_config(config: ModelConfig, *, bos_id: int = 1, eos_id: int = 2, pad_id: int | None = 3) -> dict:
    """The config.json of an equivalent LlamaForCausalLM (transformers 5.x field names, with the
    4.x `rope_theta` kept for older readers)."""
    if config.position != "rope":
        raise ValueError(f"Cannot export a model with position={config.position!r}: Llama has no absolute "
                         "position embeddings, so transformers would compute different logits. Only "
                         "position='rope' models can be exported.")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "intermediate_size": config.d_ff,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_kv_head,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "rope_theta": config.rope_theta,
        "tie_word_embeddings": config.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": config.init_std,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "torch_dtype": "float32",
    }
