"""SFT in train.py's loop: whole conversations packed into rows, the loss on assistant tokens alone
(against a float64 reference), init_from=<checkpoint> (weights only; the architecture and tokenizer
from it), chat checkpoints, exact resume, DDP against one process, and a tiny SFT that learns the
conversation sample's answers by heart."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nanokor.chat_format import REPLY_STOP_IDS, render
from nanokor.checkpoint import CheckpointError, build_model, build_tokenizer, load_checkpoint
from nanokor.config import ConfigError
from nanokor.corpus import CHAT_SAMPLE_DIR
from nanokor.evaluate import evaluate_loss
from nanokor.generate import generate
from nanokor.loader import ChatLoader, ChatValBatches, open_loaders, pack
from nanokor.model import ModelConfig, Transformer
from nanokor.shards import DataDir
from nanokor.tokenizer import PAD_ID
from test_chat_format import _old_tokenizer
from test_train import max_diff, train, train_records
from tiny_checkpoint import make_checkpoint

REPO = Path(__file__).resolve().parents[1]
SAMPLE = [json.loads(line)["messages"] for line in (CHAT_SAMPLE_DIR / "conversations.jsonl").open(encoding="utf-8")]
# SFT flags for the tests: a short schedule, AdamW's small eps (see test_train.TINY), a short eval sample.
SFT = ["--device=cpu", "--block_size=256", "--batch_size=2", "--eval_tokens=4096", "--sample_tokens=4",
       "--sample_prompt=한국의 수도는?", "--wandb_mode=disabled", "--schedule=wsd", "--warmup_steps=2",
       "--decay_frac=1.0", "--min_lr=0", "--lr=3e-3", "--embed_lr=0", "--eps=1e-6", "--weight_decay=0"]


@pytest.fixture(scope="module")
def base_ckpt(tmp_path_factory, tokenizer) -> Path:
    """A small base model with the sample's tokenizer (random weights at the usual init scale)."""
    return make_checkpoint(tmp_path_factory.mktemp("base") / "last.pt", tokenizer, init_std=0.02)


def sft(chat_dir, base, out_dir, *args) -> dict:
    return train.main([*SFT, f"--data_dir={chat_dir}", f"--init_from={base}", f"--out_dir={out_dir}", *args])


def expected_rows(stream, rows, block_size):
    """x, y of whole conversations laid end to end, built here from the shards' ids and masks."""
    x = np.full((len(rows), block_size), PAD_ID)
    y = np.full((len(rows), block_size), -1)
    for r, row in enumerate(rows):
        ids = np.concatenate([stream.read(i)[0] for i in row]).astype(np.int64)
        mask = np.concatenate([stream.read(i)[1] for i in row]).astype(bool)
        x[r, :min(len(ids), block_size)] = ids[:block_size]  # a row's last token is an input with no target
        y[r, :len(ids) - 1] = np.where(mask[1:], ids[1:], -1)
    return torch.from_numpy(x), torch.from_numpy(y)


def test_rows_pack_whole_conversations_and_pad_with_ignored_targets(sample_chat_dir):
    data = DataDir(sample_chat_dir)
    loader = ChatLoader(data, 128, 3, seed=5)
    stream = loader.conversations.stream
    lengths = stream.lengths
    assert loader.conversations.too_long == int((lengths > 129).sum()) > 0  # counted, left out, reported
    assert "longer than 128+1 tokens left out" in loader.summary
    for epoch in range(2):
        rows = loader._epoch(epoch)
        assert sorted(i for row in rows for i in row) == sorted(loader.conversations.kept)  # each once, whole
        assert all(sum(lengths[i] for i in row) <= 129 for row in rows)
        flat = rows[loader.row:]  # a batch across the previous epoch's end took the first rows
        while len(flat) >= 3 and loader.epoch_rows == epoch:
            x, y = loader.next_batch()
            want_x, want_y = expected_rows(stream, flat[:3], 128)
            assert torch.equal(x, want_x) and torch.equal(y, want_y)
            assert (x[:, 0] == 1).all()  # every row starts with a conversation's <s>
            flat = flat[3:]
        while loader.epoch_rows == epoch:
            loader.next_batch()  # a batch across the epoch's end
    assert loader._epoch(0) != loader._epoch(1)  # each epoch its own order
    loader.close()


def test_pack_fills_rows_first_fit_within_a_window_of_open_rows():
    lengths = np.array([60, 50, 30, 40, 10, 70])
    assert pack(lengths, np.arange(6), 100) == [[0, 2, 4], [1, 3], [5]]
    assert pack(lengths, np.array([5, 4, 3]), 80) == [[5, 4], [3]]


def test_chat_loader_ranks_are_disjoint_slices_of_one_global_batch_and_resume_is_exact(sample_chat_dir):
    data = DataDir(sample_chat_dir)
    single = ChatLoader(data, 256, 4, seed=3)
    ranks = [ChatLoader(data, 256, 2, rank=r, world_size=2, seed=3) for r in range(2)]
    for _ in range(9):  # past the end of the first epoch (24 rows)
        x, y = single.next_batch()
        parts = [loader.next_batch() for loader in ranks]
        assert torch.equal(x, torch.cat([p[0] for p in parts])) and torch.equal(y, torch.cat([p[1] for p in parts]))
    state = single.state_dict()
    assert state["epoch"] == 1
    expected = [single.next_batch() for _ in range(8)]
    resumed = ChatLoader(data, 256, 4, seed=3)
    resumed.load_state_dict(state)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
               for a, b in zip(expected, [resumed.next_batch() for _ in range(8)]))
    with pytest.raises(ValueError, match="seed"):
        ChatLoader(data, 256, 4, seed=4).load_state_dict(state)
    for loader in (single, *ranks, resumed):
        loader.close()


def test_validation_scores_the_assistant_tokens_alone_on_every_rank_alike(sample_chat_dir, tokenizer):
    data = DataDir(sample_chat_dir)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tokenizer.vocab_size, n_layer=1, n_head=2, d_model=32, d_ff=64,
                                    max_seq_len=256))
    token_bytes = torch.as_tensor(tokenizer.token_bytes)
    val = ChatValBatches(data, 256, 8, None)  # more rows per batch than the split has: padded with empty rows
    result = evaluate_loss(model, val, token_bytes)
    meta_val = data.meta["splits"]["val"]
    assert result["tokens"] == meta_val["trained_tokens"]
    stream = data.conversations("val")
    assistant_bytes = sum(int(token_bytes[ids[1:][mask[1:] == 1].astype(np.int64)].sum())
                          for ids, mask in map(stream.read, range(len(stream))))
    assert result["bytes"] == assistant_bytes
    halves = [list(ChatValBatches(data, 256, 4, None, rank=r, world_size=2)) for r in range(2)]
    assert len(halves[0]) == len(halves[1]) == 1
    assert sum(int((y >= 0).sum()) for half in halves for _, y in half) == meta_val["trained_tokens"]


def test_the_loss_trains_assistant_tokens_alone(sample_chat_dir, tokenizer):
    """The training loss's gradient equals a float64 reference that sums the cross-entropy over the
    renderer's masked positions only, and differs from one that also trains the user and system tokens:
    those contribute exactly nothing."""
    data = DataDir(sample_chat_dir)
    loader, _ = open_loaders(data, 256, 2, None, seed=1)
    x, y = loader.next_batch()
    stream = loader.conversations.stream
    rows = loader._epoch(0)[:2]
    # The reference's targets come from the renderer, not the loader: the sample's conversations, re-rendered.
    rendered = {tuple(render(tokenizer, c)[0]): render(tokenizer, c)[1] for c in SAMPLE}
    ids = [np.concatenate([stream.read(i)[0] for i in row]).astype(np.int64) for row in rows]
    masks = [np.concatenate([rendered[tuple(stream.read(i)[0].tolist())] for i in row]) for row in rows]
    loader.close()
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tokenizer.vocab_size, n_layer=2, n_head=2, d_model=32, d_ff=64,
                                    max_seq_len=256))
    model.zero_grad()
    model(x, y, loss_only=True)[1].backward()
    got = {k: p.grad.clone() for k, p in model.named_parameters()}

    def reference(trained_only: bool) -> dict:
        ref = Transformer(model.config).double()
        ref.load_state_dict(model.state_dict())
        logits = ref(x)[0].double()
        total, count = 0, 0
        for r in range(len(rows)):
            n = len(ids[r]) - 1
            keep = torch.from_numpy(masks[r][1:] == 1) if trained_only else torch.ones(n, dtype=torch.bool)
            nll = F.cross_entropy(logits[r, :n], torch.from_numpy(ids[r][1:]), reduction="none")
            total, count = total + nll[keep].sum(), count + int(keep.sum())
        (total / count).backward()
        return {k: p.grad for k, p in ref.named_parameters()}

    want, unmasked = reference(True), reference(False)
    for k in got:
        assert torch.allclose(got[k].double(), want[k], rtol=1e-4, atol=1e-7), k
    assert max((got[k].double() - unmasked[k]).abs().max().item() for k in got) > 1e-3


def test_sft_starts_from_a_checkpoint_takes_its_architecture_and_writes_a_chat_checkpoint(sample_chat_dir, base_ckpt,
                                                                                         tmp_path):
    out = tmp_path / "sft"
    result = sft(sample_chat_dir, base_ckpt, out, "--max_steps=2", "--eval_interval=2")
    ckpt, base = load_checkpoint(out / "last.pt"), load_checkpoint(base_ckpt)
    assert ckpt["chat"] is True and result["val"]["tokens"] == DataDir(sample_chat_dir).meta["splits"]["val"]["trained_tokens"]
    assert {k: v for k, v in ckpt["model_config"].items() if k != "max_seq_len"} == \
        {k: v for k, v in base["model_config"].items() if k != "max_seq_len"}
    assert ckpt["model_config"]["max_seq_len"] == 256 and ckpt["optimizer"] is not None
    config = json.loads((out / "config.json").read_text())
    assert (config["n_layer"], config["d_model"], config["n_kv_head"]) == (2, 64, 2)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("sample", "").startswith("한국의 수도는? → ") for r in records)  # a reply, not a continuation
    # Weights only: the first step starts from the base model's weights, with a fresh optimizer and schedule.
    first = build_model(base)
    assert train_records(out)[1]["lr"] == pytest.approx(3e-3 / 2)
    assert max_diff(first.state_dict(), ckpt["model"]) > 0
    # A second run over it is refused; a key that contradicts the checkpoint is named.
    with pytest.raises(ConfigError, match="already holds a run"):
        sft(sample_chat_dir, base_ckpt, out, "--max_steps=2")
    with pytest.raises(CheckpointError, match="d_model: checkpoint 64, config 32"):
        sft(sample_chat_dir, base_ckpt, tmp_path / "other", "--d_model=32")


def test_a_checkpoint_with_another_tokenizer_is_refused(sample_chat_dir, tmp_path):
    other = make_checkpoint(tmp_path / "other.pt", _old_tokenizer())
    with pytest.raises(CheckpointError, match="was trained with tokenizer .*prepare.py --chat"):
        sft(sample_chat_dir, other, tmp_path / "sft", "--max_steps=1")
    with pytest.raises(ConfigError, match="init_from must be scratch, resume or the path of a checkpoint"):
        sft(sample_chat_dir, tmp_path / "missing.pt", tmp_path / "sft", "--max_steps=1")


def test_sft_resume_is_bit_identical(sample_chat_dir, base_ckpt, tmp_path):
    """Stopped at step 4 (wsd without its decay, so the first half's schedule is the whole run's), then the
    same command with --init_from=resume: the architecture comes from out_dir/last.pt, the loader goes on
    from its (epoch, row), and every loss and weight equals the uninterrupted run's."""
    common = ["--eval_interval=2", "--decay_frac=0", "--dropout=0.1", "--batch_size=4"]  # 6 steps an epoch
    sft(sample_chat_dir, base_ckpt, tmp_path / "straight", "--max_steps=8", *common)
    sft(sample_chat_dir, base_ckpt, tmp_path / "split", "--max_steps=4", *common)
    train.main([*SFT, f"--data_dir={sample_chat_dir}", "--init_from=resume", f"--out_dir={tmp_path / 'split'}",
                "--max_steps=8", *common])
    got, want = train_records(tmp_path / "split"), train_records(tmp_path / "straight")
    assert sorted(got) == list(range(1, 9))
    assert [got[s]["loss"] for s in range(1, 9)] == [want[s]["loss"] for s in range(1, 9)]
    a, b = (load_checkpoint(tmp_path / d / "last.pt") for d in ("straight", "split"))
    assert max_diff(a["model"], b["model"]) == 0 and a["loader"] == b["loader"] and a["loader"]["epoch"] >= 1


def test_sft_ddp_on_two_processes_matches_one_process(sample_chat_dir, base_ckpt, tmp_path):
    """Rows hold different numbers of assistant tokens, so each micro-batch is weighted by its share of the
    global batch's targets: two ranks then take the step of one process on the whole batch."""
    common = [f"--data_dir={sample_chat_dir}", f"--init_from={base_ckpt}", "--max_steps=3", "--grad_accum=2",
              "--eval_interval=3", "--optimizer=adamw"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py", *SFT,
           *common, "--batch_size=2", f"--out_dir={tmp_path / 'ddp'}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    train.main([*SFT, *common, "--batch_size=4", f"--out_dir={tmp_path / 'single'}"])
    ddp, single = train_records(tmp_path / "ddp"), train_records(tmp_path / "single")
    assert [ddp[s]["loss"] for s in (1, 2, 3)] == pytest.approx([single[s]["loss"] for s in (1, 2, 3)], abs=1e-5)
    assert max_diff(load_checkpoint(tmp_path / "ddp" / "last.pt")["model"],
                    load_checkpoint(tmp_path / "single" / "last.pt")["model"]) <= 1e-5
    val = [json.loads(line)["val_loss"] for d in ("ddp", "single")
           for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines() if "val_loss" in line]
    assert val[0] == pytest.approx(val[1], abs=1e-6)


def test_a_tiny_sft_learns_the_sample_conversations_by_heart(sample_data_dir, tokenizer, tmp_path):
    """The floor: a tiny model, pretrained for 20 steps on the textbook sample, then 120 SFT steps on the first 56
    shipped conversations (54 train after the split, some multi-turn, some with a system message): greedy
    replies reproduce the trained answers, stop included, for >= 90% of the training prompts (every
    assistant turn of every training conversation, rendered with add_generation_prompt)."""
    chat = tmp_path / "chat"
    prepare = subprocess.run([sys.executable, "prepare.py", "--chat", "--dataset", "sample", "--max-docs", "56",
                              "--tokenizer", str(sample_data_dir / "tokenizer.model"), "--out", str(chat)],
                             cwd=REPO, capture_output=True, text=True)
    assert prepare.returncode == 0, prepare.stderr
    arch = ["--device=cpu", "--n_layer=2", "--n_head=2", "--d_model=64", "--d_ff=192", "--dropout=0", "--keep_best=0",
            "--sample_tokens=0", "--wandb_mode=disabled", "--batch_size=8"]
    train.main([*arch, f"--data_dir={sample_data_dir}", f"--out_dir={tmp_path / 'base'}", "--block_size=128",
                "--max_steps=20", "--eval_interval=20", "--eval_tokens=1024", "--warmup_steps=10",
                "--lr_factor=0.24", "--embed_lr=0.05"])
    train.main([*arch, f"--data_dir={chat}", f"--init_from={tmp_path / 'base' / 'last.pt'}",
                f"--out_dir={tmp_path / 'sft'}", "--block_size=256", "--max_steps=120", "--eval_interval=120",
                "--schedule=wsd", "--warmup_steps=10", "--decay_frac=1.0", "--min_lr=0", "--lr=1e-2",
                "--muon_lr=0.05", "--embed_lr=0.1", "--weight_decay=0"])
    ckpt = load_checkpoint(tmp_path / "sft" / "last.pt")
    model, tok = build_model(ckpt), build_tokenizer(ckpt)
    assert ckpt["chat"] is True and tok.sha256 == tokenizer.sha256
    stream = DataDir(chat).conversations("train")
    trained = {tuple(stream.read(i)[0].tolist()) for i in range(len(stream))}
    prompts = [(c[:i], m["content"]) for c in SAMPLE if tuple(render(tok, c)[0]) in trained
               for i, m in enumerate(c) if m["role"] == "assistant"]
    assert len({tuple(render(tok, c)[0]) for c in SAMPLE} & trained) == len(trained) >= 50
    right = 0
    for history, answer in prompts:
        prompt, _ = render(tok, history, add_generation_prompt=True)
        want = tok.encode(answer) + [REPLY_STOP_IDS[0]]
        got = [int(t) for t in generate(model, torch.tensor([prompt]), len(want), temperature=0,
                                        stop_ids=REPLY_STOP_IDS)]
        right += got == want
    assert right >= 0.9 * len(prompts), f"{right} of {len(prompts)} replies reproduced"
