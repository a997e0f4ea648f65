"""
The model's one-step path for generation: a KV cache, the weights in a decode precision, and one
step of the model written out flat.

A step of generation is one position for every piece of the batch: at batch 1 on a CPU it is well
under a millisecond of work, and each op's dispatch costs about as much as its arithmetic. So a
step is GPT.forward for a single step written out flat (`Decoder.step_logits`): no module is
called, nothing is looked up by attribute, no dropout runs (eval mode is assumed) and residual
adds ride along in the matmuls. The prompt goes through the model's own forward (GPT.prefill). A
test holds the two paths equal, so a change to the Block must be made in both: model.py and here.

On a CUDA device a step is captured once as a CUDA graph (CUDAGraphStep) and replayed.
"""
import torch
import torch.nn.functional as F

from nanosuno.model import rotate


# the precisions a Decoder can run in
DECODE_DTYPES = ("float32", "bfloat16", "int8")


class KVCache:
    """Keys and values of every layer for up to `max_len` steps, filled left to right.
    Pre-allocated once so that a decode step writes one column in place instead of
    concatenating (which would copy the whole cache each step). Per layer, keys and values
    share one tensor (k/v, B, head, step, head_dim), so that writing a step is a single copy.
    (One tensor per layer rather than one for all: torch.compile then updates them in place
    instead of copying the whole cache every step.) GPT.forward(cache=...) fills it too."""

    def __init__(self, config, batch_size, max_len, device, dtype):
        head_dim = config.n_embd // config.n_head
        shape = (2, batch_size, config.kv_heads, max_len, head_dim)
        self.kv = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.max_len = max_len
        self.length = 0             # steps filled so far

    def advance(self, steps):
        """Count `steps` more steps as filled (the model has just written their keys and values)."""
        self.length += steps

    def reset(self):
        """Empty the cache (nothing is erased: the next steps overwrite the old ones)."""
        self.length = 0


def cache_dtype(model):
    """The KV cache's dtype: the model's, but at least float32 on a CPU, where attention over a
    bfloat16 cache runs 3-6x slower than over a float32 one (more than twice the bytes cost)."""
    p = model.lm_heads.weight
    return torch.promote_types(p.dtype, torch.float32) if p.device.type == "cpu" else p.dtype


def new_cache(model, batch_size, max_len=None):
    """An empty KV cache for `batch_size` streams of the model, of max_len steps (default: its context)."""
    return KVCache(model.config, batch_size, max_len or model.config.block_size, model.lm_heads.weight.device,
                   cache_dtype(model))


def rotation_matrices(angles):
    """model.rotate as matrices: (positions, D, D), x @ matrices[t] turns x (..., D) as
    rotate(x, angles[t]) does. The turn is linear, so its matrix is rotate applied to the identity
    (row j: channel j turned), and the formula stays in one place."""
    D = angles.shape[1]
    return rotate(torch.eye(D, dtype=angles.dtype, device=angles.device), angles[:, None])


def decode_matrix(weight, int8):
    """A weight matrix (out, in) as a step multiplies it: the parameter itself, transposed (a view: it
    follows training and loading); or int8 with one bf16 scale per output row (symmetric, absmax)
    for torch's dequantizing int8 kernel, a quarter of float32's bytes (a copy)."""
    if not int8:
        return weight.detach().t()
    w = weight.detach().float()
    scales = (w.abs().amax(1) / 127).clamp(min=1e-12).to(torch.bfloat16)
    return (w / scales.float()[:, None]).round().clamp(-128, 127).to(torch.int8), scales


def matmul(x, weight, bias=None, residual=None):
    """residual + x @ weight + bias (bias and residual optional), weight from decode_matrix: a float
    matrix, where one addmm also adds the residual; or an (int8 matrix, scales) pair, whose kernel
    takes bf16 activations (an int8 Decoder's model is bf16)."""
    if isinstance(weight, tuple):
        y = torch._weight_int8pack_mm(x, *weight)
    elif residual is None:
        y = x @ weight
    else:
        y, residual = torch.addmm(residual, x, weight), None
    if bias is not None:
        y = y + bias
    return y if residual is None else residual + y


class Decoder:
    """A model ready to generate in one of DECODE_DTYPES (None: as the model is):
      float32   the model in float32;
      bfloat16  the model cast to bfloat16 (prefill, KV cache and logits too);
      int8      the model cast to bfloat16, and the step's weight matrices (blocks and heads) as int8
                with one scale per output row (see decode_matrix).
    The cast is done in place, to the model itself. On a CPU a step reads every weight once: fewer
    bytes are faster. What each precision costs in teacher-forced cross-entropy, `python bench.py
    decode_quality` measures (decode_dtype=auto is the fastest within 0.005 nats of float32).
    Float matrices are the parameters themselves; int8 ones are copies: make a new Decoder after
    moving, casting or loading the model."""

    def __init__(self, model, dtype=None):
        if dtype is not None:
            if dtype not in DECODE_DTYPES:
                raise ValueError(f"decode dtype must be one of {', '.join(DECODE_DTYPES)}, got {dtype!r}")
            model.to(torch.float32 if dtype == "float32" else torch.bfloat16)
        self.model, self.config = model, model.config
        int8 = dtype == "int8"
        # plain dicts: no nn.Module lookups per step
        self.layers = [{name: decode_matrix(p, int8) if p.dim() == 2 else p.detach()
                        for name, p in block.named_parameters()} for block in model.h]
        self.heads = decode_matrix(model.lm_heads.weight, int8)
        if self.config.rotary:   # one matmul per step instead of rotate's ~10 small ops, in the
            # cache's dtype: on a CPU a bfloat16 (10 x 32) @ (32 x 32) costs ~3x a float32 one
            self.turns = rotation_matrices(model.rotary).to(cache_dtype(model))

    @property
    def device(self):
        return self.model.lm_heads.weight.device

    def new_cache(self, batch_size, max_len=None):
        return new_cache(self.model, batch_size, max_len)

    def prefill(self, codes, cache, style_ids=None):
        """Run a prompt (B, K, T) into the cache; returns the next step's logits (B, K, V)."""
        return self.model.prefill(codes, cache, style_ids)

    def step(self, codes, cache, style_ids=None):
        """One step (B, K) -> logits (B, K, V) for the step after it, at the cache's length
        (style_ids: see GPT.add_style)."""
        self.model.check_fits(cache.length, 1)
        logits = self.step_logits(codes, cache.kv, cache.length, style_ids)
        cache.advance(1)
        return logits

    def step_function(self, cache, style_ids=None):
        """The step that generation calls for this cache, (codes, cache) -> logits: on CUDA one
        captured graph instead of ~100 kernel launches (CUDAGraphStep), elsewhere step."""
        if self.device.type == "cuda":
            return CUDAGraphStep(self, cache, style_ids)
        return lambda codes, cache: self.step(codes, cache, style_ids)

    @torch.no_grad()
    def step_logits(self, codes, kv_cache, t, style_ids=None):
        """step's work: the step `codes` (B, K) at position t, its keys and values written into the
        cache; returns the logits (B, K, V). t is a Python int (attend over the t + 1 steps filled so
        far), or a 1-element device tensor (what a CUDA graph replays, see CUDAGraphStep: shapes are
        fixed, so every step attends over the whole cache, masked beyond t)."""
        model = self.model
        B, K = codes.shape
        C, H = self.config.n_embd, self.config.n_head
        H_kv, D = self.config.kv_heads, C // H
        at_tensor = torch.is_tensor(t)
        # the K code embeddings summed in one op (rows code + k * (V + 1), as in forward), + position
        # (a learned vector, or rotary angles that turn the queries and keys below)
        rows = codes + model.code_offsets[0, :, 0]
        x = F.embedding_bag(rows, model.wte.weight, mode="sum")                               # (B, C)
        rotary = self.config.rotary
        if rotary:
            turn = self.turns.index_select(0, t) if at_tensor else self.turns[t]      # (D, D) or (1, D, D)
        else:
            x = x + (model.wpe.weight.index_select(0, t) if at_tensor else model.wpe.weight[t])
        x = model.add_style(x, style_ids)
        if at_tensor:
            visible = (torch.arange(kv_cache[0].shape[3], device=t.device) <= t).view(1, -1)  # (query, keys)
        for w, kv in zip(self.layers, kv_cache):
            h = torch.layer_norm(x, (C,), w["ln_1.weight"], w.get("ln_1.bias"))
            qkv = matmul(h, w["attn.c_attn.weight"], w.get("attn.c_attn.bias")).view(B, H + 2 * H_kv, D)
            if rotary:   # the query and key heads turned, the value heads as they are
                qkv = qkv.to(kv.dtype)
                qkv[:, :H + H_kv] = qkv[:, :H + H_kv] @ turn
            # the query heads that share a k/v head attend as that head's H / H_kv queries: one
            # read of the cache per k/v head (the cache may be wider than the model: see cache_dtype)
            q = qkv[:, :H].reshape(B, H_kv, H // H_kv, D).to(kv.dtype)
            kv_new = qkv[:, H:].view(B, 2, H_kv, 1, D).transpose(0, 1)
            if at_tensor:
                kv.index_copy_(3, t, kv_new.to(kv.dtype))       # this step's keys and values
                y = F.scaled_dot_product_attention(q, kv[0], kv[1], attn_mask=visible)
            else:
                kv.narrow(3, t, 1).copy_(kv_new)
                y = F.scaled_dot_product_attention(q, *kv.narrow(3, 0, t + 1))
            y = y.reshape(B, C).to(x.dtype)       # (B, H_kv, H / H_kv, D) is (B, C) in memory
            x = matmul(y, w["attn.c_proj.weight"], w.get("attn.c_proj.bias"), residual=x)
            h = torch.layer_norm(x, (C,), w["ln_2.weight"], w.get("ln_2.bias"))
            h = F.gelu(matmul(h, w["mlp.c_fc.weight"], w.get("mlp.c_fc.bias")), approximate="tanh")
            x = matmul(h, w["mlp.c_proj.weight"], w.get("mlp.c_proj.bias"), residual=x)
        x = torch.layer_norm(x, (C,), model.ln_f.weight, model.ln_f.bias)
        logits = matmul(x, self.heads).view(B, K, -1)
        return logits + model.bigram.weight[rows] if self.config.bigram else logits


class CUDAGraphStep:
    """Decoder.step for one cache, captured once as a CUDA graph.

    A decode step is ~100 small kernels. Launched one by one from Python, the GPU spends most of a
    step waiting for the next launch; captured, a step is one graph launch plus two small copies
    into its input buffers, with no host sync, so Python runs ahead and the GPU stays busy. A graph
    replays fixed shapes: the position is a device tensor, and each step attends over the whole
    cache with the steps beyond it masked (Decoder.step_logits). Replays read and write the cache's
    tensors in place, so prefills and window slides between steps need nothing from the graph.
    Build it on an empty cache (warming up writes a step at position 0), with the style ids every step
    will use (see GPT.add_style)."""

    def __init__(self, decoder, cache, style_ids=None):
        if cache.length:
            raise ValueError("CUDAGraphStep warms up at position 0: build it before filling the cache")
        B, device = cache.kv[0].shape[1], cache.kv[0].device
        self.decoder, self.style_ids = decoder, style_ids     # the graph reads the style_ids from this tensor
        self.codes = torch.zeros(B, decoder.config.n_codebooks, dtype=torch.long, device=device)
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        # warm up on a side stream before capturing (kernels choose their algorithms and workspaces)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):
                decoder.step_logits(self.codes, cache.kv, self.position, style_ids)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = decoder.step_logits(self.codes, cache.kv, self.position, style_ids)

    def __call__(self, codes, cache):
        """decoder.step(codes, cache, style_ids). The logits returned are the graph's output buffer: the
        next step overwrites them."""
        self.decoder.model.check_fits(cache.length, 1)
        self.codes.copy_(codes)
        self.position.fill_(cache.length)
        self.graph.replay()
        cache.advance(1)
        return self.logits
