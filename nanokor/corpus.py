"""Text sources for prepare.py: a stream of raw documents, and the cleaning applied to each.

Three sources, one shape (an iterator of `str`, one per document):
  - the Hugging Face dataset `maywell/korean_textbooks`, streamed (never downloaded whole);
  - local files: parquet (a string column), jsonl (a string field) and txt (documents separated
    by a blank line), given as globs;
  - the Korean sample shipped in `nanokor/data/sample/*.txt` (quickstart and tests).

Documents come out raw; `normalize` is applied later, inside the tokenizer worker processes, so
that the single reading process stays cheap. Every source is re-iterable and deterministic: prepare
reads it twice (once for the tokenizer sample, once for the shards) and must see the same documents.
"""

import glob
import json
import os
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

HF_DATASET = "maywell/korean_textbooks"
SAMPLE_DIR = Path(__file__).parent / "data" / "sample"
HUB_PROBE_TIMEOUT_S = 10.0


class DataError(Exception):
    """Bad input to the data pipeline. The message is one paragraph that says how to fix it."""


# C0 and C1 control characters, except tab and newline (carriage returns become newlines first).
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def normalize(text: str, counts: Counter | None = None) -> str:
    """NFC + control-character stripping: the one cleaning step every document goes through.

    NFC matters for Korean: text from some platforms stores Hangul decomposed into jamo (NFD), which
    looks identical but costs two to three times the tokens and never matches the trained pieces.
    `counts`, if given, tallies what was changed (reported by prepare.py).
    """
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if _CONTROL.search(text):
        text = _CONTROL.sub("", text)
        if counts is not None:
            counts["control_chars_stripped"] += 1
    nfc = unicodedata.normalize("NFC", text)
    if counts is not None and nfc is not text and nfc != text:
        counts["nfc_changed"] += 1
    return nfc


@dataclass
class Corpus:
    """A named, re-iterable document source. `info` describes it for meta.json."""

    name: str
    info: dict
    read: Callable[[Counter], Iterator[str]]
    max_docs: int | None = None
    max_bytes: int | None = None
    counts: Counter = field(default_factory=Counter)

    def documents(self) -> Iterator[str]:
        """Raw documents in source order, capped by --max-docs/--max-bytes (counted on raw text).

        Read problems (invalid UTF-8, bad jsonl lines) are tallied in `self.counts`, reset per pass.
        """
        self.counts.clear()
        n_docs = n_bytes = 0
        for text in self.read(self.counts):
            if self.max_docs is not None and n_docs >= self.max_docs:
                return
            if self.max_bytes is not None:
                n_bytes += len(text.encode("utf-8", "replace"))
                if n_bytes > self.max_bytes and n_docs > 0:
                    return
            n_docs += 1
            yield text


def open_corpus(dataset: str = "hf", *, subsets: str = "all", data_files: list[str] | None = None,
                text_column: str = "text", max_docs: int | None = None,
                max_bytes: int | None = None) -> Corpus:
    """Resolve the command-line choice of source into a Corpus (fails early on bad input)."""
    if data_files:
        paths = _expand_globs(data_files)
        corpus = Corpus(_name_from_globs(data_files), {"source": "files", "data_files": list(data_files),
                        "files": [str(p) for p in paths], "text_column": text_column},
                        lambda counts: _read_files(paths, text_column, counts))
    elif dataset == "sample":
        paths = sorted(SAMPLE_DIR.glob("*.txt"))
        if not paths:
            raise DataError(f"The embedded Korean sample is missing: no .txt files in {SAMPLE_DIR}. "
                            "Reinstall nanokor from a full checkout, or pass your own text with --data-files.")
        corpus = Corpus("sample", {"source": "sample", "files": [p.name for p in paths]},
                        lambda counts: _read_files(paths, text_column, counts))
    elif dataset == "hf":
        names = _hf_subsets(subsets)
        corpus = Corpus(HF_DATASET.split("/")[-1], {"source": "hf", "dataset": HF_DATASET, "subsets": names,
                        "text_column": text_column},
                        lambda counts: _read_hf(names, text_column))
    else:
        raise DataError(f"Unknown --dataset {dataset!r}: use 'hf' (the Hugging Face dataset {HF_DATASET}), "
                        "'sample' (the Korean sample shipped with nanokor), or --data-files for local files.")
    corpus.max_docs, corpus.max_bytes = max_docs, max_bytes
    return corpus


# ---------------------------------------------------------------------------------------------
# Local files


def _expand_globs(patterns: list[str]) -> list[Path]:
    paths: list[Path] = []
    for pattern in patterns:
        found = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
        found = [Path(p) for p in found if os.path.isfile(p)]
        if not found:
            raise DataError(f"--data-files {pattern!r} matches no files (relative paths start at "
                            f"{os.getcwd()}). Quote the glob so the shell does not expand it, e.g. "
                            "--data-files 'corpus/*.parquet'; parquet, jsonl and txt are read.")
        for p in found:
            if _reader_for(p) is None:
                raise DataError(f"Cannot read {p}: --data-files takes .parquet, .jsonl (one JSON object per "
                                "line) and .txt (documents separated by a blank line).")
        paths += [p for p in found if p not in paths]
    return paths


def _name_from_globs(patterns: list[str]) -> str:
    """Default output name: the nearest directory of the first glob without wildcards in it."""
    for part in reversed(Path(patterns[0]).parent.parts):
        if not any(c in part for c in "*?[") and part not in (".", ".."):
            return part
    return "custom"


def _reader_for(path: Path):
    suffix = path.suffix.lower()
    return {".parquet": _read_parquet, ".jsonl": _read_jsonl, ".txt": _read_txt}.get(suffix)


def _read_files(paths: list[Path], text_column: str, counts: Counter) -> Iterator[str]:
    for path in paths:
        yield from _reader_for(path)(path, text_column, counts)


def _decode(raw: bytes, counts: Counter) -> str:
    """UTF-8 decode that never stops a run: bad bytes become U+FFFD and are counted."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        counts["invalid_utf8_docs"] += 1
        return raw.decode("utf-8", "replace")


def _read_parquet(path: Path, column: str, counts: Counter) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    if column not in pf.schema_arrow.names:
        raise DataError(f"{path} has no column {column!r}; its columns are {pf.schema_arrow.names}. "
                        "Pick the text column with --text-column.")
    for batch in pf.iter_batches(batch_size=256, columns=[column]):  # small reads keep workers fed
        values = batch.column(0)
        try:
            texts = values.to_pylist()
        except UnicodeDecodeError:  # a "string" column holding invalid UTF-8: decode it ourselves
            texts = [None if b is None else _decode(b, counts) for b in values.cast(pa.large_binary()).to_pylist()]
        for text in texts:
            if isinstance(text, bytes):  # a binary column
                text = _decode(text, counts)
            yield text or ""


def _read_jsonl(path: Path, field_name: str, counts: Counter) -> Iterator[str]:
    with open(path, "rb") as f:
        first = True
        for line_no, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                record = json.loads(_decode(raw, counts))
            except json.JSONDecodeError:
                counts["bad_jsonl_lines"] += 1
                continue
            text = record.get(field_name) if isinstance(record, dict) else None
            if text is None and first:
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise DataError(f"{path}:{line_no} has no field {field_name!r} (it has {keys}). "
                                "Pick the text field with --text-column.")
            first = False
            if not isinstance(text, str):
                counts["missing_text"] += 1
                continue
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:  # a lone surrogate from a JSON escape such as "\ud800"
                counts["invalid_utf8_docs"] += 1
                text = _SURROGATE.sub("\ufffd", text)
            yield text


def _read_txt(path: Path, _column: str, counts: Counter) -> Iterator[str]:
    """Documents are separated by one or more blank (whitespace-only) lines."""
    lines: list[bytes] = []
    with open(path, "rb") as f:
        for raw in f:
            if raw.strip():
                lines.append(raw)
            elif lines:
                yield _decode(b"".join(lines).rstrip(b"\r\n"), counts)
                lines = []
    if lines:
        yield _decode(b"".join(lines).rstrip(b"\r\n"), counts)


# ---------------------------------------------------------------------------------------------
# Hugging Face hub


def _offline_error(reason: str) -> DataError:
    return DataError(
        f"Cannot stream {HF_DATASET} from the Hugging Face Hub ({reason}). To prepare data without the "
        "hub, use the Korean sample shipped with nanokor: `python prepare.py --dataset sample`; or your "
        "own files: `python prepare.py --data-files 'corpus/*.parquet'` (parquet, jsonl or txt).")


def _check_hub() -> None:
    """Fail fast when the hub is unreachable: `datasets` alone retries for ~25 s before giving up."""
    from huggingface_hub import constants, get_session

    if constants.HF_HUB_OFFLINE:
        raise _offline_error("HF_HUB_OFFLINE=1 is set")
    try:
        get_session().head(constants.ENDPOINT, timeout=HUB_PROBE_TIMEOUT_S)
    except Exception as e:  # any transport failure (DNS, refused, timeout, proxy); HTTP statuses don't raise
        raise _offline_error(f"{constants.ENDPOINT} is unreachable: {e}") from None


def _hf_subsets(subsets: str) -> list[str]:
    _check_hub()
    import datasets

    try:
        available = datasets.get_dataset_config_names(HF_DATASET)
    except ConnectionError as e:
        raise _offline_error(str(e)) from None
    if subsets == "all":
        return available
    names = [s.strip() for s in subsets.split(",") if s.strip()]
    unknown = [s for s in names if s not in available]
    if unknown or not names:
        raise DataError(f"Unknown --subset {','.join(unknown) or subsets!r} for {HF_DATASET}; "
                        f"choose from {', '.join(available)} (comma-separated), or 'all'.")
    return names


def _read_hf(subsets: list[str], column: str) -> Iterator[str]:
    """Round-robin over the subsets, so any prefix of the stream (the tokenizer sample, a --max-bytes
    cap) mixes all of them instead of being the first subset alone."""
    import datasets

    try:
        streams = [iter(datasets.load_dataset(HF_DATASET, name, split="train", streaming=True)) for name in subsets]
        while streams:
            for stream in list(streams):
                record = next(stream, None)
                if record is None:
                    streams.remove(stream)
                elif column not in record:
                    raise DataError(f"{HF_DATASET} has no column {column!r} (it has {sorted(record)}); "
                                    "pick one with --text-column.")
                else:
                    yield record[column] or ""
    except ConnectionError as e:
        raise _offline_error(str(e)) from None
