"""chat.py driven as a user drives it: messages on stdin (multi-turn, /clear, /exit), the one-shot --prompt
mode, and the refusals. Replies are checked against greedy generation from the conversation's ids, built
here from the chat format's pieces, on a fresh model."""

import importlib.util
import io
import signal
import subprocess
import sys
import time
from pathlib import Path

import sentencepiece as spm
import torch

from nanokor.chat_format import REPLY_STOP_IDS, render, render_turn, reply_end, reply_header
from nanokor.checkpoint import build_model, load_checkpoint, save_checkpoint
from nanokor.generate import generate

REPO = Path(__file__).resolve().parents[1]
SYSTEM = "당신은 친절한 한국어 조수입니다."
MAX_NEW = 16  # short replies: the tests' conversations fit the chat model's 256-token context


def chat(ckpt, *args, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "chat.py", "--ckpt", str(ckpt), "--temperature", "0", "--max-new-tokens",
                           str(MAX_NEW), *args], cwd=REPO, input=stdin, capture_output=True, text=True,
                          encoding="utf-8")


def expected_replies(ckpt, tokenizer, lines: list[str], system: str | None = None) -> list[str]:
    """What chat.py should answer to each message line (commands skipped): greedy replies, each generated
    from the whole conversation's ids by a fresh decode, replies kept as their own ids."""
    model = build_model(load_checkpoint(ckpt))
    start = [tokenizer.bos_id, *(render_turn(tokenizer, "system", system)[0] if system else [])]
    conversation, replies = list(start), []
    for line in lines:
        if line == "/exit":
            break
        if line == "/clear":
            conversation = list(start)
            continue
        prompt = conversation + render_turn(tokenizer, "user", line)[0] + reply_header(tokenizer)
        if conversation == start:  # a conversation's first prompt is the renderer's
            messages = [{"role": "system", "content": system}] if system else []
            assert prompt == render(tokenizer, [*messages, {"role": "user", "content": line}],
                                    add_generation_prompt=True)[0]
        assert len(prompt) + MAX_NEW <= model.config.max_seq_len  # chat.py drops no turn
        out = [t.item() for t in generate(model, torch.tensor([prompt]), MAX_NEW, temperature=0,
                                          stop_ids=REPLY_STOP_IDS)]
        reply = out[:-1] if out and out[-1] in REPLY_STOP_IDS else out
        replies.append(tokenizer.decode(reply))
        conversation = prompt + reply + reply_end(tokenizer)
    return replies


def test_a_conversation_on_stdin_with_clear_and_exit(chat_ckpt, tokenizer):
    lines = ["안녕하세요", "한국의 수도는 어디인가요?", "/clear", "세종대왕은 누구인가요?", "그분이 만든 것은?", "/exit",
             "exit 뒤의 메시지"]
    proc = chat(chat_ckpt, "--system", SYSTEM, stdin="".join(line + "\n" for line in lines))
    assert proc.returncode == 0, proc.stderr
    replies = expected_replies(chat_ckpt, tokenizer, lines, SYSTEM)
    assert len(replies) == 4 and len(set(replies)) == 4
    assert proc.stdout == "".join(reply + "\n" for reply in replies)
    assert "conversation cleared (the system message stays)" in proc.stderr and "Traceback" not in proc.stderr
    # Without /clear the third answer is another one: the conversation is really carried over.
    assert expected_replies(chat_ckpt, tokenizer, [lines[0], lines[1], lines[3]], SYSTEM)[2] != replies[2]


def test_one_shot_prompt_prints_the_reply_alone(chat_ckpt, tokenizer):
    question = "한국의 수도는 어디인가요?"
    proc = chat(chat_ckpt, "--prompt", question)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == expected_replies(chat_ckpt, tokenizer, [question])[0] + "\n"
    with_system = chat(chat_ckpt, "--prompt", question, "--system", SYSTEM)
    assert with_system.stdout == expected_replies(chat_ckpt, tokenizer, [question], SYSTEM)[0] + "\n"


def test_commands_and_blank_lines_never_reach_the_model_and_lines_can_continue(chat_ckpt, tokenizer):
    proc = chat(chat_ckpt, stdin="\n/help\n/what\n첫 줄\\\n둘째 줄\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == expected_replies(chat_ckpt, tokenizer, ["첫 줄\n둘째 줄"])[0] + "\n"
    assert "unknown command /what" in proc.stderr and proc.stderr.count("/clear: forget the conversation") == 2


def test_a_base_model_is_warned_about_and_a_pre_chat_tokenizer_refused(ckpt, tmp_path):
    proc = chat(ckpt, "--prompt", "안녕")
    assert proc.returncode == 0 and "warning:" in proc.stderr and "not fine-tuned to chat" in proc.stderr
    old = io.BytesIO()  # a tokenizer as prepare.py trained them before the chat tokens
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(["가나다라 마바사 아자차카 타파하"] * 50), model_writer=old, vocab_size=300,
        hard_vocab_limit=False, byte_fallback=True, user_defined_symbols=["\n"], unk_id=0, bos_id=1, eos_id=2,
        pad_id=3, minloglevel=2)
    state = load_checkpoint(ckpt)
    state.update(tokenizer=old.getvalue(), chat=True)
    save_checkpoint(state, tmp_path / "old.pt")
    proc = chat(tmp_path / "old.pt", "--prompt", "안녕")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("error: ") and "Re-run prepare.py" in proc.stderr and "Traceback" not in proc.stderr


def test_bad_messages_are_one_paragraph_and_an_interactive_chat_goes_on(chat_ckpt, tokenizer):
    too_long = "아주 긴 메시지 " * 120
    for args in (["--prompt", "  "], ["--prompt", too_long], ["--system", "", "--prompt", "안녕"]):
        proc = chat(chat_ckpt, *args)
        assert proc.returncode == 2 and proc.stdout == "" and "Traceback" not in proc.stderr, args
        assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("error: ")
    proc = chat(chat_ckpt, stdin=f"{too_long}\n안녕\n")
    assert proc.returncode == 0 and "leaves no room for a reply" in proc.stderr
    assert proc.stdout == expected_replies(chat_ckpt, tokenizer, ["안녕"])[0] + "\n"


def test_a_long_conversation_drops_its_oldest_turns_and_says_so(chat_ckpt):
    proc = chat(chat_ckpt, "--system", SYSTEM, stdin="".join(f"{i}번째 질문입니다. 답해 주세요.\n" for i in range(12)))
    assert proc.returncode == 0, proc.stderr
    assert "outgrew the model's context of 256 tokens: dropped the oldest" in proc.stderr
    assert "the system message stays" in proc.stderr


def test_ctrl_c_at_the_prompt_and_a_reader_that_leaves_end_quietly(chat_ckpt, tokenizer):
    first = expected_replies(chat_ckpt, tokenizer, ["안녕"])[0] + "\n"
    # Ctrl-C's default action, as in a terminal (a shell's background job starts with SIGINT ignored).
    proc = subprocess.Popen([sys.executable, "chat.py", "--ckpt", str(chat_ckpt), "--temperature", "0",
                             "--max-new-tokens", str(MAX_NEW)], cwd=REPO, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    proc.stdin.write("안녕\n".encode())
    proc.stdin.flush()
    got = b""
    while len(got) < len(first.encode()):  # the reply is out: chat.py now waits for the next message
        got += proc.stdout.read1(4096)
    assert got.decode() == first
    for _ in range(5):  # a Ctrl-C that lands before chat.py is back at its prompt stops the (ended) reply instead
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        try:
            assert proc.wait(timeout=10) == 130
            break
        except subprocess.TimeoutExpired:
            continue
    assert proc.returncode == 130 and b"Traceback" not in proc.stderr.read()
    proc.stdin.close()
    proc = subprocess.Popen([sys.executable, "chat.py", "--ckpt", str(chat_ckpt), "--max-new-tokens", "100"],
                            cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdin.write("질문\n".encode() * 50)
    proc.stdin.close()
    proc.stdout.read(1)  # as `| head -c 1` would
    proc.stdout.close()
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 1 and "Traceback" not in stderr, stderr


def test_compile_flag_decodes_with_the_compiled_step_and_replies_stream(chat_ckpt, tokenizer, monkeypatch, compile_spy):
    sys.path.insert(0, str(REPO))  # chat.py imports sample.py's flags
    spec = importlib.util.spec_from_file_location("chat_cli", REPO / "chat.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    writes = []
    out = type("Recorder", (), {"write": lambda self, s: writes.append(s), "flush": lambda self: None})()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO("안녕\n수도는?\n".encode())))
    assert cli.main(["--ckpt", str(chat_ckpt), "--temperature", "0", "--max-new-tokens", str(MAX_NEW), "--compile"]) == 0
    assert compile_spy == [{"dynamic": False, "fullgraph": True, "options": {"cpp_wrapper": True}}]
    assert "".join(writes) == "".join(r + "\n" for r in expected_replies(chat_ckpt, tokenizer, ["안녕", "수도는?"]))
    assert len(writes) >= MAX_NEW  # a write per token, not one per reply
