"""Turn a Korean corpus into what training reads: a tokenizer and validated token shards.

    python prepare.py --dataset sample                                   # embedded sample, seconds
    python prepare.py --data-files 'corpus/*.parquet'                    # local parquet/jsonl/txt
    python prepare.py --subset tiny-textbooks --max-bytes 2G             # maywell/korean_textbooks
    python prepare.py --dataset owner/name --subset a,b --split train    # any Hub dataset, or a directory

    # conversations for SFT, tokenized with the base model's tokenizer (nanokor/chat_data.py)
    python prepare.py --chat --dataset sample --tokenizer data/sample/tokenizer.model      # -> data/sample-chat
    python prepare.py --chat --dataset nlpai-lab/kullm-v2 --tokenizer out/last.pt
    python prepare.py --chat --data-files 'sft/*.jsonl' --tokenizer data/corpus/tokenizer.model \
                      --chat-format alpaca --columns instruction=question,output=answer

Output (default data/<name>/, data/<name>-chat/ with --chat): tokenizer.model, token_bytes.npy,
train_000000.bin …, val_000000.bin …, meta.json. The directory is built as <out>.partial and renamed
when complete.
"""

import argparse
import re
import shlex
import sys
from pathlib import Path

from nanokor import chat_data
from nanokor.corpus import HF_DATASET, open_corpus, open_records
from nanokor.errors import DataError, exit_on_error
from nanokor.flags import number, positive_int, seed, size
from nanokor.prepare import (ALL_CORES, DEFAULT_CONTEXT, DEFAULT_VAL_FRACTION_OTHER, SHARD_TOKENS,
                             TOKENIZER_SAMPLE_BYTES, build, build_chat, default_out)
from nanokor.tokenizer import DEFAULT_VOCAB, MAX_VOCAB, MIN_VOCAB


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("source")
    src.add_argument("--dataset", default=HF_DATASET, metavar="ID_OR_DIR",
                     help="a Hugging Face dataset id, streamed (default: %(default)s), a local directory laid "
                          "out like one (data files, and a README.md whose `configs:` names them), or 'sample': "
                          "the Korean sample shipped in nanokor/data/sample")
    src.add_argument("--subset",
                     help="the dataset's configs, comma-separated (e.g. tiny-textbooks,claude_evol), or 'all'; "
                          f"default: all, but for {HF_DATASET} its distinct configs, without the duplicate "
                          "mmlu_* copies")
    src.add_argument("--split", default="train", help="the dataset's split (default: train)")
    src.add_argument("--data-files", nargs="+", metavar="GLOB",
                     help="local .parquet/.jsonl/.txt files (globs; quote them); overrides --dataset")
    src.add_argument("--val-files", nargs="+", metavar="GLOB",
                     help="held-out .parquet/.jsonl/.txt files: every document goes to validation, none to "
                          "training (files --data-files also matches are left out of training); "
                          "--val-fraction then defaults to 0")
    src.add_argument("--text-column", default="text", help="the column (jsonl field) holding the text")
    src.add_argument("--max-docs", type=positive_int, help="stop after this many documents")
    src.add_argument("--max-bytes", type=size, help="stop after this much raw text (e.g. 2G)")
    tok = p.add_argument_group("tokenizer")
    tok.add_argument("--tokenizer", metavar="PATH", help="reuse this SentencePiece .model instead of training one")
    tok.add_argument("--vocab-size", type=number(int, MIN_VOCAB, MAX_VOCAB, text=f"need {MIN_VOCAB} to {MAX_VOCAB} "
                                                 "(256 byte pieces, the special ids and the text's characters; "
                                                 "uint16 shards)"),
                     help=f"default {DEFAULT_VOCAB}, capped for small corpora at one piece per 40 bytes of "
                          f"tokenizer-training text (multiple of 256); {MIN_VOCAB} to {MAX_VOCAB} (uint16 shards)")
    tok.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe", help="SentencePiece algorithm (bpe)")
    tok.add_argument("--tokenizer-sample-bytes", type=size, default=TOKENIZER_SAMPLE_BYTES,
                     help="train the tokenizer on the first this-many bytes of clean training documents (50M)")
    out = p.add_argument_group("output")
    out.add_argument("--out", type=Path, help="output directory (default data/<name>, e.g. data/sample)")
    out.add_argument("--val-fraction", type=number(float, 0, 1, high_open=True, text="need 0 <= f < 1, e.g. 0.01"),
                     help="share of documents for validation, chosen by content hash "
                          f"(default {DEFAULT_VAL_FRACTION_OTHER}; 0.1 for the small sample)")
    out.add_argument("--shard-tokens", type=positive_int, default=SHARD_TOKENS,
                     help="tokens per shard file (100M: 200 MB files)")
    out.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    chat = p.add_argument_group("conversations (--chat)")
    chat.add_argument("--chat", action="store_true",
                      help="prepare conversations for SFT (chat shards with a loss mask) instead of documents; "
                           "needs --tokenizer, the base model's. --dataset sample is the conversation sample in "
                           "nanokor/data/chat_sample")
    chat.add_argument("--chat-format", choices=list(chat_data.LAYOUTS),
                      help="how a record lays out a conversation (default: detected from its columns): "
                           "messages (role/content turns), sharegpt (from/value turns), alpaca "
                           "(instruction, input, output), openorca (system_prompt, question, response)")
    chat.add_argument("--columns", metavar="FIELD=COLUMN,...",
                      help="the columns of fields named otherwise, e.g. instruction=prompt,output=answer")
    chat.add_argument("--context", type=positive_int, metavar="TOKENS",
                      help=f"longest conversation kept: it must fit this context (block_size), i.e. at most "
                           f"TOKENS + 1 tokens; longer ones are counted and left out (default {DEFAULT_CONTEXT})")
    p.add_argument("--num-proc", type=positive_int, default=ALL_CORES,
                   help=f"worker processes that read, clean and tokenize (default: all cores, {ALL_CORES})")
    p.add_argument("--seed", type=seed(32), default=0,
                   help="seed for tokenizer training (the split depends on document content only)")
    return p


def warn_held_out_names(corpus, explicit_val: bool) -> None:
    """A file named like a held-out split, read as training text, is usually a glob that caught too
    much (corpus/*.parquet over train-* and validation-*): say so, and how to hold it out."""
    if explicit_val:
        return
    suspicious = [f for f in corpus.info.get("files", []) if HELD_OUT_NAME.search(Path(f).stem)]
    if suspicious:
        names = ", ".join(Path(f).name for f in suspicious[:3]) + (" ..." if len(suspicious) > 3 else "")
        print(f"warning: {names} look{'s' if len(suspicious) == 1 else ''} like held-out data but will be "
              "trained on (documents are split by content hash). To keep them out of training, pass them "
              "with --val-files, e.g. --data-files 'corpus/train-*.parquet' --val-files "
              "'corpus/validation-*.parquet'.", file=sys.stderr)


# File names that say "held out": validation-00000-of-00001.parquet, val.jsonl, test_2.txt, dev.txt ...
HELD_OUT_NAME = re.compile(r"(^|[-_.])(validation|valid|val|test|dev|eval)([-_.\d]|$)", re.IGNORECASE)


def run(args, argv: list[str]) -> dict:
    if args.chat:
        return run_chat(args, argv)
    given = [flag for flag, value in (("--chat-format", args.chat_format), ("--columns", args.columns),
                                      ("--context", args.context)) if value is not None]
    if given:
        raise DataError(f"{', '.join(given)} appl{'ies' if len(given) == 1 else 'y'} to conversations; add --chat "
                        "to prepare conversations for SFT, or leave them out to prepare documents.")
    val_corpus = open_corpus(data_files=args.val_files, text_column=args.text_column) if args.val_files else None
    held_out_files = [Path(f) for f in val_corpus.info["files"]] if val_corpus else []
    corpus = open_corpus(args.dataset, subsets=args.subset, split=args.split, data_files=args.data_files,
                         text_column=args.text_column, max_docs=args.max_docs, max_bytes=args.max_bytes,
                         exclude=held_out_files)
    warn_held_out_names(corpus, bool(val_corpus))
    if args.tokenizer and args.vocab_size:
        raise DataError("--vocab-size applies when training a tokenizer; --tokenizer reuses one. Pass one of them.")
    return build(corpus, args.out or default_out(corpus.name), command=shlex.join(["python", "prepare.py", *argv]),
                 val_corpus=val_corpus, tokenizer_path=args.tokenizer, vocab_size=args.vocab_size,
                 model_type=args.model_type, tokenizer_sample_bytes=args.tokenizer_sample_bytes,
                 val_fraction=args.val_fraction, shard_tokens=args.shard_tokens, num_proc=args.num_proc,
                 seed=args.seed, overwrite=args.overwrite)


def run_chat(args, argv: list[str]) -> dict:
    """--chat: conversations in (nanokor/chat_data.py), chat shards out, with the base model's tokenizer."""
    misplaced = [flag for flag, value, default in (
        ("--text-column", args.text_column, "text"), ("--max-bytes", args.max_bytes, None),
        ("--vocab-size", args.vocab_size, None), ("--model-type", args.model_type, "bpe"),
        ("--tokenizer-sample-bytes", args.tokenizer_sample_bytes, TOKENIZER_SAMPLE_BYTES)) if value != default]
    if misplaced:
        raise DataError(f"{', '.join(misplaced)} do{'es' if len(misplaced) == 1 else ''} not apply to --chat: "
                        "conversations are read by layout (--chat-format, --columns), capped with --max-docs, and "
                        "tokenized with the base model's tokenizer (--tokenizer). Leave them out.")
    if not args.tokenizer:
        raise DataError("--chat needs --tokenizer: the tokenizer the base model was trained with, so that SFT can "
                        "start from it, e.g. --tokenizer data/sample/tokenizer.model (the data directory's) or "
                        "--tokenizer out/last.pt (a checkpoint's).")
    if not args.data_files and args.dataset == HF_DATASET:
        raise DataError(f"--chat reads conversations, and {HF_DATASET} (the default --dataset) holds documents. Name "
                        "them: --dataset sample (the conversation sample shipped with nanokor), a Hub id such as "
                        "nlpai-lab/kullm-v2, a local dataset directory, or --data-files 'sft/*.jsonl'.")
    columns = chat_data.parse_columns(args.columns)
    val_corpus = open_records(data_files=args.val_files) if args.val_files else None
    held_out_files = [Path(f) for f in val_corpus.info["files"]] if val_corpus else []
    corpus = open_records(args.dataset, subsets=args.subset, split=args.split, data_files=args.data_files,
                          max_records=args.max_docs, exclude=held_out_files)
    return build_chat(corpus, args.out or default_out(f"{corpus.name}-chat"),
                      command=shlex.join(["python", "prepare.py", *argv]), tokenizer_path=args.tokenizer,
                      val_corpus=val_corpus, layout=args.chat_format, columns=columns,
                      context=args.context or DEFAULT_CONTEXT, val_fraction=args.val_fraction,
                      shard_tokens=args.shard_tokens, num_proc=args.num_proc, overwrite=args.overwrite)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    return exit_on_error(run, args, argv)


if __name__ == "__main__":
    sys.exit(main())
