"""Autoregressive generation with the KV cache, and streaming detokenization.

`generate` prefills the cache with the whole prompt in one forward, then feeds one token per step.
The step is the hot loop of bench/sample_speed.py, so it stays free of host syncs unless an EOS id
asks for an early stop, and the optional logit processors (repetition penalty, top-k, top-p) cost
nothing when they are off. Processing order follows transformers: repetition penalty, temperature,
top-k, top-p, then a draw.

`StreamDecoder` turns ids into text as they arrive. Byte-fallback pieces (`<0xEA>`) can split a
Hangul syllable across tokens, so it feeds raw bytes through an incremental UTF-8 decoder that holds
back an incomplete character until its last byte arrives instead of printing U+FFFD.

Prompt encoding and the prompt-length rule (`room_to_generate`) live here too, for sample.py and
train.py's eval sample alike.
"""

import codecs

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


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty as transformers applies it: for tokens already in the sequence, divide positive
    logits by `penalty` and multiply negative ones, so both move toward less likely."""
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def sample_next(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids (B,) from last-position logits (B, vocab). temperature 0 is argmax."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    candidates = None  # vocabulary ids of the (sorted) candidate columns; None = the whole vocab
    if top_k is not None and top_k < logits.size(-1):
        logits, candidates = torch.topk(logits, top_k, dim=-1)  # sorted descending
    if top_p is not None and top_p < 1:
        if candidates is None:
            logits, candidates = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(logits, dim=-1)
        # The nucleus is the shortest prefix whose mass reaches top_p: drop a token when the mass
        # before it already does. The most likely token always survives.
        outside = (probs.cumsum(dim=-1) - probs) >= top_p
        logits = logits.masked_fill(outside, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    # Exponential-race draw: argmax(p / E) with E ~ Exp(1) samples from p, without the host sync
    # that torch.multinomial's input validation costs on CUDA. The clamp keeps a (rare) E = 0 from
    # turning a zero-probability token into 0/0 = NaN, which argmax would pick.
    race = torch.empty_like(probs).exponential_(generator=generator).clamp_(min=torch.finfo(probs.dtype).tiny)
    choice = (probs / race).argmax(dim=-1)
    return choice if candidates is None else candidates.gather(-1, choice[:, None]).squeeze(-1)


@torch.no_grad()
def generate(model, idx: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, repetition_penalty: float = 1.0,
             eos_id: int | None = None, generator: torch.Generator | None = None):
    """Yield max_new_tokens next-token tensors of shape (B,) continuing the prompt idx (B, T).

    The prompt is prefilled into a fresh KV cache in one forward; each later step feeds one token.
    temperature 0 is greedy (top_k/top_p are then irrelevant). Rows that emit eos_id keep yielding
    eos_id, and the generator stops early once every row has (one host sync per step, only when
    eos_id is given). prompt + max_new_tokens must fit model.config.max_seq_len, else ValueError:
    nothing is clamped silently. `generator` (on the model's device) makes sampling reproducible.
    The model runs in eval mode for the duration and gets its previous mode back afterwards.
    """
    B, T = idx.shape
    _check_args(model, T, max_new_tokens, temperature, top_k, top_p, repetition_penalty)
    was_training = model.training
    model.eval()
    try:
        cache = model.make_kv_cache(B, T + max_new_tokens, dtype=_cache_dtype(idx.device))
        logits = model(idx, kv_cache=cache, last_only=True)[0][:, -1]
        penalize = repetition_penalty != 1.0
        if penalize:
            seen = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, idx, True)
        finished = torch.zeros(B, dtype=torch.bool, device=idx.device) if eos_id is not None else None
        for step in range(max_new_tokens):
            if penalize:
                logits = apply_repetition_penalty(logits, seen, repetition_penalty)
            token = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
            if finished is not None:
                token = token.masked_fill(finished, eos_id)
                finished |= token == eos_id
            yield token
            if step == max_new_tokens - 1 or (finished is not None and bool(finished.all())):
                return
            if penalize:
                seen.scatter_(1, token[:, None], True)
            logits = model(token[:, None], kv_cache=cache)[0][:, -1]
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
