import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import unicodedata
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanokor import shards
from nanokor.corpus import HF_DATASET, HF_DATASET_SUBSETS, SAMPLE_DIR, DataError
from nanokor.loader import TrainLoader
from nanokor.prepare import warn_duplicate_subsets
from nanokor.shards import DataDir, read_shard
from nanokor.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("prepare", REPO / "prepare.py")
prepare = importlib.util.module_from_spec(spec)
spec.loader.exec_module(prepare)


def cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, str(REPO / "prepare.py"), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def decoded_documents(data_dir: Path, split: str) -> list[str]:
    """Split a split's token stream on the <s> … </s> framing and decode each document."""
    tok = Tokenizer.load(data_dir / "tokenizer.model")
    tokens = np.concatenate([read_shard(p, tokenizer_sha=tok.sha256) for p in DataDir(data_dir).shard_paths(split)])
    bos, eos = np.flatnonzero(tokens == tok.bos_id), np.flatnonzero(tokens == tok.eos_id)
    assert len(bos) == len(eos) and np.all(bos < eos) and np.all(eos[:-1] < bos[1:])
    assert bos[0] == 0 and eos[-1] == len(tokens) - 1
    return [tok.decode(tokens[b + 1:e]) for b, e in zip(bos, eos)]


def test_sample_shards_decode_back_to_the_sample_text(sample_data_dir):
    expected = Counter(d.strip("\n") for p in sorted(SAMPLE_DIR.glob("*.txt"))
                       for d in p.read_text(encoding="utf-8").split("\n\n") if d.strip())
    train, val = decoded_documents(sample_data_dir, "train"), decoded_documents(sample_data_dir, "val")
    assert Counter(train + val) == Counter(set(expected))  # every distinct document once
    assert not set(train) & set(val) and len(val) > 0


def test_sample_meta_counts_agree_with_the_shards(sample_data_dir):
    meta = DataDir(sample_data_dir).meta
    model = (sample_data_dir / "tokenizer.model").read_bytes()
    assert meta["tokenizer"]["sha256"] == hashlib.sha256(model).hexdigest()
    assert meta["tokenizer"]["vocab_size"] == Tokenizer(model).vocab_size < 32000
    assert meta["command"].startswith("python prepare.py --dataset sample")
    assert meta["corpus"]["source"] == "sample" and meta["val_fraction"] == 0.1
    for split in ("train", "val"):
        docs = decoded_documents(sample_data_dir, split)
        s = meta["splits"][split]
        assert s["documents"] == len(docs)
        assert s["bytes"] == sum(len(d.encode()) for d in docs)
        assert s["characters"] == sum(map(len, docs))
        assert s["tokens"] == sum(read_shard(p).size for p in DataDir(sample_data_dir).shard_paths(split))
    val = meta["splits"]["val"]
    c = meta["compression"]
    assert c["split"] == "val"
    assert c["bytes_per_token"] == pytest.approx(val["bytes"] / (val["tokens"] - 2 * val["documents"]))
    assert c["hangul_per_token"] == pytest.approx(val["hangul"] / (val["tokens"] - 2 * val["documents"]))


def _mixed_files(root: Path) -> list[str]:
    root.mkdir()
    docs = [f"{i}번 문서: 한국어 텍스트와 English, 숫자 {i * 37}." for i in range(300)]
    pq.write_table(pa.table({"text": docs[:150] + [docs[0], ""]}), root / "part1.parquet")
    with open(root / "part2.jsonl", "w", encoding="utf-8") as f:
        for d in docs[150:250]:
            f.write(json.dumps({"text": d}, ensure_ascii=False) + "\n")
        f.write(json.dumps({"text": unicodedata.normalize("NFD", "분해된 한글 문서")}, ensure_ascii=False) + "\n")
    txt = "\n\n".join(docs[250:]).encode() + b"\n\n\xff\xfe \xec\xa0\x9c\xec\x96\xb4\x01 \xeb\xac\xb8\xec\x9e\xa5\n"
    (root / "part3.txt").write_bytes(txt)
    return docs + ["분해된 한글 문서", "\ufffd\ufffd 제어 문장"]


def test_local_files_end_to_end_and_split_stability(tmp_path):
    expected = _mixed_files(tmp_path / "corpus")
    out = tmp_path / "out"
    proc = cli("--data-files", tmp_path / "corpus/*.parquet", tmp_path / "corpus/*.jsonl", tmp_path / "corpus/*.txt",
               "--out", out, "--val-fraction", "0.2", "--vocab-size", "320", "--num-proc", "2")
    assert proc.returncode == 0, proc.stderr
    meta = DataDir(out).meta
    assert meta["cleaning"] == {"duplicates": 1, "empty": 1, "nfc_changed": 1, "control_chars_stripped": 1,
                                "invalid_utf8_docs": 1}
    train, val = decoded_documents(out, "train"), decoded_documents(out, "val")
    assert Counter(train + val) == Counter(expected) and not set(train) & set(val)
    assert 0.1 < len(val) / len(expected) < 0.3
    # Same documents read in another order, another file layout: every document keeps its split.
    (tmp_path / "again").mkdir()
    (tmp_path / "again/all.txt").write_text("\n\n".join(reversed(train + val)), encoding="utf-8")
    again = tmp_path / "out2"
    assert cli("--data-files", tmp_path / "again/all.txt", "--out", again, "--val-fraction", "0.2",
               "--tokenizer", out / "tokenizer.model").returncode == 0
    assert set(decoded_documents(again, "val")) == set(val)
    assert DataDir(again).meta["tokenizer"]["sha256"] == meta["tokenizer"]["sha256"]


def test_existing_output_is_refused_without_overwrite(sample_data_dir, tmp_path):
    out = tmp_path / "copy"
    args = ["--data-files", SAMPLE_DIR / "history.txt", "--out", out, "--tokenizer",
            sample_data_dir / "tokenizer.model", "--num-proc", "1"]
    assert cli(*args).returncode == 0
    proc = cli(*args)
    assert proc.returncode == 2 and "--overwrite" in proc.stderr and "Traceback" not in proc.stderr
    assert cli(*args, "--overwrite").returncode == 0
    assert (out / "meta.json").is_file() and not (tmp_path / "copy.old").exists()
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious/notes.txt").write_text("mine")
    proc = cli(*args[:3], "--out", tmp_path / "precious", "--overwrite")
    assert proc.returncode == 2 and (tmp_path / "precious/notes.txt").exists()


@pytest.mark.parametrize("args, words", [
    (["--data-files", "no/such/*.parquet"], "matches no files"),
    (["--dataset", "sample", "--vocab-size", "60000"], "--vocab-size"),
    (["--dataset", "sample", "--vocab-size", "300"], "or more"),
    (["--dataset", "sample", "--tokenizer", "missing.model"], "Cannot read the tokenizer missing.model"),
    (["--dataset", "sample", "--tokenizer", "README.md"], "SentencePiece"),
    (["--dataset", "no-such-dir"], "neither 'sample'"),
])
def test_bad_input_is_one_clear_paragraph(args, words, tmp_path):
    proc = cli(*args, "--out", tmp_path / "out")
    assert proc.returncode == 2 and words in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_killed_run_leaves_no_complete_looking_output(sample_data_dir, tmp_path, monkeypatch):
    renames = []

    def crash_on_second_rename(src, dst):  # of a shard: the tokenizer files are renamed into place too
        renames.append(dst) if Path(dst).suffix == ".bin" else None
        if len(renames) == 2:
            raise KeyboardInterrupt("killed")
        return real_replace(src, dst)

    real_replace = shards.os.replace
    monkeypatch.setattr(shards.os, "replace", crash_on_second_rename)
    out = tmp_path / "out"
    argv = ["--dataset", "sample", "--out", str(out), "--tokenizer", str(sample_data_dir / "tokenizer.model"),
            "--shard-tokens", "10000", "--num-proc", "1"]
    with pytest.raises(KeyboardInterrupt):
        prepare.main(argv)
    partial = tmp_path / "out.partial"
    assert not out.exists() and not (partial / "meta.json").exists()
    assert (partial / "train_000000.bin").exists() and not (partial / "train_000001.bin").exists()
    with pytest.raises(DataError, match="no meta.json"):
        TrainLoader(DataDir(partial), 16, 2)
    monkeypatch.setattr(shards.os, "replace", real_replace)
    assert prepare.main(argv) == 0  # a rerun clears the leftovers
    assert not partial.exists() and (out / "meta.json").exists()


def test_an_interrupted_overwrite_keeps_the_old_data_whole(sample_data_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    argv = ["--data-files", str(SAMPLE_DIR / "history.txt"), "--out", str(out), "--tokenizer",
            str(sample_data_dir / "tokenizer.model"), "--num-proc", "1"]
    assert prepare.main(argv) == 0
    before = DataDir(out).meta
    real_replace = os.replace

    def killed_before_the_new_data_is_in_place(src, dst):
        if Path(dst) == out:
            raise KeyboardInterrupt("killed")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", killed_before_the_new_data_is_in_place)
    with pytest.raises(KeyboardInterrupt):
        prepare.main([*argv, "--overwrite"])
    assert not out.exists() and DataDir(tmp_path / "out.old").meta == before  # moved aside, whole
    monkeypatch.setattr(os, "replace", real_replace)
    assert prepare.main([*argv, "--overwrite"]) == 0
    assert DataDir(out).meta["shards"] == before["shards"]


@pytest.mark.parametrize("flag, value, words", [
    ("--shard-tokens", "0", "positive whole number"),
    ("--max-docs", "-1", "positive whole number"),  # was "no training text ...": the source blamed for the flag
    ("--num-proc", "-2", "positive whole number"),  # was silently one process
    ("--max-bytes", "0", "positive size"),  # was one document, silently
    ("--tokenizer-sample-bytes", "0", "positive size"),
    ("--vocab-size", "70000", "264 to 65535"),
    ("--vocab-size", "10", "264 to 65535"),
    ("--val-fraction", "1.5", "0 <= f < 1"),
    ("--val-fraction", "nan", "not a finite number"),
    ("--seed", "-1", "0 to 4,294,967,295"),  # was a SentencePiece traceback
])
def test_numeric_flags_are_checked_where_they_are_parsed(flag, value, words, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        prepare.main(["--dataset", "sample", flag, value, "--out", str(tmp_path / "out")])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_info.value.code == 2 and f"error: argument {flag}: " in last and words in last, last
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


HUB_README = """---
configs:
- config_name: textbooks
  data_files:
  - split: train
    path: data/textbooks/train-*
- config_name: wiki
  data_files:
  - split: train
    path: data/wiki/train-*
  - split: validation
    path: data/wiki/validation-*
---
# A dataset laid out as on the Hugging Face Hub
"""


def _hub_layout(root: Path) -> dict[str, list[str]]:
    """A dataset directory as `huggingface-cli download` leaves one: parquet files per config and split,
    and a README whose YAML `configs:` names them. Returns each config/split's documents."""
    docs = {"textbooks/train": [f"교과서 {i}장: 광합성은 빛 에너지를 화학 에너지로 바꾼다. ({i})" for i in range(30)],
            "wiki/train": [f"위키 문서 {i}: 서울은 대한민국의 수도이다. 인구 {i * 1000}명." for i in range(20)],
            "wiki/validation": [f"위키 검증 문서 {i}: 부산은 항구 도시이다." for i in range(5)]}
    for key, texts in docs.items():
        config, split = key.split("/")
        (root / "data" / config).mkdir(parents=True, exist_ok=True)
        halves = [texts[:len(texts) // 2], texts[len(texts) // 2:]] if split == "train" else [texts]
        for i, half in enumerate(halves):
            table = pa.table({"text": half, "id": list(range(len(half)))})
            pq.write_table(table, root / "data" / config / f"{split}-{i:05d}-of-{len(halves):05d}.parquet")
    (root / "README.md").write_text(HUB_README, encoding="utf-8")
    return docs


def test_a_dataset_directory_laid_out_like_a_hub_repo_streams_through_datasets(sample_data_dir, tmp_path):
    docs = _hub_layout(tmp_path / "ko_hub")
    held = tmp_path / "held.jsonl"
    held.write_text(json.dumps({"text": "따로 떼어 둔 검증 문서입니다."}, ensure_ascii=False) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    proc = cli("--dataset", tmp_path / "ko_hub", "--subset", "textbooks,wiki", "--val-files", held, "--out", out,
               "--tokenizer", sample_data_dir / "tokenizer.model", "--num-proc", "2")
    assert proc.returncode == 0, proc.stderr
    assert f"reading {tmp_path / 'ko_hub'} from a local dataset directory, streamed: 2 config(s) in turn " \
           "(textbooks, wiki), split 'train', column 'text'" in proc.stdout
    assert Counter(decoded_documents(out, "train")) == Counter(docs["textbooks/train"] + docs["wiki/train"])
    assert decoded_documents(out, "val") == ["따로 떼어 둔 검증 문서입니다."]
    meta = DataDir(out).meta
    assert meta["corpus"] == {"source": "dir", "dataset": str((tmp_path / "ko_hub").resolve()),
                              "subsets": ["textbooks", "wiki"], "split": "train", "text_column": "text",
                              "max_docs": None, "max_bytes": None}
    assert meta["val_files"] == [str(held)]


def test_a_dataset_directory_by_default_reads_every_config_in_turn_and_any_split(sample_data_dir, tmp_path, capsys):
    docs = _hub_layout(tmp_path / "ko_hub")
    common = ["--dataset", str(tmp_path / "ko_hub"), "--tokenizer", str(sample_data_dir / "tokenizer.model"),
              "--val-fraction", "0", "--num-proc", "1"]
    assert prepare.main([*common, "--max-docs", "4", "--out", str(tmp_path / "a")]) == 0
    assert decoded_documents(tmp_path / "a", "train") == [docs["textbooks/train"][0], docs["wiki/train"][0],
                                                          docs["textbooks/train"][1], docs["wiki/train"][1]]
    assert DataDir(tmp_path / "a").meta["corpus"]["subsets"] == ["textbooks", "wiki"]
    assert prepare.main([*common, "--subset", "wiki", "--split", "validation", "--out", str(tmp_path / "b")]) == 0
    assert decoded_documents(tmp_path / "b", "train") == docs["wiki/validation"]
    capsys.readouterr()
    # A column that is not text, and a split the dataset lacks: one paragraph each, naming the fix.
    for args, words in [(["--text-column", "id"], "column 'id' holds int, not text. Pick a text column with "
                                                  "--text-column (string columns here: text)"),
                        (["--split", "test"], "Bad split: test")]:
        assert prepare.main([*common, *args, "--out", str(tmp_path / "c")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and words in err and len(err.strip().splitlines()) == 1
        assert not (tmp_path / "c").exists()


def test_reading_korean_textbooks_mmlu_copies_is_warned_about(capsys):
    warn_duplicate_subsets({"dataset": HF_DATASET, "subsets": ["tiny-textbooks", "mmlu_all", "mmlu_anatomy"]})
    err = capsys.readouterr().err
    assert err.startswith("warning: 2 of the configs") and "KMMLU" in err and "default --subset" in err
    warn_duplicate_subsets({"dataset": HF_DATASET, "subsets": list(HF_DATASET_SUBSETS)})  # the default
    warn_duplicate_subsets({"dataset": "/data/other", "subsets": ["mmlu_all"]})  # another dataset's own
    assert capsys.readouterr().err == ""


def test_side_by_side_first_runs_prepare_the_sample_once(tmp_path):
    """A sweep started on a fresh clone: every run finds data/sample missing; one prepares it, the others
    wait on the lock and find it done (without it, one would delete the other's <out>.partial)."""
    code = ("import sys; from nanokor.prepare import prepare_sample; "
            "print('made' if prepare_sample(sys.argv[1]) else 'found')")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "data" / "sample")], cwd=REPO,
                              stdout=subprocess.PIPE, text=True) for _ in range(3)]
    outcomes = sorted(p.communicate(timeout=120)[0].split()[-1] for p in procs)
    assert outcomes == ["found", "found", "made"] and all(p.returncode == 0 for p in procs)
    assert DataDir(tmp_path / "data" / "sample").meta["command"] == "python prepare.py --dataset sample"
