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

On CUDA, batches are staged in pinned memory and copied with non_blocking=True, so the copy
overlaps the previous step's compute. Both loaders hold their shard files open; close() them.
"""

import numpy as np
import torch

from nanokor.errors import DataError
from nanokor.shards import DataDir


def _to_device(windows: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T+1) uint16 windows -> contiguous int64 x, y of shape (B, T) on `device`."""
    b, t = windows.shape[0], windows.shape[1] - 1
    pinned = device.type == "cuda"
    host = torch.empty((2, b, t), dtype=torch.int64, pin_memory=pinned)
    view = host.numpy()
    view[0], view[1] = windows[:, :-1], windows[:, 1:]
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

    def __iter__(self):
        t = self.block_size
        for step in range(self.steps):
            first = step * self.per_step + self.rank * self.batch_size
            windows = np.stack([self.tokens.read(k * t, t + 1) for k in range(first, first + self.batch_size)])
            yield _to_device(windows, self.device)

    def close(self) -> None:
        self.tokens.close()
