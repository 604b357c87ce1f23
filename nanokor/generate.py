"""Autoregressive generation with the KV cache, and streaming detokenization.

`generate` prefills the cache with the whole prompt in one forward, then feeds one token per step.
The step is the hot loop of bench/sample_speed.py, so it stays free of host syncs unless an EOS id
asks for an early stop, and the optional logit processors (repetition penalty, top-k, top-p) cost
nothing when they are off. Processing order follows transformers: repetition penalty, temperature,
top-k, top-p, then a draw. A `Decoder` makes the step fast: eager, replayed as a CUDA graph, or
compiled, each over a static KV cache it keeps between calls.

`StreamDecoder` turns ids into text as they arrive. Byte-fallback pieces (`<0xEA>`) can split a
Hangul syllable across tokens, so it feeds raw bytes through an incremental UTF-8 decoder that holds
back an incomplete character until its last byte arrives instead of printing U+FFFD.

Prompt encoding and the prompt-length rule (`room_to_generate`) live here too, for sample.py and
train.py's eval sample alike.
"""

import codecs
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from nanokor.errors import PromptError


def encode_prompt(tokenizer, text: str | None) -> list[int]:
    """BOS followed by the tokens of `text` (None: BOS alone, i.e. unconditional sampling).

    Training documents start with BOS, so a prompt does too: the model then sees the same kind of
    context it learned from, and an empty prompt is still a valid one-token context.
    """
    ids = [] if text is None else tokenizer.encode(text)
    if text is not None and not ids:
        raise PromptError(f"The prompt {text!r} tokenizes to nothing, so there is no text to continue. Pass a "
                          "prompt with some text, or omit --prompt/--prompt-file to sample unconditionally.")
    return [tokenizer.bos_id, *ids]


def room_to_generate(prompt_len: int, max_new_tokens: int, max_seq_len: int) -> int:
    """How many of max_new_tokens fit after a prompt of prompt_len tokens in the model's context. A
    prompt that leaves no room at all is a PromptError."""
    if prompt_len >= max_seq_len:
        raise PromptError(f"The prompt is {prompt_len} tokens (with BOS), but the model's context is "
                          f"{max_seq_len} tokens, leaving no room to generate. Shorten the prompt to at most "
                          f"{max_seq_len - 2} tokens.")
    return min(max_new_tokens, max_seq_len - prompt_len)


def _check_args(model, prompt_len: int, max_new_tokens: int, temperature, top_k, top_p, repetition_penalty):
    problems = []
    if max_new_tokens < 1:
        problems.append(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if prompt_len < 1:
        problems.append("the prompt is empty; pass at least one token (e.g. the BOS id)")
    if temperature < 0:
        problems.append(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        problems.append(f"top_k must be a positive integer or None, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        problems.append(f"top_p must be in (0, 1] or None, got {top_p}")
    if repetition_penalty <= 0:
        problems.append(f"repetition_penalty must be > 0 (1 disables it), got {repetition_penalty}")
    if problems:
        raise ValueError("Invalid generation arguments: " + "; ".join(problems) + ".")
    limit = model.config.max_seq_len
    if prompt_len + max_new_tokens > limit:
        raise ValueError(f"A prompt of {prompt_len} tokens plus max_new_tokens={max_new_tokens} exceeds the "
                         f"model's max_seq_len ({limit}); generate at most {max(limit - prompt_len, 0)} new "
                         "tokens or shorten the prompt.")


def _cache_dtype(device: torch.device):
    """Under autocast the keys/values come out in the autocast dtype; store them so (None = param dtype)."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


def _autocast_uncached(device_type: str):
    """The autocast in force, with its cache of low-precision weight copies off; a no-op without autocast.

    For capturing a CUDA graph: autocast keeps each weight's cast copy until the outermost autocast
    exits. A graph captured while that cache is on reads the cached copy instead of recording the
    cast, so a replay after that autocast exited reads freed memory. Without the cache the casts are
    recorded in the graph and redone at every replay (one pass over the weights per token)."""
    if not torch.is_autocast_enabled(device_type):
        return nullcontext()
    return torch.autocast(device_type, dtype=torch.get_autocast_dtype(device_type), cache_enabled=False)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty as transformers applies it: for tokens already in the sequence, divide positive
    logits by `penalty` and multiply negative ones, so both move toward less likely."""
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen from the logits, split so the choice itself has no random-number
    generator in it: `race` draws the noise (eagerly, from a torch.Generator), `choose` is a pure
    function of logits, seen tokens and noise, which a compiled or CUDA-graph step can contain."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0

    @property
    def penalize(self) -> bool:
        return self.repetition_penalty != 1.0

    def race(self, shape, device, generator=None) -> torch.Tensor | None:
        """E ~ Exp(1), one per candidate column (B, top_k or vocab); None for greedy decoding."""
        if self.temperature == 0:
            return None
        batch, vocab = shape
        columns = self.top_k if self.top_k is not None and self.top_k < vocab else vocab
        return torch.empty(batch, columns, device=device).exponential_(generator=generator)

    def draw(self, logits: torch.Tensor, seen: torch.Tensor | None = None, generator=None) -> torch.Tensor:
        """Next token ids (B,) from last-position logits (B, vocab), the noise drawn here."""
        return self.choose(logits, seen, self.race(logits.shape, logits.device, generator))

    def choose(self, logits: torch.Tensor, seen: torch.Tensor | None, race: torch.Tensor | None) -> torch.Tensor:
        """Next token ids (B,): repetition penalty over `seen`, then temperature, top-k, top-p, a draw."""
        if self.penalize:
            logits = apply_repetition_penalty(logits, seen, self.repetition_penalty)
        if self.temperature == 0:
            return logits.argmax(dim=-1)
        logits = logits.float() / self.temperature
        candidates = None  # vocabulary ids of the (sorted) candidate columns; None = the whole vocab
        if self.top_k is not None and self.top_k < logits.size(-1):
            logits, candidates = torch.topk(logits, self.top_k, dim=-1)  # sorted descending
        if self.top_p is not None and self.top_p < 1:
            if candidates is None:
                logits, candidates = torch.sort(logits, dim=-1, descending=True)
            probs = torch.softmax(logits, dim=-1)
            # The nucleus is the shortest prefix whose mass reaches top_p: drop a token when the mass
            # before it already does. The most likely token always survives.
            outside = (probs.cumsum(dim=-1) - probs) >= self.top_p
            logits = logits.masked_fill(outside, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        # Exponential-race draw: argmax(p / E) with E ~ Exp(1) samples from p, without the host sync
        # that torch.multinomial's input validation costs on CUDA. The clamp keeps a (rare) E = 0 from
        # turning a zero-probability token into 0/0 = NaN, which argmax would pick.
        choice = (probs / race.clamp(min=torch.finfo(probs.dtype).tiny)).argmax(dim=-1)
        return choice if candidates is None else candidates.gather(-1, choice[:, None]).squeeze(-1)


DECODE_MODES = ("eager", "graph", "compile")


class Decoder:
    """A model's one-token decoding step, made fast once and reused by every `generate` call.

    A step feeds one token (B,) and returns the next, chosen by a `Sampling` from the noise it is given.
    The KV cache is kept between calls, its length a bucket (a power of two from 256 up to max_seq_len),
    and remembers the token ids it holds: a batch-1 prompt that continues them (a chat's next turn)
    prefills only what is new.
    mode "eager": the model's forward per token; its attention reads the filled part of the cache.
    The other modes fix every shape with a static KV cache (see KVCache), one per batch size and
    bucket, so one graph serves every prompt and position of a bucket, and contain the whole step,
    sampling included:
    - "graph" (CUDA): the eager step captured once as a CUDA graph and replayed, so a token costs one
      launch instead of a Python dispatch per op. No compilation: it pays from the first sample.
    - "compile": torch.compile of the step (on CUDA also captured as a CUDA graph: mode="reduce-overhead").
      The fastest path on a CPU; compiling costs ~15-20 s per bucket and sampling setting there.
    The prefill stays eager in every mode: its length varies and it runs once. The graphs and the cache
    are made for the model as it is: after moving it to another device or dtype, or changing its
    weights, make a new Decoder. One generation at a time: the calls share the cache.
    """

    def __init__(self, model, mode: str = "eager"):
        if mode not in DECODE_MODES:
            raise ValueError(f"Unknown decode mode {mode!r}; choose one of {DECODE_MODES}.")
        cuda = model.lm_head.weight.is_cuda
        if mode == "graph" and not cuda:
            raise ValueError("Decode mode 'graph' captures a CUDA graph and needs the model on a CUDA device; "
                             "on a CPU use mode 'compile' (sample.py --compile) or 'eager'.")
        self.model, self.mode = model, mode
        self._caches = {}  # (batch, length, dtype) -> KVCache: every bucket in the static modes, the latest in eager
        self._steps = {}  # (batch, length, dtype, sampling) -> step function
        self._held = None  # (cache, the token ids it holds): what a batch-1 prompt may reuse, see `prefill`
        if mode == "compile":  # on a CPU the C++ wrapper saves 12% of a token (2.58 -> 2.28 ms, 13.4M model)
            how = {"mode": "reduce-overhead"} if cuda else {"options": {"cpp_wrapper": True}}
            self._compiled = torch.compile(self._decode_one, dynamic=False, fullgraph=True, **how)

    def _decode_one(self, token, cache, sampling: Sampling, seen, race) -> torch.Tensor:
        return sampling.choose(self.model(token[:, None], kv_cache=cache)[0][:, -1], seen, race)

    def prefill(self, idx: torch.Tensor, max_new_tokens: int, sampling: Sampling):
        """Prefill the prompt idx (B, T) into a KV cache. Returns the logits (B, vocab) of the next token
        and the step function: (token, seen, race) -> the token after it.

        A batch-1 prompt that starts with tokens the decoder has already processed (the prompt and the
        fed tokens of its last batch-1 generation) prefills only the rest: a chat's earlier turns are
        computed once. The match is on token ids, so any prompt is safe: one that diverges reuses what
        comes before the divergence, one from another conversation nothing."""
        B, T = idx.shape
        dtype = _cache_dtype(idx.device)
        # One length per power of two (from 256 up to the context), so one graph serves a whole bucket; eager
        # attention reads only the filled part, so there the rounding costs memory alone.
        length = min(self.model.config.max_seq_len, max(256, 1 << (T + max_new_tokens - 1).bit_length()))
        key = (B, length, dtype)
        if key not in self._caches:
            if self.mode == "eager":  # nothing is bound to an eager cache: keep one
                self._caches.clear()
            self._caches[key] = self.model.make_kv_cache(B, length, dtype=dtype, static=self.mode != "eager")
        cache = self._caches[key]
        prompt = idx[0].tolist() if B == 1 else None
        start = self._reuse(cache, prompt)
        if self.mode == "eager":
            step = lambda token, seen, race: self._decode_one(token, cache, sampling, seen, race)  # noqa: E731
        else:
            if (*key, sampling) not in self._steps:
                self._steps[(*key, sampling)] = self._static_step(cache, sampling)
            step = self._steps[(*key, sampling)]
        logits = self.model(idx[:, start:], kv_cache=cache, last_only=True)[0][:, -1]
        if prompt is not None:  # the prefill is done: the cache holds the prompt, and then what the step feeds
            fed = [prompt]
            self._held = (cache, fed)
            step = self._recording(step, fed)
        return logits, step

    def forget(self) -> None:
        """Forget which tokens the cache holds: the next prompt is prefilled whole (as a benchmark of the
        prefill, or of a fresh request, needs)."""
        self._held = None

    def _reuse(self, cache, prompt: list[int] | None) -> int:
        """Set `cache` to hold the longest start of the batch-1 `prompt` that the decoder holds already
        (copied over from the cache that holds it when that is another bucket's), and return its length.
        The last prompt token is always fed again: its logits choose the first new token. Stale entries
        past the kept ones are masked out (static) or never read (eager), so nothing needs clearing."""
        held, self._held = self._held, None  # nothing is certain about the cache until the prefill is done
        start = 0
        if prompt is not None and held is not None and held[0].k[0].dtype == cache.k[0].dtype:
            source, fed = held
            ids = fed[0] + (torch.cat(fed[1:]).tolist() if len(fed) > 1 else [])
            while start < min(len(ids), len(prompt) - 1) and ids[start] == prompt[start]:
                start += 1
            cache.keep(start, source if source is not cache and start else None)
        else:
            cache.keep(0)
        return start

    @staticmethod
    def _recording(step, fed: list):
        """The step, noting each token it feeds into the cache (a tensor: no host sync per token)."""
        def recorded(token, seen, race):
            next_token = step(token, seen, race)
            fed.append(token)  # after the step: an interrupted step leaves the record a prefix of the cache
            return next_token
        return recorded

    def _static_step(self, cache, sampling: Sampling):
        if self.mode == "compile":
            first = True

            def compiled(token, seen, race):
                nonlocal first
                if first:  # compiles: every guard is evaluated
                    first = False
                    return self._compiled(token, cache, sampling, seen, race).clone()
                # Compiled already, for these shapes: only the guards that tell this step's graph from
                # the other buckets' and samplings' are evaluated (~0.1 ms a token on a CPU). The clone:
                # a CUDA graph rewrites its output on the next replay, and callers keep the tokens.
                with torch.compiler.set_stance(skip_guard_eval_unsafe=True):
                    return self._compiled(token, cache, sampling, seen, race).clone()
            return compiled
        # Capture: a warm-up on a side stream (allocator, cuBLAS workspaces), then one recorded step over
        # fixed input buffers. The warm-up really runs and advances pos, so pos is put back; capture does
        # not run anything; each replay advances pos inside the graph. Under autocast the weight casts
        # are recorded too, not read from autocast's cache (see _autocast_uncached).
        B, vocab, device = cache.k[0].size(0), self.model.config.vocab_size, cache.pos.device
        token = torch.zeros(B, dtype=torch.long, device=device)
        seen = torch.zeros(B, vocab, dtype=torch.bool, device=device) if sampling.penalize else None
        race = sampling.race((B, vocab), device)
        pos = cache.pos.clone()
        with _autocast_uncached(device.type):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._decode_one(token, cache, sampling, seen, race)
            torch.cuda.current_stream().wait_stream(side)
            cache.pos.copy_(pos)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                next_token = self._decode_one(token, cache, sampling, seen, race)

        def replay(new_token, new_seen, new_race):
            token.copy_(new_token)
            for buffer, new in ((seen, new_seen), (race, new_race)):
                if buffer is not None:
                    buffer.copy_(new)
            graph.replay()
            return next_token.clone()  # the graph's output buffer is rewritten by the next replay
        return replay


@torch.no_grad()
def generate(model, idx: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, repetition_penalty: float = 1.0,
             stop_ids: int | Sequence[int] | None = None, generator: torch.Generator | None = None):
    """Yield max_new_tokens next-token tensors of shape (B,) continuing the prompt idx (B, T).

    `model` is a Transformer (decoded eagerly) or a `Decoder` (eager, compiled or CUDA-graph, reused
    across calls). The prompt is prefilled into a KV cache in one forward; each later step feeds one token.
    A Decoder reused across calls prefills only the part of a batch-1 prompt that its cache does not hold
    (a chat's new turn after the conversation so far).
    temperature 0 is greedy (top_k/top_p are then irrelevant). `stop_ids` ends a row: EOS for text, <|im_end|>
    (and EOS) for a chat reply. A row that emitted one keeps yielding it, and the generator stops early
    once every row has (one host sync per step, only when stop_ids are given). prompt + max_new_tokens must fit model.config.max_seq_len, else ValueError:
    nothing is clamped silently. `generator` (on the model's device) makes sampling reproducible, and
    every mode draws the same noise, so a seed gives the same text eager or compiled.
    The model runs in eval mode for the duration and gets its previous mode back afterwards.
    """
    decoder = model if isinstance(model, Decoder) else Decoder(model)
    model = decoder.model
    B, T = idx.shape
    _check_args(model, T, max_new_tokens, temperature, top_k, top_p, repetition_penalty)
    sampling = Sampling(temperature, top_k, top_p, repetition_penalty)
    shape = (B, model.config.vocab_size)
    was_training = model.training
    model.eval()
    try:
        logits, step_fn = decoder.prefill(idx, max_new_tokens, sampling)
        seen = None
        if sampling.penalize:
            seen = torch.zeros(shape, dtype=torch.bool, device=idx.device).scatter_(1, idx, True)
        token = sampling.draw(logits, seen, generator)
        finished = stops = None
        if stop_ids is not None:
            stops = torch.tensor([stop_ids] if isinstance(stop_ids, int) else list(stop_ids), device=idx.device)
            finished = torch.zeros(B, dtype=torch.bool, device=idx.device)
        previous = token
        for step in range(max_new_tokens):
            if finished is not None:
                token = torch.where(finished, previous, token)  # a finished row repeats its stop token
                finished |= torch.isin(token, stops)
            yield token
            previous = token
            if step == max_new_tokens - 1 or (finished is not None and bool(finished.all())):
                return
            if seen is not None:
                seen.scatter_(1, token[:, None], True)
            token = step_fn(token, seen, sampling.race(shape, idx.device, generator))
    finally:
        model.train(was_training)


class StreamDecoder:
    """Incremental detokenizer for one sequence: `push(id)` returns the text that became complete.

    Each id maps to its UTF-8 bytes (SentencePiece's "▁" is a space, `<0xNN>` a raw byte, control ids
    nothing), and an incremental UTF-8 decoder holds back a partial character, so a Hangul syllable
    split over byte-fallback pieces appears whole, never as U+FFFD. Bytes that can never form a
    character still become U+FFFD, as in tokenizer.decode, whose text the pieces add up to.
    """

    def __init__(self, tokenizer):
        self._bytes = tokenizer.token_byte_strings
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._utf8.decode(self._bytes[token_id])

    def flush(self) -> str:
        """End the sequence: return what is left (an incomplete character becomes U+FFFD). The decoder
        is then ready for the next sequence, so the id-to-bytes table is built once per tokenizer."""
        return self._utf8.decode(b"", final=True)
