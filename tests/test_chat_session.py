"""ChatSession: every reply equals generation from a full prefill of the conversation's ids, each turn
prefills only what is new, and a conversation that outgrows the context drops its oldest exchanges."""

import pytest
import torch

from nanokor.chat_format import REPLY_STOP_IDS, render, render_turn, reply_end, reply_header
from nanokor.chat_session import ChatSession
from nanokor.errors import ChatError, PromptError
from nanokor.generate import Decoder, generate

from tiny_checkpoint import tiny_model

SYSTEM = "당신은 친절한 한국어 조수입니다."
QUESTIONS = ["한국의 수도는 어디인가요?", "그 도시의 인구는요?", "세종대왕은 무엇을 만들었나요?", "고마워요!"]


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_model(tokenizer.vocab_size)  # a context of 128 tokens


@pytest.fixture(scope="module")
def long_model(tokenizer):
    return tiny_model(tokenizer.vocab_size, max_seq_len=512)


def reference_reply(model, prompt: list[int], max_new: int) -> tuple[list[int], bool]:
    """Greedy reply to `prompt` from a fresh eager decode (nothing cached): its ids, and whether it ended."""
    out = [t.item() for t in generate(model, torch.tensor([prompt]), max_new, temperature=0, stop_ids=REPLY_STOP_IDS)]
    ended = bool(out) and out[-1] in REPLY_STOP_IDS
    return (out[:-1] if ended else out), ended


def forward_lengths(model):
    lengths = []
    return lengths, model.embed_tokens.register_forward_hook(lambda mod, args, out: lengths.append(args[0].shape[1]))


@pytest.mark.parametrize("mode", ["eager", "compile"])
def test_each_turn_prefills_only_what_is_new_and_replies_as_a_full_prefill_would(long_model, tokenizer, mode,
                                                                                   compile_spy):
    model = long_model
    session = ChatSession(Decoder(model, mode), tokenizer, system=SYSTEM, max_new_tokens=12,
                          sampling={"temperature": 0})
    conversation = [tokenizer.bos_id, *render_turn(tokenizer, "system", SYSTEM)[0]]  # built here, independently
    cached = 0
    for i, question in enumerate(QUESTIONS[:3]):
        prompt = conversation + render_turn(tokenizer, "user", question)[0] + reply_header(tokenizer)
        if i == 0:  # the first prompt is the renderer's
            assert prompt == render(tokenizer, [{"role": "system", "content": SYSTEM},
                                                {"role": "user", "content": question}], add_generation_prompt=True)[0]
        lengths, hook = forward_lengths(model)
        try:
            reply = list(session.reply(question))
        finally:
            hook.remove()
        expected, ended = reference_reply(model, prompt, 12)
        assert reply == expected
        # What the cache lacked: all of the first prompt; later, the reply's end, the new question and the
        # header, and the reply's last token if it was cut (yielded, never fed; an <|im_end|> is not kept).
        assert lengths[0] == len(prompt) - cached
        cached = len(prompt) + len(reply) - (0 if ended else 1)
        conversation = prompt + reply + reply_end(tokenizer)
    assert [m["role"] for m in session.messages] == ["system", "user", "assistant"] * 1 + ["user", "assistant"] * 2


def test_a_conversation_that_outgrows_the_context_drops_its_oldest_exchanges_and_says_so(model, tokenizer):
    notes = []
    session = ChatSession(Decoder(model), tokenizer, system=SYSTEM, max_new_tokens=16, sampling={"temperature": 0},
                          note=notes.append)
    system = [tokenizer.bos_id, *render_turn(tokenizer, "system", SYSTEM)[0]]
    for question in QUESTIONS * 2:
        before = list(session.turns)
        reply = list(session.reply(question))
        used = session.turns[:-2]  # the turns the reply was generated after
        prompt = system + [i for _, ids in used for i in ids] + session.turns[-2][1] + reply_header(tokenizer)
        assert len(prompt) + 16 <= 128  # room kept for the reply: min(max_new_tokens, a quarter of the context)
        assert reply == reference_reply(model, prompt, 16)[0]
        if len(used) < len(before):
            assert used == before[len(before) - len(used):]  # the oldest went, whole exchanges, in order
            dropped = [n for n in notes if "dropped the oldest" in n]
            assert len(dropped) == 1 and "the system message stays" in dropped[0]
            break
    else:
        pytest.fail("the conversation never reached the context limit")
    assert session.messages[0] == {"role": "system", "content": SYSTEM}


def test_a_reply_left_early_stays_as_far_as_it_went_and_the_next_turn_is_exact(model, tokenizer):
    session = ChatSession(Decoder(model), tokenizer, max_new_tokens=20, sampling={"temperature": 0})
    stream = session.reply(QUESTIONS[0])
    partial = [next(stream) for _ in range(3)]
    stream.close()  # as Ctrl-C in chat.py leaves a reply
    assert session.messages[-1] == {"role": "assistant", "content": tokenizer.decode(partial)}
    prompt = render(tokenizer, [{"role": "user", "content": QUESTIONS[0]}], add_generation_prompt=True)[0]
    prompt += partial + reply_end(tokenizer) + render_turn(tokenizer, "user", QUESTIONS[1])[0] + reply_header(tokenizer)
    assert list(session.reply(QUESTIONS[1])) == reference_reply(model, prompt, 20)[0]


def test_a_reply_stops_at_im_end_and_its_turn_is_closed(tokenizer):
    model = tiny_model(tokenizer.vocab_size)
    prompt = render(tokenizer, [{"role": "user", "content": QUESTIONS[0]}], add_generation_prompt=True)[0]
    free, _ = reference_reply(model, prompt, 12)
    with torch.no_grad():  # <|im_end|> now outscores the reply's 4th token wherever that one scores > 0
        model.lm_head.weight[tokenizer.im_end_id] = 1.5 * model.lm_head.weight[free[3]]
    expected, ended = reference_reply(model, prompt, 12)
    assert ended and len(expected) < 12
    session = ChatSession(Decoder(model), tokenizer, max_new_tokens=12, sampling={"temperature": 0})
    assert list(session.reply(QUESTIONS[0])) == expected
    assert session.turns[-1][1] == reply_header(tokenizer) + expected + reply_end(tokenizer)


def test_messages_that_cannot_be_sent_are_refused_and_the_conversation_is_kept(model, tokenizer):
    session = ChatSession(Decoder(model), tokenizer, max_new_tokens=8, sampling={"temperature": 0})
    list(session.reply(QUESTIONS[0]))
    turns = list(session.turns)
    with pytest.raises(PromptError, match="leaves no room for a reply in the model's context of 128 tokens"):
        session.reply("아주 긴 메시지 " * 60)
    with pytest.raises(ChatError, match="is empty"):
        session.reply("  ")
    assert session.turns == turns
    with pytest.raises(ChatError, match="system message is empty"):
        ChatSession(Decoder(model), tokenizer, system=" ")
    session.clear()
    assert session.messages == []
