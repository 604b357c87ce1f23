import hashlib
import io

import numpy as np
import pytest
import torch

from nanokor.errors import DataError
from nanokor.loader import TrainLoader, ValBatches
from nanokor.shards import DataDir, ShardError, ShardWriter

SHA = hashlib.sha256(b"tokenizer").hexdigest()
T = 8  # block size


def make_data_dir(path, n_train: int, n_val: int = 0, shard_tokens: int = 997):
    """Shards whose token at position i is i, so a window identifies itself by its first token."""
    path.mkdir(parents=True, exist_ok=True)
    listed = {}
    for split, n in (("train", n_train), ("val", n_val)):
        writer = ShardWriter(path, split, shard_tokens=shard_tokens, vocab_size=65535, tokenizer_sha=SHA)
        writer.write(np.arange(n, dtype=np.uint16))
        listed[split] = writer.close()
    DataDir(path).write_meta({"shards": listed, "tokenizer": {"sha256": SHA}})
    return DataDir(path)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    # 3001 tokens, crossing shard boundaries: (3001 - 1) // 8 = 375 windows.
    return make_data_dir(tmp_path_factory.mktemp("loader") / "d", 3001, 2001)


def starts(x: torch.Tensor) -> list[int]:
    return x[:, 0].tolist()


def test_windows_are_the_stream_shifted_by_one(data_dir):
    loader = TrainLoader(data_dir, T, 5)
    for _ in range(3):
        x, y = loader.next_batch()
        assert x.shape == y.shape == (5, T) and x.dtype == y.dtype == torch.int64
        assert x.is_contiguous() and y.is_contiguous()
        for row_x, row_y in zip(x.tolist(), y.tolist()):
            s = row_x[0]
            assert s % T == 0 and row_x == list(range(s, s + T)) and row_y == list(range(s + 1, s + T + 1))


def test_each_epoch_is_a_seeded_permutation_and_rollover_is_deterministic(data_dir):
    loader = TrainLoader(data_dir, T, 7, seed=3)
    n = loader.n_windows
    assert n == 375
    stream = [s for _ in range(2 * n // 7 + 2) for s in starts(loader.next_batch()[0])]
    reference = [int(k) * T for e in range(3) for k in np.random.default_rng([3, e]).permutation(n)]
    assert stream == reference[:len(stream)]
    assert sorted(stream[:n]) == list(range(0, n * T, T)) == sorted(stream[n:2 * n])
    assert stream[:n] != stream[n:2 * n]
    other_seed = TrainLoader(data_dir, T, 7, seed=4)
    assert starts(other_seed.next_batch()[0]) != stream[:7]


def test_ranks_are_disjoint_slices_of_one_global_batch(data_dir):
    world, b = 3, 2
    ranks = [TrainLoader(data_dir, T, b, rank=r, world_size=world, seed=1) for r in range(world)]
    single = TrainLoader(data_dir, T, b * world, seed=1)
    seen = []
    for _ in range(70):  # past an epoch boundary (375 windows / 6 per call)
        parts = [loader.next_batch() for loader in ranks]
        x, y = single.next_batch()
        assert torch.equal(torch.cat([p[0] for p in parts]), x) and torch.equal(torch.cat([p[1] for p in parts]), y)
        seen.append([starts(p[0]) for p in parts])
    first_epoch = [s for call in seen[:62] for rank in call for s in rank]
    assert len(set(first_epoch)) == len(first_epoch)


def test_small_batches_see_the_same_windows_as_one_large_batch(data_dir):
    small, large = TrainLoader(data_dir, T, 2, seed=5), TrainLoader(data_dir, T, 8, seed=5)
    for _ in range(50):
        x = torch.cat([small.next_batch()[0] for _ in range(4)])
        assert torch.equal(x, large.next_batch()[0])


def test_resume_is_exact(data_dir):
    loader = TrainLoader(data_dir, T, 4, rank=1, world_size=2, seed=7)
    for _ in range(60):
        loader.next_batch()
    buf = io.BytesIO()
    torch.save(loader.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    expected = [loader.next_batch() for _ in range(80)]  # crosses into the next epoch
    resumed = TrainLoader(data_dir, T, 4, rank=1, world_size=2, seed=7)
    resumed.load_state_dict(state)
    for x, y in expected:
        x2, y2 = resumed.next_batch()
        assert torch.equal(x, x2) and torch.equal(y, y2)
    assert resumed.state_dict() == loader.state_dict()
    with pytest.raises(ValueError, match="block_size"):
        TrainLoader(data_dir, T * 2, 4, seed=7).load_state_dict(state)


def test_val_batches_are_sequential_rank_disjoint_and_budgeted(data_dir):
    all_windows = [starts(x) for x, _ in ValBatches(data_dir, T, 4, None)]
    assert sum(all_windows, []) == list(range(0, 2000 // T // 4 * 4 * T, T))
    per_rank = [list(ValBatches(data_dir, T, 2, 10 * 4 * T, rank=r, world_size=2)) for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) == 10
    for step, ((x0, y0), (x1, y1)) in enumerate(zip(*per_rank)):
        assert starts(torch.cat([x0, x1])) == all_windows[step]
        assert torch.equal(y0, x0 + 1)
    with pytest.raises(DataError, match="validation split"):
        ValBatches(data_dir, T, 300, None)


def test_wrong_tokenizer_and_too_little_data_are_refused(data_dir, tmp_path):
    other = DataDir(tmp_path / "other")  # the same shards, listed under another tokenizer
    other.write_meta({**data_dir.meta, "tokenizer": {"sha256": hashlib.sha256(b"other").hexdigest()}})
    for shard in data_dir.path.glob("*.bin"):
        (other.path / shard.name).symlink_to(shard)
    with pytest.raises(ShardError, match="tokenizer"):
        TrainLoader(other, T, 2)
    with pytest.raises(DataError, match="fewer than one global batch"):
        TrainLoader(data_dir, 1024, 3)
    with pytest.raises(DataError, match="no meta.json"):
        TrainLoader(DataDir(tmp_path / "empty"), T, 2)


def test_sample_data_dir_feeds_the_loader(sample_data_dir):
    data = DataDir(sample_data_dir)
    tok = data.tokenizer
    loader = TrainLoader(data, 64, 4)
    x, y = loader.next_batch()
    assert int(x.max()) < tok.vocab_size and torch.equal(x[:, 1:], y[:, :-1])
    assert len(list(ValBatches(data, 64, 4, 4 * 64 * 2))) == 2


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_memory_stays_flat_over_a_full_pass(tmp_path):
    # 80 MB of tokens, read once in full: a memmap-based loader would map most of it into this process.
    n = 40_000_000
    data_dir = tmp_path / "big"
    data_dir.mkdir()
    writer = ShardWriter(data_dir, "train", shard_tokens=n, vocab_size=65535, tokenizer_sha=SHA)
    writer.write(np.zeros(n, dtype=np.uint16))
    DataDir(data_dir).write_meta({"shards": {"train": writer.close(), "val": []}})
    loader = TrainLoader(DataDir(data_dir), 2048, 64)
    before = _rss_bytes()
    for _ in range(loader.n_windows // 64):
        loader.next_batch()
    assert loader.epoch > 0.99
    assert _rss_bytes() - before < 30e6
