"""The server's generation worker: one thread that owns the model, fed by a bounded queue.

A model's KV cache (and a compiled Decoder's static caches) belong to one generation at a time, so the
server runs every generation on this one thread, one request after another, and the HTTP side only
queues requests and relays their text. The queue is bounded: when it is full, `submit` refuses at
once (the server answers 503) instead of letting clients wait without end. A request asking for n
choices of one prompt runs them as one batch of n rows, which costs little more than one.

The worker turns token ids into text (`Reply`): whole characters only (StreamDecoder), cut before a
stop string, which is never emitted, even when it arrives split across tokens. A job whose client has
gone is cancelled: the worker checks between tokens and moves on to the next request.
"""

import asyncio
import logging
import queue
import secrets
import threading
import time
from contextlib import closing
from dataclasses import dataclass
from itertools import islice

import torch

from nanokor.generate import StreamDecoder, generate

log = logging.getLogger("nanokor.serve")


class QueueFull(Exception):
    """The bounded queue holds as many requests as it may: come back later."""


@dataclass(frozen=True)
class GenerationRequest:
    """What to generate: every prompt (token ids, BOS included) n times, each row up to its prompt's
    max_tokens (already fitted to the context), with generate()'s sampling arguments."""

    prompts: tuple[tuple[int, ...], ...]
    max_tokens: tuple[int, ...]
    n: int = 1
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop_ids: tuple[int, ...] = ()  # ids that end a reply (not part of its text); () = none
    stop: tuple[str, ...] = ()  # strings that end a reply; the text stops just before one


@dataclass(frozen=True)
class Delta:
    """New text of choice `index` (prompt p's row j is index p * n + j); finish_reason is set on the
    choice's last delta: "stop" (a stop id or string) or "length" (max_tokens or the context)."""

    index: int
    text: str
    finish_reason: str | None = None


@dataclass(frozen=True)
class Done:
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Failed:
    message: str


class Reply:
    """One choice's text as its tokens arrive. `push(id)` returns the text that can be shown now: whole
    characters, minus any tail that might be the start of a stop string (held until the next token
    tells). `tokens` counts the generated tokens, the stop token included."""

    def __init__(self, tokenizer, stop_ids=(), stop=()):
        self._stream = StreamDecoder(tokenizer)
        self._stop_ids, self._stop = frozenset(stop_ids), tuple(stop)
        self._pending = ""  # decoded text not yet released
        self.tokens = 0
        self.finish_reason: str | None = None

    def push(self, token_id: int) -> str:
        if self.finish_reason:
            return ""
        self.tokens += 1
        if token_id in self._stop_ids:
            return self._finish("stop")
        self._pending += self._stream.push(token_id)
        return self._release()

    def end(self) -> str:
        """The generation ran out of tokens: release what is held."""
        return "" if self.finish_reason else self._finish("length")

    def _finish(self, reason: str) -> str:
        self._pending += self._stream.flush()
        text = self._release()  # a stop string in the held text wins: its reason is then "stop"
        if not self.finish_reason:
            text, self._pending, self.finish_reason = text + self._pending, "", reason
        return text

    def _release(self) -> str:
        text = self._pending
        cut = min((i for i in (text.find(s) for s in self._stop) if i >= 0), default=-1)
        if cut >= 0:
            self._pending, self.finish_reason = "", "stop"
            return text[:cut]
        # Hold the longest tail that a stop string starts with: the next token may complete it.
        hold = max((k for s in self._stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        self._pending = text[len(text) - hold:]
        return text[:len(text) - hold]


class Job:
    """A request on its way through the worker. The worker emits Delta, then Done or Failed, onto
    `events`, an asyncio queue read by the HTTP handler on the event loop; `cancel()` (from any thread)
    stops the generation at the next token."""

    def __init__(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop):
        self.request = request
        self.events: asyncio.Queue = asyncio.Queue()
        self._loop = loop
        self._cancelled = threading.Event()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        self._cancelled.set()

    def emit(self, event) -> None:
        try:
            self._loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop has closed (the server is stopping): nobody is listening
            self.cancel()


class GenerationWorker:
    """The thread that runs every generation, one job at a time, over one Decoder."""

    def __init__(self, decoder, tokenizer, max_queue: int = 64):
        self.decoder, self.tokenizer = decoder, tokenizer
        self.device = decoder.model.lm_head.weight.device
        self.max_queue = max_queue
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._thread = threading.Thread(target=self._run, name="nanokor-generation", daemon=True)
        self.busy = False  # a job is generating
        self.tokens_generated = 0  # over all jobs, every row: the load the model has carried
        self.jobs_done = 0

    @property
    def waiting(self) -> int:
        return self._queue.qsize()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Cancel what waits and let the thread end after its current token."""
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.cancel()
                job.emit(Failed("The server is shutting down."))
        self._queue.put(None)

    def submit(self, job: Job) -> None:
        """Queue a job, or raise QueueFull at once."""
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise QueueFull from None

    def warm_up(self, samplings) -> float:
        """Run each sampling setting (dicts of generate's keyword arguments) at batch 1 in every static
        KV-cache length bucket (a power of two from 256 up to the context), so a compiled Decoder has
        compiled them all before the first request. Returns the seconds it took."""
        start, context = time.perf_counter(), self.decoder.model.config.max_seq_len
        length = 256
        while True:
            total = min(length, context)
            idx = torch.tensor([[self.tokenizer.bos_id]], device=self.device)
            for sampling in samplings:  # two tokens compile the step; the bucket follows from the total
                with closing(generate(self.decoder, idx, total - 1, **sampling)) as tokens:
                    list(islice(tokens, 2))
            if total == context:
                return time.perf_counter() - start
            length *= 2

    def _run(self) -> None:
        while (job := self._queue.get()) is not None:
            if job.cancelled:
                continue
            self.busy = True
            try:
                job.emit(self._generate(job))
            except Exception as e:  # a bug, not the client's fault: log it, answer 500, keep serving
                log.exception("generation failed")
                job.emit(Failed(f"Generation failed: {type(e).__name__}: {e}"))
            finally:
                self.busy = False
                self.jobs_done += 1

    def _generate(self, job: Job) -> Done | Failed:
        r = job.request
        seed = r.seed if r.seed is not None else secrets.randbits(63)
        generator = torch.Generator(self.device).manual_seed(seed)
        completion_tokens = 0
        for p, (prompt, max_tokens) in enumerate(zip(r.prompts, r.max_tokens)):
            replies = [Reply(self.tokenizer, r.stop_ids, r.stop) for _ in range(r.n)]
            idx = torch.tensor([prompt] * r.n, device=self.device)
            tokens = generate(self.decoder, idx, max_tokens, temperature=r.temperature, top_k=r.top_k, top_p=r.top_p,
                              repetition_penalty=r.repetition_penalty, stop_ids=r.stop_ids or None,
                              generator=generator)
            with closing(tokens):
                for token in tokens:
                    if job.cancelled:
                        return Failed("cancelled")
                    for j, (reply, token_id) in enumerate(zip(replies, token.tolist())):
                        if not reply.finish_reason:
                            self.tokens_generated += 1
                            self._emit(job, p * r.n + j, reply, reply.push(token_id))
                    if all(reply.finish_reason for reply in replies):  # stop strings end rows generate() can't see
                        break
            for j, reply in enumerate(replies):
                if not reply.finish_reason:
                    self._emit(job, p * r.n + j, reply, reply.end())
                completion_tokens += reply.tokens
        return Done(sum(map(len, r.prompts)), completion_tokens)

    @staticmethod
    def _emit(job: Job, index: int, reply: Reply, text: str) -> None:
        if text or reply.finish_reason:
            job.emit(Delta(index, text, reply.finish_reason))
