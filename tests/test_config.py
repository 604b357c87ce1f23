"""Config files, --key=value overrides and their errors."""

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from nanokor.config import ConfigError, TrainConfig, load_config, model_config

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path, text: str) -> str:
    path = tmp_path / "cfg.py"
    path.write_text(text)
    return str(path)


def test_defaults_file_then_flags_in_order(tmp_path):
    path = write(tmp_path, "import math\nd_model = 64\nn_head = 2\nlr = 3\n_helper = math.pi\n")
    cfg = load_config([path, "--d_model=96", "--compile", "--dropout=0.25", "--tie_embeddings=false"])
    assert (cfg.d_model, cfg.n_head, cfg.compile, cfg.dropout, cfg.tie_embeddings) == (96, 2, True, 0.25, False)
    assert cfg.lr == 3.0 and isinstance(cfg.lr, float)  # an int literal is a fine float
    assert cfg.batch_size == TrainConfig.batch_size  # untouched keys keep their defaults


def test_a_flag_overrides_a_config_file_that_comes_after_it(tmp_path):
    path = write(tmp_path, "batch_size = 16\nd_model = 64\nn_head = 2\n")
    cfg = load_config(["--batch_size=32", path])
    assert (cfg.batch_size, cfg.d_model) == (32, 64)


@pytest.mark.parametrize("text,expected", [("true", True), ("1", True), ("yes", True), ("False", False),
                                           ("0", False), ("no", False)])
def test_bool_spellings(text, expected):
    assert load_config([f"--compile={text}"]).compile is expected


def test_model_keys_become_a_model_config():
    cfg = load_config(["--n_layer=3", "--d_model=64", "--n_head=4", "--n_kv_head=2", "--block_size=48"])
    mc = model_config(cfg, vocab_size=1000)
    assert (mc.n_layer, mc.d_model, mc.n_kv_head, mc.max_seq_len, mc.vocab_size) == (3, 64, 2, 48, 1000)


@pytest.mark.parametrize("args,fragment", [
    (["--learning_rate=1e-3"], "Unknown config key 'learning_rate'"),
    (["--batch_size=eight"], "--batch_size must be an int"),
    (["--compile=maybe"], "--compile is a bool"),
    (["--schedule=linear"], "schedule must be one of"),
    (["--max_steps=0"], "max_steps must be positive"),
    (["--d_model=100", "--n_head=3"], "divisible by n_head"),
    (["--lr"], "--lr needs a value"),
    (["--dropout=1.5"], "dropout must be in [0, 1)"),
    (["--n_kv_head=-4"], "n_kv_head must be positive"),
    (["--beta2=1"], "beta1 and beta2 must be in [0, 1)"),
    (["--lr=-1"], "lr, min_lr and weight_decay must not be negative"),
    (["no/such/config.py"], "does not exist"),
    (["--engine=zero"], "engine must be one of ('ddp', 'fsdp')"),
    (["--engine=fsdp", "--deepspeed=config/ds_zero2.json"], "Drop one of them: --deepspeed=... for DeepSpeed"),
    (["--deepspeed=config/ds_zero3.json", "--engine=ddp"], "selects the DeepSpeed engine, and engine='ddp'"),
])
def test_bad_input_is_a_config_error(args, fragment):
    with pytest.raises(ConfigError, match=None) as e:
        load_config(args)
    assert fragment in str(e.value)


def test_unknown_key_in_a_file_names_the_file_and_lists_valid_keys(tmp_path):
    path = write(tmp_path, "d_modle = 64\n")
    with pytest.raises(ConfigError) as e:
        load_config([path])
    message = str(e.value)
    assert path in message and "Did you mean 'd_model'?" in message
    assert "Valid keys:" in message and "warmup_steps" in message and "label_smoothing" in message


@pytest.mark.parametrize("flag, message", [
    ("--lr_factor=nan", "lr_factor must be a finite number"),  # nan passed every range check: a traceback later
    ("--muon_lr=inf", "muon_lr must be a finite number"),
    ("--seed=-1", "seed must be a whole number from 0"),  # numpy refused it at the first batch
    (f"--seed={2**64}", "seed must be a whole number from 0"),  # torch overflowed
])
def test_non_finite_numbers_and_seeds_beyond_64_bits_are_refused(flag, message):
    with pytest.raises(ConfigError, match=message):
        load_config([flag])


def test_wrong_type_in_a_file(tmp_path):
    with pytest.raises(ConfigError, match="batch_size .* must be an int .* got 8.5"):
        load_config([write(tmp_path, "batch_size = 8.5\n")])


def test_cli_reports_unknown_key_without_a_traceback():
    proc = subprocess.run([sys.executable, "train.py", "config/tiny.py", "--no_such_key=1"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2  # bad input; 1 is for a run that started and failed
    assert "Unknown config key 'no_such_key'" in proc.stderr and "Valid keys:" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("path", ["config/tiny.py", "config/base.py", "config/guide.py"])
def test_shipped_configs_load(path):
    cfg = load_config([str(REPO / path)])
    assert cfg.max_steps > 0


def test_guide_config_is_the_original_recipe():
    cfg = load_config([str(REPO / "config/guide.py")])
    assert (cfg.d_model, cfg.d_ff, cfg.n_head, cfg.n_layer) == (768, 3072, 12, 12)
    assert (cfg.dropout, cfg.block_size) == (0.1, 1024)
    assert (cfg.optimizer, cfg.schedule, cfg.warmup_steps, cfg.lr_factor, cfg.label_smoothing) == ("adamw", "noam", 4000, 1.0, 0.1)
    assert (cfg.cooldown_frac, cfg.embed_lr) == (0.0, 0.0)  # Noam never anneals; one rate for every parameter
    assert (cfg.dtype, cfg.grad_clip, cfg.keep_best) == ("bf16", 1.0, 3)
    assert (cfg.qk_norm, cfg.beta1, cfg.eps) == (False, 0.9, 1e-8)  # the defaults before recipe v2, pinned


def test_base_config_is_the_guides_model_with_the_measured_recipe():
    base, guide = load_config([str(REPO / "config/base.py")]), load_config([str(REPO / "config/guide.py")])
    assert model_config(base, 32000) == replace(model_config(guide, 32000), dropout=0.0, qk_norm=True)
    assert (base.optimizer, base.schedule, base.cooldown_frac, base.dropout, base.label_smoothing) == ("muon", "noam", 0.4, 0.0, 0.0)
    assert base.batch_size * base.block_size * base.grad_accum == guide.batch_size * guide.block_size * guide.grad_accum


def test_cooldown_frac_named_with_another_schedule_is_refused():
    with pytest.raises(ConfigError, match="cooldown_frac is Noam's cooldown"):
        load_config(["--schedule=cosine", "--cooldown_frac=0.3"])
    assert load_config(["--schedule=cosine"]).schedule == "cosine"  # the default cooldown stays Noam's
    with pytest.raises(ConfigError, match="muon_cooldown_frac is Noam's cooldown"):
        load_config(["--schedule=wsd", "--muon_cooldown_frac=0.8"])


@pytest.mark.parametrize("flag, message", [
    ("--weight_decay_schedule=step", "weight_decay_schedule must be one of"),
    ("--muon_momentum_start=1.0", "muon_momentum_start must be in"),
    ("--muon_momentum_warmup=-5", "muon_momentum_warmup must not be negative"),
    ("--muon_cooldown_frac=1.5", "muon_cooldown_frac must be in"),
    ("--head_init_scale=-0.1", "head_init_scale not negative")])
def test_recipe_v2_keys_are_validated(flag, message):
    with pytest.raises(ConfigError, match=message):
        load_config([flag])


def test_every_model_field_is_a_config_key_with_the_models_default():
    """MODEL_KEYS is derived from ModelConfig; TrainConfig must declare each with the same default."""
    from dataclasses import fields

    from nanokor.config import MODEL_KEYS
    from nanokor.model import ModelConfig

    assert set(MODEL_KEYS) == {f.name for f in fields(ModelConfig)} - {"vocab_size", "max_seq_len"}
    for f in fields(ModelConfig):
        if f.name in MODEL_KEYS and f.name != "qk_norm":
            assert getattr(TrainConfig(), f.name) == f.default, f.name
    # qk_norm: on for new runs; the model's default, what a checkpoint without the key means, stays off.
    assert TrainConfig().qk_norm and not ModelConfig(vocab_size=8).qk_norm


def test_a_checkpoint_that_predates_qk_norm_is_adopted_without_it(tokenizer, tmp_path):
    """init_from a checkpoint whose model_config lacks a key takes the model's default for it (what the
    checkpoint meant), not this run's default: qk_norm stays off, and the weights fit."""
    from nanokor.checkpoint import load_checkpoint, save_checkpoint
    from tiny_checkpoint import make_checkpoint

    ckpt = load_checkpoint(make_checkpoint(tmp_path / "new.pt", tokenizer))
    del ckpt["model_config"]["qk_norm"]
    save_checkpoint(ckpt, tmp_path / "old.pt")
    cfg = load_config([f"--init_from={tmp_path / 'old.pt'}"])
    assert cfg.qk_norm is False and TrainConfig().qk_norm is True
    assert (cfg.d_model, cfg.n_layer) == (64, 2)
