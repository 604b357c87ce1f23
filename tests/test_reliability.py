"""Bad input and bad luck: a second run on a live out_dir, a full disk mid-checkpoint, a config file that
does not parse, a text column that is not text, an output path that cannot be written, a zero budget,
torn or damaged files a run reads back (metrics.jsonl, wandb_run_id, DeepSpeed's `latest`), a file
that is not parquet, a dataset card whose YAML does not parse. Each is skipped with a note or gets one
paragraph that names the fix, and nothing on disk is damaged."""

import errno
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanokor import atomic
from nanokor.checkpoint import load_checkpoint
from nanokor.config import load_config
from nanokor.errors import CheckpointError, ConfigError, DataError, TrainingError
from test_train import TINY, _start, _wait_for, run, weights

REPO = Path(__file__).resolve().parents[1]


def test_a_second_run_on_a_live_out_dir_is_refused_and_a_killed_runs_lock_does_not_block(sample_data_dir, tmp_path):
    proc = _start(["train.py", *TINY, f"--data_dir={sample_data_dir}", f"--out_dir={tmp_path}",
                   "--max_steps=100000", "--eval_interval=2"], tmp_path)
    _wait_for(lambda: (tmp_path / "last.pt").is_file(), proc)
    before = (tmp_path / "metrics.jsonl").read_bytes()
    with pytest.raises(TrainingError, match=rf"in use by another train.py \(pid {proc.pid} on .*another --out_dir"):
        run(sample_data_dir, tmp_path, "--max_steps=4", "--init_from=resume")
    assert (tmp_path / "metrics.jsonl").read_bytes()[:len(before)] == before  # the live run's files untouched
    proc.send_signal(signal.SIGKILL)  # no cleanup: the lock file stays, naming a dead process
    proc.communicate(timeout=60)
    assert (tmp_path / ".lock").is_file()
    step = load_checkpoint(tmp_path / "last.pt")["step"]
    assert run(sample_data_dir, tmp_path, f"--max_steps={step + 1}", "--init_from=resume")["step"] == step + 1


class FullDisk(io.FileIO):
    """A file on a disk that fills up after `room` bytes."""

    room = 20_000

    def write(self, b):
        if self.tell() + len(b) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().write(b)


def test_a_full_disk_while_saving_is_one_paragraph_and_the_previous_last_pt_still_loads(sample_data_dir, tmp_path,
                                                                                       monkeypatch):
    run(sample_data_dir, tmp_path, "--max_steps=2")
    good = weights(tmp_path)
    real_open = open
    monkeypatch.setattr(atomic, "open", lambda path, mode, **kw: FullDisk(path, mode) if ".last.pt.tmp" in str(path)
                        else real_open(path, mode, **kw), raising=False)
    with pytest.raises(CheckpointError) as e:
        run(sample_data_dir, tmp_path, "--max_steps=4", "--eval_interval=2", "--init_from=resume")
    assert "the disk is full" in str(e.value) and "--init_from=resume" in str(e.value) and "\n" not in str(e.value)
    ckpt = load_checkpoint(tmp_path / "last.pt")
    assert ckpt["step"] == 2 and all((ckpt["model"][k] == good[k]).all() for k in good)
    assert not list(tmp_path.glob(".*.tmp-*"))  # the partial file is gone


def cli(*args, cwd=REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})


def one_paragraph(proc, *fragments) -> None:
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and all(f in last for f in fragments), last


def test_a_config_file_with_a_syntax_error_names_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("n_layer = 4\nd_model = 256 +\nbatch_size = 8\n")
    with pytest.raises(ConfigError, match=rf"{bad}, line 2: .*fix the line"):
        load_config([str(bad)])
    broken = tmp_path / "broken.py"
    broken.write_text("n_layer = 4\nd_model = undefined_name\n")
    with pytest.raises(ConfigError, match=rf"{broken}, line 2: running it raised NameError"):
        load_config([str(broken)])
    one_paragraph(cli("train.py", bad), "bad.py, line 2")


def test_a_text_column_of_numbers_is_refused_by_name(tmp_path):
    pq.write_table(pa.table({"id": [1, 2, 3], "body": ["가", "나", "다"]}), tmp_path / "t.parquet")
    proc = cli("prepare.py", "--data-files", tmp_path / "t.parquet", "--text-column", "id", "--out", tmp_path / "o")
    one_paragraph(proc, "column 'id' holds int64, not text", "--text-column", "string columns here: body")


def test_unwritable_outputs_are_clear_errors(sample_data_dir, ckpt, tmp_path):
    blocker = tmp_path / "a-file"  # a path under a regular file cannot be created, not even by root
    blocker.write_text("")
    one_paragraph(cli("prepare.py", "--dataset", "sample", "--out", blocker / "data"), "writable --out")
    one_paragraph(cli("train.py", *TINY, f"--data_dir={sample_data_dir}", f"--out_dir={blocker / 'run'}"),
                  "writable --out_dir")
    text = tmp_path / "t.txt"
    text.write_text("한국어 문장입니다.\n")
    one_paragraph(cli("-m", "nanokor.evaluate", "--ckpt", ckpt, "--data-files", text, "--out", blocker / "r.json"),
                  "writable path with --out")


def test_evaluate_refuses_a_zero_budget(ckpt, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("한국어 문장입니다.\n")
    proc = cli("-m", "nanokor.evaluate", "--ckpt", ckpt, "--data-files", text, "--max-tokens", "0")
    assert proc.returncode == 2 and "'all' to score every token" in proc.stderr and "Traceback" not in proc.stderr


# ---- files a run reads back: torn or damaged, they are skipped or named, never a traceback -----------

def test_read_metrics_keeps_every_whole_line_around_torn_ones(tmp_path, capsys):
    from nanokor.logger import _drop_records_after, read_metrics

    path = tmp_path / "metrics.jsonl"
    records = [{"step": 1, "loss": 5.0}, {"step": 2, "sample": "한국어\u2028문장"}, {"step": 3, "loss": 4.0}]
    lines = [json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in records]
    damaged = lines[0] + b'{"step": 2, "lo\xea\xb0\n' + lines[1] + lines[2] + '{"step": 4, "sample": "한'.encode()[:-1]
    path.write_bytes(damaged)
    assert read_metrics(path) == records  # U+2028 in a sample is not a line break either
    assert "skipped 2 unreadable line(s)" in capsys.readouterr().err
    _drop_records_after(path, 2)
    assert path.read_bytes() == lines[0] + lines[1]
    path.write_bytes(lines[0] + lines[1].rstrip(b"\n"))  # a whole record, cut just before its newline
    _drop_records_after(path, 5)
    assert path.read_bytes() == lines[0] + lines[1]  # the next record will start a line of its own


def test_damaged_run_files_never_stop_a_resume(tmp_path, recwarn):
    from nanokor.engine import resume_tag
    from nanokor.logger import wandb_run_id
    from nanokor.rundir import RunDir

    run_dir = RunDir(tmp_path)
    run_dir.wandb_id.write_bytes(b"ab\xea")  # not an id (written atomically, but a copy can be cut short)
    fresh = wandb_run_id(run_dir, resuming=True)
    assert len(fresh) == 12 and run_dir.wandb_id.read_text().strip() == fresh and "new wandb run" in str(recwarn[0])
    ds = tmp_path / "deepspeed"
    assert resume_tag(ds) is None  # nothing saved: DeepSpeed's own load reports it
    for tag in ("step_0000002", "step_0000004"):
        (ds / tag).mkdir(parents=True)
    (ds / "latest").write_text("step_0000004")
    assert resume_tag(ds) == "step_0000004"
    (ds / "latest").write_text("")  # DeepSpeed rewrites `latest` in place: a kill can leave it empty
    assert resume_tag(ds) == "step_0000002"  # the one a kill during the next save leaves whole


def test_a_metrics_path_that_cannot_be_written_is_one_paragraph(sample_data_dir, tmp_path):
    (tmp_path / "metrics.jsonl").mkdir()
    with pytest.raises(TrainingError, match="Cannot write .*metrics.jsonl"):
        run(sample_data_dir, tmp_path, "--max_steps=1")


def test_a_parquet_file_that_is_not_parquet_is_named(sample_data_dir, ckpt, tmp_path, capsys):
    from nanokor.corpus import open_corpus
    from nanokor.evaluate import main as evaluate

    good = tmp_path / "good.parquet"
    pq.write_table(pa.table({"text": [f"한국어 문서 {i}번입니다. " * 30 for i in range(100)]}), good)
    data = bytearray(good.read_bytes())
    data[100:len(data) // 2] = b"\xff" * (len(data) // 2 - 100)  # pages damaged, footer whole
    files = {"empty.parquet": b"", "text.parquet": b"not parquet\n", "pages.parquet": bytes(data)}
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(DataError, match=f"Cannot read {tmp_path / name} as parquet"):
            list(open_corpus(data_files=[str(tmp_path / name)]).documents())
    # prepare's workers read the pages (a reused tokenizer skips the sample read here); evaluate reads them too
    prep = cli("prepare.py", "--data-files", tmp_path / "pages.parquet", "--tokenizer",
               sample_data_dir / "tokenizer.model", "--num-proc", "2", "--out", tmp_path / "out")
    one_paragraph(prep, "pages.parquet as parquet", "replace it")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
    assert evaluate(["--ckpt", str(ckpt), "--data-files", str(tmp_path / "text.parquet")]) == 2
    assert "text.parquet as parquet" in capsys.readouterr().err


def test_a_dataset_card_whose_yaml_does_not_parse_is_one_paragraph(tmp_path):
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds/README.md").write_text("---\nconfigs:\n- config_name: a\n  data_files: [a.jsonl\n---\n")
    (tmp_path / "ds/a.jsonl").write_text('{"text": "한국어"}\n')
    one_paragraph(cli("prepare.py", "--dataset", tmp_path / "ds", "--out", tmp_path / "out"),
                  "YAML front matter", "README.md", "--data-files")
