#!/usr/bin/env bash
# Throughput of the base config on one lent GPU: train.py itself, bf16 autocast, a few hundred steps.
#
#   bash bench/gpu_check.sh           # ~4-6 minutes; logs under $OUT if set, else bench/results/gpu_check
#   STEPS=100 bash bench/gpu_check.sh # shorter
#   EXTRA="--batch_size=8" bash bench/gpu_check.sh   # extra train.py flags, applied last to every run
#
# Runs config/base.py (d_model 768, 12 layers, 16 x 1024 tokens x 4 micro-steps per step, Muon) five ways:
# SDPA + torch.compile, the same with AdamW alone (what Muon costs), flash-attn + torch.compile (only if
# flash_attn imports), 32 x 1024 x 2 micro-steps (the same tokens, larger micro-batches), and SDPA eager; then
# prints tokens/s, step time, MFU (against the card's bf16 dense peak) and peak memory. Goal: MFU >= 50%
# on one H100 with bf16 + compile. Last, generation on the GPU: bench/sample_speed.py (nanokor eager, as a
# replayed CUDA graph and compiled with CUDA graphs, against transformers' generate, bf16; it first checks
# every path's greedy tokens against eager's), unless SAMPLE=0.
#
# Self-contained for a machine without network, wandb, datasets or deepspeed. Data: the embedded Korean
# sample (`python prepare.py --dataset sample`), whose real tokens are tiled into larger shards so the
# base batch and the validation pass have enough windows; throughput does not depend on the text. The
# vocabulary is therefore the sample tokenizer's (~4,600 ids), not the 32,000 of a real base run.
set -euo pipefail
cd "$(dirname "$0")/.."

LOG="${OUT:-bench/results/gpu_check}"
STEPS="${STEPS:-200}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$LOG"

{ nvidia-smi || true; python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; } \
    > "$LOG/machine.txt" 2>&1
cat "$LOG/machine.txt"

echo "== data: embedded sample, tokens tiled to 16M train / 1M val"
python prepare.py --dataset sample --out "$WORK/sample" > "$LOG/prepare.log" 2>&1
python - "$WORK/sample" "$WORK/data" <<'EOF'
import sys
from pathlib import Path
import numpy as np
from nanokor.shards import DataDir, ShardWriter, read_shard

src, dst = DataDir(sys.argv[1]), DataDir(sys.argv[2])
dst.path.mkdir()
dst.write_tokenizer(src.tokenizer)
meta = dict(src.meta)
sha, vocab = meta["tokenizer"]["sha256"], meta["tokenizer"]["vocab_size"]
meta["shards"] = {}
for split, n in (("train", 16_000_000), ("val", 1_000_000)):
    tokens = np.concatenate([np.asarray(read_shard(p)) for p in src.shard_paths(split)])
    writer = ShardWriter(dst.path, split, shard_tokens=n, vocab_size=vocab, tokenizer_sha=sha)
    writer.write(np.resize(tokens, n))
    meta["shards"][split] = writer.close()
meta["note"] = "gpu_check: the embedded sample's tokens, tiled"
dst.write_meta(meta)
EOF

run() {  # name, then train.py flags
    local name="$1"; shift
    echo "== $name"
    if timeout 300 python train.py config/base.py --data_dir="$WORK/data" --out_dir="$WORK/out-$name" \
        --max_steps="$STEPS" --eval_interval="$STEPS" --eval_tokens=262144 --keep_best=0 --sample_tokens=32 \
        --wandb_mode=disabled "$@" ${EXTRA:-} > "$LOG/$name.log" 2>&1; then
        cp "$WORK/out-$name/metrics.jsonl" "$LOG/$name.metrics.jsonl"
    else
        echo "   failed (exit $?); last lines of $LOG/$name.log:"; tail -n 15 "$LOG/$name.log"
    fi
}

run sdpa-compile --attention=sdpa --compile=true
run adamw-compile --attention=sdpa --compile=true --optimizer=adamw --lr_factor=1.0 --embed_lr=0  # base.py is Muon: its cost
if python -c "import flash_attn" 2>/dev/null; then
    run flash-compile --attention=flash --compile=true
else
    echo "== flash-compile: skipped (flash_attn is not installed)"
fi
# The same tokens per step in micro-batches twice as large: does the H200's memory buy MFU?
run b32-compile --attention=sdpa --compile=true --batch_size=32 --grad_accum=2
run sdpa-eager --attention=sdpa --compile=false --max_steps="$(( STEPS / 2 ))" --eval_interval="$(( STEPS / 2 ))"

python - "$LOG" <<'EOF'
import json, statistics, sys
from pathlib import Path

log = Path(sys.argv[1])
rows = []
for name in ("sdpa-compile", "adamw-compile", "flash-compile", "b32-compile", "sdpa-eager"):
    path = log / f"{name}.metrics.jsonl"
    if not path.is_file():
        continue
    records = [json.loads(line) for line in path.read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    timed = steps[len(steps) // 5:]  # the first fifth holds compilation and warm-up
    val = [r for r in records if "val_loss" in r]
    rows.append({"run": name, "steps": len(steps),
                 "tokens_per_sec": statistics.median(r["tokens_per_sec"] for r in timed),
                 "step_ms": 1e3 * statistics.median(r["step_time"] for r in timed),
                 "mfu": statistics.median(r["mfu"] for r in timed) if "mfu" in timed[0] else None,
                 "peak_mem_gb": max(r["mem_gb"] for r in steps),
                 "final_loss": steps[-1]["loss"], "val_loss": val[-1]["val_loss"] if val else None})
(log / "summary.json").write_text(json.dumps(rows, indent=2) + "\n")
print(f"\n{'run':<14} {'steps':>5} {'tokens/s':>11} {'step ms':>8} {'MFU':>6} {'peak GB':>8} {'loss':>6}")
for r in rows:
    mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
    loss = f"{r['final_loss']:.2f}" if r["final_loss"] is not None else "nan"  # metrics.jsonl writes NaN as null
    print(f"{r['run']:<14} {r['steps']:>5} {r['tokens_per_sec']:>11,.0f} {r['step_ms']:>8.1f} {mfu:>6} "
          f"{r['peak_mem_gb']:>8.1f} {loss:>6}")
print(f"(medians over the last 4/5 of the steps; logs and summary.json in {log})")
EOF

if [ "${PROFILE:-1}" = 1 ]; then  # the base shape, 32k vocabulary: the step's breakdown, fused vs plain loss
    for flags in "--compile" "--compile --plain-loss" "--compile --optimizer adamw"; do
        name="profile$(echo $flags | tr -d ' -')"
        echo "== bench/step_profile.py $flags"
        PYTHONPATH=. timeout 240 python bench/step_profile.py $flags --out "$LOG/$name.json" > "$LOG/$name.log" 2>&1 \
            || echo "   failed (exit $?)"
        grep -E "^step|^  [a-z]+ |matmuls alone" "$LOG/$name.log"
    done
fi

if [ "${SAMPLE:-1}" = 1 ] && [ -f "$WORK/out-sdpa-compile/last.pt" ]; then
    echo "== sample.py on the trained base checkpoint: --cuda-graph and --compile against eager, seeded"
    for how in "" "--cuda-graph" "--compile"; do
        timeout 240 python sample.py --ckpt "$WORK/out-sdpa-compile/last.pt" --prompt "대한민국의 역사는" \
            --max-new-tokens 64 --top-k 50 --seed 7 $how > "$LOG/sample$how.txt" 2> "$LOG/sample$how.err" \
            || echo "   sample.py $how failed (exit $?): $(tail -n 3 "$LOG/sample$how.err")"
    done
    for how in "--cuda-graph" "--compile"; do
        if cmp -s "$LOG/sample.txt" "$LOG/sample$how.txt"; then echo "   $how: the same text as eager"
        else echo "   $how: DIFFERS from eager (bf16 may flip a near-tie late; see $LOG/sample*.txt)"; fi
    done
fi

if [ "${SAMPLE:-1}" = 1 ]; then
    echo "== generation: bench/sample_speed.py on this GPU"
    PYTHONPATH=. timeout 300 python bench/sample_speed.py --device cuda --out "$LOG/sample_speed.json" \
        > "$LOG/sample_speed.log" 2>&1 || echo "   failed (exit $?)"
    grep -v "Loading weights" "$LOG/sample_speed.log" | tail -n 12
fi
