# SFT of config/base.py's model into a Korean chat model, on 8 GPUs. KULLM-v2 (nlpai-lab/kullm-v2,
# Apache-2.0, 152k instruction/input/output records) is the example; any layout prepare.py --chat reads
# works (README, "Chat").
#   python prepare.py --chat --dataset nlpai-lab/kullm-v2 --tokenizer data/korean_textbooks/tokenizer.model
#   torchrun --standalone --nproc_per_node=8 train.py config/sft.py --init_from=out/last.pt --out_dir=out-sft
# The architecture comes from the checkpoint (--init_from), whose tokenizer must be the data's; only its
# weights are loaded, and the optimizer and schedule start fresh. Whole conversations are packed into
# rows of block_size + 1 tokens; only the assistant's tokens are trained and scored.
data_dir = "data/kullm-v2-chat"
dtype = "bf16"
compile = True

# 16 rows x 1024 tokens x 8 GPUs = 131,072 tokens per step. prepare.py --chat's default --context is
# 1024 too, so every conversation it keeps fits a row. The recipe trains 2 epochs: train.py's log says
# how many rows an epoch packs, and max_steps = 2 x rows / 128. 800 is that for ~51k rows, a guess for
# KULLM-v2's 152k records (about three to a row): set it from your log.
block_size = 1024
batch_size = 16
grad_accum = 1
max_steps = 800

# The recipe bench/sft_recipe.py measured (README, "Chat"): every peak at 0.1 x pretraining's (the head's
# 3.4e-3, Muon's 0.02, the embedding's 0.2), a 5% warmup, then a linear decay to 0 over the run, no
# weight decay.
optimizer = "muon"
schedule = "wsd"
decay_frac = 1.0  # the decay starts at the warmup's end
min_lr = 0.0
warmup_steps = 40
lr = 3.4e-3 * 0.1
muon_lr = 0.02 * 0.1
embed_lr = 0.2 * 0.1
weight_decay = 0.0

eval_interval = 100
eval_tokens = 1_048_576
keep_best = 1
sample_prompt = "한국의 수도는 어디인가요?"

wandb_mode = "auto"
wandb_run_name = "sft"
