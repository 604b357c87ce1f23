"""The chat format: chat tokens in every tokenizer prepare trains, the renderer's ids and loss mask,
malformed conversations, and the Jinja template against the renderer."""

import io
import re

import jinja2
import pytest
import sentencepiece as spm

from nanokor.chat_format import CHAT_TEMPLATE, conversation_problem, render, render_turn, reply_end, \
    reply_header, require_chat_tokens
from nanokor.errors import ChatError
from nanokor.tokenizer import IM_END, IM_END_ID, IM_START, IM_START_ID, Tokenizer

SYSTEM = {"role": "system", "content": "당신은 친절한 한국어 조수입니다."}
CONVERSATIONS = [
    [{"role": "user", "content": "한국의 수도는 어디인가요?"}, {"role": "assistant", "content": "서울입니다."}],
    [SYSTEM, {"role": "user", "content": "1+1은?"}, {"role": "assistant", "content": "2입니다.\n더 궁금한 점이 있나요?"},
     {"role": "user", "content": " 앞뒤 공백도 그대로 "}, {"role": "assistant", "content": "네, 그대로 둡니다! 😀"}],
]
# Typed in a message, a delimiter is text to the renderer (the tokenizer never makes control ids from
# text). A template's output is one string, where tools read it as the token: the one case they differ.
TYPED_DELIMITERS = [{"role": "user", "content": "<|im_end|>를 글자로 쓰면?"},
                    {"role": "assistant", "content": "<s>는 글자입니다."}]


def test_prepared_tokenizers_hold_the_chat_tokens_as_control_pieces(tokenizer):
    assert tokenizer.has_chat_tokens
    assert [tokenizer.id_to_piece(i) for i in (IM_START_ID, IM_END_ID)] == [IM_START, IM_END]
    typed = tokenizer.encode(f"{IM_START}user\n안녕{IM_END}")
    assert IM_START_ID not in typed and IM_END_ID not in typed  # text never produces a turn delimiter
    assert tokenizer.token_bytes[IM_START_ID] == tokenizer.token_bytes[IM_END_ID] == 0


def _old_tokenizer() -> Tokenizer:
    """A tokenizer as prepare.py trained them before the chat tokens: newline at id 4."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(["가나다라 마바사 아자차카 타파하"] * 50), model_writer=model, vocab_size=300,
        hard_vocab_limit=False, byte_fallback=True, user_defined_symbols=["\n"], unk_id=0, bos_id=1, eos_id=2, pad_id=3, minloglevel=2)
    return Tokenizer(model.getvalue())


def test_a_tokenizer_from_before_the_chat_tokens_is_refused_with_the_way_forward():
    old = _old_tokenizer()
    assert not old.has_chat_tokens
    with pytest.raises(ChatError, match=r"without the chat tokens .*Re-run prepare\.py"):
        require_chat_tokens(old, "out/last.pt")


@pytest.mark.parametrize("conversation", [*CONVERSATIONS, TYPED_DELIMITERS])
def test_render_trains_exactly_the_assistant_replies_and_their_end(tokenizer, conversation):
    ids, mask = render(tokenizer, conversation)
    assert len(ids) == len(mask) and ids[0] == tokenizer.bos_id
    # The trained tokens, cut at each <|im_end|>, are the assistant replies in order, nothing else.
    trained = [i for i, m in zip(ids, mask) if m]
    replies, current = [], []
    for i in trained:
        if i == IM_END_ID:
            replies.append(tokenizer.decode(current))
            current = []
        else:
            current.append(i)
    assert current == [] and replies == [m["content"] for m in conversation if m["role"] == "assistant"]
    # Every <|im_end|> closing an assistant turn is trained; those closing other turns are not.
    ends = [m for i, m in zip(ids, mask) if i == IM_END_ID]
    assert ends == [int(m["role"] == "assistant") for m in conversation]


@pytest.mark.parametrize("conversation", CONVERSATIONS)
def test_the_jinja_template_is_the_renderer(tokenizer, conversation):
    """The template's text, cut at the special tokens and encoded piece by piece (as transformers and
    llama.cpp tokenize a rendered template), is exactly render()'s ids, with and without the reply header."""
    template = jinja2.Environment().from_string(CHAT_TEMPLATE)
    specials = {"<s>": tokenizer.bos_id, IM_START: IM_START_ID, IM_END: IM_END_ID}
    for messages, prompt in ((conversation, False), (conversation[:-1], True)):
        text = template.render(messages=messages, bos_token="<s>", add_generation_prompt=prompt)
        ids = []
        for part in re.split("(" + "|".join(map(re.escape, specials)) + ")", text):
            ids += [specials[part]] if part in specials else tokenizer.encode(part)
        assert ids == render(tokenizer, messages, add_generation_prompt=prompt)[0]


def test_generation_prompt_ends_with_the_assistant_header(tokenizer):
    ids, mask = render(tokenizer, CONVERSATIONS[0][:1], add_generation_prompt=True)
    header = [IM_START_ID, *tokenizer.encode("assistant\n")]
    assert ids[-len(header):] == header and not any(mask)


def test_a_reply_between_its_header_and_its_end_is_its_turn(tokenizer):
    reply = tokenizer.encode("서울입니다.\n더 궁금한 점이 있나요?")
    assert reply_header(tokenizer) + reply + reply_end(tokenizer) == render_turn(
        tokenizer, "assistant", "서울입니다.\n더 궁금한 점이 있나요?")[0]


@pytest.mark.parametrize("messages, generation, problem", [
    ([], False, "empty conversation"),
    ([{"role": "user", "content": "  "}, {"role": "assistant", "content": "네"}], False, "empty"),
    ([{"role": "user", "content": "가"}, {"role": "user", "content": "나"}], False, "'user' where 'assistant'"),
    ([{"role": "assistant", "content": "가"}], False, "'assistant' where 'user'"),
    ([{"role": "tool", "content": "가"}], False, "unknown role 'tool'"),
    ([{"role": "user", "content": 3}], False, "not a {'role': str, 'content': str}"),
    ([SYSTEM, {"role": "user", "content": "가"}], False, "no assistant reply"),
    ([{"role": "user", "content": "가"}, {"role": "assistant", "content": "나"}], True, "generated after a user"),
    ([{"role": "user", "content": "가"}, {"role": "system", "content": "나"}], False, "'system' where 'assistant'"),
])
def test_malformed_conversations_are_named(messages, generation, problem):
    assert problem in conversation_problem(messages, generation=generation)


def test_render_refuses_a_malformed_conversation(tokenizer):
    with pytest.raises(ChatError, match="Cannot render this conversation: turn 2 is 'user'"):
        render(tokenizer, [{"role": "user", "content": "가"}, {"role": "user", "content": "나"}])
