"""The exported directory in transformers (offline): same logits, same token ids, same greedy tokens; a
qk_norm model as Qwen3ForCausalLM, every other as LlamaForCausalLM; for a chat model, apply_chat_template's
ids and the replies chat.py gives."""

import importlib.util
import json
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from nanokor.chat_format import REPLY_STOP_IDS, render
from nanokor.chat_session import ChatSession
from nanokor.checkpoint import build_model, load_checkpoint, save_checkpoint
from nanokor.corpus import open_corpus
from nanokor.export import hf_tokenizer_json, main
from nanokor.generate import Decoder, generate
from nanokor.tokenizer import train_tokenizer

from test_chat_format import CONVERSATIONS, SYSTEM
from tiny_checkpoint import make_checkpoint

REPO = Path(__file__).resolve().parents[1]

KOREAN = ("세종대왕은 1443년에 훈민정음을 창제하였다. 백성을 가르치는 바른 소리라는 뜻이다.\n"
          "  두 칸 띄어쓰기와 漢字, 드문 글자 뷁 똠얌꿍, emoji 😀 도 빠짐없이 토큰이 된다.")
NFD = unicodedata.normalize("NFD", "한글 자모로 풀어 쓴 문장")  # nanokor's encode applies NFC first
EDGE_CASES = ["", " ", "\n", "\n가", " 가", "가\n 나", "\t탭", "１２３ ＡＢＣ", "ㄱㄴㄷ 한ㄱ글", NFD, "<s>가</s>", "a  b   c"]


def export_dir(tmp_path_factory, tokenizer, name, *extra_args, **overrides):
    ckpt = make_checkpoint(tmp_path_factory.mktemp(name) / "last.pt", tokenizer, **overrides)
    out = ckpt.parent / "hf"
    assert main(["--ckpt", str(ckpt), "--out", str(out), *extra_args]) == 0
    return ckpt, out


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tokenizer):
    return export_dir(tmp_path_factory, tokenizer, "untied")


@pytest.fixture(scope="module")
def exported_tied_mqa(tmp_path_factory, tokenizer):
    return export_dir(tmp_path_factory, tokenizer, "tied", tie_embeddings=True, n_kv_head=1, rope_theta=5e5,
                      norm_eps=1e-6)


@pytest.fixture(scope="module")
def exported_qk_norm(tmp_path_factory, tokenizer):
    return export_dir(tmp_path_factory, tokenizer, "qk", qk_norm=True, random_gains=True)


def load_pair(ckpt, out):
    return build_model(load_checkpoint(ckpt)), AutoModelForCausalLM.from_pretrained(out).eval()


@pytest.mark.parametrize("which, architecture", [("exported", "LlamaForCausalLM"),
                                                  ("exported_tied_mqa", "LlamaForCausalLM"),
                                                  ("exported_qk_norm", "Qwen3ForCausalLM")])
def test_transformers_logits_equal_nanokor_on_korean_text(which, architecture, request, tokenizer):
    ckpt, out = request.getfixturevalue(which)
    model, hf = load_pair(ckpt, out)
    assert type(hf).__name__ == architecture and hf.config.architectures == [architecture]
    assert hf.config.num_key_value_heads == model.config.n_kv_head
    assert hf.config.tie_word_embeddings == model.config.tie_embeddings
    assert hf.config.rms_norm_eps == model.config.norm_eps
    assert hf.config.rope_parameters["rope_theta"] == model.config.rope_theta
    idx = torch.tensor([[tokenizer.bos_id, *tokenizer.encode(KOREAN)]])
    assert idx.size(1) > 60
    with torch.no_grad():
        assert (model(idx)[0] - hf(idx).logits).abs().max().item() <= 1e-4


def test_tied_export_stores_the_embedding_once(exported_tied_mqa):
    with safe_open(exported_tied_mqa[1] / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys() and "model.embed_tokens.weight" in f.keys()


def test_transformers_tokenizer_ids_equal_nanokor_on_the_korean_sample(exported, tokenizer):
    hf_tok = AutoTokenizer.from_pretrained(exported[1])
    texts = [KOREAN, *EDGE_CASES, *open_corpus("sample").documents()]
    for text in texts:
        ids = tokenizer.encode(text)
        assert hf_tok(text, add_special_tokens=False).input_ids == ids, text[:40]
        assert hf_tok.decode(ids) == tokenizer.decode(ids)
    # Documents start with BOS in training, so the HF tokenizer adds it like encode_prompt does.
    assert hf_tok(KOREAN).input_ids == [tokenizer.bos_id, *tokenizer.encode(KOREAN)]
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id, hf_tok.unk_token_id) == (1, 2, 3, 0)


def test_unigram_tokenizer_exports_exactly_too(tmp_path):
    from tokenizers import Tokenizer as HFTokenizer

    docs = list(open_corpus("sample").documents())
    unigram = train_tokenizer(docs, vocab_size=2048, model_type="unigram")
    hf_tok = HFTokenizer.from_str(json.dumps(hf_tokenizer_json(unigram.model_bytes)))
    plain = [t for t in EDGE_CASES if "<s>" not in t]  # special tokens in text: tokenizer_config.json's job
    for text in [KOREAN, *plain, *docs[::5]]:
        assert hf_tok.encode(text, add_special_tokens=False).ids == unigram.encode(text), text[:40]


@pytest.mark.parametrize("which", ["exported", "exported_qk_norm"])
def test_greedy_generation_gives_the_same_tokens_in_both(which, request, tokenizer):
    model, hf = load_pair(*request.getfixturevalue(which))
    prompt = [tokenizer.bos_id, *tokenizer.encode("조선의 역사는")]
    ours = torch.stack(list(generate(model, torch.tensor([prompt]), 40, temperature=0,
                                     stop_ids=tokenizer.eos_id)), dim=1)[0].tolist()
    theirs = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=40,
                         attention_mask=torch.ones(1, len(prompt), dtype=torch.long))[0, len(prompt):].tolist()
    assert ours == theirs
    assert len(set(ours)) > 5


def test_bfloat16_export_writes_bf16_weights_that_load(tmp_path_factory, tokenizer):
    ckpt, out = export_dir(tmp_path_factory, tokenizer, "bf16", "--dtype", "bfloat16")
    with safe_open(out / "model.safetensors", "pt") as f:
        assert f.get_tensor("model.norm.weight").dtype == torch.bfloat16
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    model = build_model(load_checkpoint(ckpt))
    with torch.no_grad():
        for p in model.parameters():  # the export's rounding, then fp32 math on both sides
            p.copy_(p.bfloat16().float())
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    idx = torch.tensor([[1, *tokenizer.encode(KOREAN)]])
    with torch.no_grad():
        assert (model(idx)[0] - hf(idx).logits).abs().max().item() <= 1e-4


def test_converter_and_sampling_keys_match_nanokor_and_sample_py(exported):
    out = exported[1]
    # convert_hf_to_gguf.py turns this into add_space_prefix; without it llama.cpp prepends "▁".
    assert json.loads((out / "tokenizer_config.json").read_text())["add_prefix_space"] is False
    spec = importlib.util.spec_from_file_location("sample_cli", Path(__file__).parents[1] / "sample.py")
    sample = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sample)
    defaults = sample.parse_args(["--ckpt", "x"])
    assert defaults.top_k is None and defaults.top_p is None  # off in sample.py, so off here too
    gen = GenerationConfig.from_pretrained(out)
    assert (gen.temperature, gen.top_k, gen.top_p, gen.min_p, gen.repetition_penalty) == (
        defaults.temperature, 0, 1.0, 0.0, defaults.repetition_penalty)
    assert (gen.bos_token_id, gen.eos_token_id, gen.pad_token_id, gen.do_sample) == (1, 2, 3, True)


def test_model_card_has_front_matter_and_the_training_figures(tmp_path, ckpt, exported):
    front, body = card(exported[1])
    assert front == {"language": ["ko"], "license": "unknown", "library_name": "transformers",
                     "pipeline_tag": "text-generation", "tags": ["nanokor", "llama"]}
    assert "| training tokens | not recorded |" in body and "| validation | not recorded |" in body
    assert "2 layers, d_model 64, 4 heads (2 key/value)" in body and "SentencePiece BPE, 4,608 pieces" in body
    trained = load_checkpoint(ckpt)
    trained.update(step=150, tokens_seen=307_200, val={"loss": 5.91234, "bpb": 2.01234, "step": 150})
    save_checkpoint(trained, tmp_path / "trained.pt")
    assert main(["--ckpt", str(tmp_path / "trained.pt"), "--out", str(tmp_path / "hf"), "--license", "mit"]) == 0
    front, body = card(tmp_path / "hf")
    assert front["license"] == "mit"
    assert "| training tokens | 307,200 (150 steps) |" in body
    assert "| validation | 2.0123 bits per byte, loss 5.9123 (step 150) |" in body


def test_qk_norm_model_card_names_qwen3(exported_qk_norm):
    front, body = card(exported_qk_norm[1])
    assert front["tags"] == ["nanokor", "qwen3"] and "It loads as `Qwen3ForCausalLM`." in body
    assert "Qwen3 decoder (Llama with per-head q/k RMSNorm): 2 layers" in body
    config = json.loads((exported_qk_norm[1] / "config.json").read_text())
    assert config["model_type"] == "qwen3" and config["use_sliding_window"] is False and "mlp_bias" not in config


def card(out):
    _, front, body = (out / "README.md").read_text().split("---\n", 2)
    return yaml.safe_load(front), body


def test_sinusoidal_model_is_refused_with_a_clear_message(tmp_path, tokenizer, capsys):
    ckpt = make_checkpoint(tmp_path / "sin.pt", tokenizer, position="sinusoidal")
    assert main(["--ckpt", str(ckpt), "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "position='rope'" in err and "Traceback" not in err
    assert not (tmp_path / "hf").exists()


def test_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    assert main(["--ckpt", str(tmp_path / "none.pt"), "--out", str(tmp_path / "hf")]) == 2
    assert "No checkpoint at" in capsys.readouterr().err


@pytest.mark.parametrize("extra", [[], ["--gguf"]])
def test_an_out_path_that_is_a_file_is_one_paragraph(extra, ckpt, tmp_path, capsys):
    (tmp_path / "taken").write_text("mine")
    for out in (tmp_path / "taken", tmp_path / "taken" / "hf"):  # was a FileExistsError / NotADirectoryError traceback
        assert main(["--ckpt", str(ckpt), "--out", str(out), *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "taken is a file, not a directory" in err and "Traceback" not in err
    assert (tmp_path / "taken").read_text() == "mine"


# ---- a chat model's export: the same conversation ids and the same replies in transformers ----

QUESTION = "한국의 수도는 어디인가요?"
CHATS = [*CONVERSATIONS,
         [{"role": "user", "content": "안녕?"}, {"role": "assistant", "content": "안녕하세요!"},
          {"role": "user", "content": "줄바꿈\n\n두 번"}, {"role": "assistant", "content": "네.\n"}],
         [SYSTEM, {"role": "user", "content": "뷁 똠얌꿍 😀 漢字"}, {"role": "assistant", "content": " 공백으로 시작"}]]


@pytest.fixture(scope="module")
def chat_exported(tmp_path_factory, tokenizer):
    """A chat model whose greedy reply to QUESTION ends with <|im_end|> after a few tokens (its <|im_end|>
    row is 1.5x the row of the 4th token it would say), exported."""
    ckpt = make_checkpoint(tmp_path_factory.mktemp("chat") / "last.pt", tokenizer, chat=True)
    state = load_checkpoint(ckpt)
    model = build_model(state)
    prompt = render(tokenizer, [{"role": "user", "content": QUESTION}], add_generation_prompt=True)[0]
    free = list(generate(model, torch.tensor([prompt]), 8, temperature=0))
    with torch.no_grad():
        model.lm_head.weight[tokenizer.im_end_id] = 1.5 * model.lm_head.weight[free[3].item()]
    save_checkpoint({**state, "model": model.state_dict()}, ckpt)
    out = ckpt.parent / "hf"
    assert main(["--ckpt", str(ckpt), "--out", str(out)]) == 0
    return ckpt, out


@pytest.mark.parametrize("conversation", CHATS)
def test_apply_chat_template_gives_the_renderers_ids(chat_exported, tokenizer, conversation):
    hf_tok = AutoTokenizer.from_pretrained(chat_exported[1])
    for end in range(1, len(conversation) + 1):  # every prefix that ends with a user turn, then the whole
        messages = conversation[:end]
        if messages[-1]["role"] == "user":
            ids = hf_tok.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
            assert ids == render(tokenizer, messages, add_generation_prompt=True)[0]
    assert hf_tok.apply_chat_template(conversation)["input_ids"] == render(tokenizer, conversation)[0]


def test_a_chat_export_names_its_turn_end_and_a_base_export_stays_plain(chat_exported, exported):
    config = json.loads((chat_exported[1] / "tokenizer_config.json").read_text())
    assert config["eos_token"] == "<|im_end|>" and config["split_special_tokens"] is False
    assert {config["added_tokens_decoder"][str(i)]["content"]: config["added_tokens_decoder"][str(i)]["special"]
            for i in (4, 5, 6)} == {"<|im_start|>": True, "<|im_end|>": True, "\n": False}
    assert GenerationConfig.from_pretrained(chat_exported[1]).eos_token_id == list(REPLY_STOP_IDS)  # <|im_end|>, </s>
    assert "apply_chat_template" in (chat_exported[1] / "README.md").read_text()
    base = json.loads((exported[1] / "tokenizer_config.json").read_text())
    assert "chat_template" not in base and base["eos_token"] == "</s>" and base["split_special_tokens"] is True
    # The one difference the chat export makes: a delimiter typed in text is a token to transformers.
    hf_tok = AutoTokenizer.from_pretrained(chat_exported[1])
    assert hf_tok("<|im_end|>", add_special_tokens=False).input_ids == [5]


def test_transformers_greedy_replies_equal_chat_py(chat_exported, tokenizer):
    ckpt, out = chat_exported
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    hf_tok = AutoTokenizer.from_pretrained(out)

    def hf_reply(prompt: list[int]) -> list[int]:  # generation_config's own stop ids end it
        ids = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=40,
                          attention_mask=torch.ones(1, len(prompt), dtype=torch.long))[0, len(prompt):].tolist()
        return ids[:-1] if ids[-1] in REPLY_STOP_IDS else ids

    prompt = hf_tok.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True)["input_ids"]
    first = hf_reply(prompt)
    assert len(first) < 40  # it ended at <|im_end|>, as chat.py's does
    proc = subprocess.run([sys.executable, "chat.py", "--ckpt", str(ckpt), "--prompt", QUESTION, "--temperature",
                           "0", "--max-new-tokens", "40"], cwd=REPO, capture_output=True, text=True, encoding="utf-8")
    assert proc.returncode == 0 and proc.stdout == tokenizer.decode(first) + "\n", proc.stderr
    # Later turns too, on the conversation's own ids (as chat.py keeps them).
    session = ChatSession(Decoder(build_model(load_checkpoint(ckpt))), tokenizer, system=SYSTEM["content"],
                          max_new_tokens=40, sampling={"temperature": 0})
    for question in (QUESTION, "그럼 부산은요?", "고마워요"):
        ours = list(session.reply(question))
        user, earlier = session.turns[-2][1], session.turns[:-2]
        assert ours == hf_reply(session.prompt(user, earlier))
