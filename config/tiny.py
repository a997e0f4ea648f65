# A model whose loss visibly falls within a few minutes on a 2-core CPU (make demo uses it):
# 2 layers, 4 s of context, all 8 codebooks.
out_dir = "out-tiny"
n_layer = 2
n_head = 4
n_embd = 128
block_size = 300
n_codebooks = 8
n_kv_head = 2           # grouped-query attention: 2 query heads per key/value head, a 2x smaller KV cache
bigram = True           # the previous-frame bigram inside the model, counted from your train split
bigram_min_gain = 0     # always, unlike config/small.py: in a few minutes the table's head start wins (the demo
                        # corpus: gain 0.71, best val 5.86 with the table against 6.31 without, 200 iterations)
rotary = True           # rotary positions (queries and keys turned by angles), no learned position table

batch_size = 8
max_iters = 200
lr_decay_iters = 200
learning_rate = 2e-3    # AdamW, embeddings and heads
muon_lr = 0.02          # Muon, the blocks' weight matrices
min_lr = 2e-4
warmup_iters = 20
eval_interval = 50
eval_iters = 5
log_interval = 10

seconds = 8.0
num_samples = 2
