"""Training configuration: typed defaults, plain-Python config files, `--key=value` overrides.

    python train.py config/tiny.py --batch_size=16 --compile

Every key lives in `TrainConfig`, flat like nanoGPT: model keys (n_layer, d_model, ...) sit next to
optimizer and logging keys and become a `ModelConfig` in `model_config`. A config file is ordinary
Python whose top-level assignments override the defaults; `--key=value` arguments then override the
files, parsed by the default's type (bools take true/false/1/0/yes/no, and a bare `--flag` means true).
Unknown keys, wrongly typed values and out-of-range choices raise a ConfigError that names the fix.
"""

import difflib
import json
import math
import runpy
import traceback
import types
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from nanokor.atomic import atomic_write
from nanokor.errors import CheckpointError, ConfigError
from nanokor.model import ModelConfig

_MODEL = {f.name: f.default for f in fields(ModelConfig)}  # architecture defaults live in the model's config


@dataclass
class TrainConfig:
    # ---- run ----
    out_dir: str = "out"  # checkpoints, metrics.jsonl, config.json
    data_dir: str = "data/sample"  # written by prepare.py: tokenizer.model, train_*.bin, val_*.bin
    init_from: str = "scratch"  # scratch | resume (continue from out_dir/last.pt) | a checkpoint to start from (SFT)
    seed: int = 1337
    device: str = "auto"  # auto (cuda if available, else cpu) | cpu | cuda
    dtype: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32; bf16 is autocast over fp32 weights
    compile: bool = False  # torch.compile the model (first step pays the compile time)
    engine: str = "ddp"  # ddp (one process, or DDP under torchrun) | fsdp (FSDP2: weights, gradients, optimizer sharded)
    deepspeed: str = ""  # path to a DeepSpeed JSON config (the DeepSpeed engine); empty = the `engine` above
    # ---- model (the tokenizer fixes vocab_size; block_size is max_seq_len) ----
    n_layer: int = _MODEL["n_layer"]
    n_head: int = _MODEL["n_head"]
    n_kv_head: int = _MODEL["n_kv_head"]  # 0 = n_head; fewer gives grouped-query attention
    d_model: int = _MODEL["d_model"]
    d_ff: int = _MODEL["d_ff"]
    dropout: float = _MODEL["dropout"]
    tie_embeddings: bool = _MODEL["tie_embeddings"]
    # RMSNorm of each head's queries and keys (Qwen3's; exports as Qwen3). On for new runs (recipe v2,
    # docs/benchmarks.md); the model's default stays off, as it means a checkpoint that predates the key.
    qk_norm: bool = True
    rope_theta: float = _MODEL["rope_theta"]
    norm_eps: float = _MODEL["norm_eps"]
    init_std: float = _MODEL["init_std"]
    zero_init: bool = _MODEL["zero_init"]  # o_proj and down_proj start at zero (else init_std / sqrt(2 n_layer))
    head_init_scale: float = _MODEL["head_init_scale"]  # an untied LM head starts at init_std times this
    attention: str = _MODEL["attention"]  # auto | flash | sdpa | math
    position: str = _MODEL["position"]  # rope | sinusoidal
    gradient_checkpointing: bool = _MODEL["gradient_checkpointing"]
    # ---- batch: tokens per optimizer step = batch_size * block_size * grad_accum * world size ----
    block_size: int = 1024
    batch_size: int = 8  # sequences per micro-step, per process
    grad_accum: int = 1  # micro-steps per optimizer step, per process
    max_steps: int = 10000
    # ---- optimizer and schedule ----
    # The defaults are the recipe bench/recipe_quality.py measured best (docs/benchmarks.md).
    optimizer: str = "muon"  # muon (Muon for the block matrices, AdamW for embedding, head, norms) | adamw
    schedule: str = "noam"  # noam | cosine | wsd (warmup-stable-decay)
    lr_factor: float = 3.0  # noam: lr = lr_factor * d_model^-0.5 * min(step^-0.5, step * warmup^-1.5); 3.4e-3 peak
    cooldown_frac: float = 0.4  # noam only: decay linearly to ~0 over this last fraction of max_steps; 0 = never
    muon_cooldown_frac: float = -1.0  # noam only: Muon's own cooldown fraction; -1 = cooldown_frac
    lr: float = 6e-4  # cosine / wsd: peak learning rate (AdamW's; noam computes it)
    min_lr: float = 6e-5  # cosine / wsd: final learning rate
    warmup_steps: int = 1000
    decay_frac: float = 0.2  # wsd: fraction of max_steps spent decaying at the end
    embed_lr: float = 0.2  # the embedding's peak AdamW lr; 0 = the schedule's peak (a tied head always uses it)
    muon_lr: float = 0.03  # optimizer=muon: the block matrices' peak lr (recipe v2; 0.02 before)
    muon_momentum: float = 0.95  # optimizer=muon: Nesterov momentum
    muon_momentum_warmup: int = 0  # steps over which Muon's momentum rises linearly from muon_momentum_start
    muon_momentum_start: float = 0.85  # Muon's momentum at step 0 when muon_momentum_warmup > 0
    muon_ns_dtype: str = "auto"  # Newton-Schulz in bf16 | fp32 | auto (bf16 on GPUs and CPUs with bf16 units, else fp32)
    muon_ns: str = "jordan"  # Muon's orthogonalization: jordan (fixed quintic) | polar_express (per-step coefficients)
    normuon_beta2: float = 0.0  # > 0: NorMuon, each row of Muon's update normalized by an EMA of its RMS at this rate
    muon_cautious_wd: bool = False  # Muon decays only the weights its update moves toward zero (cautious weight decay)
    weight_decay: float = 0.1  # decoupled, on the matrices and an untied head (AdamW and Muon alike)
    weight_decay_schedule: str = "constant"  # constant | linear, cosine (to 0 at max_steps) | lr (follows the lr)
    beta1: float = 0.8  # AdamW's, for the embedding, head and norms (recipe v2: 0.9 and 1e-8 before)
    beta2: float = 0.95
    eps: float = 1e-10
    grad_clip: float = 1.0  # max gradient norm; 0 disables clipping (the norm is still logged)
    label_smoothing: float = 0.0  # training loss only; validation is pure cross-entropy
    max_nonfinite: int = 10  # consecutive non-finite steps (skipped) before the run aborts
    # ---- evaluation and checkpoints ----
    eval_interval: int = 500  # steps between evaluations (each also writes last.pt)
    eval_tokens: int = 1 << 20  # validation-token budget per evaluation, over all processes
    keep_best: int = 3  # best-k checkpoints by validation loss, beside last.pt
    sample_tokens: int = 48  # length of the Korean sample generated at each evaluation; 0 disables
    sample_prompt: str = "대한민국의 역사는"
    # ---- logging ----
    wandb_mode: str = "disabled"  # auto (online with an API key, else offline) | online | offline | disabled
    wandb_project: str = "nanokor"
    wandb_run_name: str = ""  # empty = wandb's generated name

    def to_dict(self) -> dict:
        return asdict(self)


INIT_FROM = ("scratch", "resume")  # or the path of a checkpoint whose weights a new run starts from
CHOICES = {
    "device": ("auto", "cpu", "cuda"),
    "engine": ("ddp", "fsdp"),
    "dtype": ("auto", "bf16", "fp32"),
    "optimizer": ("adamw", "muon"),
    "schedule": ("noam", "cosine", "wsd"),
    "weight_decay_schedule": ("constant", "linear", "cosine", "lr"),
    "muon_ns_dtype": ("auto", "bf16", "fp32"),
    "muon_ns": ("jordan", "polar_express"),
    "wandb_mode": ("auto", "online", "offline", "disabled"),
}
POSITIVE = ("n_layer", "n_head", "d_model", "d_ff", "block_size", "batch_size", "grad_accum", "max_steps",
            "eval_interval", "eval_tokens", "max_nonfinite")
TYPES = {f.name: f.type for f in fields(TrainConfig)}
# The model keys are ModelConfig's fields, less the two the run derives (tokenizer, block_size).
MODEL_KEYS = tuple(f.name for f in fields(ModelConfig) if f.name not in ("vocab_size", "max_seq_len"))


def load_config(argv: list[str]) -> TrainConfig:
    """Defaults, then each config file in order, then `--key=value` overrides (wherever they stand
    on the command line: a flag before the file still wins); validated."""
    values, flags = {}, {}
    for arg in argv:
        if arg.startswith("--"):
            key, sep, text = arg[2:].partition("=")
            key = key.replace("-", "_")
            _check_key(key, f"the command-line flag {arg}")
            if not sep and TYPES[key] is not bool:
                raise ConfigError(f"--{key} needs a value: write --{key}=VALUE (only bool keys may be bare flags).")
            flags[key] = _parse(key, text) if sep else True
        else:
            values.update(_read_config_file(arg))
    cfg = TrainConfig(**{**values, **flags})
    adopt_architecture(cfg, set(values) | set(flags))
    validate(cfg)
    asked = {**values, **flags}
    if cfg.deepspeed and "engine" in asked:
        raise ConfigError(f"--deepspeed={cfg.deepspeed} selects the DeepSpeed engine, and engine={cfg.engine!r} asks "
                          "for another. Drop one of them: --deepspeed=... for DeepSpeed ZeRO, --engine=fsdp for "
                          "PyTorch's FSDP2, neither for DDP.")
    for key, off in (("cooldown_frac", 0), ("muon_cooldown_frac", -1)):
        if asked.get(key, off) != off and cfg.schedule != "noam":
            # The default cooldown is Noam's and other schedules ignore it; one asked for by name is a mistake.
            raise ConfigError(f"{key} is Noam's cooldown; schedule={cfg.schedule!r} decays by itself (to min_lr, "
                              f"over decay_frac for wsd). Remove {key} or use schedule='noam'.")
    return cfg


def _read_config_file(path: str) -> dict:
    if not Path(path).is_file():
        raise ConfigError(f"Config file {path} does not exist. Pass a file such as config/tiny.py, or set keys "
                          "directly with --key=value.")
    try:
        namespace = runpy.run_path(path)
    except SyntaxError as e:
        raise ConfigError(f"{path}, line {e.lineno}: {e.msg} (`{(e.text or '').strip()}`). A config file is plain "
                          "Python assignments such as `batch_size = 16`; fix the line.") from None
    except Exception as e:  # a NameError, an import that fails: the file's code ran and broke
        line = next((f.lineno for f in reversed(traceback.extract_tb(e.__traceback__))
                     if Path(f.filename).resolve() == Path(path).resolve()), "?")
        raise ConfigError(f"{path}, line {line}: running it raised {type(e).__name__}: {e}. A config file is plain "
                          "Python assignments such as `batch_size = 16`; fix the line.") from None
    values = {}
    for key, value in namespace.items():
        if key.startswith("_") or callable(value) or isinstance(value, types.ModuleType):
            continue  # helpers and imports are the file's business, not config keys
        _check_key(key, f"{path}")
        values[key] = _check_type(key, value, f"{path}")
    return values


def _check_key(key: str, where: str) -> None:
    if key not in TYPES:
        close = difflib.get_close_matches(key, TYPES, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"Unknown config key '{key}' in {where}.{hint} Valid keys: {', '.join(TYPES)}.")


def _parse(key: str, text: str):
    kind = TYPES[key]
    if kind is bool:
        lowered = text.strip().lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise ConfigError(f"--{key} is a bool: write --{key}=true or --{key}=false, not {text!r}.")
    try:
        return kind(text)
    except ValueError:
        raise ConfigError(f"--{key} must be {_article(kind)} (default {getattr(TrainConfig, key)!r}), "
                          f"got {text!r}.") from None


def _check_type(key: str, value, where: str):
    kind = TYPES[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if type(value) is not kind:
        raise ConfigError(f"{key} in {where} must be {_article(kind)} (default {getattr(TrainConfig, key)!r}), "
                          f"got {value!r} of type {type(value).__name__}.")
    return value


def _article(kind: type) -> str:
    return {int: "an int", float: "a float", str: "a string", bool: "a bool"}[kind]


def validate(cfg: TrainConfig) -> None:
    problems = [f"{key} must be one of {choices}, got {getattr(cfg, key)!r}"
                for key, choices in CHOICES.items() if getattr(cfg, key) not in choices]
    # nan passes every range check below (each comparison is False), so it is refused by name
    problems += [f"{key} must be a finite number, got {getattr(cfg, key)}" for key, kind in TYPES.items()
                 if kind is float and not math.isfinite(getattr(cfg, key))]
    if not 0 <= cfg.seed < 2**63:  # rank r seeds torch with seed + r, which must fit 64 bits unsigned
        problems.append(f"seed must be a whole number from 0 to 2**63 - 1, got {cfg.seed}")
    problems += [f"{key} must be positive, got {getattr(cfg, key)}" for key in POSITIVE if getattr(cfg, key) <= 0]
    if not 0 <= cfg.label_smoothing < 1:
        problems.append(f"label_smoothing must be in [0, 1), got {cfg.label_smoothing}")
    if cfg.warmup_steps < 0 or cfg.keep_best < 0 or cfg.sample_tokens < 0 or cfg.grad_clip < 0:
        problems.append("warmup_steps, keep_best, sample_tokens and grad_clip must not be negative")
    if cfg.schedule == "noam" and cfg.warmup_steps == 0:
        problems.append("the noam schedule needs warmup_steps > 0 (its peak is at step = warmup_steps)")
    if not 0 <= cfg.decay_frac <= 1 or not 0 <= cfg.cooldown_frac <= 1:
        problems.append(f"decay_frac and cooldown_frac must be in [0, 1], got {cfg.decay_frac} and {cfg.cooldown_frac}")
    if cfg.lr < 0 or cfg.min_lr < 0 or cfg.weight_decay < 0 or cfg.lr_factor <= 0 or cfg.eps <= 0:
        problems.append("lr, min_lr and weight_decay must not be negative, lr_factor and eps must be positive")
    if cfg.embed_lr < 0 or cfg.muon_lr <= 0 or not 0 <= cfg.muon_momentum < 1:
        problems.append(f"embed_lr must not be negative, muon_lr must be positive and muon_momentum in [0, 1), got "
                        f"{cfg.embed_lr}, {cfg.muon_lr} and {cfg.muon_momentum}")
    if cfg.muon_momentum_warmup < 0 or not 0 <= cfg.muon_momentum_start < 1:
        problems.append(f"muon_momentum_warmup must not be negative and muon_momentum_start must be in [0, 1), got "
                        f"{cfg.muon_momentum_warmup} and {cfg.muon_momentum_start}")
    if not 0 <= cfg.normuon_beta2 < 1:
        problems.append(f"normuon_beta2 must be in [0, 1) (0 = plain Muon; NorMuon uses 0.95), got {cfg.normuon_beta2}")
    if not (0 <= cfg.muon_cooldown_frac <= 1 or cfg.muon_cooldown_frac == -1):
        problems.append(f"muon_cooldown_frac must be in [0, 1], or -1 for cooldown_frac, got {cfg.muon_cooldown_frac}")
    if not (0 <= cfg.beta1 < 1 and 0 <= cfg.beta2 < 1):
        problems.append(f"beta1 and beta2 must be in [0, 1), got {cfg.beta1} and {cfg.beta2}")
    if cfg.init_from not in INIT_FROM and not Path(cfg.init_from).is_file():
        problems.append(f"init_from must be scratch, resume or the path of a checkpoint to start from (e.g. "
                        f"out/last.pt); {cfg.init_from!r} is neither, nor a file")
    if problems:
        raise ConfigError("Invalid config: " + "; ".join(problems) + ". Fix the config file or pass --key=value.")
    try:
        model_config(cfg, vocab_size=256)
    except ValueError as e:
        raise ConfigError(f"{e} Adjust the model keys ({', '.join(MODEL_KEYS)}).") from None


def adopt_architecture(cfg: TrainConfig, given: set[str]) -> None:
    """A run that starts from a checkpoint (init_from=<path>) or continues one (resume, from
    out_dir/last.pt) takes that checkpoint's architecture: the model keys the config files and flags
    leave unset are set from it, so an SFT config needs none of them; one set to another value is an
    error that names it. (block_size may differ from a checkpoint a run starts from: position tables are
    not weights.)"""
    path = Path(cfg.out_dir) / "last.pt" if cfg.init_from == "resume" else Path(cfg.init_from)
    if cfg.init_from == "scratch" or not path.is_file():
        return  # from scratch; or a resume with no last.pt to read, which the engine reports
    from nanokor.checkpoint import load_checkpoint  # the checkpoint's metadata only (mmap)

    # A key an older checkpoint lacks means the model's default then (qk_norm: False), not this run's default.
    saved = ModelConfig.from_dict(load_checkpoint(path, mmap=True)["model_config"]).architecture()
    keys = [k for k in MODEL_KEYS if k in saved]

    def asked(key):  # n_kv_head 0 means n_head, which a checkpoint stores resolved
        value = getattr(cfg, key)
        if key == "n_kv_head" and value == 0:
            return cfg.n_head if "n_head" in given else saved.get("n_head")
        return value

    diffs = [f"{k}: checkpoint {saved[k]!r}, config {asked(k)!r}" for k in keys if k in given and saved[k] != asked(k)]
    if diffs:
        what = "resume from" if cfg.init_from == "resume" else "start from"
        raise CheckpointError(f"Cannot {what} {path}: its architecture differs from the config ({'; '.join(diffs)}). "
                              "The architecture comes from the checkpoint: drop these keys from the config and "
                              "flags, or start a new run from scratch in another --out_dir.")
    for k in keys:
        setattr(cfg, k, saved[k])


def model_config(cfg: TrainConfig, vocab_size: int) -> ModelConfig:
    """The architecture the flat keys describe; the tokenizer decides the vocabulary size."""
    return ModelConfig(vocab_size=vocab_size, max_seq_len=cfg.block_size,
                       **{key: getattr(cfg, key) for key in MODEL_KEYS})


def format_config(cfg: TrainConfig) -> str:
    """The resolved config as printed at start: one `key = value` per line, in declaration order."""
    width = max(map(len, TYPES))
    return "\n".join(f"{key:<{width}} = {value!r}" for key, value in cfg.to_dict().items())


def save_config(cfg: TrainConfig, path) -> None:
    atomic_write(path, (json.dumps(cfg.to_dict(), indent=2, ensure_ascii=False) + "\n").encode("utf-8"))
