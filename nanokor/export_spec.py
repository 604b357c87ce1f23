"""What an exported model is, whatever the file format: shared by the Hugging Face writer
(nanokor/export.py) and the GGUF writer (nanokor/export_gguf.py), so neither imports the other.

- its weights under Hugging Face Llama names (GGUF maps those names to llama.cpp's);
- the sampling defaults both formats carry, spelled out;
- the SentencePiece settings the tokenizer files are generated from;
- the training figures the model card and the GGUF description quote;
- for a chat model, what makes other tools chat as chat.py does: the template, the end-of-turn token.
"""

from dataclasses import dataclass

from nanokor.chat_format import CHAT_TEMPLATE, OLLAMA_TEMPLATE, REPLY_STOP_IDS, require_chat_tokens
from nanokor.errors import ExportError
from nanokor.model import ModelConfig, Transformer
from nanokor.tokenizer import IM_END_ID, Tokenizer

# sample.py's defaults, spelled out: llama.cpp (top-k 40, top-p 0.95, min-p 0.05) and Ollama fill in
# their own where a key is missing, so "off" is written as the value that turns each one off.
SAMPLING = {"temperature": 0.8, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "repetition_penalty": 1.0}


def hf_state_dict(model: Transformer) -> dict:
    """LlamaForCausalLM (and Qwen3ForCausalLM) keys: everything but the LM head lives under `model.`. A
    tied head is omitted (transformers re-ties it from `tie_word_embeddings`)."""
    out = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":
            if not model.config.tie_embeddings:
                out[name] = tensor
        else:
            out["model." + name] = tensor
    return out


def check_position(config: ModelConfig) -> None:
    if config.position != "rope":
        raise ValueError(f"Cannot export a model with position={config.position!r}: Llama has no absolute "
                         "position embeddings, so transformers or llama.cpp would compute different logits. "
                         "Only position='rope' models can be exported.")


# ---- the tokenizer's settings -----------------------------------------------------------------

NORMAL, UNKNOWN, CONTROL, USER_DEFINED = 1, 2, 3, 4  # SentencePiece piece types
UNIGRAM, BPE = 1, 2  # and model types


def sentencepiece_proto(model_bytes: bytes):
    try:  # SentencePiece's own schema module; it needs protobuf (a nanokor dependency)
        from sentencepiece import sentencepiece_model_pb2
    except ImportError as e:
        raise ExportError(f"Reading the tokenizer's settings needs protobuf ({e}); pip install protobuf.") from None

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_bytes)
    norm, trainer = proto.normalizer_spec, proto.trainer_spec
    problems = []
    if trainer.model_type not in (UNIGRAM, BPE):
        problems.append("the model type is neither BPE nor unigram")
    if norm.name not in ("identity", "") or norm.precompiled_charsmap:
        problems.append(f"it normalizes text itself ({norm.name!r})")
    if norm.remove_extra_whitespaces or not norm.escape_whitespaces or trainer.treat_whitespace_as_suffix:
        problems.append("its whitespace handling differs from nanokor's")
    if problems:
        raise ExportError("Cannot export this tokenizer to transformers exactly: " + "; ".join(problems) + ". "
                          "Tokenizers trained by nanokor's prepare.py export; retrain with it.")
    return proto


# ---- training figures ---------------------------------------------------------------------------

NOT_RECORDED = "not recorded"


def training_summary(ckpt: dict) -> dict:
    """Training tokens and validation figures from a training checkpoint ("not recorded" otherwise)."""
    tokens, val = ckpt.get("tokens_seen"), ckpt.get("val")
    return {"training tokens": f"{tokens:,} ({ckpt['step']:,} steps)" if tokens else NOT_RECORDED,
            "validation": f"{val['bpb']:.4f} bits per byte, loss {val['loss']:.4f} (step {val['step']:,})"
            if val else NOT_RECORDED}


# ---- chat ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ChatSpec:
    """A chat model's conversation format as the exports carry it (nanokor/chat_format.py's, unchanged):
    the Jinja template (transformers' chat_template, GGUF's tokenizer.chat_template; it emits BOS), the
    Ollama TEMPLATE, the token that ends a turn (transformers' eos_token, GGUF's end-of-turn id) and
    every id a reply stops at, with its text (generation_config's eos_token_id, Ollama's stop)."""

    template: str
    ollama_template: str
    end_of_turn_id: int
    stop_ids: tuple[int, ...]
    stop_pieces: tuple[str, ...]


def chat_spec(ckpt: dict, chat: bool | None = None) -> ChatSpec | None:
    """The chat format for a chat model (SFT marks its checkpoints `"chat": True`; `chat` overrides the
    mark), None for a base model: its export stays a plain text model. A chat model whose tokenizer lacks
    the chat tokens is a ChatError."""
    if not (ckpt.get("chat", False) if chat is None else chat):
        return None
    tokenizer = Tokenizer(ckpt["tokenizer"])
    require_chat_tokens(tokenizer, "This checkpoint")
    return ChatSpec(CHAT_TEMPLATE, OLLAMA_TEMPLATE, IM_END_ID, REPLY_STOP_IDS,
                    tuple(tokenizer.id_to_piece(i) for i in REPLY_STOP_IDS))
