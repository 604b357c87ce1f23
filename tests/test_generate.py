"""generate() and StreamDecoder against independent references: full forwards without a cache,
transformers' logit processors, hand-computed nuclei and the distributions sampling must follow."""

import pytest
import torch
from transformers import RepetitionPenaltyLogitsProcessor

from nanokor.generate import (Decoder, PromptError, Sampling, StreamDecoder, _autocast_uncached,
                              apply_repetition_penalty, encode_prompt, generate)

from tiny_checkpoint import tiny_model

VOCAB = 301
BYTE_FALLBACK_KOREAN = "뷁 똠얌꿍을 먹었다. 햏햏 쀍!"  # syllables the sample tokenizer has no piece for


def reference_greedy(model, idx, steps, penalty=1.0):
    """Greedy decoding by re-running the whole sequence every step (no KV cache), with the
    repetition penalty applied by transformers' own processor."""
    processor = RepetitionPenaltyLogitsProcessor(penalty) if penalty != 1.0 else None
    seq = idx
    with torch.no_grad():
        for _ in range(steps):
            logits = model(seq)[0][:, -1]
            if processor:
                logits = processor(seq, logits)
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
    return seq[:, idx.size(1):]


def run(model, idx, steps, **kw):
    return torch.stack(list(generate(model, idx, steps, **kw)), dim=1)


@pytest.fixture(scope="module")
def model():
    return tiny_model(VOCAB)


@pytest.mark.parametrize("attention", ["sdpa", "math"])
def test_greedy_equals_argmax_of_full_forward(attention):
    model = tiny_model(VOCAB, attention=attention)
    idx = torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(1))
    out = run(model, idx, 24, temperature=0)
    assert torch.equal(out, reference_greedy(model, idx, 24))
    assert len(set(out[0].tolist())) > 5  # the tiny model's greedy output is not one repeated token


def test_prefills_once_then_feeds_one_token_per_step(model):
    lengths = []
    hook = model.embed_tokens.register_forward_hook(lambda mod, args, out: lengths.append(args[0].shape[1]))
    try:
        run(model, torch.zeros(2, 9, dtype=torch.long), 6, temperature=0)
    finally:
        hook.remove()
    assert lengths == [9, 1, 1, 1, 1, 1]  # the last token is yielded, never fed


def test_repetition_penalty_matches_the_formula_and_transformers():
    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0, 0.0]])
    seen = torch.tensor([[True, True, False, True, False]])
    expected = torch.tensor([[2.0 / 1.5, -1.5, 0.5, -4.5, 0.0]])  # positives / p, negatives * p
    assert torch.allclose(apply_repetition_penalty(logits, seen, 1.5), expected)
    reference = RepetitionPenaltyLogitsProcessor(1.5)(torch.tensor([[0, 1, 3, 3]]), logits.clone())
    assert torch.allclose(apply_repetition_penalty(logits, seen, 1.5), reference)


@pytest.mark.parametrize("penalty", [1.3, 0.8])
def test_greedy_with_repetition_penalty_matches_transformers_processor(model, penalty):
    idx = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(2))
    out = run(model, idx, 30, temperature=0, repetition_penalty=penalty)
    assert torch.equal(out, reference_greedy(model, idx, 30, penalty))
    assert not torch.equal(out, reference_greedy(model, idx, 30))  # the penalty changed something


def draws(logits, n=4000, **kw):
    g = torch.Generator().manual_seed(0)
    return Sampling(**kw).draw(logits.expand(n, -1), generator=g)


def test_top_k_never_samples_outside_the_top_k():
    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(3))
    top5 = set(logits[0].topk(5).indices.tolist())
    got = draws(logits, top_k=5, temperature=2.0)
    assert set(got.tolist()) == top5  # all five appear at a high temperature, nothing else does


def test_top_p_samples_the_hand_computed_nucleus_with_renormalized_probabilities():
    probs = torch.tensor([0.05, 0.5, 0.1, 0.2, 0.15])
    # Sorted: 0.5, 0.2, 0.15 | 0.1, 0.05. Mass before 0.15 is 0.7 < 0.8, before 0.1 it is 0.85 >= 0.8.
    nucleus = {1: 0.5 / 0.85, 3: 0.2 / 0.85, 4: 0.15 / 0.85}
    got = draws(probs.log()[None], n=20000, top_p=0.8)
    assert set(got.tolist()) == set(nucleus)
    for token, p in nucleus.items():
        assert abs((got == token).float().mean().item() - p) < 0.015


def test_top_p_keeps_the_most_likely_token_even_when_it_alone_exceeds_p():
    got = draws(torch.tensor([[0.0, 5.0, 1.0]]), n=500, top_p=0.1)
    assert set(got.tolist()) == {1}


def test_top_k_then_top_p_compose():
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1])
    # top_k=3 renormalizes to 0.444, 0.333, 0.222; top_p=0.7 keeps the first two (0.444 < 0.7 <= 0.778).
    got = draws(probs.log()[None], n=4000, top_k=3, top_p=0.7)
    assert set(got.tolist()) == {0, 1}


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_sampling_follows_softmax_of_logits_over_temperature(temperature):
    logits = torch.tensor([[1.0, 0.0, -1.0, 0.5]])
    expected = torch.softmax(logits[0] / temperature, -1)
    n = 40000
    freq = torch.bincount(draws(logits, n=n, temperature=temperature), minlength=4).float() / n
    sigma = (expected * (1 - expected) / n).sqrt()
    assert ((freq - expected).abs() < 5 * sigma).all(), (freq, expected)


def test_temperature_zero_is_argmax_and_ignores_filters():
    logits = torch.randn(8, 40, generator=torch.Generator().manual_seed(4))
    assert torch.equal(Sampling(temperature=0, top_k=3, top_p=0.5).draw(logits), logits.argmax(-1))


def test_seeded_generator_reproduces_and_different_seeds_differ(model):
    idx = torch.zeros(1, 4, dtype=torch.long)
    a, b, c = (run(model, idx, 30, top_k=50, generator=torch.Generator().manual_seed(s)) for s in (7, 7, 8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_rows_that_hit_eos_keep_yielding_eos_and_generation_stops_when_all_have(model):
    idx = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(5))
    free = run(model, idx, 30, temperature=0)
    eos = free[0, 3].item()  # row 0 emits it at step 3 (and maybe row 1 later, or never)
    out = run(model, idx, 30, temperature=0, stop_ids=eos)
    assert torch.equal(out[0, :4], free[0, :4]) and (out[0, 4:] == eos).all()
    hits = (free[1] == eos).nonzero()
    last_row1 = hits[0].item() if len(hits) else 29
    assert out.size(1) == max(3, last_row1) + 1  # stopped as soon as both rows had finished
    assert torch.equal(out[1, :last_row1 + 1], free[1, :last_row1 + 1])


def test_each_row_stops_at_whichever_stop_id_it_emits_first(model):
    idx = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(5))
    free = run(model, idx, 30, temperature=0)
    stops = (free[0, 2].item(), free[1, 4].item())  # e.g. <|im_end|> and EOS for a chat reply
    out = run(model, idx, 30, temperature=0, stop_ids=stops)
    for row in range(2):
        first = next(i for i, t in enumerate(free[row].tolist()) if t in stops)
        assert torch.equal(out[row, :first + 1], free[row, :first + 1])
        assert (out[row, first:] == free[row, first]).all()


def test_prompt_plus_generation_beyond_max_seq_len_is_a_clear_error(model):
    idx = torch.zeros(1, 100, dtype=torch.long)
    message = r"100 tokens plus max_new_tokens=29 exceeds .* max_seq_len \(128\).*at most 28"
    with pytest.raises(ValueError, match=message):
        next(generate(model, idx, 29))
    assert len(run(model, idx, 28, temperature=0)[0]) == 28  # exactly filling the context is fine


def test_restores_training_mode_and_records_no_graph():
    model = tiny_model(VOCAB, dropout=0.5).train()
    idx = torch.zeros(1, 3, dtype=torch.long)
    tokens = list(generate(model, idx, 5, temperature=0))
    assert model.training and not any(t.requires_grad for t in tokens)
    # dropout was off while generating: greedy output is deterministic and equals eval mode's
    assert torch.equal(torch.stack(tokens, 1), run(model.eval(), idx, 5, temperature=0))


def test_generates_under_bf16_autocast_with_a_bf16_cache(model):
    idx = torch.zeros(2, 6, dtype=torch.long)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = run(model, idx, 8, top_k=20, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 8)


@pytest.mark.parametrize("attention", ["sdpa", "math"])
def test_static_decoder_equals_full_forwards_and_reuses_its_cache_across_prompts(attention, compile_spy):
    model = tiny_model(VOCAB, attention=attention)
    decoder = Decoder(model, "compile")
    assert compile_spy == [{"dynamic": False, "fullgraph": True, "options": {"cpp_wrapper": True}}]
    # The second prompt is shorter than what the first left in the cache: stale keys must stay masked.
    for seed, length, steps in ((1, 13, 30), (2, 5, 24), (3, 60, 40)):
        idx = torch.randint(0, VOCAB, (2, length), generator=torch.Generator().manual_seed(seed))
        assert torch.equal(run(decoder, idx, steps, temperature=0), reference_greedy(model, idx, steps))
    assert len(decoder._caches) == len(decoder._steps) == 1  # one cache and one graph for all of them


def test_static_decoder_samples_what_eager_samples_from_the_same_seed(model, compile_spy):
    decoder = Decoder(model, "compile")
    idx = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(6))
    for kw in (dict(top_k=50), dict(top_p=0.9, repetition_penalty=1.3), dict(temperature=1.5)):
        fast, eager = (run(m, idx, 30, generator=torch.Generator().manual_seed(7), **kw) for m in (decoder, model))
        assert torch.equal(fast, eager), kw
    assert len(decoder._caches) == 1 and len(decoder._steps) == 3  # a step per sampling setting, one cache


def test_static_decoder_under_bf16_autocast_keeps_a_bf16_cache(model, compile_spy):
    decoder, idx = Decoder(model, "compile"), torch.zeros(2, 6, dtype=torch.long)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = run(decoder, idx, 8, top_k=20, generator=torch.Generator().manual_seed(0))
        expected = run(model, idx, 8, top_k=20, generator=torch.Generator().manual_seed(0))
    (cache,) = decoder._caches.values()
    assert cache.k[0].dtype == torch.bfloat16 and out.shape == (2, 8)
    assert (out == expected).float().mean() > 0.8  # bf16 rounding may flip a near-tie, not the sequence


def test_graph_capture_casts_weights_afresh_under_autocast_instead_of_reading_its_cache():
    # The CUDA-graph step is captured inside _autocast_uncached. What capture must not do is read
    # autocast's cached weight copy (freed when the outer autocast exits, while the graph lives on).
    # The cache is observable on a CPU: a weight changed in place is still seen through its stale copy.
    linear, x = torch.nn.Linear(16, 16), torch.randn(3, 16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        before = linear(x)
        linear.weight.mul_(2)
        assert torch.equal(linear(x), before)  # autocast's cache: the stale bf16 copy
        with _autocast_uncached("cpu"):
            assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
            fresh = linear(x)
            assert fresh.dtype == torch.bfloat16 and not torch.equal(fresh, before)
            assert torch.allclose(fresh.float(), (x @ linear.weight.T + linear.bias).float(), rtol=2e-2, atol=2e-2)
        assert torch.is_autocast_cache_enabled() and torch.equal(linear(x), before)  # the outer autocast as it was
    with _autocast_uncached("cpu"):  # outside autocast it changes nothing
        assert not torch.is_autocast_enabled("cpu") and torch.is_autocast_cache_enabled()


def test_decoder_refuses_cuda_graphs_off_cuda_and_unknown_modes(model):
    with pytest.raises(ValueError, match="needs the model on a CUDA device; on a CPU use mode 'compile'"):
        Decoder(model, "graph")
    with pytest.raises(ValueError, match="choose one of"):
        Decoder(model, "fast")


def test_stream_decoder_never_emits_a_broken_syllable(tokenizer):
    ids = tokenizer.encode(BYTE_FALLBACK_KOREAN)
    pieces = [tokenizer.id_to_piece(i) for i in ids]
    assert sum(p.startswith("<0x") for p in pieces) >= 9  # the test really exercises byte fallback
    stream = StreamDecoder(tokenizer)
    chunks = [stream.push(i) for i in ids]
    assert not any("\ufffd" in c for c in chunks)
    assert "".join(chunks) + stream.flush() == BYTE_FALLBACK_KOREAN == tokenizer.decode(ids)
    # the three bytes of 뷁 arrive as three pieces; the syllable appears whole with the third
    assert pieces[:3] == ["<0xEB>", "<0xB7>", "<0x81>"] and chunks[:3] == ["", "", "뷁"]


def test_stream_decoder_matches_tokenizer_decode_on_the_sample(tokenizer, sample_data_dir):
    text = "한국어는 교착어이다.\n 두 칸  띄어쓰기, 숫자 2024년, 漢字 龘 그리고 emoji 😀 끝"
    ids = [tokenizer.bos_id, *tokenizer.encode(text), tokenizer.eos_id]
    stream = StreamDecoder(tokenizer)
    assert "".join(stream.push(i) for i in ids) + stream.flush() == tokenizer.decode(ids) == text


def test_stream_decoder_replaces_bytes_that_can_never_form_a_character(tokenizer):
    byte = {tokenizer.id_to_piece(i): i for i in range(tokenizer.vocab_size)}
    ids = [byte["<0xEB>"], *tokenizer.encode("가")]  # a lead byte followed by a new character
    stream = StreamDecoder(tokenizer)
    assert "".join(stream.push(i) for i in ids) + stream.flush() == tokenizer.decode(ids) == "\ufffd가"


def test_encode_prompt_starts_with_bos_and_rejects_text_that_tokenizes_to_nothing(tokenizer):
    assert encode_prompt(tokenizer, None) == [tokenizer.bos_id]
    assert encode_prompt(tokenizer, "한국") == [tokenizer.bos_id, *tokenizer.encode("한국")]
    with pytest.raises(PromptError, match="tokenizes to nothing"):
        encode_prompt(tokenizer, "")


def test_invalid_arguments_are_one_clear_error(model):
    idx = torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(ValueError, match=r"temperature must be >= 0.*top_p must be in \(0, 1\]"):
        next(generate(model, idx, 5, temperature=-1, top_p=1.5))


# ---- continuing a cache: a prompt that starts with what the decoder holds prefills only the rest ----

def prefill_lengths(model):
    """Records the length of every forward's input: the prefill's, then 1 per step."""
    lengths = []
    return lengths, model.embed_tokens.register_forward_hook(lambda mod, args, out: lengths.append(args[0].shape[1]))


def continue_and_compare(decoder, model, prompt: list[int], steps: int) -> tuple[list[int], int]:
    """Greedy tokens from `decoder` (which may reuse its cache) and the length it prefilled; the tokens
    must equal a fresh decoder's full prefill of the same ids, and the argmax of full forwards."""
    lengths, hook = prefill_lengths(model)
    try:
        ours = run(decoder, torch.tensor([prompt]), steps, temperature=0)
    finally:
        hook.remove()
    idx = torch.tensor([prompt])
    assert torch.equal(ours, run(Decoder(model, decoder.mode), idx, steps, temperature=0))
    assert torch.equal(ours, reference_greedy(model, idx, steps))
    return ours[0].tolist(), lengths[0]


@pytest.mark.parametrize("mode", ["eager", "compile"])
def test_a_continued_conversation_prefills_only_its_new_tokens_and_equals_a_full_prefill(mode, compile_spy):
    model = tiny_model(VOCAB)
    decoder = Decoder(model, mode)
    ids = lambda n, seed: torch.randint(6, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()  # noqa: E731
    first = ids(13, 1)
    reply, prefilled = continue_and_compare(decoder, model, first, 20)
    assert prefilled == 13
    # The next turn: the conversation so far (the reply's own ids), then new ones. The reply's last token
    # was yielded, never fed, so it is prefilled with the new part.
    second = first + reply + ids(7, 2)
    _, prefilled = continue_and_compare(decoder, model, second, 20)
    assert prefilled == 1 + 7
    # A prompt that diverges at position 5 reuses the five before it; an identical one all but its last.
    third = second[:5] + ids(30, 3)
    _, prefilled = continue_and_compare(decoder, model, third, 10)
    assert prefilled == len(third) - 5
    _, prefilled = continue_and_compare(decoder, model, third, 10)
    assert prefilled == 1


@pytest.mark.parametrize("mode", ["eager", "compile"])
def test_a_conversation_that_outgrows_its_cache_bucket_carries_the_cache_over(mode, compile_spy):
    model = tiny_model(VOCAB, max_seq_len=1024)
    decoder = Decoder(model, mode)
    prompt = torch.randint(6, VOCAB, (200,), generator=torch.Generator().manual_seed(4)).tolist()
    reply, _ = continue_and_compare(decoder, model, prompt, 40)  # 240 positions: the 256 bucket
    longer = prompt + reply + [7] * 30
    _, prefilled = continue_and_compare(decoder, model, longer, 40)  # 310 + 40: the 512 bucket
    assert prefilled == 31
    assert sorted(length for _, length, _ in decoder._caches) == ([512] if mode == "eager" else [256, 512])


def test_a_generation_left_early_keeps_what_it_fed_and_batches_start_afresh(model):
    decoder = Decoder(model)
    prompt = [1, 9, 8, 7, 6]
    tokens = generate(decoder, torch.tensor([prompt]), 30, temperature=0)
    taken = [next(tokens).item() for _ in range(4)]
    tokens.close()  # the reader left after 4 tokens: 3 of them were fed
    _, prefilled = continue_and_compare(decoder, model, prompt + taken + [11, 12], 5)
    assert prefilled == 3
    run(decoder, torch.zeros(2, 4, dtype=torch.long), 3, temperature=0)  # a batch of two holds no record
    _, prefilled = continue_and_compare(decoder, model, prompt + taken + [11, 12], 5)
    assert prefilled == len(prompt) + 6


def test_a_decoder_told_to_forget_prefills_the_whole_prompt_again(model):
    decoder, prompt = Decoder(model), [1, 9, 8, 7, 6]
    continue_and_compare(decoder, model, prompt, 3)
    decoder.forget()
    assert continue_and_compare(decoder, model, prompt, 3)[1] == len(prompt)


def test_a_prefill_interrupted_midway_leaves_nothing_to_reuse(model):
    decoder, prompt = Decoder(model), [1, 9, 8, 7, 6]
    continue_and_compare(decoder, model, prompt, 3)

    def interrupt(*_):
        raise KeyboardInterrupt  # Ctrl-C while the second layer prefills: the first has written its keys

    hook = model.layers[1].register_forward_hook(interrupt)
    try:
        with pytest.raises(KeyboardInterrupt):
            run(decoder, torch.tensor([prompt + [5, 4, 3]]), 3, temperature=0)
    finally:
        hook.remove()
    assert continue_and_compare(decoder, model, prompt + [5, 4, 3], 3)[1] == len(prompt) + 3
