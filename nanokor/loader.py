"""Batches of (x, y) windows over the token shards, for training and for validation.

The train split is read as one stream of tokens (all train shards, in order) cut into windows of
block_size + 1 tokens that start every block_size tokens: window k is tokens [k*T, k*T + T + 1),
x is its first T tokens and y its last T. Every target token is predicted exactly once per epoch.

Ordering, which the training tests rely on:
  - The *global* stream of windows is one seeded permutation of all windows per epoch (epoch e uses
    `default_rng([seed, e]).permutation(n_windows)`); epoch e+1 follows epoch e, so the stream is
    infinite and deterministic.
  - Each `next_batch` call consumes the next `batch_size * world_size` windows of that stream, and
    rank r takes the contiguous sub-block `[r*batch_size, (r+1)*batch_size)` of them.
  Hence ranks are disjoint; one process with batch_size B*W sees exactly the concatenation of what
  W ranks with batch_size B see at the same call; 4 calls with batch 2 see the same windows as 1 call
  with batch 8; and the whole state is one integer, the number of windows consumed so far.

Conversations (a directory prepare.py --chat wrote) come as rows instead of windows: whole
conversations packed into rows of block_size + 1 tokens (`pack`), none ever cut across rows, the rest of
a row padded. x is a row's first T tokens, y its last T where the loss mask trains them (assistant
content and its <|im_end|>) and -1 elsewhere, so the loss and validation see assistant tokens only.
`ChatLoader` orders them as TrainLoader orders windows: a seeded permutation of the conversations per
epoch, packed in that order, each call taking the next batch_size * world_size rows of that stream and
rank r its sub-block r; its state is (epoch, row). `open_loaders` picks the pair for what a directory
holds, so the training loop never asks.

On CUDA, batches are staged in pinned memory and copied with non_blocking=True, so the copy
overlaps the previous step's compute. All loaders hold their shard files open; close() them.
"""

import numpy as np
import torch

from nanokor.errors import DataError
from nanokor.shards import ChatStream, DataDir, fits_context
from nanokor.tokenizer import PAD_ID


def open_loaders(data: DataDir, block_size: int, batch_size: int, eval_tokens: int | None, *, rank: int = 0,
                 world_size: int = 1, seed: int = 0, device: str | torch.device = "cpu"):
    """(training loader, validation batches) for what `data` holds: windows over a token stream, or
    whole conversations packed into rows. Both are checked now, before any training step."""
    train_cls, val_cls = (ChatLoader, ChatValBatches) if data.holds_conversations else (TrainLoader, ValBatches)
    loader = train_cls(data, block_size, batch_size, rank=rank, world_size=world_size, seed=seed, device=device)
    try:
        val = val_cls(data, block_size, batch_size, eval_tokens, rank=rank, world_size=world_size, device=device)
    except BaseException:
        loader.close()
        raise
    return loader, val


def _to_device(windows: np.ndarray, device: torch.device, targets: np.ndarray | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T+1) uint16 windows -> contiguous int64 x, y of shape (B, T) on `device`; `targets` (B, T),
    if given, is y instead of the windows shifted by one."""
    b, t = windows.shape[0], windows.shape[1] - 1
    pinned = device.type == "cuda"
    host = torch.empty((2, b, t), dtype=torch.int64, pin_memory=pinned)
    view = host.numpy()
    view[0], view[1] = windows[:, :-1], windows[:, 1:] if targets is None else targets
    if device.type != "cpu":
        host = host.to(device, non_blocking=pinned)
    return host[0], host[1]


class TrainLoader:
    """Training batches: see the module docstring for the ordering guarantees."""

    def __init__(self, data: DataDir, block_size: int, batch_size: int, *, rank: int = 0, world_size: int = 1,
                 seed: int = 0, device: str | torch.device = "cpu"):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.block_size, self.batch_size = block_size, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.device = torch.device(device)
        self.tokens = data.stream("train")
        self.n_windows = self.tokens.windows(block_size)
        if self.n_windows < batch_size * world_size:
            self.close()
            raise DataError(f"{data} has {self.tokens.n_tokens:,} training tokens: fewer than one global batch "
                            f"of {batch_size} x {world_size} windows of {block_size}+1 tokens. Use a smaller "
                            "block_size or batch_size, or prepare more data.")
        self.position = 0  # windows of the global stream consumed so far
        self._perm_epoch, self._perm = -1, None
        self.summary = (f"train: {self.tokens.n_tokens:,} tokens, {self.n_windows:,} windows of {block_size}+1 "
                        "tokens per epoch")

    @property
    def epoch(self) -> float:
        """Epochs completed, fractional: for logging."""
        return self.position / self.n_windows

    def _window(self, g: int) -> int:
        epoch, i = divmod(g, self.n_windows)
        if epoch != self._perm_epoch:  # the stream only moves forward, so one cached epoch suffices
            self._perm_epoch = epoch
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)
        return int(self._perm[i])

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        first = self.position + self.rank * self.batch_size
        self.position += self.batch_size * self.world_size
        t = self.block_size
        windows = np.stack([self.tokens.read(self._window(g) * t, t + 1)
                            for g in range(first, first + self.batch_size)])
        return _to_device(windows, self.device)

    def state_dict(self) -> dict:
        return {"position": self.position, "seed": self.seed, "block_size": self.block_size,
                "n_windows": self.n_windows}

    def load_state_dict(self, state: dict) -> None:
        """Resume exactly where `state` was taken. Refuses a state from different data or settings,
        which would silently give a different stream."""
        mine = self.state_dict()
        for key in ("seed", "block_size", "n_windows"):
            if state[key] != mine[key]:
                raise ValueError(f"loader state has {key}={state[key]} but this loader has {key}={mine[key]}; "
                                 "resuming would not continue the same batch sequence.")
        self.position = int(state["position"])

    def close(self) -> None:
        self.tokens.close()


class ValBatches:
    """Validation batches, in order from the start of the val split, covering at most `max_tokens`
    target tokens (None: the whole split); iterate it once per evaluation. Windows are laid out like
    training's (stride block_size) and dealt like training's (rank r takes sub-block r of each global
    batch), so every rank yields the same number of batches and together they cover the same tokens
    whatever the world size. Built once per run: the split is opened and checked here, not at every
    evaluation."""

    def __init__(self, data: DataDir, block_size: int, batch_size: int, max_tokens: int | None, *,
                 rank: int = 0, world_size: int = 1, device: str | torch.device = "cpu"):
        self.tokens = data.stream("val")
        self.block_size, self.batch_size, self.rank = block_size, batch_size, rank
        self.per_step = batch_size * world_size
        windows = self.tokens.windows(block_size)
        budget = windows if max_tokens is None else min(windows, max_tokens // block_size)
        self.steps = budget // self.per_step
        self.device = torch.device(device)
        if self.steps == 0:
            self.close()
            raise DataError(f"The validation split of {data} ({self.tokens.n_tokens:,} tokens) or the budget "
                            f"({max_tokens} tokens) is smaller than one global batch of {batch_size} x "
                            f"{world_size} windows of {block_size}+1 tokens. Use a smaller batch/block, a larger "
                            "budget, or prepare with a larger --val-fraction.")
        self.summary = f"val: {self.steps * self.per_step * block_size:,} tokens per evaluation"

    def __iter__(self):
        t = self.block_size
        for step in range(self.steps):
            first = step * self.per_step + self.rank * self.batch_size
            windows = np.stack([self.tokens.read(k * t, t + 1) for k in range(first, first + self.batch_size)])
            yield _to_device(windows, self.device)

    def close(self) -> None:
        self.tokens.close()


# ---- conversations ----------------------------------------------------------------------------

OPEN_ROWS = 8  # rows `pack` keeps open for a conversation to fit into: more fill rows better, cost time


def pack(lengths: np.ndarray, order: np.ndarray, capacity: int) -> list[list[int]]:
    """Conversations (indices into `lengths`, taken in `order`) packed whole into rows of at most
    `capacity` tokens: each goes into the first of the last OPEN_ROWS rows with room, or starts a new
    row; a row leaves the window, finished, when an eighth newer one opens. Rows come out in the order
    they finish: deterministic, and close to the order given."""
    rows, room, done = [], [], []
    for i in order.tolist():
        n = int(lengths[i])
        for r, free in enumerate(room):
            if n <= free:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(capacity - n)
            if len(rows) > OPEN_ROWS:
                done.append(rows.pop(0))
                room.pop(0)
    return done + rows


def _read_rows(conversations: ChatStream, rows: list[list[int]], block_size: int, device: torch.device):
    """Rows of whole conversations -> x, y of shape (len(rows), block_size): inputs padded with <pad>,
    targets the next token where the loss mask trains it, else -1 (padding included)."""
    tokens = np.full((len(rows), block_size + 1), PAD_ID, dtype=np.uint16)
    trained = np.zeros((len(rows), block_size + 1), dtype=bool)
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            ids, mask = conversations.read(i)
            tokens[r, at:at + len(ids)], trained[r, at:at + len(ids)] = ids, mask
            at += len(ids)
    targets = np.where(trained[:, 1:], tokens[:, 1:].astype(np.int64), -1)
    return _to_device(tokens, device, targets)


class _Conversations:
    """One split's conversations, the ones longer than a row left out (and counted)."""

    def __init__(self, data: DataDir, split: str, block_size: int):
        self.stream = data.conversations(split)
        lengths = self.stream.lengths
        fits = fits_context(lengths, block_size)
        self.kept = np.flatnonzero(fits)
        self.too_long = int(len(lengths) - len(self.kept))
        self.lengths = lengths
        if not len(lengths):
            self.stream.close()
            fix = ("with a --val-fraction above 0 or with --val-files" if split == "val" else
                   "from a source with conversations")
            raise DataError(f"{data} holds no {split} conversations. Prepare it again {fix} (prepare.py --chat).")
        if not len(self.kept):
            self.stream.close()
            raise DataError(f"No {split} conversation of {data} fits block_size {block_size}: all "
                            f"{len(lengths):,} are longer than {block_size}+1 tokens. Raise block_size, or prepare "
                            "conversations that fit (prepare.py --chat --context).")

    def describe(self, split: str, rows: list[list[int]], block_size: int) -> str:
        """What a split's rows hold, for the run's log."""
        n = sum(map(len, rows))
        tokens = int(sum(self.lengths[i] for row in rows for i in row))
        text = (f"{split}: {n:,} conversations ({tokens:,} tokens) packed into {len(rows):,} rows of "
                f"{block_size}+1 tokens ({1 - tokens / (len(rows) * (block_size + 1)):.0%} padding)")
        if self.too_long:
            text += (f"; {self.too_long:,} conversation(s) longer than {block_size}+1 tokens left out (prepare with "
                     f"--context {block_size} to count them there, or raise block_size)")
        return text


class ChatLoader:
    """Training batches of whole conversations: see the module docstring for the ordering guarantees."""

    def __init__(self, data: DataDir, block_size: int, batch_size: int, *, rank: int = 0, world_size: int = 1,
                 seed: int = 0, device: str | torch.device = "cpu"):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.block_size, self.batch_size = block_size, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.device = torch.device(device)
        self.conversations = _Conversations(data, "train", block_size)
        self.epoch_rows, self.row = 0, 0  # the stream's position: epoch, and rows of it consumed
        self._rows_epoch, self._rows = -1, []
        rows = len(self._epoch(0))  # later epochs pack their own order, into about as many rows
        if rows < batch_size * world_size:
            self.close()
            raise DataError(f"{data} packs its {len(self.conversations.kept):,} training conversations into {rows} "
                            f"rows of {block_size}+1 tokens: fewer than one global batch of {batch_size} x "
                            f"{world_size}. Use a smaller batch_size or block_size, or prepare more conversations.")
        self.summary = self.conversations.describe("train", self._epoch(0), block_size)

    @property
    def n_conversations(self) -> int:
        return len(self.conversations.kept)

    @property
    def epoch(self) -> float:
        """Epochs completed, fractional: for logging."""
        return self.epoch_rows + self.row / len(self._epoch(self.epoch_rows))

    def _epoch(self, epoch: int) -> list[list[int]]:
        """The rows of one epoch: its seeded permutation of the conversations, packed in that order."""
        if epoch != self._rows_epoch:  # the stream only moves forward, so one cached epoch suffices
            kept = self.conversations.kept
            order = kept[np.random.default_rng([self.seed, epoch]).permutation(len(kept))]
            self._rows_epoch, self._rows = epoch, pack(self.conversations.lengths, order, self.block_size + 1)
        return self._rows

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows = []
        for k in range(self.batch_size * self.world_size):  # every rank walks the whole global batch
            if k // self.batch_size == self.rank:
                rows.append(self._epoch(self.epoch_rows)[self.row])
            self.row += 1
            if self.row == len(self._epoch(self.epoch_rows)):
                self.epoch_rows, self.row = self.epoch_rows + 1, 0
        return _read_rows(self.conversations.stream, rows, self.block_size, self.device)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch_rows, "row": self.row, "seed": self.seed, "block_size": self.block_size,
                "n_conversations": self.n_conversations}

    def load_state_dict(self, state: dict) -> None:
        """Resume exactly where `state` was taken; refuses a state from other data or settings."""
        mine = self.state_dict()
        for key in ("seed", "block_size", "n_conversations"):
            if state.get(key) != mine[key]:
                raise ValueError(f"loader state has {key}={state.get(key)} but this loader has {key}={mine[key]}; "
                                 "resuming would not continue the same batch sequence.")
        self.epoch_rows, self.row = int(state["epoch"]), int(state["row"])

    def close(self) -> None:
        self.conversations.stream.close()


class ChatValBatches:
    """Validation batches of whole conversations, in stored order, packed like training's: at most
    `max_tokens` // block_size rows (None: all), dealt like ValBatches. The last global batch is filled
    with empty rows (all targets -1), so every rank yields the same number of batches and a split
    smaller than one batch still scores. Only assistant tokens are targets."""

    def __init__(self, data: DataDir, block_size: int, batch_size: int, max_tokens: int | None, *,
                 rank: int = 0, world_size: int = 1, device: str | torch.device = "cpu"):
        self.conversations = _Conversations(data, "val", block_size)
        self.block_size, self.batch_size, self.rank = block_size, batch_size, rank
        self.per_step = batch_size * world_size
        rows = pack(self.conversations.lengths, self.conversations.kept, block_size + 1)
        budget = len(rows) if max_tokens is None else max(1, min(len(rows), max_tokens // block_size))
        self.rows = rows[:budget]
        self.steps = -(-len(self.rows) // self.per_step)
        self.device = torch.device(device)
        self.summary = self.conversations.describe("val", self.rows, block_size)

    def __iter__(self):
        for step in range(self.steps):
            first = step * self.per_step + self.rank * self.batch_size
            rows = self.rows[first:first + self.batch_size]
            yield _read_rows(self.conversations.stream, rows + [[]] * (self.batch_size - len(rows)), self.block_size,
                             self.device)

    def close(self) -> None:
        self.conversations.stream.close()
