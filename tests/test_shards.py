import hashlib
import os
import shutil
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanokor import corpus, encode, shards
from nanokor.corpus import Documents, open_corpus
from nanokor.encode import doc_key, encode_to_shards, split_of
from nanokor.errors import DataError
from nanokor.shards import HEADER_SIZE, DataDir, ShardError, ShardWriter, read_header, read_shard
from nanokor.tokenizer import Tokenizer

SHA = hashlib.sha256(b"some tokenizer").hexdigest()


def _write(tmp_path, tokens, shard_tokens=1000, split="train"):
    writer = ShardWriter(tmp_path, split, shard_tokens=shard_tokens, vocab_size=5000, tokenizer_sha=SHA)
    for chunk in np.array_split(tokens, 7):
        writer.write(chunk)
    return writer.close()


def test_writer_cuts_shards_and_reader_returns_the_tokens(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 5000, 2500).astype(np.uint16)
    listed = _write(tmp_path, tokens)
    assert listed == [{"file": "train_000000.bin", "tokens": 1000}, {"file": "train_000001.bin", "tokens": 1000},
                      {"file": "train_000002.bin", "tokens": 500}]
    back = np.concatenate([read_shard(tmp_path / s["file"], tokenizer_sha=SHA, vocab_size=5000) for s in listed])
    np.testing.assert_array_equal(back, tokens)
    h = read_header(tmp_path / "train_000002.bin")
    assert (h.version, h.vocab_size, h.n_tokens, h.tokenizer_sha) == (1, 5000, 500, SHA)
    assert (tmp_path / "train_000002.bin").stat().st_size == HEADER_SIZE + 2 * 500
    assert not list(tmp_path.glob(".*.tmp-*"))


def test_reader_refuses_another_tokenizer_or_vocab(tmp_path):
    path = tmp_path / _write(tmp_path, np.arange(10, dtype=np.uint16))[0]["file"]
    with pytest.raises(ShardError, match="tokenizer"):
        read_shard(path, tokenizer_sha=hashlib.sha256(b"another").hexdigest())
    with pytest.raises(ShardError, match="vocab size 5000"):
        read_shard(path, vocab_size=32000)


def test_reader_refuses_truncated_and_foreign_files(tmp_path):
    path = tmp_path / _write(tmp_path, np.arange(100, dtype=np.uint16))[0]["file"]
    data = path.read_bytes()
    path.write_bytes(data[:-2])
    with pytest.raises(ShardError, match="truncated"):
        read_shard(path)
    path.write_bytes(data + b"\0\0")
    with pytest.raises(ShardError, match="truncated"):
        read_shard(path)
    path.write_bytes(b"GPT2BIN\0" + data[8:])
    with pytest.raises(ShardError, match="magic"):
        read_shard(path)
    path.write_bytes(b"short")
    with pytest.raises(ShardError, match="magic"):
        read_shard(path)
    path.write_bytes(data[:8] + (99).to_bytes(4, "little") + data[12:])
    with pytest.raises(ShardError, match="version 99"):
        read_shard(path)


def test_crash_before_rename_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    def crash(src, dst):
        raise KeyboardInterrupt("killed between writing and renaming")

    monkeypatch.setattr(shards.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        _write(tmp_path, np.arange(2500, dtype=np.uint16))
    assert list(tmp_path.iterdir()) == []  # the interrupted shard's temporary file is removed too
    with pytest.raises(KeyboardInterrupt):
        DataDir(tmp_path).write_meta({"shards": {"train": [], "val": []}})
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(DataError, match="no meta.json"):
        DataDir(tmp_path).shard_paths("train")


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "meta.json").write_text('{"shards": {"train": ['), "meta.json is damaged .*JSONDecodeError"),
    (lambda d: (d / "meta.json").write_bytes(b'{"a": "\xea"}'), "meta.json is damaged .*UnicodeDecodeError"),
    (lambda d: (d / "meta.json").write_text("[1, 2]"), "meta.json is damaged .*does not list the shards"),
    (lambda d: (d / "val_000000.bin").unlink(), "Cannot read the shard .*val_000000.bin"),
    (lambda d: (d / "tokenizer.model").write_bytes((d / "tokenizer.model").read_bytes()[:5000]),
     "tokenizer.model: Not a SentencePiece model .*re-run prepare.py"),
])
def test_a_damaged_data_directory_is_named_not_a_traceback(damage, message, sample_data_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(sample_data_dir, data)
    damage(data)
    with pytest.raises(DataError, match=message):  # each was a traceback (JSONDecodeError, KeyError, ...)
        d = DataDir(data)
        d.stream("train").close(), d.stream("val").close(), d.tokenizer


def test_split_is_by_content_deterministic_and_near_the_fraction():
    keys = [doc_key(f"문서 번호 {i}".encode()) for i in range(20000)]
    splits = [split_of(k, 0.02) for k in keys]
    assert 0.015 < splits.count("val") / len(splits) < 0.025
    assert splits == [split_of(doc_key(f"문서 번호 {i}".encode()), 0.02) for i in range(20000)]
    assert all(split_of(k, 0.0) == "train" for k in keys)
    # A larger fraction only moves documents into val, never out of it.
    assert all(split_of(k, 0.05) == "val" for k, s in zip(keys, splits) if s == "val")


def _framed_docs(data_dir, split, tok):
    tokens = np.concatenate([read_shard(p) for p in DataDir(data_dir).shard_paths(split)] or [np.zeros(0, np.uint16)])
    assert tokens.size == 0 or (tokens[0] == tok.bos_id and tokens[-1] == tok.eos_id)
    docs, start = [], None
    for i, t in enumerate(tokens.tolist()):
        if t == tok.bos_id:
            start = i + 1
        elif t == tok.eos_id:
            docs.append(tok.decode(tokens[start:i]))
    return docs


def test_encoder_cleans_dedups_splits_and_is_the_same_in_parallel(sample_data_dir, tmp_path):
    tok = Tokenizer.load(sample_data_dir / "tokenizer.model")
    base = [f"{i}번째 문서입니다. 한국어 문장이 이어집니다." for i in range(400)]
    raw = base + ["", "  \n ", base[3], "\u1112\u1161\u11ab\u1100\u1173\u11af"] + base[:50]
    results = {}
    for num_proc in (1, 2):
        out = tmp_path / f"p{num_proc}"
        out.mkdir()
        tasks = [Documents(raw[i:i + 20]) for i in range(0, len(raw), 20)]
        r = encode_to_shards(tasks, tok, out, val_fraction=0.1, shard_tokens=3000, num_proc=num_proc)
        DataDir(out).write_meta(r)
        results[num_proc] = r
    assert results[1] == results[2]
    for name in ("train_000000.bin", "train_000001.bin", "val_000000.bin"):
        assert (tmp_path / "p1" / name).read_bytes() == (tmp_path / "p2" / name).read_bytes()
    r = results[1]
    assert r["cleaning"] == {"empty": 2, "duplicates": 51, "nfc_changed": 1}
    train, val = _framed_docs(tmp_path / "p1", "train", tok), _framed_docs(tmp_path / "p1", "val", tok)
    assert Counter(train + val) == Counter(base + ["한글"])
    assert not set(train) & set(val)
    assert val == [d for d in base + ["한글"] if split_of(doc_key(d.encode()), 0.1) == "val"]
    assert r["splits"]["val"]["documents"] == len(val) and r["splits"]["train"]["documents"] == len(train)
    assert r["splits"]["train"]["tokens"] == sum(s["tokens"] for s in r["shards"]["train"])
    assert r["splits"]["val"]["bytes"] == sum(len(d.encode()) for d in val)
    assert r["splits"]["train"]["hangul"] == sum(sum("가" <= c <= "힣" for c in d) for d in train)
    assert [s["tokens"] for s in r["shards"]["train"]][:-1] == [3000] * (len(r["shards"]["train"]) - 1)
    assert os.path.getsize(tmp_path / "p1" / "train_000000.bin") == HEADER_SIZE + 2 * 3000


def test_parts_read_in_workers_give_the_shards_of_documents_read_here(sample_data_dir, tmp_path, monkeypatch):
    tok = Tokenizer.load(sample_data_dir / "tokenizer.model")
    docs = [f"{i}번째 문서: 한국어 문장이 이어집니다." * (1 + i % 5) for i in range(300)]
    src = tmp_path / "src"
    src.mkdir()
    pq.write_table(pa.table({"text": docs[:120] + [docs[7], ""]}), src / "a.parquet", row_group_size=50)
    pq.write_table(pa.table({"text": docs[120:200] + docs[:30]}), src / "b.parquet", row_group_size=25)
    (src / "c.txt").write_bytes("\n\n".join(docs[200:] + docs[150:160]).encode() + b"\n\n\xff \xea\xb0\x80")
    c = open_corpus(data_files=[str(src / "*")])
    monkeypatch.setattr(corpus, "PART_BYTES", 2000)  # many parts, duplicates in other parts and files
    results = {}
    for name, tasks, num_proc in [("here", (Documents(list(c.documents())),), 1), ("workers", c.tasks(), 2),
                                  ("one process", c.tasks(), 1), ("sentencepiece without numpy", c.tasks(), 1)]:
        monkeypatch.setattr(encode, "_NUMPY_IDS", not name.endswith("without numpy"))
        (tmp_path / name).mkdir()
        r = encode_to_shards(tasks, tok, tmp_path / name, val_fraction=0.1, shard_tokens=5000, num_proc=num_proc)
        r["cleaning"] = dict(Counter(r["cleaning"]) + c.counts)
        results[name] = r
    assert all(r == results["here"] for r in results.values())
    assert results["here"]["cleaning"] == {"duplicates": 41, "empty": 1, "invalid_utf8_docs": 1}
    for shard in results["here"]["shards"]["train"] + results["here"]["shards"]["val"]:
        assert len({(tmp_path / name / shard["file"]).read_bytes() for name in results}) == 1
