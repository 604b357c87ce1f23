"""sample.py: the checkpoint is all it needs, text streams token by token, bad input is one paragraph."""

import importlib.util
import io
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanokor.checkpoint import build_model, load_checkpoint, save_checkpoint
from nanokor.generate import generate


REPO = Path(__file__).resolve().parents[1]
PROMPT = "세종대왕은 훈민정음을"


def load_sample_module():
    spec = importlib.util.spec_from_file_location("sample_cli", REPO / "sample.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


sample = load_sample_module()


def greedy_text(ckpt, tokenizer, prompt, n, **kw):
    model = build_model(load_checkpoint(ckpt))
    idx = torch.tensor([[tokenizer.bos_id, *tokenizer.encode(prompt)]])
    ids = [t.item() for t in generate(model, idx, n, temperature=0, stop_ids=tokenizer.eos_id, **kw)]
    return prompt + tokenizer.decode(ids)


class Recorder:
    """Stands in for stdout and keeps every write, to see the streaming."""

    def __init__(self):
        self.writes = []

    def write(self, s):
        self.writes.append(s)

    def flush(self):
        pass


def run_main(monkeypatch, *args):
    out = Recorder()
    monkeypatch.setattr(sys, "stdout", out)
    code = sample.main([str(a) for a in args])
    return code, "".join(out.writes), out.writes


def test_cli_verbatim_greedy_output_is_prompt_plus_the_generated_text(ckpt, tokenizer):
    proc = subprocess.run([sys.executable, "sample.py", "--ckpt", str(ckpt), "--prompt", PROMPT, "--temperature",
                           "0", "--max-new-tokens", "25"], cwd=REPO, capture_output=True, text=True,
                          encoding="utf-8")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == greedy_text(ckpt, tokenizer, PROMPT, 25) + "\n"


def test_compile_flag_compiles_the_static_decoding_step_and_keeps_the_output(ckpt, tokenizer, monkeypatch):
    # Compiling for real costs ~20 s (the suite compiles once, in the training tests); here torch.compile
    # is a spy, which shows the flag's wiring and that generation runs through what it returns.
    calls = []

    def spy(fn, **kwargs):
        calls.append(kwargs)
        return fn

    monkeypatch.setattr(torch, "compile", spy)
    code, text, _ = run_main(monkeypatch, "--ckpt", ckpt, "--prompt", PROMPT, "--temperature", "0",
                             "--max-new-tokens", "12", "--compile")
    assert code == 0 and calls == [{"dynamic": False, "fullgraph": True, "options": {"cpp_wrapper": True}}]
    assert text == greedy_text(ckpt, tokenizer, PROMPT, 12) + "\n"


def test_a_reader_that_stops_early_ends_sampling_without_a_traceback(ckpt):
    proc = subprocess.Popen([sys.executable, "sample.py", "--ckpt", str(ckpt), "--max-new-tokens", "100",
                             "--num-samples", "20"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.read(1)  # as `| head -c 1` would: read a little, then go away
    proc.stdout.close()
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 1 and "Traceback" not in stderr, stderr


def test_cuda_graph_flag_on_a_cpu_names_the_fix(ckpt):
    proc = subprocess.run([sys.executable, "sample.py", "--ckpt", str(ckpt), "--device", "cpu", "--cuda-graph"],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and "needs a CUDA device" in proc.stderr and "--compile" in proc.stderr


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="needs a machine without flash-attn")
def test_a_checkpoint_trained_with_flash_attn_samples_where_flash_attn_is_missing(ckpt, tokenizer, tmp_path,
                                                                                 monkeypatch):
    state = load_checkpoint(ckpt)
    state["model_config"]["attention"] = "flash"  # as a GPU run with --attention=flash saves it
    flash_ckpt = tmp_path / "flash.pt"
    save_checkpoint(state, flash_ckpt)
    code, text, _ = run_main(monkeypatch, "--ckpt", flash_ckpt, "--prompt", PROMPT, "--temperature", "0",
                             "--max-new-tokens", "12")
    assert code == 0 and text == greedy_text(ckpt, tokenizer, PROMPT, 12) + "\n"


def test_prompt_from_stdin(ckpt, tokenizer, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO((PROMPT + "\n").encode("utf-8"))))
    code, text, _ = run_main(monkeypatch, "--ckpt", ckpt, "--prompt-file", "-", "--temperature", 0,
                             "--max-new-tokens", 10)
    assert code == 0 and text == greedy_text(ckpt, tokenizer, PROMPT, 10) + "\n"  # the trailing newline is dropped


def test_streams_token_by_token_and_the_pieces_add_up_to_the_decoded_text(ckpt, tokenizer, monkeypatch):
    code, text, writes = run_main(monkeypatch, "--ckpt", ckpt, "--prompt", PROMPT, "--temperature", 0,
                                  "--max-new-tokens", 40, "--repetition-penalty", 1.2)
    assert code == 0
    assert writes[0] == PROMPT and len(writes) >= 40  # the prompt, then one write per token (+ the end)
    assert text == greedy_text(ckpt, tokenizer, PROMPT, 40, repetition_penalty=1.2) + "\n"


def test_prompt_file_with_byte_fallback_korean(ckpt, tokenizer, tmp_path, monkeypatch):
    prompt = "뷁 똠얌꿍"  # syllables the tokenizer only has as bytes
    assert all(tokenizer.id_to_piece(i).startswith("<0x") for i in tokenizer.encode("뷁"))
    path = tmp_path / "prompt.txt"
    path.write_text(prompt + "\n\n", encoding="utf-8")
    code, text, writes = run_main(monkeypatch, "--ckpt", ckpt, "--prompt-file", path, "--temperature", 0,
                                  "--max-new-tokens", 12)
    assert code == 0 and text == greedy_text(ckpt, tokenizer, prompt, 12) + "\n"


def test_stops_at_eos(ckpt, tokenizer, tmp_path, monkeypatch):
    ck = load_checkpoint(ckpt)
    model = build_model(ck)
    idx = torch.tensor([[tokenizer.bos_id, *tokenizer.encode(PROMPT)]])
    first = model(idx)[0][0, -1].argmax().item()
    with torch.no_grad():  # make EOS the greedy choice wherever the first token's logit is positive
        model.lm_head.weight[tokenizer.eos_id] = 10 * model.lm_head.weight[first]
    eos_ckpt = tmp_path / "eos.pt"
    save_checkpoint({**ck, "model": model.state_dict()}, eos_ckpt)
    code, text, _ = run_main(monkeypatch, "--ckpt", eos_ckpt, "--prompt", PROMPT, "--temperature", 0)
    assert code == 0 and text == PROMPT + "\n"


def test_generation_is_clamped_to_the_context_with_a_note(ckpt, tokenizer, monkeypatch, capsys):
    prompt = " ".join([PROMPT] * 14)  # close to the 128-token context, so the clamped run is short
    n_prompt = 1 + len(tokenizer.encode(prompt))
    assert 90 < n_prompt < 120
    code, text, writes = run_main(monkeypatch, "--ckpt", ckpt, "--prompt", prompt, "--temperature", 0,
                                  "--max-new-tokens", 500)
    assert code == 0
    assert f"note: generating {128 - n_prompt} tokens instead of --max-new-tokens 500" in capsys.readouterr().err
    assert text == greedy_text(ckpt, tokenizer, prompt, 128 - n_prompt) + "\n"


def test_seeded_samples_reproduce_and_differ_from_each_other(ckpt, monkeypatch):
    args = ["--ckpt", ckpt, "--prompt", PROMPT, "--num-samples", 3, "--max-new-tokens", 8, "--top-k", 40,
            "--top-p", 0.95, "--temperature", 1.2]
    _, a, _ = run_main(monkeypatch, *args, "--seed", 1)
    _, b, _ = run_main(monkeypatch, *args, "--seed", 1)
    _, c, _ = run_main(monkeypatch, *args, "--seed", 2)
    samples = a.split("\n" + "-" * 40 + "\n")
    assert a == b and a != c and len(samples) == 3 and len(set(samples)) == 3
    assert all(s.startswith(PROMPT) for s in samples)


def test_top_k_0_is_off_as_in_the_exported_generation_config(ckpt, monkeypatch):
    args = ["--ckpt", ckpt, "--prompt", PROMPT, "--max-new-tokens", 8, "--temperature", 1.5, "--seed", 3]
    _, off, _ = run_main(monkeypatch, *args)
    _, zero, _ = run_main(monkeypatch, *args, "--top-k", 0)
    _, one, _ = run_main(monkeypatch, *args, "--top-k", 1)
    assert zero == off != one


def test_unconditional_sampling_without_a_prompt(ckpt, monkeypatch):
    code, text, _ = run_main(monkeypatch, "--ckpt", ckpt, "--max-new-tokens", 10)
    assert code == 0 and len(text.strip()) > 0


def corrupt(path):
    path.write_bytes(b"PK\x03\x04 this is not a checkpoint")
    return path


def wrong_version(path, ckpt):
    state = torch.load(ckpt, weights_only=True)
    state["format_version"] = 99
    torch.save(state, path)
    return path


@pytest.mark.parametrize("case, message", [
    ("missing", "No checkpoint at"),
    ("directory", "It is a directory; the checkpoint in it is"),
    ("corrupt", "Could not read"),
    ("version", "format version 99"),
    ("empty_prompt", "tokenizes to nothing"),
    ("cp949", "not valid UTF-8"),
    ("no_file", "Cannot read the prompt file"),
    ("long_prompt", "leaving no room to generate"),
])
def test_bad_input_is_a_one_paragraph_error(case, message, ckpt, tmp_path, monkeypatch, capsys):
    args = {
        "missing": ["--ckpt", tmp_path / "none.pt"],
        "directory": ["--ckpt", ckpt.parent],
        "corrupt": ["--ckpt", corrupt(tmp_path / "bad.pt")],
        "version": ["--ckpt", wrong_version(tmp_path / "v99.pt", ckpt)],
        "empty_prompt": ["--ckpt", ckpt, "--prompt", ""],
        "cp949": ["--ckpt", ckpt, "--prompt-file", tmp_path / "cp949.txt"],
        "no_file": ["--ckpt", ckpt, "--prompt-file", tmp_path / "nowhere.txt"],
        "long_prompt": ["--ckpt", ckpt, "--prompt", "한국어 문장이 아주 길다. " * 40],
    }[case]
    (tmp_path / "cp949.txt").write_bytes("한국어 프롬프트".encode("cp949"))
    code, text, _ = run_main(monkeypatch, *args)
    err = capsys.readouterr().err
    assert code == 2 and text == ""
    assert err.startswith("error: ") and message in err and err.count("\n") == 1 and "Traceback" not in err
    assert "weights_only" not in err  # torch's advice to load a damaged file unsafely is not passed on


@pytest.mark.parametrize("flag, value", [("--top-p", "1.5"), ("--temperature", "-1"), ("--top-k", "-1"),
                                         ("--max-new-tokens", "zero"), ("--device", "tpu"),
                                         ("--seed", str(2**64)), ("--seed", "-1"),  # was an Overflow traceback
                                         ("--temperature", "nan"), ("--repetition-penalty", "inf"),  # were silent
                                         ("--top-p", "nan")])  # was a ValueError traceback
def test_bad_option_values_exit_2_with_usage(flag, value, ckpt, monkeypatch, capsys):
    with pytest.raises(SystemExit) as exit_info:
        sample.main(["--ckpt", str(ckpt), flag, value])
    assert exit_info.value.code == 2 and flag.lstrip("-") in capsys.readouterr().err.replace("argument ", "")
