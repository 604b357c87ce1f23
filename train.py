"""Train a nanokor model. One loop, read top to bottom; everything else is a function it calls.

    python prepare.py --dataset sample && python train.py config/tiny.py   # CPU quickstart
    torchrun --standalone --nproc_per_node=8 train.py config/base.py        # one 8-GPU node
    python train.py config/tiny.py --deepspeed=config/ds_zero2.json         # DeepSpeed ZeRO-2
    python train.py config/tiny.py --init_from=resume                       # continue out_dir/last.pt

Config files are plain Python; any key can be overridden with --key=value (see nanokor/config.py).
Writes to out_dir: config.json, metrics.jsonl, last.pt, best-<step>.pt and best.json.
"""

import resource
import sys
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import torch

from nanokor.checkpoint import BestCheckpoints, CheckpointError, rng_state, save_checkpoint, set_rng_state
from nanokor.config import ConfigError, TrainConfig, format_config, load_config, model_config, save_config
from nanokor.corpus import DataError
from nanokor.distributed import (Env, StopSignal, all_reduce_sum, barrier, build_engine, gather_objects,
                                 init_distributed, shutdown)
from nanokor.evaluate import evaluate_loss
from nanokor.generate import generate
from nanokor.loader import TrainLoader, val_batches
from nanokor.logger import make_logger
from nanokor.model import Transformer, estimate_mfu
from nanokor.optim import make_schedule
from nanokor.tokenizer import Tokenizer


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if {"-h", "--help"} & set(argv):
        print(f"{__doc__}\nKeys and their defaults (meanings in nanokor/config.py):\n{format_config(TrainConfig())}")
        return {}
    cfg = load_config(argv)
    env = init_distributed(cfg.device, single_process_group=bool(cfg.deepspeed))
    try:
        return train(cfg, env)
    finally:
        shutdown()


def train(cfg, env: Env) -> dict:
    out_dir, data_dir = Path(cfg.out_dir), Path(cfg.data_dir)
    if cfg.init_from == "scratch" and (out_dir / "last.pt").exists():
        raise ConfigError(f"{out_dir} already holds a run (last.pt); starting from scratch would overwrite its "
                          "checkpoints and metrics. Continue it with --init_from=resume, train into another "
                          f"directory with --out_dir=..., or delete {out_dir} to start over.")
    dtype = resolve_dtype(cfg.dtype, env.device)
    # DeepSpeed casts the model itself; otherwise bf16 is autocast over fp32 master weights.
    use_autocast = dtype == torch.bfloat16 and not cfg.deepspeed
    autocast = partial(torch.autocast, env.device.type, dtype=dtype) if use_autocast else nullcontext
    if env.device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for any fp32 matmul left outside autocast
    torch.manual_seed(cfg.seed + env.rank)  # distinct dropout masks per rank

    # ---- data, model, engine -----------------------------------------------------------------
    tokenizer = load_tokenizer(data_dir)
    loader = TrainLoader(data_dir, cfg.block_size, cfg.batch_size, rank=env.rank, world_size=env.world_size,
                         seed=cfg.seed, device=env.device, tokenizer_sha=tokenizer.sha256)
    token_bytes = torch.tensor(tokenizer.token_bytes, device=env.device)
    check_eval_inputs(cfg, env, tokenizer)  # now, not at the first evaluation hundreds of steps in
    model = Transformer(model_config(cfg, tokenizer.vocab_size)).to(env.device)
    engine = build_engine(model, cfg, env, dtype)  # AdamW (+ compile, DDP) or DeepSpeed
    schedule = make_schedule(cfg)

    # ---- resume: weights and optimizer, then the loader position and every RNG --------------
    state = {"step": 0, "tokens_seen": 0, "best": [], "val": None, "nonfinite_total": 0}
    if cfg.init_from == "resume":
        state = resume(engine, loader, out_dir, env)
    step, tokens_seen, val = state["step"], state["tokens_seen"], state["val"]
    nonfinite_total, nonfinite_run = state["nonfinite_total"], 0
    saved_step = step  # the step last.pt holds (0: none yet)
    best = BestCheckpoints(out_dir, cfg.keep_best, state["best"])

    # ---- announce --------------------------------------------------------------------------
    tokens_per_step = cfg.batch_size * cfg.block_size * cfg.grad_accum * env.world_size
    flops_per_token = model.flops_per_token(cfg.block_size)
    device_name = torch.cuda.get_device_name(env.device) if env.device.type == "cuda" else "cpu"
    if env.is_master:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.json")
    logger = make_logger(cfg, env.is_master, step, cfg.to_dict())
    logger.info(format_config(cfg))
    logger.info(f"model: {model.num_params() / 1e6:.2f}M parameters, vocab {tokenizer.vocab_size:,} | "
                f"{env.world_size} x {device_name}, {'bf16' if dtype == torch.bfloat16 else 'fp32'}, "
                f"{'DeepSpeed' if cfg.deepspeed else 'DDP' if env.distributed else 'single process'}")
    logger.info(f"tokens per step: {cfg.batch_size} seqs x {cfg.block_size} tokens x {cfg.grad_accum} micro-steps "
                f"x {env.world_size} processes = {tokens_per_step:,}")
    if step:
        logger.info(f"resumed from {out_dir} at step {step:,} ({tokens_seen:,} tokens seen)")

    # ---- the loop --------------------------------------------------------------------------
    stop, stopping = StopSignal(), False
    with logger, stop.installed():
        t_last = time.perf_counter()
        while step < cfg.max_steps and not stopping:
            step += 1
            lr = schedule(step)
            loss_sum = torch.zeros((), device=env.device)
            for micro in range(cfg.grad_accum):
                x, y = loader.next_batch()
                with engine.grad_sync(last=micro == cfg.grad_accum - 1):
                    with autocast():
                        _, loss = engine.model(x, y, label_smoothing=cfg.label_smoothing)
                    engine.backward(loss)
                loss_sum += loss.detach()
            grad_norm, applied = engine.step(lr)  # clips; skips the update if the gradient is not finite
            tokens_seen += tokens_per_step

            # One all-reduce carries the mean loss and the stop flag, so every rank leaves together.
            reduced = all_reduce_sum(torch.stack([loss_sum / cfg.grad_accum,
                                                  torch.tensor(float(stop.requested), device=env.device)]))
            loss, stopping = reduced[0].item() / env.world_size, reduced[1].item() > 0
            nonfinite_run = 0 if applied else nonfinite_run + 1
            nonfinite_total += not applied
            now = time.perf_counter()
            dt, t_last = now - t_last, now
            record = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                      "tokens_per_sec": tokens_per_step / dt, "step_time": dt, "tokens_seen": tokens_seen,
                      "epoch": loader.epoch, "mem_gb": memory_gb(env.device), "nonfinite_total": nonfinite_total}
            mfu = estimate_mfu(flops_per_token, tokens_per_step / dt, device_name, dtype, env.world_size)
            if mfu is not None:
                record["mfu"] = mfu
            logger.step(record)
            if nonfinite_run >= cfg.max_nonfinite:
                raise NonFiniteLossError(
                    f"{nonfinite_run} consecutive steps (up to step {step}) had a non-finite loss or gradient; "
                    f"each update was skipped and the run stopped. {out_dir / 'last.pt'} still holds the last "
                    "good checkpoint. Lower the learning rate (lr_factor or lr), keep grad_clip on, check the "
                    "data, then continue with --init_from=resume.")

            evaluating = step % cfg.eval_interval == 0 or step == cfg.max_steps
            if evaluating:
                val = {**evaluate(engine, cfg, env, tokenizer, token_bytes, autocast), "step": step}
                logger.log({"step": step, **{f"val_{k}": v for k, v in val.items() if k != "step"}})
                logger.info(f"step {step:,}: val loss {val['loss']:.4f}, ppl {val['ppl']:.2f}, bpb {val['bpb']:.4f}")
                if env.is_master and cfg.sample_tokens:
                    text = korean_sample(engine.module, tokenizer, cfg, env.device, autocast)
                    logger.log({"step": step, "sample": text})
                    logger.info(f"sample: {text}")
            # A skipped update may follow the one that ruined the weights: keep the last good checkpoint.
            if (evaluating or stopping) and not nonfinite_run:
                save_last(out_dir, engine, cfg, tokenizer, loader, env, best, step=step, tokens_seen=tokens_seen,
                          val=val, nonfinite_total=nonfinite_total)
                saved_step = step
            if evaluating or stopping:
                t_last = time.perf_counter()  # evaluation and saving are not training time
        if stopping:
            logger.info(f"stopped by signal at step {step:,}")
        if saved_step != step:
            logger.info(f"step {step:,} had a non-finite loss and was not saved: {out_dir / 'last.pt'} holds "
                        + (f"step {saved_step:,}" if saved_step else "no checkpoint of this run"))
        elif stopping:
            logger.info(f"{out_dir / 'last.pt'} is saved")
    return {"step": step, "tokens_seen": tokens_seen, "val": val, "stopped": stopping}


# ---- helpers the loop calls, in the order it calls them -------------------------------------

def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        bf16_ok = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16_ok else torch.float32
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[name]


def load_tokenizer(data_dir: Path) -> Tokenizer:
    path = data_dir / "tokenizer.model"
    if not path.is_file():
        raise ConfigError(f"No prepared data in {data_dir} (no tokenizer.model). Prepare it first, e.g. "
                          f"`python prepare.py --dataset sample` for data/sample, or point --data_dir at the "
                          "directory prepare.py wrote.")
    return Tokenizer.load(path)


def resume(engine, loader, out_dir: Path, env: Env) -> dict:
    """Load weights and optimizer (last.pt, or DeepSpeed's own checkpoint), then the loader position and
    every RNG, so the run continues exactly; returns the saved loop state (step, tokens seen, best-k)."""
    state = engine.resume(out_dir)
    try:
        loader.load_state_dict(state["loader"])
    except ValueError as e:
        raise CheckpointError(f"Cannot resume from {out_dir}: {e} Resume with the data_dir, seed and block_size "
                              "the run was started with.") from None
    # Each rank continues its own random streams; another world size cannot, so it keeps the fresh seeds.
    if len(state["rng"]) == env.world_size:
        set_rng_state(state["rng"][env.rank])
    elif env.is_master:
        print(f"warning: the checkpoint holds RNG states for {len(state['rng'])} processes, this run has "
              f"{env.world_size}; dropout masks will differ from an uninterrupted run.", file=sys.stderr)
    return state


def memory_gb(device: torch.device) -> float:
    """Peak GPU memory allocated, or the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def check_eval_inputs(cfg, env: Env, tokenizer) -> None:
    """Raise the errors the first evaluation would: a validation split or budget smaller than one
    global batch (val_batches checks on creation), or a sample prompt that leaves no room to generate."""
    val_batches(cfg.data_dir, cfg.block_size, cfg.batch_size, cfg.eval_tokens, rank=env.rank,
                world_size=env.world_size, tokenizer_sha=tokenizer.sha256)
    prompt_tokens = 1 + len(tokenizer.encode(cfg.sample_prompt))  # BOS + text
    if cfg.sample_tokens and prompt_tokens >= cfg.block_size:
        raise ConfigError(f"sample_prompt is {prompt_tokens} tokens, which leaves no room to generate within "
                          f"block_size={cfg.block_size}. Shorten sample_prompt, or turn the eval sample off "
                          "with --sample_tokens=0.")


def evaluate(engine, cfg, env: Env, tokenizer, token_bytes, autocast) -> dict:
    """Validation loss, perplexity and bits per byte on the fixed token budget (unsmoothed, all ranks)."""
    batches = val_batches(cfg.data_dir, cfg.block_size, cfg.batch_size, cfg.eval_tokens, rank=env.rank,
                          world_size=env.world_size, device=env.device, tokenizer_sha=tokenizer.sha256)
    # The bare module: a compiled one would recompile for eval mode and per-token losses.
    return evaluate_loss(engine.module, batches, token_bytes, autocast)


def korean_sample(model, tokenizer, cfg, device, autocast) -> str:
    """A short continuation of cfg.sample_prompt. Its own seeded generator leaves the training RNG alone."""
    prompt = [tokenizer.bos_id] + tokenizer.encode(cfg.sample_prompt)
    n_new = min(cfg.sample_tokens, cfg.block_size - len(prompt))
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    with autocast():
        ids = [int(t) for t in generate(model, torch.tensor([prompt], device=device), n_new, temperature=0.8,
                                        top_k=50, eos_id=tokenizer.eos_id, generator=generator)]
    return cfg.sample_prompt + tokenizer.decode(ids)


def save_last(out_dir: Path, engine, cfg, tokenizer, loader, env: Env, best: BestCheckpoints, *, step: int,
              tokens_seen: int, val: dict | None, nonfinite_total: int) -> None:
    """Write last.pt (atomically; every rank takes part) and keep it among the best if it ranks."""
    fresh = val is not None and val["step"] == step  # evaluated just now (not a save on a signal)
    entries = best.with_candidate(step, val["loss"]) if fresh else best.entries
    loop_state = {"step": step, "tokens_seen": tokens_seen, "loader": loader.state_dict(),
                  "rng": gather_objects(rng_state()), "best": entries, "val": val,
                  "nonfinite_total": nonfinite_total, "model_config": engine.module.config.to_dict()}
    engine.save(out_dir, step, loop_state)  # DeepSpeed's own checkpoint (optimizer partitions); no-op otherwise
    weights = engine.checkpoint_state()  # {"model", "optimizer"}; assembling ZeRO partitions is collective
    if env.is_master:
        save_checkpoint({**loop_state, **weights, "tokenizer": tokenizer.model_bytes,
                         "train_config": cfg.to_dict()}, out_dir / "last.pt")
        if fresh:
            best.keep(out_dir / "last.pt", step, val["loss"])
    barrier()


if __name__ == "__main__":
    try:
        main()
    except (ConfigError, CheckpointError, DataError, NonFiniteLossError) as e:
        sys.exit(f"train.py: error: {e}")
