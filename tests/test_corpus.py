import json
import subprocess
import sys
import time
import unicodedata
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanokor import corpus
from nanokor.corpus import SAMPLE_DIR, DataError, Documents, clean, normalize, open_corpus

REPO = Path(__file__).resolve().parents[1]


def test_normalize_composes_hangul_and_strips_controls():
    nfd = unicodedata.normalize("NFD", "한글 맞춤법")
    assert len(nfd) > len("한글 맞춤법")
    counts = Counter()
    assert normalize(nfd, counts) == "한글 맞춤법"
    assert normalize("가\x00나\x1b[0m다\x7f\x85라", counts) == "가나[0m다라"
    assert normalize("줄\r\n바꿈\r유지\t탭\n", counts) == "줄\n바꿈\n유지\t탭\n"
    assert counts == {"nfc_changed": 1, "control_chars_stripped": 1}
    clean = "이미 깨끗한 문장입니다."
    assert normalize(clean, counts) == clean and counts["nfc_changed"] == 1


def test_clean_is_normalize_and_its_utf8():
    texts = ["이미 깨끗한 문장입니다.", "가운뎃점·과 도°", "C1\x85 제어", "\x1b[0m", "줄\r\n바꿈", "탭\t줄\n",
             unicodedata.normalize("NFD", "한글"), "\u00e9 \U0001f600 \ufffd", ""]
    for text in texts:
        counts, expected = Counter(), Counter()
        assert clean(text, counts) == (normalize(text, expected), normalize(text).encode("utf-8"))
        assert counts == expected


def test_sample_source_reads_every_document():
    expected = [d for p in sorted(SAMPLE_DIR.glob("*.txt"))
                for d in p.read_text(encoding="utf-8").split("\n\n") if d.strip()]
    docs = list(open_corpus("sample").documents())
    assert len(expected) > 0 and [d.strip("\n") for d in expected] == docs


def _write_files(tmp_path: Path) -> Path:
    pq.write_table(pa.table({"body": ["첫 문서", None, "둘째 문서"], "id": [1, 2, 3]}), tmp_path / "a.parquet")
    with open(tmp_path / "b.jsonl", "wb") as f:
        f.write(json.dumps({"body": "셋째 문서"}, ensure_ascii=False).encode() + b"\n")
        f.write(b'{"body": "\xed\x95\x9c\xff broken"}\n')  # invalid UTF-8 inside
        f.write(b"{not json\n\n")
        f.write(b'{"body": "\\ud800 lone surrogate"}\n')
        f.write(json.dumps({"other": 1}).encode() + b"\n")
    (tmp_path / "c.txt").write_bytes("넷째\n문서 둘째 줄\n\n\n다섯째\n  \n여섯째".encode() + b" \xc3\x28")
    return tmp_path


def test_local_files_parquet_jsonl_txt(tmp_path):
    _write_files(tmp_path)
    c = open_corpus(data_files=[str(tmp_path / "*.parquet"), str(tmp_path / "*.jsonl"), str(tmp_path / "*.txt")],
                    text_column="body")
    docs = list(c.documents())
    assert docs == ["첫 문서", "", "둘째 문서", "셋째 문서", "한\ufffd broken", "\ufffd lone surrogate",
                    "넷째\n문서 둘째 줄", "다섯째", "여섯째 \ufffd("]
    assert c.counts == {"invalid_utf8_docs": 3, "bad_jsonl_lines": 1, "missing_text": 1}
    assert c.name == tmp_path.name and c.info["source"] == "files"


def test_parts_read_the_same_documents_as_the_whole_files(tmp_path, monkeypatch):
    _write_files(tmp_path)
    pq.write_table(pa.table({"body": [f"{i}번 행" for i in range(50)]}), tmp_path / "d.parquet", row_group_size=20)
    pq.write_table(pa.table({"body": pa.array([], pa.string())}), tmp_path / "d2.parquet")  # an empty row group
    (tmp_path / "e.txt").write_text("".join(f"문서 {i}\n둘째 줄\n{' ' * (i % 3)}\n\n" for i in range(40)))
    with open(tmp_path / "f.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"body": f"{i}번 줄"}, ensure_ascii=False) + "\n" for i in range(40))
    c = open_corpus(data_files=[str(tmp_path / "*")], text_column="body")
    whole, whole_counts = list(c.documents()), Counter(c.counts)
    assert len(whole) == 9 + 50 + 40 + 40
    monkeypatch.setattr(corpus, "PART_BYTES", 7)  # a cut every few bytes: in lines, in documents, in row groups
    parts = list(c.parts())
    assert len(parts) > 100
    counts = Counter()
    assert [d for part in parts for d in part.read(counts)] == whole and counts == whole_counts
    assert list(c.tasks()) == parts and not c.counts  # the workers read and count


def test_caps_on_documents_and_bytes(tmp_path):
    (tmp_path / "d.txt").write_text("\n\n".join(f"문서 {i}" for i in range(10)), encoding="utf-8")
    assert len(list(open_corpus(data_files=[str(tmp_path / "d.txt")], max_docs=3).documents())) == 3
    each = len("문서 0".encode())
    capped = list(open_corpus(data_files=[str(tmp_path / "d.txt")], max_bytes=4 * each).documents())
    assert capped == [f"문서 {i}" for i in range(4)]
    # The cut depends on every document before it: a capped corpus is read here, not in parts.
    tasks = list(open_corpus(data_files=[str(tmp_path / "d.txt")], max_docs=3).tasks())
    assert tasks == [Documents(["문서 0", "문서 1", "문서 2"])]


def test_bad_local_input_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="matches no files"):
        open_corpus(data_files=[str(tmp_path / "nothing-*.parquet")])
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="parquet.*jsonl.*txt"):
        open_corpus(data_files=[str(tmp_path / "x.csv")])
    pq.write_table(pa.table({"content": ["가"]}), tmp_path / "y.parquet")
    with pytest.raises(DataError, match="--text-column"):
        open_corpus(data_files=[str(tmp_path / "y.parquet")])  # from its schema, before any reading
    (tmp_path / "z.jsonl").write_text('{"content": "가"}\n')
    with pytest.raises(DataError, match="--text-column"):
        list(open_corpus(data_files=[str(tmp_path / "z.jsonl")]).documents())


def test_offline_hub_fails_fast_with_the_alternatives(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.time()
    proc = subprocess.run([sys.executable, str(REPO / "prepare.py"), "--subset", "tiny-textbooks"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    elapsed = time.time() - start
    assert proc.returncode == 2 and elapsed < 30
    assert "--dataset sample" in proc.stderr and "--data-files" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_unreachable_hub_is_caught_without_the_offline_flag(monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants

    class DeadSession:
        def head(self, *args, **kwargs):
            raise OSError("[Errno -2] Name or service not known")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "get_session", lambda: DeadSession())
    with pytest.raises(DataError, match="--dataset sample.*--data-files.*--dataset path/to/dir"):
        open_corpus()  # maywell/korean_textbooks


def test_connection_lost_while_streaming_is_caught(monkeypatch):
    import datasets

    def unreachable(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'maywell/korean_textbooks' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(DataError, match="--dataset sample.*--data-files"):
        list(corpus._read_dataset(corpus.HF_DATASET, ["tiny-textbooks"], "train", "text"))
