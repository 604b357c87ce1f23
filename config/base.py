# The real run: a ~160M-parameter model on 8 GPUs with nanokor's measured recipe (the defaults in
# nanokor/config.py: Muon for the block matrices, AdamW for embedding/head/norms, Noam with a linear
# cooldown over the last 40% of the run, no dropout or label smoothing; docs/benchmarks.md has the
# measurements). The original guide's recipe is config/guide.py.
#   python prepare.py                                          # maywell/korean_textbooks -> data/korean_textbooks
#   torchrun --standalone --nproc_per_node=8 train.py config/base.py
data_dir = "data/korean_textbooks"
dtype = "bf16"  # autocast over fp32 master weights
compile = True

n_layer = 12
n_head = 12
d_model = 768
d_ff = 3072

# 16 sequences x 1024 tokens x 4 micro-steps x 8 GPUs = 524,288 tokens per optimizer step.
block_size = 1024
batch_size = 16
grad_accum = 4
max_steps = 20000  # ~10.5B tokens

# The defaults' rates, by the rule docs/benchmarks.md checks at two widths: the AdamW head's peak scales as
# d^-0.5 (0.096 / sqrt(d_model), whatever the warmup), measured best at d_model 256 and here
# lr_factor / sqrt(768 * 1000) = 3.4e-3 at step 1000; Muon's 0.03 and the embedding's 0.2 do not scale.
warmup_steps = 1000
lr_factor = 3.0

eval_interval = 500
eval_tokens = 2_097_152  # 2M validation tokens per evaluation, split over the ranks
keep_best = 3

wandb_mode = "auto"  # online with an API key, offline without one
wandb_run_name = "base"
