"""Hugging Face export: a directory `transformers` loads offline as LlamaForCausalLM + its tokenizer.

    python -m nanokor.export --ckpt out/last.pt --out hf/

nanokor's parameter names are Llama's, so the weights are a key rename; config.json is written from
the model config, and tokenizer.json reproduces the SentencePiece model exactly. transformers is
never imported here: the files are plain JSON and safetensors.
"""

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from nanokor.checkpoint import build_model, load_checkpoint
from nanokor.device import DTYPES
from nanokor.errors import ExportError, NanokorError
from nanokor.model import ModelConfig, Transformer
from nanokor.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID


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


# ---- tokenizer --------------------------------------------------------------------------------
# transformers reads a `tokenizer.json` (the `tokenizers` library's format) without converting
# anything, so we write one that reproduces SentencePiece exactly: NFC (nanokor's encode applies it
# before SentencePiece), spaces as "▁", the model's pieces and scores, byte fallback, and "\n" as
# an added token, matched before everything else as SentencePiece matches user-defined symbols.

_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED = 1, 2, 3, 4  # SentencePiece piece types
_UNIGRAM, _BPE = 1, 2  # and model types


def _sentencepiece_proto(model_bytes: bytes):
    try:  # SentencePiece's own schema module; it needs protobuf (a nanokor dependency)
        from sentencepiece import sentencepiece_model_pb2
    except ImportError as e:
        raise ExportError(f"Reading the tokenizer's settings needs protobuf ({e}); pip install protobuf.") from None

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_bytes)
    norm, trainer = proto.normalizer_spec, proto.trainer_spec
    problems = []
    if trainer.model_type not in (_UNIGRAM, _BPE):
        problems.append("the model type is neither BPE nor unigram")
    if norm.name not in ("identity", "") or norm.precompiled_charsmap:
        problems.append(f"it normalizes text itself ({norm.name!r})")
    if norm.remove_extra_whitespaces or not norm.escape_whitespaces or trainer.treat_whitespace_as_suffix:
        problems.append("its whitespace handling differs from nanokor's")
    if problems:
        raise ExportError("Cannot export this tokenizer to transformers exactly: " + "; ".join(problems) + ". "
                          "Tokenizers trained by nanokor's prepare.py export; retrain with it.")
    return proto


def _bpe_merges(pieces: list[str], scores: list[float], types: list[int]) -> list[list[str]]:
    """Every split of a BPE piece into two pieces, ranked by the whole piece's score: SentencePiece
    applies the adjacent pair whose concatenation scores highest, transformers the lowest-ranked merge."""
    ids = {p: i for i, p in enumerate(pieces) if types[i] == _NORMAL}
    merges = []
    for piece, i in ids.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in ids and right in ids:
                merges.append((-scores[i], i, ids[left], ids[right], [left, right]))
    return [m[-1] for m in sorted(merges)]


def hf_tokenizer_json(model_bytes: bytes) -> dict:
    """The tokenizers-library description of a nanokor SentencePiece model (BPE or unigram)."""
    proto = _sentencepiece_proto(model_bytes)
    pieces = [p.piece for p in proto.pieces]
    scores = [p.score for p in proto.pieces]
    types = [p.type for p in proto.pieces]
    unk = pieces[types.index(_UNKNOWN)]
    if proto.trainer_spec.model_type == _BPE:
        model = {"type": "BPE", "dropout": None, "unk_token": unk, "continuing_subword_prefix": None,
                 "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                 "vocab": {p: i for i, p in enumerate(pieces)}, "merges": _bpe_merges(pieces, scores, types)}
    else:
        model = {"type": "Unigram", "unk_id": types.index(_UNKNOWN), "byte_fallback": True,
                 "vocab": [[p, s] for p, s in zip(pieces, scores)]}
    added = [{"id": i, "content": p, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": types[i] != _USER_DEFINED}
             for i, p in enumerate(pieces) if types[i] in (_UNKNOWN, _CONTROL, _USER_DEFINED)]
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


def hf_tokenizer_config(model_bytes: bytes, max_seq_len: int) -> dict:
    pieces = [p.piece for p in _sentencepiece_proto(model_bytes).pieces]
    return {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": pieces[BOS_ID], "eos_token": pieces[EOS_ID],
            "unk_token": pieces[UNK_ID], "pad_token": pieces[PAD_ID], "model_max_length": max_seq_len,
            "clean_up_tokenization_spaces": False, "padding_side": "left",
            # "<s>" typed in text is text to SentencePiece, not BOS; make transformers agree.
            "split_special_tokens": True}


# ---- the export directory ---------------------------------------------------------------------

def export(ckpt: dict, out_dir, dtype: torch.dtype = torch.float32) -> list[Path]:
    """Write config.json, generation_config.json, model.safetensors and the tokenizer files."""
    model = build_model(ckpt)
    try:
        config = hf_config(model.config, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID)
    except ValueError as e:
        raise ExportError(str(e)) from None
    config["torch_dtype"] = config["dtype"] = str(dtype).removeprefix("torch.")
    tokenizer_json = hf_tokenizer_json(ckpt["tokenizer"])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # safetensors refuses shared or non-contiguous storage; a tied head is already left out.
    weights = {k: v.to(dtype).contiguous() for k, v in hf_state_dict(model).items()}
    save_file(weights, out_dir / "model.safetensors", metadata={"format": "pt"})
    files = {
        "config.json": config,
        "generation_config.json": {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID,
                                   "do_sample": True, "temperature": 0.8},  # sample.py's defaults
        "tokenizer.json": tokenizer_json,
        "tokenizer_config.json": hf_tokenizer_config(ckpt["tokenizer"], model.config.max_seq_len),
    }
    for name, content in files.items():
        (out_dir / name).write_text(json.dumps(content, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    (out_dir / "tokenizer.model").write_bytes(ckpt["tokenizer"])  # for SentencePiece users
    return sorted(out_dir / name for name in [*files, "model.safetensors", "tokenizer.model"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m nanokor.export",
                                description="Export a nanokor checkpoint as a Hugging Face Llama directory.")
    p.add_argument("--ckpt", required=True, help="checkpoint written by train.py, e.g. out/last.pt")
    p.add_argument("--out", default="hf", help="output directory (default: hf/)")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES),
                   help="weight dtype in model.safetensors (default: float32)")
    args = p.parse_args(argv)
    try:
        files = export(load_checkpoint(args.ckpt), args.out, DTYPES[args.dtype])
    except NanokorError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path in files:
        print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    print(f"load it with transformers.AutoModelForCausalLM.from_pretrained({str(args.out)!r}) and "
          f"AutoTokenizer.from_pretrained({str(args.out)!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
