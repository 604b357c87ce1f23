"""python -m nanokor.plot: training curves from metrics.jsonl and attention maps, drawn headless."""

import json
import sys

import pytest
import torch

from nanokor import plot
from nanokor.checkpoint import build_model, load_checkpoint
from nanokor.tokenizer import Tokenizer


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(path, records, tail=""):
    path.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    (path / "metrics.jsonl").write_text("\n".join(lines) + "\n" + tail, encoding="utf-8")
    return path


def train_py_records(steps=40, scale=1.0):
    """What train.py logs: step lines with tokens_seen, eval lines with only the step, sample lines."""
    out = []
    for step in range(1, steps + 1):
        out.append({"step": step, "loss": scale * (6 - step / 10), "lr": 1e-3 * min(1, step / 10),
                    "tokens_seen": 2048 * step, "grad_norm": 0.5})
        if step % 10 == 0:
            out.append({"step": step, "val_loss": scale * (6.2 - step / 10), "val_ppl": 100.0,
                        "val_bpb": scale * (2 - step / 40), "val_tokens": 4096})
            out.append({"step": step, "sample": "한국어 샘플"})
    return out


def lines(ax):
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.lines}


def test_curves_of_a_train_py_run_against_step_and_tokens(tmp_path):
    run = write_run(tmp_path / "out", train_py_records(), tail='{"step": 41, "lo')  # a line cut short
    fig = plot.metrics_figure([run])
    axes = fig.axes
    assert [ax.get_title() for ax in axes] == [
        "loss vs step", "loss vs tokens seen", "bits per byte vs step", "bits per byte vs tokens seen",
        "learning rate vs step", "learning rate vs tokens seen"]
    by_step, by_tokens = lines(axes[0]), lines(axes[1])
    assert by_step["out train"][0] == list(range(1, 41))
    assert by_step["out val"] == ([10, 20, 30, 40], pytest.approx([5.2, 4.2, 3.2, 2.2]))
    # evaluation lines carry no token count: they sit at the tokens seen by their step
    assert by_tokens["out val"][0] == [20480, 40960, 61440, 81920]
    assert lines(axes[4])["out lr"][1][:2] == pytest.approx([1e-4, 2e-4])


def test_several_runs_are_overlaid_and_the_cli_writes_a_png(tmp_path, capsys):
    a = write_run(tmp_path / "out-a", train_py_records())
    b = write_run(tmp_path / "out-b", train_py_records(scale=0.5))
    out = tmp_path / "cmp.png"
    assert plot.main([str(a), str(b), "--out", str(out)]) == 0
    assert out.read_bytes().startswith(PNG_MAGIC)
    assert f"wrote {out}" in capsys.readouterr().out
    labels = set(lines(plot.metrics_figure([a, b]).axes[0]))
    assert labels == {"out-a train", "out-a val", "out-b train", "out-b val"}


def test_default_output_is_metrics_png_in_the_run_dir(tmp_path):
    run = write_run(tmp_path / "out", train_py_records(5))
    assert plot.main([str(run)]) == 0
    assert (run / "metrics.png").read_bytes().startswith(PNG_MAGIC)


def test_out_names_a_format_matplotlib_writes(tmp_path, capsys):
    run = write_run(tmp_path / "out", train_py_records(5), tail='{"step": 6, "loss": 4.')  # a live run's torn tail
    assert plot.main([str(run), "--out", str(tmp_path / "curves.xyz")]) == 2  # was matplotlib's ValueError
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "'.xyz'" in err and ".png" in err and ".svg" in err
    assert not list(tmp_path.glob("curves*"))
    assert plot.main([str(run), "--out", str(tmp_path / "curves")]) == 0  # no suffix: PNG, and said so
    assert f"wrote {tmp_path / 'curves.png'}" in capsys.readouterr().out
    assert (tmp_path / "curves.png").read_bytes().startswith(PNG_MAGIC)
    assert plot.main([str(run), "--out", str(tmp_path), "--out", str(tmp_path / "c.svg")]) == 0
    assert (tmp_path / "c.svg").read_text().lstrip().startswith("<?xml")
    assert plot.main([str(run), "--out", str(tmp_path)]) == 0  # a directory: the default name inside it
    out = capsys.readouterr()
    assert (tmp_path / "metrics.png").is_file() and "torn" in out.err


def test_missing_keys_drop_panels_instead_of_failing(tmp_path):
    run = write_run(tmp_path / "old", [{"step": s, "loss": 5.0 - s / 10} for s in range(1, 6)]
                    + [{"step": "x", "loss": None}, ["not", "a", "dict"], {"loss": 1.0}])
    fig = plot.metrics_figure([run])
    assert [ax.get_title() for ax in fig.axes] == ["loss vs step", "loss vs tokens seen"]
    assert lines(fig.axes[0])["old train"][0] == [1, 2, 3, 4, 5]
    assert not fig.axes[1].lines and "no 'tokens' logged" in fig.axes[1].texts[0].get_text()


@pytest.mark.parametrize("setup, message", [
    (lambda d: d, "No metrics.jsonl in"),
    (lambda d: write_run(d, [{"step": 1, "sample": "텍스트"}]), "Nothing to plot"),
])
def test_unusable_runs_are_a_one_paragraph_error(setup, message, tmp_path, capsys):
    run = setup(tmp_path / "run")
    assert plot.main([str(run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_matplotlib_missing_is_a_clear_error(tmp_path, monkeypatch, capsys):
    run = write_run(tmp_path / "out", train_py_records(3))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    assert plot.main([str(run)]) == 2
    assert "pip install -e '.[plot]'" in capsys.readouterr().err


def test_romanize_spells_hangul_syllables_and_leaves_the_rest():
    assert plot.romanize("세종대왕") == "sejongdaewang"
    assert plot.romanize("훈민정음") == "hunminjeongeum"
    assert plot.romanize("_한글, ABC 123") == "_hangeul, ABC 123"
    assert plot.romanize("닭 값 꽃") == "dak gap kkot"  # double finals and tense initials


@pytest.mark.filterwarnings("ignore:Glyph .* missing from font")  # the stand-in font has no Hangul
@pytest.mark.parametrize("font", ["none", "hangul"])
def test_attention_maps_show_the_math_backend_weights_with_token_labels(font, ckpt, monkeypatch):
    # This machine may or may not have a Hangul font; both paths are forced so both are tested
    # (any font file stands in for a Hangul one: only the labels' text is checked).
    from matplotlib.font_manager import findfont

    monkeypatch.setattr(plot, "hangul_font", lambda: None if font == "none" else findfont("DejaVu Sans"))
    ck = load_checkpoint(ckpt)
    model, tokenizer = build_model(ck), Tokenizer(ck["tokenizer"])
    text = "세종대왕은 훈민정음을 창제하였다."
    fig, note = plot.attention_figure(model, tokenizer, text, "0,-1")
    ids = [tokenizer.bos_id, *tokenizer.encode(text)]
    assert len(fig.axes) == 2 * model.config.n_head
    ax = fig.axes[model.config.n_head + 2]  # layer 1 (= -1), head 2
    assert ax.get_title() == "layer 1 head 2"
    expected = model.attention_maps(torch.tensor([ids]))[1][0, 2]
    assert torch.allclose(torch.as_tensor(ax.images[0].get_array()), expected)
    pieces = [tokenizer.id_to_piece(i).replace("\u2581", "_") for i in ids]
    labels = [t.get_text() for t in ax.get_xticklabels()]
    if font == "none":
        assert "Hangul" in note and labels == [plot.romanize(p) for p in pieces] and labels != pieces
    else:
        assert note is None and labels == pieces


def test_attention_cli_writes_a_png_and_notes_a_missing_font(ckpt, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(plot, "hangul_font", lambda: None)
    out = tmp_path / "att.png"
    assert plot.main(["--attention", "--ckpt", str(ckpt), "--text", "한국어 문장", "--layers", "1",
                      "--out", str(out)]) == 0
    assert out.read_bytes().startswith(PNG_MAGIC)
    assert "note: No installed font renders Hangul" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--text", "가"], "needs --ckpt and --text"),
    (["--ckpt", "{ckpt}", "--text", "가", "--layers", "7"], "--layers '7' must be"),
    (["--ckpt", "{ckpt}", "--text", "  "], "--text is empty"),
    (["--ckpt", "{ckpt}", "--text", "가나다라마바사" * 20], "attention maps stay legible"),
    (["--ckpt", "{missing}", "--text", "가"], "No checkpoint at"),
])
def test_attention_bad_input_is_a_one_paragraph_error(args, message, ckpt, tmp_path, capsys):
    args = [a.format(ckpt=ckpt, missing=tmp_path / "none.pt") for a in args]
    assert plot.main(["--attention", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err
