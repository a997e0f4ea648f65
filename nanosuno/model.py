"""
The transformer: a nanoGPT-style causal decoder over K parallel codebook streams.

Input is `codes` (B, K, T) in the delayed layout (see pattern.py): at every step the K codebook
tokens are embedded and summed; the output has K heads of `codebook_size` logits, one per
codebook. Token id `codebook_size` is the special "no code here" token: it can be input (delay
warm-up, padding), it is never a target that counts, and it can never be sampled (the heads have
no logit for it).

With n_styles > 0 the model is conditioned on a style label: one learned vector per style, plus one
for "no style" (id n_styles), is added to every step's input. Trained with labels randomly dropped
to "no style", the same model is also unconditional, which classifier-free guidance needs
(generate.py). With n_styles = 0 (the default) there is no style table at all.

Generation (decode.py) runs a prompt into a KV cache through forward() (`prefill`), then one step at
a time through forward() for one step written out flat there; a test holds the two equal.
"""
import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanosuno.optim import MuonAdamW


@dataclass
class GPTConfig:
    block_size: int = 2048          # context in steps; 75 steps = 1 second of audio
    n_codebooks: int = 8            # K parallel streams: codebooks modelled, 1..8 (prepare always stores 8, at 6 kbps)
    codebook_size: int = 1024       # codes per codebook; id codebook_size is the special token
    n_layer: int = 6
    n_head: int = 8
    n_embd: int = 256
    n_kv_head: int = 0              # key/value heads, each shared by n_head / n_kv_head query heads
                                    # (grouped-query attention: a smaller KV cache); 0 = n_head
    dropout: float = 0.0
    bias: bool = False              # biases in Linears and LayerNorms (False: a bit better and faster)
    n_styles: int = 0               # style labels (0 = unconditional: no style table)
    # codebook 0's weight in the training loss (each other codebook's is 1): it is the hardest to
    # predict and, weighted equally, learns slower than a model of codebook 0 alone (README: How well it learns)
    codebook0_weight: float = 2.0
    # the previous-frame bigram inside the model: per codebook a table of logits, one row per input
    # code, added to the head's logits (K * (V + 1) * V parameters, lookups only). train.py starts it
    # from the train split's counts (init_bigram), so that a new model predicts as well as that
    # simple baseline from its first step and spends its capacity on what counting cannot know
    bigram: bool = False
    # positions by rotary embedding (RoPE): queries and keys turned by position-dependent angles, so
    # that attention sees how far apart two steps are; without it, a learned table of block_size
    # position vectors is added to the input
    rotary: bool = False

    # each field's valid values: (the rule in words, test). The settings (config.py) and a checkpoint's
    # model_args (checkpoint.py) are checked against these. Upper limits far beyond any machine's memory,
    # so that a typo (or a crafted checkpoint) ends here, not in an allocation that fails deep inside
    # torch or takes the machine's memory first
    RULES = {
        "block_size": ("in 2..1000000", lambda v: 2 <= v <= 1_000_000),
        "n_codebooks": ("in 1..8", lambda v: 1 <= v <= 8),
        "codebook_size": (">= 1", lambda v: v >= 1),
        "n_layer": ("in 1..1024", lambda v: 1 <= v <= 1024),
        "n_head": ("in 1..1024", lambda v: 1 <= v <= 1024),
        "n_embd": ("in 1..65536", lambda v: 1 <= v <= 65536),
        "n_kv_head": ("in 0..1024", lambda v: 0 <= v <= 1024),
        "dropout": ("in [0, 1)", lambda v: 0 <= v < 1),
        "n_styles": (">= 0", lambda v: v >= 0),
        "codebook0_weight": ("> 0", lambda v: v > 0 and math.isfinite(v)),
    }

    @property
    def kv_heads(self):
        """The key/value heads the attention has: n_kv_head, or n_head when it is 0."""
        return self.n_kv_head or self.n_head

    def check(self):
        """Raise ValueError naming the first field of another type or outside its RULES, or two fields
        that do not fit together, in one line; return self."""
        for f in fields(self):
            value = getattr(self, f.name)
            kinds = (int, float) if f.type is float else (f.type,)   # an int is a fine float
            if isinstance(value, bool) != (f.type is bool) or not isinstance(value, kinds):
                raise ValueError(f"setting '{f.name}' must be {f.type.__name__}, got {value!r} ({type(value).__name__})")
            rule = self.RULES.get(f.name)
            if rule and not rule[1](value):
                raise ValueError(f"setting '{f.name}' must be {rule[0]}, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head}): each head "
                             "gets n_embd / n_head channels")
        if self.n_kv_head and self.n_head % self.n_kv_head:
            raise ValueError(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head}): each "
                             "key/value head serves the same number of query heads")
        if self.block_size < self.n_codebooks:
            # generation slides its window keeping K - 1 steps and gaining at least one (generate.py)
            raise ValueError(f"block_size ({self.block_size}) must be at least n_codebooks ({self.n_codebooks})")
        return self


# settings in GPTConfig that shape how the model trains, not the model: resume may change them
TRAINING_ONLY = ("dropout", "codebook0_weight")


def rotary_angles(block_size, head_dim, base=10000.0):
    """cos and sin of the angles that rotary embedding turns each position's channel pairs by:
    (block_size, head_dim), the cosines in the first half. Pair i turns at base^(-2i / head_dim)
    radians per step (Su et al. 2021, RoFormer)."""
    per_step = base ** -(torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.arange(block_size, dtype=torch.float64)[:, None] * per_step
    return torch.cat([angles.cos(), angles.sin()], dim=1).float()


def rotate(x, angles):
    """Queries or keys (..., T, head_dim) turned by the rotary angles of their positions (T, head_dim):
    channel i is paired with channel i + head_dim / 2."""
    half = x.shape[-1] // 2
    cos, sin = angles[..., :half].to(x.dtype), angles[..., half:].to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class CausalSelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.n_head, self.n_kv_head = config.n_head, config.kv_heads
        head_dim = config.n_embd // config.n_head
        # q (n_head heads), then k and v (n_kv_head heads each), in one matmul
        self.c_attn = nn.Linear(config.n_embd, (self.n_head + 2 * self.n_kv_head) * head_dim, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_embd, self.dropout = config.n_embd, config.dropout

    def forward(self, x, cache=None, layer=0, angles=None):
        B, T, C = x.shape
        H, H_kv = self.n_head, self.n_kv_head
        qkv = self.c_attn(x).view(B, T, H + 2 * H_kv, C // H)
        q = qkv[:, :, :H].transpose(1, 2)                                        # (B, H, T, head_dim)
        kv_new = qkv[:, :, H:].view(B, T, 2, H_kv, C // H).permute(2, 0, 3, 1, 4)  # (k/v, B, H_kv, T, head_dim)
        if angles is not None:   # rotary positions: the steps' angles (T, head_dim)
            q = rotate(q, angles)
            kv_new = torch.stack((rotate(kv_new[0], angles), kv_new[1]))
        gqa = H_kv != H     # each k/v head serves H / H_kv query heads
        if cache is None:
            # training / full forward: the fused causal kernel (flash attention on CUDA)
            y = F.scaled_dot_product_attention(q, *kv_new, is_causal=True, enable_gqa=gqa,
                                               dropout_p=self.dropout if self.training else 0.0)
        else:
            # write this chunk's keys/values into the cache, attend over everything so far
            start, end = cache.length, cache.length + T
            kv = cache.kv[layer]
            kv[:, :, :, start:end] = kv_new
            k, v = kv[:, :, :, :end]
            q = q.to(kv.dtype)  # the cache may be wider than the model (see decode.cache_dtype)
            if T == 1:      # one new step sees every cached step: no mask needed
                y = F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
            elif start == 0:  # prefill from empty: plain causal
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
            else:           # a chunk after cached steps: query i sees keys 0..start+i
                mask = torch.ones(T, end, dtype=torch.bool, device=x.device).tril(diagonal=start)
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        y = y.transpose(1, 2).reshape(B, T, C).to(x.dtype)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, cache=None, layer=0, angles=None):
        x = x + self.attn(self.ln_1(x), cache, layer, angles)
        return x + self.mlp(self.ln_2(x))


def codebook_losses(logits, targets, special):
    """Cross-entropy per codebook, over real targets only: (B, K, T, V), (B, K, T) -> (K,).
    A codebook with no real target in the batch gets NaN (and is left out of the mean)."""
    K, V = logits.shape[1], logits.shape[-1]
    per_token = F.cross_entropy(logits.reshape(-1, V).float(), targets.reshape(-1),
                                ignore_index=special, reduction="none").view(targets.shape)
    real = (targets != special).to(per_token.dtype)
    return (per_token * real).transpose(0, 1).reshape(K, -1).sum(1) / real.transpose(0, 1).reshape(K, -1).sum(1)


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        K, V = config.n_codebooks, config.codebook_size
        # K embedding tables of V + 1 rows (the +1 is the special token), stored as one table so
        # that embedding a step is a single lookup: row = code + k * (V + 1)
        self.wte = nn.Embedding(K * (V + 1), config.n_embd)
        if config.n_styles:  # one row per style and a last one for "no style"
            self.style_emb = nn.Embedding(config.n_styles + 1, config.n_embd)
        self.register_buffer("code_offsets", torch.arange(K).view(1, K, 1) * (V + 1), persistent=False)
        # With equal weights, codebook 0 (the coarsest, most audible stream, and the hardest: it is
        # predicted with nothing of its frame known) learns slowest, and a model of codebook 0 alone
        # beats it. Weighting it up buys that back at no cost to the mean (bench.py learn, README).
        weights = torch.ones(K)
        weights[0] = config.codebook0_weight
        self.register_buffer("loss_weights", weights, persistent=False)
        if config.rotary:   # not saved: a checkpoint's block_size and head size give them back
            self.register_buffer("rotary", rotary_angles(config.block_size, config.n_embd // config.n_head),
                                 persistent=False)
        else:
            self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_heads = nn.Linear(config.n_embd, K * V, bias=False)  # K heads in one matmul
        if config.bigram:   # rows as wte's: code + k * (V + 1), the special token's row included
            self.bigram = nn.Embedding(K * (V + 1), V)
        # nanoGPT init: N(0, 0.02), residual projections scaled down by depth
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        if config.bigram:   # adds nothing until init_bigram fills it
            nn.init.zeros_(self.bigram.weight)

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def get_num_params(self):
        """Parameter count without the lookup tables (code, position and style embeddings, the bigram
        table: they cost no FLOPs)."""
        n = sum(p.numel() for p in self.parameters()) - self.wte.weight.numel()
        n -= 0 if self.config.rotary else self.wpe.weight.numel()
        n -= self.bigram.weight.numel() if self.config.bigram else 0
        return n - (self.style_emb.weight.numel() if self.config.n_styles else 0)

    @torch.no_grad()
    def init_bigram(self, probs, unigrams):
        """Fill the bigram table with the log of per-codebook bigram probabilities (K, V, V)
        P(code at t | code at t-1); the special token's rows (no previous frame) get the unigrams (K, V)."""
        K, V = self.config.n_codebooks, self.config.codebook_size
        table = self.bigram.weight.view(K, V + 1, V)
        table[:, :V] = torch.as_tensor(probs, dtype=torch.float64).clamp_min(1e-12).log().to(table)
        table[:, V] = torch.as_tensor(unigrams, dtype=torch.float64).log().to(table)

    def add_style(self, x, style_ids):
        """x (B, T, C) or (B, C) plus each sample's style vector. style_ids: (B,) ids, None = all "no
        style". A model without styles has nothing to add (every id means "no style" to it)."""
        if not self.config.n_styles:
            return x
        if style_ids is None:
            style_ids = torch.full((x.shape[0],), self.config.n_styles, dtype=torch.long, device=x.device)
        s = F.embedding(style_ids, self.style_emb.weight)
        return x + (s[:, None] if x.dim() == 3 else s)

    def forward(self, codes, targets=None, cache=None, last_only=False, style_ids=None):
        """codes (B, K, T) -> logits (B, K, T, V) and the training loss (None without targets): the
        per-codebook cross-entropies averaged with loss_weights (their plain mean is what evaluation
        reports).
        With a cache, the steps are appended after the cached ones; last_only returns only the
        last step's logits (B, K, 1, V), which is all generation needs. style_ids: (B,) style ids
        (see add_style)."""
        B, K, T = codes.shape
        start = cache.length if cache is not None else 0
        self.check_fits(start, T)
        rows = codes + self.code_offsets
        x = self.wte(rows).sum(1)                                              # (B, T, C)
        if self.config.rotary:   # the positions turn the queries and keys inside attention
            angles = self.rotary[start:start + T]
        else:
            angles, x = None, x + self.wpe(torch.arange(start, start + T, device=codes.device))
        x = self.add_style(x, style_ids)
        x = self.drop(x)
        for layer, block in enumerate(self.h):
            x = block(x, cache, layer, angles)
        if cache is not None:
            cache.advance(T)
        if last_only:
            x, rows = x[:, -1:], rows[:, :, -1:]
        x = self.ln_f(x)
        logits = self.lm_heads(x).view(B, x.shape[1], K, -1).transpose(1, 2)   # (B, K, T, V)
        if self.config.bigram:   # (delay pattern: stream k's input is the frame before its target)
            logits = logits + self.bigram(rows)
        loss = None
        if targets is not None:
            losses = codebook_losses(logits, targets, self.config.codebook_size) * self.loss_weights
            loss = losses.nansum() / self.loss_weights[~losses.isnan()].sum()
        return logits, loss

    @torch.no_grad()
    def prefill(self, codes, cache, style_ids=None):
        """Run a prompt (B, K, T) into the cache; returns the next step's logits (B, K, V)."""
        return self(codes, cache=cache, last_only=True, style_ids=style_ids)[0][:, :, -1]

    def check_fits(self, start, steps):
        """Refuse `steps` steps from position `start` on when they go beyond the context."""
        if start + steps > self.config.block_size:
            raise ValueError(f"sequence of {start + steps} steps exceeds block_size {self.config.block_size}")

    def configure_optimizers(self, learning_rate, muon_lr, weight_decay, betas, bigram_lr=0.0):
        """Muon for the blocks' weight matrices, AdamW for everything else: the code and position
        embeddings, the heads, the LayerNorm weights (see optim.py), and the bigram table at bigram_lr
        (0: not trained, kept as init_bigram left it). Each group remembers its initial_lr; the
        schedule scales them all alike."""
        hidden = [p for p in self.h.parameters() if p.dim() == 2]
        table = [self.bigram.weight] if self.config.bigram else []
        rest = [p for p in self.parameters() if not any(p is q for q in hidden + table)]
        groups = [{"params": hidden, "muon": True, "lr": muon_lr, "initial_lr": muon_lr},
                  {"params": rest, "muon": False, "lr": learning_rate, "initial_lr": learning_rate}]
        if table and bigram_lr:
            groups.append({"params": table, "muon": False, "lr": bigram_lr, "initial_lr": bigram_lr})
        elif table:   # no gradient to compute either
            self.bigram.weight.requires_grad_(False)
        return MuonAdamW(groups, betas=betas, weight_decay=weight_decay)

    def flops_per_step(self, T=None):
        """nanoGPT's (PaLM appendix B) count of training FLOPs per step (= per position):
        6 per parameter for the matmuls, plus attention's 12 * layers * embd * context."""
        config = self.config
        return 6 * self.get_num_params() + 12 * config.n_layer * config.n_embd * (T or config.block_size)

    def estimate_mfu(self, steps_per_second, peak_flops, T=None):
        """Model FLOPs utilisation: achieved training FLOP/s over the device's peak FLOP/s."""
        return self.flops_per_step(T) * steps_per_second / peak_flops
