"""Conversation data in: the layouts Korean SFT data comes in, made into chat_format's messages, and the
pipeline prepare.py --chat runs (records in, chat shards out).

Layouts, detected from a record's columns (or named with --chat-format):

    messages   OpenAI's: a list of {"role", "content"} turns (system, user, assistant)
    sharegpt   a list of {"from", "value"} turns with human / gpt / system (ShareGPT, KoVicuna)
    alpaca     instruction, optional input, output, optional system (KoAlpaca, KULLM-v2)
    openorca   optional system_prompt, question, response (OpenOrca and its Korean translations)

Columns with other names are mapped with --columns field=column (e.g. instruction=prompt). Turn lists
accept either key style and the role names of both (human/gpt, user/assistant, …); a role outside them
stays what it is and makes the conversation malformed.

Each message is cleaned like pretraining text (corpus.clean: NFC, control characters) and stripped of
the whitespace around it. A conversation that chat_format.conversation_problem finds malformed (an empty
turn, turns out of order, an unknown role, no reply to learn), that lacks the layout's columns, or that
is longer than the context is counted by kind, with the first example of each, and left out: it is
never trained on. Exact duplicates are dropped; the split goes by a hash of the conversation's
content, as for documents (encode.split_of). Workers render the conversations (chat_format.render:
ids and loss mask); this process dedups, splits and writes the chat shards (shards.ChatShardWriter).
"""

import json
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import chain, islice

import numpy as np

from nanokor.chat_format import PROBLEM_KINDS, TRAINED_ROLE, conversation_problem, render
from nanokor.corpus import clean
from nanokor.encode import doc_key, ordered_map, split_of
from nanokor.errors import DataError
from nanokor.shards import SPLITS, ChatShardWriter, fits_context
from nanokor.tokenizer import Tokenizer


@dataclass(frozen=True)
class Layout:
    """A way SFT data lays out a conversation: its fields (each read from the column of the same name
    unless --columns maps it), the ones a record must have, and what they hold (for the summary)."""

    fields: tuple[str, ...]
    required: tuple[str, ...]
    holds: str


LAYOUTS = {
    "messages": Layout(("messages",), ("messages",), "a list of role/content turns"),
    "sharegpt": Layout(("conversations",), ("conversations",), "a list of from/value turns"),
    "alpaca": Layout(("instruction", "input", "output", "system"), ("instruction", "output"),
                     "instruction (+ input) -> output"),
    "openorca": Layout(("system_prompt", "question", "response"), ("question", "response"),
                       "(system_prompt +) question -> response"),
}
ROLE_NAMES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
              "chatgpt": "assistant", "bard": "assistant", "bing": "assistant", "model": "assistant"}
TOO_LONG = "longer than the context"
NOT_A_RECORD = "missing columns"
KINDS = (NOT_A_RECORD, *PROBLEM_KINDS, TOO_LONG)  # what a left-out conversation is counted as
RECORDS_PER_TASK = 256


def parse_columns(text: str | None) -> dict[str, str]:
    """--columns 'instruction=prompt,output=answer' -> {field: column}; fields must belong to a layout."""
    if not text:
        return {}
    fields = {f for layout in LAYOUTS.values() for f in layout.fields}
    mapping = {}
    for item in text.split(","):
        field, sep, column = (s.strip() for s in item.partition("="))
        if not sep or not field or not column:
            raise DataError(f"--columns {text!r}: write field=column pairs, comma-separated, e.g. --columns "
                            "instruction=prompt,output=answer.")
        if field not in fields:
            raise DataError(f"--columns names the field {field!r}, which no layout has; the fields are "
                            f"{', '.join(sorted(fields))}.")
        mapping[field] = column
    return mapping


def resolve_layout(record: dict, forced: str | None, mapping: dict[str, str]) -> tuple[str, dict[str, str]]:
    """(layout name, {field: column}) for a source whose first record is `record`: the forced layout, or
    the one layout whose required columns the record has. A record that fits none, or several, is an
    error that names the columns it has and the flags that settle it."""
    if not isinstance(record, dict):
        raise DataError(f"The first record is a {type(record).__name__}, not an object of columns; conversation "
                        "data comes as records (jsonl lines, parquet rows, dataset rows).")
    unknown = set(mapping) - set(chain.from_iterable(LAYOUTS[n].fields for n in ([forced] if forced else LAYOUTS)))
    if unknown:
        raise DataError(f"--columns maps {', '.join(sorted(unknown))}, which the {forced} layout does not have "
                        f"(its fields: {', '.join(LAYOUTS[forced].fields)}).")

    def columns(name):
        return {f: mapping.get(f, f) for f in LAYOUTS[name].fields}

    def fits(name):
        return all(columns(name)[f] in record for f in LAYOUTS[name].required)

    names = [forced] if forced else [n for n in LAYOUTS if fits(n)]
    if forced and not fits(forced):
        missing = [columns(forced)[f] for f in LAYOUTS[forced].required if columns(forced)[f] not in record]
        raise DataError(f"--chat-format {forced} reads the columns {', '.join(missing)}, which the first record "
                        f"lacks (it has {', '.join(sorted(map(str, record)))}). Name its columns with --columns, "
                        "e.g. --columns instruction=prompt,output=answer.")
    if len(names) != 1:
        why = "fits none of the layouts" if not names else f"fits several layouts ({', '.join(names)})"
        raise DataError(f"Cannot tell how the records lay out a conversation: the first record's columns "
                        f"({', '.join(sorted(map(str, record)))}) {why}. Pass --chat-format (" +
                        "; ".join(f"{n}: {', '.join(LAYOUTS[n].required)}" for n in LAYOUTS) +
                        ") and, for other column names, --columns field=column.")
    return names[0], columns(names[0])


def to_messages(record: dict, layout: str, columns: dict[str, str]) -> list | None:
    """The record as chat_format messages (possibly malformed: conversation_problem judges), or None
    when it lacks the layout's columns."""
    if not isinstance(record, dict) or any(record.get(columns[f]) is None for f in LAYOUTS[layout].required):
        return None
    if layout in ("messages", "sharegpt"):
        turns = record[columns[LAYOUTS[layout].fields[0]]]
        if not isinstance(turns, list):
            return None
        return [_turn(t) for t in turns]
    if layout == "alpaca":
        system, user, reply = record.get(columns["system"]), record[columns["instruction"]], record[columns["output"]]
        extra = record.get(columns["input"])
        if isinstance(user, str) and isinstance(extra, str) and extra.strip():
            user = f"{user.strip()}\n\n{extra.strip()}"
    else:
        system, user, reply = record.get(columns["system_prompt"]), record[columns["question"]], record[columns["response"]]
    head = [{"role": "system", "content": system}] if isinstance(system, str) and system.strip() else []
    return head + [{"role": "user", "content": user}, {"role": TRAINED_ROLE, "content": reply}]


def _turn(turn) -> dict | object:
    if not isinstance(turn, dict):
        return turn  # conversation_problem names it
    role = turn.get("role", turn.get("from"))
    content = turn.get("content", turn.get("value"))
    return {"role": ROLE_NAMES.get(role.strip().lower(), role) if isinstance(role, str) else role, "content": content}


def _clean_messages(messages: list, counts: Counter) -> list:
    """Each message's content cleaned like pretraining text and stripped; anything else left for
    conversation_problem to name."""
    out = []
    for m in messages:
        if isinstance(m, dict) and isinstance(m.get("content"), str):
            content = m["content"]
            try:
                content = clean(content, counts)[0]
            except UnicodeEncodeError:  # a lone surrogate from a JSON escape such as "\ud800"
                counts["invalid_utf8"] += 1
                content = clean(content.encode("utf-8", "replace").decode("utf-8"), counts)[0]
            m = {"role": m["role"], "content": content.strip()}
        out.append(m)
    return out


# ---- the pipeline ------------------------------------------------------------------------------

_worker: dict = {}


def _init_worker(model_bytes: bytes, layout: str, columns: dict, context: int) -> None:
    _worker.update(tokenizer=Tokenizer(model_bytes), layout=layout, columns=columns, context=context)


def _encode_records(task) -> dict:
    """Worker: records (first, held_out, records) -> per conversation its key, ids and mask; the left-out
    ones counted by kind, with the first example of each (its record number)."""
    first, held_out, records = task
    tokenizer, context = _worker["tokenizer"], _worker["context"]
    counts, problems, examples = Counter(), Counter(), {}
    keys, ids, masks = [], [], []
    for n, record in enumerate(records, first):
        messages = to_messages(record, _worker["layout"], _worker["columns"])
        if messages is None:
            kind, why = NOT_A_RECORD, f"it lacks the columns {', '.join(_worker['columns'].values())} or holds no list"
        else:
            messages = _clean_messages(messages, counts)
            why = conversation_problem(messages)
            kind = why.kind if why else None
        if kind is None:
            conv_ids, conv_mask = render(tokenizer, messages)
            if not fits_context(len(conv_ids), context):
                kind, why = TOO_LONG, f"{len(conv_ids):,} tokens, more than --context {context} + 1"
        if kind is not None:
            problems[kind] += 1
            examples.setdefault(kind, f"record {n}: {why}")
            continue
        keys.append(doc_key(json.dumps(messages, ensure_ascii=False, sort_keys=True).encode("utf-8")))
        ids.append(np.array(conv_ids, dtype=np.uint16))
        masks.append(np.array(conv_mask, dtype=np.uint8))
    return dict(held_out=held_out, n_records=len(records), counts=counts, problems=problems, examples=examples,
                keys=keys, ids=ids, masks=masks)


def _tasks(records: Iterable, held_out: bool, first: int = 0) -> Iterator[tuple]:
    it = iter(records)
    while batch := list(islice(it, RECORDS_PER_TASK)):
        yield first, held_out, batch
        first += len(batch)


def encode_conversations(records: Iterable, tokenizer: Tokenizer, out_dir, *, layout: str, columns: dict[str, str],
                         context: int, val_fraction: float, shard_tokens: int, num_proc: int, progress=None,
                         val_records: Iterable = ()) -> dict:
    """Render, check, deduplicate, split and write conversations as chat shards in `out_dir`.

    `records` in source order (the first copy of a conversation is the one kept); `val_records` (prepare's
    --val-files) all go to validation and are read first, so a copy of one among `records` is dropped as
    a duplicate rather than trained on. Returns, for meta.json, counts per split, cleaning counts, the
    left-out conversations by kind (with an example of each) and the shard list."""
    writers = {s: ChatShardWriter(out_dir, s, shard_tokens=shard_tokens, vocab_size=tokenizer.vocab_size,
                                  tokenizer_sha=tokenizer.sha256) for s in SPLITS}
    stats = {s: Counter(conversations=0, replies=0, tokens=0, trained_tokens=0) for s in SPLITS}
    cleaning, problems, examples, seen = Counter(), Counter(), {}, set()
    tasks = chain(_tasks(val_records, True), _tasks(records, False))
    init_args = (tokenizer.model_bytes, layout, columns, context)
    for r in ordered_map(_encode_records, tasks, num_proc, _init_worker, init_args):
        cleaning.update(r["counts"])
        problems.update(r["problems"])
        for kind, example in r["examples"].items():
            examples.setdefault(kind, ("held-out " if r["held_out"] else "") + example)
        for key, ids, mask in zip(r["keys"], r["ids"], r["masks"]):
            if key in seen:
                cleaning["duplicates"] += 1
                continue
            seen.add(key)
            split = "val" if r["held_out"] else split_of(key, val_fraction)
            writers[split].write(ids, mask)
            st = stats[split]
            st["conversations"] += 1
            st["tokens"] += len(ids)
            st["trained_tokens"] += int(mask.sum())
            st["replies"] += int(np.count_nonzero(np.diff(mask.astype(np.int8)) == 1))
        if progress is not None:
            progress(r["n_records"], sum(map(len, r["ids"])))
    shards = {s: w.close() for s, w in writers.items()}
    left_out = {"total": sum(problems.values()), "kinds": {k: problems[k] for k in KINDS if problems[k]},
                "examples": {k: examples[k] for k in KINDS if k in examples}}
    return {"splits": {s: dict(c) for s, c in stats.items()}, "cleaning": dict(cleaning), "left_out": left_out,
            "shards": shards}
