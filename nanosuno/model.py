"""
The transformer: a nanoGPT-style causal decoder over K parallel codebook streams.

Input is `codes` (B, K, T) in the delayed layout (see pattern.py): at every step the K codebook
tokens are embedded and summed; the output has K heads of `codebook_size` logits, one per
codebook. Token id `codebook_size` is the special "no code here" token: it can be input (delay
warm-up, padding), it is never a target that counts, and it can never be sampled (the heads have
no logit for it).

Generation uses a KV cache: `prefill` runs the prompt once, then `decode_step` costs O(current
length) per step. The same Block code serves training and both generation paths.
"""
import inspect
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    block_size: int = 2048          # max steps of context (75 steps = 1 second of audio)
    n_codebooks: int = 8            # K parallel streams
    codebook_size: int = 1024       # codes per codebook; id codebook_size is the special token
    n_layer: int = 6
    n_head: int = 8
    n_embd: int = 256
    dropout: float = 0.0
    bias: bool = False              # biases in Linears and LayerNorms (False: a bit better and faster)


class KVCache:
    """Keys and values of every layer for up to `max_len` steps, filled left to right.
    Pre-allocated once so that a decode step writes one column in place instead of
    concatenating (which would copy the whole cache each step)."""

    def __init__(self, config, batch_size, max_len, device, dtype):
        head_dim = config.n_embd // config.n_head
        shape = (config.n_layer, batch_size, config.n_head, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.length = 0             # steps filled so far


class CausalSelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head, self.n_embd, self.dropout = config.n_head, config.n_embd, config.dropout

    def forward(self, x, cache=None, layer=0):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        if cache is None:
            # training / full forward: the fused causal kernel (flash attention on CUDA)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                               dropout_p=self.dropout if self.training else 0.0)
        else:
            # write this chunk's keys/values into the cache, attend over everything so far
            start, end = cache.length, cache.length + T
            cache.k[layer, :, :, start:end] = k
            cache.v[layer, :, :, start:end] = v
            k, v = cache.k[layer, :, :, :end], cache.v[layer, :, :, :end]
            if T == 1:      # one new step sees every cached step: no mask needed
                y = F.scaled_dot_product_attention(q, k, v)
            elif start == 0:  # prefill from empty: plain causal
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            else:           # a chunk after cached steps: query i sees keys 0..start+i
                mask = torch.ones(T, end, dtype=torch.bool, device=x.device).tril(diagonal=start)
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).reshape(B, T, C)
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

    def forward(self, x, cache=None, layer=0):
        x = x + self.attn(self.ln_1(x), cache, layer)
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
        self.register_buffer("code_offsets", torch.arange(K).view(1, K, 1) * (V + 1), persistent=False)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_heads = nn.Linear(config.n_embd, K * V, bias=False)  # K heads in one matmul
        # nanoGPT init: N(0, 0.02), residual projections scaled down by depth
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def get_num_params(self, non_embedding=True):
        """Parameter count; by default without the lookup tables (they cost no FLOPs)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.wte.weight.numel() + self.wpe.weight.numel()
        return n

    def forward(self, codes, targets=None, cache=None, last_only=False):
        """codes (B, K, T) -> logits (B, K, T, V) and the loss (None without targets).
        With a cache, the steps are appended after the cached ones; last_only returns only the
        last step's logits (B, K, 1, V), which is all generation needs."""
        B, K, T = codes.shape
        start = cache.length if cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} steps exceeds block_size {self.config.block_size}")
        pos = torch.arange(start, start + T, device=codes.device)
        x = self.wte(codes + self.code_offsets).sum(1) + self.wpe(pos)   # (B, T, C)
        x = self.drop(x)
        for layer, block in enumerate(self.h):
            x = block(x, cache, layer)
        if cache is not None:
            cache.length += T
        if last_only:
            x = x[:, -1:]
        x = self.ln_f(x)
        logits = self.lm_heads(x).view(B, x.shape[1], K, -1).transpose(1, 2)   # (B, K, T, V)
        loss = None
        if targets is not None:
            losses = codebook_losses(logits, targets, self.config.codebook_size)
            loss = losses.nanmean()
        return logits, loss

    def new_cache(self, batch_size, max_len=None):
        max_len = max_len or self.config.block_size
        p = self.lm_heads.weight
        return KVCache(self.config, batch_size, max_len, p.device, p.dtype)

    @torch.no_grad()
    def prefill(self, codes, cache):
        """Run a prompt (B, K, T) into the cache; returns the next step's logits (B, K, V)."""
        return self(codes, cache=cache, last_only=True)[0][:, :, -1]

    @torch.no_grad()
    def decode_step(self, codes, cache):
        """One step (B, K) -> logits (B, K, V) for the step after it."""
        return self(codes.unsqueeze(-1), cache=cache, last_only=True)[0][:, :, -1]

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        # decay the weight matrices and embeddings, not LayerNorm weights and biases
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        # the fused kernel updates all parameters in one pass (CUDA, and CPU in recent torch)
        fused = "fused" in inspect.signature(torch.optim.AdamW).parameters and device_type in ("cuda", "cpu")
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **({"fused": True} if fused else {}))

    def flops_per_step(self, T=None):
        """nanoGPT's (PaLM appendix B) count of training FLOPs per step (= per position):
        6 per parameter for the matmuls, plus attention's 12 * layers * embd * context."""
        cfg = self.config
        T = T or cfg.block_size
        return 6 * self.get_num_params() + 12 * cfg.n_layer * cfg.n_embd * T

    def estimate_mfu(self, steps_per_second, peak_flops, T=None):
        """Model FLOPs utilisation: achieved training FLOP/s over the device's peak FLOP/s."""
        return self.flops_per_step(T) * steps_per_second / peak_flops


@torch.no_grad()
def sample_next(logits, temperature=1.0, top_k=None, top_p=0.0, generator=None):
    """Pick one code per head: logits (B, K, V) -> codes (B, K).
    temperature 0 = greedy; top_k keeps the k most likely codes; top_p (0 = off) keeps the smallest
    set whose probability reaches p. The special token has no logit, so it is never sampled."""
    if temperature == 0:
        return logits.argmax(-1)
    # work on the top_k candidates only: softmax and noise over k values instead of all V
    # (this runs once per generated step, so it matters: ~3x faster than masking all V logits)
    top_k = min(top_k or logits.shape[-1], logits.shape[-1])
    values, codes = torch.topk(logits.float(), top_k, dim=-1, sorted=bool(top_p))
    probs = F.softmax(values / temperature, dim=-1)
    if top_p and top_p < 1.0:
        # values are sorted: drop a code once the codes before it reach top_p (the first stays)
        probs = probs.masked_fill(probs.cumsum(-1) - probs >= top_p, 0.0)
    # Gumbel-max in its exponential form: argmax(p / E) with E ~ Exp(1) = -log(U) draws from p
    # exactly, and is faster than torch.multinomial on small batches
    noise = torch.rand(probs.shape, device=probs.device, generator=generator).log_().neg_()
    return codes.gather(-1, (probs / noise).argmax(-1, keepdim=True)).squeeze(-1)
