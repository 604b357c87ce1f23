"""SentencePiece tokenizer for Korean: training, loading, and the per-token byte table for bits per byte.

Choices that matter for Korean and for exactness:
  - normalization is the identity inside SentencePiece (we apply NFC ourselves, `encode` included),
    and whitespace is kept as is, so decode(encode(text)) == NFC(text) exactly;
  - byte fallback is on: a character outside the vocabulary (rare Hanja, emoji) becomes its UTF-8
    bytes instead of <unk>, so nothing is ever lost;
  - character_coverage 0.9995 keeps the ~2,000 common Hangul syllables as single pieces, while very
    rare characters fall back to bytes;
  - digits are split one per token, so numbers tokenize consistently;
  - "\n" is its own piece (training reads one line per sentence, so it would never be learned);
  - no dummy-prefix space, so the byte table sums to exactly the text's UTF-8 length;
  - special ids are Llama's: unk=0, bos=1, eos=2, pad=3 (the Hugging Face export relies on it), and
    ChatML's <|im_start|> and <|im_end|> follow at 4 and 5 as *control* pieces: text can never
    produce them, so a base model's vocabulary already holds what its chat model needs
    (nanokor/chat_format.py lays turns out with them).
"""

import hashlib
import io
import re
import unicodedata
from collections.abc import Iterable
from functools import cached_property
from pathlib import Path

import numpy as np
import sentencepiece as spm

from nanokor.errors import DataError

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
IM_START, IM_END = "<|im_start|>", "<|im_end|>"  # ChatML's turn delimiters
IM_START_ID, IM_END_ID = 4, 5
MAX_VOCAB = 65_535  # token ids are stored as uint16
# byte-fallback pieces, the special and ChatML ids, "\n", and at least one character of text
MIN_VOCAB = 256 + len((UNK_ID, BOS_ID, EOS_ID, PAD_ID, IM_START_ID, IM_END_ID)) + 1 + 1
DEFAULT_VOCAB = 32_000
BYTES_PER_PIECE = 40  # automatic vocab: at most one piece per 40 bytes of training text (see auto_vocab_size)
MAX_LINE_CHARS = 4_000  # SentencePiece skips sentences over max_sentence_length bytes; we cut them instead


class Tokenizer:
    """A loaded SentencePiece model. `model_bytes` is the whole model; `sha256` identifies it."""

    def __init__(self, model_bytes: bytes):
        self.model_bytes = bytes(model_bytes)
        try:
            self.sp = spm.SentencePieceProcessor(model_proto=self.model_bytes)
        except RuntimeError:
            raise DataError("Not a SentencePiece model (it does not parse: truncated, or another kind of file). "
                            "Pass the tokenizer.model that prepare.py wrote, or re-run prepare.py if it is "
                            "damaged.") from None
        ids = (self.sp.unk_id(), self.sp.bos_id(), self.sp.eos_id(), self.sp.pad_id())
        if ids != (UNK_ID, BOS_ID, EOS_ID, PAD_ID):
            raise DataError(f"This SentencePiece model has special ids unk/bos/eos/pad = {ids}; nanokor needs "
                            f"{(UNK_ID, BOS_ID, EOS_ID, PAD_ID)} (Llama's). Train one with prepare.py instead.")
        if self.vocab_size > MAX_VOCAB:
            raise DataError(f"This tokenizer has {self.vocab_size} ids; shards store uint16, so at most {MAX_VOCAB}.")

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        try:
            data = Path(path).read_bytes()
        except OSError as e:
            raise DataError(f"Cannot read the tokenizer {path} ({e.strerror}). Pass the path of a SentencePiece "
                            ".model, such as the tokenizer.model prepare.py wrote.") from None
        try:
            return cls(data)
        except DataError as e:
            raise DataError(f"{path}: {e}") from None

    @cached_property
    def sha256(self) -> str:
        return hashlib.sha256(self.model_bytes).hexdigest()

    @property
    def vocab_size(self) -> int:
        return self.sp.vocab_size()

    bos_id, eos_id, pad_id, unk_id = BOS_ID, EOS_ID, PAD_ID, UNK_ID
    im_start_id, im_end_id = IM_START_ID, IM_END_ID

    @cached_property
    def has_chat_tokens(self) -> bool:
        """Whether ids 4 and 5 are ChatML's control pieces: true of every tokenizer prepare.py trains
        since they were added, false of every one before (those need re-preparing to chat)."""
        return self.vocab_size > IM_END_ID and all(
            self.sp.id_to_piece(i) == piece and self.sp.is_control(i)
            for i, piece in ((IM_START_ID, IM_START), (IM_END_ID, IM_END)))

    def encode(self, text: str) -> list[int]:
        """Token ids of NFC(text), without bos/eos."""
        return self.sp.encode(unicodedata.normalize("NFC", text))

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(int(i))

    @cached_property
    def token_byte_strings(self) -> list[bytes]:
        """The UTF-8 bytes each id stands for in decoded text: nothing for control ids, the raw byte for
        byte-fallback pieces (`<0xEA>`), and for <unk> the " ⁇ " that SentencePiece's decode prints."""
        sp = self.sp

        def piece_bytes(i: int) -> bytes:
            piece = sp.id_to_piece(i)
            if sp.is_byte(i):
                return bytes([int(piece[3:5], 16)])
            if sp.is_unknown(i):
                return " \u2047 ".encode()
            if sp.is_control(i) or sp.is_unused(i):
                return b""
            return piece.replace("\u2581", " ").encode("utf-8")

        return [piece_bytes(i) for i in range(self.vocab_size)]

    @cached_property
    def token_bytes(self) -> np.ndarray:
        """UTF-8 length of each token's text: 0 for special ids, 1 for byte-fallback pieces.

        Summed over the targets of a text it gives the text's length in bytes, which turns a loss in
        nats per token into bits per byte, comparable across tokenizers. <unk> counts 0: the text it
        replaced is not known, and its " ⁇ " is not part of the input.
        """
        return np.array([0 if i == UNK_ID else len(b) for i, b in enumerate(self.token_byte_strings)],
                        dtype=np.int32)


def auto_vocab_size(sample_bytes: int) -> int:
    """Vocabulary for a corpus when none is asked for: 32,000, capped at one piece per 40 bytes of
    tokenizer-training text, rounded down to a multiple of 256 (at least 512). A vocabulary much larger
    than the text supports either fails to train or learns pieces seen once; the embedded sample
    (~0.2 MB) gets about 4,600."""
    return max(512, min(DEFAULT_VOCAB, sample_bytes // BYTES_PER_PIECE // 256 * 256))


def _training_lines(docs: Iterable[str]) -> Iterable[str]:
    """SentencePiece trains on sentences: one per line, long lines cut (it would skip them)."""
    for doc in docs:
        for line in doc.split("\n"):
            for start in range(0, len(line), MAX_LINE_CHARS):
                yield line[start:start + MAX_LINE_CHARS]


def train_tokenizer(docs: list[str], *, vocab_size: int | None = None, model_type: str = "bpe",
                    num_threads: int = 1, seed: int = 0, character_coverage: float = 0.9995) -> Tokenizer:
    """Train on clean documents (already normalized). vocab_size None picks `auto_vocab_size`."""
    if vocab_size is None:
        vocab_size = auto_vocab_size(sum(len(d.encode("utf-8")) for d in docs))
    if vocab_size > MAX_VOCAB:
        raise DataError(f"--vocab-size {vocab_size} is too large: shards store token ids as uint16, so the "
                        f"vocabulary can have at most {MAX_VOCAB} entries.")
    if model_type not in ("bpe", "unigram"):
        raise DataError(f"--model-type {model_type!r}: choose 'bpe' or 'unigram'.")
    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(_training_lines(docs)), model_writer=model, vocab_size=vocab_size,
            model_type=model_type, character_coverage=character_coverage, byte_fallback=True,
            split_digits=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
            add_dummy_prefix=False, allow_whitespace_only_pieces=True, user_defined_symbols=["\n"],
            control_symbols=[IM_START, IM_END], unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID,
            max_sentence_length=4 * MAX_LINE_CHARS, num_threads=num_threads, minloglevel=2)
    except RuntimeError as e:
        message = str(e).split("] ")[-1]  # drop SentencePiece's source location
        limit = re.search(r"value <= (\d+)", message)
        needed = re.search(r"required_chars\. \d+ vs (\d+)", message)
        if needed:  # its advice names a SentencePiece option prepare.py does not have
            message = (f"the text's characters, with the byte-fallback and special pieces, need {int(needed.group(1)):,} "
                       "pieces.")
        hint = (f"pass --vocab-size {limit.group(1)} or less" if limit else
                f"pass --vocab-size {needed.group(1)} or more" if needed else "pass a different --vocab-size")
        raise DataError(f"SentencePiece cannot train a {vocab_size}-piece {model_type} vocabulary on this "
                        f"text ({len(docs)} documents): {message} Fix: {hint}, give it more text "
                        "(--tokenizer-sample-bytes, a larger corpus), or reuse a model with --tokenizer.") from None
    return Tokenizer(model.getvalue())
