"""python -m nanokor.evaluate: every token scored once, bytes that are the text's own, clear errors."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from nanokor.checkpoint import build_model, load_checkpoint
from nanokor.corpus import normalize, open_corpus
from nanokor.evaluate import main, windows
from nanokor.tokenizer import train_tokenizer

from tiny_checkpoint import make_checkpoint

DOCS = ["세종대왕은 훈민정음을 창제하였다.\n백성을 가르치는 바른 소리라는 뜻이다.",
        "드문 글자 뷁과 漢字, 그리고 숫자 2024도 바이트 단위로 센다.",
        "짧은 문서."]


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "texts" / "docs.txt"
    path.parent.mkdir()
    path.write_text("\n\n".join(DOCS) + "\n", encoding="utf-8")
    return path


def evaluate(*args) -> dict:
    assert main(list(map(str, args))) == 0
    out = args[list(args).index("--out") + 1]
    return json.loads(open(out, encoding="utf-8").read())


def test_windows_score_every_token_after_the_first_exactly_once(tokenizer):
    stream = [t for d in DOCS for t in [tokenizer.bos_id, *tokenizer.encode(d), tokenizer.eos_id]]
    rows = list(windows(DOCS, tokenizer, 16, None))
    assert all(len(x) == len(y) <= 16 for x, y in rows)
    assert [t for _, y in rows for t in y] == stream[1:]
    assert [t for x, _ in rows for t in x] == stream[:-1]
    budget = list(windows(DOCS, tokenizer, 16, 37))
    assert [t for _, y in budget for t in y] == stream[1:38]


def test_whole_text_bits_per_byte_counts_exactly_its_utf8_bytes(ckpt, text_file, tmp_path, tokenizer):
    r = evaluate("--ckpt", ckpt, "--data-files", text_file, "--max-tokens", "all", "--out", tmp_path / "r.json")
    assert r["bytes"] == sum(len(d.encode("utf-8")) for d in DOCS)
    assert r["tokens"] == sum(len(tokenizer.encode(d)) + 2 for d in DOCS) - 1  # bos/eos framed, first unscored
    assert r["ppl"] == pytest.approx(torch.tensor(r["loss"]).exp().item(), rel=1e-6)


def test_loss_and_bpb_match_a_direct_computation(ckpt, text_file, tmp_path, tokenizer):
    r = evaluate("--ckpt", ckpt, "--data-files", text_file, "--max-tokens", "all", "--seq-len", 32,
                 "--batch-size", 3, "--out", tmp_path / "r.json")
    model = build_model(load_checkpoint(ckpt))
    nats = nats_text = 0.0
    with torch.no_grad():
        for x, y in windows(DOCS, tokenizer, 32, None):
            logp = F.log_softmax(model(torch.tensor([x]))[0][0].double(), -1)
            for pos, target in enumerate(y):
                nats += -logp[pos, target].item()
                if tokenizer.token_bytes[target] > 0:
                    nats_text += -logp[pos, target].item()
    assert r["loss"] == pytest.approx(nats / r["tokens"], rel=1e-5)
    assert r["bpb"] == pytest.approx(nats_text / (r["bytes"] * torch.log(torch.tensor(2.0)).item()), rel=1e-5)


def test_token_budget_limits_the_tokens_and_bytes_scored(ckpt, text_file, tmp_path, tokenizer):
    r = evaluate("--ckpt", ckpt, "--data-files", text_file, "--max-tokens", 20, "--out", tmp_path / "r.json")
    stream = [t for d in DOCS for t in [tokenizer.bos_id, *tokenizer.encode(d), tokenizer.eos_id]]
    assert r["tokens"] == 20 and r["bytes"] == int(tokenizer.token_bytes[stream[1:21]].sum())


def test_models_with_different_tokenizers_score_the_same_bytes(ckpt, text_file, tmp_path):
    other_tok = train_tokenizer([normalize(d) for d in open_corpus("sample").documents()], vocab_size=2048,
                                model_type="unigram")
    other = make_checkpoint(tmp_path / "other.pt", other_tok)
    a = evaluate("--ckpt", ckpt, "--data-files", text_file, "--max-tokens", "all", "--out", tmp_path / "a.json")
    b = evaluate("--ckpt", other, "--data-files", text_file, "--max-tokens", "all", "--out", tmp_path / "b.json")
    assert a["tokens"] != b["tokens"] and a["bytes"] == b["bytes"]


def test_jsonl_and_parquet_inputs_score_like_txt(ckpt, text_file, tmp_path, capsys):
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"body": d}, ensure_ascii=False) + "\n" for d in DOCS), encoding="utf-8")
    parquet = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"body": DOCS}), parquet)
    ref = evaluate("--ckpt", ckpt, "--data-files", text_file, "--out", tmp_path / "t.json")
    for path in (jsonl, parquet):
        r = evaluate("--ckpt", ckpt, "--data-files", path, "--text-column", "body", "--out", tmp_path / "x.json")
        assert (r["loss"], r["bytes"], r["tokens"]) == (pytest.approx(ref["loss"]), ref["bytes"], ref["tokens"])
    table = capsys.readouterr().out
    assert "bits per byte" in table and "perplexity" in table and "wrote" in table


def test_default_json_lands_beside_the_checkpoint(ckpt, text_file):
    assert main(["--ckpt", str(ckpt), "--data-files", str(text_file)]) == 0
    assert json.loads((ckpt.parent / "eval-texts.json").read_text())["bytes"] > 0


@pytest.mark.parametrize("args, message", [
    (["--data-files", "nowhere/*.txt"], "matches no files"),
    (["--data-files", "{empty}"], "no text to score"),
    (["--data-files", "{text}", "--seq-len", "999"], "exceeds the model's max_seq_len"),
    (["--data-files", "{text}", "--ckpt", "{missing}"], "No checkpoint at"),
])
def test_bad_input_is_a_one_paragraph_error(args, message, ckpt, text_file, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n", encoding="utf-8")
    fill = {"empty": empty, "text": text_file, "missing": tmp_path / "none.pt"}
    args = [a.format(**fill) for a in args]
    assert main(["--ckpt", str(ckpt), *args]) == 2
    err = capsys.readouterr().err
    last = err.splitlines()[-1]  # after the progress bar, if scoring had started
    assert last.startswith("error: ") and message in last and "Traceback" not in err


@pytest.mark.parametrize("flag, value", [("--limit", "inf"),  # was an OverflowError traceback
                                         ("--limit", "nan"), ("--seq-len", "0"), ("--batch-size", "-1"),
                                         ("--num-fewshot", "-1"), ("--max-tokens", "0")])
def test_numeric_flags_are_refused_by_name_where_parsed(flag, value, ckpt, capsys):
    what = ["--tasks", "copa"] if flag in ("--limit", "--num-fewshot") else ["--data-files", "x.txt"]
    with pytest.raises(SystemExit) as exit_info:
        main(["--ckpt", str(ckpt), *what, flag, value])
    assert exit_info.value.code == 2 and f"error: argument {flag}: " in capsys.readouterr().err
