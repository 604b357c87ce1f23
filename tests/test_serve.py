"""The server (nanokor.serve): the official openai client against a live server on 127.0.0.1, raw HTTP
for malformed requests, 50 concurrent streams, disconnects and a full queue, the command line, and
the chat page in a real headless Chromium. Replies are checked against nanokor's own generate()."""

import asyncio
import contextlib
import json
import re
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import torch
import uvicorn

from nanokor.chat_format import REPLY_STOP_IDS, render
from nanokor.checkpoint import build_model, load_checkpoint, save_checkpoint
from nanokor.errors import ServeError, exit_on_error
from nanokor.generate import StreamDecoder, encode_prompt, generate
from nanokor.serve import load_served, main as serve_main, require_serve_extra, warm_up
from nanokor.serve_api import create_app
from nanokor.serve_worker import Reply
from test_chat_format import _old_tokenizer
from tiny_checkpoint import make_checkpoint
from conftest import REPO

CONTEXT = 1024  # long enough that an unstopped generation would take seconds (the disconnect tests)
SYSTEM = "당신은 친절한 한국어 도우미입니다."
QUESTION = "한국의 수도는 어디인가요?"


def _checkpoint(path, tokenizer, chat: bool):
    """The tiny random model with CONTEXT positions; `chat` marks it SFT-trained, as train.py's SFT does."""
    make_checkpoint(path, tokenizer, max_seq_len=CONTEXT)
    if chat:
        ckpt = load_checkpoint(path)
        save_checkpoint({k: v for k, v in ckpt.items() if not k.startswith("format")} | {"chat": True}, path)
    return path


@pytest.fixture(scope="module")
def chat_ckpt(tmp_path_factory, tokenizer):
    return _checkpoint(tmp_path_factory.mktemp("serve") / "chat.pt", tokenizer, chat=True)


@pytest.fixture(scope="module")
def engine(chat_ckpt):
    """The same model, outside the server: the reference for every reply."""
    return build_model(load_checkpoint(chat_ckpt))


class LiveServer:
    """create_app on uvicorn in a thread, on a port the OS picked (the socket is bound before it starts)."""

    def __init__(self, served, api_key=None):
        self.served = served
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        config = uvicorn.Config(create_app(served, api_key=api_key), log_level="warning", timeout_graceful_shutdown=1)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)

    def client(self, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=kwargs.pop("api_key", "unused"), max_retries=0,
                             **kwargs)

    def health(self) -> dict:
        return httpx.get(self.url + "/health").json()

    def wait_idle(self, timeout: float) -> float:
        """Seconds until the worker has nothing running or waiting; fails after `timeout`."""
        start = time.monotonic()
        while True:
            h = self.health()
            if not h["busy"] and not h["waiting"]:
                return time.monotonic() - start
            assert time.monotonic() - start < timeout, f"the worker is still busy after {timeout} s: {h}"
            time.sleep(0.02)

    def close(self):
        self.server.should_exit = True
        self.thread.join(10)


@contextlib.contextmanager
def live(ckpt, api_key=None, **kwargs):
    server = LiveServer(load_served(ckpt, **kwargs), api_key=api_key)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def server(chat_ckpt):
    with live(chat_ckpt) as s:
        yield s


def reference(engine, tokenizer, ids, max_tokens, stop_ids):
    """(text, tokens generated, finish reason) of nanokor's greedy generation, the stop id included, the
    text as sample.py streams it (StreamDecoder; it differs from tokenizer.decode only on invalid UTF-8)."""
    out = []
    for token in generate(engine, torch.tensor([ids]), max_tokens, temperature=0, stop_ids=stop_ids):
        out.append(token.item())
        if out[-1] in stop_ids:
            break
    stream = StreamDecoder(tokenizer)
    text = "".join(stream.push(t) for t in out if t not in stop_ids) + stream.flush()
    return text, len(out), "stop" if out[-1] in stop_ids else "length"


def chat_ids(tokenizer, messages):
    return render(tokenizer, messages, add_generation_prompt=True)[0]


# ---- Reply: whole characters, stop strings never emitted

def test_a_hangul_syllable_split_over_byte_pieces_is_released_whole(tokenizer):
    pieces = tokenizer.encode("뷁")
    assert [tokenizer.id_to_piece(i) for i in pieces] == ["<0xEB>", "<0xB7>", "<0x81>"]  # the test's premise
    reply = Reply(tokenizer)
    assert [reply.push(i) for i in tokenizer.encode("안녕") + pieces] == ["안", "녕", "", "", "뷁"]
    assert reply.end() == "" and reply.finish_reason == "length" and reply.tokens == 5


def test_a_stop_string_split_across_tokens_stops_the_text_before_it(tokenizer):
    ids = tokenizer.encode("안녕하세요 반갑습니다")
    assert len(ids) == 6  # 안|녕|하세요|▁반|갑|습니다: the stop string "세요 반갑" spans three tokens
    reply = Reply(tokenizer, stop=("세요 반갑",))
    out = [reply.push(i) for i in ids]
    assert "".join(out) == "안녕하" and reply.finish_reason == "stop" and reply.tokens == 5
    assert out == ["안", "녕", "하", "", "", ""]  # "세요", "세요 반" held (each could start the stop string); done
    # A held prefix that turns out not to be the stop string is released with what follows.
    reply = Reply(tokenizer, stop=("세요 안",))
    assert "".join(reply.push(i) for i in ids) + reply.end() == "안녕하세요 반갑습니다"


def test_a_stop_id_ends_the_reply_and_is_not_text(tokenizer):
    reply = Reply(tokenizer, stop_ids=REPLY_STOP_IDS, stop=("xyz",))
    assert reply.push(tokenizer.encode("안")[0]) == "안"
    assert reply.push(tokenizer.encode("x")[0]) == ""  # held: it may start "xyz"
    assert reply.push(REPLY_STOP_IDS[0]) == "x" and reply.finish_reason == "stop" and reply.tokens == 3
    assert reply.push(tokenizer.encode("안")[0]) == "" and reply.tokens == 3


# ---- the openai client against the live server

def test_chat_reply_is_nanokors_greedy_reply_streamed_or_not(server, engine, tokenizer):
    client = server.client()
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}]
    ids = chat_ids(tokenizer, messages)
    text, n, finish = reference(engine, tokenizer, ids, 48, REPLY_STOP_IDS)
    assert text.strip()  # the comparison means something
    r = client.chat.completions.create(model="nanokor", messages=messages, temperature=0, max_tokens=48)
    assert r.object == "chat.completion" and r.model == "nanokor" and r.choices[0].message.role == "assistant"
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == (text, finish)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (len(ids), n, len(ids) + n)

    stream = client.chat.completions.create(model="nanokor", messages=messages, temperature=0, max_tokens=48,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(deltas) == text and len(deltas) > 3
    assert all("\ufffd" not in d for d in deltas) or "\ufffd" in text  # held until whole: no broken Hangul
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == finish
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == n


def test_stop_strings_cut_the_reply_and_are_never_sent(server, engine, tokenizer):
    client = server.client()
    messages = [{"role": "user", "content": QUESTION}]
    text, _, _ = reference(engine, tokenizer, chat_ids(tokenizer, messages), 48, REPLY_STOP_IDS)
    stop = text[len(text) // 2: len(text) // 2 + 3]  # likely across a token boundary; any cut works
    assert len(stop.strip()) == 3
    expected = text[:text.index(stop)]
    for stream in (False, True):
        r = client.chat.completions.create(model="nanokor", messages=messages, temperature=0, max_tokens=48,
                                           stop=[stop, "없는 멈춤 문자열"], stream=stream)
        got = ("".join(c.choices[0].delta.content or "" for c in r if c.choices) if stream
               else r.choices[0].message.content)
        assert got == expected


def test_completions_continue_bos_and_text_as_sample_does(server, engine, tokenizer):
    client = server.client()
    prompt = "대한민국의 역사는"
    ids = encode_prompt(tokenizer, prompt)
    text, n, finish = reference(engine, tokenizer, ids, 20, (tokenizer.eos_id,))
    r = client.completions.create(model="nanokor", prompt=prompt, temperature=0, max_tokens=20)
    assert (r.choices[0].text, r.choices[0].finish_reason, r.usage.prompt_tokens, r.usage.completion_tokens) == \
        (text, finish, len(ids), n)
    streamed = client.completions.create(model="nanokor", prompt=prompt, temperature=0, max_tokens=20, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == text
    echoed = client.completions.create(model="nanokor", prompt=prompt, temperature=0, max_tokens=20, echo=True)
    assert echoed.choices[0].text == prompt + text
    default = client.completions.create(model="nanokor", prompt=prompt, temperature=0)
    assert default.usage.completion_tokens == 16  # OpenAI's default max_tokens for completions


def test_seeded_sampling_repeats_and_n_choices_come_from_one_batch(server, tokenizer):
    client = server.client()
    ask = dict(model="nanokor", prompt="옛날 옛적에", max_tokens=12, temperature=1.0, n=3)
    a = client.completions.create(seed=7, **ask)
    b = client.completions.create(seed=7, **ask)
    c = client.completions.create(seed=8, **ask)
    texts = lambda r: [ch.text for ch in sorted(r.choices, key=lambda ch: ch.index)]  # noqa: E731
    assert texts(a) == texts(b) and texts(a) != texts(c)
    assert len(set(texts(a))) > 1  # three rows, three different samples
    assert a.usage.prompt_tokens == len(encode_prompt(tokenizer, "옛날 옛적에"))  # once, not n times
    assert 3 <= a.usage.completion_tokens <= 36


def test_models_health_and_page(server):
    models = server.client().models.list()
    assert [m.id for m in models.data] == ["nanokor"]
    card = httpx.get(server.url + "/v1/models/nanokor").json()
    assert (card["context_length"], card["chat"], card["chat_trained"]) == (CONTEXT, True, True)
    assert server.health()["status"] == "ok"
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "/v1/chat/completions" in page.text and "getReader" in page.text
    assert not re.search(r"(src|href|url)\s*[=(]\s*[\"']?(https?:)?//", page.text)  # nothing loaded from elsewhere


def test_errors_are_the_clients_typed_exceptions(server, tokenizer):
    client = server.client()
    chat = dict(messages=[{"role": "user", "content": QUESTION}])
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", **chat)
    assert e.value.status_code == 404 and e.value.code == "model_not_found" and "nanokor" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="nanokor", max_tokens=CONTEXT, **chat)
    assert e.value.code == "context_length_exceeded" and e.value.param == "max_tokens"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="nanokor", prompt="가나다 " * CONTEXT)
    assert e.value.code == "context_length_exceeded" and "context is 1024 tokens" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="nanokor", messages=[{"role": "user", "content": "a"},
                                                                    {"role": "user", "content": "b"}])
    assert e.value.param == "messages" and "'assistant' was expected" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="nanokor", temperature="hot", **chat)
    assert e.value.param == "temperature"
    with pytest.raises(openai.BadRequestError):  # streaming requests are refused before the stream starts
        client.chat.completions.create(model="nanokor", top_p=0, stream=True, **chat)
    assert client.chat.completions.create(model="nanokor", max_tokens=2, **chat).choices[0].finish_reason
    # OpenAI's other spellings: a developer message is the system message; content may be text parts.
    ask = lambda messages: client.chat.completions.create(  # noqa: E731
        model="nanokor", messages=messages, temperature=0, max_tokens=6).choices[0].message.content
    assert ask([{"role": "developer", "content": SYSTEM}, {"role": "user", "content": [
        {"type": "text", "text": QUESTION[:3]}, {"type": "text", "text": QUESTION[3:]}]}]) == \
        ask([{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}])


# Every malformed request gets a 4xx OpenAI error object, and the next valid request succeeds.
CHAT_OK = {"messages": [{"role": "user", "content": "안녕하세요"}], "max_tokens": 2}
MALFORMED = [
    ("chat", b'{"messages": [', 400, "invalid_json"),
    ("chat", b"[1, 2, 3]", 400, None),
    ("chat", b"", 400, None),
    ("chat", {"messages": "안녕"}, 400, "messages"),
    ("chat", {"messages": []}, 400, "messages"),
    ("chat", {}, 400, "messages"),
    ("chat", {"messages": [{"role": "user"}]}, 400, "messages.0.content"),
    ("chat", {"messages": [{"role": "user", "content": 3}]}, 400, "messages.0.content"),
    ("chat", {"messages": [{"role": "robot", "content": "x"}]}, 400, "messages"),
    ("chat", {"messages": [{"role": "user", "content": "  "}]}, 400, "messages"),
    ("chat", {"messages": [{"role": "assistant", "content": "x"}]}, 400, "messages"),
    ("chat", {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, 400, "messages"),
    ("chat", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400,
     "messages.0.content.0.type"),
    ("chat", {**CHAT_OK, "temperature": "0.5"}, 400, "temperature"),
    ("chat", {**CHAT_OK, "temperature": -1}, 400, "temperature"),
    ("chat", {**CHAT_OK, "temperature": None}, 400, "temperature"),
    ("chat", {**CHAT_OK, "top_p": 1.5}, 400, "top_p"),
    ("chat", {**CHAT_OK, "max_tokens": 0}, 400, "max_tokens"),
    ("chat", {**CHAT_OK, "max_tokens": 2.5}, 400, "max_tokens"),
    ("chat", {**CHAT_OK, "max_tokens": CONTEXT * 10}, 400, "max_tokens"),
    ("chat", {**CHAT_OK, "n": True}, 400, "n"),
    ("chat", {**CHAT_OK, "n": 1000}, 400, "n"),
    ("chat", {**CHAT_OK, "stream": "yes"}, 400, "stream"),
    ("chat", {**CHAT_OK, "stop": 3}, 400, "stop"),
    ("chat", {**CHAT_OK, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("chat", {**CHAT_OK, "stop": [""]}, 400, "stop.0"),
    ("chat", {**CHAT_OK, "seed": "1"}, 400, "seed"),
    ("chat", {**CHAT_OK, "model": "llama"}, 404, "model"),
    ("chat", {**CHAT_OK, "model": 7}, 400, "model"),
    ("chat", {"messages": [{"role": "user", "content": "가 " * 2 * CONTEXT}]}, 400, "messages"),
    ("completions", {"prompt": 5}, 400, "prompt"),
    ("completions", {"prompt": []}, 400, "prompt"),
    ("completions", {"prompt": "가나다 " * CONTEXT}, 400, "prompt"),
    ("completions", {"prompt": "가", "echo": 1}, 400, "echo"),
    ("completions", {"prompt": ["가"] * 4, "n": 5}, 400, "n"),
    ("form", b"prompt=x", 400, None),
    ("nowhere", {"prompt": "x"}, 404, None),
]


def test_every_malformed_request_gets_a_4xx_error_object_and_the_server_keeps_serving(server):
    urls = {"chat": "/v1/chat/completions", "completions": "/v1/completions", "form": "/v1/completions",
            "nowhere": "/v1/chat/complete"}
    with httpx.Client(base_url=server.url, timeout=30) as http:
        for endpoint, body, status, param in MALFORMED:
            content = body if isinstance(body, bytes) else json.dumps(body).encode()
            kind = "application/x-www-form-urlencoded" if endpoint == "form" else "application/json"
            r = http.post(urls[endpoint], content=content, headers={"Content-Type": kind})
            case = f"{endpoint} {content[:80]!r}"
            assert r.status_code == status, f"{case}: {r.status_code} {r.text}"
            error = r.json()["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["message"], case
            if param is not None and status == 400 and error["code"] != "invalid_json":
                assert error["param"] == param, f"{case}: {error}"
            elif param == "invalid_json":
                assert error["code"] == "invalid_json", case
            ok = http.post(urls["chat"], json=CHAT_OK)
            assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"], case
    assert server.health()["status"] == "ok"


# ---- load, disconnects, a full queue

def test_50_concurrent_streams_each_get_the_reply_they_would_get_alone(server):
    questions = [f"{i}번 질문입니다. 한국의 {topic}에 대해 알려 주세요." for i, topic in
                 enumerate(["역사", "수도", "음식", "언어", "산", "강", "노래", "과학", "수학", "바다"] * 5)]
    ask = lambda q: dict(model="nanokor", messages=[{"role": "user", "content": q}], temperature=0, max_tokens=6)  # noqa: E731
    client = server.client()
    alone = [client.chat.completions.create(**ask(q)).choices[0].message.content for q in questions]
    assert len(set(alone)) > 25  # different prompts, different replies: a mix-up would show

    async def together():
        peak, stop = 0, asyncio.Event()
        aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)

        async def one(q):
            stream = await aclient.chat.completions.create(stream=True, **ask(q))
            return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

        async def watch():  # how many requests waited at once: the streams really were concurrent
            nonlocal peak
            async with httpx.AsyncClient() as http:
                while not stop.is_set():
                    peak = max(peak, (await http.get(server.url + "/health")).json()["waiting"])
                    await asyncio.sleep(0.01)

        watcher = asyncio.create_task(watch())
        try:
            return await asyncio.gather(*(one(q) for q in questions)), peak
        finally:
            stop.set()
            await watcher

    replies, peak = asyncio.run(together())
    assert replies == alone
    assert peak >= 10


def test_a_client_that_leaves_mid_stream_frees_the_worker(server):
    client = server.client()
    before = server.health()["tokens_generated"]
    stream = client.completions.create(model="nanokor", prompt="옛날 옛적에", max_tokens=CONTEXT - 8, temperature=0,
                                       stream=True, extra_body={"ignore_eos": True})
    for _, _ in zip(range(3), stream):
        pass
    stream.close()
    assert server.wait_idle(timeout=5) < 5
    generated = server.health()["tokens_generated"] - before
    assert generated < (CONTEXT - 8) // 2, generated  # stopped early, not run to max_tokens
    # A plain (non-streaming) request whose client gives up is cancelled too.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", timeout=0.5,
                   json={"prompt": "옛날", "max_tokens": CONTEXT - 8, "ignore_eos": True, "temperature": 0})
    assert server.wait_idle(timeout=5) < 5
    assert client.completions.create(model="nanokor", prompt="옛날", max_tokens=3).usage.completion_tokens <= 3


def test_a_full_queue_answers_503_at_once(chat_ckpt):
    with live(chat_ckpt, max_queue=1) as s:
        client = s.client()
        long = dict(model="nanokor", prompt="옛날", max_tokens=CONTEXT - 8, stream=True,
                    extra_body={"ignore_eos": True})
        running = client.completions.create(**long)
        next(iter(running))
        waiting = client.completions.create(**long)  # answered with its headers, queued behind the first
        assert s.health()["waiting"] == 1
        start = time.monotonic()
        with pytest.raises(openai.InternalServerError) as e:
            client.completions.create(model="nanokor", prompt="옛날", max_tokens=2)
        assert e.value.status_code == 503 and e.value.code == "server_busy" and time.monotonic() - start < 2
        assert e.value.response.headers["Retry-After"] == "1"
        running.close()
        waiting.close()
        s.wait_idle(timeout=5)
        assert client.completions.create(model="nanokor", prompt="옛날", max_tokens=2).choices[0].text is not None


def test_a_failing_generation_is_a_500_error_object_and_the_worker_goes_on(server, monkeypatch):
    real = generate

    def failing(*args, **kwargs):
        raise RuntimeError("boom")
        yield
    monkeypatch.setattr("nanokor.serve_worker.generate", failing)
    client = server.client()
    with pytest.raises(openai.InternalServerError) as e:
        client.completions.create(model="nanokor", prompt="가", max_tokens=2)
    assert e.value.status_code == 500 and "RuntimeError: boom" in e.value.message
    with pytest.raises(openai.APIError, match="boom"):  # mid-stream, after the 200: an error event
        list(client.completions.create(model="nanokor", prompt="가", max_tokens=2, stream=True))
    monkeypatch.setattr("nanokor.serve_worker.generate", real)
    assert client.completions.create(model="nanokor", prompt="가", max_tokens=2).choices[0].text is not None


# ---- what the model can do, and the API key

def test_chat_needs_chat_tokens_and_a_base_model_is_served_with_a_warning(tmp_path, tokenizer):
    old = _checkpoint(tmp_path / "old.pt", _old_tokenizer(), chat=False)
    with live(old) as s:
        with pytest.raises(openai.BadRequestError) as e:
            s.client().chat.completions.create(model="nanokor", messages=[{"role": "user", "content": "안녕"}])
        assert e.value.code == "model_cannot_chat" and "Re-run prepare.py" in e.value.message
        assert s.client().completions.create(model="nanokor", prompt="가나다", max_tokens=3).choices
    base = _checkpoint(tmp_path / "base.pt", tokenizer, chat=False)
    with live(base) as s:
        raw = s.client().chat.completions.with_raw_response.create(
            model="nanokor", messages=[{"role": "user", "content": "안녕"}], max_tokens=3)
        assert "not chat-trained" in raw.headers["X-Nanokor-Warning"] and raw.parse().choices
        assert httpx.get(s.url + "/v1/models").json()["data"][0]["chat_trained"] is False


def test_an_api_key_guards_the_api_but_not_the_page(chat_ckpt):
    with live(chat_ckpt, api_key="s3cret") as s:
        with pytest.raises(openai.AuthenticationError) as e:
            s.client(api_key="wrong").models.list()
        assert e.value.status_code == 401 and "--api-key" in e.value.message
        assert httpx.get(s.url + "/v1/models").status_code == 401  # no key at all
        r = httpx.post(s.url + "/v1/chat/completions", content=b"{not json")  # the key is checked first
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert s.client(api_key="s3cret").completions.create(model="nanokor", prompt="가", max_tokens=2).choices
        assert httpx.get(s.url + "/").status_code == 200 and httpx.get(s.url + "/health").status_code == 200


def test_compile_warms_every_cache_bucket_before_the_first_request(chat_ckpt, engine, tokenizer, monkeypatch):
    # torch.compile replaced by the function itself (as in test_generate): the static-cache path runs
    # exactly as compiled, in seconds. bench/serve_load.py --compile runs the real compiler.
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)
    served = load_served(chat_ckpt, mode="compile")
    warm_up(served)
    steps = served.worker.decoder._steps
    assert {(key[1], key[3].temperature) for key in steps} == {(n, t) for n in (256, 512, 1024) for t in (0.0, 0.8)}
    with contextlib.closing(LiveServer(served)) as s:
        messages = [{"role": "user", "content": QUESTION}]
        r = s.client().chat.completions.create(model="nanokor", messages=messages, temperature=0, max_tokens=20)
        assert len(steps) == 6  # served by a warmed step: nothing new was built
        assert r.choices[0].message.content == reference(engine, tokenizer, chat_ids(tokenizer, messages), 20,
                                                         REPLY_STOP_IDS)[0]


# ---- the command line

def test_the_command_serves_and_says_what_is_wrong(chat_ckpt, tmp_path, monkeypatch, capsys):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    proc = subprocess.Popen([sys.executable, "-m", "nanokor.serve", "--ckpt", str(chat_ckpt), "--port", str(port),
                             "--api-key", "k"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the server did not come up"
                time.sleep(0.2)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0)
        assert client.chat.completions.create(model="nanokor", messages=[{"role": "user", "content": "안녕"}],
                                              max_tokens=3).choices[0].message.content is not None
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0]
    assert "a chat model" in out and f"http://127.0.0.1:{port}/" in out
    assert exit_on_error(serve_main, ["--ckpt", str(tmp_path / "missing.pt")]) == 2
    assert "error: No checkpoint at" in capsys.readouterr().err
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None if name == "uvicorn" else object())
    with pytest.raises(ServeError, match=r"'serve' extra, and uvicorn is not installed.*pip install -e \"\.\[serve\]\""):
        require_serve_extra()


# ---- the page, in a real browser

def _browser(tmp_path):
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        pytest.skip("the page test needs Chromium and its driver: apt-get install -y chromium chromium-driver "
                    "(.ci/run installs them)")
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    # Without the background-networking flags Chromium keeps calling home, which a closed network floods.
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1100,760", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = webdriver.ChromeService(executable_path=shutil.which("chromedriver"))
    return webdriver.Chrome(options=options, service=service)


def test_the_chat_page_streams_the_apis_greedy_replies_in_a_real_browser(server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    driver = _browser(tmp_path)
    try:
        driver.get(server.url + "/")
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: d.find_element(By.ID, "model").text.startswith("nanokor"))
        driver.find_element(By.ID, "system").send_keys(SYSTEM)
        driver.execute_script("const t = document.getElementById('temperature'); t.value = '0';"
                              "t.dispatchEvent(new Event('input'));")
        driver.find_element(By.ID, "max-tokens").send_keys("40")
        client, history = server.client(), []

        def say(text):
            driver.find_element(By.ID, "input").send_keys(text, Keys.ENTER)
            history.append({"role": "user", "content": text})
            wait.until(lambda d: d.execute_script(
                "return document.body.dataset.state === 'idle' && "
                f"document.querySelectorAll('.msg.assistant[data-done=true]').length === {len(history) // 2 + 1}"))
            expected = client.chat.completions.create(
                model="nanokor", messages=[{"role": "system", "content": SYSTEM}] + history, temperature=0,
                max_tokens=40).choices[0].message.content
            assert expected.strip()
            shown = driver.execute_script("const m = document.querySelectorAll('.msg.assistant');"
                                          "return m[m.length - 1].textContent;")
            assert shown == expected
            history.append({"role": "assistant", "content": expected})
            assert driver.execute_script("return window.nanokorChat.messages") == history

        say(QUESTION)
        say("조금 더 자세히 설명해 주세요.")
        assert [e.text for e in driver.find_elements(By.CSS_SELECTOR, ".msg.user")] == [QUESTION, "조금 더 자세히 설명해 주세요."]
        shot = tmp_path / "chat.png"
        assert driver.save_screenshot(str(shot))
        width, height = struct.unpack(">II", shot.read_bytes()[16:24])  # the PNG header's size
        assert (width, height) == tuple(driver.execute_script("return [innerWidth, innerHeight]"))
        resources = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
        assert all(url.startswith(server.url) for url in resources), resources  # nothing from elsewhere
        assert not [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]

        driver.find_element(By.ID, "clear").click()
        assert driver.find_elements(By.CSS_SELECTOR, ".msg") == []
        assert driver.execute_script("return window.nanokorChat.messages") == []
    finally:
        driver.quit()
