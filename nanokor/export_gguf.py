"""GGUF export for llama.cpp, Ollama and LM Studio: one .gguf file and an Ollama Modelfile beside it.

    python -m nanokor.export --ckpt out/last.pt --gguf --out gguf/ --dtype f16
    # -> gguf/model-f16.gguf, gguf/Modelfile

The file holds what llama.cpp's convert_hf_to_gguf.py writes for a Llama (or, for a qk_norm model, a
Qwen3), taken from the checkpoint directly: llama.cpp's tensor names, q/k rows reordered for its Llama
RoPE (Qwen3's rotates halves as nanokor does, so its rows stay), the hyperparameters, sampling
defaults equal to sample.py's, and the SentencePiece vocabulary as llama.cpp's "llama" (SPM)
tokenizer with add_space_prefix false, so a prompt becomes the same ids as in nanokor. A chat model
also carries its chat template and end-of-turn token, and its Modelfile the same format for Ollama. Written with
the `gguf` package (llama.cpp's own writer), an optional extra imported only on this path.
"""

from pathlib import Path

import gguf
import torch
from gguf import GGMLQuantizationType as Q
from gguf import LlamaFileType as F

from nanokor.atomic import atomic_write
from nanokor.checkpoint import build_model
from nanokor.errors import ExportError
from nanokor.export_spec import BPE, SAMPLING, ChatSpec, chat_spec, check_position, hf_state_dict, sentencepiece_proto, \
    training_summary
from nanokor.model import Transformer
from nanokor.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID

# --dtype -> (the matrices' tensor type, the file type). Vectors (the RMSNorm weights) stay F32, as
# llama.cpp's converter keeps them.
TYPES = {torch.float32: (Q.F32, F.ALL_F32), torch.float16: (Q.F16, F.MOSTLY_F16),
         torch.bfloat16: (Q.BF16, F.MOSTLY_BF16), "q8_0": (Q.Q8_0, F.MOSTLY_Q8_0)}

UNIGRAM_REFUSED = (
    "Cannot export a unigram tokenizer to GGUF exactly: llama.cpp's 'llama' tokenizer merges pairs by score "
    "(SentencePiece BPE), and its unigram tokenizer (T5's) has no byte fallback, so prompts would become "
    "different ids in llama.cpp than in nanokor. Retrain the tokenizer with prepare.py's default "
    "--model-type bpe, or use the Hugging Face export (without --gguf), which reproduces unigram exactly.")


def rope_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """q_proj/k_proj rows in the order llama.cpp's Llama RoPE expects. nanokor (like transformers)
    rotates dims i and i + head_dim/2 of each head; llama.cpp rotates adjacent dims 2i and 2i+1.
    Interleaving each head's two halves gives the same rotated vectors, hence the same dot products."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, -1).transpose(1, 2).reshape(w.shape)


def gguf_architecture(model: Transformer) -> gguf.MODEL_ARCH:
    """llama.cpp's architecture: `qwen3` (attn_q_norm / attn_k_norm before a rotate-half RoPE) for a
    qk_norm model, else `llama`."""
    return gguf.MODEL_ARCH.QWEN3 if model.config.qk_norm else gguf.MODEL_ARCH.LLAMA


def gguf_tensors(model: Transformer, qtype: Q):
    """(llama.cpp name, data, tensor type) for each weight. A tied LM head is left out: llama.cpp
    reuses token_embd.weight when output.weight is absent."""
    c = model.config
    arch = gguf_architecture(model)
    names = gguf.get_tensor_name_map(arch, c.n_layer)
    for hf_name, w in hf_state_dict(model).items():
        if arch == gguf.MODEL_ARCH.LLAMA and hf_name.endswith("q_proj.weight"):
            w = rope_permute(w, c.n_head)
        elif arch == gguf.MODEL_ARCH.LLAMA and hf_name.endswith("k_proj.weight"):
            w = rope_permute(w, c.n_kv_head)
        kind = qtype if w.ndim == 2 else Q.F32
        if kind == Q.Q8_0 and w.shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0]:
            raise ExportError(f"--dtype q8_0 quantizes rows in blocks of 32 values, but {hf_name} has rows of "
                              f"{w.shape[-1]}. Export this model with --dtype float16 or bfloat16 instead.")
        yield names.get_name(hf_name, try_suffixes=(".weight",)), gguf.quants.quantize(w.float().numpy(), kind), kind


def add_vocabulary(writer: gguf.GGUFWriter, model_bytes: bytes) -> None:
    """SentencePiece's pieces, scores and piece types as llama.cpp's SPM vocabulary."""
    proto = sentencepiece_proto(model_bytes)
    if proto.trainer_spec.model_type != BPE:
        raise ExportError(UNIGRAM_REFUSED)
    # llama.cpp's token types are SentencePiece's piece types (NORMAL, CONTROL, BYTE, ...), by name.
    types = [gguf.TokenType[proto.SentencePiece.Type.Name(p.type)] for p in proto.pieces]
    # llama.cpp finds user-defined tokens ("\n") in the raw text, before spaces become "▁".
    pieces = [p.piece.replace("\u2581", " ") if t == gguf.TokenType.USER_DEFINED else p.piece
              for p, t in zip(proto.pieces, types)]
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(pieces)
    writer.add_token_scores([p.score for p in proto.pieces])
    writer.add_token_types(types)
    writer.add_unk_token_id(UNK_ID)
    writer.add_bos_token_id(BOS_ID)
    writer.add_eos_token_id(EOS_ID)
    writer.add_pad_token_id(PAD_ID)
    writer.add_add_bos_token(True)  # prompts and training documents start with BOS
    writer.add_add_eos_token(False)
    # False for nanokor's tokenizers; without the key llama.cpp prepends "▁" to every prompt.
    writer.add_add_space_prefix(proto.normalizer_spec.add_dummy_prefix)


def add_chat(writer: gguf.GGUFWriter, chat: ChatSpec) -> None:
    """A chat model's template and end of turn. llama.cpp (--jinja) renders the template, drops its leading
    BOS text because add_bos_token puts BOS in front as a token, and reads the turn delimiters in the text
    as the control tokens they name; a reply ends at the end-of-turn id (or EOS, also an end of generation)."""
    writer.add_chat_template(chat.template)
    writer.add_eot_token_id(chat.end_of_turn_id)


def add_hyperparameters(writer: gguf.GGUFWriter, model: Transformer) -> None:
    c = model.config
    writer.add_vocab_size(c.vocab_size)
    writer.add_context_length(c.max_seq_len)
    writer.add_embedding_length(c.d_model)
    writer.add_block_count(c.n_layer)
    writer.add_feed_forward_length(c.d_ff)
    writer.add_head_count(c.n_head)
    writer.add_head_count_kv(c.n_kv_head)
    writer.add_rope_dimension_count(c.head_dim)
    writer.add_rope_freq_base(c.rope_theta)
    writer.add_layer_norm_rms_eps(c.norm_eps)


def add_metadata(writer: gguf.GGUFWriter, ckpt: dict, license: str) -> None:
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name("nanokor")
    writer.add_description("Korean language model trained with nanokor; "
                           + "; ".join(f"{k}: {v}" for k, v in training_summary(ckpt).items()))
    writer.add_license(license)
    writer.add_languages(["ko"])
    writer.add_sampling_temp(SAMPLING["temperature"])
    writer.add_sampling_top_k(SAMPLING["top_k"])
    writer.add_sampling_top_p(SAMPLING["top_p"])
    writer.add_sampling_min_p(SAMPLING["min_p"])
    writer.add_sampling_penalty_repeat(SAMPLING["repetition_penalty"])


def modelfile(gguf_name: str, model: Transformer, chat: ChatSpec | None = None) -> str:
    """An Ollama Modelfile with sample.py's sampling: for a base model a plain completion template (the prompt
    is the text to continue), for a chat model the chat format and its stops."""
    c = model.config
    if chat:
        head = ('# ollama create nanokor -f Modelfile && ollama run nanokor "한국의 수도는 어디인가요?"\n'
                f"FROM ./{gguf_name}\n"
                "# A chat model: ChatML turns after the BOS that Ollama adds (add_bos_token), as nanokor renders them.\n"
                f'TEMPLATE """{chat.ollama_template}"""\n'
                + "".join(f'PARAMETER stop "{piece}"\n' for piece in chat.stop_pieces))
    else:
        head = (f'# ollama create nanokor -f Modelfile && ollama run nanokor "한국의 역사는"\n'
                f"FROM ./{gguf_name}\n"
                '# A base model: no chat template; BOS is added as the GGUF says.\n'
                'TEMPLATE """{{ .Prompt }}"""\n')
    return (head
            + f"PARAMETER num_ctx {c.max_seq_len}\n"
            f"PARAMETER temperature {SAMPLING['temperature']}\n"
            "# top_k = the whole vocabulary: off in every Ollama version (not all of them read 0 as off)\n"
            f"PARAMETER top_k {c.vocab_size}\n"
            f"PARAMETER top_p {SAMPLING['top_p']}\n"
            f"PARAMETER min_p {SAMPLING['min_p']}\n"
            f"PARAMETER repeat_penalty {SAMPLING['repetition_penalty']}\n")


def _write(writer: gguf.GGUFWriter, f) -> None:
    writer.open_output_file(Path(f.name))  # GGUFWriter opens its file by name: atomic_write's temp file
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def export_gguf(ckpt: dict, out_dir, dtype: torch.dtype | str = torch.float32, license: str = "unknown") -> list[Path]:
    """Write <out_dir>/model-<type>.gguf and <out_dir>/Modelfile; returns their paths."""
    model = build_model(ckpt)
    try:
        check_position(model.config)
    except ValueError as e:
        raise ExportError(str(e)) from None
    qtype, file_type = TYPES[dtype]
    writer = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[gguf_architecture(model)])
    add_metadata(writer, ckpt, license)
    add_hyperparameters(writer, model)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_vocabulary(writer, ckpt["tokenizer"])
    chat = chat_spec(ckpt)
    if chat:
        add_chat(writer, chat)
    for name, data, kind in gguf_tensors(model, qtype):
        writer.add_tensor(name, data, raw_dtype=kind)
    out_dir = Path(out_dir)
    path = out_dir / f"model-{qtype.name.lower()}.gguf"
    atomic_write(path, lambda f: _write(writer, f))
    atomic_write(out_dir / "Modelfile", modelfile(path.name, model, chat).encode())
    return [path, out_dir / "Modelfile"]
