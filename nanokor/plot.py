"""Plots for users without a wandb account: training curves from metrics.jsonl, and attention maps.

    python -m nanokor.plot out/               # loss, bits per byte, LR vs step and tokens
    python -m nanokor.plot out/ out-gqa/     # several runs overlaid
    python -m nanokor.plot --attention --ckpt out/last.pt --text "한국어 문장" --layers 0,-1

matplotlib is an optional extra (pip install -e '.[plot]'), imported only when a figure is drawn.
Curves tolerate what a live or older run leaves behind: missing keys, a half-written last line.
Figures are written whole or not at all, in the format --out's suffix names (png, svg, pdf, ...).
Attention tick labels need a font with Hangul glyphs; without one, the labels are romanized and the
figure says so, rather than drawing empty boxes.
"""

import argparse
import math
import sys
from pathlib import Path

from nanokor.atomic import atomic_write
from nanokor.errors import PlotError, exit_on_error
from nanokor.logger import read_metrics
from nanokor.rundir import RunDir

# (panel title, [(metrics key, legend suffix)]); a panel is drawn only when some run logged a key.
PANELS = (
    ("loss", (("loss", "train"), ("val_loss", "val"))),
    ("bits per byte", (("val_bpb", "val"),)),
    ("learning rate", (("lr", "lr"),)),
)
X_AXES = (("step", "step"), ("tokens", "tokens seen"))
ATTENTION_MAX_TOKENS = 64  # beyond this, per-token tick labels stop being legible


def _pyplot():
    try:
        import matplotlib
    except ImportError as e:
        raise PlotError("Plotting needs matplotlib, an optional extra: pip install -e '.[plot]' "
                        "(or pip install matplotlib).") from e
    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt
    return plt


# ---- training curves --------------------------------------------------------------------------

def run_records(run_dir) -> list[dict]:
    """The records of run_dir/metrics.jsonl (nanokor.logger.read_metrics: a torn last line, from a crash or a
    run still writing, is skipped with a note), each with the tokens seen at its step where known."""
    path = RunDir(run_dir).metrics
    if not path.is_file():
        hint = "" if Path(run_dir).is_dir() else f" ({run_dir} is not a directory)"
        raise PlotError(f"No metrics.jsonl in {run_dir}{hint}. Pass the out directory of a training run "
                        "(train.py writes metrics.jsonl there as it logs), e.g. python -m nanokor.plot out/.")
    return _with_tokens(read_metrics(path))


def _with_tokens(records: list[dict]) -> list[dict]:
    """Give each record a 'tokens' value where one is known: train.py's step lines log `tokens_seen`,
    its evaluation lines only the step, which maps to the tokens seen by then."""
    seen = {r["step"]: r["tokens_seen"] for r in records
            if _is_number(r.get("step")) and _is_number(r.get("tokens_seen"))}
    out = []
    for r in records:
        tokens = r.get("tokens", r.get("tokens_seen", seen.get(r.get("step"))))
        out.append({**r, "tokens": tokens} if tokens is not None else r)
    return out


def _series(records: list[dict], x_key: str, y_key: str) -> tuple[list[float], list[float]]:
    """Points where both keys hold finite numbers, sorted by x (a resumed run may repeat steps)."""
    points = sorted((r[x_key], r[y_key]) for r in records
                    if _is_number(r.get(x_key)) and _is_number(r.get(y_key)))
    return [p[0] for p in points], [p[1] for p in points]


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _run_labels(run_dirs: list[Path]) -> list[str]:
    names = [d.resolve().name for d in run_dirs]
    return names if len(set(names)) == len(names) else [str(d) for d in run_dirs]


def metrics_figure(run_dirs):
    """A row per panel that has data, columns for x = step and x = tokens seen; runs overlaid."""
    run_dirs = [Path(d) for d in run_dirs]
    runs = list(zip(_run_labels(run_dirs), (run_records(d) for d in run_dirs)))
    panels = [(title, keys) for title, keys in PANELS
              if any(_series(records, "step", key)[0] for _, records in runs for key, _ in keys)]
    if not panels:
        raise PlotError(f"Nothing to plot: no line of metrics.jsonl in {', '.join(map(str, run_dirs))} has a "
                        "'step' with 'loss', 'val_loss', 'val_bpb' or 'lr'. Train for at least one logging "
                        "interval first.")
    plt = _pyplot()
    from matplotlib.ticker import EngFormatter

    fig, axes = plt.subplots(len(panels), len(X_AXES), figsize=(12, 3.4 * len(panels)), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for row, (title, keys) in enumerate(panels):
        for col, (x_key, x_label) in enumerate(X_AXES):
            ax = axes[row][col]
            for i, (label, records) in enumerate(runs):
                for key, suffix in keys:
                    xs, ys = _series(records, x_key, key)
                    if not xs:
                        continue
                    val = key.startswith("val_")
                    ax.plot(xs, ys, color=colors[i % len(colors)], linestyle="--" if val else "-",
                            marker="o" if val else None, markersize=3, linewidth=1.2,
                            alpha=1.0 if val else 0.8, label=f"{label} {suffix}")
            ax.set_title(f"{title} vs {x_label}")
            ax.set_xlabel(x_label)
            ax.grid(alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=8)
            else:
                ax.text(0.5, 0.5, f"no '{x_key}' logged", ha="center", va="center", transform=ax.transAxes)
            if x_key == "tokens":
                ax.xaxis.set_major_formatter(EngFormatter())  # 100k, 1.5M, 2G
            if title == "learning rate":
                ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    fig.tight_layout()
    return fig


def output_path(out, default_name: str) -> Path:
    """Where a figure goes: `out` as given; a directory gets `default_name` inside it, and a name without
    a suffix gets .png. Its suffix must be a format matplotlib writes, checked before anything is drawn."""
    path = Path(out)
    if path.is_dir():
        path = path / default_name
    elif not path.suffix:
        path = path.with_suffix(".png")
    _pyplot()
    from matplotlib.backend_bases import FigureCanvasBase

    formats = FigureCanvasBase.get_supported_filetypes()  # png, svg, pdf, ...: what savefig can write
    if path.suffix[1:].lower() not in formats:
        raise PlotError(f"--out {out}: matplotlib cannot write {path.suffix!r} files. Use one of "
                        f"{', '.join('.' + f for f in sorted(formats))} (e.g. --out metrics.png).")
    return path


def save(fig, path: Path) -> Path:
    """Write the figure whole or not at all (a temp file renamed, as every nanokor output)."""
    atomic_write(path, lambda f: fig.savefig(f, format=path.suffix[1:].lower(), dpi=120))
    _pyplot().close(fig)
    return path


# ---- attention maps ---------------------------------------------------------------------------

def hangul_font() -> str | None:
    """Path of an installed font that draws Hangul syllables, or None.

    A font qualifies when two different syllables map to two different glyphs: fallback fonts such as
    matplotlib's LastResort cover every code point with one placeholder glyph per Unicode block.
    """
    from matplotlib import font_manager, ft2font

    for entry in font_manager.fontManager.ttflist:
        try:
            charmap = ft2font.FT2Font(entry.fname).get_charmap()
        except (OSError, RuntimeError):  # an unreadable font file is not ours to fix
            continue
        han, guk = charmap.get(ord("한")), charmap.get(ord("국"))
        if han and guk and han != guk:
            return entry.fname
    return None


# Revised Romanization by syllable (no sound-change rules): enough to tell tokens apart in a label.
_INITIALS = "g kk n d tt r m b pp s ss _ j jj ch k t p h".split()
_VOWELS = "a ae ya yae eo e yeo ye o wa wae oe yo u wo we wi yu eu ui i".split()
_FINALS = ["", *"k k k n n n t l k m l l l p l m p p t t ng t t k t p t".split()]


def romanize(text: str) -> str:
    """Hangul syllables to Latin letters (한국어 -> hangukeo); everything else unchanged."""
    out = []
    for ch in text:
        code = ord(ch) - 0xAC00
        if 0 <= code < 11172:
            initial, vowel, final = code // 588, code % 588 // 28, code % 28
            out.append(_INITIALS[initial].replace("_", "") + _VOWELS[vowel] + _FINALS[final])
        else:
            out.append(ch)
    return "".join(out)


def _parse_layers(spec: str, n_layer: int) -> list[int]:
    try:
        layers = [int(s) for s in spec.split(",") if s.strip()]
    except ValueError:
        layers = []
    if not layers or any(not -n_layer <= i < n_layer for i in layers):
        raise PlotError(f"--layers {spec!r} must be comma-separated layer indices in [{-n_layer}, {n_layer - 1}] "
                        f"(this model has {n_layer} layers; -1 is the last), e.g. --layers 0,-1.")
    return sorted({i % n_layer for i in layers})


def attention_figure(model, tokenizer, text: str, layers: str):
    """Per-head attention weights of the chosen layers for `text` (BOS first, as in training), with
    the tokens as axis labels. Returns (figure, note); the note says when labels had to be romanized."""
    import torch

    from nanokor.generate import encode_prompt

    if not text.strip():
        raise PlotError("--text is empty; pass the sentence to draw, e.g. --text \"세종대왕은 훈민정음을 창제하였다.\"")
    ids = encode_prompt(tokenizer, text)
    limit = min(ATTENTION_MAX_TOKENS, model.config.max_seq_len)
    if len(ids) > limit:
        raise PlotError(f"--text is {len(ids)} tokens (with BOS); attention maps stay legible up to {limit} "
                        "tokens. Pass a shorter sentence.")
    chosen = _parse_layers(layers, model.config.n_layer)
    maps = model.attention_maps(torch.tensor([ids], device=model.lm_head.weight.device))
    pieces = [tokenizer.id_to_piece(i).replace("\u2581", "_") for i in ids]

    plt = _pyplot()
    from matplotlib.font_manager import FontProperties

    font, note = hangul_font(), None
    if font is None and any(romanize(p) != p for p in pieces):
        pieces = [romanize(p) for p in pieces]
        note = ("No installed font renders Hangul, so token labels are romanized. Install one (e.g. the "
                "fonts-nanum or fonts-noto-cjk package) for Hangul labels.")
    label_font = FontProperties(fname=font, size=7) if font else FontProperties(size=7)

    n_head = model.config.n_head
    size = max(2.5, 0.18 * len(ids))
    fig, axes = plt.subplots(len(chosen), n_head, figsize=(size * n_head, size * len(chosen) + 0.6),
                             squeeze=False)
    for row, layer in enumerate(chosen):
        weights = maps[layer][0].float().cpu().numpy()
        for head in range(n_head):
            ax = axes[row][head]
            ax.imshow(weights[head], cmap="viridis", vmin=0.0, vmax=1.0)
            ax.set_title(f"layer {layer} head {head}", fontsize=9)
            ax.set_xticks(range(len(ids)))
            ax.set_yticks(range(len(ids)))
            ax.set_xticklabels(pieces, rotation=90, fontproperties=label_font)
            ax.set_yticklabels(pieces, fontproperties=label_font)
    fig.suptitle("attention weights: each row is a token (query) attending to earlier tokens (columns)")
    if note:
        fig.text(0.5, 0.005, note, ha="center", va="bottom", fontsize=8, color="firebrick")
    fig.tight_layout(rect=(0, 0.35 / fig.get_figheight() if note else 0, 1, 1))  # 0.35 in for the note
    return fig, note


# ---- command line -----------------------------------------------------------------------------

def _load(ckpt_path):
    """Model and tokenizer of a checkpoint. Imported here: training curves need neither torch nor the
    model, so `python -m nanokor.plot out/` starts fast."""
    from nanokor.checkpoint import build_model, build_tokenizer, load_checkpoint

    ckpt = load_checkpoint(ckpt_path)
    return build_model(ckpt), build_tokenizer(ckpt)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m nanokor.plot", description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="*", help="training out directories holding metrics.jsonl")
    p.add_argument("--out", help="PNG path (default: <run>/metrics.png for one run, metrics.png for several, "
                                 "attention.png beside the checkpoint for --attention)")
    p.add_argument("--attention", action="store_true", help="draw attention maps instead of training curves")
    p.add_argument("--ckpt", help="checkpoint for --attention")
    p.add_argument("--text", help="sentence for --attention")
    p.add_argument("--layers", default="0,-1", help="layers for --attention, comma-separated (default: 0,-1)")
    args = p.parse_args(argv)
    return exit_on_error(run, args)


def run(args) -> int:
    if args.attention:
        if not args.ckpt or args.text is None:
            raise PlotError("--attention needs --ckpt and --text, e.g. python -m nanokor.plot --attention "
                            "--ckpt out/last.pt --text \"한국어 문장입니다.\"")
        path = output_path(args.out or Path(args.ckpt).with_name("attention.png"), "attention.png")
        fig, note = attention_figure(*_load(args.ckpt), args.text, args.layers)
        save(fig, path)
        if note:
            print(f"note: {note}", file=sys.stderr)
    else:
        if not args.runs:
            raise PlotError("Pass at least one training out directory, e.g. python -m nanokor.plot out/ "
                            "(or --attention --ckpt out/last.pt --text ... for attention maps).")
        path = output_path(args.out or (Path(args.runs[0]) / "metrics.png" if len(args.runs) == 1
                                        else "metrics.png"), "metrics.png")
        save(metrics_figure(args.runs), path)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
