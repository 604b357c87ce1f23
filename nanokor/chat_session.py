"""A conversation held open with a chat model, turn by turn: what chat.py keeps between messages.

The session keeps every turn as the token ids the model saw: a user's message rendered in the chat
format (nanokor/chat_format.py), a reply as it was generated, since re-encoding a reply's text may give
other ids. Each reply is generated from the whole conversation through one `Decoder`, which recognises
the turns it has already processed and prefills only what is new (nanokor/generate.py): a turn costs
its own tokens, not the conversation's. When what is left of the model's context for a reply falls
below min(max_new_tokens, a quarter of the context), the oldest exchanges are dropped (the system
message stays) and the session says so.
"""

from collections.abc import Callable, Iterator

import torch

from nanokor.chat_format import REPLY_STOP_IDS, conversation_problem, render_turn, reply_end, reply_header
from nanokor.errors import ChatError, PromptError
from nanokor.generate import Decoder, generate

REPLY_SHARE = 4  # a reply is kept at least 1/REPLY_SHARE of the context (or max_new_tokens, if less)


class ChatSession:
    """One conversation: `reply(text)` streams the answer to a user message and adds both turns.

    sampling: generate()'s keywords (temperature, top_k, top_p, repetition_penalty); `generator` seeds
    them. `note` receives a sentence whenever the session changes the conversation on its own (drops
    old turns) or cuts a reply short."""

    def __init__(self, decoder: Decoder, tokenizer, *, system: str | None = None, max_new_tokens: int = 512,
                 sampling: dict | None = None, generator: torch.Generator | None = None,
                 note: Callable[[str], None] = lambda message: None):
        if system is not None and not system.strip():
            raise ChatError("The system message is empty. Give it some text, or leave it out.")
        self.decoder, self.tokenizer = decoder, tokenizer
        self.system = system
        self.max_new_tokens, self.sampling, self.generator, self.note = max_new_tokens, sampling or {}, generator, note
        self.context = decoder.model.config.max_seq_len
        self._system_ids = render_turn(tokenizer, "system", system)[0] if system is not None else []
        self.turns: list[tuple[dict, list[int]]] = []  # (message, its turn's ids): user and assistant alternating

    @property
    def messages(self) -> list[dict]:
        """The conversation as OpenAI-style messages (what is left of it after any trimming)."""
        system = [{"role": "system", "content": self.system}] if self.system is not None else []
        return system + [message for message, _ in self.turns]

    def clear(self) -> None:
        """Start over; the system message stays."""
        self.turns = []

    def prompt(self, user_ids: list[int], turns=None) -> list[int]:
        """The ids the model continues with its reply: BOS, the system turn, every turn so far (or `turns`),
        the new user turn and the assistant's header."""
        turns = self.turns if turns is None else turns
        return [self.tokenizer.bos_id, *self._system_ids, *(i for _, ids in turns for i in ids), *user_ids,
                *reply_header(self.tokenizer)]

    def reply(self, text: str) -> Iterator[int]:
        """Answer the user message `text`: returns an iterator of the reply's token ids as they are generated
        (not the <|im_end|> that ends it). A message that cannot be sent is an error here, before anything
        is generated. Both turns join the conversation when the reply ends, or, if the reader stops early
        (Ctrl-C), with the reply as far as it went."""
        problem = conversation_problem([{"role": "user", "content": text}], generation=True)
        if problem:
            raise ChatError(f"Cannot send this message: {problem}.")
        user_ids = render_turn(self.tokenizer, "user", text)[0]
        return self._stream(text, user_ids, self._fit(user_ids))

    def _stream(self, text: str, user_ids: list[int], prompt: list[int]) -> Iterator[int]:
        n = min(self.max_new_tokens, self.context - len(prompt))
        idx = torch.tensor([prompt], device=self.decoder.model.lm_head.weight.device)
        tokens = generate(self.decoder, idx, n, stop_ids=REPLY_STOP_IDS, generator=self.generator, **self.sampling)
        content, ended = [], False
        try:
            for token in tokens:
                token = token.item()
                if token in REPLY_STOP_IDS:
                    ended = True
                    break
                content.append(token)
                yield token
        finally:
            tokens.close()
            # The reply keeps its own ids and is closed as every turn is, whatever ended it (<|im_end|>, EOS,
            # the length limit, the reader): the next prompt is a well-formed conversation.
            self.turns += [({"role": "user", "content": text}, user_ids),
                           ({"role": "assistant", "content": self.tokenizer.decode(content)},
                            reply_header(self.tokenizer) + content + reply_end(self.tokenizer))]
        if not ended:
            why = "max_new_tokens" if n == self.max_new_tokens else f"the model's context of {self.context} tokens"
            self.note(f"The reply was cut at {n} tokens ({why}) before the model ended it.")

    def _fit(self, user_ids: list[int]) -> list[int]:
        """The prompt for the next reply, after dropping the oldest exchanges while the reply would have
        less room than it is kept (see REPLY_SHARE). A message that leaves no room even alone is a
        PromptError, and the conversation stays as it was."""
        keep = min(self.max_new_tokens, self.context // REPLY_SHARE)
        drop = 0  # turns to drop, two at a time: the oldest user message and its reply
        while drop < len(self.turns) and len(self.prompt(user_ids, self.turns[drop:])) + keep > self.context:
            drop += 2
        prompt = self.prompt(user_ids, self.turns[drop:])
        if len(prompt) >= self.context:
            raise PromptError(f"This message is {len(user_ids)} tokens; with the chat format"
                              f"{' and the system message' if self.system is not None else ''} that makes "
                              f"{len(prompt)}, which leaves no room for a reply in the model's context of "
                              f"{self.context} tokens. Send a shorter message.")
        if drop:
            tokens = sum(len(ids) for _, ids in self.turns[:drop])
            del self.turns[:drop]
            kept = ", the system message stays" if self.system is not None else ""
            self.note(f"The conversation outgrew the model's context of {self.context} tokens: dropped the oldest "
                      f"{drop // 2} exchange{'s' if drop > 2 else ''} ({tokens} tokens){kept}.")
        return prompt
