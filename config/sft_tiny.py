# SFT of the quickstart's base model (config/tiny.py) on the embedded Korean conversation sample:
#   python prepare.py --chat --dataset sample --tokenizer data/sample/tokenizer.model   # -> data/sample-chat
#   python train.py config/sft_tiny.py --init_from=out/last.pt --out_dir=out-sft
# The architecture comes from the checkpoint (--init_from); only the weights are loaded: the optimizer
# and the schedule start fresh. Rows are whole conversations packed into block_size + 1 tokens, and only
# the assistant's tokens are trained and scored.
data_dir = "data/sample-chat"

block_size = 256  # the sample's longest conversation is 150 tokens; packed rows hold two to four
batch_size = 8
grad_accum = 1
max_steps = 150

optimizer = "muon"
schedule = "wsd"
warmup_steps = 10
decay_frac = 1.0  # linear decay from the warmup's end to min_lr
lr = 3e-3  # the AdamW head's peak: tiny.py's
min_lr = 0.0
muon_lr = 0.02
embed_lr = 0.05
weight_decay = 0.0
dropout = 0.0

eval_interval = 25
eval_tokens = 1 << 20  # all of the sample's validation conversations
keep_best = 1
sample_tokens = 48
sample_prompt = "한국의 수도는 어디인가요?"
