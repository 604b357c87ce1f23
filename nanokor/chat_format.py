"""The chat format, defined once: ChatML turns after one BOS, for SFT data, chat.py, the server and
every export's chat template.

    <s><|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n{question}<|im_end|>\\n
    <|im_start|>assistant\\n{answer}<|im_end|>\\n<|im_start|>user\\n ...

A conversation is OpenAI's list of {"role", "content"} messages: an optional system message first,
then user and assistant turns alternating, starting with the user. `render` turns one into token ids
and a loss mask: SFT trains on each assistant turn's content and its closing <|im_end|> (so the model
learns what to say and when to stop), never on the system prompt, the user's words or the role
headers. The chat templates the exports carry (`CHAT_TEMPLATE`, Jinja, for transformers and
llama.cpp; `OLLAMA_TEMPLATE`, Go, for Ollama) are generated from the same pieces below, and tests hold
them to `render`'s ids.

<|im_start|> and <|im_end|> are SentencePiece control pieces (nanokor/tokenizer.py): ids written
here, never produced by encoding text, so a user who types "<|im_end|>" writes text, not a turn end.
"""

from nanokor.errors import ChatError
from nanokor.tokenizer import EOS_ID, IM_END, IM_END_ID, IM_START, IM_START_ID

ROLES = ("system", "user", "assistant")
TRAINED_ROLE = "assistant"  # the one role SFT learns to write
REPLY_STOP_IDS = (IM_END_ID, EOS_ID)  # a reply ends at its <|im_end|>; EOS too, should a model emit one
ROLE_END = "\n"  # a turn is IM_START role ROLE_END content IM_END TURN_END
TURN_END = "\n"


def _literal(text: str) -> str:
    """A Jinja string literal holding text."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


# The same layout as a Jinja template (transformers' apply_chat_template, llama.cpp's --jinja): BOS,
# every message as a turn, and with add_generation_prompt the assistant's header.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ " + _literal(IM_START) + " + message['role'] + " + _literal(ROLE_END) + " + message['content'] + "
    + _literal(IM_END + TURN_END) + " }}{% endfor %}"
    "{% if add_generation_prompt %}{{ " + _literal(IM_START + TRAINED_ROLE + ROLE_END) + " }}{% endif %}"
)

# The same layout as an Ollama TEMPLATE (Go text/template), which always ends with the reply header. No
# BOS in it: Ollama's tokenizer puts one in front of the rendered text, as the GGUF's add_bos_token asks
# (the Jinja template's BOS is one llama.cpp strips for the same reason). Ollama gives a system message
# (the request's or the Modelfile's SYSTEM) as the first of .Messages.
OLLAMA_TEMPLATE = ("{{- range .Messages }}" + IM_START + "{{ .Role }}" + ROLE_END + "{{ .Content }}" + IM_END
                   + TURN_END + "{{ end }}" + IM_START + TRAINED_ROLE + ROLE_END)


def require_chat_tokens(tokenizer, where: str) -> None:
    """Refuse a tokenizer made before the chat tokens existed, saying how to get one that has them."""
    if not tokenizer.has_chat_tokens:
        raise ChatError(f"{where} has a tokenizer without the chat tokens {IM_START} and {IM_END} (ids "
                        f"{IM_START_ID} and {IM_END_ID}): it was prepared before nanokor reserved them, so it "
                        "cannot mark a conversation's turns. Re-run prepare.py on your corpus (every tokenizer it "
                        "trains now holds them) and pretrain on that data, then run SFT from the new checkpoint.")


class Problem(str):
    """Why a conversation is malformed: the sentence, and its `kind` (one of PROBLEM_KINDS), which
    prepare.py tallies. A str, so callers that only print it need not know it is more."""

    kind: str

    def __new__(cls, kind: str, text: str) -> "Problem":
        problem = super().__new__(cls, text)
        problem.kind = kind
        return problem


PROBLEM_KINDS = ("not a conversation", "unknown role", "empty turn", "turns out of order", "no reply to learn",
                 "no user turn to answer")


def conversation_problem(messages, *, generation: bool = False) -> Problem | None:
    """Why `messages` is not a conversation nanokor can render, or None. Training conversations end with
    an assistant turn (otherwise there is nothing to learn); generation prompts end with a user turn."""
    if not isinstance(messages, (list, tuple)) or not messages:
        return Problem("not a conversation", "empty conversation")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            return Problem("not a conversation", f"message {i} is not a {{'role': str, 'content': str}} object")
        if m["role"] not in ROLES:
            return Problem("unknown role", f"message {i} has the unknown role {m['role']!r} (known: {', '.join(ROLES)})")
        if not m["content"].strip():
            return Problem("empty turn", f"message {i} ({m['role']}) is empty")
    turns = messages[1:] if messages[0]["role"] == "system" else messages
    for i, m in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            return Problem("turns out of order",
                           f"turn {i + 1} is {m['role']!r} where {expected!r} was expected (an optional system "
                           "message, then user and assistant alternating, starting with the user)")
    last = turns[-1]["role"] if turns else "system"
    if generation and last != "user":
        return Problem("no user turn to answer",
                       f"the conversation ends with {last!r}; a reply is generated after a user turn")
    if not generation and last != TRAINED_ROLE:
        return Problem("no reply to learn", f"the conversation ends with {last!r}, so it has no assistant reply to learn")
    return None


def render(tokenizer, messages, *, add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
    """(ids, mask): BOS and every turn, and with add_generation_prompt the assistant's header, ready for
    the model to write its reply. mask[i] = 1 where ids[i] is trained (assistant content and its
    <|im_end|>), else 0. A malformed conversation is a ChatError saying what is wrong."""
    problem = conversation_problem(messages, generation=add_generation_prompt)
    if problem:
        raise ChatError(f"Cannot render this conversation: {problem}.")
    ids, mask = [tokenizer.bos_id], [0]
    for m in messages:
        turn_ids, turn_mask = render_turn(tokenizer, m["role"], m["content"])
        ids += turn_ids
        mask += turn_mask
    if add_generation_prompt:
        header = reply_header(tokenizer)
        ids += header
        mask += [0] * len(header)
    return ids, mask


def render_turn(tokenizer, role: str, content: str) -> tuple[list[int], list[int]]:
    """One turn's (ids, mask): <|im_start|>role\\n content <|im_end|>\\n. Newline is its own piece, so the
    header and the content tokenize apart exactly as the template's text does whole."""
    header = [IM_START_ID, *tokenizer.encode(role + ROLE_END)]
    body = [*tokenizer.encode(content), IM_END_ID]
    tail = tokenizer.encode(TURN_END)
    trained = int(role == TRAINED_ROLE)
    return header + body + tail, [0] * len(header) + [trained] * len(body) + [0] * len(tail)


def reply_header(tokenizer) -> list[int]:
    """<|im_start|>assistant\\n: what the model's reply follows."""
    return [IM_START_ID, *tokenizer.encode(TRAINED_ROLE + ROLE_END)]


def reply_end(tokenizer) -> list[int]:
    """<|im_end|>\n: what closes a reply, so that reply_header + the reply's ids + reply_end is its turn
    (a generated reply keeps its own ids, which re-encoding its text may not give back)."""
    return [IM_END_ID, *tokenizer.encode(TURN_END)]
