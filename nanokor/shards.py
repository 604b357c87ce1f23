"""The on-disk data format: token shards, and the prepared data directory that holds them.

A shard is a 256-byte header followed by uint16 token ids (little-endian):

    offset  size  field
    0       8     magic b"NKSHARD\\0"
    8       4     format version (uint32)
    12      4     vocab size (uint32)
    16      8     token count (uint64)
    24      8     dtype, ASCII, NUL-padded ("<u2")
    32      32    SHA-256 of the tokenizer model (raw digest)
    64      192   zero

Every document is framed as <s> text </s> (bos, tokens, eos): the model sees where documents start,
so generation can begin from <s>, and learns to end them, so generation can stop at </s>.

A chat shard (prepare.py --chat) holds whole conversations, rendered by nanokor/chat_format.py, with
their loss mask. Its header is the same but for the magic, b"NKCHAT\0\0", and one more field:

    64      8     conversation count (uint64)

and after the header come the token ids (uint16 x token count), the loss mask (uint8 x token count,
1 where the token is trained: assistant content and its <|im_end|>) and where each conversation starts
(uint64 x conversation count, token offsets, ascending from 0). No conversation crosses a shard.

A prepared directory (`DataDir`) holds tokenizer.model, token_bytes.npy, train_000000.bin …,
val_000000.bin … and meta.json, whose "content" says whether the shards hold documents or
conversations. It is complete only once meta.json exists: it is written last, by
rename, and lists the shards. Shards are likewise written under a temporary name and renamed when
whole, so a killed prepare.py leaves nothing that looks finished. The encoding pipeline that writes
them is nanokor/encode.py; this module is what readers need.
"""

import bisect
import json
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from nanokor import chat_format
from nanokor.atomic import AtomicFile, atomic_write
from nanokor.errors import DataError, ShardError
from nanokor.tokenizer import Tokenizer

MAGIC = b"NKSHARD\0"
CHAT_MAGIC = b"NKCHAT\0\0"
VERSION = 1
DTYPE = "<u2"
HEADER_SIZE = 256
_HEADER = struct.Struct("<8sIIQ8s32s")
_CONVERSATIONS = struct.Struct("<Q")  # a chat shard's conversation count, right after _HEADER's fields
SPLITS = ("train", "val")
# meta.json's "content": what a directory's shards hold (absent in directories made before chat shards: documents)
DOCUMENTS, CONVERSATIONS = "documents", "conversations"


def fits_context(n_tokens: int, context: int) -> bool:
    """Whether a conversation of n_tokens trains whole at this context (block_size): a row holds
    context + 1 tokens, the inputs and, shifted by one, the targets."""
    return n_tokens <= context + 1


@dataclass(frozen=True)
class ShardHeader:
    version: int
    vocab_size: int
    n_tokens: int
    tokenizer_sha: str  # hex
    n_conversations: int | None = None  # chat shards only


def pack_header(vocab_size: int, n_tokens: int, tokenizer_sha: str, n_conversations: int | None = None) -> bytes:
    """A token shard's header, or with n_conversations a chat shard's."""
    magic = MAGIC if n_conversations is None else CHAT_MAGIC
    packed = _HEADER.pack(magic, VERSION, vocab_size, n_tokens, DTYPE.encode(), bytes.fromhex(tokenizer_sha))
    if n_conversations is not None:
        packed += _CONVERSATIONS.pack(n_conversations)
    return packed.ljust(HEADER_SIZE, b"\0")


def read_header(path: str | Path, *, chat: bool = False) -> ShardHeader:
    """Parse and check a shard's header against its file (magic, version, dtype, length); chat=True
    reads a chat shard's."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(HEADER_SIZE)
    except OSError as e:
        raise ShardError(f"Cannot read the shard {path} ({e.strerror}): its data directory is incomplete or "
                         "damaged. Re-run prepare.py with --overwrite.") from None
    magic = raw[:8] if len(raw) == HEADER_SIZE else b""
    if magic != (CHAT_MAGIC if chat else MAGIC):
        if magic in (MAGIC, CHAT_MAGIC):
            held, wanted = ("conversations", "token") if magic == CHAT_MAGIC else ("documents", "chat")
            raise ShardError(f"{path} is a shard of {held}, read here as a {wanted} shard: its directory's "
                             "meta.json does not match its shards. Re-run prepare.py with --overwrite.")
        raise ShardError(f"{path} is not a nanokor token shard (bad magic). Point the loader at a directory "
                         "written by prepare.py.")
    _, version, vocab_size, n_tokens, dtype, sha = _HEADER.unpack_from(raw)
    n_conversations = _CONVERSATIONS.unpack_from(raw, _HEADER.size)[0] if chat else None
    dtype = dtype.rstrip(b"\0").decode("ascii", "replace")
    if version != VERSION or dtype != DTYPE:
        raise ShardError(f"{path} has shard format version {version}, dtype {dtype!r}; this nanokor reads "
                         f"version {VERSION}, {DTYPE!r}. Re-run prepare.py.")
    expected = HEADER_SIZE + (2 * n_tokens if not chat else 3 * n_tokens + 8 * n_conversations)
    actual = path.stat().st_size
    if actual != expected:
        what = f"{n_tokens} tokens" + (f" in {n_conversations} conversations" if chat else "")
        raise ShardError(f"{path} is {actual} bytes but its header promises {what} ({expected} bytes): "
                         "the file is truncated or corrupt. Re-run prepare.py with --overwrite.")
    return ShardHeader(version, vocab_size, n_tokens, sha.hex(), n_conversations)


def check_header(path: str | Path, *, tokenizer_sha: str | None = None, vocab_size: int | None = None,
                 chat: bool = False) -> ShardHeader:
    """`read_header`, and refuse a shard made with another tokenizer than the one in use."""
    header = read_header(path, chat=chat)
    if tokenizer_sha is not None and header.tokenizer_sha != tokenizer_sha:
        raise ShardError(f"{path} was tokenized with tokenizer {header.tokenizer_sha[:12]}…, but the tokenizer in "
                         f"use is {tokenizer_sha[:12]}…: token ids would mean different text. Use the "
                         "tokenizer.model from the same data directory (or re-run prepare.py with --tokenizer).")
    if vocab_size is not None and header.vocab_size != vocab_size:
        raise ShardError(f"{path} has vocab size {header.vocab_size}, but the model expects {vocab_size}. "
                         "Set the model's vocab size from the data directory's meta.json.")
    return header


def read_shard(path: str | Path, *, tokenizer_sha: str | None = None, vocab_size: int | None = None) -> np.ndarray:
    """The shard's tokens as a read-only uint16 memmap, after validating the header."""
    header = check_header(path, tokenizer_sha=tokenizer_sha, vocab_size=vocab_size)
    if header.n_tokens == 0:
        return np.zeros(0, dtype=DTYPE)
    return np.memmap(path, dtype=DTYPE, mode="r", offset=HEADER_SIZE, shape=(header.n_tokens,))


class ShardWriter:
    """Appends tokens to `{split}_000000.bin`, `{split}_000001.bin`, … of `shard_tokens` tokens each.

    Each shard is an `AtomicFile`: written with a placeholder header, completed with the real header,
    then committed (fsync, rename); a crash before the rename leaves only a temporary file.
    """

    def __init__(self, out_dir: str | Path, split: str, *, shard_tokens: int, vocab_size: int, tokenizer_sha: str):
        self.out_dir, self.split, self.shard_tokens = Path(out_dir), split, shard_tokens
        self.vocab_size, self.tokenizer_sha = vocab_size, tokenizer_sha
        self.shards: list[dict] = []  # {"file": name, "tokens": n} of each finished shard
        self._shard: AtomicFile | None = None
        self._count = 0

    def write(self, tokens: np.ndarray) -> None:
        tokens = np.asarray(tokens, dtype=DTYPE)
        while len(tokens):
            if self._shard is None:
                self._shard = AtomicFile(self.out_dir / f"{self.split}_{len(self.shards):06d}.bin", buffering=1 << 20)
                self._shard.file.write(b"\0" * HEADER_SIZE)
                self._count = 0
            part, tokens = tokens[: self.shard_tokens - self._count], tokens[self.shard_tokens - self._count:]
            self._shard.file.write(part.tobytes())
            self._count += len(part)
            if self._count == self.shard_tokens:
                self._finish()

    def close(self) -> list[dict]:
        if self._shard is not None:
            self._finish()
        return self.shards

    def _finish(self) -> None:
        shard, self._shard = self._shard, None
        shard.file.seek(0)
        shard.file.write(pack_header(self.vocab_size, self._count, self.tokenizer_sha))
        shard.commit()
        self.shards.append({"file": shard.path.name, "tokens": self._count})


class ChatShardWriter:
    """Appends whole conversations (ids and loss mask) to `{split}_000000.bin`, … of about
    `shard_tokens` tokens each: a shard closes before a conversation that would overflow it, so none is
    ever cut in two. The ids stream into the shard's `AtomicFile`; the mask waits in an unnamed
    temporary file beside it and the starts in memory (8 bytes a conversation) until the shard is done.
    """

    def __init__(self, out_dir: str | Path, split: str, *, shard_tokens: int, vocab_size: int, tokenizer_sha: str):
        self.out_dir, self.split, self.shard_tokens = Path(out_dir), split, shard_tokens
        self.vocab_size, self.tokenizer_sha = vocab_size, tokenizer_sha
        self.shards: list[dict] = []  # {"file", "tokens", "conversations"} of each finished shard
        self._shard: AtomicFile | None = None
        self._mask = None
        self._starts: list[int] = []
        self._count = 0

    def write(self, ids: np.ndarray, mask: np.ndarray) -> None:
        """One conversation: its token ids and its loss mask (1 = trained), of equal length."""
        if self._shard is not None and self._count + len(ids) > self.shard_tokens:
            self._finish()
        if self._shard is None:
            self._shard = AtomicFile(self.out_dir / f"{self.split}_{len(self.shards):06d}.bin", buffering=1 << 20)
            self._shard.file.write(b"\0" * HEADER_SIZE)
            self._mask = tempfile.TemporaryFile(dir=self.out_dir)
            self._starts, self._count = [], 0
        self._starts.append(self._count)
        self._shard.file.write(np.asarray(ids, dtype=DTYPE).tobytes())
        self._mask.write(np.asarray(mask, dtype=np.uint8).tobytes())
        self._count += len(ids)

    def close(self) -> list[dict]:
        if self._shard is not None:
            self._finish()
        return self.shards

    def _finish(self) -> None:
        shard, mask, self._shard, self._mask = self._shard, self._mask, None, None
        with mask:
            mask.seek(0)
            shutil.copyfileobj(mask, shard.file)
        shard.file.write(np.array(self._starts, dtype="<u8").tobytes())
        shard.file.seek(0)
        shard.file.write(pack_header(self.vocab_size, self._count, self.tokenizer_sha, len(self._starts)))
        shard.commit()
        self.shards.append({"file": shard.path.name, "tokens": self._count, "conversations": len(self._starts)})


class TokenStream:
    """The shards of one split, read as one token array (windows may cross shard boundaries).

    Tokens are read with pread, not through a memmap: a memmap's touched pages count toward the
    process's resident memory, which would grow to the dataset's size over a long run. The page cache
    still makes repeated reads cheap; resident memory stays flat.
    """

    def __init__(self, paths: list[Path], tokenizer_sha: str | None = None):
        self.sizes = [check_header(p, tokenizer_sha=tokenizer_sha).n_tokens for p in paths]
        self.starts = np.cumsum([0] + self.sizes).tolist()
        self.n_tokens = self.starts[-1]
        self._files = [open(p, "rb") for p in paths]

    def read(self, start: int, count: int) -> np.ndarray:
        out = np.empty(count, dtype=DTYPE)
        i, done = bisect.bisect_right(self.starts, start) - 1, 0
        while done < count:
            local = start + done - self.starts[i]
            n = min(count - done, self.sizes[i] - local)
            got = os.preadv(self._files[i].fileno(), [out[done:done + n].view(np.uint8)], HEADER_SIZE + 2 * local)
            if got != 2 * n:
                raise DataError(f"{self._files[i].name} changed while training (short read); re-run prepare.py.")
            done, i = done + n, i + 1
        return out

    def windows(self, block_size: int) -> int:
        """How many block_size+1 windows, every block_size tokens, fit in the stream."""
        return max(0, (self.n_tokens - 1) // block_size)

    def close(self) -> None:
        for f in self._files:
            f.close()


class ChatStream:
    """The chat shards of one split, read as a list of conversations: `lengths` (tokens of each) and
    `read(i)` -> (ids, mask). The starts are read once (8 bytes a conversation); ids and masks are read
    with pread when asked for, like TokenStream's tokens."""

    def __init__(self, paths: list[Path], tokenizer_sha: str | None = None):
        headers = [check_header(p, tokenizer_sha=tokenizer_sha, chat=True) for p in paths]
        self._files = [open(p, "rb") for p in paths]
        self._n_tokens = [h.n_tokens for h in headers]
        starts, ends = [], []
        for f, h in zip(self._files, headers):
            local = np.frombuffer(_pread(f, HEADER_SIZE + 3 * h.n_tokens, 8 * h.n_conversations), dtype="<u8")
            local = local.astype(np.int64)
            if len(local) and (local[0] != 0 or np.any(np.diff(local) <= 0) or local[-1] >= h.n_tokens):
                self.close()
                raise ShardError(f"{f.name} lists conversation starts that are not ascending within its "
                                 f"{h.n_tokens} tokens: the file is corrupt. Re-run prepare.py with --overwrite.")
            starts.append(local)
            ends.append(np.append(local[1:], h.n_tokens))
        self._shard = np.repeat(np.arange(len(paths)), [h.n_conversations for h in headers])
        self._starts = np.concatenate(starts) if starts else np.zeros(0, np.int64)
        self.lengths = (np.concatenate(ends) - self._starts) if starts else np.zeros(0, np.int64)
        self.n_tokens = int(sum(self._n_tokens))

    def __len__(self) -> int:
        return len(self.lengths)

    def read(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Conversation i's token ids (uint16) and loss mask (uint8)."""
        s, start, n = int(self._shard[i]), int(self._starts[i]), int(self.lengths[i])
        f = self._files[s]
        ids = np.frombuffer(_pread(f, HEADER_SIZE + 2 * start, 2 * n), dtype=DTYPE)
        mask = np.frombuffer(_pread(f, HEADER_SIZE + 2 * self._n_tokens[s] + start, n), dtype=np.uint8)
        return ids, mask

    def close(self) -> None:
        for f in self._files:
            f.close()


def _pread(f, offset: int, size: int) -> bytes:
    data = os.pread(f.fileno(), size, offset)
    if len(data) != size:
        raise DataError(f"{f.name} changed while training (short read); re-run prepare.py.")
    return data


@dataclass(frozen=True)
class Prompt:
    """Token ids to generate after, the ids that end what is generated, and the text to show before it."""

    ids: list[int]
    stop_ids: tuple[int, ...]
    lead: str


class DataDir:
    """A directory prepare.py wrote: the one place that knows its layout.

    Readers (train.py, evaluate, benchmarks) open it and take the tokenizer, the byte table and token
    streams from it; prepare.py writes one through `write_tokenizer` and `write_meta` (meta.json last).
    """

    TOKENIZER, TOKEN_BYTES, META = "tokenizer.model", "token_bytes.npy", "meta.json"

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __str__(self) -> str:
        return str(self.path)

    @cached_property
    def meta(self) -> dict:
        path = self.path / self.META
        if not path.is_file():
            raise DataError(f"{self.path} is not a prepared data directory: it has no meta.json (prepare.py writes "
                            "it last, so an interrupted run leaves none). Run `python prepare.py --dataset sample` "
                            "for data/sample, or point data_dir at the directory prepare.py wrote.")
        try:
            meta = json.loads(path.read_bytes())
        except (OSError, ValueError) as e:  # ValueError: not JSON, or not UTF-8
            meta = f"{type(e).__name__}: {e}"
        if not (isinstance(meta, dict) and isinstance(meta.get("shards"), dict)
                and all(isinstance(meta["shards"].get(s), list) for s in SPLITS)):
            reason = meta if isinstance(meta, str) else "it does not list the shards of each split"
            raise DataError(f"{path} is damaged ({reason}): it is the index of the prepared data, written last "
                            "by prepare.py. Re-run prepare.py with --overwrite to rebuild the directory.")
        return meta

    @cached_property
    def tokenizer(self) -> Tokenizer:
        path = self.path / self.TOKENIZER
        if not path.is_file():
            raise DataError(f"No prepared data in {self.path} (no {self.TOKENIZER}). Prepare it first, e.g. "
                            "`python prepare.py --dataset sample` for data/sample, or point data_dir at the "
                            "directory prepare.py wrote.")
        tokenizer = Tokenizer.load(path)
        if self.tokenizer_sha not in (None, tokenizer.sha256):
            raise DataError(f"{path} is not the tokenizer {self.path} was prepared with (meta.json records "
                            f"{self.tokenizer_sha[:12]}…, the file is {tokenizer.sha256[:12]}…): its ids would "
                            "mean other text. Restore the original file, or re-run prepare.py.")
        return tokenizer

    @property
    def tokenizer_sha(self) -> str | None:
        """The SHA-256 of the tokenizer the shards were encoded with, as meta.json records it."""
        return self.meta.get("tokenizer", {}).get("sha256")

    def shard_paths(self, split: str) -> list[Path]:
        """The shards of one split ("train" or "val"), in order, as listed by meta.json."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
        return [self.path / s["file"] for s in self.meta["shards"][split]]

    def stream(self, split: str) -> TokenStream:
        """One split's tokens, each shard checked against the tokenizer meta.json records; close() it."""
        return TokenStream(self.shard_paths(split), self.tokenizer_sha)

    @property
    def holds_conversations(self) -> bool:
        """Whether prepare.py --chat wrote it: chat shards of whole conversations with their loss mask."""
        return self.meta.get("content") == CONVERSATIONS

    def conversations(self, split: str) -> ChatStream:
        """One split's conversations (a directory prepare.py --chat wrote), checked likewise; close() it."""
        return ChatStream(self.shard_paths(split), self.tokenizer_sha)

    def prompt(self, text: str) -> "Prompt":
        """How generation starts from `text` in the way this data frames text: a document's beginning
        (<s> text, continued until </s>), or a user's turn (answered by the assistant's reply, which ends
        at its <|im_end|>)."""
        from nanokor.generate import encode_prompt  # torch: not for prepare.py, which writes a DataDir

        tokenizer = self.tokenizer
        if self.holds_conversations:
            ids, _ = chat_format.render(tokenizer, [{"role": "user", "content": text}], add_generation_prompt=True)
            return Prompt(ids, chat_format.REPLY_STOP_IDS, f"{text} → ")
        return Prompt(encode_prompt(tokenizer, text), (tokenizer.eos_id,), text)

    def write_tokenizer(self, tokenizer: Tokenizer) -> dict:
        """tokenizer.model and token_bytes.npy (each token's UTF-8 length, for tools outside nanokor);
        returns their entry for meta.json."""
        atomic_write(self.path / self.TOKENIZER, tokenizer.model_bytes)
        atomic_write(self.path / self.TOKEN_BYTES, lambda f: np.save(f, tokenizer.token_bytes))
        return {"file": self.TOKENIZER, "token_bytes": self.TOKEN_BYTES, "sha256": tokenizer.sha256,
                "vocab_size": tokenizer.vocab_size}

    def write_meta(self, meta: dict) -> None:
        atomic_write(self.path / self.META, json.dumps(meta, ensure_ascii=False, indent=2).encode("utf-8"))
        self.__dict__.pop("meta", None)
