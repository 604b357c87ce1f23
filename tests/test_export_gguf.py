"""The GGUF export, read back with the `gguf` package's reader: architecture, tensors, vocabulary.

llama.cpp itself is not built in CI (bench/llamacpp_check.sh runs it), so two small references stand
in for it here, written from llama.cpp's sources and fed only what the GGUF file holds: its Llama and
Qwen3 forward passes (Llama: adjacent-pair RoPE; Qwen3: attn_q_norm / attn_k_norm, then NEOX's
rotate-half RoPE; both: grouped heads, token_embd as the head when output.weight is absent) and its SPM
tokenizer (with special tokens parsed, for rendered chat templates). A chat model's Ollama TEMPLATE is
rendered by a small Go text/template interpreter for the constructs it uses. SentencePiece itself is the
reference for pieces, scores and types.
"""

import re
import sys
import unicodedata

import gguf
import jinja2
import numpy as np
import pytest
import torch

from nanokor.chat_format import CHAT_TEMPLATE, render
from nanokor.checkpoint import build_model, load_checkpoint
from nanokor.corpus import open_corpus
from nanokor.export import main
from nanokor.export_gguf import rope_permute
from nanokor.export_spec import SAMPLING
from nanokor.tokenizer import train_tokenizer

from test_export import CHATS, EDGE_CASES, KOREAN
from tiny_checkpoint import make_checkpoint

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = (gguf.TokenType[n] for n in (
    "NORMAL", "UNKNOWN", "CONTROL", "USER_DEFINED", "UNUSED", "BYTE"))


def export_gguf(tmp_path_factory, tokenizer, name, *extra_args, **overrides):
    ckpt = make_checkpoint(tmp_path_factory.mktemp(name) / "last.pt", tokenizer, **overrides)
    out = ckpt.parent / "gguf"
    assert main(["--ckpt", str(ckpt), "--gguf", "--out", str(out), *extra_args]) == 0
    return ckpt, out


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tokenizer):
    return export_gguf(tmp_path_factory, tokenizer, "untied")


@pytest.fixture(scope="module")
def exported_tied_mqa(tmp_path_factory, tokenizer):
    return export_gguf(tmp_path_factory, tokenizer, "tied", tie_embeddings=True, n_kv_head=1, rope_theta=5e5,
                       norm_eps=1e-6)


@pytest.fixture(scope="module")
def exported_qk_norm(tmp_path_factory, tokenizer):
    return export_gguf(tmp_path_factory, tokenizer, "qk", qk_norm=True, random_gains=True)


def fields(path) -> dict:
    reader = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items()}, reader


def weights(reader) -> dict:
    return {t.name: gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float64) for t in reader.tensors}


def llamacpp_logits(meta: dict, w: dict, ids: list[int]) -> np.ndarray:
    """llama.cpp's Llama or Qwen3 graph (general.architecture) in float64. Llama's RoPE rotates dims
    (2i, 2i+1) of each head; Qwen3 normalizes each head's q and k (attn_q_norm, attn_k_norm), then its
    NEOX RoPE rotates dims (i, i + hd/2). Query head h reads key/value head h // (n_head / n_head_kv), and
    the LM head is token_embd when output.weight is absent."""
    arch = meta["general.architecture"]
    n_head, n_kv = meta[f"{arch}.attention.head_count"], meta[f"{arch}.attention.head_count_kv"]
    eps, theta = meta[f"{arch}.attention.layer_norm_rms_epsilon"], meta[f"{arch}.rope.freq_base"]
    x = w["token_embd.weight"][ids]
    n, d = x.shape
    hd = meta[f"{arch}.rope.dimension_count"]
    angle = np.arange(n)[:, None, None] * theta ** (-np.arange(0, hd, 2) / hd)  # (n, 1, hd/2)
    cos, sin = np.cos(angle), np.sin(angle)

    def rope(q):
        if arch == "qwen3":  # NEOX: the pairs are (i, i + hd/2)
            a, b = q[..., :hd // 2], q[..., hd // 2:]
            return np.concatenate([a * cos - b * sin, a * sin + b * cos], axis=-1)
        a, b = q[..., 0::2], q[..., 1::2]
        return np.stack([a * cos - b * sin, a * sin + b * cos], axis=-1).reshape(q.shape)

    def rms(v, g):
        return v / np.sqrt((v * v).mean(-1, keepdims=True) + eps) * g

    def heads(v, blk, name, count):
        v = v.reshape(n, count, hd)
        return rope(rms(v, blk[f"{name}_norm"]) if arch == "qwen3" else v)

    causal = np.triu(np.full((n, n), -np.inf), 1)
    for i in range(meta[f"{arch}.block_count"]):
        blk = {k.split(".")[2]: v for k, v in w.items() if k.startswith(f"blk.{i}.")}
        h = rms(x, blk["attn_norm"])
        q = heads(h @ blk["attn_q"].T, blk, "attn_q", n_head)
        k = np.repeat(heads(h @ blk["attn_k"].T, blk, "attn_k", n_kv), n_head // n_kv, axis=1)
        v = np.repeat((h @ blk["attn_v"].T).reshape(n, n_kv, hd), n_head // n_kv, axis=1)
        scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(hd) + causal
        p = np.exp(scores - scores.max(-1, keepdims=True))
        x = x + np.einsum("hqk,khd->qhd", p / p.sum(-1, keepdims=True), v).reshape(n, d) @ blk["attn_output"].T
        h = rms(x, blk["ffn_norm"])
        gate = h @ blk["ffn_gate"].T
        x = x + (gate / (1 + np.exp(-gate)) * (h @ blk["ffn_up"].T)) @ blk["ffn_down"].T
    return rms(x, w["output_norm.weight"]) @ w.get("output.weight", w["token_embd.weight"]).T


def llamacpp_tokenize(meta: dict, text: str) -> list[int]:
    """llama.cpp's SPM tokenizer (llama-vocab.cpp), parse_special off. User-defined tokens are cut out of
    the raw text first; each other fragment gets a leading space if add_space_prefix (llama.cpp's
    default: true) and follows a token, spaces become "▁", then the adjacent pair that forms the
    highest-scoring token merges (leftmost on ties) until none does; what is no token becomes bytes."""
    pieces, scores, types = (meta[f"tokenizer.ggml.{k}"] for k in ("tokens", "scores", "token_type"))
    ids = {p: i for i, p in enumerate(pieces)}
    user = sorted((p for p, t in zip(pieces, types) if t == USER_DEFINED), key=len, reverse=True)
    add_prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
    out, after_token = [], True
    for fragment in re.split("(" + "|".join(map(re.escape, user)) + ")", text):
        if fragment in user:
            out.append(ids[fragment])
            after_token = True
        elif fragment:
            symbols = list(((" " if add_prefix and after_token else "") + fragment).replace(" ", "\u2581"))
            while True:
                pairs = [(scores[ids[a + b]], -i) for i, (a, b) in enumerate(zip(symbols, symbols[1:])) if a + b in ids]
                if not pairs:
                    break
                i = -max(pairs)[1]
                symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
            out += [j for s in symbols for j in ([ids[s]] if s in ids else [ids[f"<0x{b:02X}>"] for b in s.encode()])]
            after_token = False
    return out


def layer_names(i: int) -> set[str]:
    return {f"blk.{i}.{t}.weight" for t in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm",
                                          "ffn_gate", "ffn_up", "ffn_down")}


@pytest.mark.parametrize("which, arch", [("exported", "llama"), ("exported_tied_mqa", "llama"),
                                         ("exported_qk_norm", "qwen3")])
def test_gguf_is_a_llama_or_qwen3_whose_logits_equal_nanokor(which, arch, request, tokenizer):
    ckpt, out = request.getfixturevalue(which)
    model = build_model(load_checkpoint(ckpt))
    c = model.config
    meta, reader = fields(out / "model-f32.gguf")
    assert meta["general.architecture"] == arch and meta["general.file_type"] == gguf.LlamaFileType.ALL_F32
    assert (meta[f"{arch}.block_count"], meta[f"{arch}.context_length"], meta[f"{arch}.embedding_length"],
            meta[f"{arch}.feed_forward_length"], meta[f"{arch}.attention.head_count"],
            meta[f"{arch}.attention.head_count_kv"], meta[f"{arch}.vocab_size"]) == (
        c.n_layer, c.max_seq_len, c.d_model, c.d_ff, c.n_head, c.n_kv_head, c.vocab_size)
    assert meta[f"{arch}.rope.freq_base"] == c.rope_theta
    assert meta[f"{arch}.attention.layer_norm_rms_epsilon"] == pytest.approx(c.norm_eps, rel=1e-6)
    names = {"token_embd.weight", "output_norm.weight"} | set().union(*map(layer_names, range(c.n_layer)))
    names |= set() if c.tie_embeddings else {"output.weight"}
    if c.qk_norm:
        names |= {f"blk.{i}.attn_{t}_norm.weight" for i in range(c.n_layer) for t in "qk"}
    assert {t.name for t in reader.tensors} == names
    assert {t.tensor_type for t in reader.tensors} == {gguf.GGMLQuantizationType.F32}
    ids = [tokenizer.bos_id, *tokenizer.encode(KOREAN)]
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0][0].double().numpy()
    assert np.abs(llamacpp_logits(meta, weights(reader), ids) - ours).max() <= 1e-4


@pytest.mark.parametrize("which", ["exported", "exported_qk_norm"])
def test_rope_permutation_is_what_the_forward_pass_needs(which, request, tokenizer):
    """Llama's file with q/k rows left in nanokor's order, or Qwen3's with them permuted as for Llama,
    computes different logits: the test above would catch the permutation missing or misapplied."""
    ckpt, out = request.getfixturevalue(which)
    meta, reader = fields(out / "model-f32.gguf")
    w = weights(reader)
    model = build_model(load_checkpoint(ckpt))
    c = model.config
    permute = rope_permute if c.qk_norm else lambda x, n_head: x
    for i, layer in enumerate(model.layers):
        w[f"blk.{i}.attn_q.weight"] = permute(layer.self_attn.q_proj.weight.detach(), c.n_head).double().numpy()
        w[f"blk.{i}.attn_k.weight"] = permute(layer.self_attn.k_proj.weight.detach(), c.n_kv_head).double().numpy()
    ids = [tokenizer.bos_id, *tokenizer.encode(KOREAN)]
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0][0].double().numpy()
    assert np.abs(llamacpp_logits(meta, w, ids) - ours).max() > 1e-2


def test_vocabulary_is_sentencepieces_pieces_scores_and_types(exported, tokenizer):
    meta, _ = fields(exported[1] / "model-f32.gguf")
    sp, n = tokenizer.sp, tokenizer.vocab_size
    assert meta["tokenizer.ggml.model"] == "llama"
    assert meta["tokenizer.ggml.tokens"] == [sp.id_to_piece(i) for i in range(n)]
    assert meta["tokenizer.ggml.scores"] == [np.float32(sp.get_score(i)) for i in range(n)]
    expected = [UNKNOWN if sp.is_unknown(i) else CONTROL if sp.is_control(i) else BYTE if sp.is_byte(i)
                else UNUSED if sp.is_unused(i) else NORMAL for i in range(n)]
    expected[sp.piece_to_id("\n")] = USER_DEFINED  # prepare.py's one user-defined symbol
    assert meta["tokenizer.ggml.token_type"] == expected
    assert [meta[f"tokenizer.ggml.{k}_token_id"] for k in ("unknown", "bos", "eos", "padding")] == [0, 1, 2, 3]
    assert meta["tokenizer.ggml.add_bos_token"] is True and meta["tokenizer.ggml.add_eos_token"] is False
    assert meta["tokenizer.ggml.add_space_prefix"] is False


def test_llamacpps_tokenizer_reading_the_gguf_gives_nanokors_ids(exported, tokenizer):
    meta, _ = fields(exported[1] / "model-f32.gguf")
    lines = [line for doc in open_corpus("sample").documents() for line in doc.split("\n") if line]
    for text in [KOREAN, *EDGE_CASES, *lines[::8]]:
        text = unicodedata.normalize("NFC", text)  # nanokor's encode applies NFC; llama.cpp does not
        assert llamacpp_tokenize(meta, text) == tokenizer.encode(text), text[:40]
    # The bug, reproduced: without the key llama.cpp prepends "▁" and the ids differ.
    del meta["tokenizer.ggml.add_space_prefix"]
    assert llamacpp_tokenize(meta, "한국의 역사는") != tokenizer.encode("한국의 역사는")


def test_sampling_defaults_are_sample_pys_in_gguf_and_modelfile(exported, tokenizer):
    meta, _ = fields(exported[1] / "model-f32.gguf")
    assert meta["general.sampling.temp"] == pytest.approx(SAMPLING["temperature"])
    assert (meta["general.sampling.top_k"], meta["general.sampling.top_p"], meta["general.sampling.min_p"],
            meta["general.sampling.penalty_repeat"]) == (0, 1.0, 0.0, 1.0)
    assert meta["general.languages"] == ["ko"] and meta["general.license"] == "unknown"
    assert "training tokens: not recorded" in meta["general.description"]
    lines = (exported[1] / "Modelfile").read_text().splitlines()
    params = dict(line.split()[1:] for line in lines if line.startswith("PARAMETER "))
    assert "FROM ./model-f32.gguf" in lines and 'TEMPLATE """{{ .Prompt }}"""' in lines
    assert params == {"num_ctx": "128", "temperature": "0.8", "top_k": str(tokenizer.vocab_size), "top_p": "1.0",
                      "min_p": "0.0", "repeat_penalty": "1.0"}


@pytest.mark.parametrize("dtype, qtype, file_type", [
    ("float16", "F16", "MOSTLY_F16"), ("bfloat16", "BF16", "MOSTLY_BF16"), ("q8_0", "Q8_0", "MOSTLY_Q8_0")])
def test_half_and_8_bit_exports_round_the_matrices_only(dtype, qtype, file_type, exported, tmp_path):
    assert main(["--ckpt", str(exported[0]), "--gguf", "--out", str(tmp_path), "--dtype", dtype]) == 0
    meta, reader = fields(tmp_path / f"model-{qtype.lower()}.gguf")
    assert meta["general.file_type"] == gguf.LlamaFileType[file_type]
    assert (tmp_path / "Modelfile").read_text().count(f"FROM ./model-{qtype.lower()}.gguf") == 1
    f32 = weights(fields(exported[1] / "model-f32.gguf")[1])
    for name, w in weights(reader).items():
        ref, kind = f32[name], reader.get_tensor([t.name for t in reader.tensors].index(name)).tensor_type
        if name.endswith("norm.weight"):
            assert kind == gguf.GGMLQuantizationType.F32 and np.array_equal(w, ref)
        elif qtype == "Q8_0":  # one f16 scale per 32 values: off by half a step (the block's max / 127), plus
            assert kind == gguf.GGMLQuantizationType.Q8_0  # the scale's own rounding (up to 127 * 2^-11 steps)
            step = np.abs(ref.reshape(-1, 32)).max(-1, keepdims=True) / 127
            assert (np.abs(w - ref).reshape(-1, 32) <= step * 0.57).all()
        else:  # exactly torch's rounding
            assert kind == gguf.GGMLQuantizationType[qtype]
            assert np.array_equal(w, torch.from_numpy(ref).to(getattr(torch, dtype)).double().numpy())


def test_unigram_tokenizer_is_refused_with_a_clear_message(tmp_path, capsys):
    docs = list(open_corpus("sample").documents())
    unigram = train_tokenizer(docs, vocab_size=2048, model_type="unigram")
    ckpt = make_checkpoint(tmp_path / "u.pt", unigram)
    assert main(["--ckpt", str(ckpt), "--gguf", "--out", str(tmp_path / "gguf")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "unigram" in err and "--model-type bpe" in err and "Traceback" not in err
    assert not (tmp_path / "gguf").exists()


def test_missing_gguf_package_names_the_extra(ckpt, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf now fails as if it were not installed
    monkeypatch.delitem(sys.modules, "nanokor.export_gguf", raising=False)
    assert main(["--ckpt", str(ckpt), "--gguf", "--out", str(tmp_path / "gguf")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "pip install -e '.[gguf]'" in err and "Traceback" not in err


def test_bad_dtype_and_licence_are_usage_errors(ckpt, tmp_path, capsys):
    for args in (["--dtype", "q8_0"], ["--gguf", "--license", "MIT License"]):
        with pytest.raises(SystemExit) as e:
            main(["--ckpt", str(ckpt), "--out", str(tmp_path / "x"), *args])
        assert e.value.code == 2
    err = capsys.readouterr().err
    assert "q8_0 is a GGUF type" in err and "not a licence identifier" in err
    assert not (tmp_path / "x").exists()


def test_sinusoidal_model_is_refused(tmp_path, tokenizer, capsys):
    ckpt = make_checkpoint(tmp_path / "sin.pt", tokenizer, position="sinusoidal")
    assert main(["--ckpt", str(ckpt), "--gguf", "--out", str(tmp_path / "gguf")]) == 2
    assert "position='rope'" in capsys.readouterr().err
    assert not (tmp_path / "gguf").exists()


# ---- a chat model: the template llama.cpp renders, the one Ollama renders, and where a reply ends ----

@pytest.fixture(scope="module")
def chat_exported(tmp_path_factory, tokenizer):
    ckpt = make_checkpoint(tmp_path_factory.mktemp("chat") / "last.pt", tokenizer, chat=True)
    out = ckpt.parent / "gguf"
    assert main(["--ckpt", str(ckpt), "--gguf", "--out", str(out)]) == 0
    return fields(out / "model-f32.gguf")[0], out / "Modelfile"


def llamacpp_tokenize_special(meta: dict, text: str) -> list[int]:
    """llama.cpp's tokenize of a rendered chat prompt: BOS (add_bos_token), then parse_special on: the text
    of every control (or unknown) token is that token, the fragments between are tokenized as text."""
    pieces, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    special = {p: i for i, (p, t) in enumerate(zip(pieces, types)) if t in (CONTROL, UNKNOWN)}
    ids = [meta["tokenizer.ggml.bos_token_id"]] if meta["tokenizer.ggml.add_bos_token"] else []
    for fragment in re.split("(" + "|".join(map(re.escape, special)) + ")", text):
        ids += [special[fragment]] if fragment in special else llamacpp_tokenize(meta, fragment) if fragment else []
    return ids


def go_template(template: str, data: dict) -> str:
    """Go's text/template, for the constructs an Ollama TEMPLATE of nanokor's uses: text, {{ .Field }},
    {{ range .Field }} ... {{ end }}, and the {{- / -}} markers that trim the white space beside an action
    (" \\t\\r\\n"). Anything else raises, so a template that outgrows this renderer cannot pass unchecked."""
    nodes, stack, trim_next, pos = [], [], False, 0
    for m in re.finditer(r"\{\{(- )?\s*(.*?)\s*( -)?\}\}", template, re.S):
        text = template[pos:m.start()]
        text = text.lstrip(" \t\r\n") if trim_next else text
        nodes.append(("text", text.rstrip(" \t\r\n") if m.group(1) else text))
        action, trim_next, pos = m.group(2), bool(m.group(3)), m.end()
        if action.startswith("range "):
            stack.append((nodes, action[len("range "):]))
            nodes = []
        elif action == "end":
            body, (nodes, field) = nodes, stack.pop()
            nodes.append(("range", field, body))
        elif re.fullmatch(r"(\.[A-Za-z]\w*)+", action):
            nodes.append(("field", action))
        else:
            raise NotImplementedError(f"{{{{ {action} }}}}: not a construct this renderer knows")
    assert not stack, "range without end"
    nodes.append(("text", template[pos:].lstrip(" \t\r\n") if trim_next else template[pos:]))

    def field(path: str, dot):
        for name in path.strip(".").split("."):
            dot = dot[name]
        return dot

    def render(nodes, dot) -> str:
        return "".join(n[1] if n[0] == "text" else str(field(n[1], dot)) if n[0] == "field"
                       else "".join(render(n[2], item) for item in field(n[1], dot)) for n in nodes)
    return render(nodes, data)


def test_go_template_renderer_follows_go_semantics_on_known_cases():
    data = {"Messages": [{"Role": "user", "Content": "가"}, {"Role": "assistant", "Content": "나"}]}
    assert go_template("  {{- range .Messages }}[{{ .Role }}:{{ .Content }}]{{ end }}\n", data) == "[user:가][assistant:나]\n"
    assert go_template("a {{- .X -}} \n b", {"X": 1}) == "a1b"  # trims spaces and newlines on both sides
    assert go_template("{{ range .Messages }}{{ end }}x", {"Messages": []}) == "x"
    with pytest.raises(NotImplementedError):
        go_template("{{ if .X }}y{{ end }}", {"X": 1})


def test_a_chat_gguf_carries_the_template_and_ends_a_turn_at_im_end(chat_exported, exported, tokenizer):
    meta, _ = chat_exported
    assert meta["tokenizer.chat_template"] == CHAT_TEMPLATE
    assert meta["tokenizer.ggml.eot_token_id"] == tokenizer.im_end_id
    assert meta["tokenizer.ggml.eos_token_id"] == tokenizer.eos_id  # also an end of generation in llama.cpp
    types = meta["tokenizer.ggml.token_type"]
    assert [meta["tokenizer.ggml.tokens"][i] for i in (4, 5)] == ["<|im_start|>", "<|im_end|>"]
    assert types[4] == types[5] == CONTROL  # never produced from text, parsed from a rendered template
    base, _ = fields(exported[1] / "model-f32.gguf")
    assert "tokenizer.chat_template" not in base and "tokenizer.ggml.eot_token_id" not in base


@pytest.mark.parametrize("conversation", CHATS)
def test_llamacpp_and_ollama_render_the_renderers_ids(chat_exported, tokenizer, conversation):
    meta, modelfile = chat_exported
    text = modelfile.read_text(encoding="utf-8")
    template = re.search(r'^TEMPLATE """(.*?)"""$', text, re.S | re.M).group(1)
    assert re.findall(r'^PARAMETER stop "(.*)"$', text, re.M) == ["<|im_end|>", "</s>"]
    bos = meta["tokenizer.ggml.tokens"][meta["tokenizer.ggml.bos_token_id"]]
    jinja = jinja2.Environment().from_string(meta["tokenizer.chat_template"])
    for end in range(1, len(conversation) + 1):
        messages = conversation[:end]
        if messages[-1]["role"] != "user":
            continue
        expected = render(tokenizer, messages, add_generation_prompt=True)[0]
        # llama.cpp: the Jinja template's text, its leading BOS text dropped (add_bos_token adds the token).
        rendered = jinja.render(messages=messages, bos_token=bos, add_generation_prompt=True)
        assert rendered.startswith(bos)
        assert llamacpp_tokenize_special(meta, rendered.removeprefix(bos)) == expected
        assert llamacpp_tokenize_special(meta, rendered)[:2] == [1, 1]  # what the dropped text would double
        # Ollama: its Go TEMPLATE over .Messages (the system message among them), BOS added by the tokenizer.
        go_messages = [{"Role": m["role"], "Content": m["content"]} for m in messages]
        assert llamacpp_tokenize_special(meta, go_template(template, {"Messages": go_messages})) == expected
