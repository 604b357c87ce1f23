#!/usr/bin/env bash
# llama.cpp against nanokor on a trained checkpoint: tokenization, greedy text and perplexity; and on a
# chat model, the chat template llama-server renders and its greedy replies.
#
#   bash bench/llamacpp_check.sh                    # 20 min the first time on 2 busy cores (13 of them building
#                                                   # llama.cpp), about 8 after
#   CKPT=out/last.pt bash bench/llamacpp_check.sh   # check that checkpoint instead of training two (3 min)
#   CHAT_CKPT=out-sft/last.pt bash bench/llamacpp_check.sh   # the chat checks on that chat model
#
# Builds llama.cpp CPU-only from the sources vendored in the llama-cpp-python sdist on PyPI
# (LLAMA_CPP_PYTHON_VERSION, default 0.3.36), only llama-tokenize, llama-completion, llama-perplexity
# and llama-server (without its web UI), cached in ~/.cache/nanokor/llama.cpp so a rerun skips the build. Trains the
# quickstart model on the embedded sample (config/tiny.py with its shape spelled out, plus 2 key/value
# heads so grouped-query attention is exercised, and --qk_norm=false: a Llama), then checks four GGUF files: `--gguf` at f32 and
# q8_0, f32 from llama.cpp's own convert_hf_to_gguf.py run on the Hugging Face export, and the same
# with add_prefix_space deleted from tokenizer_config.json (the export before the fix). Then the same
# model with qk_norm (the default since recipe v2), which exports as a Qwen3 (llama.cpp's `qwen3` architecture): `--gguf` at f32 and
# q8_0 and convert_hf_to_gguf.py's f32 of the Qwen3 directory. The checks
# are bench/llamacpp_check.py's: every non-empty line of the sample tokenized by both, greedy
# continuations of five prompts, and llama-perplexity -c <block_size> against nanokor's loss on the
# same windows. The chat checks run on CHAT_CKPT, or without one on a stand-in: the (Llama) base model
# marked as a chat model, its <|im_end|> row set to its </s> row scaled by 1.5 so that its replies end
# with <|im_end|> about where its text would end (SFT teaches that; the stand-in only exercises the
# stop). Two chat GGUFs: `--gguf` f32 and convert_hf_to_gguf.py on the Hugging Face export (which
# carries the template in tokenizer_config.json). Prints tables per model; writes
# bench/results/llamacpp_check.json (and llamacpp_check_qwen3.json). Not part of CI.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's nanokor, not an installed one
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
CACHE="${LLAMACPP_CACHE:-$HOME/.cache/nanokor/llama.cpp}"
SRC="$CACHE/llama_cpp_python-$VERSION/vendor/llama.cpp"
BIN="$CACHE/build-$VERSION/bin"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

if [[ ! -x "$BIN/llama-perplexity" || ! -x "$BIN/llama-completion" || ! -x "$BIN/llama-tokenize" \
      || ! -x "$BIN/llama-server" ]]; then
    echo "== building llama.cpp from llama-cpp-python $VERSION (about 13 minutes on 2 busy cores)"
    mkdir -p "$CACHE"
    [[ -d "$SRC" ]] || {
        pip download --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$CACHE" > "$WORK/download.log"
        tar xzf "$CACHE/llama_cpp_python-$VERSION.tar.gz" -C "$CACHE"
    }
    nice -n 19 cmake -S "$SRC" -B "$CACHE/build-$VERSION" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
        -DBUILD_SHARED_LIBS=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
        -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_APP=OFF \
        > "$WORK/cmake.log" 2>&1 \
        || { tail -20 "$WORK/cmake.log"; exit 1; }
    nice -n 19 cmake --build "$CACHE/build-$VERSION" -j "$(nproc)" \
        --target llama-tokenize llama-completion llama-perplexity llama-server > "$WORK/build.log" 2>&1 \
        || { tail -20 "$WORK/build.log"; exit 1; }
fi

train() {  # the quickstart model (plus GQA) on the embedded sample, with extra flags; prints its checkpoint
    [[ -d "$WORK/sample" ]] || python prepare.py --dataset sample --out "$WORK/sample" > "$WORK/prepare.log"
    python train.py config/tiny.py --data_dir="$WORK/sample" --out_dir="$WORK/$1" --n_layer=4 --n_head=4 \
        --n_kv_head=2 --d_model=128 --d_ff=384 --block_size=128 --max_steps=150 --wandb_mode=disabled "${@:2}" \
        > "$WORK/train-$1.log" 2>&1 || { tail -20 "$WORK/train-$1.log" >&2; exit 1; }
    grep "val loss" "$WORK/train-$1.log" | tail -1 >&2
    echo "$WORK/$1/last.pt"
}

export_all() {  # --gguf f32 and q8_0, and the HF directory through convert_hf_to_gguf.py, into $WORK/$2
    python -m nanokor.export --ckpt "$1" --gguf --out "$WORK/$2/gguf" > /dev/null
    python -m nanokor.export --ckpt "$1" --gguf --out "$WORK/$2/gguf" --dtype q8_0 > /dev/null
    python -m nanokor.export --ckpt "$1" --out "$WORK/$2/hf" > /dev/null
    python "$SRC/convert_hf_to_gguf.py" "$WORK/$2/hf" --outfile "$WORK/$2/converted-hf.gguf" --outtype f32 \
        > "$WORK/convert.log" 2>&1 || { tail -20 "$WORK/convert.log"; exit 1; }
}

chat_model() {  # CHAT_CKPT, or a stand-in made from the base checkpoint $1; exported; sets CHAT's flags
    local chat="${CHAT_CKPT:-}"
    if [[ -z "$chat" ]]; then
        chat="$WORK/chat.pt"
        python - "$1" "$chat" <<'PY'
import sys
import torch
from nanokor.checkpoint import load_checkpoint, save_checkpoint
from nanokor.tokenizer import EOS_ID, IM_END_ID
ckpt = load_checkpoint(sys.argv[1])
head = ckpt["model"]["lm_head.weight"]
head[IM_END_ID] = 1.5 * head[EOS_ID]
save_checkpoint({**ckpt, "chat": True}, sys.argv[2])
PY
    fi
    echo "== exporting the chat model: --gguf f32, and the HF directory through convert_hf_to_gguf.py"
    python -m nanokor.export --ckpt "$chat" --gguf --out "$WORK/chat-gguf" > /dev/null
    python -m nanokor.export --ckpt "$chat" --out "$WORK/chat-hf" > /dev/null
    python "$SRC/convert_hf_to_gguf.py" "$WORK/chat-hf" --outfile "$WORK/converted-chat.gguf" --outtype f32 \
        > "$WORK/convert.log" 2>&1 || { tail -20 "$WORK/convert.log"; exit 1; }
    CHAT=(--chat-ckpt "$chat" --chat-gguf "nanokor --gguf, f32=$WORK/chat-gguf/model-f32.gguf"
          --chat-gguf "convert_hf_to_gguf.py, f32=$WORK/converted-chat.gguf")
}

cat nanokor/data/sample/*.txt > "$WORK/sample.txt"
CKPT="${CKPT:-}"
if [[ -n "$CKPT" ]]; then
    export_all "$CKPT" given
    chat_model "$CKPT"
    python bench/llamacpp_check.py --bin "$BIN" --ckpt "$CKPT" --text "$WORK/sample.txt" \
        --gguf "nanokor --gguf, f32=$WORK/given/gguf/model-f32.gguf" \
        --gguf "nanokor --gguf, q8_0=$WORK/given/gguf/model-q8_0.gguf" \
        --gguf "convert_hf_to_gguf.py, f32=$WORK/given/converted-hf.gguf" "${CHAT[@]}"
    exit 0
fi

echo "== Llama: training the quickstart model on the embedded sample (about a minute), exporting"
LLAMA="$(train llama --qk_norm=false)"
export_all "$LLAMA" llama
# The same directory without add_prefix_space, as the export wrote it before: the check must catch that.
cp -r "$WORK/llama/hf" "$WORK/llama/hf-old"
python -c 'import json, sys; p = sys.argv[1]; c = json.load(open(p)); del c["add_prefix_space"]; json.dump(c, open(p, "w"))' \
    "$WORK/llama/hf-old/tokenizer_config.json"
python "$SRC/convert_hf_to_gguf.py" "$WORK/llama/hf-old" --outfile "$WORK/llama/converted-hf-old.gguf" --outtype f32 \
    > "$WORK/convert.log" 2>&1 || { tail -20 "$WORK/convert.log"; exit 1; }
chat_model "$LLAMA"
python bench/llamacpp_check.py --bin "$BIN" --ckpt "$LLAMA" --text "$WORK/sample.txt" \
    --gguf "nanokor --gguf, f32=$WORK/llama/gguf/model-f32.gguf" \
    --gguf "nanokor --gguf, q8_0=$WORK/llama/gguf/model-q8_0.gguf" \
    --gguf "convert_hf_to_gguf.py, f32=$WORK/llama/converted-hf.gguf" \
    --gguf "convert_hf_to_gguf.py, f32, no add_prefix_space=$WORK/llama/converted-hf-old.gguf" "${CHAT[@]}"

echo "== Qwen3: the same model with qk_norm (llama.cpp's qwen3 architecture)"
QWEN3="$(train qwen3 --qk_norm=true)"
export_all "$QWEN3" qwen3
python bench/llamacpp_check.py --bin "$BIN" --ckpt "$QWEN3" --text "$WORK/sample.txt" \
    --out bench/results/llamacpp_check_qwen3.json \
    --gguf "qwen3: nanokor --gguf, f32=$WORK/qwen3/gguf/model-f32.gguf" \
    --gguf "qwen3: nanokor --gguf, q8_0=$WORK/qwen3/gguf/model-q8_0.gguf" \
    --gguf "qwen3: convert_hf_to_gguf.py, f32=$WORK/qwen3/converted-hf.gguf"
