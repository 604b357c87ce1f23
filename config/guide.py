# The real run: a ~160M-parameter model on 8 GPUs, Transformer-base style (Noam, label smoothing).
#   python prepare.py                                          # maywell/korean_textbooks -> data/korean_textbooks
#   torchrun --standalone --nproc_per_node=8 train.py config/base.py
data_dir = "data/korean_textbooks"
dtype = "bf16"  # autocast over fp32 master weights
compile = True

n_layer = 12
n_head = 12
d_model = 768
d_ff = 3072
dropout = 0.1

# 16 sequences x 1024 tokens x 4 micro-steps x 8 GPUs = 524,288 tokens per optimizer step.
block_size = 1024
batch_size = 16
grad_accum = 4
max_steps = 20000  # ~10.5B tokens

schedule = "noam"
warmup_steps = 4000
lr_factor = 1.0  # peak lr = 768^-0.5 * 4000^-0.5 = 5.7e-4 at step 4000
weight_decay = 0.1
grad_clip = 1.0
label_smoothing = 0.1

eval_interval = 500
eval_tokens = 2_097_152  # 2M validation tokens per evaluation, split over the ranks
keep_best = 3

wandb_mode = "auto"  # online with an API key, offline without one
wandb_run_name = "base"
