# The original guide's recipe, Transformer-base style: AdamW, Noam that never anneals, label smoothing 0.1,
# dropout 0.1, on config/base.py's model and batch. Kept runnable for comparison; config/base.py is better.
# What it costs, measured by bench/recipe_quality.py (d_model 256, 6 layers, 2M tokens, one CPU core):
#   the table in README, "Benchmarks" (the guide row).
#   torchrun --standalone --nproc_per_node=8 train.py config/guide.py
data_dir = "data/korean_textbooks"
dtype = "bf16"
compile = True

n_layer = 12
n_head = 12
d_model = 768
d_ff = 3072
dropout = 0.1

block_size = 1024
batch_size = 16
grad_accum = 4
max_steps = 20000

optimizer = "adamw"
schedule = "noam"
warmup_steps = 4000
lr_factor = 1.0  # peak lr = 768^-0.5 * 4000^-0.5 = 5.7e-4 at step 4000, for every parameter
cooldown_frac = 0.0
embed_lr = 0.0
weight_decay = 0.1
label_smoothing = 0.1

eval_interval = 500
eval_tokens = 2_097_152
keep_best = 3

wandb_mode = "auto"
wandb_run_name = "guide"
