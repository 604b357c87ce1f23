"""prepare.py --chat: the layouts SFT data comes in, the conversation sample, malformed conversations
counted and left out, chat shards (ids + loss mask) read back against chat_format.render, bad input as
one error paragraph, and interrupted runs that leave nothing complete-looking."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanokor import shards
from nanokor.chat_format import render
from nanokor.corpus import CHAT_SAMPLE_DIR
from nanokor.errors import DataError, ShardError
from nanokor.shards import DataDir, read_header
from test_chat_format import _old_tokenizer

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("prepare", REPO / "prepare.py")
prepare = importlib.util.module_from_spec(spec)
spec.loader.exec_module(prepare)

SAMPLE = [json.loads(line)["messages"] for line in (CHAT_SAMPLE_DIR / "conversations.jsonl").open(encoding="utf-8")]


def cli(*args):
    return subprocess.run([sys.executable, str(REPO / "prepare.py"), *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def run(capsys, *args) -> subprocess.CompletedProcess:
    """prepare.main in this process (no interpreter start-up): exit code, stdout, stderr."""
    capsys.readouterr()
    code = prepare.main([*map(str, args), "--num-proc", "1"])
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out, err)


def conversations(data_dir: Path, split: str) -> list[tuple[list[int], list[int]]]:
    stream = DataDir(data_dir).conversations(split)
    try:
        return [tuple(a.tolist() for a in stream.read(i)) for i in range(len(stream))]
    finally:
        stream.close()


def u(text):
    return {"role": "user", "content": text}


def a(text):
    return {"role": "assistant", "content": text}


def test_the_sample_prepares_offline_into_chat_shards_that_are_the_rendered_conversations(sample_chat_dir, tokenizer):
    meta = DataDir(sample_chat_dir).meta
    assert DataDir(sample_chat_dir).holds_conversations and meta["content"] == "conversations"
    assert meta["corpus"]["layout"] == "messages" and meta["context"] == 1024 and meta["left_out"]["total"] == 0
    train, val = conversations(sample_chat_dir, "train"), conversations(sample_chat_dir, "val")
    rendered = sorted(render(tokenizer, c) for c in SAMPLE)
    assert sorted(train + val) == rendered and len(SAMPLE) == 80  # every conversation once, ids and mask exact
    assert len(val) >= 4 and not {tuple(i) for i, _ in train} & {tuple(i) for i, _ in val}
    for split, convs in (("train", train), ("val", val)):
        s = meta["splits"][split]
        assert s["conversations"] == len(convs) and s["tokens"] == sum(len(i) for i, _ in convs)
        assert s["trained_tokens"] == sum(map(sum, (m for _, m in convs)))
    assert meta["splits"]["train"]["replies"] + meta["splits"]["val"]["replies"] == \
        sum(m["role"] == "assistant" for c in SAMPLE for m in c)
    header = read_header(sample_chat_dir / "train_000000.bin", chat=True)
    assert header.tokenizer_sha == tokenizer.sha256 and header.n_conversations == len(train)


LAYOUT_RECORDS = {
    "messages": {"messages": [{"role": "system", "content": "짧게 답하세요."}, u("수도는?"), a("서울입니다.")]},
    "sharegpt": {"id": "x1", "conversations": [{"from": "human", "value": "안녕?"}, {"from": "gpt", "value": "안녕하세요!"},
                                               {"from": "human", "value": "이름이 뭐야?"}, {"from": "gpt", "value": "나노코어예요."}]},
    "alpaca": {"instruction": "다음 문장을 높임말로 바꾸세요.", "input": "밥 먹었어?", "output": "진지 드셨어요?"},
    "openorca": {"id": "o1", "system_prompt": "당신은 도우미입니다.", "question": "1+1은?", "response": "2입니다."},
}
LAYOUT_MESSAGES = {
    "messages": LAYOUT_RECORDS["messages"]["messages"],
    "sharegpt": [u("안녕?"), a("안녕하세요!"), u("이름이 뭐야?"), a("나노코어예요.")],
    "alpaca": [u("다음 문장을 높임말로 바꾸세요.\n\n밥 먹었어?"), a("진지 드셨어요?")],
    "openorca": [{"role": "system", "content": "당신은 도우미입니다."}, u("1+1은?"), a("2입니다.")],
}


@pytest.mark.parametrize("layout", list(LAYOUT_RECORDS))
@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_each_layout_is_detected_from_its_columns_and_read_from_jsonl_and_parquet(layout, suffix, tokenizer,
                                                                                 sample_data_dir, tmp_path, capsys):
    path = tmp_path / f"sft{suffix}"
    record = LAYOUT_RECORDS[layout]
    if suffix == ".jsonl":
        path.write_text(json.dumps(record, ensure_ascii=False) + "\n", encoding="utf-8")
    else:
        pq.write_table(pa.Table.from_pylist([record]), path)
    out = tmp_path / "out"
    proc = run(capsys, "--chat", "--data-files", path, "--tokenizer", sample_data_dir / "tokenizer.model", "--out", out,
               "--val-fraction", "0")
    assert proc.returncode == 0, proc.stderr
    assert f": {layout} conversations" in proc.stdout  # said before reading
    assert conversations(out, "train") == [render(tokenizer, LAYOUT_MESSAGES[layout])]


def test_other_column_names_a_json_list_file_and_held_out_files(tokenizer, sample_data_dir, tmp_path):
    records = [{"질문": f"{i} 더하기 {i}은?", "답변": f"{2 * i}입니다.", "출처": "test"} for i in range(30)]
    (tmp_path / "train.json").write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    (tmp_path / "held.jsonl").write_text(json.dumps({"질문": "백 더하기 백은?", "답변": "이백입니다."},
                                                    ensure_ascii=False) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    proc = cli("--chat", "--data-files", tmp_path / "train.json", "--val-files", tmp_path / "held.jsonl", "--tokenizer",
               sample_data_dir / "tokenizer.model", "--out", out, "--chat-format", "alpaca", "--columns",
               "instruction=질문,output=답변", "--num-proc", "2")
    assert proc.returncode == 0, proc.stderr
    assert "instruction <- '질문'" in proc.stdout
    assert conversations(out, "train") == [render(tokenizer, [u(r["질문"]), a(r["답변"])]) for r in records]
    assert conversations(out, "val") == [render(tokenizer, [u("백 더하기 백은?"), a("이백입니다.")])]


def test_malformed_conversations_are_counted_by_kind_and_never_written(tokenizer, sample_data_dir, tmp_path, capsys):
    good = [u("좋은 질문"), a("좋은 답")]
    bad = {
        "empty turn": [u("질문"), a("   ")],
        "turns out of order": [u("하나"), u("둘"), a("셋")],
        "unknown role": [{"role": "narrator", "content": "옛날에"}, a("네")],
        "no reply to learn": [u("질문"), a("답"), u("대답 없는 질문")],
        "longer than the context": [u("긴 질문 " * 40), a("긴 답")],
    }
    lines = [{"messages": good}] + [{"messages": m} for m in bad.values()] + [{"text": "columns of another layout"},
                                                                             {"messages": good}]  # a duplicate
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in lines) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    proc = run(capsys, "--chat", "--data-files", path, "--tokenizer", sample_data_dir / "tokenizer.model", "--out", out,
               "--context", "64", "--val-fraction", "0")
    assert proc.returncode == 0, proc.stderr
    left = DataDir(out).meta["left_out"]
    assert left["kinds"] == {**{k: 1 for k in bad}, "missing columns": 1} and left["total"] == 6
    assert left["examples"]["turns out of order"].startswith("record 2: turn 2 is 'user'")
    assert "left out: 6 malformed conversation(s), never trained on" in proc.stdout
    assert conversations(out, "train") == [render(tokenizer, good)]  # one copy of the good one, nothing else
    assert DataDir(out).meta["cleaning"]["duplicates"] == 1


def test_a_dataset_directory_laid_out_like_a_hub_repo_streams_sharegpt_records(tokenizer, sample_data_dir, tmp_path):
    root = tmp_path / "ko_chat"
    (root / "data").mkdir(parents=True)
    rows = [{"conversations": [{"from": "human", "value": f"질문 {i}"}, {"from": "gpt", "value": f"답 {i}"}]}
            for i in range(12)]
    pq.write_table(pa.Table.from_pylist(rows), root / "data" / "train-00000-of-00001.parquet")
    (root / "README.md").write_text("---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n"
                                    "    path: data/train-*\n---\n", encoding="utf-8")
    out = tmp_path / "out"
    argv = ["--chat", "--dataset", str(root), "--tokenizer", str(sample_data_dir / "tokenizer.model"), "--out",
            str(out), "--val-fraction", "0", "--max-docs", "10", "--num-proc", "1"]
    assert prepare.main(argv) == 0
    assert conversations(out, "train") == [render(tokenizer, [u(f"질문 {i}"), a(f"답 {i}")]) for i in range(10)]
    assert DataDir(out).meta["corpus"]["source"] == "dir"


@pytest.fixture(scope="module")
def old_tokenizer_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("old") / "tokenizer.model"
    path.write_bytes(_old_tokenizer().model_bytes)
    return path


@pytest.mark.parametrize("args, words", [
    (["--dataset", "sample"], "--chat needs --tokenizer"),
    (["--dataset", "sample", "--tokenizer", "OLD"], "without the chat tokens"),
    (["--dataset", "sample", "--tokenizer", "no/such.model"], "Cannot read the tokenizer"),
    (["--tokenizer", "TOK"], "holds documents"),
    (["--dataset", "sample", "--tokenizer", "TOK", "--vocab-size", "512"], "--vocab-size does not apply to --chat"),
    (["--dataset", "sample", "--tokenizer", "TOK", "--columns", "answer"], "field=column pairs"),
    (["--dataset", "sample", "--tokenizer", "TOK", "--columns", "reply=answer"], "no layout has"),
    (["--dataset", "sample", "--tokenizer", "TOK", "--chat-format", "alpaca"], "which the first record lacks"),
    (["--dataset", "sample", "--tokenizer", "TOK", "--context", "16"], "No training conversations"),
    (["--data-files", "AMBIGUOUS", "--tokenizer", "TOK"], "fits several layouts"),
    (["--data-files", "NONE", "--tokenizer", "TOK"], "fits none of the layouts"),
    (["--data-files", "sft/*.txt", "--tokenizer", "TOK"], "matches no files"),
])
def test_bad_chat_data_and_flags_are_one_clear_paragraph(args, words, sample_data_dir, old_tokenizer_file, tmp_path,
                                                        capsys):
    both = {"messages": [u("q"), a("a")], "instruction": "q", "output": "a"}
    (tmp_path / "ambiguous.jsonl").write_text(json.dumps(both) + "\n", encoding="utf-8")
    (tmp_path / "none.jsonl").write_text(json.dumps({"text": "plain text"}) + "\n", encoding="utf-8")
    subs = {"TOK": sample_data_dir / "tokenizer.model", "OLD": old_tokenizer_file,
            "AMBIGUOUS": tmp_path / "ambiguous.jsonl", "NONE": tmp_path / "none.jsonl"}
    proc = run(capsys, "--chat", *[subs.get(x, x) for x in args], "--out", tmp_path / "out")
    assert proc.returncode == 2 and words in proc.stderr, proc.stderr
    assert proc.stderr.startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_chat_flags_without_chat_are_refused_and_a_command_line_error_has_no_traceback(tmp_path):
    proc = cli("--dataset", "sample", "--context", "512", "--out", tmp_path / "out")
    assert proc.returncode == 2 and "add --chat" in proc.stderr and "Traceback" not in proc.stderr
    proc = cli("--chat", "--dataset", "sample", "--tokenizer", "README.md", "--out", tmp_path / "out")
    assert proc.returncode == 2 and "SentencePiece" in proc.stderr and "Traceback" not in proc.stderr


def test_an_interrupted_chat_prepare_leaves_nothing_that_looks_complete(sample_data_dir, tmp_path, monkeypatch):
    renames = []

    def crash_on_second_shard(src, dst):
        renames.append(dst) if Path(dst).suffix == ".bin" else None
        if len(renames) == 2:
            raise KeyboardInterrupt("killed")
        return real_replace(src, dst)

    real_replace = shards.os.replace
    monkeypatch.setattr(shards.os, "replace", crash_on_second_shard)
    out = tmp_path / "out"
    argv = ["--chat", "--dataset", "sample", "--tokenizer", str(sample_data_dir / "tokenizer.model"), "--out", str(out),
            "--shard-tokens", "1000", "--num-proc", "1"]
    with pytest.raises(KeyboardInterrupt):
        prepare.main(argv)
    partial = tmp_path / "out.partial"
    assert not out.exists() and not (partial / "meta.json").exists()
    assert sorted(p.name for p in partial.glob("*.bin")) == ["train_000000.bin"]  # the finished shard alone
    with pytest.raises(DataError, match="no meta.json"):
        DataDir(partial).conversations("train")
    monkeypatch.setattr(shards.os, "replace", real_replace)
    assert prepare.main(argv) == 0
    meta = DataDir(out).meta
    assert not partial.exists() and len(meta["shards"]["train"]) > 1  # no conversation crosses a shard
    assert all(s["tokens"] <= 1000 for s in meta["shards"]["train"])
    assert sum(s["conversations"] for s in meta["shards"]["train"]) == meta["splits"]["train"]["conversations"]


def test_chat_shards_are_checked_like_token_shards(sample_chat_dir, sample_data_dir, tmp_path):
    chat_shard = sample_chat_dir / "train_000000.bin"
    with pytest.raises(ShardError, match="shard of conversations, read here as a token shard"):
        read_header(chat_shard)
    with pytest.raises(ShardError, match="shard of documents, read here as a chat shard"):
        read_header(sample_data_dir / "train_000000.bin", chat=True)
    cut = tmp_path / "cut.bin"
    cut.write_bytes(chat_shard.read_bytes()[:-8])
    with pytest.raises(ShardError, match="truncated or corrupt"):
        read_header(cut, chat=True)
    ids, mask = DataDir(sample_chat_dir).conversations("val").read(0)
    assert ids[0] == 1 and mask.dtype == np.uint8 and len(ids) == len(mask)
