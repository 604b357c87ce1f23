"""Train a nanokor model. One loop, read top to bottom; everything else is a function it calls.

    python train.py config/tiny.py                                          # CPU quickstart (prepares data/sample)
    torchrun --standalone --nproc_per_node=8 train.py config/base.py        # one 8-GPU node
    python train.py config/tiny.py --deepspeed=config/ds_zero2.json         # DeepSpeed ZeRO-2
    python train.py config/tiny.py --init_from=resume                       # continue out_dir/last.pt
    python train.py config/sft_tiny.py --init_from=out/last.pt --out_dir=out-sft   # SFT on data/sample-chat

Config files are plain Python; any key can be overridden with --key=value (see nanokor/config.py).
Writes to out_dir: config.json, metrics.jsonl, last.pt, best-<step>.pt and best.json.
"""

import resource
import signal
import sys
import time
from contextlib import contextmanager

import torch

from nanokor.checkpoint import BestCheckpoints, LoopState, load_pretrained, set_rng_state
from nanokor.config import INIT_FROM, TrainConfig, format_config, load_config, model_config, save_config
from nanokor.device import estimate_mfu
from nanokor.distributed import Env, all_reduce_sum, init_distributed, shutdown
from nanokor.engine import build_engine, engine_class
from nanokor.errors import CheckpointError, ConfigError, NanokorError, PromptError, TrainingError, exit_on_error
from nanokor.evaluate import evaluate_loss
from nanokor.generate import generate, room_to_generate
from nanokor.loader import open_loaders
from nanokor.logger import make_logger
from nanokor.model import Transformer
from nanokor.optim import make_schedule
from nanokor.prepare import SAMPLE_COMMAND, prepare_sample, sample_missing
from nanokor.rundir import RunDir
from nanokor.shards import DataDir, Prompt


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if {"-h", "--help"} & set(argv):
        print(f"{__doc__}\nKeys and their defaults (meanings in nanokor/config.py):\n{format_config(TrainConfig())}")
        return {}
    cfg = load_config(argv)
    env = init_distributed(cfg.device, single_process_group=engine_class(cfg).needs_process_group)
    try:
        return train(cfg, env)
    finally:
        shutdown()


def train(cfg, env: Env) -> dict:
    run = RunDir(cfg.out_dir)
    with owned(run, env):
        if cfg.init_from != "resume" and run.last.exists():
            raise ConfigError(f"{run} already holds a run (last.pt); starting a new one (init_from={cfg.init_from}) "
                              "would overwrite its checkpoints and metrics. Continue it with --init_from=resume, "
                              f"train into another directory with --out_dir=..., or delete {run} to start over.")
        if cfg.init_from == "resume" and not run.last.exists():
            raise ConfigError(f"--init_from=resume: {run} holds no run to resume (no last.pt). Pass the --out_dir of "
                              "the run to continue, or start a new one with --init_from=scratch (the default).")
        with opened_data(cfg, env) as (data, loader, val_batches):
            return train_loop(cfg, env, run, data, loader, val_batches)


def train_loop(cfg, env: Env, run: RunDir, data: DataDir, loader, val_batches) -> dict:
    if env.device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for any fp32 matmul left outside autocast
    torch.manual_seed(cfg.seed + env.rank)  # distinct dropout masks per rank
    tokenizer = data.tokenizer
    token_bytes = torch.tensor(tokenizer.token_bytes, device=env.device)
    sample_prompt = check_sample_prompt(cfg, data)  # now, not at the first evaluation hundreds of steps in

    # ---- model and engine (the engine places the model and builds its optimizer) ---------------
    model = Transformer(model_config(cfg, tokenizer.vocab_size))
    init_weights(model, cfg, tokenizer)
    engine = build_engine(model, cfg, env)
    schedule = make_schedule(cfg)

    # ---- resume: weights and optimizer, then the loader position and every RNG --------------
    state = resume(engine, loader, run, env) if cfg.init_from == "resume" else LoopState()
    check_steps_left(cfg, run, state)  # before config.json, metrics.jsonl or wandb are touched
    nonfinite_run, saved_step = 0, state.step  # saved_step: the step last.pt holds (0: none yet)
    best = BestCheckpoints(run, cfg.keep_best, state.best)

    # ---- announce --------------------------------------------------------------------------
    tokens_per_step = cfg.batch_size * cfg.block_size * cfg.grad_accum * env.world_size
    flops_per_token = model.flops_per_token(cfg.block_size)
    device_name = torch.cuda.get_device_name(env.device) if env.device.type == "cuda" else "cpu"
    if env.is_master:
        save_config(cfg, run.config)
    logger = make_logger(run, cfg, env.is_master, state.step, cfg.to_dict())
    logger.info(format_config(cfg))
    logger.info(f"model: {model.num_params() / 1e6:.2f}M parameters, vocab {tokenizer.vocab_size:,} | "
                f"{env.world_size} x {device_name}, {'bf16' if engine.dtype == torch.bfloat16 else 'fp32'}, "
                f"{engine.name}")
    logger.info(f"tokens per step: {cfg.batch_size} seqs x {cfg.block_size} tokens x {cfg.grad_accum} micro-steps "
                f"x {env.world_size} processes = {tokens_per_step:,}")
    logger.info(f"data: {data} | {loader.summary} | {val_batches.summary}")
    if cfg.init_from not in INIT_FROM:
        logger.info(f"starting from the weights of {cfg.init_from} (optimizer and schedule fresh)")
    if state.step:
        logger.info(f"resumed from {run} at step {state.step:,} ({state.tokens_seen:,} tokens seen)")

    # ---- the loop --------------------------------------------------------------------------
    stop, stopping = StopSignal(), False
    with logger, stop.installed():
        t_last = time.perf_counter()
        while state.step < cfg.max_steps and not stopping:
            state.step += 1
            step, lr = state.step, schedule(state.step)  # lr: logged (the head's AdamW rate)
            loss_sum = torch.zeros((), device=env.device)
            batches = [loader.next_batch() for _ in range(cfg.grad_accum)]
            for micro, ((x, y), share) in enumerate(zip(batches, target_shares(batches, env))):
                with engine.grad_sync(last=micro == cfg.grad_accum - 1):
                    with engine.autocast():
                        _, loss = engine.model(x, y, label_smoothing=cfg.label_smoothing, loss_only=True)
                    engine.backward(loss * share)
                loss_sum += loss.detach() * share
            grad_norm, applied = engine.step(step)  # sets lr & co., clips; skips a non-finite update
            state.tokens_seen += tokens_per_step

            # One all-reduce carries the mean loss and the stop flag, so every rank leaves together.
            reduced = all_reduce_sum(torch.stack([loss_sum / cfg.grad_accum,
                                                  torch.tensor(float(stop.requested), device=env.device)]))
            loss, stopping = reduced[0].item() / env.world_size, reduced[1].item() > 0
            nonfinite_run = 0 if applied else nonfinite_run + 1
            state.nonfinite_total += not applied
            now = time.perf_counter()
            dt, t_last = now - t_last, now
            record = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                      "tokens_per_sec": tokens_per_step / dt, "step_time": dt, "tokens_seen": state.tokens_seen,
                      "epoch": loader.epoch, "mem_gb": memory_gb(env.device), "nonfinite_total": state.nonfinite_total}
            mfu = estimate_mfu(flops_per_token, tokens_per_step / dt, device_name, engine.dtype, env.world_size)
            if mfu is not None:
                record["mfu"] = mfu
            logger.step(record)
            if nonfinite_run >= cfg.max_nonfinite:
                raise TrainingError(
                    f"{nonfinite_run} consecutive steps (up to step {step}) had a non-finite loss or gradient; "
                    f"each update was skipped and the run stopped. {run.last} still holds the last good "
                    "checkpoint. Lower the learning rate (lr_factor, lr or muon_lr), keep grad_clip on, check the "
                    "data, then continue with --init_from=resume.")

            evaluating = step % cfg.eval_interval == 0 or step == cfg.max_steps
            if evaluating:
                # The bare module: a compiled one would recompile for eval mode and per-token losses.
                state.val = {**evaluate_loss(engine.module, val_batches, token_bytes, engine.autocast), "step": step}
                logger.log({"step": step, **{f"val_{k}": v for k, v in state.val.items() if k != "step"}})
                logger.info(f"step {step:,}: val loss {state.val['loss']:.4f}, ppl {state.val['ppl']:.2f}, "
                            f"bpb {state.val['bpb']:.4f}")
                if cfg.sample_tokens:  # every rank generates (ZeRO-3 gathers weights collectively); one logs
                    text = korean_sample(engine, tokenizer, cfg, sample_prompt, env.device)
                    logger.log({"step": step, "sample": text})
                    logger.info(f"sample: {text}")
            # A skipped update may follow the one that ruined the weights: keep the last good checkpoint.
            if (evaluating or stopping) and not nonfinite_run:
                save_last(engine, run, state, best, loader, cfg, data, env)
                saved_step = step
            if evaluating or stopping:
                t_last = time.perf_counter()  # evaluation and saving are not training time
        if stopping:
            logger.info(f"stopped by signal at step {state.step:,}")
        if saved_step != state.step:
            logger.info(f"step {state.step:,} had a non-finite loss and was not saved: {run.last} holds "
                        + (f"step {saved_step:,}" if saved_step else "no checkpoint of this run"))
        elif stopping:
            logger.info(f"{run.last} is saved")
    return {"step": state.step, "tokens_seen": state.tokens_seen, "val": state.val, "stopped": stopping}


# ---- helpers the loop calls, in the order it calls them -------------------------------------

@contextmanager
def owned(run: RunDir, env: Env):
    """Hold run's lock for the whole run (rank 0 takes it; see `on_rank0`)."""
    on_rank0(run.lock, env)
    try:
        yield
    finally:
        run.unlock()


def on_rank0(fn, env: Env) -> None:
    """Run `fn` on rank 0 while the others wait; one all-reduce tells every rank whether it worked, so
    that all of them stop together instead of waiting on a rank that has left."""
    error = None
    if env.is_master:
        try:
            fn()
        except NanokorError as e:
            error = e
    failed = all_reduce_sum(torch.tensor(float(error is not None), device=env.device)).item() > 0
    if error is not None:
        raise error
    if failed:
        raise TrainingError("rank 0 failed (see its message); every rank stops.")


@contextmanager
def opened_data(cfg, env: Env):
    """The prepared data, the training loader and the validation batches (built once, checked now),
    closed when the run ends: windows of a token stream, or for conversations (prepare.py --chat) whole
    ones packed into rows whose targets are the assistant's tokens alone. The embedded sample is prepared
    on first use (a fresh clone's first `python train.py config/tiny.py` trains); any other missing data
    stays an error that says how to make it."""
    if sample_missing(cfg.data_dir):
        if env.is_master:
            print(f"{cfg.data_dir} is not prepared yet: preparing the embedded Korean sample into it first "
                  f"(`{SAMPLE_COMMAND}`, about a second)")
        on_rank0(lambda: prepare_sample(cfg.data_dir), env)
    data = DataDir(cfg.data_dir)
    loader, val_batches = open_loaders(data, cfg.block_size, cfg.batch_size, cfg.eval_tokens, rank=env.rank,
                                       world_size=env.world_size, seed=cfg.seed, device=env.device)
    try:
        yield data, loader, val_batches
    finally:
        loader.close()
        val_batches.close()


def check_sample_prompt(cfg, data: DataDir) -> Prompt | None:
    """The eval sample's prompt as the data frames text: a document's start, or, for conversations, a
    user's question for the chat model to answer. It must leave room to generate within block_size."""
    if not cfg.sample_tokens:
        return None
    try:
        prompt = data.prompt(cfg.sample_prompt)
        room_to_generate(len(prompt.ids), cfg.sample_tokens, cfg.block_size)
    except PromptError as e:
        raise ConfigError(f"sample_prompt leaves no room to generate within block_size: {e} Or turn the eval "
                          "sample off with --sample_tokens=0.") from None
    return prompt


def init_weights(model, cfg, tokenizer) -> None:
    """init_from=<checkpoint>: start from its weights alone (the optimizer and the schedule start fresh:
    fine-tuning, SFT). Loaded before the engine wraps the model, so DDP's first broadcast and DeepSpeed's
    partitioning start from them. scratch and resume keep the fresh init (resume loads later)."""
    if cfg.init_from not in INIT_FROM:
        load_pretrained(model, cfg.init_from, tokenizer)


def resume(engine, loader, run: RunDir, env: Env) -> LoopState:
    """Load weights and optimizer (the engine knows from where), then the loader position and every
    RNG, so the run continues exactly; returns the saved loop state."""
    state = engine.resume(run)
    try:
        loader.load_state_dict(state.loader)
    except ValueError as e:
        raise CheckpointError(f"Cannot resume from {run}: {e} Resume with the data_dir, seed and block_size "
                              "the run was started with.") from None
    # Each rank continues its own random streams; another world size cannot, so it keeps the fresh seeds.
    if len(state.rng) == env.world_size:
        set_rng_state(state.rng[env.rank])
    elif env.is_master:
        print(f"warning: the checkpoint holds RNG states for {len(state.rng)} processes, this run has "
              f"{env.world_size}; dropout masks will differ from an uninterrupted run.", file=sys.stderr)
    return state


def check_steps_left(cfg, run: RunDir, state: LoopState) -> None:
    """A resumed run already at max_steps would train nothing: refuse it, rather than exit 0 having rewritten
    config.json with a max_steps the run never reaches."""
    if state.step >= cfg.max_steps:
        raise ConfigError(f"{run} is already at step {state.step:,}, and max_steps is {cfg.max_steps:,}: there is "
                          "nothing left to train, so nothing was run or written. To train further, raise it: "
                          f"--init_from=resume --max_steps=N with N > {state.step:,}.")


class StopSignal:
    """SIGINT/SIGTERM set a flag instead of killing the process, so the loop can finish its step and
    save last.pt. torchrun passes both signals on to every worker (and SIGKILLs them ~30 s later by
    default), so each rank sees the flag; the loop all-reduces it so all ranks stop on the same step."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested = False

    @contextmanager
    def installed(self):
        previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _handle(self, signum, frame):
        self.requested = True


def target_shares(batches, env: Env) -> list[torch.Tensor]:
    """Each micro-batch's weight in the step's loss, so that the gradient is the mean over every target
    token of the global batch (all micro-steps, all ranks), however many of them each batch holds: the
    engine divides by the micro-steps and DDP averages the ranks, hence the factor. Windows of documents
    hold equally many targets, so each share is exactly 1; rows of conversations do not (only assistant
    tokens are targets), and a batch with more of them counts for more, as in one large batch."""
    counts = torch.stack([(y >= 0).sum() for _, y in batches]).float()
    total = all_reduce_sum(counts.sum())
    return list(counts * (len(batches) * env.world_size) / total)


def memory_gb(device: torch.device) -> float:
    """Peak GPU memory allocated, or the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def korean_sample(engine, tokenizer, cfg, prompt: Prompt, device) -> str:
    """What the model writes after cfg.sample_prompt (a continuation, or a chat model's reply), up to its
    stop id. Its own seeded generator leaves the training RNG alone."""
    n_new = room_to_generate(len(prompt.ids), cfg.sample_tokens, cfg.block_size)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    with engine.autocast():
        ids = [int(t) for t in generate(engine.module, torch.tensor([prompt.ids], device=device), n_new,
                                        temperature=0.8, top_k=50, stop_ids=prompt.stop_ids, generator=generator)]
    return prompt.lead + tokenizer.decode(ids)


def save_last(engine, run: RunDir, state: LoopState, best: BestCheckpoints, loader, cfg, data: DataDir,
              env: Env) -> None:
    """Write last.pt (atomically; every rank takes part) and keep it among the best if it ranks. A model
    trained on conversations is a chat model: its checkpoint says so ("chat"), for chat.py and the exports."""
    fresh = state.val is not None and state.val["step"] == state.step  # evaluated just now, not a signal's save
    state.best = best.with_candidate(state.step, state.val["loss"]) if fresh else best.entries
    state.loader = loader.state_dict()
    engine.save(run, state, {"tokenizer": data.tokenizer.model_bytes, "train_config": cfg.to_dict(),
                             "chat": data.holds_conversations})
    if fresh and env.is_master:
        best.keep(state.step, state.val["loss"])


if __name__ == "__main__":
    sys.exit(exit_on_error(main))
