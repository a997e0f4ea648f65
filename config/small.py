# The reference model: ~6.2M non-embedding parameters (plus, where your songs' frames predict each
# other, the bigram table: 8.4M entries, counted from your songs, not learned), 27 s of context
# (2048 steps at 75 steps/s), all 8 codebooks of Encodec 24 kHz at 6 kbps.
out_dir = "out-small"
n_layer = 6
n_head = 8
n_embd = 256
block_size = 2048
n_codebooks = 8
n_kv_head = 2           # grouped-query attention: 4 query heads per key/value head, a 4x smaller KV cache
bigram = True           # the previous-frame bigram inside the model, counted from your train split
bigram_min_gain = 1.0   # ... but only where one frame predicts the next 1 nat/token better than the unigram
                        # (wesnoth music: spectral codec 1.84, on; untrained codec 0.50, off; docs/learning.md)
rotary = True           # rotary positions (queries and keys turned by angles), no learned position table

batch_size = 8
gradient_accumulation_steps = 4
max_iters = 5000
lr_decay_iters = 5000
learning_rate = 2e-3    # AdamW, embeddings and heads
muon_lr = 0.02          # Muon, the blocks' weight matrices
min_lr = 2e-4
warmup_iters = 250
eval_interval = 250
eval_iters = 20
