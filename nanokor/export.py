"""Hugging Face export: a directory `transformers` loads offline as LlamaForCausalLM (Qwen3ForCausalLM for
a model with qk_norm: Llama plus a per-head RMSNorm of queries and keys) + its tokenizer.

    python -m nanokor.export --ckpt out/last.pt --out hf/
    python -m nanokor.export --ckpt out/last.pt --gguf --out gguf/ --dtype q8_0   # llama.cpp / Ollama

nanokor's parameter names are Llama's (and Qwen3's q_norm / k_norm), so the weights are a key rename;
config.json is written from the model config, and tokenizer.json reproduces the SentencePiece model
exactly. transformers is never imported here: the files are plain JSON and safetensors. A README.md
model card goes beside them. `--gguf` writes a GGUF file instead (nanokor/export_gguf.py).
"""

import argparse
import json
import re
import sys
from pathlib import Path

import torch
from safetensors.torch import save

from nanokor.atomic import atomic_write
from nanokor.checkpoint import build_model, load_checkpoint
from nanokor.device import DTYPES
from nanokor.errors import ExportError, NanokorError
from nanokor.export_spec import CONTROL, NORMAL, UNKNOWN, USER_DEFINED, BPE, SAMPLING, ChatSpec, chat_spec, \
    check_position, hf_state_dict, sentencepiece_proto, training_summary
from nanokor.model import ModelConfig, Transformer
from nanokor.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID


def hf_architecture(config: ModelConfig) -> tuple[str, str]:
    """(architecture, model_type) of the equivalent transformers model: Llama, or Qwen3 (Llama with
    q_norm / k_norm: RMSNorm over each head's dimensions, one gain shared by the heads, before RoPE)."""
    return ("Qwen3ForCausalLM", "qwen3") if config.qk_norm else ("LlamaForCausalLM", "llama")


def hf_config(config: ModelConfig, *, bos_id: int = 1, eos_id: int | list[int] = 2, pad_id: int | None = 3) -> dict:
    """The config.json of an equivalent LlamaForCausalLM or Qwen3ForCausalLM (transformers 5.x field
    names, with the 4.x `rope_theta` kept for older readers)."""
    check_position(config)
    architecture, model_type = hf_architecture(config)
    fields = {
        "architectures": [architecture],
        "model_type": model_type,
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
    if config.qk_norm:  # Qwen3 has no MLP bias switch, and a sliding window that must stay off
        del fields["mlp_bias"]
        fields["use_sliding_window"] = False
    return fields


# ---- tokenizer --------------------------------------------------------------------------------
# transformers reads a `tokenizer.json` (the `tokenizers` library's format) without converting
# anything, so we write one that reproduces SentencePiece exactly: NFC (nanokor's encode applies it
# before SentencePiece), spaces as "▁", the model's pieces and scores, byte fallback, and "\n" as
# an added token, matched before everything else as SentencePiece matches user-defined symbols.

def _bpe_merges(pieces: list[str], scores: list[float], types: list[int]) -> list[list[str]]:
    """Every split of a BPE piece into two pieces, ranked by the whole piece's score: SentencePiece
    applies the adjacent pair whose concatenation scores highest, transformers the lowest-ranked merge."""
    ids = {p: i for i, p in enumerate(pieces) if types[i] == NORMAL}
    merges = []
    for piece, i in ids.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in ids and right in ids:
                merges.append((-scores[i], i, ids[left], ids[right], [left, right]))
    return [m[-1] for m in sorted(merges)]


def added_tokens(proto) -> list[dict]:
    """The pieces matched whole before the model runs: the special ones (unk, bos, eos, pad and the chat
    tokens, SentencePiece control pieces) and "\n" (user-defined, not special)."""
    return [{"id": i, "content": p.piece, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
             "special": p.type != USER_DEFINED}
            for i, p in enumerate(proto.pieces) if p.type in (UNKNOWN, CONTROL, USER_DEFINED)]


def hf_tokenizer_json(model_bytes: bytes) -> dict:
    """The tokenizers-library description of a nanokor SentencePiece model (BPE or unigram)."""
    proto = sentencepiece_proto(model_bytes)
    pieces = [p.piece for p in proto.pieces]
    scores = [p.score for p in proto.pieces]
    types = [p.type for p in proto.pieces]
    unk = pieces[types.index(UNKNOWN)]
    if proto.trainer_spec.model_type == BPE:
        model = {"type": "BPE", "dropout": None, "unk_token": unk, "continuing_subword_prefix": None,
                 "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                 "vocab": {p: i for i, p in enumerate(pieces)}, "merges": _bpe_merges(pieces, scores, types)}
    else:
        model = {"type": "Unigram", "unk_id": types.index(UNKNOWN), "byte_fallback": True,
                 "vocab": [[p, s] for p, s in zip(pieces, scores)]}
    added = added_tokens(proto)
    dummy_prefix = proto.normalizer_spec.add_dummy_prefix
    decoders = [{"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
                {"type": "ByteFallback"}, {"type": "Fuse"}]
    if dummy_prefix:
        decoders.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    bos = pieces[BOS_ID]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {"type": "Metaspace", "replacement": "\u2581",
                          "prepend_scheme": "first" if dummy_prefix else "never", "split": False},
        # Training documents start with BOS, so encoded text does too (as `encode_prompt` does).
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos: {"id": bos, "ids": [BOS_ID], "tokens": [bos]}},
        },
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": model,
    }


def hf_tokenizer_config(model_bytes: bytes, max_seq_len: int, chat: ChatSpec | None = None) -> dict:
    proto = sentencepiece_proto(model_bytes)
    pieces = [p.piece for p in proto.pieces]
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": pieces[BOS_ID], "eos_token": pieces[EOS_ID],
              "unk_token": pieces[UNK_ID], "pad_token": pieces[PAD_ID], "model_max_length": max_seq_len,
              "clean_up_tokenization_spaces": False, "padding_side": "left",
              # "<s>" typed in text is text to SentencePiece, not BOS; make transformers agree.
              "split_special_tokens": True,
              # llama.cpp's convert_hf_to_gguf.py reads this key, and without it prepends "▁" to every prompt.
              "add_prefix_space": proto.normalizer_spec.add_dummy_prefix,
              "added_tokens_decoder": {str(t.pop("id")): t for t in added_tokens(proto)}}
    if chat:
        # The template's text holds <s>, <|im_start|> and <|im_end|>, which must become those tokens when
        # apply_chat_template (or lm-eval) encodes it: so special tokens in text are parsed, as every
        # chat-template tool does. The one difference from nanokor: a delimiter typed inside a message is
        # a token here, text to chat.py (whose tokenizer never makes control ids from text).
        config.update(chat_template=chat.template, eos_token=pieces[chat.end_of_turn_id], split_special_tokens=False)
    return config


# ---- the model card ---------------------------------------------------------------------------

def license_id(text: str) -> str:
    """An argparse type: a Hugging Face / SPDX-style licence identifier (it goes into YAML and GGUF)."""
    if not re.fullmatch(r"[a-z0-9][a-z0-9.+-]*", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a licence identifier; use a lower-case id such as "
                                         "mit, apache-2.0 or cc-by-4.0 (default: unknown)")
    return text


def model_card(ckpt: dict, model: Transformer, license: str, chat: ChatSpec | None = None) -> str:
    """README.md with the YAML front matter the Hub, and convert_hf_to_gguf.py, read."""
    c = model.config
    proto = sentencepiece_proto(ckpt["tokenizer"])
    kind = "BPE" if proto.trainer_spec.model_type == BPE else "unigram"
    architecture, model_type = hf_architecture(c)
    decoder = "Qwen3 decoder (Llama with per-head q/k RMSNorm)" if c.qk_norm else "Llama decoder"
    rows = {
        "architecture": f"{decoder}: {c.n_layer} layers, d_model {c.d_model}, {c.n_head} heads "
                        f"({c.n_kv_head} key/value), d_ff {c.d_ff}, RoPE θ {c.rope_theta:g}, RMSNorm ε "
                        f"{c.norm_eps:g}, {'tied' if c.tie_embeddings else 'untied'} embeddings",
        "parameters": f"{model.num_params():,}",
        "context": f"{c.max_seq_len:,} tokens",
        "tokenizer": f"SentencePiece {kind}, {c.vocab_size:,} pieces, byte fallback, `add_prefix_space` "
                     f"{json.dumps(proto.normalizer_spec.add_dummy_prefix)}; text is NFC-normalized before encoding",
        **training_summary(ckpt),
        "sampling defaults": ", ".join(f"{k} {v}" for k, v in SAMPLING.items())
                             + " (sample.py's: top-k, top-p, min-p and repetition penalty off)",
    }
    table = "\n".join(f"| {k} | {v} |" for k, v in rows.items())
    usage = ("Prompts start with BOS (`<s>`), as training documents did, and text ends with EOS (`</s>`)." if not chat
             else "A chat model. A conversation is one `<s>`, then ChatML turns (`<|im_start|>role\\n...<|im_end|>\\n`), "
                  "then `<|im_start|>assistant\\n` for the reply, which ends with `<|im_end|>`: "
                  "`tokenizer.apply_chat_template(messages, add_generation_prompt=True)` writes exactly that, and "
                  "generation stops there (generation_config.json).")
    return f"""---
language:
- ko
license: {license}
library_name: transformers
pipeline_tag: text-generation
tags:
- nanokor
- {model_type}
---

# nanokor Korean language model

A Korean decoder-only language model trained with nanokor. It loads as `{architecture}`.

| | |
|---|---|
{table}

{usage}
"""


# ---- the export directory ---------------------------------------------------------------------

def export(ckpt: dict, out_dir, dtype: torch.dtype = torch.float32, license: str = "unknown",
           chat: bool | None = None) -> list[Path]:
    """Write config.json, generation_config.json, model.safetensors, the tokenizer files and README.md.
    A chat model (see export_spec.chat_spec; `chat` overrides the checkpoint's mark) gets its chat template
    and ends a reply at <|im_end|>."""
    model = build_model(ckpt)
    spec = chat_spec(ckpt, chat)
    eos = list(spec.stop_ids) if spec else EOS_ID  # transformers stops at any of a list
    try:
        config = hf_config(model.config, bos_id=BOS_ID, eos_id=eos, pad_id=PAD_ID)
    except ValueError as e:
        raise ExportError(str(e)) from None
    config["torch_dtype"] = config["dtype"] = str(dtype).removeprefix("torch.")
    out_dir = Path(out_dir)
    # safetensors refuses shared or non-contiguous storage; a tied head is already left out.
    weights = {k: v.to(dtype).contiguous() for k, v in hf_state_dict(model).items()}
    files = {
        "config.json": config,
        "generation_config.json": {"bos_token_id": BOS_ID, "eos_token_id": eos, "pad_token_id": PAD_ID,
                                   "do_sample": True, **SAMPLING},
        "tokenizer.json": hf_tokenizer_json(ckpt["tokenizer"]),
        "tokenizer_config.json": hf_tokenizer_config(ckpt["tokenizer"], model.config.max_seq_len, spec),
    }
    contents = {name: (json.dumps(content, ensure_ascii=False, indent=2) + "\n").encode() for name, content in
                files.items()}
    contents["model.safetensors"] = save(weights, metadata={"format": "pt"})
    contents["tokenizer.model"] = ckpt["tokenizer"]  # for SentencePiece users
    contents["README.md"] = model_card(ckpt, model, license, spec).encode()
    for name, data in contents.items():
        atomic_write(out_dir / name, data)
    return sorted(out_dir / name for name in contents)


def _gguf_exporter():
    """nanokor.export_gguf.export_gguf, whose `gguf` package is an optional extra."""
    try:
        from nanokor.export_gguf import export_gguf
    except ModuleNotFoundError as e:
        if e.name != "gguf":
            raise
        raise ExportError("GGUF export needs the `gguf` package (llama.cpp's Python writer), which is not "
                          "installed. Install it with pip install -e '.[gguf]' (or pip install gguf) and run "
                          "the command again; the Hugging Face export (without --gguf) does not need it.") from None
    return export_gguf


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m nanokor.export",
                                description="Export a nanokor checkpoint as a Hugging Face Llama (or Qwen3) "
                                            "directory, or with --gguf as a GGUF file for llama.cpp, Ollama and "
                                            "LM Studio.")
    p.add_argument("--ckpt", required=True, help="checkpoint written by train.py, e.g. out/last.pt")
    p.add_argument("--out", help="output directory (default: hf/, or gguf/ with --gguf)")
    p.add_argument("--gguf", action="store_true",
                   help="write model-<dtype>.gguf and an Ollama Modelfile instead of the Hugging Face directory "
                        "(needs pip install -e '.[gguf]')")
    p.add_argument("--dtype", default="float32", choices=[*DTYPES, "q8_0"],
                   help="weight dtype (default: float32); q8_0 (8-bit blocks) with --gguf only")
    p.add_argument("--license", type=license_id, default="unknown",
                   help="licence id for the model card and GGUF metadata, e.g. mit or apache-2.0 (default: unknown)")
    args = p.parse_args(argv)
    if args.dtype == "q8_0" and not args.gguf:
        p.error("--dtype q8_0 is a GGUF type; add --gguf, or pick float32, bfloat16 or float16 for safetensors")
    out = Path(args.out or ("gguf" if args.gguf else "hf"))
    dtype = args.dtype if args.dtype == "q8_0" else DTYPES[args.dtype]
    try:
        ckpt = load_checkpoint(args.ckpt)
        files = _gguf_exporter()(ckpt, out, dtype, args.license) if args.gguf else export(ckpt, out, dtype,
                                                                                           args.license)
    except NanokorError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path in files:
        print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    chat = chat_spec(ckpt) is not None
    if args.gguf and chat:
        print(f"chat with it in llama.cpp: llama-cli -m {files[0]} --jinja (or llama-server -m {files[0]} --jinja); "
              f"with Ollama: ollama create nanokor -f {files[1]} && ollama run nanokor")
    elif args.gguf:
        print(f"run it with llama.cpp: llama-completion -m {files[0]} -p '한국의 역사는'; with Ollama: "
              f"ollama create nanokor -f {files[1]} && ollama run nanokor '한국의 역사는'")
    else:
        print(f"load it with transformers.AutoModelForCausalLM.from_pretrained({str(out)!r}) and "
              f"AutoTokenizer.from_pretrained({str(out)!r})"
              + ("; its tokenizer.apply_chat_template(messages, add_generation_prompt=True) renders a conversation"
                 if chat else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
