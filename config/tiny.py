# The CPU quickstart: a ~2M-parameter model on the embedded Korean sample, a few minutes on 2 cores.
#   python prepare.py --dataset sample && python train.py config/tiny.py
out_dir = "out/tiny"
data_dir = "data/sample"
device = "cpu"

n_layer = 4
n_head = 4
d_model = 128
d_ff = 384
dropout = 0.1

block_size = 128
batch_size = 16
grad_accum = 1
max_steps = 600

schedule = "noam"
warmup_steps = 100
lr_factor = 0.5  # peak lr = 0.5 / sqrt(128 * 100) = 4.4e-3 at step 100
weight_decay = 0.1
grad_clip = 1.0
label_smoothing = 0.0

eval_interval = 100
eval_tokens = 4096  # the sample's validation split holds ~6,700 tokens
keep_best = 3
sample_tokens = 48
