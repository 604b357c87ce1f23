import hashlib
import re
import unicodedata

import numpy as np
import pytest
import sentencepiece as spm

from nanokor.corpus import SAMPLE_DIR, DataError
from nanokor.tokenizer import MAX_VOCAB, Tokenizer, auto_vocab_size, train_tokenizer

TRICKY = [
    "서울특별시는 2024년 5월 3일 기준 인구 9,386,034명이다.",
    "GPT-4와 LLaMA 3.1은 영어(English) 위주로 학습되었다; naïve café 🙂",
    "大韓民國 憲法 제1조 ① 대한민국은 민주공화국이다.",
    "이모지 조합: 👩‍👩‍👧‍👦 가족, 👍🏽 피부색, 🇰🇷 국기 — 끝!",
    "  앞뒤 공백과\t탭,   연속 공백  ",
    "첫 줄\n\n둘째 문단\n셋째 줄\n",
    "희귀 한자 𠀀𪚥 와 옛한글 ᄀᆞᆯ, 반각 ｶﾀｶﾅ, 전각 ＡＢＣ１２３",
    "수식: E = mc² · ∑ᵢ xᵢ ≤ 10⁻³ ± 5% «인용» “따옴표” 『책』",
    "ㄱㄴㄷ ㅏㅑㅓ ㅋㅋㅋ ㅠㅠ",
]


@pytest.fixture(scope="module")
def tok(sample_data_dir) -> Tokenizer:
    return Tokenizer.load(sample_data_dir / "tokenizer.model")


@pytest.fixture(scope="module")
def sample_docs() -> list[str]:
    return [d for p in sorted(SAMPLE_DIR.glob("*.txt")) for d in p.read_text(encoding="utf-8").split("\n\n") if d.strip()]


@pytest.mark.parametrize("text", TRICKY)
def test_round_trip_is_exact(tok, text):
    assert tok.decode(tok.encode(text)) == unicodedata.normalize("NFC", text)


def test_round_trip_on_sample_documents(tok, sample_docs):
    for doc in sample_docs:
        assert tok.decode(tok.encode(doc)) == doc


def test_nfc_is_applied_and_decomposed_hangul_would_inflate_tokens(tok):
    nfc = "한국어 자연어 처리는 재미있습니다"
    nfd = unicodedata.normalize("NFD", nfc)
    assert nfd != nfc and len(nfd) > 2 * len(nfc)
    assert tok.encode(nfd) == tok.encode(nfc)
    assert tok.decode(tok.encode(nfd)) == nfc
    # What NFC saves: the raw SentencePiece model, fed jamo, needs several times the tokens.
    assert len(tok.sp.encode(nfd)) > 2 * len(tok.encode(nfc))


def test_special_ids_are_llamas(tok):
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, 3)
    assert [tok.id_to_piece(i) for i in range(4)] == ["<unk>", "<s>", "</s>", "<pad>"]
    assert tok.bos_id not in tok.encode("가나다") and tok.eos_id not in tok.encode("가나다")


def test_token_bytes_table(tok, sample_data_dir):
    table = tok.token_bytes
    assert table.dtype == np.int32 and table.shape == (tok.vocab_size,)
    assert list(table[:4]) == [0, 0, 0, 0]
    byte_ids = [i for i in range(tok.vocab_size) if re.fullmatch(r"<0x[0-9A-F]{2}>", tok.id_to_piece(i))]
    assert len(byte_ids) == 256 and all(table[i] == 1 for i in byte_ids)
    np.testing.assert_array_equal(np.load(sample_data_dir / "token_bytes.npy"), table)
    # Summed over a text's tokens it is exactly the text's UTF-8 length (what bits per byte needs).
    for text in TRICKY:
        nfc = unicodedata.normalize("NFC", text)
        assert int(table[tok.encode(text)].sum()) == len(nfc.encode("utf-8")), text


def test_digits_are_split(tok):
    pieces = [tok.id_to_piece(i) for i in range(tok.vocab_size) if not tok.sp.is_byte(i)]
    assert all(len(re.findall("[0-9]", p)) <= 1 for p in pieces)
    ids = tok.encode("1234567890")
    assert len(ids) == 10 and tok.decode(ids) == "1234567890"


def test_rare_characters_use_byte_fallback_not_unk(tok):
    ids = tok.encode("𪚥")  # a rare Hanja outside the BMP
    assert tok.unk_id not in ids and len(ids) == 4  # its four UTF-8 bytes


def test_identity_and_sha(tok, sample_data_dir):
    raw = (sample_data_dir / "tokenizer.model").read_bytes()
    again = Tokenizer(raw)
    assert tok.model_bytes == raw and again.sha256 == tok.sha256 == hashlib.sha256(raw).hexdigest()


def test_token_byte_strings_add_up_to_the_decoded_text(tok):
    for text in TRICKY:
        ids = [tok.bos_id, *tok.encode(text), tok.eos_id]
        assert b"".join(tok.token_byte_strings[i] for i in ids).decode("utf-8") == tok.decode(ids)
        assert sum(tok.token_bytes[i] for i in ids) == sum(len(tok.token_byte_strings[i]) for i in ids)
    assert tok.token_byte_strings[tok.unk_id] == " \u2047 ".encode() and tok.token_bytes[tok.unk_id] == 0


def test_train_unigram_and_auto_vocab(sample_docs):
    docs = sample_docs[:60]
    n_bytes = sum(len(d.encode()) for d in docs)
    tok = train_tokenizer(docs, model_type="unigram")
    assert tok.vocab_size == auto_vocab_size(n_bytes) < 32000
    for text in TRICKY:
        assert tok.decode(tok.encode(text)) == unicodedata.normalize("NFC", text)


def test_auto_vocab_rule():
    assert auto_vocab_size(10**9) == 32000
    assert auto_vocab_size(200_000) == 4864  # 200,000 / 40 = 5,000, rounded down to a multiple of 256
    assert auto_vocab_size(1000) == 512


def test_vocab_over_uint16_is_refused(sample_docs):
    with pytest.raises(DataError, match="65535"):
        train_tokenizer(sample_docs[:5], vocab_size=MAX_VOCAB + 1)


def test_vocab_too_large_for_corpus_is_a_clear_error(sample_docs):
    with pytest.raises(DataError, match=r"--vocab-size \d+ or less"):
        train_tokenizer(sample_docs[:20], vocab_size=30000)


def test_model_with_other_special_ids_is_refused(sample_docs, tmp_path):
    prefix = tmp_path / "plain"
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sample_docs[:20]), model_prefix=str(prefix),
                                   vocab_size=1200, minloglevel=2)  # SentencePiece defaults: pad disabled
    with pytest.raises(DataError, match="special ids"):
        Tokenizer.load(f"{prefix}.model")
