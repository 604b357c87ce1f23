"""python -m nanokor.evaluate --tasks: real lm-evaluation-harness on the export, on local Korean tasks.

lm-eval's own tasks download their data, which tests cannot; the tasks here are defined the same way
(YAML) on data the test writes. The scores are checked against nanokor's model and nanokor.evaluate.
"""

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from nanokor.chat_format import render
from nanokor.checkpoint import build_model, load_checkpoint
from nanokor.corpus import SAMPLE_DIR
from nanokor.evaluate import main

from tiny_checkpoint import make_checkpoint

QUESTIONS = [  # (question, choices, answer)
    ("대한민국의 수도는 어디인가?", ["서울", "부산", "대구", "광주"], 0),
    ("훈민정음을 창제한 왕은 누구인가?", ["태조", "세종대왕", "정조", "광개토대왕"], 1),
    ("물이 끓는 온도는 섭씨 몇 도인가?", ["50도", "100도", "0도", "영하 10도"], 1),
    ("한국의 전통 명절이 아닌 것은?", ["설날", "추석", "단오", "크리스마스"], 3),
    ("지구에서 가장 큰 바다는?", ["대서양", "인도양", "태평양", "북극해"], 2),
    ("김치의 주재료로 가장 흔한 채소는?", ["배추", "감자", "당근", "양파"], 0),
    ("임진왜란 때 거북선을 이끈 장군은?", ["강감찬", "을지문덕", "이순신", "김유신"], 2),
    ("삼각형의 내각의 합은 몇 도인가?", ["90도", "180도", "270도", "360도"], 1),
    ("광합성을 하는 세포 소기관은?", ["미토콘드리아", "엽록체", "핵", "리보솜"], 1),
    ("한글 자음의 기본자는 몇 개인가?", ["다섯 개", "열네 개", "스물네 개", "두 개"], 0),
    ("조선을 건국한 사람은?", ["왕건", "이성계", "주몽", "온조"], 1),
    ("태양계에서 가장 큰 행성은?", ["화성", "금성", "목성", "수성"], 2),
]


def write_task(root: Path, name: str, records: list[dict], config: str) -> None:
    """A task YAML over a local jsonl file, as lm-eval's own tasks are defined over Hub data sets."""
    data = root / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    (root / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        f"  cache_dir: {root / 'cache'}\ntest_split: test\n{config}", encoding="utf-8")


def lm_eval_run(ckpt: Path, tasks: str, include_path: Path, *args: str) -> int:
    return main(["--ckpt", str(ckpt), "--tasks", tasks, "--include-path", str(include_path), "--batch-size", "4",
                 *args])


def continuation_logprob(model, context: list[int], continuation: list[int]) -> float:
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
        logp = F.log_softmax(model(ids)[0][0].double(), -1)
    return sum(logp[len(context) - 1 + i, t].item() for i, t in enumerate(continuation))


def predictions(model, tokenizer, prefix: list[int]) -> tuple[list[int], list[int]]:
    """Each question's argmax choice by log-likelihood, and by log-likelihood per character (acc_norm),
    scored with nanokor's own model: the context is `prefix` + the prompt, each choice follows a space."""
    acc, norm = [], []
    for question, choices, _ in QUESTIONS:
        context = f"질문: {question}\n답:"
        ctx = tokenizer.encode(context)
        lls = []
        for choice in choices:
            whole = tokenizer.encode(f"{context} {choice}")
            assert whole[:len(ctx)] == ctx  # the choice's tokens start where the context's end
            lls.append(continuation_logprob(model, prefix + ctx, whole[len(ctx):]))
        acc.append(max(range(len(choices)), key=lambda i: lls[i]))
        norm.append(max(range(len(choices)), key=lambda i: lls[i] / len(choices[i])))
    return acc, norm


@pytest.fixture(scope="module")
def qk_norm_ckpt(tmp_path_factory, tokenizer) -> Path:
    """A qk_norm checkpoint, which lm-eval reads through the Qwen3 export. Seed 2: its accuracies with and
    without the leading <s> differ, so the test's last check can tell (seed 0's happen to coincide)."""
    return make_checkpoint(tmp_path_factory.mktemp("qk") / "last.pt", tokenizer, seed=2, qk_norm=True,
                           random_gains=True)


@pytest.mark.parametrize("which", ["ckpt", "qk_norm_ckpt"])
def test_a_local_korean_multiple_choice_task_scores_like_nanokors_model(which, request, tokenizer, tmp_path, capsys):
    ckpt = request.getfixturevalue(which)
    write_task(tmp_path, "ko_mc", [{"question": q, "choices": c, "label": a} for q, c, a in QUESTIONS],
               'output_type: multiple_choice\ndoc_to_text: "질문: {{question}}\\n답:"\ndoc_to_choice: "{{choices}}"\n'
               "doc_to_target: label\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    assert lm_eval_run(ckpt, "ko_mc", tmp_path) == 0
    table = capsys.readouterr().out
    assert "ko_mc" in table and "acc_norm" in table and "stderr" in table
    result = json.loads((ckpt.parent / "lm-eval-ko_mc.json").read_text(encoding="utf-8"))["results"]["ko_mc"]
    model = build_model(load_checkpoint(ckpt))
    answers = [a for _, _, a in QUESTIONS]

    def accuracy(preds):
        return sum(p == a for p, a in zip(preds, answers)) / len(answers)

    acc, norm = predictions(model, tokenizer, [tokenizer.bos_id])
    assert (result["acc,none"], result["acc_norm,none"]) == (pytest.approx(accuracy(acc)), pytest.approx(accuracy(norm)))
    # The check can tell: without the <s> that starts every training document, the accuracies differ.
    acc0, norm0 = predictions(model, tokenizer, [])
    assert (accuracy(acc0), accuracy(norm0)) != (accuracy(acc), accuracy(norm))


def test_rolling_bits_per_byte_equals_nanokor_evaluate(ckpt, tokenizer, tmp_path):
    docs = [d.strip("\n") for d in (SAMPLE_DIR / "history.txt").read_text(encoding="utf-8").split("\n\n") if d.strip()]
    short = [d.split(". ")[0] + "." for d in docs[:6]]  # a heading and a first sentence: 30-60 tokens
    long = "\n".join(docs[6:11])  # about ten 128-token windows
    assert max(len(tokenizer.encode(d)) for d in short) < 100 and len(tokenizer.encode(long)) > 1000
    rolling = ("output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
               "metric_list:\n  - metric: bits_per_byte\n")
    write_task(tmp_path, "ko_short", [{"text": d} for d in short], rolling)
    write_task(tmp_path, "ko_long", [{"text": long}], rolling)
    assert lm_eval_run(ckpt, "ko_short,ko_long", tmp_path, "--out", str(tmp_path / "rolling.json")) == 0
    results = json.loads((tmp_path / "rolling.json").read_text(encoding="utf-8"))["results"]

    def nanokor_bpb(texts: list[str]) -> float:
        """nanokor.evaluate on each document alone, as lm-eval scores them: bits over all their bytes."""
        bits = nbytes = 0.0
        for i, text in enumerate(texts):
            path = tmp_path / f"doc{i}.jsonl"
            path.write_text(json.dumps({"text": text}, ensure_ascii=False) + "\n", encoding="utf-8")
            assert main(["--ckpt", str(ckpt), "--data-files", str(path), "--max-tokens", "all",
                         "--out", str(tmp_path / "r.json")]) == 0
            r = json.loads((tmp_path / "r.json").read_text())
            assert r["bytes"] == len(text.encode("utf-8"))  # the bytes lm-eval divides by
            bits, nbytes = bits + r["bpb"] * r["bytes"], nbytes + r["bytes"]
        return bits / nbytes

    # Documents within one window: the same predictions from the same <s>, so equal but for float sums.
    assert results["ko_short"]["bits_per_byte,none"] == pytest.approx(nanokor_bpb(short), rel=1e-5)
    # Longer ones: both cut the same 128-token windows, but lm-eval scores the last, partial one with a
    # full window of context before it, nanokor.evaluate with the one token its row starts from.
    lm, ours = results["ko_long"]["bits_per_byte,none"], nanokor_bpb([long])
    print(f"rolling bits per byte on {len(long.encode()):,} bytes: lm-eval {lm:.5f}, nanokor.evaluate {ours:.5f}, "
          f"relative difference {abs(lm - ours) / ours:.3%}")
    assert math.isclose(lm, ours, rel_tol=0.005)


def test_task_data_that_cannot_be_downloaded_is_one_paragraph(ckpt, tmp_path, capsys):
    (tmp_path / "ko_hub.yaml").write_text(  # a task on a Hub data set, as lm-eval's Korean tasks are
        "task: ko_hub\ndataset_path: nanokor-tests/no-such-dataset\noutput_type: multiple_choice\n"
        "test_split: test\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: label\n")
    assert lm_eval_run(ckpt, "ko_hub", tmp_path, "--out", str(tmp_path / "r.json")) == 2
    err = capsys.readouterr().err
    last = err.splitlines()[-1]
    assert last.startswith("error: lm-eval could not get the data of ko_hub") and "--include-path" in last
    assert "Traceback" not in err and not (tmp_path / "r.json").exists()


def test_without_lm_eval_installed_the_error_names_the_extra(ckpt, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # what `import lm_eval` meets when it is not installed
    assert main(["--ckpt", str(ckpt), "--tasks", "kobest_copa"]) == 2
    assert "pip install -e '.[eval]'" in capsys.readouterr().err


def test_chat_tasks_are_scored_on_the_rendered_chat_format(chat_ckpt, tokenizer, tmp_path, monkeypatch):
    """--chat: lm-eval's apply_chat_template on the export. The ids lm-eval scores are nanokor's rendered
    conversation (system message, the question as the user's turn, the assistant's header) followed by the
    choice, and the accuracies are what nanokor's own model gives on those ids."""
    from lm_eval.models.huggingface import HFLM

    scored = []
    original = HFLM._loglikelihood_tokens

    def recording(self, requests, *args, **kwargs):
        scored.extend((context, continuation) for _, context, continuation in requests)
        return original(self, requests, *args, **kwargs)

    monkeypatch.setattr(HFLM, "_loglikelihood_tokens", recording)
    write_task(tmp_path, "ko_mc_chat", [{"question": q, "choices": c, "label": a} for q, c, a in QUESTIONS],
               'output_type: multiple_choice\ndoc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\n'
               "doc_to_target: label\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    system = "다음 질문에 답하세요."
    assert lm_eval_run(chat_ckpt, "ko_mc_chat", tmp_path, "--chat", "--system", system,
                       "--out", str(tmp_path / "chat.json")) == 0
    report = json.loads((tmp_path / "chat.json").read_text(encoding="utf-8"))
    assert report["chat"] is True and report["system"] == system
    model = build_model(load_checkpoint(chat_ckpt))
    scored = {tuple(context + continuation): (context, continuation) for context, continuation in scored}
    acc = norm = 0
    for question, choices, answer in QUESTIONS:
        prompt = render(tokenizer, [{"role": "system", "content": system}, {"role": "user", "content": question}],
                        add_generation_prompt=True)[0]
        lls = []
        for choice in choices:
            # lm-eval moves the context's trailing "\n" into the continuation: the same ids, cut one earlier.
            context, continuation = scored.pop(tuple(prompt + tokenizer.encode(choice)))
            assert context == prompt[:-1]
            lls.append(continuation_logprob(model, context, continuation))
        acc += max(range(len(choices)), key=lambda i: lls[i]) == answer
        norm += max(range(len(choices)), key=lambda i: lls[i] / len(choices[i])) == answer
    assert not scored  # nothing else was scored
    result = report["results"]["ko_mc_chat"]
    assert (result["acc,none"], result["acc_norm,none"]) == (pytest.approx(acc / len(QUESTIONS)),
                                                             pytest.approx(norm / len(QUESTIONS)))


def test_chat_flags_need_tasks_and_system_needs_chat(ckpt, capsys):
    for args in (["--data-files", "x.txt", "--chat"], ["--tasks", "ko_mc", "--system", "조수"],
                 ["--tasks", "ko_mc", "--chat", "--system", " "]):
        with pytest.raises(SystemExit) as e:
            main(["--ckpt", str(ckpt), *args])
        assert e.value.code == 2
    err = capsys.readouterr().err
    assert "add --tasks" in err and err.count("--system needs --chat and some text") == 2
