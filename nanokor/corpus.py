"""Text sources for prepare.py: a stream of raw documents, and the cleaning applied to each.

Three kinds of source, one shape (an iterator of `str`, one per document):
  - a dataset that `datasets` reads, streamed (never downloaded whole): a Hugging Face Hub id
    (`owner/name`, by default `maywell/korean_textbooks`) or a local directory laid out like a Hub repo;
  - local files: parquet (a string column), jsonl (a string field) and txt (documents separated
    by a blank line), given as globs;
  - the Korean sample shipped in `nanokor/data/sample/*.txt` (quickstart and tests).

`open_records` reads the same kinds of source as records (a dict of columns per item) instead of
one text column: conversations for prepare.py --chat (nanokor/chat_data.py makes them messages), from
jsonl, json and parquet files, a `datasets` stream, or the conversation sample in
`nanokor/data/chat_sample/`.

Documents come out raw; they are cleaned (`clean`) later, in the encoder's worker processes. Local
files are also *read* there: they are cut into parts (`Corpus.tasks`) that each worker reads by
itself, so text is decoded where it is tokenized and never passes through one reading process or a
pipe. Every source is re-iterable and deterministic: prepare reads it twice (once for the tokenizer
sample, once for the shards) and must see the same documents.
"""

import functools
import glob
import json
import math
import os
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path

from nanokor.errors import DataError

HF_DATASET = "maywell/korean_textbooks"  # prepare.py's default --dataset
# Its default --subset: the dataset's distinct configs. The rest, mmlu_all and one mmlu_<subject> per MMLU
# subject, are identical ~149 MB copies of one another, and MMLU-derived text would contaminate a KMMLU
# evaluation. The list is taken from the dataset's file tree on the Hub; --subset all reads whatever the Hub
# lists at the time.
HF_DATASET_SUBSETS = ("claude_evol", "code-alpaca", "helpsteer", "ko_wikidata", "normal_instructions",
                      "tiny-textbooks")
HUB_ID = re.compile(r"[\w-][\w.-]*/[\w-][\w.-]*")  # owner/name
SAMPLE_DIR = Path(__file__).parent / "data" / "sample"
CHAT_SAMPLE_DIR = Path(__file__).parent / "data" / "chat_sample"
HUB_PROBE_TIMEOUT_S = 10.0
# Text per unit of work: small enough that workers end together and memory stays low, large enough to
# take a usual parquet row group whole (parquet decodes no less, so a row group cut in two is decoded twice).
PART_BYTES = 8_000_000
BATCH_CHARS = 1 << 16  # documents read in this process are sent to the workers in batches this size


# C0 and C1 control characters, except tab and newline (carriage returns become newlines first).
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")
# The same in UTF-8, where they are quicker to rule out: C0 are single bytes, C1 are \xc2\x80..\xc2\x9f.
_C0_BYTES = bytes([*range(0x09), *range(0x0b, 0x20), 0x7f])
_C1_UTF8 = re.compile(b"\xc2[\x80-\x9f]")
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


def clean(raw: str, counts: Counter | None = None) -> tuple[str, bytes]:
    """`normalize(raw, counts)` and its UTF-8. Most text needs no change, which its UTF-8 (wanted
    anyway) shows in less time than a regex takes over the str; only text that does is normalized."""
    utf8 = raw.encode("utf-8")
    if (len(utf8.translate(None, _C0_BYTES)) == len(utf8) and not (b"\xc2" in utf8 and _C1_UTF8.search(utf8))
            and unicodedata.is_normalized("NFC", raw)):
        return raw, utf8
    text = normalize(raw, counts)
    return text, text.encode("utf-8")


@dataclass(frozen=True)
class Documents:
    """Documents already read in this process, as a unit of work for the encoder's workers."""

    texts: list[str]

    def read(self, counts: Counter) -> Iterator[str]:
        return iter(self.texts)


@dataclass
class Corpus:
    """A named, re-iterable document source. `info` describes it for meta.json.

    `read(counts)` streams the raw documents in order; `parts()`, for local files, lists pieces of
    the source that can each be read on their own (by a worker process) and together read the same.
    """

    name: str
    info: dict
    read: Callable[[Counter], Iterator[str]]
    parts: Callable[[], Iterator] | None = None
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

    def tasks(self) -> Iterator:
        """The documents as units of work for the encoder, in source order; each has `read(counts)`.

        Local files come as parts that the workers read themselves, counting read problems in their
        own tallies. A `datasets` stream, and a run capped by --max-docs/--max-bytes (where the cut
        depends on every document before it), are read here and sent as batches of `Documents`.
        """
        if self.parts is None or self.max_docs is not None or self.max_bytes is not None:
            yield from map(Documents, _batches(self.documents(), BATCH_CHARS))
            return
        self.counts.clear()
        yield from self.parts()


def _batches(docs: Iterable[str], chars_per_batch: int) -> Iterator[list[str]]:
    batch, size = [], 0
    for doc in docs:
        batch.append(doc)
        size += len(doc)
        if size >= chars_per_batch:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def open_corpus(dataset: str = HF_DATASET, *, subsets: str | None = None, split: str = "train",
                data_files: list[str] | None = None, text_column: str = "text", max_docs: int | None = None,
                max_bytes: int | None = None, exclude: Iterable[Path] = ()) -> Corpus:
    """Resolve the command-line choice of source into a Corpus (fails early on bad input).

    `dataset` is 'sample', a local directory or a Hub id; `subsets` its configs, comma-separated, 'all',
    or None for the default (HF_DATASET_SUBSETS for HF_DATASET, else all). Files in `exclude` (the
    held-out --val-files) are left out of the globs' matches."""
    if data_files:
        excluded = {p.resolve() for p in exclude}
        paths = [p for p in _expand_globs(data_files) if p.resolve() not in excluded]
        if not paths:
            raise DataError(f"--data-files {' '.join(data_files)} matches only files that --val-files holds out; "
                            "name the training files with --data-files and the held-out ones with --val-files.")
        _check_parquet_columns(paths, text_column)
        corpus = _files_corpus(_name_from_globs(data_files), {"source": "files", "data_files": list(data_files),
                               "files": [str(p) for p in paths], "text_column": text_column}, paths, text_column)
    elif dataset == "sample":
        paths = sorted(SAMPLE_DIR.glob("*.txt"))
        if not paths:
            raise DataError(f"The embedded Korean sample is missing: no .txt files in {SAMPLE_DIR}. "
                            "Reinstall nanokor from a full checkout, or pass your own text with --data-files.")
        corpus = _files_corpus("sample", {"source": "sample", "files": [p.name for p in paths]}, paths, text_column)
    else:
        corpus = _dataset_corpus(dataset, subsets, split, text_column)
    corpus.max_docs, corpus.max_bytes = max_docs, max_bytes
    return corpus


# ---------------------------------------------------------------------------------------------
# Local files


def _expand_globs(patterns: list[str], kinds=None, what: str = "parquet, jsonl and txt") -> list[Path]:
    """The files the globs match, in order, each once; every one must have a suffix in `kinds`."""
    kinds = _PARTS if kinds is None else kinds
    paths: list[Path] = []
    for pattern in patterns:
        found = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
        found = [Path(p) for p in found if os.path.isfile(p)]
        if not found:
            raise DataError(f"--data-files {pattern!r} matches no files (relative paths start at "
                            f"{os.getcwd()}). Quote the glob so the shell does not expand it, e.g. "
                            f"--data-files 'corpus/*.parquet'; {what} are read.")
        for p in found:
            if p.suffix.lower() not in kinds:
                raise DataError(f"Cannot read {p}: --data-files takes {what} files here "
                                f"({', '.join(sorted(kinds))}).")
        paths += [p for p in found if p not in paths]
    return paths


def _check_parquet_columns(paths: list[Path], column: str) -> None:
    """Every parquet file has the text column (its footer says). This also loads pyarrow before the
    encoder forks its workers, so that they inherit it instead of each importing it."""
    parquet = [path for path in paths if path.suffix.lower() == ".parquet"]
    if not parquet:
        return
    import pyarrow.parquet as pq

    import pyarrow as pa

    for path in parquet:
        with _parquet_errors(path):
            schema = pq.read_schema(path)
        if column not in schema.names:
            raise DataError(f"{path} has no column {column!r}; its columns are {schema.names}. "
                            "Pick the text column with --text-column.")
        kind = schema.field(column).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_binary(kind)
                or pa.types.is_large_binary(kind)):
            text_like = [f.name for f in schema if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)]
            raise DataError(f"{path}: column {column!r} holds {kind}, not text. Pick a text column with "
                            f"--text-column (string columns here: {', '.join(text_like) or 'none'}).")


def _name_from_globs(patterns: list[str]) -> str:
    """Default output name: the nearest directory of the first glob without wildcards in it."""
    for part in reversed(Path(patterns[0]).parent.parts):
        if not any(c in part for c in "*?[") and part not in (".", ".."):
            return part
    return "custom"


def _files_corpus(name: str, info: dict, paths: list[Path], column: str) -> Corpus:
    def parts() -> Iterator:
        for path in paths:
            yield from _PARTS[path.suffix.lower()](path, column)

    return Corpus(name, info, lambda counts: chain.from_iterable(part.read(counts) for part in parts()), parts)


def _decode(raw: bytes, counts: Counter) -> str:
    """UTF-8 decode that never stops a run: bad bytes become U+FFFD and are counted."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        counts["invalid_utf8_docs"] += 1
        return raw.decode("utf-8", "replace")


@dataclass(frozen=True)
class ParquetPart:
    """Rows [start, stop) of one row group of a parquet file."""

    path: Path
    column: str
    row_group: int
    start: int
    stop: int

    def read(self, counts: Counter) -> Iterator[str]:
        import pyarrow as pa

        with _parquet_errors(self.path):
            values = _row_group(self.path, self.row_group, self.column).slice(self.start, self.stop - self.start)
        try:
            texts = values.to_pylist()
        except UnicodeDecodeError:  # a "string" column holding invalid UTF-8: decode it ourselves
            texts = [None if b is None else _decode(b, counts) for b in values.cast(pa.large_binary()).to_pylist()]
        for text in texts:
            if isinstance(text, bytes):  # a binary column
                text = _decode(text, counts)
            yield text or ""


@contextmanager
def _parquet_errors(path: Path):
    """pyarrow's failures on a file that is not parquet (or is cut short or damaged) as a DataError naming
    it. Raised in a worker process too: the error pickles back to prepare with its message."""
    import pyarrow as pa

    try:
        yield
    except (pa.ArrowException, OSError) as e:  # ArrowInvalid (bad magic, 0 bytes), ArrowIOError, corrupt pages
        raise DataError(f"Cannot read {path} as parquet ({str(e).splitlines()[0].rstrip('.')}). The file is damaged, cut "
                        "short (an interrupted download or copy?) or not parquet; replace it, or leave it out "
                        "of --data-files.") from None


@functools.lru_cache(maxsize=1)
def _row_group(path: Path, index: int, column: str):
    """One row group's column. Parquet decodes no less, so it is kept in case this process also reads
    the next slice of the group. Read in this thread alone, outside pyarrow's thread pools: the encoder's
    workers are forked from a process that may have used them."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path, pre_buffer=False)
    return pf.read_row_group(index, columns=[column], use_threads=False).column(0)


def _parquet_parts(path: Path, column: str) -> Iterator[ParquetPart]:
    """Row groups, cut into even slices of about PART_BYTES (judged by their uncompressed size)."""
    import pyarrow.parquet as pq

    with _parquet_errors(path):
        pf = pq.ParquetFile(path)
    for i in range(pf.num_row_groups):
        group = pf.metadata.row_group(i)
        slices = max(1, math.ceil(group.total_byte_size / PART_BYTES))
        rows = max(1, math.ceil(group.num_rows / slices))
        for start in range(0, group.num_rows, rows):
            yield ParquetPart(path, column, i, start, min(start + rows, group.num_rows))


@dataclass(frozen=True)
class TextPart:
    """Bytes [start, stop) of a jsonl or txt file; no document crosses either end (see `_text_parts`)."""

    path: Path
    column: str
    start: int
    stop: int

    def read(self, counts: Counter) -> Iterator[str]:
        with open(self.path, "rb") as f:
            f.seek(self.start)
            lines = _lines_until(f, self.stop)
            if self.path.suffix.lower() == ".jsonl":
                yield from _jsonl_docs(lines, self.path, self.column, counts, first_in_file=self.start == 0)
            else:
                yield from _txt_docs(lines, counts)


def _text_parts(path: Path, column: str) -> Iterator[TextPart]:
    """Cuts about every PART_BYTES, moved on to the next place no document crosses: the start of a
    line in jsonl; in txt, the end of a blank line (documents are separated by blank lines)."""
    size, is_txt = path.stat().st_size, path.suffix.lower() == ".txt"
    start = 0
    with open(path, "rb") as f:
        while start < size:
            f.seek(start + PART_BYTES)
            f.readline()  # to the end of the line the cut fell in
            while is_txt and f.readline().strip():
                pass
            stop = min(f.tell(), size)
            yield TextPart(path, column, start, stop)
            start = stop


def _lines_until(f, stop: int) -> Iterator[bytes]:
    """Lines of a binary file from its current position, up to byte offset `stop`."""
    pos = f.tell()
    while pos < stop and (line := f.readline()):
        pos += len(line)
        yield line


def _jsonl_docs(lines: Iterable[bytes], path: Path, field_name: str, counts: Counter, *,
                first_in_file: bool) -> Iterator[str]:
    """One JSON object per line. If the file's first record lacks the field, the field name is wrong:
    that is an error; later records without it are counted."""
    for line_no, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            record = json.loads(_decode(raw, counts))
        except json.JSONDecodeError:
            counts["bad_jsonl_lines"] += 1
            continue
        text = record.get(field_name) if isinstance(record, dict) else None
        if text is None and first_in_file:
            keys = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise DataError(f"{path}:{line_no} has no field {field_name!r} (it has {keys}). "
                            "Pick the text field with --text-column.")
        first_in_file = False
        if not isinstance(text, str):
            counts["missing_text"] += 1
            continue
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate from a JSON escape such as "\ud800"
            counts["invalid_utf8_docs"] += 1
            text = _SURROGATE.sub("\ufffd", text)
        yield text


def _txt_docs(lines: Iterable[bytes], counts: Counter) -> Iterator[str]:
    """Documents are separated by one or more blank (whitespace-only) lines."""
    doc: list[bytes] = []
    for raw in lines:
        if raw.strip():
            doc.append(raw)
        elif doc:
            yield _decode(b"".join(doc).rstrip(b"\r\n"), counts)
            doc = []
    if doc:
        yield _decode(b"".join(doc).rstrip(b"\r\n"), counts)


_PARTS = {".parquet": _parquet_parts, ".jsonl": _text_parts, ".txt": _text_parts}


# ---------------------------------------------------------------------------------------------
# Datasets read by `datasets`: a Hub id or a local directory


def _dataset_corpus(dataset: str, subsets: str | None, split: str, column: str) -> Corpus:
    path, info, names = _resolve_dataset(dataset, subsets)
    info |= {"split": split, "text_column": column}
    return Corpus(Path(path).name, info, lambda counts: _read_dataset(path, names, split, column))


def _resolve_dataset(dataset: str, subsets: str | None) -> tuple[str, dict, list[str]]:
    """A Hub id (checked reachable) or a local directory, and its configs: (path, info, config names)."""
    local = Path(dataset).expanduser()
    if local.is_dir():
        path, info = str(local.resolve()), {"source": "dir"}
    elif HUB_ID.fullmatch(dataset):
        _check_hub(dataset)
        path, info = dataset, {"source": "hub"}
    else:
        raise DataError(f"--dataset {dataset!r} is neither 'sample' (the Korean sample shipped with nanokor), a "
                        f"Hugging Face dataset id such as {HF_DATASET} (the default) nor a local directory "
                        f"(relative paths start at {os.getcwd()}). For loose files use --data-files.")
    names = _subsets(path, subsets)
    return path, info | {"dataset": path, "subsets": names}, names


def _offline_error(dataset: str, reason: str) -> DataError:
    return DataError(
        f"Cannot stream {dataset} from the Hugging Face Hub ({reason}). To prepare data without the hub, use "
        "the Korean sample shipped with nanokor: `python prepare.py --dataset sample`; your own files: "
        "`python prepare.py --data-files 'corpus/*.parquet'` (parquet, jsonl or txt); or a dataset directory "
        "laid out like a Hub repo: `python prepare.py --dataset path/to/dir`.")


def _check_hub(dataset: str) -> None:
    """Fail fast when the hub is unreachable: `datasets` alone retries for ~25 s before giving up."""
    from huggingface_hub import constants, get_session

    if constants.HF_HUB_OFFLINE:
        raise _offline_error(dataset, "HF_HUB_OFFLINE=1 is set")
    try:
        get_session().head(constants.ENDPOINT, timeout=HUB_PROBE_TIMEOUT_S)
    except Exception as e:  # any transport failure (DNS, refused, timeout, proxy); HTTP statuses don't raise
        raise _offline_error(dataset, f"{constants.ENDPOINT} is unreachable: {e}") from None


@contextmanager
def _datasets_errors(dataset: str):
    """`datasets`' failures as DataErrors: no connection, a dataset card whose YAML does not parse, and no
    such dataset, config, split or files."""
    import yaml  # datasets reads the card's front matter with PyYAML

    try:
        yield
    except ConnectionError as e:
        raise _offline_error(dataset, str(e)) from None
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or type(e).__name__
        raise DataError(f"The YAML front matter of {dataset}'s README.md does not parse ({problem}): `datasets` reads the dataset's configs from it. Fix the YAML "
                        "between the two --- lines (its `configs:` list names each config's data files), or pass "
                        "the files directly with --data-files.") from None
    except (FileNotFoundError, ValueError) as e:
        raise DataError(f"Cannot read {dataset} with `datasets` ({e}). --dataset takes a Hugging Face dataset "
                        "id or a directory laid out like one (data files, and a README.md whose `configs:` "
                        "names them); pick its configs with --subset and its split with --split.") from None


def _subsets(dataset: str, subsets: str | None) -> list[str]:
    import datasets

    with _datasets_errors(dataset):
        available = datasets.get_dataset_config_names(dataset)
    if subsets is None:
        return list(HF_DATASET_SUBSETS) if dataset == HF_DATASET else available
    if subsets == "all":
        return available
    names = [s.strip() for s in subsets.split(",") if s.strip()]
    unknown = [s for s in names if s not in available]
    if unknown or not names:
        raise DataError(f"Unknown --subset {','.join(unknown) or subsets!r} for {dataset}; "
                        f"choose from {', '.join(available)} (comma-separated), or 'all'.")
    return names


def _read_dataset(dataset: str, subsets: list[str], split: str, column: str) -> Iterator[str]:
    """The text column of `_stream_dataset`'s records."""
    for name, record in _stream_dataset(dataset, subsets, split):
        if column not in record:
            raise DataError(f"{dataset} ({name}) has no column {column!r} (it has {sorted(record)}); "
                            "pick one with --text-column.")
        text = record[column]
        if text is not None and not isinstance(text, str):
            raise DataError(f"{dataset} ({name}): column {column!r} holds {type(text).__name__}, not "
                            "text. Pick a text column with --text-column (string columns here: "
                            f"{', '.join(k for k, v in record.items() if isinstance(v, str)) or 'none'}).")
        yield text or ""


def _stream_dataset(dataset: str, subsets: list[str], split: str) -> Iterator[tuple[str, dict]]:
    """(config, record) pairs, round-robin over the configs, so any prefix of the stream (the tokenizer
    sample, a --max-bytes cap) mixes all of them instead of being the first config alone."""
    import datasets

    with _datasets_errors(dataset):
        streams = {name: iter(datasets.load_dataset(dataset, name, split=split, streaming=True)) for name in subsets}
        while streams:
            for name, stream in list(streams.items()):
                record = next(stream, None)
                if record is None:
                    del streams[name]
                    continue
                yield name, record


# ---------------------------------------------------------------------------------------------
# Records: conversations for prepare.py --chat


def open_records(dataset: str = "sample", *, subsets: str | None = None, split: str = "train",
                 data_files: list[str] | None = None, max_records: int | None = None,
                 exclude: Iterable[Path] = ()) -> Corpus:
    """Like `open_corpus`, but each item is a record (a dict of its columns), not one text column.

    `dataset` is 'sample' (the conversation sample shipped in nanokor/data/chat_sample), a local
    directory or a Hub id, streamed with `datasets`; `data_files` are local .jsonl (a record per line),
    .json (one list of records, read whole, as ShareGPT dumps come) and .parquet files."""
    if data_files:
        excluded = {p.resolve() for p in exclude}
        paths = [p for p in _expand_globs(data_files, _RECORDS, "jsonl, json and parquet")
                 if p.resolve() not in excluded]
        if not paths:
            raise DataError(f"--data-files {' '.join(data_files)} matches only files that --val-files holds out; "
                            "name the training files with --data-files and the held-out ones with --val-files.")
        name, info = _name_from_globs(data_files), {"source": "files", "data_files": list(data_files),
                                                    "files": [str(p) for p in paths]}
    elif dataset == "sample":
        paths = sorted(CHAT_SAMPLE_DIR.glob("*.jsonl"))
        if not paths:
            raise DataError(f"The embedded Korean conversation sample is missing: no .jsonl files in "
                            f"{CHAT_SAMPLE_DIR}. Reinstall nanokor from a full checkout, or pass your own "
                            "conversations with --data-files.")
        name, info = "sample", {"source": "sample", "files": [p.name for p in paths]}
    else:
        path, info, names = _resolve_dataset(dataset, subsets)
        corpus = Corpus(Path(path).name, info | {"split": split},
                        lambda counts: (record for _, record in _stream_dataset(path, names, split)))
        corpus.max_docs = max_records
        return corpus
    corpus = Corpus(name, info, lambda counts: chain.from_iterable(_RECORDS[p.suffix.lower()](p, counts)
                                                                   for p in paths))
    corpus.max_docs = max_records
    return corpus


def _jsonl_records(path: Path, counts: Counter) -> Iterator[dict]:
    with open(path, "rb") as f:
        for raw in f:
            if not raw.strip():
                continue
            try:
                record = json.loads(_decode(raw, counts))
            except json.JSONDecodeError:
                record = None
            if not isinstance(record, dict):
                counts["bad_jsonl_lines"] += 1
                continue
            yield record


def _json_records(path: Path, counts: Counter) -> Iterator[dict]:
    try:
        data = json.loads(_decode(path.read_bytes(), counts))
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON ({e}). A .json file holds one list of records; put one "
                        "record per line in a .jsonl file instead.") from None
    if not isinstance(data, list):
        raise DataError(f"{path} holds a JSON {type(data).__name__}, not a list of records. A .json file holds "
                        "one list of records; put one record per line in a .jsonl file instead.")
    for record in data:
        if isinstance(record, dict):
            yield record
        else:
            counts["bad_json_records"] += 1


def _parquet_records(path: Path, counts: Counter) -> Iterator[dict]:
    import pyarrow.parquet as pq

    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
        yield from batch.to_pylist()


_RECORDS = {".jsonl": _jsonl_records, ".json": _json_records, ".parquet": _parquet_records}
